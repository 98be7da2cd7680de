//! Bindings of moerail_core::ep: the dispatch layout, the plans of the four strategies with
//! their traffic and cost, and the row indices the dispatcher moves rows by. Python allocates
//! every output tensor; Rust checks and fills it.

use moerail_core::ep::{
    cost::Links,
    dispatch_layout, exec,
    plan::{self, Counts, Pass, RowFormat},
    EpGroup, Strategy,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::args::{check_disjoint, dims2, TensorArg};
use crate::error::to_py_err;
use crate::tensor::{run, Tensor};

fn topo(ranks: usize, ranks_per_node: usize, slots_per_rank: usize) -> PyResult<EpGroup> {
    EpGroup::new(ranks, ranks_per_node, slots_per_rank).map_err(to_py_err)
}

/// `slots [T, K]` int64 (-1 = empty) as (tensor, T, K).
fn slots_arg(obj: &Bound<'_, PyAny>) -> PyResult<(Tensor, usize, usize)> {
    let t = TensorArg::new(obj, "slots").int64().ndim(2, "[num_tokens, topk]").read()?;
    let (n, k) = dims2(&t);
    Ok((t, n, k))
}

/// A packed exchange buffer `[rows, stride]` uint8.
fn buf_arg(obj: &Bound<'_, PyAny>) -> PyResult<(Tensor, usize)> {
    let t = TensorArg::new(obj, "buf").uint8().ndim(2, "[rows, row_bytes]").read()?;
    let stride = t.shape[1];
    Ok((t, stride))
}

/// This rank's all-gather vector: `[status, tokens, max entries, hash, slot counts [R],
/// tokens per rank [W], tokens per node [N]]` of `slots [T, K]`, written into `out`. Slot ids are
/// always range-checked; `verify` also rejects a row that lists a slot twice (slots chosen from
/// a routing map by `select_replicas` never do).
#[pyfunction]
#[pyo3(signature = (slots, ranks, ranks_per_node, slots_per_rank, status, hash, out, verify=true))]
#[allow(clippy::too_many_arguments)]
pub fn a2a_counts(
    py: Python<'_>,
    slots: &Bound<'_, PyAny>,
    ranks: usize,
    ranks_per_node: usize,
    slots_per_rank: usize,
    status: i64,
    hash: i64,
    out: &Bound<'_, PyAny>,
    verify: bool,
) -> PyResult<()> {
    let tp = topo(ranks, ranks_per_node, slots_per_rank)?;
    let (s, n, k) = slots_arg(slots)?;
    let o = TensorArg::new(out, "out").int64().len(Counts::vector_len(&tp)).read()?;
    check_disjoint(&[&o], &[&s])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ss, os) = unsafe { (s.slice::<i64>(), o.slice_mut::<i64>()) };
    run(py, || {
        let l = dispatch_layout::layout(ss, n, k, &tp, None, verify)?;
        Counts::write_vector(&l, n, status, hash, os)
    })
}

fn pass_dict<'py>(
    py: Python<'py>,
    p: &plan::Plan,
    fmt: &RowFormat,
    pass: Pass,
    links: &Links,
) -> PyResult<Bound<'py, PyDict>> {
    let t = p.traffic(fmt, pass, links);
    let row = fmt.row(p.strategy.copy_rows(), pass);
    let d = PyDict::new(py);
    d.set_item("row_bytes", t.row_bytes)?;
    d.set_item("hidden_bytes", row.hidden_bytes)?;
    d.set_item("probs_offset", row.probs_off)?;
    d.set_item("num_probs", row.probs)?;
    d.set_item("ids_offset", row.ids_off)?;
    d.set_item("num_ids", row.ids)?;
    d.set_item("node_bytes", t.node_bytes)?;
    d.set_item("intra_node_bytes", t.intra_bytes)?;
    d.set_item("inter_node_bytes", t.inter_bytes)?;
    d.set_item("local_bytes", t.local_bytes)?;
    d.set_item("inter_node_rows", t.inter_rows)?;
    d.set_item("messages", t.messages)?;
    d.set_item("stage_seconds", t.stage_seconds)?;
    d.set_item("seconds", t.seconds)?;
    Ok(d)
}

