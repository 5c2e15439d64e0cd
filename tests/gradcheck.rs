//! Finite-difference checks of every op's backward pass on small shapes: stride 2, padding on
//! every side, odd sizes, max-pool windows that touch the padding, batches large enough to be
//! split into several im2col chunks.
//!
//! Every check runs on the CPU backend and, when a GPU is present, on the CUDA backend.
//!
//! Each check takes L = sum(y * r) for a fixed random r, perturbs every input element by +-h,
//! and compares (L(x+h) - L(x-h)) / 2h with the analytic gradient.

mod common;

use common::{get, put};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::engine::prelude::*;
use resnet_cifar::engine::{
    Backend, BatchNormSaved, BatchNormTrain, ConvGeom, ConvOp, Epilogue, GradSlots, LinearDims, PoolGeom, Shape4,
    Targets,
};

const H: f32 = 1e-2;

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Compares `analytic` with central differences of `loss` around `x`, element by element,
/// relative to the gradient's largest magnitude.
fn assert_fd(what: &str, x: &[f32], analytic: &[f32], mut loss: impl FnMut(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let scale = analytic.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)).max(1e-3);
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + H;
        let up = loss(&xp);
        xp[i] = x[i] - H;
        let down = loss(&xp);
        xp[i] = x[i];
        let fd = (up - down) / (2.0 * H as f64);
        let err = (fd - analytic[i] as f64).abs() / scale;
        assert!(
            err < 5e-3,
            "{what}: element {i}: finite difference {fd:.6} vs analytic {:.6} (scale {scale:.4})",
            analytic[i]
        );
    }
}

/// Finite differences of a convolution on `(n, h, w, cin)` inputs with `(cout, k, stride,
/// pad)` (square kernels).
fn conv_case<B: Backend>(
    be: &B,
    (n, h, w, cin): (usize, usize, usize, usize),
    (cout, k, stride, pad): (usize, usize, usize, usize),
) {
    let mut rng = ChaCha8Rng::seed_from_u64((n * 1000 + h * 100 + k * 10 + stride + pad) as u64);
    let g = ConvGeom {
        input: Shape4::new(n, h, w, cin),
        cout,
        kh: k,
        kw: k,
        stride,
        pad,
    };
    // Random weights in whatever layout the backend uses: the check is layout-blind.
    let x = random(&mut rng, g.input.numel());
    let wt = random(&mut rng, g.weight_len());
    let r = random(&mut rng, g.output().numel());
    let plan = be.conv2d_plan(&g);
    let mut ws = be.alloc(be.conv2d_workspace_len(&g, &plan));
    let mut y = be.alloc(g.output().numel());
    let mut fwd = |x: &[f32], wt: &[f32]| {
        let w = put(be, wt);
        let conv = ConvOp {
            g: &g,
            plan: &plan,
            w: &w,
        };
        be.conv2d_forward(conv, &put(be, x), &mut y, &mut ws);
        dot(&get(be, &y, g.output().numel()), &r)
    };
    let mut ws2 = be.alloc(be.conv2d_workspace_len(&g, &plan));
    let (xd, wd, rd) = (put(be, &x), put(be, &wt), put(be, &r));
    let (mut dxd, mut dwd) = (be.alloc(x.len()), be.alloc(wt.len()));
    let op = |w| ConvOp { g: &g, plan: &plan, w };
    be.conv2d_backward(op(&wd), &xd, &rd, Some(&mut dxd), slot(&mut dwd), &mut ws2);
    let (dx, dw) = (get(be, &dxd, x.len()), get(be, &dwd, wt.len()));
    let what = format!("{}: conv {g:?}", be.name());
    assert_fd(&format!("{what} dx"), &x, &dx, |xp| fwd(xp, &wt));
    assert_fd(&format!("{what} dw"), &wt, &dw, |wp| fwd(&x, wp));
    // Without dx the weight gradient must be the same.
    let mut dw2 = be.alloc(wt.len());
    be.conv2d_backward(op(&wd), &xd, &rd, None, slot(&mut dw2), &mut ws2);
    assert_eq!(
        dw,
        get(be, &dw2, wt.len()),
        "{what}: dw depends on whether dx is asked for"
    );
}

