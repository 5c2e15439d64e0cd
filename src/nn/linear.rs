//! Linear layer, with a bias or without (PyTorch's `bias=False`), PyTorch's `[out, in]` weight
//! layout and default initialisation.

use super::builder::Builder;
use super::param::{Entry, Module, Param};
use crate::engine::Layout;
use crate::engine::{Backend, LinearDims, ensure_len};

pub struct Linear<B: Backend> {
    pub din: usize,
    pub dout: usize,
    pub weight: Param<B>,
    pub bias: Option<Param<B>>,
    /// Output of the last forward pass, `[n, dout]`.
    pub out: B::Buf,
    n: usize,
}

impl<B: Backend> Linear<B> {
    pub fn new(b: &Builder<B>, din: usize, dout: usize) -> Self {
        Self::with_layout(b, din, dout, Layout::Torch)
    }

    /// A linear layer whose weight is stored in `layout` (e.g. reading a flattened NHWC
    /// activation while PyTorch's weight expects NCHW order).
    pub fn with_layout(b: &Builder<B>, din: usize, dout: usize, layout: Layout) -> Self {
        let weight = b.uniform_fan_in("weight", &[dout, din], din, layout);
        let bias = Some(b.uniform_fan_in("bias", &[dout], din, Layout::Torch));
        Self {
            din,
            dout,
            weight,
            bias,
            out: b.backend().alloc(0),
            n: 0,
        }
    }

    /// The same layer without its bias (PyTorch's `bias=False`), the weight as it was made.
    pub fn without_bias(self) -> Self {
        Self { bias: None, ..self }
    }

    pub fn forward(&mut self, be: &B, x: &B::Buf, n: usize) {
        ensure_len(be, &mut self.out, n * self.dout);
        self.n = n;
        let (w, b) = (&self.weight.value, self.bias.as_ref().map(|b| &b.value));
        be.linear_forward(self.dims(), x, w, b, &mut self.out);
    }

    /// Writes dx, and the weight and bias gradients into the gradient arena `grads`.
    pub fn backward(&mut self, be: &B, x: &B::Buf, dy: &B::Buf, dx: &mut B::Buf, grads: &mut B::Buf) {
        ensure_len(be, dx, self.n * self.din);
        let slots = self.weight.grad_slots(grads, self.bias.as_ref());
        be.linear_backward(self.dims(), x, &self.weight.value, dy, dx, slots);
    }

    /// The sizes of the last forward pass's product.
    fn dims(&self) -> LinearDims {
        LinearDims {
            n: self.n,
            din: self.din,
            dout: self.dout,
        }
    }
}

impl<B: Backend> Module<B> for Linear<B> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        f(Entry::Tensor(&mut self.weight));
        if let Some(b) = &mut self.bias {
            f(Entry::Tensor(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;

    /// A layer without a bias has no `bias` in its state_dict and computes `x W^T` alone.
    #[test]
    fn a_layer_without_bias_has_only_its_weight() {
        let be = Cpu::default();
        let b = Builder::new(&be, 0);
        let mut fc = Linear::new(&b.pp("7"), 3, 2).without_bias();
        let mut names = Vec::new();
        fc.visit(&mut |e| names.push(e.name().to_string()));
        assert_eq!(names, ["7.weight"]);
        fc.weight.value = vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.0];
        fc.forward(&be, &vec![1.0, 1.0, 2.0], 1);
        assert_eq!(fc.out[..2], [9.0, -0.5]);
    }
}
