//! Bindings of moerail_core::balance: placement, metrics, predictors, migration planning and
//! replica choice. Python allocates every output tensor; Rust checks and fills it.

use moerail_core::balance::{self, migration, replica, stats, Mode, Topology};
use pyo3::prelude::*;

use crate::args::{check_disjoint, dims2, TensorArg};
use crate::error::to_py_err;
use crate::tensor::{run, Tensor};
use crate::with_float;

/// Placement of `weight [L, E]` (float64): writes `phy2log [L, R]`, `phyrank [L, R]`,
/// `logcnt [L, E]` (int64).
/// An int64 placement `[num_layers, num_replicas]` whose rows match `l_n` (the rows of `of`).
fn placement_arg(
    obj: &Bound<'_, PyAny>,
    name: &'static str,
    l_n: usize,
    of: &str,
) -> PyResult<Tensor> {
    let t = TensorArg::new(obj, name).int64().ndim(2, "[num_layers, num_replicas]").read()?;
    if t.shape[0] != l_n {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{name}: expected {l_n} layers (the rows of {of}), got {}",
            t.shape[0]
        )));
    }
    Ok(t)
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn rebalance_experts(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
    mode: &str,
    phy2log: &Bound<'_, PyAny>,
    phyrank: &Bound<'_, PyAny>,
    logcnt: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let w =
        TensorArg::new(weight, "weight").float64().ndim(2, "[num_layers, num_experts]").read()?;
    let (l_n, e_n) = dims2(&w);
    let mode = Mode::parse(mode).map_err(to_py_err)?;
    let topo =
        Topology::new(e_n, num_replicas, num_groups, num_nodes, num_gpus).map_err(to_py_err)?;
    let p = TensorArg::new(phy2log, "phy2log").int64().shape(&[l_n, num_replicas]).read()?;
    let r = TensorArg::new(phyrank, "phyrank").int64().shape(&[l_n, num_replicas]).read()?;
    let c = TensorArg::new(logcnt, "logcnt").int64().shape(&[l_n, e_n]).read()?;
    check_disjoint(&[&p, &r, &c], &[&w])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ws, ps, rs, cs) = unsafe {
        (w.slice::<f64>(), p.slice_mut::<i64>(), r.slice_mut::<i64>(), c.slice_mut::<i64>())
    };
    run(py, || balance::rebalance_experts_into(ws, l_n, &topo, mode, ps, rs, cs))
}

/// Improves `current_phy2log [L, R]` for `weight [L, E]` in place (see
/// moerail_core::balance::improve_placement): writes `phy2log`, `phyrank` `[L, R]`, `logcnt`.
#[pyfunction]
#[pyo3(signature = (weight, current_phy2log, num_gpus, num_nodes, keep_nodes, max_moves, phy2log, phyrank, logcnt))]
#[allow(clippy::too_many_arguments)]
pub fn improve_placement(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    current_phy2log: &Bound<'_, PyAny>,
    num_gpus: usize,
    num_nodes: usize,
    keep_nodes: bool,
    max_moves: Option<usize>,
    phy2log: &Bound<'_, PyAny>,
    phyrank: &Bound<'_, PyAny>,
    logcnt: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let w =
        TensorArg::new(weight, "weight").float64().ndim(2, "[num_layers, num_experts]").read()?;
    let (l_n, e_n) = dims2(&w);
    let c = placement_arg(current_phy2log, "current_phy2log", l_n, "weight")?;
    let r_n = c.shape[1];
    let p = TensorArg::new(phy2log, "phy2log").int64().shape(&[l_n, r_n]).read()?;
    let r = TensorArg::new(phyrank, "phyrank").int64().shape(&[l_n, r_n]).read()?;
    let k = TensorArg::new(logcnt, "logcnt").int64().shape(&[l_n, e_n]).read()?;
    check_disjoint(&[&p, &r, &k], &[&w, &c])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ws, cs, ps, rs, ks) = unsafe {
        (
            w.slice::<f64>(),
            c.slice::<i64>(),
            p.slice_mut::<i64>(),
            r.slice_mut::<i64>(),
            k.slice_mut::<i64>(),
        )
    };
    run(py, || {
        let out = balance::improve_placement(
            ws, l_n, e_n, cs, r_n, num_gpus, num_nodes, keep_nodes, max_moves,
        )?;
        ps.copy_from_slice(&out.phy2log);
        rs.copy_from_slice(&out.phyrank);
        ks.copy_from_slice(&out.logcnt);
        Ok(())
    })
}

