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
    AdamStep, Backend, BatchNormEval, ConvBnEval, ConvGeom, CropPlan, DeviceBatches, Layout, PoolGeom, SgdStep, Shape4,
    SyncStats,
};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Whether this CPU can multiply bf16 operands (`--precision bf16`), or which instructions it
/// lacks. `RESNET_CIFAR_NO_BF16=1` makes it answer as a CPU without them would (tests).
pub fn bf16_support() -> Result<(), String> {
    if std::env::var_os("RESNET_CIFAR_NO_BF16").is_some_and(|v| v != "0") {
        return Err("this CPU lacks AVX512_BF16 (bf16 dot products): RESNET_CIFAR_NO_BF16 is set".into());
    }
    let missing = bf16::missing_features();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "this CPU lacks {} (bf16 dot products need AVX512F, AVX512BW and AVX512_BF16: AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later)",
        missing.join(", ")
    ))
}

/// Makes the convolutions and the linear layer called from this thread multiply bf16
/// operands (f32 sums) or f32 ones: PyTorch's CPU autocast for these layers. Batch norm, the
/// loss and the optimizer stay f32, and so do the weights (rounded only as operands). Set it
/// before building a model: with bf16 operands the 3x3 convolutions take Winograd's smaller
/// tiles (F(4x4, 3x3) amplifies bf16's rounding about 13x), and a model sizes its workspace
/// for the tiles of its day.
pub fn set_bf16(on: bool) -> Result<(), String> {
    if on {
        bf16_support()?;
    }
    gemm::set_operands(if on { gemm::Operands::Bf16 } else { gemm::Operands::F32 });
    Ok(())
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
        let arith = match gemm::operands() {
            gemm::Operands::F32 => "",
            gemm::Operands::Bf16 => match bf16::Kernel::chosen() {
                bf16::Kernel::Amx => ", bf16 operands on AMX tiles",
                bf16::Kernel::Avx512 => ", bf16 operands on AVX512_BF16",
            },
        };
        match rayon::current_num_threads() {
            1 => format!("cpu (1 thread{arith})"),
            n => format!("cpu ({n} threads{arith})"),
        }
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
    fn set_fast_convolutions(&self, on: bool) {
        winograd::set_enabled(on)
    }
    fn conv2d_workspace_len(&self, g: &ConvGeom) -> usize {
        conv::workspace_len(g)
    }
    fn conv2d_forward(&self, g: &ConvGeom, x: &Vec<f32>, w: &Vec<f32>, y: &mut Vec<f32>, ws: &mut Vec<f32>) {
        conv::forward(g, x, w, y, ws)
    }
    fn conv2d_bn_eval_forward(
        &self,
        g: &ConvGeom,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bn: &BatchNormEval<'_, Vec<f32>>,
        conv_out: &mut Vec<f32>,
        y: &mut Vec<f32>,
        ws: &mut Vec<f32>,
    ) {
        conv::forward_then(g, x, w, &eval_affine(g, bn), conv_out, y, ws)
    }
    fn conv2d_bn_eval_pair_forward(
        &self,
        first: ConvBnEval<'_, Vec<f32>>,
        second: ConvBnEval<'_, Vec<f32>>,
        x: &Vec<f32>,
        mid: &mut Vec<f32>,
        y: &mut Vec<f32>,
        ws: &mut Vec<f32>,
    ) {
        let (a, b) = (eval_affine(&first.g, &first.bn), eval_affine(&second.g, &second.bn));
        let first = (&first.g, &first.w[..], &a, &mut first.conv_out[..]);
        let second = (&second.g, &second.w[..], &b, &mut second.conv_out[..]);
        conv::forward_pair(first, second, x, mid, y, ws)
    }
    fn conv2d_backward(
        &self,
        g: &ConvGeom,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        grads: &mut Vec<f32>,
        dw_at: usize,
        ws: &mut Vec<f32>,
    ) {
        let dw = &mut grads[dw_at..dw_at + g.weight_len()];
        conv::backward(g, x, w, dy, dx.map(|d| d.as_mut_slice()), dw, ws)
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
        linear::forward(n, din, dout, x, w, b, y)
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
        linear::backward(n, din, dout, x, w, dy, dx, dw, db)
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
