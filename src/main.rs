//! `resnet-cifar`: the command-line shell over the library. Each subcommand parses its flags,
//! calls into the library and prints; errors become one line on stderr and exit code 2
//! (bad input) or 1 (failure during a run).

use clap::{Parser, Subcommand};
use resnet_cifar::bench::{self, BenchConfig};
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::{ResNetConfig, Stem};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "resnet-cifar", version, about = "Train ResNet-18 on CIFAR-10 with an engine made for it", long_about = None)]
struct Cli {
    /// Worker threads (default: every core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time training steps and inference on random CIFAR-shaped batches.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Network stem: seed, torchvision, seed3x3 or cifar.
    #[arg(long, default_value = "seed")]
    stem: Stem,
    /// Residual stages: 4 (the seed) or 3 (drop conv5).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(3..=4))]
    stages: u8,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Timed steps, for training and for inference each.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        if t == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .expect("thread pool configured once");
    }
    match cli.command {
        Command::Bench(a) => run_bench(a),
    }
}

fn run_bench(a: BenchArgs) -> ExitCode {
    let cfg = BenchConfig {
        model: ResNetConfig {
            stem: a.stem,
            stages: a.stages as usize,
            num_classes: 10,
        },
        batch_size: a.batch_size as usize,
        steps: a.steps as usize,
        warmup: a.warmup as usize,
    };
    let bar = indicatif::ProgressBar::new(2 * (cfg.steps + cfg.warmup) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"));
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let r = bench::run(&Cpu, &cfg, |msg| {
        bar.set_message(msg.to_string());
        bar.inc(1);
    });
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&r).expect("report serialises"));
    } else {
        println!(
            "resnet-cifar {} stem={} stages={} batch={} threads={} backend={}",
            env!("CARGO_PKG_VERSION"),
            r.stem,
            r.stages,
            r.batch_size,
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
    }
    ExitCode::SUCCESS
}
