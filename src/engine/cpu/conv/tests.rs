use super::classes::{self, Span, spans};
use super::im2col::{PatchColumns, im2col, rows_per_image};
use super::*;
use crate::engine::Shape4;
use crate::engine::cpu::bf16::{Kernel, Lines};
use crate::test_support::bf16_kernels;

/// `y = conv(x, w)` by `plan`.
fn forward(plan: &ConvPlan, g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32], ws: &mut [f32]) {
    Conv { plan, g, w }.forward(x, y, ws)
}

#[test]
fn spans_group_outputs_by_valid_taps() {
    // 3x3, pad 1, stride 1 on 4: first sees taps 1..3, last 0..2, the middle all.
    let s = spans(4, 4, 3, 1, 1);
    assert_eq!(
        s,
        vec![
            Span {
                taps: 1..3,
                outs: vec![0]
            },
            Span {
                taps: 0..3,
                outs: vec![1, 2]
            },
            Span {
                taps: 0..2,
                outs: vec![3]
            }
        ]
    );
    // 1x1 map: only the centre tap.
    assert_eq!(
        spans(1, 1, 3, 1, 1),
        vec![Span {
            taps: 1..2,
            outs: vec![0]
        }]
    );
    // 2 -> 1 with stride 2: taps 1 and 2.
    assert_eq!(
        spans(1, 2, 3, 2, 1),
        vec![Span {
            taps: 1..3,
            outs: vec![0]
        }]
    );
}

#[test]
fn classes_are_chosen_where_padding_dominates() {
    let g = |h: usize, stride: usize| ConvGeom {
        input: Shape4::new(2, h, h, 8),
        cout: 8,
        kh: 3,
        kw: 3,
        stride,
        pad: 1,
    };
    for (geom, want) in [
        (g(1, 1), true),
        (g(2, 1), true),
        (g(4, 1), true),
        (g(2, 2), true),
        (g(8, 1), false),
        (g(32, 1), false),
    ] {
        assert_eq!(use_tap_classes(&geom, &tap_classes(&geom)), want, "{geom:?}");
    }
}

