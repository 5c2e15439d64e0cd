//! `--precision bf16` on the CPU: a training step with bf16 operands against the fp32 one (the
//! same model, the same real images), and the refusals the command line gives where bf16 is
//! not available (simulated with `RESNET_CIFAR_NO_BF16=1`) or not meant.

mod common;

use common::loss_and_grads;
use resnet_cifar::engine::cpu::{Bf16Kernel, Cpu};
use resnet_cifar::model::{ResNet, ResNetConfig, Stem};
use resnet_cifar::test_support::bf16_kernels;

/// The first `n` images of the shared CIFAR-10 files, NHWC, scaled to about unit variance,
/// and their labels.
fn images(n: usize) -> (Vec<f32>, Vec<u32>) {
    let raw = std::fs::read(common::shared_dir().join("data/cifar10/data_batch_1.bin")).unwrap();
    let mut x = Vec::with_capacity(n * 3072);
    let mut labels = Vec::new();
    for rec in raw.chunks_exact(3073).take(n) {
        labels.push(rec[0] as u32);
        for p in 0..1024 {
            for c in 0..3 {
                x.push((rec[1 + c * 1024 + p] as f32 / 255.0 - 0.47) / 0.25);
            }
        }
    }
    (x, labels)
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let size: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / size.max(1e-300)).sqrt()
}

/// The images rounded to bf16 (nearest, ties to even): a perturbation of bf16's size.
fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|v| {
            let b = v.to_bits();
            f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
        })
        .collect()
}

/// Median and worst (with its name) relative L2 difference of each gradient tensor.
fn gradient_gaps(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f64, (f64, String)) {
    let mut errs: Vec<(f64, String)> = a
        .iter()
        .zip(b)
        .map(|((name, x), (_, y))| (relative_l2(x, y), name.clone()))
        .collect();
    errs.sort_by(|p, q| p.0.total_cmp(&q.0));
    (errs[errs.len() / 2].0, errs[errs.len() - 1].clone())
}

/// One step of ResNet-18 (seed stem and cifar stem) on 32 real images with bf16 operands
/// against the fp32 step. The loss is a smooth function of the weights and images: bf16's
/// 8-bit operands move it by less than the rounding of one product of two of them, 2^-8 (the
/// bound, 3.9e-3). Measured on the seed stem: 4.8e-5 through Winograd's tiles, 1.7e-3 with
/// every convolution computed directly (im2col), 1.2e-3 with the AMX direct path (2.4e-4
/// on the cifar stem).
/// The gradients of a freshly initialised network are not: rounding only the input images
/// to bf16, everything else in fp32, already moves them by 18-20% (median tensor),
/// because BatchNorm's backward pass subtracts nearly equal terms. So the bf16 step's
/// gradients are held to the network's own sensitivity: their median difference from fp32
/// within 3x what rounding the images alone makes (measured 1.7x and 1.5x), and above 1e-4
/// (an fp32 product would give about 1e-6: the bf16 path is taken). On each bf16 kernel the
/// CPU has.
#[test]
fn a_bf16_step_stays_within_bf16_rounding_of_the_fp32_step() {
    let kernels = bf16_kernels();
    if kernels.is_empty() {
        return;
    }
    let (x, labels) = images(32);
    for stem in [Stem::Seed, Stem::Cifar] {
        let cfg = ResNetConfig {
            stem,
            ..ResNetConfig::default()
        };
        let fp32 = Cpu::default();
        let (loss32, grads32) = loss_and_grads(&fp32, &mut ResNet::new(&fp32, cfg, 3), &x, &labels);
        let (_, grads_rounded) = loss_and_grads(&fp32, &mut ResNet::new(&fp32, cfg, 3), &rounded(&x), &labels);
        let (sensitivity, _) = gradient_gaps(&grads_rounded, &grads32);
        for &kernel in &kernels {
            let bf16 = Cpu::bf16(kernel);
            let (loss16, grads16) = loss_and_grads(&bf16, &mut ResNet::new(&bf16, cfg, 3), &x, &labels);
            check_step(stem, kernel, (loss32, &grads32), (loss16, &grads16), sensitivity);
        }
    }
}

