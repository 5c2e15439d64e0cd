//! The AMX tile kernel (Intel Sapphire Rapids and later). `tdpbf16ps` multiplies a 16 x 32
//! bf16 tile by a 32 x 16 one into a 16 x 16 f32 tile: 8,192 multiply-adds an instruction
//! (`vdpbf16ps` on 512 bits: 32); one core of our Xeon ran 1.6-1.75 TFLOP/s on products of
//! tiles already loaded, 420-575 GFLOP/s with this kernel's loads. Its right-hand tile is 16 rows of k-pairs, each row 16
//! columns' pairs: the layout of our B panels, so they load as they are packed. A panels are
//! our line-major ones, 32 rows a panel and their pairs padded to a multiple of 16 with zeros
//! (a tile row holds 16 pairs).
//!
//! Rust's AMX intrinsics are unstable, so the five instructions are written with `asm!`
//! (stable). Linux hands the tile registers to a process only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), made once by [`available`].

use super::NR;
use super::avx512::store_tile;
use std::arch::asm;
use std::arch::x86_64::*;

/// Rows of A in one tile product: two A tiles by two B tiles make a 32 x 32 block of C in
/// four accumulator tiles (tmm0-3), with the operands in tmm4-7: all eight tiles.
pub const ROWS: usize = 32;
/// K-pairs one tile row holds (64 bytes): A lines and B panels are padded to a multiple.
pub const PAIRS: usize = 16;

/// Whether this CPU has AMX-TILE and AMX-BF16 and the OS lets this process use them (asked
/// once: the permission, once granted, holds for every thread of the process).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let leaf = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = ((leaf.edx >> 22) & 1 == 1, (leaf.edx >> 24) & 1 == 1);
        amx_bf16 && amx_tile && request_tiles()
    })
}

#[cfg(target_os = "linux")]
fn request_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tiles() -> bool {
    false
}

