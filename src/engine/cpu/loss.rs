//! Softmax cross-entropy, mean over the batch (PyTorch's `F.cross_entropy`).

/// Returns the mean loss and writes dL/dlogits = (softmax - onehot) / n.
pub fn cross_entropy(n: usize, classes: usize, logits: &[f32], labels: &[u32], dlogits: &mut [f32]) -> f32 {
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
        total += log_sum - z[label as usize] as f64;
        let scale = 1.0 / (sum * n as f64);
        for di in d.iter_mut() {
            *di = (*di as f64 * scale) as f32;
        }
        d[label as usize] -= 1.0 / n as f32;
    }
    (total / n as f64) as f32
}
