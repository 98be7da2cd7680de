//! Bindings of moerail-device's CANN/HCCL side: `ascend_status` for `moerail doctor`, and
//! `HcclComm`, the HCCL executor of exchange plans (counts and displacements in elements).

use moerail_device::ascend::{self, hccl, Comm, DataType};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::args::{check_disjoint, TensorArg};
use crate::error::hccl_err;
use crate::tensor::Tensor;

fn no_panic<R>(what: &str, f: impl FnOnce() -> moerail_device::Result<R>) -> PyResult<R> {
    moerail_device::error::no_panic(what, f).map_err(hccl_err)
}

/// CANN and HCCL as found (or why not); with `probe`, ACL's version and the NPU count.
#[pyfunction]
#[pyo3(signature = (probe=true))]
fn ascend_status(py: Python<'_>, probe: bool) -> PyResult<Bound<'_, PyDict>> {
    let st = py.detach(|| no_panic("CANN status", || Ok(ascend::status(probe))))?;
    let d = PyDict::new(py);
    for (key, found) in [("acl", &st.acl), ("hccl", &st.hccl)] {
        match found {
            Ok(f) => {
                let x = PyDict::new(py);
                x.set_item("path", f.path.display().to_string())?;
                x.set_item("how", &f.how)?;
                x.set_item("preloaded", f.preloaded)?;
                d.set_item(key, x)?;
            }
            Err(e) => d.set_item(format!("{key}_error"), e)?,
        }
    }
    d.set_item("acl_version", st.acl_version)?;
    match st.devices {
        Some(Ok(n)) => d.set_item("npu_devices", n)?,
        Some(Err(e)) => d.set_item("npu_devices_error", e)?,
        None => {}
    }
    Ok(d)
}

fn data_type(t: &Tensor) -> PyResult<DataType> {
    DataType::from_torch(&t.dtype_name).ok_or_else(|| {
        PyTypeError::new_err(format!("{}: HCCL has no data type for {}", t.name, t.dtype_name))
    })
}

/// The send and receive tensors of a collective: same dtype (one HCCL has), not overlapping.
fn send_recv(
    send: &Bound<'_, PyAny>,
    recv: &Bound<'_, PyAny>,
) -> PyResult<(Tensor, Tensor, DataType)> {
    let s = TensorArg::new(send, "send").any_device().read()?;
    let r = TensorArg::new(recv, "recv").any_device().same_dtype(&s).read()?;
    let dt = data_type(&s)?;
    check_disjoint(&[&r], &[&s])?;
    Ok((s, r, dt))
}

/// An HCCL communicator over `n_ranks` ranks (this one is `rank`), from the root's root info.
#[pyclass(module = "moerail._native", name = "HcclComm")]
pub struct HcclComm {
    comm: Option<Comm>,
}

impl HcclComm {
    fn comm(&self) -> PyResult<&Comm> {
        self.comm.as_ref().ok_or_else(|| PyRuntimeError::new_err("HcclComm: already closed"))
    }
}

#[pymethods]
impl HcclComm {
    /// `HcclGetRootInfo`: 4108 bytes to broadcast from the root rank.
    #[staticmethod]
    fn root_info(py: Python<'_>) -> PyResult<Bound<'_, PyBytes>> {
        let b = py.detach(|| no_panic("HCCL", || ascend::hccl()?.root_info()))?;
        Ok(PyBytes::new(py, &b))
    }

    #[new]
    fn new(py: Python<'_>, n_ranks: u32, rank: u32, root_info: &[u8]) -> PyResult<Self> {
        let root = root_info.to_vec();
        let comm =
            py.detach(|| no_panic("HCCL", || ascend::hccl()?.init_comm(n_ranks, rank, &root)))?;
        Ok(Self { comm: Some(comm) })
    }

    #[getter]
    fn n_ranks(&self) -> PyResult<usize> {
        Ok(self.comm()?.n_ranks)
    }

    #[getter]
    fn rank(&self) -> PyResult<usize> {
        Ok(self.comm()?.rank)
    }

    /// `HcclAlltoAllV` from `send` into `recv` (same dtype; any device torch_npu allocates on)
    /// with per-rank counts and displacements in elements, on the raw stream `stream`.
    #[allow(clippy::too_many_arguments)]
    fn alltoallv(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        send_counts: Vec<u64>,
        send_displs: Vec<u64>,
        recv: &Bound<'_, PyAny>,
        recv_counts: Vec<u64>,
        recv_displs: Vec<u64>,
        stream: u64,
    ) -> PyResult<()> {
        let (s, r, dt) = send_recv(send, recv)?;
        let comm = self.comm()?;
        let (sp, se, rp, re) = (s.ptr as u64, s.numel as u64, r.ptr as u64, r.numel as u64);
        py.detach(|| {
            no_panic("HCCL", || {
                let send =
                    hccl::Side { ptr: sp, elems: se, counts: &send_counts, displs: &send_displs };
                let recv =
                    hccl::Side { ptr: rp, elems: re, counts: &recv_counts, displs: &recv_displs };
                // SAFETY: the tensors hold `elems` elements (checked against every count and
                // displacement) and torch keeps them alive until the stream reaches the call.
                unsafe { comm.alltoallv(send, recv, dt, stream) }
            })
        })
    }

    /// `HcclAllGather`: every rank's `send` (its whole size) into `recv` (`n_ranks` times it).
    fn allgather(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        stream: u64,
    ) -> PyResult<()> {
        let (s, r, dt) = send_recv(send, recv)?;
        let comm = self.comm()?;
        let (sp, n, rp, re) = (s.ptr as u64, s.numel as u64, r.ptr as u64, r.numel as u64);
        py.detach(|| {
            // SAFETY: as in alltoallv.
            no_panic("HCCL", || unsafe { comm.allgather(sp, rp, re, n, dt, stream) })
        })
    }

    /// `HcclCommDestroy` now (also done when the object is collected).
    fn close(&mut self) {
        self.comm = None;
    }
}

/// Counts and displacements in elements for rows per peer (`row_elems` elements a row).
#[pyfunction]
fn hccl_counts_from_rows(rows: Vec<u64>, row_elems: u64) -> PyResult<(Vec<u64>, Vec<u64>)> {
    hccl::counts_from_rows(&rows, row_elems).map_err(hccl_err)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ascend_status, m)?)?;
    m.add_function(wrap_pyfunction!(hccl_counts_from_rows, m)?)?;
    m.add_class::<HcclComm>()?;
    Ok(())
}
