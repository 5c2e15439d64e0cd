//! The training loop: the seed's loop (train an epoch, log the loss every `--log-every` steps,
//! evaluate, save) over a [`Trainer`], telling its observers ([`Observer`]) each event: the
//! console, and on rank 0 the run folder's metrics log and checkpointer.

use super::console::{Console, duration};
use super::folder;
use super::observer::{EpochEnd, Observer};
use super::state::{RunPlan, Stop, TrainOutcome};
use super::trainer::{Batches, Trainer, device_pixels, rank_shard};
use crate::data::{EpochPlan, Images, Splits, ValSplit, spawn_loader};
use crate::engine::{Backend, Collective, Local};
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Trains `plan` on `splits`: from a fresh model, a checkpoint's weights, or a stopped run's
/// state (then the run continues exactly where it stopped, bit for bit), writing its folder.
/// Raising `stop` ends the run after the current step, with a checkpoint.
pub fn train<B: Backend>(
    be: &B,
    plan: RunPlan,
    splits: &Splits,
    console: &mut Console,
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    train_ranks(be, &Local, plan, splits, console, stop)
}

/// As [`train`], as one of the ranks of `coll` training together (data parallel): each
/// computes its slice of every batch, gradients are averaged before each step, and rank 0
/// alone writes the run folder.
pub fn train_ranks<B: Backend>(
    be: &B,
    coll: &dyn Collective<B>,
    plan: RunPlan,
    splits: &Splits,
    console: &mut Console,
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    let RunPlan {
        cfg,
        start,
        out,
        overwrite,
    } = plan;
    let how = folder::FolderUse::of(&start, overwrite);
    let t = Trainer::new(be, (coll, &cfg), splits, &out, start, &mut |l| console.line(l))?;
    // The folder is created once the model stands: a checkpoint that does not fit leaves
    // nothing behind.
    let folder = if coll.rank() == 0 {
        Some(folder::create(&out, &cfg, how)?)
    } else {
        None
    };
    // The files first, the console last: a line on the screen is already on the disk.
    let mut observers: Vec<&mut dyn Observer<B>> = Vec::new();
    let mut folder = folder;
    if let Some((log, checkpoints)) = &mut folder {
        observers.push(checkpoints);
        observers.push(log);
    }
    observers.push(console);
    run(t, coll, splits, &mut observers, stop)
}

/// Every observer, in order.
struct Observers<'o, 'a, B: Backend>(&'o mut [&'a mut dyn Observer<B>]);

impl<B: Backend> Observers<'_, '_, B> {
    /// An event that cannot fail, to every observer.
    fn tell(&mut self, mut f: impl FnMut(&mut dyn Observer<B>)) {
        self.0.iter_mut().for_each(|o| f(&mut **o))
    }

    /// An event to every observer, in order, the first error stopping the run.
    fn each(&mut self, mut f: impl FnMut(&mut dyn Observer<B>) -> Result<()>) -> Result<()> {
        self.0.iter_mut().try_for_each(|o| f(&mut **o))
    }
}

