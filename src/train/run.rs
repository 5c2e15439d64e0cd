//! The training loop: the seed's loop (train an epoch, log the loss every 100 steps, evaluate,
//! save a checkpoint) with a run folder holding everything it produced:
//!
//! ```text
//! RUN/config.json                    the resolved configuration
//! RUN/metrics.jsonl                  every logged value, one JSON object a line
//! RUN/tensorboard/events.out.*       train_loss, test_loss, test_accuracy, lr
//! RUN/checkpoints/epoch-N.safetensors  model state_dict after epoch N (1-based), PyTorch keys
//! RUN/last.safetensors, RUN/best.safetensors   the latest and the most accurate of those
//! RUN/train_state.safetensors        optimizer state and position, for resuming
//! ```

use super::config::TrainConfig;
use super::console::{Console, duration};
use super::optimizer::Optimizer;
use super::tensorboard::EventWriter;
use super::trainer::{Batches, Trainer, device_pixels, rank_shard};
use crate::checkpoint::{self, HostTensor, StateDict};
use crate::data::{EpochPlan, Images, Splits, spawn_loader};
use crate::engine::{Backend, Collective, Local};
use crate::eval::EvalResult;
use crate::model::Network;
use crate::nn::Entry;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Why a run ended before its last epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    MaxSteps,
    /// SIGINT or SIGTERM (the flag passed to [`train`] was raised).
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
    tensors: BTreeMap<String, HostTensor>,
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

/// Loads `w` into `model`, all of it but a classifier of another shape, and says what it did.
pub(super) fn load_init<B: Backend>(
    be: &B,
    model: &mut dyn Network<B>,
    w: &InitWeights,
    console: &Console,
) -> Result<()> {
    let head = model.head();
    let prefix = format!("{head}.");
    let mut head_shapes = Vec::new();
    model.visit(&mut |e| {
        if let Entry::Tensor(p) = e
            && p.name.starts_with(&prefix)
        {
            head_shapes.push((p.name.clone(), p.shape.clone()));
        }
    });
    let fresh_head = head_shapes
        .iter()
        .any(|(name, shape)| w.tensors.get(name).is_some_and(|t| t.shape != *shape));
    checkpoint::load_tensors_except(&w.origin, &w.tensors, be, model, &|n| {
        fresh_head && n.starts_with(&prefix)
    })?;
    let classes = |shapes: &[usize]| shapes.first().copied().unwrap_or(0);
    let file_classes = w.tensors.get(&format!("{head}.bias")).map_or(0, |t| classes(&t.shape));
    console.line(&format!(
        "weights from {}{}",
        w.origin,
        if fresh_head {
            format!(
                "; its classifier ({head}) has {file_classes} classes, this data {}: {head} starts afresh",
                model.num_classes()
            )
        } else {
            String::new()
        }
    ));
    Ok(())
}

/// Refuses data that is not what the configuration (and its model) was made for.
pub(super) fn check_data(cfg: &TrainConfig, splits: &Splits) -> Result<()> {
    let spec = &splits.spec;
    if *spec != cfg.dataset || cfg.model.num_classes != spec.classes.len() || cfg.model.image_size != spec.image_size {
        bail!(
            "the data ({} classes, {}x{1} images) is not what the run's configuration was made for ({} classes, {}x{3}; model: {} classes, {}x{5})",
            spec.classes.len(),
            spec.image_size,
            cfg.dataset.classes.len(),
            cfg.dataset.image_size,
            cfg.model.num_classes,
            cfg.model.image_size
        );
    }
    Ok(())
}

/// Restores the model, the optimizer and the position of a resumed run (`r`, read from `out`).
pub(super) fn load_resumed<B: Backend>(
    be: &B,
    model: &mut dyn Network<B>,
    opt: &mut Optimizer<B>,
    r: Resume,
    out: &Path,
    console: &Console,
) -> Result<Position> {
    let (model_state, optim_state): (BTreeMap<_, _>, BTreeMap<_, _>) =
        r.tensors.into_iter().partition(|(k, _)| k.starts_with("model."));
    let model_state: BTreeMap<String, HostTensor> = model_state
        .into_iter()
        .map(|(k, v)| (k["model.".len()..].to_string(), v))
        .collect();
    let origin = out.join("train_state.safetensors").display().to_string();
    checkpoint::load_tensors(&origin, &model_state, be, &mut *model)?;
    opt.load_state(be, &mut *model, &optim_state, r.position.step)
        .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    let pos = r.position;
    console.line(&format!(
        "resuming at epoch {}, batch {} (step {})",
        pos.epoch + 1,
        pos.batch,
        pos.step
    ));
    Ok(pos)
}

