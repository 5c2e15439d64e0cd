//! `bench`: training and inference speed on random CIFAR-shaped batches.

use super::summary::NetArgs;
use super::{ComputeArgs, World};
use clap::Args;
use resnet_cifar::bench::{self, BenchConfig};
use resnet_cifar::cli::{CliError, limits};
use resnet_cifar::engine::prelude::*;

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
    /// Compute 3x3 convolutions on the CPU by Winograd's algorithm (false: as a run trained
    /// with `--winograd false` computes).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    winograd: bool,
    /// Time each convolution alone instead (forward and backward, the median of --steps
    /// calls), with the path its plan takes: where a step's convolution time goes.
    #[arg(long)]
    layers: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(a: BenchArgs) -> Result<(), CliError> {
    let cfg = BenchConfig {
        arch: a.net.model,
        model: a.net.checked_config()?,
        batch_size: a.net.batch_size as usize,
        steps: a.steps as usize,
        warmup: a.warmup as usize,
    };
    let world = World::from_launcher()?;
    if world.size() > 1 {
        let result = a
            .compute
            .target_on(&world)
            .and_then(|t| all_reduce(&world, &t.winograd(a.winograd), &cfg));
        return world.end(result);
    }
    let target = a.compute.target()?.winograd(a.winograd);
    if a.layers {
        return layers(&target, &cfg, a.net.json);
    }
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

/// `bench --layers`: each convolution's time a call, as a table or one JSON array.
fn layers(target: &super::Target, cfg: &BenchConfig, json: bool) -> Result<(), CliError> {
    let (times, backend) = with_backend!(*target, |be| (bench::time_layers(be, cfg), be.name()));
    if json {
        println!("{}", serde_json::to_string(&times).map_err(CliError::run)?);
        return Ok(());
    }
    println!(
        "convolutions on {backend}, batch {}, ms a call (median of {}):",
        cfg.batch_size, cfg.steps
    );
    println!(
        "{:<20} {:<26} {:<38} {:>8} {:>9}",
        "layer", "convolution", "path", "forward", "backward"
    );
    for t in &times {
        println!(
            "{:<20} {:<26} {:<38} {:>8.2} {:>9.2}",
            t.name, t.conv, t.path, t.forward_ms, t.backward_ms
        );
    }
    let (f, b): (f64, f64) = (
        times.iter().map(|t| t.forward_ms).sum(),
        times.iter().map(|t| t.backward_ms).sum(),
    );
    println!("{:<86} {f:>8.2} {b:>9.2}", "total");
    Ok(())
}

/// Under several ranks: the time of one gradient all-reduce between them (the model's
/// arena, `--steps` times after `--warmup`), printed by rank 0.
fn all_reduce(world: &World, target: &super::Target, cfg: &BenchConfig) -> Result<(), CliError> {
    let (len, mut times) = with_backend!(target, |be| {
        let len = bench::gradient_len(be, cfg);
        (
            len,
            bench::all_reduce(be, &*world.collective_for(be)?, len, cfg.warmup, cfg.steps),
        )
    });
    if world.rank() != 0 {
        return Ok(());
    }
    times.sort_by(f64::total_cmp);
    let ms = |t: f64| 1e3 * t;
    println!(
        "all-reduce (mean) of the gradients, {len} f32 ({:.1} MB), over {} ranks: median {:.1} ms, min {:.1}, max {:.1} ({} calls); {:.2} GB/s of gradient",
        len as f64 * 4e-6,
        world.size(),
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
        times.len(),
        len as f64 * 4e-9 / times[times.len() / 2]
    );
    Ok(())
}
