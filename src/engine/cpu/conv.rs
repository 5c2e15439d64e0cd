//! 2-D convolution on NHWC activations as im2col + matrix multiply.
//!
//! On small feature maps most kernel taps of a padded convolution read padding (a 3x3 conv on
//! a 2x2 map: 5 of 9; on 1x1: 8 of 9). There the output positions are grouped by the taps that
//! land inside the image ("tap classes": corners, edges, interior), and each class is one matrix
//! multiply over only its valid taps, so no multiply-add is spent on padding. In NHWC the valid
//! taps of one kernel row are one contiguous run of input, so a class's im2col is a few copies.
//! Large maps, where padding is a small share, keep the plain im2col with zero fill.
//!
//! A batch is processed in chunks of whole images so the im2col workspace stays bounded
//! (`WORKSPACE_BUDGET` values) however large the batch or the feature map; chunking depends only
//! on the geometry, never on the thread count, so results are deterministic. 1x1 stride-1
//! convolutions skip im2col: an NHWC activation already is their patch matrix. 3x3 stride-1
//! convolutions with enough channels go to `winograd.rs` instead, or, with bf16 operands on a
//! CPU with AMX tiles and channels in multiples of 32, to `bf16/direct.rs` (no im2col, no
//! transforms: the tiles read the padded image itself).

#[cfg(target_arch = "x86_64")]
use super::batch_norm::Affine;
use super::bf16::{self, Lines};
use super::gemm::{Mat, Operands, matmul, operands};
use super::winograd;
use crate::engine::ConvGeom;
use rayon::prelude::*;

/// Upper bound on the im2col workspace, in f32 values (16 MiB).
const WORKSPACE_BUDGET: usize = 1 << 22;

/// Input channels up to which the bf16 weight gradient reads its patches from the image
/// ([`PatchColumns`]) instead of from im2col's rows.
const GATHERED_CHANNELS: usize = 4;

fn is_pointwise(g: &ConvGeom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0
}

/// Rows of the patch matrix per image.
fn rows_per_image(g: &ConvGeom) -> usize {
    let (oh, ow) = g.out_hw();
    oh * ow
}

/// Workspace values per image: the patch rows, plus (for tap classes) a class's output rows.
fn workspace_per_image(g: &ConvGeom) -> usize {
    rows_per_image(g) * (g.patch_len() + g.cout)
}

fn images_per_chunk(g: &ConvGeom) -> usize {
    (WORKSPACE_BUDGET / workspace_per_image(g).max(1)).clamp(1, g.input.n.max(1))
}

/// The batch's chunks of [`images_per_chunk`] images: (first image, images).
fn image_chunks(g: &ConvGeom) -> impl Iterator<Item = (usize, usize)> + use<> {
    let (n, chunk) = (g.input.n, images_per_chunk(g));
    (0..n).step_by(chunk).map(move |first| (first, chunk.min(n - first)))
}

pub fn workspace_len(g: &ConvGeom) -> usize {
    if let Some(tiling) = winograd::tiling(g) {
        tiling.workspace_len()
    } else if is_pointwise(g) {
        0
    } else {
        images_per_chunk(g) * workspace_per_image(g)
    }
}

/// Output coordinates along one axis that see the same range of valid kernel taps.
#[derive(Clone, Debug, PartialEq)]
struct Span {
    taps: std::ops::Range<usize>,
    outs: Vec<usize>,
}

fn spans(out_len: usize, in_len: usize, k: usize, stride: usize, pad: usize) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    for o in 0..out_len {
        // Tap t reads padded coordinate o*stride + t, inside the image when in [pad, in_len + pad).
        let start = o * stride;
        let taps = pad.saturating_sub(start)..k.min((in_len + pad).saturating_sub(start));
        match spans.iter_mut().find(|s| s.taps == taps) {
            Some(s) => s.outs.push(o),
            None => spans.push(Span { taps, outs: vec![o] }),
        }
    }
    spans
}

