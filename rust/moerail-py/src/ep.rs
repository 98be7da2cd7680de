//! Bindings of moerail_core::ep: the dispatch layout, the plans of the four strategies with
//! their traffic and cost, and the route of one exchange (`a2a_route`: plan, choice and this
//! rank's indices in one call, returned as a typed `Route`). `Strategy` and `Links` are typed
//! values parsed and checked once.

use moerail_core::ep::{
    cost::Links,
    dispatch_layout, exec,
    plan::{self, Counts, Pass, RowFormat},
    route::{Hop, Route},
    EpGroup, Strategy,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::args::{check_disjoint, dims2, TensorArg};
use crate::error::to_py_err;
use crate::tensor::{run, Tensor};
use moerail_core::error::invalid;

fn topo(ranks: usize, ranks_per_node: usize, slots_per_rank: usize) -> PyResult<EpGroup> {
    EpGroup::new(ranks, ranks_per_node, slots_per_rank).map_err(to_py_err)
}

/// `slots [T, K]` int64 (-1 = empty) as (tensor, T, K).
fn slots_arg(obj: &Bound<'_, PyAny>) -> PyResult<(Tensor, usize, usize)> {
    let t = TensorArg::new(obj, "slots").int64().ndim(2, "[num_tokens, topk]").read()?;
    let (n, k) = dims2(&t);
    Ok((t, n, k))
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

/// Plans of `strategies` for the gathered vectors `[W, V]` (see `a2a_counts`) on `links`:
/// `{"best": i, "entries": n, "plans": [{"strategy", "seconds", "stages": [(name, rows as int64
/// bytes)], "passes": {pass: traffic}}]}`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn a2a_plan<'py>(
    py: Python<'py>,
    gathered: &Bound<'py, PyAny>,
    ranks: usize,
    ranks_per_node: usize,
    slots_per_rank: usize,
    strategies: Vec<PyStrategy>,
    hidden: usize,
    hidden_elem: usize,
    prob_elem: usize,
    probs_grad: bool,
    links: PyLinks,
) -> PyResult<Bound<'py, PyDict>> {
    let tp = topo(ranks, ranks_per_node, slots_per_rank)?;
    let g = TensorArg::new(gathered, "counts").int64().read()?;
    let cands: Vec<Strategy> = strategies.iter().map(|s| s.0).collect();
    let lk = links.0;
    // SAFETY: an int64 host tensor of `numel` elements (checked above, `slice` asserts the
    // size); it outlives the call and is only read.
    let gs = unsafe { g.slice::<i64>() };
    let (plans, secs, best, fmt) = run(py, || {
        let counts = Counts::from_gathered(gs, &tp)?;
        let fmt = RowFormat { hidden, hidden_elem, prob_elem, entries: counts.entries, probs_grad };
        let (plans, secs, best) = plan::plan_best(&cands, &tp, &counts, &fmt, &lk)?;
        Ok((plans, secs, best, fmt))
    })?;
    plans_dict(py, &plans, &secs, best, &fmt, &lk)
}

/// How the tokens travel: `flat`, `2dh`, `dedup` or `allgather`.
#[pyclass(module = "moerail._native", name = "Strategy", eq, frozen, hash, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PyStrategy(pub Strategy);

#[pymethods]
impl PyStrategy {
    /// Parses one strategy name.
    #[new]
    fn new(name: &str) -> PyResult<Self> {
        Strategy::parse(name).map(PyStrategy).map_err(to_py_err)
    }

    /// The candidates of a `strategy` argument: every strategy for `"auto"`, else the one named.
    #[staticmethod]
    fn candidates(strategy: &str) -> PyResult<Vec<PyStrategy>> {
        if strategy == "auto" {
            return Ok(Strategy::ALL.iter().map(|&s| PyStrategy(s)).collect());
        }
        Ok(vec![Self::new(strategy)?])
    }