/// `ldtilecfg`'s 64-byte operand (palette 1).
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// The eight tiles configured on this thread (16 rows of 64 bytes each) while it lives; dropped,
/// it releases them (`tilerelease`), so that a thread that is done with AMX does not carry
/// its 8 KiB of state through context switches.
pub struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Configures the tiles (panics where [`available`] says no: the instructions would fault).
    pub fn configure() -> Self {
        assert!(available(), "AMX tiles on a CPU or OS without them");
        let mut config = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        config.bytes_per_row[..8].fill(64);
        config.rows[..8].fill(16);
        // SAFETY: a valid palette-1 configuration (8 tiles, each within 16 x 64 bytes); the
        // process has the tile permission ([`available`], asserted above).
        unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
        Self(std::marker::PhantomData)
    }

    /// `c[mr, nr] (+)= a b` over `pairs` k-pairs (a multiple of [`PAIRS`]): `a` is a
    /// [`ROWS`]-line panel, lines `stride` pairs apart; `b` a panel of `pairs` rows of [`NR`]
    /// columns; `c` a tile of row stride `c_rs`.
    ///
    /// # Safety
    /// `a` holds `(ROWS - 1) * stride + pairs` pairs, `b` `pairs * NR`, and `c` an `mr x nr`
    /// tile (`mr <= ROWS`, `nr <= NR`) with row stride `c_rs`.
    pub(super) unsafe fn product(&self, panels: super::RawPanels, tile: super::RawTile) {
        let super::RawPanels { a, b, pairs, stride } = panels;
        let super::RawTile {
            c,
            rs: c_rs,
            rows: mr,
            cols: nr,
            add,
        } = tile;
        assert!(pairs.is_multiple_of(PAIRS));
        // Every value of the block is written by the tile stores before it is read.
        let mut block = std::mem::MaybeUninit::<Block>::uninit();
        let out = block.as_mut_ptr() as *mut f32;
        // SAFETY: the tiles are configured (`self`); the caller vouches for the panels (each
        // step's A: 32 lines of 16 pairs, `stride` pairs apart; B: 16 rows of NR pairs) and
        // for C; the CPU has AVX512F (AMX CPUs do).
        unsafe {
            let steps = (0..pairs)
                .step_by(PAIRS)
                .map(|kp| (a.add(kp) as *const u8, b.add(kp * NR)));
            let a_rs = stride * 4;
            let block_out = BlockOut {
                top: out,
                bottom: out.wrapping_add(16 * NR),
                rs: NR * 4,
                add: false,
            };
            self.sum_into(steps, a_rs, 16 * a_rs, NR * 4, block_out);
            store_block(out, c, c_rs, mr, nr, add)
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releases this thread's tile state; no tile is in use after this.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// C's 32 x 32 block as the tiles leave it (row-major), for the write into C.
#[repr(C, align(64))]
pub struct Block(pub [f32; ROWS * NR]);

/// Where [`Tiles::sum_into`] writes a 32 x 32 block of sums: its top 16 rows of 32 f32 from
/// `top`, its bottom 16 from `bottom`, rows `rs` bytes apart; with `add`, added to what is
/// there.
#[derive(Clone, Copy)]
pub struct BlockOut {
    pub top: *mut f32,
    pub bottom: *mut f32,
    pub rs: usize,
    pub add: bool,
}

impl Tiles {
    /// `C (+)= sum over steps s of a_s b_s` on a 32 x 32 f32 block of C, as one run of
    /// products (`add`: starting from C's values, else from zeros): each step a 32-row by
    /// 16-pair left-hand side at `a_s`, its rows `a_rs` bytes apart (any stride: rows of an
    /// image read where they lie) and its second 16-row half `a_gap` bytes on (it need not
    /// follow the first), and 16 pair rows of [`NR`] columns at `b_s`, `b_rs` bytes apart. The
    /// block's two halves of 16 rows of 32 values are written (with `out.add`, also read)
    /// where they belong ([`BlockOut`]). tmm0: rows 0-15 x
    /// columns 0-15, tmm1: rows 0-15 x 16-31, tmm2: rows 16-31 x 0-15, tmm3: rows 16-31 x
    /// 16-31; tmm4/5: A's two row halves, tmm6/7: B's two column halves. The loads sit between
    /// the products: tiles are not renamed, so a load into a tile waits for the products
    /// reading it.
    ///
    /// # Safety
    /// Every `a_s` and `a_s + a_gap` points at 16 rows of 64 readable bytes, `a_rs` bytes
    /// apart, and every `b_s` at 16 rows of `NR` readable pairs, `b_rs` bytes apart; `out.top`
    /// and `out.bottom` each point at 16 rows of 32 writable f32 (read too with `add`),
    /// `out.rs` bytes apart.
    pub unsafe fn sum_into(
        &self,
        steps: impl Iterator<Item = (*const u8, *const u32)>,
        a_rs: usize,
        a_gap: usize,
        b_rs: usize,
        out: BlockOut,
    ) {
        let BlockOut {
            top,
            bottom,
            rs: c_rs,
            add,
        } = out;
        let (c0, c1, c2, c3) = (top, top.wrapping_add(16), bottom, bottom.wrapping_add(16));
        unsafe {
            if add {
                asm!(
                    "tileloadd tmm0, [{c0} + {s} * 1]",
                    "tileloadd tmm1, [{c1} + {s} * 1]",
                    "tileloadd tmm2, [{c2} + {s} * 1]",
                    "tileloadd tmm3, [{c3} + {s} * 1]",
                    c0 = in(reg) c0,
                    c1 = in(reg) c1,
                    c2 = in(reg) c2,
                    c3 = in(reg) c3,
                    s = in(reg) c_rs,
                    options(nostack, readonly)
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            for (a, b) in steps {
                asm!(
                    "tileloadd tmm4, [{a0} + {sa} * 1]",
                    "tileloadd tmm6, [{b0} + {sb} * 1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb} * 1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa} * 1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a,
                    a1 = in(reg) a.add(a_gap),
                    b0 = in(reg) b,
                    b1 = in(reg) b.add(16),
                    sa = in(reg) a_rs,
                    sb = in(reg) b_rs,
                    options(nostack, readonly)
                );
            }
            asm!(
                "tilestored [{c0} + {s} * 1], tmm0",
                "tilestored [{c1} + {s} * 1], tmm1",
                "tilestored [{c2} + {s} * 1], tmm2",
                "tilestored [{c3} + {s} * 1], tmm3",
                c0 = in(reg) c0,
                c1 = in(reg) c1,
                c2 = in(reg) c2,
                c3 = in(reg) c3,
                s = in(reg) c_rs,
                options(nostack)
            );
        }
    }
}

/// Writes (or with `add`, adds) rows `0..mr`, columns `0..nr` of the 32 x 32 block at `block`
/// into C.
///
/// # Safety
/// The CPU has AVX512F; `block` holds the block and `c` an `mr x nr` tile with row stride
/// `c_rs`.
#[target_feature(enable = "avx512f")]
unsafe fn store_block(block: *const f32, c: *mut f32, c_rs: usize, mr: usize, nr: usize, add: bool) {
    // SAFETY: as the caller promised.
    unsafe {
        store_tile(c, c_rs, mr, nr, add, |i| {
            (
                _mm512_loadu_ps(block.add(i * NR)),
                _mm512_loadu_ps(block.add(i * NR + 16)),
            )
        })
    }
}