/// Tap classes of a geometry: every (row span, column span) pair.
fn tap_classes(g: &ConvGeom) -> Vec<(Span, Span)> {
    let (oh, ow) = g.out_hw();
    let rows = spans(oh, g.input.h, g.kh, g.stride, g.pad);
    let cols = spans(ow, g.input.w, g.kw, g.stride, g.pad);
    rows.iter()
        .flat_map(|r| cols.iter().map(move |c| (r.clone(), c.clone())))
        .collect()
}

/// Whether skipping padding taps saves enough multiply-adds (a fifth or more) to pay for
/// the extra, smaller matrix multiplies.
fn use_tap_classes(g: &ConvGeom, classes: &[(Span, Span)]) -> bool {
    let (oh, ow) = g.out_hw();
    let useful: usize = classes
        .iter()
        .map(|(r, c)| r.outs.len() * c.outs.len() * r.taps.len() * c.taps.len())
        .sum();
    5 * useful <= 4 * oh * ow * g.kh * g.kw
}

/// Fills `cols` with the patch rows of images `first..first + count`. For each kernel row the
/// taps inside the image are one contiguous run of NHWC input, copied at once; the taps in the
/// padding are zero-filled around it.
fn im2col(g: &ConvGeom, x: &[f32], first: usize, count: usize, cols: &mut [f32]) {
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
struct Patches<'a> {
    g: &'a ConvGeom,
    x: &'a [f32],
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
struct PatchColumns<'a> {
    g: &'a ConvGeom,
    /// The images from the first whose pixels the lines start at.
    x: &'a [f32],
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

// Weights are `[kh, kw, cin, cout]` (HWIO): a `[k, cout]` matrix whose rows are patch columns.
// Measured with the gemm crate on this machine (6144 x 576 x 64, 2 threads), this layout makes
// the weight gradient p^T dy ~25% faster than computing dy^T p into an OHWI weight.

/// The direct AMX path for `g` ([`bf16::direct`]), if it takes it: bf16 operands on a CPU
/// with AMX tiles, 3x3 stride-1 convolutions of 32-channel multiples.
#[cfg(target_arch = "x86_64")]
fn amx_direct(g: &ConvGeom) -> Option<bf16::direct::Direct> {
    (operands() == Operands::Bf16)
        .then(|| bf16::direct::Direct::of(g))
        .flatten()
}

pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32], ws: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(direct) = amx_direct(g) {
        return direct.forward_then(&x[..g.input.numel()], w, None, &mut y[..g.output().numel()]);
    }
    if let Some(tiling) = winograd::tiling(g) {
        return tiling.forward(x, w, y, ws);
    }
    let ops = operands();
    let k = g.patch_len();
    let rows = rows_per_image(g);
    let weight = Mat::rows(&w[..g.weight_len()], g.cout);
    if is_pointwise(g) {
        let m = g.input.n * rows;
        matmul(ops, m, g.cout, k, y, g.cout, Mat::rows(&x[..m * k], k), weight, false);
        return;
    }
    let classes = tap_classes(g);
    if use_tap_classes(g, &classes) {
        if ops == Operands::Bf16 && bf16::whole_blocks(g.input.c) {
            return classes::with_packed_taps(g, &classes, w, false, |taps| {
                classes::forward_all(ops, g, &classes, x, w, y, ws, Some(taps))
            });
        }
        return classes::forward_all(ops, g, &classes, x, w, y, ws, None);
    }
    if ops == Operands::Bf16 {
        // The patches go into the packed bf16 panels straight from the image: im2col's f32
        // copy (9 times the input for a 3x3) is neither written nor read back.
        let m = g.input.n * rows;
        let patches = Patches { g, x };
        return bf16::matmul_lines(m, g.cout, k, &mut y[..m * g.cout], g.cout, &patches, weight, false);
    }
    for (first, count) in image_chunks(g) {
        let m = count * rows;
        im2col(g, x, first, count, ws);
        let out = &mut y[first * rows * g.cout..(first + count) * rows * g.cout];
        matmul(
            ops,
            m,
            g.cout,
            k,
            out,
            g.cout,
            Mat::rows(&ws[..m * k], k),
            weight,
            false,
        );
    }
}

