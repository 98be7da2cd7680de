//! Launching kernels: on a GPU through the CUDA driver (cudarc), or — for the tests — on the CPU
//! through the emulator library the tests build from the same sources (tests/cuda_emu).

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys as dsys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::nvrtc::Target;
use super::{cache, kernels, locate, DeviceProps};
use crate::error::{no_panic, DeviceError, Result};

/// A launch shape: 1-D grid and block, dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug)]
pub struct LaunchCfg {
    pub grid: u32,
    pub block: u32,
    pub smem: u32,
}

/// Kernel arguments, each in its own 8-byte slot (little-endian: a 4-byte parameter reads the
/// low half), as `cuLaunchKernel`'s parameter array points at them.
#[derive(Default, Debug)]
pub struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub fn new() -> Self {
        Self {
            slots: Vec::with_capacity(16),
        }
    }
    /// A device pointer (0 = NULL).
    pub fn ptr(&mut self, p: u64) -> &mut Self {
        self.slots.push(p);
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.slots.push(v as u64);
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.slots.push(v as u32 as u64);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.slots.push(v as u64);
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.slots.push(v.to_bits() as u64);
        self
    }
    fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect()
    }
}

/// Something that runs moerail's kernels.
pub trait Backend: Send + Sync {
    fn name(&self) -> String;
    fn props(&self, device: i32) -> Result<DeviceProps>;
    /// Launches `kernel` on `stream` of `device`.
    ///
    /// # Safety
    /// The arguments match the kernel's parameters, and every pointer among them is valid
    /// device memory of the sizes the kernel will touch until the stream reaches the launch.
    unsafe fn launch(
        &self,
        device: i32,
        stream: u64,
        kernel: &str,
        cfg: LaunchCfg,
        args: &mut Args,
    ) -> Result<()>;
}

fn driver_err(what: &str, e: impl std::fmt::Debug) -> DeviceError {
    DeviceError::Backend(format!("{what}: {e:?}"))
}

struct DeviceState {
    ctx: Arc<CudaContext>,
    props: DeviceProps,
    target: Target,
    nvrtc_version: (i32, i32),
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Each function and the dynamic shared memory it has been allowed so far.
    functions: Mutex<HashMap<String, (CudaFunction, u32)>>,
}

/// The CUDA backend: the primary context of each device (the one torch uses), modules compiled
/// per device architecture, launches on the caller's stream.
pub struct CudaBackend {
    devices: Mutex<HashMap<i32, Arc<DeviceState>>>,
}

impl CudaBackend {
    /// The backend once NVRTC and the driver are found (errors say which is missing and why).
    pub fn new() -> Result<Self> {
        locate::driver().map_err(DeviceError::Unavailable)?;
        locate::nvrtc().map_err(DeviceError::Unavailable)?;
        Ok(Self {
            devices: Mutex::new(HashMap::new()),
        })
    }

    fn device(&self, ordinal: i32) -> Result<Arc<DeviceState>> {
        let mut g = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = g.get(&ordinal) {
            return Ok(d.clone());
        }
        let nv = locate::nvrtc().map_err(DeviceError::Unavailable)?;
        let st = no_panic("CUDA driver", || {
            if ordinal < 0 {
                return Err(DeviceError::Backend(format!(
                    "bad device ordinal {ordinal}"
                )));
            }
            let ctx = CudaContext::new(ordinal as usize)
                .map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
            let props = DeviceProps::query(ordinal)?;
            let target = Target::for_device(props.cc, &nv.archs)?;
            Ok(DeviceState {
                ctx,
                props,
                target,
                nvrtc_version: nv.version,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
            })
        })?;
        let st = Arc::new(st);
        g.insert(ordinal, st.clone());
        Ok(st)
    }

