//! A training run in progress: the model, its optimizer and where it is. The loop in
//! [`super::run::train`] drives it one step and one epoch end at a time, and hands its state
//! to the observers that save it; a data-parallel run adds its all-reduce between the
//! backward pass and the optimizer step, in [`Trainer::step`].

use super::config::{Reduction, TrainConfig};
use super::observer::{RunState, StepLog};
use super::optimizer::Optimizer;
use super::state::{InitWeights, Position, Resume, Start, Stop, TrainOutcome};
use crate::checkpoint::{self, HostTensor};
use crate::data::transform::BatchPlan;
use crate::data::{Batch, CHANNELS, EpochPlan, Images, Normalization, Shard, Splits};
use crate::engine::{Backend, Collective, CropPlan, ensure_len};
use crate::eval::{EvalResult, EvalTally, evaluate_shard};
use crate::model::{Network, build};
use crate::nn::Entry;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::Receiver;

/// Where an epoch's batches come from: cut on the device from images kept there, or built by
/// the host's loader thread.
pub enum Batches<'a, B: Backend> {
    Device(&'a B::Pixels),
    Loader(Receiver<Batch>),
}

pub struct Trainer<'a, B: Backend> {
    pub(super) be: &'a B,
    /// The ranks training together (one: `Local`).
    coll: &'a dyn Collective<B>,
    pub(super) cfg: &'a TrainConfig,
    model: Box<dyn Network<B>>,
    opt: Optimizer<B>,
    pub pos: Position,
    side: usize,
    norm: Normalization,
    /// The current batch, NHWC on the device.
    x: B::Buf,
    /// The first non-finite loss: `[step, loss]` (see `Backend::watch_loss`).
    watch: B::Buf,
    pub steps_per_epoch: usize,
    /// Images in the whole (all ranks') current batch.
    global_batch: usize,
    /// With several ranks: the checksum of the weights every rank held at the last save.
    pub ranks_agree_on: Option<u32>,
    /// With several ranks: seconds spent averaging gradients (the all-reduce, its copies and
    /// the wait for the slowest rank), and over how many steps.
    pub reduce_seconds: f64,
    pub reduced_steps: u64,
    pub last_eval: Option<EvalResult>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// The model `cfg` describes, started as `start` says (on every rank of `coll`: rank 0's
    /// weights) for the run folder `out`; `note` hears what it started from.
    pub fn new(
        be: &'a B,
        (coll, cfg): (&'a dyn Collective<B>, &'a TrainConfig),
        splits: &Splits,
        out: &Path,
        start: Start,
        note: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.eval_batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        let ranks = coll.size();
        if !cfg.batch_size.is_multiple_of(ranks) {
            bail!(
                "--batch-size {} is the global batch and must split evenly over the {ranks} ranks",
                cfg.batch_size
            );
        }
        check_data(cfg, splits)?;
        let mut model = build(be, cfg.arch, cfg.model, cfg.seed);
        if cfg.sync_bn && ranks > 1 {
            // Every rank takes part in every batch's exchanges, so none may have an empty slice.
            let last = splits.train.len() % cfg.batch_size;
            if last != 0 && last < ranks {
                bail!(
                    "--sync-bn: the last batch of an epoch has {last} image(s), fewer than the {ranks} \
                     ranks; choose a --batch-size or --val-split that leaves at least {ranks}"
                );
            }
            model.sync_batch_norm(coll.stats_sum());
        }
        model.set_label_smoothing(cfg.label_smoothing);
        if cfg.zero_init_residual {
            model.zero_init_residual(be);
        }
        if cfg.freeze_backbone {
            let head = model.head();
            model.freeze_all_but(&head);
            note(&format!("training only the classifier ({head}); the rest is frozen"));
        }
        let mut opt = Optimizer::new(&cfg.optimizer, cfg.lookahead);
        let fresh = matches!(start, Start::Fresh);
        if fresh && cfg.whiten_init {
            note(&whiten_first_conv(
                be,
                model.as_mut(),
                &splits.train,
                &splits.spec.norm,
            )?);
        }
        let pos = match start {
            Start::Fresh => Position::default(),
            Start::Init(w) => {
                note(&load_init(be, model.as_mut(), &w)?);
                Position::default()
            }
            Start::Resume(r) => {
                r.check_ranks(ranks, out).map_err(anyhow::Error::msg)?;
                // Parameters frozen at the resumed epoch have no optimizer state to load.
                freeze_for_epoch(cfg, model.as_mut(), r.position.epoch);
                let pos = load_resumed(be, model.as_mut(), &mut opt, *r, out)?;
                note(&format!(
                    "resuming at epoch {}, batch {} (step {})",
                    pos.epoch + 1,
                    pos.batch,
                    pos.step
                ));
                pos
            }
        };
        if ranks > 1 {
            model.visit(&mut |e| {
                if let Entry::Tensor(p) = e {
                    let n = p.numel();
                    coll.broadcast(be, &mut p.value, n, 0);
                }
            });
        }
        if cfg.lookahead.is_some() && pos.step == 0 {
            // Every rank's model is rank 0's by now: the slow copy is the same everywhere.
            opt.start(be, model.as_mut());
        }
        let mut watch = be.alloc(2);
        be.fill(&mut watch, 2, 0.0);
        Ok(Self {
            be,
            coll,
            cfg,
            model,
            opt,
            pos,
            side: splits.spec.image_size,
            norm: splits.spec.norm,
            x: be.alloc(0),
            watch,
            steps_per_epoch: cfg.steps_per_epoch(splits.train.len()),
            global_batch: 0,
            ranks_agree_on: None,
            reduce_seconds: 0.0,
            reduced_steps: 0,
            last_eval: None,
        })
    }

    /// Puts this rank's part of batch `b` of `epoch` (images `plan.batch(b)`) into the input
    /// buffer; its labels.
    pub fn load_batch(
        &mut self,
        source: &Batches<'_, B>,
        images: &Images,
        plan: &EpochPlan,
        b: usize,
    ) -> Result<Vec<u32>> {
        let (be, side) = (self.be, self.side);
        self.global_batch = plan.batch(b).len();
        match source {
            Batches::Device(pixels) => {
                let bp =
                    BatchPlan::new(images, plan.batch(b), self.cfg.augment, plan.key(b)).shard(rank_shard(self.coll));
                ensure_len(be, &mut self.x, self.model.input(bp.items.len()).numel());
                let crops = CropPlan {
                    items: &bp.items,
                    side,
                    pad: bp.pad,
                    reflect: bp.reflect,
                    mean: self.norm.mean,
                    std: self.norm.std,
                };
                be.crop_flip(pixels, &crops, &mut self.x);
                Ok(bp.labels)
            }
            Batches::Loader(rx) => {
                let batch = rx.recv().context("the batch loader stopped")?;
                ensure_len(be, &mut self.x, batch.x.len());
                be.upload(&batch.x, &mut self.x);
                Ok(batch.labels)
            }
        }
    }

    /// The run's optimizer steps in all.
    pub fn total_steps(&self) -> u64 {
        self.cfg.total_steps(self.steps_per_epoch)
    }

    /// What changes at the start of `epoch`: parameters that train for the first epochs only.
    pub fn start_epoch(&mut self, epoch: usize) {
        freeze_for_epoch(self.cfg, self.model.as_mut(), epoch);
    }

    /// One optimizer step on the batch in the input buffer (this rank's part of it), at
    /// learning rate `lr`; every `log_every` steps, the whole batch's mean loss to log.
    pub fn step(&mut self, labels: &[u32], epoch: usize, lr: f64) -> Result<Option<StepLog>> {
        let (be, n) = (self.be, labels.len());
        let ranks = self.coll.size();
        // Each rank's loss gradient is that of the mean over its slice, and the ranks average
        // theirs: the whole batch's mean needs a weight where slices differ in size (an epoch's
        // last batch), its sum (airbench's loss) the whole batch's size.
        let scale = match self.cfg.loss_reduction {
            Reduction::Mean => (ranks * n) as f32 / self.global_batch as f32,
            Reduction::Sum => (ranks * n) as f32,
        };
        if ranks > 1 || self.cfg.loss_reduction == Reduction::Sum {
            self.model.set_loss_grad_scale(scale);
        }
        if n > 0 {
            let input = self.model.input(n);
            self.model.forward(be, &self.x, input, true);
            self.model.backward(be, &self.x, labels);
        }
        if ranks > 1 {
            let t0 = std::time::Instant::now();
            let (_, grads) = self.model.state_and_grads();
            let len = be.buf_len(grads);
            if n == 0 {
                // A last batch smaller than the number of ranks: this one adds nothing.
                be.fill(grads, len, 0.0);
            }
            self.coll.all_reduce_mean(be, grads, len);
            self.reduce_seconds += t0.elapsed().as_secs_f64();
            self.reduced_steps += 1;
        }
        let total = self.total_steps();
        self.opt.step(be, self.model.as_mut(), lr, total);
        self.pos.step += 1;
        self.pos.batch += 1;
        let step = self.pos.step;
        // Every step is watched on the device; the host reads the watch at each log step
        // and before anything is saved, so a diverged run stops with the step it diverged
        // at and its NaN weights never reach a checkpoint.
        be.watch_loss(self.model.loss(), step, &mut self.watch);
        if !step.is_multiple_of(self.cfg.log_every) {
            return Ok(None);
        }
        self.check_watch()?;
        self.check_weights()?;
        let mut loss = [0f32];
        if n > 0 {
            be.download(self.model.loss(), &mut loss);
        }
        if ranks > 1 {
            // The whole batch's mean loss, from the ranks' slice means.
            let mut sum = [loss[0] as f64 * n as f64 / self.global_batch as f64];
            self.coll.all_reduce_host(&mut sum);
            loss[0] = sum[0] as f32;
        }
        Ok(Some(StepLog {
            step,
            epoch,
            loss: loss[0],
            lr,
        }))
    }

    /// Whether the ranks stop now: true on every rank when any rank's `local` is (one
    /// interrupted process stops all of them after the same step).
    pub fn agree_stop(&self, local: bool) -> bool {
        if self.coll.size() == 1 {
            return local;
        }
        let mut votes = [f64::from(u8::from(local))];
        self.coll.all_reduce_host(&mut votes);
        votes[0] > 0.0
    }

    /// Checks that every rank holds the same weights (they must: each applies the same averaged
    /// gradient to the same start), so that a rank that went its own way is an error, not a
    /// checkpoint that only rank 0's weights describe.
    fn check_ranks_agree(&mut self) -> Result<()> {
        let (be, ranks, rank) = (self.be, self.coll.size(), self.coll.rank());
        if ranks == 1 {
            return Ok(());
        }
        let mut crc = 0u32;
        self.model.visit_params(&mut |p| {
            let bytes: Vec<u8> = p.read(be).iter().flat_map(|v| v.to_le_bytes()).collect();
            crc = crc32c::crc32c_append(crc, &bytes);
        });
        // An all-gather of the checksums (exact in f64) through the sum of one-hot rows.
        let mut all = vec![0f64; ranks];
        all[rank] = f64::from(crc);
        self.coll.all_reduce_host(&mut all);
        if let Some(other) = all.iter().position(|&c| c != all[0]) {
            bail!(
                "after step {} rank {other} holds other weights than rank 0 (checksums {:08x} and {:08x}); not saving",
                self.pos.step,
                all[other] as u32,
                all[0] as u32
            );
        }
        self.ranks_agree_on = Some(crc);
        Ok(())
    }

    /// Rank 0's BatchNorm running statistics on every rank (each rank's own followed its own
    /// slices): what evaluation uses and checkpoints hold, as under PyTorch DDP.
    fn share_running_stats(&mut self) {
        if self.coll.size() == 1 {
            return;
        }
        let (be, coll) = (self.be, self.coll);
        self.model.visit(&mut |e| {
            if let Entry::Tensor(p) = e
                && !p.trainable()
            {
                let n = p.numel();
                coll.broadcast(be, &mut p.value, n, 0);
            }
        });
    }

    /// Fails with the step at which the loss stopped being finite, if it did.
    pub fn check_watch(&self) -> Result<()> {
        let mut w = [0f32; 2];
        self.be.download(&self.watch, &mut w);
        if w[0] != 0.0 {
            bail!(
                "the loss became {} at step {}; stopping (the last checkpoint is kept)",
                w[1],
                w[0] as u64
            );
        }
        Ok(())
    }

    /// Fails, naming the first tensor, when a weight or running statistic is no longer finite:
    /// a loss can stay finite while the weights diverge (a huge learning rate), and nothing
    /// diverged may be saved.
    pub fn check_weights(&mut self) -> Result<()> {
        let (be, step) = (self.be, self.pos.step);
        let mut bad = None;
        self.model.visit(&mut |e| {
            if let Entry::Tensor(p) = e
                && bad.is_none()
                && !be.all_finite(&p.value, p.numel())
            {
                bad = Some(p.name.clone());
            }
        });
        match bad {
            Some(name) => bail!(
                "the weights diverged by step {step}: {name} holds NaN or infinity; stopping (nothing diverged is saved, the last checkpoint is kept)"
            ),
            None => Ok(()),
        }
    }

    /// After the last batch of `epoch`: moves to the next epoch and evaluates on `eval_on`
    /// (when there is such a split), the ranks' weights checked equal and their running
    /// statistics shared first: the epoch's figures, for the observers to log and save.
    pub fn end_epoch(&mut self, epoch: usize, eval_on: Option<(&str, &Images)>) -> Result<EpochFigures> {
        self.prepare_save()?;
        let (be, cfg) = (self.be, self.cfg);
        self.pos.epoch += 1;
        self.pos.batch = 0;
        self.pos.epochs_completed = self.pos.epoch;
        let lr = cfg.schedule.lr(epoch, 0, self.steps_per_epoch, self.total_steps());
        let last = self.pos.epoch >= cfg.epoch_count();
        let eval_on = eval_on.filter(|_| last || self.pos.epoch.is_multiple_of(cfg.eval_every));
        let Some((split, images)) = eval_on else {
            return Ok(EpochFigures {
                lr,
                eval: None,
                best: false,
            });
        };
        let classes = self.model.num_classes();
        let tally = evaluate_shard(
            be,
            self.model.as_mut(),
            images,
            &self.norm,
            cfg.eval_batch_size,
            cfg.tta,
            rank_shard(self.coll),
        );
        let mut sums = tally.to_sums();
        self.coll.all_reduce_host(&mut sums);
        let r = EvalTally::from_sums(&sums, classes).result();
        let best = self.pos.best.is_none_or(|(_, a)| r.accuracy > a);
        if best {
            self.pos.best = Some((epoch + 1, r.accuracy));
        }
        self.last_eval = Some(r.clone());
        Ok(EpochFigures {
            lr,
            eval: Some((split.to_string(), r)),
            best,
        })
    }

    /// Makes the run ready to be saved, on every rank: no diverged loss, the ranks' weights
    /// equal, rank 0's running statistics everywhere.
    pub fn prepare_save(&mut self) -> Result<()> {
        self.check_watch()?;
        self.check_weights()?;
        self.check_ranks_agree()?;
        self.share_running_stats();
        Ok(())
    }

    /// How the run ended: `stopped` early or not, after `images` images and `seconds` of
    /// training in this launch.
    pub fn outcome(&self, stopped: Option<Stop>, images: u64, seconds: f64) -> TrainOutcome {
        TrainOutcome {
            steps: self.pos.step,
            epochs_completed: self.pos.epochs_completed,
            stopped,
            last_eval: self.last_eval.clone(),
            best: self.pos.best,
            train_images: images,
            train_seconds: seconds,
            ranks_agree_on: self.ranks_agree_on,
            reduce_seconds: self.reduce_seconds,
            reduced_steps: self.reduced_steps,
        }
    }

    /// The run's state for the observers that save it.
    pub fn state(&mut self) -> RunState<'_, B> {
        RunState {
            be: self.be,
            cfg: self.cfg,
            model: self.model.as_mut(),
            opt: &self.opt,
            pos: &self.pos,
            ranks: self.coll.size(),
        }
    }
}

