//! `plot`: PNG charts of runs' metrics.

use clap::Args;
use resnet_cifar::cli::CliError;
use resnet_cifar::plot;
use std::path::PathBuf;

#[derive(Args)]
pub struct PlotArgs {
    /// Run folders (as `train --out` made them).
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Where the PNG files go (default: FIRST_RUN/plots).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: PlotArgs) -> Result<(), CliError> {
    let runs = a
        .runs
        .iter()
        .map(|r| plot::RunCurves::read(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::input)?;
    let out = a.out.unwrap_or_else(|| a.runs[0].join("plots"));
    for path in plot::plot(&runs, &out).map_err(CliError::run)? {
        println!("{}", path.display());
    }
    Ok(())
}
