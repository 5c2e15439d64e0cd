//! `resnet-cifar summary`: the module tree as PyTorch prints the seed's model, and a table of
//! every layer's output shape, parameters and multiply-adds for a given input; with a
//! backend, also the plan it chose for each convolution (`summary --paths`).

use super::network::Arch;
use super::resnet::{ResNet, ResNetConfig, Stem};
use super::sequential::{Layer, Sequential};
use crate::engine::{Backend, ConvGeom, PoolGeom, Shape4};
use crate::nn::{BatchNorm2d, Conv2d, Linear, MaxPool2d};
use std::fmt::Write;

/// One layer of the table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// Module path as in the state_dict (`conv2.0.layer.0`).
    pub name: String,
    pub layer: String,
    /// Output shape, PyTorch order (`[n, c, h, w]` or `[n, features]`).
    pub output: Vec<usize>,
    pub params: usize,
    /// Multiply-adds for the whole input batch (convolutions and the linear layer; padding
    /// taps counted, as the usual counters do).
    pub macs: u64,
    /// A convolution's plan, as the backend the summary was asked for chose it, and what
    /// it plans for (`c x h x w -> cout, kxk/stride`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv: Option<String>,
}

/// What a convolution's plan is on the backend a summary describes (`summary --paths`).
pub type PlanOf<'a> = &'a dyn Fn(&ConvGeom) -> String;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub input: Vec<usize>,
    pub tree: String,
    pub rows: Vec<Row>,
    pub total_params: usize,
    pub total_macs: u64,
}

impl Summary {
    /// The values a training step keeps for one image: every layer's output, and the
    /// backward pass's two gradient buffers of the largest. Against the peak memory per image
    /// measured (batch 128 to 256, Zen 4): 1.0x for the seed's ResNet-18 and LeNet, 1.1x
    /// for the cifar stem's, 1.4x for VGG-16 (which reuses more buffers).
    pub fn activation_values_per_image(&self) -> usize {
        let n = self.input.first().copied().unwrap_or(1).max(1);
        let sizes = self.rows.iter().map(|r| r.output.iter().product::<usize>());
        (sizes.clone().sum::<usize>() + 2 * sizes.max().unwrap_or(0)) / n
    }
}

fn nchw(s: Shape4) -> Vec<usize> {
    vec![s.n, s.c, s.h, s.w]
}

fn conv_repr<B: Backend>(c: &Conv2d<B>) -> String {
    let k = c.cfg.kernel;
    let (s, p) = (c.cfg.stride, c.cfg.pad);
    let pad = if p > 0 {
        format!(", padding=({p}, {p})")
    } else {
        String::new()
    };
    let bias = if c.cfg.bias { "" } else { ", bias=False" };
    format!(
        "Conv2d({}, {}, kernel_size=({k}, {k}), stride=({s}, {s}){pad}{bias})",
        c.cfg.cin, c.cfg.cout
    )
}

fn bn_repr<B: Backend>(b: &BatchNorm2d<B>) -> String {
    format!(
        "BatchNorm2d({}, eps={}, momentum={}, affine=True, bias=True, track_running_stats=True)",
        b.channels(),
        python_float(b.eps),
        python_float(b.momentum)
    )
}

/// `x` as Python's `repr` writes a float that came from a short decimal: `0.1`, `1e-05`.
fn python_float(x: f32) -> String {
    if x != 0.0 && x.abs() < 1e-4 {
        let e = format!("{x:e}");
        let (mantissa, exp) = e.split_once('e').expect("{:e} writes an exponent");
        let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
        format!("{mantissa}e{sign}{digits:0>2}")
    } else {
        format!("{x}")
    }
}

/// `parent.label`, or `label` at the top level.
fn join(parent: &str, label: &str) -> String {
    if parent.is_empty() {
        label.to_string()
    } else {
        format!("{parent}.{label}")
    }
}

struct Walk<'a> {
    tree: String,
    rows: Vec<Row>,
    depth: usize,
    plan: Option<PlanOf<'a>>,
}

