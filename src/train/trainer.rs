//! A training run in progress: the model, its optimizer, where it is, and the run folder it
//! writes. The loop in [`super::run::train`] drives it one step, one epoch end, one save at a
//! time; a data-parallel run adds its all-reduce between the backward pass and the optimizer
//! step, in [`Trainer::step`].

use super::config::TrainConfig;
use super::console::Console;
use super::optimizer::Optimizer;
use super::run::{Position, RunFiles, Start, check_data, load_init, load_resumed, meta, save_train_state};
use crate::checkpoint;
use crate::data::transform::{BatchKey, BatchPlan};
use crate::data::{Batch, EpochPlan, Images, Normalization, Splits};
use crate::engine::{Collective, CropPlan, DeviceBatches, Shape4, ensure_len};
use crate::eval::{EvalResult, evaluate};
use crate::model::{Network, build};
use crate::nn::Entry;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::mpsc::Receiver;

/// Where an epoch's batches come from: cut on the device from images kept there, or built by
/// the host's loader thread.
pub enum Batches<'a, B: DeviceBatches> {
    Device(&'a B::Pixels),
    Loader(Receiver<Batch>),
}

pub struct Trainer<'a, B: DeviceBatches> {
    be: &'a B,
    /// The ranks training together (one: `Local`).
    coll: &'a dyn Collective<B>,
    cfg: &'a TrainConfig,
    model: Box<dyn Network<B>>,
    opt: Optimizer<B>,
    pub pos: Position,
    files: RunFiles,
    side: usize,
    norm: Normalization,
    /// The current batch, NHWC on the device.
    x: B::Buf,
    /// The first non-finite loss: `[step, loss]` (see `Backend::watch_loss`).
    watch: B::Buf,
    pub steps_per_epoch: usize,
    pub last_eval: Option<EvalResult>,
}

impl<'a, B: DeviceBatches> Trainer<'a, B> {
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
        check_data(cfg, splits)?;
        let mut model = build(be, cfg.arch, cfg.model, cfg.seed);
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
            Start::Resume(r) => load_resumed(be, model.as_mut(), &mut opt, *r, out, console)?,
        };
        if coll.size() > 1 {
            model.visit(&mut |e| {
                if let Entry::Tensor(p) = e {
                    let n = p.numel();
                    coll.broadcast(be, &mut p.value, n, 0);
                }
            });
        }
        let files = RunFiles::create(out, cfg)?;
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
            steps_per_epoch: EpochPlan::new(splits.train.len(), cfg.batch_size, false, 0, 0).num_batches(),
            last_eval: None,
        })
    }

    /// Puts batch `b` of `epoch` (images `plan.batch(b)`) into the input buffer; its labels.
    pub fn load_batch(
        &mut self,
        source: &Batches<'_, B>,
        images: &Images,
        plan: &EpochPlan,
        epoch: usize,
        b: usize,
    ) -> Result<Vec<u32>> {
        let (be, side) = (self.be, self.side);
        match source {
            Batches::Device(pixels) => {
                let key = BatchKey::new(self.cfg.seed, epoch, b);
                let bp = BatchPlan::new(images, plan.batch(b), self.cfg.augment, key);
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

    /// One optimizer step on the batch in the input buffer, at learning rate `lr`; logs the
    /// loss every `log_every` steps. Returns the progress bar's message.
    pub fn step(&mut self, labels: &[u32], epoch: usize, lr: f64, console: &Console) -> Result<String> {
        let (be, side, n) = (self.be, self.side, labels.len());
        self.model.forward(be, &self.x, Shape4::new(n, side, side, 3), true);
        self.model.backward(be, &self.x, labels);
        if self.coll.size() > 1 {
            let (_, grads) = self.model.state_and_grads();
            let len = be.buf_len(grads);
            self.coll.all_reduce_mean(be, grads, len);
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
        be.download(self.model.loss(), &mut loss);
        console.line(&format!("step {step}, loss {}", loss[0]));
        self.files.scalar("train_loss", loss[0], step as usize)?;
        self.files
            .log(serde_json::json!({"kind": "train", "step": step, "epoch": epoch, "loss": loss[0], "lr": lr}))?;
        Ok(format!("loss {:.4}", loss[0]))
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
        self.files.scalar("lr", lr as f32, epoch)?;
        let mut accuracy = None;
        if let Some((split, images)) = eval_on {
            let r = evaluate(
                be,
                self.model.as_mut(),
                images,
                &self.norm,
                cfg.eval_batch_size,
                cfg.tta,
            );
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
            self.files
                .scalar("test_loss", r.loss_sum_of_batch_means as f32, epoch)?;
            self.files.scalar("test_accuracy", r.accuracy as f32, epoch)?;
            self.files.log(serde_json::json!({
                "kind": "eval", "split": split, "epoch": epoch, "step": self.pos.step,
                "loss_sum_of_batch_means": r.loss_sum_of_batch_means, "loss": r.loss, "accuracy": r.accuracy, "lr": lr,
                "train_seconds": epoch_seconds,
            }))?;
            accuracy = Some(r.accuracy);
            if self.pos.best.is_none_or(|(_, a)| r.accuracy > a) {
                self.pos.best = Some((epoch + 1, r.accuracy));
            }
            self.last_eval = Some(r);
        } else {
            console.line(&format!("epoch {}/{}: {pace}", epoch + 1, cfg.epochs));
            self.files.log(serde_json::json!({
                "kind": "epoch", "epoch": epoch, "step": self.pos.step, "lr": lr, "train_seconds": epoch_seconds,
            }))?;
        }

        // Checkpoints: this epoch's, then last (and best when it is), then the resume state.
        let root = self.files.root.clone();
        let epoch_path = root
            .join("checkpoints")
            .join(format!("epoch-{}.safetensors", epoch + 1));
        let bytes = checkpoint::to_bytes(
            &checkpoint::state_dict(be, self.model.as_mut()),
            Some(meta(cfg, &self.pos, accuracy)),
        );
        checkpoint::write_atomic(&epoch_path, &bytes)
            .with_context(|| format!("{}: write failed", epoch_path.display()))?;
        checkpoint::write_atomic(&root.join("last.safetensors"), &bytes).context("last.safetensors: write failed")?;
        if self.pos.best.is_some_and(|(e, _)| e == epoch + 1) {
            checkpoint::write_atomic(&root.join("best.safetensors"), &bytes)
                .context("best.safetensors: write failed")?;
        }
        save_train_state(be, &root, cfg, self.model.as_mut(), &self.opt, &self.pos)?;
        self.files.flush()
    }

    /// Saves a run stopped mid-epoch: the resume state and `last.safetensors`.
    pub fn save_stopped(&mut self) -> Result<()> {
        self.check_watch()?;
        let (be, cfg, root) = (self.be, self.cfg, self.files.root.clone());
        save_train_state(be, &root, cfg, self.model.as_mut(), &self.opt, &self.pos)?;
        checkpoint::save(
            &root.join("last.safetensors"),
            be,
            self.model.as_mut(),
            Some(meta(cfg, &self.pos, None)),
        )
        .context("last.safetensors: write failed")?;
        self.files.flush()
    }
}

/// The backend's device-side batches, when it keeps the training images there.
pub fn device_pixels<B: DeviceBatches>(be: &B, cfg: &TrainConfig, images: &Images) -> Option<B::Pixels> {
    // Cutout's squares are cut on the host only, so a run with them takes the loader's path on
    // every backend.
    if cfg.augment.cutout == 0 {
        be.upload_pixels(&images.pixels)
    } else {
        None
    }
}
