//! `bench`: training and inference speed on random CIFAR-shaped batches.

use super::ComputeArgs;
use super::summary::NetArgs;
use clap::Args;
use resnet_cifar::bench::{self, BenchConfig};
use resnet_cifar::cli::{CliError, limits};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Timed steps, for training and for inference each.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    steps: u64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(a: BenchArgs) -> Result<(), CliError> {
    let target = a.compute.target();
    let cfg = BenchConfig {
        arch: a.net.model,
        model: a.net.checked_config()?,
        batch_size: a.net.batch_size as usize,
        steps: a.steps as usize,
        warmup: a.warmup as usize,
    };
    let bar = indicatif::ProgressBar::new(2 * (cfg.steps + cfg.warmup) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"));
    if a.net.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let r = with_backend!(target, |be| bench::run(be, &cfg, |msg| {
        bar.set_message(msg.to_string());
        bar.inc(1);
    }));
    bar.finish_and_clear();
    if a.net.json {
        println!("{}", serde_json::to_string(&r).map_err(CliError::run)?);
        return Ok(());
    }
    println!(
        "resnet-cifar {} model={} stem={} stages={} batch={} image={}x{} threads={} backend={}",
        env!("CARGO_PKG_VERSION"),
        r.model,
        r.stem,
        r.stages,
        r.batch_size,
        r.image_size,
        r.image_size,
        r.threads,
        r.backend
    );
    println!(
        "train:     {:8.1} img/s  (forward, loss, backward, Adam)",
        r.train_images_per_sec
    );
    println!(
        "inference: {:8.1} img/s  (eval mode, logits to host)",
        r.infer_images_per_sec
    );
    if let Some(b) = r.peak_rss_bytes {
        println!("peak memory: {:.1} MiB", b as f64 / (1024.0 * 1024.0));
    }
    println!("final loss: {:.4}", r.final_loss);
    Ok(())
}
