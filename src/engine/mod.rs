//! The compute engine: the [`Backend`] trait every kernel sits behind (the sum of the op traits
//! in [`ops`]), and the geometry types the kernels take. Activations are NHWC (channels last), so a batch of images is a row-major matrix
//! `[n*h*w, c]`: convolutions become matrix multiplies over contiguous channel runs, and batch
//! norm reduces over rows. Each backend picks its conv weight layout ([`Layout`]: HWIO on the CPU,
//! OHWI for cuDNN); `nn::Param` converts to and from PyTorch's OIHW at the state_dict boundary.
//!
//! A backend owns its memory type (`Buf`). Every op takes explicit shapes and writes into
//! caller-owned buffers, so the model decides the memory plan and a buffer can be larger than the
//! op's view of it (buffers are sized for the largest batch seen and reused for smaller ones).

pub mod cpu;
pub mod cuda;

pub mod augment;
pub mod collective;
pub mod layout;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod ops;

pub use augment::CropPlan;
pub use collective::{Collective, Local, StatsSum};
pub use ops::{
    BatchNormEval, BatchNormSaved, BatchNormTrain, BatchOps, ConvBnEval, ConvOp, ConvOps, Epilogue, FusedOps,
    GradSlots, LinearDims, LinearOps, LossOps, Memory, NormOps, OptimOps, ParamStep, PointwiseOps, PoolOps, Targets,
};

/// The op traits, for code that calls a concrete backend's ops (`Cpu`, `Cuda`): generic code
/// bound by `B: Backend` reaches them through the bound alone.
pub mod prelude {
    pub use super::Backend;
    pub use super::ops::{
        BatchOps, ConvOps, FusedOps, LinearOps, LossOps, Memory, NormOps, OptimOps, PointwiseOps, PoolOps,
    };
}
pub use layout::Layout;

/// Sums per-channel host values over the ranks of a data-parallel run, in place on every rank:
/// what a synchronised batch norm (PyTorch's SyncBatchNorm) exchanges, per-channel sums and the
/// row count in its forward pass, the two gradient sums and the count in its backward pass.
/// `None`: each rank normalises over its own slice of the batch (PyTorch DDP's default).
pub type SyncStats<'a> = Option<&'a dyn Fn(&mut [f64])>;

/// Shape of a 4-D activation, always stored NHWC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape4 {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Shape4 {
    pub const fn new(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self { n, h, w, c }
    }
    pub const fn numel(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
    /// Rows of the `[n*h*w, c]` matrix view.
    pub const fn rows(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// A 2-D convolution without bias: input `x` NHWC, weight in the backend's
/// [`ConvOps::conv_weight_layout`], output NHWC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeom {
    pub input: Shape4,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.input.h + 2 * self.pad - self.kh) / self.stride + 1,
            (self.input.w + 2 * self.pad - self.kw) / self.stride + 1,
        )
    }
    pub fn output(&self) -> Shape4 {
        let (oh, ow) = self.out_hw();
        Shape4::new(self.input.n, oh, ow, self.cout)
    }
    /// Length of one im2col row: kh * kw * cin.
    pub fn patch_len(&self) -> usize {
        self.kh * self.kw * self.input.c
    }
    pub fn weight_len(&self) -> usize {
        self.cout * self.patch_len()
    }
}

/// A max-pool window (square kernel, PyTorch semantics: padding never wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolGeom {
    pub input: Shape4,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl PoolGeom {
    pub fn output(&self) -> Shape4 {
        let o = |s: usize| (s + 2 * self.pad - self.k) / self.stride + 1;
        Shape4::new(self.input.n, o(self.input.h), o(self.input.w), self.input.c)
    }
}

/// Hyper-parameters of one Adam step, PyTorch's definition (L2 weight decay added to the gradient).
/// Held in f64 as Python holds them; kernels derive their f32 constants from these.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step count, for bias correction.
    pub step: u64,
}

/// Hyper-parameters of one SGD step, PyTorch's definition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// True on the first step: PyTorch then sets the momentum buffer to the gradient itself.
    pub first: bool,
}

/// Every kernel a model needs: the sum of the op traits ([`ops`]). Implemented by the CPU and
/// the CUDA backends; a model never touches memory except through it.
pub trait Backend:
    Memory + ConvOps + NormOps + PointwiseOps + PoolOps + LinearOps + LossOps + OptimOps + FusedOps + BatchOps
{
}

impl<T> Backend for T where
    T: Memory + ConvOps + NormOps + PointwiseOps + PoolOps + LinearOps + LossOps + OptimOps + FusedOps + BatchOps
{
}

/// Grows `buf` to hold at least `len` values; keeps it when it is already large enough, so a
/// buffer is allocated once for the largest batch and reused.
pub fn ensure_len<B: Backend>(backend: &B, buf: &mut B::Buf, len: usize) {
    if backend.buf_len(buf) < len {
        *buf = backend.alloc(len);
    }
}

/// Reorders a PyTorch-layout `[n, c, h, w]` batch into the engine's NHWC layout.
pub fn nchw_to_nhwc(x: &[f32], s: Shape4) -> Vec<f32> {
    let mut out = vec![0.0; s.numel()];
    for n in 0..s.n {
        for c in 0..s.c {
            for p in 0..s.h * s.w {
                out[(n * s.h * s.w + p) * s.c + c] = x[(n * s.c + c) * s.h * s.w + p];
            }
        }
    }
    out
}
