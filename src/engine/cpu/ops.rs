//! The CPU backend's op traits ([`crate::engine::ops`]): each a thin call into the kernel
//! module of its kind, slices cut to the shapes given.

use super::gelu;
use super::gemm::Operands;
use super::{Bf16Kernel, ConvPlan, Cpu, batch_norm, conv, linear, loss, optim, pool};
use crate::engine::{
    AdamStep, BatchNormEval, BatchNormSaved, BatchNormTrain, BatchOps, ConvBnEval, ConvGeom, ConvOp, ConvOps, CropPlan,
    Epilogue, FusedOps, GradSlots, Layout, LinearDims, LinearOps, LossOps, Memory, NormOps, OptimOps, ParamStep,
    PointwiseOps, PoolGeom, PoolOps, SgdStep, Shape4, Targets,
};
use batch_norm::{relu, relu_mask};
use rayon::prelude::*;

impl Memory for Cpu {
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
    fn all_finite(&self, buf: &Vec<f32>, len: usize) -> bool {
        buf[..len].par_chunks(1 << 16).all(|c| c.iter().all(|v| v.is_finite()))
    }
}

impl ConvOps for Cpu {
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
    fn conv2d_backward(
        &self,
        c: ConvOp<'_, Self>,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        dw: GradSlots<'_, Vec<f32>>,
        ws: &mut Vec<f32>,
    ) {
        let dw = &mut dw.arena[dw.weight..dw.weight + c.g.weight_len()];
        cpu_conv(c).backward(x, dy, dx.map(|d| d.as_mut_slice()), dw, ws)
    }
}

impl NormOps for Cpu {
    fn batch_norm_forward_train(
        &self,
        s: &Shape4,
        x: &Vec<f32>,
        bn: BatchNormTrain<'_, Vec<f32>>,
        then: Epilogue<'_, Vec<f32>>,
        y: &mut Vec<f32>,
    ) {
        batch_norm::forward_train(s.rows(), s.c, x, bn, then, y)
    }
    fn batch_norm_forward_eval(&self, s: &Shape4, x: &Vec<f32>, bn: &BatchNormEval<'_, Vec<f32>>, y: &mut Vec<f32>) {
        batch_norm::forward_eval(s.rows(), s.c, x, bn, y)
    }
    fn batch_norm_backward(
        &self,
        s: &Shape4,
        x: &Vec<f32>,
        bn: BatchNormSaved<'_, Vec<f32>>,
        dy: &mut Vec<f32>,
        dx: &mut Vec<f32>,
        grads: GradSlots<'_, Vec<f32>>,
    ) {
        let (dgamma, dbeta) = grads.windows(s.c, s.c);
        batch_norm::backward(s.rows(), s.c, x, bn, dy, dx, (dgamma, dbeta))
    }
}

