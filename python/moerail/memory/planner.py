"""The planner: the per-layer keep / recompute / swap / recompute_exchange plan with the least
exposed step time under a device memory budget (``moerail_core::memory``, exact for its model),
and the same model applied to any plan, Megatron's static settings among them.

The model (the core crate's ``memory`` module documents it in full): the peak is the static
bytes plus the kept activations of the micro-batches in flight on Megatron's 1F1B or interleaved
schedule (replayed step by step for this stage: ``p - rank`` for 1F1B) plus one layer's
transient (its buffers and what it rebuilds or swaps back in); the exposed time is the
recomputation, the repeated exchanges, and the swap copies the compute between a layer's forward
and its backward cannot hide, with all swaps sharing the host link.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .. import _native
from . import exact
from .costs import MemoryCosts
from .plan import MODULES, Action, LayerPlan, MemoryPlan
from .simcosts import costs_to_core

__all__ = [
    "MEGATRON_OFFLOAD_MODULES",
    "MEGATRON_RECOMPUTE_MODULES",
    "StaticSetting",
    "evaluate_plan",
    "megatron_static_plans",
    "parse_bytes",
    "plan_memory",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_bytes(value: Union[str, int, float], name: str = "budget_bytes") -> int:
    """Bytes from an int, a float or a string such as ``"60GiB"``, ``"60 GB"``, ``"64e9"``
    (``G`` alone means GiB). Raises ``ValueError`` naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a size such as 60GiB, got {value!r}")
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}: expected a size such as 60GiB, 64GB or 68719476736, got {value!r}")
        x = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{name}: expected a size such as 60GiB, got {type(value).__name__}")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a positive size, got {value!r}")
    return int(x)


# The core's action name for a row rebuilt whole (in every module of the row).
_WHOLE = "recompute_layer"


def _rows(costs: MemoryCosts, plan: MemoryPlan) -> List[List[str]]:
    rows = []
    for lc in costs.layers:
        if plan.recompute_layer(lc.layer, lc.vpp_stage):
            rows.append([_WHOLE] * len(MODULES))
        else:
            rows.append([plan.action(lc.layer, m, lc.vpp_stage).value for m in MODULES])
    known = {(lc.layer, lc.vpp_stage) for lc in costs.layers}
    for lp in plan.layers:
        if (lp.layer, lp.vpp_stage) not in known:
            raise ValueError(
                f"plan: layer {lp.layer} (vpp stage {lp.vpp_stage}) is not one of this device's layers "
                f"({', '.join(str(lc.layer) for lc in costs.layers)})"
            )
    return rows


def _to_plan(costs: MemoryCosts, rows: Sequence[Sequence[str]], ev: Mapping[str, Any], budget: Optional[int]) -> MemoryPlan:
    layers = tuple(
        LayerPlan(lc.layer, {}, lc.vpp_stage, recompute_layer=True)
        if all(a == _WHOLE for a in row)
        else LayerPlan(lc.layer, {m: Action(a) for m, a in zip(MODULES, row) if a != "keep"}, lc.vpp_stage)
        for lc, row in zip(costs.layers, rows)
    )
    evaluation = dict(ev)
    evaluation["step_seconds_keep_all"] = costs.step_seconds
    evaluation["routing_skew"] = costs.routing_skew
    return MemoryPlan(
        layers,
        budget_bytes=budget,
        predicted_peak_bytes=float(ev["peak_bytes"]),
        predicted_added_seconds=float(ev["added_seconds"]),
        host_bytes=int(math.ceil(ev["host_bytes"])),
        evaluation=evaluation,
    )


def plan_memory(
    costs: MemoryCosts,
    budget_bytes: Union[int, float, str],
    *,
    allow_swap: bool = True,
    allow_recompute_exchange: bool = True,
    allow_recompute: bool = True,
    frontier_limit: int = 512,
) -> MemoryPlan:
    """The plan with the least exposed step time whose predicted peak fits ``budget_bytes``
    (an int, or a string such as ``"60GiB"``) on the device ``costs`` describes.

    ``allow_swap`` needs ``costs.host_bytes`` and a host link. The plan's ``evaluation`` holds
    the model's numbers (``peak_bytes``, ``activation_bytes`` and ``activation_bytes_keep_all``
    in flight, ``transient_bytes``, ``host_bytes``, ``added_seconds`` split into
    ``recompute_seconds`` / ``exchange_seconds`` / ``swap_exposed_seconds``, and ``exact``: the
    solve is optimal for the model unless a frontier passed ``frontier_limit``).

    Raises ``ValueError`` naming the argument: a budget not above the weights, gradients and
    optimizer state (``budget_bytes``), more than the device, a budget no plan reaches (with the
    least that is reachable), plans that would need more host memory than given (``host_bytes``).
    """
    if not isinstance(costs, MemoryCosts):
        raise TypeError(f"costs: expected a MemoryCosts, got {type(costs).__name__}")
    budget = parse_bytes(budget_bytes, "budget_bytes")
    for name, v in (
        ("allow_swap", allow_swap),
        ("allow_recompute_exchange", allow_recompute_exchange),
        ("allow_recompute", allow_recompute),
    ):
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    if isinstance(frontier_limit, bool) or not isinstance(frontier_limit, int) or frontier_limit < 16:
        raise ValueError(f"frontier_limit: expected an int >= 16, got {frontier_limit!r}")
    if costs.exact_model:
        return _plan_exact(costs, budget, allow_swap, allow_recompute_exchange, allow_recompute)
    out = json.loads(
        _native.memory.plan(
            costs_to_core(costs), float(budget), allow_swap, allow_recompute_exchange, allow_recompute, frontier_limit
        )
    )
    ev = dict(out["evaluation"])
    ev["exact"] = bool(out["exact"])
    return _to_plan(costs, out["actions"], ev, budget)


