//! Files that appear whole or not at all: every file the tool writes (checkpoints, run files,
//! the image cache) goes through here.

use std::io::Write;
use std::path::Path;

/// The temporary name [`write_atomic`] writes `name` under in its folder, for process `pid`.
fn temporary(name: &str, pid: u32) -> String {
    format!(".{name}.tmp{pid}")
}

/// Removes from `dir` the temporary files of [`write_atomic`] that a process no longer running
/// left behind (killed between writing and renaming); what it removed.
pub fn remove_stale(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let stale = |name: &str| {
        let pid = name.strip_prefix('.')?.rsplit_once(".tmp")?.1.parse::<u32>().ok()?;
        let alive = pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
        (!alive).then_some(())
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_str().and_then(stale).is_some() && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// Writes `bytes` to `path` atomically: temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let tmp = dir.join(temporary(name, std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