    fn function(&self, st: &DeviceState, kernel: &str, smem: u32) -> Result<CudaFunction> {
        let mut fns = st.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((f, allowed)) = fns.get_mut(kernel) {
            if smem > (*allowed).max(49152) {
                set_smem(f, smem)?;
                *allowed = smem;
            }
            return Ok(f.clone());
        }
        let stem = kernels::module_of(kernel)
            .ok_or_else(|| DeviceError::Backend(format!("unknown kernel {kernel}")))?;
        let module = {
            let mut mods = st.modules.lock().unwrap_or_else(|e| e.into_inner());
            match mods.get(stem) {
                Some(m) => m.clone(),
                None => {
                    let (image, _) = cache::get_or_compile(stem, st.target, st.nvrtc_version)?;
                    let ptx = match st.target {
                        Target::Cubin(_) => Ptx::from_binary(image),
                        Target::Ptx(_) => Ptx::from_src(
                            String::from_utf8_lossy(&image)
                                .trim_end_matches('\0')
                                .to_string(),
                        ),
                    };
                    let m = st
                        .ctx
                        .load_module(ptx)
                        .map_err(|e| driver_err(&format!("cuModuleLoadData({stem})"), e))?;
                    mods.insert(stem, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(kernel)
            .map_err(|e| driver_err(&format!("cuModuleGetFunction({kernel})"), e))?;
        let mut allowed = 49152;
        if smem > allowed {
            set_smem(&f, smem)?;
            allowed = smem;
        }
        fns.insert(kernel.to_string(), (f.clone(), allowed));
        Ok(f)
    }
}

fn set_smem(f: &CudaFunction, smem: u32) -> Result<()> {
    // SAFETY: a loaded function; the attribute takes a byte count.
    unsafe {
        dsys::cuFuncSetAttribute(
            f.cu_function(),
            dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
    }
    .result()
    .map_err(|e| driver_err("cuFuncSetAttribute(max dynamic shared memory)", e))
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        "cuda".into()
    }

    fn props(&self, device: i32) -> Result<DeviceProps> {
        Ok(self.device(device)?.props.clone())
    }

    unsafe fn launch(
        &self,
        device: i32,
        stream: u64,
        kernel: &str,
        cfg: LaunchCfg,
        args: &mut Args,
    ) -> Result<()> {
        let st = self.device(device)?;
        no_panic("CUDA launch", || {
            st.ctx
                .bind_to_thread()
                .map_err(|e| driver_err("cuCtxSetCurrent", e))?;
            let f = self.function(&st, kernel, cfg.smem)?;
            let mut params = args.pointers();
            // SAFETY: forwarded from the caller (arguments match, pointers valid).
            unsafe {
                result::launch_kernel(
                    f.cu_function(),
                    (cfg.grid.max(1), 1, 1),
                    (cfg.block, 1, 1),
                    cfg.smem,
                    stream as dsys::CUstream,
                    &mut params,
                )
            }
            .map_err(|e| driver_err(&format!("cuLaunchKernel({kernel})"), e))
        })
    }
}

impl DeviceProps {
    /// Reads a device's properties through the driver (cuInit must have succeeded).
    pub fn query(ordinal: i32) -> Result<Self> {
        use dsys::CUdevice_attribute as A;
        no_panic("CUDA driver", || {
            let dev = result::device::get(ordinal).map_err(|e| driver_err("cuDeviceGet", e))?;
            // SAFETY: a device from cuDeviceGet.
            let attr = |a| {
                unsafe { result::device::get_attribute(dev, a) }
                    .map_err(|e| driver_err("cuDeviceGetAttribute", e))
            };
            Ok(Self {
                ordinal,
                name: result::device::get_name(dev)
                    .map_err(|e| driver_err("cuDeviceGetName", e))?,
                cc: (
                    attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                    attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                ),
                sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
                smem_per_block: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?,
                smem_per_block_optin: attr(
                    A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )?,
                // SAFETY: a device from cuDeviceGet.
                total_mem: unsafe { result::device::total_mem(dev) }
                    .map_err(|e| driver_err("cuDeviceTotalMem", e))?
                    as u64,
            })
        })
    }
}

type EmuLaunch =
    unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, u32, u32, u32, *mut *mut c_void) -> i32;
type EmuError = unsafe extern "C" fn() -> *const c_char;
type EmuCount = unsafe extern "C" fn() -> i32;
type EmuName = unsafe extern "C" fn(i32) -> *const c_char;

/// The kernels compiled for the CPU (tests/cuda_emu): "device" pointers are host pointers, the
/// stream is ignored and every launch completes before it returns.
pub struct EmulatorBackend {
    lib: libloading::Library,
    path: String,
}

impl EmulatorBackend {
    pub fn open(path: &Path) -> Result<Self> {
        // SAFETY: loading a library the tests built; its initialisers are plain C++ statics.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| DeviceError::Unavailable(format!("{}: {e}", path.display())))?;
        let me = Self {
            lib,
            path: path.display().to_string(),
        };
        for (_, k) in kernels::entry_points() {
            if !me.kernel_names()?.iter().any(|n| n == k) {
                return Err(DeviceError::Unavailable(format!(
                    "{}: built from other sources (no kernel {k}); rebuild it",
                    me.path
                )));
            }
        }
        Ok(me)
    }

    pub fn kernel_names(&self) -> Result<Vec<String>> {
        // SAFETY: symbols of the emulator's C API.
        unsafe {
            let count: libloading::Symbol<EmuCount> = self
                .lib
                .get(b"moerail_emu_kernel_count")
                .map_err(|e| DeviceError::Unavailable(e.to_string()))?;
            let name: libloading::Symbol<EmuName> = self
                .lib
                .get(b"moerail_emu_kernel_name")
                .map_err(|e| DeviceError::Unavailable(e.to_string()))?;
            Ok((0..count())
                .map(|i| CStr::from_ptr(name(i)).to_string_lossy().into_owned())
                .collect())
        }
    }
}

impl Backend for EmulatorBackend {
    fn name(&self) -> String {
        format!("cpu-emulator ({})", self.path)
    }

    fn props(&self, _device: i32) -> Result<DeviceProps> {
        Ok(DeviceProps {
            ordinal: -1,
            name: "CPU emulator".into(),
            cc: (9, 0),
            sm_count: 2,
            smem_per_block: 49152,
            smem_per_block_optin: 232448,
            total_mem: 0,
        })
    }

    unsafe fn launch(
        &self,
        _device: i32,
        _stream: u64,
        kernel: &str,
        cfg: LaunchCfg,
        args: &mut Args,
    ) -> Result<()> {
        let name =
            CString::new(kernel).map_err(|_| DeviceError::Backend("bad kernel name".into()))?;
        let mut params = args.pointers();
        // SAFETY: the emulator's C API; arguments forwarded from the caller.
        unsafe {
            let launch: libloading::Symbol<EmuLaunch> = self
                .lib
                .get(b"moerail_emu_launch")
                .map_err(|e| DeviceError::Unavailable(e.to_string()))?;
            let rc = launch(
                name.as_ptr(),
                cfg.grid,
                1,
                1,
                cfg.block,
                1,
                1,
                cfg.smem,
                params.as_mut_ptr(),
            );
            if rc != 0 {
                let err: libloading::Symbol<EmuError> = self
                    .lib
                    .get(b"moerail_emu_last_error")
                    .map_err(|e| DeviceError::Unavailable(e.to_string()))?;
                return Err(DeviceError::Backend(format!(
                    "emulator: {}",
                    CStr::from_ptr(err()).to_string_lossy()
                )));
            }
        }
        Ok(())
    }
}
