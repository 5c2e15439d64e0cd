//! A training run in progress: the model, its optimizer, where it is, and the run folder it
//! writes. The loop in [`super::run::train`] drives it one step, one epoch end, one save at a
//! time; a data-parallel run adds its all-reduce between the backward pass and the optimizer
//! step, in [`Trainer::step`].

use super::config::TrainConfig;
use super::console::Console;
use super::optimizer::Optimizer;
use super::run::{Position, RunFiles, Start, check_data, load_init, load_resumed, meta, save_train_state};
use crate::checkpoint;
use crate::data::transform::BatchPlan;
use crate::data::{Batch, EpochPlan, Images, Normalization, Shard, Splits};
use crate::engine::{Backend, Collective, CropPlan, Shape4, ensure_len};
use crate::eval::{EvalResult, EvalTally, evaluate_shard};
use crate::model::{Network, build};
use crate::nn::Entry;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::mpsc::Receiver;

/// Where an epoch's batches come from: cut on the device from images kept there, or built by
/// the host's loader thread.
pub enum Batches<'a, B: Backend> {
    Device(&'a B::Pixels),
    Loader(Receiver<Batch>),
}

pub struct Trainer<'a, B: Backend> {
    be: &'a B,
    /// The ranks training together (one: `Local`).
    coll: &'a dyn Collective<B>,
    cfg: &'a TrainConfig,
    model: Box<dyn Network<B>>,
    opt: Optimizer<B>,
    pub pos: Position,
    /// The run folder's writers: rank 0's alone.
    files: Option<RunFiles>,
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
    /// weights), and its run folder `out` (created only once the model stands: a checkpoint
    /// that does not fit leaves nothing behind).
    pub fn new(
        be: &'a B,
        coll: &'a dyn Collective<B>,
        cfg: &'a TrainConfig,
        splits: &Splits,
        out: &Path,
        console: &Console,
        start: Start,
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
            console.line(&format!("training only the classifier ({head}); the rest is frozen"));
        }
        let mut opt = Optimizer::new(&cfg.optimizer);
        let pos = match start {
            Start::Fresh => Position::default(),
            Start::Init(w) => {
                load_init(be, model.as_mut(), &w, console)?;
                Position::default()
            }
            Start::Resume(r) => {
                r.check_ranks(ranks, out).map_err(anyhow::Error::msg)?;
                load_resumed(be, model.as_mut(), &mut opt, *r, out, console)?
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
        let files = if coll.rank() == 0 {
            Some(RunFiles::create(out, cfg)?)
        } else {
            None
        };
        let mut watch = be.alloc(2);
        be.fill(&mut watch, 2, 0.0);
        Ok(Self {
            be,
            coll,
            cfg,
            model,
            opt,
            pos,
            files,
            side: splits.spec.image_size,
            norm: splits.spec.norm,
            x: be.alloc(0),
            watch,
            steps_per_epoch: splits.train.len().div_ceil(cfg.batch_size),
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
                ensure_len(be, &mut self.x, bp.items.len() * side * side * 3);
                let crops = CropPlan {
                    items: &bp.items,
                    side,
                    pad: bp.pad,
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

    /// One optimizer step on the batch in the input buffer (this rank's part of it), at
    /// learning rate `lr`; logs the loss every `log_every` steps. Returns the progress bar's
    /// message.
    pub fn step(&mut self, labels: &[u32], epoch: usize, lr: f64, console: &Console) -> Result<String> {
        let (be, side, n) = (self.be, self.side, labels.len());
        let ranks = self.coll.size();
        if ranks > 1 {
            // Each rank's gradient is the mean over its slice and the step needs the mean over
            // the whole batch: equal slices (every batch but perhaps an epoch's last) average
            // as they are, unequal ones are weighted through the loss gradient.
            self.model
                .set_loss_grad_scale((ranks * n) as f32 / self.global_batch as f32);
        }
        if n > 0 {
            self.model.forward(be, &self.x, Shape4::new(n, side, side, 3), true);
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
        self.opt.step(be, self.model.as_mut(), lr);
        self.pos.step += 1;
        self.pos.batch += 1;
        let step = self.pos.step;
        // Every step is watched on the device; the host reads the watch at each log step
        // and before anything is saved, so a diverged run stops with the step it diverged
        // at and its NaN weights never reach a checkpoint.
        be.watch_loss(self.model.loss(), step, &mut self.watch);
        if !step.is_multiple_of(self.cfg.log_every) {
            return Ok(String::new());
        }
        self.check_watch()?;
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
        console.line(&format!("step {step}, loss {}", loss[0]));
        if let Some(files) = &mut self.files {
            files.scalar("train_loss", loss[0], step as usize)?;
            files.log(serde_json::json!({"kind": "train", "step": step, "epoch": epoch, "loss": loss[0], "lr": lr}))?;
        }
        Ok(format!("loss {:.4}", loss[0]))
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

    /// After the last batch of `epoch`: evaluates on `eval_on` (when there is such a split),
    /// logs, and saves the epoch's checkpoint, `last`, `best` and the resume state. `pace` is
    /// the time line the epoch's message ends with.
    pub fn end_epoch(
        &mut self,
        epoch: usize,
        eval_on: Option<(&str, &Images)>,
        epoch_seconds: f64,
        pace: &str,
        console: &Console,
    ) -> Result<()> {
        self.check_watch()?;
        let (be, cfg) = (self.be, self.cfg);
        self.pos.epoch += 1;
        self.pos.batch = 0;
        self.pos.epochs_completed = self.pos.epoch;

        let lr = cfg.schedule.lr(epoch, 0, self.steps_per_epoch, cfg.epochs);
        self.check_ranks_agree()?;
        if let Some(files) = &mut self.files {
            files.scalar("lr", lr as f32, epoch)?;
        }
        self.share_running_stats();
        let mut accuracy = None;
        if let Some((split, images)) = eval_on {
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
            console.line(&format!(
                "epoch {}/{}: {split} loss {:.4} (sum of batch means; {:.4} per image), accuracy {:.4} ({}/{}); {pace}",
                epoch + 1,
                cfg.epochs,
                r.loss_sum_of_batch_means,
                r.loss,
                r.accuracy,
                r.correct,
                r.images,
            ));
            if let Some(files) = &mut self.files {
                files.scalar("test_loss", r.loss_sum_of_batch_means as f32, epoch)?;
                files.scalar("test_accuracy", r.accuracy as f32, epoch)?;
                files.log(serde_json::json!({
                    "kind": "eval", "split": split, "epoch": epoch, "step": self.pos.step,
                    "loss_sum_of_batch_means": r.loss_sum_of_batch_means, "loss": r.loss, "accuracy": r.accuracy, "lr": lr,
                    "train_seconds": epoch_seconds,
                }))?;
            }
            accuracy = Some(r.accuracy);
            if self.pos.best.is_none_or(|(_, a)| r.accuracy > a) {
                self.pos.best = Some((epoch + 1, r.accuracy));
            }
            self.last_eval = Some(r);
        } else {
            console.line(&format!("epoch {}/{}: {pace}", epoch + 1, cfg.epochs));
            if let Some(files) = &mut self.files {
                files.log(serde_json::json!({
                    "kind": "epoch", "epoch": epoch, "step": self.pos.step, "lr": lr, "train_seconds": epoch_seconds,
                }))?;
            }
        }

        // Checkpoints (rank 0's): this epoch's, then last (and best when it is), then the
        // resume state.
        let ranks = self.coll.size();
        let Some(files) = &mut self.files else {
            return Ok(());
        };
        let root = files.root.clone();
        let epoch_path = root
            .join("checkpoints")
            .join(format!("epoch-{}.safetensors", epoch + 1));
        let bytes = checkpoint::to_bytes(
            &checkpoint::state_dict(be, self.model.as_mut()),
            Some(meta(cfg, be.precision(), &self.pos, accuracy)),
        );
        checkpoint::write_atomic(&epoch_path, &bytes)
            .with_context(|| format!("{}: write failed", epoch_path.display()))?;
        checkpoint::write_atomic(&root.join("last.safetensors"), &bytes).context("last.safetensors: write failed")?;
        if self.pos.best.is_some_and(|(e, _)| e == epoch + 1) {
            checkpoint::write_atomic(&root.join("best.safetensors"), &bytes)
                .context("best.safetensors: write failed")?;
        }
        save_train_state(be, &root, cfg, self.model.as_mut(), &self.opt, &self.pos, ranks)?;
        files.flush()
    }

    /// Saves a run stopped mid-epoch: the resume state and `last.safetensors`.
    pub fn save_stopped(&mut self) -> Result<()> {
        self.check_watch()?;
        self.check_ranks_agree()?;
        self.share_running_stats();
        let ranks = self.coll.size();
        let (be, cfg) = (self.be, self.cfg);
        let Some(files) = &mut self.files else {
            return Ok(());
        };
        let root = files.root.clone();
        save_train_state(be, &root, cfg, self.model.as_mut(), &self.opt, &self.pos, ranks)?;
        checkpoint::save(
            &root.join("last.safetensors"),
            be,
            self.model.as_mut(),
            Some(meta(cfg, be.precision(), &self.pos, None)),
        )
        .context("last.safetensors: write failed")?;
        files.flush()
    }
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
