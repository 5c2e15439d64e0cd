//! `train`: a run from a recipe, flags and an optional TOML file, or the continuation of one.

use super::{ComputeArgs, World, fetch_data, open_data};
use clap::Args;
use resnet_cifar::checkpoint::CheckpointError;
use resnet_cifar::cli::{CheckpointFile, CliError, read_settings_file};
use resnet_cifar::data::{DataOptions, Splits, fetch};
use resnet_cifar::engine::prelude::*;
use resnet_cifar::model::Arch;
use resnet_cifar::train::settings::{CHANGEABLE_ON_RESUME, flag};
use resnet_cifar::train::{Console, InitWeights, Recipe, Settings, Start, Stop, TrainConfig, load_resume, train_ranks};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Args)]
#[command(after_help = recipes_help(), allow_negative_numbers = true)]
pub struct TrainArgs {
    #[command(flatten)]
    settings: Settings,
    /// Continue the run in this folder from its last checkpoint (bit-identical to a run that
    /// was never stopped, with the same thread count). Takes --epochs, --max-steps, --data,
    /// --log-every.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// A TOML file of settings with the flags' names (recipe = "fast", epochs = 30, ...);
    /// flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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

pub fn run(a: TrainArgs) -> Result<(), CliError> {
    let world = World::from_launcher()?;
    let rank = world.rank();
    let result = run_rank(a, &world).map_err(|e| match rank {
        0 => e,
        r => CliError {
            message: format!("rank {r}: {}", e.message),
            ..e
        },
    });
    world.end(result)
}

fn run_rank(a: TrainArgs, world: &World) -> Result<(), CliError> {
    let target = a.compute.target_on(world)?;
    // Rank 0 speaks for the run; the others print only their errors.
    let mut console = if world.rank() == 0 {
        Console::stdout()
    } else {
        Console::quiet()
    };
    if world.size() > 1 {
        console.line(&format!("rank 0 of {}", world.size()));
    }
    let settings = match &a.config {
        Some(path) => a.settings.clone().or(read_settings_file(path)?),
        None => a.settings.clone(),
    };
    let (mut cfg, start, out) = match &a.resume {
        Some(dir) => resumed_config(&settings, dir)?,
        None => {
            let (cfg, start) = fresh_config(&settings)?;
            let out = settings.out.clone().unwrap_or_else(|| default_run_dir(&cfg.recipe));
            (cfg, start, out)
        }
    };
    if let (Start::Resume(r), Some(dir)) = (&start, &a.resume) {
        r.check_ranks(world.size(), dir).map_err(CliError::input)?;
    }
    let data_dir = match settings.data.clone().or_else(|| cfg.data.clone().map(PathBuf::from)) {
        Some(d) => d,
        None if world.size() > 1 => {
            return Err(CliError::input(
                "several ranks need --data (fetch CIFAR-10 once first: resnet-cifar data fetch)",
            ));
        }
        None => fetch_data(Path::new("data"), &fetch::CIFAR10, None)?,
    };
    cfg.data = Some(data_dir.display().to_string());
    let data = open_data(
        &data_dir,
        &DataOptions {
            labels: cfg.labels,
            image_size: cfg.image_size,
            skip_bad_images: cfg.skip_bad_images,
        },
    )?;
    console.line(&data.summary());
    for note in &data.notes {
        console.line(note);
    }
    let mut splits = Splits::new(data, cfg.val_split).map_err(CliError::input)?;
    if matches!(start, Start::Resume(_)) {
        // The run keeps the classes, size and normalisation it was started with.
        let (was, now) = (&cfg.dataset, &splits.spec);
        if was.classes != now.classes || was.image_size != now.image_size {
            return Err(CliError::input(format!(
                "{}: the run was trained on {} classes of {}x{2} images ({}), this data has {} classes of {}x{5} ({})",
                data_dir.display(),
                was.classes.len(),
                was.image_size,
                preview(&was.classes),
                now.classes.len(),
                now.image_size,
                preview(&now.classes)
            )));
        }
        splits.spec.norm = was.norm;
    } else {
        splits.spec.norm.mean = settings.mean.unwrap_or(splits.spec.norm.mean);
        splits.spec.norm.std = settings.std.unwrap_or(splits.spec.norm.std);
        cfg.arch
            .check_image_size(splits.spec.image_size)
            .map_err(|e| CliError::input(format!("--model {}: {e}", cfg.arch.name())))?;
        cfg.model.num_classes = splits.spec.classes.len();
        cfg.model.image_size = splits.spec.image_size;
        cfg.dataset = splits.spec.clone();
    }
    let target = target.winograd(cfg.winograd);
    let outcome = with_backend!(target, |be| {
        console.line(&format!(
            "run {}: recipe {}, {}, {} epochs, batch {}, on {}",
            out.display(),
            cfg.recipe,
            cfg.arch.describe(&cfg.model),
            cfg.epochs,
            cfg.batch_size,
            be.name()
        ));
        ctrlc::set_handler(|| STOP.store(true, Ordering::Relaxed)).map_err(CliError::run)?;
        let coll = world.collective_for(be)?;
        train_ranks(be, &*coll, &cfg, &splits, &out, &mut console, start, &STOP).map_err(|e| {
            // A checkpoint that does not fit the model is bad input; anything else failed the run.
            match e.downcast_ref::<CheckpointError>() {
                Some(_) => CliError::input(format!("{e:#}")),
                None => CliError::run(format!("{e:#}")),
            }
        })?
    });
    if let Some(crc) = outcome.ranks_agree_on {
        console.line(&format!(
            "all {} ranks hold the same weights (crc32c {crc:08x}); gradient all-reduce {:.1} ms a step ({:.0}% of training time, waits for the slowest rank included)",
            world.size(),
            1e3 * outcome.reduce_seconds / outcome.reduced_steps.max(1) as f64,
            100.0 * outcome.reduce_seconds / outcome.train_seconds.max(1e-9)
        ));
    }
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

/// The first few of `names`, for a one-line message.
fn preview(names: &[String]) -> String {
    match names.len() {
        0..=4 => names.join(", "),
        n => format!("{}, ... ({} more)", names[..3].join(", "), n - 3),
    }
}

fn default_run_dir(recipe: &str) -> PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{recipe}-{t}"))
}

/// The recipe with the settings applied, and how the run starts: with `--init`, the model
/// (architecture, stem, stages) follows the checkpoint.
fn fresh_config(s: &Settings) -> Result<(TrainConfig, Start), CliError> {
    let mut cfg = s.resolve().map_err(CliError::input)?;
    let Some(path) = &s.init else {
        return Ok((cfg, Start::Fresh));
    };
    // The checkpoint says what network it holds; --stem only settles what it cannot say (a
    // PyTorch state_dict with a 3x3 stem).
    let file = CheckpointFile::read(path, None).or_else(|e| match s.stem {
        Some(stem) => CheckpointFile::read(path, Some(stem)),
        None => Err(e),
    })?;
    let differs = [
        ("--model", s.model.is_some_and(|m| m != file.arch)),
        (
            "--stages",
            s.stages.is_some_and(|n| usize::from(n) != file.model.stages),
        ),
        (
            "--stem",
            s.stem
                .is_some_and(|st| file.arch == Arch::Resnet18 && st != file.model.stem),
        ),
    ];
    if let Some((flag, _)) = differs.iter().find(|(_, d)| *d) {
        return Err(CliError::input(format!(
            "{flag} differs from the network in {} ({}); the model follows the --init checkpoint",
            file.origin,
            match file.arch {
                Arch::Resnet18 => format!(
                    "resnet18, stem {}, {} stages",
                    file.model.stem.name(),
                    file.model.stages
                ),
                other => other.name().to_string(),
            }
        )));
    }
    cfg.arch = file.arch;
    cfg.model.stem = file.model.stem;
    cfg.model.stages = file.model.stages;
    let weights = InitWeights {
        origin: file.origin,
        tensors: file.tensors,
    };
    Ok((cfg, Start::Init(weights)))
}

/// The configuration a run was started with; only the settings of [`CHANGEABLE_ON_RESUME`] may
/// change on resuming (anything else would make it a different run).
fn resumed_config(s: &Settings, dir: &Path) -> Result<(TrainConfig, Start, PathBuf), CliError> {
    if let Some(f) = s.refused_on_resume() {
        let allowed: Vec<String> = CHANGEABLE_ON_RESUME.iter().map(|k| flag(k)).collect();
        return Err(CliError::input(format!(
            "{f} cannot change when resuming (only {} can)",
            allowed.join(", ")
        )));
    }
    let r = load_resume(dir).map_err(|e| CliError::input(format!("{e:#}")))?;
    let mut cfg = r.config.clone();
    s.apply_on_resume(&mut cfg);
    Ok((cfg, Start::Resume(Box::new(r)), dir.to_path_buf()))
}
