//! `resnet-cifar predict`: images of any size and format in, top-k classes out; bad images
//! refused with one line.

mod common;

use common::cli;

use resnet_cifar::checkpoint;
use resnet_cifar::data::{Cifar10, Dataset, Normalization};
use resnet_cifar::engine::Shape4;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::model::{ResNet, ResNetConfig};
use std::path::Path;

/// CIFAR image `i` of the first training file as an RGB image (the files store planes).
fn cifar_image(data: &Dataset, i: usize) -> image::RgbImage {
    let px = &data.train.pixels[i * 3072..(i + 1) * 3072];
    image::RgbImage::from_fn(32, 32, |x, y| {
        let at = (y * 32 + x) as usize;
        image::Rgb([px[at], px[1024 + at], px[2048 + at]])
    })
}

#[test]
fn predict_matches_the_model_and_handles_any_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut model = ResNet::new(&Cpu::default(), ResNetConfig::default(), 5);
    let ckpt = d.join("model.safetensors");
    checkpoint::save(&ckpt, &Cpu::default(), &mut model, None).unwrap();
    let data = Cifar10::load(&common::shared_dir().join("data/cifar10")).unwrap();

    // A 32x32 PNG goes through unchanged: the probabilities are the model's own softmax.
    let img = cifar_image(&data, 7);
    img.save(d.join("a.png")).unwrap();
    let x: Vec<f32> = img
        .pixels()
        .flat_map(|p| (0..3).map(move |c| Normalization::CIFAR10.apply(p[c], c)))
        .collect();
    model.forward(&Cpu::default(), &x, Shape4::new(1, 32, 32, 3), false);
    let logits = common::get(&Cpu::default(), model.logits(), 10);
    let max = logits.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
    let total: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let best = (0..10).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
    let p_best = (logits[best] as f64 - max).exp() / total;

    // Any size and format: a 100x60 JPEG of a bigger version of another image.
    let big = image::imageops::resize(&cifar_image(&data, 9), 100, 60, image::imageops::FilterType::Triangle);
    big.save(d.join("b.jpg")).unwrap();

    let ck = ckpt.to_str().unwrap();
    let (a, b) = (d.join("a.png"), d.join("b.jpg"));
    let (code, out, err) = cli(&[
        "predict",
        "--checkpoint",
        ck,
        "--top-k",
        "4",
        "--json",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = v.as_array().unwrap();
    assert_eq!(results.len(), 2);
    let top = results[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 4);
    assert_eq!(top[0]["index"].as_u64().unwrap() as usize, best);
    let p = top[0]["probability"].as_f64().unwrap();
    assert!(
        (p - p_best).abs() < 1e-5,
        "top-1 probability {p} vs the model's softmax {p_best}"
    );
    for r in results {
        let probs: Vec<f64> = r["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["probability"].as_f64().unwrap())
            .collect();
        assert!(probs.windows(2).all(|w| w[0] >= w[1]), "best first: {probs:?}");
        assert!(probs.iter().sum::<f64>() <= 1.0 + 1e-9);
    }

    // Text output: one line per image with class names.
    let (code, out, _) = cli(&["predict", "--checkpoint", ck, a.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1);
    assert!(out.starts_with(&format!("{}: ", a.display())), "{out}");
}

fn assert_refused(args: &[&str], names: &str) {
    let (code, _, err) = cli(args);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(names), "{err}");
}

#[test]
fn unreadable_images_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = d.join("model.safetensors");
    checkpoint::save(
        &ckpt,
        &Cpu::default(),
        &mut ResNet::new(&Cpu::default(), ResNetConfig::default(), 0),
        None,
    )
    .unwrap();
    let ck = ckpt.to_str().unwrap();
    let fake = d.join("notes.png");
    std::fs::write(&fake, "not an image").unwrap();
    assert_refused(&["predict", "--checkpoint", ck, fake.to_str().unwrap()], "notes.png");
    let truncated = d.join("half.png");
    let mut png = Vec::new();
    image::RgbImage::new(40, 40)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    assert_refused(
        &["predict", "--checkpoint", ck, truncated.to_str().unwrap()],
        "half.png",
    );
    assert_refused(&["predict", "--checkpoint", ck, "/nonexistent/x.jpg"], "x.jpg");
    assert_refused(
        &[
            "predict",
            "--checkpoint",
            &format!("{}", Path::new(d).join("none.safetensors").display()),
            fake.to_str().unwrap(),
        ],
        "none.safetensors",
    );
}
