//! Downloading and unpacking the official CIFAR-10 binary archive, as the seed's
//! `download=True` does: verified by MD5, only the expected members extracted, nothing half
//! written (temporary names, then rename).

use super::cifar::{META_FILE, TEST_FILE, TRAIN_FILES, locate};
use md5::{Digest, Md5};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

pub const URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const ARCHIVE_BYTES: u64 = 170_052_171;
pub const ARCHIVE_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
pub const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";
/// The folder inside the archive.
pub const INNER_DIR: &str = "cifar-10-batches-bin";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("could not download {URL}: {0} (offline? pass --data DIR with the CIFAR-10 binary files)")]
    Download(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: MD5 is {got}, expected {ARCHIVE_MD5}: the download is corrupt")]
    Checksum { path: PathBuf, got: String },
    #[error("{path}: refused: member '{member}' would be written outside the target folder")]
    UnsafeMember { path: PathBuf, member: String },
    #[error("{path}: not a valid archive: {reason}")]
    BadArchive { path: PathBuf, reason: String },
    #[error("{path}: the archive lacks {missing:?}")]
    Incomplete { path: PathBuf, missing: Vec<String> },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The members we take from the archive (file names inside `cifar-10-batches-bin/`).
pub fn expected_members() -> Vec<&'static str> {
    let mut m: Vec<&str> = TRAIN_FILES.to_vec();
    m.extend([TEST_FILE, META_FILE]);
    m
}

/// Makes sure `dir` holds CIFAR-10, downloading and extracting it when it does not.
/// `progress(done, total)` is called while downloading. Returns the folder with the files.
pub fn ensure(dir: &Path, progress: impl FnMut(u64, Option<u64>)) -> Result<PathBuf, FetchError> {
    if let Ok(found) = locate(dir) {
        return Ok(found);
    }
    let archive = download(dir, progress)?;
    extract(&archive, dir)?;
    Ok(dir.join(INNER_DIR))
}

/// Downloads the archive into `dir` (kept as `cifar-10-binary.tar.gz` once verified).
pub fn download(dir: &Path, mut progress: impl FnMut(u64, Option<u64>)) -> Result<PathBuf, FetchError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let target = dir.join(ARCHIVE_NAME);
    if target.exists() && md5_of(&target)? == ARCHIVE_MD5 {
        return Ok(target);
    }
    let part = dir.join(format!("{ARCHIVE_NAME}.part"));
    let result = (|| {
        let mut resp = ureq::get(URL).call().map_err(|e| FetchError::Download(e.to_string()))?;
        let total = resp.body().content_length().or(Some(ARCHIVE_BYTES));
        let mut reader = resp.body_mut().as_reader();
        let mut file = std::fs::File::create(&part).map_err(io(&part))?;
        let mut hasher = Md5::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut done = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| FetchError::Download(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io(&part))?;
            done += n as u64;
            progress(done, total);
        }
        file.sync_all().map_err(io(&part))?;
        let got = hex(&hasher.finalize());
        if got != ARCHIVE_MD5 {
            return Err(FetchError::Checksum {
                path: target.clone(),
                got,
            });
        }
        std::fs::rename(&part, &target).map_err(io(&target))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result.map(|_| target)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn md5_of(path: &Path) -> Result<String, FetchError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Extracts the expected members of a `.tar.gz` into `dir/cifar-10-batches-bin/`. A member
/// whose path is absolute or climbs with `..` makes the whole archive refused (before anything
/// is written); other unexpected members are skipped. Each file is written under a temporary
/// name and renamed when complete.
pub fn extract(archive: &Path, dir: &Path) -> Result<(), FetchError> {
    let open = || -> Result<tar::Archive<flate2::read::GzDecoder<std::fs::File>>, FetchError> {
        let f = std::fs::File::open(archive).map_err(io(archive))?;
        Ok(tar::Archive::new(flate2::read::GzDecoder::new(f)))
    };
    let bad = |e: std::io::Error| FetchError::BadArchive {
        path: archive.to_path_buf(),
        reason: e.to_string(),
    };
    // Pass 1: every member's path must stay inside the target.
    for entry in open()?.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let p = entry.path().map_err(bad)?.into_owned();
        if p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(FetchError::UnsafeMember {
                path: archive.to_path_buf(),
                member: p.display().to_string(),
            });
        }
    }
    // Pass 2: write the expected files.
    let out_dir = dir.join(INNER_DIR);
    std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
    let wanted = expected_members();
    let mut found = Vec::new();
    for entry in open()?.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let p = entry.path().map_err(bad)?.into_owned();
        let parts: Vec<_> = p.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        let name = match parts.as_slice() {
            [d, f] if d.as_os_str() == INNER_DIR => f.as_os_str().to_string_lossy().to_string(),
            _ => continue,
        };
        if !wanted.contains(&name.as_str()) || !entry.header().entry_type().is_file() {
            continue;
        }
        let dest = out_dir.join(&name);
        let tmp = out_dir.join(format!(".{name}.part"));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::copy(&mut entry, &mut f)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(FetchError::Io { path: dest, source: e });
        }
        found.push(name);
    }
    let missing: Vec<String> = TRAIN_FILES
        .iter()
        .filter(|m| !found.iter().any(|f| f == *m))
        .map(|m| m.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(FetchError::Incomplete {
            path: archive.to_path_buf(),
            missing,
        });
    }
    Ok(())
}
