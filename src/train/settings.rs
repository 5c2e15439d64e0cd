//! Every setting of a training run, declared once. [`Settings`] is at the same time the `train`
//! command's flags (clap: a field's doc comment is its help), the keys of a `--config` TOML file
//! (serde: the field names), the merge of the two (flags win: [`Settings::or`]), and what a
//! resumed run may change ([`Settings::refused_on_resume`]). [`Settings::resolve`] turns them
//! into a [`TrainConfig`] on top of a recipe, the one place that says what each setting does.

use super::config::{Lookahead, Recipe, TrainConfig};
use crate::data::LabelSet;
use crate::eval::Tta;
use crate::model::{Arch, Stem};
use std::path::PathBuf;

/// Bounds (inclusive) of the settings that have them, shared by the flags (clap's range
/// parsers) and the TOML file's check, so that both refuse the same values.
pub mod limits {
    pub const POSITIVE: (u64, u64) = (1, u64::MAX);
    /// Padding beyond 16 would let a 32x32 crop miss the image entirely.
    pub const CROP_PAD: (u64, u64) = (0, 16);
    /// A cutout square as large as the largest image (checked against the run's own image
    /// size once the data is read).
    pub const CUTOUT: (u64, u64) = (0, crate::data::dataset::IMAGE_SIZES.1 as u64);
    /// The seed's four residual stages, or three (its proposal to drop `conv5`).
    pub const STAGES: (u64, u64) = (3, 4);
    /// `--image-size`: see `data::dataset::IMAGE_SIZES`.
    pub const IMAGE_SIZE: (u64, u64) = (
        crate::data::dataset::IMAGE_SIZES.0 as u64,
        crate::data::dataset::IMAGE_SIZES.1 as u64,
    );

    /// Bounds as the range clap's integer parsers take (`value_parser!(u8).range(..)`), for
    /// the bounded ones (not [`POSITIVE`], whose top does not fit an i64).
    pub const fn flag_range((min, max): (u64, u64)) -> std::ops::RangeInclusive<i64> {
        std::ops::RangeInclusive::new(min as i64, max as i64)
    }
}

/// The settings a resumed run may change (anything else would make it a different run).
pub const CHANGEABLE_ON_RESUME: [&str; 4] = ["epochs", "max_steps", "data", "log_every"];