impl PointwiseOps for Cpu {
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
                    *y = relu(x);
                }
            });
    }
    fn relu_backward(&self, len: usize, y: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        dx[..len]
            .par_chunks_mut(1 << 14)
            .zip(y[..len].par_chunks(1 << 14).zip(dy[..len].par_chunks(1 << 14)))
            .for_each(|(dx, (y, dy))| {
                for ((d, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                    *d = relu_mask(y, g);
                }
            });
    }
    fn gelu_forward(&self, len: usize, x: &Vec<f32>, y: &mut Vec<f32>) {
        y[..len]
            .par_chunks_mut(1 << 14)
            .zip(x[..len].par_chunks(1 << 14))
            .for_each(|(y, x)| gelu::forward_slice(x, y));
    }
    fn gelu_backward(&self, len: usize, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        dx[..len]
            .par_chunks_mut(1 << 14)
            .zip(x[..len].par_chunks(1 << 14).zip(dy[..len].par_chunks(1 << 14)))
            .for_each(|(dx, (x, dy))| gelu::backward_slice(x, dy, dx));
    }
    fn scale(&self, len: usize, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) {
        y[..len]
            .par_chunks_mut(1 << 14)
            .zip(x[..len].par_chunks(1 << 14))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = alpha * x));
    }
    fn lerp(&self, len: usize, weight: f32, end: &Vec<f32>, x: &mut Vec<f32>) {
        x[..len]
            .par_chunks_mut(1 << 14)
            .zip(end[..len].par_chunks(1 << 14))
            .for_each(|(x, end)| {
                for (x, &e) in x.iter_mut().zip(end) {
                    *x = if weight < 0.5 {
                        *x + weight * (e - *x)
                    } else {
                        e - (e - *x) * (1.0 - weight)
                    };
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
}

impl PoolOps for Cpu {
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
}

impl LinearOps for Cpu {
    fn linear_forward(&self, d: LinearDims, x: &Vec<f32>, w: &Vec<f32>, b: Option<&Vec<f32>>, y: &mut Vec<f32>) {
        linear::forward(self.ops, d, x, w, b.map(|b| &b[..]), y)
    }
    fn linear_backward(
        &self,
        d: LinearDims,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        grads: GradSlots<'_, Vec<f32>>,
    ) {
        let grads = match grads.bias {
            Some(_) => {
                let (dw, db) = grads.windows(d.din * d.dout, d.dout);
                (dw, Some(db))
            }
            None => (&mut grads.arena[grads.weight..][..d.din * d.dout], None),
        };
        linear::backward(self.ops, d, x, w, dy, dx, grads)
    }
}

impl LossOps for Cpu {
    fn cross_entropy(&self, logits: &Vec<f32>, t: &Targets, loss: &mut Vec<f32>, dlogits: &mut Vec<f32>) {
        let n = t.labels.len();
        loss[0] = loss::cross_entropy(n, t.classes, logits, t.labels, t.label_smoothing, dlogits);
    }
    fn watch_loss(&self, loss: &Vec<f32>, step: u64, watch: &mut Vec<f32>) {
        if !loss[0].is_finite() && watch[0] == 0.0 {
            watch[0] = step as f32;
            watch[1] = loss[0];
        }
    }
}

impl OptimOps for Cpu {
    fn adam_step(&self, h: &AdamStep, p: ParamStep<'_, Vec<f32>>, m: &mut Vec<f32>, v: &mut Vec<f32>) {
        let (len, grad) = (p.len, &p.grads[p.grad_at..p.grad_at + p.len]);
        optim::adam(h, &mut p.param[..len], grad, &mut m[..len], &mut v[..len])
    }
    fn sgd_step(&self, h: &SgdStep, p: ParamStep<'_, Vec<f32>>, buf: &mut Vec<f32>) {
        let (len, grad) = (p.len, &p.grads[p.grad_at..p.grad_at + p.len]);
        optim::sgd(h, &mut p.param[..len], grad, &mut buf[..len])
    }
}

impl FusedOps for Cpu {
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
}

/// The CPU builds its batches on the loader thread, ahead of the step: it has no device
/// pixels, so none can reach `crop_flip`.
impl BatchOps for Cpu {
    type Pixels = std::convert::Infallible;
    fn crop_flip(&self, pixels: &Self::Pixels, _plan: &CropPlan, _x: &mut Vec<f32>) {
        match *pixels {}
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

/// The eval-mode batch norm `bn` after the convolution `g` as the affine its outputs go
/// through.
fn eval_affine<'a>(g: &ConvGeom, bn: &BatchNormEval<'a, Vec<f32>>) -> batch_norm::Affine<'a> {
    batch_norm::Affine::of_eval(g.cout, g.output().numel(), bn)
}

impl<'a> GradSlots<'a, Vec<f32>> {
    /// The weight's gradient (`weight_len` values) and the bias's (`bias_len`), two disjoint
    /// windows of the arena.
    fn windows(self, weight_len: usize, bias_len: usize) -> (&'a mut [f32], &'a mut [f32]) {
        let (weight, bias) = self.offsets();
        let (a, b) = ((weight, weight_len), (bias, bias_len));
        assert!(
            a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
            "gradient windows {a:?} and {b:?} overlap"
        );
        let grads = self.arena.as_mut_slice();
        if a.0 < b.0 {
            let (lo, hi) = grads.split_at_mut(b.0);
            (&mut lo[a.0..a.0 + a.1], &mut hi[..b.1])
        } else {
            let (lo, hi) = grads.split_at_mut(a.0);
            (&mut hi[..a.1], &mut lo[b.0..b.0 + b.1])
        }
    }
}
