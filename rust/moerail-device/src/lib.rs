//! moerail-device: accelerator backends loaded at run time.
//!
//! * [`cuda`]: moerail's CUDA kernels (`csrc/cuda/*.cu`), compiled on first use by NVRTC to a
//!   CUBIN for the device's architecture, cached on disk, and launched through the CUDA driver
//!   on the caller's stream — all through `cudarc` with dynamic loading, so nothing CUDA is
//!   needed to build, and a machine without it gets a clear "not found" instead of a crash.
//!
//! Status: the kernels compile (checked for sm_80 and sm_90 by `tests/nvrtc_compile.rs` in
//! `make test`); nothing in the Python package calls this crate yet, and the CANN/HCCL side is
//! not written (issue 7).
//!
//! Nothing here allocates or frees framework memory: callers pass device pointers of tensors
//! the framework allocated (outputs and workspaces included) and the raw stream to run on.

pub mod cuda;
pub mod error;
pub mod sys;

pub use error::{DeviceError, Result};
