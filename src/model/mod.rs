//! Model definitions built from `nn` layers.

pub mod resnet;
pub mod summary;

pub use resnet::{ResNet, ResNetConfig, Stem};
pub use summary::{Summary, summarize};
