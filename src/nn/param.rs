//! Parameters and buffers with their PyTorch state_dict names, and the visitor that walks a
//! module's state in state_dict order (for optimizers, checkpoints and tests alike).

use crate::engine::{Backend, GradSlots, Layout, ParamStep};

/// A float tensor of the model state: a trainable parameter (with a gradient) or a buffer
/// such as a BatchNorm running statistic (without).
pub struct Param<B: Backend> {
    /// Full state_dict key, e.g. `conv2.0.layer.1.weight`.
    pub name: String,
    /// Shape as PyTorch reports it.
    pub shape: Vec<usize>,
    pub layout: Layout,
    pub value: B::Buf,
    /// For trainable parameters, where the backward pass writes the gradient: the offset (in
    /// values) of its `numel()` values in the model's gradient arena.
    pub grad: Option<usize>,
    /// A trainable parameter the optimizer leaves as it is (`--freeze-backbone`, airbench's
    /// whitening filters and batch-norm scales; PyTorch's `requires_grad = False`). Its
    /// gradient is never read; layers skip computing it where that saves work.
    pub frozen: bool,
    /// A batch norm's scale or shift: the parameter group to which airbench gives its own
    /// learning rate (`SgdConfig::norm_lr_scale`).
    pub norm: bool,
}

impl<B: Backend> Param<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// This parameter's optimizer step: its values and its gradient in the arena `grads`.
    pub fn step<'a>(&'a mut self, grads: &'a B::Buf) -> ParamStep<'a, B::Buf> {
        ParamStep {
            len: self.numel(),
            param: &mut self.value,
            grads,
            grad_at: self.grad.expect("a trainable parameter"),
        }
    }

    /// Where this layer's gradients go: this parameter's slot in the arena `grads`, and the
    /// bias's, if given.
    pub fn grad_slots<'a>(&self, grads: &'a mut B::Buf, bias: Option<&Param<B>>) -> GradSlots<'a, B::Buf> {
        GradSlots {
            arena: grads,
            weight: self.grad.expect("a trainable parameter"),
            bias: bias.map(|b| b.grad.expect("a trainable parameter")),
        }
    }

    pub fn trainable(&self) -> bool {
        self.grad.is_some()
    }

    /// PyTorch-layout values -> engine layout.
    pub fn from_torch_layout(&self, torch: &[f32]) -> Vec<f32> {
        if self.layout == Layout::Torch {
            return torch.to_vec();
        }
        let mut out = vec![0.0; torch.len()];
        for (src, &v) in torch.iter().enumerate() {
            out[self.layout.offset(&self.shape, src)] = v;
        }
        out
    }

    /// Engine-layout values -> PyTorch layout.
    pub fn to_torch_layout(&self, engine: &[f32]) -> Vec<f32> {
        if self.layout == Layout::Torch {
            return engine.to_vec();
        }
        let mut out = vec![0.0; engine.len()];
        for (dst, v) in out.iter_mut().enumerate() {
            *v = engine[self.layout.offset(&self.shape, dst)];
        }
        out
    }

    /// The value in PyTorch's layout, on the host.
    pub fn read(&self, backend: &B) -> Vec<f32> {
        let mut host = vec![0.0; self.numel()];
        backend.download(&self.value, &mut host);
        self.to_torch_layout(&host)
    }

    /// The gradient in PyTorch's layout, on the host, from the model's gradient arena `grads`
    /// (None for buffers).
    pub fn read_grad(&self, backend: &B, grads: &B::Buf) -> Option<Vec<f32>> {
        let at = self.grad?;
        let mut host = vec![0.0; at + self.numel()];
        backend.download(grads, &mut host);
        Some(self.to_torch_layout(&host[at..]))
    }

    /// Sets the value from PyTorch-layout data; the length must match.
    pub fn write(&mut self, backend: &B, torch: &[f32]) {
        assert_eq!(torch.len(), self.numel(), "{}: wrong number of values", self.name);
        backend.upload(&self.from_torch_layout(torch), &mut self.value);
    }
}

/// `[o, i, y, x]` of flat index `flat` in a PyTorch `[o, i, kh, kw]` tensor.
/// One entry of a module's state, in state_dict order.
pub enum Entry<'a, B: Backend> {
    Tensor(&'a mut Param<B>),
    /// An integer buffer (BatchNorm's `num_batches_tracked`, int64 in PyTorch).
    Counter {
        name: &'a str,
        value: &'a mut i64,
    },
}

impl<B: Backend> Entry<'_, B> {
    pub fn name(&self) -> &str {
        match self {
            Entry::Tensor(p) => &p.name,
            Entry::Counter { name, .. } => name,
        }
    }
}

/// Anything holding model state. `visit` walks every entry in PyTorch's state_dict order.
pub trait Module<B: Backend> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>));

    /// Every parameter the optimizer updates (trainable and not frozen), in state_dict order.
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<B>)) {
        self.visit_trainable(&mut |p| {
            if !p.frozen {
                f(p)
            }
        });
    }

    /// Whether the optimizer updates any parameter here: where none is updated below a layer,
    /// no gradient needs to flow there (PyTorch's autograd computes none).
    fn trains(&mut self) -> bool {
        let mut any = false;
        self.visit_params(&mut |_| any = true);
        any
    }

    /// Every trainable parameter, frozen or not, in state_dict order: what an optimizer keeps
    /// its state for, so that freezing one for a while (airbench's whitening bias after its
    /// epochs) leaves the others' state where it was.
    fn visit_trainable(&mut self, f: &mut dyn FnMut(&mut Param<B>)) {
        self.visit(&mut |e| {
            if let Entry::Tensor(p) = e
                && p.trainable()
            {
                f(p)
            }
        });
    }

    /// Freezes every trainable parameter whose name does not start with `keep` (a module
    /// path such as `fc`): only that module trains (what the model froze itself stays so).
    fn freeze_all_but(&mut self, keep: &str) {
        let prefix = format!("{keep}.");
        self.visit(&mut |e| {
            if let Entry::Tensor(p) = e {
                p.frozen |= p.trainable() && !p.name.starts_with(&prefix);
            }
        });
    }
}

/// A borrowed module is a module (a model lends out parts of itself this way).
impl<B: Backend, M: Module<B> + ?Sized> Module<B> for &mut M {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        (**self).visit(f)
    }
}
