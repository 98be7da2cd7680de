//! `moerail._native`: PyO3 bindings of moerail-core. This crate only converts and checks
//! arguments, releases the GIL and maps errors; the algorithms live in moerail-core.

use pyo3::prelude::*;

mod a2a;
pub mod aot;
mod ascend;
mod balance;
mod device;
mod permute;
mod router;
mod sim;
pub mod tensor;

/// Sets the size of moerail's thread pool.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    moerail_core::util::pool::set_num_threads(n).map_err(tensor::to_py_err)
}

/// The size of moerail's thread pool.
#[pyfunction]
fn get_num_threads() -> usize {
    moerail_core::util::pool::num_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    router::register(m)?;
    a2a::register(m)?;
    permute::register(m)?;
    balance::register(m)?;
    sim::register(m)?;
    device::register(m)?;
    ascend::register(m)?;
    Ok(())
}
