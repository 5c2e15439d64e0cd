//! ResNet-18 structure, state_dict compatibility, checkpoints, initialisation and determinism.

mod common;

use common::shared_dir;
use resnet_cifar::checkpoint;
use resnet_cifar::engine::Shape4;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::engine::prelude::*;
use resnet_cifar::model::{Network, ResNet, ResNetConfig, Stem};
use resnet_cifar::nn::{Entry, Module};
use resnet_cifar::optim::{Adam, AdamConfig};

fn cfg(stem: Stem) -> ResNetConfig {
    ResNetConfig {
        stem,
        stages: 4,
        num_classes: 10,
        image_size: 32,
    }
}

fn batch(be: &Cpu, n: usize, seed: u32) -> (Vec<f32>, Vec<u32>) {
    let x: Vec<f32> = (0..n * 32 * 32 * 3)
        .map(|i| (i as f32 * 0.37 + seed as f32).sin())
        .collect();
    let mut buf = be.alloc(x.len());
    be.upload(&x, &mut buf);
    (buf, (0..n as u32).map(|i| (i * 7 + seed) % 10).collect())
}

fn logits(be: &Cpu, model: &mut ResNet<Cpu>, x: &Vec<f32>, n: usize, train: bool) -> Vec<f32> {
    model.forward(be, x, Shape4::new(n, 32, 32, 3), train);
    let mut out = vec![0.0; n * model.cfg.num_classes];
    be.download(model.logits(), &mut out);
    out
}

/// Keys and shapes in state_dict order.
fn entries(model: &mut ResNet<Cpu>) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    model.visit(&mut |e| match e {
        Entry::Tensor(p) => out.push((p.name.clone(), p.shape.clone())),
        Entry::Counter { name, .. } => out.push((name.to_string(), vec![])),
    });
    out
}

/// The golden folder's list of the seed's state_dict, one section per stem.
fn golden_order(section: &str) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(shared_dir().join("golden/state_dict_order.txt")).unwrap();
    let body = text
        .split("## ")
        .find(|s| s.starts_with(section))
        .unwrap_or_else(|| panic!("section {section}"));
    body.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let _k = parts.next();
            let name = parts.next().unwrap().to_string();
            let dims = parts.next().unwrap().trim_matches(|c| c == '[' || c == ']');
            let shape = dims
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse().unwrap())
                .collect();
            (name, shape)
        })
        .collect()
}

#[test]
fn state_dict_keys_and_shapes_match_the_seed() {
    let be = Cpu::default();
    for (stem, section) in [(Stem::Seed, "seed stem"), (Stem::Cifar, "cifar stem")] {
        let mut model = ResNet::new(&be, cfg(stem), 0);
        let want = golden_order(section);
        assert_eq!(want.len(), 122, "{section}: the seed's state_dict has 122 entries");
        assert_eq!(entries(&mut model), want, "{section}: keys, order and shapes");
    }
}

#[test]
fn variants_build_and_produce_logits() {
    let be = Cpu::default();
    let (x, _) = batch(&be, 2, 1);
    for stem in Stem::ALL {
        for stages in [3, 4] {
            let mut model = ResNet::new(
                &be,
                ResNetConfig {
                    stem,
                    stages,
                    num_classes: 7,
                    image_size: 32,
                },
                0,
            );
            let out = logits(&be, &mut model, &x, 2, true);
            assert_eq!(out.len(), 14);
            assert!(out.iter().all(|v| v.is_finite()), "{stem:?}/{stages}: finite logits");
            let names: Vec<String> = entries(&mut model).into_iter().map(|e| e.0).collect();
            assert_eq!(
                names.iter().any(|n| n.starts_with("conv5.")),
                stages == 4,
                "{stem:?}/{stages}: conv5 present iff 4 stages"
            );
            let fc_in = if stages == 4 { 512 } else { 256 };
            let fc = entries(&mut model).into_iter().find(|e| e.0 == "fc.weight").unwrap();
            assert_eq!(fc.1, vec![7, fc_in]);
        }
    }
    // The seed's 3x3 stem is a 3x3 conv with stride 2 and padding 1.
    let mut model = ResNet::new(&be, cfg(Stem::Seed3x3), 0);
    assert_eq!(
        entries(&mut model)[0],
        ("conv1.0.weight".to_string(), vec![64, 3, 3, 3])
    );
}

#[test]
fn torchvision_stem_differs_from_seed_only_by_relu() {
    let be = Cpu::default();
    let (x, _) = batch(&be, 2, 3);
    let mut seed = ResNet::new(&be, cfg(Stem::Seed), 5);
    let mut tv = ResNet::new(&be, cfg(Stem::Torchvision), 5);
    // Same construction order and seed: same initial weights.
    let bytes = checkpoint::to_bytes(&checkpoint::state_dict(&be, &mut seed), None);
    checkpoint::load_bytes("seed", &bytes, &be, &mut tv).unwrap();
    assert_ne!(
        logits(&be, &mut seed, &x, 2, true),
        logits(&be, &mut tv, &x, 2, true),
        "the ReLU changes the output"
    );
}

