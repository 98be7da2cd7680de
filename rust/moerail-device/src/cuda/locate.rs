//! Finding the CUDA libraries at run time, before cudarc looks for them.
//!
//! cudarc (with `dynamic-loading`) opens `libnvrtc` and `libcuda` by *name* through the system
//! loader, and panics if none of its names loads. pip-installed torch keeps NVRTC in
//! `site-packages/nvidia/<cu13|cuda_nvrtc>/lib`, which is not on the loader path. So moerail finds
//! the library first, in this order:
//!
//! 1. `MOERAIL_NVRTC_PATH` (the library file, or a directory holding it);
//! 2. a copy this process has already loaded (torch's, or `cuda.pathfinder`'s);
//! 3. the directories the Python side passes (`cuda.pathfinder`, `site-packages/nvidia/*/lib`,
//!    torch's lib directory), preferring the CUDA major version torch was built with;
//! 4. `CUDA_HOME` / `CUDA_PATH` / `CUDA_ROOT` and `/usr/local/cuda`;
//! 5. the system loader path;
//!
//! and opens it by absolute path with `RTLD_GLOBAL`, so that cudarc's open by soname
//! (`libnvrtc.so.13`) returns this very copy — which is then checked by comparing where cudarc's
//! `nvrtcVersion` lives. Every check happens before any cudarc call, so a missing library is a
//! clear error, never cudarc's panic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::no_panic;
use crate::sys;

/// Where the Python side found candidate directories, and torch's CUDA major version.
#[derive(Clone, Debug, Default)]
pub struct SearchConfig {
    pub dirs: Vec<PathBuf>,
    pub prefer_major: Option<u32>,
}

static CONFIG: Mutex<Option<SearchConfig>> = Mutex::new(None);

/// Sets the directories searched for NVRTC (before the first CUDA call).
pub fn configure(cfg: SearchConfig) {
    *CONFIG.lock().unwrap_or_else(|e| e.into_inner()) = Some(cfg);
    CONFIG_GEN.fetch_add(1, Ordering::SeqCst);
}

pub fn config() -> SearchConfig {
    CONFIG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// NVRTC as found and loaded.
#[derive(Clone, Debug)]
pub struct Nvrtc {
    pub path: PathBuf,
    /// How it was found (for `moerail doctor`).
    pub how: String,
    pub version: (i32, i32),
    /// Architectures it compiles for (e.g. 75, 80, 86, 89, 90, 100, 120).
    pub archs: Vec<i32>,
}

const NVRTC_SONAMES: &[&str] = &[
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so.11.2",
    "libnvrtc.so",
];

/// The version encoded in a file name `libnvrtc.so[.X[.Y[.Z]]]` (None for other files).
fn nvrtc_file_version(name: &str) -> Option<Vec<u32>> {
    let rest = name.strip_prefix("libnvrtc.so")?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let rest = rest.strip_prefix('.')?;
    rest.split('.').map(|p| p.parse().ok()).collect()
}

/// The best NVRTC in `dir`: the preferred major version first, then the newest.
fn scan_dir(dir: &Path, prefer_major: Option<u32>) -> Option<PathBuf> {
    let mut best: Option<(bool, Vec<u32>, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(v) = nvrtc_file_version(name) else {
            continue;
        };
        let preferred = prefer_major.is_some_and(|m| v.first() == Some(&m));
        let key = (preferred, v.clone());
        if best
            .as_ref()
            .is_none_or(|(p, bv, _)| key > (*p, bv.clone()))
        {
            best = Some((preferred, v, entry.path()));
        }
    }
    best.map(|(_, _, p)| p)
}

fn path_of_loaded(handle: usize, symbol: &str) -> Option<PathBuf> {
    sys::symbol(handle, symbol).and_then(|p| sys::file_of(p as usize))
}

/// Finds NVRTC without loading anything new (except by the system loader in the last step).
fn find(cfg: &SearchConfig) -> Result<(PathBuf, String), String> {
    if let Ok(p) = std::env::var("MOERAIL_NVRTC_PATH") {
        if !p.trim().is_empty() {
            let p = PathBuf::from(p.trim());
            if p.is_file() {
                return Ok((p, "MOERAIL_NVRTC_PATH".into()));
            }
            if p.is_dir() {
                if let Some(f) = scan_dir(&p, cfg.prefer_major) {
                    return Ok((f, "MOERAIL_NVRTC_PATH (directory)".into()));
                }
                return Err(format!(
                    "MOERAIL_NVRTC_PATH={}: no libnvrtc.so* in that directory",
                    p.display()
                ));
            }
            return Err(format!(
                "MOERAIL_NVRTC_PATH={}: no such file or directory",
                p.display()
            ));
        }
    }
    let mut looked = Vec::new();
    for name in NVRTC_SONAMES {
        if let Some(h) = sys::already_loaded(name) {
            if let Some(p) = path_of_loaded(h, "nvrtcVersion") {
                return Ok((p, format!("already loaded by this process ({name})")));
            }
        }
    }
    looked.push("libraries already loaded".to_string());
    for d in &cfg.dirs {
        if d.is_file()
            && d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| nvrtc_file_version(n).is_some())
        {
            return Ok((d.clone(), "found by the Python package search".into()));
        }
        if let Some(f) = scan_dir(d, cfg.prefer_major) {
            return Ok((f, format!("found in {}", d.display())));
        }
        looked.push(d.display().to_string());
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Ok(root) = std::env::var(var) {
            for sub in [
                "lib64",
                "lib",
                "targets/x86_64-linux/lib",
                "targets/sbsa-linux/lib",
            ] {
                let d = Path::new(&root).join(sub);
                if let Some(f) = scan_dir(&d, cfg.prefer_major) {
                    return Ok((f, format!("found through {var}")));
                }
            }
            looked.push(format!("${var}={root}"));
        }
    }
    let d = Path::new("/usr/local/cuda/lib64");
    if let Some(f) = scan_dir(d, cfg.prefer_major) {
        return Ok((f, "found in /usr/local/cuda".into()));
    }
    looked.push(d.display().to_string());
    for name in NVRTC_SONAMES {
        if let Ok(h) = sys::load_by_name(name) {
            if let Some(p) = path_of_loaded(h, "nvrtcVersion") {
                return Ok((p, format!("system loader path ({name})")));
            }
        }
    }
    looked.push("the system loader path (LD_LIBRARY_PATH, ldconfig)".into());
    Err(format!(
        "libnvrtc not found (looked in: {}); install torch from the package index (it brings \
         the nvidia NVRTC wheel), `pip install nvidia-cuda-nvrtc`, or set MOERAIL_NVRTC_PATH",
        looked.join(", ")
    ))
}

