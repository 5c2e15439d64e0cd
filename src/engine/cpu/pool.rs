//! Max pooling and global average pooling on NHWC activations.

use crate::engine::{PoolGeom, Shape4};
use rayon::prelude::*;

/// Input coordinate of window tap `k` for output `o`, if it falls inside the image.
fn tap(o: usize, k: usize, g: &PoolGeom, size: usize) -> Option<usize> {
    let i = (o * g.stride + k) as isize - g.pad as isize;
    (i >= 0 && i < size as isize).then_some(i as usize)
}

pub fn max_forward(g: &PoolGeom, x: &[f32], y: &mut [f32]) {
    let (s, o) = (g.input, g.output());
    let (in_len, out_len) = (s.h * s.w * s.c, o.h * o.w * o.c);
    y[..o.numel()]
        .par_chunks_mut(out_len)
        .zip(x.par_chunks(in_len))
        .for_each(|(yi, xi)| {
            super::wide::run(
                #[inline(always)]
                || max_forward_image(g, xi, yi),
            )
        });
}

/// One image of [`max_forward`].
#[inline(always)]
fn max_forward_image(g: &PoolGeom, xi: &[f32], yi: &mut [f32]) {
    let (s, o) = (g.input, g.output());
    for oy in 0..o.h {
        for ox in 0..o.w {
            let out = &mut yi[(oy * o.w + ox) * s.c..(oy * o.w + ox + 1) * s.c];
            out.fill(f32::NEG_INFINITY);
            for iy in (0..g.k).filter_map(|ky| tap(oy, ky, g, s.h)) {
                for ix in (0..g.k).filter_map(|kx| tap(ox, kx, g, s.w)) {
                    let src = &xi[(iy * s.w + ix) * s.c..(iy * s.w + ix + 1) * s.c];
                    for (m, &v) in out.iter_mut().zip(src) {
                        // A select, so the loop vectorises; NaN propagates as in PyTorch.
                        *m = if v > *m || v.is_nan() { v } else { *m };
                    }
                }
            }
        }
    }
}

/// Routes each output gradient to the first position of its window that holds the maximum
/// (PyTorch's choice): the first tap whose value equals the forward output `y`.
pub fn max_backward(g: &PoolGeom, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (s, o) = (g.input, g.output());
    let (in_len, out_len) = (s.h * s.w * s.c, o.h * o.w * o.c);
    dx[..s.numel()]
        .par_chunks_mut(in_len)
        .zip(x.par_chunks(in_len))
        .zip(y.par_chunks(out_len).zip(dy.par_chunks(out_len)))
        .for_each(|((dxi, xi), (yi, dyi))| {
            dxi.fill(0.0);
            let mut pending = vec![0f32; s.c];
            for oy in 0..o.h {
                for ox in 0..o.w {
                    let at_out = (oy * o.w + ox) * s.c;
                    let (ymax, d) = (&yi[at_out..at_out + s.c], &dyi[at_out..at_out + s.c]);
                    // 1 while a channel's maximum is still to be found.
                    pending.fill(1.0);
                    for iy in (0..g.k).filter_map(|ky| tap(oy, ky, g, s.h)) {
                        for ix in (0..g.k).filter_map(|kx| tap(ox, kx, g, s.w)) {
                            let at = (iy * s.w + ix) * s.c;
                            let (xs, dxs) = (&xi[at..at + s.c], &mut dxi[at..at + s.c]);
                            for ch in 0..s.c {
                                let hit = (xs[ch] == ymax[ch] || (xs[ch].is_nan() && ymax[ch].is_nan())) as u32 as f32
                                    * pending[ch];
                                dxs[ch] += hit * d[ch];
                                pending[ch] -= hit;
                            }
                        }
                    }
                }
            }
        });
}

pub fn global_avg_forward(s: &Shape4, x: &[f32], y: &mut [f32]) {
    let hw = s.h * s.w;
    let inv = 1.0 / hw as f32;
    y[..s.n * s.c]
        .par_chunks_mut(s.c)
        .zip(x.par_chunks(hw * s.c))
        .for_each(|(yi, xi)| {
            yi.fill(0.0);
            for px in xi.chunks_exact(s.c) {
                for (a, v) in yi.iter_mut().zip(px) {
                    *a += v;
                }
            }
            for a in yi.iter_mut() {
                *a *= inv;
            }
        });
}

pub fn global_avg_backward(s: &Shape4, dy: &[f32], dx: &mut [f32]) {
    let hw = s.h * s.w;
    let inv = 1.0 / hw as f32;
    dx[..s.numel()]
        .par_chunks_mut(hw * s.c)
        .zip(dy.par_chunks(s.c))
        .for_each(|(dxi, dyi)| {
            for px in dxi.chunks_exact_mut(s.c) {
                for (d, g) in px.iter_mut().zip(dyi) {
                    *d = g * inv;
                }
            }
        });
}