on_backends! {
    conv_3x3_stride1_pad1_cpu, conv_3x3_stride1_pad1_cuda => |be| conv_case(be, (2, 5, 4, 3), (4, 3, 1, 1));
    conv_3x3_stride2_odd_size_cpu, conv_3x3_stride2_odd_size_cuda => |be| conv_case(be, (2, 7, 5, 3), (2, 3, 2, 1));
    conv_7x7_stride2_pad3_cpu, conv_7x7_stride2_pad3_cuda => |be| conv_case(be, (1, 9, 8, 3), (2, 7, 2, 3));
    conv_1x1_cpu, conv_1x1_cuda => |be| {
        conv_case(be, (2, 5, 5, 4), (3, 1, 2, 0));
        conv_case(be, (2, 3, 4, 4), (3, 1, 1, 0));
    };
    // airbench's first layer: 2x2 without padding, on 32x32 and odd sizes.
    conv_2x2_unpadded_cpu, conv_2x2_unpadded_cuda => |be| {
        conv_case(be, (2, 5, 5, 3), (4, 2, 1, 0));
        conv_case(be, (1, 6, 7, 3), (3, 2, 2, 0));
    };
    conv_tiny_maps_where_padding_dominates_cpu, conv_tiny_maps_where_padding_dominates_cuda => |be| {
        conv_case(be, (3, 1, 1, 4), (3, 3, 1, 1));
        conv_case(be, (3, 2, 2, 4), (3, 3, 2, 1));
        conv_case(be, (3, 2, 2, 2), (3, 3, 1, 1));
    };
}

#[test]
fn conv_batch_split_into_workspace_chunks() {
    // 64x64 map, 3x3x8 patches: 64*64*72 values an image, so the 4M-value workspace
    // holds 14 images and a batch of 16 runs as two chunks. Check only dw and a sample of dx
    // against a single-image reference instead of finite differences (too many elements).
    let be = Cpu::default();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let g = ConvGeom {
        input: Shape4::new(16, 64, 64, 8),
        cout: 4,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    let x = random(&mut rng, g.input.numel());
    let wt = random(&mut rng, g.weight_len());
    let dy = random(&mut rng, g.output().numel());
    let plan = be.conv2d_plan(&g);
    let mut ws = be.alloc(be.conv2d_workspace_len(&g, &plan));
    assert!(ws.len() < g.input.n * 64 * 64 * 72, "the batch must not fit one chunk");
    let mut y = vec![0.0; g.output().numel()];
    let op = |g| ConvOp { g, plan: &plan, w: &wt };
    be.conv2d_forward(op(&g), &x, &mut y, &mut ws);
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; wt.len()];
    be.conv2d_backward(op(&g), &x, &dy, Some(&mut dx), slot(&mut dw), &mut ws);
    // Per-image reference: the same op on each image alone (one chunk each).
    let gi = ConvGeom {
        input: Shape4::new(1, 64, 64, 8),
        ..g
    };
    let (xl, yl) = (gi.input.numel(), gi.output().numel());
    let mut dw_sum = vec![0f64; wt.len()];
    for i in 0..16 {
        let mut yi = vec![0.0; yl];
        let mut wsi = be.alloc(be.conv2d_workspace_len(&gi, &plan));
        be.conv2d_forward(op(&gi), &x[i * xl..(i + 1) * xl].to_vec(), &mut yi, &mut wsi);
        assert_eq!(&y[i * yl..(i + 1) * yl], &yi[..], "forward of image {i}");
        let (mut dxi, mut dwi) = (vec![0.0; xl], vec![0.0; wt.len()]);
        be.conv2d_backward(
            op(&gi),
            &x[i * xl..(i + 1) * xl].to_vec(),
            &dy[i * yl..(i + 1) * yl].to_vec(),
            Some(&mut dxi),
            slot(&mut dwi),
            &mut wsi,
        );
        assert_eq!(&dx[i * xl..(i + 1) * xl], &dxi[..], "dx of image {i}");
        for (s, v) in dw_sum.iter_mut().zip(&dwi) {
            *s += *v as f64;
        }
    }
    let scale = dw_sum.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (a, b) in dw.iter().zip(&dw_sum) {
        assert!(
            (*a as f64 - b).abs() < 1e-4 * scale,
            "dw over chunks {a} vs per-image sum {b}"
        );
    }
}