/// The bf16 step's loss and gradients against fp32's, the gradients against the network's
/// own sensitivity to rounding its images (see the test above).
fn check_step(
    stem: Stem,
    kernel: Bf16Kernel,
    (loss32, grads32): (f32, &[(String, Vec<f32>)]),
    (loss16, grads16): (f32, &[(String, Vec<f32>)]),
    sensitivity: f64,
) {
    {
        let (median, worst) = gradient_gaps(grads16, grads32);
        let loss_gap = ((loss16 - loss32) / loss32).abs();
        eprintln!(
            "{stem:?} stem, {kernel:?}: loss {loss32} (fp32) vs {loss16} (bf16), relative gap {loss_gap:.1e}; \
             gradients: median relative L2 {median:.2e}, worst {:.2e} ({}); images rounded to \
             bf16 alone: median {sensitivity:.2e}",
            worst.0, worst.1
        );
        assert!(loss_gap < 2f32.powi(-8), "{stem:?} {kernel:?}: loss gap {loss_gap}");
        assert!(
            median > 1e-4,
            "{stem:?} {kernel:?}: bf16 operands changed nothing ({median})"
        );
        assert!(
            median < 3.0 * sensitivity,
            "{stem:?} {kernel:?}: median gradient difference {median}, against {sensitivity} from rounding the images"
        );
    }
}

fn cli(args: &[&str], no_bf16: bool) -> (Option<i32>, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"));
    c.args(args);
    if no_bf16 {
        c.env("RESNET_CIFAR_NO_BF16", "1");
    }
    let o = c.output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn the_command_line_refuses_bf16_where_it_cannot_run() {
    let bench = ["bench", "--steps", "1", "--warmup", "0", "--precision"];
    // A CPU without the instructions (simulated): one line naming them, exit 2.
    let (code, err) = cli(&[&bench[..], &["bf16"]].concat(), true);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--precision bf16") && err.contains("AVX512_BF16"), "{err}");
    // tf32 is a GPU mode, and bf16 is built for the CPU only.
    let (code, err) = cli(&[&bench[..], &["tf32"]].concat(), false);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tf32 is for CUDA"), "{err}");
    let (code, err) = cli(&[&bench[..], &["bf16", "--device", "cuda"]].concat(), false);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("CPU only"), "{err}");
    // --cpu-kernel picks bf16's kernel: refused with fp32.
    let (code, err) = cli(&[&bench[..], &["fp32", "--cpu-kernel", "avx512"]].concat(), false);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--cpu-kernel avx512") && err.contains("--precision bf16"),
        "{err}"
    );
}

/// `--cpu-kernel amx` runs where the CPU has AMX tiles and is refused in one line where it
/// has not; `--cpu-kernel avx512` runs wherever bf16 does, and says so in the backend's name.
#[test]
fn the_cpu_kernel_flag_names_the_kernel_or_says_why_not() {
    let bench = [
        "bench",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "2",
        "--precision",
        "bf16",
    ];
    let run = |kernel: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
            .args([&bench[..], &["--cpu-kernel", kernel]].concat())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.code(), text)
    };
    if bf16_kernels().is_empty() {
        return;
    }
    let (code, out) = run("avx512");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("bf16 operands on AVX512_BF16"), "{out}");
    let (code, out) = run("amx");
    if Bf16Kernel::amx_available() {
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("bf16 operands on AMX tiles"), "{out}");
    } else {
        assert_eq!(code, Some(2), "{out}");
        assert_eq!(out.trim().lines().count(), 1, "{out}");
        assert!(out.contains("--cpu-kernel amx") && out.contains("AMX"), "{out}");
    }
}
