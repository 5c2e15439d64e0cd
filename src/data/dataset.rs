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
    /// How `--val-split` holds images out of this format's training set.
    pub fn val_split_method(self) -> ValSplit {
        match self {
            Format::Cifar10 | Format::Cifar100(_) => ValSplit::Last,
            Format::ImageFolder => ValSplit::Stratified,
        }
    }

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

impl DataSpec {
    /// Refuses a description no model can be trained or run with (read from a file: a
    /// checkpoint's metadata, the image cache): no classes, an image size outside
    /// [`IMAGE_SIZES`], a normalisation that is not finite or divides by zero.
    pub fn check(&self) -> Result<(), String> {
        let (lo, hi) = IMAGE_SIZES;
        if self.classes.is_empty() {
            return Err("no classes".into());
        }
        if !(lo..=hi).contains(&self.image_size) {
            return Err(format!("image size {} is outside {lo}-{hi}", self.image_size));
        }
        let Normalization { mean, std } = self.norm;
        if mean.iter().chain(&std).any(|v| !v.is_finite()) || std.iter().any(|s| *s <= 0.0) {
            return Err(format!(
                "normalisation mean {mean:?}, std {std:?}: not finite, or a std not positive"
            ));
        }
        Ok(())
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

/// How `--val-split N` chooses the N held-out training images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValSplit {
    /// The last N: CIFAR's files are in random order already, and the seed's figures (and
    /// every result recorded here) hold out the last N.
    #[default]
    Last,
    /// Every class in proportion to its size (largest remainders; at least one image of each
    /// class while N allows), the images of a class drawn with a fixed seed: an image folder
    /// lists its files class by class, so its last N would be one class. The same folder
    /// always gives the same split, whatever the run's `--seed`, so that `eval --split val`
    /// finds it again from N alone.
    Stratified,
}

impl std::fmt::Display for ValSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ValSplit::Last => "the last images",
            ValSplit::Stratified => "stratified by class",
        })
    }
}

/// The key of [`ValSplit::Stratified`]'s draws (with the class index).
const VAL_SPLIT_SEED: u64 = 0x7661_6c5f_7370_6c74;

impl ValSplit {
    /// Which of `labels` (of `classes` classes) are held out, `count` of them, in ascending order.
    pub fn held_out(self, labels: &[u32], classes: usize, count: usize) -> Vec<usize> {
        let n = labels.len();
        match self {
            ValSplit::Last => (n - count..n).collect(),
            ValSplit::Stratified => {
                let mut members = vec![Vec::new(); classes];
                for (i, &l) in labels.iter().enumerate() {
                    members[l as usize].push(i);
                }
                let sizes: Vec<usize> = members.iter().map(Vec::len).collect();
                let mut chosen = Vec::with_capacity(count);
                for (c, (mut m, take)) in members.into_iter().zip(quotas(&sizes, count)).enumerate() {
                    use rand::SeedableRng;
                    use rand::seq::SliceRandom;
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(VAL_SPLIT_SEED ^ c as u64);
                    m.shuffle(&mut rng);
                    chosen.extend_from_slice(&m[..take]);
                }
                chosen.sort_unstable();
                chosen
            }
        }
    }
}

/// How many of each class's `sizes` images `count` takes: in proportion (largest remainders,
/// ties to the lower class), then a class left out takes one from the largest share while
/// `count` allows every class one.
fn quotas(sizes: &[usize], count: usize) -> Vec<usize> {
    let total: usize = sizes.iter().sum();
    let mut take: Vec<usize> = sizes.iter().map(|&s| s * count / total.max(1)).collect();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    // Largest remainder of s * count / total first.
    order.sort_by_key(|&c| std::cmp::Reverse(sizes[c] * count % total.max(1)));
    let mut left = count - take.iter().sum::<usize>();
    for &c in order.iter().cycle() {
        if left == 0 {
            break;
        }
        if take[c] < sizes[c] {
            take[c] += 1;
            left -= 1;
        }
    }
    let nonempty = sizes.iter().filter(|&&s| s > 0).count();
    if count >= nonempty {
        while let Some(c) = (0..sizes.len()).find(|&c| take[c] == 0 && sizes[c] > 0) {
            let donor = (0..sizes.len())
                .max_by_key(|&d| (take[d], std::cmp::Reverse(d)))
                .expect("a class");
            if take[donor] <= 1 {
                break;
            }
            take[donor] -= 1;
            take[c] = 1;
        }
    }
    take
}

/// The data a run trains and evaluates on.
#[derive(Clone, Debug)]
pub struct Splits {
    /// Shared with the background loader thread.
    pub train: Arc<Images>,
    /// The `val_split` training images held out, chosen as `val_method` says.
    pub val: Option<Images>,
    pub val_method: ValSplit,
    pub test: Option<Images>,
    pub spec: DataSpec,
}

impl Splits {
    /// Holds out `val_split` training images as a validation set, chosen by `method` (a
    /// resumed run's, a checkpoint's) or as the data's format says
    /// ([`Format::val_split_method`]).
    pub fn new(data: Dataset, val_split: usize, method: Option<ValSplit>) -> Result<Self, String> {
        let n = data.train.len();
        if val_split >= n {
            return Err(format!(
                "--val-split {val_split} leaves no training images (there are {n})"
            ));
        }
        let spec = data.spec();
        let val_method = method.unwrap_or(data.format.val_split_method());
        let (train, val) = match val_split {
            0 => (data.train, None),
            count => {
                let held = val_method.held_out(&data.train.labels, spec.classes.len(), count);
                let (train, val) = data.train.partition(&held);
                (train, Some(val))
            }
        };
        Ok(Self {
            train: Arc::new(train),
            val,
            val_method,
            test: data.test,
            spec,
        })
    }
}
