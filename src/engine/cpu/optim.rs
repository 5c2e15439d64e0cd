//! Fused optimizer updates, one pass over each parameter, following PyTorch's formulas and
//! order of operations (torch.optim.Adam / SGD, single-tensor path).

use crate::engine::{AdamStep, SgdStep};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub fn adam(h: &AdamStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2 = 1.0 - h.beta2.powi(h.step as i32);
    let step_size = (h.lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let (one_minus_b1, b2, one_minus_b2) = ((1.0 - h.beta1) as f32, h.beta2 as f32, (1.0 - h.beta2) as f32);
    let (eps, wd) = (h.eps as f32, h.weight_decay as f32);
    // Iterators rather than indices, so the loop has no bounds checks and vectorises.
    let update = |p: &mut f32, grad: f32, m: &mut f32, v: &mut f32| {
        // m.lerp_(grad, 1 - beta1); v.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
        *m += one_minus_b1 * (grad - *m);
        *v = *v * b2 + one_minus_b2 * grad * grad;
        let denom = v.sqrt() / bc2_sqrt + eps;
        *p -= step_size * (*m / denom);
    };
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            let items = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
            if wd == 0.0 {
                items.for_each(|(((p, &g), m), v)| update(p, g, m, v));
            } else {
                items.for_each(|(((p, &g), m), v)| {
                    let grad = g + wd * *p;
                    update(p, grad, m, v)
                });
            }
        });
}

pub fn sgd(h: &SgdStep, p: &mut [f32], g: &[f32], buf: &mut [f32]) {
    let (lr, momentum, wd) = (h.lr as f32, h.momentum as f32, h.weight_decay as f32);
    let (one_minus_dampening, nesterov, first) = ((1.0 - h.dampening) as f32, h.nesterov, h.first);
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(buf.par_chunks_mut(CHUNK))
        .for_each(|((p, g), b)| {
            for i in 0..p.len() {
                let mut d = if wd != 0.0 { g[i] + wd * p[i] } else { g[i] };
                if momentum != 0.0 {
                    b[i] = if first {
                        d
                    } else {
                        momentum * b[i] + one_minus_dampening * d
                    };
                    d = if nesterov { d + momentum * b[i] } else { b[i] };
                }
                p[i] -= lr * d;
            }
        });
}