/// An epoch's figures ([`Trainer::end_epoch`]): the learning rate at its start and, with
/// held-out images, the split and its evaluation, and whether it is the best so far.
pub struct EpochFigures {
    pub lr: f64,
    pub eval: Option<(String, EvalResult)>,
    pub best: bool,
}

/// Loads `w` into `model`, all of it but a classifier for another class count (which starts
/// afresh); what it did. A classifier for the same count must fit like every other tensor.
fn load_init<B: Backend>(be: &B, model: &mut dyn Network<B>, w: &InitWeights) -> Result<String> {
    let head = model.head();
    let prefix = format!("{head}.");
    let classes = |shapes: &[usize]| shapes.first().copied().unwrap_or(0);
    let file_classes = w.tensors.get(&format!("{head}.bias")).map_or(0, |t| classes(&t.shape));
    let fresh_head = file_classes != model.num_classes();
    checkpoint::load_tensors_except(&w.origin, &w.tensors, be, model, &|n| {
        fresh_head && n.starts_with(&prefix)
    })?;
    Ok(format!(
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
    ))
}

/// airbench's `init_whitening_conv` on the model's first convolution, from the first 5,000
/// training images (in the data's order); what it did.
fn whiten_first_conv<B: Backend>(
    be: &B,
    model: &mut dyn Network<B>,
    images: &Images,
    norm: &Normalization,
) -> Result<String> {
    const IMAGES: usize = 5000;
    const EPS: f64 = 5e-4;
    let Some(conv) = model.first_conv() else {
        bail!("--whiten-init: the model's first layer is not a convolution of the images");
    };
    let (k, d) = (conv.cfg.kernel, CHANNELS * conv.cfg.kernel * conv.cfg.kernel);
    if conv.cfg.cout != 2 * d || conv.cfg.stride != 1 || conv.cfg.pad != 0 {
        bail!(
            "--whiten-init: the first convolution ({} filters of {k}x{k}, stride {}, padding {}) is not a whitening layer's ({} filters, stride 1, no padding)",
            conv.cfg.cout,
            conv.cfg.stride,
            conv.cfg.pad,
            2 * d
        );
    }
    let count = IMAGES.min(images.len());
    let (weights, eigenvalues) = crate::nn::whiten::whitening_weights(images, norm, count, k, EPS);
    conv.weight.write(be, &weights);
    Ok(format!(
        "whitening the first convolution from {count} training images' {k}x{k} patches (eigenvalues {:.3e} to {:.3e})",
        eigenvalues.first().copied().unwrap_or(0.0),
        eigenvalues.last().copied().unwrap_or(0.0)
    ))
}

