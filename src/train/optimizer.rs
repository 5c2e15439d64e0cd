//! The run's optimizer, whichever the recipe chose, with its lookahead averaging when the
//! recipe has one, and its state as named tensors for checkpoints (`optim.{param}.exp_avg`,
//! `.exp_avg_sq`, `.momentum_buffer`; `lookahead.{tensor}`).

use super::config::{Lookahead, OptimizerConfig};
use crate::checkpoint::HostTensor;
use crate::engine::Backend;
use crate::model::Network;
use crate::nn::{Entry, Module};
use crate::optim::{Adam, Sgd};
use std::collections::BTreeMap;

pub struct Optimizer<B: Backend> {
    rule: Rule<B>,
    lookahead: Option<(Lookahead, Vec<B::Buf>)>,
}

enum Rule<B: Backend> {
    Adam(Adam<B>),
    Sgd(Sgd<B>),
}

impl<B: Backend> Optimizer<B> {
    pub fn new(cfg: &OptimizerConfig, lookahead: Option<Lookahead>) -> Self {
        let rule = match *cfg {
            OptimizerConfig::Adam(c) => Rule::Adam(Adam::new(c)),
            OptimizerConfig::Sgd(c) => Rule::Sgd(Sgd::new(c)),
        };
        Self {
            rule,
            lookahead: lookahead.map(|l| (l, Vec::new())),
        }
    }

    /// One step of every trainable parameter of `model` from the gradients in its arena; then,
    /// with lookahead, its averaging at its steps, and after the run's last step (`total`)
    /// the weights take the slow copy's value.
    pub fn step(&mut self, be: &B, model: &mut dyn Network<B>, lr: f64, total: u64) {
        {
            let (mut state, grads) = model.state_and_grads();
            match &mut self.rule {
                Rule::Adam(o) => o.step(be, &mut *state, grads, lr),
                Rule::Sgd(o) => o.step(be, &mut *state, grads, lr),
            }
        }
        let step = self.steps();
        let Some((la, slow)) = &mut self.lookahead else {
            return;
        };
        // The slow copy starts as the model did before its first step (airbench's
        // `LookaheadState(model)`), made by `start` or loaded on resume.
        assert!(!slow.is_empty(), "Optimizer::start makes the lookahead copy");
        if step.is_multiple_of(la.every) {
            lookahead_update(be, model, slow, la.alpha(step, total));
        }
        if step >= total {
            lookahead_update(be, model, slow, 1.0);
        }
    }

    /// Makes the lookahead's slow copy of `model` as it is before training (nothing without
    /// lookahead; a resumed run loads it instead).
    pub fn start(&mut self, be: &B, model: &mut dyn Network<B>) {
        if let Some((_, slow)) = &mut self.lookahead {
            slow.clear();
            model.visit(&mut |e| {
                if let Entry::Tensor(p) = e {
                    let n = p.numel();
                    let mut copy = be.alloc(n);
                    be.scale(n, 1.0, &p.value, &mut copy);
                    slow.push(copy);
                }
            });
        }
    }

    pub fn steps(&self) -> u64 {
        match &self.rule {
            Rule::Adam(o) => o.steps,
            Rule::Sgd(o) => o.steps,
        }
    }

