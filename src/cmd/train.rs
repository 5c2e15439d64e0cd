//! `train`: a run from a recipe, flags and an optional TOML file, or the continuation of one.

use super::{ComputeArgs, fetch_data, load_data};
use clap::Args;
use resnet_cifar::cli::{CliError, ConfigFile, limits};
use resnet_cifar::data::Splits;
use resnet_cifar::engine::Backend;
use resnet_cifar::eval::Tta;
use resnet_cifar::model::{Arch, Stem};
use resnet_cifar::train::{Console, Recipe, Resume, Stop, TrainConfig, load_resume, train};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Args)]
struct ModelArgs {
    /// Architecture: resnet18 (the seed's), lenet or vgg16 (its comparison models).
    #[arg(long)]
    model: Option<Arch>,
    /// Network stem: seed (7x7/2 conv, BN, max-pool), torchvision (seed + ReLU), seed3x3
    /// (3x3/2 conv), cifar (3x3/1 conv, BN, ReLU, no pool).
    #[arg(long)]
    stem: Option<Stem>,
    /// Residual stages: 4 (the seed) or 3 (drop conv5).
    #[arg(long, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::STAGES)))]
    stages: Option<u8>,
}

#[derive(Args)]
#[command(after_help = recipes_help(), allow_negative_numbers = true)]
pub struct TrainArgs {
    /// CIFAR-10 folder (binary version). Without it, ./data is used and filled by download.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder (default: runs/RECIPE-UNIXTIME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (bit-identical to a run that
    /// was never stopped, with the same thread count). Takes --epochs, --max-steps, --data.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// A TOML file of settings with the flags' names (recipe = "fast", epochs = 30, ...);
    /// flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Starting configuration (default: seed); the flags below override single values of it.
    #[arg(long)]
    recipe: Option<Recipe>,
    /// Passes over the training images.
    #[arg(long, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    epochs: Option<u64>,
    /// Images per optimizer step.
    #[arg(long, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    batch_size: Option<u64>,
    /// Base (or peak) learning rate of the recipe's schedule.
    #[arg(long)]
    lr: Option<f64>,
    /// Stop after this many optimizer steps, with a checkpoint.
    #[arg(long, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    max_steps: Option<u64>,
    /// Hold out the last N training images as a validation set.
    #[arg(long)]
    val_split: Option<usize>,
    /// Reshuffle the training images every epoch (the seed's loader does not).
    #[arg(long)]
    shuffle: bool,
    /// Seed of the initial weights, the augmentation and the shuffling.
    #[arg(long)]
    seed: Option<u64>,
    /// Label smoothing of the training loss, 0 to 1.
    #[arg(long)]
    label_smoothing: Option<f32>,
    /// L2 weight decay of the recipe's optimizer.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Test-time augmentation of the evaluations: off, flip, flip-shift or flip-shift1.
    #[arg(long)]
    tta: Option<Tta>,
    /// Weight decay on 1-D parameters (BatchNorm scales and shifts, biases) too: true is
    /// PyTorch's single parameter group, false exempts them.
    #[arg(long, value_name = "BOOL")]
    decay_1d: Option<bool>,
    /// Start every residual block as the identity: the last BatchNorm scale of each block at 0
    /// (torchvision's zero_init_residual).
    #[arg(long, value_name = "BOOL")]
    zero_init_residual: Option<bool>,
    /// Zero padding of the training crops: random 32x32 crops of the padded image (0: none).
    #[arg(long, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::CROP_PAD)))]
    crop_pad: Option<u8>,
    /// Mirror each training image in every other epoch instead of by a coin each time.
    #[arg(long, value_name = "BOOL")]
    alternate_flip: Option<bool>,
    /// Cutout: zero a SIDE x SIDE square at a random centre of each training image, after the
    /// crop and flip (clipped at the edges; 0: none).
    #[arg(long, value_name = "SIDE", value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::CUTOUT)))]
    cutout: Option<u8>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

fn recipes_help() -> String {
    let mut s = String::from("Recipes:\n");
    for r in Recipe::ALL {
        s += &format!("  {:<8} {}\n", r.name(), r.describe());
    }
    s
}

/// Raised by SIGINT/SIGTERM: the run finishes its step, saves, and exits.
static STOP: AtomicBool = AtomicBool::new(false);

/// Fills every setting not given on the command line from the `--config` file.
fn merge_config_file(mut a: TrainArgs) -> Result<TrainArgs, CliError> {
    let Some(path) = a.config.clone() else { return Ok(a) };
    let f = ConfigFile::read(&path)?;
    a.recipe = a.recipe.or(f.recipe);
    a.model.model = a.model.model.or(f.model);
    a.model.stem = a.model.stem.or(f.stem);
    a.data = a.data.or(f.data);
    a.out = a.out.or(f.out);
    a.epochs = a.epochs.or(f.epochs.map(|e| e as u64));
    a.batch_size = a.batch_size.or(f.batch_size);
    a.lr = a.lr.or(f.lr);
    a.max_steps = a.max_steps.or(f.max_steps);
    a.val_split = a.val_split.or(f.val_split);
    a.shuffle |= f.shuffle.unwrap_or(false);
    a.seed = a.seed.or(f.seed);
    a.model.stages = a.model.stages.or(f.stages);
    a.label_smoothing = a.label_smoothing.or(f.label_smoothing);
    a.weight_decay = a.weight_decay.or(f.weight_decay);
    a.tta = a.tta.or(f.tta);
    a.decay_1d = a.decay_1d.or(f.decay_1d);
    a.zero_init_residual = a.zero_init_residual.or(f.zero_init_residual);
    a.crop_pad = a.crop_pad.or(f.crop_pad);
    a.alternate_flip = a.alternate_flip.or(f.alternate_flip);
    a.cutout = a.cutout.or(f.cutout);
    Ok(a)
}

pub fn run(a: TrainArgs) -> Result<(), CliError> {
    let target = a.compute.target();
    let a = merge_config_file(a)?;
    let (cfg, resume, out) = match &a.resume {
        Some(dir) => resumed_config(&a, dir)?,
        None => {
            let cfg = fresh_config(&a)?;
            let out = a.out.clone().unwrap_or_else(|| default_run_dir(&cfg.recipe));
            (cfg, None, out)
        }
    };
    let data_dir = match a.data.clone().or_else(|| cfg.data.clone().map(PathBuf::from)) {
        Some(d) => d,
        None => fetch_data(Path::new("data"))?,
    };
    let mut cfg = cfg;
    cfg.data = Some(data_dir.display().to_string());
    let data = load_data(&data_dir)?;
    let splits = Splits::new(data, cfg.val_split).map_err(CliError::input)?;
    let mut console = Console::stdout();
    let outcome = with_backend!(target, |be| {
        console.line(&format!(
            "run {}: recipe {}, {}, {} epochs, batch {}, on {}",
            out.display(),
            cfg.recipe,
            match cfg.arch {
                Arch::Resnet18 => format!("resnet18 (stem {}, {} stages)", cfg.model.stem.name(), cfg.model.stages),
                other => other.name().to_string(),
            },
            cfg.epochs,
            cfg.batch_size,
            be.name()
        ));
        ctrlc::set_handler(|| STOP.store(true, Ordering::Relaxed)).map_err(CliError::run)?;
        train(be, &cfg, &splits, &out, &mut console, resume, &STOP).map_err(|e| CliError::run(format!("{e:#}")))?
    });
    let resume_hint = format!("resume with: resnet-cifar train --resume {}", out.display());
    match outcome.stopped {
        Some(Stop::Interrupted) => {
            return Err(CliError {
                code: 130,
                message: format!(
                    "interrupted after step {}; checkpoint saved; {resume_hint}",
                    outcome.steps
                ),
            });
        }
        Some(Stop::MaxSteps) => console.line(&format!(
            "stopped after {} steps (--max-steps); {resume_hint}",
            outcome.steps
        )),
        None => {}
    }
    console.line(&format!(
        "done: {} steps in {:.0} s of training ({:.1} img/s){}; results in {}",
        outcome.steps,
        outcome.train_seconds,
        outcome.images_per_sec(),
        outcome
            .best
            .map(|(e, acc)| format!(", best accuracy {acc:.4} after epoch {e}"))
            .unwrap_or_default(),
        out.display()
    ));
    Ok(())
}

fn default_run_dir(recipe: &str) -> PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{recipe}-{t}"))
}

