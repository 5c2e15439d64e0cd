//! What a run prints: plain lines, plus a progress bar with images per second and time left
//! while an epoch runs when stdout is a terminal. The console is one of a run's observers.

use super::observer::{EpochEnd, Observer, RunState, StepLog};
use crate::engine::Backend;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Console {
    bar: Option<ProgressBar>,
    interactive: bool,
    quiet: bool,
}

impl Console {
    /// Progress bars when stdout is a terminal, plain lines otherwise.
    pub fn stdout() -> Self {
        Self {
            bar: None,
            interactive: std::io::stdout().is_terminal(),
            quiet: false,
        }
    }

    /// Prints nothing (tests, library use).
    pub fn quiet() -> Self {
        Self {
            bar: None,
            interactive: false,
            quiet: true,
        }
    }

    pub fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    /// Starts a bar over `images` images for one epoch.
    pub fn start_epoch(&mut self, label: &str, images: u64) {
        if !self.interactive {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(images), ProgressDrawTarget::stdout());
        bar.set_style(images_style(
            "{prefix} [{bar:30}] {pos}/{len} img  {img_per_sec}  eta {eta}  {msg}",
        ));
        bar.set_prefix(label.to_string());
        self.bar = Some(bar);
    }

    pub fn advance(&self, images: u64, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.inc(images);
            if !msg.is_empty() {
                bar.set_message(msg.to_string());
            }
        }
    }

    pub fn finish_epoch(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The seed's lines: the loss every `--log-every` steps, and after each epoch the evaluation
/// (the test loss as the seed computes it, the sum of per-batch mean losses) with the epoch's
/// time and the time left.
impl<B: Backend> Observer<B> for Console {
    fn note(&mut self, line: &str) {
        self.line(line);
    }

    fn epoch_started(&mut self, label: &str, images: u64) {
        self.start_epoch(label, images);
    }

    fn batch_trained(&mut self, images: u64, loss: Option<f32>) {
        self.advance(images, &loss.map_or(String::new(), |l| format!("loss {l:.4}")));
    }

    fn step_logged(&mut self, s: &StepLog) -> Result<()> {
        self.line(&format!("step {}, loss {}", s.step, s.loss));
        Ok(())
    }

    fn epoch_trained(&mut self) {
        self.finish_epoch();
    }

    fn epoch_ended(&mut self, end: &EpochEnd, _state: &mut RunState<'_, B>) -> Result<()> {
        let (epoch, epochs, pace) = (end.epoch + 1, end.epochs, &end.pace);
        self.line(&match end.eval {
            Some((split, r)) => format!(
                "epoch {epoch}/{epochs}: {split} loss {:.4} (sum of batch means; {:.4} per image), accuracy {:.4} ({}/{}); {pace}",
                r.loss_sum_of_batch_means, r.loss, r.accuracy, r.correct, r.images,
            ),
            None => format!("epoch {epoch}/{epochs}: {pace}"),
        });
        Ok(())
    }
}

/// A bar style whose `{img_per_sec}` reads as people say it, "891 img/s" (indicatif's
/// `{per_sec}` would print "891.4074/s"): the training bar's and the image decoding bar's.
pub fn images_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .with_key(
            "img_per_sec",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} img/s", s.per_sec());
            },
        )
        .progress_chars("=> ")
}

/// `s` seconds as "42 s", "7 min 5 s" or "3 h 12 min".
pub fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}
