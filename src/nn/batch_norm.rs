//! BatchNorm2d with PyTorch's semantics (momentum 0.1 and eps 1e-5 unless set otherwise,
//! unbiased running variance), optionally fused with the residual add and ReLU that follow it
//! in a ResNet block.

use super::builder::Builder;
use super::conv2d::Conv2d;
use super::param::{Entry, Module, Param};
use crate::engine::{
    Backend, BatchNormEval, BatchNormSaved, BatchNormTrain, ConvBnEval, ConvGeom, ConvOp, Epilogue, Shape4, StatsSum,
    ensure_len,
};

pub const MOMENTUM: f32 = 0.1;
pub const EPS: f32 = 1e-5;

pub struct BatchNorm2d<B: Backend> {
    pub weight: Param<B>,
    pub bias: Param<B>,
    pub running_mean: Param<B>,
    pub running_var: Param<B>,
    pub num_batches_tracked: i64,
    tracked_name: String,
    /// PyTorch's `eps` and `momentum` (the running statistics move this far to the batch's).
    pub eps: f32,
    pub momentum: f32,
    /// Apply ReLU after the (residual-added) normalisation.
    pub relu: bool,
    /// Output of the last forward pass.
    pub out: B::Buf,
    /// Batch mean and 1/sqrt(var + eps) of the last training forward pass.
    saved: B::Buf,
    shape: Shape4,
    /// Sums the training statistics over the ranks (SyncBatchNorm); `None`: this process's
    /// batch alone.
    pub sync: Option<StatsSum>,
}

impl<B: Backend> BatchNorm2d<B> {
    pub fn new(b: &Builder<B>, channels: usize, relu: bool) -> Self {
        let be = b.backend();
        let norm = |p: Param<B>| Param { norm: true, ..p };
        Self {
            weight: norm(b.constant("weight", &[channels], 1.0, true)),
            bias: norm(b.constant("bias", &[channels], 0.0, true)),
            running_mean: b.constant("running_mean", &[channels], 0.0, false),
            running_var: b.constant("running_var", &[channels], 1.0, false),
            num_batches_tracked: 0,
            tracked_name: b.path("num_batches_tracked"),
            eps: EPS,
            momentum: MOMENTUM,
            relu,
            out: be.alloc(0),
            saved: be.alloc(2 * channels),
            shape: Shape4::default(),
            sync: None,
        }
    }

    /// The same layer with PyTorch's `eps` and `momentum` set (airbench's: 1e-12 and 0.4).
    pub fn with_eps_momentum(self, eps: f32, momentum: f32) -> Self {
        Self { eps, momentum, ..self }
    }

    pub fn channels(&self) -> usize {
        self.weight.numel()
    }

    /// `self.out = relu?(bn(x) + residual?)`. Training mode normalises with batch statistics
    /// and updates the running ones; eval mode uses the running statistics.
    pub fn forward(&mut self, be: &B, x: &B::Buf, s: Shape4, residual: Option<&B::Buf>, train: bool) {
        let c = self.channels();
        assert_eq!(s.c, c, "{}: input has {} channels", self.weight.name, s.c);
        ensure_len(be, &mut self.out, s.numel());
        self.shape = s;
        if train {
            self.num_batches_tracked += 1;
            let bn = BatchNormTrain {
                gamma: &self.weight.value,
                beta: &self.bias.value,
                running_mean: &mut self.running_mean.value,
                running_var: &mut self.running_var.value,
                momentum: self.momentum,
                eps: self.eps,
                saved: &mut self.saved,
                sync: self.sync.as_deref(),
            };
            let then = Epilogue {
                residual,
                relu: self.relu,
            };
            be.batch_norm_forward_train(&s, x, bn, then, &mut self.out);
        } else {
            let (bn, y) = self.eval_parts(residual);
            be.batch_norm_forward_eval(&s, x, &bn, y);
        }
    }

