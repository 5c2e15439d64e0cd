//! State dicts as safetensors files, with the seed's PyTorch keys, shapes, layouts and dtypes
//! (f32 tensors, int64 `num_batches_tracked`), so that
//! `model.load_state_dict(safetensors.torch.load_file(path))` works on the seed's model.
//!
//! Loading is strict and all-or-nothing: every problem (missing, unexpected, wrong shape or
//! dtype) is collected and reported by name before a single value is written. Saving writes a
//! temporary file, syncs it and renames it over the target, so a crash never leaves half a file.

use crate::engine::Backend;
use crate::nn::{Entry, Module};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub use crate::atomic_file::write_atomic;

/// A problem found while matching a file against a model; loading reports all of them.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: cannot read: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format { path: String, reason: String },
    #[error("{path}: does not match the model:\n  {}", problems.join("\n  "))]
    Mismatch { path: String, problems: Vec<String> },
}

/// Named host tensors, as a safetensors file holds them.
pub type StateDict = BTreeMap<String, HostTensor>;

/// One tensor of a state dict on the host, in PyTorch's layout.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The model's state dict on the host, keyed by name.
pub fn state_dict<B: Backend>(be: &B, model: &mut (impl Module<B> + ?Sized)) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    model.visit(&mut |e| {
        let (name, t) = match e {
            Entry::Tensor(p) => (
                p.name.clone(),
                HostTensor {
                    dtype: Dtype::F32,
                    shape: p.shape.clone(),
                    bytes: f32_bytes(&p.read(be)),
                },
            ),
            Entry::Counter { name, value } => (
                name.to_string(),
                HostTensor {
                    dtype: Dtype::I64,
                    shape: vec![],
                    bytes: value.to_le_bytes().to_vec(),
                },
            ),
        };
        out.insert(name, t);
    });
    out
}

/// Serialises tensors (any names) with optional string metadata to safetensors bytes.
pub fn to_bytes(tensors: &BTreeMap<String, HostTensor>, metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let views = tensors.iter().map(|(k, t)| {
        (
            k.clone(),
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("consistent tensor"),
        )
    });
    safetensors::serialize(views, metadata).expect("serialisable state dict")
}

/// Saves the model's state dict to `path` (atomically).
pub fn save<B: Backend>(
    path: &Path,
    be: &B,
    model: &mut (impl Module<B> + ?Sized),
    metadata: Option<HashMap<String, String>>,
) -> std::io::Result<()> {
    write_atomic(path, &to_bytes(&state_dict(be, model), metadata))
}

/// Loads a state dict from `path` into the model, strictly. Returns the file's metadata.
pub fn load<B: Backend>(
    path: &Path,
    be: &B,
    model: &mut (impl Module<B> + ?Sized),
) -> Result<HashMap<String, String>, CheckpointError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: p.clone(),
        source,
    })?;
    load_bytes(&p, &bytes, be, model)
}

/// Parses safetensors bytes into host tensors and metadata; `origin` names them in errors.
pub fn parse(origin: &str, bytes: &[u8]) -> Result<(StateDict, HashMap<String, String>), CheckpointError> {
    let format = |reason: String| CheckpointError::Format {
        path: origin.to_string(),
        reason,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| format(e.to_string()))?;
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                HostTensor {
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    bytes: t.data().to_vec(),
                },
            )
        })
        .collect();
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// As [`load`], from bytes already in memory; `origin` names them in errors.
pub fn load_bytes<B: Backend>(
    origin: &str,
    bytes: &[u8],
    be: &B,
    model: &mut (impl Module<B> + ?Sized),
) -> Result<HashMap<String, String>, CheckpointError> {
    let (tensors, meta) = parse(origin, bytes)?;
    load_tensors(origin, &tensors, be, model)?;
    Ok(meta)
}

/// Loads a state dict into the model, strictly: every problem (missing, unexpected, wrong
/// shape or dtype) is reported by name before a single value is written.
pub fn load_tensors<B: Backend>(
    origin: &str,
    tensors: &BTreeMap<String, HostTensor>,
    be: &B,
    model: &mut (impl Module<B> + ?Sized),
) -> Result<(), CheckpointError> {
    load_tensors_except(origin, tensors, be, model, &|_| false)
}

/// As [`load_tensors`], leaving alone the model's entries whose names `skip` picks (they keep
/// their values; the file's tensors of those names are ignored).
pub fn load_tensors_except<B: Backend>(
    origin: &str,
    tensors: &BTreeMap<String, HostTensor>,
    be: &B,
    model: &mut (impl Module<B> + ?Sized),
    skip: &dyn Fn(&str) -> bool,
) -> Result<(), CheckpointError> {
    // First pass: check everything, touch nothing.
    let mut problems = Vec::new();
    let mut expected = std::collections::HashSet::new();
    model.visit(&mut |e| {
        let name = e.name().to_string();
        if skip(&name) {
            expected.insert(name);
            return;
        }
        let (want_shape, want_dtype) = match &e {
            Entry::Tensor(p) => (p.shape.clone(), Dtype::F32),
            Entry::Counter { .. } => (vec![], Dtype::I64),
        };
        match tensors.get(&name) {
            None => problems.push(format!("missing tensor '{name}' (shape {want_shape:?})")),
            Some(t) if t.dtype != want_dtype => {
                problems.push(format!("'{name}' has dtype {:?}, expected {want_dtype:?}", t.dtype))
            }
            Some(t) if t.shape != want_shape => {
                problems.push(format!("'{name}' has shape {:?}, expected {want_shape:?}", t.shape))
            }
            Some(_) => {}
        }
        expected.insert(name);
    });
    problems.extend(
        tensors
            .keys()
            .filter(|n| !expected.contains(*n))
            .map(|n| format!("unexpected tensor '{n}'")),
    );
    if !problems.is_empty() {
        return Err(CheckpointError::Mismatch {
            path: origin.to_string(),
            problems,
        });
    }

    // Second pass: every tensor is known to fit.
    model.visit(&mut |e| match e {
        e if skip(e.name()) => {}
        Entry::Tensor(p) => p.write(be, &f32_values(&tensors[&p.name].bytes)),
        Entry::Counter { name, value } => {
            let d = &tensors[name].bytes;
            *value = i64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
        }
    });
    Ok(())
}

/// The f32 values of a host tensor (little-endian bytes).
pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
