"""The planner: the per-layer keep / recompute / swap / recompute_exchange plan with the least
exposed step time under a device memory budget (``moerail_core::memory``, exact for its model),
and the same model applied to any plan, Megatron's static settings among them.

The model (the core crate's ``memory`` module documents it in full): the peak is the static
bytes plus the kept activations of the micro-batches in flight on Megatron's 1F1B or interleaved
schedule (replayed step by step for this stage: ``p - rank`` for 1F1B) plus one layer's
transient (its buffers and what it rebuilds or swaps back in); the exposed time is the
recomputation, the repeated exchanges, and the swap copies moerail's executor cannot hide as it
issues them (a group's copies back start one group ahead within a model chunk: the chunk's first
group waits for its own, :mod:`.timeline` replays it), never less than the planner's bound (the
copy out and back in against the compute between a layer's forward and its backward), with all
swaps sharing the host link.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .. import _native
from . import exact
from .costs import MemoryCosts
from .plan import MODULES, Action, LayerPlan, MegatronFlags, MemoryPlan, _megatron_settings, check_prefetch
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


def _to_plan(costs: MemoryCosts, rows: Sequence[Sequence[str]], ev: Mapping[str, Any], budget: Optional[int],
             lookahead: int = 1, prefetch_groups: int = 1) -> MemoryPlan:
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
        lookahead=lookahead,
        prefetch_groups=prefetch_groups,
    )


def plan_memory(
    costs: MemoryCosts,
    budget_bytes: Union[int, float, str],
    *,
    allow_swap: bool = True,
    allow_recompute_exchange: bool = True,
    allow_recompute: bool = True,
    frontier_limit: int = 512,
    lookahead: Union[int, str] = 1,
    prefetch_groups: Union[int, str] = 1,
) -> MemoryPlan:
    """The plan with the least exposed step time whose predicted peak fits ``budget_bytes``
    (an int, or a string such as ``"60GiB"``) on the device ``costs`` describes.

    ``lookahead``: the executor's (:class:`~moerail.memory.executor.Executor`); swaps are priced
    as that executor copies them back, so the plan keeps or recomputes what it cannot hide (with
    1, the last layer's ``mlp`` group of each model chunk, first in the chunk's backward). With 2
    the executor copies the next backward chunk's first group back ahead, and those bytes stay on
    the device through the forward before that backward: the plan's peak counts them in full
    (``evaluation["ahead_bytes"]``, from :func:`.timeline.executor_swap_wait`), and the plan is
    searched under the budget less them until it fits, or is the plan for 1 if that costs less.
    ``prefetch_groups`` (the executor's, with ``lookahead`` >= 1): how many groups ahead within a
    model chunk's backward a group's start copies back; from 2 the copies of a later layer are on
    the device during the running layer's backward, and the peak counts them the same way.
    ``"auto"`` for either (lookahead 1 or 2; 1 to 3 groups): the plan for each is searched and the
    one whose swaps the executor's replay (:func:`executor_added_seconds`) times cheapest wins,
    the fewer copies ahead on a tie; for a setting whose replayed copies wait longer than the
    planner priced them, the plans for a host link 0.8 and 0.6 times as fast are replayed too (the
    planner prices each layer's copies alone on the link, where the executor's queue behind each
    other: a plan made for a slower link leaves them slack), and the cheapest replay wins. The
    plan carries the settings it was made for (``plan.lookahead``, ``plan.prefetch_groups``), and
    the executor runs it with them.

    ``allow_swap`` needs ``costs.host_bytes`` and a host link. The plan's ``evaluation`` holds
    the model's numbers (``peak_bytes``, ``activation_bytes`` and ``activation_bytes_keep_all``
    in flight, ``transient_bytes``, ``host_bytes``, ``added_seconds`` split into
    ``recompute_seconds`` / ``exchange_seconds`` / ``swap_exposed_seconds`` (of which
    ``swap_wait_seconds`` are the executor's waits for its copies back; ``swap_bound_seconds`` is
    the planner's bound alone), and ``exact``: the solve is optimal for the model unless a
    frontier passed ``frontier_limit``).

    Raises ``ValueError`` naming the argument: a budget not above the weights, gradients and
    optimizer state (``budget_bytes``), more than the device; :class:`BudgetUnreachableError` (a
    ``ValueError``) where no plan reaches the budget (with the least that is reachable), or the
    plans that do need more host memory than given (``host_bytes``).
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
    if lookahead == "auto" or prefetch_groups == "auto":
        return _plan_choosing_prefetch(costs, budget, allow_swap, allow_recompute_exchange, allow_recompute,
                                       frontier_limit, lookahead, prefetch_groups)  # fmt: skip
    check_prefetch(lookahead, prefetch_groups)
    args = (allow_swap, allow_recompute_exchange, allow_recompute, frontier_limit, lookahead, prefetch_groups)
    if lookahead < 2 and prefetch_groups < 2:
        return _plan(costs, budget, *args)

    def with_ahead(plan: MemoryPlan) -> MemoryPlan:
        return _with_ahead(costs, plan, budget, lookahead, prefetch_groups)

    found: List[MemoryPlan] = []
    inner, ahead = budget, 0.0
    for _ in range(8):
        try:
            plan = with_ahead(_plan(costs, inner, *args))
        except BudgetUnreachableError:
            if inner == budget:
                raise
            break  # no plan at this inner budget; any other error is a bug and propagates
        ahead = plan.evaluation["ahead_bytes"]
        if plan.predicted_peak_bytes <= budget:
            found.append(plan)
            break
        # Below this plan's own peak by what overflowed: the solver's plans are discrete, and a
        # budget cut only by the overflow may give back the same plan.
        inner = int(min(inner, math.floor(plan.predicted_peak_bytes - ahead))) - int(math.ceil(plan.predicted_peak_bytes - budget))
        if inner <= costs.static_bytes:
            break
    # The plan for lookahead=1 keeps what that executor cannot hide (each chunk's first group),
    # so it holds little ahead: run with more copies ahead it may fit where the plans above do
    # not, or cost less than one searched under a budget cut by the bytes ahead.
    if allow_swap and not costs.exact_model:
        one = evaluate_plan(costs, _plan(costs, budget, *args[:-2], 1, 1), lookahead=lookahead,
                            prefetch_groups=prefetch_groups)  # fmt: skip
        one.evaluation["exact"] = False
        one = with_ahead(one)
        if one.predicted_peak_bytes <= budget:
            found.append(one)
    if found:
        return min(found, key=lambda p: p.predicted_added_seconds)
    raise BudgetUnreachableError(
        f"budget_bytes: {_size(budget)} cannot be reached with lookahead={lookahead}, "
        f"prefetch_groups={prefetch_groups}: the copies ahead ({_size(ahead)}) do not fit beside the plan; "
        f"lookahead=1 with prefetch_groups=1 does not hold them"
    )


def _with_ahead(costs: MemoryCosts, plan: MemoryPlan, budget: int, lookahead: int, prefetch_groups: int) -> MemoryPlan:
    """``plan`` with what its executor's copies ahead hold on the device added to its peak."""
    from .timeline import executor_swap_wait

    ahead = executor_swap_wait(costs, _rows(costs, plan), MODULES, lookahead=lookahead,
                               prefetch_groups=prefetch_groups)["ahead_bytes"]  # fmt: skip
    ev = dict(plan.evaluation)
    ev["ahead_bytes"] = ahead
    ev["peak_bytes"] = plan.predicted_peak_bytes + ahead
    return replace(plan, budget_bytes=budget, predicted_peak_bytes=ev["peak_bytes"], evaluation=ev,
                   lookahead=lookahead, prefetch_groups=prefetch_groups)


# Host links the plans are also searched for, as fractions of the real one, under "auto": the
# planner prices each layer's copies back alone on the link, and the executor's copies queue behind
# each other's; a plan made for a slower link leaves them slack, and the replay decides.
_LINK_SLACK = (0.8, 0.6)
# Replayed waits beyond the planner's price that count as queueing (seconds a step).
_QUEUE_TOL_S = 1e-3
# The slack plans are candidates for the replay to judge: a smaller frontier keeps their solves short.
_SLACK_FRONTIER = 32


def _plan_choosing_prefetch(costs: MemoryCosts, budget: int, allow_swap: bool, allow_recompute_exchange: bool,
                            allow_recompute: bool, frontier_limit: int, lookahead: Union[int, str],
                            prefetch_groups: Union[int, str]) -> MemoryPlan:
    """``plan_memory`` with ``"auto"`` for the executor's ``lookahead`` and / or ``prefetch_groups``:
    the plans for every candidate, the cheapest as the executor's replay times it."""
    las = (1, 2) if lookahead == "auto" else (lookahead,)
    gs = (1, 2, 3) if prefetch_groups == "auto" and lookahead != 0 else (prefetch_groups,)
    if gs == ("auto",):
        gs = (1,)  # lookahead 0 copies nothing ahead
    for la in las:
        for g in gs:
            check_prefetch(la, g)
    if not (allow_swap and costs.host_bytes > 0) or costs.exact_model:
        # Nothing swaps, or the profiled model times swaps alike for every setting: the fewest
        # copies ahead (the least held) plan at least as well.
        las, gs = las[:1], gs[:1]
    found: List[Tuple[float, MemoryPlan]] = []
    first_error = None
    for la in las:
        for g in gs:
            try:
                plan = plan_memory(costs, budget, allow_swap=allow_swap, allow_recompute_exchange=allow_recompute_exchange,
                                   allow_recompute=allow_recompute, frontier_limit=frontier_limit, lookahead=la,
                                   prefetch_groups=g)  # fmt: skip
            except BudgetUnreachableError as e:
                first_error = first_error or e
                continue
            found.append((executor_added_seconds(costs, plan)["added_seconds"], plan))
    if not found:
        raise first_error
    if allow_swap and costs.host_bytes > 0 and not costs.exact_model:
        # Where the replay's copies wait longer than the planner priced them, they queued behind each
        # other on the link: the plans made for a slower link leave them slack.
        for added, plan in list(found):
            la, g, priced = plan.lookahead, plan.prefetch_groups, plan.predicted_added_seconds
            for f in _LINK_SLACK:
                if added <= priced + _QUEUE_TOL_S:
                    break
                slow = replace(costs, host_link_bytes_per_second=costs.host_link_bytes_per_second * f)
                try:
                    made = plan_memory(slow, budget, allow_swap=True, allow_recompute_exchange=allow_recompute_exchange,
                                       allow_recompute=allow_recompute, frontier_limit=min(frontier_limit, _SLACK_FRONTIER),
                                       lookahead=la, prefetch_groups=g)  # fmt: skip
                except BudgetUnreachableError:
                    break
                # Priced again on the real link, with its copies ahead in the peak.
                plan = evaluate_plan(costs, MemoryPlan(made.layers, lookahead=la, prefetch_groups=g))
                plan = _with_ahead(costs, replace(plan, evaluation={**plan.evaluation, "exact": False}), budget, la, g)
                if plan.predicted_peak_bytes > budget or plan.host_bytes > costs.host_bytes:
                    break
                added, priced = executor_added_seconds(costs, plan)["added_seconds"], plan.predicted_added_seconds
                found.append((added, plan))
    # The cheapest replay; on a tie the first found (the fewest copies ahead, the real link).
    return min(found, key=lambda x: x[0])[1]


# No plan reaches the budget (with the host memory given): the core raises it, the exact model's
# search too; plan_memory with copies ahead takes it as "try no lower budget".
BudgetUnreachableError = _native.memory.BudgetUnreachableError


def _plan(costs: MemoryCosts, budget: int, allow_swap: bool, allow_recompute_exchange: bool,
          allow_recompute: bool, frontier_limit: int, lookahead: int, prefetch_groups: int) -> MemoryPlan:
    if costs.exact_model:
        return _plan_exact(costs, budget, allow_swap, allow_recompute_exchange, allow_recompute)
    out = json.loads(
        _native.memory.plan(
            costs_to_core(costs, lookahead, prefetch_groups), float(budget), allow_swap, allow_recompute_exchange,
            allow_recompute, frontier_limit,
        )
    )
    ev = dict(out["evaluation"])
    ev["exact"] = bool(out["exact"])
    return _to_plan(costs, out["actions"], ev, budget, lookahead, prefetch_groups)


def _size(b: float) -> str:
    """A size in a message, as the core writes them (GiB; MiB or bytes for small ones)."""
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b:.0f} B"


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
        raise BudgetUnreachableError(
            f"budget_bytes: {_size(budget)} cannot be reached: the least this device needs is "
            f"{_size(ev['peak_bytes'])} ({_size(costs.static_bytes)} static + activations with the most {what})"
        )
    ev = dict(ev)
    ev["exact"] = bool(is_exact)
    return _to_plan(costs, exact.rows_of(assignment, costs), ev, budget)


