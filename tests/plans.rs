//! A run's compute choices travel with its checkpoints: `eval` (and `predict`) compute with the
//! precision and the Winograd choice the run recorded, unless their flags say otherwise.

mod common;

use resnet_cifar::checkpoint;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::{ResNet, ResNetConfig};
use std::collections::HashMap;
use std::path::Path;

/// The seed's network (fresh weights) saved with `meta`.
fn save(path: &Path, meta: &[(&str, &str)]) {
    let mut model = ResNet::new(&Cpu::default(), ResNetConfig::default(), 11);
    let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    checkpoint::save(path, &Cpu::default(), &mut model, Some(meta)).unwrap();
}

/// `eval`'s loss on 200 validation images, printed in full, and its stderr.
fn eval_loss(checkpoint: &Path, flags: &[&str]) -> (String, String) {
    let data = common::shared_dir().join("data/cifar10");
    let args = [
        "eval",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--split",
        "val",
        "--val-split",
        "200",
        "--json",
    ];
    let (code, out, err) = common::cli(&[&args[..], flags].concat());
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (v["loss"].to_string(), err)
}

#[test]
fn eval_computes_with_the_winograd_choice_and_precision_the_run_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (direct, fast) = (
        dir.path().join("direct.safetensors"),
        dir.path().join("fast.safetensors"),
    );
    save(&direct, &[("winograd", "false")]);
    save(&fast, &[("winograd", "true")]);
    let (direct_loss, _) = eval_loss(&direct, &[]);
    let (fast_loss, _) = eval_loss(&fast, &[]);
    assert_ne!(direct_loss, fast_loss, "the two paths round differently");
    // The same weights: the flag chooses as the metadata did.
    assert_eq!(eval_loss(&direct, &["--winograd", "true"]).0, fast_loss);
    assert_eq!(eval_loss(&fast, &["--winograd", "false"]).0, direct_loss);

    let bf16 = dir.path().join("bf16.safetensors");
    save(&bf16, &[("winograd", "true"), ("precision", "bf16")]);
    let (loss, err) = eval_loss(&bf16, &[]);
    if resnet_cifar::engine::cpu::bf16_support().is_ok() {
        assert_ne!(loss, fast_loss, "evaluated in bf16");
        assert_eq!(loss, eval_loss(&fast, &["--precision", "bf16"]).0);
        assert_eq!(eval_loss(&bf16, &["--precision", "fp32"]).0, fast_loss);
    } else {
        assert_eq!(loss, fast_loss, "evaluated in fp32");
        assert!(err.contains("was trained in bf16; computing in fp32"), "{err}");
    }
}
