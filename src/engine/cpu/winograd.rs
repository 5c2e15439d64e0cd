//! 3x3, stride-1, padding-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin &
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! A 2x2 block of outputs is `A^T [(G g G^T) . (B^T d B)] A` for its 4x4 input tile `d` and
//! the 3x3 filter `g`: after transforming tiles and filters, each of the 16 tile positions
//! is one matrix multiply `[tiles, cin] x [cin, cout]`, 16 multiply-adds per output block and
//! channel pair where im2col spends 36. The weight gradient is the same graph run backwards
//! (`G^T [sum over tiles of (A dY A^T) . V] G`, the same 16 multiplies) and the input gradient
//! is a forward pass over `dy` with the filters rotated by 180 degrees and their channels
//! swapped. The transforms' constants are 0, +-1 and +-1/2, so F(2x2, 3x3) loses little
//! precision in f32.
//!
//! Layouts: transformed tiles are tile-major, `[tile][16][channels]`, so that one tile's 16
//! vectors are contiguous and tiles transform in parallel; the matrix multiply for position
//! `xi` reads them with a row stride of `16 * channels`. Transformed filters are
//! `[16][cin][cout]`. Every transform is written as 4-point transforms over whole channel
//! vectors ("blocks"), first down the columns of the 4x4 grid, then along its rows.

use super::gemm::{Mat, matmul};
use crate::engine::ConvGeom;
use rayon::prelude::*;

/// Upper bound on the transformed tiles of one chunk of images, in f32 values (4 MiB): small
/// enough that a chunk's tiles stay in cache between the transforms and the multiplies.
/// Measured on the cifar stem (2 threads): 127 img/s in training with this budget, 106 with
/// 32 MiB, 98 with 1 MiB.
const WORKSPACE_BUDGET: usize = 1 << 20;

/// Fewer channels than this (the 3-channel stem conv) leave the matrix multiplies too thin to
/// gain from the transforms.
const MIN_CHANNELS: usize = 16;

/// Whether `g` is a convolution this module computes: 3x3, stride 1, padding 1, with enough
/// channels, on maps where the tiles need at most 70% of the multiplies of the taps that
/// land inside the image (32x32: 46%, 8x8: 53%, 4x4: 64%; on 2x2 and 3x3 maps, where the
/// tiles are mostly padding, the tap classes of `conv.rs` do less work).
pub fn applies(g: &ConvGeom) -> bool {
    let (h, w) = (g.input.h, g.input.w);
    let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1;
    let channels = g.input.c >= MIN_CHANNELS && g.cout >= MIN_CHANNELS;
    // Valid taps: 3 per output along each axis, 2 at the two edges.
    let taps = (3 * h).saturating_sub(2) * (3 * w).saturating_sub(2);
    shape && channels && 10 * 16 * h.div_ceil(2) * w.div_ceil(2) <= 7 * taps
}

/// The 2x2 output tiles covering an `h x w` map (the last row or column of tiles hangs over
/// the edge of odd maps).
#[derive(Clone, Copy, Debug)]
struct Tiling {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Tiling {
    fn of(g: &ConvGeom) -> Self {
        let (h, w) = (g.input.h, g.input.w);
        Self {
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        }
    }
    fn tiles(&self) -> usize {
        self.th * self.tw
    }
}

fn images_per_chunk(g: &ConvGeom) -> usize {
    let per_image = 16 * Tiling::of(g).tiles() * (g.input.c + g.cout);
    let budget = std::env::var("WINO_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WORKSPACE_BUDGET);
    (budget / per_image.max(1)).clamp(1, g.input.n.max(1))
}

/// Workspace: two sets of transformed filters (the forward's, or the rotated ones and the
/// weight gradient's), then one chunk's transformed input tiles and output tiles.
pub fn workspace_len(g: &ConvGeom) -> usize {
    32 * g.input.c * g.cout + images_per_chunk(g) * 16 * Tiling::of(g).tiles() * (g.input.c + g.cout)
}

pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32], ws: &mut [f32]) {
    let (cin, cout) = (g.input.c, g.cout);
    let (u, rest) = ws.split_at_mut(32 * cin * cout);
    filter_tiles(w, cin, cout, false, &mut u[..16 * cin * cout]);
    forward_tiled(g, cin, cout, x, &u[..16 * cin * cout], y, rest);
}

