//! Parameters and buffers with their PyTorch state_dict names, and the visitor that walks a
//! module's state in state_dict order (for optimizers, checkpoints and tests alike).

use crate::engine::Backend;

/// How a tensor is laid out inside the engine relative to PyTorch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Same as PyTorch (row-major in PyTorch's shape).
    Torch,
    /// A conv weight PyTorch holds as `[out, in, kh, kw]`, stored `[kh, kw, in, out]` (HWIO):
    /// the CPU backend's GEMM reads it as a `[k, out]` matrix without packing.
    ConvHwio,
    /// A conv weight stored `[out, kh, kw, in]` (OHWI): cuDNN's NHWC filter layout.
    ConvOhwi,
    /// A linear weight `[out, c*h*w]` that reads a flattened activation: PyTorch flattens NCHW
    /// (`c, y, x` order), the engine NHWC (`y, x, c`), so the columns are permuted.
    LinearNhwc { h: usize, w: usize, c: usize },
}

impl Layout {
    /// Engine offset of PyTorch's element `[o, i, y, x]` of a `[o, i, kh, kw]` conv weight.
    fn conv_offset(self, [o, i, kh, kw]: [usize; 4], [oc, ic, y, x]: [usize; 4]) -> usize {
        match self {
            Layout::ConvHwio => ((y * kw + x) * i + ic) * o + oc,
            Layout::ConvOhwi => ((oc * kh + y) * kw + x) * i + ic,
            Layout::Torch | Layout::LinearNhwc { .. } => unreachable!("not a conv layout"),
        }
    }

    /// Engine offset of PyTorch's element `flat` of a tensor of `shape`.
    fn offset(self, shape: &[usize], flat: usize) -> usize {
        match self {
            Layout::Torch => flat,
            Layout::LinearNhwc { h, w, c } => {
                let din = h * w * c;
                let (o, col) = (flat / din, flat % din);
                let (ch, y, x) = (col / (h * w), col / w % h, col % w);
                o * din + (y * w + x) * c + ch
            }
            _ => {
                let dims = conv_dims(shape);
                self.conv_offset(dims, torch_index(dims, flat))
            }
        }
    }
}

/// A float tensor of the model state: a trainable parameter (with a gradient) or a buffer
/// such as a BatchNorm running statistic (without).
pub struct Param<B: Backend> {
    /// Full state_dict key, e.g. `conv2.0.layer.1.weight`.
    pub name: String,
    /// Shape as PyTorch reports it.
    pub shape: Vec<usize>,
    pub layout: Layout,
    pub value: B::Buf,
    /// `Some` for trainable parameters; written by the backward pass.
    pub grad: Option<B::Buf>,
}

impl<B: Backend> Param<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
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

    /// The gradient in PyTorch's layout, on the host (None for buffers).
    pub fn read_grad(&self, backend: &B) -> Option<Vec<f32>> {
        let grad = self.grad.as_ref()?;
        let mut host = vec![0.0; self.numel()];
        backend.download(grad, &mut host);
        Some(self.to_torch_layout(&host))
    }

    /// Sets the value from PyTorch-layout data; the length must match.
    pub fn write(&mut self, backend: &B, torch: &[f32]) {
        assert_eq!(torch.len(), self.numel(), "{}: wrong number of values", self.name);
        backend.upload(&self.from_torch_layout(torch), &mut self.value);
    }
}

/// `[o, i, y, x]` of flat index `flat` in a PyTorch `[o, i, kh, kw]` tensor.
fn torch_index([_, i, kh, kw]: [usize; 4], flat: usize) -> [usize; 4] {
    [flat / (i * kh * kw), flat / (kh * kw) % i, flat / kw % kh, flat % kw]
}

fn conv_dims(shape: &[usize]) -> [usize; 4] {
    match *shape {
        [o, i, kh, kw] => [o, i, kh, kw],
        _ => panic!("conv weight must be 4-D, got {shape:?}"),
    }
}

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

    /// Every trainable parameter, in state_dict order.
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<B>)) {
        self.visit(&mut |e| {
            if let Entry::Tensor(p) = e
                && p.trainable()
            {
                f(p)
            }
        });
    }
}
