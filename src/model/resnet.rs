//! The seed's ResNet-18, with the stem and depth variants the seed proposes.
//!
//! State names match the seed's PyTorch `state_dict`: `conv1.0` (stem conv), `conv1.1` (stem
//! BN), `conv{2..5}.{0,1}.layer.{0,1,3,4}` (block convs and BNs), `conv{3..5}.0.shortcut.{0,1}`,
//! and `fc`. Every buffer a step needs is owned by a layer or by the model and allocated on the
//! first pass (or when the batch grows), so a training step does not allocate activations.

use crate::data::CHANNELS;
use crate::engine::{Backend, Shape4, ensure_len};
use crate::nn::{
    BatchNorm2d, Builder, Conv2d, Conv2dConfig, CrossEntropy, Entry, GlobalAvgPool, Linear, MaxPool2d, Module,
    forward_pair,
};
use crate::onnx::Graph;

/// The first layers of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stem {
    /// The seed's code: 7x7/2 conv, BN, 3x3/2 max-pool, no ReLU.
    Seed,
    /// torchvision's: the seed's stem with a ReLU after the BN.
    Torchvision,
    /// The seed's first proposal: 3x3/2 conv (pad 1), BN, 3x3/2 max-pool.
    Seed3x3,
    /// The usual CIFAR stem: 3x3/1 conv, BN, ReLU, no pooling (full-resolution network).
    Cifar,
}

crate::named::choices!(Stem, "stem", {
    Seed => "seed",
    Torchvision => "torchvision",
    Seed3x3 => "seed3x3",
    Cifar => "cifar",
});

impl Stem {
    fn conv(self) -> Conv2dConfig {
        let (kernel, stride, pad) = match self {
            Stem::Seed | Stem::Torchvision => (7, 2, 3),
            Stem::Seed3x3 => (3, 2, 1),
            Stem::Cifar => (3, 1, 1),
        };
        Conv2dConfig {
            cin: CHANNELS,
            cout: 64,
            kernel,
            stride,
            pad,
            bias: false,
        }
    }

    fn relu(self) -> bool {
        matches!(self, Stem::Torchvision | Stem::Cifar)
    }

    fn max_pool(self) -> bool {
        !matches!(self, Stem::Cifar)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResNetConfig {
    pub stem: Stem,
    /// 4 (the seed) or 3 (the seed's second proposal: drop `conv5`; the fc takes 256 inputs).
    pub stages: usize,
    pub num_classes: usize,
    /// Width and height of the input images (the networks of `--model lenet|vgg16` size their
    /// classifier by it; ResNet-18's global pooling takes any size).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
}

/// CIFAR's 32x32: what a model configuration without an image size was made for.
fn default_image_size() -> usize {
    crate::data::cifar::SIDE
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            stem: Stem::Seed,
            stages: 4,
            num_classes: crate::data::cifar::NUM_CLASSES,
            image_size: default_image_size(),
        }
    }
}

const STAGE_CHANNELS: [usize; 4] = [64, 128, 256, 512];

impl ResNetConfig {
    pub fn feature_channels(&self) -> usize {
        STAGE_CHANNELS[self.stages - 1]
    }
}

/// Stem layers: `conv1.0` (conv), `conv1.1` (BN, with ReLU for some stems), then max-pool.
pub(crate) struct StemLayers<B: Backend> {
    pub(crate) conv: Conv2d<B>,
    pub(crate) bn: BatchNorm2d<B>,
    pub(crate) pool: Option<MaxPool2d<B>>,
}

impl<B: Backend> StemLayers<B> {
    fn out(&self) -> &B::Buf {
        self.pool.as_ref().map_or(&self.bn.out, |p| &p.out)
    }
}

/// The seed's BasicBlock: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)).
pub(crate) struct BasicBlock<B: Backend> {
    pub(crate) conv_a: Conv2d<B>,
    pub(crate) bn_a: BatchNorm2d<B>,
    pub(crate) conv_b: Conv2d<B>,
    /// Fused with the residual add and the block's final ReLU.
    pub(crate) bn_b: BatchNorm2d<B>,
    pub(crate) shortcut: Option<(Conv2d<B>, BatchNorm2d<B>)>,
}

