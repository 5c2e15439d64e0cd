//! Plain feed-forward networks (a chain of layers, no branches): the seed's comparison models,
//! LeNet and VGG-16, and airbench's speed-run network. State names follow the PyTorch
//! definitions in `scripts/classic_models.py` (`features.N.*`, `classifier.N.*`, airbench's
//! `N.conv1.*`), so checkpoints move between the two.

use super::network::Network;
use crate::data::CHANNELS;
use crate::engine::{Backend, Layout, Shape4, StatsSum, ensure_len};
use crate::nn::{
    BatchNorm2d, Builder, Conv2d, Conv2dConfig, CrossEntropy, Entry, Gelu, Linear, MaxPool2d, Module, Relu, Scale,
};
use crate::onnx::Graph;

pub enum Layer<B: Backend> {
    Conv(Conv2d<B>),
    /// Batch norm, with the ReLU that follows it fused in.
    BatchNorm(BatchNorm2d<B>),
    Relu(Relu<B>),
    Gelu(Gelu<B>),
    MaxPool(MaxPool2d<B>),
    /// Flattens its input (NHWC) first.
    Linear(Linear<B>),
    Scale(Scale<B>),
}

impl<B: Backend> Layer<B> {
    fn out(&self) -> &B::Buf {
        match self {
            Layer::Conv(l) => &l.out,
            Layer::BatchNorm(l) => &l.out,
            Layer::Relu(l) => &l.out,
            Layer::Gelu(l) => &l.out,
            Layer::MaxPool(l) => &l.out,
            Layer::Linear(l) => &l.out,
            Layer::Scale(l) => &l.out,
        }
    }
}

pub struct Sequential<B: Backend> {
    /// The PyTorch class name (`LeNet`, `VGG16`, `Sequential`), for printing.
    pub title: &'static str,
    pub layers: Vec<Layer<B>>,
    /// Each layer's module path in the PyTorch module: `features.3`, `classifier`, `2.conv1`.
    /// A module used twice (airbench's `activ`) has its path twice.
    pub paths: Vec<String>,
    /// The class of each container module a path passes through (`features`: `Sequential`,
    /// `2`: `ConvGroup`), for printing.
    pub containers: Vec<(String, &'static str)>,
    classes: usize,
    /// Width and height of the input images.
    side: usize,
    /// Input shape of each layer in the last forward pass.
    shapes: Vec<Shape4>,
    grad: [B::Buf; 2],
    ws: B::Buf,
    /// The gradient arena: every parameter's gradient, at its `Param::grad`.
    param_grads: B::Buf,
    criterion: CrossEntropy<B>,
}

fn conv<B: Backend>(b: &Builder<B>, cin: usize, cout: usize, kernel: usize, pad: usize) -> Layer<B> {
    Layer::Conv(Conv2d::new(
        b,
        Conv2dConfig {
            cin,
            cout,
            kernel,
            stride: 1,
            pad,
            bias: true,
        },
    ))
}

impl<B: Backend> Sequential<B> {
    fn new(
        be: &B,
        title: &'static str,
        layers: Vec<(String, Layer<B>)>,
        (classes, side): (usize, usize),
        grad_len: usize,
    ) -> Self {
        let (paths, layers) = layers.into_iter().unzip();
        Self {
            title,
            paths,
            containers: Vec::new(),
            layers,
            classes,
            side,
            shapes: Vec::new(),
            grad: [be.alloc(0), be.alloc(0)],
            ws: be.alloc(0),
            param_grads: be.alloc(grad_len),
            criterion: CrossEntropy::new(be),
        }
    }

