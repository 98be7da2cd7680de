"""``profile``: the planner's costs measured on the running job.

Given an :class:`~moerail.memory.executor.Executor` attached to the model (for Megatron-Core:
``apply_memory_plan(model, MemoryPlan(()))``) and a function that runs one training step, it
measures per layer and module, per micro-batch:

* the saved-tensor bytes of each module (counted exactly through the executor's
  ``saved_tensors_hooks`` in a keep-all step), or, with ``measure="actions"``, what each action
  really takes off the device: one step per module with that module recomputed (and one swapped,
  and for the expert inputs one with ``recompute_exchange``) in every layer, the saving being the
  difference of the bytes the layer's forward left saved; ``recompute_saved_bytes`` is then the
  recompute's saving (``saved_bytes`` stay the tagged bytes, what a swap moves) and ``exchange_bytes`` what
  ``recompute_exchange`` frees beyond it;
* the forward time of each module (its recompute cost), of the dispatcher's permute and exchange
  (``recompute_exchange``'s cost) and of each layer; the backward is taken as twice the forward;
* the keep-all step time, and the host link (a timed copy to pinned host memory).

The result is a :class:`~moerail.memory.costs.MemoryCosts` with ``source="profile"``; the raw
numbers are in its ``meta``. The executor's plan is put back afterwards.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from .costs import LayerCosts, MemoryCosts, ModuleCost
from .executor import Executor, SavedTensorCounter
from .plan import MODULES, Action, LayerPlan, MemoryPlan

__all__ = ["profile", "measure_host_link"]


def measure_host_link(device: torch.device, nbytes: int = 1 << 26) -> float:
    """Bytes a second of one copy from ``device`` to pinned host memory (on the CPU: a memory copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type != "cpu")
    dst.copy_(src, non_blocking=True)  # warm
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 3 * nbytes / max(time.perf_counter() - t0, 1e-9)


def _per_layer(ex: Executor, run_step: Callable[[], object]) -> Tuple[Dict[Tuple[int, int], list], float]:
    ex.layer_stats = {}
    t0 = time.perf_counter()
    run_step()
    dt = time.perf_counter() - t0
    stats, ex.layer_stats = ex.layer_stats, None
    return stats, dt


