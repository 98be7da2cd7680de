"""moerail: faster Mixture-of-Experts training that drops into Megatron-Core and MindSpeed.

The ops take and return torch tensors and are registered as torch custom ops
(``torch.ops.moerail.*``) with autograd, so they work under ``torch.compile``.
"""

from __future__ import annotations

import os

import torch  # noqa: F401  (the custom ops need torch loaded first)

from . import _native
from .balance import (
    LinkModel,
    LoadTracker,
    MigrationDecision,
    MigrationPlan,
    allreduce_replica_grads,
    default_placement,
    expand_placement,
    expert_seconds_per_token,
    expert_slot_tensors,
    improve_placement,
    log2phy_from_phy2log,
    lower_bound,
    migrate_experts,
    placement_metrics,
    plan_migration,
    rebalance_experts,
    select_replicas,
    select_replicas_map,
    should_migrate,
)
from .ep import AllToAllDispatcher, AllToAllPlan, plan_all_to_all
from .ops import (
    apply_token_dropping,
    expert_bias_update,
    get_capacity,
    permute,
    permute_by_indices,
    routing_scores_for_aux_loss,
    sequence_load_balancing_loss,
    sort_chunks_by_idxs,
    switch_load_balancing_loss,
    topk_route,
    unpermute,
    z_loss,
)
from .sim import rank_groups

__version__ = _native.__version__

__all__ = [
    "__version__",
    "AllToAllDispatcher",
    "AllToAllPlan",
    "plan_all_to_all",
    "LinkModel",
    "LoadTracker",
    "MigrationDecision",
    "MigrationPlan",
    "allreduce_replica_grads",
    "default_placement",
    "expand_placement",
    "expert_seconds_per_token",
    "expert_slot_tensors",
    "improve_placement",
    "log2phy_from_phy2log",
    "lower_bound",
    "migrate_experts",
    "placement_metrics",
    "plan_migration",
    "rebalance_experts",
    "select_replicas",
    "select_replicas_map",
    "should_migrate",
    "apply_token_dropping",
    "expert_bias_update",
    "get_capacity",
    "get_num_threads",
    "permute",
    "permute_by_indices",
    "rank_groups",
    "routing_scores_for_aux_loss",
    "sequence_load_balancing_loss",
    "set_num_threads",
    "sort_chunks_by_idxs",
    "switch_load_balancing_loss",
    "topk_route",
    "unpermute",
    "z_loss",
]


def set_num_threads(num_threads: int) -> None:
    """Sets the number of threads moerail's CPU ops use (results do not depend on it)."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads: expected an int, got {type(num_threads).__name__}")
    _native.util.set_num_threads(num_threads)


def get_num_threads() -> int:
    """The number of threads moerail's CPU ops use."""
    return _native.util.get_num_threads()


def _default_num_threads() -> int:
    env = os.environ.get("MOERAIL_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
            if n >= 1:
                return n
        except ValueError:
            pass
        raise ValueError(f"MOERAIL_NUM_THREADS: expected a positive integer, got {env!r}")
    return max(1, torch.get_num_threads())


_native.util.set_num_threads(_default_num_threads())
