//! Model definitions built from `nn` layers.

pub mod resnet;

pub use resnet::{ResNet, ResNetConfig, Stem};
