//! A run's settings resolved into what it does, in one place: the recipe with the flags and
//! the TOML file's keys on top, how it starts (fresh, `--init`, `--resume`), its folder, and
//! where its data is; then, once the data is read, the parts that follow from it (classes,
//! image size, normalisation), checked against a resumed run's. Errors are bad input: each
//! names the flag, file or folder at fault.

use super::config::TrainConfig;
use super::folder::{self, FolderUse, load_resume};
use super::settings::{CHANGEABLE_ON_RESUME, Settings, flag};
use super::state::{InitWeights, RunPlan, Start};
use crate::data::{DataOptions, Splits, ValSplit};
use crate::model::{Arch, CheckpointFile};
use std::path::{Path, PathBuf};

/// A run resolved from its settings, before its data is read.
pub struct Resolved {
    pub plan: RunPlan,
    /// The data folder the settings (or the resumed run) name; none: CIFAR-10, fetched into
    /// `./data`.
    pub data: Option<PathBuf>,
}

impl Resolved {
    /// The run `settings` describe, or the continuation of the run in `resume`.
    pub fn new(settings: &Settings, resume: Option<&Path>) -> Result<Self, String> {
        let plan = match resume {
            Some(dir) => resumed(settings, dir)?,
            None => {
                let (cfg, start) = fresh(settings)?;
                let out = settings.out.clone().unwrap_or_else(|| default_run_dir(&cfg.recipe));
                let overwrite = settings.overwrite.unwrap_or(false);
                folder::check(&out, FolderUse::of(&start, overwrite))?;
                RunPlan {
                    cfg,
                    start,
                    out,
                    overwrite,
                }
            }
        };
        let data = settings
            .data
            .clone()
            .or_else(|| plan.cfg.data.clone().map(PathBuf::from));
        Ok(Self { plan, data })
    }

    /// Refuses to resume on another number of ranks than the run trained on.
    pub fn check_ranks(&self, ranks: usize) -> Result<(), String> {
        match &self.plan.start {
            Start::Resume(r) => r.check_ranks(ranks, &self.plan.out),
            _ => Ok(()),
        }
    }

    /// How the validation images are chosen: as the resumed run chose them, or (None) as the
    /// data's format says.
    pub fn val_split_method(&self) -> Option<ValSplit> {
        matches!(self.plan.start, Start::Resume(_)).then_some(self.plan.cfg.val_split_method)
    }

    /// How the data is to be read.
    pub fn data_options(&self) -> DataOptions {
        let cfg = &self.plan.cfg;
        DataOptions {
            labels: cfg.labels,
            image_size: cfg.image_size,
            skip_bad_images: cfg.skip_bad_images,
        }
    }

    /// The plan, fitted to the data read from `dir` into `splits`: a resumed run keeps the
    /// classes, size and normalisation it was started with (other data is refused), a new
    /// one takes them from the data (`--mean` and `--std` over the data's own statistics).
    pub fn fit(self, settings: &Settings, dir: &Path, splits: &mut Splits) -> Result<RunPlan, String> {
        let mut plan = self.plan;
        let cfg = &mut plan.cfg;
        cfg.data = Some(dir.display().to_string());
        if matches!(plan.start, Start::Resume(_)) {
            let (was, now) = (&cfg.dataset, &splits.spec);
            if was.classes != now.classes || was.image_size != now.image_size {
                return Err(format!(
                    "{}: the run was trained on {} classes of {}x{2} images ({}), this data has {} classes of {}x{5} ({})",
                    dir.display(),
                    was.classes.len(),
                    was.image_size,
                    preview(&was.classes),
                    now.classes.len(),
                    now.image_size,
                    preview(&now.classes)
                ));
            }
            splits.spec.norm = was.norm;
            return Ok(plan);
        }
        splits.spec.norm.mean = settings.mean.unwrap_or(splits.spec.norm.mean);
        splits.spec.norm.std = settings.std.unwrap_or(splits.spec.norm.std);
        let side = splits.spec.image_size;
        cfg.arch
            .check_image_size(side)
            .map_err(|e| format!("--model {}: {e}", cfg.arch.name()))?;
        if cfg.augment.cutout > side {
            return Err(format!(
                "--cutout {} is larger than the images ({side}x{side})",
                cfg.augment.cutout
            ));
        }
        cfg.val_split_method = splits.val_method;
        cfg.model.num_classes = splits.spec.classes.len();
        cfg.model.image_size = splits.spec.image_size;
        cfg.dataset = splits.spec.clone();
        Ok(plan)
    }
}

/// The first few of `names`, for a one-line message.
fn preview(names: &[String]) -> String {
    match names.len() {
        0..=4 => names.join(", "),
        n => format!("{}, ... ({} more)", names[..3].join(", "), n - 3),
    }
}

/// `runs/RECIPE-UNIXTIME`.
fn default_run_dir(recipe: &str) -> PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{recipe}-{t}"))
}