    #[getter]
    fn name(&self) -> &'static str {
        self.0.name()
    }

    /// Whether rows are (token, slot) copies (`flat`, `2dh`), else one row per token and
    /// destination (`dedup`, `allgather`).
    #[getter]
    fn copy_rows(&self) -> bool {
        self.0.copy_rows()
    }

    fn __repr__(&self) -> String {
        format!("Strategy('{}')", self.0.name())
    }
}

/// The link parameters of the cost model, checked once.
#[pyclass(module = "moerail._native", name = "Links", frozen, from_py_object)]
#[derive(Clone)]
pub struct PyLinks(pub Links);

#[pymethods]
impl PyLinks {
    #[new]
    #[pyo3(signature = (intra_node_bw, inter_node_bw, node_bw, latency, inter_node_latency, local_bw, stage_overhead))]
    fn new(
        intra_node_bw: f64,
        inter_node_bw: f64,
        node_bw: f64,
        latency: f64,
        inter_node_latency: f64,
        local_bw: f64,
        stage_overhead: f64,
    ) -> PyResult<Self> {
        let l = Links {
            intra_bw: intra_node_bw,
            inter_bw: inter_node_bw,
            node_bw,
            intra_latency: latency,
            inter_latency: inter_node_latency,
            local_bw,
            stage_overhead,
        };
        l.check().map_err(to_py_err)?;
        Ok(PyLinks(l))
    }
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

/// `{"best": i, "entries": n, "plans": [{"strategy", "seconds", "stages": [(name, rows as
/// int64 bytes)], "passes": {pass: traffic}}]}` of planned candidates.
pub fn plans_dict<'py>(
    py: Python<'py>,
    plans: &[plan::Plan],
    secs: &[f64],
    best: usize,
    fmt: &RowFormat,
    links: &Links,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("best", best)?;
    out.set_item("entries", fmt.entries)?;
    let list = PyList::empty(py);
    for (p, s) in plans.iter().zip(secs) {
        let d = PyDict::new(py);
        d.set_item("strategy", p.strategy.name())?;
        d.set_item("seconds", *s)?;
        let stages = PyList::empty(py);
        for st in &p.stages {
            // The [W, W] rows as native-endian int64 bytes (a list of W^2 Python ints costs
            // milliseconds at W = 64).
            stages.append((st.name, int64_bytes(py, &st.rows)?))?;
        }
        d.set_item("stages", stages)?;
        let passes = PyDict::new(py);
        for pass in Pass::ALL {
            passes.set_item(pass.name(), pass_dict(py, p, fmt, pass, links)?)?;
        }
        d.set_item("passes", passes)?;
        list.append(d)?;
    }
    out.set_item("plans", list)?;
    Ok(out)
}

fn int64_bytes<'py>(py: Python<'py>, v: &[i64]) -> PyResult<Bound<'py, PyBytes>> {
    // Written into the bytes object in place: a byte iterator collected into a Vec first cost
    // a dispatch tens of microseconds per index array.
    let n = v.len() * 8;
    PyBytes::new_with(py, n, |buf| {
        for (b, x) in buf.chunks_exact_mut(8).zip(v) {
            b.copy_from_slice(&x.to_ne_bytes());
        }
        Ok(())
    })
}

/// One rank's route of one exchange (see `route`). Index arrays come as native-endian int64
/// bytes (`torch.frombuffer(bytearray(b), dtype=torch.int64)`).
///
/// Every candidate's plan is kept in Rust: a dispatch needs only the chosen plan's row layout
/// of each pass it runs (`pass_layout`), and building every candidate's traffic as Python
/// objects on each dispatch cost more than planning them.
#[pyclass(module = "moerail._native", name = "Route")]
pub struct PyRoute {
    route: Route,
    plans: Vec<plan::Plan>,
    secs: Vec<f64>,
    best: usize,
    fmt: RowFormat,
    links: Links,
}

#[pymethods]
impl PyRoute {
    /// The chosen strategy.
    #[getter]
    fn strategy(&self) -> PyStrategy {
        PyStrategy(self.route.plan.strategy)
    }

