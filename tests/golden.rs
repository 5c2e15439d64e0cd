//! The engine against PyTorch: ResNet-18 with formula-made weights, one training step
//! (forward, loss, backward, Adam) and an eval forward, for both stems with golden files.

mod common;

use common::{Golden, max_rel_err, sample_indices, set_formula_weights};
use resnet_cifar::engine::{Backend, Shape4, nchw_to_nhwc};
use resnet_cifar::model::{ResNet, ResNetConfig, Stem};
use resnet_cifar::nn::{Entry, Module};
use resnet_cifar::optim::{Adam, AdamConfig};

/// How close each stored quantity must come. Logits and loss: 1e-4 relative (the golden
/// README's float32 figure) for both stems. Gradients are compared against their tensor's scale
/// (mean |grad|), `sum` and `|sum|` against `|sum|`.
struct Tolerance {
    sample: f64,
    sample_mean: f64,
    sum: f64,
    /// Eval logits after the Adam step. The first Adam step moves each weight by
    /// lr * g / (|g| + eps), a full lr for any gradient well above 1e-8, so weights whose
    /// gradient is float noise move by a noise-chosen amount: PyTorch f32 on this machine lands
    /// 1.6e-2 away from the golden seed-stem logits, PyTorch f64 3.9e-4.
    eval_after_step: f64,
}

/// Seed stem, measured (with Winograd F(4x4, 3x3) convolutions on the 8x8 and 4x4 maps):
/// samples within 3.5e-4 of scale (mean 2.0e-5), sums within 8.7e-5, eval after the step
/// 1.4e-3 (2.6e-4 with im2col everywhere). The bounds leave room for kernels that sum in
/// another order, and stay well inside the 1.6e-2 at which PyTorch's own f32 run lands.
const SEED_TOL: Tolerance = Tolerance {
    sample: 1e-3,
    sample_mean: 1e-4,
    sum: 3e-3,
    eval_after_step: 5e-3,
};

/// Cifar stem. In its golden run one pre-ReLU activation of conv5.0 (flat index 25041) is
/// -1.3e-7 against a standard deviation of 1.42: below f32 resolution, so its ReLU mask is a
/// coin toss for any f32 engine. Ours lands on the other side from PyTorch's, which moves every
/// gradient upstream of conv5.0 by ~4e-3 of its scale (worst 5e-2, |sum| 6.7e-3) and the eval
/// logits after the step by 9e-3. With that one mask flipped, PyTorch in f64 reproduces all 62
/// of our gradients to 6e-5 of scale, so the engine is exact; the bounds below only absorb the
/// flip. A real error (stride, padding, a BN statistic) is of order 1.
const CIFAR_TOL: Tolerance = Tolerance {
    sample: 0.1,
    sample_mean: 1e-2,
    sum: 2e-2,
    eval_after_step: 2e-2,
};