/// The recipe with the settings applied, and how the run starts: with `--init`, the model
/// (architecture, stem, stages) follows the checkpoint.
fn fresh(s: &Settings) -> Result<(TrainConfig, Start), String> {
    let mut cfg = s.resolve()?;
    let Some(path) = &s.init else {
        return Ok((cfg, Start::Fresh));
    };
    // The checkpoint says what network it holds; --stem only settles what it cannot say (a
    // PyTorch state_dict with a 3x3 stem).
    let file = CheckpointFile::read(path, None).or_else(|e| match s.stem {
        Some(stem) => CheckpointFile::read(path, Some(stem)),
        None => Err(e),
    })?;
    let differs = [
        ("--model", s.model.is_some_and(|m| m != file.arch)),
        (
            "--stages",
            s.stages.is_some_and(|n| usize::from(n) != file.model.stages),
        ),
        (
            "--stem",
            s.stem
                .is_some_and(|st| file.arch == Arch::Resnet18 && st != file.model.stem),
        ),
    ];
    if let Some((flag, _)) = differs.iter().find(|(_, d)| *d) {
        return Err(format!(
            "{flag} differs from the network in {} ({}); the model follows the --init checkpoint",
            file.origin,
            match file.arch {
                Arch::Resnet18 => format!(
                    "resnet18, stem {}, {} stages",
                    file.model.stem.name(),
                    file.model.stages
                ),
                other => other.name().to_string(),
            }
        ));
    }
    cfg.arch = file.arch;
    cfg.model.stem = file.model.stem;
    cfg.model.stages = file.model.stages;
    let weights = InitWeights {
        origin: file.origin,
        tensors: file.tensors,
    };
    Ok((cfg, Start::Init(weights)))
}

/// The configuration a run was started with; only the settings of [`CHANGEABLE_ON_RESUME`] may
/// change on resuming (anything else would make it a different run).
fn resumed(s: &Settings, dir: &Path) -> Result<RunPlan, String> {
    if let Some(f) = s.refused_on_resume() {
        let allowed: Vec<String> = CHANGEABLE_ON_RESUME.iter().map(|k| flag(k)).collect();
        return Err(format!(
            "{f} cannot change when resuming (only {} can)",
            allowed.join(", ")
        ));
    }
    let r = load_resume(dir).map_err(|e| format!("{e:#}"))?;
    check_same_run(dir, &r.config)?;
    if let Some(max) = s.max_steps.filter(|&m| m <= r.position.step) {
        return Err(format!(
            "--max-steps {max} counts from the run's start, and the run in {} is at step {} already",
            dir.display(),
            r.position.step
        ));
    }
    let mut cfg = r.config.clone();
    s.apply_on_resume(&mut cfg);
    Ok(RunPlan {
        cfg,
        start: Start::Resume(Box::new(r)),
        out: dir.to_path_buf(),
        overwrite: false,
    })
}

/// The memory the system can give this process without swapping (Linux's MemAvailable), in
/// bytes; none where that is not known.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses a run whose batch cannot fit in memory: `available` bytes against the activations
/// of a batch of `cfg.batch_size` (at most `train_images`) over `ranks`, estimated from the
/// model's layer outputs (1.0x to 1.4x what a step takes: see
/// [`crate::model::Summary::activation_values_per_image`]), so that a huge `--batch-size`
/// fails in one line instead of being killed by the system.
pub fn check_memory(cfg: &TrainConfig, train_images: usize, ranks: usize, available: u64) -> Result<(), String> {
    let be = crate::engine::cpu::Cpu::default();
    let input = crate::engine::Shape4::new(1, cfg.model.image_size, cfg.model.image_size, crate::data::CHANNELS);
    let per_image =
        4 * crate::model::summarize_arch(&be, (cfg.arch, cfg.model), input, None).activation_values_per_image() as u64;
    let batch = cfg.batch_size.min(train_images).div_ceil(ranks.max(1)) as u64;
    let need = per_image * batch;
    if need <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(format!(
        "--batch-size {}: a batch of {batch} images needs about {:.1} GiB for its activations ({:.2} MiB an image), and this machine has {:.1} GiB available; give a --batch-size of at most {}",
        cfg.batch_size,
        gib(need),
        per_image as f64 / (1u64 << 20) as f64,
        gib(available),
        (available / per_image.max(1)).max(1) * ranks.max(1) as u64
    ))
}

/// Refuses a folder whose `config.json` describes another model than its resume state (a
/// `train_state.safetensors` copied in from another run).
fn check_same_run(dir: &Path, state: &TrainConfig) -> Result<(), String> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let config: TrainConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: not a run's configuration ({e})", path.display()))?;
    if (config.arch, config.model) != (state.arch, state.model) {
        return Err(format!(
            "{}: its train_state.safetensors is another run's ({} {:?}) than its config.json's ({} {:?}); the folder holds two runs' files",
            dir.display(),
            state.arch.name(),
            state.model,
            config.arch.name(),
            config.model
        ));
    }
    Ok(())
}