    /// Restores the state written by [`Self::state_tensors`] after `steps` steps; every
    /// tensor of a parameter that is not frozen must be there with its size (a frozen one's
    /// starts at zero).
    pub fn load_state(
        &mut self,
        be: &B,
        model: &mut (impl Module<B> + ?Sized),
        tensors: &BTreeMap<String, HostTensor>,
        steps: u64,
    ) -> Result<(), String> {
        let mut params = Vec::new();
        model.visit_trainable(&mut |p| params.push((p.name.clone(), p.numel(), p.frozen)));
        let get = |key: String, (n, frozen): (usize, bool)| -> Result<B::Buf, String> {
            if frozen {
                return Ok(be.alloc(n));
            }
            let t = tensors
                .get(&key)
                .ok_or_else(|| format!("missing optimizer tensor '{key}'"))?;
            if t.dtype != safetensors::Dtype::F32 || t.shape != [n] {
                return Err(format!(
                    "optimizer tensor '{key}' has shape {:?}, expected [{n}]",
                    t.shape
                ));
            }
            let mut buf = be.alloc(n);
            be.upload(&crate::checkpoint::f32_values(&t.bytes), &mut buf);
            Ok(buf)
        };
        if let Some((_, slow)) = &mut self.lookahead {
            slow.clear();
            let mut missing = None;
            model.visit(&mut |e| {
                if let Entry::Tensor(p) = e {
                    match get(format!("lookahead.{}", p.name), (p.numel(), false)) {
                        Ok(buf) => slow.push(buf),
                        Err(e) => {
                            missing.get_or_insert(e);
                        }
                    }
                }
            });
            if let Some(e) = missing {
                return Err(e);
            }
        }
        match &mut self.rule {
            Rule::Adam(o) => {
                o.state = params
                    .iter()
                    .map(|(name, n, frozen)| {
                        Ok((
                            get(format!("optim.{name}.exp_avg"), (*n, *frozen))?,
                            get(format!("optim.{name}.exp_avg_sq"), (*n, *frozen))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?;
                o.steps = steps;
            }
            Rule::Sgd(o) => {
                o.state = params
                    .iter()
                    .map(|(name, n, frozen)| get(format!("optim.{name}.momentum_buffer"), (*n, *frozen)))
                    .collect::<Result<_, String>>()?;
                o.steps = steps;
            }
        }
        Ok(())
    }

    /// The optimizer's state of every parameter of `model` that is not frozen, named after
    /// the parameter.
    pub fn state_tensors(&self, be: &B, model: &mut (impl Module<B> + ?Sized)) -> BTreeMap<String, HostTensor> {
        let mut names = Vec::new();
        model.visit_trainable(&mut |p| names.push((p.name.clone(), p.numel(), p.frozen)));
        let mut out = BTreeMap::new();
        let mut put = |key: String, buf: &B::Buf, n: usize| {
            let mut host = vec![0f32; n];
            be.download(buf, &mut host);
            let bytes = host.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.insert(
                key,
                HostTensor {
                    dtype: safetensors::Dtype::F32,
                    shape: vec![n],
                    bytes,
                },
            );
        };
        if let Some((_, slow)) = &self.lookahead {
            let mut i = 0;
            model.visit(&mut |e| {
                if let Entry::Tensor(p) = e {
                    put(format!("lookahead.{}", p.name), &slow[i], p.numel());
                    i += 1;
                }
            });
        }
        match &self.rule {
            Rule::Adam(o) => {
                for ((name, n, _), (m, v)) in names.iter().zip(&o.state).filter(|((.., f), _)| !f) {
                    put(format!("optim.{name}.exp_avg"), m, *n);
                    put(format!("optim.{name}.exp_avg_sq"), v, *n);
                }
            }
            Rule::Sgd(o) => {
                for ((name, n, _), buf) in names.iter().zip(&o.state).filter(|((.., f), _)| !f) {
                    put(format!("optim.{name}.momentum_buffer"), buf, *n);
                }
            }
        }
        out
    }
}

/// airbench's `LookaheadState.update`: every float tensor of the state (batch-norm statistics
/// included) moves its slow copy towards the model's value by `1 - alpha`, and the model takes
/// the slow copy's value.
fn lookahead_update<B: Backend>(be: &B, model: &mut dyn Network<B>, slow: &mut [B::Buf], alpha: f64) {
    let weight = (1.0 - alpha) as f32;
    let mut i = 0;
    model.visit(&mut |e| {
        if let Entry::Tensor(p) = e {
            let n = p.numel();
            be.lerp(n, weight, &p.value, &mut slow[i]);
            be.scale(n, 1.0, &slow[i], &mut p.value);
            i += 1;
        }
    });
}
