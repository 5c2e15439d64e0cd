//! Optimizers and schedules against PyTorch's trajectories, printed by
//! `scripts/optim_reference.py` (torch 2.15) and copied here as the oracle.

use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::engine::prelude::*;
use resnet_cifar::nn::{Builder, Entry, Module, Param};
use resnet_cifar::optim::{Adam, AdamConfig, Schedule, Sgd, SgdConfig};

struct One(Param<Cpu>);

impl Module<Cpu> for One {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, Cpu>)) {
        f(Entry::Tensor(&mut self.0));
    }
}

fn param() -> One {
    let be = Cpu::default();
    let mut p = Builder::new(&be, 0).constant("p", &[4], 0.0, true);
    p.write(&be, &[0.5, -1.0, 2.0, 0.0]);
    One(p)
}

/// Three steps with g_t = sin(t + i), as the script does; returns the parameter.
fn run(mut step: impl FnMut(&mut One, &Vec<f32>)) -> Vec<f32> {
    let be = Cpu::default();
    let mut m = param();
    let at = m.0.grad.unwrap();
    let mut grads = be.alloc(at + 4);
    for t in 1..=3 {
        let g: Vec<f32> = (0..4).map(|i| ((t + i) as f64).sin() as f32).collect();
        grads[at..at + 4].copy_from_slice(&g);
        step(&mut m, &grads);
    }
    m.0.read(&be)
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (*g as f64 - w).abs() < 2e-6 * w.abs().max(1.0),
            "{what}: {got:?} vs PyTorch {want:?}"
        );
    }
}

#[test]
fn adam_with_weight_decay_matches_pytorch() {
    let mut opt = Adam::new(AdamConfig {
        beta1: 0.8,
        beta2: 0.99,
        eps: 1e-3,
        weight_decay: 0.05,
        decay_1d: true,
    });
    let got = run(|m, grads| opt.step(&Cpu::default(), m, grads, 0.1));
    assert_close(
        &got,
        &[2.192136198e-01, -1.158589602e+00, 2.031054735e+00, 2.866701782e-01],
        "adam",
    );
}

#[test]
fn sgd_variants_match_pytorch() {
    let cases = [
        (
            SgdConfig::default(),
            [3.108111620e-01, -1.029361486e+00, 2.157460690e+00, 1.995142400e-01],
        ),
        (
            SgdConfig {
                momentum: 0.9,
                dampening: 0.3,
                nesterov: false,
                weight_decay: 0.01,
                ..SgdConfig::default()
            },
            [1.390463263e-01, -1.207226753e+00, 2.120062590e+00, 3.519412279e-01],
        ),
        (
            SgdConfig {
                momentum: 0.9,
                dampening: 0.0,
                nesterov: true,
                weight_decay: 5e-4,
                ..SgdConfig::default()
            },
            [-6.275572628e-02, -1.206706762e+00, 2.337946892e+00, 5.731655359e-01],
        ),
    ];
    for (cfg, want) in cases {
        let mut opt = Sgd::new(cfg);
        let got = run(|m, grads| opt.step(&Cpu::default(), m, grads, 0.1));
        assert_close(&got, &want, &format!("{cfg:?}"));
    }
}

/// A conv-shaped weight and a BatchNorm-shaped scale, both with zero gradients: only weight
/// decay moves them.
struct WeightAndScale(Param<Cpu>, Param<Cpu>);