/// Which held-out images a run evaluates on.
pub fn eval_split(splits: &Splits) -> Option<(&'static str, &Images)> {
    match (&splits.test, &splits.val) {
        (Some(t), _) => Some(("test", t)),
        (None, Some(v)) => Some(("val", v)),
        (None, None) => None,
    }
}

pub(super) struct RunFiles {
    pub(super) root: PathBuf,
    metrics: std::io::BufWriter<std::fs::File>,
    tb: EventWriter,
}

impl RunFiles {
    pub(super) fn create(root: &Path, cfg: &TrainConfig) -> Result<Self> {
        for dir in [root.to_path_buf(), root.join("checkpoints"), root.join("tensorboard")] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("{}: cannot create the run folder", dir.display()))?;
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
        Ok(Self {
            root: root.to_path_buf(),
            metrics: std::io::BufWriter::new(file),
            tb: EventWriter::create(&root.join("tensorboard"))
                .with_context(|| format!("{}: cannot write", root.join("tensorboard").display()))?,
        })
    }

    pub(super) fn log(&mut self, value: serde_json::Value) -> Result<()> {
        let path = self.root.join("metrics.jsonl");
        writeln!(self.metrics, "{value}").with_context(|| format!("{}: write failed", path.display()))
    }

    pub(super) fn scalar(&mut self, tag: &str, value: f32, step: usize) -> Result<()> {
        self.tb
            .scalar(tag, value, step as i64)
            .with_context(|| format!("{}: write failed", self.tb.path().display()))
    }

    pub(super) fn flush(&mut self) -> Result<()> {
        self.tb
            .flush()
            .with_context(|| format!("{}: write failed", self.tb.path().display()))?;
        let path = self.root.join("metrics.jsonl");
        self.metrics
            .flush()
            .with_context(|| format!("{}: write failed", path.display()))
    }
}

/// Trains as `cfg` says on `splits`, writing the run into `out`, from the `start` given: a fresh
/// model, a checkpoint's weights, or a stopped run's state (then the run continues exactly where
/// it stopped, bit for bit). Raising `stop` ends the run
/// after the current step, with a checkpoint.
pub fn train<B: Backend>(
    be: &B,
    cfg: &TrainConfig,
    splits: &Splits,
    out: &Path,
    console: &mut Console,
    start: Start,
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    train_ranks(be, &Local, cfg, splits, out, console, start, stop)
}

