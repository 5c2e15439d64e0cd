//! The AVX512_BF16 parts: f32 -> bf16 pair conversion for packing, and the `vdpbf16ps` register
//! tile.

use super::NR;
use std::arch::x86_64::*;

/// 32 bf16 values seen as 16 pairs of 32 bits (the same 512 bits).
#[inline(always)]
fn bits(v: __m512bh) -> __m512i {
    // SAFETY: both are plain 512-bit vectors.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(v) }
}

/// 16 pairs of 32 bits seen as 32 bf16 values.
#[inline(always)]
fn pairs_of(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 512-bit vectors.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// `blocks` x 32 floats from `src` to as many x 16 pairs at `out`.
#[target_feature(enable = "avx512f,avx512bf16")]
///
/// # Safety
/// The CPU has AVX512F and AVX512_BF16; `src` holds `32 * blocks` values, `out` `16 * blocks`.
pub unsafe fn adjacent_pairs(src: *const f32, out: *mut u32, blocks: usize) {
    for t in 0..blocks {
        // SAFETY: the caller holds `blocks` blocks of both.
        unsafe {
            let lo = _mm512_loadu_ps(src.add(32 * t));
            let hi = _mm512_loadu_ps(src.add(32 * t + 16));
            // bf16 lanes 0-15 from `lo`, 16-31 from `hi`: the values in order, so each
            // 32-bit lane holds one adjacent pair.
            let v = bits(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.add(16 * t) as *mut __m512i, v);
        }
    }
}

/// `blocks` x 16 pairs `(k0[j], k1[j])` to `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
///
/// # Safety
/// The CPU has AVX512F, AVX512BW and AVX512_BF16; each pointer holds `16 * blocks` values.
pub unsafe fn pairs_across(k0: *const f32, k1: *const f32, out: *mut u32, blocks: usize) {
    // bf16 lane 2j takes lane j (from k0), lane 2j + 1 lane 16 + j (from k1).
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    for t in 0..blocks {
        // SAFETY: the caller holds `blocks` blocks of all three.
        unsafe {
            let a = _mm512_loadu_ps(k0.add(16 * t));
            let b = _mm512_loadu_ps(k1.add(16 * t));
            let v = bits(_mm512_cvtne2ps_pbh(b, a));
            _mm512_storeu_si512(out.add(16 * t) as *mut __m512i, _mm512_permutexvar_epi16(idx, v));
        }
    }
}

/// Rows of A in one register tile: 8 x 32 f32 accumulators, 16 of the 32 vector registers.
pub const ROWS: usize = 8;

/// One register tile: `c[mr, nr] (+)= a b` over `pairs` k-pairs, A's 8 lines `stride` pairs
/// apart, B's pairs `NR` columns apart.
///
/// # Safety
/// The CPU has AVX512F and AVX512_BF16; `a` holds `(ROWS - 1) * stride + pairs` pairs, `b`
/// `pairs * NR`, and `c` an `mr x nr` tile with row stride `c_rs`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_product(
    pairs: usize,
    stride: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    for p in 0..pairs {
        // SAFETY (whole function): as the caller promised.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_si512(b.add(p * NR) as *const __m512i),
                _mm512_loadu_si512(b.add(p * NR + 16) as *const __m512i),
            )
        };
        let (b0, b1) = (pairs_of(b0), pairs_of(b1));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = pairs_of(_mm512_set1_epi32(unsafe { *a.add(i * stride + p) } as i32));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    // SAFETY: as the caller promised.
    unsafe { store_tile(c, c_rs, mr, nr, add, |i| (acc[i][0], acc[i][1])) }
}

/// Writes (or with `add`, adds) rows `0..mr` of a 32-column tile, `row(i)` giving row i's two
/// vectors, into the first `nr` columns of `c` (row stride `c_rs`).
///
/// # Safety
/// The CPU has AVX512F, and `c` holds an `mr x nr` tile with row stride `c_rs`.
#[target_feature(enable = "avx512f")]
pub unsafe fn store_tile(
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    add: bool,
    row: impl Fn(usize) -> (__m512, __m512),
) {
    let mask = |from: usize| -> __mmask16 {
        let cols = nr.saturating_sub(from).min(16);
        ((1u32 << cols) - 1) as __mmask16
    };
    let (m0, m1) = (mask(0), mask(16));
    for i in 0..mr {
        // SAFETY: as the caller promised.
        unsafe {
            let p = c.add(i * c_rs);
            let (mut v0, mut v1) = row(i);
            if add {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.add(16)));
            }
            _mm512_mask_storeu_ps(p, m0, v0);
            _mm512_mask_storeu_ps(p.add(16), m1, v1);
        }
    }
}
