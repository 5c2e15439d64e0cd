//! The whitening initialisation of a first convolution (airbench's, after Keller Jordan's
//! cifar10-airbench): from the `k x k` patches of some training images, the eigenvectors of
//! their (uncentred) covariance, each scaled by `1 / sqrt(eigenvalue + eps)`, as filters, and
//! their negatives after them. The layer's outputs then start decorrelated, of unit variance.

use crate::data::{CHANNELS, Images, Normalization};
use nalgebra::{DMatrix, SymmetricEigen};

/// The weights (PyTorch's layout, `[2 * d, 3, k, k]`, `d = 3 k k`) whitening the `k x k`
/// patches, at every position, of the first `count` of `images` normalised by `norm`; and the
/// covariance's eigenvalues, largest first (filter `i` and `d + i` belong to the `i`-th).
pub fn whitening_weights(
    images: &Images,
    norm: &Normalization,
    count: usize,
    k: usize,
    eps: f64,
) -> (Vec<f32>, Vec<f64>) {
    let (side, d) = (images.side, CHANNELS * k * k);
    let plane = side * side;
    let positions = side + 1 - k;
    let mut cov = vec![0f64; d * d];
    let mut patch = vec![0f64; d];
    let count = count.min(images.len());
    for i in 0..count {
        let img = images.image(i);
        let value = |c: usize, y: usize, x: usize| {
            (img[c * plane + y * side + x] as f64 / 255.0 - norm.mean[c] as f64) / norm.std[c] as f64
        };
        for y in 0..positions {
            for x in 0..positions {
                for c in 0..CHANNELS {
                    for dy in 0..k {
                        for dx in 0..k {
                            patch[(c * k + dy) * k + dx] = value(c, y + dy, x + dx);
                        }
                    }
                }
                for (row, &a) in cov.chunks_exact_mut(d).zip(&patch) {
                    for (v, &b) in row.iter_mut().zip(&patch) {
                        *v += a * b;
                    }
                }
            }
        }
    }
    let n = (count * positions * positions).max(1) as f64;
    let eigen = SymmetricEigen::new(DMatrix::from_row_slice(d, d, &cov).map(|v| v / n));
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
    let mut weight = vec![0f32; 2 * d * d];
    let (plus, minus) = weight.split_at_mut(d * d);
    for (row, &e) in order.iter().enumerate() {
        let scale = 1.0 / (eigen.eigenvalues[e] + eps).sqrt();
        for j in 0..d {
            let v = (eigen.eigenvectors[(j, e)] * scale) as f32;
            plus[row * d + j] = v;
            minus[row * d + j] = -v;
        }
    }
    (weight, order.iter().map(|&e| eigen.eigenvalues[e]).collect())
}
