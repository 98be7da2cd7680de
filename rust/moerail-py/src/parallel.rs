//! Bindings of `moerail_core::parallel`: Megatron-Core's rank groups of a parallel layout.

use moerail_core::parallel::{LayoutOptions, ParallelLayout};
use pyo3::prelude::*;

use crate::tensor::run;

/// Every process group Megatron-Core's `initialize_model_parallel` creates for the layout:
/// a list of `(kind, groups)` in Megatron's order.
#[pyfunction]
#[pyo3(signature = (world_size, tp, cp, pp, ep, etp, order, num_distributed_optimizer_instances=1, hierarchical_context_parallel_sizes=None))]
#[allow(clippy::too_many_arguments)]
pub fn rank_groups(
    py: Python<'_>,
    world_size: usize,
    tp: usize,
    cp: usize,
    pp: usize,
    ep: usize,
    etp: Option<usize>,
    order: String,
    num_distributed_optimizer_instances: usize,
    hierarchical_context_parallel_sizes: Option<Vec<usize>>,
) -> PyResult<Vec<(String, Vec<Vec<usize>>)>> {
    run(py, move || {
        let opts = LayoutOptions {
            num_distributed_optimizer_instances: Some(num_distributed_optimizer_instances),
            hierarchical_cp: hierarchical_context_parallel_sizes.unwrap_or_default(),
        };
        let layout = ParallelLayout::with_options(world_size, tp, cp, pp, ep, etp, &order, &opts)?;
        Ok(layout.groups()?.into_iter().map(|(k, g)| (k.name(), g)).collect())
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rank_groups, m)?)?;
    Ok(())
}
