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


def measure_host_link(device: torch.device, nbytes: int = 1 << 26,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes a second of one copy from ``device`` to pinned host memory (on the CPU: a memory copy),
    timed on ``clock`` (``time.process_time``: the CPU time of the copy on the CPU)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type != "cpu")
    dst.copy_(src, non_blocking=True)  # warm
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 3 * nbytes / max(clock() - t0, 1e-9)


def _timed(run_step: Callable[[], object]) -> Tuple[float, float]:
    """Runs one step: its (wall-clock, this process's CPU) seconds, as ``run_step`` returns them when it
    returns such a pair (the step proper, e.g. without a barrier before it), else of the call."""
    w0, c0 = time.perf_counter(), time.process_time()
    got = run_step()
    took = time.perf_counter() - w0, time.process_time() - c0
    if (isinstance(got, tuple) and len(got) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in got)):
        return float(got[0]), float(got[1])
    return took


def _per_layer(ex: Executor, run_step: Callable[[], object], repeats: int = 1
               ) -> Tuple[Dict[Tuple[int, int], list], float]:
    """The layer stats of one keep-all step and the fastest step time of ``repeats`` steps (on a
    shared machine other work only ever adds time)."""
    times = []
    for i in range(repeats):
        ex.layer_stats = {} if i == 0 else None
        times.append(_timed(run_step)[0])
        if i == 0:
            stats = ex.layer_stats
    ex.layer_stats = None
    return stats, min(times)


def _quartiles(xs) -> Tuple[float, float, float]:
    """(first quartile, median, third quartile), linear between order statistics."""
    v = sorted(xs)

    def q(f: float) -> float:
        i = f * (len(v) - 1)
        lo = int(i)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (i - lo)

    return q(0.25), q(0.5), q(0.75)


def _paired(ex: Executor, run_step: Callable[[], object], plan: MemoryPlan, rounds: int
            ) -> Tuple[Dict[Tuple[int, int], list], Dict[str, list], Dict[str, Dict[Tuple[int, int], float]]]:
    """``rounds`` pairs of steps, one keep-all step and one under ``plan``, the keep-all step first in
    even rounds and last in odd ones (a steady drift of the machine's speed cancels). Returns the
    layer stats of the first step under ``plan``; per round what the step under ``plan`` took more
    than its keep-all partner, in wall-clock seconds (``"wall"``) and in this process's CPU seconds
    (``"cpu"``, all its threads: what other work on the machine does not add to); and the replays'
    seconds per layer (``"wall"``, ``"cpu"``), the mean of the steps under ``plan``."""
    keep_plan = MemoryPlan(())
    diffs: Dict[str, list] = {"wall": [], "cpu": [], "keep_wall": []}
    replay: Dict[str, Dict[Tuple[int, int], float]] = {"wall": {}, "cpu": {}}
    stats: Dict[Tuple[int, int], list] = {}
    for i in range(rounds):
        took = {}
        for which in (("keep", "plan") if i % 2 == 0 else ("plan", "keep")):
            ex.set_plan(keep_plan if which == "keep" else plan)
            if which == "plan":
                ex.layer_stats = {} if i == 0 else None
                ex.replay_seconds, ex.replay_cpu_seconds = {}, {}
            took[which] = _timed(run_step)
            if which == "plan":
                if i == 0:
                    stats = ex.layer_stats
                for clock, got in (("wall", ex.replay_seconds), ("cpu", ex.replay_cpu_seconds)):
                    for k, v in got.items():
                        replay[clock][k] = replay[clock].get(k, 0.0) + v / rounds
                ex.layer_stats = ex.replay_seconds = ex.replay_cpu_seconds = None
        diffs["wall"].append(took["plan"][0] - took["keep"][0])
        diffs["cpu"].append(took["plan"][1] - took["keep"][1])
        diffs["keep_wall"].append(took["keep"][0])
    return stats, diffs, replay


