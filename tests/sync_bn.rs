//! Synchronised batch norm (`SyncStats`, PyTorch's SyncBatchNorm) against plain batch norm:
//! ranks that each hold a slice of a batch and sum their statistics must normalise, update the
//! running statistics and back-propagate as one process holding the whole batch does.

mod common;

use common::{get, max_rel_err, put};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::engine::{Backend, BatchNormSaved, BatchNormTrain, Epilogue, GradSlots, Shape4, SyncStats};
use resnet_cifar::model::{Network, ResNet, ResNetConfig};
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};

const C: usize = 5;
const MOMENTUM: f32 = 0.1;

fn random(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// A batch norm's inputs: a batch (`rows x C`), the gradient arriving at its output, the
/// affine parameters and running statistics before the step.
struct Case {
    x: Vec<f32>,
    dy: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    running: (Vec<f32>, Vec<f32>),
}

impl Case {
    fn new(rows: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(rows as u64);
        // Channels off centre, so that a wrong mean shows.
        let x = random(&mut rng, rows * C, -1.0, 3.0);
        Self {
            x,
            dy: random(&mut rng, rows * C, -1.0, 1.0),
            gamma: random(&mut rng, C, 0.5, 1.5),
            beta: random(&mut rng, C, -0.5, 0.5),
            running: (random(&mut rng, C, -0.2, 0.2), random(&mut rng, C, 0.5, 2.0)),
        }
    }
}

/// What one rank computes: outputs and gradients of its rows, its running statistics.
struct Out {
    y: Vec<f32>,
    saved: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

/// Training forward (fused ReLU) and backward over `rows` of `case`, statistics summed by `sync`.
fn run<B: Backend>(be: &B, case: &Case, rows: std::ops::Range<usize>, sync: SyncStats<'_>) -> Out {
    let n = rows.len();
    let s = Shape4::new(n, 1, 1, C);
    let x = put(be, &case.x[rows.start * C..rows.end * C]);
    let (mut rm, mut rv) = (put(be, &case.running.0), put(be, &case.running.1));
    let (gamma, beta) = (put(be, &case.gamma), put(be, &case.beta));
    let (mut saved, mut y) = (be.alloc(2 * C), be.alloc(n * C));
    let bn = BatchNormTrain {
        gamma: &gamma,
        beta: &beta,
        running_mean: &mut rm,
        running_var: &mut rv,
        momentum: MOMENTUM,
        eps: 1e-5,
        saved: &mut saved,
        sync,
    };
    let relu = Epilogue {
        residual: None,
        relu: true,
    };
    be.batch_norm_forward_train(&s, &x, bn, relu, &mut y);
    let mut dy = put(be, &case.dy[rows.start * C..rows.end * C]);
    let (mut dx, mut grads) = (be.alloc(n * C), be.alloc(2 * C));
    let bn = BatchNormSaved {
        gamma: &gamma,
        saved: &saved,
        relu_out: Some(&y),
        sync,
    };
    let slots = GradSlots {
        arena: &mut grads,
        weight: 0,
        bias: Some(C),
    };
    be.batch_norm_backward(&s, &x, bn, &mut dy, &mut dx, slots);
    let arena = get(be, &grads, 2 * C);
    Out {
        y: get(be, &y, n * C),
        saved: get(be, &saved, 2 * C),
        running_mean: get(be, &rm, C),
        running_var: get(be, &rv, C),
        dx: get(be, &dx, n * C),
        dgamma: arena[..C].to_vec(),
        dbeta: arena[C..].to_vec(),
    }
}

/// Two ranks on two threads: each exchange sums both ranks' values, in rank order on both.
struct Exchange {
    slots: Mutex<[Vec<f64>; 2]>,
    barrier: Barrier,
}

impl Exchange {
    fn sum(&self, rank: usize, values: &mut [f64]) {
        self.slots.lock().unwrap()[rank] = values.to_vec();
        self.barrier.wait();
        {
            let slots = self.slots.lock().unwrap();
            for (i, v) in values.iter_mut().enumerate() {
                *v = slots[0][i] + slots[1][i];
            }
        }
        // Nobody writes the next exchange's values before both have read these.
        self.barrier.wait();
    }
}

fn close(what: &str, a: &[f32], b: &[f32], tol: f64) {
    let e = max_rel_err(a, b);
    assert!(e <= tol, "{what}: worst relative difference {e:e} > {tol:e}");
}

#[test]
fn two_ranks_equal_one_process_holding_the_whole_batch() {
    // 37 rows cut unevenly (20 + 17), as the last batch of an epoch can be.
    let (rows, cut) = (37, 20);
    let case = Case::new(rows);
    let whole = run(&Cpu::default(), &case, 0..rows, None);
    let ex = Exchange {
        slots: Mutex::new([Vec::new(), Vec::new()]),
        barrier: Barrier::new(2),
    };
    let [r0, r1] = std::thread::scope(|scope| {
        [(0, 0..cut), (1, cut..rows)]
            .map(|(rank, part)| {
                let (ex, case) = (&ex, &case);
                scope.spawn(move || {
                    let sum = |v: &mut [f64]| ex.sum(rank, v);
                    run(&Cpu::default(), case, part, Some(&sum))
                })
            })
            .map(|h| h.join().unwrap())
    });
    for (what, a, b) in [
        ("saved mean and 1/std", &r0.saved, &r1.saved),
        ("running mean", &r0.running_mean, &r1.running_mean),
        ("running var", &r0.running_var, &r1.running_var),
    ] {
        assert_eq!(a, b, "{what}: the ranks differ");
    }
    close("saved", &r0.saved, &whole.saved, 1e-6);
    close("running mean", &r0.running_mean, &whole.running_mean, 1e-6);
    close(
        "running var (unbiased over 37 rows)",
        &r0.running_var,
        &whole.running_var,
        1e-6,
    );
    close("y", &[r0.y, r1.y].concat(), &whole.y, 1e-5);
    close("dx", &[r0.dx, r1.dx].concat(), &whole.dx, 1e-5);
    let add = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<f32>>();
    close(
        "dgamma summed over the ranks",
        &add(&r0.dgamma, &r1.dgamma),
        &whole.dgamma,
        1e-5,
    );
    close(
        "dbeta summed over the ranks",
        &add(&r0.dbeta, &r1.dbeta),
        &whole.dbeta,
        1e-5,
    );
    // And the statistics of one slice alone are not those of the batch (the test can fail).
    let alone = run(&Cpu::default(), &case, 0..cut, None);
    assert!(
        max_rel_err(&alone.saved, &whole.saved) > 1e-3,
        "the slices differ too little"
    );
}

/// A rank whose (pretended) twin holds the same rows: the sums double, so the mean, variance,
/// output and dx are those of its own rows, while the running variance's unbiased correction
/// counts both: n / (n - 1) becomes 2n / (2n - 1). Runs on every backend, in one thread.
fn twin_rank<B: Backend>(be: &B) {
    let rows = 24;
    let case = Case::new(rows);
    let own = run(be, &case, 0..rows, None);
    let double = |v: &mut [f64]| v.iter_mut().for_each(|x| *x *= 2.0);
    let twin = run(be, &case, 0..rows, Some(&double));
    close("saved", &twin.saved, &own.saved, 1e-6);
    close("y", &twin.y, &own.y, 1e-6);
    close("running mean", &twin.running_mean, &own.running_mean, 1e-6);
    close("dx", &twin.dx, &own.dx, 1e-5);
    close("dgamma (this rank's)", &twin.dgamma, &own.dgamma, 1e-6);
    close("dbeta (this rank's)", &twin.dbeta, &own.dbeta, 1e-6);
    let n = rows as f32;
    let expected: Vec<f32> = (0..C)
        .map(|ch| {
            let before = (1.0 - MOMENTUM) * case.running.1[ch];
            let unbiased = (own.running_var[ch] - before) / MOMENTUM;
            before + MOMENTUM * unbiased * (n - 1.0) * 2.0 / (2.0 * n - 1.0)
        })
        .collect();
    close(
        "running var (unbiased over 2n rows)",
        &twin.running_var,
        &expected,
        1e-5,
    );
    assert!(
        max_rel_err(&twin.running_var, &own.running_var) > 1e-3,
        "the count did not travel"
    );
}

on_backends! {
    twin_rank_cpu, twin_rank_cuda => twin_rank;
}

/// Every gradient of one forward and backward pass of ResNet-18 (seed stem) in training mode.
fn model_grads(model: &mut ResNet<Cpu>, x: &[f32], labels: &[u32]) -> Vec<(String, Vec<f32>)> {
    common::loss_and_grads(&Cpu::default(), model, x, labels).1
}

#[test]
fn two_ranks_of_resnet18_compute_the_whole_batch_gradient() {
    let cfg = ResNetConfig::default();
    let (n, cut) = (32, 20);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let batches: Vec<(Vec<f32>, Vec<u32>)> = (0..3)
        .map(|_| {
            let x = random(&mut rng, n * 32 * 32 * 3, -2.0, 2.0);
            (x, (0..n).map(|_| rng.random_range(0..10u32)).collect())
        })
        .collect();
    let mut whole = ResNet::new(&Cpu::default(), cfg, 7);
    let expected: Vec<_> = batches.iter().map(|(x, l)| model_grads(&mut whole, x, l)).collect();
    let ex = Arc::new(Exchange {
        slots: Mutex::new([Vec::new(), Vec::new()]),
        barrier: Barrier::new(2),
    });
    let ranks = std::thread::scope(|scope| {
        [(0, 0..cut), (1, cut..n)]
            .map(|(rank, part)| {
                let (ex, batches) = (Arc::clone(&ex), &batches);
                scope.spawn(move || {
                    let mut model = ResNet::new(&Cpu::default(), cfg, 7);
                    Network::sync_batch_norm(&mut model, Some(Rc::new(move |v: &mut [f64]| ex.sum(rank, v))));
                    // The weight of this slice in the global mean loss, as the trainer sets it.
                    model.set_loss_grad_scale((2 * part.len()) as f32 / n as f32);
                    let px = 32 * 32 * 3;
                    batches
                        .iter()
                        .map(|(x, l)| model_grads(&mut model, &x[part.start * px..part.end * px], &l[part.clone()]))
                        .collect::<Vec<_>>()
                })
            })
            .map(|h| h.join().unwrap())
    });
    for (b, want) in expected.iter().enumerate() {
        let mut worst = (0.0, String::new());
        for (i, (name, g)) in want.iter().enumerate() {
            let mean: Vec<f32> = ranks[0][b][i]
                .1
                .iter()
                .zip(&ranks[1][b][i].1)
                .map(|(p, q)| (p + q) / 2.0)
                .collect();
            let e = max_rel_err(&mean, g);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        eprintln!(
            "batch {b}: worst relative gradient difference {:.2e} ({})",
            worst.0, worst.1
        );
        assert!(worst.0 < 1e-4, "batch {b}: {} differs by {:e}", worst.1, worst.0);
    }
}