/// Direct convolution in f64: y, and the gradients of sum(y * dy).
fn reference(g: &ConvGeom, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let s = g.input;
    let (oh, ow) = g.out_hw();
    let (mut y, mut dx, mut dw) = (
        vec![0f64; s.n * oh * ow * g.cout],
        vec![0f64; x.len()],
        vec![0f64; w.len()],
    );
    for n in 0..s.n {
        for oy in 0..oh {
            for ox in 0..ow {
                for co in 0..g.cout {
                    let yi = ((n * oh + oy) * ow + ox) * g.cout + co;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let (iy, ix) = (
                                (oy * g.stride + ky) as isize - g.pad as isize,
                                (ox * g.stride + kx) as isize - g.pad as isize,
                            );
                            if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                continue;
                            }
                            for ci in 0..s.c {
                                let xi = ((n * s.h + iy as usize) * s.w + ix as usize) * s.c + ci;
                                let wi = ((ky * g.kw + kx) * s.c + ci) * g.cout + co;
                                y[yi] += x[xi] as f64 * w[wi] as f64;
                                dx[xi] += dy[yi] as f64 * w[wi] as f64;
                                dw[wi] += dy[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (y, dx, dw)
}

/// The weight gradient's bf16 operand read from the image: every line of [`PatchColumns`],
/// over any range of output pixels (across rows and images), is a column of im2col's patch
/// rows, value for value, padding included.
#[test]
fn patch_columns_are_the_columns_of_the_patch_rows() {
    // (h, w, stride, kernel, pad, channels): the seed's 7x7 stem, the cifar stem, stride 2
    // on odd sides, a 1x1 stride 2, a kernel wider than the map.
    let cases = [
        (9, 11, 2, 7, 3, 3),
        (6, 5, 1, 3, 1, 3),
        (7, 5, 2, 3, 1, 4),
        (6, 6, 2, 1, 0, 2),
        (2, 3, 1, 5, 2, 1),
    ];
    for (h, w, stride, k, pad, c) in cases {
        let g = ConvGeom {
            input: Shape4::new(3, h, w, c),
            cout: 1,
            kh: k,
            kw: k,
            stride,
            pad,
        };
        let x: Vec<f32> = (0..g.input.numel()).map(|i| i as f32 + 1.0).collect();
        let (pixels, patch) = (g.input.n * rows_per_image(&g), g.patch_len());
        let mut rows = vec![f32::NAN; pixels * patch];
        im2col(&g, &x, 0, g.input.n, &mut rows);
        let columns = PatchColumns { g: &g, x: &x };
        for i in 0..patch {
            for (p0, len) in [(0, pixels), (1, pixels - 1), (pixels / 3, pixels / 2), (pixels - 1, 1)] {
                let mut line = vec![f32::NAN; len];
                columns.line(i, p0, &mut line);
                let want: Vec<f32> = (p0..p0 + len).map(|p| rows[p * patch + i]).collect();
                assert_eq!(line, want, "{g:?} column {i} from pixel {p0}");
            }
        }
    }
}

/// bf16 tap classes with their taps packed once for every class give the bits of each
/// class packing its own, forward and input gradient: on 2x2 and 1x1 maps, stride 1 and
/// 2, with few rows a class (the column split) and many (the row split).
#[test]
fn tap_classes_on_taps_packed_once_give_the_bits_of_packing_per_class() {
    // (images, side, stride, cout): input channels 256, one k-block a tap.
    let cases = [(2, 2, 1, 128), (70, 2, 1, 32), (3, 1, 1, 128), (5, 4, 2, 64)];
    for (kernel, (n, side, stride, cout)) in bf16_kernels().into_iter().flat_map(|k| cases.map(|c| (k, c))) {
        let ops = Operands::Bf16(kernel);
        let g = ConvGeom {
            input: Shape4::new(n, side, side, 256),
            cout,
            kh: 3,
            kw: 3,
            stride,
            pad: 1,
        };
        let classes = tap_classes(&g);
        assert!(use_tap_classes(&g, &classes), "{g:?}");
        let val = |i: usize, salt: f32| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract();
        let x: Vec<f32> = (0..g.input.numel()).map(|i| val(i, 0.1)).collect();
        let w: Vec<f32> = (0..g.weight_len()).map(|i| val(i, 0.2)).collect();
        let plan = plan(ops, true, &g);
        assert_eq!(plan.forward, ConvPath::TapClasses, "{g:?}");
        let mut ws = vec![0.0; workspace_len(&plan, &g)];
        let (mut each, mut once) = (vec![f32::NAN; g.output().numel()], vec![f32::NAN; g.output().numel()]);
        let base = Classes {
            ops,
            g: &g,
            classes: &classes,
            w: &w,
            packed: None,
        };
        base.forward_all(&x, &mut each, &mut ws);
        classes::with_packed_taps(kernel, &g, &classes, &w, false, |taps| {
            Classes {
                packed: Some(taps),
                ..base
            }
            .forward_all(&x, &mut once, &mut ws)
        });
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&once), bits(&each), "{g:?}");
        let mut y = vec![f32::NAN; g.output().numel()];
        forward(&plan, &g, &x, &w, &mut y, &mut ws);
        assert_eq!(bits(&y), bits(&once), "{g:?}: forward");
        // The input gradient on the transposed taps, packed once, tap by tap.
        let dy: Vec<f32> = (0..g.output().numel()).map(|i| val(i, 0.3)).collect();
        let grads = |packed: bool, ws: &mut [f32]| {
            let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()]);
            let mut run = |taps: Option<&classes::PackedTaps>| {
                let dx = Some(&mut dx[..]);
                Classes { packed: taps, ..base }.backward_all(&x, &dy, dx, &mut dw, ws)
            };
            if packed {
                classes::with_packed_taps(kernel, &g, &classes, &w, true, |taps| run(Some(taps)));
            } else {
                run(None);
            }
            (bits(&dx), bits(&dw))
        };
        assert_eq!(grads(true, &mut ws), grads(false, &mut ws), "{g:?}: gradients");
    }
}

#[test]
fn every_path_matches_a_direct_convolution() {
    check_every_path(Operands::F32);
}

/// The same paths with bf16 operands (Winograd's 4-point tiles throughout), within bf16's
/// rounding: each output tensor within 1.5% (relative L2) of the float64 reference
/// (operands round by up to 2^-9, 0.2%; the 4-point transforms about double that; these
/// measured worst 0.52%, a weight gradient on 4x4 maps).
#[test]
fn every_path_with_bf16_operands_stays_within_bf16_rounding() {
    for kernel in bf16_kernels() {
        check_every_path(Operands::Bf16(kernel));
    }
}

fn check_every_path(ops: Operands) {
    // (h, w, stride, kernel, pad, cin, cout, Winograd's tile points, if its path): 3x3
    // stride-1 convolutions with 16 channels and more take it where it saves multiplies
    // (4x4 maps and larger), with 4-point tiles where they tie with 6-point ones (5x6).
    // With bf16 operands on AMX, those of 32-channel multiples on maps of 16 pixels and more
    // take the direct path (the `wide` ones below), as do stride-1 kernels whose patch fits
    // a tile row (the cifar stem's: the last three).
    let cases = [
        (8, 9, 1, 3, 1, 5, 6, None),
        (4, 5, 1, 3, 1, 5, 6, None),
        (2, 3, 1, 3, 1, 5, 6, None),
        (1, 2, 1, 3, 1, 5, 6, None),
        (2, 3, 2, 3, 1, 5, 6, None),
        (5, 6, 2, 3, 1, 5, 6, None),
        (9, 10, 2, 7, 3, 5, 6, None),
        (4, 5, 2, 1, 0, 5, 6, None),
        (3, 4, 1, 1, 0, 5, 6, None),
        (16, 16, 2, 3, 1, 40, 24, None),
        (8, 9, 1, 3, 1, 16, 24, Some(6)),
        (5, 6, 1, 3, 1, 24, 16, Some(4)),
        (4, 4, 1, 3, 1, 16, 17, Some(6)),
        (4, 5, 1, 3, 1, 16, 16, Some(6)),
        (16, 16, 1, 3, 1, 16, 16, Some(6)),
        (3, 3, 1, 3, 1, 16, 16, None),
        (2, 2, 1, 3, 1, 16, 16, None),
    ];
    // 32-channel multiples: Winograd's 6-point tiles in f32 round beyond this test's
    // tolerance on them, so they run with bf16 operands only.
    let wide = [
        (4, 4, 1, 3, 1, 32, 32, Some(6)),
        (8, 8, 1, 3, 1, 32, 64, Some(6)),
        (9, 7, 1, 3, 1, 64, 32, Some(6)),
        (16, 16, 2, 3, 1, 64, 32, None),
        (8, 10, 2, 3, 1, 32, 64, None),
        (8, 8, 2, 1, 0, 64, 96, None),
        (8, 8, 1, 3, 1, 3, 32, None),
        (5, 6, 1, 3, 1, 3, 64, None),
        (4, 5, 1, 1, 0, 5, 32, None),
    ];
    let wide = if ops.is_bf16() { &wide[..] } else { &[] };
    for &(h, w, stride, k, pad, cin, cout, tile_points) in cases.iter().chain(wide) {
        let g = ConvGeom {
            input: Shape4::new(3, h, w, cin),
            cout,
            kh: k,
            kw: k,
            stride,
            pad,
        };
        let tile_points = tile_points.map(|n| if ops.is_bf16() { 4 } else { n });
        assert_eq!(winograd::points(&g, ops), tile_points, "{g:?}");
        let amx = ops == Operands::Bf16(Kernel::Amx);
        let even = h % 2 == 0 && w % 2 == 0;
        let shape = (k == 3 && pad == 1 && (stride == 1 || even)) || (k == 1 && pad == 0 && stride == 2 && even);
        let out = g.out_hw();
        // The stems' patches: a stride-1 kernel whose patch fits a tile row.
        let patch = k % 2 == 1 && stride == 1 && pad == k / 2 && k * k * cin <= 32 && cin % 32 != 0;
        let channels = (shape && cin % 32 == 0) || patch;
        let direct = amx && channels && cout % 32 == 0 && out.0 * out.1 >= 16;
        let plan = plan(ops, true, &g);
        // With bf16 operands, fewer than 32 input channels leave Winograd's path only the
        // backward pass (the 24 -> 16 case: forward by the next row that takes it).
        let few_channels = ops.is_bf16() && cin < super::BF16_WINOGRAD_FORWARD_CHANNELS;
        let want = |backward: bool| {
            if direct {
                ConvPath::Direct
            } else if let Some(points) = tile_points.filter(|_| backward || !few_channels) {
                ConvPath::Winograd { points }
            } else if backward {
                plan.backward
            } else {
                plan.forward
            }
        };
        assert_eq!(plan.forward, want(false), "{g:?}");
        if !direct {
            assert_eq!(plan.backward, want(true), "{g:?}");
        }
        if tile_points.is_some() && few_channels && !direct {
            assert!(!matches!(plan.forward, ConvPath::Winograd { .. }), "{g:?}");
        }
        let val = |i: usize, salt: f32| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract();
        let x: Vec<f32> = (0..g.input.numel()).map(|i| val(i, 0.1)).collect();
        let w: Vec<f32> = (0..g.weight_len()).map(|i| val(i, 0.2)).collect();
        let dy: Vec<f32> = (0..g.output().numel()).map(|i| val(i, 0.3)).collect();
        let (ry, rdx, rdw) = reference(&g, &x, &w, &dy);
        let mut ws = vec![0.0; workspace_len(&plan, &g)];
        let mut y = vec![f32::NAN; g.output().numel()];
        forward(&plan, &g, &x, &w, &mut y, &mut ws);
        let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()]);
        Conv {
            plan: &plan,
            g: &g,
            w: &w,
        }
        .backward(&x, &dy, Some(&mut dx), &mut dw, &mut ws);
        for (what, got, want) in [("y", &y, &ry), ("dx", &dx, &rdx), ("dw", &dw, &rdw)] {
            if ops.is_bf16() {
                let diff: f64 = got.iter().zip(want.iter()).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
                let size: f64 = want.iter().map(|b| b * b).sum();
                let rel = (diff / size).sqrt();
                assert!(rel < 1.5e-2, "{g:?} {what}: relative L2 difference {rel}");
                continue;
            }
            for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{g:?} {what}[{i}]: {a} vs {b}"
                );
            }
        }
    }
}

