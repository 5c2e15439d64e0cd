//! resnet-cifar: train ResNet-18 on CIFAR-10 (and CIFAR-100, or your own images) with a small
//! engine made for CNN training.
//!
//! Layers, from the bottom: `engine` (the backend trait and its CPU kernels), `nn` (parameters
//! with PyTorch names, and layers with explicit forward and backward), `model` (ResNet-18),
//! `optim` (Adam, SGD, learning-rate schedules), `checkpoint` (safetensors state_dicts).

pub mod atomic_file;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod engine;
pub mod eval;
pub mod export;
pub mod model;
pub mod named;
pub mod nn;
pub mod onnx;
pub mod optim;
pub mod plot;
pub mod predict;
#[doc(hidden)]
pub mod test_support;
pub mod train;
