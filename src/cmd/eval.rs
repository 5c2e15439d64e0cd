//! `eval`: a checkpoint's loss, accuracy, per-class accuracy and confusion matrix.

use super::{ComputeArgs, WinogradArg, open_data};
use clap::Args;
use resnet_cifar::cli::{CliError, limits};
use resnet_cifar::data::{DataOptions, Splits, ValSplit};
use resnet_cifar::eval::{Tta, evaluate};
use resnet_cifar::model::CheckpointFile;
use resnet_cifar::model::Stem;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// A state_dict in safetensors: one of ours, or one saved from the seed's PyTorch model.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The data: a CIFAR-10 or CIFAR-100 folder, or an image folder (as for train); read at
    /// the checkpoint's image size, with its classes and normalisation.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Decode an image folder without the images that cannot be decoded.
    #[arg(long)]
    skip_bad_images: bool,
    /// Which images: test (the data's test images), val (the last --val-split training images), train.
    #[arg(long, default_value = "test", value_parser = ["test", "val", "train"])]
    split: String,
    /// Size of the validation split (default: the one the checkpoint's run used).
    #[arg(long)]
    val_split: Option<usize>,
    /// Images per forward pass: accuracy and per-image loss do not depend on it (the seed's
    /// sum of batch means does).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(limits::POSITIVE.0..))]
    batch_size: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// The stem, for a state_dict that does not record it.
    #[arg(long)]
    stem: Option<Stem>,
    /// Test-time augmentation: off, flip (mean logits of each image and its mirror),
    /// flip-shift (also shifted by 2 pixels in 4 directions: 10 views), flip-shift1 (shifts
    /// of 1 pixel, for networks trained on crops padded by 1) or mirror-translate (airbench's
    /// level 2: the mirror pair, and the mirror pairs shifted a pixel down-right and up-left
    /// over reflect padding, weighted 1/4, 1/4, 1/8 each).
    #[arg(long, default_value = "off")]
    tta: Tta,
    #[command(flatten)]
    winograd: WinogradArg,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(a: EvalArgs) -> Result<(), CliError> {
    let file = CheckpointFile::read(&a.checkpoint, a.stem).map_err(CliError::input)?;
    let target = a.compute.target_for(&file, a.winograd.winograd)?;
    let data = open_data(
        &a.data,
        &DataOptions {
            labels: file.labels,
            image_size: Some(file.spec.image_size),
            skip_bad_images: a.skip_bad_images,
        },
    )?;
    if data.classes != file.spec.classes {
        return Err(CliError::input(format!(
            "{}: its {} classes are not the {} classes {} was trained on",
            a.data.display(),
            data.classes.len(),
            file.spec.classes.len(),
            file.origin
        )));
    }
    let val_split = a
        .val_split
        .or_else(|| file.meta.get("val_split").and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    // Checkpoints that do not record how the run chose its validation images held out the last.
    let method = file.meta.get("val_split_method").map_or(Ok(ValSplit::Last), |m| {
        serde_json::from_str(m)
            .map_err(|_| CliError::input(format!("{}: bad 'val_split_method' metadata: {m}", file.origin)))
    })?;
    let held = if a.split == "val" { val_split } else { 0 };
    let mut splits = Splits::new(data, held, Some(method)).map_err(CliError::input)?;
    // The model's inputs are normalised as in its training, whatever this data's own statistics.
    splits.spec.norm = file.spec.norm;
    let images =
        match a.split.as_str() {
            "test" => splits.test.as_ref().ok_or_else(|| {
                CliError::input(format!("{}: no test images here; try --split val", a.data.display()))
            })?,
            "val" => splits.val.as_ref().ok_or_else(|| {
                CliError::input("--split val needs --val-split N (the checkpoint does not record one)")
            })?,
            _ => &splits.train,
        };
    let r = with_backend!(target, |be| {
        let mut model = file.network(be).map_err(CliError::input)?;
        evaluate(
            be,
            model.as_mut(),
            images,
            &splits.spec.norm,
            a.batch_size as usize,
            a.tta,
        )
    });
    if a.json {
        let mut v = serde_json::to_value(&r).map_err(CliError::run)?;
        v["split"] = a.split.clone().into();
        v["checkpoint"] = file.origin.clone().into();
        v["classes"] = splits.spec.classes.clone().into();
        println!("{v}");
        return Ok(());
    }
    println!("{} on the {} split ({} images)", file.origin, a.split, r.images);
    println!(
        "accuracy {:.4} ({}/{}), loss {:.4} per image ({:.4} summed over batch means)",
        r.accuracy, r.correct, r.images, r.loss, r.loss_sum_of_batch_means
    );
    let classes = &splits.spec.classes;
    println!("\nper class:");
    let width = classes.iter().map(|c| c.len()).max().unwrap_or(0).clamp(5, 24);
    for (name, acc) in classes.iter().zip(&r.per_class) {
        println!("  {name:<width$} {acc:.4}");
    }
    if classes.len() <= CONFUSION_MATRIX_MAX {
        println!("\nconfusion matrix (rows: true class, columns: predicted):");
        print!("{:<width$}", "");
        for name in classes {
            print!("{:>6}", name.chars().take(5).collect::<String>());
        }
        println!();
        for (name, row) in classes.iter().zip(&r.confusion) {
            print!("{name:<width$}");
            for v in row {
                print!("{v:>6}");
            }
            println!();
        }
    } else {
        println!("\nmost confused pairs (true class -> predicted: images):");
        for (t, p, count) in most_confused(&r.confusion, 10) {
            println!("  {} -> {}: {count}", classes[t], classes[p]);
        }
    }
    Ok(())
}

/// Up to this many classes, `eval` prints the whole confusion matrix; beyond, the most confused
/// pairs.
const CONFUSION_MATRIX_MAX: usize = 20;

/// The `k` largest off-diagonal counts of `confusion` as (true, predicted, count), largest first.
fn most_confused(confusion: &[Vec<u64>], k: usize) -> Vec<(usize, usize, u64)> {
    let mut pairs: Vec<(usize, usize, u64)> = confusion
        .iter()
        .enumerate()
        .flat_map(|(t, row)| row.iter().enumerate().map(move |(p, &c)| (t, p, c)))
        .filter(|&(t, p, c)| t != p && c > 0)
        .collect();
    pairs.sort_by(|a, b| b.2.cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    pairs.truncate(k);
    pairs
}
