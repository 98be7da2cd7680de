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
from .executor import Executor, SavedTensorCounter, SaveTrace
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


def _per_layer(ex: Executor, run_step: Callable[[], object], repeats: int = 1
               ) -> Tuple[Dict[Tuple[int, int], list], float, Dict[Tuple[int, int], float]]:
    """The layer stats of one step, the fastest step time of ``repeats`` steps (on a shared
    machine other work only ever adds time) and the replay seconds per layer (per step)."""
    times, replay = [], {}
    for i in range(repeats):
        ex.layer_stats = {} if i == 0 else None
        ex.replay_seconds = {}
        t0 = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - t0)
        for k, v in ex.replay_seconds.items():
            replay[k] = replay.get(k, 0.0) + v / repeats
        if i == 0:
            stats = ex.layer_stats
    ex.layer_stats = ex.replay_seconds = None
    return stats, min(times), replay


def _trial_seconds(replay: Dict[Tuple[int, int], float], key: Tuple[int, int], added: float, calls: int) -> float:
    """A recompute's seconds in one layer and micro-batch: what its trial step added over keep-all,
    shared between the layers as their replays' times, and never less than the replay itself (the
    step's time also holds the regions' hooks in the forward and the replays' separate backward
    passes, which the replay's timer does not see)."""
    total = sum(replay.values())
    own = replay.get(key, 0.0)
    share = own / total if total > 0 else 1.0 / max(1, len(replay))
    return max(own, max(0.0, added) * share) / calls


def _trace(ex: Executor, run_step: Callable[[], object], steps: int) -> dict:
    """Keep-all steps with the save trace on (see ``SaveTrace``)."""
    ex.trace = SaveTrace(ex)
    ex.counter.observer = ex.trace.on_save
    try:
        for _ in range(steps):
            run_step()
    finally:
        trace, ex.trace, ex.counter.observer = ex.trace, None, None
    return trace.to_dict()