impl Walk<'_> {
    fn open(&mut self, label: &str, kind: &str) {
        let _ = writeln!(self.tree, "{}({label}): {kind}(", "  ".repeat(self.depth));
        self.depth += 1;
    }
    fn close(&mut self) {
        self.depth -= 1;
        let _ = writeln!(self.tree, "{})", "  ".repeat(self.depth));
    }
    fn leaf(&mut self, label: &str, name: String, repr: String, output: Vec<usize>, params: usize, macs: u64) {
        let _ = writeln!(self.tree, "{}({label}): {repr}", "  ".repeat(self.depth));
        let layer = repr.split('(').next().unwrap_or("").to_string();
        self.rows.push(Row {
            name,
            layer,
            output,
            params,
            macs,
            path: None,
            conv: None,
        });
    }
    fn conv<B: Backend>(&mut self, label: &str, path: &str, c: &Conv2d<B>, input: Shape4) -> Shape4 {
        let g = c.geom(input);
        let out = g.output();
        let macs = (out.numel() * c.cfg.cin * c.cfg.kernel * c.cfg.kernel) as u64;
        let params = c.weight.numel() + c.bias.as_ref().map_or(0, |b| b.numel());
        self.leaf(label, join(path, label), conv_repr(c), nchw(out), params, macs);
        if let (Some(plan), Some(row)) = (self.plan, self.rows.last_mut()) {
            row.path = Some(plan(&g));
            let (i, k) = (g.input, g.kh);
            row.conv = Some(format!("{}x{}x{} -> {}, {k}x{k}/{}", i.c, i.h, i.w, g.cout, g.stride));
        }
        out
    }
    fn bn<B: Backend>(&mut self, label: &str, path: &str, b: &BatchNorm2d<B>, s: Shape4) {
        self.leaf(label, join(path, label), bn_repr(b), nchw(s), 2 * b.channels(), 0);
    }
    fn relu(&mut self, label: &str, path: &str, s: Shape4) {
        self.relu_as(label, path, s, "ReLU(inplace=True)");
    }
    fn relu_as(&mut self, label: &str, path: &str, s: Shape4, repr: &str) {
        self.leaf(label, join(path, label), repr.into(), nchw(s), 0, 0);
    }
    fn pool(&mut self, label: &str, name: String, p: &MaxPool2d<impl Backend>, s: Shape4) -> Shape4 {
        let out = PoolGeom {
            input: s,
            k: p.kernel,
            stride: p.stride,
            pad: p.pad,
        }
        .output();
        let repr = format!(
            "MaxPool2d(kernel_size={}, stride={}, padding={}, dilation=1, ceil_mode=False)",
            p.kernel, p.stride, p.pad
        );
        self.leaf(label, name, repr, nchw(out), 0, 0);
        out
    }
    fn linear(&mut self, label: &str, name: String, l: &Linear<impl Backend>, n: usize) {
        let bias = if l.bias.is_some() { "True" } else { "False" };
        let repr = format!("Linear(in_features={}, out_features={}, bias={bias})", l.din, l.dout);
        let params = l.weight.numel() + l.bias.as_ref().map_or(0, |b| b.numel());
        self.leaf(label, name, repr, vec![n, l.dout], params, (n * l.din * l.dout) as u64);
    }
    fn finish(mut self, input: Shape4) -> Summary {
        self.tree.push_str(")\n");
        let total_params = self.rows.iter().map(|r| r.params).sum();
        let total_macs = self.rows.iter().map(|r| r.macs).sum();
        Summary {
            input: nchw(input),
            tree: self.tree,
            rows: self.rows,
            total_params,
            total_macs,
        }
    }
}

/// Describes the network `arch` and `cfg` name (its weights fresh), for an NHWC input of shape
/// `input`; with `plan`, each convolution's plan.
pub fn summarize_arch<B: Backend>(
    be: &B,
    (arch, cfg): (Arch, ResNetConfig),
    input: Shape4,
    plan: Option<PlanOf>,
) -> Summary {
    let (classes, side, seed) = (cfg.num_classes, cfg.image_size, 0);
    match arch {
        Arch::Resnet18 => summarize(&ResNet::new(be, cfg, seed), input, plan),
        Arch::Lenet => summarize_sequential(&Sequential::lenet(be, classes, side, seed), input, plan),
        Arch::Vgg16 => summarize_sequential(&Sequential::vgg16(be, classes, side, seed), input, plan),
        Arch::Airbench => summarize_sequential(&Sequential::airbench(be, classes, side, seed), input, plan),
    }
}

/// Describes a layer chain (LeNet, VGG-16, airbench) for an NHWC input of shape `input`, printed as
/// PyTorch prints the classes in `scripts/classic_models.py`; with `plan`, each
/// convolution's plan.
pub fn summarize_sequential<B: Backend>(model: &Sequential<B>, input: Shape4, plan: Option<PlanOf>) -> Summary {
    let mut w = Walk {
        tree: format!("{}(\n", model.title),
        rows: Vec::new(),
        depth: 1,
        plan,
    };
    let mut s = input;
    // The container now open (a path's parent that `model.containers` names), if any.
    let mut open: Option<&str> = None;
    for (layer, path) in model.layers.iter().zip(&model.paths) {
        let (parent, label) = match path.rsplit_once('.') {
            Some((parent, label)) if model.containers.iter().any(|(c, _)| c == parent) => (parent, label),
            _ => ("", path.as_str()),
        };
        if open != Some(parent) {
            if open.is_some_and(|o| !o.is_empty()) {
                w.close();
            }
            if let Some((_, class)) = model.containers.iter().find(|(c, _)| c == parent) {
                w.open(parent, class);
            }
            open = Some(parent);
        }
        match layer {
            Layer::Conv(c) => s = w.conv(label, parent, c, s),
            Layer::BatchNorm(b) => {
                w.bn(label, parent, b, s);
                if b.relu {
                    let i: usize = label.parse().expect("a fused ReLU's batch norm is numbered");
                    w.relu_as(&(i + 1).to_string(), parent, s, "ReLU()");
                }
            }
            Layer::Relu(_) if s.h * s.w == 1 => {
                // After a linear layer: a flat `[n, features]` activation.
                w.leaf(label, path.clone(), "ReLU()".into(), vec![s.n, s.c], 0, 0)
            }
            Layer::Relu(_) => w.relu_as(label, parent, s, "ReLU()"),
            Layer::Gelu(_) if s.h * s.w == 1 => w.leaf(
                label,
                path.clone(),
                "GELU(approximate='none')".into(),
                vec![s.n, s.c],
                0,
                0,
            ),
            Layer::Gelu(_) => w.relu_as(label, parent, s, "GELU(approximate='none')"),
            Layer::MaxPool(p) => s = w.pool(label, path.clone(), p, s),
            Layer::Linear(l) => {
                w.linear(label, path.clone(), l, s.n);
                s = Shape4::new(s.n, 1, 1, l.dout);
            }
            Layer::Scale(_) => w.leaf(label, path.clone(), "Mul()".into(), vec![s.n, s.c], 0, 0),
        }
    }
    if w.depth > 1 {
        w.close();
    }
    w.finish(input)
}

