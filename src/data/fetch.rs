//! Downloading and unpacking the official CIFAR-10 and CIFAR-100 binary archives, as the
//! seed's `download=True` does: verified by MD5, only the expected members extracted, nothing
//! half written (temporary names, then rename). The archive can come from a mirror (`--url`,
//! `RESNET_CIFAR_MIRROR`); its MD5 is checked all the same.

use super::cifar::{
    CIFAR10_DIR, CIFAR100_COARSE_NAMES, CIFAR100_DIR, CIFAR100_FINE_NAMES, CIFAR100_TEST, CIFAR100_TRAIN, META_FILE,
    TEST_FILE, TRAIN_FILES,
};
use md5::{Digest, Md5};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// One dataset's official archive.
#[derive(Clone, Copy, Debug)]
pub struct Archive {
    /// What the dataset is called ("CIFAR-10").
    pub dataset: &'static str,
    pub url: &'static str,
    pub file_name: &'static str,
    /// Its size, for the progress bar when the server does not say.
    pub bytes: u64,
    /// The MD5 its publisher gives.
    pub md5: &'static str,
    /// The folder inside the archive.
    pub inner_dir: &'static str,
    /// The members taken from the archive (names inside `inner_dir`).
    pub members: &'static [&'static str],
    /// The members it must hold.
    pub required: &'static [&'static str],
}

const CIFAR10_MEMBERS: [&str; 7] = [
    TRAIN_FILES[0],
    TRAIN_FILES[1],
    TRAIN_FILES[2],
    TRAIN_FILES[3],
    TRAIN_FILES[4],
    TEST_FILE,
    META_FILE,
];

/// CIFAR-10, binary version. Size and MD5 as the dataset's page lists them
/// (<https://www.cs.toronto.edu/~kriz/cifar.html>: "CIFAR-10 binary version (suitable for C
/// programs)", md5sum c32a1d4ab5d03f1284b67883e8d87530).
pub const CIFAR10: Archive = Archive {
    dataset: "CIFAR-10",
    url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    file_name: "cifar-10-binary.tar.gz",
    bytes: 170_052_171,
    md5: "c32a1d4ab5d03f1284b67883e8d87530",
    inner_dir: CIFAR10_DIR,
    members: &CIFAR10_MEMBERS,
    required: &TRAIN_FILES,
};

/// CIFAR-100, binary version. MD5 as the dataset's page lists it
/// (<https://www.cs.toronto.edu/~kriz/cifar.html>: "CIFAR-100 binary version (suitable for C
/// programs)", 161 MB, md5sum 03b5dce01913d631647c71ecec9e9cb8).
pub const CIFAR100: Archive = Archive {
    dataset: "CIFAR-100",
    url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    file_name: "cifar-100-binary.tar.gz",
    bytes: 168_513_733,
    md5: "03b5dce01913d631647c71ecec9e9cb8",
    inner_dir: CIFAR100_DIR,
    members: &[
        CIFAR100_TRAIN,
        CIFAR100_TEST,
        CIFAR100_FINE_NAMES,
        CIFAR100_COARSE_NAMES,
    ],
    required: &[CIFAR100_TRAIN, CIFAR100_FINE_NAMES, CIFAR100_COARSE_NAMES],
};

/// The datasets `data fetch --dataset` downloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Cifar10,
    Cifar100,
}

crate::named::choices!(Published, "dataset", {
    Cifar10 => "cifar10",
    Cifar100 => "cifar100",
});

impl Published {
    pub fn archive(self) -> &'static Archive {
        match self {
            Published::Cifar10 => &CIFAR10,
            Published::Cifar100 => &CIFAR100,
        }
    }
}

/// The environment variable naming a mirror: a base URL the archive's file name is appended to.
pub const MIRROR_VAR: &str = "RESNET_CIFAR_MIRROR";