    /// The classic CIFAR-10 tutorial network: three 5x5 convs (3->32->32->64, pad 2), each
    /// followed by ReLU and a 2x2 max-pool, then linear 1024->64 (for 32x32 images; the
    /// feature map's size for others), ReLU, linear 64->classes.
    pub fn lenet(be: &B, classes: usize, side: usize, seed: u64) -> Self {
        let root = Builder::new(be, seed);
        let (f, c) = (root.pp("features"), root.pp("classifier"));
        let mut layers = Vec::new();
        for (i, (cin, cout)) in [(CHANNELS, 32), (32, 32), (32, 64)].into_iter().enumerate() {
            layers.push((format!("features.{}", 3 * i), conv(&f.pp(3 * i), cin, cout, 5, 2)));
            layers.push((format!("features.{}", 3 * i + 1), Layer::Relu(Relu::new(be))));
            let pool = Layer::MaxPool(MaxPool2d::new(be, 2, 2, 0));
            layers.push((format!("features.{}", 3 * i + 2), pool));
        }
        let s = side / 2 / 2 / 2;
        let flat = Layout::LinearNhwc { h: s, w: s, c: 64 };
        let fc1 = Linear::with_layout(&c.pp(0), s * s * 64, 64, flat);
        layers.push(("classifier.0".into(), Layer::Linear(fc1)));
        layers.push(("classifier.1".into(), Layer::Relu(Relu::new(be))));
        let fc2 = Linear::new(&c.pp(2), 64, classes);
        layers.push(("classifier.2".into(), Layer::Linear(fc2)));
        Self::new(be, "LeNet", layers, (classes, side), root.grad_len())
            .with_containers(&[("features", "Sequential"), ("classifier", "Sequential")])
    }

    /// VGG-16 with batch norm: 13 3x3 convs (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M,
    /// 512 x3, M), each with batch norm and ReLU, then linear 512->classes for 32x32 inputs
    /// (for larger ones, the flattened feature map's size -> classes).
    pub fn vgg16(be: &B, classes: usize, side: usize, seed: u64) -> Self {
        const PLAN: [usize; 18] = [
            64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
        ];
        let root = Builder::new(be, seed);
        let f = root.pp("features");
        let (mut layers, mut cin, mut idx) = (Vec::new(), CHANNELS, 0);
        for cout in PLAN {
            if cout == 0 {
                layers.push((format!("features.{idx}"), Layer::MaxPool(MaxPool2d::new(be, 2, 2, 0))));
                idx += 1;
            } else {
                layers.push((format!("features.{idx}"), conv(&f.pp(idx), cin, cout, 3, 1)));
                let bn = BatchNorm2d::new(&f.pp(idx + 1), cout, true);
                layers.push((format!("features.{}", idx + 1), Layer::BatchNorm(bn)));
                (cin, idx) = (cout, idx + 3);
            }
        }
        let s = side >> 5;
        let fc = if s == 1 {
            Linear::new(&root.pp("classifier"), 512, classes)
        } else {
            let flat = Layout::LinearNhwc { h: s, w: s, c: 512 };
            Linear::with_layout(&root.pp("classifier"), s * s * 512, classes, flat)
        };
        layers.push(("classifier".into(), Layer::Linear(fc)));
        Self::new(be, "VGG16", layers, (classes, side), root.grad_len()).with_containers(&[("features", "Sequential")])
    }