def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB ({b:.0f} B)" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _plan_exact(costs: MemoryCosts, budget: int, allow_swap: bool, allow_exchange: bool,
                allow_recompute: bool) -> MemoryPlan:
    if budget <= costs.static_bytes:
        raise ValueError(
            f"budget_bytes: {_size(budget)} is not above the weights, gradients and optimizer state "
            f"({_size(costs.static_bytes)})"
        )
    if budget > costs.device_bytes:
        raise ValueError(f"budget_bytes: {_size(budget)} is more than the device's {_size(costs.device_bytes)}")
    assignment, ev, is_exact = exact.search(costs, float(budget), allow_swap=allow_swap,
                                            allow_recompute=allow_recompute, allow_exchange=allow_exchange)
    if assignment is None:
        what = "recomputed or swapped" if allow_swap and costs.host_bytes > 0 else "recomputed"
        raise ValueError(
            f"budget_bytes: {_size(budget)} cannot be reached: the least this device needs is "
            f"{_size(ev['peak_bytes'])} ({_size(costs.static_bytes)} static + activations with the most {what})"
        )
    ev = dict(ev)
    ev["exact"] = bool(is_exact)
    return _to_plan(costs, exact.rows_of(assignment, costs), ev, budget)


def evaluate_plan(
    costs: MemoryCosts, plan: MemoryPlan, budget_bytes: Union[int, float, str, None] = None
) -> MemoryPlan:
    """``plan`` with the model's prediction for ``costs`` filled in (peak, added seconds, host
    bytes, ``evaluation``). Refuses (``ValueError``) a plan that names layers this device does
    not hold, swaps without host memory or beyond it, or peaks over ``budget_bytes`` when given.
    """
    if not isinstance(costs, MemoryCosts):
        raise TypeError(f"costs: expected a MemoryCosts, got {type(costs).__name__}")
    if not isinstance(plan, MemoryPlan):
        raise TypeError(f"plan: expected a MemoryPlan, got {type(plan).__name__}")
    budget = None if budget_bytes is None else parse_bytes(budget_bytes, "budget_bytes")
    rows = _rows(costs, plan)
    if costs.exact_model:
        ev = exact.evaluate(costs, exact.assignment_of(plan, costs))
        if budget is not None and ev["peak_bytes"] > budget:
            raise ValueError(
                f"budget_bytes: the plan's predicted peak {ev['peak_bytes'] / 2**30:.2f} GiB is over the budget "
                f"{budget / 2**30:.2f} GiB"
            )
        if ev["host_bytes"] > costs.host_bytes + 1e-9:
            raise ValueError(
                f"plan: its swaps need {ev['host_bytes'] / 2**30:.2f} GiB of host memory, more than host_bytes "
                f"{costs.host_bytes / 2**30:.2f} GiB"
            )
        ev["exact"] = True
        return _to_plan(costs, rows, ev, budget)
    ev = json.loads(
        _native.memory.evaluate(costs_to_core(costs), rows, None if budget is None else float(budget))
    )
    return _to_plan(costs, rows, ev, budget)


# ----------------------------------------------------------------------------- Megatron's settings

