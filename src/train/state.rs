//! What a run is and where it stands: how it starts (fresh, from a checkpoint's weights, or
//! where an earlier run stopped), its position in the data, and how it ended.

use super::config::TrainConfig;
use crate::checkpoint::{HostTensor, StateDict};
use crate::eval::EvalResult;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A run to train: its configuration, how it starts, and the folder it writes.
pub struct RunPlan {
    pub cfg: TrainConfig,
    pub start: Start,
    pub out: PathBuf,
    /// A new run may replace a previous run's files in `out` (`--overwrite`); without it
    /// `out` must be missing or empty.
    pub overwrite: bool,
}

/// Why a run ended before its last epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    MaxSteps,
    /// SIGINT or SIGTERM (the flag passed to [`super::train`] was raised).
    Interrupted,
}

/// How a run ended.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainOutcome {
    pub steps: u64,
    pub epochs_completed: usize,
    /// Set when the run stopped early, with a checkpoint to resume from.
    pub stopped: Option<Stop>,
    pub last_eval: Option<EvalResult>,
    /// (epoch, accuracy) of the best evaluation so far (1-based epoch).
    pub best: Option<(usize, f64)>,
    pub train_images: u64,
    pub train_seconds: f64,
    /// With several ranks: the checksum (crc32c) of the weights all of them held at the last save.
    pub ranks_agree_on: Option<u32>,
    /// With several ranks: rank 0's seconds in the gradient all-reduce (waits included), and
    /// over how many steps of this launch.
    pub reduce_seconds: f64,
    pub reduced_steps: u64,
}

impl TrainOutcome {
    pub fn images_per_sec(&self) -> f64 {
        self.train_images as f64 / self.train_seconds.max(1e-9)
    }

    /// With several ranks, what they agreed on and what averaging their gradients cost.
    pub fn ranks_line(&self, ranks: usize) -> Option<String> {
        let crc = self.ranks_agree_on?;
        let per_step = 1e3 * self.reduce_seconds / self.reduced_steps.max(1) as f64;
        let share = 100.0 * self.reduce_seconds / self.train_seconds.max(1e-9);
        Some(format!(
            "all {ranks} ranks hold the same weights (crc32c {crc:08x}); gradient all-reduce {per_step:.1} ms a step ({share:.0}% of training time, waits for the slowest rank included)"
        ))
    }

    /// The run's last line: steps, time, speed, best accuracy, and where its results are.
    pub fn done_line(&self, out: &Path) -> String {
        let best = self
            .best
            .map(|(e, acc)| format!(", best accuracy {acc:.4} after epoch {e}"));
        format!(
            "done: {} steps in {:.0} s of training ({:.1} img/s){}; results in {}",
            self.steps,
            self.train_seconds,
            self.images_per_sec(),
            best.unwrap_or_default(),
            out.display()
        )
    }
}

/// Where a run is: the next batch to train and what it has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// 0-based epoch of the next batch.
    pub epoch: usize,
    /// Index of the next batch within that epoch.
    pub batch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// (1-based epoch, accuracy) of the best evaluation.
    pub best: Option<(usize, f64)>,
    pub epochs_completed: usize,
}

/// A run's saved state (`train_state.safetensors`): model, optimizer, position, configuration.
pub struct Resume {
    pub config: TrainConfig,
    pub position: Position,
    /// How many ranks trained the run (it resumes on as many).
    pub ranks: usize,
    /// The model's tensors (`model.` names) and the optimizer's.
    pub(super) tensors: BTreeMap<String, HostTensor>,
}

impl Resume {
    /// Refuses to resume the run in `dir` on another number of ranks than it trained on
    /// (each rank's slice of every batch, and so the weights, would differ).
    pub fn check_ranks(&self, ranks: usize, dir: &Path) -> Result<(), String> {
        if self.ranks == ranks {
            return Ok(());
        }
        Err(format!(
            "{}: the run trained on {} rank(s) and resumes only on as many (this launch has {ranks}); \
             to continue on another number, start a new run with --init {}",
            dir.display(),
            self.ranks,
            dir.join("last.safetensors").display()
        ))
    }
}

/// Weights a run starts from instead of a fresh initialisation (`--init`, fine-tuning).
pub struct InitWeights {
    /// The file, as messages name it.
    pub origin: String,
    /// Its tensors under our names.
    pub tensors: StateDict,
}

/// How a run begins.
pub enum Start {
    /// A freshly initialised model.
    Fresh,
    /// From the weights of a checkpoint: every tensor must fit, except the classifier's when
    /// the class count differs (it starts afresh).
    Init(InitWeights),
    /// Where an earlier run stopped, bit for bit.
    Resume(Box<Resume>),
}

impl From<Option<Resume>> for Start {
    fn from(r: Option<Resume>) -> Self {
        r.map_or(Start::Fresh, |r| Start::Resume(Box::new(r)))
    }
}