/// `log2phy [L, E, X]` of `phy2log [L, R]` with replica ranks from `phyrank` (or ascending slot
/// order without it); -1 past each count.
#[pyfunction]
#[pyo3(signature = (phy2log, log2phy, phyrank=None))]
pub fn fill_log2phy(
    py: Python<'_>,
    phy2log: &Bound<'_, PyAny>,
    log2phy: &Bound<'_, PyAny>,
    phyrank: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let p =
        TensorArg::new(phy2log, "phy2log").int64().ndim(2, "[num_layers, num_replicas]").read()?;
    let o = TensorArg::new(log2phy, "log2phy")
        .int64()
        .ndim(3, "[num_layers, num_experts, max_replicas]")
        .read()?;
    if o.shape[0] != p.shape[0] {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "log2phy: expected {} layers (the rows of phy2log), got {}",
            p.shape[0], o.shape[0]
        )));
    }
    let r = TensorArg::optional(phyrank, "phyrank").int64().shape(&p.shape.clone()).read_opt()?;
    let mut ins = vec![&p];
    ins.extend(r.iter());
    check_disjoint(&[&o], &ins)?;
    let (l_n, e_n, x) = (o.shape[0], o.shape[1], o.shape[2]);
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ps, os) = unsafe { (p.slice::<i64>(), o.slice_mut::<i64>()) };
    let rs = r.as_ref().map(|r| unsafe { r.slice::<i64>() });
    run(py, || balance::fill_log2phy(ps, rs, l_n, e_n, x, os))
}

/// Metrics of `phy2log [L, R]` for `load [L, E]`: writes `device_load [L, G]`,
/// `node_load [L, N]` and `scalars [L, 6]` = (max/mean device, max/mean node, CV of devices,
/// lower bound of max/mean, dropped tokens, total tokens).
#[pyfunction]
#[pyo3(signature = (load, phy2log, num_gpus, num_nodes, capacity, device_load, node_load, scalars))]
#[allow(clippy::too_many_arguments)]
pub fn placement_metrics(
    py: Python<'_>,
    load: &Bound<'_, PyAny>,
    phy2log: &Bound<'_, PyAny>,
    num_gpus: usize,
    num_nodes: usize,
    capacity: Option<f64>,
    device_load: &Bound<'_, PyAny>,
    node_load: &Bound<'_, PyAny>,
    scalars: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let w = TensorArg::new(load, "load").float64().ndim(2, "[num_layers, num_experts]").read()?;
    let (l_n, e_n) = dims2(&w);
    let p = placement_arg(phy2log, "phy2log", l_n, "load")?;
    let r_n = p.shape[1];
    let d = TensorArg::new(device_load, "device_load").float64().shape(&[l_n, num_gpus]).read()?;
    let n = TensorArg::new(node_load, "node_load").float64().shape(&[l_n, num_nodes]).read()?;
    let s = TensorArg::new(scalars, "scalars").float64().shape(&[l_n, 6]).read()?;
    check_disjoint(&[&d, &n, &s], &[&w, &p])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ws, ps, ds, ns, ss) = unsafe {
        (
            w.slice::<f64>(),
            p.slice::<i64>(),
            d.slice_mut::<f64>(),
            n.slice_mut::<f64>(),
            s.slice_mut::<f64>(),
        )
    };
    run(py, || {
        let m = stats::placement_metrics(ws, l_n, e_n, ps, r_n, num_gpus, num_nodes, capacity)?;
        for (l, x) in m.iter().enumerate() {
            ds[l * num_gpus..(l + 1) * num_gpus].copy_from_slice(&x.device_load);
            ns[l * num_nodes..(l + 1) * num_nodes].copy_from_slice(&x.node_load);
            ss[l * 6..(l + 1) * 6].copy_from_slice(&[
                x.max_mean_device,
                x.max_mean_node,
                x.cv_device,
                x.lower_bound,
                x.dropped,
                x.total,
            ]);
        }
        Ok(())
    })
}

