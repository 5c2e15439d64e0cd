//! A bf16 x bf16 -> f32 matrix multiply on AVX512_BF16 (`vdpbf16ps`): PyTorch's CPU autocast
//! arithmetic for convolutions and linear layers, operands rounded to bf16, products summed in
//! f32. No crate offers one (the `gemm` crate converts f16 to f32 while packing), so it is
//! written here, small: GotoBLAS blocking over the `Mat` views the f32 path takes.
//!
//! `vdpbf16ps` multiplies pairs along K: lane j of the result gains `a[2j] b[2j] + a[2j+1]
//! b[2j+1]`. So both operands are packed as k-pairs, one `u32` (two bf16) per pair: an A panel
//! is `[rows][k/2]` pairs (one broadcast per row), a B panel `[k/2][NR]` (two vectors of 16
//! columns). Rounding is to nearest, ties to even, as `vcvtne2ps2bf16` and PyTorch do.
//!
//! Two kernels multiply the packed panels: `vdpbf16ps` register tiles ([`avx512`]) and, where
//! the CPU has them, AMX tiles ([`amx`]: 4-5x the former's rate on a 2-core Xeon, measured in
//! docs/results/bf16-cpu-log.md). [`Kernel`] says which; the packing is the same but for the panels' sizes.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod direct;

use super::gemm::{Dims, Mat, Out};
use rayon::prelude::*;
use std::cell::RefCell;
use std::thread::LocalKey;

/// Columns of B in one tile product (both kernels).
const NR: usize = 32;
/// K values in one packed block (a B panel of 128 pairs x 32 columns is 16 KiB: L1).
const KC: usize = 256;
/// Columns of C a task sweeps before the next k-block (8 panels of B, 128 KiB: L2).
const NC: usize = 256;
/// Rows of C a parallel task computes at most (its A panels are packed by the task).
const MC: usize = 64;

/// The instructions this module needs that the CPU lacks (none: it can run).
pub fn missing_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut missing = Vec::new();
        if !std::arch::is_x86_feature_detected!("avx512f") {
            missing.push("AVX512F");
        }
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            missing.push("AVX512BW");
        }
        if !std::arch::is_x86_feature_detected!("avx512bf16") {
            missing.push("AVX512_BF16");
        }
        missing
    }
    #[cfg(not(target_arch = "x86_64"))]
    vec!["x86-64 with AVX512_BF16 (aarch64 BF16 is not built yet)"]
}

/// Whether this CPU has the instructions ([`missing_features`] is empty); asked once, so
/// every product can check it.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| missing_features().is_empty())
}

/// The tile products that multiply the packed panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `vdpbf16ps` on 8 x 32 register tiles (AVX512_BF16).
    Avx512,
    /// `tdpbf16ps` on 32 x 32 blocks of AMX tiles (AMX-BF16).
    Amx,
}

impl Kernel {
    /// The fastest kernel this CPU runs (AMX where the CPU and the OS allow it, else
    /// AVX512_BF16), or none without AVX512_BF16.
    pub fn best_available() -> Option<Self> {
        if Self::amx_available() {
            Some(Kernel::Amx)
        } else {
            available().then_some(Kernel::Avx512)
        }
    }

    /// Whether AMX tiles can run here (asks the OS for them the first time).
    pub fn amx_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return available() && amx::available();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Rows of A in one tile product (an A panel's lines).
    fn rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => avx512::ROWS,
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => amx::ROWS,
            #[cfg(not(target_arch = "x86_64"))]
            _ => 8,
        }
    }

    /// Pairs a panel line holds for `kc` values of K: AMX tiles take 16 pairs a row, so its
    /// panels are padded with zeros to a multiple of 16 (at most 128, [`KC`] / 2).
    fn stride(self, kc: usize) -> usize {
        match self {
            Kernel::Avx512 => kc.div_ceil(2),
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => kc.div_ceil(2).next_multiple_of(amx::PAIRS),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Amx => unreachable!(),
        }
    }

    /// Makes this thread ready for tile products (AMX: configures its tiles until the result
    /// is dropped).
    fn start(self) -> Multiplier {
        match self {
            Kernel::Avx512 => Multiplier::Avx512,
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => Multiplier::Amx(amx::Tiles::configure()),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Amx => unreachable!(),
        }
    }
}

/// A kernel ready on this thread ([`Kernel::start`]).
enum Multiplier {
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Amx(amx::Tiles),
}

/// How A's panels lie in a packed buffer: `mr` lines a panel, `stride` pairs a line, panels
/// `len` values apart.
#[derive(Clone, Copy)]
struct PanelLayout {
    mr: usize,
    stride: usize,
    len: usize,
}

/// A tile of C that one tile product writes: `rows x cols` values from the start of `data`,
/// rows `rs` apart, overwritten or (`add`) added to.
struct Tile<'a> {
    data: &'a mut [f32],
    rs: usize,
    rows: usize,
    cols: usize,
    add: bool,
}

