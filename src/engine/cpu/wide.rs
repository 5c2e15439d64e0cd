//! Loops compiled twice: for the crate's baseline (AVX2 and FMA on x86-64) and for AVX-512,
//! taken where the CPU has it. The same operations run in the same order either way, so the
//! two give the same bits: only the vectors are twice as wide. For the loops whose time is
//! arithmetic (GELU, max-pool's forward comparisons); measured on airbench's network, batch
//! 1024, 2-core Zen 4: GELU forward on 23.6M values 20 -> 10 ms, backward 27 -> 13 ms; the
//! memory-bound ones (max-pool's backward, Winograd's transforms) gained nothing. (The whole
//! crate built for AVX-512 was no faster: its convolutions the same, GELU slower, as the
//! compiler then prefers 256-bit vectors; and a binary built so refuses older CPUs.)

/// Runs `f`, compiled with AVX-512 where this CPU has it (`f` is inlined into a function
/// compiled for it).
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, all that `avx512` is compiled to use.
        return unsafe { avx512(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
