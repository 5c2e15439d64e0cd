//! The seed's training dynamics against PyTorch's over several steps, not one: from the golden
//! files' formula-made weights, augmentation off, 20 steps of the `seed` recipe on the first 640
//! shared images (two epochs, so the 1/(epoch+1) schedule steps once) end where the seed's own
//! code in PyTorch ends, within bounds measured from the two (docs/seed-vs-pytorch.md).
//!
//! Fixture: `python3 scripts/seed_reference.py --data ../shared/data/cifar10 --limit 640
//! --epochs 2 --no-augment --formula-init --fixture tests/fixtures/seed_20_steps.safetensors`
//! (the 20 losses, and per state entry its sum, sum of |x| and 64 samples).

mod common;

use common::{Golden, sample_indices, set_formula_weights};
use resnet_cifar::checkpoint;
use resnet_cifar::data::transform::Augment;
use resnet_cifar::data::{Cifar10, Splits};
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::build;
use resnet_cifar::train::{Console, InitWeights, Recipe, RunPlan, Start, train};
use std::sync::atomic::AtomicBool;

/// How far our run ends from PyTorch's, per quantity.
#[derive(Debug, Default)]
struct Gap {
    /// Largest |loss difference| at a step, over the 20 steps.
    loss: f64,
    /// Per state entry, the largest |difference| of a sample over the entry's mean |x|
    /// (PyTorch's); the worst entry, and the median entry.
    sample_worst: (f64, String),
    sample_median: f64,
    /// Largest relative difference of an entry's sum of |x|.
    abs_sum: (f64, String),
}

fn gap(ours: &Golden, ours_losses: &[f32], torch: &Golden) -> Gap {
    let torch_losses = torch.f32("loss");
    assert_eq!(ours_losses.len(), torch_losses.len(), "as many steps as PyTorch took");
    let mut g = Gap {
        loss: ours_losses
            .iter()
            .zip(&torch_losses)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max),
        ..Gap::default()
    };
    let mut per_entry = Vec::new();
    for name in ours.st().names() {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let values = ours.f32(name);
        let n = values.len();
        let scale = torch.f32(&format!("abs_sum.{name}"))[0] as f64 / n as f64;
        let theirs = torch.f32(&format!("sample.{name}"));
        let worst = sample_indices(n)
            .iter()
            .zip(&theirs)
            .map(|(&i, &t)| (values[i] - t).abs() as f64 / scale)
            .fold(0.0, f64::max);
        per_entry.push(worst);
        if worst > g.sample_worst.0 {
            g.sample_worst = (worst, name.to_string());
        }
        let ours_abs: f64 = values.iter().map(|v| v.abs() as f64).sum();
        let rel = (ours_abs / (scale * n as f64) - 1.0).abs();
        if rel > g.abs_sum.0 {
            g.abs_sum = (rel, name.to_string());
        }
    }
    per_entry.sort_by(f64::total_cmp);
    g.sample_median = per_entry[per_entry.len() / 2];
    g
}

#[test]
fn twenty_seed_steps_end_where_pytorchs_seed_code_ends() {
    let data = Cifar10::load(&common::shared_dir().join("data/cifar10")).unwrap();
    let all = Splits::new(data, 0, None).unwrap();
    let splits = Splits {
        train: std::sync::Arc::new(all.train.slice(0..640)),
        val: None,
        val_method: all.val_method,
        test: None,
        spec: all.spec.clone(),
    };
    let mut cfg = Recipe::Seed.config();
    cfg.epochs = 2.0;
    cfg.augment = Augment::NONE;
    cfg.log_every = 1;
    // SEED_DYNAMICS_WINOGRAD=false: the same run with every convolution computed directly
    // (docs/seed-vs-pytorch.md, sections 6-7; its gaps exceed these bounds, see there).
    if let Ok(w) = std::env::var("SEED_DYNAMICS_WINOGRAD") {
        cfg.winograd = w != "false";
    }
    let mut start = build(&Cpu::default(), cfg.arch, cfg.model, cfg.seed);
    set_formula_weights(&Cpu::default(), start.as_mut());
    let init = InitWeights {
        origin: "the golden formula".into(),
        tensors: checkpoint::state_dict(&Cpu::default(), start.as_mut()),
    };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let outcome = train(
        &Cpu::default(),
        RunPlan {
            cfg: cfg.clone(),
            start: Start::Init(init),
            out: run.to_path_buf(),
            overwrite: false,
        },
        &splits,
        &mut Console::quiet(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(outcome.steps, 20);

    let losses: Vec<f32> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["kind"] == "train")
        .map(|l| l["loss"].as_f64().unwrap() as f32)
        .collect();
    let ours = Golden::from_bytes(std::fs::read(run.join("last.safetensors")).unwrap());
    // SEED_DYNAMICS_FIXTURE: another run of the script to measure against (its --float64 run,
    // for the comparison's table).
    let fixture = std::env::var("SEED_DYNAMICS_FIXTURE")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/seed_20_steps.safetensors").into());
    let torch = Golden::from_bytes(std::fs::read(&fixture).unwrap());
    let g = gap(&ours, &losses, &torch);
    let per_step: Vec<String> = losses
        .iter()
        .zip(torch.f32("loss"))
        .map(|(a, b)| format!("{:.2e}", (a - b).abs()))
        .collect();
    eprintln!("loss gap per step: {}\n{g:#?}", per_step.join(" "));

    // The first step starts from the same weights and the same 64 images: only float rounding
    // separates the two losses (measured 1e-6). The second follows one Adam step (1e-4).
    let first = (losses[0] - torch.f32("loss")[0]).abs();
    let second = (losses[1] - torch.f32("loss")[1]).abs();
    assert!(
        first < 1e-5 && second < 1e-3,
        "steps 1 and 2: loss gaps {first}, {second}"
    );
    // Then the runs drift apart, as any two float32 runs of this network do: Adam's first steps
    // move every weight by about lr times the sign of its gradient, so a gradient within
    // rounding of zero moves a weight by up to 2 lr either way. Measured over 20 steps:
    //                                   loss   sample median   sample worst   sum |x|
    //   ours vs PyTorch                 0.020      0.041           0.24        0.023
    //   ours vs PyTorch in float64      0.011      0.029           0.47        0.018
    //   PyTorch vs PyTorch in float64   0.014      0.034           0.44        0.014
    //   PyTorch 1 thread vs 2           0.0033     0.012           0.11        0.0032
    // The bounds are 3x the larger of the first and third rows. Pointed at fixtures from an
    // edited script, this test fails for: the schedule not stepped at the epoch boundary (loss
    // gap 0.39), the other common CIFAR std constants (step 1 gap 0.063), and, only just, Adam's
    // eps at 1e-7 (loss gap 0.062) and BatchNorm momentum 0.09 (sum |x| gap 0.077): errors that
    // small hide in the drift, and the golden tests catch them within one step.
    assert!(g.loss < 0.06, "largest loss gap {}", g.loss);
    assert!(g.sample_median < 0.12, "median entry's sample gap {}", g.sample_median);
    assert!(g.sample_worst.0 < 1.5, "worst sample gap {:?}", g.sample_worst);
    assert!(g.abs_sum.0 < 0.07, "sum of |x| gap {:?}", g.abs_sum);
}
