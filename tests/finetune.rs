//! Fine-tuning: `--init` from our checkpoints and from torchvision's ResNet-18 names (checked
//! against torchvision itself), a classifier started afresh for another class count, and
//! `--freeze-backbone`.

mod common;

use common::{Golden, cli, write_folder};
use resnet_cifar::checkpoint::{self, HostTensor, StateDict};
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::engine::{Shape4, nchw_to_nhwc};
use resnet_cifar::model::CheckpointFile;
use resnet_cifar::model::torchvision::to_seed_name;
use resnet_cifar::model::{Arch, ResNet, ResNetConfig, Stem};
use resnet_cifar::nn::{Entry, Module};
use std::path::Path;

/// torchvision's name for one of ours (the inverse of `to_seed_name`, for building fixtures).
fn torchvision_name(ours: &str) -> String {
    let parts: Vec<&str> = ours.split('.').collect();
    let tv = match parts.as_slice() {
        ["conv1", "0", leaf] => format!("conv1.{leaf}"),
        ["conv1", "1", leaf] => format!("bn1.{leaf}"),
        ["fc", leaf] => format!("fc.{leaf}"),
        [stage, block, kind, i, leaf] => {
            let s: usize = stage["conv".len()..].parse().unwrap();
            let module = match (*kind, *i) {
                ("layer", "0") => "conv1".to_string(),
                ("layer", "1") => "bn1".to_string(),
                ("layer", "3") => "conv2".to_string(),
                ("layer", "4") => "bn2".to_string(),
                ("shortcut", i) => format!("downsample.{i}"),
                _ => panic!("{ours}"),
            };
            format!("layer{}.{block}.{module}.{leaf}", s - 1)
        }
        _ => panic!("{ours}"),
    };
    assert_eq!(to_seed_name(&tv).as_deref(), Some(ours), "the mapping inverts");
    tv
}

/// The state_dict of scripts/torchvision_fixture.py, under torchvision's names: entry k,
/// element i, by the script's formulas.
fn torchvision_formula_state() -> StateDict {
    let cfg = ResNetConfig {
        stem: Stem::Torchvision,
        ..ResNetConfig::default()
    };
    let mut model = ResNet::new(&Cpu::default(), cfg, 0);
    let mut state = StateDict::new();
    let mut k = 0usize;
    model.visit(&mut |e| {
        let kf = k as f64;
        k += 1;
        let (name, t) = match e {
            Entry::Counter { name, .. } => (
                name.to_string(),
                HostTensor {
                    dtype: safetensors::Dtype::I64,
                    shape: vec![],
                    bytes: 0i64.to_le_bytes().to_vec(),
                },
            ),
            Entry::Tensor(p) => {
                let n = p.numel();
                let leaf = p.name.rsplit('.').next().unwrap();
                let values: Vec<f32> = (0..n)
                    .map(|i| {
                        let i = i as f64;
                        let v = match (leaf, p.shape.len()) {
                            ("weight", d) if d >= 2 => {
                                let fan_in = (n / p.shape[0]) as f64;
                                0.8 * (0.7 * i + 0.3 * kf + 0.1).sin() / fan_in.sqrt()
                            }
                            ("weight", _) => 1.0 + 0.1 * (0.9 * i + kf).sin(),
                            ("bias", _) => 0.1 * (1.1 * i + kf).cos(),
                            ("running_mean", _) => 0.05 * (1.3 * i + kf).sin(),
                            ("running_var", _) => 1.0 + 0.2 * (0.7 * i + kf).cos().powi(2),
                            _ => panic!("{}", p.name),
                        };
                        v as f32
                    })
                    .collect();
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (
                    p.name.clone(),
                    HostTensor {
                        dtype: safetensors::Dtype::F32,
                        shape: p.shape.clone(),
                        bytes,
                    },
                )
            }
        };
        state.insert(torchvision_name(&name), t);
    });
    state
}

fn write_torchvision(path: &Path) {
    std::fs::write(path, checkpoint::to_bytes(&torchvision_formula_state(), None)).unwrap();
}

#[test]
fn torchvision_resnet18_names_give_torchvision_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tv.safetensors");
    write_torchvision(&path);
    let file = CheckpointFile::read(&path, None).unwrap();
    assert_eq!(
        (file.arch, file.model.stem, file.model.stages),
        (Arch::Resnet18, Stem::Torchvision, 4)
    );
    let mut model = file.network(&Cpu::default()).unwrap();
    let fixture = Golden::from_bytes(
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torchvision_resnet18.safetensors"))
            .unwrap(),
    );
    for side in [32, 64] {
        let s = Shape4::new(2, side, side, 3);
        let x = common::put(
            &Cpu::default(),
            &nchw_to_nhwc(&fixture.f32(&format!("input_{side}")), s),
        );
        let want = fixture.f32(&format!("logits_{side}"));
        model.forward(&Cpu::default(), &x, s, false);
        let got = common::get(&Cpu::default(), model.logits(), 20);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{side}x{side}: logits differ from torchvision's by {worst}: {got:?} vs {want:?}"
        );
    }
}

/// The tensors of a checkpoint file as f32 values, by name.
fn values(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let (tensors, _) = checkpoint::parse("test", &std::fs::read(path).unwrap()).unwrap();
    tensors
        .into_iter()
        .filter(|(_, t)| t.dtype == safetensors::Dtype::F32)
        .map(|(k, t)| (k, checkpoint::f32_values(&t.bytes)))
        .collect()
}

