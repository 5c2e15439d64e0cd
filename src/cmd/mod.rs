//! The subcommands, one file each (its flags and its `run`), and what they share: where a
//! command computes (`--threads`, `--device`, `--precision`) and how the data is found.

use clap::Args;
use resnet_cifar::cli::CliError;
use resnet_cifar::data::{DataOptions, Dataset, fetch};
use resnet_cifar::engine::cpu::{CpuConfig, CpuKernel, CpuPrecision};
use resnet_cifar::engine::cuda::Precision;
use resnet_cifar::engine::{Backend, Collective, Local};
use resnet_cifar::model::CheckpointFile;
use std::path::{Path, PathBuf};

/// Runs `$body` with `$be` bound to the backend `$target` names.
/// (A macro because the backend is a type: each arm compiles `$body` for its own.)
macro_rules! with_backend {
    ($target:expr, |$be:ident| $body:expr) => {
        match $target.device {
            $crate::cmd::Device::Cpu(config) => {
                // Checked when the target was made (`ComputeArgs::target`).
                let cpu = resnet_cifar::engine::cpu::Cpu::new(config).map_err(resnet_cifar::cli::CliError::input)?;
                let $be = &cpu;
                $body
            }
            $crate::cmd::Device::Cuda(ordinal, precision) => {
                let cuda = resnet_cifar::engine::cuda::Cuda::new(ordinal, precision)
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
pub mod export;
pub mod plot;
pub mod predict;
pub mod summary;
pub mod train;

/// Prints `error: <message>` on stderr in one write. `eprintln!` writes the prefix, the
/// message and the newline as three writes, and under mpirun the ranks' streams and the
/// launcher's own notices (MPI_Abort's banner) are merged chunk by chunk: a notice then landed
/// inside a rank's error line (seen in CI as `error: ------...`).
pub fn print_error(message: &str) {
    use std::io::Write;
    let line = format!("error: {message}\n");
    // Nothing is left to tell the user if stderr itself fails.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Where and how a command computes: the flags of `train`, `eval`, `bench` and `predict`.
#[derive(Args)]
pub struct ComputeArgs {
    /// Worker threads (default: every core). Results are bit-identical for the same seed and
    /// thread count.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where to compute: cpu, cuda (GPU 0; under several ranks, one GPU each by the rank's
    /// index on its machine) or cuda:N. CUDA needs the NVIDIA driver and the CUDA
    /// libraries (NVRTC, cuBLAS, cuDNN 9), found on LD_LIBRARY_PATH, in RESNET_CIFAR_CUDA_LIBS,
    /// CUDA_HOME, /usr/local/cuda, or a PyTorch install's nvidia/*/lib folders; several ranks
    /// on GPUs also need NCCL (libnccl.so.2).
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    /// Arithmetic of the convolutions and the linear layer: fp32; bf16 (CPU: operands rounded
    /// to bf16, sums in f32, as PyTorch's CPU autocast; needs AVX512_BF16, and uses AMX tiles
    /// where the CPU has them); or tf32 (CUDA:
    /// tensor cores for convolutions, PyTorch's default for cuDNN). Default: fp32 on the CPU,
    /// tf32 on CUDA.
    #[arg(long)]
    precision: Option<PrecisionArg>,
    /// The CPU's bf16 products: auto (AMX tiles where the CPU has them, else AVX512_BF16),
    /// amx or avx512 (to compare the two, or to keep to one on every machine).
    #[arg(long, default_value = "auto")]
    cpu_kernel: CpuKernel,
}

/// Whether this CPU can compute `--precision bf16`. `RESNET_CIFAR_NO_BF16=1` makes it answer
/// as a CPU without the instructions would (the tests of that refusal).
pub fn cpu_bf16_support() -> Result<(), String> {
    if std::env::var_os("RESNET_CIFAR_NO_BF16").is_some_and(|v| v != "0") {
        return Err("this CPU lacks AVX512_BF16 (bf16 dot products): RESNET_CIFAR_NO_BF16 is set".into());
    }
    resnet_cifar::engine::cpu::bf16_support()
}

/// The `--precision` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrecisionArg {
    Fp32,
    Tf32,
    Bf16,
}

impl std::str::FromStr for PrecisionArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Self::Fp32),
            "tf32" => Ok(Self::Tf32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown precision '{s}' (expected fp32, bf16 or tf32)")),
        }
    }
}

impl ComputeArgs {
    /// Where a one-process command computes (`cuda` is GPU 0).
    fn target(&self) -> Result<Target, CliError> {
        self.target_of_rank(0, None)
    }

    /// Where a command that runs the model of `file` computes: the precision its run
    /// recorded, where `--precision` does not say and the device can compute it (a bf16 run
    /// on a CPU without bf16 is evaluated in fp32, with a note), and its Winograd choice
    /// unless `winograd` says.
    fn target_for(&self, file: &CheckpointFile, winograd: Option<bool>) -> Result<Target, CliError> {
        let recorded = file.meta.get("precision").and_then(|p| p.parse::<PrecisionArg>().ok());
        let default = match (self.device, recorded) {
            (DeviceArg::Cpu, Some(PrecisionArg::Bf16)) => match cpu_bf16_support() {
                Ok(()) => Some(PrecisionArg::Bf16),
                Err(e) => {
                    print_note(&format!("{} was trained in bf16; computing in fp32 ({e})", file.origin));
                    None
                }
            },
            (DeviceArg::Cuda(_), Some(PrecisionArg::Fp32)) => Some(PrecisionArg::Fp32),
            _ => None,
        };
        let recorded_winograd = file.meta.get("winograd").and_then(|w| w.parse().ok());
        let target = self.target_of_rank(0, default)?;
        Ok(target.winograd(winograd.or(recorded_winograd).unwrap_or(true)))
    }

    /// Where this rank of `world` computes: under several ranks, `cuda` is the GPU of the
    /// rank's index on its machine (one GPU a rank, as NCCL requires), and NCCL must be
    /// there on every rank (checked before any GPU is opened).
    fn target_on(&self, world: &World) -> Result<Target, CliError> {
        let target = self.target_of_rank(world.local_rank(), None)?;
        if world.size() > 1 && matches!(target.device, Device::Cuda(..)) {
            let host = world.collective::<resnet_cifar::engine::cpu::Cpu>();
            resnet_cifar::engine::cuda::nccl::load_on_all_ranks(&|v| host.all_reduce_host(v), world.size())
                .map_err(|e| CliError::input(format!("--device {}: {e}", self.device)))?;
        }
        Ok(target)
    }

    /// The target of the flags on the rank `local_rank` of its machine, with `default` where
    /// `--precision` is not given.
    fn target_of_rank(&self, local_rank: usize, default: Option<PrecisionArg>) -> Result<Target, CliError> {
        let ordinal = match self.device {
            DeviceArg::Cpu => None,
            DeviceArg::Cuda(n) => Some(n.unwrap_or(local_rank)),
        };
        if self.cpu_kernel != CpuKernel::Auto && (ordinal.is_some() || self.precision != Some(PrecisionArg::Bf16)) {
            return Err(CliError::input(format!(
                "--cpu-kernel {} picks the kernel of the CPU's bf16 products; it needs --device cpu --precision bf16",
                self.cpu_kernel.name()
            )));
        }
        let cpu = |precision| CpuConfig {
            precision,
            kernel: self.cpu_kernel,
            ..CpuConfig::default()
        };
        let device = match (ordinal, self.precision.or(default)) {
            (None, None | Some(PrecisionArg::Fp32)) => Device::Cpu(cpu(CpuPrecision::Fp32)),
            (None, Some(PrecisionArg::Bf16)) => {
                cpu_bf16_support().map_err(|e| CliError::input(format!("--precision bf16: {e}")))?;
                let config = cpu(CpuPrecision::Bf16);
                resnet_cifar::engine::cpu::Cpu::new(config)
                    .map_err(|e| CliError::input(format!("--cpu-kernel {}: {e}", self.cpu_kernel.name())))?;
                Device::Cpu(config)
            }
            (None, Some(PrecisionArg::Tf32)) => {
                return Err(CliError::input(
                    "--precision tf32 is for CUDA; the CPU computes fp32 or bf16",
                ));
            }
            (Some(n), None | Some(PrecisionArg::Tf32)) => Device::Cuda(n, Precision::Tf32),
            (Some(n), Some(PrecisionArg::Fp32)) => Device::Cuda(n, Precision::Fp32),
            (Some(_), Some(PrecisionArg::Bf16)) => {
                return Err(CliError::input(
                    "--precision bf16 is built for the CPU only; on CUDA use fp32 or tf32",
                ));
            }
        };
        Ok(Target { device })
    }
}

/// Prints `note: <message>` on stderr, in one write (as [`print_error`]).
pub fn print_note(message: &str) {
    use std::io::Write;
    let line = format!("note: {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `--winograd` for the commands that run a model (`train` has it among its settings).
#[derive(Args)]
pub struct WinogradArg {
    /// Compute 3x3 convolutions on the CPU by Winograd's algorithm: faster, with larger
    /// rounding errors (docs/seed-vs-pytorch.md). Default: as the checkpoint's run did
    /// (true when it does not say)
    #[arg(long, value_name = "BOOL")]
    pub winograd: Option<bool>,
}

/// The `--device` flag: `cuda` without an ordinal leaves the GPU to the rank.
#[derive(Clone, Copy, Debug)]
enum DeviceArg {
    Cpu,
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceArg::Cuda(Some(n)))
                .ok_or_else(|| format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(None) => write!(f, "cuda"),
            DeviceArg::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device a command computes on, with its arithmetic.
#[derive(Clone, Copy, Debug)]
enum Device {
    Cpu(CpuConfig),
    Cuda(usize, Precision),
}

/// Where a command computes.
#[derive(Clone, Copy)]
struct Target {
    device: Device,
}

impl Target {
    /// The same target, its CPU convolutions allowed Winograd's path or not (CUDA has none).
    fn winograd(self, on: bool) -> Self {
        match self.device {
            Device::Cpu(config) => Target {
                device: Device::Cpu(CpuConfig { winograd: on, ..config }),
            },
            Device::Cuda(..) => self,
        }
    }
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
            let world = Self { mpi };
            if let Some(m) = &world.mpi
                && world.size() > 1
            {
                m.abort_on_panic();
            }
            Ok(world)
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

    /// The launch's own collective (MPI or one process), for host values and CPU buffers.
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

    /// Ends this rank's command. Under several ranks an error that only this rank may have
    /// met (its data, its GPU, a bug) is printed and then ends every rank (MPI_Abort with the
    /// error's exit code): the others would otherwise wait for it in their next collective, and
    /// it for them in MPI_Finalize. A stop the ranks agreed on (Ctrl-C, exit 130) ends
    /// normally, every rank having saved what it saves.
    pub fn end(&self, result: Result<(), CliError>) -> Result<(), CliError> {
        #[cfg(feature = "mpi")]
        if let (Some(m), Err(e)) = (&self.mpi, &result)
            && self.size() > 1
            && e.code != 130
        {
            print_error(&e.message);
            m.abort(i32::from(e.code));
        }
        result
    }

    /// This rank's index among the ranks on its machine, as the launcher tells it (0 when it
    /// does not).
    pub fn local_rank(&self) -> usize {
        LAUNCHER_LOCAL_RANK_VARS
            .iter()
            .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The collective `be` trains under: NCCL between GPUs under several ranks, else the
    /// launch's own.
    pub fn collective_for<'a, B: Exchange>(&'a self, be: &'a B) -> Result<Box<dyn Collective<B> + 'a>, CliError> {
        B::collective(be, self)
    }
}

/// Variables through which launchers tell a rank its index on its machine (Open MPI, Slurm,
/// MPICH's Hydra).
const LAUNCHER_LOCAL_RANK_VARS: [&str; 3] = ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"];

/// How ranks computing on one kind of backend exchange buffers.
pub trait Exchange: Backend + Sized {
    fn collective<'a>(be: &'a Self, world: &'a World) -> Result<Box<dyn Collective<Self> + 'a>, CliError>;
}

impl Exchange for resnet_cifar::engine::cpu::Cpu {
    fn collective<'a>(_be: &'a Self, world: &'a World) -> Result<Box<dyn Collective<Self> + 'a>, CliError> {
        Ok(Box::new(world.collective::<Self>()))
    }
}

impl Exchange for resnet_cifar::engine::cuda::Cuda {
    fn collective<'a>(be: &'a Self, world: &'a World) -> Result<Box<dyn Collective<Self> + 'a>, CliError> {
        if world.size() == 1 {
            return Ok(Box::new(world.collective::<Self>()));
        }
        let nccl = resnet_cifar::engine::cuda::nccl::Nccl::new(be, world.collective()).map_err(CliError::input)?;
        Ok(Box::new(nccl))
    }
}