/// As [`train`], as one of the ranks of `coll` training together (data parallel): each
/// computes its slice of every batch, gradients are averaged before each step, and rank 0
/// alone writes the run folder.
#[allow(clippy::too_many_arguments)]
pub fn train_ranks<B: Backend>(
    be: &B,
    coll: &dyn Collective<B>,
    cfg: &TrainConfig,
    splits: &Splits,
    out: &Path,
    console: &mut Console,
    start: Start,
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    let mut t = Trainer::new(be, coll, cfg, splits, out, console, start)?;
    let train_images = splits.train.clone();
    let eval_on = eval_split(splits);
    console.line(&describe_split(train_images.len(), eval_on));
    let (mut trained_images, mut train_seconds) = (0u64, 0f64);
    let outcome = |t: &Trainer<'_, B>, stopped, images, seconds| TrainOutcome {
        steps: t.pos.step,
        epochs_completed: t.pos.epochs_completed,
        stopped,
        last_eval: t.last_eval.clone(),
        best: t.pos.best,
        train_images: images,
        train_seconds: seconds,
        ranks_agree_on: t.ranks_agree_on,
        reduce_seconds: t.reduce_seconds,
        reduced_steps: t.reduced_steps,
    };

    // On a GPU the training images go to the device once and each batch is cut there from a
    // plan (indices, crops, flips) drawn on the host with the same randomness as the CPU's
    // loader thread, so both build exactly the same batches.
    let pixels = device_pixels(be, cfg, &train_images);
    while t.pos.epoch < cfg.epochs {
        let epoch = t.pos.epoch;
        let plan = EpochPlan::new(train_images.len(), cfg.batch_size, cfg.shuffle, cfg.seed, epoch);
        let source = match &pixels {
            Some(p) => Batches::Device(p),
            None => Batches::Loader(spawn_loader(
                train_images.clone(),
                plan.clone(),
                t.pos.batch,
                cfg.augment,
                splits.spec.norm,
                rank_shard(coll),
            )),
        };
        console.start_epoch(
            &format!("epoch {}/{}", epoch + 1, cfg.epochs),
            train_images.len() as u64,
        );
        let started = Instant::now();
        let first_batch = t.pos.batch;
        while t.pos.batch < plan.num_batches() {
            let b = t.pos.batch;
            let labels = t.load_batch(&source, &train_images, &plan, b)?;
            let lr = cfg.schedule.lr(epoch, b, t.steps_per_epoch, cfg.epochs);
            let msg = t.step(&labels, epoch, lr, console)?;
            let images = plan.batch(b).len() as u64; // all ranks' images
            trained_images += images;
            console.advance(images, &msg);
            let reason = if t.agree_stop(stop.load(Ordering::Relaxed)) {
                Some(Stop::Interrupted)
            } else if cfg.max_steps.is_some_and(|m| t.pos.step >= m)
                && (t.pos.batch < plan.num_batches() || epoch + 1 < cfg.epochs)
            {
                Some(Stop::MaxSteps)
            } else {
                None
            };
            if let Some(reason) = reason {
                train_seconds += started.elapsed().as_secs_f64();
                console.finish_epoch();
                t.save_stopped()?;
                return Ok(outcome(&t, Some(reason), trained_images, train_seconds));
            }
        }
        let epoch_seconds = started.elapsed().as_secs_f64();
        train_seconds += epoch_seconds;
        // A resumed run starts mid-epoch: scale its time to a whole epoch for the estimate.
        let whole_epoch_seconds =
            epoch_seconds * plan.num_batches() as f64 / (plan.num_batches() - first_batch).max(1) as f64;
        console.finish_epoch();
        drop(source);
        let progress = pace(epoch_seconds, whole_epoch_seconds, cfg.epochs - epoch - 1);
        t.end_epoch(epoch, eval_on, epoch_seconds, &progress, console)?;
        let stopped = if t.agree_stop(stop.load(Ordering::Relaxed)) {
            Some(Stop::Interrupted)
        } else if cfg.max_steps.is_some_and(|m| t.pos.step >= m) && t.pos.epoch < cfg.epochs {
            Some(Stop::MaxSteps)
        } else {
            None
        };
        if stopped.is_some() {
            return Ok(outcome(&t, stopped, trained_images, train_seconds));
        }
    }
    Ok(outcome(&t, None, trained_images, train_seconds))
}

/// The run's line about its images: how many it trains on, and what it evaluates on.
fn describe_split(train: usize, eval_on: Option<(&str, &Images)>) -> String {
    match eval_on {
        Some((name, images)) => format!(
            "training on {train} images, evaluating on the {name} set ({} images){}",
            images.len(),
            if name == "val" {
                ": the data has no test images, so the held-out validation split stands in"
            } else {
                ""
            }
        ),
        None => format!("training on {train} images; no test images and no --val-split, so no evaluation"),
    }
}

/// Metadata stored in every model checkpoint: enough to rebuild the model, compute as its run
/// did (`precision`, the backend's, and the Winograd choice) and know its origin.
pub(super) fn meta(
    cfg: &TrainConfig,
    precision: &str,
    pos: &Position,
    accuracy: Option<f64>,
) -> HashMap<String, String> {
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
pub(super) fn save_train_state<B: Backend>(
    be: &B,
    root: &Path,
    cfg: &TrainConfig,
    model: &mut dyn Network<B>,
    opt: &Optimizer<B>,
    pos: &Position,
    ranks: usize,
) -> Result<()> {
    let mut tensors: BTreeMap<String, HostTensor> = checkpoint::state_dict(be, model)
        .into_iter()
        .map(|(k, v)| (format!("model.{k}"), v))
        .collect();
    tensors.extend(opt.state_tensors(be, model));
    let mut meta = HashMap::new();
    meta.insert("config".into(), serde_json::to_string(cfg)?);
    meta.insert("position".into(), serde_json::to_string(pos)?);
    meta.insert("optimizer_steps".into(), opt.steps().to_string());
    meta.insert("ranks".into(), ranks.to_string());
    let path = root.join("train_state.safetensors");
    checkpoint::write_atomic(&path, &checkpoint::to_bytes(&tensors, Some(meta)))
        .with_context(|| format!("{}: write failed", path.display()))
}

/// How long an epoch's training took and, at that pace (`whole_epoch_seconds` a full epoch),
/// how long the epochs left will take: the line a user checking a long run's log wants.
fn pace(epoch_seconds: f64, whole_epoch_seconds: f64, epochs_left: usize) -> String {
    let took = format!("trained in {}", duration(epoch_seconds));
    match epochs_left {
        0 => took,
        n => format!("{took}, about {} to go", duration(whole_epoch_seconds * n as f64)),
    }
}
