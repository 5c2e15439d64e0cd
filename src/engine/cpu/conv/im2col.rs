//! im2col: each output pixel's patch (its taps' input channels, row by row) as a row of a
//! matrix, so a convolution is one product with the weights, and its gradients two more
//! (`dw = patches^T dy`, `d patches = dy w^T`, scattered back by col2im).
//!
//! A batch is processed in chunks of whole images so the workspace stays bounded
//! ([`WORKSPACE_BUDGET`] values) however large the batch or the feature map; chunking depends
//! only on the geometry, never on the thread count, so results are deterministic. With bf16
//! operands the forward pass writes no f32 patch matrix at all: the packer reads each patch
//! from the image ([`Patches`], the "patch lines" path), and so does the weight gradient of a
//! convolution on few input channels ([`PatchColumns`]).
//!
//! Weights are `[kh, kw, cin, cout]` (HWIO): a `[k, cout]` matrix whose rows are patch columns.
//! Measured with the gemm crate (6144 x 576 x 64, 2 threads), this layout makes the weight
//! gradient `p^T dy` ~25% faster than computing `dy^T p` into an OHWI weight.

use super::Conv;
use crate::engine::ConvGeom;
use crate::engine::cpu::bf16::{self, Kernel, Lines};
use crate::engine::cpu::gemm::{Mat, Out, matmul};
use rayon::prelude::*;

/// Upper bound on the im2col workspace, in f32 values (16 MiB).
const WORKSPACE_BUDGET: usize = 1 << 22;

/// Input channels up to which the bf16 weight gradient reads its patches from the image
/// ([`PatchColumns`]) instead of from im2col's rows.
pub const GATHERED_CHANNELS: usize = 4;

/// Rows of the patch matrix per image.
pub fn rows_per_image(g: &ConvGeom) -> usize {
    let (oh, ow) = g.out_hw();
    oh * ow
}

/// Workspace values per image: the patch rows, plus (for tap classes) a class's output rows.
pub fn workspace_per_image(g: &ConvGeom) -> usize {
    rows_per_image(g) * (g.patch_len() + g.cout)
}

pub fn images_per_chunk(g: &ConvGeom) -> usize {
    (WORKSPACE_BUDGET / workspace_per_image(g).max(1)).clamp(1, g.input.n.max(1))
}

/// The batch's chunks of [`images_per_chunk`] images: (first image, images).
pub fn image_chunks(g: &ConvGeom) -> impl Iterator<Item = (usize, usize)> + use<> {
    let (n, chunk) = (g.input.n, images_per_chunk(g));
    (0..n).step_by(chunk).map(move |first| (first, chunk.min(n - first)))
}

/// Fills `cols` with the patch rows of images `first..first + count`. For each kernel row the
/// taps inside the image are one contiguous run of NHWC input, copied at once; the taps in the
/// padding are zero-filled around it.
pub fn im2col(g: &ConvGeom, x: &[f32], first: usize, count: usize, cols: &mut [f32]) {
    let (oh, ow) = g.out_hw();
    let k = g.patch_len();
    let patches = Patches { g, x };
    cols[..count * oh * ow * k]
        .par_chunks_mut(ow * k)
        .enumerate()
        .for_each(|(r, row_block)| {
            for (ox, patch) in row_block.chunks_exact_mut(k).enumerate() {
                patches.line((first * oh + r) * ow + ox, 0, patch);
            }
        });
}

/// The patches of a convolution's input (im2col's rows, one per output pixel of every image)
/// as [`bf16::Lines`]: a k-block of a row at a time, read from the image where it lies.
pub struct Patches<'a> {
    pub g: &'a ConvGeom,
    pub x: &'a [f32],
}

