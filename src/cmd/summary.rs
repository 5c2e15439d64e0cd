//! `summary`: the network as PyTorch prints it, with shapes, parameters and multiply-adds; and
//! the flags that name a network and an input batch, shared with `bench`.

use clap::Args;
use resnet_cifar::cli::{CliError, limits};
use resnet_cifar::engine::Shape4;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::{Arch, ResNet, ResNetConfig, Sequential, Stem, summarize, summarize_sequential};

/// The network and input size that `summary` and `bench` describe.
#[derive(Args)]
pub struct NetArgs {
    /// Architecture: resnet18, lenet or vgg16.
    #[arg(long, default_value = "resnet18")]
    pub model: Arch,
    /// Network stem (resnet18): seed, torchvision, seed3x3 or cifar.
    #[arg(long, default_value = "seed")]
    pub stem: Stem,
    /// Residual stages: 4 (the seed) or 3 (drop conv5).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::STAGES)))]
    pub stages: u8,
    /// Images in the (random, CIFAR-shaped) input batch.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    pub batch_size: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl NetArgs {
    pub fn config(&self) -> ResNetConfig {
        ResNetConfig {
            stem: self.stem,
            stages: self.stages as usize,
            num_classes: 10,
        }
    }
}

#[derive(Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    net: NetArgs,
}

pub fn run(a: SummaryArgs) -> Result<(), CliError> {
    let input = Shape4::new(a.net.batch_size as usize, 32, 32, 3);
    let s = match a.net.model {
        Arch::Resnet18 => summarize(&ResNet::new(&Cpu, a.net.config(), 0), input),
        Arch::Lenet => summarize_sequential(&Sequential::lenet(&Cpu, 10, 0), input),
        Arch::Vgg16 => summarize_sequential(&Sequential::vgg16(&Cpu, 10, 0), input),
    };
    if a.net.json {
        println!("{}", serde_json::to_string(&s).map_err(CliError::run)?);
    } else {
        print!("{}\n{}", s.tree, s.table());
    }
    Ok(())
}
