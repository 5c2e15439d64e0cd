//! The run folder: everything a run writes, and the state a resumed run reads back.
//!
//! ```text
//! RUN/config.json                    the resolved configuration
//! RUN/metrics.jsonl                  every logged value, one JSON object a line
//! RUN/tensorboard/events.out.*       train_loss, test_loss, test_accuracy, lr
//! RUN/checkpoints/epoch-N.safetensors  model state_dict after epoch N (1-based), PyTorch keys
//! RUN/last.safetensors, RUN/best.safetensors   the latest and the most accurate of those
//! RUN/train_state.safetensors        optimizer state and position, for resuming
//! ```
//!
//! Two observers write it: [`MetricsLog`] (metrics.jsonl and the TensorBoard events) and
//! [`Checkpointer`] (the checkpoints and the resume state). Every file is written whole or not
//! at all (`checkpoint::write_atomic`), and every failed write names its file.

use super::config::TrainConfig;
use super::observer::{EpochEnd, Observer, RunState, StepLog};
use super::state::{Position, Resume};
use super::tensorboard::EventWriter;
use crate::checkpoint::{self, HostTensor};
use crate::engine::Backend;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Creates the run folder `root` with its `config.json`, and the two observers that write the
/// rest.
pub fn create(root: &Path, cfg: &TrainConfig) -> Result<(MetricsLog, Checkpointer)> {
    for dir in [root.to_path_buf(), root.join("checkpoints"), root.join("tensorboard")] {
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the run folder", dir.display()))?;
    }
    let config = serde_json::to_string_pretty(cfg)? + "\n";
    checkpoint::write_atomic(&root.join("config.json"), config.as_bytes())
        .with_context(|| format!("{}: cannot write", root.join("config.json").display()))?;
    let path = root.join("metrics.jsonl");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    let log = MetricsLog {
        path,
        metrics: std::io::BufWriter::new(file),
        tb: EventWriter::create(&root.join("tensorboard"))
            .with_context(|| format!("{}: cannot write", root.join("tensorboard").display()))?,
    };
    Ok((
        log,
        Checkpointer {
            root: root.to_path_buf(),
        },
    ))
}

/// Reads `RUN/train_state.safetensors`.
pub fn load_resume(run: &Path) -> Result<Resume> {
    let path = run.join("train_state.safetensors");
    let origin = path.display().to_string();
    let bytes =
        std::fs::read(&path).with_context(|| format!("{origin}: cannot read (is {} a run folder?)", run.display()))?;
    let (tensors, meta) = checkpoint::parse(&origin, &bytes)?;
    let field = |k: &str| meta.get(k).with_context(|| format!("{origin}: metadata lacks '{k}'"));
    let config: TrainConfig =
        serde_json::from_str(field("config")?).with_context(|| format!("{origin}: bad 'config' metadata"))?;
    let position: Position =
        serde_json::from_str(field("position")?).with_context(|| format!("{origin}: bad 'position' metadata"))?;
    let ranks = match meta.get("ranks") {
        Some(v) => v.parse().with_context(|| format!("{origin}: bad 'ranks' metadata"))?,
        None => 1,
    };
    Ok(Resume {
        config,
        position,
        ranks,
        tensors,
    })
}

/// `metrics.jsonl` and the TensorBoard event file: every logged value.
pub struct MetricsLog {
    path: PathBuf,
    metrics: std::io::BufWriter<std::fs::File>,
    tb: EventWriter,
}

impl MetricsLog {
    fn log(&mut self, value: serde_json::Value) -> Result<()> {
        writeln!(self.metrics, "{value}").with_context(|| format!("{}: write failed", self.path.display()))
    }

    fn scalar(&mut self, tag: &str, value: f32, step: usize) -> Result<()> {
        self.tb
            .scalar(tag, value, step as i64)
            .with_context(|| format!("{}: write failed", self.tb.path().display()))
    }

    fn flush(&mut self) -> Result<()> {
        self.tb
            .flush()
            .with_context(|| format!("{}: write failed", self.tb.path().display()))?;
        self.metrics
            .flush()
            .with_context(|| format!("{}: write failed", self.path.display()))
    }
}

impl<B: Backend> Observer<B> for MetricsLog {
    fn step_logged(&mut self, s: &StepLog) -> Result<()> {
        self.scalar("train_loss", s.loss, s.step as usize)?;
        self.log(serde_json::json!({"kind": "train", "step": s.step, "epoch": s.epoch, "loss": s.loss, "lr": s.lr}))
    }