/// `y = affine(conv(x, w))`: on the direct bf16 path in one pass (the affine applied to each
/// output as it leaves the tiles; `conv_out` untouched), elsewhere the convolution into
/// `conv_out` and the affine over it.
pub fn forward_then(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    affine: &Affine,
    conv_out: &mut [f32],
    y: &mut [f32],
    ws: &mut [f32],
) {
    let out = g.output();
    #[cfg(target_arch = "x86_64")]
    if let Some(direct) = amx_direct(g) {
        return direct.forward_then(&x[..g.input.numel()], w, Some(affine), &mut y[..out.numel()]);
    }
    forward(g, x, w, conv_out, ws);
    affine.apply(out.rows(), conv_out, y);
}

/// A convolution, its weights, the affine its outputs go through, and room for its output
/// where the affine runs apart ([`forward_then`]).
pub type ThenAffine<'a> = (&'a ConvGeom, &'a [f32], &'a Affine<'a>, &'a mut [f32]);

/// `y = then_b(b(then_a(a(x))))`: where both convolutions take the direct bf16 path and the
/// second can read the first's outputs as its stack (`Direct::follows`), they go there as
/// they leave the tiles ([`bf16::direct::Direct::forward_pair`]), `mid` unwritten; elsewhere
/// two [`forward_then`] calls through `mid`.
pub fn forward_pair(a: ThenAffine, b: ThenAffine, x: &[f32], mid: &mut [f32], y: &mut [f32], ws: &mut [f32]) {
    let ((ga, wa, then_a, out_a), (gb, wb, then_b, out_b)) = (a, b);
    #[cfg(target_arch = "x86_64")]
    if let (Some(da), Some(db)) = (amx_direct(ga), amx_direct(gb))
        && db.follows(&da)
    {
        let (x, y) = (&x[..ga.input.numel()], &mut y[..gb.output().numel()]);
        return bf16::direct::Direct::forward_pair(&da, &db, x, wa, Some(then_a), wb, Some(then_b), y);
    }
    forward_then(ga, x, wa, then_a, out_a, mid, ws);
    forward_then(gb, mid, wb, then_b, out_b, y, ws);
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
    #[cfg(target_arch = "x86_64")]
    if let Some(direct) = amx_direct(g).filter(|d| d.computes_gradients()) {
        let (x, dy) = (&x[..g.input.numel()], &dy[..g.output().numel()]);
        direct.backward_weights(x, dy, &mut dw[..g.weight_len()]);
        if let Some(dx) = dx {
            direct.backward_input(dy, w, &mut dx[..g.input.numel()]);
        }
        return;
    }
    if let Some(tiling) = winograd::tiling(g) {
        return tiling.backward(x, w, dy, dx, dw, ws);
    }
    let ops = operands();
    let k = g.patch_len();
    let rows = rows_per_image(g);
    let weight_t = Mat::transposed(&w[..g.weight_len()], g.cout);
    if is_pointwise(g) {
        let m = g.input.n * rows;
        let dy = &dy[..m * g.cout];
        // dw[k, cout] = x^T[k, m] dy[m, cout]
        matmul(
            ops,
            k,
            g.cout,
            m,
            dw,
            g.cout,
            Mat::transposed(&x[..m * k], k),
            Mat::rows(dy, g.cout),
            false,
        );
        if let Some(dx) = dx {
            // dx[m, k] = dy[m, cout] w^T[cout, k]
            matmul(ops, m, k, g.cout, dx, k, Mat::rows(dy, g.cout), weight_t, false);
        }
        return;
    }
    let classes = tap_classes(g);
    if use_tap_classes(g, &classes) {
        if ops == Operands::Bf16 && dx.is_some() {
            return classes::with_packed_taps(g, &classes, w, true, |taps| {
                classes::backward_all(ops, g, &classes, x, w, dy, dx, dw, ws, Some(taps))
            });
        }
        return classes::backward_all(ops, g, &classes, x, w, dy, dx, dw, ws, None);
    }
    // With bf16 operands and an input of few channels (the stems: 3), the weight gradient's
    // patches are read from the image: no f32 im2col in the workspace (the seed stem's 9.6 MB
    // at a batch of 64 kept bf16's peak memory above fp32's). With more channels each tap's
    // values lie a cache line apart, and im2col's copies of runs and in-register transposes
    // read them faster.
    let gathered = ops == Operands::Bf16 && g.input.c <= GATHERED_CHANNELS;
    for (first, count) in image_chunks(g) {
        let m = count * rows;
        let dy_chunk = &dy[first * rows * g.cout..(first + count) * rows * g.cout];
        if gathered {
            let columns = PatchColumns {
                g,
                x: &x[first * g.input.h * g.input.w * g.input.c..],
            };
            let dy_chunk = Mat::rows(dy_chunk, g.cout);
            bf16::matmul_lines(k, g.cout, m, dw, g.cout, &columns, dy_chunk, first > 0);
        } else {
            im2col(g, x, first, count, ws);
            let patches_t = Mat::transposed(&ws[..m * k], k);
            matmul(
                ops,
                k,
                g.cout,
                m,
                dw,
                g.cout,
                patches_t,
                Mat::rows(dy_chunk, g.cout),
                first > 0,
            );
        }
        if let Some(dx) = dx.as_deref_mut() {
            matmul(
                ops,
                m,
                k,
                g.cout,
                &mut ws[..m * k],
                k,
                Mat::rows(dy_chunk, g.cout),
                weight_t,
                false,
            );
            col2im(g, ws, first, count, dx);
        }
    }
}

