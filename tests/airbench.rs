//! airbench94's training step against its own code (`airbench_steps` in
//! `scripts/classic_models.py`, run in PyTorch): from the same formula-made weights and one
//! fixed batch, seven steps of its recipe (SGD with Nesterov momentum in two parameter groups,
//! the batch-norm biases at 64x the learning rate; the triangle schedule; the summed,
//! label-smoothed loss; lookahead after step 5 and after the last) leave the same state, every
//! tensor of it, on the CPU and, when there is one, on the GPU.

mod common;

use common::{Golden, max_rel_err, set_formula_weights};
use resnet_cifar::engine::{Backend, Shape4, nchw_to_nhwc};
use resnet_cifar::model::{Arch, ResNetConfig, build};
use resnet_cifar::nn::Entry;
use resnet_cifar::train::optimizer::Optimizer;
use resnet_cifar::train::{Recipe, Reduction};

const STEPS: usize = 7;

fn recipe_steps_match_airbench<B: Backend>(be: &B) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/classic_models.safetensors");
    let g = Golden::from_bytes(std::fs::read(path).unwrap());
    let cfg = Recipe::Airbench94.config();
    assert_eq!((cfg.arch, cfg.loss_reduction), (Arch::Airbench, Reduction::Sum));
    let mut model = build(be, cfg.arch, ResNetConfig::default(), 0);
    set_formula_weights(be, model.as_mut());
    let s = g.shape("airbench_steps.input");
    let input = Shape4::new(s[0], s[2], s[3], s[1]);
    let x = common::put(be, &nchw_to_nhwc(&g.f32("airbench_steps.input"), input));
    let labels: Vec<u32> = g.i32("airbench_steps.labels").iter().map(|&l| l as u32).collect();
    model.set_label_smoothing(cfg.label_smoothing);
    // The summed loss: the gradient of the batch's sum, not its mean.
    model.set_loss_grad_scale(input.n as f32);
    let mut opt = Optimizer::new(&cfg.optimizer, cfg.lookahead);
    opt.start(be, model.as_mut());
    for step in 0..STEPS {
        model.forward(be, &x, input, true);
        model.backward(be, &x, &labels);
        let lr = cfg.schedule.lr(0, step, STEPS, STEPS as u64);
        opt.step(be, model.as_mut(), lr, STEPS as u64);
    }
    let mut checked = 0;
    model.visit(&mut |e| {
        let Entry::Tensor(p) = e else { return };
        let want = g.f32(&format!("airbench_steps.{}", p.name));
        let err = max_rel_err(&p.read(be), &want);
        assert!(
            err < 2e-4,
            "{} on {}: differs from airbench's by {err:.2e}",
            p.name,
            be.name()
        );
        checked += 1;
    });
    assert_eq!(checked, 2 + 3 * 10 + 1, "every float tensor of the state");
}

on_backends! {
    airbench_recipe_steps_match_its_code, airbench_recipe_steps_match_its_code_on_cuda =>
        recipe_steps_match_airbench;
}