# Megatron-Core 0.19's choices (TransformerConfig.recompute_modules / offload_modules) that
# touch what a MoE transformer layer saves, and the moerail modules each one decides.
MEGATRON_RECOMPUTE_MODULES: Tuple[str, ...] = ("core_attn", "mla_up_proj", "layernorm", "moe_act", "shared_experts", "moe")
MEGATRON_OFFLOAD_MODULES: Tuple[str, ...] = ("attn_norm", "core_attn", "expert_fc1", "moe_act")
_MEG_RECOMPUTE = {
    "layernorm": {"layernorm": Action.RECOMPUTE},
    "core_attn": {"attention": Action.RECOMPUTE},
    "mla_up_proj": {"mla_up_proj": Action.RECOMPUTE},
    "moe_act": {"expert_act": Action.RECOMPUTE},
    "shared_experts": {"shared_expert": Action.RECOMPUTE},
    "moe": {
        "router": Action.RECOMPUTE,
        "expert_fc1": Action.RECOMPUTE_EXCHANGE,
        "expert_act": Action.RECOMPUTE,
        "shared_expert": Action.RECOMPUTE,
    },
}
_MEG_OFFLOAD = {
    "attn_norm": {"layernorm": Action.SWAP},
    # Megatron's core_attn offload moves every tensor core attention saves, with MLA the
    # up-projected queries, keys and values (its inputs, mla_up_proj's outputs) too.
    "core_attn": {"attention": Action.SWAP, "mla_up_proj": Action.SWAP},
    "expert_fc1": {"expert_fc1": Action.SWAP},
    "moe_act": {"expert_act": Action.SWAP},
}


@dataclass(frozen=True)
class StaticSetting:
    """One of Megatron's static settings and its plan: ``recompute`` (the ``recompute_modules``,
    or ``("full",)``), ``offload`` (the ``offload_modules``)."""

    recompute: Tuple[str, ...]
    offload: Tuple[str, ...]
    plan: MemoryPlan

    @property
    def name(self) -> str:
        parts = []
        if self.recompute == ("full",):
            parts.append("full recompute")
        elif self.recompute:
            parts.append("recompute_modules=" + ",".join(self.recompute))
        if self.offload:
            parts.append("offload_modules=" + ",".join(self.offload))
        return "; ".join(parts) or "keep all"


def megatron_static_plans(
    costs: MemoryCosts, *, multi_latent_attention: Optional[bool] = None, offload: bool = True
) -> List[StaticSetting]:
    """Every combination of Megatron's ``recompute_modules`` (and, with ``offload`` and host
    memory, ``offload_modules``) that Megatron accepts for this model, plus full recompute, as
    uniform plans evaluated by the same model. Combinations Megatron refuses (offloading inside a
    recomputed ``moe``, ``mla_up_proj`` without MLA) or that decide the same modules the same
    way are left out; those that swap past the host memory too."""
    has = set()
    for lc in costs.layers:
        has.update(m for m, c in lc.modules.items() if c.saved_bytes > 0 or c.recompute_saved_bytes > 0)
    mla = multi_latent_attention
    rec_names = [n for n in MEGATRON_RECOMPUTE_MODULES if n != "mla_up_proj" or mla]
    if "shared_expert" not in has:
        rec_names = [n for n in rec_names if n != "shared_experts"]
    off_names = list(MEGATRON_OFFLOAD_MODULES) if offload and costs.host_bytes > 0 else []
    seen = set()
    out: List[StaticSetting] = []

    def add(recompute: Tuple[str, ...], off: Tuple[str, ...], actions: Dict[str, Action], whole: bool = False) -> None:
        actions = {} if whole else {m: a for m, a in actions.items() if m in has}
        key = tuple(sorted((m, a.value) for m, a in actions.items()))
        if key in seen and recompute != ("full",):
            return
        seen.add(key)
        plan = MemoryPlan(
            tuple(LayerPlan(lc.layer, dict(actions), lc.vpp_stage, recompute_layer=whole) for lc in costs.layers)
        )
        try:
            plan = evaluate_plan(costs, plan)
        except ValueError:
            return  # swaps past the host memory
        out.append(StaticSetting(recompute, off, plan))

    for r in range(len(rec_names) + 1):
        for rec in itertools.combinations(rec_names, r):
            for k in range(len(off_names) + 1):
                for off in itertools.combinations(off_names, k):
                    if "moe" in rec and {"expert_fc1", "moe_act"} & set(off):
                        continue
                    actions: Dict[str, Action] = {}
                    for o in off:
                        actions.update(_MEG_OFFLOAD[o])
                    for n in rec:
                        actions.update(_MEG_RECOMPUTE[n])  # recompute wins over offload
                    add(rec, off, actions)
    if costs.layers and all(lc.input_bytes is not None for lc in costs.layers):
        # What Megatron's full recompute does: every layer rebuilt from its input.
        add(("full",), (), {}, whole=True)
    else:
        # Without the layers' input sizes: every module recomputed, the closest the model says.
        full = {m: Action.RECOMPUTE for m in has}
        if "expert_fc1" in has:
            full["expert_fc1"] = Action.RECOMPUTE_EXCHANGE
        add(("full",), (), full)
    return out


def best_static(settings: Iterable[StaticSetting], budget_bytes: float) -> Optional[StaticSetting]:
    """The Megatron setting with the least added time whose predicted peak fits the budget."""
    fits = [s for s in settings if s.plan.predicted_peak_bytes <= budget_bytes * (1 + 1e-9)]
    return min(fits, key=lambda s: s.plan.predicted_added_seconds, default=None)
