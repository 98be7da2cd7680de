//! Compiling the kernel sources with NVRTC (through cudarc's NVRTC bindings, which resolve to
//! the library [`super::locate`] loaded).

use std::ffi::{c_char, CString};

use cudarc::nvrtc::sys as nsys;

use super::kernels;
use crate::error::{no_panic, DeviceError, Result};

/// What to compile for: a CUBIN for `sm_<arch>`, or PTX for `compute_<arch>` (for a GPU newer
/// than the NVRTC, which the driver then compiles).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Cubin(i32),
    Ptx(i32),
}

impl Target {
    pub fn arch_option(self) -> String {
        match self {
            Self::Cubin(a) => format!("--gpu-architecture=sm_{a}"),
            Self::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
        }
    }

    pub fn label(self) -> String {
        match self {
            Self::Cubin(a) => format!("sm_{a}"),
            Self::Ptx(a) => format!("compute_{a}"),
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Cubin(_) => "cubin",
            Self::Ptx(_) => "ptx",
        }
    }

    /// The target for a GPU of compute capability `cc` given the architectures NVRTC supports.
    pub fn for_device(cc: (i32, i32), supported: &[i32]) -> Result<Self> {
        let arch = cc.0 * 10 + cc.1;
        if supported.is_empty() || supported.contains(&arch) {
            return Ok(Self::Cubin(arch));
        }
        let newest = *supported.iter().max().unwrap_or(&arch);
        let oldest = *supported.iter().min().unwrap_or(&arch);
        if arch > newest {
            return Ok(Self::Ptx(newest));
        }
        Err(DeviceError::Unavailable(format!(
            "this GPU is sm_{arch}, but the NVRTC found compiles for sm_{oldest}..sm_{newest} \
             (CUDA 13 dropped GPUs older than sm_75: use torch and NVRTC built for CUDA 12)"
        )))
    }
}

/// The options every module is compiled with. `--fmad=false` keeps products and sums separate
/// roundings, as on the CPU (the CPU path never contracts to FMA), so the same bits come out.
pub fn options(stem: &str, target: Target, version: (i32, i32)) -> Vec<String> {
    let mut o = vec![
        target.arch_option(),
        "--std=c++17".to_string(),
        "--fmad=false".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        "--ftz=false".to_string(),
    ];
    // The router's kernels are small next to the data they read but big in code (many score
    // functions x dtypes): -Ofast-compile=min makes them compile ~5x faster. NVRTC 12.8 has the
    // option but only its `max`/`0` levels (it rejects `min`); `min` came with 12.9.
    if stem == "router" && version >= (12, 9) {
        o.push("--Ofast-compile=min".to_string());
    }
    if let Ok(extra) = std::env::var("MOERAIL_NVRTC_OPTIONS") {
        o.extend(extra.split_whitespace().map(str::to_string));
    }
    o
}

/// NVRTC's version through cudarc (the library must have been located first).
pub fn version() -> Result<(i32, i32)> {
    no_panic("NVRTC", || {
        let (mut a, mut b) = (0, 0);
        // SAFETY: plain query.
        let r = unsafe { nsys::nvrtcVersion(&mut a, &mut b) };
        check(r, "nvrtcVersion")?;
        Ok((a, b))
    })
}

fn check(r: nsys::nvrtcResult, what: &str) -> Result<()> {
    if r == nsys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(DeviceError::Backend(format!("{what} failed: {r:?}")))
    }
}

/// Compiles module `stem` for `target`: the CUBIN (or NUL-terminated PTX) image.
pub fn compile(stem: &str, target: Target, version: (i32, i32)) -> Result<Vec<u8>> {
    let src = kernels::source(stem)
        .ok_or_else(|| DeviceError::Backend(format!("no kernel module '{stem}'")))?;
    let opts = options(stem, target, version);
    no_panic("NVRTC", || compile_source(stem, src, &opts, target))
}

fn compile_source(stem: &str, src: &str, opts: &[String], target: Target) -> Result<Vec<u8>> {
    let c = |s: &str| CString::new(s).map_err(|_| DeviceError::Backend("NUL in source".into()));
    let src_c = c(src)?;
    let name_c = c(&format!("{stem}.cu"))?;
    let hdr_c = c(kernels::HEADER)?;
    let hdr_name_c = c(kernels::HEADER_NAME)?;
    let headers = [hdr_c.as_ptr()];
    let names = [hdr_name_c.as_ptr()];
    let mut prog: nsys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all strings outlive the program; one header.
    check(
        unsafe {
            nsys::nvrtcCreateProgram(
                &mut prog,
                src_c.as_ptr(),
                name_c.as_ptr(),
                1,
                headers.as_ptr(),
                names.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    struct Guard(nsys::nvrtcProgram);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: created above, destroyed once.
            unsafe { nsys::nvrtcDestroyProgram(&mut self.0) };
        }
    }
    let guard = Guard(prog);
    let opts_c: Vec<CString> = opts.iter().map(|o| c(o)).collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = opts_c.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: the option strings outlive the call.
    let r = unsafe { nsys::nvrtcCompileProgram(guard.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    if r != nsys::nvrtcResult::NVRTC_SUCCESS {
        return Err(DeviceError::Backend(format!(
            "NVRTC could not compile {stem}.cu for {} ({r:?}):\n{}",
            target.label(),
            log(guard.0)
        )));
    }
    let mut size = 0usize;
    let mut out;
    // SAFETY: sizes come from NVRTC; the buffers have that size.
    unsafe {
        match target {
            Target::Cubin(_) => {
                check(
                    nsys::nvrtcGetCUBINSize(guard.0, &mut size),
                    "nvrtcGetCUBINSize",
                )?;
                out = vec![0u8; size];
                check(
                    nsys::nvrtcGetCUBIN(guard.0, out.as_mut_ptr() as *mut c_char),
                    "nvrtcGetCUBIN",
                )?;
            }
            Target::Ptx(_) => {
                check(nsys::nvrtcGetPTXSize(guard.0, &mut size), "nvrtcGetPTXSize")?;
                out = vec![0u8; size];
                check(
                    nsys::nvrtcGetPTX(guard.0, out.as_mut_ptr() as *mut c_char),
                    "nvrtcGetPTX",
                )?;
            }
        }
    }
    Ok(out)
}

fn log(prog: nsys::nvrtcProgram) -> String {
    let mut n = 0usize;
    // SAFETY: sizes from NVRTC.
    unsafe {
        if nsys::nvrtcGetProgramLogSize(prog, &mut n) != nsys::nvrtcResult::NVRTC_SUCCESS || n == 0
        {
            return String::new();
        }
        let mut buf = vec![0u8; n];
        nsys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char);
        String::from_utf8_lossy(&buf[..n.saturating_sub(1)]).into_owned()
    }
}

/// Whether a compiled image defines the kernel `name`: the CUBIN's string table holds
/// `\0name\0`, a PTX image `.entry name(`.
pub fn image_defines(image: &[u8], name: &str) -> bool {
    let find = |pat: &[u8]| image.windows(pat.len()).any(|w| w == pat);
    let mut elf = vec![0u8];
    elf.extend_from_slice(name.as_bytes());
    elf.push(0);
    find(&elf) || find(format!(".entry {name}(").as_bytes())
}
