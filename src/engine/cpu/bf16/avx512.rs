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

/// The 16 pairs `(lo[j], hi[j])`, each rounded to bf16, as 16 lanes of 32 bits.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
fn interleaved(lo: __m512, hi: __m512) -> __m512i {
    // bf16 lane 2j takes lane j (from lo), lane 2j + 1 lane 16 + j (from hi).
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    _mm512_permutexvar_epi16(idx, bits(_mm512_cvtne2ps_pbh(hi, lo)))
}

/// `blocks` x 16 pairs `(k0[j], k1[j])` to `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
///
/// # Safety
/// The CPU has AVX512F, AVX512BW and AVX512_BF16; each pointer holds `16 * blocks` values.
pub unsafe fn pairs_across(k0: *const f32, k1: *const f32, out: *mut u32, blocks: usize) {
    for t in 0..blocks {
        // SAFETY: the caller holds `blocks` blocks of all three.
        unsafe {
            let v = interleaved(_mm512_loadu_ps(k0.add(16 * t)), _mm512_loadu_ps(k1.add(16 * t)));
            _mm512_storeu_si512(out.add(16 * t) as *mut __m512i, v);
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
pub(super) unsafe fn tile_product(panels: super::RawPanels, tile: super::RawTile) {
    let super::RawPanels { a, b, pairs, stride } = panels;
    let super::RawTile {
        c,
        rs: c_rs,
        rows: mr,
        cols: nr,
        add,
    } = tile;
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

/// A panels from a view whose rows lie side by side (a transposed matrix): value (row l, k) at
/// `src[l + k * cs]`, rows `0..rows`, K values `0..kc`. Line `l` of the packed rows (rows
/// rounded up to `mr`; the extra lines zeros) goes to `out[(l / mr) * panel_len + (l % mr) *
/// stride..]` (`layout`'s): `stride` pairs, those beyond K zeros. Each block of 16 lines x 16 pairs is
/// converted as in `pairs_across` (a vector holds one pair of 16 lines) and transposed in
/// registers into 16 line vectors.
///
/// # Safety
/// The CPU has AVX512F, AVX512BW and AVX512_BF16; `src` holds `(kc - 1) * cs + rows` values;
/// `out` holds every line written, `(rows.next_multiple_of(mr) / mr) * panel_len` values with
/// `(mr - 1) * stride + stride <= panel_len`; `stride >= kc.div_ceil(2)`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn transposed_panels(
    src: *const f32,
    cs: usize,
    (rows, kc): (usize, usize),
    out: *mut u32,
    layout: super::PanelLayout,
) {
    let super::PanelLayout {
        mr,
        stride,
        len: panel_len,
    } = layout;
    let pairs = kc.div_ceil(2);
    let lines = rows.next_multiple_of(mr);
    for lg in (0..lines).step_by(16) {
        let valid = rows.saturating_sub(lg).min(16);
        let lmask = ((1u32 << valid) - 1) as __mmask16;
        for pg in (0..stride).step_by(16) {
            let mut v = [_mm512_setzero_si512(); 16];
            for (r, v) in v.iter_mut().enumerate() {
                let p = pg + r;
                if p >= pairs {
                    break;
                }
                // SAFETY (whole function): as the caller promised; masked-off lanes are not read.
                unsafe {
                    let lo = _mm512_maskz_loadu_ps(lmask, src.add(2 * p * cs + lg));
                    let hi = if 2 * p + 1 < kc {
                        _mm512_maskz_loadu_ps(lmask, src.add((2 * p + 1) * cs + lg))
                    } else {
                        _mm512_setzero_ps()
                    };
                    *v = interleaved(lo, hi);
                }
            }
            transpose16(&mut v);
            let smask = ((1u32 << (stride - pg).min(16)) - 1) as __mmask16;
            for (j, v) in v.iter().enumerate().take((lines - lg).min(16)) {
                let l = lg + j;
                unsafe {
                    _mm512_mask_storeu_epi32(
                        out.add((l / mr) * panel_len + (l % mr) * stride + pg) as *mut i32,
                        smask,
                        *v,
                    )
                };
            }
        }
    }
}

/// 16 channels of 32 pixels, transposed into pairs of pixels: `out[c * out_rs + j] =
/// (pixel 2j's channel c, pixel 2j + 1's)` for c, j in 0..16, pixel p's 16 channels read at
/// `pixels[p]`, or zeros where that is null.
///
/// # Safety
/// The CPU has AVX512F, AVX512BW and AVX512_BF16; every non-null pointer holds 16 values;
/// `out` holds `15 * out_rs + 16` pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn transposed_pairs(pixels: &[*const f32; 32], out: *mut u32, out_rs: usize) {
    let load = |p: *const f32| {
        if p.is_null() {
            _mm512_setzero_ps()
        } else {
            // SAFETY: as the caller promised.
            unsafe { _mm512_loadu_ps(p) }
        }
    };
    let mut v: [__m512i; 16] = std::array::from_fn(|j| interleaved(load(pixels[2 * j]), load(pixels[2 * j + 1])));
    transpose16(&mut v);
    for (c, v) in v.iter().enumerate() {
        // SAFETY: as the caller promised.
        unsafe { _mm512_storeu_si512(out.add(c * out_rs) as *mut __m512i, *v) };
    }
}

/// Transposes a 16 x 16 block of 32-bit values held as 16 row vectors: afterwards `v[c]` holds
/// column c. Within each 128-bit lane 4 x 4 blocks transpose by unpacking (32-, then 64-bit),
/// then lanes are exchanged twice.
#[target_feature(enable = "avx512f")]
fn transpose16(v: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    // v[4i + c], lane L: rows 4i..4i + 4 of column 4L + c.
    for i in 0..4 {
        v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for i in 0..2 {
        for j in 0..4 {
            t[8 * i + j] = _mm512_shuffle_i32x4::<0x88>(v[8 * i + j], v[8 * i + j + 4]);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4::<0xdd>(v[8 * i + j], v[8 * i + j + 4]);
        }
    }
    for j in 0..8 {
        v[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[j + 8]);
        v[j + 8] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[j + 8]);
    }
}

/// Where [`affine_rows`] writes each row of 32 values: as f32, or as 16 bf16 pairs; the
/// pointer to the first row, and the rows' distance in values (f32 or pairs).
#[derive(Clone, Copy)]
pub enum RowsOut {
    Values(*mut f32, usize),
    Pairs(*mut u32, usize),
}

/// Eval mode's batch norm on the tiles' sums, [`crate::engine::cpu::batch_norm::Affine::row`]
/// step for step (so the same bits): `rows` rows of 32 sums (`sums`, 32 apart) each become
/// `(x - center) * scale + shift` (those three: 32 values each, one per column), plus the
/// row's residual (`(pointer, distance)` of the first row's 32 values, where there is one),
/// then `max(v, 0)` with `relu`, written to `out`. The per-column values stay in registers
/// across the rows, where a call a row reloaded them.
///
/// # Safety
/// The CPU has AVX512F and AVX512_BF16; every pointer holds its 32 values for each of the
/// `rows` rows at its distance (`out`'s 16 pairs for `Pairs`).
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn affine_rows(
    sums: *const f32,
    rows: usize,
    [center, scale, shift]: [*const f32; 3],
    residual: Option<(*const f32, usize)>,
    relu: bool,
    out: RowsOut,
) {
    // SAFETY (whole function): as the caller promised.
    unsafe {
        let load = |p: *const f32| (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let (c, s, h) = (load(center), load(scale), load(shift));
        let zero = _mm512_setzero_ps();
        for i in 0..rows {
            let x = load(sums.add(32 * i));
            let mut v = (
                _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(x.0, c.0), s.0), h.0),
                _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(x.1, c.1), s.1), h.1),
            );
            if let Some((r, rs)) = residual {
                let r = load(r.add(i * rs));
                v = (_mm512_add_ps(v.0, r.0), _mm512_add_ps(v.1, r.1));
            }
            if relu {
                // vmaxps(v, 0) turns NaN into 0; PyTorch's ReLU keeps it (see `relu`).
                let keep = |v| _mm512_mask_mov_ps(_mm512_max_ps(v, zero), _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), v);
                v = (keep(v.0), keep(v.1));
            }
            match out {
                RowsOut::Values(p, rs) => {
                    _mm512_storeu_ps(p.add(i * rs), v.0);
                    _mm512_storeu_ps(p.add(i * rs + 16), v.1);
                }
                RowsOut::Pairs(p, rs) => {
                    let pairs = bits(_mm512_cvtne2ps_pbh(v.1, v.0));
                    _mm512_storeu_si512(p.add(i * rs) as *mut __m512i, pairs);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::batch_norm::Affine;

    /// The fused batch norm's AVX-512 step gives the scalar step's bits, NaN, infinities and
    /// signed zeros included: NaN passes the ReLU (as in PyTorch), -0 leaves it as +0.
    #[test]
    fn affine_rows_match_the_scalar_step_nan_and_zeros_included() {
        if let Err(e) = crate::engine::cpu::bf16_support() {
            return crate::test_support::skip("bf16", "the AVX-512 batch-norm step", &e);
        }
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, -1.5, 2.5];
        let rows = 3;
        let sums: Vec<f32> = (0..32 * rows).map(|i| special[i % special.len()]).collect();
        let center: Vec<f32> = (0..32)
            .map(|c| if c % 5 == 0 { 0.0 } else { 0.25 * c as f32 })
            .collect();
        let scale: Vec<f32> = (0..32).map(|c| 1.0 + c as f32 / 8.0).collect();
        let shift: Vec<f32> = (0..32).map(|c| if c % 5 == 0 { 0.0 } else { -0.5 }).collect();
        let residual: Vec<f32> = (0..32 * rows).map(|i| special[(i + 3) % special.len()]).collect();
        for (with_residual, relu) in [(false, true), (true, true), (false, false)] {
            let affine = Affine {
                center: &center,
                scale: scale.clone(),
                shift: &shift,
                residual: with_residual.then_some(&residual[..]),
                relu,
            };
            let mut want = vec![0f32; sums.len()];
            affine.apply(rows, &sums, &mut want);
            let mut got = vec![1f32; sums.len()];
            // SAFETY: the CPU has the instructions (checked above); every row holds 32 values.
            unsafe {
                affine_rows(
                    sums.as_ptr(),
                    rows,
                    [center.as_ptr(), affine.scale.as_ptr(), shift.as_ptr()],
                    with_residual.then_some((residual.as_ptr(), 32)),
                    relu,
                    RowsOut::Values(got.as_mut_ptr(), 32),
                )
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "residual {with_residual} relu {relu}");
            assert!(want.iter().any(|v| v.is_nan()), "NaN passes");
        }
    }
}
