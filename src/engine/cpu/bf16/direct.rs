//! 3x3, stride-1, padding-1 convolutions with bf16 operands on AMX tiles, reading the image
//! where it lies: no im2col and no Winograd transforms, as oneDNN's AMX convolutions do.
//!
//! The input is written once as bf16 with its padding ring, `[image][h + 2][w + 2][c]`. In
//! those padded coordinates, output place `o = y (w + 2) + x` reads tap (ky, kx) at pixel
//! `o + ky (w + 2) + kx`: for every tap, 32 consecutive places read 32 consecutive pixels, so
//! an AMX left-hand tile (16 rows of 32 channels) loads straight from the image with a row
//! stride of one pixel. A 32 x 32 block of outputs is then one run of tile products over the
//! 9 taps and the input channels, 32 at a time, against the weights packed once per call as
//! B panels (one per tap). The two places past each image row (x = w, w + 1) are computed
//! and dropped: 1/16 more work on 32x32 maps, 1/8 on 16x16, 1/4 on 8x8.
//!
//! The input gradient is the same product over the padded output gradient, with each tap's
//! filter transposed and the taps mirrored (`dx[o] = sum over taps t of dy[o - t] w_t^T`).
//! The weight gradient sums over the places instead: the input transposed (a row of pixels per
//! channel, which a tile row reads at any offset) times the output gradient in pairs of places.
//!
//! Measured on a 2-core Xeon with AMX (docs/bf16-cpu.md): the cifar stem's 32x32x64
//! convolution takes 5.1 ms forward (about 1 TFLOP/s) where Winograd's 4-point tiles took 14.7,
//! and 12 ms backward where they took 30.

use super::amx::{Block, ROWS, Tiles};
use super::{KC, Kernel, NR, PackedB, line_pairs, packed_len, pairs_across, with_buffer};
use crate::engine::ConvGeom;
use crate::engine::cpu::gemm::Mat;
use rayon::prelude::*;
use std::cell::RefCell;

/// Channels a tile row holds (64 bytes of bf16): both channel counts are multiples of it.
const CHANNELS: usize = 32;

/// Maps with fewer places than this stay on the other paths: there the dropped places and the
/// blocks' ragged ends outweigh what the direct reads save. At 8x8, measured: the seed stem's
/// 64-channel stage trains 13% faster for it; the cifar stem's 256-channel one is 1.5 ms a step
/// slower backward than Winograd's (0.4 faster forward), left so for one simple rule.
const MIN_PIXELS: usize = 64;

/// Bytes of both operands of the weight gradient's products over one group of images.
const GROUP_BYTES: usize = 1 << 20;

/// A convolution this module computes: its batch, map and channels.
#[derive(Clone, Copy, Debug)]
pub struct Direct {
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
}

