//! The training loss as a layer: mean cross-entropy of logits against labels (PyTorch's
//! `CrossEntropyLoss`, with its `label_smoothing`), computed together with its gradient so
//! that every network starts its backward pass the same way.

use crate::engine::{Backend, Targets, ensure_len};

pub struct CrossEntropy<B: Backend> {
    /// Label smoothing (0 is plain cross-entropy).
    pub label_smoothing: f32,
    /// Factor on the gradient (not on the loss): 1; a data-parallel rank's weight when the
    /// ranks' slices of a batch differ in size; the batch's size for a summed loss.
    pub grad_scale: f32,
    scaled: B::Buf,
    /// The mean loss of the last batch, left on the device so that a step needs no host
    /// round trip.
    pub loss: B::Buf,
}

impl<B: Backend> CrossEntropy<B> {
    pub fn new(be: &B) -> Self {
        Self {
            label_smoothing: 0.0,
            grad_scale: 1.0,
            scaled: be.alloc(0),
            loss: be.alloc(1),
        }
    }

    /// The loss of `logits` (`[labels.len(), classes]`) into [`Self::loss`], and its gradient
    /// with respect to the logits into `dlogits` (grown to fit).
    pub fn forward_backward(&mut self, be: &B, logits: &B::Buf, classes: usize, labels: &[u32], dlogits: &mut B::Buf) {
        let n = labels.len();
        ensure_len(be, dlogits, n * classes);
        let targets = Targets {
            labels,
            classes,
            label_smoothing: self.label_smoothing,
        };
        be.cross_entropy(logits, &targets, &mut self.loss, dlogits);
        if self.grad_scale != 1.0 {
            ensure_len(be, &mut self.scaled, n * classes);
            be.scale(n * classes, self.grad_scale, dlogits, &mut self.scaled);
            be.scale(n * classes, 1.0, &self.scaled, dlogits);
        }
    }
}