    /// Every candidate's plan (stages and traffic per pass) and the index of the chosen one,
    /// built on each call.
    #[getter]
    fn plans<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        plans_dict(py, &self.plans, &self.secs, self.best, &self.fmt, &self.links)
    }

    /// The chosen plan's row layout and traffic of one pass (`dispatch`, `dispatch_backward`,
    /// `combine`, `combine_backward`): `plans["plans"][best]["passes"][pass]`.
    fn pass_layout<'py>(&self, py: Python<'py>, pass_: &str) -> PyResult<Bound<'py, PyDict>> {
        let p = Pass::ALL
            .into_iter()
            .find(|p| p.name() == pass_)
            .ok_or_else(|| {
                to_py_err(invalid(
                    "pass_",
                    format!("expected dispatch, dispatch_backward, combine or combine_backward, got {pass_:?}"),
                ))
            })?;
        pass_dict(py, &self.route.plan, &self.fmt, p, &self.links)
    }

    #[getter]
    fn num_tokens(&self) -> usize {
        self.route.num_tokens
    }

    #[getter]
    fn topk(&self) -> usize {
        self.route.topk
    }

    #[getter]
    fn entries(&self) -> usize {
        self.route.entries
    }

    #[getter]
    fn num_hops(&self) -> usize {
        self.route.hops.len()
    }

    /// `(stage, send [W], recv [W])` of hop `i`.
    fn hop(&self, i: usize) -> PyResult<(&'static str, Vec<i64>, Vec<i64>)> {
        let h = self.hop_at(i)?;
        Ok((h.stage, h.send.clone(), h.recv.clone()))
    }

    /// The rows hop `i` gathers from the previous buffer (hop 0: tokens), as int64 bytes.
    fn hop_index<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyBytes>> {
        int64_bytes(py, &self.hop_at(i)?.index)
    }

    /// Rows of the last receive buffer in output order, as int64 bytes.
    fn out_rows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        int64_bytes(py, &self.route.out_rows)
    }

    /// Token strategies: the entry of each output row holding its slot, as int64 bytes.
    fn out_entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        int64_bytes(py, &self.route.out_entries)
    }

    /// Copy strategies: `token * topk + entry` of each row of hop 0, as int64 bytes.
    fn rows_entry<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        int64_bytes(py, &self.route.rows_entry)
    }

    #[getter]
    fn tokens_per_local_expert(&self) -> Vec<i64> {
        self.route.tokens_per_local_expert.clone()
    }

    /// The hop whose received rows `arrive` must read next (token strategies), or None.
    #[getter]
    fn pending(&self) -> Option<usize> {
        self.route.pending()
    }

    /// Reads the slot ids (`num_ids` int32 at byte `ids_offset` of each row) of the rows that
    /// hop `hop` delivered, `buf [rows, row_bytes]` uint8 on the host.
    fn arrive(
        &mut self,
        py: Python<'_>,
        hop: usize,
        buf: &Bound<'_, PyAny>,
        ids_offset: usize,
        num_ids: usize,
    ) -> PyResult<()> {
        let b = TensorArg::new(buf, "buf").uint8().ndim(2, "[rows, row_bytes]").read()?;
        let stride = b.shape[1];
        // SAFETY: from_py checked that `buf` is a contiguous host tensor of `numel` uint8 and
        // the tensor outlives the call; it is only read.
        let bs = unsafe { b.slice::<u8>() };
        let route = &mut self.route;
        run(py, || route.arrive(hop, bs, stride, ids_offset, num_ids))
    }
}

impl PyRoute {
    fn hop_at(&self, i: usize) -> PyResult<&Hop> {
        self.route.hops.get(i).ok_or_else(|| {
            to_py_err(invalid(
                "hop",
                format!("expected a hop in [0, {}), got {i}", self.route.hops.len()),
            ))
        })
    }
}