def evaluate_plan(
    costs: MemoryCosts, plan: MemoryPlan, budget_bytes: Union[int, float, str, None] = None, *,
    lookahead: Optional[int] = None, prefetch_groups: Optional[int] = None,
) -> MemoryPlan:
    """``plan`` with the model's prediction for ``costs`` filled in (peak, added seconds, host
    bytes, ``evaluation``), its swaps priced as moerail's executor with ``lookahead`` and
    ``prefetch_groups`` (by default the plan's) copies them back (as :func:`plan_memory` does). Refuses (``ValueError``) a plan that names layers this
    device does not hold, swaps without host memory or beyond it, or peaks over ``budget_bytes``
    when given.
    """
    if not isinstance(costs, MemoryCosts):
        raise TypeError(f"costs: expected a MemoryCosts, got {type(costs).__name__}")
    if not isinstance(plan, MemoryPlan):
        raise TypeError(f"plan: expected a MemoryPlan, got {type(plan).__name__}")
    budget = None if budget_bytes is None else parse_bytes(budget_bytes, "budget_bytes")
    lookahead = plan.lookahead if lookahead is None else lookahead
    prefetch_groups = plan.prefetch_groups if prefetch_groups is None else prefetch_groups
    check_prefetch(lookahead, prefetch_groups)
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
        return _to_plan(costs, rows, ev, budget, lookahead, prefetch_groups)
    ev = json.loads(
        _native.memory.evaluate(costs_to_core(costs, lookahead, prefetch_groups), rows,
                                None if budget is None else float(budget))
    )
    return _to_plan(costs, rows, ev, budget, lookahead, prefetch_groups)


