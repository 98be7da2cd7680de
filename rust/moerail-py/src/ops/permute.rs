//! Bindings of permute / unpermute / sort_chunks.

use moerail_core::ops::permute::{self, ExpertIndices, RoutingMap};
use moerail_core::Element;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::tensor::{check_disjoint, run, DType, Tensor};
use crate::{with_bits, with_float};

fn routing_map_arg(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let m = Tensor::from_py(obj, "routing_map")?;
    m.expect_dtype(&[DType::Bool], "bool")?;
    m.expect_ndim(2, "[num_tokens, num_experts]")?;
    Ok(m)
}

fn indices_arg(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let i = Tensor::from_py(obj, "indices")?;
    i.expect_dtype(&[DType::I64], "int64")?;
    i.expect_ndim(2, "[num_tokens, topk]")?;
    Ok(i)
}

fn counts_out(obj: &Bound<'_, PyAny>, e_n: usize) -> PyResult<Tensor> {
    let c = Tensor::from_py(obj, "tokens_per_expert")?;
    c.expect_dtype(&[DType::I64], "int64")?;
    c.expect_shape(&[e_n])?;
    Ok(c)
}

/// tokens_per_expert of a routing map.
#[pyfunction]
pub fn count_routing_map(
    py: Python<'_>,
    routing_map: &Bound<'_, PyAny>,
    counts: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let m = routing_map_arg(routing_map)?;
    let (t_n, e_n) = (m.shape[0], m.shape[1]);
    let c = counts_out(counts, e_n)?;
    check_disjoint(&[&c], &[&m])?;
    // SAFETY: checked above; tensors outlive the call.
    let (ms, cs) = unsafe { (m.slice::<bool>(), c.slice_mut::<i64>()) };
    run(py, || {
        permute::count_tokens_per_expert(
            &RoutingMap {
                map: ms,
                num_tokens: t_n,
                num_experts: e_n,
            },
            cs,
        )
    })
}

/// tokens_per_expert of top-k expert indices (checks ids and repeats).
#[pyfunction]
pub fn count_indices(
    py: Python<'_>,
    indices: &Bound<'_, PyAny>,
    num_experts: usize,
    counts: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let i = indices_arg(indices)?;
    let (t_n, k) = (i.shape[0], i.shape[1]);
    let c = counts_out(counts, num_experts)?;
    check_disjoint(&[&c], &[&i])?;
    // SAFETY: checked above.
    let (is, cs) = unsafe { (i.slice::<i64>(), c.slice_mut::<i64>()) };
    run(py, || {
        permute::count_tokens_per_expert(
            &ExpertIndices {
                indices: is,
                num_tokens: t_n,
                topk: k,
                num_experts,
            },
            cs,
        )
    })
}

struct LayoutOut {
    sorted_indices: Tensor,
    permuted_probs: Option<Tensor>,
}

fn layout_outputs(
    sorted_indices: &Bound<'_, PyAny>,
    permuted_probs: Option<&Bound<'_, PyAny>>,
    probs: &Option<Tensor>,
) -> PyResult<LayoutOut> {
    let si = Tensor::from_py(sorted_indices, "sorted_indices")?;
    si.expect_dtype(&[DType::I64], "int64")?;
    si.expect_ndim(1, "[num_rows]")?;
    let pp = Tensor::optional(permuted_probs, "permuted_probs")?;
    match (&pp, probs) {
        (Some(o), Some(p)) => {
            o.expect_same_dtype(p)?;
            o.expect_shape(&si.shape)?;
        }
        (None, None) => {}
        _ => {
            return Err(PyValueError::new_err(
                "probs and permuted_probs go together",
            ))
        }
    }
    Ok(LayoutOut {
        sorted_indices: si,
        permuted_probs: pp,
    })
}

