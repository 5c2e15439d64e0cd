//! Finite-difference checks of every op's backward pass on small shapes: stride 2, padding on
//! every side, odd sizes, max-pool windows that touch the padding, batches large enough to be
//! split into several im2col chunks.
//!
//! Each check takes L = sum(y * r) for a fixed random r, perturbs every input element by +-h,
//! and compares (L(x+h) - L(x-h)) / 2h with the analytic gradient.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::engine::{Backend, ConvGeom, PoolGeom, Shape4};

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

fn conv_case(n: usize, h: usize, w: usize, cin: usize, cout: usize, k: usize, stride: usize, pad: usize) {
    let be = Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64((n * 1000 + h * 100 + k * 10 + stride + pad) as u64);
    let g = ConvGeom {
        input: Shape4::new(n, h, w, cin),
        cout,
        kh: k,
        kw: k,
        stride,
        pad,
    };
    let x = random(&mut rng, g.input.numel());
    let wt = random(&mut rng, g.weight_len());
    let r = random(&mut rng, g.output().numel());
    let mut ws = be.alloc(be.conv2d_workspace_len(&g));
    let fwd = |x: &[f32], wt: &[f32], ws: &mut Vec<f32>| {
        let mut y = vec![0.0; g.output().numel()];
        be.conv2d_forward(&g, &x.to_vec(), &wt.to_vec(), &mut y, ws);
        dot(&y, &r)
    };
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; wt.len()];
    be.conv2d_backward(&g, &x, &wt, &r, Some(&mut dx), &mut dw, &mut ws);
    let what = format!("conv {g:?}");
    assert_fd(&format!("{what} dx"), &x, &dx, |xp| fwd(xp, &wt, &mut ws.clone()));
    assert_fd(&format!("{what} dw"), &wt, &dw, |wp| fwd(&x, wp, &mut ws.clone()));
    // Without dx the weight gradient must be the same.
    let mut dw2 = vec![0.0; wt.len()];
    be.conv2d_backward(&g, &x, &wt, &r, None, &mut dw2, &mut ws);
    assert_eq!(dw, dw2, "{what}: dw depends on whether dx is asked for");
}

#[test]
fn conv_3x3_stride1_pad1() {
    conv_case(2, 5, 4, 3, 4, 3, 1, 1);
}

#[test]
fn conv_3x3_stride2_odd_size() {
    conv_case(2, 7, 5, 3, 2, 3, 2, 1);
}

#[test]
fn conv_7x7_stride2_pad3() {
    conv_case(1, 9, 8, 3, 2, 7, 2, 3);
}

#[test]
fn conv_1x1_stride2_and_pointwise() {
    conv_case(2, 5, 5, 4, 3, 1, 2, 0);
    conv_case(2, 3, 4, 4, 3, 1, 1, 0);
}

#[test]
fn conv_tiny_maps_where_padding_dominates() {
    conv_case(3, 1, 1, 4, 3, 3, 1, 1);
    conv_case(3, 2, 2, 4, 3, 3, 2, 1);
    conv_case(3, 2, 2, 2, 3, 3, 1, 1);
}

