//! The compute engine: the [`Backend`] trait every kernel sits behind, and the geometry types the
//! kernels take. Activations are NHWC (channels last), so a batch of images is a row-major matrix
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

pub use augment::{CropPlan, DeviceBatches};
pub use collective::{Collective, Local, StatsSum};
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
/// [`Backend::conv_weight_layout`], output NHWC.
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

/// An eval-mode batch norm (running statistics) with the residual add and ReLU fused after
/// it: what [`Backend::conv2d_bn_eval_forward`] applies to its convolution's outputs.
pub struct BatchNormEval<'a, Buf> {
    pub gamma: &'a Buf,
    pub beta: &'a Buf,
    pub running_mean: &'a Buf,
    pub running_var: &'a Buf,
    pub eps: f32,
    pub residual: Option<&'a Buf>,
    pub relu: bool,
}

/// A convolution as a backend computes it: its geometry, the plan the backend chose for it
/// once ([`Backend::conv2d_plan`]) and its weights in [`Backend::conv_weight_layout`].
pub struct ConvOp<'a, B: Backend + ?Sized> {
    pub g: &'a ConvGeom,
    pub plan: &'a B::ConvPlan,
    pub w: &'a B::Buf,
}

impl<B: Backend + ?Sized> Clone for ConvOp<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend + ?Sized> Copy for ConvOp<'_, B> {}

/// A convolution and the eval-mode batch norm after it, one of the two layers of
/// [`Backend::conv2d_bn_eval_pair_forward`]: the convolution, its batch norm, and room for
/// the convolution's output where the two run apart.
pub struct ConvBnEval<'a, B: Backend + ?Sized> {
    pub conv: ConvOp<'a, B>,
    pub bn: BatchNormEval<'a, B::Buf>,
    pub conv_out: &'a mut B::Buf,
}

