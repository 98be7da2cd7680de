//! moerail-device: accelerator backends loaded at run time.
//!
//! * [`cuda`]: moerail's CUDA kernels (`csrc/cuda/*.cu`), compiled on first use by NVRTC to a
//!   CUBIN for the device's architecture, cached on disk, and launched through the CUDA driver
//!   on the caller's stream — all through `cudarc` with dynamic loading, so nothing CUDA is
//!   needed to build, and a machine without it gets a clear "not found" instead of a crash.
//!
//! * [`ascend`]: CANN (`libascendcl.so`) and HCCL (`libhccl.so`) function tables loaded with
//!   libloading, and an HCCL executor of the dispatcher's exchange plans.
//!
//! The kernels compile for sm_80 and sm_90 (`tests/nvrtc_compile.rs`) and match the CPU path
//! under the CPU emulator (`tests/test_cuda_kernels.py`); the Ascend tables are checked against
//! a stand-in library (`tests/ascend_standin.rs`).
//!
//! Nothing here allocates or frees framework memory: callers pass device pointers of tensors
//! the framework allocated (outputs and workspaces included) and the raw stream to run on.

pub mod ascend;
pub mod cuda;
pub mod error;
pub mod sys;

pub use error::{DeviceError, Result};
