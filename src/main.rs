//! `resnet-cifar`: the command-line shell over the library. Each subcommand parses its flags,
//! calls into the library and prints. Errors are one line on stderr; exit code 2 for bad input
//! (flags, data files, checkpoints), 1 for a failure during a run.

use clap::{Args, Parser, Subcommand};
use resnet_cifar::bench::{self, BenchConfig};
use resnet_cifar::cli::{CheckpointFile, CliError, ConfigFile, limits};
use resnet_cifar::data::CLASS_NAMES;
use resnet_cifar::data::{Cifar10, Splits, fetch};
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::engine::cuda::{Cuda, Precision};
use resnet_cifar::engine::{Backend, Shape4};
use resnet_cifar::eval::{Tta, evaluate};
use resnet_cifar::model::{Arch, ResNet, ResNetConfig, Sequential, Stem, summarize, summarize_sequential};
use resnet_cifar::plot;
use resnet_cifar::predict;
use resnet_cifar::train::{Console, Recipe, Resume, Stop, TrainConfig, load_resume, train};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser)]
#[command(
    name = "resnet-cifar",
    version,
    about = "Train ResNet-18 on CIFAR-10 with an engine made for it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where and how a command computes: the flags of `train`, `eval`, `bench` and `predict`.
#[derive(Args)]
struct ComputeArgs {
    /// Worker threads (default: every core). Results are bit-identical for the same seed and
    /// thread count.
    #[arg(long)]
    threads: Option<usize>,
    /// Where to compute: cpu, cuda (GPU 0) or cuda:N. CUDA needs the NVIDIA driver and the CUDA
    /// libraries (NVRTC, cuBLAS, cuDNN 9), found on LD_LIBRARY_PATH, in RESNET_CIFAR_CUDA_LIBS,
    /// CUDA_HOME, /usr/local/cuda, or a PyTorch install's nvidia/*/lib folders.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// GPU arithmetic for convolutions: fp32, or tf32 (tensor cores, PyTorch's default for
    /// cuDNN convolutions).
    #[arg(long, default_value = "tf32", value_parser = ["fp32", "tf32"])]
    precision: String,
}

