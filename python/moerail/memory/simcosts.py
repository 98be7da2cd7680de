"""`MemoryCosts.from_simulator`: the planner's costs from the simulator's model."""

from __future__ import annotations

import json
from typing import Any, Optional

from .. import _native
from ..sim.config import _entries, resolve_config
from .costs import LayerCosts, MemoryCosts, ModuleCost, _nonneg, tokens_per_expert_skew
from .plan import MODULES


def core_to_costs(d: dict, **extra: Any) -> MemoryCosts:
    """The core's JSON shape of the costs (modules as a list in MODULES order, a nested
    schedule) as a :class:`MemoryCosts`."""
    layers = []
    for entry in d["layers"]:
        mods = {
            name: ModuleCost(**cost)
            for name, cost in zip(MODULES, entry["modules"])
            if any(cost[k] for k in ("saved_bytes", "recompute_seconds", "exchange_seconds"))
        }
        layers.append(
            LayerCosts(
                layer=entry["layer"],
                vpp_stage=entry["vpp_stage"],
                modules=mods,
                forward_seconds=entry["forward_seconds"],
                backward_seconds=entry["backward_seconds"],
                other_saved_bytes=entry["other_saved_bytes"],
                transient_bytes=entry["transient_bytes"],
                input_bytes=entry.get("input_bytes"),
            )
        )
    s = d["schedule"]
    return MemoryCosts(
        layers=tuple(layers),
        static_bytes=d["static_bytes"],
        device_bytes=d["device_bytes"],
        host_bytes=d["host_bytes"],
        host_link_bytes_per_second=d["host_link_bytes_per_second"],
        pipeline_size=s["pipeline_size"],
        pipeline_rank=s["pipeline_rank"],
        virtual_pipeline_size=s["virtual_pipeline_size"],
        num_microbatches=s["num_microbatches"],
        **extra,
    )


def _executor(costs: MemoryCosts, lookahead: int, prefetch_groups: int) -> dict:
    """moerail's executor in the core's shape: per layer its backward by segment and, per module,
    the bytes of its swap each segment reads first (:mod:`.timeline`'s own model of it)."""
    from .timeline import _MLP_SEGS, SEGMENTS, _executor_items, core_attention_seconds, segment_seconds

    core = core_attention_seconds(costs)

    layers = []
    for lc in costs.layers:
        reads = []
        for name in MODULES:
            items = _executor_items(lc, {name: "swap"})
            reads.append([items.get(s, 0.0) for s in range(len(SEGMENTS))] if items else [])
        layers.append({"segment_seconds": segment_seconds(lc, core), "reads": reads})
    return {"lookahead": lookahead, "prefetch_groups": prefetch_groups, "mlp_first_segment": _MLP_SEGS[0],
            "layers": layers}


def costs_to_core(costs: MemoryCosts, lookahead: Optional[int] = None, prefetch_groups: int = 1) -> str:
    """The costs as the core's JSON text; with ``lookahead`` (moerail's executor's, and its
    ``prefetch_groups``), the core prices swaps as that executor copies them back, else by the
    planner's bound alone."""
    zero = {"saved_bytes": 0.0, "recompute_seconds": 0.0, "exchange_seconds": 0.0, "exchange_bytes": 0.0}
    layers = []
    for lc in costs.layers:
        mods = []
        for name in MODULES:
            c = lc.modules.get(name)
            mods.append(
                zero
                if c is None
                else {
                    "saved_bytes": c.saved_bytes,
                    "recompute_seconds": c.recompute_seconds,
                    "exchange_seconds": c.exchange_seconds,
                    "exchange_bytes": c.exchange_bytes,
                    "recompute_saved_bytes": c.recompute_saved_bytes,
                }
            )
        layers.append(
            {
                "layer": lc.layer,
                "vpp_stage": lc.vpp_stage,
                "modules": mods,
                "forward_seconds": lc.forward_seconds,
                "backward_seconds": lc.backward_seconds,
                "other_saved_bytes": lc.other_saved_bytes,
                "transient_bytes": lc.transient_bytes,
                **({"input_bytes": lc.input_bytes} if lc.input_bytes is not None else {}),
            }
        )
    return json.dumps(
        {
            "layers": layers,
            "static_bytes": costs.static_bytes,
            "device_bytes": costs.device_bytes,
            "host_bytes": costs.host_bytes,
            "host_link_bytes_per_second": costs.host_link_bytes_per_second,
            "schedule": {
                "pipeline_size": costs.pipeline_size,
                "pipeline_rank": costs.pipeline_rank,
                "virtual_pipeline_size": costs.virtual_pipeline_size,
                "num_microbatches": costs.num_microbatches,
            },
            **({"executor": _executor(costs, lookahead, prefetch_groups)} if lookahead is not None else {}),
        }
    )


def costs_from_simulator(
    config: Any = None,
    *,
    pipeline_rank: Optional[int] = None,
    tokens_per_expert: Any = None,
    percentile: float = 99.0,
    host_bytes: Optional[float] = None,
    **kwargs: Any,
) -> MemoryCosts:
    cfg = resolve_config(config, **kwargs)
    host = 0.0 if host_bytes is None else _nonneg(host_bytes, "host_bytes")
    if pipeline_rank is not None and (
        isinstance(pipeline_rank, bool) or not isinstance(pipeline_rank, int) or pipeline_rank < 0
    ):
        raise ValueError(f"pipeline_rank: expected an int >= 0, got {pipeline_rank!r}")
    skew = 1.0
    if tokens_per_expert is not None:
        ep = int(cfg["layout"].get("expert_model_parallel_size", 1) or 1)
        skew = tokens_per_expert_skew(tokens_per_expert, ep, percentile)
        cur = cfg["training"].get("moe_expert_load_imbalance", 1.0) or 1.0
        cfg["training"]["moe_expert_load_imbalance"] = max(float(cur), skew)
    out = json.loads(_native.sim.sim_memory_costs(_entries(cfg), pipeline_rank, host))
    return core_to_costs(
        out["costs"],
        step_seconds=out["step_seconds"],
        routing_skew=skew,
        source="simulator",
        meta={"stage": out["stage"], "head_bytes": out["head_bytes"], "config": cfg,
              "qkv_internal_bytes": out["qkv_internal_bytes"], "qkv_output_bytes": out["qkv_output_bytes"],
              "core_attn_recompute": tuple(out["core_attn_recompute"])},
    )