/// A weight gradient alone at the start of its arena.
fn slot<Buf>(arena: &mut Buf) -> GradSlots<'_, Buf> {
    GradSlots {
        arena,
        weight: 0,
        bias: None,
    }
}

/// A training-mode batch norm on `rows` rows of `c` channels: its output, saved statistics and
/// running statistics after.
fn bn_forward<B: Backend>(
    be: &B,
    (rows, c): (usize, usize),
    x: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    running: (&[f32], &[f32]),
    (residual, relu): (Option<&[f32]>, bool),
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut rm, mut rv) = (put(be, running.0), put(be, running.1));
    let (mut saved, mut y) = (be.alloc(2 * c), be.alloc(rows * c));
    let res = residual.map(|r| put(be, r));
    let (gamma, beta) = (put(be, gamma), put(be, beta));
    let bn = BatchNormTrain {
        gamma: &gamma,
        beta: &beta,
        running_mean: &mut rm,
        running_var: &mut rv,
        momentum: 0.1,
        eps: 1e-5,
        saved: &mut saved,
        sync: None,
    };
    let then = Epilogue {
        residual: res.as_ref(),
        relu,
    };
    be.batch_norm_forward_train(&Shape4::new(rows, 1, 1, c), &put(be, x), bn, then, &mut y);
    (
        get(be, &y, rows * c),
        get(be, &saved, 2 * c),
        get(be, &rm, c),
        get(be, &rv, c),
    )
}

fn bn_case<B: Backend>(be: &B, rows: usize, c: usize, residual: bool, relu: bool) {
    let mut rng = ChaCha8Rng::seed_from_u64((rows * 10 + c) as u64);
    let x = random(&mut rng, rows * c);
    let gamma: Vec<f32> = random(&mut rng, c).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta = random(&mut rng, c);
    let res = random(&mut rng, rows * c);
    let r = random(&mut rng, rows * c);
    let (zeros, ones) = (vec![0.0; c], vec![1.0; c]);
    let fwd = |x: &[f32], gamma: &[f32], beta: &[f32], res: &[f32]| {
        bn_forward(
            be,
            (rows, c),
            x,
            (gamma, beta),
            (&zeros, &ones),
            (residual.then_some(res), relu),
        )
    };
    let (y, saved, _, _) = fwd(&x, &gamma, &beta, &res);
    // With a fused ReLU, the backward masks dy in place by the forward output.
    let mut dy = put(be, &r);
    // The scale's and shift's gradients go into an arena, at offsets that are not 0, with a
    // gap between them, as in a model's gradient arena.
    let (mut dx, mut grads) = (be.alloc(rows * c), be.alloc(2 * c + 24));
    let (dg_at, db_at) = (16, 16 + c + 5);
    let yd = put(be, &y);
    let (gamma_d, saved_d) = (put(be, &gamma), put(be, &saved));
    let bn = BatchNormSaved {
        gamma: &gamma_d,
        saved: &saved_d,
        relu_out: relu.then_some(&yd),
        sync: None,
    };
    let slots = GradSlots {
        arena: &mut grads,
        weight: dg_at,
        bias: Some(db_at),
    };
    be.batch_norm_backward(&Shape4::new(rows, 1, 1, c), &put(be, &x), bn, &mut dy, &mut dx, slots);
    let arena = get(be, &grads, 2 * c + 24);
    let (dy, dx, dg, db) = (
        get(be, &dy, rows * c),
        get(be, &dx, rows * c),
        arena[dg_at..dg_at + c].to_vec(),
        arena[db_at..db_at + c].to_vec(),
    );
    assert!(
        arena[..dg_at].iter().chain(&arena[dg_at + c..db_at]).all(|&v| v == 0.0),
        "nothing written outside the two gradients"
    );
    let what = format!(
        "{}: batch norm rows={rows} c={c} residual={residual} relu={relu}",
        be.name()
    );
    let loss = |x: &[f32], g: &[f32], b: &[f32], res: &[f32]| dot(&fwd(x, g, b, res).0, &r);
    assert_fd(&format!("{what} dx"), &x, &dx, |xp| loss(xp, &gamma, &beta, &res));
    assert_fd(&format!("{what} dgamma"), &gamma, &dg, |gp| loss(&x, gp, &beta, &res));
    assert_fd(&format!("{what} dbeta"), &beta, &db, |bp| loss(&x, &gamma, bp, &res));
    let masked: Vec<f32> = r
        .iter()
        .zip(&y)
        .map(|(&g, &out)| if relu && out <= 0.0 { 0.0 } else { g })
        .collect();
    assert_eq!(dy, masked, "{what}: dy masked by the ReLU output");
    if residual {
        // The residual's gradient is the (ReLU-masked) output gradient itself.
        assert_fd(&format!("{what} dresidual"), &res, &dy, |rp| {
            loss(&x, &gamma, &beta, rp)
        });
    }
}