/// Plans of `strategies` for the gathered vectors `[W, V]` (see `a2a_counts`). Returns
/// `{"best": i, "entries": n, "plans": [{"strategy", "seconds", "stages": [(name, rows as int64 bytes)],
/// "passes": {pass: traffic}}]}`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn a2a_plan<'py>(
    py: Python<'py>,
    gathered: &Bound<'py, PyAny>,
    ranks: usize,
    ranks_per_node: usize,
    slots_per_rank: usize,
    strategies: Vec<String>,
    hidden: usize,
    hidden_elem: usize,
    prob_elem: usize,
    probs_grad: bool,
    links: (f64, f64, f64, f64, f64, f64, f64),
) -> PyResult<Bound<'py, PyDict>> {
    let tp = topo(ranks, ranks_per_node, slots_per_rank)?;
    let g = TensorArg::new(gathered, "counts").int64().read()?;
    let cands = strategies
        .iter()
        .map(|s| Strategy::parse(s))
        .collect::<moerail_core::Result<Vec<_>>>()
        .map_err(to_py_err)?;
    let lk = Links {
        intra_bw: links.0,
        inter_bw: links.1,
        node_bw: links.2,
        intra_latency: links.3,
        inter_latency: links.4,
        local_bw: links.5,
        stage_overhead: links.6,
    };
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let gs = unsafe { g.slice::<i64>() };
    let (counts, plans, secs, best) = run(py, || {
        let counts = Counts::from_gathered(gs, &tp)?;
        let fmt = RowFormat { hidden, hidden_elem, prob_elem, entries: counts.entries, probs_grad };
        let (plans, secs, best) = plan::plan_best(&cands, &tp, &counts, &fmt, &lk)?;
        Ok((counts, plans, secs, best))
    })?;
    let fmt = RowFormat { hidden, hidden_elem, prob_elem, entries: counts.entries, probs_grad };
    let out = PyDict::new(py);
    out.set_item("best", best)?;
    out.set_item("entries", counts.entries)?;
    let list = PyList::empty(py);
    for (p, s) in plans.iter().zip(&secs) {
        let d = PyDict::new(py);
        d.set_item("strategy", p.strategy.name())?;
        d.set_item("seconds", *s)?;
        let stages = PyList::empty(py);
        for st in &p.stages {
            // The [W, W] rows as native-endian int64 bytes (a list of W^2 Python ints costs
            // milliseconds at W = 64).
            let raw: Vec<u8> = st.rows.iter().flat_map(|v| v.to_ne_bytes()).collect();
            stages.append((st.name, PyBytes::new(py, &raw)))?;
        }
        d.set_item("stages", stages)?;
        let passes = PyDict::new(py);
        for pass in Pass::ALL {
            passes.set_item(pass.name(), pass_dict(py, p, &fmt, pass, &lk)?)?;
        }
        d.set_item("passes", passes)?;
        list.append(d)?;
    }
    out.set_item("plans", list)?;
    Ok(out)
}

/// The copy rows of `slots [T, K]` grouped by slot in the send order (`order[s]`: slot `s`'s
/// position; None: slot order), ascending by token inside a slot: writes each row's token and
/// entry (`t * K + j`) and the rows per slot (slot order).
#[pyfunction]
#[pyo3(signature = (slots, num_slots, order, rows_token, rows_entry, counts))]
pub fn a2a_copy_rows(
    py: Python<'_>,
    slots: &Bound<'_, PyAny>,
    num_slots: usize,
    order: Option<Vec<i64>>,
    rows_token: &Bound<'_, PyAny>,
    rows_entry: &Bound<'_, PyAny>,
    counts: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (s, n, k) = slots_arg(slots)?;
    let rt = TensorArg::new(rows_token, "rows_token").int64().ndim(1, "[rows]").read()?;
    let re = TensorArg::new(rows_entry, "rows_entry").int64().len(rt.numel).read()?;
    let c = TensorArg::new(counts, "counts").int64().len(num_slots).read()?;
    check_disjoint(&[&rt, &re, &c], &[&s])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ss, rts, res, cs) = unsafe {
        (s.slice::<i64>(), rt.slice_mut::<i64>(), re.slice_mut::<i64>(), c.slice_mut::<i64>())
    };
    run(py, || exec::copy_layout(ss, n, k, num_slots, order.as_deref(), rts, res, cs))
}

/// The `dedup` send order of `slots [T, K]`: for each node, its tokens ascending.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn a2a_node_send_index(
    py: Python<'_>,
    slots: &Bound<'_, PyAny>,
    ranks: usize,
    ranks_per_node: usize,
    slots_per_rank: usize,
    node_tokens: Vec<i64>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let tp = topo(ranks, ranks_per_node, slots_per_rank)?;
    let (s, n, k) = slots_arg(slots)?;
    let total: i64 = node_tokens.iter().sum();
    let o = TensorArg::new(out, "out").int64().len(total.max(0) as usize).read()?;
    check_disjoint(&[&o], &[&s])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (ss, os) = unsafe { (s.slice::<i64>(), o.slice_mut::<i64>()) };
    run(py, || dispatch_layout::node_send_index(ss, n, k, &tp, &node_tokens, os))
}

