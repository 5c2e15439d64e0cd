//! Throughput of training steps (forward, loss, backward, Adam) and inference on random
//! batches of the configured image size (CIFAR's 32x32 by default), as `resnet-cifar bench`
//! reports it.

use crate::data::CHANNELS;
use crate::engine::{Backend, Collective, Shape4};
use crate::model::{Arch, ResNetConfig, build};
use crate::optim::{Adam, AdamConfig};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct BenchConfig {
    pub arch: Arch,
    pub model: ResNetConfig,
    pub batch_size: usize,
    pub steps: usize,
    pub warmup: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub model: String,
    pub threads: usize,
    pub stem: String,
    pub stages: usize,
    pub batch_size: usize,
    pub image_size: usize,
    pub steps: usize,
    pub train_images_per_sec: f64,
    pub infer_images_per_sec: f64,
    pub final_loss: f32,
    pub peak_rss_bytes: Option<u64>,
}

/// Peak resident set size of this process (Linux `VmHWM`), if the system reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run<B: Backend>(be: &B, cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> BenchReport {
    let n = cfg.batch_size;
    let side = cfg.model.image_size;
    let input = Shape4::new(n, side, side, CHANNELS);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let host: Vec<f32> = (0..input.numel()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let labels: Vec<u32> = (0..n)
        .map(|_| rng.random_range(0..cfg.model.num_classes as u32))
        .collect();
    let mut x = be.alloc(input.numel());
    be.upload(&host, &mut x);

    let mut model = build(be, cfg.arch, cfg.model, 0);
    let mut adam = Adam::new(AdamConfig::default());
    let mut loss = [0f32];
    let mut start = Instant::now();
    for i in 0..cfg.warmup + cfg.steps {
        if i == cfg.warmup {
            // A GPU queues the warm-up steps: wait for them before the clock starts.
            be.download(model.loss(), &mut loss);
            start = Instant::now();
        }
        model.forward(be, &x, input, true);
        model.backward(be, &x, &labels);
        let (mut state, grads) = model.state_and_grads();
        adam.step(be, &mut *state, grads, 1e-3);
        progress(&format!("train step {}/{}", i + 1, cfg.warmup + cfg.steps));
    }
    be.download(model.loss(), &mut loss);
    let train = (n * cfg.steps) as f64 / start.elapsed().as_secs_f64();

    let mut logits = vec![0f32; n * cfg.model.num_classes];
    for i in 0..cfg.warmup + cfg.steps {
        if i == cfg.warmup {
            start = Instant::now();
        }
        model.forward(be, &x, input, false);
        // Read the result back, as a real evaluation does.
        be.download(model.logits(), &mut logits);
        progress(&format!("inference step {}/{}", i + 1, cfg.warmup + cfg.steps));
    }
    let infer = (n * cfg.steps) as f64 / start.elapsed().as_secs_f64();

    BenchReport {
        backend: be.name(),
        model: cfg.arch.name().to_string(),
        threads: rayon::current_num_threads(),
        stem: cfg.model.stem.name().to_string(),
        stages: cfg.model.stages,
        batch_size: n,
        image_size: side,
        steps: cfg.steps,
        train_images_per_sec: train,
        infer_images_per_sec: infer,
        final_loss: loss[0],
        peak_rss_bytes: peak_rss_bytes(),
    }
}

/// Seconds each of `reps` gradient all-reduces (mean over the ranks of `coll`) of `len` values
/// took, after `warmup` untimed ones. The ranks first agree (a one-value sum) before each
/// call, so the time is the exchange itself, not the wait for a slower rank.
pub fn all_reduce<B: Backend>(be: &B, coll: &dyn Collective<B>, len: usize, warmup: usize, reps: usize) -> Vec<f64> {
    let mut buf = be.alloc(len);
    be.fill(&mut buf, len, 1.0);
    let mut times = Vec::with_capacity(reps);
    for i in 0..warmup + reps {
        coll.all_reduce_host(&mut [0.0]);
        let t0 = Instant::now();
        coll.all_reduce_mean(be, &mut buf, len);
        // A GPU collective only queues the exchange: reading a value back waits for it.
        be.download(&buf, &mut [0.0]);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times
}

/// Values in the gradient arena of the network `cfg` describes (what one training step
/// all-reduces).
pub fn gradient_len<B: Backend>(be: &B, cfg: &BenchConfig) -> usize {
    let mut model = build(be, cfg.arch, cfg.model, 0);
    let (_, grads) = model.state_and_grads();
    be.buf_len(grads)
}
