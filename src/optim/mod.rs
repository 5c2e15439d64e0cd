//! Optimizers with PyTorch's exact update rules, and learning-rate schedules.

pub mod adam;
pub mod schedule;
pub mod sgd;

pub use adam::{Adam, AdamConfig};
pub use schedule::Schedule;
pub use sgd::{Sgd, SgdConfig};
