//! Neural-network building blocks over the engine: named parameters, a path-scoped builder,
//! and layers with explicit forward and backward passes that own their output buffers.

pub mod batch_norm;
pub mod builder;
pub mod conv2d;
pub mod cross_entropy;
pub mod gelu;
pub mod linear;
pub mod onnx;
pub mod param;
pub mod pool;
pub mod relu;
pub mod scale;
pub mod whiten;

pub use crate::engine::Layout;
pub use batch_norm::{BatchNorm2d, forward_pair};
pub use builder::Builder;
pub use conv2d::{Conv2d, Conv2dConfig};
pub use cross_entropy::CrossEntropy;
pub use gelu::Gelu;
pub use linear::Linear;
pub use param::{Entry, Module, Param};
pub use pool::{GlobalAvgPool, MaxPool2d};
pub use relu::Relu;
pub use scale::Scale;
