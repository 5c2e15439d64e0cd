//! Softmax cross-entropy, mean over the batch (PyTorch's `F.cross_entropy`, with its
//! `label_smoothing`).

/// Returns the mean loss and writes dL/dlogits = (softmax - target) / n, where the target is
/// `(1 - smoothing) * onehot + smoothing / classes`.
pub fn cross_entropy(
    n: usize,
    classes: usize,
    logits: &[f32],
    labels: &[u32],
    smoothing: f32,
    dlogits: &mut [f32],
) -> f32 {
    let s = smoothing as f64;
    let off = s / classes as f64;
    let mut total = 0f64;
    for ((z, d), &label) in logits
        .chunks_exact(classes)
        .zip(dlogits.chunks_exact_mut(classes))
        .zip(labels)
        .take(n)
    {
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f64;
        for (di, &zi) in d.iter_mut().zip(z) {
            let e = ((zi - max) as f64).exp();
            *di = e as f32;
            sum += e;
        }
        let log_sum = sum.ln() + max as f64;
        let mean_z = z.iter().map(|&v| v as f64).sum::<f64>() / classes as f64;
        total += (1.0 - s) * (log_sum - z[label as usize] as f64) + s * (log_sum - mean_z);
        let scale = 1.0 / (sum * n as f64);
        for di in d.iter_mut() {
            *di = (*di as f64 * scale - off / n as f64) as f32;
        }
        d[label as usize] -= ((1.0 - s) / n as f64) as f32;
    }
    (total / n as f64) as f32
}