/// A run's settings, each `None` (or absent) unless given.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Starting configuration (default: seed); the settings below override single values of it.
    #[arg(long)]
    pub recipe: Option<Recipe>,
    /// The data: a CIFAR-10 or CIFAR-100 folder (binary version), or an image folder
    /// (DIR/train/CLASS/IMAGE, optionally DIR/test/CLASS/IMAGE). Without it, ./data is used
    /// and filled with CIFAR-10 by download.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// CIFAR-100's labels: fine (100 classes) or coarse (20 superclasses).
    #[arg(long)]
    pub labels: Option<LabelSet>,
    /// Side of the square images the model is trained on (16-256; default: the data's own, 32
    /// for CIFAR and image folders). Images of another size are resized.
    #[arg(long, value_parser = clap::value_parser!(u16).range(limits::flag_range(limits::IMAGE_SIZE)))]
    pub image_size: Option<u16>,
    /// Train without the images of an image folder that cannot be decoded (default: stop and
    /// list them).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub skip_bad_images: Option<bool>,
    /// Per-channel mean of the normalisation, "R,G,B" on the 0-1 scale (default: the seed's
    /// constants for CIFAR-10, the training images' own for other data).
    #[arg(long, value_name = "R,G,B", value_parser = parse_triple)]
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation of the normalisation, "R,G,B".
    #[arg(long, value_name = "R,G,B", value_parser = parse_triple)]
    pub std: Option<[f32; 3]>,
    /// Run folder (default: runs/RECIPE-UNIXTIME): a new or empty folder (--resume continues
    /// a run in its own).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Let --out name a folder that holds files: a previous run's files there are replaced
    /// (config.json, metrics.jsonl, *.safetensors, checkpoints/epoch-*, tensorboard/events*),
    /// nothing else is touched.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub overwrite: Option<bool>,
    /// Start from this checkpoint's weights (fine-tuning): ours, a PyTorch state_dict of the
    /// seed's model, or torchvision's ResNet-18 (converted by scripts/torchvision_to_safetensors.py).
    /// The model follows the checkpoint; a classifier for another class count starts afresh.
    #[arg(long, value_name = "CHECKPOINT")]
    pub init: Option<PathBuf>,
    /// Train only the classifier (the last linear layer); the rest keeps its weights.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub freeze_backbone: Option<bool>,
    /// Passes over the training images; a fraction ends the last pass early (9.9: the steps of
    /// 9.9 epochs, rounded up).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Images per optimizer step.
    #[arg(long, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    pub batch_size: Option<u64>,
    /// Drop each epoch's last, partial batch (PyTorch's drop_last).
    #[arg(long, value_name = "BOOL")]
    pub drop_last: Option<bool>,
    /// Base (or peak) learning rate of the recipe's schedule.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Stop after this many optimizer steps, with a checkpoint.
    #[arg(long, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    pub max_steps: Option<u64>,
    /// Log the training loss every N optimizer steps (the seed: 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    pub log_every: Option<u64>,
    /// Hold out the last N training images as a validation set.
    #[arg(long)]
    pub val_split: Option<usize>,
    /// Reshuffle the training images every epoch (the seed's loader does not); "--shuffle
    /// false" turns a recipe's shuffling off.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub shuffle: Option<bool>,
    /// With several ranks (mpirun): BatchNorm statistics over the whole global batch, summed
    /// across the ranks (PyTorch's SyncBatchNorm), instead of each rank's own slice (DDP's
    /// default).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub sync_bn: Option<bool>,
    /// Seed of the initial weights, the augmentation and the shuffling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Label smoothing of the training loss, 0 to 1.
    #[arg(long)]
    pub label_smoothing: Option<f32>,
    /// The batch's loss: mean (PyTorch's default) or sum (airbench's) of the images' losses.
    #[arg(long)]
    pub loss_reduction: Option<crate::train::Reduction>,
    /// L2 weight decay of the recipe's optimizer.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Momentum of the recipe's SGD.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// SGD: batch-norm parameters train at this times the learning rate, with their weight
    /// decay divided by it (airbench's bias_scaler; 1: one parameter group).
    #[arg(long, value_name = "X")]
    pub norm_lr_scale: Option<f64>,
    /// Initialise the first convolution by whitening the 2x2 patches of the first 5,000 training
    /// images (airbench's; the model's first layer must be a whitening convolution).
    #[arg(long, value_name = "BOOL")]
    pub whiten_init: Option<bool>,
    /// Train the first convolution's bias for the first N epochs only (airbench: 3).
    #[arg(long, value_name = "N")]
    pub whiten_bias_epochs: Option<usize>,
    /// Lookahead averaging every N steps (airbench's: 5; 0: none): the weights move into a slow
    /// copy by 1 - D x (step / steps)^3 and take its value; after the last step, its value.
    #[arg(long, value_name = "N")]
    pub lookahead_every: Option<u64>,
    /// The lookahead's D (airbench's: 0.95^5).
    #[arg(long, value_name = "D")]
    pub lookahead_decay: Option<f64>,
    /// Evaluate every N epochs (and after the last).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    pub eval_every: Option<u64>,
    /// Test-time augmentation of the evaluations: off, flip, flip-shift, flip-shift1 or
    /// mirror-translate (airbench's).
    #[arg(long)]
    pub tta: Option<Tta>,
    /// Weight decay on 1-D parameters (BatchNorm scales and shifts, biases) too: true is
    /// PyTorch's single parameter group, false exempts them.
    #[arg(long, value_name = "BOOL")]
    pub decay_1d: Option<bool>,
    /// Start every residual block as the identity: the last BatchNorm scale of each block at 0
    /// (torchvision's zero_init_residual).
    #[arg(long, value_name = "BOOL")]
    pub zero_init_residual: Option<bool>,
    /// Padding of the training crops: random crops of the image's size from the padded image
    /// (0: none).
    #[arg(long, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::CROP_PAD)))]
    pub crop_pad: Option<u8>,
    /// The crops' padding mirrors the image (PyTorch's reflect, airbench's) instead of black.
    #[arg(long, value_name = "BOOL")]
    pub crop_reflect: Option<bool>,
    /// Mirror training images at random (false: never).
    #[arg(long, value_name = "BOOL")]
    pub flip: Option<bool>,
    /// Mirror each training image in every other epoch instead of by a coin each time.
    #[arg(long, value_name = "BOOL")]
    pub alternate_flip: Option<bool>,
    /// Cutout: zero a SIDE x SIDE square at a random centre of each training image, after the
    /// crop and flip (clipped at the edges; 0: none).
    #[arg(long, value_name = "SIDE", value_parser = clap::value_parser!(u16).range(limits::flag_range(limits::CUTOUT)))]
    pub cutout: Option<u16>,
    /// Compute 3x3 convolutions on the CPU by Winograd's algorithm (default: true): faster (20%
    /// of the seed stem's training speed), with larger rounding errors, which training can
    /// amplify (docs/seed-vs-pytorch.md); false computes every convolution directly.
    #[arg(long, value_name = "BOOL")]
    pub winograd: Option<bool>,
    /// Architecture: resnet18 (the seed's), lenet or vgg16 (its comparison models), or airbench (airbench94's speed-run network).
    #[arg(long)]
    pub model: Option<Arch>,
    /// Network stem: seed (7x7/2 conv, BN, max-pool), torchvision (seed + ReLU), seed3x3
    /// (3x3/2 conv), cifar (3x3/1 conv, BN, ReLU, no pool).
    #[arg(long)]
    pub stem: Option<Stem>,
    /// Residual stages: 4 (the seed) or 3 (drop conv5).
    #[arg(long, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::STAGES)))]
    pub stages: Option<u8>,
}

