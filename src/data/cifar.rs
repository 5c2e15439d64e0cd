//! CIFAR-10 in the official binary layout: `data_batch_1.bin` .. `data_batch_5.bin`,
//! `test_batch.bin`, `batches.meta.txt`, in a folder or in its `cifar-10-batches-bin/`.
//! A record is one label byte (0-9) and 3,072 pixel bytes: the red plane, then green, then
//! blue, each 32x32 row-major. Everything read is validated; errors name the file and record.

use std::path::{Path, PathBuf};

pub const IMAGE_BYTES: usize = 3 * 32 * 32;
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
pub const RECORDS_PER_FILE: usize = 10_000;
pub const NUM_CLASSES: usize = 10;
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";
pub const META_FILE: &str = "batches.meta.txt";
pub const CLASS_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("no CIFAR-10 data in {dir}: expected {TRAIN_FILES:?} there or in {dir}/cifar-10-batches-bin{hint}")]
    NotFound { dir: PathBuf, hint: String },
}

/// Labelled images, pixels as stored (`[n, 3, 32, 32]` bytes).
#[derive(Clone, Debug, Default)]
pub struct Images {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Images {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }
    /// Splits off the images from `at` on, keeping the first `at` (no copy of the kept part).
    pub fn split_off(&mut self, at: usize) -> Images {
        Images {
            pixels: self.pixels.split_off(at * IMAGE_BYTES),
            labels: self.labels.split_off(at),
        }
    }

    /// Images `range` as a new set.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Images {
        Images {
            pixels: self.pixels[range.start * IMAGE_BYTES..range.end * IMAGE_BYTES].to_vec(),
            labels: self.labels[range].to_vec(),
        }
    }
}

/// Parses one batch file's bytes; `path` only names it in errors.
pub fn parse_records(path: &Path, bytes: &[u8], expected: Option<usize>) -> Result<Images, DataError> {
    let invalid = |reason: String| DataError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(invalid("file is empty".into()));
    }
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(invalid(format!(
            "{} bytes is not a whole number of {RECORD_BYTES}-byte records ({} records and {} bytes over): truncated or not a CIFAR-10 batch file",
            bytes.len(),
            bytes.len() / RECORD_BYTES,
            bytes.len() % RECORD_BYTES
        )));
    }
    let n = bytes.len() / RECORD_BYTES;
    if let Some(want) = expected
        && n != want
    {
        return Err(invalid(format!("holds {n} records, expected {want}")));
    }
    let mut images = Images {
        pixels: Vec::with_capacity(n * IMAGE_BYTES),
        labels: Vec::with_capacity(n),
    };
    for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        if rec[0] as usize >= NUM_CLASSES {
            return Err(invalid(format!(
                "record {i} (byte offset {}) has label {}, expected 0-9",
                i * RECORD_BYTES,
                rec[0]
            )));
        }
        images.labels.push(rec[0]);
        images.pixels.extend_from_slice(&rec[1..]);
    }
    Ok(images)
}

fn read_file(path: &Path, expected: Option<usize>) -> Result<Images, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_records(path, &bytes, expected)
}

/// The folder that holds the batch files: `dir` itself or `dir/cifar-10-batches-bin`.
pub fn locate(dir: &Path) -> Result<PathBuf, DataError> {
    for candidate in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        if candidate.join(TRAIN_FILES[0]).is_file() {
            return Ok(candidate);
        }
    }
    let hint = if dir.exists() {
        String::new()
    } else {
        " (the folder does not exist)".to_string()
    };
    Err(DataError::NotFound {
        dir: dir.to_path_buf(),
        hint,
    })
}

/// The dataset as found on disk.
#[derive(Clone, Debug)]
pub struct Cifar10 {
    pub dir: PathBuf,
    pub train: Images,
    /// `None` when `test_batch.bin` is absent.
    pub test: Option<Images>,
    pub classes: Vec<String>,
}

impl Cifar10 {
    /// Reads and validates every file present in `dir` (see [`locate`]). The five training
    /// files must all be there with 10,000 records each; the test file is optional.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let dir = locate(dir)?;
        let mut train = Images::default();
        for name in TRAIN_FILES {
            let part = read_file(&dir.join(name), Some(RECORDS_PER_FILE))?;
            train.pixels.extend(part.pixels);
            train.labels.extend(part.labels);
        }
        let test_path = dir.join(TEST_FILE);
        let test = if test_path.exists() {
            Some(read_file(&test_path, Some(RECORDS_PER_FILE))?)
        } else {
            None
        };
        let classes = read_classes(&dir.join(META_FILE))?;
        Ok(Self {
            dir,
            train,
            test,
            classes,
        })
    }
}

/// Class names from `batches.meta.txt` (one per line), or the standard names when absent.
fn read_classes(path: &Path) -> Result<Vec<String>, DataError> {
    if !path.exists() {
        return Ok(CLASS_NAMES.iter().map(|s| s.to_string()).collect());
    }
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != NUM_CLASSES {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            reason: format!("lists {} class names, expected {NUM_CLASSES}", names.len()),
        });
    }
    Ok(names)
}

/// The data a run trains and evaluates on.
#[derive(Clone, Debug)]
pub struct Splits {
    /// Shared with the background loader thread.
    pub train: std::sync::Arc<Images>,
    /// The last `val_split` training images, held out.
    pub val: Option<Images>,
    pub test: Option<Images>,
    pub classes: Vec<String>,
}

impl Splits {
    /// Holds out the last `val_split` training images as a validation set.
    pub fn new(data: Cifar10, val_split: usize) -> Result<Self, String> {
        let n = data.train.len();
        if val_split >= n {
            return Err(format!(
                "--val-split {val_split} leaves no training images (there are {n})"
            ));
        }
        let mut train = data.train;
        let val = (val_split > 0).then(|| train.split_off(n - val_split));
        Ok(Self {
            train: std::sync::Arc::new(train),
            val,
            test: data.test,
            classes: data.classes,
        })
    }
}
