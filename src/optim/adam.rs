//! torch.optim.Adam (no amsgrad): per-parameter first and second moments, bias correction, and
//! L2 weight decay added to the gradient.

use crate::engine::{AdamStep, Backend};
use crate::nn::Module;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decay 1-D parameters too (see [`super::SgdConfig::decay_1d`]).
    #[serde(default = "super::yes")]
    pub decay_1d: bool,
}

impl Default for AdamConfig {
    /// PyTorch's defaults, which are also the seed's settings.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decay_1d: true,
        }
    }
}

pub struct Adam<B: Backend> {
    pub cfg: AdamConfig,
    /// Steps taken so far (PyTorch's `state['step']`, the same for every parameter here).
    pub steps: u64,
    /// `(exp_avg, exp_avg_sq)` per trainable parameter (frozen ones too, unused while they
    /// are), in state_dict order.
    pub state: Vec<(B::Buf, B::Buf)>,
}

impl<B: Backend> Adam<B> {
    pub fn new(cfg: AdamConfig) -> Self {
        Self {
            cfg,
            steps: 0,
            state: Vec::new(),
        }
    }

    /// Applies one step with learning rate `lr` to every trainable parameter of `model`,
    /// using the gradients its last backward pass wrote into the arena `grads`.
    pub fn step(&mut self, be: &B, model: &mut (impl Module<B> + ?Sized), grads: &B::Buf, lr: f64) {
        self.steps += 1;
        let h = AdamStep {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.steps,
        };
        let mut i = 0;
        let decay_1d = self.cfg.decay_1d;
        let state = &mut self.state;
        model.visit_trainable(&mut |p| {
            let n = p.numel();
            if state.len() == i {
                state.push((be.alloc(n), be.alloc(n)));
            }
            i += 1;
            if p.frozen {
                return;
            }
            let (m, v) = &mut state[i - 1];
            let h = AdamStep {
                weight_decay: super::decay_for(p, h.weight_decay, decay_1d),
                ..h
            };
            be.adam_step(&h, p.step(grads), m, v);
        });
    }
}
