//! What the training loop tells the world: an [`Observer`] hears each event of a run and acts
//! on it. The console, the metrics and TensorBoard log and the checkpointer are observers; a
//! new behaviour (weight averaging, early stopping, another logger) is another one, attached
//! without touching the loop. Every method has an empty default: an observer implements the
//! events it needs.

use super::config::TrainConfig;
use super::optimizer::Optimizer;
use super::state::Position;
use crate::engine::Backend;
use crate::eval::EvalResult;
use crate::model::Network;
use anyhow::Result;

/// A log step's figures (every `--log-every` steps): the whole batch's mean loss.
#[derive(Clone, Copy, Debug)]
pub struct StepLog {
    pub step: u64,
    pub epoch: usize,
    pub loss: f32,
    pub lr: f64,
}

/// The end of an epoch, its evaluation done.
pub struct EpochEnd<'a> {
    /// 0-based.
    pub epoch: usize,
    pub epochs: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// The learning rate at the epoch's start, as the seed's TensorBoard log records it.
    pub lr: f64,
    /// The split evaluated on and the result, when the run has held-out images.
    pub eval: Option<(&'a str, &'a EvalResult)>,
    /// Whether this epoch's evaluation is the best so far.
    pub best: bool,
    pub train_seconds: f64,
    /// The epoch's time and the time left, as a person says them.
    pub pace: String,
}

/// The run's state as an observer that saves it reads: the model (its gradients aside), the
/// optimizer, the position, and how many ranks train together.
pub struct RunState<'a, B: Backend> {
    pub be: &'a B,
    pub cfg: &'a TrainConfig,
    pub model: &'a mut dyn Network<B>,
    pub opt: &'a Optimizer<B>,
    pub pos: &'a Position,
    pub ranks: usize,
}

/// One listener of a run. The loop calls every observer, in the order given, at each event;
/// an error from one stops the run with it.
pub trait Observer<B: Backend> {
    /// A line for the user: what the run trains on, what it starts from, where it resumes.
    fn note(&mut self, _line: &str) {}
    /// An epoch's training begins (`label`: "epoch 3/50"), over `images` images.
    fn epoch_started(&mut self, _label: &str, _images: u64) {}
    /// A batch of `images` (every rank's) was trained; `loss` on log steps.
    fn batch_trained(&mut self, _images: u64, _loss: Option<f32>) {}
    /// A log step.
    fn step_logged(&mut self, _log: &StepLog) -> Result<()> {
        Ok(())
    }
    /// The epoch's last batch was trained (or the run stopped within it).
    fn epoch_trained(&mut self) {}
    /// The end of an epoch: the moment to log its figures and save its checkpoint.
    fn epoch_ended(&mut self, _end: &EpochEnd, _state: &mut RunState<'_, B>) -> Result<()> {
        Ok(())
    }
    /// The run stops within an epoch (`--max-steps`, a signal): the moment to save what
    /// resuming needs.
    fn stopped(&mut self, _state: &mut RunState<'_, B>) -> Result<()> {
        Ok(())
    }
}