# ----------------------------------------------------------------------------- Megatron's settings

# Megatron-Core 0.19's choices (TransformerConfig.recompute_modules / offload_modules) that
# touch what a MoE transformer layer saves, and the moerail modules each one decides.
MEGATRON_RECOMPUTE_MODULES: Tuple[str, ...] = ("core_attn", "mla_up_proj", "layernorm", "moe_act", "shared_experts", "moe")
# Not compared: ``fused_group_mlp``, which needs TransformerEngine's op fuser (one group for the
# whole grouped expert MLP, in place of ``expert_fc1`` and ``moe_act``).
MEGATRON_OFFLOAD_MODULES: Tuple[str, ...] = (
    "attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm", "expert_fc1", "moe_act",
)  # fmt: skip
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
# On measured costs, as uniform plans: the module whose saved tensors each offload moves. The
# two norms are one module (``layernorm``); ``qkv_linear`` (the input norm's output, saved by the
# QKV projection inside ``attention``) has no module of its own there and is evaluated on
# simulator costs only.
_MEG_OFFLOAD = {
    "attn_norm": {"layernorm": Action.SWAP},
    "mlp_norm": {"layernorm": Action.SWAP},
    # Megatron's core_attn offload moves every tensor core attention saves, with MLA the
    # up-projected queries, keys and values (its inputs, mla_up_proj's outputs) too.
    "core_attn": {"attention": Action.SWAP, "mla_up_proj": Action.SWAP},
    "attn_proj": {"attention": Action.SWAP},
    "expert_fc1": {"expert_fc1": Action.SWAP},
    "moe_act": {"expert_act": Action.SWAP},
}


