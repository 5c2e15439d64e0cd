//! Multiplication by a constant (airbench's `Mul(scale)` on the logits): no parameters, and
//! nothing in the state_dict.

use crate::engine::{Backend, ensure_len};

pub struct Scale<B: Backend> {
    pub factor: f32,
    /// Output of the last forward pass.
    pub out: B::Buf,
    len: usize,
}

impl<B: Backend> Scale<B> {
    pub fn new(be: &B, factor: f32) -> Self {
        Self {
            factor,
            out: be.alloc(0),
            len: 0,
        }
    }

    pub fn forward(&mut self, be: &B, x: &B::Buf, len: usize) {
        ensure_len(be, &mut self.out, len);
        self.len = len;
        be.scale(len, self.factor, x, &mut self.out);
    }

    pub fn backward(&self, be: &B, dy: &B::Buf, dx: &mut B::Buf) {
        ensure_len(be, dx, self.len);
        be.scale(self.len, self.factor, dy, dx);
    }
}
