//! `resnet-cifar predict`: classify image files of any size with a trained checkpoint.
//!
//! Each image is decoded (any format the `image` crate reads), converted to RGB, cut to its
//! largest centred square (so nothing is stretched) and resized to the model's image size with
//! an antialiasing filter (Lanczos3), exactly as an image folder's training images are, then
//! normalised as the model's training images were.

use crate::data::folder;
use crate::data::transform::{Crop, write_image};
use crate::data::{CHANNELS, DataSpec};
use crate::engine::Backend;
use crate::model::Network;
use std::path::Path;

/// One class and its softmax probability.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Guess {
    pub class: String,
    pub index: usize,
    pub probability: f64,
}

/// Loads `path` as a normalised NHWC image of the size `spec` gives (`[size * size * CHANNELS]`).
pub fn load_image(path: &Path, spec: &DataSpec) -> Result<Vec<f32>, String> {
    let img = folder::decode(path).map_err(|e| format!("{}: not a readable image: {e}", path.display()))?;
    let side = spec.image_size;
    let mut x = vec![0.0; CHANNELS * side * side];
    let whole = Crop {
        side,
        pad: 0,
        reflect: false,
        top: 0,
        left: 0,
        flip: false,
    };
    write_image(&folder::fit(&img, side), &mut x, whole, &spec.norm);
    Ok(x)
}

/// The `k` most probable classes of each image, best first.
pub fn predict<B: Backend>(
    be: &B,
    model: &mut dyn Network<B>,
    images: &[Vec<f32>],
    spec: &DataSpec,
    k: usize,
) -> Vec<Vec<Guess>> {
    let (n, classes) = (images.len(), &spec.classes);
    let input = model.input(n);
    let mut x = be.alloc(input.numel());
    be.upload(&images.concat(), &mut x);
    model.forward(be, &x, input, false);
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
