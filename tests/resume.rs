//! Stopping and resuming: a run cut by --max-steps or by an interrupt, then resumed, ends with
//! exactly the weights, BN statistics and optimizer state of a run that was never stopped.

mod common;

use resnet_cifar::checkpoint;
use resnet_cifar::data::{Cifar10, Splits};
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::train::{Console, Recipe, RunPlan, Start, Stop, TrainConfig, load_resume, train};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

/// 640 training images (10 steps an epoch at batch 64), 128 for validation.
fn small_splits() -> Splits {
    let data = Cifar10::load(&common::shared_dir().join("data/cifar10")).unwrap();
    let all = Splits::new(data, 128, None).unwrap();
    Splits {
        train: std::sync::Arc::new(all.train.slice(0..640)),
        val: all.val.clone(),
        val_method: all.val_method,
        test: None,
        spec: all.spec.clone(),
    }
}

fn config(max_steps: Option<u64>) -> TrainConfig {
    let mut cfg = Recipe::Seed.config();
    cfg.epochs = 3.0;
    cfg.val_split = 128;
    cfg.log_every = 5;
    cfg.shuffle = true;
    cfg.max_steps = max_steps;
    cfg
}

/// Everything that must match: model and optimizer tensors, and the position.
fn final_state(run: &Path) -> (Vec<(String, Vec<u8>)>, String) {
    let bytes = std::fs::read(run.join("train_state.safetensors")).unwrap();
    let (tensors, meta) = checkpoint::parse("state", &bytes).unwrap();
    (
        tensors.into_iter().map(|(k, v)| (k, v.bytes)).collect(),
        meta["position"].clone(),
    )
}

fn run(cfg: &TrainConfig, splits: &Splits, dir: &Path, resume: bool, stop: bool) -> Option<Stop> {
    let r = resume.then(|| load_resume(dir).unwrap());
    train(
        &Cpu::default(),
        RunPlan {
            cfg: cfg.clone(),
            start: r.into(),
            out: dir.to_path_buf(),
            overwrite: false,
        },
        splits,
        &mut Console::quiet(),
        &AtomicBool::new(stop),
    )
    .unwrap()
    .stopped
}

#[test]
fn max_steps_then_resume_equals_one_run() {
    let splits = small_splits();
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    assert_eq!(run(&config(None), &splits, &whole, false, false), None);
    // 15 steps: stops in the middle of the second epoch.
    assert_eq!(
        run(&config(Some(15)), &splits, &cut, false, false),
        Some(Stop::MaxSteps)
    );
    let (_, pos) = final_state(&cut);
    assert!(
        pos.contains("\"epoch\":1") && pos.contains("\"batch\":5") && pos.contains("\"step\":15"),
        "{pos}"
    );
    assert!(cut.join("last.safetensors").is_file());
    // Resume without the step limit (as `train --resume R --max-steps 30` would).
    let mut cfg = load_resume(&cut).unwrap().config;
    cfg.max_steps = Some(30);
    assert_eq!(run(&cfg, &splits, &cut, true, false), None);
    assert_eq!(
        final_state(&whole),
        final_state(&cut),
        "resumed run differs from the unbroken one"
    );
    // Both kept one eval line per epoch in their logs.
    let evals = |d: &Path| {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"eval\""))
            .count()
    };
    assert_eq!((evals(&whole), evals(&cut)), (3, 3));
}

#[test]
fn interrupted_then_resumed_equals_one_run() {
    let splits = small_splits();
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    run(&config(None), &splits, &whole, false, false);
    // The stop flag is up from the start: the run saves after its first step.
    assert_eq!(run(&config(None), &splits, &cut, false, true), Some(Stop::Interrupted));
    assert!(final_state(&cut).1.contains("\"step\":1"));
    let cfg = load_resume(&cut).unwrap().config;
    assert_eq!(run(&cfg, &splits, &cut, true, false), None);
    assert_eq!(final_state(&whole), final_state(&cut));
}

#[test]
fn sigint_saves_and_exits_with_a_resume_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
        .args(["train", "--epochs", "1", "--val-split", "1000", "--out"])
        .arg(&out)
        .arg("--data")
        .arg(common::shared_dir().join("data/cifar10"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (the run folder's config is written first).
    let started = std::time::Instant::now();
    while !out.join("config.json").exists() {
        assert!(started.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted after step") && stderr.contains("resume with: resnet-cifar train --resume"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    let state = load_resume(&out).unwrap();
    assert!(state.position.step >= 1);
    assert!(out.join("last.safetensors").is_file());
}

#[test]
fn a_diverging_loss_stops_the_run_with_its_step() {
    let splits = small_splits();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(None);
    cfg.schedule = resnet_cifar::optim::Schedule::Constant { lr: 1e38 };
    // Checked every step, not only at logging steps.
    cfg.log_every = 1000;
    let err = train(
        &Cpu::default(),
        RunPlan {
            cfg: cfg.clone(),
            start: Start::Fresh,
            out: tmp.path().to_path_buf(),
            overwrite: false,
        },
        &splits,
        &mut Console::quiet(),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    // Step 1 computes a finite loss and moves every weight by 1e38; step 2's loss is not finite.
    assert!(msg.contains("the loss became") && msg.contains("at step 2;"), "{msg}");
}

/// airbench's recipe, every feature that carries state across steps or epochs at once: a
/// fractional last epoch, the dropped partial batch, the whitening bias frozen after the first
/// epoch (its momentum no longer saved), lookahead's slow copy (saved, and restored on resume),
/// the summed loss, and evaluation every other epoch and after the last.
#[test]
fn airbench_recipe_resumes_exactly_and_ends_its_fractional_epoch() {
    let splits = small_splits();
    let config = |max_steps| {
        let mut cfg = Recipe::Airbench94.config();
        cfg.batch_size = 60; // 10 full batches of the 640 images, 40 dropped
        cfg.epochs = 3.45; // 35 steps: the fourth epoch ends after 5 batches
        cfg.whiten_bias_epochs = Some(1);
        cfg.eval_every = 2;
        cfg.eval_batch_size = 64;
        cfg.val_split = 128;
        cfg.log_every = 5;
        cfg.max_steps = max_steps;
        cfg
    };
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    assert_eq!(run(&config(None), &splits, &whole, false, false), None);
    let (tensors, pos) = final_state(&whole);
    assert!(pos.contains("\"epoch\":4") && pos.contains("\"step\":35"), "{pos}");
    let names: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"lookahead.2.norm1.running_var"), "{names:?}");
    assert!(!names.contains(&"optim.0.bias.momentum_buffer"), "frozen: {names:?}");
    let evals = std::fs::read_to_string(whole.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"eval\""))
        .count();
    assert_eq!(evals, 2, "after epochs 2 and 4");
    // Cut in the first epoch (the bias still training) and in the third.
    for cut_at in [7, 23] {
        let cut = tmp.path().join(format!("cut{cut_at}"));
        assert_eq!(
            run(&config(Some(cut_at)), &splits, &cut, false, false),
            Some(Stop::MaxSteps)
        );
        let mut cfg = load_resume(&cut).unwrap().config;
        cfg.max_steps = None;
        assert_eq!(run(&cfg, &splits, &cut, true, false), None);
        assert_eq!(final_state(&whole), final_state(&cut), "cut at step {cut_at}");
    }
}
