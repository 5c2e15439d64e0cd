//! GELU as its own layer (PyTorch's `nn.GELU()`, the exact erf form).

use crate::engine::{Backend, ensure_len};

pub struct Gelu<B: Backend> {
    /// Output of the last forward pass.
    pub out: B::Buf,
    len: usize,
}

impl<B: Backend> Gelu<B> {
    pub fn new(be: &B) -> Self {
        Self {
            out: be.alloc(0),
            len: 0,
        }
    }

    pub fn forward(&mut self, be: &B, x: &B::Buf, len: usize) {
        ensure_len(be, &mut self.out, len);
        self.len = len;
        be.gelu_forward(len, x, &mut self.out);
    }

    /// `x` is the input of the last forward pass (GELU's slope is a function of it).
    pub fn backward(&self, be: &B, x: &B::Buf, dy: &B::Buf, dx: &mut B::Buf) {
        ensure_len(be, dx, self.len);
        be.gelu_backward(self.len, x, dy, dx);
    }
}
