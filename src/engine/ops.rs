//! The kernels a model needs, as op traits in burn's manner: memory, convolution,
//! normalisation, pointwise, pooling, linear, loss, optimizer, fused inference and device
//! batches. [`super::Backend`] is their sum; a model takes `B: Backend` and reaches every op
//! through it, never memory directly. A new operation is a method on the trait of its kind
//! (with a default body where other ops can compose it, as [`FusedOps`]' are).
//!
//! Every op takes explicit shapes and writes into caller-owned buffers, so the model decides
//! the memory plan, and a buffer can be larger than the op's view of it. Gradients of
//! parameters live in one buffer, the model's gradient arena (llm.c's `grads_memory`), so that
//! data-parallel ranks average all of them with one all-reduce: the ops that write a
//! parameter's gradient take [`GradSlots`], the arena and the offsets in it.

use super::{AdamStep, ConvGeom, CropPlan, Layout, PoolGeom, SgdStep, Shape4, SyncStats};

/// Device memory and what a backend is: its name and arithmetic.
pub trait Memory: Send + Sync + 'static {
    /// Device memory holding f32 values.
    type Buf: Send + Sync;

    fn name(&self) -> String;
    /// The arithmetic of its convolutions and linear layer, as `--precision` names it (`fp32`,
    /// `bf16`, `tf32`): recorded in checkpoints, so that `eval` and `predict` compute as the
    /// run did.
    fn precision(&self) -> &'static str;
    /// A zero-filled buffer of `len` values.
    fn alloc(&self, len: usize) -> Self::Buf;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// Copies `src` into the start of `dst`.
    fn upload(&self, src: &[f32], dst: &mut Self::Buf);
    /// Copies the first `dst.len()` values of `src` to the host.
    fn download(&self, src: &Self::Buf, dst: &mut [f32]);
    fn fill(&self, buf: &mut Self::Buf, len: usize, value: f32);
    /// Whether the first `len` values of `buf` are all finite (no NaN, no infinity): how a
    /// run checks its weights before it saves them.
    fn all_finite(&self, buf: &Self::Buf, len: usize) -> bool {
        let mut host = vec![0.0; len];
        self.download(buf, &mut host);
        host.iter().all(|v| v.is_finite())
    }
    /// The buffer itself when it is host memory (the CPU backend's), so that host-side code
    /// (an MPI exchange) can work on it without copies; `None` on a device.
    fn host_mut<'b>(&self, _buf: &'b mut Self::Buf) -> Option<&'b mut [f32]> {
        None
    }
}

/// Where a layer's parameter gradients go: the model's gradient arena and the offsets (in
/// values) of its weight's and bias's gradients there.
pub struct GradSlots<'a, Buf> {
    pub arena: &'a mut Buf,
    pub weight: usize,
    pub bias: Option<usize>,
}

impl<Buf> GradSlots<'_, Buf> {
    /// The weight's and the bias's offsets, of a layer that has both.
    pub fn offsets(&self) -> (usize, usize) {
        (self.weight, self.bias.expect("the layer's bias gradient"))
    }
}

/// A convolution as a backend computes it: its geometry, the plan the backend chose for it
/// once ([`ConvOps::conv2d_plan`]) and its weights in [`ConvOps::conv_weight_layout`].
pub struct ConvOp<'a, B: ConvOps + ?Sized> {
    pub g: &'a ConvGeom,
    pub plan: &'a B::ConvPlan,
    pub w: &'a B::Buf,
}

impl<B: ConvOps + ?Sized> Clone for ConvOp<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: ConvOps + ?Sized> Copy for ConvOp<'_, B> {}