fn bn_running_stats<B: Backend>(be: &B) {
    let (rows, c) = (5, 2);
    let x: Vec<f32> = (0..rows * c).map(|i| (i * i) as f32 * 0.1).collect();
    let (_, _, rm, rv) = bn_forward(
        be,
        (rows, c),
        &x,
        (&vec![1.0; c], &vec![0.0; c]),
        (&[0.5; 2], &[2.0; 2]),
        (None, false),
    );
    for ch in 0..c {
        let col: Vec<f64> = (0..rows).map(|r| x[r * c + ch] as f64).collect();
        let mean = col.iter().sum::<f64>() / rows as f64;
        let unbiased = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (rows - 1) as f64;
        assert!((rm[ch] as f64 - (0.9 * 0.5 + 0.1 * mean)).abs() < 1e-5);
        assert!(
            (rv[ch] as f64 - (0.9 * 2.0 + 0.1 * unbiased)).abs() < 1e-4,
            "running_var uses the unbiased variance"
        );
    }
}

on_backends! {
    batch_norm_plain_cpu, batch_norm_plain_cuda => |be| bn_case(be, 12, 3, false, false);
    batch_norm_fused_residual_relu_cpu, batch_norm_fused_residual_relu_cuda => |be| {
        bn_case(be, 10, 4, true, true);
        bn_case(be, 7, 2, false, true);
    };
    // Enough rows and channels for several reduction slices and channel blocks on the GPU.
    batch_norm_many_rows_cpu, batch_norm_many_rows_cuda => |be| bn_case(be, 300, 40, true, false);
    batch_norm_running_stats_follow_pytorch_cpu, batch_norm_running_stats_follow_pytorch_cuda => bn_running_stats;
}

fn max_pool<B: Backend>(be: &B, g: &PoolGeom, x: &[f32]) -> Vec<f32> {
    let mut y = be.alloc(g.output().numel());
    be.max_pool_forward(g, &put(be, x), &mut y);
    get(be, &y, g.output().numel())
}

fn pool_case<B: Backend>(be: &B, n: usize, h: usize, w: usize, c: usize) {
    pool_case_with(be, Shape4::new(n, h, w, c), (3, 2, 1));
}

