//! `summary`: the network as PyTorch prints it, with shapes, parameters and multiply-adds (and,
//! with `--paths`, the path each convolution takes on the chosen backend); and the flags that
//! name a network and an input batch, shared with `bench`.

use super::{ComputeArgs, WinogradArg};
use clap::Args;
use resnet_cifar::cli::{CliError, limits};
use resnet_cifar::engine::prelude::*;
use resnet_cifar::engine::{ConvGeom, Shape4};
use resnet_cifar::model::CheckpointFile;
use resnet_cifar::model::{Arch, ResNetConfig, Stem, summarize_arch};

/// The network and input size that `summary` and `bench` describe.
#[derive(Args)]
pub struct NetArgs {
    /// Architecture: resnet18, lenet, vgg16 or airbench.
    #[arg(long, default_value = "resnet18")]
    pub model: Arch,
    /// Network stem (resnet18): seed, torchvision, seed3x3 or cifar.
    #[arg(long, default_value = "seed")]
    pub stem: Stem,
    /// Residual stages: 4 (the seed) or 3 (drop conv5).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::STAGES)))]
    pub stages: u8,
    /// Images in the (random) input batch.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    pub batch_size: u64,
    /// Side of the square input images (CIFAR's 32 by default).
    #[arg(long, default_value_t = resnet_cifar::data::cifar::SIDE as u16, value_parser = clap::value_parser!(u16).range(limits::flag_range(limits::IMAGE_SIZE)))]
    pub image_size: u16,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl NetArgs {
    pub fn config(&self) -> ResNetConfig {
        ResNetConfig {
            stem: self.stem,
            stages: self.stages as usize,
            num_classes: ResNetConfig::default().num_classes,
            image_size: self.image_size as usize,
        }
    }

    /// The configuration, refused in one line when the architecture cannot take the size.
    pub fn checked_config(&self) -> Result<ResNetConfig, CliError> {
        let cfg = self.config();
        self.model
            .check_image_size(cfg.image_size)
            .map_err(|e| CliError::input(format!("--image-size {}: {e}", cfg.image_size)))?;
        Ok(cfg)
    }
}

#[derive(Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Describe the network this checkpoint holds (its model, classes and image size) instead
    /// of the one the flags name.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<std::path::PathBuf>,
    /// Also print each convolution's plan: the code that computes its forward and backward
    /// passes on the backend that --device, --precision, --cpu-kernel and --winograd name
    /// (a checkpoint's run's precision and Winograd choice by default).
    #[arg(long)]
    paths: bool,
    #[command(flatten)]
    winograd: WinogradArg,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(a: SummaryArgs) -> Result<(), CliError> {
    let file = a
        .checkpoint
        .as_ref()
        .map(|path| CheckpointFile::read(path, None))
        .transpose()
        .map_err(CliError::input)?;
    let target = match &file {
        Some(file) => a.compute.target_for(file, a.winograd.winograd)?,
        None => a.compute.target()?.winograd(a.winograd.winograd.unwrap_or(true)),
    };
    let (arch, cfg) = match &file {
        Some(file) => {
            if !a.net.json {
                println!(
                    "{}: {} classes ({}), {}x{} images",
                    file.origin,
                    file.spec.classes.len(),
                    file.spec.classes.join(", "),
                    file.spec.image_size,
                    file.spec.image_size
                );
            }
            (file.arch, file.model)
        }
        None => (a.net.model, a.net.checked_config()?),
    };
    let side = cfg.image_size;
    let input = Shape4::new(a.net.batch_size as usize, side, side, resnet_cifar::data::CHANNELS);
    let (s, backend) = with_backend!(target, |be| {
        let plan = |g: &ConvGeom| be.conv2d_plan(g).to_string();
        let plan = a.paths.then_some(&plan as resnet_cifar::model::PlanOf);
        (summarize_arch(be, (arch, cfg), input, plan), be.name())
    });

    if a.net.json {
        println!("{}", serde_json::to_string(&s).map_err(CliError::run)?);
    } else if a.paths {
        print!(
            "convolution paths on {backend}, batch {}:\n{}",
            input.n,
            s.paths_table()
        );
    } else {
        print!("{}\n{}", s.tree, s.table());
    }
    Ok(())
}
