//! Evaluation: loss, accuracy, per-class accuracy and the confusion matrix of a model on a set
//! of images, in eval mode (running BatchNorm statistics), as the seed's test loop computes them.

use crate::data::{CHANNELS, Images, Normalization, Shard, eval_batches};
use crate::engine::{Backend, Shape4};
use crate::model::Network;

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalResult {
    pub images: usize,
    pub correct: usize,
    /// correct / images.
    pub accuracy: f64,
    /// Mean cross-entropy per image.
    pub loss: f64,
    /// The seed's `total_test_loss`: the sum over batches of each batch's mean loss.
    pub loss_sum_of_batch_means: f64,
    /// Accuracy of each true class.
    pub per_class: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

/// Mean cross-entropy of `logits` rows (`classes` wide) against `labels`, and the number of
/// rows whose arg-max is the label (first maximum wins, as `argmax` in PyTorch).
pub fn score_logits(logits: &[f32], labels: &[u32], classes: usize, confusion: &mut [Vec<u64>]) -> (f64, usize) {
    let mut loss = 0f64;
    let mut correct = 0;
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
        loss += lse - row[label as usize] as f64;
        let pred = row
            .iter()
            .enumerate()
            .fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
        correct += usize::from(pred == label as usize);
        confusion[label as usize][pred] += 1;
    }
    (loss / labels.len().max(1) as f64, correct)
}

/// Mirrors every image of an NHWC batch left to right.
pub fn flip_horizontal(x: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * h * w * c];
    for (src_row, dst_row) in x[..n * h * w * c].chunks_exact(w * c).zip(out.chunks_exact_mut(w * c)) {
        for (px, dst) in src_row.chunks_exact(c).rev().zip(dst_row.chunks_exact_mut(c)) {
            dst.copy_from_slice(px);
        }
    }
    out
}

/// Test-time augmentation: the views of each image whose logits are averaged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tta {
    /// The image alone.
    #[default]
    Off,
    /// The image and its mirror image.
    Flip,
    /// The image and its mirror image, each also shifted by 2 pixels in the 4 directions
    /// (zero-padded, as the training crops pad): 10 views.
    FlipShift,
    /// As `FlipShift` with shifts of 1 pixel: for networks trained on crops padded by 1,
    /// which shifts of 2 take out of what they saw in training.
    FlipShift1,
    /// airbench's `tta_level=2`: half the image and its mirror image, half those shifted one
    /// pixel down-right and up-left over reflect padding (6 views, weighted 1/4, 1/4 and 1/8).
    MirrorTranslate,
}

/// One view of the images under test-time augmentation: mirrored first (when `mirrored`),
/// then shifted by (`dx`, `dy`) pixels; its logits are divided by `share` and summed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    pub dx: isize,
    pub dy: isize,
    pub mirrored: bool,
    pub share: f32,
}

/// What a shifted image shows where the original has no pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Padding {
    /// This pixel (a black one, normalised, as the training crops' zero padding).
    Fill([f32; 3]),
    /// The image reflected at its border, the edge not repeated (PyTorch's `reflect`).
    Reflect,
}

crate::named::choices!(Tta, "test-time augmentation", {
    Off => "off",
    Flip => "flip",
    FlipShift => "flip-shift",
    FlipShift1 => "flip-shift1",
    MirrorTranslate => "mirror-translate",
});

impl Tta {
    /// The views whose logits make each image's.
    pub fn views(self) -> Vec<View> {
        let view = |dx, dy, mirrored, share| View {
            dx,
            dy,
            mirrored,
            share,
        };
        let d = match self {
            Tta::Off | Tta::Flip => 0,
            Tta::FlipShift => 2,
            Tta::FlipShift1 => 1,
            // airbench mirrors the translated image: flip(shift(dx, dy)) is shift(-dx, dy)
            // of the mirror image.
            Tta::MirrorTranslate => {
                return vec![
                    view(0, 0, false, 4.0),
                    view(0, 0, true, 4.0),
                    view(1, 1, false, 8.0),
                    view(-1, 1, true, 8.0),
                    view(-1, -1, false, 8.0),
                    view(1, -1, true, 8.0),
                ];
            }
        };
        let flips: &[bool] = if self == Tta::Off { &[false] } else { &[false, true] };
        let shifts: &[(isize, isize)] = if d == 0 {
            &[(0, 0)]
        } else {
            &[(0, 0), (d, 0), (-d, 0), (0, d), (0, -d)]
        };
        let share = (flips.len() * shifts.len()) as f32;
        flips
            .iter()
            .flat_map(|&mirrored| shifts.iter().map(move |&(dx, dy)| view(dx, dy, mirrored, share)))
            .collect()
    }

    /// What the shifted views show beyond the image: the training crops' padding (black),
    /// or for airbench's views, the reflected image.
    pub fn padding(self, black: [f32; 3]) -> Padding {
        match self {
            Tta::MirrorTranslate => Padding::Reflect,
            _ => Padding::Fill(black),
        }
    }
}