/// Scales every residual-branch conv weight of `model` by 3.
fn scale_branch_convs(be: &Cpu, model: &mut ResNet<Cpu>) {
    model.visit(&mut |e| {
        if let Entry::Tensor(p) = e
            && p.name.contains(".layer.")
            && p.shape.len() == 4
        {
            let v: Vec<f32> = p.read(be).iter().map(|w| w * 3.0).collect();
            p.write(be, &v);
        }
    });
}

#[test]
fn zero_init_residual_makes_every_branch_silent() {
    let be = Cpu::default();
    let (x, _) = batch(&be, 2, 1);
    for zero in [false, true] {
        let mut a = ResNet::new(&be, cfg(Stem::Seed), 9);
        let mut b = ResNet::new(&be, cfg(Stem::Seed), 9);
        if zero {
            Network::zero_init_residual(&mut a, &be);
            Network::zero_init_residual(&mut b, &be);
        }
        scale_branch_convs(&be, &mut b);
        // With the last BN scale of each branch at 0, the branch convs cannot change the output:
        // only the stem, the shortcuts and the fc do.
        assert_eq!(
            logits(&be, &mut a, &x, 2, true) == logits(&be, &mut b, &x, 2, true),
            zero,
            "zero_init_residual {zero}"
        );
    }
}

#[test]
fn initialisation_follows_pytorch_defaults() {
    let be = Cpu::default();
    let mut model = ResNet::new(&be, cfg(Stem::Seed), 42);
    model.visit(&mut |e| {
        let Entry::Tensor(p) = e else { return };
        let v = p.read(&be);
        let leaf = p.name.rsplit('.').next().unwrap();
        match (leaf, p.shape.len()) {
            ("weight", d) if d >= 2 => {
                // kaiming_uniform(a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                let bound = 1.0 / ((p.numel() / p.shape[0]) as f32).sqrt();
                assert!(v.iter().all(|x| x.abs() <= bound), "{}: inside the bound", p.name);
                let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(max > 0.9 * bound, "{}: spans the bound", p.name);
                let mean_sq = v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64;
                let want = (bound * bound / 3.0) as f64;
                assert!((mean_sq - want).abs() < 0.2 * want, "{}: variance of a uniform", p.name);
            }
            ("weight", _) | ("running_var", _) => {
                assert!(v.iter().all(|&x| x == 1.0), "{}", p.name)
            }
            ("bias", _) if p.name.starts_with("fc") => {
                assert!(v.iter().all(|x| x.abs() <= 1.0 / 512f32.sqrt()))
            }
            _ => assert!(v.iter().all(|&x| x == 0.0), "{}", p.name),
        }
    });
    let mut other = ResNet::new(&be, cfg(Stem::Seed), 43);
    let a = checkpoint::state_dict(&be, &mut model);
    let b = checkpoint::state_dict(&be, &mut other);
    assert_ne!(
        a["conv1.0.weight"].bytes, b["conv1.0.weight"].bytes,
        "the seed changes the weights"
    );
}

#[test]
fn checkpoint_round_trip_gives_identical_logits() {
    let be = Cpu::default();
    let (x, labels) = batch(&be, 4, 2);
    let mut model = ResNet::new(&be, cfg(Stem::Seed), 1);
    // One training step so that weights, running statistics and counters are not initial.
    logits(&be, &mut model, &x, 4, true);
    model.backward(&be, &x, &labels);
    common::adam_step(&be, &mut Adam::new(AdamConfig::default()), &mut model, 0.01);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    checkpoint::save(&path, &be, &mut model, None).unwrap();

    let mut loaded = ResNet::new(&be, cfg(Stem::Seed), 99);
    checkpoint::load(&path, &be, &mut loaded).unwrap();
    assert_eq!(
        logits(&be, &mut model, &x, 4, false),
        logits(&be, &mut loaded, &x, 4, false)
    );
    assert_eq!(
        checkpoint::state_dict(&be, &mut loaded)["conv1.1.num_batches_tracked"].bytes,
        1i64.to_le_bytes()
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
}

#[test]
fn checkpoint_loading_is_strict_and_names_every_problem() {
    let be = Cpu::default();
    let mut seed = ResNet::new(&be, cfg(Stem::Seed), 1);
    let mut cifar = ResNet::new(
        &be,
        ResNetConfig {
            stem: Stem::Cifar,
            stages: 3,
            num_classes: 10,
            image_size: 32,
        },
        1,
    );
    let mut sd = checkpoint::state_dict(&be, &mut seed);
    sd.remove("conv2.0.layer.1.running_var");
    let bytes = checkpoint::to_bytes(&sd, None);
    let before = checkpoint::state_dict(&be, &mut cifar);
    let err = checkpoint::load_bytes("x.safetensors", &bytes, &be, &mut cifar)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.safetensors"), "{err}");
    assert!(
        err.contains("'conv1.0.weight' has shape [64, 3, 7, 7], expected [64, 3, 3, 3]"),
        "{err}"
    );
    assert!(err.contains("missing tensor 'conv2.0.layer.1.running_var'"), "{err}");
    assert!(err.contains("unexpected tensor 'conv5.0.layer.0.weight'"), "{err}");
    assert!(
        err.contains("'fc.weight' has shape [10, 512], expected [10, 256]"),
        "{err}"
    );
    let after = checkpoint::state_dict(&be, &mut cifar);
    assert!(
        before.iter().all(|(k, v)| after[k].bytes == v.bytes),
        "a refused load changes nothing"
    );

    let err = checkpoint::load_bytes("junk", b"not a safetensors file", &be, &mut seed)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("junk: not a valid safetensors file"), "{err}");
    let full = checkpoint::to_bytes(&checkpoint::state_dict(&be, &mut seed), None);
    let err = checkpoint::load_bytes("cut", &full[..full.len() / 2], &be, &mut seed)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cut: not a valid safetensors file"),
        "a truncated file is refused: {err}"
    );
}