/// Three comma-separated numbers, "R,G,B" (`--mean`, `--std`).
pub fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    let values: Vec<f32> = s
        .split(',')
        .map(str::trim)
        .map(|p| p.parse::<f32>().map_err(|_| format!("'{p}' is not a number")))
        .collect::<Result<_, _>>()?;
    match values[..] {
        [r, g, b] if values.iter().all(|v| v.is_finite()) => Ok([r, g, b]),
        [_, _, _] => Err("the values must be finite".into()),
        _ => Err(format!("expected three numbers R,G,B, got {}", values.len())),
    }
}

impl Settings {
    fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self).expect("settings serialise") {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        }
    }

    /// The names (snake_case, as the TOML keys) of the settings given.
    pub fn given(&self) -> Vec<String> {
        self.to_map()
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| k)
            .collect()
    }

    /// These settings, with those not given taken from `fallback` (flags over a file).
    pub fn or(self, fallback: Settings) -> Settings {
        let mut merged = fallback.to_map();
        merged.extend(self.to_map().into_iter().filter(|(_, v)| !v.is_null()));
        serde_json::from_value(serde_json::Value::Object(merged)).expect("merged settings deserialise")
    }

    /// The first setting given that a resumed run may not change, as its flag.
    pub fn refused_on_resume(&self) -> Option<String> {
        self.given()
            .into_iter()
            .find(|k| !CHANGEABLE_ON_RESUME.contains(&k.as_str()))
            .map(|k| flag(&k))
    }

    /// Settings with bounds, as (name, value, bounds), for checking values that did not come
    /// through clap's range parsers (a TOML file).
    pub fn bounded(&self) -> [(&'static str, Option<u64>, (u64, u64)); 8] {
        [
            ("log_every", self.log_every, limits::POSITIVE),
            ("eval_every", self.eval_every, limits::POSITIVE),
            ("batch_size", self.batch_size, limits::POSITIVE),
            ("max_steps", self.max_steps, limits::POSITIVE),
            ("crop_pad", self.crop_pad.map(u64::from), limits::CROP_PAD),
            ("cutout", self.cutout.map(u64::from), limits::CUTOUT),
            ("stages", self.stages.map(u64::from), limits::STAGES),
            ("image_size", self.image_size.map(u64::from), limits::IMAGE_SIZE),
        ]
    }

    /// The first value given that no run can take, as (key, what is wrong): the checks of the
    /// values that are not integers with bounds ([`Settings::bounded`]), for the flags and a
    /// TOML file alike (a file's NaN would otherwise vanish in the merge, NaN having no JSON).
    pub fn bad_value(&self) -> Option<(&'static str, String)> {
        if let Some(e) = self.epochs.filter(|e| !(e.is_finite() && *e > 0.0)) {
            return Some(("epochs", format!("must be a positive number, got {e}")));
        }
        if let Some(m) = self.momentum.filter(|m| !(0.0..1.0).contains(m)) {
            return Some(("momentum", format!("must be in [0, 1), got {m}")));
        }
        if let Some(x) = self.norm_lr_scale.filter(|x| !(x.is_finite() && *x > 0.0)) {
            return Some(("norm_lr_scale", format!("must be a positive number, got {x}")));
        }
        if let Some(d) = self.lookahead_decay.filter(|d| !(0.0..=1.0).contains(d)) {
            return Some(("lookahead_decay", format!("must be in [0, 1], got {d}")));
        }
        if let Some(lr) = self.lr.filter(|lr| !(lr.is_finite() && *lr > 0.0)) {
            return Some(("lr", format!("must be a positive number, got {lr}")));
        }
        if let Some(s) = self.label_smoothing.filter(|s| !(0.0..1.0).contains(s)) {
            return Some(("label_smoothing", format!("must be in [0, 1), got {s}")));
        }
        if let Some(wd) = self.weight_decay.filter(|wd| !(wd.is_finite() && *wd >= 0.0)) {
            return Some(("weight_decay", format!("must be 0 or more, got {wd}")));
        }
        if let Some(bad) = self.mean.iter().flatten().find(|m| !m.is_finite()) {
            return Some(("mean", format!("values must be finite, got {bad}")));
        }
        if let Some(bad) = self.std.iter().flatten().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Some(("std", format!("values must be positive, got {bad}")));
        }
        None
    }

    /// The recipe with these settings applied. Errors name the flag. The data-dependent parts
    /// (classes, image size, normalisation) are filled in when the data is read.
    pub fn resolve(&self) -> Result<TrainConfig, String> {
        // The airbench network comes with its own recipe unless another is named.
        let default = match self.model {
            Some(Arch::Airbench) => Recipe::Airbench94,
            _ => Recipe::Seed,
        };
        let mut cfg = self.recipe.unwrap_or(default).config();
        self.apply_to(&mut cfg)?;
        Ok(cfg)
    }

    /// Changes in a resumed run's `cfg` the settings given of those a resume may change
    /// ([`CHANGEABLE_ON_RESUME`]; the data is read by the caller). `--max-steps` is a step
    /// count from the run's start, and a resume takes it only when given again: without it the
    /// run goes on to its last epoch.
    pub fn apply_on_resume(&self, cfg: &mut TrainConfig) {
        if let Some(e) = self.epochs {
            cfg.epochs = e;
        }
        cfg.max_steps = self.max_steps;
        cfg.log_every = self.log_every.unwrap_or(cfg.log_every);
    }

    /// Changes in `cfg` what these settings give; what they do not give stays.
    pub fn apply_to(&self, cfg: &mut TrainConfig) -> Result<(), String> {
        if let Some((key, what)) = self.bad_value() {
            return Err(format!("{} {what}", flag(key)));
        }
        if let Some(e) = self.epochs {
            cfg.epochs = e;
        }
        if let Some(b) = self.batch_size {
            cfg.batch_size = b as usize;
        }
        cfg.drop_last = self.drop_last.unwrap_or(cfg.drop_last);
        cfg.loss_reduction = self.loss_reduction.unwrap_or(cfg.loss_reduction);
        cfg.whiten_init = self.whiten_init.unwrap_or(cfg.whiten_init);
        cfg.whiten_bias_epochs = self.whiten_bias_epochs.or(cfg.whiten_bias_epochs);
        cfg.eval_every = self.eval_every.map_or(cfg.eval_every, |n| n as usize);
        cfg.lookahead = match (self.lookahead_every, cfg.lookahead) {
            (Some(0), _) => None,
            (Some(every), Some(l)) => Some(Lookahead { every, ..l }),
            (Some(every), None) => Some(Lookahead {
                every,
                decay: Lookahead::AIRBENCH.decay,
            }),
            (None, l) => l,
        };
        if let Some(decay) = self.lookahead_decay {
            match &mut cfg.lookahead {
                Some(l) => l.decay = decay,
                None => return Err("--lookahead-decay needs --lookahead-every".into()),
            }
        }
        if let Some(m) = self.momentum {
            cfg.optimizer = cfg.optimizer.with_momentum(m)?;
        }
        if let Some(x) = self.norm_lr_scale {
            cfg.optimizer = cfg.optimizer.with_norm_lr_scale(x)?;
        }
        if let Some(lr) = self.lr {
            cfg.schedule = cfg.schedule.with_lr(lr);
        }
        cfg.max_steps = self.max_steps.or(cfg.max_steps);
        cfg.log_every = self.log_every.unwrap_or(cfg.log_every);
        cfg.val_split = self.val_split.unwrap_or(cfg.val_split);
        cfg.shuffle = self.shuffle.unwrap_or(cfg.shuffle);
        cfg.seed = self.seed.unwrap_or(cfg.seed);
        cfg.sync_bn = self.sync_bn.unwrap_or(cfg.sync_bn);
        cfg.winograd = self.winograd.unwrap_or(cfg.winograd);
        cfg.label_smoothing = self.label_smoothing.unwrap_or(cfg.label_smoothing);
        cfg.tta = self.tta.unwrap_or(cfg.tta);
        if let Some(wd) = self.weight_decay {
            cfg.optimizer = cfg.optimizer.with_weight_decay(wd);
        }
        if let Some(d) = self.decay_1d {
            cfg.optimizer = cfg.optimizer.with_decay_1d(d);
        }
        cfg.zero_init_residual = self.zero_init_residual.unwrap_or(cfg.zero_init_residual);
        cfg.augment.crop_pad = self.crop_pad.map_or(cfg.augment.crop_pad, usize::from);
        cfg.augment.reflect = self.crop_reflect.unwrap_or(cfg.augment.reflect);
        cfg.augment.flip = self.flip.unwrap_or(cfg.augment.flip);
        cfg.augment.alternate_flip = self.alternate_flip.unwrap_or(cfg.augment.alternate_flip);
        cfg.augment.cutout = self.cutout.map_or(cfg.augment.cutout, usize::from);
        cfg.arch = self.model.unwrap_or(cfg.arch);
        cfg.model.stem = self.stem.unwrap_or(cfg.model.stem);
        cfg.model.stages = self.stages.map_or(cfg.model.stages, usize::from);
        cfg.labels = self.labels.or(cfg.labels);
        cfg.image_size = self.image_size.map(usize::from).or(cfg.image_size);
        cfg.skip_bad_images = self.skip_bad_images.unwrap_or(cfg.skip_bad_images);
        cfg.init = self.init.as_ref().map(|p| p.display().to_string()).or(cfg.init.take());
        cfg.freeze_backbone = self.freeze_backbone.unwrap_or(cfg.freeze_backbone);
        if let Some(size) = cfg.image_size {
            // Refused before the data is read (checked again at the data's own size).
            cfg.arch
                .check_image_size(size)
                .map_err(|e| format!("--model {}: {e}", cfg.arch.name()))?;
        }
        Ok(())
    }
}

/// The flag of a setting: `max_steps` -> `--max-steps`.
pub fn flag(name: &str) -> String {
    format!("--{}", name.replace('_', "-"))
}
