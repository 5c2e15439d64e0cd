//! `resnet-cifar export`: a trained network as an ONNX model, for runtimes without PyTorch or
//! resnet-cifar (onnxruntime, TensorRT, browsers, phones).
//!
//! The graph is the network in eval mode (running batch-norm statistics) on NCHW float32
//! images normalised as in training; it ends in the logits. Everything a user needs to feed it
//! travels in the model's `metadata_props`: the class names, the normalisation and the image
//! size.

use crate::data::DataSpec;
use crate::engine::Backend;
use crate::model::Network;
use crate::onnx::{Graph, ModelInfo, OPSETS, encode};

/// ONNX's operator set written when none is asked for (what `torch.onnx.export` writes).
pub const DEFAULT_OPSET: i64 = 17;

/// The input and output names of every exported model.
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "logits";

pub struct OnnxOptions {
    pub opset: i64,
    /// A fixed batch size; `None` leaves the batch dimension dynamic.
    pub batch: Option<usize>,
}

impl OnnxOptions {
    /// Refuses what the writer cannot express, in one line.
    pub fn check(&self) -> Result<(), String> {
        if !OPSETS.contains(&self.opset) {
            return Err(format!(
                "opset {} cannot be written: resnet-cifar writes opsets {} to {}",
                self.opset,
                OPSETS.start(),
                OPSETS.end()
            ));
        }
        if self.batch == Some(0) {
            return Err("a fixed batch size must be at least 1".into());
        }
        Ok(())
    }
}

/// The model file's metadata: what the network was trained on and how to feed it, as JSON
/// values (`classes`, `mean`, `std`: arrays; `image_size`: a number), and `model`, the
/// architecture in words.
fn metadata(spec: &DataSpec, model: &str) -> Vec<(String, String)> {
    let json = |v: serde_json::Value| v.to_string();
    let side = spec.image_size;
    vec![
        ("classes".into(), json(serde_json::json!(spec.classes))),
        ("mean".into(), json(serde_json::json!(spec.norm.mean))),
        ("std".into(), json(serde_json::json!(spec.norm.std))),
        ("image_size".into(), side.to_string()),
        (
            "input".into(),
            format!(
                "float32 NCHW [batch, {}, {side}, {side}], RGB: pixel / 255 - mean, over std, per channel",
                crate::data::CHANNELS
            ),
        ),
        ("model".into(), model.to_string()),
    ]
}

/// The ONNX model file of `net` (weights as they are on `be`), trained on data `spec`
/// describes; `model` names the architecture in the file. `opts` must have passed
/// [`OnnxOptions::check`].
pub fn onnx<B: Backend>(be: &B, net: &dyn Network<B>, spec: &DataSpec, model: &str, opts: &OnnxOptions) -> Vec<u8> {
    let mut g = Graph::new(INPUT);
    let logits = net.onnx(be, &mut g, INPUT);
    let side = spec.image_size;
    let info = ModelInfo {
        opset: opts.opset,
        input: [3, side, side],
        output: (OUTPUT.into(), net.num_classes()),
        batch: opts.batch,
        graph_name: model.to_string(),
        metadata: metadata(spec, model),
    };
    encode(g, &logits, info)
}
