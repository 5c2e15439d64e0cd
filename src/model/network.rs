//! What the training loop, evaluation and benchmarks need from a model, whatever its
//! architecture: a forward pass to logits, the loss and backward pass, and its state
//! (`Module`) for optimizers and checkpoints.

use super::{ResNet, ResNetConfig, Sequential};
use crate::data::CHANNELS;
use crate::engine::{Backend, Shape4, StatsSum};
use crate::nn::{Conv2d, Module};
use crate::onnx::Graph;

pub trait Network<B: Backend>: Module<B> {
    /// The NHWC shape of a batch of `n` of the images the model takes.
    fn input(&self, n: usize) -> Shape4;
    /// Forward pass of an NHWC batch; the logits are left in [`Network::logits`].
    fn forward(&mut self, be: &B, x: &B::Buf, input: Shape4, train: bool);
    /// Cross-entropy of the last forward pass against `labels`, then every gradient.
    fn backward(&mut self, be: &B, x: &B::Buf, labels: &[u32]);
    fn logits(&self) -> &B::Buf;
    /// The eval-mode forward pass (running batch-norm statistics) as ONNX nodes in `g`, from
    /// the NCHW input named `x`; returns the name of the logits.
    fn onnx(&self, be: &B, g: &mut Graph, x: &str) -> String;
    /// The gradient arena: every trainable parameter's gradient at its `Param::grad` offset,
    /// overwritten by [`Network::backward`]. Data-parallel ranks average it with one
    /// all-reduce.
    fn grads(&self) -> &B::Buf;
    /// The model's state (as a [`Module`]) and its gradient arena at once: an optimizer step
    /// updates the one from the other.
    fn state_and_grads(&mut self) -> (Box<dyn Module<B> + '_>, &mut B::Buf);
    /// The loss of the last backward pass, on the device.
    fn loss(&self) -> &B::Buf;
    fn num_classes(&self) -> usize;
    fn set_label_smoothing(&mut self, smoothing: f32);
    /// Multiplies the gradient of the loss (not the loss): the weight of this process's share
    /// of a batch whose rank slices differ in size (1: none).
    fn set_loss_grad_scale(&mut self, scale: f32);
    /// The module path of the classifier, the last linear layer (`fc`, `classifier`,
    /// `classifier.2`): what fine-tuning starts afresh for another class count and what
    /// `--freeze-backbone` trains.
    fn head(&self) -> String;
    /// Sets the scale (gamma) of the last BatchNorm of every residual branch to 0, so each
    /// block starts as the identity (torchvision's `zero_init_residual`). Networks without
    /// residual branches have nothing to change.
    fn zero_init_residual(&mut self, _be: &B) {}
    /// The network's first layer when it is a convolution that takes the images themselves:
    /// what the whitening initialisation sets (`nn::whiten`).
    fn first_conv(&mut self) -> Option<&mut Conv2d<B>> {
        None
    }
    /// Every BatchNorm in training mode takes its statistics over the whole batch of all ranks
    /// through `sum` (PyTorch's `SyncBatchNorm.convert_sync_batchnorm`), or, with `None`, over
    /// this process's slice.
    fn sync_batch_norm(&mut self, sum: Option<StatsSum>);
}

/// The architectures `--model` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arch {
    /// The seed's ResNet-18 and its variants (`--stem`, `--stages`).
    #[default]
    Resnet18,
    /// The classic CIFAR-10 tutorial network the seed compares with.
    Lenet,
    /// VGG-16 with batch norm, for 32x32 inputs.
    Vgg16,
    /// airbench94's speed-run network (`Sequential::airbench`).
    Airbench,
}

crate::named::choices!(Arch, "model", {
    Resnet18 => "resnet18",
    Lenet => "lenet",
    Vgg16 => "vgg16",
    Airbench => "airbench",
});