impl<B: Backend> BasicBlock<B> {
    fn new(b: &Builder<B>, cin: usize, cout: usize, stride: usize) -> Self {
        let layer = b.pp("layer");
        let conv = |b: &Builder<B>, cin, cout, kernel, stride, pad| {
            Conv2d::new(
                b,
                Conv2dConfig {
                    cin,
                    cout,
                    kernel,
                    stride,
                    pad,
                    bias: false,
                },
            )
        };
        let conv_a = conv(&layer.pp(0), cin, cout, 3, stride, 1);
        let bn_a = BatchNorm2d::new(&layer.pp(1), cout, true);
        let conv_b = conv(&layer.pp(3), cout, cout, 3, 1, 1);
        let bn_b = BatchNorm2d::new(&layer.pp(4), cout, true);
        let shortcut = (stride != 1 || cin != cout).then(|| {
            let s = b.pp("shortcut");
            (
                conv(&s.pp(0), cin, cout, 1, stride, 0),
                BatchNorm2d::new(&s.pp(1), cout, false),
            )
        });
        Self {
            conv_a,
            bn_a,
            conv_b,
            bn_b,
            shortcut,
        }
    }

    fn out(&self) -> &B::Buf {
        &self.bn_b.out
    }

    fn forward(&mut self, be: &B, x: &B::Buf, s: Shape4, train: bool, ws: &mut B::Buf) -> Shape4 {
        if train {
            let sa = self.bn_a.forward_after(be, &mut self.conv_a, (x, s), None, train, ws);
            // conv_b before the shortcut: measured, the other order cost 13% of a bf16
            // training step on the cifar stem (164 against 190 img/s).
            let sb = self.conv_b.forward(be, &self.bn_a.out, sa, ws);
            let residual = Self::shortcut(&mut self.shortcut, be, x, s, train, ws);
            self.bn_b.forward(be, &self.conv_b.out, sb, Some(residual), train);
            return sb;
        }
        // Eval mode: bn_b (with the residual add) runs in conv_b's pass, so the shortcut
        // first; then both convolutions in one call, which may hand bn_a's output to conv_b
        // without writing it out.
        let residual = Self::shortcut(&mut self.shortcut, be, x, s, train, ws);
        let (a, b) = ((&mut self.conv_a, &mut self.bn_a), (&mut self.conv_b, &mut self.bn_b));
        forward_pair(be, a, b, (x, s), Some(residual), train, ws)
    }

    /// The residual branch's forward pass: the block's input, or the shortcut's output.
    fn shortcut<'a>(
        shortcut: &'a mut Option<(Conv2d<B>, BatchNorm2d<B>)>,
        be: &B,
        x: &'a B::Buf,
        s: Shape4,
        train: bool,
        ws: &mut B::Buf,
    ) -> &'a B::Buf {
        match shortcut {
            Some((conv, bn)) => {
                bn.forward_after(be, conv, (x, s), None, train, ws);
                &bn.out
            }
            None => x,
        }
    }

    /// The block's eval-mode forward pass as ONNX nodes, as [`Self::forward`] computes it.
    fn onnx(&self, be: &B, g: &mut Graph, x: &str) -> String {
        let a = self.conv_a.onnx(be, g, x);
        let a = self.bn_a.onnx(be, g, &a, None);
        let b = self.conv_b.onnx(be, g, &a);
        let residual = match &self.shortcut {
            Some((conv, bn)) => {
                let s = conv.onnx(be, g, x);
                bn.onnx(be, g, &s, None)
            }
            None => x.to_string(),
        };
        self.bn_b.onnx(be, g, &b, Some(&residual))
    }

    /// `dout` holds dL/d(block output) and is clobbered; `dx` receives dL/dx; the
    /// parameters' gradients go into the arena `grads`.
    /// `(x, input)`: the block's input and its shape; `(scratch, ws)`: the model's scratch
    /// buffers and convolution workspace.
    fn backward(
        &mut self,
        be: &B,
        (x, input): (&B::Buf, Shape4),
        dout: &mut B::Buf,
        dx: &mut B::Buf,
        (scratch, ws): (&mut [B::Buf; 2], &mut B::Buf),
        grads: &mut B::Buf,
    ) {
        let [s0, s1] = scratch;
        // After this, dout is masked by the final ReLU: the gradient of both branches.
        self.bn_b.backward(be, &self.conv_b.out, dout, s0, grads);
        self.conv_b.backward(be, &self.bn_a.out, s0, Some(s1), grads, ws);
        self.bn_a.backward(be, &self.conv_a.out, s1, s0, grads);
        self.conv_a.backward(be, x, s0, Some(dx), grads, ws);
        match &mut self.shortcut {
            Some((conv, bn)) => {
                bn.backward(be, &conv.out, dout, s0, grads);
                conv.backward(be, x, s0, Some(s1), grads, ws);
                be.add_assign(input.numel(), s1, dx);
            }
            None => be.add_assign(input.numel(), dout, dx),
        }
    }
}

impl<B: Backend> Module<B> for BasicBlock<B> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        self.conv_a.visit(f);
        self.bn_a.visit(f);
        self.conv_b.visit(f);
        self.bn_b.visit(f);
        if let Some((conv, bn)) = &mut self.shortcut {
            conv.visit(f);
            bn.visit(f);
        }
    }
}