/// The forwarding order of `dedup` / `allgather` on a rank of `node`: for each local rank,
/// the received rows of `buf` with a slot on it. `expected[g]` is the plan's count.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn a2a_forward_index(
    py: Python<'_>,
    buf: &Bound<'_, PyAny>,
    ids_offset: usize,
    num_ids: usize,
    ranks: usize,
    ranks_per_node: usize,
    slots_per_rank: usize,
    node: usize,
    expected: Vec<i64>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let tp = topo(ranks, ranks_per_node, slots_per_rank)?;
    let (b, stride) = buf_arg(buf)?;
    let total: i64 = expected.iter().sum();
    let o = TensorArg::new(out, "out").int64().len(total.max(0) as usize).read()?;
    check_disjoint(&[&o], &[&b])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (bs, os) = unsafe { (b.slice::<u8>(), o.slice_mut::<i64>()) };
    run(py, || exec::forward_index(bs, stride, ids_offset, num_ids, &tp, node, &expected, os))
}

/// The output rows of `dedup` / `allgather` on `rank`, grouped by local slot, then source
/// rank, then arrival: the received row and the entry holding the slot of each.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn a2a_expand_index(
    py: Python<'_>,
    buf: &Bound<'_, PyAny>,
    ids_offset: usize,
    num_ids: usize,
    blocks: Vec<i64>,
    ranks: usize,
    ranks_per_node: usize,
    slots_per_rank: usize,
    rank: usize,
    expected: Vec<i64>,
    out_rows: &Bound<'_, PyAny>,
    out_entries: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let tp = topo(ranks, ranks_per_node, slots_per_rank)?;
    let (b, stride) = buf_arg(buf)?;
    let total: i64 = expected.iter().sum();
    let r = TensorArg::new(out_rows, "out_rows").int64().len(total.max(0) as usize).read()?;
    let e = TensorArg::new(out_entries, "out_entries").int64().len(total.max(0) as usize).read()?;
    check_disjoint(&[&r, &e], &[&b])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (bs, rs, es) = unsafe { (b.slice::<u8>(), r.slice_mut::<i64>(), e.slice_mut::<i64>()) };
    run(py, || {
        exec::expand_index(bs, stride, ids_offset, num_ids, &blocks, &tp, rank, &expected, rs, es)
    })
}

/// Rows of `a x b` blocks (`a`-major, `sizes[i * b + j]` rows each) in `b`-major order: the
/// input row of each output row.
#[pyfunction]
pub fn a2a_block_order(
    py: Python<'_>,
    sizes: Vec<i64>,
    a: usize,
    b: usize,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let o = TensorArg::new(out, "out").int64().ndim(1, "[rows]").read()?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let os = unsafe { o.slice_mut::<i64>() };
    run(py, || exec::block_order(&sizes, a, b, os))
}

/// Gathered vectors `[W, V]` from copies per (rank, slot) `[W, R]` and tokens per rank `[W]`
/// alone, the token-level counts estimated (see moerail_core::ep::plan::estimate_token_counts).
#[pyfunction]
pub fn a2a_estimate_counts(
    py: Python<'_>,
    slot_counts: &Bound<'_, PyAny>,
    tokens: &Bound<'_, PyAny>,
    ranks: usize,
    ranks_per_node: usize,
    slots_per_rank: usize,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let tp = topo(ranks, ranks_per_node, slots_per_rank)?;
    let sc = TensorArg::new(slot_counts, "tokens_per_expert")
        .int64()
        .shape(&[ranks, tp.slots()])
        .read()?;
    let tk = TensorArg::new(tokens, "num_tokens").int64().len(ranks).read()?;
    let v = Counts::vector_len(&tp);
    let o = TensorArg::new(out, "out").int64().shape(&[ranks, v]).read()?;
    check_disjoint(&[&o], &[&sc, &tk])?;
    // SAFETY: slice types are the dtypes checked above (`slice` asserts the size), lengths the
    // tensors' `numel`, outputs disjoint (check_disjoint); the tensors outlive the call.
    let (scs, tks, os) = unsafe { (sc.slice::<i64>(), tk.slice::<i64>(), o.slice_mut::<i64>()) };
    run(py, || {
        let c = plan::estimate_token_counts(scs, tks, &tp)?;
        let (r_n, n_n) = (tp.slots(), tp.nodes());
        for (src, row) in os.chunks_exact_mut(v).enumerate() {
            let l = dispatch_layout::DispatchLayout {
                slot_counts: c.slot_counts[src * r_n..(src + 1) * r_n].to_vec(),
                rank_tokens: c.rank_tokens[src * ranks..(src + 1) * ranks].to_vec(),
                node_tokens: c.node_tokens[src * n_n..(src + 1) * n_n].to_vec(),
                max_entries: c.entries,
            };
            Counts::write_vector(&l, c.tokens[src] as usize, 0, 0, row)?;
        }
        Ok(())
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(a2a_counts, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_plan, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_estimate_counts, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_copy_rows, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_node_send_index, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_forward_index, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_expand_index, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_block_order, m)?)?;
    Ok(())
}
