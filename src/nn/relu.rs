//! ReLU as its own layer (where no batch norm precedes it to fuse with).

use crate::engine::{Backend, ensure_len};

pub struct Relu<B: Backend> {
    /// Output of the last forward pass.
    pub out: B::Buf,
    len: usize,
}

impl<B: Backend> Relu<B> {
    pub fn new(be: &B) -> Self {
        Self {
            out: be.alloc(0),
            len: 0,
        }
    }

    pub fn forward(&mut self, be: &B, x: &B::Buf, len: usize) {
        ensure_len(be, &mut self.out, len);
        self.len = len;
        be.relu_forward(len, x, &mut self.out);
    }

    pub fn backward(&self, be: &B, dy: &B::Buf, dx: &mut B::Buf) {
        ensure_len(be, dx, self.len);
        be.relu_backward(self.len, &self.out, dy, dx);
    }
}
