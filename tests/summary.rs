//! `summary`: the module tree as PyTorch prints the seed's model, shapes, parameters, MACs.

mod common;

use resnet_cifar::engine::Shape4;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::{ResNet, ResNetConfig, Sequential, Stem, summarize, summarize_sequential};
use resnet_cifar::nn::Module;

#[test]
fn seed_model_prints_as_pytorch_prints_it() {
    // The fixture is PyTorch 2.15's print() of the seed's ResNet18
    // (python3 scripts/pytorch_interop.py --print-model).
    let want = include_str!("fixtures/seed_model_print.txt");
    let mut model = ResNet::new(&Cpu::default(), ResNetConfig::default(), 0);
    let s = summarize(&model, Shape4::new(64, 32, 32, 3), None);
    assert_eq!(s.tree, want);
    assert_eq!(s.total_params, model.num_params());
    assert_eq!(
        s.total_params, 11_181_642,
        "PyTorch's parameter count for the seed model"
    );
    let row = |name: &str| {
        s.rows
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    // Stem: 7x7x3 taps for each of 16x16x64 outputs of 64 images.
    assert_eq!(row("conv1.0").macs, 64 * 16 * 16 * 64 * 7 * 7 * 3);
    assert_eq!(row("conv1.2").output, [64, 64, 8, 8]);
    assert_eq!(row("conv3.0.shortcut.0").output, [64, 128, 4, 4]);
    assert_eq!(row("conv5.1.layer.4").output, [64, 512, 1, 1]);
    assert_eq!(row("fc").output, [64, 10]);
    assert_eq!(s.total_macs, s.rows.iter().map(|r| r.macs).sum::<u64>());
}

#[test]
fn variants_change_the_tree() {
    let model = ResNet::new(
        &Cpu::default(),
        ResNetConfig {
            stem: Stem::Cifar,
            stages: 3,
            num_classes: 10,
            image_size: 32,
        },
        0,
    );
    let s = summarize(&model, Shape4::new(2, 32, 32, 3), None);
    assert!(
        s.tree
            .contains("(0): Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)")
    );
    assert!(
        s.tree.contains("    (2): ReLU(inplace=True)\n  )"),
        "the cifar stem ends with a ReLU:\n{}",
        s.tree
    );
    assert!(!s.tree.contains("MaxPool2d") && !s.tree.contains("(conv5)"));
    assert!(s.tree.contains("Linear(in_features=256, out_features=10, bias=True)"));
    assert_eq!(
        s.rows.iter().find(|r| r.name == "conv4.1.layer.4").unwrap().output,
        [2, 256, 8, 8]
    );
}

#[test]
fn comparison_models_print_as_pytorch_prints_them() {
    // print() of the classes in scripts/classic_models.py (PyTorch 2.15).
    let input = Shape4::new(64, 32, 32, 3);
    let mut lenet = Sequential::lenet(&Cpu::default(), 10, 32, 0);
    let s = summarize_sequential(&lenet, input, None);
    assert_eq!(s.tree, include_str!("fixtures/lenet_print.txt"));
    let mut counted = 0;
    lenet.visit_params(&mut |p| counted += p.numel());
    assert_eq!(s.total_params, counted);
    assert_eq!(s.total_params, 145_578, "PyTorch's count");
    let row = |s: &resnet_cifar::model::Summary, name: &str| s.rows.iter().find(|r| r.name == name).unwrap().clone();
    assert_eq!(row(&s, "features.8").output, [64, 64, 4, 4]);
    assert_eq!(row(&s, "classifier.1").output, [64, 64]);
    assert_eq!(row(&s, "features.0").macs, 64 * 32 * 32 * 32 * 5 * 5 * 3);

    let vgg = Sequential::vgg16(&Cpu::default(), 10, 32, 0);
    let s = summarize_sequential(&vgg, input, None);
    assert_eq!(s.tree, include_str!("fixtures/vgg16_print.txt"));
    assert_eq!(s.total_params, 14_728_266, "PyTorch's count");
    assert_eq!(row(&s, "features.43").output, [64, 512, 1, 1]);
    assert_eq!(row(&s, "classifier").output, [64, 10]);
}

/// `summary --paths` prints the plan of every convolution on the backend its flags name: the
/// seed's network in fp32 takes im2col for its stem, Winograd's 6-point tiles on the 8x8 and
/// 4x4 maps, tap classes on 2x2 and 1x1; with `--winograd false` the 3x3s on 8x8 maps go
/// through im2col; the JSON rows carry the same.
#[test]
fn summary_paths_show_each_convolutions_plan() {
    let run = |args: &[&str]| {
        let (code, out, err) = common::cli(&[&["summary", "--paths", "--threads", "1"], args].concat());
        assert_eq!(code, 0, "{err}");
        out
    };
    let path_of = |out: &str, layer: &str| {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{layer} ")))
            .unwrap_or_else(|| panic!("{layer}: {out}"));
        line.split_whitespace().skip(5).collect::<Vec<_>>().join(" ")
    };
    let out = run(&[]);
    assert!(
        out.starts_with("convolution paths on cpu (1 thread), batch 64:"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 2 + 20, "a line per convolution: {out}");
    assert_eq!(path_of(&out, "conv1.0"), "im2col");
    assert_eq!(path_of(&out, "conv2.0.layer.0"), "Winograd F(4x4, 3x3)");
    assert_eq!(path_of(&out, "conv3.1.layer.3"), "Winograd F(4x4, 3x3)");
    assert_eq!(path_of(&out, "conv4.1.layer.0"), "tap classes");
    assert_eq!(path_of(&out, "conv5.1.layer.3"), "tap classes");
    let out = run(&["--winograd", "false"]);
    assert!(out.contains("no Winograd"), "{out}");
    assert_eq!(path_of(&out, "conv2.0.layer.0"), "im2col");
    let (code, json, err) = common::cli(&["summary", "--paths", "--json", "--stem", "cifar"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let planned: Vec<_> = rows.iter().filter(|r| r.get("path").is_some()).collect();
    assert_eq!(planned.len(), 20);
    assert!(planned.iter().all(|r| r["layer"] == "Conv2d"));
    assert_eq!(planned[1]["path"], "Winograd F(4x4, 3x3)", "{json}");
    assert_eq!(planned[1]["conv"], "64x32x32 -> 64, 3x3/1", "{json}");
    // Without --paths nothing is planned.
    let (_, json, _) = common::cli(&["summary", "--json"]);
    assert!(!json.contains("\"path\""));
}

/// `bench --layers` times every convolution alone, with its plan: one entry a convolution,
/// in the network's order, with positive times and the paths `summary --paths` prints.
#[test]
fn bench_layers_times_each_convolution_with_its_path() {
    let args = [
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--json",
    ];
    let (code, json, err) = common::cli(&[&["bench", "--layers"], &args[..]].concat());
    assert_eq!(code, 0, "{err}");
    let times: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let (code, paths, err) = common::cli(&["summary", "--paths", "--json", "--batch-size", "2"]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&paths).unwrap();
    let planned: Vec<&serde_json::Value> = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("path").is_some())
        .collect();
    assert_eq!(times.len(), planned.len(), "{json}");
    for (t, row) in times.iter().zip(planned) {
        assert_eq!(
            (&t["name"], &t["path"], &t["conv"]),
            (&row["name"], &row["path"], &row["conv"])
        );
        for key in ["forward_ms", "backward_ms"] {
            assert!(t[key].as_f64().is_some_and(|ms| ms > 0.0), "{key}: {t}");
        }
    }
}
