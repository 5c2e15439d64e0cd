//! `eval`: a checkpoint's loss, accuracy, per-class accuracy and confusion matrix.

use super::{ComputeArgs, load_data};
use clap::Args;
use resnet_cifar::cli::{CheckpointFile, CliError, limits};
use resnet_cifar::data::Splits;
use resnet_cifar::eval::{Tta, evaluate};
use resnet_cifar::model::Stem;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// A state_dict in safetensors: one of ours, or one saved from the seed's PyTorch model.
    #[arg(long)]
    checkpoint: PathBuf,
    /// CIFAR-10 folder (binary version).
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Which images: test (test_batch.bin), val (the last --val-split training images), train.
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
    /// flip-shift (also shifted by 2 pixels in 4 directions: 10 views) or flip-shift1 (shifts
    /// of 1 pixel, for networks trained on crops padded by 1).
    #[arg(long, default_value = "off")]
    tta: Tta,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(a: EvalArgs) -> Result<(), CliError> {
    let target = a.compute.target();
    let file = CheckpointFile::read(&a.checkpoint, a.stem)?;
    let data = load_data(&a.data)?;
    let val_split = a
        .val_split
        .or_else(|| file.meta.get("val_split").and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let splits = Splits::new(data, if a.split == "val" { val_split } else { 0 }).map_err(CliError::input)?;
    let images =
        match a.split.as_str() {
            "test" => splits.test.as_ref().ok_or_else(|| {
                CliError::input(format!("{}: no test_batch.bin here; try --split val", a.data.display()))
            })?,
            "val" => splits.val.as_ref().ok_or_else(|| {
                CliError::input("--split val needs --val-split N (the checkpoint does not record one)")
            })?,
            _ => &splits.train,
        };
    let r = with_backend!(target, |be| {
        let mut model = file.network(be)?;
        evaluate(be, model.as_mut(), images, a.batch_size as usize, a.tta)
    });
    if a.json {
        let mut v = serde_json::to_value(&r).map_err(CliError::run)?;
        v["split"] = a.split.clone().into();
        v["checkpoint"] = file.origin.clone().into();
        v["classes"] = splits.classes.clone().into();
        println!("{v}");
        return Ok(());
    }
    println!("{} on the {} split ({} images)", file.origin, a.split, r.images);
    println!(
        "accuracy {:.4} ({}/{}), loss {:.4} per image ({:.4} summed over batch means)",
        r.accuracy, r.correct, r.images, r.loss, r.loss_sum_of_batch_means
    );
    println!("\nper class:");
    for (name, acc) in splits.classes.iter().zip(&r.per_class) {
        println!("  {name:<11} {acc:.4}");
    }
    println!("\nconfusion matrix (rows: true class, columns: predicted):");
    print!("{:<11}", "");
    for name in &splits.classes {
        print!("{:>6}", &name[..name.len().min(5)]);
    }
    println!();
    for (name, row) in splits.classes.iter().zip(&r.confusion) {
        print!("{name:<11}");
        for v in row {
            print!("{v:>6}");
        }
        println!();
    }
    Ok(())
}