/// 2-D convolutions without bias: input NHWC, weight in [`ConvOps::conv_weight_layout`],
/// output NHWC.
pub trait ConvOps: Memory {
    /// How this backend stores conv weights (`Layout::ConvHwio` or `Layout::ConvOhwi`).
    fn conv_weight_layout(&self) -> Layout;
    /// How this backend computes a convolution layer: chosen once per layer (on its first
    /// pass) from the backend's configuration and the geometry, the batch size aside, and
    /// printable (`summary --paths`).
    type ConvPlan: Copy + std::fmt::Debug + std::fmt::Display + Send + Sync;
    /// The plan of the convolution `g`, whatever its batch size.
    fn conv2d_plan(&self, g: &ConvGeom) -> Self::ConvPlan;
    /// Scratch needed by the conv ops for this geometry and plan (values).
    fn conv2d_workspace_len(&self, g: &ConvGeom, plan: &Self::ConvPlan) -> usize;
    /// y = conv(x, w).
    fn conv2d_forward(&self, conv: ConvOp<'_, Self>, x: &Self::Buf, y: &mut Self::Buf, ws: &mut Self::Buf);
    /// dw = dL/dw (overwritten, at `dw.weight` in the arena); dx = dL/dx (overwritten) when
    /// asked for.
    fn conv2d_backward(
        &self,
        conv: ConvOp<'_, Self>,
        x: &Self::Buf,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: GradSlots<'_, Self::Buf>,
        ws: &mut Self::Buf,
    );
}

/// What a batch norm's output goes through in the same pass: `y = relu?(bn(x) + residual?)`.
#[derive(Clone, Copy)]
pub struct Epilogue<'a, Buf> {
    pub residual: Option<&'a Buf>,
    pub relu: bool,
}

/// A training-mode batch norm's parameters and state: the scale and shift, the running
/// statistics it updates as PyTorch does (biased variance normalises, unbiased variance goes
/// into `running_var`), and `saved`, the batch mean and 1/sqrt(var+eps) (`[2c]`) for the
/// backward pass. With `sync`, the statistics are those of the whole batch across the ranks
/// (PyTorch's SyncBatchNorm).
pub struct BatchNormTrain<'a, Buf> {
    pub gamma: &'a Buf,
    pub beta: &'a Buf,
    pub running_mean: &'a mut Buf,
    pub running_var: &'a mut Buf,
    pub momentum: f32,
    pub eps: f32,
    pub saved: &'a mut Buf,
    pub sync: SyncStats<'a>,
}

/// An eval-mode batch norm (running statistics) with the residual add and ReLU fused after
/// it: what [`FusedOps::conv2d_bn_eval_forward`] applies to its convolution's outputs.
pub struct BatchNormEval<'a, Buf> {
    pub gamma: &'a Buf,
    pub beta: &'a Buf,
    pub running_mean: &'a Buf,
    pub running_var: &'a Buf,
    pub eps: f32,
    pub residual: Option<&'a Buf>,
    pub relu: bool,
}

/// What a training-mode batch norm's backward pass reads of its forward: the scale, the
/// saved statistics and, when it fused a ReLU, its output; with `sync`, dx goes through the
/// whole batch's statistics.
pub struct BatchNormSaved<'a, Buf> {
    pub gamma: &'a Buf,
    pub saved: &'a Buf,
    pub relu_out: Option<&'a Buf>,
    pub sync: SyncStats<'a>,
}

