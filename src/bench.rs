//! Throughput of training steps (forward, loss, backward, Adam) and inference on random
//! batches of the configured image size (CIFAR's 32x32 by default), as `resnet-cifar bench`
//! reports it.

use crate::data::CHANNELS;
use crate::engine::{Backend, Collective, ConvGeom, ConvOp, GradSlots, Shape4};
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

/// One convolution layer's time a call ([`time_layers`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerTime {
    /// Module path, as in the state_dict.
    pub name: String,
    /// `c x h x w -> cout, kxk/stride`.
    pub conv: String,
    /// The backend's plan for it.
    pub path: String,
    pub forward_ms: f64,
    /// The weight gradient, and the input gradient but for the first layer (training
    /// computes none there).
    pub backward_ms: f64,
}

/// Each convolution of the network `cfg` describes, timed alone on random values of its
/// batch's shape, with the plan the backend makes for it: where a step's convolution time
/// goes, layer by layer. Median over `cfg.steps` calls each, after `cfg.warmup`.
pub fn time_layers<B: Backend>(be: &B, cfg: &BenchConfig) -> Vec<LayerTime> {
    let side = cfg.model.image_size;
    let input = Shape4::new(cfg.batch_size, side, side, CHANNELS);
    let geoms = std::cell::RefCell::new(Vec::new());
    let plan = |g: &ConvGeom| {
        geoms.borrow_mut().push(*g);
        be.conv2d_plan(g).to_string()
    };
    let summary = crate::model::summarize_arch(be, (cfg.arch, cfg.model), input, Some(&plan));
    let rows = summary.rows.iter().filter(|r| r.path.is_some());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut random = |len: usize| {
        let host: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut buf = be.alloc(len);
        be.upload(&host, &mut buf);
        buf
    };
    let geoms = geoms.into_inner();
    let mut times = Vec::new();
    for (i, (row, g)) in rows.zip(&geoms).enumerate() {
        let plan = be.conv2d_plan(g);
        let (x, w, dy) = (
            random(g.input.numel()),
            random(g.weight_len()),
            random(g.output().numel()),
        );
        let (mut y, mut dx, mut dw) = (
            be.alloc(g.output().numel()),
            be.alloc(g.input.numel()),
            be.alloc(g.weight_len()),
        );
        let mut ws = be.alloc(be.conv2d_workspace_len(g, &plan));
        let conv = ConvOp { g, plan: &plan, w: &w };
        // Each call reads a value of its output back, so that a GPU's queued work is done.
        let mut one = [0f32];
        let forward_ms = median_ms(cfg, || {
            be.conv2d_forward(conv, &x, &mut y, &mut ws);
            be.download(&y, &mut one);
        });
        let backward_ms = median_ms(cfg, || {
            let dx = (i > 0).then_some(&mut dx);
            let slot = GradSlots {
                arena: &mut dw,
                weight: 0,
                bias: None,
            };
            be.conv2d_backward(conv, &x, &dy, dx, slot, &mut ws);
            be.download(&dw, &mut one);
        });
        times.push(LayerTime {
            name: row.name.clone(),
            conv: row.conv.clone().unwrap_or_default(),
            path: row.path.clone().unwrap_or_default(),
            forward_ms,
            backward_ms,
        });
    }
    times
}

/// The median of `cfg.steps` timed calls of `f` (after `cfg.warmup`), in milliseconds.
fn median_ms(cfg: &BenchConfig, mut f: impl FnMut()) -> f64 {
    let mut times = Vec::with_capacity(cfg.steps);
    for i in 0..cfg.warmup + cfg.steps.max(1) {
        let t0 = Instant::now();
        f();
        if i >= cfg.warmup {
            times.push(1e3 * t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
