//! Real training on the shared CIFAR-10 files, the run folder it leaves (TensorBoard events read
//! back by a reader written here from the TFRecord and protobuf formats, not by the crate that
//! wrote them), and the `eval` command's JSON on the checkpoint it produced.

mod common;

use common::cli;

use resnet_cifar::data::{Cifar10, Splits};
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::train::{Console, Recipe, RunPlan, Start, train};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

/// (tag, step, value) of every scalar in a TensorBoard event file.
fn read_scalars(path: &Path) -> Vec<(String, i64, f32)> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        // TFRecord: u64 length, u32 masked CRC of the length, data, u32 masked CRC of the data.
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(
            masked_crc(data),
            u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()),
            "record CRC"
        );
        at += 16 + len;
        // Event: 2 = step (varint), 5 = summary; Summary: 1 = value; Value: 1 = tag, 2 = simple_value.
        let mut step = 0;
        for (field, v) in fields(data) {
            match (field, v) {
                (2, Field::Varint(s)) => step = s as i64,
                (5, Field::Bytes(summary)) => {
                    for (f, value) in fields(summary) {
                        let (1, Field::Bytes(value)) = (f, value) else { continue };
                        let (mut tag, mut x) = (String::new(), f32::NAN);
                        for (g, item) in fields(value) {
                            match (g, item) {
                                (1, Field::Bytes(t)) => tag = String::from_utf8(t.to_vec()).unwrap(),
                                (2, Field::Fixed32(bits)) => x = f32::from_bits(bits),
                                _ => {}
                            }
                        }
                        out.push((tag, step, x));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn fields(mut b: &[u8]) -> Vec<(u64, Field<'_>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[0];
            *b = &b[1..];
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let f = match key & 7 {
            0 => Field::Varint(varint(&mut b)),
            1 => {
                b = &b[8..];
                Field::Fixed64
            }
            2 => {
                let n = varint(&mut b) as usize;
                let (d, rest) = b.split_at(n);
                b = rest;
                Field::Bytes(d)
            }
            5 => {
                let v = u32::from_le_bytes(b[..4].try_into().unwrap());
                b = &b[4..];
                Field::Fixed32(v)
            }
            t => panic!("unexpected wire type {t}"),
        };
        out.push((key >> 3, f));
    }
    out
}

/// CRC-32C (Castagnoli), masked as TFRecord does.
fn masked_crc(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    let crc = !crc;
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[test]
fn a_few_hundred_steps_learn_well_above_chance() {
    // 10,000 training images (157 steps an epoch), two epochs of the seed recipe; the last
    // 2,000 of the 50,000 images for validation.
    let data = Cifar10::load(&common::shared_dir().join("data/cifar10")).unwrap();
    let all = Splits::new(data, 2000, None).unwrap();
    let splits = Splits {
        train: std::sync::Arc::new(all.train.slice(0..10_000)),
        val: all.val.clone(),
        val_method: all.val_method,
        test: None,
        spec: all.spec.clone(),
    };
    let mut cfg = Recipe::Seed.config();
    cfg.epochs = 2.0;
    cfg.val_split = 2000;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let outcome = train(
        &Cpu::default(),
        RunPlan {
            cfg: cfg.clone(),
            start: Start::Fresh,
            out: run.to_path_buf(),
            overwrite: false,
        },
        &splits,
        &mut Console::quiet(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(outcome.steps, 314);
    let acc = outcome.last_eval.as_ref().unwrap().accuracy;
    eprintln!("validation accuracy after 314 steps: {acc:.4}");
    assert!(acc > 0.25, "chance is 0.10; measured here 0.34: got {acc}");

    // The run folder.
    for f in [
        "config.json",
        "metrics.jsonl",
        "last.safetensors",
        "best.safetensors",
        "train_state.safetensors",
        "checkpoints/epoch-1.safetensors",
        "checkpoints/epoch-2.safetensors",
    ] {
        assert!(run.join(f).is_file(), "{f} written");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["recipe"], "seed");
    assert_eq!(config["epochs"], 2.0);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        lines.iter().filter(|l| l["kind"] == "train").count(),
        3,
        "train loss at steps 100, 200, 300"
    );
    assert_eq!(lines.iter().filter(|l| l["kind"] == "eval").count(), 2);
    for l in lines.iter().filter(|l| l["kind"] == "eval") {
        let seconds = l["train_seconds"].as_f64().unwrap();
        assert!(seconds > 0.0 && seconds < 600.0, "an epoch's training time: {seconds}");
    }

    // TensorBoard: the seed's scalars at the seed's steps.
    let tb: Vec<_> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(tb.len(), 1, "one event file");
    assert!(
        tb[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("events.out.tfevents.")
    );
    let scalars = read_scalars(&tb[0]);
    let steps = |tag: &str| scalars.iter().filter(|s| s.0 == tag).map(|s| s.1).collect::<Vec<_>>();
    assert_eq!(steps("train_loss"), [100, 200, 300]);
    assert_eq!(steps("test_loss"), [0, 1]);
    assert_eq!(steps("test_accuracy"), [0, 1]);
    assert_eq!(steps("lr"), [0, 1]);
    let lr: Vec<f32> = scalars.iter().filter(|s| s.0 == "lr").map(|s| s.2).collect();
    assert_eq!(lr, [0.01, 0.005]);
    let tb_acc = scalars.iter().rfind(|s| s.0 == "test_accuracy").unwrap().2;
    assert_eq!(tb_acc, acc as f32);

    // eval --json on the checkpoint reports what the run measured.
    let out = Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
        .args(["eval", "--json", "--split", "val", "--checkpoint"])
        .arg(run.join("last.safetensors"))
        .arg("--data")
        .arg(common::shared_dir().join("data/cifar10"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["accuracy"].as_f64().unwrap(),
        acc,
        "val split size comes from the checkpoint"
    );
    assert_eq!(v["images"], 2000);
    assert!(v["loss"].as_f64().unwrap() > 0.0);
    assert_eq!(v["per_class"].as_array().unwrap().len(), 10);
    let confusion = v["confusion"].as_array().unwrap();
    let total: u64 = confusion
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(total, 2000);

    // eval --tta scores the same images, with the flip (and shifts) averaged in.
    let eval_tta = |tta: &str| -> serde_json::Value {
        let (code, out, err) = cli(&[
            "eval",
            "--json",
            "--tta",
            tta,
            "--split",
            "val",
            "--checkpoint",
            run.join("last.safetensors").to_str().unwrap(),
            "--data",
            common::shared_dir().join("data/cifar10").to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let flip = eval_tta("flip");
    assert_eq!(flip["images"], 2000);
    assert_ne!(flip["loss"], v["loss"], "flip TTA changes the logits");
    let shifted = eval_tta("flip-shift");
    assert_ne!(shifted["loss"], flip["loss"], "shifted views change the logits again");
    let shifted1 = eval_tta("flip-shift1");
    assert_ne!(shifted1["loss"], flip["loss"], "1-pixel shifts change the logits too");
    assert_ne!(shifted1["loss"], shifted["loss"], "and differently from 2-pixel ones");

    // plot draws the run's curves from its metrics.jsonl.
    let plots = dir.path().join("plots");
    let (code, out, err) = cli(&["plot", run.to_str().unwrap(), "--out", plots.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");
    for f in ["train_loss.png", "eval_loss.png", "accuracy.png", "lr.png"] {
        let img = image::open(plots.join(f)).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (900, 540), "{f}");
        // Something besides the white background and grey grid: the blue curve.
        let blue = img.pixels().filter(|p| p[2] > 150 && p[0] < 80).count();
        assert!(blue > 200, "{f}: {blue} curve pixels");
    }
}

#[test]
fn durations_read_as_a_person_would_say_them() {
    use resnet_cifar::train::console::duration;
    assert_eq!(duration(0.2), "0 s");
    assert_eq!(duration(42.4), "42 s");
    assert_eq!(duration(59.6), "1 min 0 s");
    assert_eq!(duration(425.0), "7 min 5 s");
    assert_eq!(duration((3 * 3600 + 12 * 60 + 29) as f64), "3 h 12 min");
}

#[test]
fn plot_refuses_a_folder_without_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = cli(&["plot", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("metrics.jsonl"), "{err}");
    std::fs::write(dir.path().join("metrics.jsonl"), "{\"kind\": \"train\"\n").unwrap();
    let (code, _, err) = cli(&["plot", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = cli(&["train", "--data", d, "--out", &format!("{d}/run")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("the folder is empty"),
        "{err}"
    );
    let (code, _, err) = cli(&["train", "--batch-size", "0"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&["train", "--stem", "huge"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown stem 'huge'"), "{err}");
    // Absurd numbers: each refused before any work, naming the flag.
    let data = common::shared_dir().join("data/cifar10");
    let data = data.to_str().unwrap();
    for (args, says) in [
        (vec!["train", "--epochs", "-3"], "--epochs"),
        (
            vec!["train", "--data", data, "--lr", "-1"],
            "--lr must be a positive number",
        ),
        (
            vec!["train", "--data", data, "--label-smoothing", "1.5"],
            "--label-smoothing",
        ),
        (
            vec!["train", "--data", data, "--weight-decay", "-0.1"],
            "--weight-decay",
        ),
        (vec!["train", "--threads", "0"], "--threads must be at least 1"),
        (vec!["train", "--tta", "sideways"], "sideways"),
        (vec!["train", "--crop-pad", "17"], "--crop-pad"),
        (vec!["train", "--zero-init-residual", "maybe"], "--zero-init-residual"),
        (vec!["predict", "--checkpoint", "x", "--top-k", "0", "a.png"], "--top-k"),
        (vec!["bench", "--device", "tpu"], "unknown device 'tpu'"),
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, _, err) = cli(&["eval", "--checkpoint", &format!("{d}/missing.safetensors")]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.safetensors"), "{err}");
    // A run folder where a checkpoint belongs: the error names the two to choose from.
    let run = format!("{d}/run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(format!("{run}/last.safetensors"), b"").unwrap();
    for args in [
        vec!["eval", "--checkpoint", &run],
        vec!["predict", "--checkpoint", &run, "x.png"],
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("is a run folder")
                && err.contains("run/best.safetensors")
                && err.contains("run/last.safetensors"),
            "{args:?}: {err}"
        );
    }
    let empty = format!("{d}/empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = cli(&["eval", "--checkpoint", &empty]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("empty is a folder without checkpoints"), "{err}");
    let (code, out, _) = cli(&["train", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Recipes:") && out.contains("seed") && out.contains("lr 0.01/(epoch+1)"),
        "{out}"
    );
    // --threads, --device and --precision belong to the commands that compute (and to summary,
    // whose --paths describes a backend's plans), and only to them.
    for (command, computes) in [
        ("train", true),
        ("eval", true),
        ("bench", true),
        ("predict", true),
        ("plot", false),
        ("summary", true),
        ("export", false),
    ] {
        let (code, out, err) = cli(&[command, "--help"]);
        assert_eq!(code, 0, "{command}: {err}");
        for flag in ["--threads", "--device", "--precision"] {
            assert_eq!(out.contains(flag), computes, "{command} --help and {flag}: {out}");
        }
    }
    // Every format the decoder reads.
    let (_, out, _) = cli(&["predict", "--help"]);
    for format in resnet_cifar::data::folder::IMAGE_EXTENSIONS {
        let named = match format {
            "jpg" | "jpeg" => "JPEG".to_string(),
            "webp" => "WebP".to_string(),
            other => other.to_uppercase(),
        };
        assert!(out.contains(&named), "predict --help names {named}: {out}");
    }
    let (code, _, err) = cli(&["bench", "--precision", "fp16"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown precision 'fp16' (expected fp32, bf16 or tf32)"),
        "{err}"
    );
}

#[test]
fn a_toml_config_file_sets_a_run_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = d.join("run");
    let file = d.join("run.toml");
    std::fs::write(
        &file,
        format!(
            "recipe = \"fast\"\nepochs = 3\nmax_steps = 5\nval_split = 1000\nstem = \"seed3x3\"\nstages = 3\ncrop_pad = 2\nalternate_flip = true\nzero_init_residual = true\ndecay_1d = false\ndata = {:?}\nout = {:?}\n",
            common::shared_dir().join("data/cifar10").display().to_string(),
            run.display().to_string()
        ),
    )
    .unwrap();
    let (code, _, err) = cli(&[
        "train",
        "--config",
        file.to_str().unwrap(),
        "--max-steps",
        "2",
        "--batch-size",
        "16",
    ]);
    assert_eq!(code, 0, "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["recipe"], "fast", "from the file");
    assert_eq!(config["epochs"], 3.0, "from the file");
    assert_eq!(config["val_split"], 1000, "from the file");
    assert_eq!(config["model"]["stem"], "seed3x3", "from the file");
    assert_eq!(config["model"]["stages"], 3, "from the file");
    assert_eq!(config["augment"]["crop_pad"], 2, "from the file");
    assert_eq!(config["augment"]["alternate_flip"], true, "from the file");
    assert_eq!(config["zero_init_residual"], true, "from the file");
    assert_eq!(config["optimizer"]["decay_1d"], false, "from the file");
    assert_eq!(config["max_steps"], 2, "the flag wins");
    assert_eq!(config["batch_size"], 16, "the flag wins");
    assert_eq!(
        config["label_smoothing"].as_f64().unwrap() as f32,
        0.1,
        "the recipe's value stays"
    );

    // Mistakes in the file: one line naming the file and what is wrong.
    for (text, says) in [
        ("epochs = 3\nepoch = 4\n", "epoch"),
        ("stem = \"huge\"\n", "unknown stem 'huge'"),
        ("recipe = \"quick\"\n", "unknown recipe 'quick'"),
        ("epochs = \"many\"\n", "epochs"),
        ("epochs = [\n", "run.toml"),
        ("crop_pad = 20\n", "crop_pad must be 0 to 16, got 20"),
        ("stages = 5\n", "stages must be 3 to 4"),
        ("cutout = 257\n", "cutout must be 0 to 256"),
        ("max_steps = 0\n", "max_steps must be at least 1"),
        ("zero_init_residual = \"yes\"\n", "zero_init_residual"),
        ("image_size = 8\n", "image_size must be 16 to 256, got 8"),
        ("mean = [0.5, 0.5]\n", "mean"),
        // Values TOML has and JSON does not (the merge once dropped them silently, or
        // panicked on an array), and bad values, named by the file and the key.
        ("lr = nan\n", "lr must be a positive number, got NaN"),
        ("lr = inf\n", "lr must be a positive number, got inf"),
        ("label_smoothing = nan\n", "label_smoothing must be in [0, 1), got NaN"),
        ("weight_decay = nan\n", "weight_decay must be 0 or more, got NaN"),
        ("mean = [nan, 0.5, 0.5]\n", "mean values must be finite, got NaN"),
        ("std = [0.2, 0.0, 0.2]\n", "std values must be positive, got 0"),
        ("lr = -1\n", "lr must be a positive number, got -1"),
        ("labels = \"medium\"\n", "unknown label set 'medium'"),
    ] {
        std::fs::write(&file, text).unwrap();
        let (code, _, err) = cli(&["train", "--config", file.to_str().unwrap()]);
        assert_eq!(code, 2, "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("run.toml") && err.contains(says), "{text}: {err}");
    }
}

#[test]
fn disk_full_and_unwritable_output_say_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = common::shared_dir().join("data/cifar10");
    let data = data.to_str().unwrap();
    let args = |out: &str| {
        [
            "train",
            "--data",
            data,
            "--val-split",
            "1000",
            "--batch-size",
            "8",
            "--max-steps",
            "101",
            "--out",
            out,
        ]
        .map(String::from)
    };
    let run = |out: &str| {
        let a = args(out);
        cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // The run folder cannot be made: a file stands where a folder must go.
    let file = d.join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let (code, _, err) = run(&format!("{}/run", file.display()));
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("plain-file/run") && err.contains("cannot create"), "{err}");

    // Disk full: the metrics log of a resumed run goes to /dev/full, which refuses every
    // write (ENOSPC).
    if Path::new("/dev/full").exists() {
        let out = d.join("full");
        let mut first = args(out.to_str().unwrap());
        first[8] = "1".into(); // --max-steps 1
        let (code, _, err) = cli(&first.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 0, "{err}");
        std::fs::remove_file(out.join("metrics.jsonl")).unwrap();
        std::os::unix::fs::symlink("/dev/full", out.join("metrics.jsonl")).unwrap();
        let (code, _, err) = cli(&["train", "--resume", out.to_str().unwrap(), "--max-steps", "101"]);
        assert_eq!(code, 1, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("metrics.jsonl: write failed") && err.contains("No space left on device"),
            "{err}"
        );
    }
}

#[test]
fn the_comparison_models_train_evaluate_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::shared_dir().join("data/cifar10");
    for model in ["lenet", "vgg16"] {
        let run = dir.path().join(model);
        let (code, _, err) = cli(&[
            "train",
            "--model",
            model,
            "--data",
            data.to_str().unwrap(),
            "--val-split",
            "1000",
            "--batch-size",
            "8",
            "--max-steps",
            "3",
            "--out",
            run.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{model}: {err}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["arch"], model);
        // eval finds the architecture in the checkpoint.
        let (code, out, err) = cli(&[
            "eval",
            "--json",
            "--split",
            "val",
            "--checkpoint",
            run.join("last.safetensors").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--batch-size",
            "500",
        ]);
        assert_eq!(code, 0, "{model}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["images"], 1000);
        let (code, out, err) = cli(&["bench", "--model", model, "--steps", "1", "--warmup", "0", "--json"]);
        assert_eq!(code, 0, "{model}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["model"], model);
        assert!(v["train_images_per_sec"].as_f64().unwrap() > 0.0);
    }
    let (code, _, err) = cli(&["train", "--model", "alexnet"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown model 'alexnet'"), "{err}");
}

/// Every setting is declared once: each TOML key is a flag of `train` with the same name, both
/// fill the same struct, flags win over the file, and a resumed run names what it refuses.
#[test]
fn settings_are_flags_and_toml_keys_alike() {
    use clap::{CommandFactory, Parser};
    use resnet_cifar::train::Settings;
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        settings: Settings,
    }
    // A file that gives every setting.
    let every = r#"
        recipe = "fast"
        data = "d"
        labels = "coarse"
        image_size = 48
        skip_bad_images = true
        mean = [0.5, 0.4, 0.3]
        std = [0.2, 0.2, 0.2]
        out = "o"
        overwrite = true
        init = "i.safetensors"
        freeze_backbone = true
        epochs = 3
        batch_size = 16
        drop_last = true
        lr = 0.1
        max_steps = 9
        log_every = 10
        val_split = 100
        shuffle = false
        sync_bn = true
        seed = 4
        winograd = false
        label_smoothing = 0.2
        loss_reduction = "sum"
        weight_decay = 0.001
        momentum = 0.8
        norm_lr_scale = 4.0
        whiten_init = true
        whiten_bias_epochs = 2
        lookahead_every = 5
        lookahead_decay = 0.5
        eval_every = 2
        tta = "flip-shift"
        decay_1d = false
        zero_init_residual = true
        crop_pad = 2
        crop_reflect = true
        flip = false
        alternate_flip = true
        cutout = 8
        model = "vgg16"
        stem = "cifar"
        stages = 3
    "#;
    let file: Settings = toml::from_str(every).unwrap();
    let keys = file.given();
    let command = Flags::command();
    let flags: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(String::from))
        .collect();
    assert_eq!(
        keys.len(),
        flags.len(),
        "the file above gives every setting: {keys:?} / {flags:?}"
    );
    for key in &keys {
        assert!(flags.contains(&key.replace('_', "-")), "TOML key {key} has no flag");
    }
    // Flags parse into the same struct; they win over the file key by key.
    let cli = Flags::try_parse_from(["t", "--epochs", "7", "--shuffle", "--flip", "true"])
        .unwrap()
        .settings;
    let merged = cli.or(file.clone());
    assert_eq!(
        (merged.epochs, merged.shuffle, merged.flip, merged.seed),
        (Some(7.0), Some(true), Some(true), Some(4))
    );
    let cfg = merged.resolve().unwrap();
    assert_eq!(
        (cfg.epochs, cfg.shuffle, cfg.augment.flip, cfg.augment.cutout),
        (7.0, true, true, 8)
    );
    // The settings airbench's recipe brought, each where it acts.
    let sgd = match cfg.optimizer {
        resnet_cifar::train::OptimizerConfig::Sgd(s) => s,
        other => panic!("the fast recipe's SGD, not {other:?}"),
    };
    assert_eq!((sgd.momentum, sgd.norm_lr_scale), (0.8, 4.0));
    assert_eq!(
        (
            cfg.drop_last,
            cfg.whiten_init,
            cfg.whiten_bias_epochs,
            cfg.eval_every,
            cfg.augment.reflect
        ),
        (true, true, Some(2), 2, true)
    );
    assert_eq!(cfg.loss_reduction, resnet_cifar::train::Reduction::Sum);
    let lookahead = resnet_cifar::train::Lookahead { every: 5, decay: 0.5 };
    assert_eq!(cfg.lookahead, Some(lookahead));
    // A recipe's shuffling can be turned off, from the file or with a value on the flag.
    assert!(!file.resolve().unwrap().shuffle, "shuffle = false in the file");
    let off = Flags::try_parse_from(["t", "--recipe", "fast", "--shuffle", "false"])
        .unwrap()
        .settings;
    assert!(!off.resolve().unwrap().shuffle);
    assert!(Recipe::Fast.config().shuffle, "the recipe shuffles");
    // On resume only --epochs, --max-steps and --data may change.
    let resume = Flags::try_parse_from(["t", "--epochs", "9", "--max-steps", "3", "--data", "x"])
        .unwrap()
        .settings;
    assert_eq!(resume.refused_on_resume(), None);
    let seed = Flags::try_parse_from(["t", "--epochs", "9", "--image-size", "64"])
        .unwrap()
        .settings;
    assert_eq!(seed.refused_on_resume().as_deref(), Some("--image-size"));
}

/// A binary built without MPI, started by `mpirun -np 2`, says so instead of training twice.
#[cfg(not(feature = "mpi"))]
#[test]
fn several_ranks_need_the_mpi_build() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
        .args(["train", "--data", "/nonexistent", "--max-steps", "1"])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("built without MPI") && err.contains("--features mpi"),
        "{err}"
    );
}

/// Cutout's bound follows the image size: a square larger than the run's images is refused
/// naming their size, and one larger than CIFAR's 32 pixels trains on larger images.
#[test]
fn cutout_is_bounded_by_the_images_size() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::shared_dir().join("data/cifar10");
    let run = |cutout: &str, size: &str, out: &str| {
        let out = dir.path().join(out);
        cli(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--val-split",
            "49900",
            "--model",
            "lenet",
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--cutout",
            cutout,
            "--image-size",
            size,
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let (code, _, err) = run("40", "32", "small");
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim(), "error: --cutout 40 is larger than the images (32x32)");
    assert!(!dir.path().join("small").exists(), "nothing written");
    let (code, out, err) = run("40", "64", "large");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stopped after 1 steps"), "{out}");
}

/// A closed stdout ends the program quietly (`resnet-cifar summary | head -1`), exit 0, no
/// panic message; and `--threads` has an upper bound, refused in one line.
#[test]
fn a_closed_pipe_ends_quietly_and_threads_are_bounded() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
        .args(["summary", "--model", "vgg16"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes before the model is built and printed.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
    let (code, _, err) = cli(&["bench", "--threads", "99999999999"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim(), "error: --threads must be at most 1024, got 99999999999");
}

/// `--max-steps` counts from the run's start and a resume takes it only when given again: a
/// run stopped at step 4 resumes to its end, or to a later `--max-steps`; one not beyond the
/// run's step is refused (a resume used to take the old count and train one more step, every
/// time).
#[test]
fn max_steps_counts_from_the_start_and_a_resume_goes_on_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::shared_dir().join("data/cifar10");
    let out = dir.path().join("run");
    let (out_s, data_s) = (out.to_str().unwrap(), data.to_str().unwrap());
    let train = |extra: &[&str]| {
        let base = [
            "--model",
            "lenet",
            "--epochs",
            "1",
            "--batch-size",
            "100",
            "--threads",
            "1",
        ];
        cli(&[
            &["train", "--data", data_s, "--val-split", "49000", "--out", out_s],
            &base[..],
            extra,
        ]
        .concat())
    };
    let (code, stdout, err) = train(&["--max-steps", "4"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("stopped after 4 steps"), "{stdout}");
    let resume = |extra: &[&str]| cli(&[&["train", "--resume", out_s], extra].concat());
    let (code, _, err) = resume(&["--max-steps", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--max-steps 3 counts from the run's start") && err.contains("at step 4"),
        "{err}"
    );
    let (code, stdout, err) = resume(&["--max-steps", "6"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("stopped after 6 steps"), "{stdout}");
    // Without --max-steps: to the end of the epoch, 10 steps of 100 images.
    let (code, stdout, err) = resume(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("done: 10 steps"), "{stdout}");
}

/// Nothing a killed run wrote is lost or left over: every logged loss reaches metrics.jsonl at
/// once (a SIGKILL after step 5 leaves five train records), and the temporary files of a
/// write it interrupted are removed when a run starts or resumes in the folder.
#[test]
fn a_killed_run_keeps_its_log_and_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::shared_dir().join("data/cifar10");
    let out = dir.path().join("run");
    let (out_s, data_s) = (out.to_str().unwrap(), data.to_str().unwrap());
    let base = [
        "train",
        "--data",
        data_s,
        "--val-split",
        "49000",
        "--out",
        out_s,
        "--model",
        "lenet",
        "--batch-size",
        "10",
        "--threads",
        "1",
        "--log-every",
        "1",
    ];
    let mut child = common::spawn_until(&base, "step 5,");
    child.kill().unwrap();
    child.wait().unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let trained = metrics.lines().filter(|l| l.contains("\"kind\":\"train\"")).count();
    assert!(trained >= 5, "{metrics}");
    // A write interrupted by a kill (a process id no system gives), in the folder and below.
    let stale = [
        out.join(".train_state.safetensors.tmp3999999999"),
        out.join("checkpoints").join(".epoch-1.safetensors.tmp3999999999"),
    ];
    for f in &stale {
        std::fs::write(f, b"half").unwrap();
    }
    let (code, _, err) = cli(&[&base[..], &["--max-steps", "1", "--overwrite"]].concat());
    assert_eq!(code, 0, "{err}");
    for f in &stale {
        assert!(!f.exists(), "{} left behind", f.display());
    }
}

/// Every `*.safetensors` file under `dir`.
fn safetensors_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(safetensors_under(&path));
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            found.push(path);
        }
    }
    found
}

/// A run that diverges stops at once with exit 1 and the step, and saves nothing: a huge
/// learning rate makes the loss NaN (NaN passes ReLU as in PyTorch, so the loss watch sees
/// it), and a tiny --std overflows a batch norm's running variance while the loss stays
/// finite (the weights are checked at every log step and before every save).
#[test]
fn a_diverged_run_stops_with_its_step_and_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::shared_dir().join("data/cifar10");
    for (i, (flag, value, says)) in [
        ("--lr", "1e30", "the loss became NaN at step "),
        (
            "--std",
            "1e-30,1,1",
            "the weights diverged by step 1: conv1.1.running_var holds NaN or infinity",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("run{i}"));
        let (code, _, err) = cli(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--val-split",
            "100",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--log-every",
            "1",
            "--max-steps",
            "5",
            flag,
            value,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
        assert_eq!(
            safetensors_under(&out),
            Vec::<std::path::PathBuf>::new(),
            "{flag} {value}"
        );
    }
}

/// `--out` takes a new or empty folder; a folder holding anything (a user's file, another
/// run) is refused in one line (exit 2) unless `--overwrite`, which replaces a previous run's
/// files and nothing else; a file is refused; a run folder is locked while a run writes it.
#[test]
fn out_takes_a_new_or_empty_folder_and_a_run_folder_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::shared_dir().join("data/cifar10");
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let train = |extra: &[&str]| {
        let base = [
            "train",
            "--data",
            data.to_str().unwrap(),
            "--val-split",
            "49000",
            "--model",
            "lenet",
            "--threads",
            "1",
            "--max-steps",
            "2",
            "--log-every",
            "1",
            "--out",
            out_s,
        ];
        cli(&[&base[..], extra].concat())
    };
    std::fs::create_dir(&out).unwrap();
    let (code, _, err) = train(&[]);
    assert_eq!(code, 0, "an empty folder: {err}");
    let (code, _, err) = train(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the folder is not empty") && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    let mine = out.join("notes.txt");
    std::fs::write(&mine, "the user's").unwrap();
    std::fs::write(out.join("checkpoints/epoch-7.safetensors"), "an older run's").unwrap();
    let (code, _, err) = train(&["--overwrite"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "the user's");
    assert!(
        !out.join("checkpoints/epoch-7.safetensors").exists(),
        "the older run's checkpoint is gone"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.ends_with("\"step\":1}")).count(),
        1,
        "one run's log: {metrics}"
    );
    let (code, _, err) = cli(&["train", "--out", mine.to_str().unwrap(), "--max-steps", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("notes.txt: not a folder"), "{err}");

    // A run resumed in the folder holds its lock; a second resume is refused while it runs.
    let resume = ["train", "--resume", out_s, "--max-steps", "100000", "--log-every", "1"];
    let mut first = common::spawn_until(&resume, "step 3,");
    let (code, _, err) = cli(&["train", "--resume", out_s, "--max-steps", "100000"]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("another run (process {}) is writing this folder", first.id())),
        "{err}"
    );
}

/// A batch whose activations cannot fit in the memory available is refused in one line
/// (exit 2) before anything is allocated or written, and names a batch size that fits.
#[test]
fn a_batch_too_large_for_memory_is_refused() {
    // The cifar stem's ResNet-18 keeps about 6.7 MB an image: 50,000 images, 334 GB.
    match resnet_cifar::train::plan::available_memory() {
        Some(bytes) if bytes < 300 << 30 => {}
        other => {
            let why = format!("MemAvailable is {other:?} bytes");
            return resnet_cifar::test_support::skip("memory-under-300g", "the refusal", &why);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = common::shared_dir().join("data/cifar10");
    let (code, _, err) = cli(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--stem",
        "cifar",
        "--batch-size",
        "100000000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--batch-size 100000000: a batch of 50000 images needs about")
            && err.contains("give a --batch-size of at most"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
}

/// A resume state copied in from another run (LeNet's into a ResNet-18 run's folder) is refused:
/// the folder's config.json and its train_state.safetensors describe different models.
#[test]
fn a_resume_state_from_another_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::shared_dir().join("data/cifar10");
    let run = |name: &str, model: &str| {
        let out = dir.path().join(name);
        let (code, _, err) = cli(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--val-split",
            "49900",
            "--model",
            model,
            "--stages",
            "3",
            "--batch-size",
            "4",
            "--threads",
            "1",
            "--max-steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let (lenet, resnet) = (run("lenet", "lenet"), run("resnet", "resnet18"));
    let (code, _, err) = cli(&["train", "--resume", resnet.to_str().unwrap(), "--max-steps", "2"]);
    assert_eq!(code, 0, "its own state resumes: {err}");
    std::fs::copy(
        lenet.join("train_state.safetensors"),
        resnet.join("train_state.safetensors"),
    )
    .unwrap();
    let (code, _, err) = cli(&["train", "--resume", resnet.to_str().unwrap(), "--max-steps", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("its train_state.safetensors is another run's (lenet"),
        "{err}"
    );
}