/// `--winograd false` reaches the plan: the same 3x3 goes through im2col instead, with its
/// own workspace, other rounding, and a result within f32's reach of the exact one.
#[test]
fn winograd_turned_off_plans_im2col_with_its_own_workspace() {
    let g = ConvGeom {
        input: Shape4::new(2, 8, 8, 16),
        cout: 16,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    let val = |i: usize, salt: f32| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract();
    let x: Vec<f32> = (0..g.input.numel()).map(|i| val(i, 0.1)).collect();
    let w: Vec<f32> = (0..g.weight_len()).map(|i| val(i, 0.2)).collect();
    let run = |winograd: bool| {
        let plan = plan(Operands::F32, winograd, &g);
        let mut ws = vec![0.0; workspace_len(&plan, &g)];
        let mut y = vec![f32::NAN; g.output().numel()];
        forward(&plan, &g, &x, &w, &mut y, &mut ws);
        (plan, y, ws.len())
    };
    let (fast_plan, fast, fast_ws) = run(true);
    let (direct_plan, direct, direct_ws) = run(false);
    assert_eq!(fast_plan.forward, ConvPath::Winograd { points: 6 });
    assert_eq!(direct_plan.forward, ConvPath::Im2col);
    assert_eq!(direct_plan.backward, ConvPath::Im2col);
    assert_ne!(fast_ws, direct_ws, "each path sizes its own workspace");
    assert_ne!(fast, direct, "the two paths round differently");
    let (ry, _, _) = reference(&g, &x, &w, &vec![0.0; g.output().numel()]);
    for (a, b) in direct.iter().zip(&ry) {
        assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

/// A layer keeps its plan for every batch: the plan of a geometry does not depend on its
/// batch size, whatever the operands, on every geometry of the path test.
#[test]
fn plans_do_not_depend_on_the_batch_size() {
    let mut ops = vec![Operands::F32, Operands::Bf16(Kernel::Avx512)];
    ops.push(Operands::Bf16(Kernel::Amx));
    for (ops, (h, k, stride, cin, cout)) in ops.into_iter().flat_map(|o| {
        [
            (32, 7, 2, 3, 64),
            (32, 3, 1, 3, 64),
            (8, 3, 1, 64, 64),
            (8, 1, 2, 64, 128),
            (2, 3, 1, 512, 512),
        ]
        .map(|c| (o, c))
    }) {
        let g = |n: usize| ConvGeom {
            input: Shape4::new(n, h, h, cin),
            cout,
            kh: k,
            kw: k,
            stride,
            pad: k / 2,
        };
        for winograd in [true, false] {
            let one = plan(ops, winograd, &g(1));
            for n in [2, 63, 64, 500] {
                assert_eq!(plan(ops, winograd, &g(n)), one, "{:?}", g(n));
            }
        }
    }
}
