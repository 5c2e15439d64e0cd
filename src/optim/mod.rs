//! Optimizers with PyTorch's exact update rules, and learning-rate schedules.

pub mod adam;
pub mod schedule;
pub mod sgd;

pub use adam::{Adam, AdamConfig};
pub use schedule::Schedule;
pub use sgd::{Sgd, SgdConfig};

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

/// The weight decay of parameter `p`: none for 1-D tensors (norm weights, biases) unless
/// `decay_1d`.
fn decay_for<B: crate::engine::Backend>(p: &crate::nn::Param<B>, weight_decay: f64, decay_1d: bool) -> f64 {
    if p.shape.len() == 1 && !decay_1d {
        0.0
    } else {
        weight_decay
    }
}
