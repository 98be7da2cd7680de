//! The one error bridge: moerail-core and moerail-device errors, and panics, become Python
//! exceptions here (and only here).
//!
//! | error | Python |
//! |---|---|
//! | core `Error::InvalidArgument`, device `DeviceError::Invalid` | `ValueError` (`"arg: message"`) |
//! | core `Error::Unreachable` | `moerail.memory.BudgetUnreachableError`, a `ValueError` (`"arg: message"`) |
//! | core `Error::Internal`, device `Unavailable` / `Backend`, a panic | `RuntimeError` |
//! | a wrong dtype or a non-tensor argument (raised in [`crate::args`]) | `TypeError` |
//!
//! The MindSpore AOT entry points ([`crate::aot`]) cannot raise: they keep the same texts as
//! their last error, through [`panic_message`] and the core error's `Display`.

use std::any::Any;

use moerail_core::Error;
use moerail_device::DeviceError;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;

pyo3::create_exception!(
    moerail.memory,
    BudgetUnreachableError,
    PyValueError,
    "No plan reaches the memory budget (with the host memory given): the arguments are valid, the answer is none."
);

/// A core error as a Python exception.
pub fn to_py_err(e: Error) -> PyErr {
    match e {
        Error::InvalidArgument { .. } => PyValueError::new_err(e.to_string()),
        Error::Unreachable { .. } => BudgetUnreachableError::new_err(e.to_string()),
        Error::Internal(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// A device error as a Python exception; `backend` names the backend when it is missing.
fn device_err(e: DeviceError, backend: &str) -> PyErr {
    match e {
        DeviceError::Invalid(_) => PyValueError::new_err(e.to_string()),
        DeviceError::Unavailable(m) => PyRuntimeError::new_err(format!("{backend}: {m}")),
        DeviceError::Backend(m) => PyRuntimeError::new_err(m),
    }
}

/// An error of the CUDA backend.
pub fn cuda_err(e: DeviceError) -> PyErr {
    device_err(e, "moerail CUDA backend")
}

/// An error of the HCCL (Ascend) backend.
pub fn hccl_err(e: DeviceError) -> PyErr {
    device_err(e, "moerail HCCL")
}

/// The message of a caught panic, for an internal error that must not cross into Python or C.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("moerail internal error (please report): {msg}")
}

/// A caught panic as a Python `RuntimeError`.
pub fn panic_err(panic: &(dyn Any + Send)) -> PyErr {
    PyRuntimeError::new_err(panic_message(panic))
}
