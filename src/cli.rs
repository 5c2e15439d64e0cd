//! Pieces of the command-line tool that are worth testing without a process: reading a
//! checkpoint's model configuration, and the exit-code convention.

use crate::checkpoint::{self, StateDict};
use crate::data::{DataSpec, LabelSet};
use crate::engine::Backend;
use crate::model::{Arch, Network, ResNetConfig, Stem, build, torchvision};
use crate::train::Settings;
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
    /// The data the model was trained on: class names, image size, normalisation (CIFAR-10's
    /// for a file that does not record it).
    pub spec: DataSpec,
    /// CIFAR-100's labels, when the model was trained on them.
    pub labels: Option<LabelSet>,
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
        let (mut tensors, meta) = checkpoint::parse(&origin, &bytes).map_err(CliError::input)?;
        let mut stem = stem;
        if torchvision::is_torchvision(tensors.keys().map(String::as_str)) {
            tensors = from_torchvision(&origin, tensors)?;
            // torchvision's network is ours with its stem, whatever a flag says.
            stem = Some(Stem::Torchvision);
        }
        let labels = match meta.get("labels") {
            Some(l) => Some(
                l.parse()
                    .map_err(|e| CliError::input(format!("{origin}: bad 'labels' metadata: {e}")))?,
            ),
            None => None,
        };
        let (arch, mut model) = model_config_of(&origin, &tensors, &meta, stem)?;
        let spec: DataSpec = match meta.get("dataset") {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| CliError::input(format!("{origin}: bad 'dataset' metadata: {e}")))?,
            // A state_dict saved elsewhere: CIFAR-10 as the seed trains it, or numbered classes.
            None if model.num_classes == DataSpec::default().classes.len() => DataSpec::default(),
            None => DataSpec {
                classes: (0..model.num_classes).map(|i| format!("class {i}")).collect(),
                ..DataSpec::default()
            },
        };
        model.image_size = spec.image_size;
        if spec.classes.len() != model.num_classes {
            return Err(CliError::input(format!(
                "{origin}: names {} classes but its classifier has {}",
                spec.classes.len(),
                model.num_classes
            )));
        }
        Ok(Self {
            origin,
            tensors,
            meta,
            arch,
            model,
            spec,
            labels,
        })
    }

    /// The network the file holds, built on `be` with the file's weights.
    pub fn network<B: Backend>(&self, be: &B) -> Result<Box<dyn Network<B>>, CliError> {
        let mut model = build(be, self.arch, self.model, 0);
        checkpoint::load_tensors(&self.origin, &self.tensors, be, model.as_mut()).map_err(CliError::input)?;
        Ok(model)
    }
}

/// torchvision's ResNet-18 tensors under our names; a name that is not ResNet-18's is refused.
fn from_torchvision(origin: &str, tensors: StateDict) -> Result<StateDict, CliError> {
    let mut out = StateDict::new();
    for (name, t) in tensors {
        let ours = torchvision::to_seed_name(&name).ok_or_else(|| {
            CliError::input(format!(
                "{origin}: '{name}' is not a tensor of torchvision's ResNet-18 (the file has its other names)"
            ))
        })?;
        out.insert(ours, t);
    }
    Ok(out)
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
            ..ResNetConfig::default()
        },
    ))
}

pub use crate::train::settings::limits;

/// Reads a run's settings from a TOML file (`train --config FILE`): the same names as the
/// flags, in snake_case. Errors name the file (and the line, for syntax errors); values the
/// flags bound are checked against the same bounds.
///
/// ```toml
/// recipe = "fast"
/// epochs = 30
/// stem = "seed3x3"
/// val_split = 5000
/// ```
pub fn read_settings_file(path: &Path) -> Result<Settings, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let file: Settings = toml::from_str(&text).map_err(|e| {
        let msg = e
            .to_string()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        CliError::input(format!("{}: {msg}", path.display()))
    })?;
    for (key, value, (min, max)) in file.bounded() {
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