# Megatron settings that recompute a module and offload the input its recompute holds (the norms'
# inputs, the residual stream; fc1's output): one module, two actions, which a moerail plan (one
# action per module) does not have.
_RECOMPUTE_AND_OFFLOAD = {"layernorm": ("attn_norm", "mlp_norm"), "moe_act": ("moe_act",)}


@dataclass(frozen=True)
class StaticSetting:
    """One of Megatron's static settings and its plan: ``recompute`` (the ``recompute_modules``,
    or ``("full",)``), ``offload`` (the ``offload_modules``)."""

    recompute: Tuple[str, ...]
    offload: Tuple[str, ...]
    plan: MemoryPlan
    fraction: float = 1.0

    @property
    def name(self) -> str:
        parts = []
        if self.recompute == ("full",):
            parts.append("full recompute")
        elif self.recompute:
            parts.append("recompute_modules=" + ",".join(self.recompute))
        if self.offload:
            parts.append("offload_modules=" + ",".join(self.offload))
            if self.fraction < 1.0:
                parts.append(f"activation_offload_fraction={self.fraction:g}")
        return "; ".join(parts) or "keep all"

    @property
    def offloaded_recompute_inputs(self) -> Tuple[str, ...]:
        """The ``offload_modules`` that move the inputs of a module this setting also recomputes
        (``attn_norm`` / ``mlp_norm`` with ``layernorm``, ``moe_act`` with ``moe_act``)."""
        return tuple(o for r in self.recompute for o in _RECOMPUTE_AND_OFFLOAD.get(r, ()) if o in self.offload)

    @property
    def recomputed_with_offloaded_inputs(self) -> Tuple[str, ...]:
        """The ``recompute_modules`` whose held inputs this setting offloads (see
        :attr:`offloaded_recompute_inputs`)."""
        return tuple(r for r in self.recompute if set(_RECOMPUTE_AND_OFFLOAD.get(r, ())) & set(self.offload))

    @property
    def megatron_flags(self) -> MegatronFlags:
        """This setting as Megatron-Core's command line and TransformerConfig fields."""
        full = ("uniform", 1) if self.recompute == ("full",) else None
        return _megatron_settings(() if full else self.recompute, self.offload, full=full,
                                  offload_fraction=self.fraction)


