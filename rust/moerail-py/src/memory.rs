//! Bindings of the activation memory planner (`moerail_core::memory`). Costs cross as JSON text
//! in the core's shape (`moerail.memory.planner` writes it from a `MemoryCosts`); plans and
//! evaluations come back as JSON for `json.loads`.

use moerail_core::memory::{self as core_memory, Action, MemoryCosts, Options, N_MODULES};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serde::Serialize;

use crate::tensor::run;

fn costs(text: &str) -> PyResult<MemoryCosts> {
    serde_json::from_str(text).map_err(|e| PyValueError::new_err(format!("costs: {e}")))
}

fn to_json<T: Serialize>(value: &T) -> moerail_core::Result<String> {
    serde_json::to_string(value).map_err(|e| moerail_core::Error::Internal(e.to_string()))
}

fn actions(rows: Vec<Vec<String>>) -> PyResult<core_memory::Actions> {
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            if row.len() != core_memory::MODULES.len() {
                return Err(PyValueError::new_err(format!(
                    "plan: layer row {i} has {} actions, expected {}",
                    row.len(),
                    core_memory::MODULES.len()
                )));
            }
            let mut out = [Action::Keep; N_MODULES];
            for (j, name) in row.iter().enumerate() {
                out[j] = Action::parse(name).map_err(crate::error::to_py_err)?;
            }
            Ok(out)
        })
        .collect()
}

#[derive(Serialize)]
struct PlanOut<'a> {
    actions: Vec<Vec<&'static str>>,
    evaluation: &'a core_memory::Evaluation,
    exact: bool,
}

/// Solves for the plan with the least exposed time under `budget_bytes`; returns JSON
/// `{"actions": [[one name per module] per layer], "evaluation": {...}, "exact": bool}`.
#[pyfunction]
#[pyo3(signature = (costs_json, budget_bytes, allow_swap=true, allow_recompute_exchange=true, allow_recompute=true, frontier_limit=512))]
pub fn plan(
    py: Python<'_>,
    costs_json: &str,
    budget_bytes: f64,
    allow_swap: bool,
    allow_recompute_exchange: bool,
    allow_recompute: bool,
    frontier_limit: usize,
) -> PyResult<String> {
    let c = costs(costs_json)?;
    let opts = Options {
        budget_bytes,
        allow_swap,
        allow_recompute_exchange,
        allow_recompute,
        frontier_limit,
    };
    run(py, move || {
        let p = core_memory::solve(&c, &opts)?;
        to_json(&PlanOut {
            actions: p.actions.iter().map(|row| row.iter().map(|a| a.name()).collect()).collect(),
            evaluation: &p.evaluation,
            exact: p.exact,
        })
    })
}

/// The exact cost of a given plan (`actions`: one action name per module and layer, in `MODULES` order);
/// refuses one that swaps past the host memory or, with `budget_bytes`, peaks over it.
#[pyfunction]
#[pyo3(signature = (costs_json, actions, budget_bytes=None))]
pub fn evaluate(
    py: Python<'_>,
    costs_json: &str,
    actions: Vec<Vec<String>>,
    budget_bytes: Option<f64>,
) -> PyResult<String> {
    let c = costs(costs_json)?;
    let a = self::actions(actions)?;
    run(py, move || to_json(&core_memory::check(&c, &a, budget_bytes)?))
}

/// The distinct mixes of in-flight micro-batches per model chunk on one stage of Megatron's
/// schedule (1F1B, or interleaved with `virtual_pipeline_size` > 1).
#[pyfunction]
pub fn inflight_mixes(
    pipeline_size: usize,
    pipeline_rank: usize,
    virtual_pipeline_size: usize,
    num_microbatches: usize,
) -> PyResult<Vec<Vec<u32>>> {
    let s = core_memory::Schedule {
        pipeline_size,
        pipeline_rank,
        virtual_pipeline_size,
        num_microbatches,
    };
    s.validate().map_err(crate::error::to_py_err)?;
    Ok(s.inflight_mixes())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("BudgetUnreachableError", m.py().get_type::<crate::error::BudgetUnreachableError>())?;
    m.add("MAX_PREFETCH_GROUPS", moerail_core::memory::MAX_PREFETCH_GROUPS)?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(inflight_mixes, m)?)?;
    Ok(())
}