/// Plans the exchange of the gathered counts `[W, V]` (see `a2a_counts`) over `strategies`,
/// chooses the cheapest on `links` and builds the route of `rank`, whose tokens address
/// `slots [T, K]`: one call, one object.
#[pyfunction]
#[pyo3(signature = (gathered, slots, rank, ranks_per_node, slots_per_rank, strategies, hidden, hidden_elem, probs_grad, links))]
#[allow(clippy::too_many_arguments)]
pub fn a2a_route(
    py: Python<'_>,
    gathered: &Bound<'_, PyAny>,
    slots: &Bound<'_, PyAny>,
    rank: usize,
    ranks_per_node: usize,
    slots_per_rank: usize,
    strategies: Vec<PyStrategy>,
    hidden: usize,
    hidden_elem: usize,
    probs_grad: bool,
    links: PyLinks,
) -> PyResult<PyRoute> {
    let g = TensorArg::new(gathered, "counts").int64().ndim(2, "[ranks, counts]").read()?;
    let tp = topo(g.shape[0], ranks_per_node, slots_per_rank)?;
    let (s, _, k) = slots_arg(slots)?;
    let cands: Vec<Strategy> = strategies.iter().map(|p| p.0).collect();
    // SAFETY: both are int64 host tensors of `numel` elements (checked above); they
    // outlive the call and are only read.
    let (gs, ss) = unsafe { (g.slice::<i64>(), s.slice::<i64>()) };
    let lk = links.0;
    let (route, plans, secs, best, fmt) = run(py, || {
        let counts = Counts::from_gathered(gs, &tp)?;
        let fmt =
            RowFormat { hidden, hidden_elem, prob_elem: 4, entries: counts.entries, probs_grad };
        let (plans, secs, best) = plan::plan_best(&cands, &tp, &counts, &fmt, &lk)?;
        let route = Route::new(plans[best].clone(), &counts, rank, ss, k)?;
        Ok((route, plans, secs, best, fmt))
    })?;
    Ok(PyRoute { route, plans, secs, best, fmt, links: lk })
}

fn routing_map_arg(obj: &Bound<'_, PyAny>) -> PyResult<(Tensor, usize, usize)> {
    let m =
        TensorArg::new(obj, "routing_map").bool().ndim(2, "[num_tokens, num_experts]").read()?;
    let (t, e) = dims2(&m);
    Ok((m, t, e))
}

/// The most experts any token of `routing_map [T, E]` (bool, host) is routed to: the width of
/// its compact form.
#[pyfunction]
pub fn a2a_max_row_count(py: Python<'_>, routing_map: &Bound<'_, PyAny>) -> PyResult<usize> {
    let (m, t, e) = routing_map_arg(routing_map)?;
    // SAFETY: from_py checked a contiguous host bool tensor of t * e elements; it outlives the
    // call and is only read.
    let ms = unsafe { m.slice::<bool>() };
    run(py, || dispatch_layout::max_row_count(ms, t, e))
}

/// The compact form of `routing_map [T, E]` (bool, host) into `out [T, width]` int64: each
/// token's experts ascending, then -1s.
#[pyfunction]
pub fn a2a_compact_routing_map(
    py: Python<'_>,
    routing_map: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (m, t, e) = routing_map_arg(routing_map)?;
    let o = TensorArg::new(out, "out").int64().ndim(2, "[num_tokens, width]").read()?;
    ensure_rows(&o, t)?;
    let width = o.shape[1];
    check_disjoint(&[&o], &[&m])?;
    // SAFETY: from_py checked contiguous host tensors of t * e bools and t * width int64, and
    // that they do not overlap; both outlive the call.
    let (ms, os) = unsafe { (m.slice::<bool>(), o.slice_mut::<i64>()) };
    run(py, || dispatch_layout::compact_routing_map(ms, t, e, width, os))
}

fn ensure_rows(o: &Tensor, rows: usize) -> PyResult<()> {
    if o.shape[0] != rows {
        return Err(to_py_err(invalid(
            "out",
            format!("expected {rows} rows (the tokens of routing_map), got {}", o.shape[0]),
        )));
    }
    Ok(())
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
    m.add_function(wrap_pyfunction!(a2a_route, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_max_row_count, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_compact_routing_map, m)?)?;
    m.add_class::<PyStrategy>()?;
    m.add_class::<PyLinks>()?;
    m.add_class::<PyRoute>()?;
    m.add_function(wrap_pyfunction!(a2a_block_order, m)?)?;
    Ok(())
}
