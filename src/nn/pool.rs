//! Pooling layers: MaxPool2d (PyTorch semantics) and adaptive average pooling to 1x1.

use crate::engine::{Backend, PoolGeom, Shape4, ensure_len};

pub struct MaxPool2d<B: Backend> {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    pub out: B::Buf,
    geom: Option<PoolGeom>,
}

impl<B: Backend> MaxPool2d<B> {
    pub fn new(be: &B, kernel: usize, stride: usize, pad: usize) -> Self {
        Self {
            kernel,
            stride,
            pad,
            out: be.alloc(0),
            geom: None,
        }
    }

    pub fn forward(&mut self, be: &B, x: &B::Buf, input: Shape4) -> Shape4 {
        let g = PoolGeom {
            input,
            k: self.kernel,
            stride: self.stride,
            pad: self.pad,
        };
        ensure_len(be, &mut self.out, g.output().numel());
        be.max_pool_forward(&g, x, &mut self.out);
        self.geom = Some(g);
        g.output()
    }

    pub fn backward(&self, be: &B, x: &B::Buf, dy: &B::Buf, dx: &mut B::Buf) {
        let g = self.geom.expect("max-pool backward before forward");
        ensure_len(be, dx, g.input.numel());
        be.max_pool_backward(&g, x, &self.out, dy, dx);
    }
}

/// AdaptiveAvgPool2d((1, 1)) followed by flatten: `[n, h, w, c]` -> `[n, c]`.
pub struct GlobalAvgPool<B: Backend> {
    pub out: B::Buf,
    input: Shape4,
}

impl<B: Backend> GlobalAvgPool<B> {
    pub fn new(be: &B) -> Self {
        Self {
            out: be.alloc(0),
            input: Shape4::default(),
        }
    }

    pub fn forward(&mut self, be: &B, x: &B::Buf, input: Shape4) {
        ensure_len(be, &mut self.out, input.n * input.c);
        self.input = input;
        be.global_avg_pool_forward(&input, x, &mut self.out);
    }

    pub fn backward(&self, be: &B, dy: &B::Buf, dx: &mut B::Buf) {
        ensure_len(be, dx, self.input.numel());
        be.global_avg_pool_backward(&self.input, dy, dx);
    }
}
