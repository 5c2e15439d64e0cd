//! The CUDA backend against the CPU backend and itself: the same model trained a few steps on
//! both, checkpoints moving between them, and determinism on the GPU. Each test returns early,
//! saying why, on a machine without a GPU; the last one checks what users see there instead.

mod common;

use resnet_cifar::checkpoint;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::engine::prelude::*;
use resnet_cifar::engine::{Backend, Shape4};
use resnet_cifar::model::{ResNet, ResNetConfig, Stem};
use resnet_cifar::optim::{Adam, AdamConfig};

fn batch(n: usize, seed: u32) -> (Vec<f32>, Vec<u32>) {
    let x = (0..n * 32 * 32 * 3)
        .map(|i| (i as f32 * 0.37 + seed as f32).sin())
        .collect();
    (x, (0..n as u32).map(|i| (i * 7 + seed) % 10).collect())
}

/// Trains `steps` Adam steps on fixed batches; returns the losses and the final eval logits.
fn train_steps<B: Backend>(be: &B, cfg: ResNetConfig, steps: usize) -> (Vec<f32>, Vec<f32>, ResNet<B>) {
    let mut model = ResNet::new(be, cfg, 7);
    let mut adam = Adam::new(AdamConfig::default());
    let n = 8;
    let mut x = be.alloc(n * 32 * 32 * 3);
    let mut losses = Vec::new();
    for s in 0..steps {
        let (host, labels) = batch(n, s as u32);
        be.upload(&host, &mut x);
        model.forward(be, &x, Shape4::new(n, 32, 32, 3), true);
        model.backward(be, &x, &labels);
        common::adam_step(be, &mut adam, &mut model, 1e-3);
        losses.push(common::get(be, model.loss(), 1)[0]);
    }
    let (host, _) = batch(n, 99);
    be.upload(&host, &mut x);
    model.forward(be, &x, Shape4::new(n, 32, 32, 3), false);
    let logits = common::get(be, model.logits(), n * 10);
    (losses, logits, model)
}

fn config(stem: Stem) -> ResNetConfig {
    ResNetConfig {
        stem,
        stages: 4,
        num_classes: 10,
        image_size: 32,
    }
}

#[test]
fn cuda_trains_like_cpu() {
    let Some(gpu) = common::cuda() else { return };
    for stem in [Stem::Seed, Stem::Cifar] {
        let (cpu_losses, cpu_logits, _) = train_steps(&Cpu::default(), config(stem), 4);
        let (gpu_losses, gpu_logits, _) = train_steps(gpu, config(stem), 4);
        for (s, (a, b)) in cpu_losses.iter().zip(&gpu_losses).enumerate() {
            assert!(
                (a - b).abs() < 1e-3 * a.abs().max(1.0),
                "{stem:?} step {s}: loss cpu {a} vs cuda {b}"
            );
        }
        let err = common::max_rel_err(&gpu_logits, &cpu_logits);
        assert!(err < 2e-2, "{stem:?}: eval logits after 4 steps differ by {err:.2e}");
        eprintln!("{stem:?}: losses cpu {cpu_losses:?} cuda {gpu_losses:?}; eval logits within {err:.2e}");
    }
}

#[test]
fn cuda_is_deterministic() {
    let Some(gpu) = common::cuda() else { return };
    let (l1, z1, mut m1) = train_steps(gpu, config(Stem::Seed), 3);
    let (l2, z2, mut m2) = train_steps(gpu, config(Stem::Seed), 3);
    assert_eq!(l1, l2, "losses of two identical runs");
    assert_eq!(z1, z2, "logits of two identical runs");
    assert!(
        checkpoint::to_bytes(&checkpoint::state_dict(gpu, &mut m1), None)
            == checkpoint::to_bytes(&checkpoint::state_dict(gpu, &mut m2), None),
        "weights of two identical runs"
    );
}

#[test]
fn checkpoints_move_between_cuda_and_cpu() {
    let Some(gpu) = common::cuda() else { return };
    let (_, gpu_logits, mut trained) = train_steps(gpu, config(Stem::Seed), 2);
    let bytes = checkpoint::to_bytes(&checkpoint::state_dict(gpu, &mut trained), None);
    let mut on_cpu = ResNet::new(&Cpu::default(), config(Stem::Seed), 0);
    checkpoint::load_bytes("from-cuda", &bytes, &Cpu::default(), &mut on_cpu).unwrap();
    let (host, _) = batch(8, 99);
    on_cpu.forward(&Cpu::default(), &host, Shape4::new(8, 32, 32, 3), false);
    let cpu_logits = common::get(&Cpu::default(), on_cpu.logits(), 80);
    let err = common::max_rel_err(&gpu_logits, &cpu_logits);
    assert!(
        err < 1e-4,
        "a CUDA checkpoint evaluated on the CPU differs by {err:.2e}"
    );
    // And back: the CPU's state_dict loads on the GPU unchanged.
    let back = checkpoint::to_bytes(&checkpoint::state_dict(&Cpu::default(), &mut on_cpu), None);
    assert_eq!(back, bytes, "state_dict bytes after a CUDA -> CPU round trip");
}

