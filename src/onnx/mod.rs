//! ONNX models written from our networks: the protobuf types generated from ONNX's own schema
//! (`proto`, by `prost` from the vendored `proto/onnx.proto`) and a small graph builder the
//! layers describe themselves into (`nn`'s `onnx` methods).
//!
//! This module knows the ONNX format and nothing of ours: no layer, model or dataset.

mod graph;

pub use graph::{Graph, ModelInfo, OPSETS, encode};

/// The ONNX schema's messages (`ModelProto`, `GraphProto`, `NodeProto`, ...), generated at build
/// time.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