/// The loop itself, over a trainer that stands, telling `observers` everything.
pub fn run<B: Backend>(
    mut t: Trainer<'_, B>,
    coll: &dyn Collective<B>,
    splits: &Splits,
    observers: &mut [&mut dyn Observer<B>],
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    let mut observers = Observers(observers);
    let cfg = t.cfg;
    let train_images = splits.train.clone();
    let eval_on = eval_split(splits);
    observers.tell(|o| o.note(&describe_split(train_images.len(), eval_on, splits.val_method)));
    let (mut trained_images, mut train_seconds) = (0u64, 0f64);

    // On a GPU the training images go to the device once and each batch is cut there from a
    // plan (indices, crops, flips) drawn on the host with the same randomness as the CPU's
    // loader thread, so both build exactly the same batches.
    let pixels = device_pixels(t.be, cfg, &train_images);
    let (epochs, total) = (cfg.epoch_count(), t.total_steps());
    while t.pos.epoch < epochs {
        let epoch = t.pos.epoch;
        t.start_epoch(epoch);
        let plan =
            EpochPlan::new(train_images.len(), cfg.batch_size, cfg.shuffle, cfg.seed, epoch).drop_last(cfg.drop_last);
        // A fractional last epoch ends when the run's steps are done.
        let batches = plan
            .num_batches()
            .min((total - (t.pos.step - t.pos.batch as u64)) as usize);
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
        let label = format!("epoch {}/{epochs}", epoch + 1);
        let epoch_images: usize = (0..batches).map(|b| plan.batch(b).len()).sum();
        observers.tell(|o| o.epoch_started(&label, epoch_images as u64));
        let started = Instant::now();
        let first_batch = t.pos.batch;
        while t.pos.batch < batches {
            let b = t.pos.batch;
            let labels = t.load_batch(&source, &train_images, &plan, b)?;
            let lr = cfg.schedule.lr(epoch, b, t.steps_per_epoch, total);
            let log = t.step(&labels, epoch, lr)?;
            let images = plan.batch(b).len() as u64; // all ranks' images
            trained_images += images;
            if let Some(log) = &log {
                observers.each(|o| o.step_logged(log))?;
            }
            observers.tell(|o| o.batch_trained(images, log.map(|l| l.loss)));
            let work_left = t.pos.batch < batches || epoch + 1 < epochs;
            if let Some(reason) = stop_reason(&t, stop, work_left) {
                train_seconds += started.elapsed().as_secs_f64();
                observers.tell(|o| o.epoch_trained());
                t.prepare_save()?;
                observers.each(|o| o.stopped(&mut t.state()))?;
                return Ok(t.outcome(Some(reason), trained_images, train_seconds));
            }
        }
        let epoch_seconds = started.elapsed().as_secs_f64();
        train_seconds += epoch_seconds;
        // A resumed run starts mid-epoch: scale its time to a whole epoch for the estimate.
        let whole_epoch_seconds = epoch_seconds * batches as f64 / (batches - first_batch).max(1) as f64;
        observers.tell(|o| o.epoch_trained());
        drop(source);
        let figures = t.end_epoch(epoch, eval_on)?;
        let end = EpochEnd {
            epoch,
            epochs,
            step: t.pos.step,
            lr: figures.lr,
            eval: figures.eval.as_ref().map(|(split, r)| (split.as_str(), r)),
            best: figures.best,
            train_seconds: epoch_seconds,
            pace: pace(epoch_seconds, whole_epoch_seconds, epochs - epoch - 1),
        };
        observers.each(|o| o.epoch_ended(&end, &mut t.state()))?;
        let stopped = stop_reason(&t, stop, t.pos.epoch < epochs);
        if stopped.is_some() {
            return Ok(t.outcome(stopped, trained_images, train_seconds));
        }
    }
    Ok(t.outcome(None, trained_images, train_seconds))
}

/// Why the run stops now, if it does: a signal on any rank (the ranks vote, so all stop after
/// the same step), or `--max-steps` reached while `work_left`.
fn stop_reason<B: Backend>(t: &Trainer<'_, B>, stop: &AtomicBool, work_left: bool) -> Option<Stop> {
    if t.agree_stop(stop.load(Ordering::Relaxed)) {
        Some(Stop::Interrupted)
    } else if t.cfg.max_steps.is_some_and(|m| t.pos.step >= m) && work_left {
        Some(Stop::MaxSteps)
    } else {
        None
    }
}

/// Which held-out images a run evaluates on.
pub fn eval_split(splits: &Splits) -> Option<(&'static str, &Images)> {
    match (&splits.test, &splits.val) {
        (Some(t), _) => Some(("test", t)),
        (None, Some(v)) => Some(("val", v)),
        (None, None) => None,
    }
}

/// The run's line about its images: how many it trains on, and what it evaluates on.
fn describe_split(train: usize, eval_on: Option<(&str, &Images)>, val_method: ValSplit) -> String {
    match eval_on {
        Some((name, images)) => format!(
            "training on {train} images, evaluating on the {name} set ({} images{}",
            images.len(),
            if name == "val" {
                format!(", {val_method}): the data has no test images, so the held-out validation split stands in")
            } else {
                ")".into()
            }
        ),
        None => format!("training on {train} images; no test images and no --val-split, so no evaluation"),
    }
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