    /// `self.out = relu?(bn(conv(x)) + residual?)`: `conv`'s forward pass and then this
    /// layer's. Training mode (or a conv with a bias) runs them one after the other; eval mode
    /// as one backend call, which fuses them where it can
    /// ([`crate::engine::FusedOps::conv2d_bn_eval_forward`]), so that `conv.out` need not hold the
    /// convolution's output afterwards. `(x, input)`: the input and its shape. Returns the
    /// output shape.
    pub fn forward_after(
        &mut self,
        be: &B,
        conv: &mut Conv2d<B>,
        (x, input): (&B::Buf, Shape4),
        residual: Option<&B::Buf>,
        train: bool,
        ws: &mut B::Buf,
    ) -> Shape4 {
        if train || conv.bias.is_some() {
            let s = conv.forward(be, x, input, ws);
            self.forward(be, &conv.out, s, residual, train);
            return s;
        }
        let (g, plan) = self.prepare_after(be, conv, input, ws);
        let (bn, y) = self.eval_parts(residual);
        let layer = ConvBnEval {
            conv: ConvOp {
                g: &g,
                plan: &plan,
                w: &conv.weight.value,
            },
            bn,
            conv_out: &mut conv.out,
        };
        be.conv2d_bn_eval_forward(layer, x, y, ws);
        g.output()
    }

    /// `conv`'s geometry and plan on `input`, its buffers and this layer's sized for it (eval
    /// mode).
    fn prepare_after(
        &mut self,
        be: &B,
        conv: &mut Conv2d<B>,
        input: Shape4,
        ws: &mut B::Buf,
    ) -> (ConvGeom, B::ConvPlan) {
        let (g, plan) = conv.prepare(be, input, ws);
        let s = g.output();
        assert_eq!(s.c, self.channels(), "{}: input has {} channels", self.weight.name, s.c);
        ensure_len(be, &mut self.out, s.numel());
        self.shape = s;
        (g, plan)
    }

    /// This layer in eval mode, with the residual added after it, and its output buffer.
    fn eval_parts<'a>(&'a mut self, residual: Option<&'a B::Buf>) -> (BatchNormEval<'a, B::Buf>, &'a mut B::Buf) {
        let bn = BatchNormEval {
            gamma: &self.weight.value,
            beta: &self.bias.value,
            running_mean: &self.running_mean.value,
            running_var: &self.running_var.value,
            eps: self.eps,
            residual,
            relu: self.relu,
        };
        (bn, &mut self.out)
    }

    /// Given dL/d(out) in `dy`, masks it in place by the fused ReLU (so that `dy` then also
    /// holds the residual branch's gradient), writes dL/dx into `dx` and the scale's and
    /// shift's gradients into the gradient arena `grads`.
    pub fn backward(&mut self, be: &B, x: &B::Buf, dy: &mut B::Buf, dx: &mut B::Buf, grads: &mut B::Buf) {
        let s = self.shape;
        ensure_len(be, dx, s.numel());
        let bn = BatchNormSaved {
            gamma: &self.weight.value,
            saved: &self.saved,
            relu_out: self.relu.then_some(&self.out),
            sync: self.sync.as_deref(),
        };
        let slots = self.weight.grad_slots(grads, Some(&self.bias));
        be.batch_norm_backward(&s, x, bn, dy, dx, slots);
    }
}

/// Eval mode's two convolution + batch norm layers in a row (a residual block's inner path)
/// as one backend call ([`crate::engine::FusedOps::conv2d_bn_eval_pair_forward`]): `second.1.out =
/// relu?(bn(conv(first's output)) + residual?)`, where `first.1.out` need not hold the first
/// pair's output afterwards (the CPU's direct bf16 convolutions hand it over as bf16). In
/// training mode, or with a convolution's bias, the layers run one by one. Returns the
/// output shape.
pub fn forward_pair<B: Backend>(
    be: &B,
    (conv_a, bn_a): (&mut Conv2d<B>, &mut BatchNorm2d<B>),
    (conv_b, bn_b): (&mut Conv2d<B>, &mut BatchNorm2d<B>),
    (x, input): (&B::Buf, Shape4),
    residual: Option<&B::Buf>,
    train: bool,
    ws: &mut B::Buf,
) -> Shape4 {
    if train || conv_a.bias.is_some() || conv_b.bias.is_some() {
        let s = bn_a.forward_after(be, conv_a, (x, input), None, train, ws);
        return bn_b.forward_after(be, conv_b, (&bn_a.out, s), residual, train, ws);
    }
    let (ga, plan_a) = bn_a.prepare_after(be, conv_a, input, ws);
    let (gb, plan_b) = bn_b.prepare_after(be, conv_b, ga.output(), ws);
    let ((bn_a, mid), (bn_b, y)) = (bn_a.eval_parts(None), bn_b.eval_parts(residual));
    let first = ConvBnEval {
        conv: ConvOp {
            g: &ga,
            plan: &plan_a,
            w: &conv_a.weight.value,
        },
        bn: bn_a,
        conv_out: &mut conv_a.out,
    };
    let second = ConvBnEval {
        conv: ConvOp {
            g: &gb,
            plan: &plan_b,
            w: &conv_b.weight.value,
        },
        bn: bn_b,
        conv_out: &mut conv_b.out,
    };
    be.conv2d_bn_eval_pair_forward(first, second, x, mid, y, ws);
    gb.output()
}

