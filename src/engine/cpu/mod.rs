//! The CPU backend: buffers are `Vec<f32>`, kernels are plain Rust over slices, matrix multiply
//! comes from the `gemm` crate and threads from rayon's pool (sized with `--threads`).

mod batch_norm;
mod bf16;
mod conv;
mod gemm;
mod linear;
mod loss;
mod optim;
mod pool;
mod winograd;

use super::{
    AdamStep, Backend, BatchNormEval, ConvBnEval, ConvGeom, ConvOp, CropPlan, DeviceBatches, Layout, PoolGeom, SgdStep,
    Shape4, SyncStats,
};
pub use bf16::Kernel as Bf16Kernel;
pub use conv::{ConvPath, ConvPlan};
use gemm::Operands;
use rayon::prelude::*;

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

/// The CPU's batches are built on the loader thread, ahead of the step, so there is nothing to
/// keep on a device.
impl DeviceBatches for Cpu {
    type Pixels = ();
    fn upload_pixels(&self, _bytes: &[u8]) -> Option<()> {
        None
    }
    fn crop_flip(&self, _pixels: &(), _plan: &CropPlan, _x: &mut Vec<f32>) {
        unreachable!("the CPU keeps no images on a device: its loader thread builds the batches")
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        let arith = match self.ops {
            Operands::F32 => "",
            Operands::Bf16(Bf16Kernel::Amx) => ", bf16 operands on AMX tiles",
            Operands::Bf16(Bf16Kernel::Avx512) => ", bf16 operands on AVX512_BF16",
        };
        let winograd = if self.winograd { "" } else { ", no Winograd" };
        match rayon::current_num_threads() {
            1 => format!("cpu (1 thread{arith}{winograd})"),
            n => format!("cpu ({n} threads{arith}{winograd})"),
        }
    }
    fn precision(&self) -> &'static str {
        self.config().precision.name()
    }
    fn alloc(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn upload(&self, src: &[f32], dst: &mut Vec<f32>) {
        dst[..src.len()].copy_from_slice(src);
    }
    fn download(&self, src: &Vec<f32>, dst: &mut [f32]) {
        dst.copy_from_slice(&src[..dst.len()]);
    }
    fn fill(&self, buf: &mut Vec<f32>, len: usize, value: f32) {
        buf[..len].fill(value);
    }
    fn host_mut<'b>(&self, buf: &'b mut Vec<f32>) -> Option<&'b mut [f32]> {
        Some(buf)
    }

    fn conv_weight_layout(&self) -> Layout {
        Layout::ConvHwio
    }
    type ConvPlan = ConvPlan;
    fn conv2d_plan(&self, g: &ConvGeom) -> ConvPlan {
        conv::plan(self.ops, self.winograd, g)
    }
    fn conv2d_workspace_len(&self, g: &ConvGeom, plan: &ConvPlan) -> usize {
        conv::workspace_len(plan, g)
    }
    fn conv2d_forward(&self, c: ConvOp<'_, Self>, x: &Vec<f32>, y: &mut Vec<f32>, ws: &mut Vec<f32>) {
        cpu_conv(c).forward(x, y, ws)
    }
    fn conv2d_bn_eval_forward(&self, layer: ConvBnEval<'_, Self>, x: &Vec<f32>, y: &mut Vec<f32>, ws: &mut Vec<f32>) {
        let affine = eval_affine(layer.conv.g, &layer.bn);
        cpu_conv(layer.conv).forward_then(x, &affine, layer.conv_out, y, ws)
    }
    fn conv2d_bn_eval_pair_forward(
        &self,
        first: ConvBnEval<'_, Self>,
        second: ConvBnEval<'_, Self>,
        x: &Vec<f32>,
        mid: &mut Vec<f32>,
        y: &mut Vec<f32>,
        ws: &mut Vec<f32>,
    ) {
        let (a, b) = (
            eval_affine(first.conv.g, &first.bn),
            eval_affine(second.conv.g, &second.bn),
        );
        let first = (cpu_conv(first.conv), &a, &mut first.conv_out[..]);
        let second = (cpu_conv(second.conv), &b, &mut second.conv_out[..]);
        conv::forward_pair(first, second, x, mid, y, ws)
    }
    fn conv2d_backward(
        &self,
        c: ConvOp<'_, Self>,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        grads: &mut Vec<f32>,
        dw_at: usize,
        ws: &mut Vec<f32>,
    ) {
        let dw = &mut grads[dw_at..dw_at + c.g.weight_len()];
        cpu_conv(c).backward(x, dy, dx.map(|d| d.as_mut_slice()), dw, ws)
    }

    fn batch_norm_forward_train(
        &self,
        s: &Shape4,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        running_mean: &mut Vec<f32>,
        running_var: &mut Vec<f32>,
        momentum: f32,
        eps: f32,
        saved: &mut Vec<f32>,
        residual: Option<&Vec<f32>>,
        relu: bool,
        y: &mut Vec<f32>,
        sync: SyncStats<'_>,
    ) {
        batch_norm::forward_train(
            s.rows(),
            s.c,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            saved,
            residual.map(|r| r.as_slice()),
            relu,
            y,
            sync,
        )
    }
    fn batch_norm_forward_eval(
        &self,
        s: &Shape4,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        running_mean: &Vec<f32>,
        running_var: &Vec<f32>,
        eps: f32,
        residual: Option<&Vec<f32>>,
        relu: bool,
        y: &mut Vec<f32>,
    ) {
        batch_norm::forward_eval(
            s.rows(),
            s.c,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            eps,
            residual.map(|r| r.as_slice()),
            relu,
            y,
        )
    }
    fn batch_norm_backward(
        &self,
        s: &Shape4,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        saved: &Vec<f32>,
        relu_out: Option<&Vec<f32>>,
        dy: &mut Vec<f32>,
        dx: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        dgamma_at: usize,
        dbeta_at: usize,
        sync: SyncStats<'_>,
    ) {
        let (dgamma, dbeta) = windows(grads, (dgamma_at, s.c), (dbeta_at, s.c));
        batch_norm::backward(
            s.rows(),
            s.c,
            x,
            gamma,
            saved,
            relu_out.map(|r| r.as_slice()),
            dy,
            dx,
            dgamma,
            dbeta,
            sync,
        )
    }
    fn bias_add(&self, rows: usize, c: usize, bias: &Vec<f32>, y: &mut Vec<f32>) {
        y[..rows * c].par_chunks_mut(c * 256).for_each(|block| {
            for row in block.chunks_exact_mut(c) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        });
    }
    fn bias_grad(&self, rows: usize, c: usize, dy: &Vec<f32>, grads: &mut Vec<f32>, db_at: usize) {
        for (d, s) in grads[db_at..db_at + c]
            .iter_mut()
            .zip(batch_norm::column_sums(rows, c, dy))
        {
            *d = s as f32;
        }
    }
    fn relu_forward(&self, len: usize, x: &Vec<f32>, y: &mut Vec<f32>) {
        y[..len]
            .par_chunks_mut(1 << 14)
            .zip(x[..len].par_chunks(1 << 14))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x.max(0.0);
                }
            });
    }
    fn relu_backward(&self, len: usize, y: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        dx[..len]
            .par_chunks_mut(1 << 14)
            .zip(y[..len].par_chunks(1 << 14).zip(dy[..len].par_chunks(1 << 14)))
            .for_each(|(dx, (y, dy))| {
                for ((d, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                    *d = if y > 0.0 { g } else { 0.0 };
                }
            });
    }
    fn add_assign(&self, len: usize, src: &Vec<f32>, dst: &mut Vec<f32>) {
        dst[..len]
            .par_chunks_mut(1 << 14)
            .zip(src[..len].par_chunks(1 << 14))
            .for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d += s;
                }
            });
    }

    fn max_pool_forward(&self, g: &PoolGeom, x: &Vec<f32>, y: &mut Vec<f32>) {
        pool::max_forward(g, x, y)
    }
    fn max_pool_backward(&self, g: &PoolGeom, x: &Vec<f32>, y: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        pool::max_backward(g, x, y, dy, dx)
    }
    fn global_avg_pool_forward(&self, s: &Shape4, x: &Vec<f32>, y: &mut Vec<f32>) {
        pool::global_avg_forward(s, x, y)
    }
    fn global_avg_pool_backward(&self, s: &Shape4, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        pool::global_avg_backward(s, dy, dx)
    }

    fn linear_forward(
        &self,
        n: usize,
        din: usize,
        dout: usize,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        y: &mut Vec<f32>,
    ) {
        linear::forward(self.ops, n, din, dout, x, w, b, y)
    }
    fn linear_backward(
        &self,
        n: usize,
        din: usize,
        dout: usize,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        dw_at: usize,
        db_at: usize,
    ) {
        let (dw, db) = windows(grads, (dw_at, din * dout), (db_at, dout));
        linear::backward(self.ops, n, din, dout, x, w, dy, dx, dw, db)
    }
    fn cross_entropy(
        &self,
        n: usize,
        classes: usize,
        logits: &Vec<f32>,
        labels: &[u32],
        label_smoothing: f32,
        loss: &mut Vec<f32>,
        dlogits: &mut Vec<f32>,
    ) {
        loss[0] = loss::cross_entropy(n, classes, logits, labels, label_smoothing, dlogits);
    }

    fn watch_loss(&self, loss: &Vec<f32>, step: u64, watch: &mut Vec<f32>) {
        if !loss[0].is_finite() && watch[0] == 0.0 {
            watch[0] = step as f32;
            watch[1] = loss[0];
        }
    }

    fn adam_step(
        &self,
        len: usize,
        h: &AdamStep,
        param: &mut Vec<f32>,
        grads: &Vec<f32>,
        grad_at: usize,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) {
        let grad = &grads[grad_at..grad_at + len];
        optim::adam(h, &mut param[..len], grad, &mut m[..len], &mut v[..len])
    }
    fn sgd_step(
        &self,
        len: usize,
        h: &SgdStep,
        param: &mut Vec<f32>,
        grads: &Vec<f32>,
        grad_at: usize,
        buf: &mut Vec<f32>,
    ) {
        optim::sgd(h, &mut param[..len], &grads[grad_at..grad_at + len], &mut buf[..len])
    }
}

