//! CANN (`libascendcl.so`) and HCCL (`libhccl.so`), loaded at run time with exact C prototypes.
//!
//! Nothing Ascend is needed to build. The libraries are found in this order: a copy the process
//! already loaded (torch_npu loads both when imported — that copy is reused, never a second
//! one), `MOERAIL_ASCEND_LIB_DIR`, `$ASCEND_HOME_PATH/lib64`, `$ASCEND_TOOLKIT_HOME/lib64`,
//! `/usr/local/Ascend/ascend-toolkit/latest/lib64`, then the loader path. A missing library or
//! symbol is an [`DeviceError::Unavailable`] naming what was tried.
//!
//! `aclInit` may run once per process: a second call fails with 100002. [`Acl::ensure_initialized`]
//! calls it at most once, not at all when torch_npu had loaded the library first (torch_npu
//! initialised it), and takes 100002 as success.
//!
//! [`hccl`] holds the HCCL table and the executor of the dispatcher's exchange plans: counts and
//! displacements are host `u64` arrays in elements, checked against the buffers before any call.

pub mod hccl;

use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};

use crate::error::{DeviceError, Result};
use crate::sys;

pub use hccl::{Comm, DataType, Hccl};

/// `aclrtMemcpyKind`.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemcpyKind {
    HostToHost = 0,
    HostToDevice = 1,
    DeviceToHost = 2,
    DeviceToDevice = 3,
}

/// `ACL_ERROR_REPEAT_INITIALIZE`: aclInit already ran in this process.
pub const ACL_ERROR_REPEAT_INITIALIZE: i32 = 100002;

/// A library as found: where, how, and whether the process had loaded it before us.
#[derive(Clone, Debug)]
pub struct Found {
    pub path: PathBuf,
    pub how: String,
    pub preloaded: bool,
}

/// The directories searched, in order (the environment is read at each call).
pub fn search_dirs() -> Vec<(PathBuf, String)> {
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("MOERAIL_ASCEND_LIB_DIR") {
        dirs.push((PathBuf::from(d), "MOERAIL_ASCEND_LIB_DIR".to_string()));
    }
    for var in ["ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"] {
        if let Ok(d) = std::env::var(var) {
            dirs.push((Path::new(&d).join("lib64"), format!("${var}/lib64")));
        }
    }
    dirs.push((
        PathBuf::from("/usr/local/Ascend/ascend-toolkit/latest/lib64"),
        "the default CANN install".to_string(),
    ));
    dirs
}

/// Finds `soname` (e.g. `libhccl.so`); `symbol` locates the file of an already loaded copy.
pub fn locate(soname: &str, symbol: &str) -> std::result::Result<Found, String> {
    if let Some(h) = sys::already_loaded(soname) {
        if let Some(p) = sys::symbol(h, symbol).and_then(|a| sys::file_of(a as usize)) {
            return Ok(Found {
                path: p,
                how: "already loaded by this process (torch_npu)".into(),
                preloaded: true,
            });
        }
    }
    let mut tried = Vec::new();
    for (dir, how) in search_dirs() {
        let p = dir.join(soname);
        if p.is_file() {
            return Ok(Found {
                path: p,
                how,
                preloaded: false,
            });
        }
        tried.push(p.display().to_string());
    }
    match sys::load_by_name(soname) {
        Ok(h) => {
            let p = sys::symbol(h, symbol)
                .and_then(|a| sys::file_of(a as usize))
                .unwrap_or_else(|| PathBuf::from(soname));
            Ok(Found {
                path: p,
                how: "the loader path".into(),
                preloaded: false,
            })
        }
        Err(e) => {
            tried.push(format!("{soname} on the loader path ({e})"));
            Err(format!(
                "{soname} not found (CANN is not installed or ASCEND_HOME_PATH is not set); tried: {}",
                tried.join(", ")
            ))
        }
    }
}

/// Copies the function pointer `name` out of `lib` (the library stays loaded with its table).
pub(crate) fn sym<T: Copy>(lib: &libloading::Library, path: &Path, name: &str) -> Result<T> {
    // SAFETY: the caller names the symbol's C prototype as T.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|_| DeviceError::Unavailable(format!("{}: no symbol {name}", path.display())))
}

pub(crate) fn open_lib(path: &Path) -> Result<libloading::Library> {
    // SAFETY: loading a shared library runs its initialisers (CANN's are plain C/C++ statics).
    unsafe { libloading::Library::new(path) }
        .map_err(|e| DeviceError::Unavailable(format!("{}: {e}", path.display())))
}