/// Permutation layout from a routing map (dropless, optional alignment padding).
#[pyfunction]
#[pyo3(signature = (routing_map, align, probs, sorted_indices, permuted_probs, padded_counts))]
pub fn permute_map_layout(
    py: Python<'_>,
    routing_map: &Bound<'_, PyAny>,
    align: usize,
    probs: Option<&Bound<'_, PyAny>>,
    sorted_indices: &Bound<'_, PyAny>,
    permuted_probs: Option<&Bound<'_, PyAny>>,
    padded_counts: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let m = routing_map_arg(routing_map)?;
    let (t_n, e_n) = (m.shape[0], m.shape[1]);
    let p = Tensor::optional(probs, "probs")?;
    if let Some(p) = &p {
        p.expect_shape(&[t_n, e_n])?;
    }
    let out = layout_outputs(sorted_indices, permuted_probs, &p)?;
    let c = counts_out(padded_counts, e_n)?;
    let mut outs = vec![&out.sorted_indices, &c];
    if let Some(pp) = &out.permuted_probs {
        outs.push(pp);
    }
    let mut ins = vec![&m];
    if let Some(p) = &p {
        ins.push(p);
    }
    check_disjoint(&outs, &ins)?;
    // SAFETY: checked above; tensors outlive the call.
    let (ms, si, cs) = unsafe {
        (
            m.slice::<bool>(),
            out.sorted_indices.slice_mut::<i64>(),
            c.slice_mut::<i64>(),
        )
    };
    let a = RoutingMap {
        map: ms,
        num_tokens: t_n,
        num_experts: e_n,
    };
    match (&p, &out.permuted_probs) {
        (Some(p), Some(pp)) => with_bits!(p, |B| {
            let (ps, pps) = unsafe { (p.slice::<B>(), pp.slice_mut::<B>()) };
            run(py, || {
                permute::permute_layout(&a, align, Some(ps), si, Some(pps), cs)
            })
        }),
        _ => run(py, || {
            permute::permute_layout::<_, u8>(&a, align, None, si, None, cs)
        }),
    }
}

/// Permutation layout from top-k expert indices (`-1` = dropped slot).
#[pyfunction]
#[pyo3(signature = (indices, num_experts, align, probs, sorted_indices, permuted_probs, padded_counts))]
#[allow(clippy::too_many_arguments)]
pub fn permute_index_layout(
    py: Python<'_>,
    indices: &Bound<'_, PyAny>,
    num_experts: usize,
    align: usize,
    probs: Option<&Bound<'_, PyAny>>,
    sorted_indices: &Bound<'_, PyAny>,
    permuted_probs: Option<&Bound<'_, PyAny>>,
    padded_counts: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let i = indices_arg(indices)?;
    let (t_n, k) = (i.shape[0], i.shape[1]);
    let p = Tensor::optional(probs, "probs")?;
    if let Some(p) = &p {
        p.expect_shape(&[t_n, k])?;
    }
    let out = layout_outputs(sorted_indices, permuted_probs, &p)?;
    let c = counts_out(padded_counts, num_experts)?;
    let mut outs = vec![&out.sorted_indices, &c];
    if let Some(pp) = &out.permuted_probs {
        outs.push(pp);
    }
    let mut ins = vec![&i];
    if let Some(p) = &p {
        ins.push(p);
    }
    check_disjoint(&outs, &ins)?;
    // SAFETY: checked above.
    let (is, si, cs) = unsafe {
        (
            i.slice::<i64>(),
            out.sorted_indices.slice_mut::<i64>(),
            c.slice_mut::<i64>(),
        )
    };
    let a = ExpertIndices {
        indices: is,
        num_tokens: t_n,
        topk: k,
        num_experts,
    };
    match (&p, &out.permuted_probs) {
        (Some(p), Some(pp)) => with_bits!(p, |B| {
            let (ps, pps) = unsafe { (p.slice::<B>(), pp.slice_mut::<B>()) };
            run(py, || {
                permute::permute_layout(&a, align, Some(ps), si, Some(pps), cs)
            })
        }),
        _ => run(py, || {
            permute::permute_layout::<_, u8>(&a, align, None, si, None, cs)
        }),
    }
}