impl bf16::Lines for Patches<'_> {
    /// Values `p0..p0 + out.len()` of output pixel `i`'s patch (taps row by row, each tap's
    /// channels in order): runs of the image's rows, zeros where a tap reads padding.
    fn line(&self, i: usize, p0: usize, out: &mut [f32]) {
        let (g, s) = (self.g, self.g.input);
        let (oh, ow) = g.out_hw();
        let (image, oy, ox) = (i / (oh * ow), i / ow % oh, i % ow);
        let img = &self.x[image * s.h * s.w * s.c..][..s.h * s.w * s.c];
        let row_len = g.kw * s.c;
        // Valid kx: pad <= ox*stride + kx < w + pad.
        let start = ox * g.stride;
        let kx_lo = g.pad.saturating_sub(start).min(g.kw);
        let kx_hi = g.kw.min((s.w + g.pad).saturating_sub(start)).max(kx_lo);
        let end = p0 + out.len();
        for ky in p0 / row_len..end.div_ceil(row_len) {
            // This tap row's values within p0..end, relative to the row's start and to `out`.
            let (lo, hi) = (
                p0.max(ky * row_len) - ky * row_len,
                end.min((ky + 1) * row_len) - ky * row_len,
            );
            let dst = &mut out[ky * row_len + lo - p0..][..hi - lo];
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            if iy < 0 || iy >= s.h as isize {
                dst.fill(0.0);
                continue;
            }
            // The image's values cover kx_lo * c..kx_hi * c of the row.
            let (vlo, vhi) = ((kx_lo * s.c).clamp(lo, hi), (kx_hi * s.c).clamp(lo, hi));
            dst[..vlo - lo].fill(0.0);
            dst[vhi - lo..].fill(0.0);
            if vlo < vhi {
                // Row value v is the image's at (iy, start + v / c - pad), channel v % c.
                let at = (iy as usize * s.w + start) * s.c + vlo - g.pad * s.c;
                dst[vlo - lo..vhi - lo].copy_from_slice(&img[at..at + vhi - vlo]);
            }
        }
    }
}

/// The transposed patches (one line per patch column, a tap's channel, along the output
/// pixels of the images from `x` on) as [`bf16::Lines`]: the left-hand side of the weight
/// gradient `dw = patches^T dy`, gathered from the images where they lie, so that in bf16 no
/// f32 im2col is written (9.6 MB for the seed's 7x7 stem at a batch of 64) or read back.
pub struct PatchColumns<'a> {
    pub g: &'a ConvGeom,
    /// The images from the first whose pixels the lines start at.
    pub x: &'a [f32],
}

impl bf16::Lines for PatchColumns<'_> {
    /// Patch column `i` (tap `(ky, kx)`, channel `i % c`) at output pixels `p0..p0 +
    /// out.len()`: one run per output row, zeros where the tap reads padding.
    fn line(&self, i: usize, p0: usize, out: &mut [f32]) {
        let (g, s) = (self.g, self.g.input);
        let (oh, ow) = g.out_hw();
        let (ky, kx, ch) = (i / (g.kw * s.c), i / s.c % g.kw, i % s.c);
        // Output columns whose tap lies inside the image: pad <= ox * stride + kx < w + pad.
        let lo = g.pad.saturating_sub(kx).div_ceil(g.stride).min(ow);
        let hi = (s.w + g.pad).saturating_sub(kx).div_ceil(g.stride).clamp(lo, ow);
        let (end, mut p) = (p0 + out.len(), p0);
        while p < end {
            let (image, oy, ox) = (p / (oh * ow), p / ow % oh, p % ow);
            let run = &mut out[p - p0..][..(ow - ox).min(end - p)];
            p += run.len();
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            if iy < 0 || iy >= s.h as isize {
                run.fill(0.0);
                continue;
            }
            // The run's columns ox.., split at lo and hi.
            let (a, b) = (lo.clamp(ox, ox + run.len()) - ox, hi.clamp(ox, ox + run.len()) - ox);
            run[..a].fill(0.0);
            run[b..].fill(0.0);
            if a < b {
                let first = ((ox + a) * g.stride + kx - g.pad) * s.c + ch;
                let row = &self.x[((image * s.h + iy as usize) * s.w) * s.c..][..s.w * s.c];
                for (d, v) in run[a..b].iter_mut().zip(row[first..].iter().step_by(g.stride * s.c)) {
                    *d = *v;
                }
            }
        }
    }
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

