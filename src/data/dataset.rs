//! One description of a dataset, whatever its format: the images and labels, the class names,
//! the image size and the normalisation. A reader per format makes it ([`open`] picks the reader
//! from what the folder holds); nothing outside `data` knows which format it came from.

use super::cifar::{self, Cifar10, Cifar100, DataError};
use super::folder::{self, FolderOptions};
use super::images::{Images, Normalization};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which CIFAR-100 labels to train on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LabelSet {
    /// The 100 fine classes.
    #[default]
    Fine,
    /// The 20 superclasses.
    Coarse,
}

crate::named::choices!(LabelSet, "label set", {
    Fine => "fine",
    Coarse => "coarse",
});

/// The formats a data folder can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Cifar10,
    Cifar100(LabelSet),
    /// torchvision's ImageFolder layout: `train/CLASS/*`, optionally `test/CLASS/*` or `val/CLASS/*`.
    ImageFolder,
}

impl Format {
    pub fn describe(self) -> String {
        match self {
            Format::Cifar10 => "CIFAR-10 (binary)".into(),
            Format::Cifar100(l) => format!("CIFAR-100 (binary, {} labels)", l.name()),
            Format::ImageFolder => "image folder".into(),
        }
    }
}

/// A dataset as read from disk.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub format: Format,
    /// The folder the files were read from.
    pub dir: PathBuf,
    pub train: Images,
    /// `None` when the folder has no test images.
    pub test: Option<Images>,
    pub classes: Vec<String>,
    pub norm: Normalization,
    /// What reading it did that a user should hear (a cache used or rebuilt, images skipped).
    pub notes: Vec<String>,
}

impl Dataset {
    /// What a model trained on this data needs to know of it.
    pub fn spec(&self) -> DataSpec {
        DataSpec {
            classes: self.classes.clone(),
            image_size: self.train.side,
            norm: self.norm,
        }
    }

    /// One line: format, classes, image size, image counts.
    pub fn summary(&self) -> String {
        format!(
            "data {}: {}, {} classes, {}x{} images, {} train / {} test",
            self.dir.display(),
            self.format.describe(),
            self.classes.len(),
            self.train.side,
            self.train.side,
            self.train.len(),
            self.test.as_ref().map_or(0, Images::len)
        )
    }
}

/// What a model carries of the data it was trained on (in run configs and checkpoints), so
/// that `eval`, `predict` and fine-tuning need nothing else.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataSpec {
    pub classes: Vec<String>,
    /// Width and height of the model's input images.
    pub image_size: usize,
    #[serde(flatten)]
    pub norm: Normalization,
}

impl Default for DataSpec {
    /// CIFAR-10 as the seed trains it (what a checkpoint without this record was trained on).
    fn default() -> Self {
        Self {
            classes: cifar::CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
            image_size: cifar::SIDE,
            norm: Normalization::CIFAR10,
        }
    }
}

/// Image sizes a run may ask for (`--image-size`).
pub const IMAGE_SIZES: (usize, usize) = (16, 256);

/// How to read a data folder.
#[derive(Clone, Debug, Default)]
pub struct DataOptions {
    /// CIFAR-100's labels (refused for other formats when set).
    pub labels: Option<LabelSet>,
    /// Resize every image to this side (default: the format's own, 32 for an image folder).
    pub image_size: Option<usize>,
    /// Train without images that cannot be decoded instead of stopping.
    pub skip_bad_images: bool,
}

/// The formats found in `dir`, each with the folder that holds it.
fn detect(dir: &Path) -> Vec<(Format, PathBuf)> {
    let mut found = Vec::new();
    if let Ok(d) = cifar::locate(dir) {
        found.push((Format::Cifar10, d));
    }
    if let Some(d) = cifar::locate_cifar100(dir) {
        found.push((Format::Cifar100(LabelSet::Fine), d));
    }
    if folder::is_image_folder(dir) {
        found.push((Format::ImageFolder, dir.to_path_buf()));
    }
    found
}

/// Reads the dataset in `dir`, recognising its format from what the folder holds.
/// `progress(done, total)` is called while an image folder is decoded.
pub fn open(dir: &Path, opts: &DataOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Dataset, DataError> {
    let d = dir.display();
    if !dir.exists() {
        return Err(DataError::Other(format!("{d}: the folder does not exist")));
    }
    if !dir.is_dir() {
        return Err(DataError::Other(format!("{d}: not a folder")));
    }
    let found = detect(dir);
    let (format, _) = match found.as_slice() {
        [] => {
            let empty = std::fs::read_dir(dir).map(|mut e| e.next().is_none()).unwrap_or(false);
            return Err(DataError::Other(if empty {
                format!("{d}: the folder is empty (get CIFAR-10 with: resnet-cifar data fetch --dir {d})")
            } else {
                format!(
                    "{d}: no known dataset: expected CIFAR-10 ({} ...), CIFAR-100 ({}, ...) or an image folder ({d}/train/CLASS/IMAGE)",
                    cifar::TRAIN_FILES[0],
                    cifar::CIFAR100_TRAIN
                )
            }));
        }
        [one] => one.clone(),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|(f, p)| format!("{} in {}", f.describe(), p.display()))
                .collect();
            return Err(DataError::Other(format!(
                "{d}: holds more than one dataset ({}); give the folder of one",
                names.join(", ")
            )));
        }
    };
    if opts.labels.is_some() && !matches!(format, Format::Cifar100(_)) {
        return Err(DataError::Other(format!(
            "--labels applies to CIFAR-100; {d} holds {}",
            format.describe()
        )));
    }
    let size = opts.image_size;
    if let Some(s) = size
        && !(IMAGE_SIZES.0..=IMAGE_SIZES.1).contains(&s)
    {
        return Err(DataError::Other(format!(
            "--image-size must be {} to {}, got {s}",
            IMAGE_SIZES.0, IMAGE_SIZES.1
        )));
    }
    let mut data = match format {
        Format::Cifar10 => Cifar10::load(dir)?,
        Format::Cifar100(_) => Cifar100::load(dir, opts.labels.unwrap_or_default())?,
        Format::ImageFolder => folder::load(
            dir,
            &FolderOptions {
                image_size: size.unwrap_or(cifar::SIDE),
                skip_bad_images: opts.skip_bad_images,
            },
            progress,
        )?,
    };
    if let Some(s) = size.filter(|&s| s != data.train.side) {
        // CIFAR at another size: every image resized as an image folder's would be.
        data.train = folder::resize_all(&data.train, s);
        data.test = data.test.map(|t| folder::resize_all(&t, s));
    }
    Ok(data)
}

/// The data a run trains and evaluates on.
#[derive(Clone, Debug)]
pub struct Splits {
    /// Shared with the background loader thread.
    pub train: Arc<Images>,
    /// The last `val_split` training images, held out.
    pub val: Option<Images>,
    pub test: Option<Images>,
    pub spec: DataSpec,
}

impl Splits {
    /// Holds out the last `val_split` training images as a validation set.
    pub fn new(data: Dataset, val_split: usize) -> Result<Self, String> {
        let n = data.train.len();
        if val_split >= n {
            return Err(format!(
                "--val-split {val_split} leaves no training images (there are {n})"
            ));
        }
        let spec = data.spec();
        let mut train = data.train;
        let val = (val_split > 0).then(|| train.split_off(n - val_split));
        Ok(Self {
            train: Arc::new(train),
            val,
            test: data.test,
            spec,
        })
    }
}