type VersionFn = unsafe extern "C" fn(*mut i32, *mut i32) -> i32;
type CountFn = unsafe extern "C" fn(*mut i32) -> i32;
type ArchsFn = unsafe extern "C" fn(*mut i32) -> i32;

/// Loads the library found by [`find`] globally and checks that cudarc resolves to it.
fn load(cfg: &SearchConfig) -> Result<Nvrtc, String> {
    let (path, how) = find(cfg)?;
    let handle = sys::preload_global(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let ver = sys::symbol(handle, "nvrtcVersion")
        .ok_or_else(|| format!("{}: no nvrtcVersion symbol (not NVRTC?)", path.display()))?;
    let (mut maj, mut min) = (0i32, 0i32);
    // SAFETY: the NVRTC prototype `nvrtcResult nvrtcVersion(int*, int*)`.
    unsafe { std::mem::transmute::<*mut std::ffi::c_void, VersionFn>(ver)(&mut maj, &mut min) };
    let mut archs = Vec::new();
    if let (Some(c), Some(a)) = (
        sys::symbol(handle, "nvrtcGetNumSupportedArchs"),
        sys::symbol(handle, "nvrtcGetSupportedArchs"),
    ) {
        let mut n = 0i32;
        // SAFETY: NVRTC prototypes; the array has the size NVRTC reported.
        unsafe {
            if std::mem::transmute::<*mut std::ffi::c_void, CountFn>(c)(&mut n) == 0 && n > 0 {
                archs = vec![0i32; n as usize];
                std::mem::transmute::<*mut std::ffi::c_void, ArchsFn>(a)(archs.as_mut_ptr());
            }
        }
    }
    // cudarc opens NVRTC by name: it must land on the copy loaded above.
    let ours = ver as usize;
    let theirs = no_panic("cudarc could not open NVRTC", || {
        // SAFETY: culib() dlopens by the names cudarc knows (panics if none loads: caught).
        let lib = unsafe { cudarc::nvrtc::sys::culib() };
        // SAFETY: reading a symbol address.
        let f = unsafe { lib.get::<VersionFn>(b"nvrtcVersion") }
            .map_err(|e| crate::DeviceError::Backend(e.to_string()))?;
        Ok(*f as usize)
    })
    .map_err(|e| e.to_string())?;
    if theirs != ours {
        let other = sys::file_of(theirs)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "?".into());
        return Err(format!(
            "cudarc opened a different NVRTC ({other}) than the one moerail chose ({}); \
             set MOERAIL_NVRTC_PATH to {other} or remove it from the loader path",
            path.display()
        ));
    }
    Ok(Nvrtc {
        path,
        how,
        version: (maj, min),
        archs,
    })
}

static CONFIG_GEN: AtomicUsize = AtomicUsize::new(0);
static NVRTC: Mutex<Option<(usize, Result<Nvrtc, String>)>> = Mutex::new(None);