# Spare module slots the Megatron offload evaluation uses for the bytes an offload frees (they
# hold nothing in a MoE transformer layer's costs).
_SPARE = "unpermute"


def _megatron_offload_shadow(costs: MemoryCosts, off: Tuple[str, ...], sim: dict) -> Tuple[MemoryCosts, str]:
    """The costs with what Megatron's offload of ``off`` frees (``sim``: its replay) moved to one
    swapped part per layer, and their core JSON: the same for every ``recompute_modules``."""
    from .costs import ModuleCost
    from .timeline import attention_parts, megatron_offload_groups

    parts = attention_parts(costs)
    layers = []
    for li, lc in enumerate(costs.layers):
        mods = dict(lc.modules)
        other = lc.other_saved_bytes
        freed_total = 0.0
        # activation_offload_fraction keeps whole groups: take the freed bytes group by group.
        budget = sim["freed_bytes_by_layer"][li]
        for g in megatron_offload_groups(lc, off, li, parts):
            f = min(g.freed, budget)
            budget -= f
            if f <= 0:
                continue
            freed_total += f
            for src, part, by_recompute in g.sources:
                x = part * f / g.freed
                if not src:
                    other -= x
                    continue
                c = mods[src]
                nb = max(0.0, c.saved_bytes - x)
                ex = c.exchange_bytes - x if g.name == "expert_fc1" else c.exchange_bytes
                rb = max(0.0, c.recompute_saved_bytes - (x if by_recompute else 0.0))
                mods[src] = replace(c, saved_bytes=nb, exchange_bytes=max(0.0, min(ex, nb, rb)),
                                    recompute_saved_bytes=rb)
        if _SPARE in mods and mods[_SPARE].saved_bytes > 0:
            raise ValueError(f"costs: layer {lc.layer} has a {_SPARE} part; Megatron's offload is not modelled for it")
        if freed_total > 0:
            mods[_SPARE] = ModuleCost(saved_bytes=freed_total, recompute_seconds=0.0)
        layers.append(replace(lc, modules=mods, other_saved_bytes=max(0.0, other)))
    shadow = replace(costs, layers=tuple(layers))
    return shadow, costs_to_core(shadow)


