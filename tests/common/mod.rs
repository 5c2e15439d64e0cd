//! Helpers shared by the integration tests: the golden files and the formula-made weights.
#![allow(dead_code)]

use resnet_cifar::engine::prelude::*;
use resnet_cifar::model::Network;
use resnet_cifar::nn::{Entry, Module};
use resnet_cifar::optim::Adam;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

/// `../shared` beside the repository (CI has it at the same relative path).
pub fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(file: &str) -> Self {
        let path = shared_dir().join("golden").join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self { bytes }
    }
    pub fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("golden file parses")
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor {name} missing"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    pub fn i32(&self, name: &str) -> Vec<i32> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap().shape().to_vec()
    }
}

/// Sets every state entry as the golden README prescribes: entry k of the state_dict, element
/// i of its PyTorch layout, computed in f64 and rounded to f32.
pub fn set_formula_weights<B: Backend>(be: &B, model: &mut (impl Module<B> + ?Sized)) {
    let mut k = 0usize;
    model.visit(&mut |e| {
        if let Entry::Tensor(p) = e {
            let kf = k as f64;
            let n = p.numel();
            let leaf = p.name.rsplit('.').next().unwrap().to_string();
            let values: Vec<f32> = (0..n)
                .map(|i| {
                    let i = i as f64;
                    let v = match (leaf.as_str(), p.shape.len()) {
                        ("weight", d) if d >= 2 => {
                            let fan_in = (n / p.shape[0]) as f64;
                            (2.0 / fan_in).sqrt() * 2f64.sqrt() * (0.7 * i + 0.3 * kf + 0.1).sin()
                        }
                        ("weight", _) => 1.0 + 0.1 * (0.9 * i + kf).sin(),
                        ("bias", _) => 0.1 * (1.1 * i + kf).cos(),
                        ("running_mean", _) => 0.0,
                        ("running_var", _) => 1.0,
                        _ => panic!("no formula for {}", p.name),
                    };
                    v as f32
                })
                .collect();
            p.write(be, &values);
        }
        k += 1;
    });
}

/// Largest |a - b| over the largest |b|.
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

/// The GPU backend shared by a test binary's tests, or `None` (with the reason printed) on a
/// machine without CUDA. Precision is full fp32: the tests compare against fp32 references.
pub fn cuda() -> Option<&'static resnet_cifar::engine::cuda::Cuda> {
    use resnet_cifar::engine::cuda::{Cuda, Precision};
    static CUDA: std::sync::OnceLock<Result<Cuda, String>> = std::sync::OnceLock::new();
    match CUDA.get_or_init(|| Cuda::new(0, Precision::Fp32)) {
        Ok(c) => Some(c),
        // On the GPU machine (scripts/gpu-check.sh requires `gpu`) a test that cannot reach
        // the GPU fails instead of passing as skipped.
        Err(e) => {
            resnet_cifar::test_support::skip("gpu", "the CUDA backend", e);
            None
        }
    }
}

/// `#[test] fn NAME_cpu` and `NAME_cuda` running `BODY(&backend)`; the CUDA one returns early
/// (saying why) on a machine without a GPU.
#[macro_export]
macro_rules! on_backends {
    ($($cpu:ident, $cuda:ident => $body:expr;)*) => {$(
        #[test]
        fn $cpu() {
            $body(&resnet_cifar::engine::cpu::Cpu::default());
        }
        #[test]
        fn $cuda() {
            if let Some(be) = common::cuda() {
                $body(be);
            }
        }
    )*};
}

/// Uploads `host` into a fresh device buffer.
pub fn put<B: Backend>(be: &B, host: &[f32]) -> B::Buf {
    let mut b = be.alloc(host.len());
    be.upload(host, &mut b);
    b
}

/// The first `len` values of `buf`, on the host.
pub fn get<B: Backend>(be: &B, buf: &B::Buf, len: usize) -> Vec<f32> {
    let mut h = vec![0.0; len];
    be.download(buf, &mut h);
    h
}