/// Freezes what trains for the first epochs only, from `epoch` on: the first convolution's
/// bias after `whiten_bias_epochs` (airbench: `model[0].bias.requires_grad = epoch < 3`).
fn freeze_for_epoch<B: Backend>(cfg: &TrainConfig, model: &mut dyn Network<B>, epoch: usize) {
    if let Some(epochs) = cfg.whiten_bias_epochs
        && let Some(bias) = model.first_conv().and_then(|c| c.bias.as_mut())
    {
        // Only ever frozen here: what `--freeze-backbone` froze stays so.
        bias.frozen |= epoch >= epochs;
    }
}

/// Refuses data that is not what the configuration (and its model) was made for.
fn check_data(cfg: &TrainConfig, splits: &Splits) -> Result<()> {
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
fn load_resumed<B: Backend>(
    be: &B,
    model: &mut dyn Network<B>,
    opt: &mut Optimizer<B>,
    r: Resume,
    out: &Path,
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
    Ok(r.position)
}

/// The part of each batch (and of the evaluation batches) that this rank of `coll` computes.
pub fn rank_shard<B: Backend>(coll: &dyn Collective<B>) -> Shard {
    Shard::new(coll.rank(), coll.size())
}

/// The backend's device-side batches, when it keeps the training images there.
pub fn device_pixels<B: Backend>(be: &B, cfg: &TrainConfig, images: &Images) -> Option<B::Pixels> {
    // Cutout's squares are cut on the host only, so a run with them takes the loader's path on
    // every backend.
    if cfg.augment.cutout == 0 {
        be.upload_pixels(&images.pixels)
    } else {
        None
    }
}