def profile(executor: Executor, run_step: Callable[[], object], *, num_microbatches: int, pipeline_size: int = 1,
            pipeline_rank: int = 0, virtual_pipeline_size: int = 1, static_bytes: float = 0.0,
            device_bytes: Optional[float] = None, host_bytes: float = 0.0,
            host_link_bytes_per_second: Optional[float] = None, warmup: int = 1,
            modules: Optional[Tuple[str, ...]] = None, measure: str = "tags",
            saved_as: str = "each") -> MemoryCosts:
    """Measures ``MemoryCosts`` on the running model (see the module docstring). ``run_step()`` runs
    one training step (all its micro-batches) on this rank. ``measure="tags"`` (default): one step
    keeping everything after ``warmup``; a module's ``saved_bytes`` are the bytes its forward saved
    (attributed through the hooks, each storage to the first module that saved it), what swapping it
    moves. ``measure="actions"``: also one step per module and action (recompute, swap, and
    ``recompute_exchange`` for the expert inputs) in every layer. ``saved_as="each"`` (default):
    ``saved_bytes`` are the bytes its forward saved (as with ``"tags"``, what a swap moves) and
    ``recompute_saved_bytes`` the recompute's measured saving (a
    recompute frees its module's saved tensors and the outputs its consumers saved, and holds its
    inputs, so its saving differs from a swap's); ``"min"``: both the smaller of the two (steps see
    other data and routing: noisier on small models); ``"recompute"`` / ``"swap"``: both that
    action's. ``static_bytes``: the
    memory no plan changes (weights, gradients, optimizer state) to plan around; ``device_bytes``:
    the device's capacity (default: the accelerator's, or this machine's memory on the CPU)."""
    if not isinstance(executor, Executor):
        raise TypeError(f"executor: expected a moerail.memory.executor.Executor, got {type(executor).__name__}")
    if not callable(run_step):
        raise TypeError("run_step: expected a function that runs one training step")
    if saved_as not in ("each", "min", "recompute", "swap"):
        raise ValueError(f"saved_as: expected 'each', 'min', 'recompute' or 'swap', got {saved_as!r}")
    if measure not in ("tags", "actions"):
        raise ValueError(f"measure: expected 'tags' or 'actions', got {measure!r}")
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches: expected an int >= 1, got {num_microbatches!r}")
    ex = executor
    saved_plan, saved_counter = ex.plan, ex.counter
    if ex.counter is None:
        ex.counter = SavedTensorCounter()
    big_host = max(int(host_bytes), 1 << 40)
    try:
        ex.set_plan(MemoryPlan(()))
        for _ in range(warmup):
            run_step()
        ex.timing = {}
        ex.counter.reset_peak()
        keep, step_s = _per_layer(ex, run_step)
        timing, ex.timing = ex.timing, None
        tagged = dict(ex.counter.by_tag)
        keep_peak = ex.counter.peak
        layers = sorted(keep)
        present: Dict[int, set] = {}
        for (layer, module) in timing:
            if layer is not None and module is not None:
                present.setdefault(layer, set()).add(module)
        wanted = [m for m in (modules or MODULES) if any(m in s for s in present.values())]

        def uniform(module: str, action: Action) -> MemoryPlan:
            return MemoryPlan(tuple(LayerPlan(layer, {module: action}, vpp) for layer, vpp in layers
                                    if module in present.get(layer, ())), host_bytes=big_host)

        saving: Dict[Tuple[str, str], Dict[Tuple[int, int], float]] = {}
        trials = []
        if measure == "actions":
            trials = [(m, Action.RECOMPUTE) for m in wanted] + [(m, Action.SWAP) for m in wanted]
            if "expert_fc1" in wanted:
                trials.append(("expert_fc1", Action.RECOMPUTE_EXCHANGE))
        for module, action in trials:
            ex.set_plan(uniform(module, action))
            got, _ = _per_layer(ex, run_step)
            saving[(module, action.value)] = {
                k: (keep[k][0] - got[k][0]) / max(1, keep[k][2]) for k in keep if k in got}
    finally:
        ex.timing = ex.layer_stats = None
        ex.counter = saved_counter
        ex.set_plan(saved_plan if saved_plan is not None else MemoryPlan(()))

    out = []
    for key in layers:
        layer, vpp = key
        calls = max(1, keep[key][2])
        fwd = keep[key][1] / calls
        mods = {}
        for m in wanted:
            if m not in present.get(layer, ()):
                continue
            secs = max(0.0, timing.get((layer, m), 0.0) / calls)
            kw = {}
            if measure == "actions":
                rc = saving.get((m, "recompute"), {}).get(key, 0.0)
                sw = saving.get((m, "swap"), {}).get(key, 0.0)
                if saved_as == "each":
                    # What a swap moves is exactly the module's saved tensors (the tags); what a
                    # recompute frees is measured (with the exchange's rows on top for
                    # recompute_exchange).
                    saved, rsaved = tagged.get((layer, m), 0) / calls, max(0.0, rc)
                else:
                    saved = max(0.0, {"min": min(rc, sw), "recompute": rc, "swap": sw}[saved_as])
                    rsaved = saved
            else:
                saved = rsaved = tagged.get((layer, m), 0) / calls
            if m == "expert_fc1":
                rx = saving.get((m, "recompute_exchange"), {}).get(key, rsaved)
                kw = {"exchange_bytes": max(0.0, rx - rsaved),
                      "exchange_seconds": max(0.0, timing.get((layer, "permute"), 0.0) / calls)}
                rsaved += kw["exchange_bytes"]
                if saved_as != "each":
                    saved = rsaved
            mods[m] = ModuleCost(saved_bytes=saved, recompute_seconds=secs, recompute_saved_bytes=rsaved, **kw)
        other = max(0.0, keep[key][0] / calls - sum(c.saved_bytes for c in mods.values()))
        out.append(LayerCosts(layer=layer, vpp_stage=vpp, modules=mods, forward_seconds=fwd,
                              backward_seconds=2 * fwd, other_saved_bytes=other,
                              input_bytes=keep[key][3] / calls))
    if device_bytes is None:
        if ex.device.type == "cuda":
            device_bytes = float(torch.cuda.get_device_properties(ex.device).total_memory)
        else:
            device_bytes = float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if host_link_bytes_per_second is None:
        host_link_bytes_per_second = measure_host_link(ex.device)
    meta = {"keep_layer_bytes": {f"{k[0]}:{k[1]}": keep[k][0] / max(1, keep[k][2]) for k in layers},
            "savings": {f"{m}:{a}": {f"{k[0]}:{k[1]}": v for k, v in d.items()} for (m, a), d in saving.items()},
            "min_swap_bytes": ex.min_swap_bytes}
    kw = dict(layers=tuple(out), device_bytes=float(device_bytes), host_bytes=float(host_bytes),
              host_link_bytes_per_second=float(host_link_bytes_per_second), pipeline_size=pipeline_size,
              pipeline_rank=pipeline_rank, virtual_pipeline_size=virtual_pipeline_size,
              num_microbatches=num_microbatches, step_seconds=step_s, source="profile")
    costs = MemoryCosts(static_bytes=float(static_bytes), meta=meta, **kw)
    # What the step saved outside the layers (embeddings, the output layer and loss) is in no module:
    # the keep-all step's measured peak calibrates it, as memory no plan changes.
    meta["keep_peak_saved_bytes"] = keep_peak
    try:
        from .planner import evaluate_plan

        predicted = evaluate_plan(costs, MemoryPlan(())).predicted_peak_bytes
    except Exception:  # noqa: BLE001 - no planner in this build: leave the costs uncalibrated
        predicted = None
    if predicted is not None and keep_peak > predicted - static_bytes:
        extra = keep_peak - (predicted - static_bytes)
        meta["unattributed_bytes"] = extra
        costs = MemoryCosts(static_bytes=float(static_bytes) + extra, meta=meta, **kw)
    return costs
