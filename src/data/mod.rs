//! CIFAR-10: the binary-format reader, the download, the seed's transforms and the loader.

pub mod cifar;
pub mod fetch;
pub mod loader;
pub mod transform;

pub use cifar::{CLASS_NAMES, Cifar10, DataError, Images, Splits};
pub use loader::{EpochPlan, eval_batches, spawn_loader};
pub use transform::{Augment, Batch, BatchKey};