/// Megatron's drop-and-pad layout: `capacity` rows per expert.
#[pyfunction]
#[pyo3(signature = (routing_map, capacity, probs, sorted_indices, permuted_probs))]
pub fn permute_drop_and_pad_layout(
    py: Python<'_>,
    routing_map: &Bound<'_, PyAny>,
    capacity: usize,
    probs: Option<&Bound<'_, PyAny>>,
    sorted_indices: &Bound<'_, PyAny>,
    permuted_probs: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let m = routing_map_arg(routing_map)?;
    let (t_n, e_n) = (m.shape[0], m.shape[1]);
    let p = Tensor::optional(probs, "probs")?;
    if let Some(p) = &p {
        p.expect_shape(&[t_n, e_n])?;
    }
    let out = layout_outputs(sorted_indices, permuted_probs, &p)?;
    let mut outs = vec![&out.sorted_indices];
    if let Some(pp) = &out.permuted_probs {
        outs.push(pp);
    }
    let mut ins = vec![&m];
    if let Some(p) = &p {
        ins.push(p);
    }
    check_disjoint(&outs, &ins)?;
    // SAFETY: checked above.
    let (ms, si) = unsafe { (m.slice::<bool>(), out.sorted_indices.slice_mut::<i64>()) };
    let a = RoutingMap {
        map: ms,
        num_tokens: t_n,
        num_experts: e_n,
    };
    match (&p, &out.permuted_probs) {
        (Some(p), Some(pp)) => with_bits!(p, |B| {
            let (ps, pps) = unsafe { (p.slice::<B>(), pp.slice_mut::<B>()) };
            run(py, || {
                permute::permute_layout_drop_and_pad(&a, capacity, Some(ps), si, Some(pps))
            })
        }),
        _ => run(py, || {
            permute::permute_layout_drop_and_pad::<u8>(&a, capacity, None, si, None)
        }),
    }
}

fn rows_2d(t: &Tensor, what: &str) -> PyResult<(usize, usize)> {
    t.expect_ndim(2, what)?;
    Ok((t.shape[0], t.shape[1]))
}

/// `out[r] = tokens[sorted_indices[r]]` (zeros for -1): bit-exact row gather.
#[pyfunction]
pub fn gather_rows(
    py: Python<'_>,
    tokens: &Bound<'_, PyAny>,
    sorted_indices: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let x = Tensor::from_py(tokens, "tokens")?;
    let (_, h) = rows_2d(&x, "[num_tokens, hidden]")?;
    let si = Tensor::from_py(sorted_indices, "sorted_indices")?;
    si.expect_dtype(&[DType::I64], "int64")?;
    si.expect_ndim(1, "[num_rows]")?;
    let o = Tensor::from_py(out, "out")?;
    o.expect_same_dtype(&x)?;
    o.expect_shape(&[si.shape[0], h])?;
    check_disjoint(&[&o], &[&x, &si])?;
    with_bits!(x, |B| {
        // SAFETY: checked above.
        let (xs, s, os) = unsafe { (x.slice::<B>(), si.slice::<i64>(), o.slice_mut::<B>()) };
        run(py, || permute::gather_rows(xs, h, s, os))
    })
}

fn weights_arg(
    obj: Option<&Bound<'_, PyAny>>,
    acc: DType,
    rows: usize,
    name: &'static str,
) -> PyResult<Option<Tensor>> {
    let w = Tensor::optional(obj, name)?;
    if let Some(w) = &w {
        w.expect_dtype(
            &[acc],
            if acc == DType::F64 {
                "float64"
            } else {
                "float32"
            },
        )?;
        w.expect_shape(&[rows])?;
    }
    Ok(w)
}

