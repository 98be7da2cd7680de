//! Bindings of permute / unpermute / sort_chunks.

use moerail_core::ops::permute::{self, ExpertIndices, RoutingMap};
use moerail_core::Element;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::args::{acc_dtype, check_disjoint, dims2, TensorArg};
use crate::tensor::{run, DType, Tensor};
use crate::{with_bits, with_float};

fn routing_map_arg(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let m =
        TensorArg::new(obj, "routing_map").bool().ndim(2, "[num_tokens, num_experts]").read()?;
    Ok(m)
}

fn indices_arg(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let i = TensorArg::new(obj, "indices").int64().ndim(2, "[num_tokens, topk]").read()?;
    Ok(i)
}

fn counts_out(obj: &Bound<'_, PyAny>, e_n: usize) -> PyResult<Tensor> {
    let c = TensorArg::new(obj, "tokens_per_expert").int64().len(e_n).read()?;
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
    let (t_n, e_n) = dims2(&m);
    let c = counts_out(counts, e_n)?;
    check_disjoint(&[&c], &[&m])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ms, cs) = unsafe { (m.slice::<bool>(), c.slice_mut::<i64>()) };
    run(py, || {
        permute::count_tokens_per_expert(
            &RoutingMap { map: ms, num_tokens: t_n, num_experts: e_n },
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
    let (t_n, k) = dims2(&i);
    let c = counts_out(counts, num_experts)?;
    check_disjoint(&[&c], &[&i])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (is, cs) = unsafe { (i.slice::<i64>(), c.slice_mut::<i64>()) };
    run(py, || {
        permute::count_tokens_per_expert(
            &ExpertIndices { indices: is, num_tokens: t_n, topk: k, num_experts },
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
    let si =
        TensorArg::new(sorted_indices, "sorted_indices").int64().ndim(1, "[num_rows]").read()?;
    let pp = Tensor::optional(permuted_probs, "permuted_probs")?;
    match (&pp, probs) {
        (Some(o), Some(p)) => {
            o.expect_same_dtype(p)?;
            o.expect_shape(&si.shape)?;
        }
        (None, None) => {}
        _ => return Err(PyValueError::new_err("probs and permuted_probs go together")),
    }
    Ok(LayoutOut { sorted_indices: si, permuted_probs: pp })
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
    let (t_n, e_n) = dims2(&m);
    let p = TensorArg::optional(probs, "probs").shape(&[t_n, e_n]).read_opt()?;
    let out = layout_outputs(sorted_indices, permuted_probs, &p)?;
    let c = counts_out(padded_counts, e_n)?;
    let mut outs = vec![&out.sorted_indices, &c];
    outs.extend(out.permuted_probs.iter());
    let mut ins = vec![&m];
    ins.extend(p.iter());
    check_disjoint(&outs, &ins)?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ms, si, cs) =
        unsafe { (m.slice::<bool>(), out.sorted_indices.slice_mut::<i64>(), c.slice_mut::<i64>()) };
    let a = RoutingMap { map: ms, num_tokens: t_n, num_experts: e_n };
    match (&p, &out.permuted_probs) {
        (Some(p), Some(pp)) => with_bits!(p, |B| {
            // SAFETY: `layout_outputs` gave permuted_probs the dtype of probs (so `B` fits both) and check_disjoint kept it apart from the inputs.
            let (ps, pps) = unsafe { (p.slice::<B>(), pp.slice_mut::<B>()) };
            run(py, || permute::permute_layout(&a, align, Some(ps), si, Some(pps), cs))
        }),
        _ => run(py, || permute::permute_layout::<_, u8>(&a, align, None, si, None, cs)),
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
    let (t_n, k) = dims2(&i);
    let p = TensorArg::optional(probs, "probs").shape(&[t_n, k]).read_opt()?;
    let out = layout_outputs(sorted_indices, permuted_probs, &p)?;
    let c = counts_out(padded_counts, num_experts)?;
    let mut outs = vec![&out.sorted_indices, &c];
    outs.extend(out.permuted_probs.iter());
    let mut ins = vec![&i];
    ins.extend(p.iter());
    check_disjoint(&outs, &ins)?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (is, si, cs) =
        unsafe { (i.slice::<i64>(), out.sorted_indices.slice_mut::<i64>(), c.slice_mut::<i64>()) };
    let a = ExpertIndices { indices: is, num_tokens: t_n, topk: k, num_experts };
    match (&p, &out.permuted_probs) {
        (Some(p), Some(pp)) => with_bits!(p, |B| {
            // SAFETY: `layout_outputs` gave permuted_probs the dtype of probs (so `B` fits both) and check_disjoint kept it apart from the inputs.
            let (ps, pps) = unsafe { (p.slice::<B>(), pp.slice_mut::<B>()) };
            run(py, || permute::permute_layout(&a, align, Some(ps), si, Some(pps), cs))
        }),
        _ => run(py, || permute::permute_layout::<_, u8>(&a, align, None, si, None, cs)),
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
    let (t_n, e_n) = dims2(&m);
    let p = TensorArg::optional(probs, "probs").shape(&[t_n, e_n]).read_opt()?;
    let out = layout_outputs(sorted_indices, permuted_probs, &p)?;
    let mut outs = vec![&out.sorted_indices];
    outs.extend(out.permuted_probs.iter());
    let mut ins = vec![&m];
    ins.extend(p.iter());
    check_disjoint(&outs, &ins)?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ms, si) = unsafe { (m.slice::<bool>(), out.sorted_indices.slice_mut::<i64>()) };
    let a = RoutingMap { map: ms, num_tokens: t_n, num_experts: e_n };
    match (&p, &out.permuted_probs) {
        (Some(p), Some(pp)) => with_bits!(p, |B| {
            // SAFETY: `layout_outputs` gave permuted_probs the dtype of probs (so `B` fits both) and check_disjoint kept it apart from the inputs.
            let (ps, pps) = unsafe { (p.slice::<B>(), pp.slice_mut::<B>()) };
            run(py, || permute::permute_layout_drop_and_pad(&a, capacity, Some(ps), si, Some(pps)))
        }),
        _ => run(py, || permute::permute_layout_drop_and_pad::<u8>(&a, capacity, None, si, None)),
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
    let x = TensorArg::new(tokens, "tokens").read()?;
    let (_, h) = rows_2d(&x, "[num_tokens, hidden]")?;
    let si =
        TensorArg::new(sorted_indices, "sorted_indices").int64().ndim(1, "[num_rows]").read()?;
    let o = TensorArg::new(out, "out").same_dtype(&x).shape(&[si.shape[0], h]).read()?;
    check_disjoint(&[&o], &[&x, &si])?;
    with_bits!(x, |B| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
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
        w.expect_dtype(&[acc], if acc == DType::F64 { "float64" } else { "float32" })?;
        w.expect_shape(&[rows])?;
    }
    Ok(w)
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
    let p = TensorArg::new(probs, "probs").read()?;
    let (t_n, e_n) = rows_2d(&p, "[num_tokens, num_experts]")?;
    let si = TensorArg::new(sorted_indices, "sorted_indices").int64().read()?;
    let rc = TensorArg::new(row_counts, "tokens_per_expert").int64().read()?;
    let w = TensorArg::new(weights, "weights")
        .dtype(&[DType::F32, DType::F64], "float32 or float64")
        .len(si.numel)
        .read()?;
    check_disjoint(&[&w], &[&p, &si, &rc])?;
    with_float!(p, |P| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (ps, s, c) = unsafe { (p.slice::<P>(), si.slice::<i64>(), rc.slice::<i64>()) };
        if w.dtype == DType::F64 {
            let ws = unsafe { w.slice_mut::<f64>() };
            run(py, || permute::gather_row_weights(ps, t_n, e_n, s, c, ws))
        } else {
            // SAFETY: the branch tested the dtype (float32); `weights` is an output disjoint from the inputs.
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
    let x = TensorArg::new(permuted_tokens, "permuted_tokens").read()?;
    let (n, h) = rows_2d(&x, "[num_rows, hidden]")?;
    let si = TensorArg::new(sorted_indices, "sorted_indices").int64().len(n).read()?;
    let w = weights_arg(weights, acc_dtype(&x), n, "probs")?;
    let o = TensorArg::new(out, "out").same_dtype(&x).read()?;
    let (t_n, oh) = rows_2d(&o, "[num_tokens, hidden]")?;
    if oh != h {
        return Err(PyValueError::new_err(format!(
            "restore_shape: hidden size {oh} does not match permuted_tokens ({h})"
        )));
    }
    let mut ins = vec![&x, &si];
    ins.extend(w.iter());
    check_disjoint(&[&o], &ins)?;
    with_float!(x, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (xs, s, os) = unsafe { (x.slice::<T>(), si.slice::<i64>(), o.slice_mut::<T>()) };
        let ws = w.as_ref().map(|w| unsafe { w.slice::<<T as Element>::Acc>() });
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
    let g = TensorArg::new(grad_out, "grad_output").read()?;
    let (_, h) = rows_2d(&g, "[num_tokens, hidden]")?;
    let si =
        TensorArg::new(sorted_indices, "sorted_indices").int64().ndim(1, "[num_rows]").read()?;
    let n = si.shape[0];
    let x = TensorArg::optional(permuted_tokens, "permuted_tokens")
        .same_dtype(&g)
        .shape(&[n, h])
        .read_opt()?;
    let acc = acc_dtype(&g);
    let w = weights_arg(weights, acc, n, "probs")?;
    let gx = TensorArg::new(grad_x, "grad_x").same_dtype(&g).shape(&[n, h]).read()?;
    let gw = weights_arg(grad_w, acc, n, "grad_w")?;
    let mut outs = vec![&gx];
    outs.extend(gw.iter());
    let mut ins = vec![&g, &si];
    for t in [&x, &w].into_iter().flatten() {
        ins.push(t);
    }
    check_disjoint(&outs, &ins)?;
    with_float!(g, |T| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (gs, s, gxs) = unsafe { (g.slice::<T>(), si.slice::<i64>(), gx.slice_mut::<T>()) };
        let xs = x.as_ref().map(|t| unsafe { t.slice::<T>() });
        let ws = w.as_ref().map(|t| unsafe { t.slice::<<T as Element>::Acc>() });
        // SAFETY: grad_w was read in the accumulation dtype of `T`, an output disjoint from the rest.
        let gws = gw.as_ref().map(|t| unsafe { t.slice_mut::<<T as Element>::Acc>() });
        run(py, || permute::unpermute_backward(gs, xs, h, s, ws, gxs, gws))
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
    let v = TensorArg::new(values, "grad_permuted_probs").ndim(1, "[num_rows]").read()?;
    let si = TensorArg::new(sorted_indices, "sorted_indices").int64().read()?;
    let rc = TensorArg::new(row_counts, "tokens_per_expert").int64().read()?;
    let o = TensorArg::new(out, "out").same_dtype(&v).read()?;
    let (t_n, e_n) = rows_2d(&o, "[num_tokens, num_experts]")?;
    check_disjoint(&[&o], &[&v, &si, &rc])?;
    with_bits!(v, |B| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (vs, s, c, os) =
            unsafe { (v.slice::<B>(), si.slice::<i64>(), rc.slice::<i64>(), o.slice_mut::<B>()) };
        run(py, || permute::scatter_rows_to_dense(vs, t_n, e_n, s, c, os))
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
    let x = TensorArg::new(input, "input").read()?;
    if x.shape.is_empty() {
        return Err(PyValueError::new_err("input: expected at least one dimension"));
    }
    let rows = x.shape[0];
    let row_len = x.numel.checked_div(rows).unwrap_or_else(|| x.shape[1..].iter().product());
    let ss = TensorArg::new(split_sizes, "split_sizes").int64().ndim(1, "[num_chunks]").read()?;
    let so = TensorArg::new(sorted_idxs, "sorted_idxs").int64().ndim(1, "[num_chunks]").read()?;
    let o = TensorArg::new(out, "out").same_dtype(&x).shape(&x.shape).read()?;
    check_disjoint(&[&o], &[&x, &ss, &so])?;
    if x.dtype.size() == 0 {
        return Err(PyTypeError::new_err(format!("input: unsupported dtype {}", x.dtype_name)));
    }
    with_bits!(x, |B| {
        // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
        // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
        let (xs, s, q, os) =
            unsafe { (x.slice::<B>(), ss.slice::<i64>(), so.slice::<i64>(), o.slice_mut::<B>()) };
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
