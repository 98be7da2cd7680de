"""Expert placement: ``rebalance_experts`` (EPLB's format, ``mode="eplb"`` or ``"refine"``),
``improve_placement``, the ``phy2log`` / ``log2phy`` tables, ``placement_metrics`` and ``lower_bound``."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import _checks, _native
from ._args import _int, _loads, _placement

__all__ = ["rebalance_experts", "improve_placement", "log2phy_from_phy2log", "default_placement", "expand_placement", "placement_metrics", "lower_bound"]

MODES = ("eplb", "refine")


# ------------------------------------------------------------------------------------------------
# placement
# ------------------------------------------------------------------------------------------------


def rebalance_experts(
    weight,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    mode: str = "eplb",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Places and replicates experts so the busiest device carries little more than the mean.

    ``weight [num_layers, num_experts]``: expected load (tokens) per expert, finite and >= 0.
    ``num_replicas`` physical slots per layer (a multiple of ``num_gpus``, at least the number of
    experts), ``num_groups`` expert groups (dividing the number of experts), ``num_nodes`` nodes
    (dividing ``num_gpus``).

    * ``mode="eplb"``: DeepSeek's EPLB, identical output on inputs without ties. Hierarchical
      when ``num_groups % num_nodes == 0`` (groups packed to nodes, replication inside each node,
      replicas packed to its GPUs), else global (one group, one node). Ties go to the lower index.
    * ``mode="refine"``: EPLB followed by improving swaps, re-replication and (hierarchical)
      group swaps between nodes; never a busier device than ``eplb``, same constraints.

    Returns EPLB's ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])`` (int64, CPU):
    ``log2phy[l, e, r]`` is the slot of replica ``r`` of expert ``e``, -1 past ``logcnt[l, e]``.
    """
    w = _loads(weight, "weight")
    num_replicas = _int(num_replicas, "num_replicas")
    num_groups = _int(num_groups, "num_groups")
    num_nodes = _int(num_nodes, "num_nodes")
    num_gpus = _int(num_gpus, "num_gpus")
    _checks.one_of(mode, "mode", MODES)
    num_layers, num_experts = w.shape
    phy2log = torch.empty(num_layers, num_replicas, dtype=torch.int64)
    phyrank = torch.empty_like(phy2log)
    logcnt = torch.empty(num_layers, num_experts, dtype=torch.int64)
    _native.balance.rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus, mode, phy2log, phyrank, logcnt)
    return phy2log, _log2phy(phy2log, phyrank, logcnt), logcnt


