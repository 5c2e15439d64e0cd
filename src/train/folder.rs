//! The run folder: everything a run writes, and the state a resumed run reads back.
//!
//! ```text
//! RUN/config.json                    the resolved configuration
//! RUN/metrics.jsonl                  every logged value, one JSON object a line
//! RUN/tensorboard/events.out.*       train_loss, test_loss, test_accuracy, lr
//! RUN/checkpoints/epoch-N.safetensors  model state_dict after epoch N (1-based), PyTorch keys
//! RUN/last.safetensors, RUN/best.safetensors   the latest and the most accurate of those
//! RUN/train_state.safetensors        optimizer state and position, for resuming
//! RUN/.lock                          held (an OS file lock) while a run writes the folder
//! ```
//!
//! A new run takes a missing or empty folder, or with `--overwrite` one holding anything (a
//! previous run's files are removed first, nothing else is); a resumed run, its own folder.
//!
//! Two observers write it: [`MetricsLog`] (metrics.jsonl and the TensorBoard events) and
//! [`Checkpointer`] (the checkpoints and the resume state). Every file is written whole or not
//! at all (`checkpoint::write_atomic`), and every failed write names its file.

use super::config::TrainConfig;
use super::observer::{EpochEnd, Observer, RunState, StepLog};
use super::state::{Position, Resume, Start};
use super::tensorboard::EventWriter;
use crate::checkpoint::{self, HostTensor};
use crate::engine::Backend;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How a run may use its folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolderUse {
    /// A new run: the folder must be missing or empty.
    New,
    /// A new run with `--overwrite`: a previous run's files there are removed first.
    Overwrite,
    /// A resumed run, in its own folder.
    Resume,
}

impl FolderUse {
    pub fn of(start: &Start, overwrite: bool) -> Self {
        match (start, overwrite) {
            (Start::Resume(_), _) => Self::Resume,
            (_, true) => Self::Overwrite,
            (_, false) => Self::New,
        }
    }
}

/// The run's lock file: held while a run writes the folder, released when the process ends
/// however it ends.
const LOCK: &str = ".lock";

/// The files a run writes at the folder's top; with `checkpoints/epoch-*.safetensors` and
/// `tensorboard/events.out.tfevents.*`, what `--overwrite` removes.
const RUN_FILES: [&str; 5] = [
    "config.json",
    "metrics.jsonl",
    "last.safetensors",
    "best.safetensors",
    "train_state.safetensors",
];

/// Refuses a folder `how` may not write: a file, or for a new run a folder that holds
/// anything (a user's files, another run), so that nothing is overwritten unasked.
pub fn check(root: &Path, how: FolderUse) -> Result<(), String> {
    let shown = root.display();
    match std::fs::metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{shown}: cannot create the run folder: {e}")),
        Ok(m) if !m.is_dir() => return Err(format!("{shown}: not a folder (--out names the run's folder)")),
        Ok(_) if how != FolderUse::New => return Ok(()),
        Ok(_) => {}
    }
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| format!("{shown}: cannot list: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK)
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let held = match names.len() {
        1..=3 => names.join(", "),
        n => format!("{} and {} more", names[..3].join(", "), n - 3),
    };
    let resume = if root.join("train_state.safetensors").exists() {
        format!("--resume {shown} to continue the run there, ")
    } else {
        String::new()
    };
    Err(format!(
        "{shown}: the folder is not empty (it holds {held}); give a new or empty folder, {resume}or --overwrite to replace a run's files there"
    ))
}

/// The folder's lock, taken: no other run writes the folder while it is held.
struct FolderLock(#[allow(dead_code)] std::fs::File);

fn lock(root: &Path) -> Result<FolderLock> {
    let path = root.join(LOCK);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the message of a run that finds it taken.
            let _ = file.set_len(0).and_then(|()| write!(file, "{}", std::process::id()));
            Ok(FolderLock(file))
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "{}: another run (process {}) is writing this folder; wait for it to end or give another --out",
                root.display(),
                holder.trim()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("{}: cannot lock", path.display())),
    }
}

/// Removes a previous run's files from `root` (`--overwrite`), and nothing else.
fn remove_run_files(root: &Path) -> Result<()> {
    let mut doomed: Vec<PathBuf> = RUN_FILES.iter().map(|n| root.join(n)).collect();
    let matching = |dir: &str, keep: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        let entries = std::fs::read_dir(root.join(dir)).into_iter().flatten().flatten();
        entries
            .filter(|e| e.file_name().to_str().is_some_and(keep))
            .map(|e| e.path())
            .collect()
    };
    doomed.extend(matching("checkpoints", &|n| {
        n.starts_with("epoch-") && n.ends_with(".safetensors")
    }));
    doomed.extend(matching("tensorboard", &|n| n.starts_with("events.out.tfevents.")));
    for path in doomed.iter().filter(|p| p.is_file()) {
        std::fs::remove_file(path).with_context(|| format!("{}: cannot remove (--overwrite)", path.display()))?;
    }
    Ok(())
}

/// Creates the run folder `root` with its `config.json`, and the two observers that write the
/// rest, the folder locked while they live. The folder is checked (again, under the lock)
/// for `how`. Temporary files a killed run left (written whole or not at all, so never
/// needed) are removed.
pub fn create(root: &Path, cfg: &TrainConfig, how: FolderUse) -> Result<(MetricsLog, Checkpointer)> {
    std::fs::create_dir_all(root).with_context(|| format!("{}: cannot create the run folder", root.display()))?;
    let lock = lock(root)?;
    check(root, how).map_err(anyhow::Error::msg)?;
    if how == FolderUse::Overwrite {
        remove_run_files(root)?;
    }
    for dir in [root.to_path_buf(), root.join("checkpoints"), root.join("tensorboard")] {
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the run folder", dir.display()))?;
        crate::atomic_file::remove_stale(&dir);
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
            _lock: lock,
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
    /// Every log line reaches the disk at once: a run killed later keeps the losses it printed.
    fn step_logged(&mut self, s: &StepLog) -> Result<()> {
        self.scalar("train_loss", s.loss, s.step as usize)?;
        self.log(serde_json::json!({"kind": "train", "step": s.step, "epoch": s.epoch, "loss": s.loss, "lr": s.lr}))?;
        self.flush()
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
    _lock: FolderLock,
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
    m.insert(
        "val_split_method".into(),
        serde_json::to_string(&cfg.val_split_method).expect("serialisable"),
    );
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