/// Batch norm over the rows of `x` (`[n*h*w, c]`), fused with an optional residual add and
/// ReLU.
pub trait NormOps: Memory {
    /// Training mode: `y = relu?(bn(x) + residual?)` with the batch's statistics.
    fn batch_norm_forward_train(
        &self,
        s: &Shape4,
        x: &Self::Buf,
        bn: BatchNormTrain<'_, Self::Buf>,
        then: Epilogue<'_, Self::Buf>,
        y: &mut Self::Buf,
    );
    /// Eval mode with the running statistics, same fusion as the training form.
    fn batch_norm_forward_eval(&self, s: &Shape4, x: &Self::Buf, bn: &BatchNormEval<'_, Self::Buf>, y: &mut Self::Buf);
    /// Backward of training-mode batch norm: dx, dgamma and dbeta (at `grads.weight` and
    /// `grads.bias` in the arena), all overwritten. When the forward pass fused a ReLU, `dy`
    /// is masked by its output in place first (the residual branch of a block reads the
    /// masked gradient). With `sync`, dgamma and dbeta stay this rank's sums (the gradient
    /// all-reduce averages them with the rest).
    fn batch_norm_backward(
        &self,
        s: &Shape4,
        x: &Self::Buf,
        bn: BatchNormSaved<'_, Self::Buf>,
        dy: &mut Self::Buf,
        dx: &mut Self::Buf,
        grads: GradSlots<'_, Self::Buf>,
    );
}

/// Elementwise ops and biases.
pub trait PointwiseOps: Memory {
    /// `y[r, ch] += bias[ch]` for each of `rows` rows of `c` channels (a conv's or linear's bias).
    fn bias_add(&self, rows: usize, c: usize, bias: &Self::Buf, y: &mut Self::Buf);
    /// `db[ch]` = the sum over `rows` rows of `dy[r, ch]` (overwritten, at `db_at` in `grads`).
    fn bias_grad(&self, rows: usize, c: usize, dy: &Self::Buf, grads: &mut Self::Buf, db_at: usize);
    /// y = max(x, 0) over `len` values.
    fn relu_forward(&self, len: usize, x: &Self::Buf, y: &mut Self::Buf);
    /// dx = dy where the forward output `y` is positive, else 0.
    fn relu_backward(&self, len: usize, y: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// PyTorch's GELU (its default, the erf form): `y = x * Phi(x)` over `len` values, Phi the
    /// standard normal's distribution function.
    fn gelu_forward(&self, len: usize, x: &Self::Buf, y: &mut Self::Buf);
    /// dx = dy * (Phi(x) + x * phi(x)), from the forward input `x`.
    fn gelu_backward(&self, len: usize, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// y = alpha * x over `len` values (a constant factor such as airbench's `Mul(1/9)`; its
    /// backward pass is the same op on the gradient).
    fn scale(&self, len: usize, alpha: f32, x: &Self::Buf, y: &mut Self::Buf);
    /// `x = lerp(x, end, weight)` over `len` values, as `torch.lerp_` computes it: `x + weight
    /// * (end - x)` for weights below 0.5, else `end - (end - x) * (1 - weight)`.
    fn lerp(&self, len: usize, weight: f32, end: &Self::Buf, x: &mut Self::Buf);
    /// dst += src.
    fn add_assign(&self, len: usize, src: &Self::Buf, dst: &mut Self::Buf);
}

/// Max pooling and global average pooling.
pub trait PoolOps: Memory {
    fn max_pool_forward(&self, g: &PoolGeom, x: &Self::Buf, y: &mut Self::Buf);
    /// dx (overwritten) from dy, given the forward input `x` and output `y`; the window's first
    /// maximum takes the gradient, as in PyTorch.
    fn max_pool_backward(&self, g: &PoolGeom, x: &Self::Buf, y: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// Mean over h and w: `[n, h, w, c]` -> `[n, c]`.
    fn global_avg_pool_forward(&self, s: &Shape4, x: &Self::Buf, y: &mut Self::Buf);
    fn global_avg_pool_backward(&self, s: &Shape4, dy: &Self::Buf, dx: &mut Self::Buf);
}

/// The sizes of a linear layer's product: `n` rows of `din` inputs to `dout` outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    pub n: usize,
    pub din: usize,
    pub dout: usize,
}

/// Fully connected layers, weights `[out, in]` (PyTorch's layout).
pub trait LinearOps: Memory {
    /// y[n, out] = x[n, in] * w[out, in]^T + b.
    /// `y = x w^T + b`, `b` the bias of a layer that has one.
    fn linear_forward(&self, d: LinearDims, x: &Self::Buf, w: &Self::Buf, b: Option<&Self::Buf>, y: &mut Self::Buf);
    /// dx, and dw and db at `grads.weight` and `grads.bias` in the arena (all overwritten; no
    /// db without `grads.bias`).
    fn linear_backward(
        &self,
        d: LinearDims,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        grads: GradSlots<'_, Self::Buf>,
    );
}

/// What a classifier's logits are scored against: one label per row, the class count, and
/// PyTorch's label smoothing (the target is `(1 - s) * onehot + s / classes`).
#[derive(Clone, Copy, Debug)]
pub struct Targets<'a> {
    pub labels: &'a [u32],
    pub classes: usize,
    pub label_smoothing: f32,
}

/// The training loss, and watching it without reading it back every step.
pub trait LossOps: Memory {
    /// Mean softmax cross-entropy of `logits` (`[labels, classes]`) against the targets;
    /// writes the loss into `loss[0]` and dL/dlogits into `dlogits`.
    fn cross_entropy(&self, logits: &Self::Buf, targets: &Targets, loss: &mut Self::Buf, dlogits: &mut Self::Buf);
    /// Records `step` in `watch[0]` and the loss in `watch[1]` the first time `loss[0]` is not
    /// finite (while `watch[0]` is still 0). The host reads `watch` now and then instead of the
    /// loss after every step, and still learns the exact step a run diverged at.
    fn watch_loss(&self, loss: &Self::Buf, step: u64, watch: &mut Self::Buf);
}

/// One parameter's optimizer step: the values, the arena holding their gradient and its
/// offset there, and how many values.
pub struct ParamStep<'a, Buf> {
    pub len: usize,
    pub param: &'a mut Buf,
    pub grads: &'a Buf,
    pub grad_at: usize,
}

/// The optimizers' update rules, PyTorch's.
pub trait OptimOps: Memory {
    /// One Adam step with state `m`, `v`.
    fn adam_step(&self, h: &AdamStep, p: ParamStep<'_, Self::Buf>, m: &mut Self::Buf, v: &mut Self::Buf);
    /// One SGD step with momentum buffer `buf`.
    fn sgd_step(&self, h: &SgdStep, p: ParamStep<'_, Self::Buf>, buf: &mut Self::Buf);
}

/// A convolution and the eval-mode batch norm after it, one of the two layers of
/// [`FusedOps::conv2d_bn_eval_pair_forward`]: the convolution, its batch norm, and room for
/// the convolution's output where the two run apart.
pub struct ConvBnEval<'a, B: ConvOps + ?Sized> {
    pub conv: ConvOp<'a, B>,
    pub bn: BatchNormEval<'a, B::Buf>,
    pub conv_out: &'a mut B::Buf,
}

/// Inference's fused layers. The default bodies run the ops one after the other; a backend
/// overrides them where it has one pass for the whole.
pub trait FusedOps: ConvOps + NormOps {
    /// `y = relu?(bn(conv(x, w)) + residual?)` with `bn` in eval mode: the CPU's direct bf16
    /// convolutions apply the batch norm as they write their outputs, so the convolution's
    /// output never goes through memory; elsewhere the two ops, the convolution's output in
    /// `layer.conv_out`. Either way `y` holds what the two ops give, bit for bit.
    fn conv2d_bn_eval_forward(
        &self,
        layer: ConvBnEval<'_, Self>,
        x: &Self::Buf,
        y: &mut Self::Buf,
        ws: &mut Self::Buf,
    ) {
        let ConvBnEval { conv, bn, conv_out } = layer;
        self.conv2d_forward(conv, x, conv_out, ws);
        self.batch_norm_forward_eval(&conv.g.output(), conv_out, &bn, y);
    }
    /// Two [`FusedOps::conv2d_bn_eval_forward`] layers in a row (a residual block's inner
    /// path in inference): `y` = `second` of `first` of `x`, `mid` the first's output. A
    /// backend may hand that output to the second convolution without writing `mid` (the
    /// CPU's direct bf16 convolutions write it as bf16, already in the layout the second
    /// reads); `y` holds what the two calls give, bit for bit.
    fn conv2d_bn_eval_pair_forward(
        &self,
        first: ConvBnEval<'_, Self>,
        second: ConvBnEval<'_, Self>,
        x: &Self::Buf,
        mid: &mut Self::Buf,
        y: &mut Self::Buf,
        ws: &mut Self::Buf,
    ) {
        self.conv2d_bn_eval_forward(first, x, mid, ws);
        self.conv2d_bn_eval_forward(second, mid, y, ws);
    }
}

/// Training images kept where a backend computes, and batches cut from them there. A GPU
/// keeps a dataset's bytes on the device and crops, flips and normalises each batch there
/// from a plan drawn on the host, so no pixel crosses the bus per step; a backend that builds
/// its batches on a host loader thread instead (the CPU) has no device pixels at all
/// (`Pixels = std::convert::Infallible`) and keeps the default `upload_pixels`.
pub trait BatchOps: Memory {
    /// A dataset's image bytes (`[n, 3, side, side]`, u8) on the device.
    type Pixels: Send + Sync;
    /// Copies a dataset's image bytes to the device, once, when this backend builds training
    /// batches there; `None` when a host thread should build them ahead of the step.
    fn upload_pixels(&self, _bytes: &[u8]) -> Option<Self::Pixels> {
        None
    }
    /// Writes the normalised NHWC pixels of `plan` into `x`, exactly as the host's
    /// `data::transform::write_image` does.
    fn crop_flip(&self, pixels: &Self::Pixels, plan: &CropPlan, x: &mut Self::Buf);
}
