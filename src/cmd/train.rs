//! `train`: a run from a recipe, flags and an optional TOML file, or the continuation of one:
//! the settings resolved into a plan (`train::plan`), the data read, the run trained
//! (`train::run`), how it ended printed.

use super::{ComputeArgs, Device, World, fetch_data, open_data};
use clap::Args;
use resnet_cifar::checkpoint::CheckpointError;
use resnet_cifar::cli::{CliError, read_settings_file};
use resnet_cifar::data::{Splits, fetch};
use resnet_cifar::engine::prelude::*;
use resnet_cifar::train::plan::{Resolved, available_memory, check_memory};
use resnet_cifar::train::{Console, Recipe, Settings, Stop, TrainOutcome, train_ranks};
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
    let lines: Vec<String> = Recipe::ALL
        .iter()
        .map(|r| format!("  {:<8} {}", r.name(), r.describe()))
        .collect();
    format!("Recipes:\n{}\n", lines.join("\n"))
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
    let resolved = Resolved::new(&settings, a.resume.as_deref()).map_err(CliError::input)?;
    resolved.check_ranks(world.size()).map_err(CliError::input)?;
    let data_dir = match &resolved.data {
        Some(d) => d.clone(),
        None if world.size() > 1 => {
            let why = "several ranks need --data (fetch CIFAR-10 once first: resnet-cifar data fetch)";
            return Err(CliError::input(why));
        }
        None => fetch_data(Path::new("data"), &fetch::CIFAR10, None)?,
    };
    let data = open_data(&data_dir, &resolved.data_options())?;
    console.line(&data.summary());
    data.notes.iter().for_each(|note| console.line(note));
    let mut splits =
        Splits::new(data, resolved.plan.cfg.val_split, resolved.val_split_method()).map_err(CliError::input)?;
    let plan = resolved
        .fit(&settings, &data_dir, &mut splits)
        .map_err(CliError::input)?;
    if let (Device::Cpu(_), Some(available)) = (&target.device, available_memory()) {
        check_memory(&plan.cfg, splits.train.len(), world.size(), available).map_err(CliError::input)?;
    }
    let (cfg, out) = (plan.cfg.clone(), plan.out.clone());
    let outcome = with_backend!(target.winograd(cfg.winograd), |be| {
        console.line(&format!("run {}: {}, on {}", out.display(), cfg.describe(), be.name()));
        ctrlc::set_handler(|| STOP.store(true, Ordering::Relaxed)).map_err(CliError::run)?;
        let coll = world.collective_for(be)?;
        // A checkpoint that does not fit the model is bad input; anything else failed the run.
        train_ranks(be, &*coll, plan, &splits, &mut console, &STOP).map_err(|e| {
            match e.downcast_ref::<CheckpointError>() {
                Some(_) => CliError::input(format!("{e:#}")),
                None => CliError::run(format!("{e:#}")),
            }
        })?
    });
    report(&outcome, &out, world.size(), &console)
}

/// How the run ended, as lines; a run interrupted by a signal ends with exit code 130.
fn report(outcome: &TrainOutcome, out: &Path, ranks: usize, console: &Console) -> Result<(), CliError> {
    if let Some(line) = outcome.ranks_line(ranks) {
        console.line(&line);
    }
    let (steps, hint) = (
        outcome.steps,
        format!("resume with: resnet-cifar train --resume {}", out.display()),
    );
    match outcome.stopped {
        Some(Stop::Interrupted) => {
            let message = format!("interrupted after step {steps}; checkpoint saved; {hint}");
            return Err(CliError { code: 130, message });
        }
        Some(Stop::MaxSteps) => console.line(&format!("stopped after {steps} steps (--max-steps); {hint}")),
        None => {}
    }
    console.line(&outcome.done_line(out));
    Ok(())
}