thread_local! {
    /// The padded bf16 input (or its transpose) and the packed filters (or the output
    /// gradient's place pairs), kept from call to call (megabytes: fresh ones would cost page
    /// faults on every call).
    static PADDED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static PACKED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

impl Direct {
    /// The plan for `g` if this module computes it: AMX chosen, a 3x3 stride-1 padding-1
    /// convolution, channels in multiples of 32, maps of at least [`MIN_PIXELS`].
    pub fn of(g: &ConvGeom) -> Option<Self> {
        let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1;
        let channels = g.input.c.is_multiple_of(CHANNELS) && g.cout.is_multiple_of(CHANNELS);
        let map = g.input.h * g.input.w >= MIN_PIXELS;
        (Kernel::chosen() == Kernel::Amx && shape && channels && map).then_some(Self {
            n: g.input.n,
            h: g.input.h,
            w: g.input.w,
            cin: g.input.c,
            cout: g.cout,
        })
    }

    /// Pixels of a padded row.
    fn width(&self) -> usize {
        self.w + 2
    }

    /// Pixels of a padded image.
    fn plane(&self) -> usize {
        (self.h + 2) * self.width()
    }

    /// Where tap (ky, kx) reads, relative to the output place, in pixels.
    fn offset(&self, tap: usize) -> usize {
        (tap / 3) * self.width() + tap % 3
    }

    /// `y = conv(x, w)`: `x` NHWC with `cin` channels, `w` HWIO, `y` NHWC with `cout`.
    pub fn forward(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        let (cin, cout) = (self.cin, self.cout);
        let filter = |t: usize| Mat::rows(&w[t * cin * cout..][..cin * cout], cout);
        self.run(x, cin, cout, y, |t| (self.offset(t), filter(t)));
    }

    /// `dx` from `dy` (NHWC, `cout` channels) and the filters `w` (HWIO): tap t's filter,
    /// transposed, applied where the mirrored tap reads.
    pub fn backward_input(&self, dy: &[f32], w: &[f32], dx: &mut [f32]) {
        let (cin, cout) = (self.cin, self.cout);
        let filter = |t: usize| Mat::transposed(&w[t * cin * cout..][..cin * cout], cout);
        self.run(dy, cout, cin, dx, |t| (self.offset(8 - t), filter(t)));
    }

    /// `dst` (`cd` channels) = the sum over the 9 taps of `src` (`cs` channels) read at the
    /// tap's offset times the tap's `cs x cd` filter.
    fn run<'w>(&self, src: &[f32], cs: usize, cd: usize, dst: &mut [f32], tap: impl Fn(usize) -> (usize, Mat<'w>)) {
        let (h, w, width) = (self.h, self.w, self.width());
        assert_eq!(src.len(), self.n * h * w * cs, "input of {self:?}");
        let dst = &mut dst[..self.n * h * w * cd];
        let per_tap = packed_len(cs, cd);
        with_buffer(&PACKED, 9 * per_tap, |packed| {
            let taps: Vec<(usize, PackedB)> = packed
                .chunks_exact_mut(per_tap)
                .enumerate()
                .map(|(t, out)| {
                    let (offset, filter) = tap(t);
                    (offset, PackedB::pack_for(Kernel::Amx, true, cs, cd, filter, out))
                })
                .collect();
            // One pixel beyond the last image's places: the last block's rows past them, and
            // the farthest tap.
            let pixels = self.n * self.plane() + ROWS + 2;
            with_buffer(&PADDED, pixels * cs / 2, |padded| {
                self.pad(src, cs, padded);
                let padded = &*padded;
                // Bands of output rows are the tasks: a few per thread even for few images.
                let tasks = 4 * rayon::current_num_threads();
                let band_rows = h.div_ceil(tasks.div_ceil(self.n).min(h));
                dst.par_chunks_mut(h * w * cd)
                    .enumerate()
                    .flat_map(|(i, image)| {
                        image
                            .par_chunks_mut(band_rows * w * cd)
                            .enumerate()
                            .map(move |(b, band)| (i, b * band_rows, band))
                    })
                    .for_each(|(i, y0, band)| {
                        let tiles = Tiles::configure();
                        let mut block = Block([0.0; ROWS * NR]);
                        let rows = band.len() / (w * cd);
                        let image = &padded[i * self.plane() * cs / 2..];
                        // The band's places, but for the last row's two dropped ones.
                        let (first, places) = (y0 * width, rows * width - 2);
                        for o0 in (first..first + places).step_by(ROWS) {
                            // The farthest pair a step reads: row 31 of the block, the last tap.
                            let last = (o0 + ROWS - 1 + self.offset(8)) * cs / 2 + CHANNELS / 2;
                            assert!(last <= image.len(), "padded input of {self:?}");
                            for q in 0..cd / NR {
                                let steps = taps.iter().flat_map(|(offset, filter)| {
                                    (0..cs).step_by(CHANNELS).map(move |k0| {
                                        let a = image[(o0 + offset) * cs / 2 + k0 / 2..].as_ptr();
                                        (a as *const u8, filter.tile_rows(q, k0).as_ptr())
                                    })
                                });
                                // SAFETY: every A step reads 32 rows of 16 pairs, `cs / 2`
                                // pairs apart, from its start in `image`, all before `last`
                                // (asserted above); `tile_rows` returns 16 x NR pairs.
                                unsafe { tiles.sum(steps, cs * 2, NR * 4, &mut block, false) };
                                for (r, sums) in block.0.chunks_exact(NR).enumerate() {
                                    let (y, x) = ((o0 + r) / width, (o0 + r) % width);
                                    if x < w && y < y0 + rows {
                                        band[((y - y0) * w + x) * cd + q * NR..][..NR].copy_from_slice(sums);
                                    }
                                }
                            }
                        }
                    });
            })
        })
    }

    /// `dw` (HWIO) = the weights' gradient from `x` (NHWC, `cin` channels) and `dy` (NHWC,
    /// `cout`): for tap t, `x` read at the tap's offset, transposed, times `dy`, summed over
    /// every output place of every image. K runs over the places 32 at a time: the left-hand
    /// side is `x` transposed in padded coordinates (a row of pixels per channel, read at any
    /// offset), the right-hand side `dy`'s places in pairs, zeros at the dropped places. Each
    /// task owns some 32 x 32 blocks of `dw` and sums them image by image in the tiles, so the
    /// sums run in one order whatever the thread count.
    pub fn backward_weights(&self, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        let (n, h, w, width, cin, cout) = (self.n, self.h, self.w, self.width(), self.cin, self.cout);
        assert_eq!((x.len(), dy.len()), (n * h * w * cin, n * h * w * cout), "{self:?}");
        let steps = (h * width).div_ceil(ROWS);
        let places = steps * ROWS;
        // Pixels of a channel's row: past the last place read, whole blocks of 32.
        let row = (places + self.offset(8)).next_multiple_of(ROWS);
        with_buffer(&PADDED, n * cin * row / 2, |xt| {
            with_buffer(&PACKED, n * places / 2 * cout, |dyp| {
                self.transposed(x, row, xt);
                self.place_pairs(dy, places, dyp);
                let (xt, dyp) = (&*xt, &*dyp);
                let (cb, qb) = (cin / CHANNELS, cout / NR);
                let blocks = 9 * cb * qb;
                let tasks = rayon::current_num_threads().min(blocks);
                // Images whose operands every block reads before the next: they stay in cache
                // (at most GROUP_BYTES), and the sums stay in the tiles across them.
                let image_bytes = (cin * row + places * cout) * 2;
                let group = (GROUP_BYTES / image_bytes).clamp(1, n);
                let sums: Vec<Vec<Block>> = (0..tasks)
                    .into_par_iter()
                    .map(|task| {
                        let mine = blocks * task / tasks..blocks * (task + 1) / tasks;
                        let mut sums: Vec<Block> = mine.clone().map(|_| Block([0.0; ROWS * NR])).collect();
                        let tiles = Tiles::configure();
                        for first in (0..n).step_by(group) {
                            let images = first..(first + group).min(n);
                            for (b, sum) in mine.clone().zip(&mut sums) {
                                let (tap, c0, q) = (b / (cb * qb), (b / qb) % cb * CHANNELS, b % qb);
                                // The farthest byte read: channel c0 + 31, the last place, the tap.
                                let (start, offset) = (c0 * row * 2, self.offset(tap) * 2);
                                assert!(start + 31 * row * 2 + (places - ROWS) * 2 + offset + 64 <= cin * row * 2);
                                let steps = images.clone().flat_map(|i| {
                                    let image = &xt[i * cin * row / 2..][..cin * row / 2];
                                    let grads = &dyp[i * places / 2 * cout..][..places / 2 * cout];
                                    let a = image.as_ptr() as *const u8;
                                    (0..steps).map(move |s| {
                                        let b = &grads[s * ROWS / 2 * cout + q * NR..][..(ROWS / 2 - 1) * cout + NR];
                                        // SAFETY: within `image` (asserted above).
                                        (unsafe { a.add(start + s * ROWS * 2 + offset) }, b.as_ptr())
                                    })
                                });
                                // SAFETY: A rows `row * 2` bytes apart, 32 of 64 bytes each from
                                // every start, within each image (asserted above); B 16 rows of NR
                                // pairs, `cout` pairs apart, within the slice each step takes.
                                unsafe { tiles.sum(steps, row * 2, cout * 4, sum, first > 0) };
                            }
                        }
                        sums
                    })
                    .collect();
                for (b, sum) in sums.iter().flatten().enumerate() {
                    let (tap, c0, q) = (b / (cb * qb), (b / qb) % cb * CHANNELS, b % qb);
                    for (r, line) in sum.0.chunks_exact(NR).enumerate() {
                        dw[(tap * cin + c0 + r) * cout + q * NR..][..NR].copy_from_slice(line);
                    }
                }
            })
        })
    }

    /// `x` (NHWC, `cin` channels) transposed in padded coordinates into `out`: per image and
    /// channel a row of `row` pixels (pairs of them as bf16), the padding ring and the pixels
    /// past the image zeros.
    fn transposed(&self, x: &[f32], row: usize, out: &mut [u32]) {
        let (h, w, width, cin) = (self.h, self.w, self.width(), self.cin);
        let groups = cin / 16;
        out[..self.n * cin * row / 2]
            .par_chunks_mut(16 * row / 2)
            .enumerate()
            .for_each(|(k, rows)| {
                let (i, c0) = (k / groups, k % groups * 16);
                let pixel = |p: usize| {
                    let (y, x0) = (p / width, p % width);
                    if (1..=h).contains(&y) && (1..=w).contains(&x0) {
                        x[((i * h + y - 1) * w + x0 - 1) * cin + c0..][..16].as_ptr()
                    } else {
                        std::ptr::null()
                    }
                };
                for r0 in (0..row).step_by(32) {
                    let pixels: [*const f32; 32] = std::array::from_fn(|p| pixel(r0 + p));
                    let out = &mut rows[r0 / 2..];
                    assert!(out.len() >= 15 * row / 2 + 16);
                    // SAFETY: the CPU has AVX512_BF16 (AMX chosen); each pointer is to 16
                    // values of `x`; `out` holds 16 rows of `row / 2` pairs (asserted).
                    unsafe { super::avx512::transposed_pairs(&pixels, out.as_mut_ptr(), row / 2) };
                }
            });
    }

    /// `dy` (NHWC, `cout` channels) as pairs of consecutive places into `out`: per image
    /// `places / 2` rows of `cout` pairs, zeros at the dropped places and past the last.
    fn place_pairs(&self, dy: &[f32], places: usize, out: &mut [u32]) {
        let (h, w, width, cout) = (self.h, self.w, self.width(), self.cout);
        let zeros = vec![0.0; cout];
        out[..self.n * places / 2 * cout]
            .par_chunks_mut(places / 2 * cout)
            .zip(dy.par_chunks(h * w * cout))
            .for_each(|(out, dy)| {
                let place = |o: usize| {
                    let (y, x) = (o / width, o % width);
                    if y < h && x < w {
                        &dy[(y * w + x) * cout..][..cout]
                    } else {
                        &zeros[..]
                    }
                };
                for (j, pairs) in out.chunks_exact_mut(cout).enumerate() {
                    let done = pairs_across(place(2 * j), place(2 * j + 1), pairs);
                    assert_eq!(done, cout);
                }
            });
    }

    /// `src` (NHWC, `c` channels) as bf16 pairs of channels into `out`, each image inside a
    /// ring of zeros one pixel wide.
    fn pad(&self, src: &[f32], c: usize, out: &mut [u32]) {
        let (h, w, width) = (self.h, self.w, self.width());
        let row = width * c / 2;
        out[..self.n * self.plane() * c / 2]
            .par_chunks_mut(self.plane() * c / 2)
            .zip(src.par_chunks(h * w * c))
            .for_each(|(image, src)| {
                image[..row].fill(0);
                image[(h + 1) * row..].fill(0);
                for (y, line) in src.chunks_exact(w * c).enumerate() {
                    let padded = &mut image[(y + 1) * row..][..row];
                    padded[..c / 2].fill(0);
                    padded[(w + 1) * c / 2..].fill(0);
                    line_pairs(line, &mut padded[c / 2..(w + 1) * c / 2]);
                }
            });
    }
}

