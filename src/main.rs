//! `resnet-cifar`: the command-line shell over the library. Each subcommand parses its flags,
//! calls into the library and prints. Errors are one line on stderr; exit code 2 for bad input
//! (flags, data files, checkpoints), 1 for a failure during a run.
//!
//! This file holds the command list and the thread pool; each command's flags and its `run`
//! are in `cmd/`, one file a command.

mod cmd;

use clap::{Parser, Subcommand};
use cmd::{bench, data, eval, export, plot, predict, summary, train};
use resnet_cifar::cli::CliError;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "resnet-cifar",
    version,
    about = "Train ResNet-18 (and LeNet, VGG-16) on CIFAR-10, CIFAR-100 or your own images, with an engine made for it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (downloads CIFAR-10 into ./data when run without --data).
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint: loss, accuracy, per-class accuracy, confusion matrix.
    Eval(eval::EvalArgs),
    /// Time training steps and inference on random batches (CIFAR-shaped, or --image-size).
    Bench(bench::BenchArgs),
    /// Print the network as PyTorch prints it, with every layer's output shape, parameters
    /// and multiply-adds.
    Summary(summary::SummaryArgs),
    /// Classify images of any size and format: each is cut to its centred square, resized to
    /// the checkpoint's image size (Lanczos3, antialiased) and normalised like its training images.
    Predict(predict::PredictArgs),
    /// Write a checkpoint as an ONNX model (eval mode, NCHW float32 input normalised as in
    /// training, logits out; class names, mean/std and image size in its metadata).
    Export(export::ExportArgs),
    /// Draw PNG charts of one or more runs (training loss, validation loss and accuracy, lr)
    /// from their metrics.jsonl; several runs share each chart.
    Plot(plot::PlotArgs),
    /// Manage the dataset.
    #[command(subcommand)]
    Data(data::DataCommand),
}

/// The x86 instruction sets this build may use (`.cargo/config.toml` compiles for x86-64-v3)
/// that the CPU lacks: checked first, so that an older CPU gets a sentence, not a crash.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
fn missing_cpu_features() -> Vec<&'static str> {
    let mut missing = Vec::new();
    macro_rules! need {
        ($($feature:tt),*) => {$(
            if cfg!(target_feature = $feature) && !std::arch::is_x86_feature_detected!($feature) {
                missing.push($feature);
            }
        )*};
    }
    need!("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "lzcnt", "movbe");
    missing
}

/// The most worker threads `--threads` may ask for: far beyond any machine's cores, short of
/// the thousands of threads that made a mistyped count hang the machine.
const MAX_THREADS: usize = 1024;

/// Ends the program quietly, as ripgrep does, when what it prints goes to a pipe whose reader
/// has gone (`resnet-cifar summary | head -1`): `println!` panics on that, and the panic would
/// otherwise print a backtrace hint and exit 101. Any other panic is reported as before.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info)
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    #[cfg(target_arch = "x86_64")]
    {
        let missing = missing_cpu_features();
        if !missing.is_empty() {
            cmd::print_error(&format!(
                "this build of resnet-cifar needs {} (x86-64-v3), which this CPU lacks; \
                 build it with RUSTFLAGS=\"-C target-cpu=x86-64\" cargo build --release",
                missing.join(", ")
            ));
            return ExitCode::from(2);
        }
    }
    let cli = Cli::parse();
    let result = (|| {
        let compute = match &cli.command {
            Command::Train(a) => Some(&a.compute),
            Command::Eval(a) => Some(&a.compute),
            Command::Bench(a) => Some(&a.compute),
            Command::Predict(a) => Some(&a.compute),
            Command::Summary(a) => Some(&a.compute),
            Command::Plot(_) | Command::Data(_) | Command::Export(_) => None,
        };
        let threads = match compute.and_then(|c| c.threads) {
            Some(0) => return Err(CliError::input("--threads must be at least 1")),
            Some(t) if t > MAX_THREADS => {
                return Err(CliError::input(format!(
                    "--threads must be at most {MAX_THREADS}, got {t}"
                )));
            }
            Some(t) => t,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        // Run the command on a worker of the pool, so that each parallel kernel starts from
        // inside the pool instead of waking it from outside (measured: ~10% of a step).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(CliError::run)?;
        pool.install(|| match cli.command {
            Command::Train(a) => train::run(*a),
            Command::Eval(a) => eval::run(a),
            Command::Bench(a) => bench::run(a),
            Command::Summary(a) => summary::run(a),
            Command::Plot(a) => plot::run(a),
            Command::Predict(a) => predict::run(a),
            Command::Export(a) => export::run(a),
            Command::Data(c) => data::run(c),
        })
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cmd::print_error(&e.message);
            ExitCode::from(e.code)
        }
    }
}