    /// airbench94's network (Keller Jordan, `make_net` in cifar10-airbench's
    /// `legacy/airbench94.py`, MIT): a 2x2 unpadded convolution 3 -> 24 with bias (its weight
    /// frozen: the whitening initialisation sets it), GELU; three `ConvGroup`s (3x3 conv, 2x2
    /// max-pool, batch norm, GELU, 3x3 conv, batch norm, GELU) of widths 64, 256, 256; a 3x3
    /// max-pool; a linear layer without bias; the logits times 1/9. Convolutions start as
    /// PyTorch's default with identity filters on their first in-channels; batch norms have
    /// eps 1e-12, momentum 0.4 and a frozen scale of 1. For 32x32 images the linear layer
    /// takes 256 features (larger images: the flattened final map).
    pub fn airbench(be: &B, classes: usize, side: usize, seed: u64) -> Self {
        let root = Builder::new(be, seed);
        let mut layers = Vec::new();
        let whiten = Conv2d::new(
            &root.pp(0),
            Conv2dConfig {
                cin: CHANNELS,
                cout: AIRBENCH_WHITEN_WIDTH,
                kernel: 2,
                stride: 1,
                pad: 0,
                bias: true,
            },
        );
        let mut whiten = whiten.with_identity_filters(be);
        whiten.weight.frozen = true;
        layers.push(("0".into(), Layer::Conv(whiten)));
        layers.push(("1".into(), Layer::Gelu(Gelu::new(be))));
        let mut cin = AIRBENCH_WHITEN_WIDTH;
        let mut s = side - 1;
        for (i, width) in AIRBENCH_WIDTHS.into_iter().enumerate() {
            let group = root.pp(i + 2);
            let path = |leaf: &str| format!("{}.{leaf}", i + 2);
            let conv = |b: &Builder<B>, cin| {
                let cfg = Conv2dConfig {
                    cin,
                    cout: width,
                    kernel: 3,
                    stride: 1,
                    pad: 1,
                    bias: false,
                };
                Layer::Conv(Conv2d::new(b, cfg).with_identity_filters(be))
            };
            let norm = |b: &Builder<B>| {
                let mut bn = BatchNorm2d::new(b, width, false).with_eps_momentum(1e-12, 0.4);
                bn.weight.frozen = true;
                Layer::BatchNorm(bn)
            };
            layers.push((path("conv1"), conv(&group.pp("conv1"), cin)));
            layers.push((path("pool"), Layer::MaxPool(MaxPool2d::new(be, 2, 2, 0))));
            layers.push((path("norm1"), norm(&group.pp("norm1"))));
            layers.push((path("activ"), Layer::Gelu(Gelu::new(be))));
            layers.push((path("conv2"), conv(&group.pp("conv2"), width)));
            layers.push((path("norm2"), norm(&group.pp("norm2"))));
            layers.push((path("activ"), Layer::Gelu(Gelu::new(be))));
            (cin, s) = (width, s / 2);
        }
        layers.push(("5".into(), Layer::MaxPool(MaxPool2d::new(be, 3, 3, 0))));
        let s = s / 3;
        let flat = Layout::LinearNhwc { h: s, w: s, c: cin };
        let fc = Linear::with_layout(&root.pp(7), s * s * cin, classes, flat).without_bias();
        layers.push(("7".into(), Layer::Linear(fc)));
        layers.push(("8".into(), Layer::Scale(Scale::new(be, AIRBENCH_LOGIT_SCALE))));
        Self::new(be, "Sequential", layers, (classes, side), root.grad_len()).with_containers(&[
            ("2", "ConvGroup"),
            ("3", "ConvGroup"),
            ("4", "ConvGroup"),
        ])
    }

