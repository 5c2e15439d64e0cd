//! A model as a checkpoint file holds it: the file's tensors (ours, a PyTorch state_dict of
//! the seed's model, or torchvision's ResNet-18), the network they fit, and the data it was
//! trained on, read once for `eval`, `predict`, `export`, `summary` and `train --init`.
//! Errors name the file and say what is wrong.

use super::{Arch, Network, ResNetConfig, Stem, build, torchvision};
use crate::checkpoint::{self, StateDict};
use crate::data::{DataSpec, LabelSet};
use crate::engine::Backend;
use std::collections::HashMap;
use std::path::Path;

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
    pub fn read(path: &Path, stem: Option<Stem>) -> Result<Self, String> {
        let origin = path.display().to_string();
        if path.join("last.safetensors").is_file() {
            return Err(format!(
                "{origin} is a run folder; give one of its checkpoints: {} (the most accurate epoch) or {} (the last)",
                path.join("best.safetensors").display(),
                path.join("last.safetensors").display()
            ));
        }
        if path.is_dir() {
            return Err(format!(
                "{origin} is a folder without checkpoints; give a .safetensors file (a run folder holds best.safetensors and last.safetensors)"
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{origin}: {e}"))?;
        let (mut tensors, meta) = checkpoint::parse(&origin, &bytes).map_err(|e| e.to_string())?;
        let mut stem = stem;
        if torchvision::is_torchvision(tensors.keys().map(String::as_str)) {
            tensors = from_torchvision(&origin, tensors)?;
            // torchvision's network is ours with its stem, whatever a flag says.
            stem = Some(Stem::Torchvision);
        }
        let labels = match meta.get("labels") {
            Some(l) => Some(l.parse().map_err(|e| format!("{origin}: bad 'labels' metadata: {e}"))?),
            None => None,
        };
        let (arch, mut model) = model_config_of(&origin, &tensors, &meta, stem)?;
        let spec: DataSpec = match meta.get("dataset") {
            Some(json) => serde_json::from_str(json).map_err(|e| format!("{origin}: bad 'dataset' metadata: {e}"))?,
            // A state_dict saved elsewhere: CIFAR-10 as the seed trains it, or numbered classes.
            None if model.num_classes == DataSpec::default().classes.len() => DataSpec::default(),
            None => DataSpec {
                classes: (0..model.num_classes).map(|i| format!("class {i}")).collect(),
                ..DataSpec::default()
            },
        };
        spec.check()
            .map_err(|e| format!("{origin}: bad 'dataset' metadata: {e}"))?;
        model.image_size = spec.image_size;
        if !(3..=4).contains(&model.stages) || model.num_classes == 0 {
            return Err(format!(
                "{origin}: bad 'model' metadata: {} stages, {} classes",
                model.stages, model.num_classes
            ));
        }
        if let Some(name) = non_finite(&tensors) {
            return Err(format!(
                "{origin}: '{name}' holds values that are not finite (NaN or infinity): the weights of a run that diverged?"
            ));
        }
        if spec.classes.len() != model.num_classes {
            return Err(format!(
                "{origin}: names {} classes but its classifier has {}",
                spec.classes.len(),
                model.num_classes
            ));
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
    pub fn network<B: Backend>(&self, be: &B) -> Result<Box<dyn Network<B>>, String> {
        let mut model = build(be, self.arch, self.model, 0);
        checkpoint::load_tensors(&self.origin, &self.tensors, be, model.as_mut()).map_err(|e| e.to_string())?;
        Ok(model)
    }
}

/// torchvision's ResNet-18 tensors under our names; a name that is not ResNet-18's is refused.
fn from_torchvision(origin: &str, tensors: StateDict) -> Result<StateDict, String> {
    let mut out = StateDict::new();
    for (name, t) in tensors {
        let ours = torchvision::to_seed_name(&name).ok_or_else(|| {
            format!("{origin}: '{name}' is not a tensor of torchvision's ResNet-18 (the file has its other names)")
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
) -> Result<(Arch, ResNetConfig), String> {
    let shape = |name: &str| tensors.get(name).map(|t| t.shape.clone());
    let arch = match meta.get("arch") {
        Some(a) => a.parse().map_err(|e| format!("{path}: bad 'arch' metadata: {e}"))?,
        None if shape("features.0.weight").is_some() && shape("features.1.running_mean").is_some() => Arch::Vgg16,
        None if shape("features.0.weight").is_some() => Arch::Lenet,
        None if shape("2.conv1.weight").is_some() => Arch::Airbench,
        None => Arch::Resnet18,
    };
    if arch != Arch::Resnet18 {
        // The classifier's output count: its bias's length, or its weight's rows (airbench's
        // has no bias).
        let classes = shape("classifier.bias")
            .or_else(|| shape("classifier.2.bias"))
            .or_else(|| shape("7.weight"))
            .and_then(|s| s.first().copied())
            .ok_or_else(|| format!("{path}: no classifier: not a {} state_dict", arch.name()))?;
        let cfg = ResNetConfig {
            num_classes: classes,
            ..ResNetConfig::default()
        };
        return Ok((arch, cfg));
    }
    if let Some(json) = meta.get("model") {
        let mut cfg: ResNetConfig =
            serde_json::from_str(json).map_err(|e| format!("{path}: bad 'model' metadata: {e}"))?;
        if let Some(s) = stem {
            cfg.stem = s;
        }
        return Ok((arch, cfg));
    }
    let conv1 = shape("conv1.0.weight")
        .ok_or_else(|| format!("{path}: no 'conv1.0.weight': not a state_dict of the seed's ResNet-18"))?;
    let classes = shape("fc.bias")
        .and_then(|s| s.first().copied())
        .ok_or_else(|| format!("{path}: no 'fc.bias'"))?;
    let stages = if shape("conv5.0.layer.0.weight").is_some() {
        4
    } else {
        3
    };
    let stem = match (stem, conv1.get(2)) {
        (Some(s), _) => s,
        (None, Some(7)) => Stem::Seed,
        (None, k) => {
            return Err(format!(
                "{path}: the stem conv is {}x{0}, which fits --stem seed3x3 and --stem cifar: say which",
                k.copied().unwrap_or(0)
            ));
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

/// The first f32 tensor of `tensors` holding a NaN or an infinity.
fn non_finite(tensors: &StateDict) -> Option<&str> {
    tensors
        .iter()
        .filter(|(_, t)| t.dtype == safetensors::Dtype::F32)
        .find(|(_, t)| {
            t.bytes
                .chunks_exact(4)
                .any(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
        })
        .map(|(name, _)| name.as_str())
}
