//! Writing a chunk's stack (and the weight gradient's operands) from f32 NHWC values: the
//! plain copies of a stride-1 input, the four phases of a stride-2 one, the patches of a
//! stem, the stack transposed and the output gradient's place pairs.

use super::super::{avx512, line_pairs, pairs_across, round};
use super::{CHANNELS, Source, Stack};
use rayon::prelude::*;

/// One copy of `stack` from `src` (NHWC, `c` channels) into `out`, as bf16 pairs of channels,
/// the columns `masked` says zeros: a row of the stack at a time, an image row converted at
/// once.
pub(super) fn fill(stack: Stack, masked: impl Fn(usize) -> bool + Sync, src: &[f32], c: usize, out: &mut [u32]) {
    let (w, pitch, pixel) = (stack.w, stack.pitch, c / 2);
    let out = &mut out[..stack.pixels() * pixel];
    out[..pixel].fill(0);
    out[pixel..]
        .par_chunks_mut(pitch * pixel)
        .enumerate()
        .for_each(|(r, line)| match stack.row_output(r) {
            Some(s) if line.len() == pitch * pixel => {
                line_pairs(&src[s * c..][..w * c], &mut line[..w * pixel]);
                line[w * pixel..].fill(0);
                for (x, pair) in line.chunks_exact_mut(pixel).enumerate().take(w) {
                    if masked(x) {
                        pair.fill(0);
                    }
                }
            }
            _ => line.fill(0),
        });
}

/// The stack of a convolution run as a 1x1 over its patches ([`super::Direct::patch`]): each
/// output's place holds its patch as 32 channels of bf16 pairs (taps row by row, each tap's
/// `c` channels, zeros where a tap reads padding, then zeros), from `src` (NHWC maps of the
/// stack's size, `c` channels). A row of the stack at a time: the `side` input rows its
/// patches read are rounded to bf16 once, then each patch is copied out of them.
pub(super) fn fill_patches(stack: Stack, side: usize, c: usize, src: &[f32], out: &mut [u32]) {
    let (h, w, pitch, pixel, pad) = (stack.h, stack.w, stack.pitch, CHANNELS / 2, side / 2);
    let out = &mut out[..stack.pixels() * pixel];
    out[..pixel].fill(0);
    // A patch row: `side` taps of `c` channels, read from the padded rows at its column.
    let (tap_row, wide) = (side * c, (w + 2 * pad) * c);
    out[pixel..]
        .par_chunks_mut(pitch * pixel)
        .enumerate()
        .for_each_init(Vec::new, |rows, (r, line)| {
            let Some(o) = stack.row_output(r).filter(|_| line.len() == pitch * pixel) else {
                return line.fill(0);
            };
            let (image, y) = (o / (h * w), o / w % h);
            rows.clear();
            rows.resize(side * wide, 0u16);
            for (ky, padded) in rows.chunks_exact_mut(wide).enumerate() {
                let iy = (y + ky).wrapping_sub(pad);
                if iy < h {
                    let row = &src[(image * h + iy) * w * c..][..w * c];
                    for (d, &v) in padded[pad * c..].iter_mut().zip(row) {
                        *d = round(v);
                    }
                }
            }
            for (x, pairs) in line.chunks_exact_mut(pixel).enumerate() {
                let mut patch = [0u16; CHANNELS];
                if x < w {
                    for (ky, taps) in patch.chunks_exact_mut(tap_row).take(side).enumerate() {
                        taps.copy_from_slice(&rows[ky * wide + x * c..][..tap_row]);
                    }
                }
                for (p, v) in pairs.iter_mut().zip(patch.chunks_exact(2)) {
                    *p = v[0] as u32 | (v[1] as u32) << 16;
                }
            }
        });
}