    fn with_containers(self, containers: &[(&str, &'static str)]) -> Self {
        let containers = containers.iter().map(|&(p, c)| (p.to_string(), c)).collect();
        Self { containers, ..self }
    }
}

/// airbench94's first layer: 2 x 3 x 2 x 2 whitening filters (each eigenvector and its negative).
pub const AIRBENCH_WHITEN_WIDTH: usize = 2 * CHANNELS * 2 * 2;
/// airbench94's `widths`: block1, block2, block3.
pub const AIRBENCH_WIDTHS: [usize; 3] = [64, 256, 256];
/// airbench94's `scaling_factor` on the logits.
pub const AIRBENCH_LOGIT_SCALE: f32 = 1.0 / 9.0;

impl<B: Backend> Network<B> for Sequential<B> {
    fn input(&self, n: usize) -> Shape4 {
        Shape4::new(n, self.side, self.side, CHANNELS)
    }
    fn forward(&mut self, be: &B, x: &B::Buf, input: Shape4, train: bool) {
        self.shapes.clear();
        let mut s = input;
        for i in 0..self.layers.len() {
            self.shapes.push(s);
            let (before, rest) = self.layers.split_at_mut(i);
            let x = before.last().map_or(x, |l| l.out());
            s = match &mut rest[0] {
                Layer::Conv(l) => l.forward(be, x, s, &mut self.ws),
                Layer::BatchNorm(l) => {
                    l.forward(be, x, s, None, train);
                    s
                }
                Layer::Relu(l) => {
                    l.forward(be, x, s.numel());
                    s
                }
                Layer::Gelu(l) => {
                    l.forward(be, x, s.numel());
                    s
                }
                Layer::Scale(l) => {
                    l.forward(be, x, s.numel());
                    s
                }
                Layer::MaxPool(l) => l.forward(be, x, s),
                Layer::Linear(l) => {
                    assert_eq!(s.h * s.w * s.c, l.din, "linear layer input size");
                    l.forward(be, x, s.n);
                    Shape4::new(s.n, 1, 1, l.dout)
                }
            };
        }
    }

    fn backward(&mut self, be: &B, x: &B::Buf, labels: &[u32]) {
        let n = self.shapes[0].n;
        assert_eq!(labels.len(), n, "one label per image");
        let largest = self
            .shapes
            .iter()
            .map(|s| s.numel())
            .max()
            .unwrap_or(0)
            .max(n * self.classes);
        for g in &mut self.grad {
            ensure_len(be, g, largest);
        }
        let [ga, gb] = &mut self.grad;
        let (mut dout, mut dx) = (ga, gb);
        let grads = &mut self.param_grads;
        let logits = self.layers.last().expect("a layer").out();
        self.criterion.forward_backward(be, logits, self.classes, labels, dout);
        // As PyTorch's autograd: no gradient flows below the first layer with a parameter the
        // optimizer updates (airbench's whitening layer once its bias is frozen, a frozen
        // backbone), so that layer computes no input gradient and those below run no backward.
        let first = (0..self.layers.len())
            .find(|&i| self.layers[i..=i].trains())
            .unwrap_or(self.layers.len());
        for i in (first..self.layers.len()).rev() {
            let (before, rest) = self.layers.split_at_mut(i);
            let input = before.last().map_or(x, |l| l.out());
            let s = self.shapes[i];
            match &mut rest[0] {
                Layer::Conv(l) => l.backward(be, input, dout, (i > first).then_some(&mut *dx), grads, &mut self.ws),
                Layer::BatchNorm(l) => l.backward(be, input, dout, dx, grads),
                Layer::Relu(l) => l.backward(be, dout, dx),
                Layer::Gelu(l) => l.backward(be, input, dout, dx),
                Layer::Scale(l) => l.backward(be, dout, dx),
                Layer::MaxPool(l) => {
                    ensure_len(be, dx, s.numel());
                    l.backward(be, input, dout, dx)
                }
                Layer::Linear(l) => l.backward(be, input, dout, dx, grads),
            }
            std::mem::swap(&mut dout, &mut dx);
        }
    }

    fn logits(&self) -> &B::Buf {
        self.layers.last().expect("a layer").out()
    }
    fn onnx(&self, be: &B, g: &mut Graph, x: &str) -> String {
        let mut y = x.to_string();
        // Until the first linear layer the values are feature maps, which it flattens.
        let mut map = true;
        for (layer, path) in self.layers.iter().zip(&self.paths) {
            y = match layer {
                Layer::Conv(l) => l.onnx(be, g, &y),
                Layer::BatchNorm(l) => l.onnx(be, g, &y, None),
                Layer::Relu(l) => l.onnx(g, &y, path),
                Layer::Gelu(l) => l.onnx(g, &y, path),
                Layer::Scale(l) => l.onnx(g, &y, path),
                Layer::MaxPool(l) => l.onnx(g, &y, path),
                Layer::Linear(l) => l.onnx(be, g, &y, std::mem::replace(&mut map, false)),
            };
        }
        y
    }
    fn grads(&self) -> &B::Buf {
        &self.param_grads
    }
    fn state_and_grads(&mut self) -> (Box<dyn Module<B> + '_>, &mut B::Buf) {
        (Box::new(&mut self.layers[..]), &mut self.param_grads)
    }
    fn loss(&self) -> &B::Buf {
        &self.criterion.loss
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn set_label_smoothing(&mut self, smoothing: f32) {
        self.criterion.label_smoothing = smoothing;
    }
    fn set_loss_grad_scale(&mut self, scale: f32) {
        self.criterion.grad_scale = scale;
    }
    fn sync_batch_norm(&mut self, sum: Option<StatsSum>) {
        for layer in &mut self.layers {
            if let Layer::BatchNorm(bn) = layer {
                bn.sync = sum.clone();
            }
        }
    }
    fn first_conv(&mut self) -> Option<&mut Conv2d<B>> {
        match self.layers.first_mut() {
            Some(Layer::Conv(c)) => Some(c),
            _ => None,
        }
    }
    fn head(&self) -> String {
        let last_linear = self.layers.iter().rposition(|l| matches!(l, Layer::Linear(_)));
        last_linear.map_or_else(String::new, |i| self.paths[i].clone())
    }
}

impl<B: Backend> Module<B> for Sequential<B> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        self.layers.visit(f);
    }
}

impl<B: Backend> Module<B> for [Layer<B>] {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        for layer in self.iter_mut() {
            match layer {
                Layer::Conv(l) => l.visit(f),
                Layer::BatchNorm(l) => l.visit(f),
                Layer::Linear(l) => l.visit(f),
                Layer::Relu(_) | Layer::Gelu(_) | Layer::MaxPool(_) | Layer::Scale(_) => {}
            }
        }
    }
}