def profile(executor: Executor, run_step: Callable[[], object], *, num_microbatches: int, pipeline_size: int = 1,
            pipeline_rank: int = 0, virtual_pipeline_size: int = 1, static_bytes: float = 0.0,
            device_bytes: Optional[float] = None, host_bytes: float = 0.0,
            host_link_bytes_per_second: Optional[float] = None, warmup: int = 1,
            modules: Optional[Tuple[str, ...]] = None, measure: str = "tags",
            saved_as: str = "each", repeats: int = 1, trace_steps: int = 1) -> MemoryCosts:
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
    the device's capacity (default: the accelerator's, or this machine's memory on the CPU).

    ``trace_steps`` more keep-all steps record which storages each module saved (``saved_tensors``, the
    planner's held-bytes model; see ``moerail.memory.exact``) and, with ``measure="actions"``, one
    trial per action (and one recomputing every layer whole) measures each action's added seconds
    per layer: what its fastest of ``repeats`` steps added over keep-all's fastest, shared between
    the layers as their replays' times (a recompute, at least its replay as the executor timed it)
    or as the bytes they swap (a swap; on CPU ranks at least its memory copies, which run on the
    cores that compute). The held bytes follow the routing
    (tokens per expert differ between micro-batches and steps): the planner plans for the largest
    of the recorded micro-batches, so more ``trace_steps`` cover more of the routing's spread."""
    for name, v in (("repeats", repeats), ("trace_steps", trace_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
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
        keep, step_s, _ = _per_layer(ex, run_step)
        timing, ex.timing = ex.timing, None
        tagged = dict(ex.counter.by_tag)
        keep_peak = ex.counter.peak
        trace = _trace(ex, run_step, trace_steps)
        if repeats > 1:
            step_s = _per_layer(ex, run_step, repeats)[1]
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
        trial_s: Dict[str, float] = {}
        replay_s: Dict[str, Dict[Tuple[int, int], float]] = {}
        trials = []
        if measure == "actions":
            trials = [(m, Action.RECOMPUTE) for m in wanted] + [(m, Action.SWAP) for m in wanted]
            if "expert_fc1" in wanted:
                trials.append(("expert_fc1", Action.RECOMPUTE_EXCHANGE))
        for module, action in trials:
            ex.set_plan(uniform(module, action))
            got, trial_s[f"{module}:{action.value}"], replay_s[f"{module}:{action.value}"] = _per_layer(
                ex, run_step, repeats)
            saving[(module, action.value)] = {
                k: (keep[k][0] - got[k][0]) / max(1, keep[k][2]) for k in keep if k in got}
        if measure == "actions":
            ex.set_plan(MemoryPlan(tuple(LayerPlan(layer, {}, vpp, recompute_layer=True) for layer, vpp in layers)))
            _, trial_s["layer:recompute"], replay_s["layer:recompute"] = _per_layer(ex, run_step, repeats)
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
    # Seconds each action adds per layer and micro-batch (the planner's held-bytes model reads them).
    seconds: Dict[str, Dict[str, float]] = {}
    for key in layers:
        layer, vpp = key
        calls = max(1, keep[key][2])
        sec = seconds.setdefault(f"{layer}:{vpp}", {})
        for m in wanted:
            if m not in present.get(layer, ()):
                continue
            fwd_m = max(0.0, timing.get((layer, m), 0.0) / calls)
            for a in ("recompute", "recompute_exchange"):
                if f"{m}:{a}" in replay_s:
                    sec[f"{m}:{a}"] = _trial_seconds(replay_s[f"{m}:{a}"], key, trial_s[f"{m}:{a}"] - step_s, calls)
                elif a == "recompute":
                    sec[f"{m}:{a}"] = fwd_m
            moved = tagged.get((layer, m), 0) / calls
            if f"{m}:swap" in trial_s:
                total = sum(tagged.get((lk, m), 0) for lk, _ in layers) or 1
                share = tagged.get((layer, m), 0) / total
                sec[f"{m}:swap"] = max(0.0, trial_s[f"{m}:swap"] - step_s) * share / num_microbatches
                if ex.device.type == "cpu":
                    # No copy engine: the copies out and back run on the cores that compute, at least
                    # their memory-copy time.
                    sec[f"{m}:swap"] = max(sec[f"{m}:swap"], 2 * moved / max(host_link_bytes_per_second, 1.0))
            else:
                sec[f"{m}:swap"] = 2 * moved / max(host_link_bytes_per_second, 1.0)
        if "layer:recompute" in replay_s:
            sec["layer:recompute"] = _trial_seconds(replay_s["layer:recompute"], key,
                                                    trial_s["layer:recompute"] - step_s, calls)
        else:
            sec["layer:recompute"] = keep[key][1] / calls
    trace["seconds"] = seconds
    meta = {"keep_layer_bytes": {f"{k[0]}:{k[1]}": keep[k][0] / max(1, keep[k][2]) for k in layers},
            "savings": {f"{m}:{a}": {f"{k[0]}:{k[1]}": v for k, v in d.items()} for (m, a), d in saving.items()},
            "min_swap_bytes": ex.min_swap_bytes, "trial_step_seconds": trial_s}
    kw = dict(layers=tuple(out), device_bytes=float(device_bytes), host_bytes=float(host_bytes),
              host_link_bytes_per_second=float(host_link_bytes_per_second), pipeline_size=pipeline_size,
              pipeline_rank=pipeline_rank, virtual_pipeline_size=virtual_pipeline_size,
              num_microbatches=num_microbatches, step_seconds=step_s, source="profile")
    costs = MemoryCosts(static_bytes=float(static_bytes), meta=meta, saved_tensors=trace, **kw)
    if costs.exact_model:
        return costs  # the bytes outside the layers are in the trace, placed in time
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
        costs = MemoryCosts(static_bytes=float(static_bytes) + extra, meta=meta, saved_tensors=trace, **kw)
    return costs
