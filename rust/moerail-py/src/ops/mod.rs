//! Bindings of `moerail_core::ops`: the router, token dropping, the aux losses
//! ([`router`]) and the permutation ([`permute`]), on CPU tensors.

use pyo3::prelude::*;

pub mod permute;
pub mod router;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    router::register(m)?;
    permute::register(m)
}
