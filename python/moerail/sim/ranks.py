"""Megatron-Core's process groups of a MoE Parallel Folding layout (:func:`rank_groups`)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .. import _native

__all__ = ["rank_groups"]


# ----------------------------------------------------------------------------- rank groups


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")
    if value >= 2**63:
        raise ValueError(f"{name}: must fit int64, got {value}")
    return value


def rank_groups(
    world_size: int,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    order: str = "tp-cp-ep-dp-pp",
    *,
    num_distributed_optimizer_instances: int = 1,
    hierarchical_context_parallel_sizes: Optional[Sequence[int]] = None,
) -> Dict[str, List[List[int]]]:
    """Every process group Megatron-Core's ``initialize_model_parallel`` creates for a layout.

    Attention layers use the grid ``TP x CP x DP x PP`` and expert layers ``ETP x EP x EDP x
    PP`` over the same ranks (MoE Parallel Folding; ``etp`` defaults to ``tp``, the coupled
    layout). ``order`` lists the dimensions, first fastest, as Megatron's ``RankGenerator``.

    Returns a dict from group kind to its groups (lists of global ranks), in Megatron's order:

    * attention: ``tp``, ``cp``, ``dp``, ``pp``, ``dp-cp`` (gradient reduction of the dense
      parameters), ``tp-cp``, ``tp-dp``, ``tp-dp-cp``, ``tp-pp`` (model parallel),
      ``embedding`` (first and last pipeline rank), ``position-embedding``;
    * experts: ``ep``, ``etp``, ``edp`` (gradient reduction of the experts), ``tp-ep``
      (expert tensor x expert parallel), ``tp-ep-pp``, ``intra-dist-opt-instance``;
    * with several distributed-optimizer instances also ``intra-partial-dp-cp``,
      ``intra-partial-edp``, ``inter-partial-edp``; with hierarchical context parallelism
      ``hierarchical-cp-0``, ``hierarchical-cp-1``, ...

    Raises ValueError naming the argument when the sizes do not fit (as Megatron's asserts).
    """
    world_size = _positive_int("world_size", world_size)
    tp, cp, pp, ep = (_positive_int(n, v) for n, v in (("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep)))
    if etp is not None:
        etp = _positive_int("etp", etp)
    if not isinstance(order, str):
        raise TypeError(f"order: expected a str such as 'tp-cp-ep-dp-pp', got {type(order).__name__}")
    inst = _positive_int("num_distributed_optimizer_instances", num_distributed_optimizer_instances)
    hcp = None
    if hierarchical_context_parallel_sizes is not None:
        hcp = [
            _positive_int("hierarchical_context_parallel_sizes", int(x) if not isinstance(x, bool) else x)
            for x in hierarchical_context_parallel_sizes
        ]
    groups = _native.parallel.rank_groups(world_size, tp, cp, pp, ep, etp, order, inst, hcp)
    return dict(groups)
