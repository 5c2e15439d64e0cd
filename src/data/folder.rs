//! Image folders in torchvision's ImageFolder layout: `DIR/train/CLASS/IMAGE` and, when present,
//! `DIR/test/CLASS/IMAGE` (or `DIR/val/CLASS/IMAGE`). Classes are the sorted names of the class
//! folders of `train/` (torchvision's order, so label indices agree with PyTorch code). As in
//! torchvision, a class's images are the files with an image extension ([`IMAGE_EXTENSIONS`])
//! anywhere under its folder, sub-folders included (in sorted order); other files (a
//! `README.txt`) are skipped with a note, hidden ones (`.name`) silently.
//!
//! Each image, whatever its format, size and colour type, becomes RGB, is cut to its centred
//! square and resized to the run's image size (Lanczos3; an image already of that size is taken
//! pixel for pixel). Decoding runs once, in parallel: the result goes into a cache file,
//! `DIR/.resnet-cifar-cache/images-SIZE.safetensors`, reused while the list of files, their sizes
//! and modification times are unchanged, and rebuilt otherwise.

use super::cifar::DataError;
use super::dataset::{DataSpec, Dataset, Format};
use super::images::{Images, Normalization};
use image::imageops::FilterType;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The folder of training images, whose presence makes a folder an image folder.
pub const TRAIN_DIR: &str = "train";
/// Folders of held-out images, the first present taken.
pub const TEST_DIRS: [&str; 2] = ["test", "val"];
/// Where the decoded images are kept, inside the data folder.
pub const CACHE_DIR: &str = ".resnet-cifar-cache";
/// Bumped when the cache's content changes meaning.
const CACHE_VERSION: &str = "1";

/// The extensions (any case) of the files a class folder's images are read from: the formats
/// the decoder reads.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "webp", "gif"];

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

#[derive(Clone, Copy, Debug)]
pub struct FolderOptions {
    pub image_size: usize,
    pub skip_bad_images: bool,
}

/// True when `dir` has a `train/` folder.
pub fn is_image_folder(dir: &Path) -> bool {
    dir.join(TRAIN_DIR).is_dir()
}

/// `img` as RGB, cut to its centred square and resized to `size x size` (Lanczos3, which
/// antialiases); an image already of that size is taken pixel for pixel. Bytes in planes
/// (`[3, size, size]`), as the CIFAR files store them.
pub fn fit(img: &image::DynamicImage, size: usize) -> Vec<u8> {
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    let small = if (w as usize, h as usize) == (size, size) {
        rgb
    } else {
        let side = w.min(h);
        let square = image::imageops::crop_imm(&rgb, (w - side) / 2, (h - side) / 2, side, side).to_image();
        image::imageops::resize(&square, size as u32, size as u32, FilterType::Lanczos3)
    };
    let plane = size * size;
    let mut out = vec![0u8; 3 * plane];
    for (i, p) in small.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p[c];
        }
    }
    out
}

/// Decodes one image file, recognising its format from its bytes.
pub fn decode(path: &Path) -> Result<image::DynamicImage, String> {
    image::io::Reader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())
}

/// Every image of `images` resized to `size` (as [`fit`] does).
pub fn resize_all(images: &Images, size: usize) -> Images {
    let side = images.side as u32;
    let resized: Vec<Vec<u8>> = (0..images.len())
        .into_par_iter()
        .map(|i| {
            let src = images.image(i);
            let plane = images.side * images.side;
            let rgb = image::RgbImage::from_fn(side, side, |x, y| {
                let at = (y * side + x) as usize;
                image::Rgb([src[at], src[plane + at], src[2 * plane + at]])
            });
            fit(&image::DynamicImage::ImageRgb8(rgb), size)
        })
        .collect();
    let mut out = Images::new(size);
    for (px, &label) in resized.iter().zip(&images.labels) {
        out.push(px, label);
    }
    out
}