#[test]
fn conv_batch_split_into_workspace_chunks() {
    // 64x64 map, 3x3x8 patches: 64*64*72 values an image, so the 4M-value workspace
    // holds 14 images and a batch of 16 runs as two chunks. Check only dw and a sample of dx
    // against a single-image reference instead of finite differences (too many elements).
    let be = Cpu;
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
    let mut ws = be.alloc(be.conv2d_workspace_len(&g));
    assert!(ws.len() < g.input.n * 64 * 64 * 72, "the batch must not fit one chunk");
    let mut y = vec![0.0; g.output().numel()];
    be.conv2d_forward(&g, &x, &wt, &mut y, &mut ws);
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; wt.len()];
    be.conv2d_backward(&g, &x, &wt, &dy, Some(&mut dx), &mut dw, &mut ws);
    // Per-image reference: the same op on each image alone (one chunk each).
    let gi = ConvGeom {
        input: Shape4::new(1, 64, 64, 8),
        ..g
    };
    let (xl, yl) = (gi.input.numel(), gi.output().numel());
    let mut dw_sum = vec![0f64; wt.len()];
    for i in 0..16 {
        let mut yi = vec![0.0; yl];
        let mut wsi = be.alloc(be.conv2d_workspace_len(&gi));
        be.conv2d_forward(&gi, &x[i * xl..(i + 1) * xl].to_vec(), &wt, &mut yi, &mut wsi);
        assert_eq!(&y[i * yl..(i + 1) * yl], &yi[..], "forward of image {i}");
        let (mut dxi, mut dwi) = (vec![0.0; xl], vec![0.0; wt.len()]);
        be.conv2d_backward(
            &gi,
            &x[i * xl..(i + 1) * xl].to_vec(),
            &wt,
            &dy[i * yl..(i + 1) * yl].to_vec(),
            Some(&mut dxi),
            &mut dwi,
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

fn bn_case(rows: usize, c: usize, residual: bool, relu: bool) {
    let be = Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64((rows * 10 + c) as u64);
    let x = random(&mut rng, rows * c);
    let gamma: Vec<f32> = random(&mut rng, c).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta = random(&mut rng, c);
    let res = random(&mut rng, rows * c);
    let r = random(&mut rng, rows * c);
    let fwd = |x: &[f32], gamma: &[f32], beta: &[f32]| {
        let (mut rm, mut rv, mut saved, mut y) = (vec![0.0; c], vec![1.0; c], vec![0.0; 2 * c], vec![0.0; rows * c]);
        let res = residual.then(|| res.clone());
        be.batch_norm_forward_train(
            &Shape4::new(rows, 1, 1, c),
            &x.to_vec(),
            &gamma.to_vec(),
            &beta.to_vec(),
            &mut rm,
            &mut rv,
            0.1,
            1e-5,
            &mut saved,
            res.as_ref(),
            relu,
            &mut y,
        );
        (y, saved)
    };
    let (y, saved) = fwd(&x, &gamma, &beta);
    // With a fused ReLU, the backward masks dy in place by the forward output.
    let mut dy = r.clone();
    let (mut dx, mut dg, mut db) = (vec![0.0; rows * c], vec![0.0; c], vec![0.0; c]);
    be.batch_norm_backward(
        &Shape4::new(rows, 1, 1, c),
        &x,
        &gamma,
        &saved,
        relu.then_some(&y),
        &mut dy,
        &mut dx,
        &mut dg,
        &mut db,
    );
    let what = format!("batch norm rows={rows} c={c} residual={residual} relu={relu}");
    let loss = |x: &[f32], g: &[f32], b: &[f32]| dot(&fwd(x, g, b).0, &r);
    assert_fd(&format!("{what} dx"), &x, &dx, |xp| loss(xp, &gamma, &beta));
    assert_fd(&format!("{what} dgamma"), &gamma, &dg, |gp| loss(&x, gp, &beta));
    assert_fd(&format!("{what} dbeta"), &beta, &db, |bp| loss(&x, &gamma, bp));
    let masked: Vec<f32> = r
        .iter()
        .zip(&y)
        .map(|(&g, &out)| if relu && out <= 0.0 { 0.0 } else { g })
        .collect();
    assert_eq!(dy, masked, "{what}: dy masked by the ReLU output");
    if residual {
        // The residual's gradient is the (ReLU-masked) output gradient itself.
        assert_fd(&format!("{what} dresidual"), &res, &dy, |rp| {
            let (mut rm, mut rv, mut s, mut y) = (vec![0.0; c], vec![1.0; c], vec![0.0; 2 * c], vec![0.0; rows * c]);
            be.batch_norm_forward_train(
                &Shape4::new(rows, 1, 1, c),
                &x,
                &gamma,
                &beta,
                &mut rm,
                &mut rv,
                0.1,
                1e-5,
                &mut s,
                Some(&rp.to_vec()),
                relu,
                &mut y,
            );
            dot(&y, &r)
        });
    }
}

#[test]
fn batch_norm_plain() {
    bn_case(12, 3, false, false);
}

#[test]
fn batch_norm_fused_residual_relu() {
    bn_case(10, 4, true, true);
    bn_case(7, 2, false, true);
}

#[test]
fn batch_norm_running_stats_follow_pytorch() {
    let be = Cpu;
    let (rows, c) = (5, 2);
    let x: Vec<f32> = (0..rows * c).map(|i| (i * i) as f32 * 0.1).collect();
    let (mut rm, mut rv, mut saved, mut y) = (vec![0.5; c], vec![2.0; c], vec![0.0; 2 * c], vec![0.0; rows * c]);
    be.batch_norm_forward_train(
        &Shape4::new(rows, 1, 1, c),
        &x,
        &vec![1.0; c],
        &vec![0.0; c],
        &mut rm,
        &mut rv,
        0.1,
        1e-5,
        &mut saved,
        None,
        false,
        &mut y,
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

fn pool_case(n: usize, h: usize, w: usize, c: usize) {
    let be = Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64((h * 10 + w) as u64);
    let g = PoolGeom {
        input: Shape4::new(n, h, w, c),
        k: 3,
        stride: 2,
        pad: 1,
    };
    let x = random(&mut rng, g.input.numel());
    let r = random(&mut rng, g.output().numel());
    let mut y = vec![0.0; g.output().numel()];
    be.max_pool_forward(&g, &x, &mut y);
    let mut dx = vec![0.0; x.len()];
    be.max_pool_backward(&g, &x, &y, &r, &mut dx);
    assert_fd(&format!("max-pool {g:?}"), &x, &dx, |xp| {
        let mut y = vec![0.0; g.output().numel()];
        be.max_pool_forward(&g, &xp.to_vec(), &mut y);
        dot(&y, &r)
    });
}

#[test]
fn max_pool_windows_touching_padding() {
    pool_case(2, 5, 5, 3);
    pool_case(1, 4, 6, 2);
    pool_case(2, 1, 1, 2);
}

#[test]
fn max_pool_padding_never_wins() {
    let be = Cpu;
    let g = PoolGeom {
        input: Shape4::new(1, 2, 2, 1),
        k: 3,
        stride: 2,
        pad: 1,
    };
    let mut y = vec![0.0; 1];
    be.max_pool_forward(&g, &vec![-5.0, -4.0, -3.0, -2.0], &mut y);
    assert_eq!(y, [-2.0], "an all-negative window must not pick the zero padding");
}

#[test]
fn global_avg_pool() {
    let be = Cpu;
    let s = Shape4::new(2, 3, 2, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random(&mut rng, s.numel());
    let r = random(&mut rng, s.n * s.c);
    let mut dx = vec![0.0; x.len()];
    be.global_avg_pool_backward(&s, &r, &mut dx);
    assert_fd("global average pool", &x, &dx, |xp| {
        let mut y = vec![0.0; s.n * s.c];
        be.global_avg_pool_forward(&s, &xp.to_vec(), &mut y);
        dot(&y, &r)
    });
}

#[test]
fn linear() {
    let be = Cpu;
    let (n, din, dout) = (3, 5, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (x, w, b, r) = (
        random(&mut rng, n * din),
        random(&mut rng, dout * din),
        random(&mut rng, dout),
        random(&mut rng, n * dout),
    );
    let fwd = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = vec![0.0; n * dout];
        be.linear_forward(n, din, dout, &x.to_vec(), &w.to_vec(), &b.to_vec(), &mut y);
        dot(&y, &r)
    };
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; dout]);
    be.linear_backward(n, din, dout, &x, &w, &r, &mut dx, &mut dw, &mut db);
    assert_fd("linear dx", &x, &dx, |p| fwd(p, &w, &b));
    assert_fd("linear dw", &w, &dw, |p| fwd(&x, p, &b));
    assert_fd("linear db", &b, &db, |p| fwd(&x, &w, p));
}

#[test]
fn cross_entropy() {
    let be = Cpu;
    let (n, k) = (4, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let z: Vec<f32> = random(&mut rng, n * k).iter().map(|v| 3.0 * v).collect();
    let labels = [0u32, 4, 2, 2];
    let (mut loss, mut dz) = (vec![0.0], vec![0.0; n * k]);
    be.cross_entropy(n, k, &z, &labels, &mut loss, &mut dz);
    // Reference loss: mean of logsumexp(z) - z[label].
    let want: f64 = z
        .chunks(k)
        .zip(labels)
        .map(|(row, l)| row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln() - row[l as usize] as f64)
        .sum::<f64>()
        / n as f64;
    assert!((loss[0] as f64 - want).abs() < 1e-6);
    assert_fd("cross-entropy", &z, &dz, |zp| {
        let (mut l, mut d) = (vec![0.0], vec![0.0; n * k]);
        be.cross_entropy(n, k, &zp.to_vec(), &labels, &mut l, &mut d);
        l[0] as f64
    });
}

#[test]
fn max_pool_ties_send_the_gradient_to_the_first_maximum() {
    let be = Cpu;
    let g = PoolGeom {
        input: Shape4::new(1, 2, 2, 1),
        k: 3,
        stride: 2,
        pad: 1,
    };
    let x = vec![0.5, 2.0, 2.0, 2.0];
    let mut y = vec![0.0; 1];
    be.max_pool_forward(&g, &x, &mut y);
    let mut dx = vec![9.0; 4];
    be.max_pool_backward(&g, &x, &y, &vec![3.0], &mut dx);
    assert_eq!(dx, [0.0, 3.0, 0.0, 0.0]);
}
