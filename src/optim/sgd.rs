//! torch.optim.SGD: momentum (the first step copies the gradient into the buffer), dampening,
//! Nesterov, and L2 weight decay added to the gradient.

use crate::engine::{Backend, SgdStep};
use crate::nn::Module;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Decay 1-D parameters too (BatchNorm weights and biases, biases): PyTorch's one
    /// parameter group. `false` is the usual second group with no decay.
    #[serde(default = "super::yes")]
    pub decay_1d: bool,
    /// Batch-norm parameters train at this times the learning rate, with their weight decay
    /// divided by it (airbench's `bias_scaler` group: the product of the two stays that of the
    /// other parameters). 1: one group.
    #[serde(default = "super::one")]
    pub norm_lr_scale: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            decay_1d: true,
            norm_lr_scale: 1.0,
        }
    }
}

pub struct Sgd<B: Backend> {
    pub cfg: SgdConfig,
    pub steps: u64,
    /// Momentum buffer per trainable parameter (frozen ones too, unused while they are), in
    /// state_dict order.
    pub state: Vec<B::Buf>,
}

impl<B: Backend> Sgd<B> {
    pub fn new(cfg: SgdConfig) -> Self {
        assert!(
            !cfg.nesterov || (cfg.momentum > 0.0 && cfg.dampening == 0.0),
            "Nesterov momentum requires a momentum and zero dampening"
        );
        Self {
            cfg,
            steps: 0,
            state: Vec::new(),
        }
    }

    /// Applies one step with learning rate `lr` to every trainable parameter of `model`,
    /// using the gradients its last backward pass wrote into the arena `grads`.
    pub fn step(&mut self, be: &B, model: &mut (impl Module<B> + ?Sized), grads: &B::Buf, lr: f64) {
        let h = SgdStep {
            lr,
            momentum: self.cfg.momentum,
            dampening: self.cfg.dampening,
            nesterov: self.cfg.nesterov,
            weight_decay: self.cfg.weight_decay,
            first: self.steps == 0,
        };
        self.steps += 1;
        let mut i = 0;
        let (decay_1d, scale) = (self.cfg.decay_1d, self.cfg.norm_lr_scale);
        let state = &mut self.state;
        model.visit_trainable(&mut |p| {
            let n = p.numel();
            if state.len() == i {
                state.push(be.alloc(n));
            }
            i += 1;
            if p.frozen {
                return;
            }
            let decay = super::decay_for(p, h.weight_decay, decay_1d);
            let h = match p.norm {
                true => SgdStep {
                    lr: h.lr * scale,
                    weight_decay: decay / scale,
                    ..h
                },
                false => SgdStep {
                    weight_decay: decay,
                    ..h
                },
            };
            be.sgd_step(&h, p.step(grads), &mut state[i - 1]);
        });
    }
}
