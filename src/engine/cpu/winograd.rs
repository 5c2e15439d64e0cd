//! 3x3, stride-1, padding-1 convolutions by Winograd's minimal filtering (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016), F(2x2, 3x3) and F(4x4, 3x3).
//!
//! An m x m block of outputs is `A^T [(G g G^T) . (B^T d B)] A` for its n x n input tile `d`
//! (n = m + 2) and the 3x3 filter `g`: after transforming tiles and filters, each of the n^2
//! tile positions is one matrix multiply `[tiles, cin] x [cin, cout]`. Per output and channel
//! pair that is 16/4 = 4 multiply-adds for F(2x2, 3x3) and 36/16 = 2.25 for F(4x4, 3x3), where
//! im2col spends 9. The weight gradient is the same graph run backwards
//! (`G^T [sum over tiles of (A dY A^T) . V] G`, the same multiplies) and the input gradient is
//! a forward pass over `dy` with the filters rotated by 180 degrees and their channels swapped.
//!
//! Layouts: transformed tiles are tile-major, `[tile][n^2][channels]`, so that one tile's
//! vectors are contiguous and tiles transform in parallel; the matrix multiply for position
//! `xi` reads them with a row stride of `n^2 * channels`. Its products are position-major,
//! `[n^2][tile][channels]`, so that the n^2 multiplies run side by side on disjoint outputs.
//! Transformed filters are `[n^2][cin][cout]`. Every transform is an n-point transform of
//! lines of whole channel vectors ("blocks"), first down the columns of the n x n grid, then
//! along its rows.

use super::gemm::{Mat, Operands, Out, SharedRhs, matmul_serial};
use crate::engine::ConvGeom;
use rayon::prelude::*;

/// Upper bound on the transformed tiles of one chunk of images, in f32 values (4 MiB): small
/// enough that a chunk's tiles stay in cache between the transforms and the multiplies.
/// Measured on the cifar stem with F(2x2, 3x3) (2 threads): 127 img/s in training with this
/// budget, 106 with 32 MiB, 98 with 1 MiB. Again with F(4x4, 3x3) and tasks of tiles (batch
/// 128, medians of 4 alternating runs): 2 MiB 151, 4 MiB 186, 8 MiB 190, 16 MiB 187, so the
/// larger ones are within the machine's noise of this one.
const WORKSPACE_BUDGET: usize = 1 << 20;

/// Tiles transformed in one parallel task.
const TILES_PER_TASK: usize = 8;

/// Fewer channels than this (the 3-channel stem conv) leave the matrix multiplies too thin to
/// gain from the transforms.
const MIN_CHANNELS: usize = 16;

/// One of the two algorithms: its tile (n points, m = n - 2 outputs) and the 1-D transforms
/// of a line of n values. Each takes and returns n values; unused places are ignored on
/// input and arbitrary on output.
trait Minimal<const N: usize>: Sync {
    /// `B^T`: a line of an input tile.
    fn input(d: [f32; N]) -> [f32; N];
    /// `A^T`: a line of products, to the m outputs in the first places.
    fn output(m: [f32; N]) -> [f32; N];
    /// `G`: a line of 3 filter taps (first places).
    fn filter(g: [f32; N]) -> [f32; N];
    /// `A`: a line of m output gradients (first places); the transpose of `output`.
    fn grad(a: [f32; N]) -> [f32; N];
    /// `G^T`: a line of filter-tile gradients, to 3 taps; the transpose of `filter`.
    fn filter_grad(d: [f32; N]) -> [f32; N];
}

/// F(2x2, 3x3): 4x4 tiles, transforms with constants 0, +-1, +-1/2.
struct F2;

