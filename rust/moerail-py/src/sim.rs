//! Bindings of the training-step simulator (`moerail_core::sim`). Configurations cross as
//! `(key, value)` pairs; reports come back as JSON text (serde_json of `sim::report`) for
//! `json.loads`.

use moerail_core::sim::config::{sections, SimConfig, Value};
use moerail_core::sim::report::{CandidateReport, SearchReport, SearchResult};
use moerail_core::sim::search::{self, RecomputeChoice, Space};
use moerail_core::sim::{self as core_sim};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::error::to_py_err;
use crate::tensor::run;

fn value(key: &str, obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::None);
    }
    if obj.is_instance_of::<PyBool>() {
        return Ok(Value::Bool(obj.extract()?));
    }
    if obj.is_instance_of::<PyInt>() {
        return obj
            .extract::<i64>()
            .map(Value::Int)
            .map_err(|_| PyTypeError::new_err(format!("{key}: integer out of range")));
    }
    if obj.is_instance_of::<PyFloat>() {
        return Ok(Value::Float(obj.extract()?));
    }
    if obj.is_instance_of::<PyString>() {
        return Ok(Value::Str(obj.extract()?));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let items: Vec<Bound<'_, PyAny>> = obj.try_iter()?.collect::<PyResult<_>>()?;
        if items.iter().all(|i| i.is_instance_of::<PyString>()) && !items.is_empty() {
            return Ok(Value::StrList(items.iter().map(|i| i.extract()).collect::<PyResult<_>>()?));
        }
        let mut ints = Vec::with_capacity(items.len());
        for i in &items {
            if i.is_instance_of::<PyInt>() || i.is_instance_of::<PyBool>() {
                ints.push(i.extract::<i64>()?);
            } else {
                return Err(PyTypeError::new_err(format!(
                    "{key}: expected a list of integers or of strings, got an element of type {}",
                    i.get_type().name()?
                )));
            }
        }
        return Ok(Value::IntList(ints));
    }
    Err(PyTypeError::new_err(format!(
        "{key}: expected a number, string, boolean, list or None, got {}",
        obj.get_type().name()?
    )))
}

fn config(entries: &Bound<'_, PyAny>) -> PyResult<SimConfig> {
    let mut cfg = SimConfig::default();
    for item in entries.try_iter()? {
        let item = item?;
        let (key, obj): (String, Bound<'_, PyAny>) = item.extract().map_err(|_| {
            PyTypeError::new_err("config entries: expected (key, value) pairs".to_string())
        })?;
        let v = value(&key, &obj)?;
        cfg.set(&key, &v).map_err(to_py_err)?;
    }
    Ok(cfg)
}

/// Simulates one training step; returns the report as JSON text.
#[pyfunction]
pub fn sim_simulate(py: Python<'_>, entries: &Bound<'_, PyAny>) -> PyResult<String> {
    let cfg = config(entries)?;
    run(py, move || {
        let e = core_sim::simulate(&cfg)?;
        to_json(&e.report(&cfg))
    })
}

/// The configuration sections and their keys.
#[pyfunction]
pub fn sim_keys() -> Vec<(String, Vec<String>)> {
    sections()
        .into_iter()
        .map(|(s, k)| (s.to_string(), k.into_iter().map(str::to_string).collect()))
        .collect()
}

fn usizes(d: &Bound<'_, PyDict>, key: &str) -> PyResult<Vec<usize>> {
    match d.get_item(key)? {
        None => Ok(Vec::new()),
        Some(v) if v.is_none() => Ok(Vec::new()),
        Some(v) => v.extract().map_err(|_| {
            PyTypeError::new_err(format!("{key}: expected a list of positive integers"))
        }),
    }
}

