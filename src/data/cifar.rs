//! CIFAR-10 and CIFAR-100 in the official binary layouts. Everything read is validated; errors
//! name the file and record.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`, `batches.meta.txt`,
//! in a folder or in its `cifar-10-batches-bin/`. A record is one label byte (0-9) and 3,072
//! pixel bytes: the red plane, then green, then blue, each 32x32 row-major.
//!
//! CIFAR-100: `train.bin`, `test.bin`, `fine_label_names.txt`, `coarse_label_names.txt`, in a
//! folder or in its `cifar-100-binary/`. A record is the coarse label byte (0-19), the fine
//! label byte (0-99) and the same 3,072 pixel bytes.

use super::dataset::{Dataset, Format, LabelSet};
use super::images::{Images, Normalization};
use std::path::{Path, PathBuf};

/// CIFAR images are 32x32.
pub const SIDE: usize = 32;
pub const IMAGE_BYTES: usize = super::images::CHANNELS * SIDE * SIDE;
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
    /// Anything else about a data folder, said in full (names the folder or file).
    #[error("{0}")]
    Other(String),
}

impl DataError {
    /// Turns an I/O error on `path` into one that names it (for `map_err`).
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
        move |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How a binary format lays out its records: label bytes before the pixels, which of them is
/// the label, and how many classes it has.
#[derive(Clone, Copy, Debug)]
pub struct RecordFormat {
    pub label_bytes: usize,
    pub label_at: usize,
    pub classes: usize,
    /// The format's name, for errors ("CIFAR-10 batch file").
    pub what: &'static str,
}

impl RecordFormat {
    pub const CIFAR10: RecordFormat = RecordFormat {
        label_bytes: 1,
        label_at: 0,
        classes: NUM_CLASSES,
        what: "CIFAR-10 batch file",
    };
    /// CIFAR-100 with the chosen labels.
    pub fn cifar100(labels: LabelSet) -> RecordFormat {
        let (label_at, classes) = match labels {
            LabelSet::Coarse => (0, CIFAR100_COARSE),
            LabelSet::Fine => (1, CIFAR100_FINE),
        };
        RecordFormat {
            label_bytes: 2,
            label_at,
            classes,
            what: "CIFAR-100 file",
        }
    }
    fn record_bytes(&self) -> usize {
        self.label_bytes + IMAGE_BYTES
    }
}

/// Parses one CIFAR-10 batch file's bytes; `path` only names it in errors.
pub fn parse_records(path: &Path, bytes: &[u8], expected: Option<usize>) -> Result<Images, DataError> {
    parse_format(path, bytes, expected, RecordFormat::CIFAR10)
}

/// Parses one file of records laid out as `format`; `path` only names it in errors.
pub fn parse_format(path: &Path, bytes: &[u8], expected: Option<usize>, f: RecordFormat) -> Result<Images, DataError> {
    let invalid = |reason: String| DataError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let record = f.record_bytes();
    if bytes.is_empty() {
        return Err(invalid("file is empty".into()));
    }
    if !bytes.len().is_multiple_of(record) {
        return Err(invalid(format!(
            "{} bytes is not a whole number of {record}-byte records ({} records and {} bytes over): truncated or not a {}",
            bytes.len(),
            bytes.len() / record,
            bytes.len() % record,
            f.what
        )));
    }
    let n = bytes.len() / record;
    if let Some(want) = expected
        && n != want
    {
        return Err(invalid(format!("holds {n} records, expected {want}")));
    }
    let mut images = Images::new(SIDE);
    images.pixels.reserve(n * IMAGE_BYTES);
    images.labels.reserve(n);
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[f.label_at] as usize;
        if label >= f.classes {
            return Err(invalid(format!(
                "record {i} (byte offset {}) has label {label}, expected 0-{}",
                i * record + f.label_at,
                f.classes - 1
            )));
        }
        images.push(&rec[f.label_bytes..], label as u32);
    }
    Ok(images)
}

fn read_file(path: &Path, expected: Option<usize>, f: RecordFormat) -> Result<Images, DataError> {
    let bytes = std::fs::read(path).map_err(DataError::io(path))?;
    parse_format(path, &bytes, expected, f)
}

/// The records of `path` when the file exists (a test file is optional).
fn read_optional(path: &Path, expected: usize, f: RecordFormat) -> Result<Option<Images>, DataError> {
    path.exists().then(|| read_file(path, Some(expected), f)).transpose()
}