def _trial_seconds(replay: Dict[Tuple[int, int], float], key: Tuple[int, int], added: float, calls: int) -> float:
    """A recompute's seconds in one layer and micro-batch: what its trial step added over keep-all
    (the median of the paired differences), shared between the layers as their replays' times. Not
    raised to the replay's own time: a replay's clock also runs while the rank waits for a core or
    another thread works, and the larger of a noisy median and a floor is biased upwards."""
    total = sum(replay.values())
    own = replay.get(key, 0.0)
    share = own / total if total > 0 else 1.0 / max(1, len(replay))
    return max(0.0, added) * share / calls


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
    one training step (all its micro-batches) on this rank; it may return the ``(wall-clock, CPU)``
    seconds of the step proper (e.g. leaving out a barrier before it, whose wait is another rank's
    time), else the call is timed. ``measure="tags"`` (default): one step
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
    per layer: ``repeats`` rounds of one keep-all step and one step with the action in every layer,
    in turn (keep-all first in even rounds, last in odd ones), the median over rounds of what the
    action's step took more than its keep-all partner (on a shared machine a pair sees the same
    load; the quartiles are in ``meta["trial_added_quartiles"]``), shared between
    the layers as their replays' times (a recompute, as the executor timed them)
    or as the bytes they swap (a swap; on CPU ranks at least its memory copies, which run on the
    cores that compute). The planner's table is on wall-clock time; the same table on this
    process's CPU time (all its threads; what other work on the machine does not add to) is in
    ``meta["cpu_seconds"]``. The held bytes follow the routing
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
        keep, step_s = _per_layer(ex, run_step)
        timing, ex.timing = ex.timing, None
        tagged = dict(ex.counter.by_tag)
        keep_peak = ex.counter.peak
        trace = _trace(ex, run_step, trace_steps)
        if repeats > 1 and measure != "actions":
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
        # per trial: the median over rounds of what its step took more than its keep-all partner,
        # and the quartiles, in wall-clock and CPU seconds
        added: Dict[str, Dict[str, float]] = {}
        spread: Dict[str, Dict[str, list]] = {}
        replay_s: Dict[str, Dict[str, Dict[Tuple[int, int], float]]] = {}
        keep_walls: list = []
        trials = []
        if measure == "actions":
            trials = [(m, Action.RECOMPUTE) for m in wanted] + [(m, Action.SWAP) for m in wanted]
            if "expert_fc1" in wanted:
                trials.append(("expert_fc1", Action.RECOMPUTE_EXCHANGE))
            trials.append(("layer", Action.RECOMPUTE))
        for module, action in trials:
            name = f"{module}:{action.value}"
            plan = (MemoryPlan(tuple(LayerPlan(layer, {}, vpp, recompute_layer=True) for layer, vpp in layers))
                    if module == "layer" else uniform(module, action))
            got, diffs, replay_s[name] = _paired(ex, run_step, plan, repeats)
            keep_walls += diffs["keep_wall"]
            added[name], spread[name] = {}, {}
            for clock in ("wall", "cpu"):
                q1, med, q3 = _quartiles(diffs[clock])
                added[name][clock], spread[name][clock] = med, [q1, q3]
            if module != "layer":
                saving[(module, action.value)] = {
                    k: (keep[k][0] - got[k][0]) / max(1, keep[k][2]) for k in keep if k in got}
        if keep_walls:
            step_s = _quartiles(keep_walls)[1]
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
    def seconds_table(clock: str) -> Dict[str, Dict[str, float]]:
        """Seconds each action adds per layer and micro-batch (the planner's held-bytes model reads
        them), on ``clock`` (``"wall"`` or ``"cpu"``)."""
        link = host_link_bytes_per_second
        if clock == "cpu" and ex.device.type == "cpu":
            link = measure_host_link(ex.device, clock=time.process_time)
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
                        sec[f"{m}:{a}"] = _trial_seconds(replay_s[f"{m}:{a}"][clock], key,
                                                         added[f"{m}:{a}"][clock], calls)
                    elif a == "recompute":
                        sec[f"{m}:{a}"] = fwd_m
                moved = tagged.get((layer, m), 0) / calls
                if f"{m}:swap" in added:
                    total = sum(tagged.get((lk, m), 0) for lk, _ in layers) or 1
                    share = tagged.get((layer, m), 0) / total
                    sec[f"{m}:swap"] = max(0.0, added[f"{m}:swap"][clock]) * share / num_microbatches
                    if ex.device.type == "cpu":
                        # No copy engine: the copies out and back run on the cores that compute, at
                        # least their memory-copy time.
                        sec[f"{m}:swap"] = max(sec[f"{m}:swap"], 2 * moved / max(link, 1.0))
                else:
                    sec[f"{m}:swap"] = 2 * moved / max(link, 1.0)
            if "layer:recompute" in replay_s:
                sec["layer:recompute"] = _trial_seconds(replay_s["layer:recompute"][clock], key,
                                                        added["layer:recompute"][clock], calls)
            else:
                sec["layer:recompute"] = keep[key][1] / calls
        return seconds

    seconds = seconds_table("wall")
    trace["seconds"] = seconds
    meta = {"keep_layer_bytes": {f"{k[0]}:{k[1]}": keep[k][0] / max(1, keep[k][2]) for k in layers},
            "savings": {f"{m}:{a}": {f"{k[0]}:{k[1]}": v for k, v in d.items()} for (m, a), d in saving.items()},
            "min_swap_bytes": ex.min_swap_bytes, "trial_added_seconds": added, "trial_added_quartiles": spread,
            "trial_rounds": repeats if measure == "actions" else 0}
    if measure == "actions":
        # The same table on this process's CPU time (what the planner would predict on that clock).
        meta["cpu_seconds"] = seconds_table("cpu")
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