/// A max-pool of window `k`, `stride` and `pad` on `input`, against finite differences: the
/// inputs distinct values 4H apart in a random order, so that no step of H changes which
/// value is a window's maximum.
fn pool_case_with<B: Backend>(be: &B, input: Shape4, (k, stride, pad): (usize, usize, usize)) {
    use rand::seq::SliceRandom;
    let mut rng = ChaCha8Rng::seed_from_u64((input.h * 10 + input.w + k) as u64);
    let g = PoolGeom { input, k, stride, pad };
    let mut x: Vec<f32> = (0..g.input.numel()).map(|i| 4.0 * H * i as f32 - 1.0).collect();
    x.shuffle(&mut rng);
    let r = random(&mut rng, g.output().numel());
    let y = max_pool(be, &g, &x);
    let mut dx = be.alloc(x.len());
    be.max_pool_backward(&g, &put(be, &x), &put(be, &y), &put(be, &r), &mut dx);
    let dx = get(be, &dx, x.len());
    assert_fd(&format!("{}: max-pool {g:?}", be.name()), &x, &dx, |xp| {
        dot(&max_pool(be, &g, xp), &r)
    });
}

/// A 2x2 map under one 3x3/2 window with padding 1.
fn one_window_pool() -> PoolGeom {
    PoolGeom {
        input: Shape4::new(1, 2, 2, 1),
        k: 3,
        stride: 2,
        pad: 1,
    }
}

fn pool_padding_never_wins<B: Backend>(be: &B) {
    let g = one_window_pool();
    let y = max_pool(be, &g, &[-5.0, -4.0, -3.0, -2.0]);
    assert_eq!(y, [-2.0], "an all-negative window must not pick the zero padding");
}

fn pool_ties<B: Backend>(be: &B) {
    let g = one_window_pool();
    let x = vec![0.5, 2.0, 2.0, 2.0];
    let y = max_pool(be, &g, &x);
    let mut dx = put(be, &[9.0; 4]);
    be.max_pool_backward(&g, &put(be, &x), &put(be, &y), &put(be, &[3.0]), &mut dx);
    assert_eq!(get(be, &dx, 4), [0.0, 3.0, 0.0, 0.0]);
}

