//! Bindings of moerail-device: the CUDA kernels' launch sequences on tensors torch allocated.
//!
//! Each function checks shapes and dtypes (as the CPU bindings do), finds where to launch — the
//! CUDA backend for CUDA tensors, the test emulator for CPU tensors when one is set — and
//! enqueues the kernels on `stream` (torch's current stream, as an integer handle). Nothing
//! waits for the device, so the calls can be captured in a CUDA graph.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moerail_core::ops::router::ScoreFunction;
use moerail_device::cuda::{self, ops, Backend, DType as DevDType};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::args::{acc_dtype, check_disjoint, dims2, Place, TensorArg};
use crate::error::cuda_err;
use crate::ops::router::{config, PyRouterConfig, RouterBackwardArgs, RouterForwardArgs};
use crate::tensor::{DType, Device, Tensor};

type Arg<'py> = Bound<'py, PyAny>;

/// The device pointer of an optional tensor (0 for none).
fn ptr(t: &Option<Tensor>) -> u64 {
    t.as_ref().map_or(0, |t| t.ptr as u64)
}

fn dev_dtype(t: &Tensor) -> PyResult<DevDType> {
    match t.dtype {
        DType::F32 => Ok(DevDType::F32),
        DType::F64 => Ok(DevDType::F64),
        DType::BF16 => Ok(DevDType::BF16),
        DType::F16 => Ok(DevDType::F16),
        _ => Err(PyTypeError::new_err(format!(
            "{}: expected a floating-point tensor (float32, float64, bfloat16 or float16), got {}",
            t.name, t.dtype_name
        ))),
    }
}

/// Where the launches of one call go.
struct Target {
    backend: Arc<dyn Backend>,
    device: i32,
    stream: u64,
}

impl Target {
    /// All tensors on one CUDA device (or all on the CPU with the emulator set).
    fn of(tensors: &[&Tensor], stream: u64) -> PyResult<Self> {
        let first = tensors.first().ok_or_else(|| PyRuntimeError::new_err("no tensors"))?;
        for t in tensors {
            if t.device != first.device {
                return Err(PyValueError::new_err(format!(
                    "{}: expected a tensor on {:?} (the device of {}), got one on {:?}",
                    t.name, first.device, first.name, t.device
                )));
            }
        }
        match &first.device {
            Device::Cuda(d) => {
                let backend: Arc<dyn Backend> = cuda::cuda().map_err(cuda_err)?;
                Ok(Self {
                    backend,
                    device: *d,
                    stream,
                })
            }
            Device::Cpu => match cuda::emulator() {
                Some(e) => Ok(Self {
                    backend: e,
                    device: -1,
                    stream: 0,
                }),
                None => Err(PyValueError::new_err(format!(
                    "{}: expected a CUDA tensor, got a CPU tensor (the CPU ops live in moerail.ops)",
                    first.name
                ))),
            },
            Device::Other(d) => Err(PyValueError::new_err(format!(
                "{}: expected a CUDA tensor, got one on '{d}'",
                first.name
            ))),
        }
    }

    /// Runs the launch sequence `f` without the GIL; errors and panics become Python errors.
    fn run(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&ops::Stream) -> moerail_device::Result<()> + Send,
    ) -> PyResult<()> {
        let backend = self.backend.clone();
        let (device, stream) = (self.device, self.stream);
        let r = py.detach(move || {
            moerail_device::error::no_panic("moerail CUDA op", || {
                let s = ops::Stream { backend: &*backend, device, stream };
                f(&s)
            })
        });
        r.map_err(cuda_err)
    }
}

/// A tensor argument on any device (only its pointer reaches the kernels).
fn arg<'a, 'py>(obj: &'a Arg<'py>, name: &'static str) -> TensorArg<'a, 'py> {
    TensorArg::new(obj, name).any_device()
}

/// A workspace argument of at least `bytes` bytes.
fn workspace_arg(obj: &Arg<'_>, bytes: usize) -> PyResult<Tensor> {
    arg(obj, "workspace").workspace(bytes).read()
}

/// A device int64 vector argument: indices, counts, chunk sizes.
fn int64_vector<'a, 'py>(obj: &'a Arg<'py>, name: &'static str) -> TensorArg<'a, 'py> {
    arg(obj, name).int64()
}

