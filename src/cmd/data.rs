//! `data fetch`: download and unpack the official CIFAR-10 archive.

use super::fetch_data;
use clap::Subcommand;
use resnet_cifar::cli::CliError;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download the official CIFAR-10 binary archive, verify its MD5 and extract it.
    Fetch {
        /// Target folder (the files land in DIR/cifar-10-batches-bin).
        #[arg(long, default_value = "data")]
        dir: PathBuf,
    },
}

pub fn run(c: DataCommand) -> Result<(), CliError> {
    match c {
        DataCommand::Fetch { dir } => fetch_data(&dir).map(|p| println!("CIFAR-10 is in {}", p.display())),
    }
}