def _megatron_offload_setting(costs: MemoryCosts, rec: Tuple[str, ...], off: Tuple[str, ...],
                              fraction: float, sim: Optional[dict] = None,
                              shadow: Optional[Tuple[MemoryCosts, str]] = None) -> Optional[MemoryPlan]:
    """Megatron's ``recompute_modules=rec`` with fine-grained offloading of ``off`` as its
    implementation runs it (:func:`.timeline.megatron_offload_wait`): the recompute part and the
    bytes the offload frees go through the planner's peak model (the freed bytes as one swapped
    part per layer), the margin / reload-ahead groups are added to the peak and the backward's
    waits for reloads to the added time. ``None``: past the host memory. ``sim`` / ``shadow``:
    the offload's replay and :func:`_megatron_offload_shadow`, when already computed."""
    if sim is None:
        from .timeline import megatron_offload_wait

        sim = megatron_offload_wait(costs, off, fraction=fraction)
    shadow_costs, core = shadow if shadow is not None else _megatron_offload_shadow(costs, off, sim)
    rec_actions: Dict[str, Action] = {}
    for n in rec:
        rec_actions.update(_MEG_RECOMPUTE[n])
    acts = {m: a for m, a in rec_actions.items()}
    rows = []
    for lc in shadow_costs.layers:
        row = [acts.get(m, Action.KEEP).value if (m in lc.modules) else "keep" for m in MODULES]
        if _SPARE in lc.modules:
            row[MODULES.index(_SPARE)] = "swap"
        rows.append(row)
    try:
        ev = json.loads(_native.memory.evaluate(core, rows, None))
    except ValueError:
        return None  # past the host memory
    if ev["host_bytes"] > costs.host_bytes + 1e-9:
        return None
    ev["peak_bytes"] += max(sim["margin_bytes"], sim["ahead_bytes"])
    ev["swap_exposed_seconds"] = sim["wait_seconds"]
    ev["added_seconds"] = ev["recompute_seconds"] + ev["exchange_seconds"] + sim["wait_seconds"]
    ev["offload_margin_bytes"] = sim["margin_bytes"]
    ev["offload_ahead_bytes"] = sim["ahead_bytes"]
    ev["model"] = "megatron_fine_grained_offload"
    actions: Dict[str, Action] = {}
    for o in off:
        # qkv_linear moves part of two modules' bytes and decides neither: the plan shows no action for it.
        actions.update(_MEG_OFFLOAD.get(o, {}))
    actions.update(rec_actions)
    has = {m for lc in costs.layers for m in lc.modules}
    plan = MemoryPlan(tuple(LayerPlan(lc.layer, {m: a for m, a in actions.items() if m in has}, lc.vpp_stage)
                            for lc in costs.layers))
    return replace(plan, predicted_peak_bytes=float(ev["peak_bytes"]), predicted_added_seconds=float(ev["added_seconds"]),
                   host_bytes=int(math.ceil(ev["host_bytes"])), evaluation=ev)


def _megatron_view(costs: MemoryCosts) -> MemoryCosts:
    """The costs as Megatron's settings see them: on simulator costs, whose ``attention`` module is
    the whole attention (its recompute a replay of the module, as moerail's executor runs it),
    ``core_attn``'s recompute is core attention alone (what it frees and adds)."""
    core = (costs.meta or {}).get("core_attn_recompute") if isinstance(costs.meta, Mapping) else None
    if core is None:
        return costs
    freed, seconds = float(core[0]), float(core[1])
    layers = []
    for lc in costs.layers:
        a = lc.modules.get("attention")
        if a is not None:
            a = replace(a, recompute_saved_bytes=min(freed, a.saved_bytes), recompute_seconds=seconds)
            lc = replace(lc, modules={**lc.modules, "attention": a})
        layers.append(lc)
    return replace(costs, layers=tuple(layers))


