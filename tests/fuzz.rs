//! Property tests: arbitrary and mutated bytes fed to the CIFAR reader and the checkpoint
//! reader never panic; each input is either accepted or refused with an error. Inputs come
//! from a seeded generator (reproducible), built around valid files so that the mutations
//! reach deep into the parsers: bit flips, truncations, extensions, spliced headers.

mod common;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use resnet_cifar::checkpoint;
use resnet_cifar::data::cifar::{RECORD_BYTES, parse_records};
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::{ResNet, ResNetConfig, Stem};
use std::path::Path;

/// A mutation of `valid`: random bytes, a truncation, an extension, or flipped bytes.
fn mutate(rng: &mut ChaCha8Rng, valid: &[u8]) -> Vec<u8> {
    match rng.random_range(0..5) {
        0 => (0..rng.random_range(0..4 * valid.len().min(4096)))
            .map(|_| rng.random())
            .collect(),
        1 => valid[..rng.random_range(0..valid.len())].to_vec(),
        2 => {
            let mut v = valid.to_vec();
            v.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>()));
            v
        }
        3 => {
            // Flip bytes, mostly near the start where headers live.
            let mut v = valid.to_vec();
            for _ in 0..rng.random_range(1..8) {
                let span = if rng.random_bool(0.7) {
                    v.len().min(512)
                } else {
                    v.len()
                };
                let i = rng.random_range(0..span);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            v
        }
        _ => {
            // Overwrite a run with random bytes.
            let mut v = valid.to_vec();
            let at = rng.random_range(0..v.len());
            let len = rng.random_range(1..64).min(v.len() - at);
            for b in &mut v[at..at + len] {
                *b = rng.random();
            }
            v
        }
    }
}

fn no_panic<T, E>(what: &str, i: usize, f: impl FnOnce() -> Result<T, E> + std::panic::UnwindSafe) -> bool {
    match std::panic::catch_unwind(f) {
        Ok(r) => r.is_ok(),
        Err(_) => panic!("{what}: input {i} made the reader panic"),
    }
}

#[test]
fn cifar_reader_never_panics() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut valid = Vec::new();
    for i in 0..20u8 {
        valid.push(i % 10);
        valid.extend((0..RECORD_BYTES - 1).map(|_| rng.random::<u8>()));
    }
    let path = Path::new("fuzz.bin");
    assert!(parse_records(path, &valid, Some(20)).is_ok());
    let mut accepted = 0;
    for i in 0..3000 {
        let bytes = mutate(&mut rng, &valid);
        let expected = [None, Some(20)][i % 2];
        if no_panic("cifar", i, || parse_records(path, &bytes, expected)) {
            accepted += 1;
            // What is accepted is well-formed: whole records, labels below 10.
            let images = parse_records(path, &bytes, expected).unwrap();
            assert_eq!(images.pixels.len(), images.labels.len() * (RECORD_BYTES - 1));
            assert!(images.labels.iter().all(|&l| l < 10));
        }
    }
    eprintln!("cifar reader: {accepted} of 3000 mutated inputs accepted, the rest refused");
}

#[test]
fn checkpoint_reader_never_panics_or_loads_partly() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let cfg = ResNetConfig {
        stem: Stem::Seed,
        stages: 3,
        num_classes: 10,
        image_size: 32,
    };
    let mut model = ResNet::new(&Cpu::default(), cfg, 0);
    let valid = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut model), None);
    let before = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut model), None);
    let mut target = ResNet::new(&Cpu::default(), cfg, 1);
    let untouched = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut target), None);
    let (mut parsed, mut loaded) = (0, 0);
    for i in 0..1000 {
        let bytes = mutate(&mut rng, &valid);
        if no_panic("checkpoint parse", i, || checkpoint::parse("fuzz", &bytes)) {
            parsed += 1;
        }
        let ok = {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                checkpoint::load_bytes("fuzz", &bytes, &Cpu::default(), &mut target)
            }));
            result.unwrap_or_else(|_| panic!("checkpoint load: input {i} made the loader panic"))
        };
        if ok.is_ok() {
            loaded += 1;
            // Restore the reference weights for the next input.
            checkpoint::load_bytes("reference", &untouched, &Cpu::default(), &mut target).unwrap();
        } else if i % 50 == 0 {
            // Refused inputs change nothing (checked on a sample: a full comparison is slow).
            let now = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut target), None);
            assert!(now == untouched, "input {i}: a refused checkpoint changed the model");
        }
    }
    assert_eq!(valid, before);
    eprintln!("checkpoint reader: {parsed} of 1000 mutated files parsed, {loaded} loaded, the rest refused");
}