/// The forward pass of a `cin -> cout` convolution of `x` (spatial size of `g`) with
/// transformed filters `u`, into `y`; `ws` holds one chunk's tiles.
fn forward_tiled(g: &ConvGeom, cin: usize, cout: usize, x: &[f32], u: &[f32], y: &mut [f32], ws: &mut [f32]) {
    let t = Tiling::of(g);
    let chunk = images_per_chunk(g);
    for first in (0..g.input.n).step_by(chunk) {
        let count = chunk.min(g.input.n - first);
        let rows = count * t.tiles();
        let (v, m) = ws.split_at_mut(chunk * 16 * t.tiles() * cin);
        input_tiles(t, cin, x, first, count, v);
        multiply(rows, cin, cout, v, u, m);
        output_tiles(t, cout, m, first, count, y);
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
    let (cin, cout) = (g.input.c, g.cout);
    let t = Tiling::of(g);
    let (filters, tiles) = ws.split_at_mut(32 * cin * cout);
    let (u_rot, du) = filters.split_at_mut(16 * cin * cout);
    if dx.is_some() {
        filter_tiles(w, cin, cout, true, u_rot);
    }
    let chunk = images_per_chunk(g);
    for first in (0..g.input.n).step_by(chunk) {
        let count = chunk.min(g.input.n - first);
        let rows = count * t.tiles();
        let (v, dm) = tiles.split_at_mut(chunk * 16 * t.tiles() * cin);
        // Weight gradient: dU[xi] += V[xi]^T dM[xi].
        input_tiles(t, cin, x, first, count, v);
        grad_tiles(t, cout, dy, first, count, dm);
        for xi in 0..16 {
            let lhs = Mat {
                data: &v[xi * cin..rows * 16 * cin],
                rs: 1,
                cs: 16 * cin,
            };
            let rhs = Mat {
                data: &dm[xi * cout..rows * 16 * cout],
                rs: 16 * cout,
                cs: 1,
            };
            let dst = &mut du[xi * cin * cout..(xi + 1) * cin * cout];
            matmul(cin, cout, rows, dst, cout, lhs, rhs, first > 0);
        }
        // Input gradient: a forward pass over dy with the rotated filters; the tiles of dy
        // (cout channels) fit where dM was, and the product (cin channels) where V was.
        if let Some(dx) = dx.as_deref_mut() {
            input_tiles(t, cout, dy, first, count, dm);
            multiply(rows, cout, cin, dm, u_rot, v);
            output_tiles(t, cin, v, first, count, dx);
        }
    }
    filter_grad(du, cin, cout, &mut dw[..g.weight_len()]);
}

/// `m[xi] = v[xi] u[xi]` for the 16 tile positions: `rows` tiles, `k -> n` channels.
fn multiply(rows: usize, k: usize, n: usize, v: &[f32], u: &[f32], m: &mut [f32]) {
    for xi in 0..16 {
        let lhs = Mat {
            data: &v[xi * k..rows * 16 * k],
            rs: 16 * k,
            cs: 1,
        };
        let rhs = Mat::rows(&u[xi * k * n..(xi + 1) * k * n], n);
        matmul(rows, n, k, &mut m[xi * n..rows * 16 * n], 16 * n, lhs, rhs, false);
    }
}

// ---- the transforms ---------------------------------------------------------------------------

/// `B^T` on a line of input: the rows of `B^T d`.
fn input_line([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// `A^T` on a line of products: the 2 outputs in the first two places.
fn output_line([m0, m1, m2, m3]: [f32; 4]) -> [f32; 4] {
    [m0 + m1 + m2, m1 - m2 - m3, m2, m3]
}

/// `G` on a line of a 3x3 filter (in the first three places).
fn filter_line([g0, g1, g2, _]: [f32; 4]) -> [f32; 4] {
    [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
}

/// `A` on a line of 2 output gradients (in the first two places): the transpose of
/// [`output_line`].
fn grad_line([a, b, _, _]: [f32; 4]) -> [f32; 4] {
    [a, a + b, a - b, -b]
}

/// `G^T` on a line of filter-tile gradients: the transpose of [`filter_line`], 3 results.
fn filter_grad_line([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
    [d0 + 0.5 * (d1 + d2), 0.5 * (d1 - d2), 0.5 * (d1 + d2) + d3, 0.0]
}

/// Applies `f` down the first `cols` columns of the 4x4 grid of blocks, then along its first
/// `rows` rows; block `4 * i + j` is grid place (i, j).
/// `f` is a 4-point transform of one line (column or row), applied to every channel; generic
/// so that each transform is compiled into its loop.
fn transform<F: Fn([f32; 4]) -> [f32; 4] + Copy>(blocks: &mut [&mut [f32]; 16], f: F, cols: usize, rows: usize) {
    for j in 0..cols {
        line(blocks, [j, 4 + j, 8 + j, 12 + j], f);
    }
    for i in 0..rows {
        line(blocks, [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], f);
    }
}

fn line<F: Fn([f32; 4]) -> [f32; 4]>(blocks: &mut [&mut [f32]; 16], at: [usize; 4], f: F) {
    let [a, b, c, d] = blocks.get_disjoint_mut(at).expect("four distinct places");
    for (((a, b), c), d) in a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut()).zip(d.iter_mut()) {
        [*a, *b, *c, *d] = f([*a, *b, *c, *d]);
    }
}

/// One tile's 16 blocks of `c` values.
fn blocks_of(tile: &mut [f32], c: usize) -> [&mut [f32]; 16] {
    let mut it = tile.chunks_exact_mut(c);
    std::array::from_fn(|_| it.next().expect("16 blocks"))
}

/// `V = B^T d B` for every tile of images `first..first + count` of `x` (`c` channels).
fn input_tiles(t: Tiling, c: usize, x: &[f32], first: usize, count: usize, v: &mut [f32]) {
    let image_len = t.h * t.w * c;
    v[..count * t.tiles() * 16 * c]
        .par_chunks_mut(t.tiles() * 16 * c)
        .enumerate()
        .for_each(|(i, tiles)| {
            let img = &x[(first + i) * image_len..(first + i + 1) * image_len];
            let zeros = vec![0.0; c];
            for (k, tile) in tiles.chunks_exact_mut(16 * c).enumerate() {
                let (ty, tx) = (k / t.tw, k % t.tw);
                // Grid place (r, j) reads pixel (2 ty - 1 + r, 2 tx - 1 + j), or padding.
                let pixel = |r: usize, j: usize| {
                    let (iy, ix) = ((2 * ty + r).wrapping_sub(1), (2 * tx + j).wrapping_sub(1));
                    if iy < t.h && ix < t.w {
                        let at = (iy * t.w + ix) * c;
                        &img[at..at + c]
                    } else {
                        &zeros[..]
                    }
                };
                let mut blocks = blocks_of(tile, c);
                // The column pass reads the pixels themselves (no copy), the row pass works in place.
                for j in 0..4 {
                    let src = [pixel(0, j), pixel(1, j), pixel(2, j), pixel(3, j)];
                    let [a, b, cc, d] = blocks.get_disjoint_mut([j, 4 + j, 8 + j, 12 + j]).expect("distinct");
                    for (i, (((a, b), cc), d)) in a
                        .iter_mut()
                        .zip(b.iter_mut())
                        .zip(cc.iter_mut())
                        .zip(d.iter_mut())
                        .enumerate()
                    {
                        [*a, *b, *cc, *d] = input_line([src[0][i], src[1][i], src[2][i], src[3][i]]);
                    }
                }
                transform(&mut blocks, input_line, 0, 4);
            }
        });
}

/// `Y = A^T M A` for every tile of images `first..first + count`, written into `y` (`c`
/// channels); `m` is consumed.
fn output_tiles(t: Tiling, c: usize, m: &mut [f32], first: usize, count: usize, y: &mut [f32]) {
    let image_len = t.h * t.w * c;
    y[first * image_len..(first + count) * image_len]
        .par_chunks_mut(image_len)
        .zip(m[..count * t.tiles() * 16 * c].par_chunks_mut(t.tiles() * 16 * c))
        .for_each(|(img, tiles)| {
            for (k, tile) in tiles.chunks_exact_mut(16 * c).enumerate() {
                let (ty, tx) = (k / t.tw, k % t.tw);
                let mut blocks = blocks_of(tile, c);
                transform(&mut blocks, output_line, 4, 2);
                for (p, block) in [0, 1, 4, 5].into_iter().map(|p| (p, &blocks[p])) {
                    let (oy, ox) = (2 * ty + p / 4, 2 * tx + p % 4);
                    if oy < t.h && ox < t.w {
                        let at = (oy * t.w + ox) * c;
                        img[at..at + c].copy_from_slice(block);
                    }
                }
            }
        });
}

/// `dM = A dY A^T` for every tile of images `first..first + count` of `dy` (`c` channels);
/// places past the edge of odd maps have no output and count as 0.
fn grad_tiles(t: Tiling, c: usize, dy: &[f32], first: usize, count: usize, dm: &mut [f32]) {
    let image_len = t.h * t.w * c;
    dm[..count * t.tiles() * 16 * c]
        .par_chunks_mut(t.tiles() * 16 * c)
        .enumerate()
        .for_each(|(i, tiles)| {
            let img = &dy[(first + i) * image_len..(first + i + 1) * image_len];
            for (k, tile) in tiles.chunks_exact_mut(16 * c).enumerate() {
                let (ty, tx) = (k / t.tw, k % t.tw);
                let mut blocks = blocks_of(tile, c);
                for p in [0, 1, 4, 5] {
                    let (oy, ox) = (2 * ty + p / 4, 2 * tx + p % 4);
                    if oy < t.h && ox < t.w {
                        let at = (oy * t.w + ox) * c;
                        blocks[p].copy_from_slice(&img[at..at + c]);
                    } else {
                        blocks[p].fill(0.0);
                    }
                }
                transform(&mut blocks, grad_line, 2, 4);
            }
        });
}

/// Blocks of this many values are transformed as one parallel task.
const FILTER_PART: usize = 4096;

/// Splits 16 blocks of `len` values into parts of at most [`FILTER_PART`] values each, one
/// 16-block set per part, to transform in parallel.
fn parts(blocks: &mut [f32], len: usize) -> Vec<[&mut [f32]; 16]> {
    let mut pieces: Vec<_> = blocks
        .chunks_exact_mut(len)
        .map(|b| b.chunks_mut(FILTER_PART))
        .collect();
    (0..len.div_ceil(FILTER_PART))
        .map(|_| std::array::from_fn(|p| pieces[p].next().expect("a piece per block")))
        .collect()
}

/// `U = G g G^T` for every channel pair of HWIO filters `w`, into `u` as `[16][cin][cout]`;
/// `rotated`: of the filters rotated by 180 degrees with in and out swapped
/// (`[16][cout][cin]`), as the input gradient convolves with.
fn filter_tiles(w: &[f32], cin: usize, cout: usize, rotated: bool, u: &mut [f32]) {
    let len = cin * cout;
    u[..16 * len].fill(0.0);
    for ky in 0..3 {
        for kx in 0..3 {
            let tap = &w[(ky * 3 + kx) * len..(ky * 3 + kx + 1) * len];
            if rotated {
                let dst = &mut u[((2 - ky) * 4 + 2 - kx) * len..][..len];
                dst.par_chunks_mut(cin).enumerate().for_each(|(co, row)| {
                    for (ci, d) in row.iter_mut().enumerate() {
                        *d = tap[ci * cout + co];
                    }
                });
            } else {
                u[(ky * 4 + kx) * len..][..len].copy_from_slice(tap);
            }
        }
    }
    parts(&mut u[..16 * len], len)
        .into_par_iter()
        .for_each(|mut blocks| transform(&mut blocks, filter_line, 3, 4));
}

/// `dg = G^T dU G` for every channel pair, from `du` (`[16][cin][cout]`, consumed) into the
/// HWIO gradient `dw`.
fn filter_grad(du: &mut [f32], cin: usize, cout: usize, dw: &mut [f32]) {
    let len = cin * cout;
    parts(&mut du[..16 * len], len)
        .into_par_iter()
        .for_each(|mut blocks| transform(&mut blocks, filter_grad_line, 4, 3));
    for ky in 0..3 {
        for kx in 0..3 {
            dw[(ky * 3 + kx) * len..][..len].copy_from_slice(&du[(ky * 4 + kx) * len..][..len]);
        }
    }
}