fn check_stem<B: Backend>(be: &B, stem: Stem, file: &str, tol: &Tolerance) {
    let g = Golden::open(file);
    let mut model = ResNet::new(
        be,
        ResNetConfig {
            stem,
            stages: 4,
            num_classes: 10,
            image_size: 32,
        },
        0,
    );
    set_formula_weights(be, &mut model);

    let shape = g.shape("input");
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let input = Shape4::new(n, h, w, c);
    let mut x = be.alloc(input.numel());
    be.upload(&nchw_to_nhwc(&g.f32("input"), input), &mut x);
    let labels: Vec<u32> = g.i32("labels").iter().map(|&l| l as u32).collect();

    // 1. train-mode forward and loss.
    model.forward(be, &x, input, true);
    let mut logits = vec![0.0; n * 10];
    be.download(model.logits(), &mut logits);
    let err = max_rel_err(&logits, &g.f32("train_logits"));
    assert!(
        err < 1e-4,
        "{file}: train logits differ by {err:.2e} (relative to the largest logit)"
    );
    model.backward(be, &x, &labels);
    let mut loss = [0f32];
    be.download(model.loss(), &mut loss);
    let want = g.f32("loss")[0];
    assert!(
        ((loss[0] - want) / want).abs() < 1e-4,
        "{file}: loss {} vs PyTorch {want}",
        loss[0]
    );

    // 2. every parameter's gradient.
    let mut checked = 0;
    let (mut worst, mut total_err, mut count) = (0f64, 0f64, 0usize);
    let (mut worst_abs, mut worst_sum) = (0f64, 0f64);
    let (mut state, grads) = model.state_and_grads();
    state.visit_params(&mut |p| {
        let grad = p.read_grad(be, grads).unwrap();
        let name = &p.name;
        let abs_sum: f64 = grad.iter().map(|v| v.abs() as f64).sum();
        let sum: f64 = grad.iter().map(|&v| v as f64).sum();
        let want_abs = g.f32(&format!("grad_abs_sum.{name}"))[0] as f64;
        let want_sum = g.f32(&format!("grad_sum.{name}"))[0] as f64;
        let scale = want_abs / grad.len() as f64;
        worst_abs = worst_abs.max((abs_sum - want_abs).abs() / want_abs);
        worst_sum = worst_sum.max((sum - want_sum).abs() / want_abs);
        assert!(
            (abs_sum - want_abs).abs() <= tol.sum * want_abs,
            "{file}: {name}: grad |sum| {abs_sum:.6e} vs PyTorch {want_abs:.6e}"
        );
        assert!(
            (sum - want_sum).abs() <= tol.sum * want_abs,
            "{file}: {name}: grad sum {sum:.6e} vs PyTorch {want_sum:.6e} (|sum| {want_abs:.3e})"
        );
        let samples = g.f32(&format!("grad_sample.{name}"));
        let idx = sample_indices(grad.len());
        assert_eq!(idx.len(), samples.len(), "{name}: sample count");
        for (&i, &want) in idx.iter().zip(&samples) {
            let e = (grad[i] as f64 - want as f64).abs() / scale;
            worst = worst.max(e);
            total_err += e;
            count += 1;
            assert!(
                e < tol.sample,
                "{file}: {name}[{i}]: grad {} vs PyTorch {want} ({e:.2e} of the tensor's scale {scale:.3e})",
                grad[i]
            );
        }
        checked += 1;
    });
    drop(state);
    assert_eq!(checked, 62, "every trainable tensor checked");
    let mean_err = total_err / count as f64;
    eprintln!(
        "{file}: gradient samples: worst {worst:.2e}, mean {mean_err:.2e} of their tensor's scale; |sum| worst {worst_abs:.2e}, sum worst {worst_sum:.2e}"
    );
    assert!(
        mean_err < tol.sample_mean,
        "{file}: mean gradient-sample error {mean_err:.2e} of scale"
    );

    // 3. one Adam step, then parameters and BN running statistics.
    let mut adam = Adam::new(AdamConfig::default());
    let (mut state, grads) = model.state_and_grads();
    adam.step(be, &mut *state, grads, 0.01);
    drop(state);
    model.visit(&mut |e| {
        let Entry::Tensor(p) = e else { return };
        let name = p.name.clone();
        let value = p.read(be);
        if p.trainable() {
            let want = g.f32(&format!("param_after_sample.{name}"));
            let grads = g.f32(&format!("grad_sample.{name}"));
            let scale = g.f32(&format!("grad_abs_sum.{name}"))[0] / value.len() as f32;
            for ((&i, &w), &grad) in sample_indices(value.len()).iter().zip(&want).zip(&grads) {
                // Adam's first step moves a parameter by lr * g / (|g| + eps): exactly lr for a
                // clear gradient. A gradient within float noise of zero (below 1% of its
                // tensor's scale) may move it anywhere in [-lr, lr], in PyTorch too.
                let step_tol = if grad.abs() as f64 > 5.0 * tol.sample * scale as f64 {
                    1e-6
                } else {
                    0.02
                };
                assert!(
                    (value[i] - w).abs() < step_tol,
                    "{file}: {name}[{i}] after Adam: {} vs PyTorch {w} (grad {grad:.3e})",
                    value[i]
                );
            }
        } else {
            let want = g.f32(&format!("buffer_after.{name}"));
            let err = max_rel_err(&value, &want);
            assert!(err < 1e-4, "{file}: {name} after the step differs by {err:.2e}");
        }
    });

    // 4. eval-mode forward with the updated weights and running statistics.
    model.forward(be, &x, input, false);
    be.download(model.logits(), &mut logits);
    let err = max_rel_err(&logits, &g.f32("eval_logits_after_step"));
    eprintln!("{file}: eval logits after the step: {err:.2e}");
    assert!(
        err < tol.eval_after_step,
        "{file}: eval logits after the step differ by {err:.2e}"
    );
}

fn seed_stem<B: Backend>(be: &B) {
    check_stem(be, Stem::Seed, "resnet18_seed_stem.safetensors", &SEED_TOL);
}

fn cifar_stem<B: Backend>(be: &B) {
    check_stem(be, Stem::Cifar, "resnet18_cifar_stem.safetensors", &CIFAR_TOL);
}

// On the GPU too (when there is one), in full fp32.
on_backends! {
    seed_stem_matches_pytorch, seed_stem_matches_pytorch_on_cuda => seed_stem;
    cifar_stem_matches_pytorch, cifar_stem_matches_pytorch_on_cuda => cifar_stem;
}
