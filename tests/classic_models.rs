//! The seed's comparison models (LeNet, VGG-16 with batch norm) and airbench94's network against
//! PyTorch's definitions in `scripts/classic_models.py` (airbench's is its own code): the same
//! formula-made weights give the same logits, loss and gradients (training mode), on the CPU
//! and, when there is one, on the GPU; the state_dicts have the same names and shapes, in the
//! same order, so a checkpoint loads into the PyTorch module.

mod common;

use common::{Golden, max_rel_err, set_formula_weights};
use resnet_cifar::engine::{Backend, Shape4, nchw_to_nhwc};
use resnet_cifar::model::{Arch, ResNetConfig, build};
use resnet_cifar::nn::Entry;
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/classic_models.safetensors");

fn fixture() -> (Golden, Vec<String>) {
    let bytes = std::fs::read(FIXTURE).unwrap();
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

/// PyTorch's state_dict of the model `name`: (key, shape) in its order, from the fixture's
/// metadata.
fn torch_state_dict(name: &str) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(FIXTURE).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let json = &meta.metadata().as_ref().expect("fixture metadata")[&format!("{name}.state_dict")];
    // serde_json keeps the keys' order only with its preserve_order feature: read them in order.
    let map: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut keys: Vec<(usize, String)> = map
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (json.find(&format!("\"{k}\"")).unwrap(), k.clone()))
        .collect();
    keys.sort();
    keys.into_iter()
        .map(|(_, k)| {
            let shape = map[&k]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k, shape)
        })
        .collect()
}

fn state_dict_is_pytorchs(arch: Arch) {
    let be = resnet_cifar::engine::cpu::Cpu::default();
    let mut model = build(&be, arch, ResNetConfig::default(), 0);
    let mut ours = Vec::new();
    model.visit(&mut |e| match e {
        Entry::Tensor(p) => ours.push((p.name.clone(), p.shape.clone())),
        Entry::Counter { name, .. } => ours.push((name.to_string(), vec![])),
    });
    assert_eq!(
        ours,
        torch_state_dict(arch.name()),
        "{}: state_dict keys and shapes",
        arch.name()
    );
}

#[test]
fn state_dicts_have_pytorchs_keys_shapes_and_order() {
    for arch in [Arch::Lenet, Arch::Vgg16, Arch::Airbench] {
        state_dict_is_pytorchs(arch);
    }
}

on_backends! {
    lenet_matches_pytorch, lenet_matches_pytorch_on_cuda => |be| check(be, Arch::Lenet);
    vgg16_matches_pytorch, vgg16_matches_pytorch_on_cuda => |be| check(be, Arch::Vgg16);
    airbench_matches_pytorch, airbench_matches_pytorch_on_cuda => |be| check(be, Arch::Airbench);
}

/// airbench's `Conv.reset_parameters`: PyTorch's default initialisation, then `dirac_` on the
/// first in-channels filters (a 1 at the centre tap of the filter's own channel) and a zero
/// bias; its whitening filters and batch-norm scales are frozen.
#[test]
fn airbench_convolutions_start_with_identity_filters() {
    let be = resnet_cifar::engine::cpu::Cpu::default();
    let mut model = build(&be, Arch::Airbench, ResNetConfig::default(), 3);
    let mut seen = 0;
    model.visit(&mut |e| {
        let Entry::Tensor(p) = e else { return };
        let v = p.read(&be);
        if p.shape.len() == 4 {
            let [cout, cin, k, _] = p.shape[..] else { unreachable!() };
            let filter = cin * k * k;
            for (o, f) in v.chunks(filter).enumerate() {
                if o < cin {
                    let centre = o * k * k + (k / 2) * k + k / 2;
                    let want: Vec<f32> = (0..filter).map(|i| f32::from(i == centre)).collect();
                    assert_eq!(f, &want[..], "{}: filter {o} is not the identity", p.name);
                } else {
                    let bound = 1.0 / (filter as f32).sqrt();
                    assert!(
                        f.iter().all(|w| w.abs() <= bound),
                        "{}: filter {o} out of bounds",
                        p.name
                    );
                    assert!(f.iter().any(|&w| w != 0.0), "{}: filter {o} is zero", p.name);
                }
            }
            assert!(cout >= cin);
            assert_eq!(p.frozen, p.name == "0.weight", "{}: frozen", p.name);
            seen += 1;
        } else if p.name == "0.bias" {
            assert!(v.iter().all(|&b| b == 0.0), "0.bias starts at 0");
        } else if p.name.ends_with("norm1.weight") || p.name.ends_with("norm2.weight") {
            assert!(
                p.frozen && v.iter().all(|&g| g == 1.0),
                "{}: a frozen scale of 1",
                p.name
            );
        }
    });
    assert_eq!(seen, 7, "the whitening convolution and six 3x3 convolutions");
}