fn train_steps(threads: usize, steps: usize) -> Vec<u8> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let be = Cpu::default();
        let mut model = ResNet::new(&be, cfg(Stem::Seed), 7);
        let mut adam = Adam::new(AdamConfig::default());
        for s in 0..steps {
            let (x, labels) = batch(&be, 8, s as u32);
            logits(&be, &mut model, &x, 8, true);
            model.backward(&be, &x, &labels);
            common::adam_step(&be, &mut adam, &mut model, 0.01);
        }
        checkpoint::to_bytes(&checkpoint::state_dict(&be, &mut model), None)
    })
}

#[test]
fn training_is_bit_for_bit_deterministic() {
    assert_eq!(
        train_steps(2, 3),
        train_steps(2, 3),
        "same seed and thread count, same weights"
    );
}

/// The gradient arena after one training step of `arch` with every parameter outside `keep`
/// frozen (none frozen for `keep` = None), the arena filled with NaN beforehand: what the
/// backward pass wrote, and the names and places of the parameters the optimizer updates.
fn grads_after_freezing(
    arch: resnet_cifar::model::Arch,
    keep: Option<&str>,
) -> (Vec<f32>, Vec<(String, usize, usize)>) {
    let be = Cpu::default();
    let mut model = resnet_cifar::model::build(&be, arch, cfg(Stem::Seed), 5);
    let (x, labels) = batch(&be, 4, 1);
    if let Some(keep) = keep {
        model.freeze_all_but(keep);
    }
    let (mut state, grads) = model.state_and_grads();
    let mut len = 0;
    state.visit_trainable(&mut |p| len = len.max(p.grad.unwrap() + p.numel()));
    be.upload(&vec![f32::NAN; len], grads);
    let mut trained = Vec::new();
    state.visit_params(&mut |p| trained.push((p.name.clone(), p.grad.unwrap(), p.numel())));
    drop(state);
    model.forward(&be, &x, model.input(4), true);
    model.backward(&be, &x, &labels);
    let mut host = vec![0.0; len];
    be.download(model.grads(), &mut host);
    (host, trained)
}

/// As PyTorch's autograd, which computes no gradient where nothing requires one: with the
/// layers below some point frozen (`--freeze-backbone`, airbench's whitening layer once its
/// bias stops training), their backward does not run (their gradients stay as they were), and
/// the gradients of what trains are those of the whole backward pass, bit for bit.
#[test]
fn frozen_layers_below_every_trained_one_run_no_backward() {
    use resnet_cifar::model::Arch;
    for (arch, keep) in [
        (Arch::Resnet18, "conv5"),
        (Arch::Resnet18, "fc"),
        (Arch::Airbench, "4"),
        (Arch::Vgg16, "classifier"),
    ] {
        let (whole, _) = grads_after_freezing(arch, None);
        let (partial, trained) = grads_after_freezing(arch, Some(keep));
        assert!(!trained.is_empty() && trained.iter().all(|(name, ..)| name.starts_with(keep)));
        let mut written = vec![false; whole.len()];
        for (name, at, len) in &trained {
            assert_eq!(
                &partial[*at..at + len],
                &whole[*at..at + len],
                "{arch:?}: {name}'s gradient"
            );
            written[*at..at + len].fill(true);
        }
        // The frozen layers below: never computed (the seed's network: conv1 to conv4 and the
        // stem; airbench: the whitening layer and groups 2 and 3).
        let untouched = partial.iter().zip(&written).filter(|(g, w)| !**w && g.is_nan()).count();
        let frozen = written.iter().filter(|w| !**w).count();
        assert!(
            untouched * 10 >= frozen * 9,
            "{arch:?} keeping {keep}: {untouched} of {frozen} frozen gradients untouched"
        );
    }
}
