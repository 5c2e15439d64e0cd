//! The tap classes: on small feature maps most kernel taps of a padded convolution read
//! padding (a 3x3 conv on a 2x2 map: 5 of 9; on 1x1: 8 of 9). There the output positions are
//! grouped by the taps that land inside the image ("tap classes": corners, edges, interior),
//! and each class is one matrix multiply over only its valid taps, so no multiply-add is
//! spent on padding. In NHWC the valid taps of one kernel row are one contiguous run of input,
//! so a class's im2col is a few copies. `whole` says a class is the only one, so its rows are
//! the output's own rows in order and need no gather or scatter.

use super::im2col::image_chunks;
use crate::engine::ConvGeom;
use crate::engine::cpu::bf16::{self, Kernel};
use crate::engine::cpu::gemm::{Mat, Operands, Out, matmul};
use rayon::prelude::*;
/// Output coordinates along one axis that see the same range of valid kernel taps.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub taps: std::ops::Range<usize>,
    pub outs: Vec<usize>,
}

pub fn spans(out_len: usize, in_len: usize, k: usize, stride: usize, pad: usize) -> Vec<Span> {
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
pub fn tap_classes(g: &ConvGeom) -> Vec<(Span, Span)> {
    let (oh, ow) = g.out_hw();
    let rows = spans(oh, g.input.h, g.kh, g.stride, g.pad);
    let cols = spans(ow, g.input.w, g.kw, g.stride, g.pad);
    rows.iter()
        .flat_map(|r| cols.iter().map(move |c| (r.clone(), c.clone())))
        .collect()
}

/// Whether skipping padding taps saves enough multiply-adds (a fifth or more) to pay for
/// the extra, smaller matrix multiplies.
pub fn use_tap_classes(g: &ConvGeom, classes: &[(Span, Span)]) -> bool {
    let (oh, ow) = g.out_hw();
    let useful: usize = classes
        .iter()
        .map(|(r, c)| r.outs.len() * c.outs.len() * r.taps.len() * c.taps.len())
        .sum();
    5 * useful <= 4 * oh * ow * g.kh * g.kw
}

/// The filter taps that a convolution's classes read, packed once for bf16 products
/// ([`with_packed_taps`]), as they are for the forward pass or transposed for the input
/// gradient: on a 2x2 map each of the four corner classes reads four taps, and packing
/// them class by class converted 16 taps' weights where 9 are distinct (the seed stem's
/// stage 3; packing was a sixth of its bf16 inference).
pub struct PackedTaps<'a> {
    kernel: Kernel,
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
        bf16::PackedB::view(self.kernel, count * self.k, self.n, panels)
    }
}

/// `f` with the taps that `classes` read packed for `kernel`'s bf16 products, each once, in tap
/// order (the taps of a class's run are consecutive, so they are consecutive there), as
/// `cin x cout` or, `transposed`, `cout x cin`.
pub fn with_packed_taps<R>(
    kernel: Kernel,
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
    bf16::with_packed_each(kernel, k, n, &filters, |packed| {
        f(&PackedTaps {
            kernel,
            packed,
            slot,
            k,
            n,
        })
    })
}

/// A convolution computed on its tap classes: its operands, geometry, classes and weights
/// and, with bf16 operands, its taps packed once ([`with_packed_taps`]: for the forward pass
/// as they are, for the input gradient transposed) where given.
#[derive(Clone, Copy)]
pub struct Classes<'a> {
    pub ops: Operands,
    pub g: &'a ConvGeom,
    pub classes: &'a [(Span, Span)],
    pub w: &'a [f32],
    pub packed: Option<&'a PackedTaps<'a>>,
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

impl Classes<'_> {
    /// Whether the one class is the whole output (its rows are the output's own, in order).
    fn whole(&self) -> bool {
        self.classes.len() == 1
    }

    /// Every class's outputs, chunk of images by chunk.
    pub fn forward_all(&self, x: &[f32], y: &mut [f32], ws: &mut [f32]) {
        for chunk in image_chunks(self.g) {
            for class in self.classes {
                self.forward(class, chunk, x, y, ws);
            }
        }
    }

    /// One class's outputs for the images `first..first + count`.
    fn forward(&self, class: &(Span, Span), (first, count): (usize, usize), x: &[f32], y: &mut [f32], ws: &mut [f32]) {
        let (ops, g, w, whole) = (self.ops, self.g, self.w, self.whole());
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
            match self.packed {
                Some(taps) => {
                    let rows = taps.taps(w_off / g.input.c, len / g.input.c);
                    bf16::matmul_prepacked((m, g.cout, len), lhs, rhs, &rows, Out::adding(dst, g.cout, i > 0));
                }
                None => matmul(ops, (m, g.cout, len), lhs, rhs, Out::adding(dst, g.cout, i > 0)),
            }
        }
        if !whole {
            scatter(g, class, out, first, count, y);
        }
    }

    /// Every class's gradients, chunk of images by chunk, added into `dw` and `dx` from
    /// zeros; the packed taps, where given, are the transposed ones.
    pub fn backward_all(&self, x: &[f32], dy: &[f32], mut dx: Option<&mut [f32]>, dw: &mut [f32], ws: &mut [f32]) {
        let g = self.g;
        dw[..g.weight_len()].fill(0.0);
        if let Some(dx) = dx.as_deref_mut() {
            dx[..g.input.numel()].fill(0.0);
        }
        for chunk in image_chunks(g) {
            for class in self.classes {
                self.backward(class, chunk, x, dy, (dx.as_deref_mut(), &mut *dw), ws);
            }
        }
    }

    /// One class's share of `dw` and `dx` (added) for the images `first..first + count`.
    fn backward(
        &self,
        class: &(Span, Span),
        (first, count): (usize, usize),
        x: &[f32],
        dy: &[f32],
        (dx, dw): (Option<&mut [f32]>, &mut [f32]),
        ws: &mut [f32],
    ) {
        let (ops, g, w, whole, packed_t) = (self.ops, self.g, self.w, self.whole(), self.packed);
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
                (len, g.cout, m),
                lhs,
                Mat::rows(dyc, g.cout),
                Out::adding(&mut dw[w_off * g.cout..g.weight_len()], g.cout, true),
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
                        bf16::matmul_prepacked((m, c, g.cout), Mat::rows(dyc, g.cout), rhs, &tap, Out::new(dst, kc));
                    }
                    continue;
                }
                let rhs = Mat::transposed(&w[w_off * g.cout..g.weight_len()], g.cout);
                matmul(
                    ops,
                    (m, len, g.cout),
                    Mat::rows(dyc, g.cout),
                    rhs,
                    Out::new(&mut p[p_off..m * kc], kc),
                );
            }
            col2im_add(g, class, p, first, count, dx);
        }
    }
}