/// The recipe with the flags' overrides.
fn fresh_config(a: &TrainArgs) -> Result<TrainConfig, CliError> {
    let mut cfg = a.recipe.unwrap_or(Recipe::Seed).config();
    if let Some(e) = a.epochs {
        cfg.epochs = e as usize;
    }
    if let Some(b) = a.batch_size {
        cfg.batch_size = b as usize;
    }
    if let Some(lr) = a.lr {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(CliError::input(format!("--lr must be a positive number, got {lr}")));
        }
        cfg.schedule = cfg.schedule.with_lr(lr);
    }
    cfg.max_steps = a.max_steps.or(cfg.max_steps);
    cfg.val_split = a.val_split.unwrap_or(cfg.val_split);
    cfg.shuffle |= a.shuffle;
    cfg.seed = a.seed.unwrap_or(cfg.seed);
    if let Some(s) = a.label_smoothing {
        if !(0.0..1.0).contains(&s) {
            return Err(CliError::input(format!("--label-smoothing must be in [0, 1), got {s}")));
        }
        cfg.label_smoothing = s;
    }
    if let Some(t) = a.tta {
        cfg.tta = t;
    }
    if let Some(wd) = a.weight_decay {
        if !(wd.is_finite() && wd >= 0.0) {
            return Err(CliError::input(format!("--weight-decay must be 0 or more, got {wd}")));
        }
        cfg.optimizer = cfg.optimizer.with_weight_decay(wd);
    }
    if let Some(d) = a.decay_1d {
        cfg.optimizer = cfg.optimizer.with_decay_1d(d);
    }
    cfg.zero_init_residual = a.zero_init_residual.unwrap_or(cfg.zero_init_residual);
    cfg.augment.crop_pad = a.crop_pad.map_or(cfg.augment.crop_pad, usize::from);
    cfg.augment.alternate_flip = a.alternate_flip.unwrap_or(cfg.augment.alternate_flip);
    cfg.augment.cutout = a.cutout.map_or(cfg.augment.cutout, usize::from);
    cfg.arch = a.model.model.unwrap_or(cfg.arch);
    cfg.model.stem = a.model.stem.unwrap_or(cfg.model.stem);
    cfg.model.stages = a.model.stages.map_or(cfg.model.stages, |s| s as usize);
    Ok(cfg)
}