type FnInit = unsafe extern "C" fn(*const c_char) -> c_int;
type FnI32 = unsafe extern "C" fn(i32) -> c_int;
type FnPtrI32 = unsafe extern "C" fn(*mut i32) -> c_int;
type FnPtrU32 = unsafe extern "C" fn(*mut u32) -> c_int;
type FnStream = unsafe extern "C" fn(*mut c_void) -> c_int;
type FnCreateStream = unsafe extern "C" fn(*mut *mut c_void) -> c_int;
type FnMemcpy = unsafe extern "C" fn(*mut c_void, usize, *const c_void, usize, c_int) -> c_int;
type FnMemcpyAsync =
    unsafe extern "C" fn(*mut c_void, usize, *const c_void, usize, c_int, *mut c_void) -> c_int;
type FnVersion = unsafe extern "C" fn(*mut i32, *mut i32, *mut i32) -> c_int;

/// The `libascendcl.so` table (the calls moerail makes: device, stream, copies, sync).
pub struct Acl {
    _lib: libloading::Library,
    pub path: PathBuf,
    preloaded: bool,
    init: FnInit,
    set_device: FnI32,
    get_device: FnPtrI32,
    device_count: FnPtrU32,
    create_stream: FnCreateStream,
    destroy_stream: FnStream,
    sync_stream: FnStream,
    memcpy: FnMemcpy,
    memcpy_async: FnMemcpyAsync,
    version: Option<FnVersion>,
    init_once: Once,
    init_result: Mutex<Option<Result<()>>>,
}

/// `ACL_ERROR_UNINITIALIZE`: ACL was used before `aclInit`.
pub const ACL_ERROR_UNINITIALIZE: i32 = 100001;

fn acl_check(call: &str, rc: c_int) -> Result<()> {
    match rc {
        0 => Ok(()),
        ACL_ERROR_UNINITIALIZE => Err(DeviceError::Backend(format!(
            "{call} failed: aclError {rc} (ACL_ERROR_UNINITIALIZE: ACL is not initialised; import \
             torch_npu and call torch.npu.init() or touch an NPU tensor first)"
        ))),
        _ => Err(DeviceError::Backend(format!(
            "{call} failed: aclError {rc}"
        ))),
    }
}

impl Acl {
    /// Loads the table from `path`; `preloaded` says torch_npu loaded (and initialised) it.
    pub fn open(path: &Path, preloaded: bool) -> Result<Self> {
        let lib = open_lib(path)?;
        Ok(Self {
            init: sym(&lib, path, "aclInit")?,
            set_device: sym(&lib, path, "aclrtSetDevice")?,
            get_device: sym(&lib, path, "aclrtGetDevice")?,
            device_count: sym(&lib, path, "aclrtGetDeviceCount")?,
            create_stream: sym(&lib, path, "aclrtCreateStream")?,
            destroy_stream: sym(&lib, path, "aclrtDestroyStream")?,
            sync_stream: sym(&lib, path, "aclrtSynchronizeStream")?,
            memcpy: sym(&lib, path, "aclrtMemcpy")?,
            memcpy_async: sym(&lib, path, "aclrtMemcpyAsync")?,
            version: sym(&lib, path, "aclrtGetVersion").ok(),
            _lib: lib,
            path: path.to_path_buf(),
            preloaded,
            init_once: Once::new(),
            init_result: Mutex::new(None),
        })
    }

    /// `aclInit(NULL)` at most once per table, skipped when torch_npu initialised ACL; 100002
    /// (already initialised) counts as success.
    pub fn ensure_initialized(&self) -> Result<()> {
        self.init_once.call_once(|| {
            let r = if self.preloaded {
                Ok(())
            } else {
                // SAFETY: aclInit(NULL): default configuration.
                let rc = unsafe { (self.init)(std::ptr::null()) };
                if rc == ACL_ERROR_REPEAT_INITIALIZE {
                    Ok(())
                } else {
                    acl_check("aclInit", rc)
                }
            };
            *self.init_result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        });
        self.init_result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(Ok(()))
    }

    pub fn set_device(&self, device: i32) -> Result<()> {
        self.ensure_initialized()?;
        // SAFETY: plain value argument.
        acl_check("aclrtSetDevice", unsafe { (self.set_device)(device) })
    }

    pub fn device(&self) -> Result<i32> {
        let mut d = -1;
        // SAFETY: writes one i32.
        acl_check("aclrtGetDevice", unsafe { (self.get_device)(&mut d) })?;
        Ok(d)
    }

    pub fn device_count(&self) -> Result<u32> {
        self.ensure_initialized()?;
        let mut n = 0u32;
        // SAFETY: writes one u32.
        acl_check("aclrtGetDeviceCount", unsafe {
            (self.device_count)(&mut n)
        })?;
        Ok(n)
    }

