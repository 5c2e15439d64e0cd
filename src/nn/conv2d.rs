//! Conv2d, with an optional bias (ResNet's convs have none: batch norm follows each).

use super::builder::Builder;
use super::param::{Entry, Module, Param};
use crate::engine::Layout;
use crate::engine::{Backend, ConvGeom, ConvOp, Shape4, ensure_len};

#[derive(Clone, Copy, Debug)]
pub struct Conv2dConfig {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    pub bias: bool,
}

pub struct Conv2d<B: Backend> {
    pub cfg: Conv2dConfig,
    pub weight: Param<B>,
    pub bias: Option<Param<B>>,
    /// Output of the last forward pass.
    pub out: B::Buf,
    geom: Option<ConvGeom>,
    /// The backend's plan for this layer, made on its first pass for the input's size (a
    /// plan does not depend on the batch size), and remade only if that size changes.
    plan: Option<(Shape4, B::ConvPlan)>,
}

impl<B: Backend> Conv2d<B> {
    pub fn new(b: &Builder<B>, cfg: Conv2dConfig) -> Self {
        let k = cfg.kernel;
        let weight = b.uniform_fan_in(
            "weight",
            &[cfg.cout, cfg.cin, k, k],
            cfg.cin * k * k,
            b.backend().conv_weight_layout(),
        );
        let bias = cfg
            .bias
            .then(|| b.uniform_fan_in("bias", &[cfg.cout], cfg.cin * k * k, Layout::Torch));
        Self {
            cfg,
            weight,
            bias,
            out: b.backend().alloc(0),
            geom: None,
            plan: None,
        }
    }

    /// airbench's `Conv.reset_parameters`: after PyTorch's default initialisation, the first
    /// `cin` filters become the identity (`torch.nn.init.dirac_`: a 1 at the kernel's centre
    /// tap of their own channel, `k / 2` on each axis) and the bias, if any, 0.
    pub fn with_identity_filters(mut self, be: &B) -> Self {
        let (cin, cout, k) = (self.cfg.cin, self.cfg.cout, self.cfg.kernel);
        let mut w = self.weight.read(be);
        let filter = cin * k * k;
        for (o, f) in w.chunks_mut(filter).take(cin.min(cout)).enumerate() {
            f.fill(0.0);
            f[o * k * k + (k / 2) * k + k / 2] = 1.0;
        }
        self.weight.write(be, &w);
        if let Some(b) = &mut self.bias {
            b.write(be, &vec![0.0; cout]);
        }
        self
    }

    pub fn geom(&self, input: Shape4) -> ConvGeom {
        assert_eq!(
            input.c, self.cfg.cin,
            "{}: input has {} channels",
            self.weight.name, input.c
        );
        ConvGeom {
            input,
            cout: self.cfg.cout,
            kh: self.cfg.kernel,
            kw: self.cfg.kernel,
            stride: self.cfg.stride,
            pad: self.cfg.pad,
        }
    }

    /// The plan of this layer on `input` ([`crate::engine::ConvOps::conv2d_plan`]), made once.
    pub fn plan(&mut self, be: &B, input: Shape4) -> B::ConvPlan {
        let image = Shape4 { n: 1, ..input };
        match self.plan {
            Some((planned, plan)) if planned == image => plan,
            _ => {
                let plan = be.conv2d_plan(&self.geom(image));
                self.plan = Some((image, plan));
                plan
            }
        }
    }

    /// This layer as the backend computes it on `g`, with `plan`.
    pub fn op<'a>(&'a self, g: &'a ConvGeom, plan: &'a B::ConvPlan) -> ConvOp<'a, B> {
        ConvOp {
            g,
            plan,
            w: &self.weight.value,
        }
    }

    /// Computes `self.out` from `x`; returns the output shape.
    pub fn forward(&mut self, be: &B, x: &B::Buf, input: Shape4, ws: &mut B::Buf) -> Shape4 {
        let (g, plan) = self.prepare(be, input, ws);
        let Self { weight, out, .. } = self;
        let conv = ConvOp {
            g: &g,
            plan: &plan,
            w: &weight.value,
        };
        be.conv2d_forward(conv, x, out, ws);
        if let Some(b) = &self.bias {
            be.bias_add(g.output().rows(), g.cout, &b.value, &mut self.out);
        }
        g.output()
    }

    /// The geometry and plan of a forward pass on `input`, with `self.out` and the workspace
    /// `ws` sized for it and the geometry kept for the backward pass.
    pub(super) fn prepare(&mut self, be: &B, input: Shape4, ws: &mut B::Buf) -> (ConvGeom, B::ConvPlan) {
        let (g, plan) = (self.geom(input), self.plan(be, input));
        ensure_len(be, &mut self.out, g.output().numel());
        ensure_len(be, ws, be.conv2d_workspace_len(&g, &plan));
        self.geom = Some(g);
        (g, plan)
    }

    /// Writes the weight gradient (into the gradient arena `grads`) and, when `dx` is given,
    /// the input gradient. `x` must be the input of the last forward pass. A frozen weight's
    /// gradient is not computed: without `dx` only the bias's is.
    pub fn backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        dy: &B::Buf,
        dx: Option<&mut B::Buf>,
        grads: &mut B::Buf,
        ws: &mut B::Buf,
    ) {
        let g = self.geom.expect("conv backward before forward");
        let plan = self.plan.expect("planned by the forward pass").1;
        let mut dx = dx;
        if let Some(d) = dx.as_deref_mut() {
            ensure_len(be, d, g.input.numel());
        }
        if !(self.weight.frozen && dx.is_none()) {
            be.conv2d_backward(self.op(&g, &plan), x, dy, dx, self.weight.grad_slots(grads, None), ws);
        }
        if let Some(b) = &self.bias {
            let db = b.grad.expect("conv bias is trainable");
            be.bias_grad(g.output().rows(), g.cout, dy, grads, db);
        }
    }
}

impl<B: Backend> Module<B> for Conv2d<B> {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, B>)) {
        f(Entry::Tensor(&mut self.weight));
        if let Some(b) = &mut self.bias {
            f(Entry::Tensor(b));
        }
    }
}