#[test]
fn init_fine_tunes_across_class_counts_and_freezes_the_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let folder = d.join("images");
    write_folder(&folder, 8, false);
    let tv = d.join("tv.safetensors");
    write_torchvision(&tv);
    let ours: std::collections::BTreeMap<String, Vec<f32>> = torchvision_formula_state()
        .into_iter()
        .filter(|(_, t)| t.dtype == safetensors::Dtype::F32)
        .map(|(k, t)| (to_seed_name(&k).unwrap(), checkpoint::f32_values(&t.bytes)))
        .collect();
    let run = |name: &str, extra: &[&str]| {
        let out = d.join(name);
        let mut args = vec![
            "train",
            "--data",
            folder.to_str().unwrap(),
            "--init",
            tv.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "3",
            "--batch-size",
            "8",
            "--threads",
            "1",
        ];
        args.extend(extra);
        (cli(&args), out)
    };

    // torchvision's 10 classes onto 3: the backbone loads, the classifier starts afresh.
    let ((code, stdout, stderr), out) = run("tuned", &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("its classifier (fc) has 10 classes, this data 3: fc starts afresh"),
        "{stdout}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model"]["stem"], "torchvision");
    assert_eq!(config["init"], tv.to_str().unwrap());
    let tuned = values(&out.join("last.safetensors"));
    assert_eq!(tuned["fc.weight"].len(), 3 * 512);
    assert_ne!(
        tuned["conv2.0.layer.0.weight"], ours["conv2.0.layer.0.weight"],
        "the backbone trains"
    );

    // Frozen: every weight and bias but the classifier's is the checkpoint's after training.
    let ((code, stdout, stderr), out) = run("frozen", &["--freeze-backbone"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("training only the classifier (fc)"), "{stdout}");
    let frozen = values(&out.join("last.safetensors"));
    let mut checked = 0;
    for (name, v) in &frozen {
        if name.ends_with(".weight") || name.ends_with(".bias") {
            if name.starts_with("fc.") {
                continue;
            }
            assert_eq!(v, &ours[name], "{name} is frozen");
            checked += 1;
        }
    }
    assert_eq!(checked, 60, "every conv and BatchNorm weight and bias");

    // Our own 3-class checkpoint onto CIFAR-10's 10 classes.
    let cifar = common::shared_dir().join("data/cifar10");
    let back = d.join("back");
    let (code, stdout, stderr) = cli(&[
        "train",
        "--data",
        cifar.to_str().unwrap(),
        "--init",
        d.join("tuned/last.safetensors").to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--threads",
        "1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("has 3 classes, this data 10: fc starts afresh"),
        "{stdout}"
    );

    // Refused before anything is written: a tensor that does not fit, a stem that differs.
    let mut bad = torchvision_formula_state();
    bad.get_mut("layer2.0.conv1.weight").unwrap().shape = vec![128, 64, 9, 1];
    let bad_path = d.join("bad.safetensors");
    std::fs::write(&bad_path, checkpoint::to_bytes(&bad, None)).unwrap();
    let nowhere = d.join("nowhere");
    let (code, _, stderr) = cli(&[
        "train",
        "--data",
        folder.to_str().unwrap(),
        "--init",
        bad_path.to_str().unwrap(),
        "--out",
        nowhere.to_str().unwrap(),
        "--max-steps",
        "1",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("bad.safetensors") && stderr.contains("'conv3.0.layer.0.weight' has shape [128, 64, 9, 1]"),
        "{stderr}"
    );
    assert!(!nowhere.exists(), "nothing written");
    let ((code, _, stderr), _) = run("stem", &["--stem", "seed"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--stem differs from the network in"), "{stderr}");
}

/// A classifier for the same class count must fit like every other tensor: `fc.weight` of
/// `[10, 7]` for 10 classes is refused by name (it was taken for "a classifier for another
/// class count" and started afresh), while one for 20 classes starts afresh.
#[test]
fn init_names_a_classifier_tensor_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = ResNet::new(&Cpu::default(), ResNetConfig::default(), 0);
    let mut state = checkpoint::state_dict(&Cpu::default(), &mut model);
    let narrow = |rows: usize, cols: usize| HostTensor {
        dtype: safetensors::Dtype::F32,
        shape: vec![rows, cols],
        bytes: vec![0u8; 4 * rows * cols],
    };
    state.insert("fc.weight".into(), narrow(10, 7));
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, checkpoint::to_bytes(&state, None)).unwrap();
    let data = common::shared_dir().join("data/cifar10");
    let args = |init: &Path, out: &str| {
        let out = dir.path().join(out);
        common::cli(&[
            "train",
            "--init",
            init.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--val-split",
            "49900",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let (code, _, err) = args(&bad, "bad");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("fc.weight") && err.contains("bad.safetensors"), "{err}");
    // Another class count: the classifier starts afresh.
    state.insert("fc.weight".into(), narrow(20, 512));
    state.insert(
        "fc.bias".into(),
        HostTensor {
            dtype: safetensors::Dtype::F32,
            shape: vec![20],
            bytes: vec![0u8; 80],
        },
    );
    let other = dir.path().join("other.safetensors");
    std::fs::write(&other, checkpoint::to_bytes(&state, None)).unwrap();
    let (code, out, err) = args(&other, "other");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("has 20 classes, this data 10: fc starts afresh"), "{out}");
}
