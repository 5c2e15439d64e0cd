//! 2-D convolution on NHWC activations as im2col + matrix multiply.
//!
//! A batch is processed in chunks of whole images so the im2col workspace stays bounded
//! (`WORKSPACE_BUDGET` values) however large the batch or the feature map; chunking depends only
//! on the geometry, never on the thread count, so results are deterministic. 1x1 stride-1
//! convolutions skip im2col: an NHWC activation already is their patch matrix.

use super::gemm::{Mat, matmul};
use crate::engine::ConvGeom;
use rayon::prelude::*;

/// Upper bound on the im2col workspace, in f32 values (16 MiB).
const WORKSPACE_BUDGET: usize = 1 << 22;

fn is_pointwise(g: &ConvGeom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0
}

/// Rows of the patch matrix per image.
fn rows_per_image(g: &ConvGeom) -> usize {
    let (oh, ow) = g.out_hw();
    oh * ow
}

fn images_per_chunk(g: &ConvGeom) -> usize {
    let per_image = rows_per_image(g) * g.patch_len();
    (WORKSPACE_BUDGET / per_image.max(1)).clamp(1, g.input.n.max(1))
}

pub fn workspace_len(g: &ConvGeom) -> usize {
    if is_pointwise(g) {
        0
    } else {
        images_per_chunk(g) * rows_per_image(g) * g.patch_len()
    }
}

/// Fills `cols` with the patch rows of images `first..first + count`.
fn im2col(g: &ConvGeom, x: &[f32], first: usize, count: usize, cols: &mut [f32]) {
    let s = g.input;
    let (oh, ow) = g.out_hw();
    let k = g.patch_len();
    let image_len = s.h * s.w * s.c;
    cols[..count * oh * ow * k]
        .par_chunks_mut(ow * k)
        .enumerate()
        .for_each(|(r, row_block)| {
            let image = first + r / oh;
            let oy = r % oh;
            let img = &x[image * image_len..(image + 1) * image_len];
            for ox in 0..ow {
                let patch = &mut row_block[ox * k..(ox + 1) * k];
                for ky in 0..g.kh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    let tap_row = &mut patch[ky * g.kw * s.c..(ky + 1) * g.kw * s.c];
                    if iy < 0 || iy >= s.h as isize {
                        tap_row.fill(0.0);
                        continue;
                    }
                    for kx in 0..g.kw {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        let dst = &mut tap_row[kx * s.c..(kx + 1) * s.c];
                        if ix < 0 || ix >= s.w as isize {
                            dst.fill(0.0);
                        } else {
                            let at = (iy as usize * s.w + ix as usize) * s.c;
                            dst.copy_from_slice(&img[at..at + s.c]);
                        }
                    }
                }
            }
        });
}

/// Scatter-adds patch-row gradients back onto images `first..first + count` of `dx`
/// (which this overwrites). Parallel over images, each image summed in a fixed order.
fn col2im(g: &ConvGeom, cols: &[f32], first: usize, count: usize, dx: &mut [f32]) {
    let s = g.input;
    let (oh, ow) = g.out_hw();
    let k = g.patch_len();
    let image_len = s.h * s.w * s.c;
    let dx = &mut dx[first * image_len..(first + count) * image_len];
    dx.par_chunks_mut(image_len)
        .zip(cols.par_chunks(oh * ow * k))
        .for_each(|(img, rows)| {
            img.fill(0.0);
            for oy in 0..oh {
                for ox in 0..ow {
                    let patch = &rows[(oy * ow + ox) * k..(oy * ow + ox + 1) * k];
                    for ky in 0..g.kh {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= s.h as isize {
                            continue;
                        }
                        for kx in 0..g.kw {
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if ix < 0 || ix >= s.w as isize {
                                continue;
                            }
                            let at = (iy as usize * s.w + ix as usize) * s.c;
                            let src = &patch[(ky * g.kw + kx) * s.c..(ky * g.kw + kx + 1) * s.c];
                            for (d, v) in img[at..at + s.c].iter_mut().zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        });
}

pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32], ws: &mut [f32]) {
    let k = g.patch_len();
    let rows = rows_per_image(g);
    let weight_t = Mat::transposed(&w[..g.weight_len()], k);
    if is_pointwise(g) {
        let m = g.input.n * rows;
        matmul(m, g.cout, k, y, g.cout, Mat::rows(&x[..m * k], k), weight_t, false);
        return;
    }
    let chunk = images_per_chunk(g);
    for first in (0..g.input.n).step_by(chunk) {
        let count = chunk.min(g.input.n - first);
        let m = count * rows;
        im2col(g, x, first, count, ws);
        let out = &mut y[first * rows * g.cout..(first + count) * rows * g.cout];
        matmul(m, g.cout, k, out, g.cout, Mat::rows(&ws[..m * k], k), weight_t, false);
    }
}

pub fn backward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    dw: &mut [f32],
    ws: &mut [f32],
) {
    let k = g.patch_len();
    let rows = rows_per_image(g);
    let weight = Mat::rows(&w[..g.weight_len()], k);
    if is_pointwise(g) {
        let m = g.input.n * rows;
        // dw[cout, k] = dy^T[cout, m] * x[m, k]
        matmul(
            g.cout,
            k,
            m,
            dw,
            k,
            Mat::transposed(&dy[..m * g.cout], g.cout),
            Mat::rows(&x[..m * k], k),
            false,
        );
        if let Some(dx) = dx {
            // dx[m, k] = dy[m, cout] * w[cout, k]
            matmul(m, k, g.cout, dx, k, Mat::rows(&dy[..m * g.cout], g.cout), weight, false);
        }
        return;
    }
    let chunk = images_per_chunk(g);
    for first in (0..g.input.n).step_by(chunk) {
        let count = chunk.min(g.input.n - first);
        let m = count * rows;
        let dy_chunk = &dy[first * rows * g.cout..(first + count) * rows * g.cout];
        im2col(g, x, first, count, ws);
        matmul(
            g.cout,
            k,
            m,
            dw,
            k,
            Mat::transposed(dy_chunk, g.cout),
            Mat::rows(&ws[..m * k], k),
            first > 0,
        );
        if let Some(dx) = dx.as_deref_mut() {
            matmul(
                m,
                k,
                g.cout,
                &mut ws[..m * k],
                k,
                Mat::rows(dy_chunk, g.cout),
                weight,
                false,
            );
            col2im(g, ws, first, count, dx);
        }
    }
}
