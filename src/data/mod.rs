//! The data side: one dataset description (`Dataset`: images, labels, class names, image size,
//! normalisation) made by one reader per format (CIFAR-10, CIFAR-100, image folders), the
//! downloads, the seed's transforms and the loader. Nothing outside this module knows which
//! dataset a run trains on.

pub mod cifar;
pub mod dataset;
pub mod fetch;
pub mod folder;
pub mod images;
pub mod loader;
pub mod shard;
pub mod transform;

pub use cifar::{CLASS_NAMES, Cifar10, Cifar100, DataError};
pub use dataset::{DataOptions, DataSpec, Dataset, Format, LabelSet, Splits, ValSplit, open};
pub use images::{CHANNELS, Images, Normalization};
pub use loader::{EpochPlan, eval_batches, spawn_loader};
pub use shard::Shard;
pub use transform::{Augment, Batch, BatchKey};
