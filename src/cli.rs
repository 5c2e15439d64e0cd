//! Pieces of the command-line tool that are worth testing without a process: reading a
//! checkpoint's model configuration, and the exit-code convention.

use crate::checkpoint::{self, StateDict};
use crate::engine::Backend;
use crate::model::{Arch, Network, ResNetConfig, Stem, build};
use std::collections::HashMap;
use std::path::Path;

/// An error with the exit code it deserves: 2 for bad input (flags, data files, checkpoints
/// given), 1 for a failure during a run.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn input(message: impl std::fmt::Display) -> Self {
        Self {
            code: 2,
            message: message.to_string(),
        }
    }
    pub fn run(message: impl std::fmt::Display) -> Self {
        Self {
            code: 1,
            message: message.to_string(),
        }
    }
}

/// A state_dict file read for `eval` and `predict`: its tensors, parsed once, and the model
/// they fit.
pub struct CheckpointFile {
    /// The path as errors and reports name it.
    pub origin: String,
    pub tensors: StateDict,
    pub meta: HashMap<String, String>,
    pub arch: Arch,
    pub model: ResNetConfig,
}

impl CheckpointFile {
    /// Reads `path`; errors name it. `stem` as for [`model_config_of`].
    pub fn read(path: &Path, stem: Option<Stem>) -> Result<Self, CliError> {
        let origin = path.display().to_string();
        if path.join("last.safetensors").is_file() {
            return Err(CliError::input(format!(
                "{origin} is a run folder; give one of its checkpoints: {} (the most accurate epoch) or {} (the last)",
                path.join("best.safetensors").display(),
                path.join("last.safetensors").display()
            )));
        }
        if path.is_dir() {
            return Err(CliError::input(format!(
                "{origin} is a folder without checkpoints; give a .safetensors file (a run folder holds best.safetensors and last.safetensors)"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| CliError::input(format!("{origin}: {e}")))?;
        let (tensors, meta) = checkpoint::parse(&origin, &bytes).map_err(CliError::input)?;
        let (arch, model) = model_config_of(&origin, &tensors, &meta, stem)?;
        Ok(Self {
            origin,
            tensors,
            meta,
            arch,
            model,
        })
    }

    /// The network the file holds, built on `be` with the file's weights.
    pub fn network<B: Backend>(&self, be: &B) -> Result<Box<dyn Network<B>>, CliError> {
        let mut model = build(be, self.arch, self.model, 0);
        checkpoint::load_tensors(&self.origin, &self.tensors, be, model.as_mut()).map_err(CliError::input)?;
        Ok(model)
    }
}

/// The model a state_dict holds: from its metadata when we wrote it, else inferred from
/// its tensors (a state_dict saved from PyTorch). `stem` overrides; a 3x3 stem conv is
/// ambiguous (seed3x3 or cifar) and needs it. `path` names the file in errors.
pub fn model_config_of(
    path: &str,
    tensors: &StateDict,
    meta: &HashMap<String, String>,
    stem: Option<Stem>,
) -> Result<(Arch, ResNetConfig), CliError> {
    let shape = |name: &str| tensors.get(name).map(|t| t.shape.clone());
    let arch = match meta.get("arch") {
        Some(a) => a
            .parse()
            .map_err(|e| CliError::input(format!("{path}: bad 'arch' metadata: {e}")))?,
        None if shape("features.0.weight").is_some() && shape("features.1.running_mean").is_some() => Arch::Vgg16,
        None if shape("features.0.weight").is_some() => Arch::Lenet,
        None => Arch::Resnet18,
    };
    if arch != Arch::Resnet18 {
        let classes = shape("classifier.bias")
            .or_else(|| shape("classifier.2.bias"))
            .and_then(|s| s.first().copied())
            .ok_or_else(|| CliError::input(format!("{path}: no classifier bias: not a {} state_dict", arch.name())))?;
        let cfg = ResNetConfig {
            num_classes: classes,
            ..ResNetConfig::default()
        };
        return Ok((arch, cfg));
    }
    if let Some(json) = meta.get("model") {
        let mut cfg: ResNetConfig =
            serde_json::from_str(json).map_err(|e| CliError::input(format!("{path}: bad 'model' metadata: {e}")))?;
        if let Some(s) = stem {
            cfg.stem = s;
        }
        return Ok((arch, cfg));
    }
    let conv1 = shape("conv1.0.weight").ok_or_else(|| {
        CliError::input(format!(
            "{path}: no 'conv1.0.weight': not a state_dict of the seed's ResNet-18"
        ))
    })?;
    let classes = shape("fc.bias")
        .and_then(|s| s.first().copied())
        .ok_or_else(|| CliError::input(format!("{path}: no 'fc.bias'")))?;
    let stages = if shape("conv5.0.layer.0.weight").is_some() {
        4
    } else {
        3
    };
    let stem = match (stem, conv1.get(2)) {
        (Some(s), _) => s,
        (None, Some(7)) => Stem::Seed,
        (None, k) => {
            return Err(CliError::input(format!(
                "{path}: the stem conv is {}x{0}, which fits --stem seed3x3 and --stem cifar: say which",
                k.copied().unwrap_or(0)
            )));
        }
    };
    Ok((
        arch,
        ResNetConfig {
            stem,
            stages,
            num_classes: classes,
        },
    ))
}

/// Bounds (inclusive) of the train settings that have them, shared by the flags (clap's range
/// parsers) and [`ConfigFile::read`], so that both refuse the same values.
pub mod limits {
    pub const POSITIVE: (u64, u64) = (1, u64::MAX);
    /// Padding beyond 16 would let a 32x32 crop miss the image entirely.
    pub const CROP_PAD: (u64, u64) = (0, 16);
    /// A cutout square as large as the image.
    pub const CUTOUT: (u64, u64) = (0, 32);
    /// The seed's four residual stages, or three (its proposal to drop `conv5`).
    pub const STAGES: (u64, u64) = (3, 4);

    /// Bounds as the range clap's integer parsers take (`value_parser!(u8).range(..)`), for
    /// the bounded ones (not [`POSITIVE`], whose top does not fit an i64).
    pub const fn flag_range((min, max): (u64, u64)) -> std::ops::RangeInclusive<i64> {
        std::ops::RangeInclusive::new(min as i64, max as i64)
    }
}

/// A run's settings in a TOML file (`train --config FILE`): the same names as the flags, in
/// snake_case; flags given on the command line override the file.
///
/// ```toml
/// recipe = "fast"
/// epochs = 30
/// stem = "seed3x3"
/// val_split = 5000
/// ```
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, deserialize_with = "parsed")]
    pub recipe: Option<crate::train::Recipe>,
    #[serde(default, deserialize_with = "parsed")]
    pub model: Option<Arch>,
    pub data: Option<std::path::PathBuf>,
    pub out: Option<std::path::PathBuf>,
    pub epochs: Option<usize>,
    pub batch_size: Option<u64>,
    pub lr: Option<f64>,
    pub max_steps: Option<u64>,
    pub val_split: Option<usize>,
    pub shuffle: Option<bool>,
    pub seed: Option<u64>,
    #[serde(default, deserialize_with = "parsed")]
    pub stem: Option<Stem>,
    pub stages: Option<u8>,
    pub label_smoothing: Option<f32>,
    pub weight_decay: Option<f64>,
    #[serde(default, deserialize_with = "parsed")]
    pub tta: Option<crate::eval::Tta>,
    pub decay_1d: Option<bool>,
    pub zero_init_residual: Option<bool>,
    pub crop_pad: Option<u8>,
    pub alternate_flip: Option<bool>,
    pub cutout: Option<u8>,
}

