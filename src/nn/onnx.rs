//! Each layer's inference (eval-mode) computation as ONNX nodes on NCHW tensors, with its
//! parameters as initializers under their state_dict names (in PyTorch's layout, which is
//! ONNX's). A node is named after its layer's state_dict path (`conv2.0.layer.1`), so the
//! graph reads like the checkpoint.

use super::{BatchNorm2d, Conv2d, Gelu, GlobalAvgPool, Linear, MaxPool2d, Param, Relu, Scale};
use crate::engine::Backend;
use crate::onnx::Graph;

/// The initializer of `p` (its PyTorch-layout values), named as in the state_dict.
fn weight<B: Backend>(be: &B, g: &mut Graph, p: &Param<B>) -> String {
    g.weight(&p.name, &p.shape, &p.read(be))
}

/// The layer path of a parameter: `conv1.0` for `conv1.0.weight`.
fn layer_path<B: Backend>(p: &Param<B>) -> &str {
    p.name.rsplit_once('.').map_or(&p.name, |(path, _)| path)
}

impl<B: Backend> Conv2d<B> {
    pub fn onnx(&self, be: &B, g: &mut Graph, x: &str) -> String {
        let c = &self.cfg;
        let mut inputs = vec![weight(be, g, &self.weight)];
        if let Some(b) = &self.bias {
            inputs.push(weight(be, g, b));
        }
        let inputs: Vec<&str> = std::iter::once(x).chain(inputs.iter().map(String::as_str)).collect();
        let attributes = vec![
            Graph::ints("kernel_shape", &[c.kernel, c.kernel]),
            Graph::ints("strides", &[c.stride, c.stride]),
            Graph::ints("pads", &[c.pad; 4]),
        ];
        g.node("Conv", layer_path(&self.weight), &inputs, attributes)
    }
}

impl<B: Backend> BatchNorm2d<B> {
    /// Batch norm with the running statistics, then, as in [`BatchNorm2d::forward`], the
    /// `residual` added and the fused ReLU.
    pub fn onnx(&self, be: &B, g: &mut Graph, x: &str, residual: Option<&str>) -> String {
        let path = layer_path(&self.weight).to_string();
        let params = [&self.weight, &self.bias, &self.running_mean, &self.running_var].map(|p| weight(be, g, p));
        let inputs = [x, &params[0], &params[1], &params[2], &params[3]];
        let mut y = g.node(
            "BatchNormalization",
            &path,
            &inputs,
            vec![Graph::float("epsilon", self.eps)],
        );
        if let Some(r) = residual {
            y = g.node("Add", &format!("{path}.add"), &[&y, r], vec![]);
        }
        if self.relu {
            y = g.node("Relu", &format!("{path}.relu"), &[&y], vec![]);
        }
        y
    }
}

impl<B: Backend> Relu<B> {
    pub fn onnx(&self, g: &mut Graph, x: &str, path: &str) -> String {
        g.node("Relu", path, &[x], vec![])
    }
}

impl<B: Backend> Gelu<B> {
    /// PyTorch's exact GELU as opset-13 nodes: `x * (erf(x / sqrt 2) + 1) * 0.5`, the form
    /// `torch.onnx.export` writes below opset 20 (which has a Gelu operator).
    pub fn onnx(&self, g: &mut Graph, x: &str, path: &str) -> String {
        let sqrt2 = g.weight(&format!("{path}.sqrt2"), &[], &[std::f32::consts::SQRT_2]);
        let one = g.weight(&format!("{path}.one"), &[], &[1.0]);
        let half = g.weight(&format!("{path}.half"), &[], &[0.5]);
        let t = g.node("Div", &format!("{path}.div"), &[x, &sqrt2], vec![]);
        let t = g.node("Erf", &format!("{path}.erf"), &[&t], vec![]);
        let t = g.node("Add", &format!("{path}.add"), &[&t, &one], vec![]);
        let t = g.node("Mul", &format!("{path}.mul"), &[x, &t], vec![]);
        g.node("Mul", path, &[&t, &half], vec![])
    }
}

impl<B: Backend> Scale<B> {
    pub fn onnx(&self, g: &mut Graph, x: &str, path: &str) -> String {
        let factor = g.weight(&format!("{path}.scale"), &[], &[self.factor]);
        g.node("Mul", path, &[x, &factor], vec![])
    }
}

impl<B: Backend> MaxPool2d<B> {
    /// PyTorch's max-pool: padding never wins (ONNX pads with -infinity too), floor rounding.
    pub fn onnx(&self, g: &mut Graph, x: &str, path: &str) -> String {
        let attributes = vec![
            Graph::ints("kernel_shape", &[self.kernel, self.kernel]),
            Graph::ints("strides", &[self.stride, self.stride]),
            Graph::ints("pads", &[self.pad; 4]),
        ];
        g.node("MaxPool", path, &[x], attributes)
    }
}

impl<B: Backend> GlobalAvgPool<B> {
    /// Averages each channel map to one value: `[n, c, h, w]` -> `[n, c]`.
    pub fn onnx(&self, g: &mut Graph, x: &str, path: &str) -> String {
        let pooled = g.node("GlobalAveragePool", path, &[x], vec![]);
        g.node(
            "Flatten",
            &format!("{path}.flatten"),
            &[&pooled],
            vec![Graph::int("axis", 1)],
        )
    }
}

impl<B: Backend> Linear<B> {
    /// `x W^T + b`; a feature map `x` is flattened first in NCHW order (PyTorch's `flatten`,
    /// which the stored weight expects).
    pub fn onnx(&self, be: &B, g: &mut Graph, x: &str, flatten: bool) -> String {
        let path = layer_path(&self.weight).to_string();
        let x = if flatten {
            g.node("Flatten", &format!("{path}.flatten"), &[x], vec![Graph::int("axis", 1)])
        } else {
            x.to_string()
        };
        let w = weight(be, g, &self.weight);
        match &self.bias {
            Some(b) => {
                let b = weight(be, g, b);
                g.node("Gemm", &path, &[&x, &w, &b], vec![Graph::int("transB", 1)])
            }
            None => g.node("Gemm", &path, &[&x, &w], vec![Graph::int("transB", 1)]),
        }
    }
}