/// [`fill`] for stride 2: the copies of `stack` that `sources` describe from `src` (NHWC
/// `h x w` maps of `c` channels) into `copies`, as bf16 pairs of channels, each copy a phase
/// (the pixels of one row and column parity), the column its side masks zeros. A row of the
/// stack at a time, all copies at once: the input rows it reads are converted once, then each
/// copy takes its pixels (a pass a copy converting pixel by pixel took twice as long). For
/// stride 1, the same one pass (a row converted into one copy, copied into the others) was
/// 8% slower on the seed stem than `fill`'s pass a copy (3 alternating runs each).
pub(super) fn fill_phases<'a>(
    stack: Stack,
    sources: &[Source],
    (h, w): (usize, usize),
    src: &[f32],
    c: usize,
    copies: impl Iterator<Item = &'a mut [u32]>,
) {
    let (pitch, pixel) = (stack.pitch, c / 2);
    // rows[r]: row r of every copy ([`Stack::row_output`]).
    let mut rows: Vec<Vec<&mut [u32]>> = Vec::new();
    for copy in copies.take(sources.len()) {
        let (ahead, copy) = copy[..stack.pixels() * pixel].split_at_mut(pixel);
        ahead.fill(0);
        for (r, line) in copy.chunks_mut(pitch * pixel).enumerate() {
            if r == rows.len() {
                rows.push(Vec::with_capacity(sources.len()));
            }
            rows[r].push(line);
        }
    }
    rows.into_par_iter()
        .enumerate()
        .for_each_init(Vec::new, |converted, (r, mut lines)| {
            let Some(o) = stack.row_output(r).filter(|_| lines[0].len() == pitch * pixel) else {
                return lines.into_iter().for_each(|line| line.fill(0));
            };
            // The output row's image and row; the two input rows it reads from `first`
            // (both, but a 1x1's only the first), converted, then each copy's phase picked
            // out of them.
            let (image, y) = (o / (stack.h * stack.w), o / stack.w % stack.h);
            let first = (image * h + 2 * y) * w * c;
            let row_len = stack.w * pixel;
            converted.resize(2 * w * pixel, 0);
            for py in 0..2 {
                if sources.iter().any(|s| s.phase.0 == py) {
                    let out = &mut converted[py * w * pixel..][..w * pixel];
                    line_pairs(&src[first + py * w * c..][..w * c], out);
                }
            }
            for (source, line) in sources.iter().zip(lines.iter_mut()) {
                let (py, px) = source.phase;
                for (x, pairs) in line[..row_len].chunks_exact_mut(pixel).enumerate() {
                    pairs.copy_from_slice(&converted[(py * w + 2 * x + px) * pixel..][..pixel]);
                }
            }
            for (source, line) in sources.iter().zip(lines) {
                let (row, tail) = line.split_at_mut(row_len);
                let masked = stack.masked(source.side);
                for (x, pairs) in row.chunks_exact_mut(pixel).enumerate() {
                    if masked(x) {
                        pairs.fill(0);
                    }
                }
                tail.fill(0);
            }
        });
}

/// `stack` (its unmasked copy) from `x` (NHWC, `c` channels) transposed into `out`: per
/// channel a row of `row` pixels (pairs of them as bf16), zeros where the stack holds zeros
/// and past it.
pub(super) fn transposed(stack: Stack, x: &[f32], c: usize, row: usize, out: &mut [u32]) {
    out[..c * row / 2]
        .par_chunks_mut(16 * row / 2)
        .enumerate()
        .for_each(|(g, rows)| {
            let c0 = g * 16;
            // Pixel p holds place p - first.
            let ahead = std::iter::repeat_n(None, stack.first());
            let mut sources = ahead.chain(stack.outputs_from(0, |_| false));
            for r0 in (0..row).step_by(32) {
                let pixels: [*const f32; 32] = std::array::from_fn(|_| {
                    let source = sources.next().flatten();
                    source.map_or(std::ptr::null(), |s| x[s * c + c0..][..16].as_ptr())
                });
                let out = &mut rows[r0 / 2..];
                assert!(out.len() >= 15 * row / 2 + 16);
                // SAFETY: the CPU has AVX512_BF16 (AMX chosen); each pointer is to 16 values
                // of `x`; `out` holds 16 rows of `row / 2` pairs (asserted).
                unsafe { avx512::transposed_pairs(&pixels, out.as_mut_ptr(), row / 2) };
            }
        });
}

/// `dy` (NHWC, `c` channels) as pairs of consecutive places of `stack` into `out` (`c`
/// pairs a place pair), zeros at the zero rows' and columns' places, at the columns `masked`
/// says, and past the last.
pub(super) fn place_pairs(
    stack: Stack,
    masked: impl Fn(usize) -> bool + Sync + Copy,
    dy: &[f32],
    c: usize,
    out: &mut [u32],
) {
    let zeros = vec![0.0; c];
    let place = |o: Option<usize>| o.map_or(&zeros[..], |o| &dy[o * c..][..c]);
    // Tasks of 256 place pairs, each walking its places.
    out.par_chunks_mut(256 * c).enumerate().for_each(|(t, run)| {
        let mut outputs = stack.outputs_from(512 * t, masked);
        for pairs in run.chunks_exact_mut(c) {
            let (a, b) = (outputs.next().flatten(), outputs.next().flatten());
            let done = pairs_across(place(a), place(b), pairs);
            assert_eq!(done, c);
        }
    });
}