/// Shifts every image of a normalised NHWC batch by (dx, dy) pixels; uncovered pixels show
/// `padding`.
pub fn shift_image(x: &[f32], n: usize, side: usize, dx: isize, dy: isize, padding: Padding) -> Vec<f32> {
    let last = side as isize - 1;
    let reflect = |i: isize| {
        if i < 0 {
            -i
        } else if i > last {
            2 * last - i
        } else {
            i
        }
    };
    let mut out = vec![0.0; n * side * side * CHANNELS];
    for (src, dst) in x
        .chunks_exact(side * side * CHANNELS)
        .zip(out.chunks_exact_mut(side * side * CHANNELS))
        .take(n)
    {
        for y in 0..side {
            for xx in 0..side {
                let (mut sy, mut sx) = (y as isize - dy, xx as isize - dx);
                let px = &mut dst[(y * side + xx) * CHANNELS..(y * side + xx + 1) * CHANNELS];
                let inside = (0..side as isize).contains(&sy) && (0..side as isize).contains(&sx);
                match padding {
                    Padding::Fill(fill) if !inside => {
                        px.copy_from_slice(&fill);
                        continue;
                    }
                    Padding::Reflect if !inside => (sy, sx) = (reflect(sy), reflect(sx)),
                    _ => {}
                }
                let at = (sy as usize * side + sx as usize) * CHANNELS;
                px.copy_from_slice(&src[at..at + 3]);
            }
        }
    }
    out
}

/// Scores `model` on `images` in eval mode; each image's logits are the mean over the `tta`
/// views.
pub fn evaluate<B: Backend>(
    be: &B,
    model: &mut dyn Network<B>,
    images: &Images,
    norm: &Normalization,
    batch_size: usize,
    tta: Tta,
) -> EvalResult {
    evaluate_shard(be, model, images, norm, batch_size, tta, Shard::WHOLE).result()
}

/// What one process of a data-parallel evaluation counted on its batches; the ranks' tallies
/// add up (see [`EvalTally::to_sums`]) to the whole set's.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalTally {
    pub images: usize,
    pub correct: usize,
    /// Sum over batches of each batch's mean loss.
    pub loss_sum_of_batch_means: f64,
    /// Sum over images of each image's loss.
    pub loss_total: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

impl EvalTally {
    /// The tally as one flat list of numbers, for a sum over ranks (counts stay exact in f64
    /// below 2^53).
    pub fn to_sums(&self) -> Vec<f64> {
        let mut v = vec![
            self.images as f64,
            self.correct as f64,
            self.loss_sum_of_batch_means,
            self.loss_total,
        ];
        v.extend(self.confusion.iter().flatten().map(|&c| c as f64));
        v
    }

    /// The tally whose [`to_sums`](Self::to_sums) is `sums`, for `classes` classes.
    pub fn from_sums(sums: &[f64], classes: usize) -> Self {
        assert_eq!(sums.len(), 4 + classes * classes, "tally length");
        Self {
            images: sums[0] as usize,
            correct: sums[1] as usize,
            loss_sum_of_batch_means: sums[2],
            loss_total: sums[3],
            confusion: sums[4..]
                .chunks_exact(classes)
                .map(|row| row.iter().map(|&c| c as u64).collect())
                .collect(),
        }
    }

    pub fn result(self) -> EvalResult {
        let n = self.images;
        let per_class = self
            .confusion
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let total: u64 = row.iter().sum();
                if total == 0 { 0.0 } else { row[i] as f64 / total as f64 }
            })
            .collect();
        EvalResult {
            images: n,
            correct: self.correct,
            accuracy: self.correct as f64 / n.max(1) as f64,
            loss: self.loss_total / n.max(1) as f64,
            loss_sum_of_batch_means: self.loss_sum_of_batch_means,
            per_class,
            confusion: self.confusion,
        }
    }
}

/// As [`evaluate`], on the batches of `images` that `shard` owns (whole batches, dealt round
/// robin), before the ranks' tallies are summed.
pub fn evaluate_shard<B: Backend>(
    be: &B,
    model: &mut dyn Network<B>,
    images: &Images,
    norm: &Normalization,
    batch_size: usize,
    tta: Tta,
    shard: Shard,
) -> EvalTally {
    let views = tta.views();
    let side = images.side;
    let padding = tta.padding([0, 1, 2].map(|c| norm.apply(0, c)));
    let classes = model.num_classes();
    let mut t = EvalTally {
        images: 0,
        correct: 0,
        loss_sum_of_batch_means: 0.0,
        loss_total: 0.0,
        confusion: vec![vec![0u64; classes]; classes],
    };
    let mut x = be.alloc(0);
    let (mut logits, mut view_logits) = (Vec::new(), Vec::new());
    for batch in eval_batches(images, batch_size, norm, shard) {
        let n = batch.len();
        let shape = Shape4::new(n, side, side, CHANNELS);
        crate::engine::ensure_len(be, &mut x, batch.x.len());
        logits.clear();
        logits.resize(n * classes, 0.0);
        for &View {
            dx,
            dy,
            mirrored,
            share,
        } in &views
        {
            // The batch itself is uploaded as it is; only other views are built.
            let mut view = std::borrow::Cow::Borrowed(&batch.x[..]);
            if mirrored {
                view = flip_horizontal(&view, n, side, side, CHANNELS).into();
            }
            if (dx, dy) != (0, 0) {
                view = shift_image(&view, n, side, dx, dy, padding).into();
            }
            be.upload(&view, &mut x);
            model.forward(be, &x, shape, false);
            view_logits.resize(n * classes, 0.0);
            be.download(model.logits(), &mut view_logits);
            for (a, b) in logits.iter_mut().zip(&view_logits) {
                *a += b / share;
            }
        }
        let (mean, c) = score_logits(&logits, &batch.labels, classes, &mut t.confusion);
        t.loss_sum_of_batch_means += mean;
        t.loss_total += mean * n as f64;
        t.correct += c;
        t.images += n;
    }
    t
}