pub struct ResNet<B: Backend> {
    pub cfg: ResNetConfig,
    pub(crate) stem: StemLayers<B>,
    pub(crate) blocks: Vec<BasicBlock<B>>,
    avgpool: GlobalAvgPool<B>,
    pub(crate) fc: Linear<B>,
    /// Input shape of every block, then of the pooling head, from the last forward pass.
    shapes: Vec<Shape4>,
    stem_shapes: [Shape4; 2],
    n: usize,
    // The memory plan for the backward pass: two ping-pong gradient buffers, two scratch
    // buffers for inside a block, and the conv workspace, all sized to the largest activation.
    grad: [B::Buf; 2],
    scratch: [B::Buf; 2],
    ws: B::Buf,
    dlogits: B::Buf,
    /// The gradient arena: every parameter's gradient, at its `Param::grad`.
    param_grads: B::Buf,
    /// The training loss (its label smoothing is set through [`super::Network`]).
    pub criterion: CrossEntropy<B>,
}

impl<B: Backend> ResNet<B> {
    /// A freshly initialised network (PyTorch's default initialisers, seeded).
    pub fn new(be: &B, cfg: ResNetConfig, seed: u64) -> Self {
        assert!(cfg.stages == 3 || cfg.stages == 4, "stages must be 3 or 4");
        let root = Builder::new(be, seed);
        let c1 = root.pp("conv1");
        let stem = StemLayers {
            conv: Conv2d::new(&c1.pp(0), cfg.stem.conv()),
            bn: BatchNorm2d::new(&c1.pp(1), 64, cfg.stem.relu()),
            pool: cfg.stem.max_pool().then(|| MaxPool2d::new(be, 3, 2, 1)),
        };
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (stage, &cout) in STAGE_CHANNELS[..cfg.stages].iter().enumerate() {
            let sb = root.pp(format!("conv{}", stage + 2));
            let stride = if stage == 0 { 1 } else { 2 };
            blocks.push(BasicBlock::new(&sb.pp(0), cin, cout, stride));
            blocks.push(BasicBlock::new(&sb.pp(1), cout, cout, 1));
            cin = cout;
        }
        let fc = Linear::new(&root.pp("fc"), cfg.feature_channels(), cfg.num_classes);
        let param_grads = be.alloc(root.grad_len());
        Self {
            cfg,
            stem,
            blocks,
            avgpool: GlobalAvgPool::new(be),
            fc,
            shapes: Vec::new(),
            stem_shapes: [Shape4::default(); 2],
            n: 0,
            grad: [be.alloc(0), be.alloc(0)],
            scratch: [be.alloc(0), be.alloc(0)],
            ws: be.alloc(0),
            dlogits: be.alloc(0),
            param_grads,
            criterion: CrossEntropy::new(be),
        }
    }

    /// Forward pass of an NHWC batch `x` of shape `input` (`[n, h, w, 3]`); the logits
    /// (`[n, classes]`) are left in [`Self::logits`]. `train` selects batch statistics (and
    /// updates the running ones) or running statistics.
    pub fn forward(&mut self, be: &B, x: &B::Buf, input: Shape4, train: bool) {
        assert_eq!(input.c, CHANNELS, "input must have {CHANNELS} channels");
        let ws = &mut self.ws;
        let stem = &mut self.stem;
        let mut s = stem.bn.forward_after(be, &mut stem.conv, (x, input), None, train, ws);
        self.stem_shapes = [input, s];
        if let Some(pool) = &mut self.stem.pool {
            s = pool.forward(be, &self.stem.bn.out, s);
        }
        self.shapes.clear();
        for i in 0..self.blocks.len() {
            self.shapes.push(s);
            let (before, rest) = self.blocks.split_at_mut(i);
            let x = before.last().map_or(self.stem.out(), |b| b.out());
            s = rest[0].forward(be, x, s, train, ws);
        }
        self.shapes.push(s);
        let last = self.blocks.last().map_or(self.stem.out(), |b| b.out());
        self.avgpool.forward(be, last, s);
        self.fc.forward(be, &self.avgpool.out, input.n);
        self.n = input.n;
    }

    /// The eval-mode forward pass as ONNX nodes from the NCHW input `x`, as [`Self::forward`]
    /// computes it; returns the logits' name.
    pub fn onnx(&self, be: &B, g: &mut Graph, x: &str) -> String {
        let s = self.stem.conv.onnx(be, g, x);
        let mut y = self.stem.bn.onnx(be, g, &s, None);
        if let Some(pool) = &self.stem.pool {
            y = pool.onnx(g, &y, "maxpool");
        }
        for block in &self.blocks {
            y = block.onnx(be, g, &y);
        }
        let pooled = self.avgpool.onnx(g, &y, "avgpool");
        self.fc.onnx(be, g, &pooled, false)
    }