/// Reads an optional string key through its type's `FromStr`, so that a bad value (an unknown
/// stem, say) is refused while parsing, with the key's line.
fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    s.map(|s| s.parse().map_err(serde::de::Error::custom)).transpose()
}

impl ConfigFile {
    /// Reads and checks `path`; errors name the file (and the line, for syntax errors).
    pub fn read(path: &std::path::Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| {
            let msg = e
                .to_string()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            CliError::input(format!("{}: {msg}", path.display()))
        })?;
        let bounded = [
            ("epochs", file.epochs.map(|v| v as u64), limits::POSITIVE),
            ("batch_size", file.batch_size, limits::POSITIVE),
            ("max_steps", file.max_steps, limits::POSITIVE),
            ("crop_pad", file.crop_pad.map(u64::from), limits::CROP_PAD),
            ("cutout", file.cutout.map(u64::from), limits::CUTOUT),
            ("stages", file.stages.map(u64::from), limits::STAGES),
        ];
        for (key, value, (min, max)) in bounded {
            if let Some(v) = value.filter(|v| !(min..=max).contains(v)) {
                let allowed = match max {
                    u64::MAX => format!("at least {min}"),
                    _ => format!("{min} to {max}"),
                };
                return Err(CliError::input(format!(
                    "{}: {key} must be {allowed}, got {v}",
                    path.display()
                )));
            }
        }
        Ok(file)
    }
}