/// The configuration a run was started with; only `--epochs`, `--max-steps` and `--data` may
/// change on resuming (anything else would make it a different run).
fn resumed_config(a: &TrainArgs, dir: &Path) -> Result<(TrainConfig, Option<Resume>, PathBuf), CliError> {
    let fixed = [
        ("--out", a.out.is_some()),
        ("--batch-size", a.batch_size.is_some()),
        ("--lr", a.lr.is_some()),
        ("--val-split", a.val_split.is_some()),
        ("--shuffle", a.shuffle),
        ("--seed", a.seed.is_some()),
        ("--recipe", a.recipe.is_some()),
        ("--label-smoothing", a.label_smoothing.is_some()),
        ("--weight-decay", a.weight_decay.is_some()),
        ("--tta", a.tta.is_some()),
        ("--decay-1d", a.decay_1d.is_some()),
        ("--zero-init-residual", a.zero_init_residual.is_some()),
        ("--crop-pad", a.crop_pad.is_some()),
        ("--alternate-flip", a.alternate_flip.is_some()),
        ("--cutout", a.cutout.is_some()),
        ("--model", a.model.model.is_some()),
        ("--stem", a.model.stem.is_some()),
        ("--stages", a.model.stages.is_some()),
    ];
    if let Some((flag, _)) = fixed.iter().find(|(_, set)| *set) {
        return Err(CliError::input(format!(
            "{flag} cannot change when resuming (only --epochs, --max-steps and --data can)"
        )));
    }
    let r = load_resume(dir).map_err(|e| CliError::input(format!("{e:#}")))?;
    let mut cfg = r.config.clone();
    if let Some(e) = a.epochs {
        cfg.epochs = e as usize;
    }
    if let Some(m) = a.max_steps {
        cfg.max_steps = Some(m);
    }
    Ok((cfg, Some(r), dir.to_path_buf()))
}