    /// A new stream (raw `aclrtStream`), destroyed with [`Acl::destroy_stream`].
    pub fn create_stream(&self) -> Result<u64> {
        let mut s: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one pointer.
        acl_check("aclrtCreateStream", unsafe { (self.create_stream)(&mut s) })?;
        Ok(s as u64)
    }

    pub fn destroy_stream(&self, stream: u64) -> Result<()> {
        // SAFETY: a stream from create_stream.
        acl_check("aclrtDestroyStream", unsafe {
            (self.destroy_stream)(stream as *mut c_void)
        })
    }

    pub fn synchronize(&self, stream: u64) -> Result<()> {
        // SAFETY: a stream handle of this process.
        acl_check("aclrtSynchronizeStream", unsafe {
            (self.sync_stream)(stream as *mut c_void)
        })
    }

    /// `aclrtMemcpy` / `aclrtMemcpyAsync` (with `stream`) of `count` bytes.
    ///
    /// # Safety
    /// `dst` has `dst_max` bytes and `src` has `count`, in the memory `kind` names, alive until
    /// the copy completes.
    pub unsafe fn memcpy(
        &self,
        dst: u64,
        dst_max: usize,
        src: u64,
        count: usize,
        kind: MemcpyKind,
        stream: Option<u64>,
    ) -> Result<()> {
        if count > dst_max {
            return Err(crate::error::invalid(
                "count",
                format!("{count} bytes do not fit the destination's {dst_max}"),
            ));
        }
        let (d, s) = (dst as *mut c_void, src as *const c_void);
        match stream {
            // SAFETY: forwarded from the caller.
            None => acl_check("aclrtMemcpy", unsafe {
                (self.memcpy)(d, dst_max, s, count, kind as c_int)
            }),
            Some(st) => acl_check("aclrtMemcpyAsync", unsafe {
                (self.memcpy_async)(d, dst_max, s, count, kind as c_int, st as *mut c_void)
            }),
        }
    }

    /// CANN's runtime version, if the library exports it.
    pub fn version(&self) -> Option<(i32, i32, i32)> {
        let f = self.version?;
        let (mut a, mut b, mut c) = (0, 0, 0);
        // SAFETY: writes three i32.
        (unsafe { f(&mut a, &mut b, &mut c) } == 0).then_some((a, b, c))
    }
}

static ACL: Mutex<Option<Arc<Acl>>> = Mutex::new(None);
static HCCL: Mutex<Option<Arc<Hccl>>> = Mutex::new(None);

/// The process's ACL table (found by [`locate`] once; a failed search runs again next time).
pub fn acl() -> Result<Arc<Acl>> {
    let mut g = ACL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = &*g {
        return Ok(a.clone());
    }
    let f = locate("libascendcl.so", "aclInit").map_err(DeviceError::Unavailable)?;
    let a = Arc::new(Acl::open(&f.path, f.preloaded)?);
    *g = Some(a.clone());
    Ok(a)
}

/// The process's HCCL table.
pub fn hccl() -> Result<Arc<Hccl>> {
    let mut g = HCCL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = &*g {
        return Ok(h.clone());
    }
    let f = locate("libhccl.so", "HcclAlltoAllV").map_err(DeviceError::Unavailable)?;
    let h = Arc::new(Hccl::open(&f.path)?);
    *g = Some(h.clone());
    Ok(h)
}

/// What `moerail doctor` shows about CANN and HCCL.
#[derive(Clone, Debug)]
pub struct Status {
    pub acl: std::result::Result<Found, String>,
    pub hccl: std::result::Result<Found, String>,
    pub acl_version: Option<(i32, i32, i32)>,
    /// NPUs visible (only probed when asked: it initialises ACL).
    pub devices: Option<std::result::Result<u32, String>>,
}

/// Looks for both libraries; with `probe`, loads ACL and counts the NPUs.
pub fn status(probe: bool) -> Status {
    let acl_found = locate("libascendcl.so", "aclInit");
    let hccl_found = locate("libhccl.so", "HcclAlltoAllV");
    let (mut version, mut devices) = (None, None);
    if probe && acl_found.is_ok() {
        match crate::error::no_panic("CANN", acl) {
            Ok(a) => {
                version = a.version();
                devices = Some(a.device_count().map_err(|e| e.to_string()));
            }
            Err(e) => devices = Some(Err(e.to_string())),
        }
    }
    Status {
        acl: acl_found,
        hccl: hccl_found,
        acl_version: version,
        devices,
    }
}