impl Minimal<4> for F2 {
    fn input([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }
    fn output([m0, m1, m2, m3]: [f32; 4]) -> [f32; 4] {
        [m0 + m1 + m2, m1 - m2 - m3, m2, m3]
    }
    fn filter([g0, g1, g2, _]: [f32; 4]) -> [f32; 4] {
        [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
    }
    fn grad([a, b, _, _]: [f32; 4]) -> [f32; 4] {
        [a, a + b, a - b, -b]
    }
    fn filter_grad([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
        [d0 + 0.5 * (d1 + d2), 0.5 * (d1 - d2), 0.5 * (d1 + d2) + d3, 0.0]
    }
}

/// F(4x4, 3x3): 6x6 tiles at the points 0, +-1, +-2 (constants up to 8 and down to 1/24).
struct F4;

impl Minimal<6> for F4 {
    fn input([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
        [
            4.0 * d0 - 5.0 * d2 + d4,
            -4.0 * (d1 + d2) + d3 + d4,
            4.0 * (d1 - d2) - d3 + d4,
            2.0 * (d3 - d1) - d2 + d4,
            2.0 * (d1 - d3) - d2 + d4,
            4.0 * d1 - 5.0 * d3 + d5,
        ]
    }
    fn output([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 6] {
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [
            m0 + s12 + s34,
            d12 + 2.0 * d34,
            s12 + 4.0 * s34,
            d12 + 8.0 * d34 + m5,
            m4,
            m5,
        ]
    }
    fn filter([g0, g1, g2, _, _, _]: [f32; 6]) -> [f32; 6] {
        [
            g0 / 4.0,
            -(g0 + g1 + g2) / 6.0,
            -(g0 - g1 + g2) / 6.0,
            g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
            g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
            g2,
        ]
    }
    fn grad([a0, a1, a2, a3, _, _]: [f32; 6]) -> [f32; 6] {
        [
            a0,
            a0 + a1 + a2 + a3,
            a0 - a1 + a2 - a3,
            a0 + 2.0 * a1 + 4.0 * a2 + 8.0 * a3,
            a0 - 2.0 * a1 + 4.0 * a2 - 8.0 * a3,
            a3,
        ]
    }
    fn filter_grad([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
        [
            d0 / 4.0 - (d1 + d2) / 6.0 + (d3 + d4) / 24.0,
            (d2 - d1) / 6.0 + (d3 - d4) / 12.0,
            (d3 + d4 - d1 - d2) / 6.0 + d5,
            0.0,
            0.0,
            0.0,
        ]
    }
}

/// Multiplies per channel pair of tiles of n points covering an `h x w` map.
fn tile_multiplies(n: usize, h: usize, w: usize) -> usize {
    n * n * h.div_ceil(n - 2) * w.div_ceil(n - 2)
}

/// The tile size (4 or 6 points) for `g`, or none: 3x3, stride 1, padding 1, enough channels,
/// and tiles that need at most 70% of the multiplies of the taps landing inside the image
/// (with 6-point tiles: 32x32 26%, 8x8 30%, 4x4 36%; on 2x2 and 3x3 maps, where tiles are mostly
/// padding, the tap classes of `conv.rs` do less work). The smaller tile wins ties: it rounds
/// less.
fn tile_points(g: &ConvGeom) -> Option<usize> {
    let (h, w) = (g.input.h, g.input.w);
    let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1;
    let channels = g.input.c >= MIN_CHANNELS && g.cout >= MIN_CHANNELS;
    // Valid taps: 3 per output along each axis, 2 at the two edges.
    let taps = (3 * h).saturating_sub(2) * (3 * w).saturating_sub(2);
    let n = if tile_multiplies(6, h, w) < tile_multiplies(4, h, w) {
        6
    } else {
        4
    };
    (shape && channels && 10 * tile_multiplies(n, h, w) <= 7 * taps).then_some(n)
}

/// How Winograd's method computes a convolution: with 4-point or 6-point tiles.
#[derive(Clone, Copy, Debug)]
pub struct Tiling(Tiles);

#[derive(Clone, Copy, Debug)]
enum Tiles {
    F2(Plan<4>),
    F4(Plan<6>),
}

/// The tile side (4 or 6 points) Winograd's method computes `g` with, when it computes it
/// ([`tile_points`]); the convolution plan asks only where Winograd's path is allowed
/// (`--winograd`: its rounding errors are larger than a direct convolution's, and on some
/// batches training amplifies them, docs/seed-vs-pytorch.md).
pub fn points(g: &ConvGeom, ops: Operands) -> Option<usize> {
    // bf16 operands: the 4-point tiles, whose transforms (constants 0, 1, 1/2) amplify the
    // operands' rounding about 2x where the 6-point ones (up to 8 and 1/24) do 13x (measured:
    // 0.4% and 2.7% per convolution against fp32, 0.2% computed directly).
    tile_points(g).map(|n| if ops.is_bf16() { 4 } else { n })
}

impl Tiling {
    /// The tiling of `g` with tiles of `points` ([`points`]) and `ops` operands.
    pub fn new(points: usize, ops: Operands, g: &ConvGeom) -> Self {
        Tiling(match points {
            4 => Tiles::F2(Plan::of(g, ops)),
            6 => Tiles::F4(Plan::of(g, ops)),
            _ => panic!("Winograd tiles of {points} points"),
        })
    }

    pub fn workspace_len(&self) -> usize {
        match self.0 {
            Tiles::F2(plan) => plan.workspace_len(),
            Tiles::F4(plan) => plan.workspace_len(),
        }
    }

    pub fn forward(&self, x: &[f32], w: &[f32], y: &mut [f32], ws: &mut [f32]) {
        match self.0 {
            Tiles::F2(plan) => plan.forward::<F2>(x, w, y, ws),
            Tiles::F4(plan) => plan.forward::<F4>(x, w, y, ws),
        }
    }

    pub fn backward(&self, x: &[f32], w: &[f32], dy: &[f32], dx: Option<&mut [f32]>, dw: &mut [f32], ws: &mut [f32]) {
        match self.0 {
            Tiles::F2(plan) => plan.backward::<F2>(x, w, dy, dx, dw, ws),
            Tiles::F4(plan) => plan.backward::<F4>(x, w, dy, dx, dw, ws),
        }
    }
}

/// A convolution's tiling with n-point tiles: the map, its tiles, the channels and the chunk
/// of images whose tiles are transformed at once.
#[derive(Clone, Copy, Debug)]
struct Plan<const N: usize> {
    images: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    cin: usize,
    cout: usize,
    chunk: usize,
    /// The tile products' operands.
    ops: Operands,
}

impl<const N: usize> Plan<N> {
    const POSITIONS: usize = N * N;
    const OUT: usize = N - 2;

    fn of(g: &ConvGeom, ops: Operands) -> Self {
        let (h, w) = (g.input.h, g.input.w);
        let (th, tw) = (h.div_ceil(Self::OUT), w.div_ceil(Self::OUT));
        let per_image = Self::POSITIONS * th * tw * (g.input.c + g.cout);
        Self {
            images: g.input.n,
            h,
            w,
            th,
            tw,
            cin: g.input.c,
            cout: g.cout,
            chunk: (WORKSPACE_BUDGET / per_image.max(1)).clamp(1, g.input.n.max(1)),
            ops,
        }
    }

    fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// Two sets of transformed filters (the forward's, or the rotated ones and the weight
    /// gradient's), then one chunk's transformed input tiles and output tiles.
    fn workspace_len(&self) -> usize {
        let filters = Self::POSITIONS * self.cin * self.cout;
        2 * filters + self.chunk * Self::POSITIONS * self.tiles() * (self.cin + self.cout)
    }

    fn forward<W: Minimal<N>>(&self, x: &[f32], w: &[f32], y: &mut [f32], ws: &mut [f32]) {
        let filters = Self::POSITIONS * self.cin * self.cout;
        let (u, rest) = ws.split_at_mut(2 * filters);
        self.filter_tiles::<W>(w, false, &mut u[..filters]);
        let (cin, cout) = (self.cin, self.cout);
        // Shared by every chunk's products (with bf16 operands: packed once here).
        let u = SharedRhs::new(self.ops, Self::POSITIONS, cin, cout, &u[..filters]);
        for first in (0..self.images).step_by(self.chunk) {
            let count = self.chunk.min(self.images - first);
            let (v, m) = rest.split_at_mut(self.chunk * Self::POSITIONS * self.tiles() * cin);
            self.input_tiles::<W>(cin, x, first, count, v);
            self.multiply(count * self.tiles(), cin, cout, v, &u, m);
            self.output_tiles::<W>(cout, m, first, count, y);
        }
    }

    fn backward<W: Minimal<N>>(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dw: &mut [f32],
        ws: &mut [f32],
    ) {
        let (cin, cout, p) = (self.cin, self.cout, Self::POSITIONS);
        let (filters, tiles) = ws.split_at_mut(2 * p * cin * cout);
        let (u_rot, du) = filters.split_at_mut(p * cin * cout);
        if dx.is_some() {
            self.filter_tiles::<W>(w, true, u_rot);
        }
        let u_rot = SharedRhs::new(self.ops, if dx.is_some() { p } else { 0 }, cout, cin, u_rot);
        for first in (0..self.images).step_by(self.chunk) {
            let count = self.chunk.min(self.images - first);
            let rows = count * self.tiles();
            let (v, dm) = tiles.split_at_mut(self.chunk * p * self.tiles() * cin);
            // Weight gradient: dU[xi] += V[xi]^T dM[xi].
            self.input_tiles::<W>(cin, x, first, count, v);
            self.grad_tiles::<W>(cout, dy, first, count, dm);
            du[..p * cin * cout]
                .par_chunks_mut(cin * cout)
                .enumerate()
                .for_each(|(xi, dst)| {
                    let lhs = Mat::transposed(&v[xi * cin..rows * p * cin], p * cin);
                    let rhs = Mat::rows(&dm[xi * cout..rows * p * cout], p * cout);
                    matmul_serial(self.ops, (cin, cout, rows), lhs, rhs, Out::adding(dst, cout, first > 0));
                });
            // Input gradient: a forward pass over dy with the rotated filters; the tiles of dy
            // (cout channels) fit where dM was, and the product (cin channels) where V was.
            if let Some(dx) = dx.as_deref_mut() {
                self.input_tiles::<W>(cout, dy, first, count, dm);
                self.multiply(rows, cout, cin, dm, &u_rot, v);
                self.output_tiles::<W>(cin, v, first, count, dx);
            }
        }
        self.filter_grad::<W>(du, &mut dw[..9 * cin * cout]);
    }

    /// `m[xi] = v[xi] u[xi]` for every tile position: `rows` tiles, `k -> n` channels. The
    /// products are position-major (`[n^2][rows][n]`) and run side by side, one per thread
    /// at a time: many small products keep the threads busier than each split across them.
    fn multiply(&self, rows: usize, k: usize, n: usize, v: &[f32], u: &SharedRhs, m: &mut [f32]) {
        let p = Self::POSITIONS;
        m[..p * rows * n]
            .par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(xi, mx)| {
                let lhs = Mat::rows(&v[xi * k..rows * p * k], p * k);
                u.matmul_serial(xi, rows, lhs, Out::new(mx, n));
            });
    }

    /// `V = B^T d B` for every tile of images `first..first + count` of `x` (`c` channels).
    fn input_tiles<W: Minimal<N>>(&self, c: usize, x: &[f32], first: usize, count: usize, v: &mut [f32]) {
        let m = Self::OUT;
        let zeros = vec![0.0; c];
        self.each_tile(c, x, first, count, v, |img, ty, tx, blocks| {
            // Grid place (r, j) reads pixel (m ty - 1 + r, m tx - 1 + j), or padding.
            let pixel = |r: usize, j: usize| {
                let (iy, ix) = ((m * ty + r).wrapping_sub(1), (m * tx + j).wrapping_sub(1));
                if iy < self.h && ix < self.w {
                    let at = (iy * self.w + ix) * c;
                    &img[at..at + c]
                } else {
                    &zeros[..]
                }
            };
            // The column pass reads the pixels themselves, the row pass works in place.
            for j in 0..N {
                let src: [&[f32]; N] = std::array::from_fn(|r| pixel(r, j));
                let dst = blocks
                    .get_disjoint_mut(std::array::from_fn::<usize, N, _>(|r| r * N + j))
                    .expect("distinct places");
                let dst = dst.map(|b| &mut b[..c]);
                for ci in 0..c {
                    let out = W::input(std::array::from_fn(|r| src[r][ci]));
                    for r in 0..N {
                        dst[r][ci] = out[r];
                    }
                }
            }
            transform::<N, _>(blocks, W::input, 0, N);
        });
    }

    /// `Y = A^T M A` for every tile of images `first..first + count` from the position-major
    /// products `mt` (`[n^2][tiles][c]`), written into `y` (`c` channels). One task per row
    /// of tiles (the m rows of the map it covers), so that a chunk of few images still
    /// spreads evenly over the threads.
    fn output_tiles<W: Minimal<N>>(&self, c: usize, mt: &[f32], first: usize, count: usize, y: &mut [f32]) {
        let m = Self::OUT;
        let image_len = self.h * self.w * c;
        let rows = count * self.tiles();
        y[first * image_len..(first + count) * image_len]
            .par_chunks_mut(image_len)
            .enumerate()
            .flat_map(|(i, img)| {
                img.par_chunks_mut(m * self.w * c)
                    .enumerate()
                    .map(move |(ty, band)| (i, ty, band))
            })
            .for_each(|(i, ty, band)| {
                // The column pass's first m rows (all the row pass reads), read straight from
                // the products; the row pass writes straight into the map.
                let mut tile = vec![0.0; m * N * c];
                for tx in 0..self.tw {
                    let row = i * self.tiles() + ty * self.tw + tx;
                    let product = |xi: usize| &mt[(xi * rows + row) * c..][..c];
                    for j in 0..N {
                        let mut column = tile.chunks_exact_mut(c).skip(j).step_by(N);
                        let dst: [&mut [f32]; N] = std::array::from_fn(|_| column.next().unwrap_or_default());
                        line_to(std::array::from_fn(|r| product(r * N + j)), dst, m, W::output);
                    }
                    let valid = m.min(self.w - m * tx);
                    for r in 0..m.min(self.h - m * ty) {
                        let src: [&[f32]; N] = std::array::from_fn(|j| &tile[(r * N + j) * c..][..c]);
                        let at = (r * self.w + m * tx) * c;
                        let mut pixels = band[at..at + valid * c].chunks_exact_mut(c);
                        let dst = std::array::from_fn(|_| pixels.next().unwrap_or_default());
                        line_to(src, dst, valid, W::output);
                    }
                }
            });
    }

    /// `dM = A dY A^T` for every tile of images `first..first + count` of `dy` (`c` channels);
    /// places past the edge of the map have no output and count as 0.
    fn grad_tiles<W: Minimal<N>>(&self, c: usize, dy: &[f32], first: usize, count: usize, dm: &mut [f32]) {
        let m = Self::OUT;
        let zeros = vec![0.0; c];
        self.each_tile(c, dy, first, count, dm, |img, ty, tx, blocks| {
            // Output (oy, ox) of the tile, or 0 past the map's edge (and on the grid's last
            // n - m rows, which `W::grad` does not read).
            let value = |r: usize, j: usize| {
                let (oy, ox) = (m * ty + r, m * tx + j);
                if r < m && oy < self.h && ox < self.w {
                    let at = (oy * self.w + ox) * c;
                    &img[at..at + c]
                } else {
                    &zeros[..]
                }
            };
            // The column pass reads the gradients themselves (the first m columns: the row
            // pass reads no others), the row pass works in place.
            for j in 0..m {
                let dst = blocks
                    .get_disjoint_mut(std::array::from_fn::<usize, N, _>(|r| r * N + j))
                    .expect("distinct places");
                line_to(
                    std::array::from_fn(|r| value(r, j)),
                    dst.map(|b| &mut b[..]),
                    N,
                    W::grad,
                );
            }
            transform::<N, _>(blocks, W::grad, 0, N);
        });
    }

    /// Calls `f(image, ty, tx, blocks)` for every tile of images `first..first + count` of
    /// `src` (`c` channels), `blocks` being the tile's n^2 blocks in `out`. Runs of
    /// [`TILES_PER_TASK`] tiles are the parallel tasks, not whole images: a chunk may hold as
    /// few as 3 images (32x32 maps of 64 channels), which 2 threads would share unevenly.
    fn each_tile<F>(&self, c: usize, src: &[f32], first: usize, count: usize, out: &mut [f32], f: F)
    where
        F: Fn(&[f32], usize, usize, &mut [&mut [f32]]) + Sync,
    {
        let (p, tiles) = (Self::POSITIONS, self.tiles());
        let image_len = self.h * self.w * c;
        out[..count * tiles * p * c]
            .par_chunks_mut(TILES_PER_TASK * p * c)
            .enumerate()
            .for_each(|(task, run)| {
                let mut blocks = Vec::with_capacity(p);
                for (j, tile) in run.chunks_exact_mut(p * c).enumerate() {
                    let k = task * TILES_PER_TASK + j;
                    let (i, t) = (k / tiles, k % tiles);
                    let img = &src[(first + i) * image_len..][..image_len];
                    blocks.clear();
                    blocks.extend(tile.chunks_exact_mut(c));
                    f(img, t / self.tw, t % self.tw, &mut blocks);
                }
            });
    }

    /// `U = G g G^T` for every channel pair of HWIO filters `w`, into `u` as `[n^2][cin][cout]`;
    /// `rotated`: of the filters rotated by 180 degrees with in and out swapped
    /// (`[n^2][cout][cin]`), as the input gradient convolves with.
    fn filter_tiles<W: Minimal<N>>(&self, w: &[f32], rotated: bool, u: &mut [f32]) {
        let (cin, cout) = (self.cin, self.cout);
        let len = cin * cout;
        u[..Self::POSITIONS * len].fill(0.0);
        for ky in 0..3 {
            for kx in 0..3 {
                let tap = &w[(ky * 3 + kx) * len..(ky * 3 + kx + 1) * len];
                if rotated {
                    let dst = &mut u[((2 - ky) * N + 2 - kx) * len..][..len];
                    dst.par_chunks_mut(cin).enumerate().for_each(|(co, row)| {
                        for (ci, d) in row.iter_mut().enumerate() {
                            *d = tap[ci * cout + co];
                        }
                    });
                } else {
                    u[(ky * N + kx) * len..][..len].copy_from_slice(tap);
                }
            }
        }
        parts::<N>(&mut u[..Self::POSITIONS * len], len)
            .into_par_iter()
            .for_each(|mut blocks| transform::<N, _>(&mut blocks, W::filter, 3, N));
    }

    /// `dg = G^T dU G` for every channel pair, from `du` (`[n^2][cin][cout]`, consumed) into
    /// the HWIO gradient `dw`.
    fn filter_grad<W: Minimal<N>>(&self, du: &mut [f32], dw: &mut [f32]) {
        let len = self.cin * self.cout;
        parts::<N>(&mut du[..Self::POSITIONS * len], len)
            .into_par_iter()
            .for_each(|mut blocks| transform::<N, _>(&mut blocks, W::filter_grad, N, 3));
        for ky in 0..3 {
            for kx in 0..3 {
                dw[(ky * 3 + kx) * len..][..len].copy_from_slice(&du[(ky * N + kx) * len..][..len]);
            }
        }
    }
}

/// Applies `f` down the first `cols` columns of the n x n grid of blocks, then along its
/// first `rows` rows; block `n * i + j` is grid place (i, j). Generic in `f` so that each
/// transform is compiled into its loop.
fn transform<const N: usize, F: Fn([f32; N]) -> [f32; N] + Copy>(
    blocks: &mut [&mut [f32]],
    f: F,
    cols: usize,
    rows: usize,
) {
    for j in 0..cols {
        line(blocks, std::array::from_fn(|i| i * N + j), f);
    }
    for i in 0..rows {
        line(blocks, std::array::from_fn(|j| i * N + j), f);
    }
}

// One index walks N slices at once, which no iterator chain of fixed length can.
#[allow(clippy::needless_range_loop)]
fn line<const N: usize, F: Fn([f32; N]) -> [f32; N]>(blocks: &mut [&mut [f32]], at: [usize; N], f: F) {
    let lines = blocks.get_disjoint_mut(at).expect("distinct places");
    let len = lines[0].len();
    let lines = lines.map(|b| &mut b[..len]);
    for ci in 0..len {
        let out = f(std::array::from_fn(|k| lines[k][ci]));
        for k in 0..N {
            lines[k][ci] = out[k];
        }
    }
}

/// Applies `f` to the line of blocks `src`, writing its first `count` outputs to the first
/// `count` blocks of `dst` (the others are ignored and may be empty).
fn line_to<const N: usize, F: Fn([f32; N]) -> [f32; N]>(src: [&[f32]; N], dst: [&mut [f32]; N], count: usize, f: F) {
    // A constant number of stores per value, so that the loop over channels vectorises.
    match count {
        1 => line_first::<N, 1, F>(src, dst, f),
        2 => line_first::<N, 2, F>(src, dst, f),
        3 => line_first::<N, 3, F>(src, dst, f),
        4 => line_first::<N, 4, F>(src, dst, f),
        5 => line_first::<N, 5, F>(src, dst, f),
        6 => line_first::<N, 6, F>(src, dst, f),
        _ => panic!("{count} outputs of a {N}-point line"),
    }
}

#[allow(clippy::needless_range_loop)]
fn line_first<const N: usize, const K: usize, F: Fn([f32; N]) -> [f32; N]>(
    src: [&[f32]; N],
    dst: [&mut [f32]; N],
    f: F,
) {
    let len = src[0].len();
    let src = src.map(|s| &s[..len]);
    let mut dst = dst.into_iter();
    let dst: [&mut [f32]; K] = std::array::from_fn(|_| &mut dst.next().expect("K <= N")[..len]);
    for ci in 0..len {
        let out = f(std::array::from_fn(|k| src[k][ci]));
        for k in 0..K {
            dst[k][ci] = out[k];
        }
    }
}

/// Blocks of this many values are transformed as one parallel task.
const FILTER_PART: usize = 4096;

/// Splits n^2 blocks of `len` values into parts of at most [`FILTER_PART`] values each, one
/// set of n^2 pieces per part, to transform in parallel.
fn parts<const N: usize>(blocks: &mut [f32], len: usize) -> Vec<Vec<&mut [f32]>> {
    let mut pieces: Vec<_> = blocks
        .chunks_exact_mut(len)
        .map(|b| b.chunks_mut(FILTER_PART))
        .collect();
    (0..len.div_ceil(FILTER_PART))
        .map(|_| {
            pieces
                .iter_mut()
                .map(|p| p.next().expect("a piece per block"))
                .collect()
        })
        .collect()
}