/// Prediction of the mean load per step over the next `horizon` steps from `history [T, K]`.
#[pyfunction]
pub fn predict_load(
    py: Python<'_>,
    history: &Bound<'_, PyAny>,
    method: &str,
    alpha: f64,
    window: usize,
    horizon: usize,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let h =
        TensorArg::new(history, "history").float64().ndim(2, "[num_steps, num_series]").read()?;
    let (t_n, k_n) = dims2(&h);
    let p = stats::Predictor::parse(method, alpha, window).map_err(to_py_err)?;
    let o = TensorArg::new(out, "out").float64().len(k_n).read()?;
    check_disjoint(&[&o], &[&h])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (hs, os) = unsafe { (h.slice::<f64>(), o.slice_mut::<f64>()) };
    run(py, || stats::predict(hs, t_n, k_n, p, horizon, os))
}

/// Backtest of a predictor: `(abs_error, total, sq_error, count)`.
#[pyfunction]
pub fn backtest_predictor(
    py: Python<'_>,
    history: &Bound<'_, PyAny>,
    method: &str,
    alpha: f64,
    window: usize,
    horizon: usize,
    warmup: usize,
) -> PyResult<(f64, f64, f64, usize)> {
    let h =
        TensorArg::new(history, "history").float64().ndim(2, "[num_steps, num_series]").read()?;
    let (t_n, k_n) = dims2(&h);
    let p = stats::Predictor::parse(method, alpha, window).map_err(to_py_err)?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let hs = unsafe { h.slice::<f64>() };
    let b = run(py, || stats::backtest(hs, t_n, k_n, p, horizon, warmup))?;
    Ok((b.abs_error, b.total, b.sq_error, b.count))
}

/// Migration plan from `old_phy2log` to `new_phy2log` (`[L, R]`): writes the matched new
/// placement into `matched [L, R]` and the transfers into the first rows of
/// `transfers [L * R, 6]` = (layer, expert, src_rank, src_slot, dst_rank, dst_slot). Returns
/// `(num_transfers, seconds, intra_node_bytes, inter_node_bytes, local_bytes)` and fills
/// `rank_bytes [G, 2]` (network bytes sent, received per rank).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn plan_migration(
    py: Python<'_>,
    old_phy2log: &Bound<'_, PyAny>,
    new_phy2log: &Bound<'_, PyAny>,
    num_experts: usize,
    num_gpus: usize,
    num_nodes: usize,
    keep_nodes: bool,
    expert_bytes: &Bound<'_, PyAny>,
    intra_node_bw: f64,
    inter_node_bw: f64,
    latency: f64,
    local_bw: f64,
    matched: &Bound<'_, PyAny>,
    transfers: &Bound<'_, PyAny>,
    rank_bytes: &Bound<'_, PyAny>,
) -> PyResult<(usize, f64, f64, f64, f64)> {
    let o = TensorArg::new(old_phy2log, "old_phy2log")
        .int64()
        .ndim(2, "[num_layers, num_replicas]")
        .read()?;
    let (l_n, r_n) = dims2(&o);
    let n = TensorArg::new(new_phy2log, "new_phy2log").int64().shape(&[l_n, r_n]).read()?;
    let b = TensorArg::new(expert_bytes, "expert_bytes").float64().len(l_n).read()?;
    let m = TensorArg::new(matched, "matched").int64().shape(&[l_n, r_n]).read()?;
    let t = TensorArg::new(transfers, "transfers").int64().shape(&[l_n * r_n, 6]).read()?;
    let rb = TensorArg::new(rank_bytes, "rank_bytes").float64().shape(&[num_gpus, 2]).read()?;
    check_disjoint(&[&m, &t, &rb], &[&o, &n, &b])?;
    let topo = Topology::new(num_experts, r_n, 1, num_nodes, num_gpus).map_err(to_py_err)?;
    let link = migration::LinkModel {
        gpus_per_node: topo.gpus_per_node(),
        intra_node_bw,
        inter_node_bw,
        latency,
        local_bw,
    };
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (os, ns, bs, ms, ts, rbs) = unsafe {
        (
            o.slice::<i64>(),
            n.slice::<i64>(),
            b.slice::<f64>(),
            m.slice_mut::<i64>(),
            t.slice_mut::<i64>(),
            rb.slice_mut::<f64>(),
        )
    };
    run(py, || {
        let plan = migration::plan_migration(os, ns, l_n, &topo, keep_nodes, bs, &link)?;
        ms.copy_from_slice(&plan.phy2log);
        for (i, x) in plan.transfers.iter().enumerate() {
            ts[i * 6..(i + 1) * 6].copy_from_slice(&[
                x.layer as i64,
                x.expert as i64,
                x.src_rank as i64,
                x.src_slot as i64,
                x.dst_rank as i64,
                x.dst_slot as i64,
            ]);
        }
        for (g, (s, r)) in plan.cost.per_rank.iter().enumerate() {
            rbs[2 * g] = *s;
            rbs[2 * g + 1] = *r;
        }
        let c = &plan.cost;
        Ok((plan.transfers.len(), c.seconds, c.intra_node_bytes, c.inter_node_bytes, c.local_bytes))
    })
}