/// Checkpoint metadata is input like any other: mutated `arch`, `model`, `dataset`, `labels`,
/// `precision` and `winograd` values never make reading the file, building its network or
/// loading its weights panic, and what is accepted describes a network that can run (an image
/// size of 100000 made `predict` allocate 120 GB and abort). Non-finite weights are refused.
#[test]
fn checkpoint_metadata_is_checked_and_never_panics() {
    use resnet_cifar::data::DataSpec;
    use resnet_cifar::model::{Arch, CheckpointFile, build};
    use std::collections::HashMap;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let cfg = ResNetConfig::default();
    let mut model = build(&Cpu::default(), Arch::Lenet, cfg, 0);
    let state = checkpoint::state_dict(&Cpu::default(), model.as_mut());
    let valid: HashMap<String, String> = [
        ("arch", "lenet".to_string()),
        ("model", serde_json::to_string(&cfg).unwrap()),
        ("dataset", serde_json::to_string(&DataSpec::default()).unwrap()),
        ("precision", "fp32".into()),
        ("winograd", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let numbers = [
        "0", "-1", "1e9", "100000", "3", "NaN", "1e40", "\"x\"", "null", "-0.0", "7",
    ];
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..300 {
        let mut meta = valid.clone();
        let key = ["arch", "model", "dataset", "labels", "precision", "winograd"][rng.random_range(0..6)];
        let value = meta.get(key).cloned().unwrap_or_else(|| "fine".into());
        match rng.random_range(0..3) {
            // A number in the JSON replaced by another.
            0 => {
                let digits: Vec<usize> = value
                    .match_indices(|c: char| c.is_ascii_digit())
                    .map(|(at, _)| at)
                    .collect();
                if let Some(&at) = digits.get(rng.random_range(0..digits.len().max(1))) {
                    let end = at
                        + value[at..]
                            .find(|c: char| !c.is_ascii_digit() && c != '.')
                            .unwrap_or(0)
                            .max(1);
                    let number = numbers[rng.random_range(0..numbers.len())];
                    meta.insert(key.into(), format!("{}{number}{}", &value[..at], &value[end..]));
                }
            }
            1 => {
                meta.insert(
                    key.into(),
                    mutate(&mut rng, value.as_bytes()).into_iter().map(char::from).collect(),
                );
            }
            _ => {
                meta.remove(key);
            }
        }
        std::fs::write(&path, checkpoint::to_bytes(&state, Some(meta))).unwrap();
        let read = std::panic::catch_unwind(|| {
            let file = CheckpointFile::read(&path, None)?;
            assert!((16..=256).contains(&file.spec.image_size), "{:?}", file.spec);
            file.network(&Cpu::default()).map(|_| ())
        });
        match read.unwrap_or_else(|_| panic!("metadata input {i} made the reader panic")) {
            Ok(()) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    eprintln!("checkpoint metadata: {accepted} of 300 mutated files accepted, {refused} refused");
    assert!(accepted > 0 && refused > 0, "{accepted} accepted, {refused} refused");

    // The two cases of the bad-input probe, by the command line.
    let mut huge = valid.clone();
    let spec = DataSpec {
        image_size: 100_000,
        ..DataSpec::default()
    };
    huge.insert("dataset".into(), serde_json::to_string(&spec).unwrap());
    std::fs::write(&path, checkpoint::to_bytes(&state, Some(huge))).unwrap();
    let image = dir.path().join("a.png");
    image::RgbImage::new(8, 8).save(&image).unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
            .args(args)
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let p = path.to_str().unwrap();
    let (code, err) = run(&["predict", "--checkpoint", p, image.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bad 'dataset' metadata: image size 100000 is outside 16-256"),
        "{err}"
    );
    let mut nan_state = state.clone();
    let t = nan_state.get_mut("features.0.weight").unwrap();
    t.bytes = f32::NAN.to_le_bytes().repeat(t.bytes.len() / 4);
    std::fs::write(&path, checkpoint::to_bytes(&nan_state, Some(valid))).unwrap();
    let onnx = dir.path().join("m.onnx");
    for args in [
        vec!["export", "--checkpoint", p, "--out", onnx.to_str().unwrap()],
        vec!["predict", "--checkpoint", p, image.to_str().unwrap()],
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("'features.0.weight' holds values that are not finite"),
            "{err}"
        );
    }
    assert!(!onnx.exists());
}

/// The image cache is input like any other: mutated bytes never make opening the folder
/// panic, and what it returns is usable (labels below the class count, a finite
/// normalisation); a cache whose own fingerprint matches but whose contents cannot be (a label
/// of 200, a std of 0: they made `loss.rs` panic and trained NaN weights) is decoded again.
#[test]
fn the_image_cache_is_checked_and_never_panics() {
    use resnet_cifar::data::{DataOptions, open};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::write_folder(d, 4, false);
    let fresh = open(d, &DataOptions::default(), &|_, _| {}).unwrap();
    let cache = d.join(".resnet-cifar-cache/images-32.safetensors");
    let valid = std::fs::read(&cache).unwrap();
    let classes = fresh.classes.len() as u32;
    let usable = |data: &resnet_cifar::data::Dataset| {
        let labels = data.train.labels.iter().chain(data.test.iter().flat_map(|t| &t.labels));
        assert!(labels.into_iter().all(|&l| l < classes));
        assert!(data.norm.mean.iter().chain(&data.norm.std).all(|v| v.is_finite()));
        assert!(data.norm.std.iter().all(|s| *s > 0.0));
    };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for i in 0..100 {
        std::fs::write(&cache, mutate(&mut rng, &valid)).unwrap();
        let data = std::panic::catch_unwind(|| open(d, &DataOptions::default(), &|_, _| {}))
            .unwrap_or_else(|_| panic!("cache input {i} made the reader panic"))
            .unwrap();
        usable(&data);
    }
    // The fingerprint kept, the contents changed.
    let (_, meta) = safetensors::SafeTensors::read_metadata(&valid).unwrap();
    let st = safetensors::SafeTensors::deserialize(&valid).unwrap();
    let rewrite = |labels: &[u8], norm: &str| {
        let mut meta = meta.metadata().clone().unwrap();
        meta.insert("norm".into(), norm.into());
        let tensors: Vec<(String, safetensors::tensor::TensorView)> = st
            .tensors()
            .into_iter()
            .map(|(name, t)| match name.as_str() {
                "train.labels" => {
                    let view = safetensors::tensor::TensorView::new(t.dtype(), t.shape().to_vec(), labels).unwrap();
                    (name, view)
                }
                _ => (name, t),
            })
            .collect();
        std::fs::write(&cache, safetensors::serialize(tensors, Some(meta)).unwrap()).unwrap();
    };
    let mut labels = st.tensor("train.labels").unwrap().data().to_vec();
    labels[..4].copy_from_slice(&200u32.to_le_bytes());
    let good_norm = serde_json::to_string(&fresh.norm).unwrap();
    for (labels, norm, says) in [
        (&labels[..], good_norm.as_str(), "label 200 for 3 classes"),
        (
            st.tensor("train.labels").unwrap().data(),
            r#"{"mean":[0.5,0.5,0.5],"std":[0.2,0.0,0.2]}"#,
            "normalisation",
        ),
    ] {
        rewrite(labels, norm);
        let data = open(d, &DataOptions::default(), &|_, _| {}).unwrap();
        usable(&data);
        assert!(
            data.notes
                .iter()
                .any(|n| n.contains("is not valid") && n.contains(says)),
            "{:?}",
            data.notes
        );
        assert_eq!(data.train.labels, fresh.train.labels);
    }
}