/// [`Tile`] as the kernels take it, checked: `rows x cols` f32 at `c`, rows `rs` apart.
#[derive(Clone, Copy)]
struct RawTile {
    c: *mut f32,
    rs: usize,
    rows: usize,
    cols: usize,
    add: bool,
}

/// The packed operands of one tile product as the kernels take them, checked: `pairs` k-pairs
/// of A's lines (at `a`, `stride` pairs apart) and of B's panel (at `b`, [`NR`] columns).
#[derive(Clone, Copy)]
struct RawPanels {
    a: *const u32,
    b: *const u32,
    pairs: usize,
    stride: usize,
}

impl Multiplier {
    /// One tile product: `c[mr, nr] (+)= a b` over the k-pairs of a k-block of `kc` values; `a`
    /// a panel of the kernel's rows, lines `stride` pairs apart, `b` a panel of `stride` pairs
    /// of [`NR`] columns (padding zeros included). The one place the panels and the tile are
    /// checked against their slices before a kernel reads them.
    fn product(&self, kc: usize, stride: usize, (a, b): (&[u32], &[u32]), tile: Tile) {
        let Tile {
            data: c,
            rs: c_rs,
            rows: mr,
            cols: nr,
            add,
        } = tile;
        #[cfg(target_arch = "x86_64")]
        {
            // Pairs the kernel reads: AMX whole tile rows, padding included.
            let (rows, pairs) = match self {
                Multiplier::Avx512 => (avx512::ROWS, kc.div_ceil(2)),
                Multiplier::Amx(_) => (amx::ROWS, stride),
            };
            assert!(pairs <= stride && a.len() >= (rows - 1) * stride + pairs && b.len() >= pairs * NR);
            assert!(mr <= rows && nr <= NR && (mr - 1) * c_rs + nr <= c.len());
            let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            let panels = RawPanels { a, b, pairs, stride };
            let tile = RawTile {
                c,
                rs: c_rs,
                rows: mr,
                cols: nr,
                add,
            };
            // SAFETY: the CPU has AVX512F and AVX512_BF16 (checked by `matmul`; AMX by
            // `Kernel::start`), and the panels and the tile were checked above.
            unsafe {
                match self {
                    Multiplier::Avx512 => avx512::tile_product(panels, tile),
                    Multiplier::Amx(tiles) => tiles.product(panels, tile),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 matmul needs x86-64 with AVX512_BF16")
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits. NaNs stay NaNs.
#[inline(always)]
pub fn round(x: f32) -> u16 {
    let b = x.to_bits();
    let nearest = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16;
    // Selects, not branches, so that packing loops vectorise. Subnormal inputs become zeros
    // of their sign, as `vcvtne2ps2bf16` makes them (so both paths give the same bits).
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let subnormal = b & 0x7f80_0000 == 0;
    (if nan {
        (b >> 16) | 0x40
    } else if subnormal {
        (b >> 16) & 0x8000
    } else {
        nearest
    }) as u16
}

/// The f32 a bf16 stands for.
#[cfg(test)]
pub fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    round(lo) as u32 | (round(hi) as u32) << 16
}

/// Where a panel's pairs go: pair p of line l at `out[l * stride + p]` (line-major: an A
/// panel, each row's pairs in order, `stride` the kernel's [`Kernel::stride`]) or at
/// `out[p * width + l]` (pair-major: a B panel, each pair's 32 columns side by side for two
/// vector loads).
#[derive(Clone, Copy)]
enum Order {
    LineMajor,
    PairMajor,
}

/// Packs `lines` of a `width`-line panel (rows of A, or columns of B) over `kc` values of K:
/// element (line l, k) of the source is `src`'s (l, k), and the panel holds `stride` pairs a
/// line (at least `kc / 2` rounded up). Missing lines, an odd last k and the pairs beyond K
/// are zeros. The two common source layouts (lines along K, or lines side by side) run as
/// plain loops over contiguous memory.
fn pack(order: Order, out: &mut [u32], width: usize, stride: usize, src: Mat, lines: usize, kc: usize) {
    let (data, at, ls, ks) = (src.data, 0, src.rs, src.cs);
    let pairs = kc.div_ceil(2);
    assert!(stride >= pairs);
    let out = &mut out[..stride * width];
    if lines < width || kc % 2 == 1 || stride > pairs {
        out.fill(0);
    }
    match (ks, ls, order) {
        (1, _, Order::LineMajor) => {
            for l in 0..lines {
                line_pairs(&data[at + l * ls..][..kc], &mut out[l * stride..][..pairs]);
            }
        }
        (_, 1, Order::PairMajor) => {
            for p in 0..pairs {
                let k0 = &data[at + 2 * p * ks..][..lines];
                let o = &mut out[p * width..][..lines];
                if 2 * p + 1 < kc {
                    let k1 = &data[at + (2 * p + 1) * ks..][..lines];
                    let done = pairs_across(k0, k1, o);
                    for ((o, &a), &b) in o[done..].iter_mut().zip(&k0[done..]).zip(&k1[done..]) {
                        *o = pair(a, b);
                    }
                } else {
                    for (o, &a) in o.iter_mut().zip(k0) {
                        *o = pair(a, 0.0);
                    }
                }
            }
        }
        (1, _, Order::PairMajor) => {
            // Each line (a column of B) runs along K: its pairs are adjacent values, converted
            // 16 at a time into a line-major block, then transposed into place.
            let mut block = vec![0u32; lines * pairs];
            for (l, o) in block.chunks_exact_mut(pairs).enumerate() {
                line_pairs(&data[at + l * ls..][..kc], o);
            }
            for (p, row) in out.chunks_exact_mut(width).take(pairs).enumerate() {
                for (l, o) in row[..lines].iter_mut().enumerate() {
                    *o = block[l * pairs + p];
                }
            }
        }
        // Any other layout (A's rows side by side go through `pack_rows`), value by value.
        _ => {
            out.fill(0);
            for l in 0..lines {
                for k in 0..kc {
                    let v = round(data[at + l * ls + k * ks]) as u32;
                    let at = match order {
                        Order::LineMajor => l * stride + k / 2,
                        Order::PairMajor => (k / 2) * width + l,
                    };
                    out[at] |= v << (16 * (k % 2));
                }
            }
        }
    }
}

/// The `line.len().div_ceil(2)` pairs of a run of K values into `out` (an odd last value
/// pairs with zero).
fn line_pairs(line: &[f32], out: &mut [u32]) {
    let done = adjacent_pairs(line, out);
    for (o, v) in out[done..].iter_mut().zip(line[2 * done..].chunks_exact(2)) {
        *o = pair(v[0], v[1]);
    }
    if line.len() % 2 == 1 {
        out[line.len() / 2] = pair(line[line.len() - 1], 0.0);
    }
}

/// Pairs of adjacent values of `line` into `out`, 16 at a time with `vcvtne2ps2bf16`; how
/// many it wrote (the rest is the caller's).
fn adjacent_pairs(line: &[f32], out: &mut [u32]) -> usize {
    let blocks = (line.len() / 32).min(out.len() / 16);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matmul` checked the CPU; `blocks` 32-value and 16-pair blocks are in bounds.
    unsafe {
        avx512::adjacent_pairs(line.as_ptr(), out.as_mut_ptr(), blocks)
    };
    16 * blocks
}

/// Pairs `(k0[j], k1[j])` into `out[j]`, 16 at a time; how many it wrote.
fn pairs_across(k0: &[f32], k1: &[f32], out: &mut [u32]) -> usize {
    let blocks = k0.len().min(k1.len()).min(out.len()) / 16;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        avx512::pairs_across(k0.as_ptr(), k1.as_ptr(), out.as_mut_ptr(), blocks)
    };
    16 * blocks
}

/// `dst[m, n] (row stride dst_rs) = a[m, k] b[k, n] (+ dst if accumulate)` with bf16 operands
/// and f32 sums, by `kernel`; on every thread of the pool when `parallel`. Panics on a CPU
/// without the kernel's instructions (callers check [`available`] first) or on views beyond
/// their buffers.
pub fn matmul(kernel: Kernel, parallel: bool, (m, n, k): Dims, a: Mat, b: Mat, out: Out) {
    if parallel && splits_by_columns(m, n) {
        return matmul_by_columns(kernel, (m, n, k), a, b, out);
    }
    with_buffer(&PACKED_B, packed_len(k, n), |bpack| {
        let b = PackedB::pack(kernel, parallel, k, n, b, bpack);
        matmul_packed(parallel, m, Lhs::Mat(a), &b, out)
    })
}

/// [`matmul`] (on every thread of the pool) whose right-hand side `b` was packed before
/// (`packed`, [`with_packed_each`]; its kernel multiplies): the row split multiplies those
/// panels; where [`matmul`] splits by columns (few rows and many columns), it does so from
/// `b` itself. The same bits as [`matmul`] either way.
pub fn matmul_prepacked((m, n, k): Dims, a: Mat, b: Mat, packed: &PackedB, out: Out) {
    let kernel = packed.kernel;
    assert_eq!((packed.k, packed.n), (k, n), "packed rhs");
    if splits_by_columns(m, n) {
        return matmul_by_columns(kernel, (m, n, k), a, b, out);
    }
    matmul_packed(true, m, Lhs::Mat(a), packed, out)
}

/// Whether a product on every thread of the pool splits by columns ([`matmul_by_columns`]:
/// fewer rows than a task's share, many columns) rather than by rows.
fn splits_by_columns(m: usize, n: usize) -> bool {
    m < MC && n >= 4 * NR && rayon::current_num_threads() > 1
}

/// Rows of a left-hand side that no matrix holds (a convolution's patches, read from the
/// image where they lie, where im2col would write them out in f32 and the packing read them
/// back): the packer asks for a k-block of a row at a time, into an f32 line in cache, and
/// turns it into pairs there.
pub trait Lines: Sync {
    /// K values `p0..p0 + out.len()` of row `i`.
    fn line(&self, i: usize, p0: usize, out: &mut [f32]);
}

/// The left-hand side of [`matmul_packed`]: a matrix view or [`Lines`].
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    Mat(Mat<'a>),
    Lines(&'a dyn Lines),
}

/// [`matmul`] with a left-hand side of [`Lines`] (`m x k`) on every thread of the pool.
pub fn matmul_lines(kernel: Kernel, (m, n, k): Dims, a: &dyn Lines, b: Mat, out: Out) {
    with_buffer(&PACKED_B, packed_len(k, n), |bpack| {
        let b = PackedB::pack(kernel, true, k, n, b, bpack);
        matmul_packed(true, m, Lhs::Lines(a), &b, out)
    })
}

/// `f` on `bs` (each `k x n`) packed side by side for `kernel`, [`packed_len`]`(k,
/// n)` values each. Where `k` is whole k-blocks ([`whole_blocks`]) their blocks align, so
/// consecutive ones are one packed matrix of their rows stacked ([`PackedB::view`]), the same
/// values that packing the stacked rows gives.
pub fn with_packed_each<R>(kernel: Kernel, k: usize, n: usize, bs: &[Mat], f: impl FnOnce(&[u32]) -> R) -> R {
    with_buffer(&PACKED_B, bs.len() * packed_len(k, n), |out| {
        PackedB::pack_each(kernel, k, n, bs, out);
        f(out)
    })
}

/// Whether `k` rows of a right-hand side are whole k-blocks ([`with_packed_each`]).
pub fn whole_blocks(k: usize) -> bool {
    k.is_multiple_of(KC)
}

/// Values of a packed right-hand side of `k x n` (for either kernel: a k-block's panel has room
/// for [`KC`] / 2 pairs, a multiple of AMX's 16).
pub fn packed_len(k: usize, n: usize) -> usize {
    k.div_ceil(KC) * n.div_ceil(NR) * (KC / 2 * NR)
}

/// A right-hand side packed for the kernel (every k-block's panels), to be used by several
/// products.
pub struct PackedB<'a> {
    kernel: Kernel,
    k: usize,
    n: usize,
    panels: &'a [u32],
}

impl<'a> PackedB<'a> {
    /// Packs `b` (`k x n`) into `out` ([`packed_len`] values) for `kernel`.
    pub fn pack(kernel: Kernel, parallel: bool, k: usize, n: usize, b: Mat, out: &'a mut [u32]) -> Self {
        assert!(available(), "bf16 matmul on a CPU without AVX512_BF16");
        b.check(k, n, "rhs");
        let panels = n.div_ceil(NR);
        let panel_len = KC / 2 * NR;
        let out = &mut out[..packed_len(k, n)];
        let pack_b =
            |(t, out): (usize, &mut [u32])| b_panel(kernel, out, b, k, n, (t / panels) * KC, (t % panels) * NR);
        if parallel {
            out.par_chunks_mut(panel_len).enumerate().for_each(pack_b);
        } else {
            out.chunks_mut(panel_len).enumerate().for_each(pack_b);
        }
        Self {
            kernel,
            k,
            n,
            panels: out,
        }
    }

    /// [`PackedB::pack`] of several right-hand sides of `k x n` into consecutive
    /// [`packed_len`] runs of `out`, in one parallel pass whose tasks are k-blocks. Where B's
    /// rows are contiguous, `k` even and `n` whole panels (the direct convolutions' filters,
    /// HWIO), each pair of rows is read once, whole, and spread over the block's panels:
    /// packed panel by panel, each read 32 columns of every row, 2 KiB apart on 512 columns
    /// (the 9 taps of a 512-channel convolution: 0.97 ms a call that way, 0.71 now, about the
    /// memory's rate for the f32 filters).
    fn pack_each(kernel: Kernel, k: usize, n: usize, bs: &[Mat], out: &'a mut [u32]) -> Vec<Self> {
        assert!(available(), "bf16 matmul on a CPU without AVX512_BF16");
        for b in bs {
            b.check(k, n, "rhs");
        }
        let (panels, panel_len, len) = (n.div_ceil(NR), KC / 2 * NR, packed_len(k, n));
        let blocks = k.div_ceil(KC);
        let out = &mut out[..bs.len() * len];
        out.par_chunks_mut(panels * panel_len).enumerate().for_each(|(t, out)| {
            let (b, p0) = (bs[t / blocks], (t % blocks) * KC);
            if b.cs == 1 && k.is_multiple_of(2) && n.is_multiple_of(NR) {
                k_block_by_rows(kernel, out, b, k, n, p0);
            } else {
                for (q, out) in out.chunks_mut(panel_len).enumerate() {
                    b_panel(kernel, out, b, k, n, p0, q * NR);
                }
            }
        });
        out.chunks_exact(len)
            .map(|panels| Self { kernel, k, n, panels })
            .collect()
    }

    /// The panel of k-block `kb` and columns `q * NR..`: room for [`KC`] / 2 pairs of [`NR`]
    /// columns, of which the k-block's `Kernel::stride` are filled.
    fn panel(&self, kb: usize, q: usize) -> &'a [u32] {
        let len = KC / 2 * NR;
        &self.panels[(kb * self.n.div_ceil(NR) + q) * len..][..len]
    }

    /// A `k x n` right-hand side packed before for `kernel` (by [`PackedB::pack`]) into
    /// `panels`.
    pub fn view(kernel: Kernel, k: usize, n: usize, panels: &'a [u32]) -> Self {
        assert_eq!(panels.len(), packed_len(k, n), "packed rhs of {k}x{n}");
        Self { kernel, k, n, panels }
    }
}

/// The B panel of columns `j..j + NR` over K values `p0..p0 + KC` of `b` (`k x n`) into `out`
/// (missing columns, an odd last k and the kernel's padding are zeros).
fn b_panel(kernel: Kernel, out: &mut [u32], b: Mat, k: usize, n: usize, p0: usize, j: usize) {
    let kc = KC.min(k - p0);
    // Line l of the panel is column j + l of B.
    let src = Mat {
        data: &b.data[p0 * b.rs + j * b.cs..],
        rs: b.cs,
        cs: b.rs,
    };
    pack(Order::PairMajor, out, NR, kernel.stride(kc), src, NR.min(n - j), kc);
}

/// Every panel of the k-block from K value `p0` of `b` (`k x n`, rows contiguous, `k` even
/// and `n` whole panels) into `out` (one panel of [`KC`] / 2 pairs every [`NR`] columns), as
/// [`b_panel`] packs them, one pair of B's rows at a time across all panels.
fn k_block_by_rows(kernel: Kernel, out: &mut [u32], b: Mat, k: usize, n: usize, p0: usize) {
    assert!(k.is_multiple_of(2) && n.is_multiple_of(NR) && b.cs == 1);
    let kc = KC.min(k - p0);
    let (pairs, stride) = (kc / 2, kernel.stride(kc));
    let row = |r: usize| &b.data[(p0 + r) * b.rs..][..n];
    for (p, (k0, k1)) in (0..pairs).map(|p| (p, (row(2 * p), row(2 * p + 1)))) {
        for (panel, (k0, k1)) in out
            .chunks_mut(KC / 2 * NR)
            .zip(k0.chunks_exact(NR).zip(k1.chunks_exact(NR)))
        {
            let done = pairs_across(k0, k1, &mut panel[p * NR..][..NR]);
            assert_eq!(done, NR);
        }
    }
    // As `pack`: the pairs past K (AMX's rows of 16 pairs) are zeros.
    for panel in out.chunks_mut(KC / 2 * NR) {
        panel[pairs * NR..stride * NR].fill(0);
    }
}

/// [`matmul`] with a right-hand side packed before.
pub fn matmul_packed(parallel: bool, m: usize, a: Lhs, b: &PackedB, mut out: Out) {
    let (kernel, n, k) = (b.kernel, b.n, b.k);
    if !super::gemm::dst_needs_product((m, n, k), &mut out) {
        return;
    }
    let Out {
        data: dst,
        rs: dst_rs,
        add: accumulate,
    } = out;
    if let Lhs::Mat(a) = a {
        a.check(m, k, "lhs");
    }
    let dst = &mut dst[..(m - 1) * dst_rs + n];
    let mr = kernel.rows();
    // Rows a task computes: up to MC, fewer when that leaves threads idle (4 tasks a thread).
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let task_rows = m.div_ceil(4 * threads).next_multiple_of(mr).clamp(mr, MC);
    // Row blocks of C: disjoint rows, so disjoint slices of dst.
    let rows_task = |(t, c): (usize, &mut [f32])| {
        let i0 = t * task_rows;
        let rows = task_rows.min(m - i0);
        let multiplier = kernel.start();
        with_buffer(&PACKED_A, task_rows * KC / 2, |apack| {
            for j0 in (0..n).step_by(NC) {
                for (kb, p0) in (0..k).step_by(KC).enumerate() {
                    let kc = KC.min(k - p0);
                    let stride = kernel.stride(kc);
                    let add = accumulate || p0 > 0;
                    pack_rows(kernel, apack, a, i0, rows, p0, kc);
                    for q in j0 / NR..(j0 + NC).min(n).div_ceil(NR) {
                        let j = q * NR;
                        let panel = &b.panel(kb, q)[..stride * NR];
                        for ir in (0..rows).step_by(mr) {
                            let ap = &apack[ir * KC / 2..][..mr * stride];
                            let tile = &mut c[ir * dst_rs + j..];
                            let tile = Tile {
                                data: tile,
                                rs: dst_rs,
                                rows: mr.min(rows - ir),
                                cols: NR.min(n - j),
                                add,
                            };
                            multiplier.product(kc, stride, (ap, panel), tile);
                        }
                    }
                }
            }
        })
    };
    let task_len = task_rows * dst_rs;
    if parallel {
        dst.par_chunks_mut(task_len).enumerate().for_each(rows_task);
    } else {
        dst.chunks_mut(task_len).enumerate().for_each(rows_task);
    }
}

/// [`matmul`] for fewer rows than a task's share and many columns (the deepest convolutions of a
/// small batch: `predict` on a few images, stage 4's 1x1 maps): split by rows, 8 rows make one
/// task on one thread, 32 rows four tasks that each stream all of B, the large operand. Here A
/// is packed once and shared, and each task packs and multiplies its own columns of B, read
/// once: 1.3-1.7x the row split for 1 to 32 rows (paired runs, 2 threads; at 64 rows it wins
/// on 512 columns and loses on 128, so it stops below 64). Each value of C sums its k-blocks
/// in the same order as the row split, so the two give the same bits.
fn matmul_by_columns(kernel: Kernel, (m, n, k): Dims, a: Mat, b: Mat, mut out: Out) {
    assert!(available(), "bf16 matmul on a CPU without AVX512_BF16");
    if !super::gemm::dst_needs_product((m, n, k), &mut out) {
        return;
    }
    let Out {
        data: dst,
        rs: dst_rs,
        add: accumulate,
    } = out;
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    let mr = kernel.rows();
    let block = m.next_multiple_of(mr) * KC / 2;
    let blocks = k.div_ceil(KC);
    let panels = n.div_ceil(NR);
    let task_cols = panels.div_ceil(2 * rayon::current_num_threads()) * NR;
    with_buffer(&WHOLE_A, blocks * block, |apack| {
        for (kb, p0) in (0..k).step_by(KC).enumerate() {
            pack_rows(
                kernel,
                &mut apack[kb * block..][..block],
                Lhs::Mat(a),
                0,
                m,
                p0,
                KC.min(k - p0),
            );
        }
        let apack = &*apack;
        let columns: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(task_cols))
            .into_par_iter()
            .map(|t| {
                let (j0, cols) = (t * task_cols, task_cols.min(n - t * task_cols));
                let mut c = vec![0f32; m * cols];
                if accumulate {
                    for (i, row) in c.chunks_exact_mut(cols).enumerate() {
                        row.copy_from_slice(&dst[i * dst_rs + j0..][..cols]);
                    }
                }
                let multiplier = kernel.start();
                with_buffer(&PACKED_A, KC / 2 * NR, |bpanel| {
                    for (kb, p0) in (0..k).step_by(KC).enumerate() {
                        let kc = KC.min(k - p0);
                        let stride = kernel.stride(kc);
                        let add = accumulate || p0 > 0;
                        for q in 0..cols.div_ceil(NR) {
                            let j = j0 + q * NR;
                            let width = NR.min(n - j);
                            b_panel(kernel, bpanel, b, k, n, p0, j);
                            for ir in (0..m).step_by(mr) {
                                let ap = &apack[kb * block + ir * KC / 2..][..mr * stride];
                                let tile = &mut c[ir * cols + q * NR..];
                                let tile = Tile {
                                    data: tile,
                                    rs: cols,
                                    rows: mr.min(m - ir),
                                    cols: width,
                                    add,
                                };
                                multiplier.product(kc, stride, (ap, bpanel), tile);
                            }
                        }
                    }
                });
                (j0, c)
            })
            .collect();
        for (j0, c) in columns {
            let cols = c.len() / m;
            for (i, row) in c.chunks_exact(cols).enumerate() {
                dst[i * dst_rs + j0..][..cols].copy_from_slice(row);
            }
        }
    })
}

/// The A panels of rows `i0..i0 + rows` over K values `p0..p0 + kc`, one panel of the
/// kernel's rows (lines `kernel.stride(kc)` pairs apart) per `KC / 2 * rows` values of
/// `apack`. A view whose rows lie side by side (a transposed matrix: the weight gradient's
/// patches) is converted and transposed 16 x 16 pairs at a time in registers.
fn pack_rows(kernel: Kernel, apack: &mut [u32], a: Lhs, i0: usize, rows: usize, p0: usize, kc: usize) {
    let (mr, stride) = (kernel.rows(), kernel.stride(kc));
    let panel_len = mr * KC / 2;
    let layout = PanelLayout {
        mr,
        stride,
        len: panel_len,
    };
    let a = match a {
        Lhs::Mat(a) => a,
        Lhs::Lines(lines) => return pack_lines(lines, apack, layout, (i0, rows), (p0, kc)),
    };
    if a.cs != 1 && a.rs == 1 {
        let at = i0 + p0 * a.cs;
        assert!(
            at + (kc - 1) * a.cs + rows <= a.data.len(),
            "lhs view beyond its buffer"
        );
        assert!(apack.len() >= rows.div_ceil(mr) * panel_len && stride <= KC / 2);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` checked the CPU; the source and the panels were checked above.
        unsafe {
            avx512::transposed_panels(a.data[at..].as_ptr(), a.cs, (rows, kc), apack.as_mut_ptr(), layout)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 matmul needs x86-64 with AVX512_BF16");
    } else {
        for ir in (0..rows).step_by(mr) {
            let i = i0 + ir;
            let ap = &mut apack[ir * KC / 2..][..mr * stride];
            let src = Mat {
                data: &a.data[i * a.rs + p0 * a.cs..],
                ..a
            };
            pack(Order::LineMajor, ap, mr, stride, src, mr.min(rows - ir), kc);
        }
    }
}

/// [`pack_rows`] for [`Lines`]: rows `i0..i0 + rows` over K values `p0..p0 + kc`, each row's
/// k-block written as f32 into a line on the stack, then converted to pairs; the panels'
/// missing rows and padding pairs are zeros.
fn pack_lines(
    lines: &dyn Lines,
    apack: &mut [u32],
    layout: PanelLayout,
    (i0, rows): (usize, usize),
    (p0, kc): (usize, usize),
) {
    let (mr, stride) = (layout.mr, layout.stride);
    let mut line = [0f32; KC];
    let pairs = kc.div_ceil(2);
    for ir in (0..rows).step_by(mr) {
        let panel = &mut apack[ir / mr * layout.len..][..mr * stride];
        for (l, out) in panel.chunks_exact_mut(stride).enumerate() {
            if ir + l < rows {
                lines.line(i0 + ir + l, p0, &mut line[..kc]);
                line_pairs(&line[..kc], &mut out[..pairs]);
                out[pairs..].fill(0);
            } else {
                out.fill(0);
            }
        }
    }
}

thread_local! {
    /// Packed operands, kept from product to product (a fresh allocation of megabytes per
    /// product costs page faults): B's panels on the calling thread, A's on each task's (in
    /// [`matmul_by_columns`], the task's one B panel).
    static PACKED_B: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static PACKED_A: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// All of A's panels, for [`matmul_by_columns`], on the calling thread.
    static WHOLE_A: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `f` on `len` values of this thread's `key` buffer (a fresh one if it is in use), starting
/// on a 64-byte line: a tile row (or a vector) that straddles two lines costs two loads. The
/// allocator's large blocks start 16 bytes into a page; aligned, the AMX paths of the cifar
/// stem ran 4% faster (bf16 inference 962-966 -> 1002-1010 img/s, 8x8x256 convolutions 18%).
fn with_buffer<R>(key: &'static LocalKey<RefCell<Vec<u32>>>, len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    const LINE: usize = 64 / 4;
    let aligned = |buf: &mut Vec<u32>| {
        if buf.len() < len + LINE {
            buf.resize(len + LINE, 0);
        }
        let skip = buf.as_ptr().align_offset(64);
        f(&mut buf[skip..skip + len])
    };
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => aligned(&mut buf),
        Err(_) => aligned(&mut Vec::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounding: ties to even, carries into the exponent, signs and NaN.
    #[test]
    fn rounds_to_nearest_even() {
        let h = |bits: u32| round(f32::from_bits(bits));
        assert_eq!(h(0x3f80_0000), 0x3f80); // 1.0 exactly
        assert_eq!(h(0x3f80_8000), 0x3f80); // halfway, even below: down
        assert_eq!(h(0x3f81_8000), 0x3f82); // halfway, odd below: up
        assert_eq!(h(0x3f80_8001), 0x3f81); // above halfway: up
        assert_eq!(h(0x3fff_ffff), 0x4000); // carries into the exponent
        assert_eq!(h(0xbf80_8001), 0xbf81); // negative, above halfway
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(round(f32::INFINITY)), f32::INFINITY);
    }

    fn rng_values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against a float64 product of the same views, over the four layouts of the two operands,
    /// odd and even K across block edges, ragged tiles, a wider destination and accumulation.
    /// Bound per entry: each operand rounds by at most 2^-9 relative, so each product by about
    /// 2^-8, plus f32 summation: `(2^-8 + k 2^-23) sum |a||b|`.
    #[test]
    fn matches_float64_within_bf16_rounding() {
        for kernel in kernels() {
            products_match_float64(kernel);
        }
    }

    /// The kernels this CPU runs (those it lacks reported as skipped).
    fn kernels() -> Vec<Kernel> {
        crate::test_support::bf16_kernels()
    }

    fn products_match_float64(kernel: Kernel) {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 33, 5),
            (70, 40, 300),
            (9, 300, 513),
            (130, 64, 64),
            (33, 31, 17),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = rng_values(m * k, 1 + (m * k) as u32);
                let bv = rng_values(k * n, 7 + (k * n) as u32);
                let a = if ta { Mat::transposed(&av, m) } else { Mat::rows(&av, k) };
                let b = if tb { Mat::transposed(&bv, k) } else { Mat::rows(&bv, n) };
                let dst_rs = n + 3;
                let start = rng_values(m * dst_rs, 99);
                for accumulate in [false, true] {
                    for parallel in [false, true] {
                        let mut dst = start.clone();
                        matmul(
                            kernel,
                            parallel,
                            (m, n, k),
                            a,
                            b,
                            Out::adding(&mut dst, dst_rs, accumulate),
                        );
                        for i in 0..m {
                            for j in 0..dst_rs {
                                let got = dst[i * dst_rs + j] as f64;
                                if j >= n {
                                    assert_eq!(got, start[i * dst_rs + j] as f64, "outside the view");
                                    continue;
                                }
                                let (mut exact, mut size) = (0f64, 0f64);
                                for p in 0..k {
                                    let x = a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                                    exact += x;
                                    size += x.abs();
                                }
                                if accumulate {
                                    exact += start[i * dst_rs + j] as f64;
                                    size += start[i * dst_rs + j].abs() as f64;
                                }
                                let bound = (2f64.powi(-8) + k as f64 * 2f64.powi(-23)) * size + 1e-30;
                                assert!(
                                    (got - exact).abs() <= bound,
                                    "{kernel:?} [{m}x{k}]x[{k}x{n}] ta={ta} tb={tb} acc={accumulate} at ({i},{j}): {got} vs {exact} (bound {bound})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Few rows and many columns split by columns ([`matmul_by_columns`]): each value comes
    /// out as the row split computes it, bit for bit, for every layout.
    #[test]
    fn the_column_split_gives_the_row_split_bits() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        // Asked here: the pool's threads have no test's name to report a skip by.
        let kernels = kernels();
        pool.install(|| {
            for &kernel in &kernels {
                for &(m, n, k) in &[(9, 300, 513), (40, 200, 700), (63, 129, 257), (1, 128, 3)] {
                    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                        let av = rng_values(m * k, 3 + m as u32);
                        let bv = rng_values(k * n, 5 + n as u32);
                        let a = if ta { Mat::transposed(&av, m) } else { Mat::rows(&av, k) };
                        let b = if tb { Mat::transposed(&bv, k) } else { Mat::rows(&bv, n) };
                        let dst_rs = n + 5;
                        let start = rng_values(m * dst_rs, 11);
                        for accumulate in [false, true] {
                            let mut by_columns = start.clone();
                            matmul_by_columns(
                                kernel,
                                (m, n, k),
                                a,
                                b,
                                Out::adding(&mut by_columns, dst_rs, accumulate),
                            );
                            let mut panels = vec![0; packed_len(k, n)];
                            let packed = PackedB::pack(kernel, true, k, n, b, &mut panels);
                            let mut by_rows = start.clone();
                            matmul_packed(
                                true,
                                m,
                                Lhs::Mat(a),
                                &packed,
                                Out::adding(&mut by_rows, dst_rs, accumulate),
                            );
                            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&by_columns),
                                bits(&by_rows),
                                "{kernel:?} {m}x{n}x{k} ta={ta} tb={tb} acc={accumulate}"
                            );
                        }
                    }
                }
            }
        });
    }

    /// The products are bf16's, not f32's: operands that bf16 cannot hold give a result that
    /// differs from the f32 product by what their rounding predicts (so the path is really
    /// taken), and equals the product of the rounded operands exactly (sums of few terms).
    #[test]
    fn multiplies_the_rounded_operands() {
        let a = [1.0f32 + 2f32.powi(-10), 3.0];
        let b = [1.0f32, 1.0 + 2f32.powi(-9) + 2f32.powi(-12)];
        let rounded: f32 = a.iter().zip(&b).map(|(&x, &y)| widen(round(x)) * widen(round(y))).sum();
        for kernel in kernels() {
            let mut dst = [0f32];
            matmul(
                kernel,
                false,
                (1, 1, 2),
                Mat::rows(&a, 2),
                Mat::rows(&b, 1),
                Out::new(&mut dst, 1),
            );
            assert_eq!(dst[0], rounded, "{kernel:?}");
            assert_ne!(dst[0], a[0] * b[0] + a[1] * b[1], "{kernel:?}");
        }
    }
}