/// How a vector of one entry per row is described.
const PER_ROW: &str = "of one entry per row";

fn score(name: &str) -> PyResult<ScoreFunction> {
    config(1, false, None, None, None, name).map(|c| c.score_function)
}

#[pyfunction]
#[pyo3(signature = (logits, config, expert_bias, probs_k, indices, tokens_per_expert, dense_probs,
    routing_map, status, stream))]
#[allow(clippy::too_many_arguments)]
fn device_router_forward(
    py: Python<'_>,
    logits: &Arg<'_>,
    config: PyRouterConfig,
    expert_bias: Option<&Arg<'_>>,
    probs_k: &Arg<'_>,
    indices: &Arg<'_>,
    tokens_per_expert: &Arg<'_>,
    dense_probs: Option<&Arg<'_>>,
    routing_map: Option<&Arg<'_>>,
    status: Option<&Arg<'_>>,
    stream: u64,
) -> PyResult<()> {
    let RouterForwardArgs { lg, t_n: t, e_n: e, cfg, bias, pk, ix, tpe, dense } =
        RouterForwardArgs::read(
            Place::AnyDevice,
            logits,
            &config,
            expert_bias,
            (probs_k, indices, tokens_per_expert),
            dense_probs,
            routing_map,
        )?;
    let dt = dev_dtype(&lg)?;
    let (dense, rmap) = dense.map_or((None, None), |(p, m)| (Some(p), Some(m)));
    let st = status_tensor(status)?;
    let mut all = vec![&lg, &pk, &ix, &tpe];
    all.extend(bias.iter().chain(dense.iter()).chain(rmap.iter()));
    if let Some(st) = &st {
        check_disjoint(&[st], &all)?;
    }
    all.extend(st.iter());
    let target = Target::of(&all, stream)?;
    let a = ops::RouterFwd {
        logits: lg.ptr as u64,
        bias: ptr(&bias),
        probs_k: pk.ptr as u64,
        indices: ix.ptr as u64,
        tpe: tpe.ptr as u64,
        dense: ptr(&dense),
        rmap: ptr(&rmap),
        status: ptr(&st),
    };
    // SAFETY: shapes, dtypes and devices checked above; torch keeps the tensors alive until the
    // stream reaches the launches.
    target.run(py, |s| unsafe { ops::router_forward(s, dt, t, e, &cfg, &a) })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn device_router_backward(
    py: Python<'_>,
    grad_probs: &Arg<'_>,
    logits: &Arg<'_>,
    indices: &Arg<'_>,
    config: PyRouterConfig,
    grad_logits: &Arg<'_>,
    stream: u64,
) -> PyResult<()> {
    let RouterBackwardArgs { lg, t_n: t, e_n: e, cfg, g, dense, ix, out } =
        RouterBackwardArgs::read(
            Place::AnyDevice,
            grad_probs,
            logits,
            indices,
            &config,
            grad_logits,
        )?;
    let dt = dev_dtype(&lg)?;
    let target = Target::of(&[&lg, &g, &ix, &out], stream)?;
    let (gp, lp, ip, op) = (g.ptr as u64, lg.ptr as u64, ix.ptr as u64, out.ptr as u64);
    // SAFETY: as in device_router_forward.
    target.run(py, |s| unsafe { ops::router_backward(s, dt, t, e, &cfg, gp, dense, lp, ip, op, 0) })
}

/// The optional `int32 [1]` (zeroed) a kernel ORs its value checks into.
fn status_tensor(status: Option<&Arg<'_>>) -> PyResult<Option<Tensor>> {
    TensorArg::optional(status, "status").any_device().int32().len(1).read_opt()
}

#[pyfunction]
#[pyo3(signature = (logits, topk, score_function, scores, routing_map, tokens_per_expert, status,
    stream))]
