//! Learning-rate schedules. Each maps (epoch, step within the epoch) to a learning rate, so
//! the same schedule serves per-epoch stepping (the seed's LambdaLR) and per-step ones.

use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Fixed learning rate.
    Constant { lr: f64 },
    /// The seed's `LambdaLR(lambda epoch: 1 / (epoch + 1))`, stepped once an epoch.
    InverseEpoch { lr: f64 },
    /// One-cycle (PyTorch's OneCycleLR with cosine annealing): from `max_lr / div_factor` up
    /// to `max_lr` over the first `pct_start` of training, then down to
    /// `max_lr / (div_factor * final_div_factor)`.
    OneCycle {
        max_lr: f64,
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
    },
    /// Linear warm-up over `warmup_epochs` (reaching `lr` on its last step), then cosine
    /// decay reaching `min_lr` on the last step of training.
    WarmupCosine { lr: f64, warmup_epochs: f64, min_lr: f64 },
    /// airbench's triangle: `lr` times a factor that goes linearly from `start` to 1 over the
    /// first `floor(peak_at * total)` steps, then linearly to `end` at the last step's end
    /// (airbench94: 0.2, 0.23, 0.07; its `get_lr` under a per-step `LambdaLR`).
    Triangle {
        lr: f64,
        start: f64,
        peak_at: f64,
        end: f64,
    },
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based) of epoch `epoch` (0-based), in a run
    /// of `total_steps` steps, `steps_per_epoch` an epoch (the last epoch may end early).
    pub fn lr(&self, epoch: usize, step: usize, steps_per_epoch: usize, total_steps: u64) -> f64 {
        let total = total_steps.max(1) as f64;
        let t = (epoch * steps_per_epoch + step) as f64;
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::InverseEpoch { lr } => lr / (epoch as f64 + 1.0),
            Schedule::OneCycle {
                max_lr,
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let initial = max_lr / div_factor;
                let min = initial / final_div_factor;
                let up_end = (pct_start * total - 1.0).max(1.0);
                let cos =
                    |from: f64, to: f64, pct: f64| to + (from - to) / 2.0 * (1.0 + (PI * pct.clamp(0.0, 1.0)).cos());
                if t <= up_end {
                    cos(initial, max_lr, t / up_end)
                } else {
                    cos(max_lr, min, (t - up_end) / (total - 1.0 - up_end).max(1.0))
                }
            }
            Schedule::Triangle {
                lr,
                start,
                peak_at,
                end,
            } => {
                let warm = (peak_at * total).floor();
                lr * if t < warm {
                    let frac = t / warm;
                    start * (1.0 - frac) + frac
                } else {
                    let frac = (t - warm) / (total - warm).max(1.0);
                    (1.0 - frac) + end * frac
                }
            }
            Schedule::WarmupCosine {
                lr,
                warmup_epochs,
                min_lr,
            } => {
                let warm = warmup_epochs * steps_per_epoch as f64;
                if t < warm {
                    lr * (t + 1.0) / warm
                } else {
                    let pct = ((t - warm) / (total - warm - 1.0).max(1.0)).clamp(0.0, 1.0);
                    min_lr + (lr - min_lr) * 0.5 * (1.0 + (PI * pct).cos())
                }
            }
        }
    }
}
