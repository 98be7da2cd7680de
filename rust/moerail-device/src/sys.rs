//! Small helpers over the dynamic loader shared by the CUDA and CANN loaders.

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};

/// A library opened with `RTLD_NOW | RTLD_GLOBAL` and never closed: later `dlopen`s by its
/// soname (cudarc's, or the framework's) find this copy.
pub fn preload_global(path: &Path) -> Result<usize, String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: path contains a NUL byte", path.display()))?;
    // SAFETY: plain dlopen; the handle is leaked on purpose (libraries stay loaded).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return Err(dlerror_string());
    }
    Ok(h as usize)
}

/// The handle of `name` if the process has already loaded it (no loading happens).
pub fn already_loaded(name: &str) -> Option<usize> {
    let c = CString::new(name).ok()?;
    // SAFETY: RTLD_NOLOAD only looks the library up.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    (!h.is_null()).then_some(h as usize)
}

/// Loads `name` through the system search path (LD_LIBRARY_PATH, the loader cache).
pub fn load_by_name(name: &str) -> Result<usize, String> {
    let c = CString::new(name).map_err(|_| "NUL in name".to_string())?;
    // SAFETY: plain dlopen, leaked.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        Err(dlerror_string())
    } else {
        Ok(h as usize)
    }
}

/// `dlsym(handle, name)`.
pub fn symbol(handle: usize, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).ok()?;
    // SAFETY: handle came from dlopen.
    let p = unsafe { libc::dlsym(handle as *mut c_void, c.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// The file the code or data at address `addr` belongs to (only the loader's tables are read).
pub fn file_of(addr: usize) -> Option<PathBuf> {
    // SAFETY: Dl_info is plain data; dladdr only looks the address up in the loader's tables.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader.
    let s = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(s.to_string_lossy().into_owned()))
}

pub fn dlerror_string() -> String {
    // SAFETY: dlerror returns a thread-local string or NULL.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}