#[allow(clippy::too_many_arguments)]
fn device_aux_scores_forward(
    py: Python<'_>,
    logits: &Arg<'_>,
    topk: usize,
    score_function: &str,
    scores: &Arg<'_>,
    routing_map: &Arg<'_>,
    tokens_per_expert: &Arg<'_>,
    status: Option<&Arg<'_>>,
    stream: u64,
) -> PyResult<()> {
    let lg = arg(logits, "logits").ndim(2, "[num_tokens, num_experts]").read()?;
    let dt = dev_dtype(&lg)?;
    let (t, e) = dims2(&lg);
    let f = score(score_function)?;
    let st = status_tensor(status)?;
    let sc = arg(scores, "scores").acc_of(&lg).shape(&[t, e]).read()?;
    let m = arg(routing_map, "routing_map").bool().shape(&[t, e]).read()?;
    let tpe = int64_vector(tokens_per_expert, "tokens_per_expert").len(e).read()?;
    let mut outs = vec![&sc, &m, &tpe];
    outs.extend(st.iter());
    check_disjoint(&outs, &[&lg])?;
    outs.push(&lg);
    let target = Target::of(&outs, stream)?;
    let (lp, sp, mp, tp, stp) =
        (lg.ptr as u64, sc.ptr as u64, m.ptr as u64, tpe.ptr as u64, ptr(&st));
    // SAFETY: as in device_router_forward.
    target
        .run(py, |s| unsafe { ops::aux_scores_forward(s, dt, t, e, topk, f, lp, sp, mp, tp, stp) })
}

#[pyfunction]
fn device_aux_scores_backward(
    py: Python<'_>,
    grad_scores: &Arg<'_>,
    logits: &Arg<'_>,
    score_function: &str,
    grad_logits: &Arg<'_>,
    stream: u64,
) -> PyResult<()> {
    let lg = arg(logits, "logits").ndim(2, "[num_tokens, num_experts]").read()?;
    let dt = dev_dtype(&lg)?;
    let (t, e) = dims2(&lg);
    let f = score(score_function)?;
    let g = arg(grad_scores, "grad_scores").acc_of(&lg).shape(&[t, e]).read()?;
    let out = arg(grad_logits, "grad_logits").same_dtype(&lg).shape(&[t, e]).read()?;
    check_disjoint(&[&out], &[&lg, &g])?;
    let target = Target::of(&[&lg, &g, &out], stream)?;
    let (gp, lp, op) = (g.ptr as u64, lg.ptr as u64, out.ptr as u64);
    // SAFETY: as in device_router_forward.
    target.run(py, |s| unsafe { ops::aux_scores_backward(s, dt, t, e, f, gp, lp, op) })
}