#[test]
fn without_a_gpu_the_cli_says_so_in_one_line() {
    if resnet_cifar::engine::cuda::Cuda::new(0, resnet_cifar::engine::cuda::Precision::Fp32).is_ok() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
        .args(["bench", "--device", "cuda", "--steps", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("--device cuda:0"), "{err}");
}

/// A batch cut on the GPU from a plan equals the host loader's batch, bit for bit, at CIFAR's
/// size and at another (the kernel takes the side), with another normalisation too.
#[test]
fn augment_matches_the_host_cuda() {
    use resnet_cifar::data::transform::{BatchKey, BatchPlan};
    use resnet_cifar::data::{Augment, Images, Normalization};
    use resnet_cifar::engine::CropPlan;
    let Some(be) = common::cuda() else { return };
    let other = Normalization {
        mean: [0.3, 0.5, 0.1],
        std: [0.2, 0.25, 0.3],
    };
    for (side, norm) in [(32, Normalization::CIFAR10), (20, other)] {
        let per = 3 * side * side;
        let images = Images {
            pixels: (0..40 * per).map(|i| (i * 7 % 251) as u8).collect(),
            labels: (0..40).map(|i| i % 10).collect(),
            side,
        };
        let pixels = be.upload_pixels(&images.pixels).expect("a GPU keeps the images");
        let indices: Vec<u32> = (0..40).rev().step_by(3).collect();
        let airbench = Augment {
            crop_pad: 2,
            reflect: true,
            alternate_flip: true,
            ..Augment::SEED
        };
        for (aug, seed) in [
            (Augment::SEED, 3),
            (Augment::NONE, 0),
            (Augment::SEED, 11),
            (airbench, 5),
        ] {
            let plan = BatchPlan::new(&images, &indices, aug, BatchKey::new(seed, 1, 0));
            let mut x = be.alloc(indices.len() * per);
            let crops = CropPlan {
                items: &plan.items,
                side,
                pad: plan.pad,
                reflect: plan.reflect,
                mean: norm.mean,
                std: norm.std,
            };
            be.crop_flip(&pixels, &crops, &mut x);
            let got = common::get(be, &x, indices.len() * per);
            assert!(
                got == plan.write(&images, &norm),
                "side {side}: the GPU's batch differs from the host's"
            );
            assert_eq!(plan.labels, indices.iter().map(|&i| i % 10).collect::<Vec<_>>());
        }
    }
}

/// NCCL as the GPU's collective, with the one rank a single-GPU machine has: the all-reduce
/// (mean) and the broadcast run in place on the backend's stream and touch only the first
/// `len` values (more ranks need a machine with several GPUs: `mpirun -np N ... --device cuda`).
#[test]
fn nccl_with_one_rank_reduces_and_broadcasts_in_place() {
    let Some(be) = common::cuda() else { return };
    let host = resnet_cifar::engine::Local;
    let nccl = match resnet_cifar::engine::cuda::nccl::Nccl::new(be, &host) {
        Ok(n) => n,
        Err(e) if e.contains("not found") => return resnet_cifar::test_support::skip("nccl", "NCCL on one rank", &e),
        Err(e) => panic!("{e}"),
    };
    eprintln!("NCCL {}", resnet_cifar::engine::cuda::nccl::version().unwrap());
    use resnet_cifar::engine::Collective;
    let values: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut buf = be.alloc(values.len());
    be.upload(&values, &mut buf);
    nccl.all_reduce_mean(be, &mut buf, 600);
    nccl.broadcast(be, &mut buf, 700, 0);
    let mut back = vec![0f32; values.len()];
    be.download(&buf, &mut back);
    assert_eq!(back, values);
    assert_eq!((nccl.rank(), nccl.size()), (0, 1));
    let mut sums = [1.5, 2.0];
    nccl.all_reduce_host(&mut sums);
    assert_eq!(sums, [1.5, 2.0]);
}