/// The convolution `c` as the conv module computes it.
fn cpu_conv<'a>(c: ConvOp<'a, Cpu>) -> conv::Conv<'a> {
    conv::Conv {
        plan: c.plan,
        g: c.g,
        w: c.w,
    }
}

/// Two disjoint windows of a gradient arena, `(offset, len)` each.
fn windows(grads: &mut [f32], a: (usize, usize), b: (usize, usize)) -> (&mut [f32], &mut [f32]) {
    assert!(
        a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
        "gradient windows {a:?} and {b:?} overlap"
    );
    if a.0 < b.0 {
        let (lo, hi) = grads.split_at_mut(b.0);
        (&mut lo[a.0..a.0 + a.1], &mut hi[..b.1])
    } else {
        let (lo, hi) = grads.split_at_mut(a.0);
        (&mut hi[..a.1], &mut lo[b.0..b.0 + b.1])
    }
}

/// The eval-mode batch norm `bn` after the convolution `g` as the affine its outputs go
/// through.
fn eval_affine<'a>(g: &ConvGeom, bn: &BatchNormEval<'a, Vec<f32>>) -> batch_norm::Affine<'a> {
    let c = g.cout;
    let (gamma, beta, mean, var) = (
        &bn.gamma[..c],
        &bn.beta[..c],
        &bn.running_mean[..c],
        &bn.running_var[..c],
    );
    let residual = bn.residual.map(|r| &r[..g.output().numel()]);
    batch_norm::Affine::eval(gamma, beta, mean, var, bn.eps, residual, bn.relu)
}