/// Migrate or not: `(migrate, current_max_load, new_max_load, gain_per_step, gain, cost)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn decide_migration(
    py: Python<'_>,
    predicted_load: &Bound<'_, PyAny>,
    current_phy2log: &Bound<'_, PyAny>,
    new_phy2log: &Bound<'_, PyAny>,
    num_gpus: usize,
    num_nodes: usize,
    seconds_per_token: f64,
    horizon_steps: f64,
    migration_seconds: f64,
    overhead_seconds: f64,
) -> PyResult<(bool, f64, f64, f64, f64, f64)> {
    let w = TensorArg::new(predicted_load, "predicted_load")
        .float64()
        .ndim(2, "[num_layers, num_experts]")
        .read()?;
    let (l_n, e_n) = dims2(&w);
    let c = placement_arg(current_phy2log, "current_phy2log", l_n, "predicted_load")?;
    let r_n = c.shape[1];
    let n = TensorArg::new(new_phy2log, "new_phy2log").int64().shape(&[l_n, r_n]).read()?;
    let topo = Topology::new(e_n, r_n, 1, num_nodes, num_gpus).map_err(to_py_err)?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ws, cs, ns) = unsafe { (w.slice::<f64>(), c.slice::<i64>(), n.slice::<i64>()) };
    let d = run(py, || {
        migration::decide(
            ws,
            l_n,
            cs,
            ns,
            &topo,
            seconds_per_token,
            horizon_steps,
            migration_seconds,
            overhead_seconds,
        )
    })?;
    Ok((d.migrate, d.current_max_load, d.new_max_load, d.gain_per_step, d.gain, d.cost))
}

fn table_args(log2phy: &Bound<'_, PyAny>, logcnt: &Bound<'_, PyAny>) -> PyResult<(Tensor, Tensor)> {
    let t =
        TensorArg::new(log2phy, "log2phy").int64().ndim(2, "[num_experts, max_replicas]").read()?;
    let c = TensorArg::new(logcnt, "logcnt").int64().shape(&[t.shape[0]]).read()?;
    Ok((t, c))
}

/// Physical slot of each routed token: `indices [T, k]` -> `out [T, k]`.
#[pyfunction]
pub fn select_replicas(
    py: Python<'_>,
    indices: &Bound<'_, PyAny>,
    log2phy: &Bound<'_, PyAny>,
    logcnt: &Bound<'_, PyAny>,
    num_replicas: usize,
    offset: u64,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let i = TensorArg::new(indices, "indices").int64().ndim(2, "[num_tokens, topk]").read()?;
    let (t, c) = table_args(log2phy, logcnt)?;
    let o = TensorArg::new(out, "out").int64().shape(&i.shape).read()?;
    check_disjoint(&[&o], &[&i, &t, &c])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (is, ts, cs, os) =
        unsafe { (i.slice::<i64>(), t.slice::<i64>(), c.slice::<i64>(), o.slice_mut::<i64>()) };
    let x = t.shape[1];
    run(py, || {
        replica::select_replicas(
            is,
            &replica::ReplicaTable { log2phy: ts, max_replicas: x, logcnt: cs, num_replicas },
            offset,
            os,
        )
    })
}