impl<B: Backend> Module<B> for BatchNorm2d<B> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        f(Entry::Tensor(&mut self.weight));
        f(Entry::Tensor(&mut self.bias));
        f(Entry::Tensor(&mut self.running_mean));
        f(Entry::Tensor(&mut self.running_var));
        f(Entry::Counter {
            name: &self.tracked_name,
            value: &mut self.num_batches_tracked,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;
    use crate::engine::prelude::*;
    use crate::nn::Conv2dConfig;
    use crate::test_support::bf16_kernels;

    /// fp32, and bf16 operands on each kernel the CPU has.
    fn backends() -> Vec<Cpu> {
        let bf16 = bf16_kernels().into_iter().map(Cpu::bf16);
        std::iter::once(Cpu::default()).chain(bf16).collect()
    }

    /// A bias-free convolution padded by half its kernel.
    fn conv(b: &Builder<Cpu>, name: &str, cin: usize, cout: usize, kernel: usize, stride: usize) -> Conv2d<Cpu> {
        let cfg = Conv2dConfig {
            cin,
            cout,
            kernel,
            stride,
            pad: kernel / 2,
            bias: false,
        };
        Conv2d::new(&b.pp(name), cfg)
    }

    /// A batch norm with the ReLU whose every statistic and parameter differs from the others
    /// (ramps over the channels, raised by `salt`), so that one passed in the wrong place shows.
    fn distinct_batch_norm(b: &Builder<Cpu>, name: &str, channels: usize, salt: f32) -> BatchNorm2d<Cpu> {
        let mut bn = BatchNorm2d::new(&b.pp(name), channels, true);
        let ramp = |lo: f32, step: f32| (0..channels).map(|c| lo + salt + step * c as f32).collect();
        bn.weight.value = ramp(0.5, 0.02);
        bn.bias.value = ramp(-0.3, 0.01);
        bn.running_mean.value = ramp(-0.1, 0.005);
        bn.running_var.value = ramp(0.2, 0.03);
        bn
    }

    /// Eval mode's convolution and batch norm in one backend call give the bits of the two
    /// layers run one after the other, with every statistic and parameter distinct (so that
    /// one passed in the wrong place shows), a residual and the ReLU: in fp32 (the two passes
    /// behind one call) and, where the CPU has them, bf16 operands: on AMX the 64-channel
    /// convolutions take the direct path and its fused pass (stride 1 and 2); the 3-channel
    /// stems and 40 channels at stride 2 the patches' product and then the batch norm's pass.
    #[test]
    fn forward_after_a_conv_matches_the_two_layers() {
        for cpu in backends() {
            let cases = [
                (64, 3, 1, 64),
                (64, 3, 2, 128),
                (64, 1, 2, 128),
                (3, 3, 1, 64),
                (3, 7, 2, 64),
                (40, 3, 2, 32),
            ];
            for (cin, kernel, stride, cout) in cases {
                let be = &cpu;
                let b = Builder::new(be, 7);
                let mut conv = conv(&b, "conv", cin, cout, kernel, stride);
                let mut bn = distinct_batch_norm(&b, "bn", cout, 0.0);
                let s = Shape4::new(8, 8, 8, cin);
                let x: Vec<f32> = (0..s.numel()).map(|i| (i as f32 * 0.37).sin()).collect();
                let out = conv.geom(s).output();
                let residual: Vec<f32> = (0..out.numel()).map(|i| (i as f32 * 0.11).cos()).collect();
                let mut ws = be.alloc(0);
                conv.forward(be, &x, s, &mut ws);
                bn.forward(be, &conv.out, out, Some(&residual), false);
                let want = std::mem::take(&mut bn.out);
                bn.forward_after(be, &mut conv, (&x, s), Some(&residual), false, &mut ws);
                assert_eq!(bn.out.len(), want.len());
                let differ = bn.out.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(differ, None, "{cpu:?}, {cin} {kernel} {stride} {cout}");
                assert!(want.contains(&0.0) && want.iter().any(|&v| v > 0.0));
            }
        }
    }

    /// Eval mode's two convolution + batch norm pairs in one backend call ([`forward_pair`])
    /// give the bits of the four layers one after the other, the second pair with a residual
    /// and ReLU: in fp32 and, where the CPU has them, bf16 operands (on AMX, 32-channel
    /// multiples take the direct path, the first pair's output handed over as bf16: stride 1
    /// on 8x8 maps and stride 2 to 4x4; 16 channels run the two calls).
    #[test]
    fn forward_pair_matches_the_four_layers() {
        for cpu in backends() {
            for (cin, stride, cout) in [(64, 1, 64), (32, 2, 64), (16, 1, 16)] {
                let be = &cpu;
                let b = Builder::new(be, 3);
                let (mut conv_a, mut conv_b) = (conv(&b, "a", cin, cout, 3, stride), conv(&b, "b", cout, cout, 3, 1));
                let mut bn_a = distinct_batch_norm(&b, "bn_a", cout, 0.0);
                let mut bn_b = distinct_batch_norm(&b, "bn_b", cout, 0.05);
                let s = Shape4::new(5, 8, 8, cin);
                let x: Vec<f32> = (0..s.numel()).map(|i| (i as f32 * 0.37).sin()).collect();
                let out = conv_a.geom(s).output();
                let residual: Vec<f32> = (0..out.numel()).map(|i| (i as f32 * 0.11).cos()).collect();
                let mut ws = be.alloc(0);
                conv_a.forward(be, &x, s, &mut ws);
                bn_a.forward(be, &conv_a.out, out, None, false);
                conv_b.forward(be, &bn_a.out, out, &mut ws);
                bn_b.forward(be, &conv_b.out, out, Some(&residual), false);
                let want = std::mem::take(&mut bn_b.out);
                let a = (&mut conv_a, &mut bn_a);
                let got = forward_pair(
                    be,
                    a,
                    (&mut conv_b, &mut bn_b),
                    (&x, s),
                    Some(&residual),
                    false,
                    &mut ws,
                );
                assert_eq!(got, out);
                let differ = bn_b.out.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!((bn_b.out.len(), differ), (want.len(), None), "{cpu:?}, {cin} {stride}");
                assert!(want.contains(&0.0) && want.iter().any(|&v| v > 0.0));
            }
        }
    }

    /// A layer's own `eps` and `momentum` are what training and eval use (airbench's 1e-12 and
    /// 0.4): the running statistics move 0.4 of the way to the batch's (mean, unbiased
    /// variance), and a channel of variance 1e-6 normalises with eps 1e-12, not 1e-5.
    #[test]
    fn eps_and_momentum_are_the_layers_own() {
        let be = Cpu::default();
        let b = Builder::new(&be, 0);
        let mut bn = BatchNorm2d::new(&b.pp("norm"), 1, false).with_eps_momentum(1e-12, 0.4);
        // Four values of mean 0.5 and biased variance 1e-6: 0.5 -+ 0.001.
        let x = vec![0.499, 0.501, 0.499, 0.501];
        bn.forward(&be, &x, Shape4::new(4, 1, 1, 1), None, true);
        let y = &bn.out[..4];
        assert!((y[1] - 1.0).abs() < 1e-3, "normalised with eps 1e-12: {y:?}");
        let unbiased = 1e-6 * 4.0 / 3.0;
        assert!((bn.running_mean.value[0] - 0.4 * 0.5).abs() < 1e-6);
        assert!((bn.running_var.value[0] - (0.6 + 0.4 * unbiased)).abs() < 1e-6);
        bn.forward(&be, &x, Shape4::new(4, 1, 1, 1), None, false);
        let expect = (0.501 - 0.2) / (0.6f32 + 0.4 * unbiased + 1e-12).sqrt();
        assert!((bn.out[1] - expect).abs() < 1e-5, "eval: {} vs {expect}", bn.out[1]);
        let plain = BatchNorm2d::new(&b.pp("plain"), 1, false);
        assert_eq!(
            (plain.eps, plain.momentum),
            (EPS, MOMENTUM),
            "PyTorch's defaults otherwise"
        );
    }
}