/// NVRTC, found and loaded once. A failed search runs again after [`configure`].
pub fn nvrtc() -> Result<Nvrtc, String> {
    let gen = CONFIG_GEN.load(Ordering::SeqCst);
    let mut g = NVRTC.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((seen, r)) = &*g {
        if r.is_ok() || *seen == gen {
            return r.clone();
        }
    }
    let r = load(&config());
    *g = Some((gen, r.clone()));
    r
}

/// The CUDA driver as found.
#[derive(Clone, Debug)]
pub struct Driver {
    pub path: Option<PathBuf>,
    /// e.g. 13000 for 13.0.
    pub version: i32,
    pub devices: Vec<super::DeviceProps>,
}

/// Every driver function moerail's CUDA path reaches through cudarc (its own calls, and those of
/// `CudaContext::new`, `bind_to_thread`, module loading and the drops), by the symbol names
/// cudarc's CUDA 13.0 bindings load. All are in the drivers of CUDA 12.0 and newer (checked
/// against the 535 driver, CUDA 12.2: `tests/nvrtc_compile.rs` reads `MOERAIL_TEST_LIBCUDA`).
pub const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuFuncSetAttribute",
    "cuLaunchKernel",
];

static DRIVER: Mutex<Option<Result<Driver, String>>> = Mutex::new(None);

/// The CUDA driver: present, initialised, with its devices (checked once).
pub fn driver() -> Result<Driver, String> {
    let mut g = DRIVER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = &*g {
        return r.clone();
    }
    let r = load_driver();
    *g = Some(r.clone());
    r
}

fn load_driver() -> Result<Driver, String> {
    use cudarc::driver::{result, sys as dsys};
    // SAFETY: only tries to dlopen the candidate names.
    if !unsafe { dsys::is_culib_present() } {
        return Err(
            "libcuda.so.1 not found: no NVIDIA driver on the loader path (this machine has no \
             usable NVIDIA GPU)"
                .into(),
        );
    }
    // cudarc resolves each driver function at its first call and panics if it is missing:
    // check every one moerail's path calls up front, so an old driver is a clear error.
    // SAFETY: the library is present (checked above); only symbol addresses are read.
    let lib = unsafe { dsys::culib() };
    let missing: Vec<&str> = DRIVER_SYMBOLS
        .iter()
        .copied()
        // SAFETY: reading a symbol's address.
        .filter(|s| unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_err())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the CUDA driver lacks {} (moerail needs a driver of CUDA 12.0 or newer)",
            missing.join(", ")
        ));
    }
    no_panic("CUDA driver", || {
        result::init().map_err(|e| {
            crate::DeviceError::Backend(format!(
                "cuInit failed: {e:?}{}",
                if format!("{e:?}").contains("STUB") {
                    " (the CUDA toolkit's stub libcuda is on the loader path, not a driver)"
                } else if format!("{e:?}").contains("NO_DEVICE") {
                    " (a driver is installed but no GPU is visible; check CUDA_VISIBLE_DEVICES)"
                } else {
                    ""
                }
            ))
        })?;
        let mut version = 0i32;
        // SAFETY: plain driver query after cuInit.
        unsafe { dsys::cuDriverGetVersion(&mut version) };
        // SAFETY: library present (checked above); reading a symbol's address.
        let path = unsafe { dsys::culib().get::<unsafe extern "C" fn()>(b"cuInit") }
            .ok()
            .and_then(|f| sys::file_of(*f as usize));
        let n = result::device::get_count()
            .map_err(|e| crate::DeviceError::Backend(format!("cuDeviceGetCount: {e:?}")))?;
        let mut devices = Vec::new();
        for i in 0..n {
            devices.push(super::DeviceProps::query(i)?);
        }
        Ok(Driver {
            path,
            version,
            devices,
        })
    })
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_versions() {
        assert_eq!(nvrtc_file_version("libnvrtc.so.13"), Some(vec![13]));
        assert_eq!(
            nvrtc_file_version("libnvrtc.so.12.4.127"),
            Some(vec![12, 4, 127])
        );
        assert_eq!(nvrtc_file_version("libnvrtc.so"), Some(vec![]));
        assert_eq!(nvrtc_file_version("libnvrtc-builtins.so.13.2"), None);
        assert_eq!(nvrtc_file_version("libnvrtc.alt.so.13"), None);
    }

    #[test]
    fn scan_prefers_major_then_newest() {
        let d = std::env::temp_dir().join(format!("moerail-scan-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for f in [
            "libnvrtc.so.12",
            "libnvrtc.so.13",
            "libnvrtc-builtins.so.13.2",
        ] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        assert!(scan_dir(&d, None).unwrap().ends_with("libnvrtc.so.13"));
        assert!(scan_dir(&d, Some(12)).unwrap().ends_with("libnvrtc.so.12"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
