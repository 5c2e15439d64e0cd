//! Plain feed-forward networks (a chain of layers, no branches): the seed's comparison models,
//! LeNet and VGG-16. State names follow the PyTorch definitions in `scripts/classic_models.py`
//! (`features.N.*`, `classifier.N.*`), so checkpoints move between the two.

use super::network::Network;
use crate::data::CHANNELS;
use crate::engine::{Backend, Layout, Shape4, StatsSum, ensure_len};
use crate::nn::{BatchNorm2d, Builder, Conv2d, Conv2dConfig, CrossEntropy, Entry, Linear, MaxPool2d, Module, Relu};
use crate::onnx::Graph;

pub enum Layer<B: Backend> {
    Conv(Conv2d<B>),
    /// Batch norm, with the ReLU that follows it fused in.
    BatchNorm(BatchNorm2d<B>),
    Relu(Relu<B>),
    MaxPool(MaxPool2d<B>),
    /// Flattens its input (NHWC) first.
    Linear(Linear<B>),
}

impl<B: Backend> Layer<B> {
    fn out(&self) -> &B::Buf {
        match self {
            Layer::Conv(l) => &l.out,
            Layer::BatchNorm(l) => &l.out,
            Layer::Relu(l) => &l.out,
            Layer::MaxPool(l) => &l.out,
            Layer::Linear(l) => &l.out,
        }
    }
}

pub struct Sequential<B: Backend> {
    /// The PyTorch class name (`LeNet`, `VGG16`), for printing.
    pub title: &'static str,
    pub layers: Vec<Layer<B>>,
    /// Where each layer sits in the PyTorch module: (`features`, Some(3)) is `features.3`;
    /// (`classifier`, None) is a top-level `classifier`.
    pub labels: Vec<(&'static str, Option<usize>)>,
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
        layers: Vec<(&'static str, Option<usize>, Layer<B>)>,
        (classes, side): (usize, usize),
        grad_len: usize,
    ) -> Self {
        let (labels, layers) = layers.into_iter().map(|(g, i, l)| ((g, i), l)).unzip();
        Self {
            title,
            labels,
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
            layers.push(("features", Some(3 * i), conv(&f.pp(3 * i), cin, cout, 5, 2)));
            layers.push(("features", Some(3 * i + 1), Layer::Relu(Relu::new(be))));
            let pool = Layer::MaxPool(MaxPool2d::new(be, 2, 2, 0));
            layers.push(("features", Some(3 * i + 2), pool));
        }
        let s = side / 2 / 2 / 2;
        let flat = Layout::LinearNhwc { h: s, w: s, c: 64 };
        let fc1 = Linear::with_layout(&c.pp(0), s * s * 64, 64, flat);
        layers.push(("classifier", Some(0), Layer::Linear(fc1)));
        layers.push(("classifier", Some(1), Layer::Relu(Relu::new(be))));
        let fc2 = Linear::new(&c.pp(2), 64, classes);
        layers.push(("classifier", Some(2), Layer::Linear(fc2)));
        Self::new(be, "LeNet", layers, (classes, side), root.grad_len())
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
                layers.push(("features", Some(idx), Layer::MaxPool(MaxPool2d::new(be, 2, 2, 0))));
                idx += 1;
            } else {
                layers.push(("features", Some(idx), conv(&f.pp(idx), cin, cout, 3, 1)));
                let bn = BatchNorm2d::new(&f.pp(idx + 1), cout, true);
                layers.push(("features", Some(idx + 1), Layer::BatchNorm(bn)));
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
        layers.push(("classifier", None, Layer::Linear(fc)));
        Self::new(be, "VGG16", layers, (classes, side), root.grad_len())
    }
}

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
        for i in (0..self.layers.len()).rev() {
            let (before, rest) = self.layers.split_at_mut(i);
            let input = before.last().map_or(x, |l| l.out());
            let s = self.shapes[i];
            match &mut rest[0] {
                Layer::Conv(l) => l.backward(be, input, dout, (i > 0).then_some(&mut *dx), grads, &mut self.ws),
                Layer::BatchNorm(l) => l.backward(be, input, dout, dx, grads),
                Layer::Relu(l) => l.backward(be, dout, dx),
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
        for (layer, (group, index)) in self.layers.iter().zip(&self.labels) {
            let path = index.map_or(group.to_string(), |i| format!("{group}.{i}"));
            y = match layer {
                Layer::Conv(l) => l.onnx(be, g, &y),
                Layer::BatchNorm(l) => l.onnx(be, g, &y, None),
                Layer::Relu(l) => l.onnx(g, &y, &path),
                Layer::MaxPool(l) => l.onnx(g, &y, &path),
                Layer::Linear(l) => l.onnx(be, g, &y, std::mem::replace(&mut map, false)),
            };
        }
        y
    }
    fn grads(&self) -> &B::Buf {
        &self.param_grads
    }
    fn state_and_grads(&mut self) -> (Box<dyn Module<B> + '_>, &mut B::Buf) {
        (Box::new(&mut self.layers), &mut self.param_grads)
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
    fn head(&self) -> String {
        match self.labels.last() {
            Some((group, Some(i))) => format!("{group}.{i}"),
            Some((group, None)) => group.to_string(),
            None => String::new(),
        }
    }
}

impl<B: Backend> Module<B> for Sequential<B> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        self.layers.visit(f);
    }
}

impl<B: Backend> Module<B> for Vec<Layer<B>> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        for layer in self.iter_mut() {
            match layer {
                Layer::Conv(l) => l.visit(f),
                Layer::BatchNorm(l) => l.visit(f),
                Layer::Linear(l) => l.visit(f),
                Layer::Relu(_) | Layer::MaxPool(_) => {}
            }
        }
    }
}