/// Describes `model` for an NHWC input of shape `input`; with `plan`, each convolution's plan.
pub fn summarize<B: Backend>(model: &ResNet<B>, input: Shape4, plan: Option<PlanOf>) -> Summary {
    let mut w = Walk {
        tree: "ResNet18(\n".into(),
        rows: Vec::new(),
        depth: 1,
        plan,
    };
    let stem = &model.stem;
    w.open("conv1", "Sequential");
    let mut s = w.conv("0", "conv1", &stem.conv, input);
    w.bn("1", "conv1", &stem.bn, s);
    let mut next = 2;
    if matches!(model.cfg.stem, Stem::Torchvision | Stem::Cifar) {
        w.relu("2", "conv1", s);
        next = 3;
    }
    if let Some(p) = &stem.pool {
        s = w.pool(&next.to_string(), format!("conv1.{next}"), p, s);
    }
    w.close();
    for (stage, pair) in model.blocks.chunks(2).enumerate() {
        let stage_name = format!("conv{}", stage + 2);
        w.open(&stage_name, "Sequential");
        for (i, block) in pair.iter().enumerate() {
            let path = format!("{stage_name}.{i}");
            w.open(&i.to_string(), "BasicBlock");
            w.open("layer", "Sequential");
            let lp = format!("{path}.layer");
            let a = w.conv("0", &lp, &block.conv_a, s);
            w.bn("1", &lp, &block.bn_a, a);
            w.relu("2", &lp, a);
            let b = w.conv("3", &lp, &block.conv_b, a);
            w.bn("4", &lp, &block.bn_b, b);
            w.close();
            match &block.shortcut {
                Some((conv, bn)) => {
                    w.open("shortcut", "Sequential");
                    let sp = format!("{path}.shortcut");
                    let o = w.conv("0", &sp, conv, s);
                    w.bn("1", &sp, bn, o);
                    w.close();
                }
                None => {
                    let _ = writeln!(w.tree, "{}(shortcut): Sequential()", "  ".repeat(w.depth));
                }
            }
            w.close();
            s = b;
        }
        w.close();
    }
    w.leaf(
        "avgpool",
        "avgpool".into(),
        "AdaptiveAvgPool2d(output_size=(1, 1))".into(),
        vec![s.n, s.c, 1, 1],
        0,
        0,
    );
    w.linear("fc", "fc".into(), &model.fc, s.n);
    w.finish(input)
}

impl Summary {
    /// The convolutions' plans as text (`summary --paths`), one line each.
    pub fn paths_table(&self) -> String {
        let mut t = format!("{:<22} {:<26} {}\n", "layer", "convolution", "path");
        for r in &self.rows {
            if let (Some(conv), Some(path)) = (&r.conv, &r.path) {
                let _ = writeln!(t, "{:<22} {:<26} {path}", r.name, conv);
            }
        }
        t
    }

    /// The per-layer table as text.
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:<26} {:<18} {:<20} {:>10} {:>15}\n",
            "layer", "type", "output", "params", "mult-adds"
        );
        for r in &self.rows {
            let shape = format!("{:?}", r.output);
            let _ = writeln!(
                t,
                "{:<26} {:<18} {:<20} {:>10} {:>15}",
                r.name, r.layer, shape, r.params, r.macs
            );
        }
        let n = self.input[0].max(1) as f64;
        let _ = writeln!(
            t,
            "total: {} parameters, {:.3} G multiply-adds for the input {:?} ({:.1} M per image)",
            self.total_params,
            self.total_macs as f64 / 1e9,
            self.input,
            self.total_macs as f64 / n / 1e6
        );
        t
    }
}