fn global_avg_pool<B: Backend>(be: &B) {
    let s = Shape4::new(2, 3, 2, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random(&mut rng, s.numel());
    let r = random(&mut rng, s.n * s.c);
    let mut dx = be.alloc(x.len());
    be.global_avg_pool_backward(&s, &put(be, &r), &mut dx);
    let dx = get(be, &dx, x.len());
    assert_fd("global average pool", &x, &dx, |xp| {
        let mut y = be.alloc(s.n * s.c);
        be.global_avg_pool_forward(&s, &put(be, xp), &mut y);
        dot(&get(be, &y, s.n * s.c), &r)
    });
}

fn linear<B: Backend>(be: &B) {
    linear_case(be, true);
    linear_case(be, false);
}

/// A linear layer with a bias, or without (`bias=False`: nothing added, no bias gradient
/// written where one would go).
fn linear_case<B: Backend>(be: &B, with_bias: bool) {
    let (n, din, dout) = (3, 5, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (x, w, b, r) = (
        random(&mut rng, n * din),
        random(&mut rng, dout * din),
        random(&mut rng, dout),
        random(&mut rng, n * dout),
    );
    let dims = LinearDims { n, din, dout };
    let fwd = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = be.alloc(n * dout);
        let bias = put(be, b);
        be.linear_forward(dims, &put(be, x), &put(be, w), with_bias.then_some(&bias), &mut y);
        dot(&get(be, &y, n * dout), &r)
    };
    // The bias gradient sits before the weight's in the arena, so the windows' order is free.
    let (db_at, dw_at) = (0, dout + 3);
    let (mut dx, mut grads) = (be.alloc(x.len()), put(be, &vec![7.0; dw_at + w.len()]));
    let slots = GradSlots {
        arena: &mut grads,
        weight: dw_at,
        bias: with_bias.then_some(db_at),
    };
    be.linear_backward(dims, &put(be, &x), &put(be, &w), &put(be, &r), &mut dx, slots);
    let arena = get(be, &grads, dw_at + w.len());
    let (dx, dw, db) = (
        get(be, &dx, x.len()),
        arena[dw_at..].to_vec(),
        arena[db_at..db_at + dout].to_vec(),
    );
    assert_fd("linear dx", &x, &dx, |p| fwd(p, &w, &b));
    assert_fd("linear dw", &w, &dw, |p| fwd(&x, p, &b));
    if with_bias {
        assert_fd("linear db", &b, &db, |p| fwd(&x, &w, p));
    } else {
        assert_eq!(db, [7.0; 4], "no bias gradient written");
        let zero = [0.0; 4];
        assert_eq!(fwd(&x, &w, &b), fwd(&x, &w, &zero), "no bias added");
    }
}

fn cross_entropy<B: Backend>(be: &B) {
    cross_entropy_with(be, 0.0);
    cross_entropy_with(be, 0.2);
}

/// PyTorch's label smoothing: loss = (1 - s) * CE(onehot) + s * mean over classes of -log p.
fn cross_entropy_with<B: Backend>(be: &B, smoothing: f32) {
    let (n, k) = (4, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let z: Vec<f32> = random(&mut rng, n * k).iter().map(|v| 3.0 * v).collect();
    let labels = [0u32, 4, 2, 2];
    let run = |z: &[f32]| {
        let (mut l, mut d) = (be.alloc(1), be.alloc(n * k));
        let targets = Targets {
            labels: &labels,
            classes: k,
            label_smoothing: smoothing,
        };
        be.cross_entropy(&put(be, z), &targets, &mut l, &mut d);
        (get(be, &l, 1)[0], get(be, &d, n * k))
    };
    let (loss, dz) = run(&z);
    let s = smoothing as f64;
    let want: f64 = z
        .chunks(k)
        .zip(labels)
        .map(|(row, l)| {
            let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            let nll = |j: usize| lse - row[j] as f64;
            (1.0 - s) * nll(l as usize) + s * (0..k).map(nll).sum::<f64>() / k as f64
        })
        .sum::<f64>()
        / n as f64;
    assert!((loss as f64 - want).abs() < 1e-6);
    assert_fd("cross-entropy", &z, &dz, |zp| run(zp).0 as f64);
}

on_backends! {
    max_pool_windows_touching_padding_cpu, max_pool_windows_touching_padding_cuda => |be| {
        pool_case(be, 2, 5, 5, 3);
        pool_case(be, 1, 4, 6, 2);
        pool_case(be, 2, 1, 1, 2);
    };
    // PyTorch's MaxPool2d(2) and MaxPool2d(3) (stride = window, no padding; a 3-window on 4x4
    // maps covers the first 3 rows and columns: airbench's head).
    max_pool_unpadded_windows_cpu, max_pool_unpadded_windows_cuda => |be| {
        pool_case_with(be, Shape4::new(2, 6, 4, 3), (2, 2, 0));
        pool_case_with(be, Shape4::new(2, 4, 4, 3), (3, 3, 0));
        pool_case_with(be, Shape4::new(1, 7, 9, 2), (3, 3, 0));
    };
    max_pool_padding_never_wins_cpu, max_pool_padding_never_wins_cuda => pool_padding_never_wins;
    max_pool_ties_send_the_gradient_to_the_first_maximum_cpu, max_pool_ties_cuda => pool_ties;
    global_avg_pool_cpu, global_avg_pool_cuda => global_avg_pool;
    linear_cpu, linear_cuda => linear;
    cross_entropy_cpu, cross_entropy_cuda => cross_entropy;
}

/// NaN and infinities pass through as in PyTorch, so that a diverged run's loss says so:
/// ReLU keeps NaN (its gradient flows there, as `threshold_backward`'s), max-pool picks it,
/// and a batch norm's NaN input makes its channel NaN in training and eval mode alike.
fn nan_propagates<B: Backend>(be: &B) {
    let x = [f32::NAN, -1.0, 2.0, f32::INFINITY, f32::NEG_INFINITY, -0.0];
    let mut y = be.alloc(x.len());
    be.relu_forward(x.len(), &put(be, &x), &mut y);
    let y = get(be, &y, x.len());
    assert!(y[0].is_nan(), "{y:?}");
    assert_eq!(&y[1..], [0.0, 2.0, f32::INFINITY, 0.0, 0.0]);
    assert!(y[5].is_sign_positive(), "-0 becomes +0");
    let mut dx = be.alloc(x.len());
    be.relu_backward(x.len(), &put(be, &y), &put(be, &[1.0; 6]), &mut dx);
    assert_eq!(get(be, &dx, x.len()), [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);

    let pooled = max_pool(be, &one_window_pool(), &[1.0, f32::NAN, 3.0, 2.0]);
    assert!(pooled[0].is_nan(), "max-pool picks NaN: {pooled:?}");

    // Two channels; channel 0 holds one NaN, channel 1 none.
    let (rows, c) = (4, 2);
    let x = [0.5, 1.0, f32::NAN, -1.0, 0.25, 2.0, -0.5, 0.0];
    let ones = [1.0; 2];
    let (y, _, rm, rv) = bn_forward(be, (rows, c), &x, (&ones, &[0.0; 2]), (&[0.0; 2], &ones), (None, true));
    assert!((0..rows).all(|r| y[r * c].is_nan()), "channel 0: {y:?}");
    assert!((0..rows).all(|r| y[r * c + 1].is_finite()), "channel 1: {y:?}");
    assert!(rm[0].is_nan() && rv[0].is_nan() && rm[1].is_finite() && rv[1].is_finite());
    let (gamma, beta, mean, var) = (put(be, &ones), put(be, &[0.0; 2]), put(be, &[0.0; 2]), put(be, &ones));
    let bn = resnet_cifar::engine::BatchNormEval {
        gamma: &gamma,
        beta: &beta,
        running_mean: &mean,
        running_var: &var,
        eps: 1e-5,
        residual: None,
        relu: true,
    };
    let mut out = be.alloc(x.len());
    be.batch_norm_forward_eval(&Shape4::new(rows, 1, 1, c), &put(be, &x), &bn, &mut out);
    let out = get(be, &out, x.len());
    assert!(out[2].is_nan(), "eval mode keeps NaN: {out:?}");
    assert_eq!(out.iter().filter(|v| v.is_nan()).count(), 1, "{out:?}");
    assert!(be.all_finite(&put(be, &out[3..]), 5) && !be.all_finite(&put(be, &out), 8));
}

on_backends! {
    nan_propagates_as_in_pytorch_cpu, nan_propagates_as_in_pytorch_cuda => nan_propagates;
}

/// GELU (PyTorch's exact form) forward against its f64 values, backward against finite
/// differences; NaN passes.
fn gelu<B: Backend>(be: &B) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut x: Vec<f32> = random(&mut rng, 40).iter().map(|v| 4.0 * v).collect();
    x.push(f32::NAN);
    let n = x.len();
    let forward = |xs: &[f32]| {
        let mut y = be.alloc(n);
        be.gelu_forward(n, &put(be, xs), &mut y);
        get(be, &y, n)
    };
    let y = forward(&x);
    for (&xi, &yi) in x.iter().zip(&y).take(n - 1) {
        let want = 0.5 * xi as f64 * (1.0 + libm::erf(xi as f64 / std::f64::consts::SQRT_2));
        assert!(
            (yi as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
            "gelu({xi}) = {yi}, not {want}"
        );
    }
    assert!(y[n - 1].is_nan(), "NaN passes GELU");
    let x = &x[..n - 1];
    let n = x.len();
    let r = random(&mut rng, n);
    let mut dx = be.alloc(n);
    be.gelu_backward(n, &put(be, x), &put(be, &r), &mut dx);
    let dx = get(be, &dx, n);
    assert_fd(&format!("{}: gelu", be.name()), x, &dx, |xp| {
        let mut y = be.alloc(n);
        be.gelu_forward(n, &put(be, xp), &mut y);
        dot(&get(be, &y, n), &r)
    });
}

on_backends! {
    gelu_matches_pytorchs_exact_form_cpu, gelu_matches_pytorchs_exact_form_cuda => gelu;
}
