//! One error type for the whole core. Bindings map `InvalidArgument` to `ValueError`
//! (naming the argument), `Unreachable` to `moerail.memory.BudgetUnreachableError` (a
//! `ValueError`) and `Internal` to `RuntimeError`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An argument has the wrong shape or value; `arg` is its public name.
    #[error("{arg}: {msg}")]
    InvalidArgument { arg: String, msg: String },
    /// A valid target that nothing reaches (a memory budget no plan fits, with the host memory
    /// given); `arg` names the limit that decided it. Callers may search on at another target.
    #[error("{arg}: {msg}")]
    Unreachable { arg: String, msg: String },
    /// A broken invariant inside moerail (a bug): never the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Error::InvalidArgument` for argument `arg`.
pub fn invalid(arg: impl Into<String>, msg: impl fmt::Display) -> Error {
    Error::InvalidArgument {
        arg: arg.into(),
        msg: msg.to_string(),
    }
}

/// `Error::Unreachable` for the limit `arg`.
pub fn unreachable(arg: impl Into<String>, msg: impl fmt::Display) -> Error {
    Error::Unreachable {
        arg: arg.into(),
        msg: msg.to_string(),
    }
}

/// Returns `Err(invalid(arg, msg))` unless `cond` holds.
pub fn ensure(cond: bool, arg: &str, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(invalid(arg, msg()))
    }
}

/// `a * b` for sizes, or an error naming `arg` when it overflows.
pub fn checked_mul(a: usize, b: usize, arg: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(arg, format!("size {a} x {b} overflows")))
}

/// `vec![T::default(); n]` for a size that comes from user input: an allocation failure is an
/// error naming `arg` (Rust's `vec!` aborts the process on one).
pub fn try_zeroed<T: Clone + Default>(n: usize, arg: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        invalid(
            arg,
            format!(
                "{n} entries of {} bytes do not fit in memory",
                std::mem::size_of::<T>()
            ),
        )
    })?;
    v.resize(n, T::default());
    Ok(v)
}
