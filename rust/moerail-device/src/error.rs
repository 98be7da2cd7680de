//! Errors of the device layer. The bindings map `Invalid` to ValueError (it names the argument,
//! as moerail-core's errors do) and everything else to RuntimeError.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// An argument is wrong (the core's error, naming the argument).
    Invalid(moerail_core::Error),
    /// A library or device is missing; the text says what was looked for and where.
    Unavailable(String),
    /// A call into the CUDA driver, NVRTC, ACL or HCCL failed.
    Backend(String),
}

pub type Result<T> = std::result::Result<T, DeviceError>;

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(e) => write!(f, "{e}"),
            Self::Unavailable(m) | Self::Backend(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for DeviceError {}

impl From<moerail_core::Error> for DeviceError {
    fn from(e: moerail_core::Error) -> Self {
        Self::Invalid(e)
    }
}

/// `DeviceError::Invalid` for argument `arg`.
pub fn invalid(arg: &str, msg: impl fmt::Display) -> DeviceError {
    DeviceError::Invalid(moerail_core::error::invalid(arg, msg))
}

/// Runs `f`, turning a panic (cudarc panics when a library or symbol is missing) into an error.
pub fn no_panic<R>(what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(DeviceError::Backend(format!("{what}: {msg}")))
        }
    }
}