/// A folder's visible entries (`name`, path), each list sorted by name.
struct Listing {
    folders: Vec<(String, PathBuf)>,
    files: Vec<(String, PathBuf)>,
}

/// Lists `dir` once, its sub-folders apart from its files.
fn entries(dir: &Path) -> Result<Listing, DataError> {
    let rd = std::fs::read_dir(dir).map_err(DataError::io(dir))?;
    let (mut folders, mut files) = (Vec::new(), Vec::new());
    for e in rd {
        let e = e.map_err(DataError::io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() { &mut folders } else { &mut files }.push((name, path));
    }
    folders.sort();
    files.sort();
    Ok(Listing { folders, files })
}

/// One image file to read: where it is, its label, and what identifies its version.
struct FileEntry {
    path: PathBuf,
    label: u32,
    /// "relative path, size, modification time": the cache is valid while these are.
    stamp: String,
}

/// What a class folder holds: its image files, sub-folders walked (in sorted order; a folder
/// reached twice through links is walked once), and the other files.
#[derive(Default)]
struct ClassFiles {
    images: Vec<PathBuf>,
    others: Vec<PathBuf>,
}

fn walk_class(dir: &Path, seen: &mut Vec<PathBuf>, found: &mut ClassFiles) -> Result<(), DataError> {
    if let Ok(real) = std::fs::canonicalize(dir) {
        if seen.contains(&real) {
            return Ok(());
        }
        seen.push(real);
    }
    let Listing { folders, files } = entries(dir)?;
    for (_, path) in folders {
        walk_class(&path, seen, found)?;
    }
    for (_, path) in files {
        if has_image_extension(&path) {
            found.images.push(path);
        } else {
            found.others.push(path);
        }
    }
    Ok(())
}

/// The image files of one split folder (`train/` or `test/`), labelled by `classes`, and the
/// files there that are not images.
fn list_split(root: &Path, split: &Path, classes: &[String]) -> Result<(Vec<FileEntry>, Vec<PathBuf>), DataError> {
    let mut files = Vec::new();
    let mut others = Vec::new();
    for (name, class_dir) in entries(split)?.folders {
        let Some(label) = classes.iter().position(|c| *c == name) else {
            return Err(DataError::Other(format!(
                "{}: class '{name}' is not among the classes of {} ({})",
                class_dir.display(),
                root.join(TRAIN_DIR).display(),
                classes.join(", ")
            )));
        };
        let mut found = ClassFiles::default();
        walk_class(&class_dir, &mut Vec::new(), &mut found)?;
        if found.images.is_empty() {
            return Err(DataError::Other(format!(
                "{}: the class folder is empty (no files ending in .{})",
                class_dir.display(),
                IMAGE_EXTENSIONS.join(", .")
            )));
        }
        others.extend(found.others);
        for path in found.images {
            // A file that cannot be read (a broken or looping link) is stamped as such: it
            // fails to decode, and --skip-bad-images skips it like any bad image.
            let (len, mtime) = std::fs::metadata(&path).map_or((0, 0), |meta| {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                (meta.len(), mtime)
            });
            let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            files.push(FileEntry {
                stamp: format!("{rel}\t{len}\t{mtime}"),
                path,
                label: label as u32,
            });
        }
    }
    Ok((files, others))
}

/// What decoding one split gave: the images, and the files that could not be decoded.
struct Decoded {
    images: Images,
    bad: Vec<String>,
}

fn decode_split(
    files: &[FileEntry],
    size: usize,
    done: &AtomicU64,
    total: u64,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Decoded {
    let results: Vec<Result<Vec<u8>, String>> = files
        .par_iter()
        .map(|f| {
            let r = decode(&f.path)
                .map(|img| fit(&img, size))
                .map_err(|e| format!("{}: {e}", f.path.display()));
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            r
        })
        .collect();
    let mut images = Images::new(size);
    let mut bad = Vec::new();
    for (f, r) in files.iter().zip(results) {
        match r {
            Ok(px) => images.push(&px, f.label),
            Err(e) => bad.push(e),
        }
    }
    Decoded { images, bad }
}

/// Reads the image folder `dir` (see the module's documentation).
pub fn load(dir: &Path, opts: &FolderOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Dataset, DataError> {
    let train_dir = dir.join(TRAIN_DIR);
    let classes: Vec<String> = entries(&train_dir)?.folders.into_iter().map(|(n, _)| n).collect();
    if classes.is_empty() {
        return Err(DataError::Other(format!(
            "{}: no class folders (expected {}/CLASS/IMAGE)",
            train_dir.display(),
            train_dir.display()
        )));
    }
    if let [only] = classes.as_slice() {
        return Err(DataError::Other(format!(
            "{}: one class folder ({only}); a classifier needs two classes or more",
            train_dir.display()
        )));
    }
    let (train_files, mut others) = list_split(dir, &train_dir, &classes)?;
    let test_dir = TEST_DIRS.iter().map(|t| dir.join(t)).find(|p| p.is_dir());
    let test_files = match &test_dir {
        Some(t) => {
            let (files, more) = list_split(dir, t, &classes)?;
            others.extend(more);
            Some(files)
        }
        None => None,
    };
    let size = opts.image_size;
    let mut fingerprint = format!("version {CACHE_VERSION}\nsize {size}\nclasses {}\n", classes.join("/"));
    for f in train_files.iter().chain(test_files.iter().flatten()) {
        fingerprint += &f.stamp;
        fingerprint.push('\n');
    }
    let fingerprint = super::fetch::md5_hex(fingerprint.as_bytes());
    let cache = dir.join(CACHE_DIR).join(format!("images-{size}.safetensors"));

    let mut notes = Vec::new();
    if let Some(first) = others.first() {
        notes.push(format!(
            "skipped {} file(s) without an image extension (.{}), such as {}",
            others.len(),
            IMAGE_EXTENSIONS.join(", ."),
            first.display()
        ));
    }
    let mut cached = read_cache(&cache, &fingerprint);
    // The cache is input like any other: one that says what its files cannot (labels beyond
    // the classes, another size, a normalisation that divides by zero) is decoded again.
    if let Some(problem) = cached.as_ref().and_then(|c| c.problem(classes.len(), size)) {
        notes.push(format!(
            "the cache {} is not valid ({problem}): decoding again",
            cache.display()
        ));
        cached = None;
    }
    let (train, test, bad, norm) = match cached {
        Some(c) => {
            notes.push(format!("decoded images read from the cache {}", cache.display()));
            (c.train, c.test, c.bad, c.norm)
        }
        None => {
            let total = (train_files.len() + test_files.as_ref().map_or(0, Vec::len)) as u64;
            let done = AtomicU64::new(0);
            let started = std::time::Instant::now();
            let train = decode_split(&train_files, size, &done, total, progress);
            let test = test_files
                .as_ref()
                .map(|t| decode_split(t, size, &done, total, progress));
            let mut bad = train.bad;
            let test = test.map(|t| {
                bad.extend(t.bad);
                t.images
            });
            let norm = train.images.channel_stats();
            let c = Cached {
                train: train.images,
                test,
                bad,
                norm,
            };
            notes.push(match write_cache(&cache, &fingerprint, &c) {
                Ok(()) => format!(
                    "decoded {total} images in {:.1} s; cached in {}",
                    started.elapsed().as_secs_f64(),
                    cache.display()
                ),
                Err(e) => format!(
                    "decoded {total} images in {:.1} s; could not write the cache {} ({e}): they will be decoded again next time",
                    started.elapsed().as_secs_f64(),
                    cache.display()
                ),
            });
            (c.train, c.test, c.bad, c.norm)
        }
    };
    if !bad.is_empty() {
        if !opts.skip_bad_images {
            return Err(DataError::Other(format!(
                "{} image file(s) cannot be decoded (remove them, or pass --skip-bad-images to train without them):\n  {}",
                bad.len(),
                bad.join("\n  ")
            )));
        }
        notes.push(format!(
            "skipped {} image file(s) that cannot be decoded (--skip-bad-images)",
            bad.len()
        ));
    }
    if train.is_empty() {
        return Err(DataError::Other(format!(
            "{}: no image could be decoded",
            train_dir.display()
        )));
    }
    if let Some(t) = &test_dir {
        notes.push(format!("held-out images from {}", t.display()));
    }
    Ok(Dataset {
        format: Format::ImageFolder,
        dir: dir.to_path_buf(),
        train,
        test,
        classes,
        norm,
        notes,
    })
}

/// The decoded images as the cache keeps them.
struct Cached {
    train: Images,
    test: Option<Images>,
    bad: Vec<String>,
    norm: Normalization,
}

impl Cached {
    /// What makes these images unusable for `classes` classes of `size` pixels, if anything.
    fn problem(&self, classes: usize, size: usize) -> Option<String> {
        let splits = std::iter::once(&self.train).chain(&self.test);
        if let Some(images) = splits.clone().find(|i| i.side != size) {
            return Some(format!(
                "images of {0}x{0} where {size}x{size} were asked for",
                images.side
            ));
        }
        if let Some(&label) = splits.flat_map(|i| &i.labels).find(|&&l| l as usize >= classes) {
            return Some(format!("label {label} for {classes} classes"));
        }
        let spec = DataSpec {
            classes: vec![String::new(); classes],
            image_size: size,
            norm: self.norm,
        };
        spec.check().err()
    }
}

fn write_cache(path: &Path, fingerprint: &str, c: &Cached) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let labels = |i: &Images| -> Vec<u8> { i.labels.iter().flat_map(|l| l.to_le_bytes()).collect() };
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, images) in [("train", Some(&c.train)), ("test", c.test.as_ref())] {
        let Some(images) = images else { continue };
        let (n, s) = (images.len(), images.side);
        owned.push((
            format!("{name}.pixels"),
            Dtype::U8,
            vec![n, 3, s, s],
            images.pixels.clone(),
        ));
        owned.push((format!("{name}.labels"), Dtype::U32, vec![n], labels(images)));
    }
    let views = owned.iter().map(|(name, dtype, shape, bytes)| {
        (
            name.clone(),
            TensorView::new(*dtype, shape.clone(), bytes).expect("consistent tensor"),
        )
    });
    let meta: HashMap<String, String> = [
        ("fingerprint".to_string(), fingerprint.to_string()),
        ("side".to_string(), c.train.side.to_string()),
        ("bad".to_string(), serde_json::to_string(&c.bad).expect("serialisable")),
        (
            "norm".to_string(),
            serde_json::to_string(&c.norm).expect("serialisable"),
        ),
    ]
    .into();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(std::io::Error::other)?;
    crate::atomic_file::write_atomic(path, &bytes)
}

/// The cache at `path` when it exists, is whole and was made from the same files.
fn read_cache(path: &Path, fingerprint: &str) -> Option<Cached> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).ok()?;
    let meta = meta.metadata().clone()?;
    if meta.get("fingerprint")? != fingerprint {
        return None;
    }
    let side: usize = meta.get("side")?.parse().ok()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let split = |name: &str| -> Option<Images> {
        let px = st.tensor(&format!("{name}.pixels")).ok()?;
        let lb = st.tensor(&format!("{name}.labels")).ok()?;
        let labels: Vec<u32> = lb
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (px.data().len() == labels.len() * 3 * side * side).then(|| Images {
            pixels: px.data().to_vec(),
            labels,
            side,
        })
    };
    Some(Cached {
        train: split("train")?,
        test: split("test"),
        bad: serde_json::from_str(meta.get("bad")?).ok()?,
        norm: serde_json::from_str(meta.get("norm")?).ok()?,
    })
}