/// A routing map `bool [t, e]` or top-k indices `int64 [t, k]`: (assignment, t, probs shape).
fn assignment(a: &Tensor, num_experts: usize) -> PyResult<(ops::Assign, usize, Vec<usize>)> {
    a.expect_ndim(2, "(routing_map [num_tokens, num_experts] or indices [num_tokens, topk])")?;
    let t = a.shape[0];
    match a.dtype {
        DType::Bool => {
            a.expect_shape(&[t, num_experts])?;
            Ok((ops::Assign::Map { map: a.ptr as u64 }, t, vec![t, num_experts]))
        }
        DType::I64 => {
            Ok((ops::Assign::Indices { idx: a.ptr as u64, k: a.shape[1] }, t, a.shape.clone()))
        }
        _ => Err(PyTypeError::new_err(format!(
            "{}: expected a bool routing_map or int64 indices, got {}",
            a.name, a.dtype_name
        ))),
    }
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn device_layout_count(
    py: Python<'_>,
    routing: &Arg<'_>,
    num_experts: usize,
    align_size: usize,
    workspace: &Arg<'_>,
    row_counts: &Arg<'_>,
    meta: &Arg<'_>,
    status: &Arg<'_>,
    stream: u64,
) -> PyResult<()> {
    let r = arg(routing, "routing_map").read()?;
    let (assign, t, _) = assignment(&r, num_experts)?;
    let e = num_experts;
    let ws = workspace_arg(workspace, ops::layout_workspace_bytes(t, e))?;
    let rc = int64_vector(row_counts, "row_counts").len(e).read()?;
    let m = arg(meta, "meta").int64().read()?;
    if m.numel < 1 {
        return Err(PyValueError::new_err("meta: expected at least 1 element"));
    }
    let st = arg(status, "status").int32().len(1).read()?;
    check_disjoint(&[&ws, &rc, &m, &st], &[&r])?;
    let target = Target::of(&[&r, &ws, &rc, &m, &st], stream)?;
    let (wp, rp, mp, sp) = (ws.ptr as u64, rc.ptr as u64, m.ptr as u64, st.ptr as u64);
    // SAFETY: as in device_router_forward; the workspace has the bytes the layout needs.
    target.run(py, |s| unsafe { ops::layout_count(s, assign, t, e, align_size, wp, rp, mp, sp) })
}

#[pyfunction]
#[pyo3(signature = (routing, num_experts, workspace, probs, sorted_indices, permuted_probs, stream))]
#[allow(clippy::too_many_arguments)]
fn device_layout_fill(
    py: Python<'_>,
    routing: &Arg<'_>,
    num_experts: usize,
    workspace: &Arg<'_>,
    probs: Option<&Arg<'_>>,
    sorted_indices: &Arg<'_>,
    permuted_probs: Option<&Arg<'_>>,
    stream: u64,
) -> PyResult<()> {
    let r = arg(routing, "routing_map").read()?;
    let (assign, t, probs_shape) = assignment(&r, num_experts)?;
    let e = num_experts;
    let ws = workspace_arg(workspace, ops::layout_workspace_bytes(t, e))?;
    let si = int64_vector(sorted_indices, "sorted_indices").ndim(1, PER_ROW).read()?;
    let n_rows = si.shape[0];
    let p = TensorArg::optional(probs, "probs").any_device().read_opt()?;
    let pp = TensorArg::optional(permuted_probs, "permuted_probs").any_device().read_opt()?;
    if p.is_some() != pp.is_some() {
        return Err(PyValueError::new_err("probs and permuted_probs go together"));
    }
    let mut pbytes = 0;
    if let (Some(p), Some(pp)) = (&p, &pp) {
        p.expect_shape(&probs_shape)?;
        pp.expect_same_dtype(p)?;
        pp.expect_shape(&[n_rows])?;
        pbytes = p.dtype.size();
    }
    let mut outs = vec![&si];
    outs.extend(pp.iter());
    let mut ins = vec![&r, &ws];
    ins.extend(p.iter());
    check_disjoint(&outs, &ins)?;
    let all: Vec<&Tensor> = outs.iter().chain(ins.iter()).copied().collect();
    let target = Target::of(&all, stream)?;
    let (wp, pr, sp, ppp) = (ws.ptr as u64, ptr(&p), si.ptr as u64, ptr(&pp));
    // SAFETY: as in device_layout_count; n_rows is the row count the count phase produced.
    target
        .run(py, |s| unsafe { ops::layout_fill(s, assign, t, e, wp, pr, pbytes, n_rows, sp, ppp) })
}

#[pyfunction]
#[pyo3(signature = (routing_map, capacity, probs, sorted_indices, permuted_probs, stream))]
fn device_layout_drop_and_pad(
    py: Python<'_>,
    routing_map: &Arg<'_>,
    capacity: usize,
    probs: Option<&Arg<'_>>,
    sorted_indices: &Arg<'_>,
    permuted_probs: Option<&Arg<'_>>,
    stream: u64,
) -> PyResult<()> {
    let m = arg(routing_map, "routing_map").ndim(2, "[num_tokens, num_experts]").bool().read()?;
    let (t, e) = dims2(&m);
    let rows = capacity
        .checked_mul(e)
        .ok_or_else(|| PyValueError::new_err("num_out_tokens: capacity * num_experts overflows"))?;
    let si = int64_vector(sorted_indices, "sorted_indices").len(rows).read()?;
    let p = TensorArg::optional(probs, "probs").any_device().read_opt()?;
    let pp = TensorArg::optional(permuted_probs, "permuted_probs").any_device().read_opt()?;
    if p.is_some() != pp.is_some() {
        return Err(PyValueError::new_err("probs and permuted_probs go together"));
    }
    let mut pbytes = 0;
    if let (Some(p), Some(pp)) = (&p, &pp) {
        p.expect_shape(&[t, e])?;
        pp.expect_same_dtype(p)?;
        pp.expect_shape(&[rows])?;
        pbytes = p.dtype.size();
    }
    let mut outs = vec![&si];
    outs.extend(pp.iter());
    let mut ins = vec![&m];
    ins.extend(p.iter());
    check_disjoint(&outs, &ins)?;
    let all: Vec<&Tensor> = outs.iter().chain(ins.iter()).copied().collect();
    let target = Target::of(&all, stream)?;
    let (mp, pr, sp, ppp) = (m.ptr as u64, ptr(&p), si.ptr as u64, ptr(&pp));
    // SAFETY: as in device_router_forward.
    target.run(py, |s| unsafe {
        ops::layout_drop_and_pad(s, mp, t, e, capacity, pr, pbytes, sp, ppp)
    })
}

/// Row bytes of a 2-D tensor.
fn row_bytes(t: &Tensor) -> PyResult<usize> {
    t.expect_ndim(2, "[rows, hidden]")?;
    Ok(t.shape[1] * t.dtype.size())
}

#[pyfunction]
fn device_gather_rows(
    py: Python<'_>,
    src: &Arg<'_>,
    sorted_indices: &Arg<'_>,
    out: &Arg<'_>,
    stream: u64,
) -> PyResult<()> {
    let x = arg(src, "tokens").read()?;
    let rb = row_bytes(&x)?;
    let si = int64_vector(sorted_indices, "sorted_indices").ndim(1, PER_ROW).read()?;
    let o = arg(out, "out").same_dtype(&x).shape(&[si.shape[0], x.shape[1]]).read()?;
    check_disjoint(&[&o], &[&x, &si])?;
    let target = Target::of(&[&x, &si, &o], stream)?;
    let (xp, n_src, sp, n, op) =
        (x.ptr as u64, x.shape[0], si.ptr as u64, si.shape[0], o.ptr as u64);
    // SAFETY: as in device_router_forward; the kernel bounds-checks indices against n_src.
    target.run(py, |s| unsafe { ops::gather_rows(s, xp, n_src, rb, sp, n, op) })
}

/// Row weights: `[n_rows]` in the accumulation dtype of `x`.
fn weights(w: Option<&Arg<'_>>, x: &Tensor, n_rows: usize) -> PyResult<Option<Tensor>> {
    let w = TensorArg::optional(w, "row_weights").any_device().acc_of(x).len(n_rows).read_opt()?;
    Ok(w)
}

#[pyfunction]
#[pyo3(signature = (permuted_tokens, sorted_indices, row_weights, out, workspace, stream))]
fn device_unpermute(
    py: Python<'_>,
    permuted_tokens: &Arg<'_>,
    sorted_indices: &Arg<'_>,
    row_weights: Option<&Arg<'_>>,
    out: &Arg<'_>,
    workspace: &Arg<'_>,
    stream: u64,
) -> PyResult<()> {
    let x = arg(permuted_tokens, "permuted_tokens").ndim(2, "[num_rows, hidden]").read()?;
    let dt = dev_dtype(&x)?;
    let (n_rows, h) = dims2(&x);
    let si = int64_vector(sorted_indices, "sorted_indices").len(n_rows).read()?;
    let w = weights(row_weights, &x, n_rows)?;
    let o = arg(out, "out").same_dtype(&x).ndim(2, "[num_tokens, hidden]").read()?;
    let t = o.shape[0];
    o.expect_shape(&[t, h])?;
    let ws = workspace_arg(workspace, ops::unpermute_workspace_bytes(t, n_rows))?;
    let mut ins = vec![&x, &si];
    ins.extend(w.iter());
    check_disjoint(&[&o, &ws], &ins)?;
    let mut all = ins.clone();
    all.extend([&o, &ws]);
    let target = Target::of(&all, stream)?;
    let (xp, sp, wp, op, wsp) = (x.ptr as u64, si.ptr as u64, ptr(&w), o.ptr as u64, ws.ptr as u64);
    // SAFETY: as in device_router_forward; the kernels skip indices outside [0, t).
    target.run(py, |s| unsafe { ops::unpermute(s, dt, xp, h, sp, n_rows, wp, t, op, wsp) })
}

#[pyfunction]
#[pyo3(signature = (grad_out, permuted_tokens, sorted_indices, row_weights, grad_x, grad_w, stream))]
#[allow(clippy::too_many_arguments)]
fn device_unpermute_backward(
    py: Python<'_>,
    grad_out: &Arg<'_>,
    permuted_tokens: Option<&Arg<'_>>,
    sorted_indices: &Arg<'_>,
    row_weights: Option<&Arg<'_>>,
    grad_x: &Arg<'_>,
    grad_w: Option<&Arg<'_>>,
    stream: u64,
) -> PyResult<()> {
    let g = arg(grad_out, "grad_out").ndim(2, "[num_tokens, hidden]").read()?;
    let dt = dev_dtype(&g)?;
    let (t, h) = dims2(&g);
    let si = int64_vector(sorted_indices, "sorted_indices").ndim(1, PER_ROW).read()?;
    let n_rows = si.shape[0];
    let x = TensorArg::optional(permuted_tokens, "permuted_tokens")
        .any_device()
        .same_dtype(&g)
        .shape(&[n_rows, h])
        .read_opt()?;
    let w = weights(row_weights, &g, n_rows)?;
    let gx = arg(grad_x, "grad_x").same_dtype(&g).shape(&[n_rows, h]).read()?;
    let gw = TensorArg::optional(grad_w, "grad_w").any_device().read_opt()?;
    if x.is_some() != gw.is_some() {
        return Err(PyValueError::new_err("permuted_tokens and grad_w go together"));
    }
    if let Some(gw) = &gw {
        gw.expect_dtype(&[acc_dtype(&g)], "the accumulation dtype")?;
        gw.expect_shape(&[n_rows])?;
    }
    let mut ins = vec![&g, &si];
    ins.extend(x.iter().chain(w.iter()));
    let mut outs = vec![&gx];
    outs.extend(gw.iter());
    check_disjoint(&outs, &ins)?;
    let all: Vec<&Tensor> = outs.iter().chain(ins.iter()).copied().collect();
    let target = Target::of(&all, stream)?;
    let (gp, xp, sp, wp, gxp, gwp) =
        (g.ptr as u64, ptr(&x), si.ptr as u64, ptr(&w), gx.ptr as u64, ptr(&gw));
    // SAFETY: as in device_router_forward.
    target.run(py, |s| unsafe {
        ops::unpermute_backward(s, dt, gp, t, xp, h, sp, n_rows, wp, gxp, gwp)
    })
}

#[pyfunction]
fn device_row_weights(
    py: Python<'_>,
    probs: &Arg<'_>,
    sorted_indices: &Arg<'_>,
    row_counts: &Arg<'_>,
    out: &Arg<'_>,
    workspace: &Arg<'_>,
    stream: u64,
) -> PyResult<()> {
    let p = arg(probs, "probs").ndim(2, "[num_tokens, num_experts]").read()?;
    let pdt = dev_dtype(&p)?;
    let (t, e) = dims2(&p);
    let si = int64_vector(sorted_indices, "sorted_indices").ndim(1, PER_ROW).read()?;
    let n_rows = si.shape[0];
    let rc = int64_vector(row_counts, "row_counts").len(e).read()?;
    let w = arg(out, "out").read()?;
    let wdt = dev_dtype(&w)?;
    w.expect_shape(&[n_rows])?;
    let ws = workspace_arg(workspace, ops::offsets_workspace_bytes(e))?;
    check_disjoint(&[&w, &ws], &[&p, &si, &rc])?;
    let target = Target::of(&[&p, &si, &rc, &w, &ws], stream)?;
    let (pp, sp, rp, wp, wsp) =
        (p.ptr as u64, si.ptr as u64, rc.ptr as u64, w.ptr as u64, ws.ptr as u64);
    // SAFETY: as in device_router_forward.
    target.run(py, |s| unsafe { ops::row_weights(s, pdt, pp, t, e, sp, n_rows, rp, wdt, wp, wsp) })
}

#[pyfunction]
fn device_scatter_rows(
    py: Python<'_>,
    values: &Arg<'_>,
    sorted_indices: &Arg<'_>,
    row_counts: &Arg<'_>,
    out: &Arg<'_>,
    workspace: &Arg<'_>,
    stream: u64,
) -> PyResult<()> {
    let v = arg(values, "values").ndim(1, "[num_rows]").read()?;
    let n_rows = v.shape[0];
    let si = int64_vector(sorted_indices, "sorted_indices").len(n_rows).read()?;
    let o = arg(out, "out").same_dtype(&v).ndim(2, "[num_tokens, num_experts]").read()?;
    let (t, e) = dims2(&o);
    let rc = int64_vector(row_counts, "row_counts").len(e).read()?;
    let ws = workspace_arg(workspace, ops::offsets_workspace_bytes(e))?;
    check_disjoint(&[&o, &ws], &[&v, &si, &rc])?;
    let target = Target::of(&[&v, &si, &rc, &o, &ws], stream)?;
    let vb = v.dtype.size();
    let (vp, sp, rp, op, wsp) =
        (v.ptr as u64, si.ptr as u64, rc.ptr as u64, o.ptr as u64, ws.ptr as u64);
    // SAFETY: as in device_router_forward.
    target.run(py, |s| unsafe { ops::scatter_rows(s, vp, vb, sp, n_rows, rp, t, e, op, wsp) })
}

#[pyfunction]
fn device_sort_chunks(
    py: Python<'_>,
    input: &Arg<'_>,
    split_sizes: &Arg<'_>,
    sorted_idxs: &Arg<'_>,
    out: &Arg<'_>,
    workspace: &Arg<'_>,
    stream: u64,
) -> PyResult<()> {
    let x = arg(input, "input").read()?;
    if x.shape.is_empty() {
        return Err(PyValueError::new_err("input: expected at least one dimension"));
    }
    let n_rows = x.shape[0];
    let rb = x.shape[1..].iter().product::<usize>() * x.dtype.size();
    let ss = int64_vector(split_sizes, "split_sizes").ndim(1, PER_ROW).read()?;
    let n_chunks = ss.shape[0];
    let ix = int64_vector(sorted_idxs, "sorted_idxs").len(n_chunks).read()?;
    let o = arg(out, "out").same_dtype(&x).shape(&x.shape).read()?;
    let ws = workspace_arg(workspace, ops::sort_chunks_workspace_bytes(n_chunks))?;
    check_disjoint(&[&o, &ws], &[&x, &ss, &ix])?;
    let target = Target::of(&[&x, &ss, &ix, &o, &ws], stream)?;
    let (xp, sp, ip, op, wsp) =
        (x.ptr as u64, ss.ptr as u64, ix.ptr as u64, o.ptr as u64, ws.ptr as u64);
    // SAFETY: as in device_router_forward; the caller checked on the host that split_sizes sum
    // to the rows and sorted_idxs is a permutation.
    target.run(py, |s| unsafe { ops::sort_chunks(s, xp, n_rows, rb, sp, ip, n_chunks, op, wsp) })
}

/// Bytes of the workspace an op needs: `layout` (t, e), `unpermute` (t, rows), `offsets` (e),
/// `sort_chunks` (chunks).
#[pyfunction]
#[pyo3(signature = (kind, a, b=0))]
fn device_workspace_bytes(kind: &str, a: usize, b: usize) -> PyResult<usize> {
    match kind {
        "layout" => Ok(ops::layout_workspace_bytes(a, b)),
        "unpermute" => Ok(ops::unpermute_workspace_bytes(a, b)),
        "offsets" => Ok(ops::offsets_workspace_bytes(a)),
        "sort_chunks" => Ok(ops::sort_chunks_workspace_bytes(a)),
        _ => Err(PyValueError::new_err(format!(
            "kind: expected 'layout', 'unpermute', 'offsets' or 'sort_chunks', got {kind:?}"
        ))),
    }
}

/// Sets the directories searched for NVRTC and torch's CUDA major version (before first use).
#[pyfunction]
#[pyo3(signature = (dirs, prefer_major=None))]
fn device_configure(dirs: Vec<PathBuf>, prefer_major: Option<u32>) {
    cuda::locate::configure(cuda::locate::SearchConfig { dirs, prefer_major });
}

/// Routes launches on CPU tensors to the CPU emulator library at `path` (tests); None: off.
#[pyfunction]
#[pyo3(signature = (path))]
fn device_set_emulator(path: Option<PathBuf>) -> PyResult<()> {
    cuda::set_emulator(path.as_deref().map(Path::new)).map_err(cuda_err)
}

/// What `moerail doctor` shows about CUDA: a dict (found or the reason why not, per part).
/// `probe_nvrtc=False` skips loading NVRTC (a large library) when only the driver matters.
#[pyfunction]
#[pyo3(signature = (probe_driver=true, probe_nvrtc=true))]
fn device_status(
    py: Python<'_>,
    probe_driver: bool,
    probe_nvrtc: bool,
) -> PyResult<Bound<'_, PyDict>> {
    let st = py.detach(|| {
        moerail_device::error::no_panic("CUDA status", || {
            Ok((
                probe_nvrtc.then(cuda::locate::nvrtc),
                probe_driver.then(cuda::locate::driver),
                cuda::cache::dir(),
                cuda::cache::usage(),
                cuda::cache::last_error(),
                cuda::emulator().map(|e| e.name()),
            ))
        })
    });
    let (nvrtc, driver, cache_dir, (files, bytes), cache_err, emu) = st.map_err(cuda_err)?;
    let d = PyDict::new(py);
    match nvrtc {
        None => {}
        Some(Ok(n)) => {
            let nv = PyDict::new(py);
            nv.set_item("path", n.path.display().to_string())?;
            nv.set_item("how", n.how)?;
            nv.set_item("version", (n.version.0, n.version.1))?;
            nv.set_item("archs", n.archs)?;
            d.set_item("nvrtc", nv)?;
        }
        Some(Err(e)) => d.set_item("nvrtc_error", e)?,
    }
    match driver {
        Some(Ok(drv)) => {
            let dv = PyDict::new(py);
            dv.set_item("path", drv.path.map(|p| p.display().to_string()))?;
            dv.set_item("version", drv.version)?;
            let devs = PyList::empty(py);
            for p in drv.devices {
                let x = PyDict::new(py);
                x.set_item("ordinal", p.ordinal)?;
                x.set_item("name", p.name)?;
                x.set_item("cc", (p.cc.0, p.cc.1))?;
                x.set_item("sm_count", p.sm_count)?;
                x.set_item("total_mem", p.total_mem)?;
                devs.append(x)?;
            }
            dv.set_item("devices", devs)?;
            d.set_item("driver", dv)?;
        }
        Some(Err(e)) => d.set_item("driver_error", e)?,
        None => {}
    }
    d.set_item("cache_dir", cache_dir.display().to_string())?;
    d.set_item("cache_files", files)?;
    d.set_item("cache_bytes", bytes)?;
    d.set_item("cache_error", cache_err)?;
    d.set_item("emulator", emu)?;
    Ok(d)
}