/// Dense form: `routing_map [T, E]` (and `probs [T, E]`) -> `out_map [T, R]` (`out_probs`).
#[pyfunction]
#[pyo3(signature = (routing_map, log2phy, logcnt, num_replicas, offset, out_map, probs=None, out_probs=None))]
#[allow(clippy::too_many_arguments)]
pub fn select_replicas_map(
    py: Python<'_>,
    routing_map: &Bound<'_, PyAny>,
    log2phy: &Bound<'_, PyAny>,
    logcnt: &Bound<'_, PyAny>,
    num_replicas: usize,
    offset: u64,
    out_map: &Bound<'_, PyAny>,
    probs: Option<&Bound<'_, PyAny>>,
    out_probs: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let m = TensorArg::new(routing_map, "routing_map")
        .bool()
        .ndim(2, "[num_tokens, num_experts]")
        .read()?;
    let (t_n, e_n) = dims2(&m);
    let (t, c) = table_args(log2phy, logcnt)?;
    if t.shape[0] != e_n {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "log2phy: expected {e_n} experts (the columns of routing_map), got {}",
            t.shape[0]
        )));
    }
    let om = TensorArg::new(out_map, "out_map").bool().shape(&[t_n, num_replicas]).read()?;
    let x = t.shape[1];
    match (Tensor::optional(probs, "probs")?, Tensor::optional(out_probs, "out_probs")?) {
        (None, None) => {
            check_disjoint(&[&om], &[&m, &t, &c])?;
            // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
            // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
            let (ms, ts, cs, oms) = unsafe {
                (m.slice::<bool>(), t.slice::<i64>(), c.slice::<i64>(), om.slice_mut::<bool>())
            };
            run(py, || {
                replica::select_replicas_map::<u8>(
                    ms,
                    t_n,
                    &replica::ReplicaTable {
                        log2phy: ts,
                        max_replicas: x,
                        logcnt: cs,
                        num_replicas,
                    },
                    offset,
                    oms,
                    None,
                )
            })
        }
        (Some(p), Some(op)) => {
            p.expect_shape(&[t_n, e_n])?;
            op.expect_same_dtype(&p)?;
            op.expect_shape(&[t_n, num_replicas])?;
            check_disjoint(&[&om, &op], &[&m, &t, &c, &p])?;
            with_float!(p, |T| {
                // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
                // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
                let (ms, ts, cs, oms, ps, ops) = unsafe {
                    (
                        m.slice::<bool>(),
                        t.slice::<i64>(),
                        c.slice::<i64>(),
                        om.slice_mut::<bool>(),
                        p.slice::<T>(),
                        op.slice_mut::<T>(),
                    )
                };
                run(py, || {
                    replica::select_replicas_map::<T>(
                        ms,
                        t_n,
                        &replica::ReplicaTable {
                            log2phy: ts,
                            max_replicas: x,
                            logcnt: cs,
                            num_replicas,
                        },
                        offset,
                        oms,
                        Some((ps, ops)),
                    )
                })
            })
        }
        _ => Err(pyo3::exceptions::PyValueError::new_err("probs and out_probs go together")),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rebalance_experts, m)?)?;
    m.add_function(wrap_pyfunction!(improve_placement, m)?)?;
    m.add_function(wrap_pyfunction!(fill_log2phy, m)?)?;
    m.add_function(wrap_pyfunction!(placement_metrics, m)?)?;
    m.add_function(wrap_pyfunction!(predict_load, m)?)?;
    m.add_function(wrap_pyfunction!(backtest_predictor, m)?)?;
    m.add_function(wrap_pyfunction!(plan_migration, m)?)?;
    m.add_function(wrap_pyfunction!(decide_migration, m)?)?;
    m.add_function(wrap_pyfunction!(select_replicas, m)?)?;
    m.add_function(wrap_pyfunction!(select_replicas_map, m)?)?;
    Ok(())
}
