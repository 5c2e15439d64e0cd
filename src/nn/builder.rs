//! Path-scoped construction of parameters (after candle-nn's `VarBuilder`): `b.pp("conv2")
//! .pp("0")` prefixes every name made below it, so PyTorch's state_dict keys fall out of the
//! model's structure. Initial values follow PyTorch's default initialisers, drawn from one seeded
//! RNG in construction order (the order PyTorch's modules initialise in).

use super::param::Param;
use crate::engine::Backend;
use crate::engine::Layout;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

pub struct Builder<'a, B: Backend> {
    backend: &'a B,
    prefix: String,
    rng: Rc<RefCell<ChaCha8Rng>>,
    /// Values of the gradient arena handed out so far (shared by every scoped builder).
    grad_len: Rc<Cell<usize>>,
}

/// Gradients start at multiples of 16 values (64 bytes, a cache line and an AVX-512 vector).
const GRAD_ALIGN: usize = 16;

impl<'a, B: Backend> Builder<'a, B> {
    pub fn new(backend: &'a B, seed: u64) -> Self {
        Self {
            backend,
            prefix: String::new(),
            rng: Rc::new(RefCell::new(ChaCha8Rng::seed_from_u64(seed))),
            grad_len: Rc::new(Cell::new(0)),
        }
    }

    /// The size of the gradient arena for every trainable parameter made so far: the model
    /// allocates it once they are all made.
    pub fn grad_len(&self) -> usize {
        self.grad_len.get()
    }

    pub fn backend(&self) -> &'a B {
        self.backend
    }

    /// A builder whose names are prefixed by `name.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            backend: self.backend,
            prefix,
            rng: self.rng.clone(),
            grad_len: self.grad_len.clone(),
        }
    }

    pub fn path(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{}", self.prefix, leaf)
        }
    }

    fn make(&self, leaf: &str, shape: &[usize], layout: Layout, torch_values: &[f32], trainable: bool) -> Param<B> {
        let numel = shape.iter().product();
        let mut p = Param {
            name: self.path(leaf),
            shape: shape.to_vec(),
            layout,
            value: self.backend.alloc(numel),
            grad: trainable.then(|| {
                let at = self.grad_len.get();
                self.grad_len.set((at + numel).next_multiple_of(GRAD_ALIGN));
                at
            }),
            frozen: false,
            norm: false,
        };
        p.write(self.backend, torch_values);
        p
    }

    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's `kaiming_uniform_(a=sqrt(5))` for conv and
    /// linear weights, and its default for the linear bias. Values are drawn in PyTorch's
    /// element order whatever the engine layout.
    pub fn uniform_fan_in(&self, leaf: &str, shape: &[usize], fan_in: usize, layout: Layout) -> Param<B> {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let numel: usize = shape.iter().product();
        let values: Vec<f32> = {
            let mut rng = self.rng.borrow_mut();
            (0..numel).map(|_| rng.random_range(-bound..bound)).collect()
        };
        self.make(leaf, shape, layout, &values, true)
    }

    /// A tensor filled with `value`; trainable or a buffer.
    pub fn constant(&self, leaf: &str, shape: &[usize], value: f32, trainable: bool) -> Param<B> {
        let numel: usize = shape.iter().product();
        self.make(leaf, shape, Layout::Torch, &vec![value; numel], trainable)
    }
}
