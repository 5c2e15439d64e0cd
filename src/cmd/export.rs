//! `export`: a checkpoint as an ONNX model file.

use clap::Args;
use resnet_cifar::cli::CliError;
use resnet_cifar::engine::cpu::Cpu;
use resnet_cifar::export::{self, DEFAULT_OPSET, OnnxOptions};
use resnet_cifar::model::CheckpointFile;
use resnet_cifar::model::Stem;
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportArgs {
    /// A state_dict in safetensors (ours, torchvision's or one saved from the seed's PyTorch
    /// model).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The ONNX file to write (replaced whole, or left as it was on an error).
    #[arg(long)]
    out: PathBuf,
    /// ONNX operator set version (9 to 23).
    #[arg(long, default_value_t = DEFAULT_OPSET)]
    opset: i64,
    /// Fix the batch size in the graph (default: a dynamic batch dimension named `batch`).
    #[arg(long)]
    batch: Option<usize>,
    /// The stem, for a state_dict that does not record it.
    #[arg(long)]
    stem: Option<Stem>,
}

pub fn run(a: ExportArgs) -> Result<(), CliError> {
    let opts = OnnxOptions {
        opset: a.opset,
        batch: a.batch,
    };
    opts.check().map_err(CliError::input)?;
    if a.out.is_dir() {
        return Err(CliError::input(format!(
            "{} is a folder; give a file name",
            a.out.display()
        )));
    }
    let file = CheckpointFile::read(&a.checkpoint, a.stem).map_err(CliError::input)?;
    let model = file.arch.describe(&file.model);
    let be = &Cpu::default();
    let net = file.network(be).map_err(CliError::input)?;
    let bytes = export::onnx(be, net.as_ref(), &file.spec, &model, &opts);
    resnet_cifar::checkpoint::write_atomic(&a.out, &bytes)
        .map_err(|e| CliError::input(format!("{}: cannot write: {e}", a.out.display())))?;
    let side = file.spec.image_size;
    let batch = a.batch.map_or("batch".to_string(), |n| n.to_string());
    println!(
        "wrote {}: {model}, opset {}, input [{batch}, 3, {side}, {side}], {} classes, {:.1} MB",
        a.out.display(),
        a.opset,
        file.spec.classes.len(),
        bytes.len() as f64 / 1e6
    );
    Ok(())
}