impl Arch {
    /// The smallest input images the architecture takes: LeNet's three 2x2 pools need 8
    /// pixels, VGG-16's five need 32, airbench's 2x2 convolution and pools 2, 2, 2 and 3
    /// need 25 (it is made for 32); ResNet-18 pools globally and takes every size `--image-size`
    /// allows.
    pub fn min_image_size(self) -> usize {
        match self {
            Arch::Resnet18 => 16,
            Arch::Lenet => 8,
            Arch::Vgg16 => 32,
            Arch::Airbench => 25,
        }
    }

    /// The architecture in words, for logs and files: `resnet18 (stem seed, 4 stages)`,
    /// `lenet`.
    pub fn describe(self, cfg: &ResNetConfig) -> String {
        match self {
            Arch::Resnet18 => format!("resnet18 (stem {}, {} stages)", cfg.stem.name(), cfg.stages),
            other => other.name().to_string(),
        }
    }

    /// Refuses an image size the architecture cannot take, in one line.
    pub fn check_image_size(self, size: usize) -> Result<(), String> {
        let min = self.min_image_size();
        if size < min {
            return Err(format!(
                "{} needs images of at least {min}x{min} pixels; these are {size}x{size}",
                self.name()
            ));
        }
        Ok(())
    }
}

/// A freshly initialised network. `cfg` gives the classes and the image size (and, for
/// ResNet-18, the stem and stages).
pub fn build<B: Backend>(be: &B, arch: Arch, cfg: ResNetConfig, seed: u64) -> Box<dyn Network<B>> {
    match arch {
        Arch::Resnet18 => Box::new(ResNet::new(be, cfg, seed)),
        Arch::Lenet => Box::new(Sequential::lenet(be, cfg.num_classes, cfg.image_size, seed)),
        Arch::Vgg16 => Box::new(Sequential::vgg16(be, cfg.num_classes, cfg.image_size, seed)),
        Arch::Airbench => Box::new(Sequential::airbench(be, cfg.num_classes, cfg.image_size, seed)),
    }
}

impl<B: Backend> Network<B> for ResNet<B> {
    fn input(&self, n: usize) -> Shape4 {
        let side = self.cfg.image_size;
        Shape4::new(n, side, side, CHANNELS)
    }
    fn forward(&mut self, be: &B, x: &B::Buf, input: Shape4, train: bool) {
        ResNet::forward(self, be, x, input, train)
    }
    fn backward(&mut self, be: &B, x: &B::Buf, labels: &[u32]) {
        ResNet::backward(self, be, x, labels)
    }
    fn logits(&self) -> &B::Buf {
        ResNet::logits(self)
    }
    fn onnx(&self, be: &B, g: &mut Graph, x: &str) -> String {
        ResNet::onnx(self, be, g, x)
    }
    fn grads(&self) -> &B::Buf {
        ResNet::grads(self)
    }
    fn state_and_grads(&mut self) -> (Box<dyn Module<B> + '_>, &mut B::Buf) {
        ResNet::state_and_grads(self)
    }
    fn loss(&self) -> &B::Buf {
        ResNet::loss(self)
    }
    fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }
    fn set_label_smoothing(&mut self, smoothing: f32) {
        self.criterion.label_smoothing = smoothing;
    }
    fn set_loss_grad_scale(&mut self, scale: f32) {
        self.criterion.grad_scale = scale;
    }
    fn head(&self) -> String {
        "fc".into()
    }
    fn zero_init_residual(&mut self, be: &B) {
        for block in &mut self.blocks {
            let gamma = &mut block.bn_b.weight;
            let n = gamma.numel();
            be.fill(&mut gamma.value, n, 0.0);
        }
    }
    fn sync_batch_norm(&mut self, sum: Option<StatsSum>) {
        self.stem.bn.sync = sum.clone();
        for block in &mut self.blocks {
            block.bn_a.sync = sum.clone();
            block.bn_b.sync = sum.clone();
            if let Some((_, bn)) = &mut block.shortcut {
                bn.sync = sum.clone();
            }
        }
    }
}