/// The kernels the model needs. A GPU backend implements the same trait; the model never
/// touches memory except through it.
///
/// Gradients of parameters live in one buffer, the model's gradient arena (llm.c's
/// `grads_memory`), so that data-parallel ranks average all of them with one all-reduce: the
/// ops that write or read a parameter's gradient take the arena `grads` and the gradient's
/// offset in it (`dw_at`, ...), in values.
pub trait Backend: Send + Sync + 'static {
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
    /// The buffer itself when it is host memory (the CPU backend's), so that host-side code
    /// (an MPI exchange) can work on it without copies; `None` on a device.
    fn host_mut<'b>(&self, _buf: &'b mut Self::Buf) -> Option<&'b mut [f32]> {
        None
    }

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
    /// `y = relu?(bn(conv(x, w)) + residual?)` with `bn` in eval mode: inference's
    /// convolution and batch norm in one pass where the backend has one (the CPU's direct bf16
    /// convolutions apply the batch norm as they write their outputs, so the convolution's
    /// output never goes through memory); elsewhere the two ops, the convolution's output in
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
        let s = conv.g.output();
        let (gamma, beta, mean, var) = (bn.gamma, bn.beta, bn.running_mean, bn.running_var);
        self.batch_norm_forward_eval(&s, conv_out, gamma, beta, mean, var, bn.eps, bn.residual, bn.relu, y);
    }
    /// Two [`Backend::conv2d_bn_eval_forward`] layers in a row (a residual block's inner path
    /// in inference): `y` = `second` of `first` of `x`, `mid` the first's output. A backend
    /// may hand that output to the second convolution without writing `mid` (the CPU's direct
    /// bf16 convolutions write it as bf16, already in the layout the second reads); `y` holds
    /// what the two calls give, bit for bit.
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
    /// dw = dL/dw (overwritten, at `dw_at` in `grads`); dx = dL/dx (overwritten) when asked for.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        conv: ConvOp<'_, Self>,
        x: &Self::Buf,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        grads: &mut Self::Buf,
        dw_at: usize,
        ws: &mut Self::Buf,
    );

    /// Training-mode batch norm over the rows of `x` (`[n*h*w, c]`), fused with an optional
    /// residual add and ReLU: y = relu?(bn(x) + residual?). Writes the batch mean and
    /// 1/sqrt(var+eps) into `saved` (`[2c]`) and updates the running statistics as PyTorch does
    /// (biased variance normalises, unbiased variance goes into running_var). With `sync`, the
    /// statistics are those of the whole batch across the ranks (PyTorch's SyncBatchNorm).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward_train(
        &self,
        s: &Shape4,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        momentum: f32,
        eps: f32,
        saved: &mut Self::Buf,
        residual: Option<&Self::Buf>,
        relu: bool,
        y: &mut Self::Buf,
        sync: SyncStats<'_>,
    );
    /// Eval-mode batch norm with running statistics, same fusion as the training form.
    fn batch_norm_forward_eval(
        &self,
        s: &Shape4,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        eps: f32,
        residual: Option<&Self::Buf>,
        relu: bool,
        y: &mut Self::Buf,
    );
    /// Backward of training-mode batch norm: dx, dgamma and dbeta (at `dgamma_at`, `dbeta_at`
    /// in `grads`), all overwritten. When the
    /// forward pass fused a ReLU, `relu_out` is its output and `dy` is masked by it in place
    /// first (the residual branch of a block reads the masked gradient). With `sync`, dx is
    /// the gradient through the whole batch's statistics; dgamma and dbeta stay this rank's
    /// sums (the gradient all-reduce averages them with the rest).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        s: &Shape4,
        x: &Self::Buf,
        gamma: &Self::Buf,
        saved: &Self::Buf,
        relu_out: Option<&Self::Buf>,
        dy: &mut Self::Buf,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
        dgamma_at: usize,
        dbeta_at: usize,
        sync: SyncStats<'_>,
    );
    /// `y[r, ch] += bias[ch]` for each of `rows` rows of `c` channels (a conv's or linear's bias).
    fn bias_add(&self, rows: usize, c: usize, bias: &Self::Buf, y: &mut Self::Buf);
    /// `db[ch]` = the sum over `rows` rows of `dy[r, ch]` (overwritten, at `db_at` in `grads`).
    fn bias_grad(&self, rows: usize, c: usize, dy: &Self::Buf, grads: &mut Self::Buf, db_at: usize);
    /// y = max(x, 0) over `len` values.
    fn relu_forward(&self, len: usize, x: &Self::Buf, y: &mut Self::Buf);
    /// dx = dy where the forward output `y` is positive, else 0.
    fn relu_backward(&self, len: usize, y: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// dst += src.
    fn add_assign(&self, len: usize, src: &Self::Buf, dst: &mut Self::Buf);

    fn max_pool_forward(&self, g: &PoolGeom, x: &Self::Buf, y: &mut Self::Buf);
    /// dx (overwritten) from dy, given the forward input `x` and output `y`; the window's first
    /// maximum takes the gradient, as in PyTorch.
    fn max_pool_backward(&self, g: &PoolGeom, x: &Self::Buf, y: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// Mean over h and w: `[n, h, w, c]` -> `[n, c]`.
    fn global_avg_pool_forward(&self, s: &Shape4, x: &Self::Buf, y: &mut Self::Buf);
    fn global_avg_pool_backward(&self, s: &Shape4, dy: &Self::Buf, dx: &mut Self::Buf);

    /// y[n, out] = x[n, in] * w[out, in]^T + b.
    fn linear_forward(
        &self,
        n: usize,
        din: usize,
        dout: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
    );
    /// dx, and dw and db at `dw_at` and `db_at` in `grads` (all overwritten).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        n: usize,
        din: usize,
        dout: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        grads: &mut Self::Buf,
        dw_at: usize,
        db_at: usize,
    );
    /// Mean softmax cross-entropy of `logits` (`[n, classes]`) against `labels`, with
    /// PyTorch's label smoothing (the target is `(1 - s) * onehot + s / classes`); writes the
    /// loss into `loss[0]` and dL/dlogits into `dlogits`.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        n: usize,
        classes: usize,
        logits: &Self::Buf,
        labels: &[u32],
        label_smoothing: f32,
        loss: &mut Self::Buf,
        dlogits: &mut Self::Buf,
    );

    /// Records `step` in `watch[0]` and the loss in `watch[1]` the first time `loss[0]` is not
    /// finite (while `watch[0]` is still 0). The host reads `watch` now and then instead of the
    /// loss after every step, and still learns the exact step a run diverged at.
    fn watch_loss(&self, loss: &Self::Buf, step: u64, watch: &mut Self::Buf);

    /// One Adam step on `param` (its gradient at `grad_at` in `grads`) with state `m`, `v`.
    #[allow(clippy::too_many_arguments)]
    fn adam_step(
        &self,
        len: usize,
        h: &AdamStep,
        param: &mut Self::Buf,
        grads: &Self::Buf,
        grad_at: usize,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
    );
    /// One SGD step on `param` (its gradient at `grad_at` in `grads`) with momentum buffer `buf`.
    fn sgd_step(
        &self,
        len: usize,
        h: &SgdStep,
        param: &mut Self::Buf,
        grads: &Self::Buf,
        grad_at: usize,
        buf: &mut Self::Buf,
    );
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