    /// Logits of the last forward pass.
    pub fn logits(&self) -> &B::Buf {
        &self.fc.out
    }

    /// Cross-entropy of the last forward pass against `labels`, then the backward pass:
    /// every trainable parameter's gradient is overwritten (in [`Self::grads`]). `x` must be
    /// the forward input.
    /// The loss stays on the device ([`Self::loss`]) so that a step needs no host round trip.
    pub fn backward(&mut self, be: &B, x: &B::Buf, labels: &[u32]) {
        let n = self.n;
        assert_eq!(labels.len(), n, "one label per image");
        self.criterion
            .forward_backward(be, &self.fc.out, self.cfg.num_classes, labels, &mut self.dlogits);

        let largest = self.stem_shapes[1]
            .numel()
            .max(self.shapes.iter().map(|s| s.numel()).max().unwrap_or(0));
        for buf in self.grad.iter_mut().chain(self.scratch.iter_mut()) {
            ensure_len(be, buf, largest);
        }
        let [ga, gb] = &mut self.grad;
        let (mut dout, mut dx) = (ga, gb);
        // As PyTorch's autograd: no gradient flows below the lowest block (or the stem) with a
        // parameter the optimizer updates; with a frozen backbone only `fc` runs backward.
        let stem_trains = self.stem.conv.trains() || self.stem.bn.trains();
        let lowest = if stem_trains {
            0
        } else {
            (0..self.blocks.len())
                .find(|&i| self.blocks[i].trains())
                .unwrap_or(self.blocks.len())
        };
        let grads = &mut self.param_grads;
        self.fc
            .backward(be, &self.avgpool.out, &self.dlogits, &mut self.scratch[0], grads);
        if lowest == self.blocks.len() && !stem_trains {
            return;
        }
        self.avgpool.backward(be, &self.scratch[0], dout);
        for i in (lowest..self.blocks.len()).rev() {
            let (before, rest) = self.blocks.split_at_mut(i);
            let input = before.last().map_or(self.stem.out(), |b| b.out());
            let work = (&mut self.scratch, &mut self.ws);
            rest[0].backward(be, (input, self.shapes[i]), dout, dx, work, grads);
            std::mem::swap(&mut dout, &mut dx);
        }
        if !stem_trains {
            return;
        }
        if let Some(pool) = &self.stem.pool {
            pool.backward(be, &self.stem.bn.out, dout, dx);
            std::mem::swap(&mut dout, &mut dx);
        }
        self.stem
            .bn
            .backward(be, &self.stem.conv.out, dout, &mut self.scratch[0], grads);
        self.stem
            .conv
            .backward(be, x, &self.scratch[0], None, grads, &mut self.ws);
    }

    /// The loss computed by the last [`Self::backward`].
    pub fn loss(&self) -> &B::Buf {
        &self.criterion.loss
    }

    /// The gradient arena the last [`Self::backward`] wrote.
    pub fn grads(&self) -> &B::Buf {
        &self.param_grads
    }

    /// The trainable layers, as one module apart from the rest of the model.
    fn layers_and_grads(&mut self) -> (Layers<'_, B>, &mut B::Buf) {
        let Self {
            stem,
            blocks,
            fc,
            param_grads,
            ..
        } = self;
        (Layers { stem, blocks, fc }, param_grads)
    }

    /// Number of trainable values.
    pub fn num_params(&mut self) -> usize {
        let mut n = 0;
        self.visit_params(&mut |p| n += p.numel());
        n
    }
}

/// The layers of a [`ResNet`] that hold state, borrowed apart from its gradient arena.
struct Layers<'a, B: Backend> {
    stem: &'a mut StemLayers<B>,
    blocks: &'a mut [BasicBlock<B>],
    fc: &'a mut Linear<B>,
}

impl<B: Backend> Module<B> for Layers<'_, B> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        self.stem.conv.visit(f);
        self.stem.bn.visit(f);
        for b in self.blocks.iter_mut() {
            b.visit(f);
        }
        self.fc.visit(f);
    }
}

impl<B: Backend> Module<B> for ResNet<B> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        self.layers_and_grads().0.visit(f);
    }
}

impl<B: Backend> ResNet<B> {
    /// The state and the gradient arena at once (see [`super::Network::state_and_grads`]).
    pub fn state_and_grads(&mut self) -> (Box<dyn Module<B> + '_>, &mut B::Buf) {
        let (layers, grads) = self.layers_and_grads();
        (Box::new(layers), grads)
    }
}