def improve_placement(
    weight,
    current_phy2log,
    num_gpus: int,
    num_nodes: int = 1,
    *,
    keep_nodes: Optional[bool] = None,
    max_moves: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebalances incrementally: improves ``current_phy2log [L, R]`` for the loads ``weight [L, E]``
    with ``mode="refine"``'s moves (swapping replicas between devices, giving a replica to another
    expert) instead of placing from scratch, so the migration stays small. At most ``max_moves``
    slots change per layer (default: no limit); the busiest device is never busier than with
    ``current_phy2log``; unchanged slots keep their expert, so ``plan_migration`` moves at most the
    changed slots. ``keep_nodes`` (default: when ``num_nodes > 1`` and every expert's replicas are
    in one node, as in EPLB's hierarchical placements) keeps each expert's replicas in its node.
    Returns ``(phy2log, log2phy, logcnt)`` like :func:`rebalance_experts`."""
    w = _loads(weight, "weight")
    cur = _placement(current_phy2log, "current_phy2log", w.shape[0])
    num_gpus = _int(num_gpus, "num_gpus")
    num_nodes = _int(num_nodes, "num_nodes")
    if max_moves is not None:
        max_moves = _int(max_moves, "max_moves", minimum=0)
    if keep_nodes is None:
        keep_nodes = num_nodes > 1 and cur.shape[1] % num_nodes == 0 and _within_nodes(cur, num_nodes)
    num_layers, num_experts = w.shape
    phy2log = torch.empty_like(cur)
    phyrank = torch.empty_like(cur)
    logcnt = torch.empty(num_layers, num_experts, dtype=torch.int64)
    _native.balance.improve_placement(w, cur, num_gpus, num_nodes, bool(keep_nodes), max_moves, phy2log, phyrank, logcnt)
    return phy2log, _log2phy(phy2log, phyrank, logcnt), logcnt


def _within_nodes(p: torch.Tensor, num_nodes: int) -> bool:
    """Whether every expert's replicas sit in one node."""
    num_layers, num_replicas = p.shape
    node = (torch.arange(num_replicas) // (num_replicas // num_nodes)).expand(num_layers, -1)
    e_max = int(p.max()) + 1 if p.numel() else 1
    lo = torch.full((num_layers, e_max), num_nodes, dtype=torch.int64).scatter_reduce(1, p, node, "amin")
    hi = torch.full((num_layers, e_max), -1, dtype=torch.int64).scatter_reduce(1, p, node, "amax")
    present = hi >= 0
    return bool((lo[present] == hi[present]).all())


def _log2phy(phy2log: torch.Tensor, phyrank: Optional[torch.Tensor], logcnt: torch.Tensor) -> torch.Tensor:
    x = max(int(logcnt.max()) if logcnt.numel() else 1, 1)
    out = torch.empty(phy2log.shape[0], logcnt.shape[1], x, dtype=torch.int64)
    _native.balance.fill_log2phy(phy2log, out, phyrank)
    return out


def log2phy_from_phy2log(phy2log, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log2phy [L, E, X], logcnt [L, E])`` of a placement, replica ranks in ascending slot
    order (for placements that did not come from :func:`rebalance_experts`)."""
    p = _placement(phy2log, "phy2log")
    num_experts = _int(num_experts, "num_experts")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_experts):
        raise ValueError(f"phy2log: expert ids must be in [0, {num_experts})")
    num_layers, num_replicas = p.shape
    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    logcnt.scatter_add_(1, p, torch.ones_like(p))
    if bool((logcnt == 0).any()):
        layer, expert = (logcnt == 0).nonzero()[0].tolist()
        raise ValueError(f"phy2log: layer {layer} has no slot for expert {expert}: every expert needs a replica")
    return _log2phy(p, None, logcnt), logcnt


def default_placement(num_layers: int, num_experts: int, num_gpus: int) -> torch.Tensor:
    """Megatron's layout without replication: expert ``e`` on EP rank ``e // (E / G)``
    (``phy2log[l] = arange(E)``)."""
    num_layers = _int(num_layers, "num_layers", minimum=0)
    num_experts = _int(num_experts, "num_experts")
    num_gpus = _int(num_gpus, "num_gpus")
    if num_experts % num_gpus:
        raise ValueError(f"num_gpus: must divide num_experts ({num_experts}) for the default layout, got {num_gpus}")
    return torch.arange(num_experts, dtype=torch.int64).repeat(num_layers, 1)


def expand_placement(phy2log, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """A placement on more slots per device without moving anything: each device keeps its
    experts and fills its new slots with copies of them, in turn (the state right after a device
    allocates its new slots locally). ``phy2log [L, R0]`` -> ``[L, num_replicas]``; a placement
    that already has ``num_replicas`` slots is returned as is."""
    p = _placement(phy2log, "phy2log")
    num_replicas = _int(num_replicas, "num_replicas")
    num_gpus = _int(num_gpus, "num_gpus")
    num_layers, r0 = p.shape
    if r0 == num_replicas:
        return p
    if r0 == 0 or r0 % num_gpus or num_replicas % num_gpus or num_replicas < r0:
        raise ValueError(
            f"num_replicas: expected a multiple of num_gpus ({num_gpus}) no smaller than the current {r0} slots, "
            f"got {num_replicas}"
        )
    old, new = r0 // num_gpus, num_replicas // num_gpus
    per_device = p.view(num_layers, num_gpus, old)
    idx = torch.arange(new) % old
    return per_device[:, :, idx].reshape(num_layers, num_replicas).contiguous()


def placement_metrics(
    load,
    phy2log,
    num_gpus: int,
    num_nodes: int = 1,
    capacity: Optional[float] = None,
) -> Dict[str, object]:
    """Metrics of a placement for given loads (an expert's load is split evenly over its
    replicas, as :func:`select_replicas` does).

    Per layer (tensors ``[L]`` unless noted): ``device_load [L, G]``, ``node_load [L, N]``,
    ``max_mean_device``, ``max_mean_node``, ``cv_device`` (std / mean), ``lower_bound`` (the best
    max/mean any placement on these slots can reach), ``dropped`` and ``dropped_rate`` (tokens
    over ``capacity`` tokens per slot, 0 without capacity), ``total``. ``summary`` holds floats:
    means over layers, the worst layer, and ``step_max_mean`` = sum of busiest loads / sum of mean
    loads (what a step waits for when layers run one after another).
    """
    w = _loads(load, "load")
    p = _placement(phy2log, "phy2log", w.shape[0])
    num_gpus = _int(num_gpus, "num_gpus")
    num_nodes = _int(num_nodes, "num_nodes")
    if capacity is not None:
        capacity = _checks.real(capacity, "capacity")
    num_layers = w.shape[0]
    device_load = torch.empty(num_layers, num_gpus, dtype=torch.float64)
    node_load = torch.empty(num_layers, num_nodes, dtype=torch.float64)
    scalars = torch.empty(num_layers, 6, dtype=torch.float64)
    _native.balance.placement_metrics(w, p, num_gpus, num_nodes, capacity, device_load, node_load, scalars)
    total = scalars[:, 5]
    dropped = scalars[:, 4]
    out: Dict[str, object] = {
        "device_load": device_load,
        "node_load": node_load,
        "max_mean_device": scalars[:, 0].clone(),
        "max_mean_node": scalars[:, 1].clone(),
        "cv_device": scalars[:, 2].clone(),
        "lower_bound": scalars[:, 3].clone(),
        "dropped": dropped.clone(),
        "dropped_rate": torch.where(total > 0, dropped / total.clamp_min(1e-300), torch.zeros_like(total)),
        "total": total.clone(),
    }
    mean_load = total / num_gpus
    busiest = device_load.max(dim=1).values if num_layers else torch.zeros(0, dtype=torch.float64)
    sum_mean = float(mean_load.sum())
    out["summary"] = {
        "max_mean_device": float(scalars[:, 0].mean()) if num_layers else 1.0,
        "max_mean_device_worst": float(scalars[:, 0].max()) if num_layers else 1.0,
        "max_mean_node": float(scalars[:, 1].mean()) if num_layers else 1.0,
        "cv_device": float(scalars[:, 2].mean()) if num_layers else 0.0,
        "lower_bound": float(scalars[:, 3].mean()) if num_layers else 1.0,
        "step_max_mean": float(busiest.sum()) / sum_mean if sum_mean > 0 else 1.0,
        "dropped_rate": float(dropped.sum() / total.sum()) if float(total.sum()) > 0 else 0.0,
    }
    return out


def lower_bound(load, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """Per layer, the smallest max/mean device load any placement on ``num_replicas`` slots of
    ``num_gpus`` devices can reach: ``max(1, G * min over replica counts of max_e w_e / c_e / W)``."""
    w = _loads(load, "load")
    num_replicas = _int(num_replicas, "num_replicas")
    num_gpus = _int(num_gpus, "num_gpus")
    num_layers, num_experts = w.shape
    # any valid placement gives the same bound: use EPLB's
    p, _, _ = rebalance_experts(w, num_replicas, 1, 1, num_gpus)
    return placement_metrics(w, p, num_gpus)["lower_bound"]