/// The folder that holds `marker`: `dir` itself or `dir/inner`.
fn find_in(dir: &Path, inner: &str, marker: &str) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join(inner)]
        .into_iter()
        .find(|candidate| candidate.join(marker).is_file())
}

/// The folder that holds the CIFAR-10 batch files: `dir` itself or `dir/cifar-10-batches-bin`.
pub fn locate(dir: &Path) -> Result<PathBuf, DataError> {
    find_in(dir, CIFAR10_DIR, TRAIN_FILES[0]).ok_or_else(|| {
        let hint = if dir.exists() {
            String::new()
        } else {
            " (the folder does not exist)".to_string()
        };
        DataError::NotFound {
            dir: dir.to_path_buf(),
            hint,
        }
    })
}

/// The folder that holds the CIFAR-100 files: `dir` itself or `dir/cifar-100-binary`.
pub fn locate_cifar100(dir: &Path) -> Option<PathBuf> {
    find_in(dir, CIFAR100_DIR, CIFAR100_TRAIN)
}

/// The folder inside the CIFAR-10 archive.
pub const CIFAR10_DIR: &str = "cifar-10-batches-bin";
/// The folder inside the CIFAR-100 archive.
pub const CIFAR100_DIR: &str = "cifar-100-binary";
pub const CIFAR100_TRAIN: &str = "train.bin";
pub const CIFAR100_TEST: &str = "test.bin";
pub const CIFAR100_FINE_NAMES: &str = "fine_label_names.txt";
pub const CIFAR100_COARSE_NAMES: &str = "coarse_label_names.txt";
pub const CIFAR100_FINE: usize = 100;
pub const CIFAR100_COARSE: usize = 20;

/// The CIFAR-10 reader.
pub struct Cifar10;

impl Cifar10 {
    /// Reads and validates every file present in `dir` (see [`locate`]). The five training
    /// files must all be there with 10,000 records each; the test file is optional.
    pub fn load(dir: &Path) -> Result<Dataset, DataError> {
        let dir = locate(dir)?;
        let mut train = Images::new(SIDE);
        for name in TRAIN_FILES {
            train.extend(read_file(
                &dir.join(name),
                Some(RECORDS_PER_FILE),
                RecordFormat::CIFAR10,
            )?);
        }
        let test = read_optional(&dir.join(TEST_FILE), RECORDS_PER_FILE, RecordFormat::CIFAR10)?;
        let classes = match dir.join(META_FILE) {
            p if p.exists() => read_names(&p, NUM_CLASSES)?,
            _ => CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        };
        Ok(Dataset {
            format: Format::Cifar10,
            dir,
            train,
            test,
            classes,
            // The seed's constants, so that its runs stay exactly as they were.
            norm: Normalization::CIFAR10,
            notes: Vec::new(),
        })
    }
}

/// The CIFAR-100 reader.
pub struct Cifar100;

impl Cifar100 {
    /// Reads `train.bin` (50,000 records), `test.bin` (10,000, optional) and the label names of
    /// `labels` from `dir` or `dir/cifar-100-binary`. Normalisation: the training images' own
    /// channel statistics.
    pub fn load(dir: &Path, labels: LabelSet) -> Result<Dataset, DataError> {
        let dir = locate_cifar100(dir).ok_or_else(|| {
            DataError::Other(format!(
                "no CIFAR-100 data in {}: expected {CIFAR100_TRAIN} there or in {}",
                dir.display(),
                dir.join(CIFAR100_DIR).display()
            ))
        })?;
        let f = RecordFormat::cifar100(labels);
        let train = read_file(&dir.join(CIFAR100_TRAIN), Some(50_000), f)?;
        let test = read_optional(&dir.join(CIFAR100_TEST), 10_000, f)?;
        let names = match labels {
            LabelSet::Fine => CIFAR100_FINE_NAMES,
            LabelSet::Coarse => CIFAR100_COARSE_NAMES,
        };
        let classes = read_names(&dir.join(names), f.classes)?;
        let norm = train.channel_stats();
        Ok(Dataset {
            format: Format::Cifar100(labels),
            dir,
            train,
            test,
            classes,
            norm,
            notes: Vec::new(),
        })
    }
}

/// Class names from a names file (one per line, blank lines ignored); there must be `count`.
fn read_names(path: &Path, count: usize) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(DataError::io(path))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != count {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            reason: format!("lists {} class names, expected {count}", names.len()),
        });
    }
    Ok(names)
}
