//! The run's optimizer, whichever the recipe chose, and its state as named tensors for
//! checkpoints (`optim.{param}.exp_avg`, `.exp_avg_sq`, `.momentum_buffer`).

use super::config::OptimizerConfig;
use crate::checkpoint::HostTensor;
use crate::engine::Backend;
use crate::model::Network;
use crate::nn::Module;
use crate::optim::{Adam, Sgd};
use std::collections::BTreeMap;

pub enum Optimizer<B: Backend> {
    Adam(Adam<B>),
    Sgd(Sgd<B>),
}

impl<B: Backend> Optimizer<B> {
    pub fn new(cfg: &OptimizerConfig) -> Self {
        match *cfg {
            OptimizerConfig::Adam(c) => Optimizer::Adam(Adam::new(c)),
            OptimizerConfig::Sgd(c) => Optimizer::Sgd(Sgd::new(c)),
        }
    }

    /// One step of every trainable parameter of `model` from the gradients in its arena.
    pub fn step(&mut self, be: &B, model: &mut dyn Network<B>, lr: f64) {
        let (mut state, grads) = model.state_and_grads();
        match self {
            Optimizer::Adam(o) => o.step(be, &mut *state, grads, lr),
            Optimizer::Sgd(o) => o.step(be, &mut *state, grads, lr),
        }
    }

    pub fn steps(&self) -> u64 {
        match self {
            Optimizer::Adam(o) => o.steps,
            Optimizer::Sgd(o) => o.steps,
        }
    }

    /// Restores the state written by [`Self::state_tensors`] after `steps` steps; every
    /// tensor must be there with the parameter's size.
    pub fn load_state(
        &mut self,
        be: &B,
        model: &mut (impl Module<B> + ?Sized),
        tensors: &BTreeMap<String, HostTensor>,
        steps: u64,
    ) -> Result<(), String> {
        let mut params = Vec::new();
        model.visit_params(&mut |p| params.push((p.name.clone(), p.numel())));
        let get = |key: String, n: usize| -> Result<B::Buf, String> {
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
        match self {
            Optimizer::Adam(o) => {
                o.state = params
                    .iter()
                    .map(|(name, n)| {
                        Ok((
                            get(format!("optim.{name}.exp_avg"), *n)?,
                            get(format!("optim.{name}.exp_avg_sq"), *n)?,
                        ))
                    })
                    .collect::<Result<_, String>>()?;
                o.steps = steps;
            }
            Optimizer::Sgd(o) => {
                o.state = params
                    .iter()
                    .map(|(name, n)| get(format!("optim.{name}.momentum_buffer"), *n))
                    .collect::<Result<_, String>>()?;
                o.steps = steps;
            }
        }
        Ok(())
    }

    /// The optimizer's per-parameter state, named after the parameters of `model`.
    pub fn state_tensors(&self, be: &B, model: &mut (impl Module<B> + ?Sized)) -> BTreeMap<String, HostTensor> {
        let mut names = Vec::new();
        model.visit_params(&mut |p| names.push((p.name.clone(), p.numel())));
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
        match self {
            Optimizer::Adam(o) => {
                for ((name, n), (m, v)) in names.iter().zip(&o.state) {
                    put(format!("optim.{name}.exp_avg"), m, *n);
                    put(format!("optim.{name}.exp_avg_sq"), v, *n);
                }
            }
            Optimizer::Sgd(o) => {
                for ((name, n), buf) in names.iter().zip(&o.state) {
                    put(format!("optim.{name}.momentum_buffer"), buf, *n);
                }
            }
        }
        out
    }
}
