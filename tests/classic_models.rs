//! The seed's comparison models (LeNet, VGG-16 with batch norm) against PyTorch's definitions in
//! `scripts/classic_models.py`: the same formula-made weights give the same logits, loss and
//! gradients (training mode), on the CPU and, when there is one, on the GPU.

mod common;

use common::{Golden, max_rel_err, set_formula_weights};
use resnet_cifar::engine::{Backend, Shape4, nchw_to_nhwc};
use resnet_cifar::model::{Arch, ResNetConfig, build};
use safetensors::SafeTensors;

fn fixture() -> (Golden, Vec<String>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/classic_models.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let names = SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    (Golden::from_bytes(bytes), names)
}

fn check<B: Backend>(be: &B, arch: Arch) {
    let (g, names) = fixture();
    let name = arch.name();
    let mut model = build(be, arch, ResNetConfig::default(), 0);
    set_formula_weights(be, model.as_mut());
    let s = g.shape("input");
    let input = Shape4::new(s[0], s[2], s[3], s[1]);
    let x = common::put(be, &nchw_to_nhwc(&g.f32("input"), input));
    let labels: Vec<u32> = g.i32("labels").iter().map(|&l| l as u32).collect();

    model.forward(be, &x, input, true);
    let logits = common::get(be, model.logits(), input.n * 10);
    let err = max_rel_err(&logits, &g.f32(&format!("{name}.logits")));
    assert!(err < 1e-4, "{name} on {}: logits differ by {err:.2e}", be.name());
    model.backward(be, &x, &labels);
    let loss = common::get(be, model.loss(), 1)[0];
    let want = g.f32(&format!("{name}.loss"))[0];
    assert!(
        ((loss - want) / want).abs() < 1e-4,
        "{name}: loss {loss} vs PyTorch {want}"
    );

    // Every trainable tensor, by PyTorch's name: gradient sum and |sum|.
    let prefix = format!("{name}.grad_sum.");
    let mut want_names: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix).map(String::from))
        .collect();
    want_names.sort();
    let mut ours = Vec::new();
    let (mut state, grads) = model.state_and_grads();
    state.visit_params(&mut |p| {
        let grad = p.read_grad(be, grads).unwrap();
        let abs: f64 = grad.iter().map(|v| v.abs() as f64).sum();
        let sum: f64 = grad.iter().map(|&v| v as f64).sum();
        let want_abs = g.f32(&format!("{name}.grad_abs_sum.{}", p.name))[0] as f64;
        let want_sum = g.f32(&format!("{name}.grad_sum.{}", p.name))[0] as f64;
        ours.push(p.name.clone());
        // A conv bias right before batch norm has a zero gradient in exact arithmetic (the
        // normalisation removes it): both sides hold only float noise there.
        if want_abs / (grad.len() as f64) < 1e-6 {
            assert!(
                abs / (grad.len() as f64) < 1e-5,
                "{name}: {}: |grad| {abs:.3e} should be noise",
                p.name
            );
            return;
        }
        assert!(
            (abs - want_abs).abs() <= 1e-3 * want_abs.max(1e-6),
            "{name}: {}: grad |sum| {abs:.6e} vs PyTorch {want_abs:.6e}",
            p.name
        );
        assert!(
            (sum - want_sum).abs() <= 1e-3 * want_abs.max(1e-6),
            "{name}: {}: grad sum {sum:.6e} vs PyTorch {want_sum:.6e}",
            p.name
        );
    });
    ours.sort();
    assert_eq!(ours, want_names, "{name}: parameter names are PyTorch's");
}

on_backends! {
    lenet_matches_pytorch, lenet_matches_pytorch_on_cuda => |be| check(be, Arch::Lenet);
    vgg16_matches_pytorch, vgg16_matches_pytorch_on_cuda => |be| check(be, Arch::Vgg16);
}
