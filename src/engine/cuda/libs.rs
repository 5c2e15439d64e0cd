//! Finding the CUDA libraries at run time. cudarc opens them by name (`libcudnn.so.9`, ...), which
//! finds what the dynamic linker finds: `LD_LIBRARY_PATH`, the system's library cache. Beyond
//! that we look where a CUDA toolkit or a PyTorch install keeps them and load each one by its full
//! path first; a later open by name then returns the library already loaded. So a machine with
//! PyTorch's CUDA wheels needs nothing more.
//!
//! Searched, in order: the folders in `RESNET_CIFAR_CUDA_LIBS` (colon-separated), `CUDA_HOME`,
//! `CUDA_PATH`, `/usr/local/cuda` (their `lib64` and `lib`), and the `nvidia/*/lib` folders of
//! every Python site-packages folder that `python3` (or `$PYTHON`) reports, and of `$VIRTUAL_ENV`.

use std::path::{Path, PathBuf};

/// The libraries the backend needs, in load order (dependencies first). The first name of
/// each entry is what cudarc opens; the others are loaded from the same folder when present.
const LIBS: &[(&str, &[&str])] = &[
    ("libnvrtc.so.13", &["libnvrtc-builtins.so.13"]),
    ("libcublasLt.so.13", &[]),
    ("libcublas.so.13", &[]),
    // cuDNN 9 opens its parts by bare name, which finds nothing in a PyTorch wheel's folder:
    // load them from cuDNN's folder first (dependencies first; a part that fails is retried
    // after the others).
    (
        "libcudnn.so.9",
        &[
            "libcudnn_graph.so.9",
            "libcudnn_engines_runtime_compiled.so.9",
            "libcudnn_engines_precompiled.so.9",
            "libcudnn_heuristic.so.9",
            "libcudnn_ops.so.9",
            "libcudnn_cnn.so.9",
            "libcudnn_adv.so.9",
        ],
    ),
];

/// Loads the driver and every library above, or says in one line what is missing.
pub fn load() -> Result<(), String> {
    if unsafe { open("libcuda.so.1") }.is_err() {
        return Err("no CUDA driver found (libcuda.so.1 is not on this machine's library path)".into());
    }
    one_driver()?;
    load_libs(LIBS)
}

/// cudarc opens the driver as `libcuda.so` before `libcuda.so.1`. Where that name finds
/// another file than the driver (a CUDA toolkit's stub folder on `LD_LIBRARY_PATH`), every
/// call would fail with CUDA_ERROR_STUB_LIBRARY: say so instead.
fn one_driver() -> Result<(), String> {
    if unsafe { open("libcuda.so") }.is_err() {
        return Ok(());
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut files: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libcuda.so"))
        })
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p)))
        .collect();
    files.sort();
    files.dedup();
    if files.len() > 1 {
        let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(format!(
            "two CUDA drivers are loaded ({}): libcuda.so on the library path is not the driver's \
             libcuda.so.1 (a CUDA toolkit's stubs folder?); take it off LD_LIBRARY_PATH",
            list.join(", ")
        ));
    }
    Ok(())
}

/// NVRTC alone (compiling the kernels needs no GPU).
#[cfg(test)]
pub fn load_nvrtc() -> Result<(), String> {
    load_libs(&LIBS[..1])
}

fn load_libs(libs: &[(&str, &[&str])]) -> Result<(), String> {
    // Searched only when a library is not found by name (the search runs Python).
    let dirs = std::cell::OnceCell::new();
    let mut missing = Vec::new();
    for (name, extras) in libs {
        if unsafe { open(name) }.is_ok() {
            continue;
        }
        match locate(dirs.get_or_init(search_dirs), name) {
            Some(path) => {
                let dir = path.parent().expect("a file found in a folder");
                let paths: Vec<PathBuf> = extras.iter().filter_map(|e| find_prefixed(dir, e)).collect();
                // Twice: a part whose dependency comes later in the list loads the second time.
                for _ in 0..2 {
                    for path in &paths {
                        let _ = unsafe { open_path(path) };
                    }
                }
                unsafe { open_path(&path) }.map_err(|e| format!("{}: {e}", path.display()))?;
            }
            None => missing.push(*name),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "CUDA libraries not found: {} (searched {SEARCHED})",
            missing.join(", ")
        ))
    }
}

/// Opens one library by name, or by full path from the folders searched for the others, and
/// hands it back (NCCL, which the backend binds itself).
pub fn open_library(name: &str) -> Result<libloading::Library, String> {
    if let Ok(lib) = unsafe { libloading::Library::new(name) } {
        return Ok(lib);
    }
    match locate(&search_dirs(), name) {
        Some(path) => unsafe { libloading::Library::new(&path) }.map_err(|e| format!("{}: {e}", path.display())),
        None => Err(format!("{name} not found (searched {SEARCHED})")),
    }
}

/// Where the library searches look, for the messages that say they found nothing.
const SEARCHED: &str =
    "LD_LIBRARY_PATH, RESNET_CIFAR_CUDA_LIBS, CUDA_HOME, /usr/local/cuda and Python's nvidia/*/lib folders";

/// `name` in the first of `dirs` that holds it.
fn locate(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Opens a library by name, keeping it loaded for the life of the process, with its symbols
/// global so that the CUDA libraries' own lookups find each other.
unsafe fn open(name: &str) -> Result<(), libloading::Error> {
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
    let lib = unsafe { libloading::os::unix::Library::open(Some(name), flags) }?;
    std::mem::forget(lib);
    Ok(())
}

unsafe fn open_path(path: &Path) -> Result<(), libloading::Error> {
    unsafe { open(&path.to_string_lossy()) }
}

/// A file in `dir` whose name starts with `prefix` (versioned names such as
/// `libnvrtc-builtins.so.13.0`).
fn find_prefixed(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect();
    hits.sort();
    hits.pop()
}

fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(list) = std::env::var("RESNET_CIFAR_CUDA_LIBS") {
        dirs.extend(std::env::split_paths(&list));
    }
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .chain([PathBuf::from("/usr/local/cuda")]);
    for root in roots {
        dirs.push(root.join("lib64"));
        dirs.push(root.join("lib"));
    }
    for site in python_site_packages() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut libs: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("lib")).collect();
            libs.sort();
            dirs.extend(libs.into_iter().filter(|d| d.is_dir()));
        }
    }
    dirs
}

/// Site-packages folders of the Python on PATH (or `$PYTHON`) and of an active virtualenv.
fn python_site_packages() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV")
        && let Ok(entries) = std::fs::read_dir(Path::new(&venv).join("lib"))
    {
        out.extend(entries.flatten().map(|e| e.path().join("site-packages")));
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script =
        "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))";
    if let Ok(o) = std::process::Command::new(python).args(["-c", script]).output() {
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(PathBuf::from),
        );
    }
    out.dedup();
    out
}
