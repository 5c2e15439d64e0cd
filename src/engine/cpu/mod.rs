//! The CPU backend: buffers are `Vec<f32>`, kernels are plain Rust over slices, matrix multiply
//! comes from the `gemm` crate and threads from rayon's pool (sized with `--threads`).

mod batch_norm;
mod bf16;
mod conv;
mod gelu;
mod gemm;
mod linear;
mod loss;
mod ops;
mod optim;
mod pool;
mod wide;
mod winograd;

pub use bf16::Kernel as Bf16Kernel;
pub use conv::{ConvPath, ConvPlan};
use gemm::Operands;

/// The arithmetic of the CPU's convolutions and linear layer (`--precision`): f32, or bf16
/// operands with f32 sums (PyTorch's CPU autocast for these layers). Batch norm, the loss and
/// the optimizer stay f32, and so do the weights (rounded only as operands).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuPrecision {
    #[default]
    Fp32,
    Bf16,
}

crate::named::choices!(CpuPrecision, "precision", {
    Fp32 => "fp32",
    Bf16 => "bf16",
});

/// Which tile products multiply bf16 operands (`--cpu-kernel`): the fastest this CPU has, or
/// one named (to compare them, or to keep to one across machines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuKernel {
    #[default]
    Auto,
    Amx,
    Avx512,
}

crate::named::choices!(CpuKernel, "CPU kernel", {
    Auto => "auto",
    Amx => "amx",
    Avx512 => "avx512",
});

/// How the CPU backend computes, fixed when it is made ([`Cpu::new`]) from the command's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuConfig {
    pub precision: CpuPrecision,
    /// bf16's kernel (fp32 ignores it).
    pub kernel: CpuKernel,
    /// Whether 3x3 convolutions may take Winograd's path (`--winograd`): faster, with larger
    /// rounding errors, which training can amplify (docs/seed-vs-pytorch.md).
    pub winograd: bool,
}

impl Default for CpuConfig {
    fn default() -> Self {
        Self {
            precision: CpuPrecision::Fp32,
            kernel: CpuKernel::Auto,
            winograd: true,
        }
    }
}

/// The CPU backend: buffers are `Vec<f32>`; what its products take and which paths its
/// convolutions may follow are values fixed when it is made, read by each layer's plan.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    ops: Operands,
    winograd: bool,
}

impl Default for Cpu {
    /// fp32, Winograd allowed: [`CpuConfig::default`].
    fn default() -> Self {
        Self {
            ops: Operands::F32,
            winograd: true,
        }
    }
}

impl Cpu {
    /// The backend `config` describes, or why this CPU cannot compute it (bf16 without
    /// AVX512_BF16, AMX asked for without the tiles).
    pub fn new(config: CpuConfig) -> Result<Self, String> {
        let ops = match config.precision {
            CpuPrecision::Fp32 => Operands::F32,
            CpuPrecision::Bf16 => {
                bf16_support()?;
                Operands::Bf16(match config.kernel {
                    CpuKernel::Auto => Bf16Kernel::best_available().expect("bf16 support checked"),
                    CpuKernel::Avx512 => Bf16Kernel::Avx512,
                    CpuKernel::Amx if Bf16Kernel::amx_available() => Bf16Kernel::Amx,
                    CpuKernel::Amx => return Err("this CPU (or its OS) has no AMX-BF16 tiles".into()),
                })
            }
        };
        Ok(Self {
            ops,
            winograd: config.winograd,
        })
    }

    /// The backend computing with bf16 operands on `kernel` (the CPU must have it), Winograd
    /// allowed.
    pub fn bf16(kernel: Bf16Kernel) -> Self {
        assert!(bf16::available(), "bf16 operands on a CPU without AVX512_BF16");
        assert!(
            kernel != Bf16Kernel::Amx || Bf16Kernel::amx_available(),
            "AMX on a CPU without"
        );
        Self {
            ops: Operands::Bf16(kernel),
            winograd: true,
        }
    }

    /// The configuration this backend computes by, its kernel resolved.
    pub fn config(&self) -> CpuConfig {
        let (precision, kernel) = match self.ops {
            Operands::F32 => (CpuPrecision::Fp32, CpuKernel::Auto),
            Operands::Bf16(Bf16Kernel::Amx) => (CpuPrecision::Bf16, CpuKernel::Amx),
            Operands::Bf16(Bf16Kernel::Avx512) => (CpuPrecision::Bf16, CpuKernel::Avx512),
        };
        CpuConfig {
            precision,
            kernel,
            winograd: self.winograd,
        }
    }
}

/// Whether this CPU can multiply bf16 operands (`--precision bf16`), or which instructions it
/// lacks.
pub fn bf16_support() -> Result<(), String> {
    let missing = bf16::missing_features();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "this CPU lacks {} (bf16 dot products need AVX512F, AVX512BW and AVX512_BF16: AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later)",
        missing.join(", ")
    ))
}