impl PackedB<'_> {
    /// The 16 pair rows of column panel `q` from K value `k0` on (a multiple of 32): one AMX
    /// right-hand tile pair.
    fn tile_rows(&self, q: usize, k0: usize) -> &[u32] {
        assert!(k0.is_multiple_of(CHANNELS) && k0 < self.k && self.kernel == Kernel::Amx);
        let panel = ((k0 / KC) * self.n.div_ceil(NR) + q) * (KC / 2 * NR);
        &self.panels[panel + (k0 % KC) / 2 * NR..][..CHANNELS / 2 * NR]
    }
}

#[cfg(test)]
mod tests {
    use super::super::{round, widen};
    use super::*;
    use crate::engine::Shape4;

    /// `y`, `dx` and `dw` of a 3x3 padding-1 convolution in f64 (`dy`'s gradients through it).
    fn reference(g: &ConvGeom, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f64>; 3] {
        let Shape4 { n, h, w: wd, c } = g.input;
        let co = g.cout;
        let (mut y, mut dx, mut dw) = (vec![0f64; n * h * wd * co], vec![0f64; x.len()], vec![0f64; w.len()]);
        for i in 0..n {
            for (oy, ox) in (0..h).flat_map(|oy| (0..wd).map(move |ox| (oy, ox))) {
                for t in 0..9 {
                    let (iy, ix) = ((oy + t / 3).wrapping_sub(1), (ox + t % 3).wrapping_sub(1));
                    if iy >= h || ix >= wd {
                        continue;
                    }
                    let (xi, yi) = (((i * h + iy) * wd + ix) * c, ((i * h + oy) * wd + ox) * co);
                    for ci in 0..c {
                        for o in 0..co {
                            let wv = w[(t * c + ci) * co + o] as f64;
                            y[yi + o] += x[xi + ci] as f64 * wv;
                            dx[xi + ci] += dy[yi + o] as f64 * wv;
                            dw[(t * c + ci) * co + o] += dy[yi + o] as f64 * x[xi + ci] as f64;
                        }
                    }
                }
            }
        }
        [y, dx, dw]
    }