impl Archive {
    /// Where to download from: `url` when given, else `$RESNET_CIFAR_MIRROR/FILE_NAME` when
    /// that is set, else the publisher's address.
    pub fn source(&self, url: Option<&str>) -> String {
        if let Some(u) = url {
            return u.to_string();
        }
        match std::env::var(MIRROR_VAR) {
            Ok(m) if !m.is_empty() => format!("{}/{}", m.trim_end_matches('/'), self.file_name),
            _ => self.url.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "could not download {url}: {reason} (offline? pass --data DIR with the files, or give a mirror with --url or {MIRROR_VAR})"
    )]
    Download { url: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{url}: the download's MD5 is {got}, expected {want}: refused (a corrupt download or another file); nothing extracted"
    )]
    Checksum {
        url: String,
        got: String,
        want: &'static str,
    },
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

/// Makes sure `dir` holds the dataset of `archive`, downloading (from `url` when given, see
/// [`Archive::source`]) and extracting it when it does not. `progress(done, total)` is called
/// while downloading. Returns the folder with the files.
pub fn ensure(
    dir: &Path,
    archive: &Archive,
    url: Option<&str>,
    progress: impl FnMut(u64, Option<u64>),
) -> Result<PathBuf, FetchError> {
    let inner = dir.join(archive.inner_dir);
    for candidate in [dir, inner.as_path()] {
        if archive.required.iter().all(|m| candidate.join(m).is_file()) {
            return Ok(candidate.to_path_buf());
        }
    }
    let file = download(dir, archive, url, progress)?;
    extract(&file, dir, archive)?;
    Ok(inner)
}

/// Downloads the archive into `dir` (kept as its file name once verified). While it downloads
/// it is `NAME.part`; a broken connection leaves that file (the next attempt starts it again),
/// a wrong MD5, a failed write (a full disk) or a server sending more than the archive's known
/// size removes it.
pub fn download(
    dir: &Path,
    archive: &Archive,
    url: Option<&str>,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<PathBuf, FetchError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let target = dir.join(archive.file_name);
    if target.exists() && md5_of(&target)? == archive.md5 {
        return Ok(target);
    }
    let url = archive.source(url);
    let part = dir.join(format!("{}.part", archive.file_name));
    let failed = |reason: String| FetchError::Download {
        url: url.clone(),
        reason,
    };
    let mut resp = ureq::get(&url).call().map_err(|e| failed(e.to_string()))?;
    let total = resp.body().content_length().or(Some(archive.bytes));
    let mut reader = resp.body_mut().as_reader();
    let mut file = std::fs::File::create(&part).map_err(io(&part))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    let discard = |e: FetchError| {
        let _ = std::fs::remove_file(&part);
        e
    };
    loop {
        let n = reader.read(&mut buf).map_err(|e| failed(e.to_string()))?;
        if n == 0 {
            break;
        }
        if done + n as u64 > archive.bytes {
            let why = format!(
                "the server sent more than the archive's {} bytes; stopped",
                archive.bytes
            );
            return Err(discard(failed(why)));
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| discard(io(&part)(e)))?;
        done += n as u64;
        progress(done, total);
    }
    file.sync_all().map_err(|e| discard(io(&part)(e)))?;
    let got = hex(&hasher.finalize());
    if got != archive.md5 {
        let _ = std::fs::remove_file(&part);
        return Err(FetchError::Checksum {
            url,
            got,
            want: archive.md5,
        });
    }
    std::fs::rename(&part, &target).map_err(io(&target))?;
    Ok(target)
}

/// The MD5 of `bytes`, as hex digits.
pub fn md5_hex(bytes: &[u8]) -> String {
    hex(&Md5::digest(bytes))
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

/// Extracts the expected members of the `.tar.gz` `file` into `dir/INNER_DIR/`. A member whose
/// path is absolute or climbs with `..` makes the whole archive refused (before anything is
/// written); other unexpected members are skipped. Each file is written under a temporary name
/// and renamed when complete.
pub fn extract(file: &Path, dir: &Path, spec: &Archive) -> Result<(), FetchError> {
    let archive = file;
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
    let out_dir = dir.join(spec.inner_dir);
    std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
    let wanted = spec.members;
    let mut found = Vec::new();
    for entry in open()?.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let p = entry.path().map_err(bad)?.into_owned();
        let parts: Vec<_> = p.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        let name = match parts.as_slice() {
            [d, f] if d.as_os_str() == spec.inner_dir => f.as_os_str().to_string_lossy().to_string(),
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
    let missing: Vec<String> = spec
        .required
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
