//! The on-disk kernel cache: one file per (module, target, NVRTC version, source and options
//! hash), in `MOERAIL_CACHE_DIR` or `~/.cache/moerail/kernels`. Written atomically (a temporary
//! file renamed into place), so concurrent processes never read half a file; an unreadable or
//! corrupt entry is compiled again.

use std::path::PathBuf;
use std::sync::Mutex;

use super::kernels;
use super::nvrtc::{self, Target};
use crate::error::Result;

pub fn dir() -> PathBuf {
    if let Ok(d) = std::env::var("MOERAIL_CACHE_DIR") {
        if !d.trim().is_empty() {
            return PathBuf::from(d.trim());
        }
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .ok()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join("moerail").join("kernels")
}

/// The cache file name of a module build.
pub fn file_name(stem: &str, target: Target, version: (i32, i32)) -> String {
    let opts = nvrtc::options(stem, target, version).join(" ");
    let src = kernels::source(stem).unwrap_or("");
    let h = kernels::fnv1a(&[
        src.as_bytes(),
        kernels::HEADER.as_bytes(),
        opts.as_bytes(),
        stem.as_bytes(),
    ]);
    format!(
        "{stem}-{}-nvrtc{}.{}-{h:016x}.{}",
        target.label(),
        version.0,
        version.1,
        target.extension()
    )
}

fn valid(bytes: &[u8], target: Target) -> bool {
    match target {
        Target::Cubin(_) => bytes.len() > 64 && bytes.starts_with(b"\x7fELF"),
        Target::Ptx(_) => {
            bytes.len() > 16 && bytes.ends_with(b"\0") && bytes.windows(8).any(|w| w == b".version")
        }
    }
}

static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Why the cache could not be written the last time (for `moerail doctor`).
pub fn last_error() -> Option<String> {
    LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The module image from the cache, or compiled (and stored). The flag says it was cached.
pub fn get_or_compile(stem: &str, target: Target, version: (i32, i32)) -> Result<(Vec<u8>, bool)> {
    let path = dir().join(file_name(stem, target, version));
    if let Ok(bytes) = std::fs::read(&path) {
        if valid(&bytes, target) {
            return Ok((bytes, true));
        }
    }
    let image = nvrtc::compile(stem, target, version)?;
    if let Err(e) = store(&path, &image) {
        *LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(format!("could not write {}: {e}", path.display()));
    }
    Ok((image, false))
}

fn store(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let d = path.parent().expect("cache files live in a directory");
    std::fs::create_dir_all(d)?;
    let tmp = d.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("kernel"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Cached files and their total size.
pub fn usage() -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    if let Ok(rd) = std::fs::read_dir(dir()) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".cubin") || name.ends_with(".ptx") {
                n += 1;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (n, bytes)
}