/// Compiles every kernel module with NVRTC for each architecture (no GPU needed): a list of
/// dicts (module, arch, bytes, seconds, kernels, missing).
#[pyfunction]
fn device_compile_check(py: Python<'_>, archs: Vec<i32>) -> PyResult<Bound<'_, PyList>> {
    let reports = py
        .detach(|| moerail_device::error::no_panic("NVRTC", || cuda::compile_check(&archs)))
        .map_err(cuda_err)?;
    let out = PyList::empty(py);
    for r in reports {
        let x = PyDict::new(py);
        x.set_item("module", r.module)?;
        x.set_item("arch", r.arch)?;
        x.set_item("bytes", r.bytes)?;
        x.set_item("seconds", r.seconds)?;
        x.set_item("kernels", r.kernels)?;
        x.set_item("missing", r.missing)?;
        out.append(x)?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(device_router_forward, m)?)?;
    m.add_function(wrap_pyfunction!(device_router_backward, m)?)?;
    m.add_function(wrap_pyfunction!(device_aux_scores_forward, m)?)?;
    m.add_function(wrap_pyfunction!(device_aux_scores_backward, m)?)?;
    m.add_function(wrap_pyfunction!(device_layout_count, m)?)?;
    m.add_function(wrap_pyfunction!(device_layout_fill, m)?)?;
    m.add_function(wrap_pyfunction!(device_layout_drop_and_pad, m)?)?;
    m.add_function(wrap_pyfunction!(device_gather_rows, m)?)?;
    m.add_function(wrap_pyfunction!(device_unpermute, m)?)?;
    m.add_function(wrap_pyfunction!(device_unpermute_backward, m)?)?;
    m.add_function(wrap_pyfunction!(device_row_weights, m)?)?;
    m.add_function(wrap_pyfunction!(device_scatter_rows, m)?)?;
    m.add_function(wrap_pyfunction!(device_sort_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(device_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(device_configure, m)?)?;
    m.add_function(wrap_pyfunction!(device_set_emulator, m)?)?;
    m.add_function(wrap_pyfunction!(device_status, m)?)?;
    m.add_function(wrap_pyfunction!(device_compile_check, m)?)?;
    Ok(())
}