/// `y = conv(x, w)` through im2col's chunks.
pub fn forward(conv: &Conv, x: &[f32], y: &mut [f32], ws: &mut [f32]) {
    let (ops, g, w) = (conv.plan.ops, conv.g, conv.w);
    let (k, rows) = (g.patch_len(), rows_per_image(g));
    let weight = Mat::rows(&w[..g.weight_len()], g.cout);
    for (first, count) in image_chunks(g) {
        let m = count * rows;
        im2col(g, x, first, count, ws);
        let out = &mut y[first * rows * g.cout..(first + count) * rows * g.cout];
        matmul(
            ops,
            (m, g.cout, k),
            Mat::rows(&ws[..m * k], k),
            weight,
            Out::new(out, g.cout),
        );
    }
}

/// `y = conv(x, w)` with bf16 operands, the patches going into the packed panels straight
/// from the image: im2col's f32 copy (9 times the input for a 3x3) is neither written nor
/// read back.
pub fn forward_lines(kernel: Kernel, g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (k, m) = (g.patch_len(), g.input.n * rows_per_image(g));
    let weight = Mat::rows(&w[..g.weight_len()], g.cout);
    let patches = Patches { g, x };
    bf16::matmul_lines(
        kernel,
        (m, g.cout, k),
        &patches,
        weight,
        Out::new(&mut y[..m * g.cout], g.cout),
    )
}

/// `dw` (overwritten) and, when asked for, `dx` (overwritten) through im2col's chunks; with
/// `gathered` (bf16 operands, few input channels: the stems' 3), the weight gradient's
/// patches are read from the image ([`PatchColumns`]): no f32 im2col in the workspace (the
/// seed stem's 9.6 MB at a batch of 64 kept bf16's peak memory above fp32's). With more
/// channels each tap's values lie a cache line apart, and im2col's copies of runs and
/// in-register transposes read them faster.
pub fn backward(
    conv: &Conv,
    gathered: Option<Kernel>,
    x: &[f32],
    dy: &[f32],
    (mut dx, dw): (Option<&mut [f32]>, &mut [f32]),
    ws: &mut [f32],
) {
    let (ops, g, w) = (conv.plan.ops, conv.g, conv.w);
    let (k, rows) = (g.patch_len(), rows_per_image(g));
    let weight_t = Mat::transposed(&w[..g.weight_len()], g.cout);
    for (first, count) in image_chunks(g) {
        let m = count * rows;
        let dy_chunk = &dy[first * rows * g.cout..(first + count) * rows * g.cout];
        if let Some(kernel) = gathered {
            let columns = PatchColumns {
                g,
                x: &x[first * g.input.h * g.input.w * g.input.c..],
            };
            let dy_chunk = Mat::rows(dy_chunk, g.cout);
            bf16::matmul_lines(
                kernel,
                (k, g.cout, m),
                &columns,
                dy_chunk,
                Out::adding(dw, g.cout, first > 0),
            );
        } else {
            im2col(g, x, first, count, ws);
            let patches_t = Mat::transposed(&ws[..m * k], k);
            matmul(
                ops,
                (k, g.cout, m),
                patches_t,
                Mat::rows(dy_chunk, g.cout),
                Out::adding(dw, g.cout, first > 0),
            );
        }
        if let Some(dx) = dx.as_deref_mut() {
            matmul(
                ops,
                (m, k, g.cout),
                Mat::rows(dy_chunk, g.cout),
                weight_t,
                Out::new(&mut ws[..m * k], k),
            );
            col2im(g, ws, first, count, dx);
        }
    }
}