/// The tap-class kernels: im2col, matrix multiplies and scatters over one class's positions
/// and taps. `whole` says the class is the only one, so its rows are the output's own rows in
/// order and need no gather or scatter.
mod classes {
    use super::{Mat, Operands, Span, bf16, image_chunks, matmul};
    use crate::engine::ConvGeom;
    use rayon::prelude::*;

    /// The filter taps that a convolution's classes read, packed once for bf16 products
    /// ([`with_packed_taps`]), as they are for the forward pass or transposed for the input
    /// gradient: on a 2x2 map each of the four corner classes reads four taps, and packing
    /// them class by class converted 16 taps' weights where 9 are distinct (the seed stem's
    /// stage 3; packing was a sixth of its bf16 inference).
    pub struct PackedTaps<'a> {
        packed: &'a [u32],
        /// Where tap `t`'s packed weights are among `packed`'s, if a class reads it.
        slot: Vec<Option<usize>>,
        /// Each tap's rows and columns as packed: `cin x cout`, or `cout x cin` transposed.
        k: usize,
        n: usize,
    }

    impl PackedTaps<'_> {
        /// Tap `t`'s packed weights.
        fn tap(&self, t: usize) -> bf16::PackedB<'_> {
            self.taps(t, 1)
        }

        /// Taps `t..t + count`, read by one run of a class, as one right-hand side of their
        /// rows stacked: packed side by side, they are that only where each tap's rows are
        /// whole k-blocks.
        fn taps(&self, t: usize, count: usize) -> bf16::PackedB<'_> {
            assert!(count == 1 || bf16::whole_blocks(self.k), "{} rows a tap", self.k);
            let per_tap = bf16::packed_len(self.k, self.n);
            let slot = self.slot[t].expect("a class reads packed taps");
            let panels = &self.packed[slot * per_tap..][..count * per_tap];
            bf16::PackedB::view(count * self.k, self.n, panels)
        }
    }

    /// `f` with the taps that `classes` read packed for bf16 products, each once, in tap
    /// order (the taps of a class's run are consecutive, so they are consecutive there), as
    /// `cin x cout` or, `transposed`, `cout x cin`.
    pub fn with_packed_taps<R>(
        g: &ConvGeom,
        classes: &[(Span, Span)],
        w: &[f32],
        transposed: bool,
        f: impl FnOnce(&PackedTaps) -> R,
    ) -> R {
        let (cin, cout) = (g.input.c, g.cout);
        let mut read = vec![false; g.kh * g.kw];
        for (rows, cols) in classes {
            for ky in rows.taps.clone() {
                for kx in cols.taps.clone() {
                    read[ky * g.kw + kx] = true;
                }
            }
        }
        let taps: Vec<usize> = (0..read.len()).filter(|&t| read[t]).collect();
        let mut slot = vec![None; read.len()];
        for (i, &t) in taps.iter().enumerate() {
            slot[t] = Some(i);
        }
        let filter = |t: usize| {
            let w = &w[t * cin * cout..][..cin * cout];
            if transposed {
                Mat::transposed(w, cout)
            } else {
                Mat::rows(w, cout)
            }
        };
        let filters: Vec<Mat> = taps.iter().map(|&t| filter(t)).collect();
        let (k, n) = if transposed { (cout, cin) } else { (cin, cout) };
        bf16::with_packed_each(k, n, &filters, |packed| f(&PackedTaps { packed, slot, k, n }))
    }

    /// Every class's outputs, chunk of images by chunk ([`forward`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_all(
        ops: Operands,
        g: &ConvGeom,
        classes: &[(Span, Span)],
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        ws: &mut [f32],
        packed: Option<&PackedTaps>,
    ) {
        for (first, count) in image_chunks(g) {
            for class in classes {
                forward(ops, g, class, classes.len() == 1, x, w, first, count, y, ws, packed);
            }
        }
    }

    /// A run of patch columns that is also a run of weight columns: (patch offset, weight
    /// offset, length). One run when whole kernel rows are valid, else one per kernel row.
    fn runs(g: &ConvGeom, rows: &Span, cols: &Span) -> Vec<(usize, usize, usize)> {
        let c = g.input.c;
        let row_len = cols.taps.len() * c;
        if cols.taps.len() == g.kw {
            vec![(0, rows.taps.start * g.kw * c, rows.taps.len() * row_len)]
        } else {
            rows.taps
                .clone()
                .enumerate()
                .map(|(a, ky)| (a * row_len, (ky * g.kw + cols.taps.start) * c, row_len))
                .collect()
        }
    }

    /// Output row of (image, oy, ox).
    fn out_row(g: &ConvGeom, image: usize, oy: usize, ox: usize) -> usize {
        let (oh, ow) = g.out_hw();
        (image * oh + oy) * ow + ox
    }

    /// Patch rows of the class for images `first..first + count`, (image, oy, ox) order.
    fn im2col(g: &ConvGeom, (rows, cols): &(Span, Span), x: &[f32], first: usize, count: usize, p: &mut [f32]) {
        let s = g.input;
        let row_len = cols.taps.len() * s.c;
        let kc = rows.taps.len() * row_len;
        let n_rows = count * rows.outs.len() * cols.outs.len();
        p[..n_rows * kc]
            .par_chunks_mut(cols.outs.len() * kc)
            .enumerate()
            .for_each(|(r, block)| {
                let image = first + r / rows.outs.len();
                let oy = rows.outs[r % rows.outs.len()];
                let img = &x[image * s.h * s.w * s.c..(image + 1) * s.h * s.w * s.c];
                for (j, &ox) in cols.outs.iter().enumerate() {
                    let ix0 = ox * g.stride + cols.taps.start - g.pad;
                    for (a, ky) in rows.taps.clone().enumerate() {
                        let iy = oy * g.stride + ky - g.pad;
                        let at = (iy * s.w + ix0) * s.c;
                        block[j * kc + a * row_len..j * kc + (a + 1) * row_len].copy_from_slice(&img[at..at + row_len]);
                    }
                }
            });
    }

    /// Copies the class's rows of `src` (`[.., cout]` rows in output order) into `dst`.
    fn gather(g: &ConvGeom, (rows, cols): &(Span, Span), src: &[f32], first: usize, count: usize, dst: &mut [f32]) {
        let per_image = rows.outs.len() * cols.outs.len() * g.cout;
        dst[..count * per_image]
            .par_chunks_mut(per_image)
            .enumerate()
            .for_each(|(i, d)| {
                let mut k = 0;
                for &oy in &rows.outs {
                    for &ox in &cols.outs {
                        let at = out_row(g, first + i, oy, ox) * g.cout;
                        d[k..k + g.cout].copy_from_slice(&src[at..at + g.cout]);
                        k += g.cout;
                    }
                }
            });
    }

    /// The inverse of `gather`: writes the class's rows into their places in `dst`.
    fn scatter(g: &ConvGeom, (rows, cols): &(Span, Span), src: &[f32], first: usize, count: usize, dst: &mut [f32]) {
        let (oh, ow) = g.out_hw();
        let per_image = rows.outs.len() * cols.outs.len() * g.cout;
        let image_len = oh * ow * g.cout;
        dst[first * image_len..(first + count) * image_len]
            .par_chunks_mut(image_len)
            .zip(src.par_chunks(per_image))
            .for_each(|(d, s)| {
                let mut k = 0;
                for &oy in &rows.outs {
                    for &ox in &cols.outs {
                        let at = (oy * ow + ox) * g.cout;
                        d[at..at + g.cout].copy_from_slice(&s[k..k + g.cout]);
                        k += g.cout;
                    }
                }
            });
    }

    /// Adds patch-row gradients of the class onto `dx` (images `first..first + count`).
    fn col2im_add(g: &ConvGeom, (rows, cols): &(Span, Span), dp: &[f32], first: usize, count: usize, dx: &mut [f32]) {
        let s = g.input;
        let row_len = cols.taps.len() * s.c;
        let kc = rows.taps.len() * row_len;
        let per_image = rows.outs.len() * cols.outs.len() * kc;
        let image_len = s.h * s.w * s.c;
        dx[first * image_len..(first + count) * image_len]
            .par_chunks_mut(image_len)
            .zip(dp.par_chunks(per_image))
            .for_each(|(img, patches)| {
                let mut r = 0;
                for &oy in &rows.outs {
                    for &ox in &cols.outs {
                        let ix0 = ox * g.stride + cols.taps.start - g.pad;
                        for (a, ky) in rows.taps.clone().enumerate() {
                            let iy = oy * g.stride + ky - g.pad;
                            let at = (iy * s.w + ix0) * s.c;
                            let src = &patches[r * kc + a * row_len..r * kc + (a + 1) * row_len];
                            for (d, v) in img[at..at + row_len].iter_mut().zip(src) {
                                *d += v;
                            }
                        }
                        r += 1;
                    }
                }
            });
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        ops: Operands,
        g: &ConvGeom,
        class: &(Span, Span),
        whole: bool,
        x: &[f32],
        w: &[f32],
        first: usize,
        count: usize,
        y: &mut [f32],
        ws: &mut [f32],
        packed: Option<&PackedTaps>,
    ) {
        let kc = class.0.taps.len() * class.1.taps.len() * g.input.c;
        let m = count * class.0.outs.len() * class.1.outs.len();
        let (p, out) = ws.split_at_mut(m * kc);
        im2col(g, class, x, first, count, p);
        let rows_per_image = class.0.outs.len() * class.1.outs.len();
        let dst = if whole {
            &mut y[first * rows_per_image * g.cout..]
        } else {
            &mut out[..]
        };
        for (i, (p_off, w_off, len)) in runs(g, &class.0, &class.1).into_iter().enumerate() {
            let lhs = Mat::rows(&p[p_off..m * kc], kc);
            let rhs = Mat::rows(&w[w_off * g.cout..g.weight_len()], g.cout);
            match packed {
                Some(taps) => {
                    let rows = taps.taps(w_off / g.input.c, len / g.input.c);
                    bf16::matmul_prepacked(m, g.cout, len, dst, g.cout, lhs, rhs, &rows, i > 0);
                }
                None => matmul(ops, m, g.cout, len, dst, g.cout, lhs, rhs, i > 0),
            }
        }
        if !whole {
            scatter(g, class, out, first, count, y);
        }
    }

    /// Every class's gradients, chunk of images by chunk ([`backward`]), added into `dw`
    /// and `dx` from zeros.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_all(
        ops: Operands,
        g: &ConvGeom,
        classes: &[(Span, Span)],
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dw: &mut [f32],
        ws: &mut [f32],
        packed_t: Option<&PackedTaps>,
    ) {
        dw[..g.weight_len()].fill(0.0);
        if let Some(dx) = dx.as_deref_mut() {
            dx[..g.input.numel()].fill(0.0);
        }
        for (first, count) in image_chunks(g) {
            for class in classes {
                let (whole, dx) = (classes.len() == 1, dx.as_deref_mut());
                backward(ops, g, class, whole, x, w, dy, dx, dw, first, count, ws, packed_t);
            }
        }
    }

    /// One class's share of `dw` and `dx` (added), `packed_t` the taps' transposed weights
    /// packed before ([`with_packed_taps`]) where given.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        ops: Operands,
        g: &ConvGeom,
        class: &(Span, Span),
        whole: bool,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        first: usize,
        count: usize,
        ws: &mut [f32],
        packed_t: Option<&PackedTaps>,
    ) {
        let kc = class.0.taps.len() * class.1.taps.len() * g.input.c;
        let rows_per_image = class.0.outs.len() * class.1.outs.len();
        let m = count * rows_per_image;
        let (p, dyc_buf) = ws.split_at_mut(m * kc);
        im2col(g, class, x, first, count, p);
        let dyc: &[f32] = if whole {
            &dy[first * rows_per_image * g.cout..(first + count) * rows_per_image * g.cout]
        } else {
            gather(g, class, dy, first, count, dyc_buf);
            &dyc_buf[..m * g.cout]
        };
        let runs = runs(g, &class.0, &class.1);
        // dw[run, :] += p[:, run]^T dyc
        for &(p_off, w_off, len) in &runs {
            let lhs = Mat::transposed(&p[p_off..m * kc], kc);
            matmul(
                ops,
                len,
                g.cout,
                m,
                &mut dw[w_off * g.cout..g.weight_len()],
                g.cout,
                lhs,
                Mat::rows(dyc, g.cout),
                true,
            );
        }
        if let Some(dx) = dx {
            // dp[:, run] = dyc w[run, :]^T, written over the patches (no longer needed). With
            // the taps packed before, tap by tap: columns apart, the same sums.
            for &(p_off, w_off, len) in &runs {
                if let Some(taps) = packed_t {
                    let c = g.input.c;
                    for j in 0..len / c {
                        let rhs = Mat::transposed(&w[(w_off + j * c) * g.cout..][..c * g.cout], g.cout);
                        let dst = &mut p[p_off + j * c..m * kc];
                        let tap = taps.tap(w_off / c + j);
                        bf16::matmul_prepacked(m, c, g.cout, dst, kc, Mat::rows(dyc, g.cout), rhs, &tap, false);
                    }
                    continue;
                }
                let rhs = Mat::transposed(&w[w_off * g.cout..g.weight_len()], g.cout);
                matmul(
                    ops,
                    m,
                    len,
                    g.cout,
                    &mut p[p_off..m * kc],
                    kc,
                    Mat::rows(dyc, g.cout),
                    rhs,
                    false,
                );
            }
            col2im_add(g, class, p, first, count, dx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Shape4;

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
        if !super::super::bf16::available() {
            return eprintln!("skipped: this CPU has no AVX512_BF16");
        }
        super::super::gemm::set_operands(Operands::Bf16);
        // (images, side, stride, cout): input channels 256, one k-block a tap.
        for (n, side, stride, cout) in [(2, 2, 1, 128), (70, 2, 1, 32), (3, 1, 1, 128), (5, 4, 2, 64)] {
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
            let mut ws = vec![0.0; workspace_len(&g)];
            let (mut each, mut once) = (vec![f32::NAN; g.output().numel()], vec![f32::NAN; g.output().numel()]);
            classes::forward_all(Operands::Bf16, &g, &classes, &x, &w, &mut each, &mut ws, None);
            classes::with_packed_taps(&g, &classes, &w, false, |taps| {
                classes::forward_all(Operands::Bf16, &g, &classes, &x, &w, &mut once, &mut ws, Some(taps))
            });
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&once), bits(&each), "{g:?}");
            let mut y = vec![f32::NAN; g.output().numel()];
            forward(&g, &x, &w, &mut y, &mut ws);
            assert_eq!(bits(&y), bits(&once), "{g:?}: forward");
            // The input gradient on the transposed taps, packed once, tap by tap.
            let dy: Vec<f32> = (0..g.output().numel()).map(|i| val(i, 0.3)).collect();
            let grads = |packed: bool, ws: &mut [f32]| {
                let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()]);
                let mut run = |taps: Option<&classes::PackedTaps>| {
                    let dx = Some(&mut dx[..]);
                    classes::backward_all(Operands::Bf16, &g, &classes, &x, &w, &dy, dx, &mut dw, ws, taps)
                };
                if packed {
                    classes::with_packed_taps(&g, &classes, &w, true, |taps| run(Some(taps)));
                } else {
                    run(None);
                }
                (bits(&dx), bits(&dw))
            };
            assert_eq!(grads(true, &mut ws), grads(false, &mut ws), "{g:?}: gradients");
        }
        super::super::gemm::set_operands(Operands::F32);
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
        if !super::super::bf16::available() {
            return eprintln!("skipped: this CPU has no AVX512_BF16");
        }
        super::super::gemm::set_operands(Operands::Bf16);
        check_every_path(Operands::Bf16);
        super::super::gemm::set_operands(Operands::F32);
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
        let wide = if ops == Operands::Bf16 { &wide[..] } else { &[] };
        for &(h, w, stride, k, pad, cin, cout, tile_points) in cases.iter().chain(wide) {
            let g = ConvGeom {
                input: Shape4::new(3, h, w, cin),
                cout,
                kh: k,
                kw: k,
                stride,
                pad,
            };
            let tile_points = tile_points.map(|n| if ops == Operands::Bf16 { 4 } else { n });
            assert_eq!(winograd::tiling(&g).map(|t| t.points()), tile_points, "{g:?}");
            #[cfg(target_arch = "x86_64")]
            {
                let amx = ops == Operands::Bf16 && bf16::Kernel::chosen() == bf16::Kernel::Amx;
                let even = h % 2 == 0 && w % 2 == 0;
                let shape =
                    (k == 3 && pad == 1 && (stride == 1 || even)) || (k == 1 && pad == 0 && stride == 2 && even);
                let out = g.out_hw();
                // The stems' patches: a stride-1 kernel whose patch fits a tile row.
                let patch = k % 2 == 1 && stride == 1 && pad == k / 2 && k * k * cin <= 32 && cin % 32 != 0;
                let channels = (shape && cin % 32 == 0) || patch;
                let direct = amx && channels && cout % 32 == 0 && out.0 * out.1 >= 16;
                assert_eq!(amx_direct(&g).is_some(), direct, "{g:?}");
            }
            let val = |i: usize, salt: f32| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract();
            let x: Vec<f32> = (0..g.input.numel()).map(|i| val(i, 0.1)).collect();
            let w: Vec<f32> = (0..g.weight_len()).map(|i| val(i, 0.2)).collect();
            let dy: Vec<f32> = (0..g.output().numel()).map(|i| val(i, 0.3)).collect();
            let (ry, rdx, rdw) = reference(&g, &x, &w, &dy);
            let mut ws = vec![0.0; workspace_len(&g)];
            let mut y = vec![f32::NAN; g.output().numel()];
            forward(&g, &x, &w, &mut y, &mut ws);
            let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()]);
            backward(&g, &x, &w, &dy, Some(&mut dx), &mut dw, &mut ws);
            for (what, got, want) in [("y", &y, &ry), ("dx", &dx, &rdx), ("dw", &dw, &rdw)] {
                if ops == Operands::Bf16 {
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

    #[test]
    fn winograd_turned_off_on_one_thread_computes_directly_there_alone() {
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
        let run = |x: &[f32], w: &[f32]| {
            let mut ws = vec![0.0; workspace_len(&g)];
            let mut y = vec![f32::NAN; g.output().numel()];
            forward(&g, x, w, &mut y, &mut ws);
            (y, ws.len())
        };
        let (fast, fast_ws) = run(&x, &w);
        let (direct, direct_ws) = std::thread::scope(|s| {
            s.spawn(|| {
                winograd::set_enabled(false);
                assert!(winograd::tiling(&g).is_none());
                run(&x, &w)
            })
            .join()
            .unwrap()
        });
        assert!(winograd::tiling(&g).is_some(), "the other threads keep Winograd");
        assert_ne!(fast_ws, direct_ws, "each path sizes its own workspace");
        assert_ne!(fast, direct, "the two paths round differently");
        let (ry, _, _) = reference(&g, &x, &w, &vec![0.0; g.output().numel()]);
        for (a, b) in direct.iter().zip(&ry) {
            assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