    /// On operands already bf16, the tile products are exact and only the f32 sums round:
    /// the three results match the float64 reference to f32 summation error, with channel counts
    /// that differ (a transposed filter the wrong way round fails), a map whose rows are not
    /// a multiple of the blocks, and few images (bands of rows as the tasks).
    #[test]
    fn matches_float64_on_bf16_operands() {
        for (n, h, w, cin, cout) in [(2, 8, 9, 64, 32), (3, 11, 6, 32, 96), (1, 16, 16, 288, 32), (32, 8, 8, 64, 64)] {
            let g = ConvGeom {
                input: Shape4::new(n, h, w, cin),
                cout,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            };
            let Some(direct) = Direct::of(&g) else {
                return eprintln!("skipped: no AMX tiles here");
            };
            let val = |i: usize, salt: f32| widen(round(((i as f32 * 0.618 + salt).sin() * 1000.0).fract()));
            let x: Vec<f32> = (0..g.input.numel()).map(|i| val(i, 0.1)).collect();
            let wt: Vec<f32> = (0..g.weight_len()).map(|i| val(i, 0.2)).collect();
            let dy: Vec<f32> = (0..g.output().numel()).map(|i| val(i, 0.3)).collect();
            let [ry, rdx, rdw] = reference(&g, &x, &wt, &dy);
            let mut y = vec![f32::NAN; g.output().numel()];
            direct.forward(&x, &wt, &mut y);
            let mut dx = vec![f32::NAN; x.len()];
            direct.backward_input(&dy, &wt, &mut dx);
            let mut dw = vec![f32::NAN; wt.len()];
            direct.backward_weights(&x, &dy, &mut dw);
            let sums = [
                ("y", &y, &ry, 9 * cin),
                ("dx", &dx, &rdx, 9 * cout),
                ("dw", &dw, &rdw, n * h * w),
            ];
            for (what, got, want, terms) in sums {
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    // Each term is below 1 in size: f32 sums of them err by under terms * 2^-24 each.
                    let bound = terms as f64 * 6e-8 * 4.0;
                    assert!((*a as f64 - b).abs() <= bound, "{g:?} {what}[{i}]: {a} vs {b}");
                }
            }
        }
    }
}