fn space(d: Option<&Bound<'_, PyDict>>) -> PyResult<Space> {
    let Some(d) = d else {
        return Ok(Space::default());
    };
    for k in d.keys() {
        let k: String = k.extract()?;
        if !["tp", "cp", "pp", "vpp", "ep", "etp", "mbs", "recompute"].contains(&k.as_str()) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{k}: unknown search dimension (expected tp, cp, pp, vpp, ep, etp, mbs, recompute)"
            )));
        }
    }
    let mut s = Space {
        tp: usizes(d, "tp")?,
        cp: usizes(d, "cp")?,
        pp: usizes(d, "pp")?,
        vpp: usizes(d, "vpp")?,
        ep: usizes(d, "ep")?,
        etp: usizes(d, "etp")?,
        mbs: usizes(d, "mbs")?,
        recompute: Vec::new(),
    };
    for (name, v) in [
        ("tp", &s.tp),
        ("cp", &s.cp),
        ("pp", &s.pp),
        ("vpp", &s.vpp),
        ("ep", &s.ep),
        ("etp", &s.etp),
        ("mbs", &s.mbs),
    ] {
        if v.contains(&0) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{name}: sizes must be >= 1"
            )));
        }
    }
    if let Some(r) = d.get_item("recompute")? {
        let names: Vec<String> = r.extract().map_err(|_| {
            PyTypeError::new_err("recompute: expected a list of strings".to_string())
        })?;
        s.recompute = names
            .iter()
            .map(|n| RecomputeChoice::parse(n))
            .collect::<moerail_core::Result<_>>()
            .map_err(to_py_err)?;
    }
    Ok(s)
}

/// A report as JSON text (`json.loads` reads it; non-finite numbers become `null`).
fn to_json<T: serde::Serialize>(value: &T) -> moerail_core::Result<String> {
    serde_json::to_string(value).map_err(|e| moerail_core::Error::Internal(e.to_string()))
}

/// Enumerates and simulates the layouts of `space` for the configuration; returns JSON
/// `{"results": [{"layout": ..., "report": ...}], "stats": {...}}` with the `top` fastest.
/// `progress(done, total)` is called between chunks of layouts (with the GIL held).
#[pyfunction]
#[pyo3(signature = (entries, space=None, top=10, include_oom=false, progress=None))]
pub fn sim_search(
    py: Python<'_>,
    entries: &Bound<'_, PyAny>,
    space: Option<&Bound<'_, PyDict>>,
    top: usize,
    include_oom: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let base = config(entries)?;
    let sp = self::space(space)?;
    let mut interrupted: Option<PyErr> = None;
    let out = {
        let interrupted = &mut interrupted;
        run(py, move || {
            let cands = search::enumerate(&base, &sp)?;
            let mut cb = |done: usize, total: usize| -> bool {
                Python::attach(|py| {
                    if let Err(e) = py.check_signals() {
                        *interrupted = Some(e);
                        return false;
                    }
                    if let Some(f) = &progress {
                        if let Err(e) = f.call1(py, (done, total)) {
                            *interrupted = Some(e);
                            return false;
                        }
                    }
                    true
                })
            };
            let (best, stats) = search::search(&base, &cands, top, include_oom, &mut cb)?;
            let results = best
                .iter()
                .map(|r| {
                    let mut report = r.evaluation.report(&r.candidate.apply(&base));
                    if r.candidate.recompute == RecomputeChoice::Plan {
                        // The memory plan's peak, not the keep-all one the stages hold.
                        let gib = 1024.0 * 1024.0 * 1024.0;
                        report.memory_gib.total = r.evaluation.memory_peak / gib;
                        report.memory_gib.fits = r.evaluation.fits;
                        report.fits = r.evaluation.fits;
                    }
                    SearchResult { layout: CandidateReport::from(&r.candidate), report }
                })
                .collect();
            to_json(&SearchReport { results, stats })
        })
    };
    if let Some(e) = interrupted {
        return Err(e);
    }
    out
}

/// The memory planner's costs for one stage (`None`: the stage with the most memory) from the
/// simulator's model, as JSON `{"costs": <core MemoryCosts>, "step_seconds", "stage",
/// "head_bytes"}`.
#[pyfunction]
#[pyo3(signature = (entries, stage=None, host_bytes=0.0))]
pub fn sim_memory_costs(
    py: Python<'_>,
    entries: &Bound<'_, PyAny>,
    stage: Option<usize>,
    host_bytes: f64,
) -> PyResult<String> {
    let cfg = config(entries)?;
    run(py, move || {
        let s = moerail_core::sim::memory::memory_costs(&cfg, stage, host_bytes)?;
        to_json(&serde_json::json!({
            "costs": s.costs,
            "step_seconds": s.step_seconds,
            "stage": s.stage,
            "head_bytes": s.head_bytes,
            "qkv_internal_bytes": s.qkv_internal_bytes,
            "qkv_output_bytes": s.qkv_output_bytes,
            "core_attn_recompute": s.core_attn_recompute,
        }))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sim_memory_costs, m)?)?;
    m.add_function(wrap_pyfunction!(sim_simulate, m)?)?;
    m.add_function(wrap_pyfunction!(sim_keys, m)?)?;
    m.add_function(wrap_pyfunction!(sim_search, m)?)?;
    Ok(())
}
