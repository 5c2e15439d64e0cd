//! BatchNorm2d with PyTorch's semantics (momentum 0.1, eps 1e-5, unbiased running variance),
//! optionally fused with the residual add and ReLU that follow it in a ResNet block.

use super::builder::Builder;
use super::param::{Entry, Module, Param};
use crate::engine::{Backend, Shape4, StatsSum, ensure_len};

pub const MOMENTUM: f32 = 0.1;
pub const EPS: f32 = 1e-5;

pub struct BatchNorm2d<B: Backend> {
    pub weight: Param<B>,
    pub bias: Param<B>,
    pub running_mean: Param<B>,
    pub running_var: Param<B>,
    pub num_batches_tracked: i64,
    tracked_name: String,
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
        Self {
            weight: b.constant("weight", &[channels], 1.0, true),
            bias: b.constant("bias", &[channels], 0.0, true),
            running_mean: b.constant("running_mean", &[channels], 0.0, false),
            running_var: b.constant("running_var", &[channels], 1.0, false),
            num_batches_tracked: 0,
            tracked_name: b.path("num_batches_tracked"),
            relu,
            out: be.alloc(0),
            saved: be.alloc(2 * channels),
            shape: Shape4::default(),
            sync: None,
        }
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
            be.batch_norm_forward_train(
                &s,
                x,
                &self.weight.value,
                &self.bias.value,
                &mut self.running_mean.value,
                &mut self.running_var.value,
                MOMENTUM,
                EPS,
                &mut self.saved,
                residual,
                self.relu,
                &mut self.out,
                self.sync.as_deref(),
            );
        } else {
            be.batch_norm_forward_eval(
                &s,
                x,
                &self.weight.value,
                &self.bias.value,
                &self.running_mean.value,
                &self.running_var.value,
                EPS,
                residual,
                self.relu,
                &mut self.out,
            );
        }
    }

    /// Given dL/d(out) in `dy`, masks it in place by the fused ReLU (so that `dy` then also
    /// holds the residual branch's gradient), writes dL/dx into `dx` and the scale's and
    /// shift's gradients into the gradient arena `grads`.
    pub fn backward(&mut self, be: &B, x: &B::Buf, dy: &mut B::Buf, dx: &mut B::Buf, grads: &mut B::Buf) {
        let s = self.shape;
        ensure_len(be, dx, s.numel());
        let dgamma = self.weight.grad.expect("bn weight is trainable");
        let dbeta = self.bias.grad.expect("bn bias is trainable");
        let relu_out = self.relu.then_some(&self.out);
        be.batch_norm_backward(
            &s,
            x,
            &self.weight.value,
            &self.saved,
            relu_out,
            dy,
            dx,
            grads,
            dgamma,
            dbeta,
            self.sync.as_deref(),
        );
    }
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