impl Module<Cpu> for WeightAndScale {
    fn visit(&mut self, f: &mut dyn FnMut(Entry<'_, Cpu>)) {
        f(Entry::Tensor(&mut self.0));
        f(Entry::Tensor(&mut self.1));
    }
}

#[test]
fn decay_1d_false_exempts_only_one_dimensional_parameters() {
    let be = Cpu::default();
    for decay_1d in [true, false] {
        let b = Builder::new(&be, 0);
        let mut m = WeightAndScale(
            b.constant("w", &[2, 1, 1, 2], 1.0, true),
            b.constant("gamma", &[4], 1.0, true),
        );
        let grads = be.alloc(b.grad_len());
        let sgd = SgdConfig {
            weight_decay: 0.5,
            decay_1d,
            ..SgdConfig::default()
        };
        let adam = AdamConfig {
            weight_decay: 0.5,
            decay_1d,
            ..AdamConfig::default()
        };
        Sgd::new(sgd).step(&be, &mut m, &grads, 0.1);
        // SGD: w - lr * wd * w.
        assert_eq!(m.0.read(&be), vec![0.95; 4]);
        let gamma = if decay_1d { 0.95 } else { 1.0 };
        assert_eq!(m.1.read(&be), vec![gamma; 4]);
        // Adam: the decay term is the whole gradient, so a decayed tensor moves by about lr.
        Adam::new(adam).step(&be, &mut m, &grads, 0.1);
        assert!(m.0.read(&be).iter().all(|&v| (v - 0.85).abs() < 1e-4));
        let moved = if decay_1d { gamma - 0.1 } else { gamma };
        assert!(
            m.1.read(&be).iter().all(|&v| (v - moved).abs() < 1e-4),
            "{:?}",
            m.1.read(&be)
        );
    }
}

#[test]
fn seed_schedule_is_lr_over_epoch_plus_one() {
    let s = Schedule::InverseEpoch { lr: 0.01 };
    assert_eq!(s.lr(0, 500, 782, 50 * 782), 0.01);
    assert_eq!(s.lr(1, 0, 782, 50 * 782), 0.005);
    assert!((s.lr(49, 781, 782, 50 * 782) - 0.0002).abs() < 1e-12);
}

#[test]
fn one_cycle_matches_pytorch() {
    // OneCycleLR(max_lr=0.4, total_steps=20, pct_start=0.25, div_factor=25,
    // final_div_factor=1e4, anneal_strategy='cos'), lr before each step.
    let want = [
        1.600000000e-02,
        7.223549801e-02,
        2.080000000e-01,
        3.437645020e-01,
        4.000000000e-01,
        3.956295376e-01,
        3.827091607e-01,
        3.618035517e-01,
        3.338263860e-01,
        3.000004000e-01,
        2.618039517e-01,
        2.209064090e-01,
        1.790951910e-01,
        1.381976483e-01,
        1.000012000e-01,
        6.617521403e-02,
        3.819804834e-02,
        1.729243931e-02,
        4.372062371e-03,
        1.600000000e-06,
    ];
    let s = Schedule::OneCycle {
        max_lr: 0.4,
        pct_start: 0.25,
        div_factor: 25.0,
        final_div_factor: 1e4,
    };
    for (t, w) in want.iter().enumerate() {
        let got = s.lr(t / 5, t % 5, 5, 20);
        assert!((got - w).abs() < 1e-9, "step {t}: {got} vs PyTorch {w}");
    }
}

#[test]
fn warmup_cosine_rises_then_decays_to_min() {
    let s = Schedule::WarmupCosine {
        lr: 0.1,
        warmup_epochs: 1.0,
        min_lr: 0.001,
    };
    let lrs: Vec<f64> = (0..40).map(|t| s.lr(t / 10, t % 10, 10, 40)).collect();
    assert!(lrs[..10].windows(2).all(|w| w[1] > w[0]), "warm-up rises: {lrs:?}");
    assert!((lrs[9] - 0.1).abs() < 1e-12, "reaches lr at the end of warm-up");
    assert!(lrs[10..].windows(2).all(|w| w[1] <= w[0]), "then decays");
    assert!((lrs[39] - 0.001).abs() < 1e-3 * 0.1, "ends near min_lr: {}", lrs[39]);
}

/// airbench94's triangle against its own `get_lr` (a per-step `LambdaLR` factor), evaluated in
/// Python for its 476 steps (48 batches of 1,024 for 9.9 epochs): 0.2 up to 1 at step
/// int(0.23 * 476) = 109, down to 0.07 at the end.
#[test]
fn the_triangle_follows_airbenchs_get_lr() {
    let s = Schedule::Triangle {
        lr: 2.0,
        start: 0.2,
        peak_at: 0.23,
        end: 0.07,
    };
    for (t, factor) in [
        (0, 0.2),
        (1, 0.20733944954128442),
        (54, 0.5963302752293578),
        (108, 0.9926605504587156),
        (109, 1.0),
        (110, 0.9974659400544958),
        (300, 0.5159945504087193),
        (475, 0.07253405994550413),
    ] {
        let got = s.lr(t / 119, t % 119, 119, 4 * 119);
        assert!(
            (got - 2.0 * factor).abs() < 1e-12,
            "step {t}: {got} vs {}",
            2.0 * factor
        );
    }
}