fn acc_dtype(t: &Tensor) -> DType {
    if t.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Per-row weights `probs[sorted_indices[r], expert(r)]` (float32, float64 for float64 tokens).
#[pyfunction]
pub fn row_weights(
    py: Python<'_>,
    probs: &Bound<'_, PyAny>,
    sorted_indices: &Bound<'_, PyAny>,
    row_counts: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let p = Tensor::from_py(probs, "probs")?;
    let (t_n, e_n) = rows_2d(&p, "[num_tokens, num_experts]")?;
    let si = Tensor::from_py(sorted_indices, "sorted_indices")?;
    si.expect_dtype(&[DType::I64], "int64")?;
    let rc = Tensor::from_py(row_counts, "tokens_per_expert")?;
    rc.expect_dtype(&[DType::I64], "int64")?;
    let w = Tensor::from_py(weights, "weights")?;
    w.expect_dtype(&[DType::F32, DType::F64], "float32 or float64")?;
    w.expect_shape(&[si.numel])?;
    check_disjoint(&[&w], &[&p, &si, &rc])?;
    with_float!(p, |P| {
        // SAFETY: checked above.
        let (ps, s, c) = unsafe { (p.slice::<P>(), si.slice::<i64>(), rc.slice::<i64>()) };
        if w.dtype == DType::F64 {
            let ws = unsafe { w.slice_mut::<f64>() };
            run(py, || permute::gather_row_weights(ps, t_n, e_n, s, c, ws))
        } else {
            let ws = unsafe { w.slice_mut::<f32>() };
            run(py, || permute::gather_row_weights(ps, t_n, e_n, s, c, ws))
        }
    })
}

/// Unpermute: `out[t] = sum_{r: src(r)=t} x[r] * w[r]`, fp32 accumulation, one rounding.
#[pyfunction]
#[pyo3(signature = (permuted_tokens, sorted_indices, weights, out))]
pub fn unpermute(
    py: Python<'_>,
    permuted_tokens: &Bound<'_, PyAny>,
    sorted_indices: &Bound<'_, PyAny>,
    weights: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let x = Tensor::from_py(permuted_tokens, "permuted_tokens")?;
    let (n, h) = rows_2d(&x, "[num_rows, hidden]")?;
    let si = Tensor::from_py(sorted_indices, "sorted_indices")?;
    si.expect_dtype(&[DType::I64], "int64")?;
    si.expect_shape(&[n])?;
    let w = weights_arg(weights, acc_dtype(&x), n, "probs")?;
    let o = Tensor::from_py(out, "out")?;
    o.expect_same_dtype(&x)?;
    let (t_n, oh) = rows_2d(&o, "[num_tokens, hidden]")?;
    if oh != h {
        return Err(PyValueError::new_err(format!(
            "restore_shape: hidden size {oh} does not match permuted_tokens ({h})"
        )));
    }
    let mut ins = vec![&x, &si];
    if let Some(w) = &w {
        ins.push(w);
    }
    check_disjoint(&[&o], &ins)?;
    with_float!(x, |T| {
        // SAFETY: checked above.
        let (xs, s, os) = unsafe { (x.slice::<T>(), si.slice::<i64>(), o.slice_mut::<T>()) };
        let ws = w
            .as_ref()
            .map(|w| unsafe { w.slice::<<T as Element>::Acc>() });
        run(py, || permute::unpermute(xs, h, s, ws, t_n, os))
    })
}

/// Backward of unpermute: grad of the permuted tokens and, if asked, of the row weights.
#[pyfunction]
#[pyo3(signature = (grad_out, permuted_tokens, sorted_indices, weights, grad_x, grad_w))]
pub fn unpermute_backward(
    py: Python<'_>,
    grad_out: &Bound<'_, PyAny>,
    permuted_tokens: Option<&Bound<'_, PyAny>>,
    sorted_indices: &Bound<'_, PyAny>,
    weights: Option<&Bound<'_, PyAny>>,
    grad_x: &Bound<'_, PyAny>,
    grad_w: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let g = Tensor::from_py(grad_out, "grad_output")?;
    let (_, h) = rows_2d(&g, "[num_tokens, hidden]")?;
    let si = Tensor::from_py(sorted_indices, "sorted_indices")?;
    si.expect_dtype(&[DType::I64], "int64")?;
    si.expect_ndim(1, "[num_rows]")?;
    let n = si.shape[0];
    let x = Tensor::optional(permuted_tokens, "permuted_tokens")?;
    if let Some(x) = &x {
        x.expect_same_dtype(&g)?;
        x.expect_shape(&[n, h])?;
    }
    let acc = acc_dtype(&g);
    let w = weights_arg(weights, acc, n, "probs")?;
    let gx = Tensor::from_py(grad_x, "grad_x")?;
    gx.expect_same_dtype(&g)?;
    gx.expect_shape(&[n, h])?;
    let gw = weights_arg(grad_w, acc, n, "grad_w")?;
    let mut outs = vec![&gx];
    if let Some(t) = &gw {
        outs.push(t);
    }
    let mut ins = vec![&g, &si];
    for t in [&x, &w].into_iter().flatten() {
        ins.push(t);
    }
    check_disjoint(&outs, &ins)?;
    with_float!(g, |T| {
        // SAFETY: checked above.
        let (gs, s, gxs) = unsafe { (g.slice::<T>(), si.slice::<i64>(), gx.slice_mut::<T>()) };
        let xs = x.as_ref().map(|t| unsafe { t.slice::<T>() });
        let ws = w
            .as_ref()
            .map(|t| unsafe { t.slice::<<T as Element>::Acc>() });
        let gws = gw
            .as_ref()
            .map(|t| unsafe { t.slice_mut::<<T as Element>::Acc>() });
        run(py, || {
            permute::unpermute_backward(gs, xs, h, s, ws, gxs, gws)
        })
    })
}

/// `out[src(r), expert(r)] = values[r]` into a zeroed dense `[T, E]`.
#[pyfunction]
pub fn scatter_rows_to_dense(
    py: Python<'_>,
    values: &Bound<'_, PyAny>,
    sorted_indices: &Bound<'_, PyAny>,
    row_counts: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let v = Tensor::from_py(values, "grad_permuted_probs")?;
    v.expect_ndim(1, "[num_rows]")?;
    let si = Tensor::from_py(sorted_indices, "sorted_indices")?;
    si.expect_dtype(&[DType::I64], "int64")?;
    let rc = Tensor::from_py(row_counts, "tokens_per_expert")?;
    rc.expect_dtype(&[DType::I64], "int64")?;
    let o = Tensor::from_py(out, "out")?;
    o.expect_same_dtype(&v)?;
    let (t_n, e_n) = rows_2d(&o, "[num_tokens, num_experts]")?;
    check_disjoint(&[&o], &[&v, &si, &rc])?;
    with_bits!(v, |B| {
        // SAFETY: checked above.
        let (vs, s, c, os) = unsafe {
            (
                v.slice::<B>(),
                si.slice::<i64>(),
                rc.slice::<i64>(),
                o.slice_mut::<B>(),
            )
        };
        run(py, || {
            permute::scatter_rows_to_dense(vs, t_n, e_n, s, c, os)
        })
    })
}

/// Megatron's sort_chunks_by_idxs on rows of any dtype.
#[pyfunction]
pub fn sort_chunks(
    py: Python<'_>,
    input: &Bound<'_, PyAny>,
    split_sizes: &Bound<'_, PyAny>,
    sorted_idxs: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let x = Tensor::from_py(input, "input")?;
    if x.shape.is_empty() {
        return Err(PyValueError::new_err(
            "input: expected at least one dimension",
        ));
    }
    let rows = x.shape[0];
    let row_len = x
        .numel
        .checked_div(rows)
        .unwrap_or_else(|| x.shape[1..].iter().product());
    let ss = Tensor::from_py(split_sizes, "split_sizes")?;
    ss.expect_dtype(&[DType::I64], "int64")?;
    ss.expect_ndim(1, "[num_chunks]")?;
    let so = Tensor::from_py(sorted_idxs, "sorted_idxs")?;
    so.expect_dtype(&[DType::I64], "int64")?;
    so.expect_ndim(1, "[num_chunks]")?;
    let o = Tensor::from_py(out, "out")?;
    o.expect_same_dtype(&x)?;
    o.expect_shape(&x.shape)?;
    check_disjoint(&[&o], &[&x, &ss, &so])?;
    if x.dtype.size() == 0 {
        return Err(PyTypeError::new_err(format!(
            "input: unsupported dtype {}",
            x.dtype_name
        )));
    }
    with_bits!(x, |B| {
        // SAFETY: checked above.
        let (xs, s, q, os) = unsafe {
            (
                x.slice::<B>(),
                ss.slice::<i64>(),
                so.slice::<i64>(),
                o.slice_mut::<B>(),
            )
        };
        run(py, || permute::sort_chunks(xs, row_len, s, q, os))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(count_routing_map, m)?)?;
    m.add_function(wrap_pyfunction!(count_indices, m)?)?;
    m.add_function(wrap_pyfunction!(permute_map_layout, m)?)?;
    m.add_function(wrap_pyfunction!(permute_index_layout, m)?)?;
    m.add_function(wrap_pyfunction!(permute_drop_and_pad_layout, m)?)?;
    m.add_function(wrap_pyfunction!(gather_rows, m)?)?;
    m.add_function(wrap_pyfunction!(row_weights, m)?)?;
    m.add_function(wrap_pyfunction!(unpermute, m)?)?;
    m.add_function(wrap_pyfunction!(unpermute_backward, m)?)?;
    m.add_function(wrap_pyfunction!(scatter_rows_to_dense, m)?)?;
    m.add_function(wrap_pyfunction!(sort_chunks, m)?)?;
    Ok(())
}