impl ComputeArgs {
    fn target(&self) -> Target {
        Target {
            device: self.device,
            precision: if self.precision == "fp32" {
                Precision::Fp32
            } else {
                Precision::Tf32
            },
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (downloads CIFAR-10 into ./data when run without --data).
    Train(TrainArgs),
    /// Evaluate a checkpoint: loss, accuracy, per-class accuracy, confusion matrix.
    Eval(EvalArgs),
    /// Time training steps and inference on random CIFAR-shaped batches.
    Bench(BenchArgs),
    /// Print the network as PyTorch prints it, with every layer's output shape, parameters
    /// and multiply-adds.
    Summary(SummaryArgs),
    /// Classify PNG or JPEG images of any size: each is cut to its centred square, resized to
    /// 32x32 (Lanczos3, antialiased) and normalised like the training images.
    Predict(PredictArgs),
    /// Draw PNG charts of one or more runs (training loss, validation loss and accuracy, lr)
    /// from their metrics.jsonl; several runs share each chart.
    Plot(PlotArgs),
    /// Manage the dataset.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Args)]
struct PredictArgs {
    /// A state_dict in safetensors (ours or one saved from the seed's PyTorch model).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Image files (PNG or JPEG).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// How many classes to list for each image.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=10))]
    top_k: u64,
    /// Print one JSON array instead of text.
    #[arg(long)]
    json: bool,
    /// The stem, for a state_dict that does not record it.
    #[arg(long)]
    stem: Option<Stem>,
    #[command(flatten)]
    compute: ComputeArgs,
}

#[derive(Args)]
struct PlotArgs {
    /// Run folders (as `train --out` made them).
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Where the PNG files go (default: FIRST_RUN/plots).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download the official CIFAR-10 binary archive, verify its MD5 and extract it.
    Fetch {
        /// Target folder (the files land in DIR/cifar-10-batches-bin).
        #[arg(long, default_value = "data")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Architecture: resnet18 (the seed's), lenet or vgg16 (its comparison models).
    #[arg(long)]
    model: Option<Arch>,
    /// Network stem: seed (7x7/2 conv, BN, max-pool), torchvision (seed + ReLU), seed3x3
    /// (3x3/2 conv), cifar (3x3/1 conv, BN, ReLU, no pool).
    #[arg(long)]
    stem: Option<Stem>,
    /// Residual stages: 4 (the seed) or 3 (drop conv5).
    #[arg(long, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::STAGES)))]
    stages: Option<u8>,
}

#[derive(Args)]
#[command(after_help = recipes_help(), allow_negative_numbers = true)]
struct TrainArgs {
    /// CIFAR-10 folder (binary version). Without it, ./data is used and filled by download.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder (default: runs/RECIPE-UNIXTIME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (bit-identical to a run that
    /// was never stopped, with the same thread count). Takes --epochs, --max-steps, --data.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// A TOML file of settings with the flags' names (recipe = "fast", epochs = 30, ...);
    /// flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Starting configuration (default: seed); the flags below override single values of it.
    #[arg(long)]
    recipe: Option<Recipe>,
    /// Passes over the training images.
    #[arg(long, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    epochs: Option<u64>,
    /// Images per optimizer step.
    #[arg(long, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    batch_size: Option<u64>,
    /// Base (or peak) learning rate of the recipe's schedule.
    #[arg(long)]
    lr: Option<f64>,
    /// Stop after this many optimizer steps, with a checkpoint.
    #[arg(long, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    max_steps: Option<u64>,
    /// Hold out the last N training images as a validation set.
    #[arg(long)]
    val_split: Option<usize>,
    /// Reshuffle the training images every epoch (the seed's loader does not).
    #[arg(long)]
    shuffle: bool,
    /// Seed of the initial weights, the augmentation and the shuffling.
    #[arg(long)]
    seed: Option<u64>,
    /// Label smoothing of the training loss, 0 to 1.
    #[arg(long)]
    label_smoothing: Option<f32>,
    /// L2 weight decay of the recipe's optimizer.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Test-time augmentation of the evaluations: off, flip, flip-shift or flip-shift1.
    #[arg(long)]
    tta: Option<Tta>,
    /// Weight decay on 1-D parameters (BatchNorm scales and shifts, biases) too: true is
    /// PyTorch's single parameter group, false exempts them.
    #[arg(long, value_name = "BOOL")]
    decay_1d: Option<bool>,
    /// Start every residual block as the identity: the last BatchNorm scale of each block at 0
    /// (torchvision's zero_init_residual).
    #[arg(long, value_name = "BOOL")]
    zero_init_residual: Option<bool>,
    /// Zero padding of the training crops: random 32x32 crops of the padded image (0: none).
    #[arg(long, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::CROP_PAD)))]
    crop_pad: Option<u8>,
    /// Mirror each training image in every other epoch instead of by a coin each time.
    #[arg(long, value_name = "BOOL")]
    alternate_flip: Option<bool>,
    /// Cutout: zero a SIDE x SIDE square at a random centre of each training image, after the
    /// crop and flip (clipped at the edges; 0: none).
    #[arg(long, value_name = "SIDE", value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::CUTOUT)))]
    cutout: Option<u8>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    compute: ComputeArgs,
}

fn recipes_help() -> String {
    let mut s = String::from("Recipes:\n");
    for r in Recipe::ALL {
        s += &format!("  {:<8} {}\n", r.name(), r.describe());
    }
    s
}

#[derive(Args)]
struct EvalArgs {
    /// A state_dict in safetensors: one of ours, or one saved from the seed's PyTorch model.
    #[arg(long)]
    checkpoint: PathBuf,
    /// CIFAR-10 folder (binary version).
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Which images: test (test_batch.bin), val (the last --val-split training images), train.
    #[arg(long, default_value = "test", value_parser = ["test", "val", "train"])]
    split: String,
    /// Size of the validation split (default: the one the checkpoint's run used).
    #[arg(long)]
    val_split: Option<usize>,
    /// Images per forward pass: accuracy and per-image loss do not depend on it (the seed's
    /// sum of batch means does).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    batch_size: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// The stem, for a state_dict that does not record it.
    #[arg(long)]
    stem: Option<Stem>,
    /// Test-time augmentation: off, flip (mean logits of each image and its mirror),
    /// flip-shift (also shifted by 2 pixels in 4 directions: 10 views) or flip-shift1 (shifts
    /// of 1 pixel, for networks trained on crops padded by 1).
    #[arg(long, default_value = "off")]
    tta: Tta,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// The network and input size that `summary` and `bench` describe.
#[derive(Args)]
struct NetArgs {
    /// Architecture: resnet18, lenet or vgg16.
    #[arg(long, default_value = "resnet18")]
    model: Arch,
    /// Network stem (resnet18): seed, torchvision, seed3x3 or cifar.
    #[arg(long, default_value = "seed")]
    stem: Stem,
    /// Residual stages: 4 (the seed) or 3 (drop conv5).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(limits::flag_range(limits::STAGES)))]
    stages: u8,
    /// Images in the (random, CIFAR-shaped) input batch.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    batch_size: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

impl NetArgs {
    fn config(&self) -> ResNetConfig {
        ResNetConfig {
            stem: self.stem,
            stages: self.stages as usize,
            num_classes: 10,
        }
    }
}

#[derive(Args)]
struct SummaryArgs {
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Timed steps, for training and for inference each.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    steps: u64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// The `--device` flag.
#[derive(Clone, Copy, Debug)]
enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
        }
    }
}

/// Where a command computes: the device and its precision.
#[derive(Clone, Copy)]
struct Target {
    device: Device,
    precision: Precision,
}

/// Runs `$body` with `$be` bound to the backend `$target` names.
macro_rules! with_backend {
    ($target:expr, |$be:ident| $body:expr) => {
        match $target.device {
            Device::Cpu => {
                let $be = &Cpu;
                $body
            }
            Device::Cuda(ordinal) => {
                let cuda = Cuda::new(ordinal, $target.precision)
                    .map_err(|e| CliError::input(format!("--device cuda:{ordinal}: {e}")))?;
                let $be = &cuda;
                $body
            }
        }
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = (|| {
        let compute = match &cli.command {
            Command::Train(a) => Some(&a.compute),
            Command::Eval(a) => Some(&a.compute),
            Command::Bench(a) => Some(&a.compute),
            Command::Predict(a) => Some(&a.compute),
            Command::Summary(_) | Command::Plot(_) | Command::Data(_) => None,
        };
        let threads = match compute.and_then(|c| c.threads) {
            Some(0) => return Err(CliError::input("--threads must be at least 1")),
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
            Command::Train(a) => run_train(a),
            Command::Eval(a) => run_eval(a),
            Command::Bench(a) => run_bench(a),
            Command::Summary(a) => run_summary(a),
            Command::Plot(a) => run_plot(a),
            Command::Predict(a) => run_predict(a),
            Command::Data(DataCommand::Fetch { dir }) => {
                fetch_data(&dir).map(|p| println!("CIFAR-10 is in {}", p.display()))
            }
        })
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

fn download_bar() -> impl FnMut(u64, Option<u64>) {
    let bar = indicatif::ProgressBar::new(fetch::ARCHIVE_BYTES);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "downloading CIFAR-10 [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    move |done, total| {
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
        if total.is_some_and(|t| done >= t) {
            bar.finish_and_clear();
        }
    }
}

fn fetch_data(dir: &Path) -> Result<PathBuf, CliError> {
    fetch::ensure(dir, download_bar()).map_err(CliError::input)
}

fn load_data(dir: &Path) -> Result<Cifar10, CliError> {
    Cifar10::load(dir).map_err(|e| {
        CliError::input(format!(
            "{e}\n(get the data with: resnet-cifar data fetch --dir {})",
            dir.display()
        ))
    })
}

/// Raised by SIGINT/SIGTERM: the run finishes its step, saves, and exits.
static STOP: AtomicBool = AtomicBool::new(false);

/// Fills every setting not given on the command line from the `--config` file.
fn merge_config_file(mut a: TrainArgs) -> Result<TrainArgs, CliError> {
    let Some(path) = a.config.clone() else { return Ok(a) };
    let f = ConfigFile::read(&path)?;
    a.recipe = a.recipe.or(f.recipe);
    a.model.model = a.model.model.or(f.model);
    a.model.stem = a.model.stem.or(f.stem);
    a.data = a.data.or(f.data);
    a.out = a.out.or(f.out);
    a.epochs = a.epochs.or(f.epochs.map(|e| e as u64));
    a.batch_size = a.batch_size.or(f.batch_size);
    a.lr = a.lr.or(f.lr);
    a.max_steps = a.max_steps.or(f.max_steps);
    a.val_split = a.val_split.or(f.val_split);
    a.shuffle |= f.shuffle.unwrap_or(false);
    a.seed = a.seed.or(f.seed);
    a.model.stages = a.model.stages.or(f.stages);
    a.label_smoothing = a.label_smoothing.or(f.label_smoothing);
    a.weight_decay = a.weight_decay.or(f.weight_decay);
    a.tta = a.tta.or(f.tta);
    a.decay_1d = a.decay_1d.or(f.decay_1d);
    a.zero_init_residual = a.zero_init_residual.or(f.zero_init_residual);
    a.crop_pad = a.crop_pad.or(f.crop_pad);
    a.alternate_flip = a.alternate_flip.or(f.alternate_flip);
    a.cutout = a.cutout.or(f.cutout);
    Ok(a)
}

fn run_train(a: TrainArgs) -> Result<(), CliError> {
    let target = a.compute.target();
    let a = merge_config_file(a)?;
    let (cfg, resume, out) = match &a.resume {
        Some(dir) => resumed_config(&a, dir)?,
        None => {
            let cfg = fresh_config(&a)?;
            let out = a.out.clone().unwrap_or_else(|| default_run_dir(&cfg.recipe));
            (cfg, None, out)
        }
    };
    let data_dir = match a.data.clone().or_else(|| cfg.data.clone().map(PathBuf::from)) {
        Some(d) => d,
        None => fetch_data(Path::new("data"))?,
    };
    let mut cfg = cfg;
    cfg.data = Some(data_dir.display().to_string());
    let data = load_data(&data_dir)?;
    let splits = Splits::new(data, cfg.val_split).map_err(CliError::input)?;
    let mut console = Console::stdout();
    let outcome = with_backend!(target, |be| {
        console.line(&format!(
            "run {}: recipe {}, {}, {} epochs, batch {}, on {}",
            out.display(),
            cfg.recipe,
            match cfg.arch {
                Arch::Resnet18 => format!("resnet18 (stem {}, {} stages)", cfg.model.stem.name(), cfg.model.stages),
                other => other.name().to_string(),
            },
            cfg.epochs,
            cfg.batch_size,
            be.name()
        ));
        ctrlc::set_handler(|| STOP.store(true, Ordering::Relaxed)).map_err(CliError::run)?;
        train(be, &cfg, &splits, &out, &mut console, resume, &STOP).map_err(|e| CliError::run(format!("{e:#}")))?
    });
    let resume_hint = format!("resume with: resnet-cifar train --resume {}", out.display());
    match outcome.stopped {
        Some(Stop::Interrupted) => {
            return Err(CliError {
                code: 130,
                message: format!(
                    "interrupted after step {}; checkpoint saved; {resume_hint}",
                    outcome.steps
                ),
            });
        }
        Some(Stop::MaxSteps) => console.line(&format!(
            "stopped after {} steps (--max-steps); {resume_hint}",
            outcome.steps
        )),
        None => {}
    }
    console.line(&format!(
        "done: {} steps in {:.0} s of training ({:.1} img/s){}; results in {}",
        outcome.steps,
        outcome.train_seconds,
        outcome.images_per_sec(),
        outcome
            .best
            .map(|(e, acc)| format!(", best accuracy {acc:.4} after epoch {e}"))
            .unwrap_or_default(),
        out.display()
    ));
    Ok(())
}

fn default_run_dir(recipe: &str) -> PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{recipe}-{t}"))
}

/// The recipe with the flags' overrides.
fn fresh_config(a: &TrainArgs) -> Result<TrainConfig, CliError> {
    let mut cfg = a.recipe.unwrap_or(Recipe::Seed).config();
    if let Some(e) = a.epochs {
        cfg.epochs = e as usize;
    }
    if let Some(b) = a.batch_size {
        cfg.batch_size = b as usize;
    }
    if let Some(lr) = a.lr {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(CliError::input(format!("--lr must be a positive number, got {lr}")));
        }
        cfg.schedule = cfg.schedule.with_lr(lr);
    }
    cfg.max_steps = a.max_steps.or(cfg.max_steps);
    cfg.val_split = a.val_split.unwrap_or(cfg.val_split);
    cfg.shuffle |= a.shuffle;
    cfg.seed = a.seed.unwrap_or(cfg.seed);
    if let Some(s) = a.label_smoothing {
        if !(0.0..1.0).contains(&s) {
            return Err(CliError::input(format!("--label-smoothing must be in [0, 1), got {s}")));
        }
        cfg.label_smoothing = s;
    }
    if let Some(t) = a.tta {
        cfg.tta = t;
    }
    if let Some(wd) = a.weight_decay {
        if !(wd.is_finite() && wd >= 0.0) {
            return Err(CliError::input(format!("--weight-decay must be 0 or more, got {wd}")));
        }
        cfg.optimizer = cfg.optimizer.with_weight_decay(wd);
    }
    if let Some(d) = a.decay_1d {
        cfg.optimizer = cfg.optimizer.with_decay_1d(d);
    }
    cfg.zero_init_residual = a.zero_init_residual.unwrap_or(cfg.zero_init_residual);
    cfg.augment.crop_pad = a.crop_pad.map_or(cfg.augment.crop_pad, usize::from);
    cfg.augment.alternate_flip = a.alternate_flip.unwrap_or(cfg.augment.alternate_flip);
    cfg.augment.cutout = a.cutout.map_or(cfg.augment.cutout, usize::from);
    cfg.arch = a.model.model.unwrap_or(cfg.arch);
    cfg.model.stem = a.model.stem.unwrap_or(cfg.model.stem);
    cfg.model.stages = a.model.stages.map_or(cfg.model.stages, |s| s as usize);
    Ok(cfg)
}

/// The configuration a run was started with; only `--epochs`, `--max-steps` and `--data` may
/// change on resuming (anything else would make it a different run).
fn resumed_config(a: &TrainArgs, dir: &Path) -> Result<(TrainConfig, Option<Resume>, PathBuf), CliError> {
    let fixed = [
        ("--out", a.out.is_some()),
        ("--batch-size", a.batch_size.is_some()),
        ("--lr", a.lr.is_some()),
        ("--val-split", a.val_split.is_some()),
        ("--shuffle", a.shuffle),
        ("--seed", a.seed.is_some()),
        ("--recipe", a.recipe.is_some()),
        ("--label-smoothing", a.label_smoothing.is_some()),
        ("--weight-decay", a.weight_decay.is_some()),
        ("--tta", a.tta.is_some()),
        ("--decay-1d", a.decay_1d.is_some()),
        ("--zero-init-residual", a.zero_init_residual.is_some()),
        ("--crop-pad", a.crop_pad.is_some()),
        ("--alternate-flip", a.alternate_flip.is_some()),
        ("--cutout", a.cutout.is_some()),
        ("--model", a.model.model.is_some()),
        ("--stem", a.model.stem.is_some()),
        ("--stages", a.model.stages.is_some()),
    ];
    if let Some((flag, _)) = fixed.iter().find(|(_, set)| *set) {
        return Err(CliError::input(format!(
            "{flag} cannot change when resuming (only --epochs, --max-steps and --data can)"
        )));
    }
    let r = load_resume(dir).map_err(|e| CliError::input(format!("{e:#}")))?;
    let mut cfg = r.config.clone();
    if let Some(e) = a.epochs {
        cfg.epochs = e as usize;
    }
    if let Some(m) = a.max_steps {
        cfg.max_steps = Some(m);
    }
    Ok((cfg, Some(r), dir.to_path_buf()))
}

fn run_eval(a: EvalArgs) -> Result<(), CliError> {
    let target = a.compute.target();
    let file = CheckpointFile::read(&a.checkpoint, a.stem)?;
    let data = load_data(&a.data)?;
    let val_split = a
        .val_split
        .or_else(|| file.meta.get("val_split").and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let splits = Splits::new(data, if a.split == "val" { val_split } else { 0 }).map_err(CliError::input)?;
    let images =
        match a.split.as_str() {
            "test" => splits.test.as_ref().ok_or_else(|| {
                CliError::input(format!("{}: no test_batch.bin here; try --split val", a.data.display()))
            })?,
            "val" => splits.val.as_ref().ok_or_else(|| {
                CliError::input("--split val needs --val-split N (the checkpoint does not record one)")
            })?,
            _ => &splits.train,
        };
    let r = with_backend!(target, |be| {
        let mut model = file.network(be)?;
        evaluate(be, model.as_mut(), images, a.batch_size as usize, a.tta)
    });
    if a.json {
        let mut v = serde_json::to_value(&r).map_err(CliError::run)?;
        v["split"] = a.split.clone().into();
        v["checkpoint"] = file.origin.clone().into();
        v["classes"] = splits.classes.clone().into();
        println!("{v}");
        return Ok(());
    }
    println!("{} on the {} split ({} images)", file.origin, a.split, r.images);
    println!(
        "accuracy {:.4} ({}/{}), loss {:.4} per image ({:.4} summed over batch means)",
        r.accuracy, r.correct, r.images, r.loss, r.loss_sum_of_batch_means
    );
    println!("\nper class:");
    for (name, acc) in splits.classes.iter().zip(&r.per_class) {
        println!("  {name:<11} {acc:.4}");
    }
    println!("\nconfusion matrix (rows: true class, columns: predicted):");
    print!("{:<11}", "");
    for name in &splits.classes {
        print!("{:>6}", &name[..name.len().min(5)]);
    }
    println!();
    for (name, row) in splits.classes.iter().zip(&r.confusion) {
        print!("{name:<11}");
        for v in row {
            print!("{v:>6}");
        }
        println!();
    }
    Ok(())
}

fn run_predict(a: PredictArgs) -> Result<(), CliError> {
    let target = a.compute.target();
    let file = CheckpointFile::read(&a.checkpoint, a.stem)?;
    let images = a
        .images
        .iter()
        .map(|p| predict::load_image(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::input)?;
    let classes: Vec<String> = CLASS_NAMES.iter().map(|s| s.to_string()).collect();
    let guesses = with_backend!(target, |be| {
        let mut model = file.network(be)?;
        predict::predict(be, model.as_mut(), &images, &classes, a.top_k as usize)
    });
    if a.json {
        let v: Vec<_> = a
            .images
            .iter()
            .zip(&guesses)
            .map(|(p, g)| serde_json::json!({"image": p.display().to_string(), "top": g}))
            .collect();
        println!("{}", serde_json::Value::from(v));
        return Ok(());
    }
    for (p, g) in a.images.iter().zip(&guesses) {
        let list: Vec<String> = g.iter().map(|g| format!("{} {:.3}", g.class, g.probability)).collect();
        println!("{}: {}", p.display(), list.join(", "));
    }
    Ok(())
}

fn run_plot(a: PlotArgs) -> Result<(), CliError> {
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

fn run_summary(a: SummaryArgs) -> Result<(), CliError> {
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

fn run_bench(a: BenchArgs) -> Result<(), CliError> {
    let target = a.compute.target();
    let cfg = BenchConfig {
        arch: a.net.model,
        model: a.net.config(),
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
        "resnet-cifar {} model={} stem={} stages={} batch={} threads={} backend={}",
        env!("CARGO_PKG_VERSION"),
        r.model,
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
    Ok(())
}