def megatron_static_plans(
    costs: MemoryCosts, *, multi_latent_attention: Optional[bool] = None, offload: bool = True,
    offload_fractions: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
) -> List[StaticSetting]:
    """Every combination of Megatron's ``recompute_modules`` (and, with ``offload`` and host
    memory, ``offload_modules`` at each ``activation_offload_fraction`` of
    ``offload_fractions``) that Megatron accepts for this model, plus full recompute.
    Recompute-only settings are uniform plans evaluated by the planner's model. Offload settings
    are evaluated as Megatron-Core's fine-grained activation offloading runs them
    (:mod:`.timeline`: its groups, what each moves and frees, its offload margin, its reloads one
    group ahead and ahead into the next chunk, and the backward's waits for them), on simulator
    costs; on measured costs with saved-tensor sizes, as uniform plans of the planner's model.
    Combinations Megatron refuses (offloading inside a recomputed ``moe``, ``mla_up_proj``
    without MLA, ``attn_proj`` without ``core_attn``), offloading what a recompute already drops
    (``core_attn`` / ``attn_proj`` with ``core_attn`` or ``mla_up_proj`` recomputed) and those
    that decide the same modules the same way are left out; those that swap past the host memory
    too."""
    costs = _megatron_view(costs)
    fractions = tuple(offload_fractions) if not isinstance(offload_fractions, (str, bytes)) else ()
    if not fractions or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fractions):
        raise ValueError(f"offload_fractions: expected fractions in (0, 1], got {offload_fractions!r}")
    has = set()
    for lc in costs.layers:
        has.update(m for m, c in lc.modules.items() if c.saved_bytes > 0 or c.recompute_saved_bytes > 0)
    mla = multi_latent_attention
    rec_names = [n for n in MEGATRON_RECOMPUTE_MODULES if n != "mla_up_proj" or mla]
    if "shared_expert" not in has:
        rec_names = [n for n in rec_names if n != "shared_experts"]
    off_names = list(MEGATRON_OFFLOAD_MODULES) if offload and costs.host_bytes > 0 else []
    if costs.exact_model:
        off_names = [n for n in off_names if n in _MEG_OFFLOAD]
    replays: Dict[Tuple[Tuple[str, ...], float], dict] = {}
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
                    if "attn_proj" in off and "core_attn" not in off:
                        continue
                    if {"core_attn", "attn_proj"} & set(off) and {"core_attn", "mla_up_proj"} & set(rec):
                        continue
                    if off and not costs.exact_model:
                        from .timeline import megatron_offload_wait

                        for f in fractions:
                            if (off, f) not in replays:
                                sim = megatron_offload_wait(costs, off, fraction=float(f))
                                replays[(off, f)] = (sim, _megatron_offload_shadow(costs, off, sim))
                            sim, shadow = replays[(off, f)]
                            plan = _megatron_offload_setting(costs, rec, off, float(f), sim, shadow)
                            if plan is not None:
                                out.append(StaticSetting(rec, off, plan, float(f)))
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


def executor_added_seconds(costs: MemoryCosts, plan: MemoryPlan, lookahead: Optional[int] = None,
                           prefetch_groups: Optional[int] = None) -> dict:
    """``plan``'s added step time with its swaps timed as moerail's executor issues them
    (by default as the plan's ``lookahead`` and ``prefetch_groups`` have it copy them back;
    :func:`.timeline.executor_swap_wait`: each group's copies back start when its backward
    starts, ``prefetch_groups`` groups ahead within a model chunk; with ``lookahead=2`` also the
    next backward chunk's first group at a chunk's last), replayed over the schedule with every
    copy sharing the link (the planner's model takes each layer's copies alone):
    ``added_seconds``, ``swap_wait_seconds`` and ``ahead_bytes`` (what the copies ahead hold on
    the device beyond the model's peak, :func:`.timeline.executor_swap_wait`'s)."""
    from .timeline import executor_swap_wait

    ev = plan.evaluation if plan.evaluation else evaluate_plan(costs, plan).evaluation
    sim = executor_swap_wait(costs, _rows(costs, plan), MODULES,
                             lookahead=plan.lookahead if lookahead is None else lookahead,
                             prefetch_groups=plan.prefetch_groups if prefetch_groups is None else prefetch_groups)
    wait = sim["wait_seconds"]
    return {
        "added_seconds": ev["recompute_seconds"] + ev["exchange_seconds"] + wait,
        "swap_wait_seconds": wait,
        "ahead_bytes": sim["ahead_bytes"],
    }
