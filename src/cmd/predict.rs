//! `predict`: the classes of image files.

use super::{ComputeArgs, WinogradArg};
use clap::Args;
use resnet_cifar::cli::CliError;
use resnet_cifar::model::CheckpointFile;
use resnet_cifar::model::Stem;
use resnet_cifar::predict;
use std::path::PathBuf;

#[derive(Args)]
pub struct PredictArgs {
    /// A state_dict in safetensors (ours or one saved from the seed's PyTorch model).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Image files (PNG, JPEG, BMP, WebP, GIF, of any size).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// How many classes to list for each image.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=10))]
    top_k: u64,
    /// Print one JSON array instead of text.
    #[arg(long)]
    json: bool,
    /// The stem, for a state_dict that does not record it.
    #[arg(long)]
    stem: Option<Stem>,
    #[command(flatten)]
    winograd: WinogradArg,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

pub fn run(a: PredictArgs) -> Result<(), CliError> {
    let file = CheckpointFile::read(&a.checkpoint, a.stem).map_err(CliError::input)?;
    let target = a.compute.target_for(&file, a.winograd.winograd)?;
    let images = a
        .images
        .iter()
        .map(|p| predict::load_image(p, &file.spec))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::input)?;
    let guesses = with_backend!(target, |be| {
        let mut model = file.network(be).map_err(CliError::input)?;
        predict::predict(be, model.as_mut(), &images, &file.spec, a.top_k as usize)
    });
    if a.json {
        let v: Vec<_> = a
            .images
            .iter()
            .zip(&guesses)
            .map(|(p, g)| serde_json::json!({"image": p.display().to_string(), "top": g}))
            .collect();
        println!("{}", serde_json::Value::from(v));
        return Ok(());
    }
    for (p, g) in a.images.iter().zip(&guesses) {
        let list: Vec<String> = g.iter().map(|g| format!("{} {:.3}", g.class, g.probability)).collect();
        println!("{}: {}", p.display(), list.join(", "));
    }
    Ok(())
}
