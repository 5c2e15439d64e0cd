//! `resnet-cifar export`: every architecture, stem and stage count, at CIFAR's shape and at
//! another image size and class count, written as ONNX that `onnx.checker` accepts and
//! onnxruntime runs to our eval logits (within 1e-4) on real CIFAR-10 images, at batch 7 and
//! batch 1; bad requests refused in one line with no file left behind.
//!
//! onnxruntime is a Python package (`pip install onnx onnxruntime numpy`): without it these
//! tests report themselves skipped (`resnet_cifar::test_support::skip`) and pass, except where
//! `RESNET_CIFAR_REQUIRE` names `onnx` (CI's does), where they fail.

mod common;

use common::cli;
use resnet_cifar::checkpoint;
use resnet_cifar::data::{Cifar10, DataSpec, Normalization};
use resnet_cifar::engine::Shape4;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::{Arch, Network, ResNetConfig, Stem, build};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// True when Python has onnx and onnxruntime; otherwise reports the skip (or fails, where
/// `RESNET_CIFAR_REQUIRE` names `onnx`).
fn onnxruntime() -> bool {
    static FOUND: OnceLock<Result<(), String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import onnx, onnxruntime, numpy"])
            .output()
            .map_err(|e| format!("python3: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    });
    match found {
        Ok(()) => true,
        Err(e) => {
            let why = format!("pip install onnx onnxruntime numpy: {e}");
            resnet_cifar::test_support::skip("onnx", "running the exported model in onnxruntime", &why);
            false
        }
    }
}

const IMAGES: usize = 7;

/// `IMAGES` CIFAR-10 training images at `side` (nearest-neighbour scaled from 32), normalised,
/// as NCHW (planes, as the files store them).
fn real_images(side: usize) -> Vec<f32> {
    static DATA: OnceLock<resnet_cifar::data::Dataset> = OnceLock::new();
    let data = DATA.get_or_init(|| Cifar10::load(&common::shared_dir().join("data/cifar10")).unwrap());
    let mut x = Vec::with_capacity(IMAGES * 3 * side * side);
    for i in 0..IMAGES {
        // Images from across the file, not the first few alone.
        let px = &data.train.pixels[i * 997 * 3072..][..3072];
        for c in 0..3 {
            for y in 0..side {
                for xx in 0..side {
                    let v = px[c * 1024 + (y * 32 / side) * 32 + xx * 32 / side];
                    x.push(Normalization::CIFAR10.apply(v, c));
                }
            }
        }
    }
    x
}

fn nchw_to_nhwc(x: &[f32], n: usize, side: usize) -> Vec<f32> {
    let plane = side * side;
    let mut out = vec![0.0; x.len()];
    for i in 0..n {
        for c in 0..3 {
            for p in 0..plane {
                out[(i * plane + p) * 3 + c] = x[(i * 3 + c) * plane + p];
            }
        }
    }
    out
}

fn write_f32(path: &Path, values: &[f32]) {
    std::fs::write(path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

/// A model of `arch` whose batch-norm running statistics are no longer the initial 0 and 1:
/// a few training-mode passes over real images moved them, as training does.
fn model_with_statistics(arch: Arch, cfg: ResNetConfig) -> Box<dyn Network<Cpu>> {
    let mut model = build(&Cpu::default(), arch, cfg, 3);
    let side = cfg.image_size;
    let x = nchw_to_nhwc(&real_images(side), IMAGES, side);
    for _ in 0..3 {
        model.forward(&Cpu::default(), &x, Shape4::new(IMAGES, side, side, 3), true);
    }
    model
}

/// Saves `model` as a checkpoint of `arch` and `cfg` trained on `classes` classes, exports it
/// with `extra` flags, and runs the checker; returns its JSON report.
fn export_and_check(arch: Arch, cfg: ResNetConfig, extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut model = model_with_statistics(arch, cfg);
    let side = cfg.image_size;
    let spec = DataSpec {
        classes: (0..cfg.num_classes).map(|i| format!("kind {i}")).collect(),
        image_size: side,
        norm: Normalization::CIFAR10,
    };
    let meta = HashMap::from([
        ("arch".to_string(), arch.name().to_string()),
        ("model".to_string(), serde_json::to_string(&cfg).unwrap()),
        ("dataset".to_string(), serde_json::to_string(&spec).unwrap()),
    ]);
    let ckpt = dir.path().join("model.safetensors");
    checkpoint::save(&ckpt, &Cpu::default(), model.as_mut(), Some(meta)).unwrap();

    let out = dir.path().join("model.onnx");
    let mut args = vec![
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = cli(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");

    let x = real_images(side);
    let nhwc = nchw_to_nhwc(&x, IMAGES, side);
    model.forward(&Cpu::default(), &nhwc, Shape4::new(IMAGES, side, side, 3), false);
    let logits = common::get(&Cpu::default(), model.logits(), IMAGES * cfg.num_classes);
    // Logits that differ between images (a difference of 1e-4 means something against them).
    let spread = logits.iter().fold(0f32, |m, &v| m.max(v)) - logits.iter().fold(0f32, |m, &v| m.min(v));
    assert!(spread > 0.02, "logits too alike to compare: spread {spread}");
    let (input, expected) = (dir.path().join("x.f32"), dir.path().join("logits.f32"));
    write_f32(&input, &x);
    write_f32(&expected, &logits);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx_check.py");
    let n = IMAGES.to_string();
    let s = side.to_string();
    let run = Command::new("python3")
        .args([script.to_str().unwrap(), out.to_str().unwrap(), input.to_str().unwrap()])
        .args([n.as_str(), "3", &s, &s, expected.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    for (name, r) in report["runs"].as_object().unwrap() {
        let diff = r["max_abs_diff"].as_f64().unwrap();
        assert!(
            diff < 1e-4,
            "{arch:?} {cfg:?} {name}: onnxruntime's logits differ by {diff}"
        );
    }
    assert_eq!(report["output"], "logits");
    assert_eq!(report["input"][0], "input");
    let meta = &report["metadata"];
    let classes: Vec<String> = serde_json::from_str(meta["classes"].as_str().unwrap()).unwrap();
    assert_eq!(classes, spec.classes);
    let mean: Vec<f32> = serde_json::from_str(meta["mean"].as_str().unwrap()).unwrap();
    assert_eq!(mean, Normalization::CIFAR10.mean);
    assert_eq!(meta["image_size"], side.to_string());
    report
}

fn resnet(stem: Stem, stages: usize, num_classes: usize, image_size: usize) -> ResNetConfig {
    ResNetConfig {
        stem,
        stages,
        num_classes,
        image_size,
    }
}

#[test]
fn the_seed_model_runs_in_onnxruntime_at_any_batch() {
    if !onnxruntime() {
        return;
    }
    let report = export_and_check(Arch::Resnet18, ResNetConfig::default(), &[]);
    assert_eq!(report["runs"]["batch"]["shape"], serde_json::json!([IMAGES, 10]));
    assert_eq!(report["runs"]["single"]["shape"], serde_json::json!([1, 10]));
    assert_eq!(report["input"][1], serde_json::json!(["batch", 3, 32, 32]));
    assert_eq!(report["opset"], 17);
    let ops = serde_json::json!([
        "Add",
        "BatchNormalization",
        "Conv",
        "Flatten",
        "Gemm",
        "GlobalAveragePool",
        "MaxPool",
        "Relu"
    ]);
    assert_eq!(report["ops"], ops);
}

#[test]
fn every_stem_and_stage_count_exports() {
    if !onnxruntime() {
        return;
    }
    export_and_check(Arch::Resnet18, resnet(Stem::Cifar, 4, 10, 32), &[]);
    export_and_check(Arch::Resnet18, resnet(Stem::Torchvision, 3, 10, 32), &[]);
    // Your own images: another size and class count, a fixed batch, the oldest opset.
    let report = export_and_check(
        Arch::Resnet18,
        resnet(Stem::Seed3x3, 4, 3, 48),
        &["--batch", "7", "--opset", "9"],
    );
    assert_eq!(report["input"][1], serde_json::json!([7, 3, 48, 48]));
    assert_eq!(
        (report["opset"].as_i64(), report["ir_version"].as_i64()),
        (Some(9), Some(4))
    );
    assert!(report["runs"].get("single").is_none());
}

#[test]
fn lenet_vgg16_and_airbench_export() {
    if !onnxruntime() {
        return;
    }
    let cfg = |num_classes, image_size| ResNetConfig {
        num_classes,
        image_size,
        ..ResNetConfig::default()
    };
    export_and_check(Arch::Lenet, cfg(10, 32), &[]);
    export_and_check(Arch::Vgg16, cfg(10, 32), &["--opset", "23"]);
    // A flattened 5x5 (LeNet) and 2x2 (VGG) feature map: the classifier's weight order.
    export_and_check(Arch::Lenet, cfg(4, 40), &[]);
    export_and_check(Arch::Vgg16, cfg(5, 64), &[]);
    // GELU as Erf nodes, the logits' Mul, a linear layer without bias; and a 2x2 final map.
    export_and_check(Arch::Airbench, cfg(10, 32), &[]);
    export_and_check(Arch::Airbench, cfg(7, 64), &[]);
}

/// Refused in one line with exit 2, and `out` not created.
fn assert_refused(args: &[&str], out: &Path, says: &str) {
    let (code, stdout, stderr) = cli(args);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(says), "{stderr}");
    assert!(!out.exists(), "{} was written", out.display());
}

#[test]
fn bad_requests_are_refused_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut model = build(&Cpu::default(), Arch::Resnet18, ResNetConfig::default(), 1);
    let ckpt = d.join("model.safetensors");
    checkpoint::save(&ckpt, &Cpu::default(), model.as_mut(), None).unwrap();
    let (ck, out) = (ckpt.to_str().unwrap(), d.join("model.onnx"));
    let o = out.to_str().unwrap();

    assert_refused(
        &["export", "--checkpoint", "/nonexistent/m.safetensors", "--out", o],
        &out,
        "m.safetensors",
    );
    let foreign = d.join("notes.safetensors");
    std::fs::write(&foreign, b"not a safetensors file").unwrap();
    assert_refused(
        &["export", "--checkpoint", foreign.to_str().unwrap(), "--out", o],
        &out,
        "notes.safetensors",
    );
    // A real safetensors file holding something other than a model (a test fixture's tensors).
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed_20_steps.safetensors");
    assert_refused(
        &["export", "--checkpoint", other.to_str().unwrap(), "--out", o],
        &out,
        "not a state_dict",
    );
    assert_refused(
        &["export", "--checkpoint", ck, "--out", o, "--opset", "8"],
        &out,
        "opset 8",
    );
    assert_refused(
        &["export", "--checkpoint", ck, "--out", o, "--opset", "24"],
        &out,
        "opsets 9 to 23",
    );
    assert_refused(
        &["export", "--checkpoint", ck, "--out", o, "--batch", "0"],
        &out,
        "batch",
    );
    let missing = d.join("no/such/folder/model.onnx");
    assert_refused(
        &["export", "--checkpoint", ck, "--out", missing.to_str().unwrap()],
        &missing,
        "cannot write",
    );
    assert_refused(
        &["export", "--checkpoint", ck, "--out", d.to_str().unwrap()],
        &d.join("x"),
        "is a folder",
    );

    // A good request replaces a file whole; nothing temporary is left beside it.
    std::fs::write(&out, b"old").unwrap();
    let (code, _, stderr) = cli(&["export", "--checkpoint", ck, "--out", o]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        std::fs::metadata(&out).unwrap().len() > 40_000_000,
        "the seed model's weights are 44 MB"
    );
    let names: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}