    fn epoch_ended(&mut self, end: &EpochEnd, _state: &mut RunState<'_, B>) -> Result<()> {
        let (epoch, step, lr) = (end.epoch, end.step, end.lr);
        self.scalar("lr", lr as f32, epoch)?;
        match end.eval {
            Some((split, r)) => {
                self.scalar("test_loss", r.loss_sum_of_batch_means as f32, epoch)?;
                self.scalar("test_accuracy", r.accuracy as f32, epoch)?;
                self.log(serde_json::json!({
                    "kind": "eval", "split": split, "epoch": epoch, "step": step,
                    "loss_sum_of_batch_means": r.loss_sum_of_batch_means, "loss": r.loss, "accuracy": r.accuracy, "lr": lr,
                    "train_seconds": end.train_seconds,
                }))?
            }
            None => self.log(serde_json::json!({
                "kind": "epoch", "epoch": epoch, "step": step, "lr": lr, "train_seconds": end.train_seconds,
            }))?,
        }
        self.flush()
    }

    fn stopped(&mut self, _state: &mut RunState<'_, B>) -> Result<()> {
        self.flush()
    }
}

/// The checkpoints (`checkpoints/epoch-N`, `last`, `best`) and the resume state.
pub struct Checkpointer {
    root: PathBuf,
}

impl<B: Backend> Observer<B> for Checkpointer {
    fn epoch_ended(&mut self, end: &EpochEnd, s: &mut RunState<'_, B>) -> Result<()> {
        let root = &self.root;
        let epoch_path = root
            .join("checkpoints")
            .join(format!("epoch-{}.safetensors", end.epoch + 1));
        let accuracy = end.eval.map(|(_, r)| r.accuracy);
        let bytes = checkpoint::to_bytes(
            &checkpoint::state_dict(s.be, s.model),
            Some(meta(s.cfg, s.be.precision(), s.pos, accuracy)),
        );
        checkpoint::write_atomic(&epoch_path, &bytes)
            .with_context(|| format!("{}: write failed", epoch_path.display()))?;
        checkpoint::write_atomic(&root.join("last.safetensors"), &bytes).context("last.safetensors: write failed")?;
        if end.best {
            checkpoint::write_atomic(&root.join("best.safetensors"), &bytes)
                .context("best.safetensors: write failed")?;
        }
        save_train_state(&self.root, s)
    }

    fn stopped(&mut self, s: &mut RunState<'_, B>) -> Result<()> {
        save_train_state(&self.root, s)?;
        let meta = meta(s.cfg, s.be.precision(), s.pos, None);
        checkpoint::save(&self.root.join("last.safetensors"), s.be, s.model, Some(meta))
            .context("last.safetensors: write failed")
    }
}

/// Metadata stored in every model checkpoint: enough to rebuild the model, compute as its run
/// did (`precision`, the backend's, and the Winograd choice) and know its origin.
fn meta(cfg: &TrainConfig, precision: &str, pos: &Position, accuracy: Option<f64>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert(
        "format".into(),
        "resnet-cifar state_dict (PyTorch keys and layouts)".into(),
    );
    m.insert("model".into(), serde_json::to_string(&cfg.model).expect("serialisable"));
    m.insert("arch".into(), cfg.arch.name().into());
    m.insert("recipe".into(), cfg.recipe.clone());
    m.insert("val_split".into(), cfg.val_split.to_string());
    m.insert("precision".into(), precision.into());
    m.insert("winograd".into(), cfg.winograd.to_string());
    m.insert(
        "dataset".into(),
        serde_json::to_string(&cfg.dataset).expect("serialisable"),
    );
    if let Some(l) = cfg.labels {
        m.insert("labels".into(), l.name().into());
    }
    m.insert("epochs_completed".into(), pos.epochs_completed.to_string());
    m.insert("step".into(), pos.step.to_string());
    if let Some(a) = accuracy {
        m.insert("accuracy".into(), a.to_string());
    }
    m
}

/// Everything a resumed run needs beyond the model: optimizer state and the position in the
/// data, in one safetensors file written atomically.
fn save_train_state<B: Backend>(root: &Path, s: &mut RunState<'_, B>) -> Result<()> {
    let mut tensors: BTreeMap<String, HostTensor> = checkpoint::state_dict(s.be, s.model)
        .into_iter()
        .map(|(k, v)| (format!("model.{k}"), v))
        .collect();
    tensors.extend(s.opt.state_tensors(s.be, s.model));
    let mut meta = HashMap::new();
    meta.insert("config".into(), serde_json::to_string(s.cfg)?);
    meta.insert("position".into(), serde_json::to_string(s.pos)?);
    meta.insert("optimizer_steps".into(), s.opt.steps().to_string());
    meta.insert("ranks".into(), s.ranks.to_string());
    let path = root.join("train_state.safetensors");
    checkpoint::write_atomic(&path, &checkpoint::to_bytes(&tensors, Some(meta)))
        .with_context(|| format!("{}: write failed", path.display()))
}
