//! Bindings of the exchange's route (moerail_core::a2a::route): one call plans the exchange
//! from the gathered counts and builds this rank's route; the returned `Route` holds every
//! index the dispatch, the combine and their backwards move rows by.

use moerail_core::a2a::{
    cost::Links,
    layout,
    plan::{self, Counts, Pass, RowFormat},
    route::Route,
    Strategy, Topology,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::tensor::{check_disjoint, run, to_py_err, DType, Tensor};

/// How the tokens travel: `flat`, `2dh`, `dedup` or `allgather`.
#[pyclass(
    module = "moerail._native",
    name = "Strategy",
    eq,
    frozen,
    hash,
    from_py_object
)]
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
            stages.append((st.name, int64_bytes(py, &st.rows)))?;
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

fn int64_bytes<'py>(py: Python<'py>, v: &[i64]) -> Bound<'py, PyBytes> {
    let raw: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
    PyBytes::new(py, &raw)
}

/// One rank's route of one exchange (see `route`). Index arrays come as native-endian int64
/// bytes (`torch.frombuffer(bytearray(b), dtype=torch.int64)`).
#[pyclass(module = "moerail._native", name = "Route")]
pub struct PyRoute {
    route: Route,
    plans: Py<PyDict>,
}

#[pymethods]
impl PyRoute {
    /// The chosen strategy.
    #[getter]
    fn strategy(&self) -> PyStrategy {
        PyStrategy(self.route.plan.strategy)
    }

    /// Every candidate's plan (stages and traffic per pass) and the index of the chosen one.
    #[getter]
    fn plans(&self, py: Python<'_>) -> Py<PyDict> {
        self.plans.clone_ref(py)
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
        Ok(int64_bytes(py, &self.hop_at(i)?.index))
    }

    /// Rows of the last receive buffer in output order, as int64 bytes.
    fn out_rows<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        int64_bytes(py, &self.route.out_rows)
    }

    /// Token strategies: the entry of each output row holding its slot, as int64 bytes.
    fn out_entries<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        int64_bytes(py, &self.route.out_entries)
    }

    /// Copy strategies: `token * topk + entry` of each row of hop 0, as int64 bytes.
    fn rows_entry<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
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
        let b = Tensor::from_py(buf, "buf")?;
        b.expect_dtype(&[DType::U8], "uint8")?;
        b.expect_ndim(2, "[rows, row_bytes]")?;
        let stride = b.shape[1];
        // SAFETY: from_py checked that `buf` is a contiguous host tensor of `numel` uint8 and
        // the tensor outlives the call; it is only read.
        let bs = unsafe { b.slice::<u8>() };
        let route = &mut self.route;
        run(py, || route.arrive(hop, bs, stride, ids_offset, num_ids))
    }
}

impl PyRoute {
    fn hop_at(&self, i: usize) -> PyResult<&moerail_core::a2a::route::Hop> {
        self.route.hops.get(i).ok_or_else(|| {
            to_py_err(moerail_core::error::invalid(
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
    let g = Tensor::from_py(gathered, "counts")?;
    g.expect_dtype(&[DType::I64], "int64")?;
    g.expect_ndim(2, "[ranks, counts]")?;
    let tp = Topology::new(g.shape[0], ranks_per_node, slots_per_rank).map_err(to_py_err)?;
    let s = Tensor::from_py(slots, "slots")?;
    s.expect_dtype(&[DType::I64], "int64")?;
    s.expect_ndim(2, "[num_tokens, topk]")?;
    let k = s.shape[1];
    let cands: Vec<Strategy> = strategies.iter().map(|p| p.0).collect();
    // SAFETY: from_py checked both are contiguous host int64 tensors of `numel` elements; they
    // outlive the call and are only read.
    let (gs, ss) = unsafe { (g.slice::<i64>(), s.slice::<i64>()) };
    let lk = links.0;
    let (route, plans, secs, best, fmt) = run(py, || {
        let counts = Counts::from_gathered(gs, &tp)?;
        let fmt = RowFormat {
            hidden,
            hidden_elem,
            prob_elem: 4,
            entries: counts.entries,
            probs_grad,
        };
        let (plans, secs, best) = plan::plan_best(&cands, &tp, &counts, &fmt, &lk)?;
        let route = Route::new(plans[best].clone(), &counts, rank, ss, k)?;
        Ok((route, plans, secs, best, fmt))
    })?;
    let plans = plans_dict(py, &plans, &secs, best, &fmt, &lk)?.unbind();
    Ok(PyRoute { route, plans })
}

fn routing_map_arg(obj: &Bound<'_, PyAny>) -> PyResult<(Tensor, usize, usize)> {
    let m = Tensor::from_py(obj, "routing_map")?;
    m.expect_dtype(&[DType::Bool], "bool")?;
    m.expect_ndim(2, "[num_tokens, num_experts]")?;
    let (t, e) = (m.shape[0], m.shape[1]);
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
    run(py, || layout::max_row_count(ms, t, e))
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
    let o = Tensor::from_py(out, "out")?;
    o.expect_dtype(&[DType::I64], "int64")?;
    o.expect_ndim(2, "[num_tokens, width]")?;
    ensure_rows(&o, t)?;
    let width = o.shape[1];
    check_disjoint(&[&o], &[&m])?;
    // SAFETY: from_py checked contiguous host tensors of t * e bools and t * width int64, and
    // that they do not overlap; both outlive the call.
    let (ms, os) = unsafe { (m.slice::<bool>(), o.slice_mut::<i64>()) };
    run(py, || layout::compact_routing_map(ms, t, e, width, os))
}

fn ensure_rows(o: &Tensor, rows: usize) -> PyResult<()> {
    if o.shape[0] != rows {
        return Err(to_py_err(moerail_core::error::invalid(
            "out",
            format!(
                "expected {rows} rows (the tokens of routing_map), got {}",
                o.shape[0]
            ),
        )));
    }
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(a2a_max_row_count, m)?)?;
    m.add_function(wrap_pyfunction!(a2a_compact_routing_map, m)?)?;
    m.add_class::<PyStrategy>()?;
    m.add_class::<PyLinks>()?;
    m.add_class::<PyRoute>()?;
    m.add_function(wrap_pyfunction!(a2a_route, m)?)?;
    Ok(())
}
