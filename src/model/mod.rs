//! Model definitions built from `nn` layers.

pub mod file;
pub mod network;
pub mod resnet;
pub mod sequential;
pub mod summary;
pub mod torchvision;

pub use file::CheckpointFile;
pub use network::{Arch, Network, build};
pub use resnet::{ResNet, ResNetConfig, Stem};
pub use sequential::Sequential;
pub use summary::{PlanOf, Summary, summarize, summarize_arch, summarize_sequential};
