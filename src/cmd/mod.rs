//! The subcommands, one file each (its flags and its `run`), and what they share: where a
//! command computes (`--threads`, `--device`, `--precision`) and how the data is found.

use clap::Args;
use resnet_cifar::cli::CliError;
use resnet_cifar::data::{DataOptions, Dataset, fetch};
use resnet_cifar::engine::cuda::Precision;
use resnet_cifar::engine::{Backend, Collective, Local};
use std::path::{Path, PathBuf};

/// Runs `$body` with `$be` bound to the backend `$target` names.
/// (A macro because the backend is a type: each arm compiles `$body` for its own.)
macro_rules! with_backend {
    ($target:expr, |$be:ident| $body:expr) => {
        match $target.device {
            $crate::cmd::Device::Cpu => {
                let $be = &resnet_cifar::engine::cpu::Cpu;
                $body
            }
            $crate::cmd::Device::Cuda(ordinal) => {
                let cuda = resnet_cifar::engine::cuda::Cuda::new(ordinal, $target.precision)
                    .map_err(|e| resnet_cifar::cli::CliError::input(format!("--device cuda:{ordinal}: {e}")))?;
                let $be = &cuda;
                $body
            }
        }
    };
}

pub mod bench;
pub mod data;
pub mod eval;
pub mod plot;
pub mod predict;
pub mod summary;
pub mod train;

/// Where and how a command computes: the flags of `train`, `eval`, `bench` and `predict`.
#[derive(Args)]
pub struct ComputeArgs {
    /// Worker threads (default: every core). Results are bit-identical for the same seed and
    /// thread count.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where to compute: cpu, cuda (GPU 0) or cuda:N. CUDA needs the NVIDIA driver and the CUDA
    /// libraries (NVRTC, cuBLAS, cuDNN 9), found on LD_LIBRARY_PATH, in RESNET_CIFAR_CUDA_LIBS,
    /// CUDA_HOME, /usr/local/cuda, or a PyTorch install's nvidia/*/lib folders.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// GPU arithmetic for convolutions: fp32, or tf32 (tensor cores, PyTorch's default for
    /// cuDNN convolutions).
    #[arg(long, default_value = "tf32")]
    precision: Precision,
}

impl ComputeArgs {
    fn target(&self) -> Target {
        Target {
            device: self.device,
            precision: self.precision,
        }
    }
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

/// A progress bar for a dataset's download.
fn download_bar(archive: &fetch::Archive) -> impl FnMut(u64, Option<u64>) {
    let bar = indicatif::ProgressBar::new(archive.bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "downloading {} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}",
            archive.dataset
        ))
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

/// The dataset of `archive` in `dir`, downloaded first (from `url`, a mirror or its publisher)
/// when it is not there.
fn fetch_data(dir: &Path, archive: &fetch::Archive, url: Option<&str>) -> Result<PathBuf, CliError> {
    fetch::ensure(dir, archive, url, download_bar(archive)).map_err(CliError::input)
}

/// The dataset in `dir`, whatever its format, with a bar while an image folder is decoded.
fn open_data(dir: &Path, opts: &DataOptions) -> Result<Dataset, CliError> {
    let bar = indicatif::ProgressBar::hidden();
    let shown = std::sync::Once::new();
    let progress = |done: u64, total: u64| {
        shown.call_once(|| {
            bar.set_length(total);
            bar.set_style(resnet_cifar::train::console::images_style(
                "decoding images [{bar:30}] {pos}/{len}  {img_per_sec}  eta {eta}",
            ));
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        });
        bar.set_position(done.max(bar.position()));
    };
    let data = resnet_cifar::data::open(dir, opts, &progress);
    bar.finish_and_clear();
    data.map_err(CliError::input)
}

/// The processes a command runs on: this one alone, or, when `mpirun` or `srun` started it
/// (and the binary has MPI), every rank of the launch.
pub struct World {
    #[cfg(feature = "mpi")]
    mpi: Option<resnet_cifar::engine::mpi::Mpi>,
}

/// Variables through which MPI launchers (Open MPI's mpirun, MPICH's and Slurm's PMI, PMIx)
/// tell a process it is one rank of several.
const LAUNCHER_SIZE_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

impl World {
    pub fn from_launcher() -> Result<Self, CliError> {
        let launched = LAUNCHER_SIZE_VARS
            .iter()
            .find_map(|v| std::env::var(v).ok().map(|n| (*v, n)));
        #[cfg(feature = "mpi")]
        {
            let mpi = match launched {
                Some(_) => Some(
                    resnet_cifar::engine::mpi::Mpi::init()
                        .ok_or_else(|| CliError::run("MPI was already initialised"))?,
                ),
                None => None,
            };
            Ok(Self { mpi })
        }
        #[cfg(not(feature = "mpi"))]
        match launched {
            Some((var, n)) if n.trim() != "1" => Err(CliError::input(format!(
                "started as one of {n} processes ({var}), but this binary was built without MPI: \
                 build it with `cargo build --release --features mpi`"
            ))),
            _ => Ok(Self {}),
        }
    }

    pub fn collective<B: Backend>(&self) -> &dyn Collective<B> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m;
        }
        &Local
    }

    pub fn rank(&self) -> usize {
        Collective::<resnet_cifar::engine::cpu::Cpu>::rank(self.collective())
    }

    pub fn size(&self) -> usize {
        Collective::<resnet_cifar::engine::cpu::Cpu>::size(self.collective())
    }
}
