//! moerail's CUDA kernels, loaded at run time.
//!
//! `csrc/cuda/*.cu` (no host code) are embedded in the library, compiled by NVRTC on first use
//! to a CUBIN for the device's architecture (PTX for a GPU newer than the NVRTC), cached on disk
//! ([`cache`]), and launched through the driver on the stream the caller passes — torch's
//! current stream — into memory the caller allocated. No op synchronises the host, so the
//! launches can be captured in a CUDA graph.
//!
//! Numerics match the CPU path (moerail-core) bit for bit where the operations are the same IEEE
//! operations: the sources are compiled with `--fmad=false`, sums run in the CPU's order (lane
//! sums of 8, ascending rows), and `exp` is the CPU's Cephes form. The exceptions: `log1p` and
//! libm's `exp` (sqrtsoftplus scores and gradients) are computed in f64 and rounded once, which
//! can differ from glibc's f32 functions by an ulp; f64 `exp`/`log1p` are CUDA's (<= 1 ulp).

pub mod backend;
pub mod cache;
pub mod kernels;
pub mod locate;
pub mod nvrtc;
pub mod ops;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use backend::{Args, Backend, CudaBackend, EmulatorBackend, LaunchCfg};

use crate::error::{DeviceError, Result};

/// What the launchers need to know about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceProps {
    pub ordinal: i32,
    pub name: String,
    pub cc: (i32, i32),
    pub sm_count: i32,
    pub smem_per_block: i32,
    pub smem_per_block_optin: i32,
    pub total_mem: u64,
}

/// Element types of the float kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
}

impl DType {
    pub fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F64 => "f64",
            Self::BF16 => "bf16",
            Self::F16 => "f16",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Self::F64 => 8,
            Self::F32 => 4,
            Self::BF16 | Self::F16 => 2,
        }
    }
    /// Bytes of the accumulation type (f64 for f64, else f32).
    pub fn acc_size(self) -> usize {
        if self == Self::F64 {
            8
        } else {
            4
        }
    }
}

static CUDA: Mutex<Option<Arc<CudaBackend>>> = Mutex::new(None);
static EMULATOR: Mutex<Option<Arc<EmulatorBackend>>> = Mutex::new(None);

/// The CUDA backend (NVRTC and the driver found), or why not.
pub fn cuda() -> Result<Arc<CudaBackend>> {
    let mut g = CUDA.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = &*g {
        return Ok(b.clone());
    }
    let b = Arc::new(CudaBackend::new()?);
    *g = Some(b.clone());
    Ok(b)
}

/// Routes launches for CPU tensors to the CPU emulator built from the kernel sources (tests
/// only); `None` turns it off.
pub fn set_emulator(path: Option<&Path>) -> Result<()> {
    let b = match path {
        Some(p) => Some(Arc::new(EmulatorBackend::open(p)?)),
        None => None,
    };
    *EMULATOR.lock().unwrap_or_else(|e| e.into_inner()) = b;
    Ok(())
}

pub fn emulator() -> Option<Arc<EmulatorBackend>> {
    EMULATOR.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// One module compiled by [`compile_check`].
#[derive(Clone, Debug)]
pub struct CompileReport {
    pub module: String,
    pub arch: String,
    pub bytes: usize,
    pub seconds: f64,
    pub kernels: usize,
    /// Entry points of kernels.def the image does not define.
    pub missing: Vec<String>,
}

/// Compiles every module for each of `archs` (e.g. 80, 90) with the options used at run time
/// and checks that each image defines all its entry points. Needs NVRTC only (no GPU): this is
/// what CI runs so that a kernel that does not compile fails the build.
pub fn compile_check(archs: &[i32]) -> Result<Vec<CompileReport>> {
    let nv = locate::nvrtc().map_err(DeviceError::Unavailable)?;
    let jobs: Vec<(i32, &'static str)> = archs
        .iter()
        .flat_map(|&a| kernels::SOURCES.iter().map(move |(s, _)| (a, *s)))
        .collect();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<CompileReport>)>> = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&(arch, stem)) = jobs.get(i) else {
                    break;
                };
                let t0 = std::time::Instant::now();
                let target = nvrtc::Target::Cubin(arch);
                let r = nvrtc::compile(stem, target, nv.version).map(|image| {
                    let names: Vec<&str> = kernels::entry_points()
                        .iter()
                        .filter(|(m, _)| *m == stem)
                        .map(|(_, k)| *k)
                        .collect();
                    CompileReport {
                        module: stem.to_string(),
                        arch: target.label(),
                        bytes: image.len(),
                        seconds: t0.elapsed().as_secs_f64(),
                        kernels: names.len(),
                        missing: names
                            .iter()
                            .filter(|k| !nvrtc::image_defines(&image, k))
                            .map(|k| k.to_string())
                            .collect(),
                    }
                });
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, r));
            });
        }
    });
    let mut rs = results.into_inner().unwrap_or_else(|e| e.into_inner());
    rs.sort_by_key(|(i, _)| *i);
    rs.into_iter().map(|(_, r)| r).collect()
}

/// What `moerail doctor` shows about CUDA.
#[derive(Clone, Debug)]
pub struct Status {
    pub nvrtc: std::result::Result<locate::Nvrtc, String>,
    pub driver: std::result::Result<locate::Driver, String>,
    pub cache_dir: PathBuf,
    pub cache_files: usize,
    pub cache_bytes: u64,
    pub cache_error: Option<String>,
    pub emulator: Option<String>,
}

/// Looks for NVRTC and the driver (loading them if present) and reports.
pub fn status() -> Status {
    let (cache_files, cache_bytes) = cache::usage();
    Status {
        nvrtc: locate::nvrtc(),
        driver: locate::driver(),
        cache_dir: cache::dir(),
        cache_files,
        cache_bytes,
        cache_error: cache::last_error(),
        emulator: emulator().map(|e| e.name()),
    }
}
