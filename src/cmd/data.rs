//! `data fetch`: download and unpack an official dataset archive.

use super::fetch_data;
use clap::Subcommand;
use resnet_cifar::cli::CliError;
use resnet_cifar::data::fetch::Published;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download an official binary archive (CIFAR-10 or CIFAR-100), verify its MD5 and extract it.
    Fetch {
        /// Target folder (the files land in DIR/cifar-10-batches-bin or DIR/cifar-100-binary).
        #[arg(long, default_value = "data")]
        dir: PathBuf,
        /// Which dataset: cifar10 or cifar100.
        #[arg(long, default_value = "cifar10")]
        dataset: Published,
        /// Take the archive from this address (a mirror, a local web server) instead of its
        /// publisher's; the MD5 is checked all the same. Without it, RESNET_CIFAR_MIRROR (a base
        /// address the archive's file name is appended to) is used when set.
        #[arg(long)]
        url: Option<String>,
    },
}

pub fn run(c: DataCommand) -> Result<(), CliError> {
    match c {
        DataCommand::Fetch { dir, dataset, url } => {
            let archive = dataset.archive();
            fetch_data(&dir, archive, url.as_deref()).map(|p| println!("{} is in {}", archive.dataset, p.display()))
        }
    }
}
