//! `moerail._native`: PyO3 bindings of moerail-core and moerail-device. This crate only
//! converts and checks arguments, releases the GIL and maps errors; the algorithms live in
//! moerail-core, the kernels in moerail-device.
//!
//! Its modules mirror the core's folders, and so do the Python submodules they register:
//!
//! | Rust module | Python module | core |
//! |---|---|---|
//! | [`ops`] (`router`, `permute`) | `moerail._native.ops` | `moerail_core::ops` |
//! | [`ep`] | `moerail._native.ep` | `moerail_core::ep` |
//! | [`balance`] | `moerail._native.balance` | `moerail_core::balance` |
//! | [`parallel`] | `moerail._native.parallel` | `moerail_core::parallel` |
//! | [`memory`] | `moerail._native.memory` | `moerail_core::memory` |
//! | [`sim`] | `moerail._native.sim` | `moerail_core::sim` |
//! | [`device::cuda`] | `moerail._native.cuda` | `moerail_device::cuda` |
//! | [`device::ascend`] | `moerail._native.ascend` | `moerail_device::ascend` |
//! | (here) | `moerail._native.util` | `moerail_core::util::pool` |
//! | [`aot`] | C symbols `moerail_aot_*` | `moerail_core::ops::permute` |
//!
//! Python calls them by submodule (`_native.ep.a2a_route`): one name, one home.
//!
//! Shared by all: [`error`] (the one error bridge), [`args`] (argument specs), [`tensor`]
//! (the checked view of a torch tensor).

use pyo3::prelude::*;

pub mod aot;
pub mod args;
mod balance;
mod device;
mod ep;
pub mod error;
mod memory;
mod ops;
mod parallel;
mod sim;
pub mod tensor;

/// Sets the size of moerail's thread pool.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    moerail_core::util::pool::set_num_threads(n).map_err(error::to_py_err)
}

/// The size of moerail's thread pool.
#[pyfunction]
fn get_num_threads() -> usize {
    moerail_core::util::pool::num_threads()
}

fn register_util(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    Ok(())
}

type Register = fn(&Bound<'_, PyModule>) -> PyResult<()>;

/// The submodules of `moerail._native`, in the order of the core's folders.
const SUBMODULES: [(&str, Register); 9] = [
    ("util", register_util),
    ("ops", ops::register),
    ("ep", ep::register),
    ("balance", balance::register),
    ("parallel", parallel::register),
    ("memory", memory::register),
    ("sim", sim::register),
    ("cuda", device::cuda::register),
    ("ascend", device::ascend::register),
];

/// Registers `register`'s functions in the submodule `moerail._native.<name>` (also put in
/// `sys.modules`, so `import moerail._native.<name>` works).
fn add_submodule(parent: &Bound<'_, PyModule>, name: &str, register: Register) -> PyResult<()> {
    let py = parent.py();
    let qualified = format!("moerail._native.{name}");
    // Created under its full name, so its functions' __module__ says where they live.
    let sub = PyModule::new(py, &qualified)?;
    register(&sub)?;
    parent.add(name, &sub)?;
    py.import("sys")?.getattr("modules")?.set_item(qualified, &sub)?;
    Ok(())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    for (name, register) in SUBMODULES {
        add_submodule(m, name, register)?;
    }
    Ok(())
}