/// Runs the `resnet-cifar` binary: (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Starts the binary with `args` and returns once it has printed a line starting with `prefix`
/// (or ended): a run to kill, or to hold while another tries the same folder.
pub fn spawn_until(args: &[&str], prefix: &str) -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_resnet-cifar"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.as_mut().unwrap()).lines();
    for line in lines {
        if line.unwrap().starts_with(prefix) {
            break;
        }
    }
    child
}

/// An image of `class` (a colour) with a drawn shape, `w x h` pixels, varied by `i`.
pub fn drawn(class: usize, w: u32, h: u32, i: u32) -> image::RgbImage {
    let base = [[200u8, 40, 40], [40, 190, 60], [50, 60, 210]][class];
    image::RgbImage::from_fn(w, h, |x, y| {
        let inside =
            (x as i64 - (w / 2) as i64).pow(2) + (y as i64 - (h / 2) as i64).pow(2) < ((w.min(h) / 3) as i64).pow(2);
        let shade = ((x * 7 + y * 13 + i * 31) % 40) as u8;
        let k = if inside { 30 } else { 0 };
        image::Rgb(base.map(|v| v.saturating_sub(k).saturating_add(shade)))
    })
}

pub const CLASSES: [&str; 3] = ["crimson", "forest", "navy"];

/// An image folder with `train/` and `test/`: three classes of coloured shapes in PNG, JPEG and
/// BMP of several sizes, plus a grayscale and an RGBA image; `corrupt` adds a file that is
/// not an image.
pub fn write_folder(dir: &Path, per_class: u32, corrupt: bool) {
    for (split, n) in [("train", per_class), ("test", per_class / 4)] {
        for (c, name) in CLASSES.iter().enumerate() {
            let d = dir.join(split).join(name);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let seed = i + 1000 * (split == "test") as u32;
                let (w, h, ext) = [(32, 32, "png"), (48, 40, "jpg"), (20, 30, "bmp"), (64, 64, "png")][i as usize % 4];
                drawn(c, w, h, seed).save(d.join(format!("{i:04}.{ext}"))).unwrap();
            }
        }
    }
    let gray = image::DynamicImage::ImageRgb8(drawn(0, 36, 36, 7)).to_luma8();
    gray.save(dir.join("train/crimson/gray.png")).unwrap();
    let rgba = image::DynamicImage::ImageRgb8(drawn(2, 32, 32, 9)).to_rgba8();
    rgba.save(dir.join("train/navy/rgba.png")).unwrap();
    if corrupt {
        std::fs::write(dir.join("train/forest/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    }
}

/// One Adam step of `model` from the gradients its last backward pass left in its arena.
pub fn adam_step<B: Backend>(be: &B, adam: &mut Adam<B>, model: &mut dyn Network<B>, lr: f64) {
    let (mut state, grads) = model.state_and_grads();
    adam.step(be, &mut *state, grads, lr);
}

/// The flat indices the golden files and the seed-dynamics fixture sample a tensor of `n`
/// values at: `j * n / 64` for j = 0..63, or all of them when n <= 64.
pub fn sample_indices(n: usize) -> Vec<usize> {
    if n <= 64 {
        (0..n).collect()
    } else {
        (0..64).map(|j| j * n / 64).collect()
    }
}

/// One forward and backward pass of `model` on the NHWC CIFAR-shaped batch `x` on the CPU
/// backend `be` (the one the model was built with): the loss and every parameter's gradient,
/// named.
pub fn loss_and_grads(
    be: &resnet_cifar::engine::cpu::Cpu,
    model: &mut resnet_cifar::model::ResNet<resnet_cifar::engine::cpu::Cpu>,
    x: &[f32],
    labels: &[u32],
) -> (f32, Vec<(String, Vec<f32>)>) {
    let buf = put(be, x);
    model.forward(
        be,
        &buf,
        resnet_cifar::engine::Shape4::new(labels.len(), 32, 32, 3),
        true,
    );
    model.backward(be, &buf, labels);
    let loss = model.loss()[0];
    let grads = model.grads().clone();
    let mut out = Vec::new();
    model.visit(&mut |e| {
        if let Entry::Tensor(p) = e
            && let Some(g) = p.read_grad(be, &grads)
        {
            out.push((p.name.clone(), g));
        }
    });
    (loss, out)
}
