//! `resnet-cifar predict`: classify image files of any size with a trained checkpoint.
//!
//! Each image is decoded (PNG or JPEG), converted to RGB, cut to its largest centred square
//! (so nothing is stretched) and resized to 32x32 with an antialiasing filter (Lanczos3), then
//! normalised as the training images are.

use crate::data::transform::{SIDE, normalize};
use crate::engine::{Backend, Shape4};
use crate::model::Network;
use image::imageops::FilterType;
use std::path::Path;

/// One class and its softmax probability.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Guess {
    pub class: String,
    pub index: usize,
    pub probability: f64,
}

/// Loads `path` as a normalised 32x32 NHWC image (`[32 * 32 * 3]`).
pub fn load_image(path: &Path) -> Result<Vec<f32>, String> {
    let img = image::open(path).map_err(|e| format!("{}: not a readable PNG or JPEG image: {e}", path.display()))?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    let side = w.min(h);
    let square = image::imageops::crop_imm(&rgb, (w - side) / 2, (h - side) / 2, side, side).to_image();
    let small = image::imageops::resize(&square, SIDE as u32, SIDE as u32, FilterType::Lanczos3);
    Ok(small
        .pixels()
        .flat_map(|p| (0..3).map(move |c| normalize(p[c], c)))
        .collect())
}

/// The `k` most probable classes of each image, best first.
pub fn predict<B: Backend>(
    be: &B,
    model: &mut dyn Network<B>,
    images: &[Vec<f32>],
    classes: &[String],
    k: usize,
) -> Vec<Vec<Guess>> {
    let n = images.len();
    let per = SIDE * SIDE * 3;
    let mut x = be.alloc(n * per);
    be.upload(&images.concat(), &mut x);
    model.forward(be, &x, Shape4::new(n, SIDE, SIDE, 3), false);
    let nc = model.num_classes();
    let mut logits = vec![0f32; n * nc];
    be.download(model.logits(), &mut logits);
    logits
        .chunks_exact(nc)
        .map(|row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let mut order: Vec<usize> = (0..nc).collect();
            order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
            order
                .into_iter()
                .take(k)
                .map(|i| Guess {
                    class: classes.get(i).cloned().unwrap_or_else(|| format!("class {i}")),
                    index: i,
                    probability: exps[i] / total,
                })
                .collect()
        })
        .collect()
}
