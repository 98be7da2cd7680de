"""Activation memory of a Megatron-Core GPT-MoE on 4 CPU gloo ranks (EP 4): Megatron's own recompute
settings against moerail's plans at the same budgets, measured in the same run.

Method. One model (Megatron's local GPT layer spec: attention + MoE layers, ``SequentialMLP``
experts, Megatron's alltoall dispatcher, sigmoid router with aux loss and expert bias), trained in
Megatron's own loop (DDP, Adam, ``get_forward_backward_func``) by several arms side by side, one step
each in turn, same weights and data (tests/memory_megatron.py):

1. keep-all;
2. Megatron ``recompute_granularity="selective", recompute_modules=["layernorm"]`` (Megatron refuses
   ``"moe_act"`` unless the experts are grouped GEMMs, TransformerEngine's or the ``grouped_gemm``
   package's, neither of which runs on these CPU ranks: "moe_act in recompute_modules is only
   supported with moe_grouped_gemm"; moerail's ``expert_act`` works on ``SequentialMLP`` experts);
3. Megatron ``recompute_modules=["moe"]``;
4. Megatron full recompute (``recompute_granularity="full"``, uniform, 1 layer a checkpoint);
5. moerail's plan (``plan_memory``) at the budget each Megatron setting reached, carried out by
   ``apply_memory_plan`` on the same stock model; and the recompute-only plan (``allow_swap=False``):
   on CPU ranks a "swap" copies host memory to host memory on the cores that compute, so only the
   recompute-only plans compare like for like with Megatron's recompute here (on a GPU the swaps
   run on the copy engines).

Peak: the largest number of saved-tensor bytes held for the backward during a step, counted exactly
through ``saved_tensors_hooks`` around the whole step (Megatron's recomputation in the backward
included; parameters excluded), the largest over ranks and steps from the third on: the steps the
profile's trace records (its warm-up and keep-all steps come first), whose routing the plans are made
for (the routing of the first two can hold a few tokens more in a layer a plan keeps).

Added time, measured: paired, so that the machine's load (other work on these cores) falls on both
sides of each difference. The arms take one step each in turn, keep-all first in every round; an
arm's added time in round r is its step minus the mean of keep-all's steps of rounds r and r + 1,
the two that bracket it (a steady drift of the machine's speed cancels); the table gives the median
over rounds (the first round, the warm-up, and the last, unbracketed, left out) and the
interquartile range. On two clocks: wall-clock (a step lasts until the slowest rank is done: the
largest over ranks) and CPU time (each rank's process, all its threads, the mean over ranks: the
computing a step does, which other work on the machine does not add to, as wall time on an idle
machine would be; gloo's waits for other ranks sleep). Within a round only keep-all's results (the
gradients and losses the others are compared with) stay alive; every other arm's are dropped before
the next arm steps. (Holding every arm's results through the round grew each rank's heap arm by arm,
and the arms late in the round paid 10,000-19,000 page faults, 0.1-0.2 s of kernel time, a step
that the early ones did not: the same plan measured 0.034 s added early in the round and 0.108 s late.)

Added time, predicted. The planner's costs come from
``moerail.memory.profile(measure="actions", trace_steps=12, repeats=9)`` run on the keep-all model
in the first launch: twelve keep-all steps (training steps 3 to 14 of the same weights and data as
the arms: the router's load drifts as it trains, and the plan is made for the routing of the steps
it is measured on) record which storages each module's forward saved, each
recompute region's inputs and the outputs it frees (``saved_tensors``), so that the bytes a plan
holds are the size of a union of storages, placed in time (end of the forward, each layer's forward,
each group's backward start with its replays and swap-ins, the bytes outside the layers before and
after them); then per module and action (and for recomputing every layer whole) nine rounds of one
keep-all step and one step with that action in every layer, in turn, keep-all first in even rounds
and last in odd ones, the weights held (no optimizer step: the trials, hundreds of steps, time the
model in the state the arms run in): the action's cost is the median over rounds of the pair's difference, the same
paired estimator on the same two clocks, shared between the layers as their replay times (a
recompute, as the executor timed them; not raised to the replay's own time, whose clock also runs
while the rank waits for a core: the larger of a noisy median and a floor is biased upwards) or
swapped bytes (a swap: at least its memory copies, which on CPU ranks run on the cores that
compute). A plan's predicted added time is
the sum of its actions' costs (per layer and micro-batch). The ranks' records are planned together
(bytes: the largest over their micro-batches, the expert activations follow the routing; seconds:
the mean over ranks, the estimate of the same synchronised step on wall time and the mean rank's
computing on CPU time, as measured); the plans are made on the wall-clock costs for the measured
peaks and run in a second launch with all arms again; the CPU-time prediction is the same plan
costed with the CPU-time table. Predicted vs measured: the plan's ``predicted_peak_bytes`` /
``predicted_added_seconds`` against what the second launch measured; within 10% means
|measured - predicted| <= 10% of measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

TITLE = "Activation memory: Megatron's recompute settings vs moerail's memory plans (Megatron-Core, 4 gloo ranks)"

MEGATRON_ARMS = [
    # Megatron refuses moe_act without grouped-GEMM experts (TransformerEngine or grouped_gemm, not on CPU):
    # on this SequentialMLP model its nearest setting is layernorm alone.
    ("megatron layernorm", {"recompute_granularity": "selective", "recompute_modules": ["layernorm"]}),
    ("megatron moe", {"recompute_granularity": "selective", "recompute_modules": ["moe"]}),
    ("megatron full", {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
]


def _arms(plans=None):
    arms = [{"name": "keep", "dispatcher": "megatron"}]
    arms += [{"name": n, "dispatcher": "megatron", "megatron": cfg} for n, cfg in MEGATRON_ARMS]
    for name, plan in (plans or {}).items():
        arms.append({"name": name, "dispatcher": "megatron", "plan": plan, "ref": "keep", "min_swap_bytes": 0})
    return arms


# The profile's warm-up and keep-all steps, before the steps its trace records.
UNTRACED_STEPS = 2


def _summary(res, run=0):
    out = {}
    names = list(res[0]["runs"][run]["arms"])
    for name in names:
        if name.startswith("_"):
            continue
        hs = [r["runs"][run]["arms"][name] for r in res]
        steps = len(hs[0]["step_s"])
        out[name] = {"peak": max(max(h["peak"][UNTRACED_STEPS:]) for h in hs),
                     # a step lasts until the slowest rank is done
                     "wall": [max(h["step_s"][i] for h in hs) for i in range(steps)],
                     # the computing of the mean rank
                     "cpu": [sum(h["cpu_s"][i] for h in hs) / len(hs) for i in range(steps)],
                     "diff": max((v for h in hs for d in h["diff"] for v in d.values()), default=0.0)}
    return out


def _quartiles(xs):
    v = sorted(xs)

    def q(f):
        i = f * (len(v) - 1)
        lo = int(i)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (i - lo)

    return q(0.25), q(0.5), q(0.75)


def _added(meas, name, clock):
    """(first quartile, median, third quartile) over rounds of the arm's step minus the mean of the
    keep-all steps that bracket it (same round, next round); the first round left out (warm-up)."""
    a, k = meas[name][clock], meas["keep"][clock]
    if name == "keep":
        return 0.0, 0.0, 0.0
    return _quartiles([a[r] - (k[r] + k[r + 1]) / 2 for r in range(1, len(a) - 1)])


def _merge(costs, table):
    """One ``MemoryCosts`` for all ranks: the ranks' save traces together (the held-bytes model takes
    the largest over their micro-batches) and each action's seconds the mean over ranks of
    ``table(costs)``."""
    st = {"microbatches": [mb for c in costs for mb in c.saved_tensors["microbatches"]], "seconds": {}}
    for c in costs:
        for key, sec in table(c).items():
            d = st["seconds"].setdefault(key, {})
            for a, v in sec.items():
                d[a] = d.get(a, 0.0) + v / len(costs)
    return dataclasses.replace(max(costs, key=lambda x: x.activation_bytes_keep_all), saved_tensors=st)


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run(quick: bool = False) -> str:
    import memory_megatron as mm

    from moerail.memory import MemoryCosts

    steps = 4 if quick else 12
    rounds = 3 if quick else 9
    model = ({"layers": 2, "hidden": 128, "ffn": 128, "experts": 8, "topk": 2, "seq": 128, "micro_batches": 2}
             if quick else
             {"layers": 2, "hidden": 512, "ffn": 1024, "experts": 8, "topk": 2, "seq": 256, "micro_batches": 2})
    t0 = time.monotonic()
    loads = [_load()]
    first = [{"name": "profile", "dispatcher": "megatron", "plan": {"layers": []},
              "profile": {"measure": "actions", "repeats": rounds, "trace_steps": steps}, "min_swap_bytes": 0}] + _arms()
    res1 = mm.run({"steps": steps, "runs": [{"layout": (1, 1, 4), "arms": first, "model": model}]},
                  tempfile.mkdtemp(), timeout_s=3600)
    loads.append(_load())
    meas1 = _summary(res1)
    t_first = time.monotonic() - t0
    profiles = [r["runs"][0]["arms"]["_profiles"]["profile"] for r in res1]
    costs = [MemoryCosts.from_dict({k: v for k, v in p.items() if k != "meta"}) for p in profiles]
    metas = [p["meta"] for p in profiles]
    # One plan for every rank (they must agree), for all of them.
    merged = _merge(costs, lambda c: c.saved_tensors.get("seconds", {}))
    cpu_tables = {id(c): m["cpu_seconds"] for c, m in zip(costs, metas)}
    merged_cpu = _merge(costs, lambda c: cpu_tables[id(c)])
    from moerail.memory import LayerPlan, MemoryPlan, evaluate_plan, plan_memory

    lines = [__doc__.split("\n\n", 1)[1].strip(), ""]
    plans = {}
    refused = {}
    for name, _ in MEGATRON_ARMS:
        budget = int(meas1[name]["peak"])
        short = name.split(" ", 1)[1]
        # On CPU ranks a swap copies host memory to host memory on the same cores: the recompute-only
        # plans are the like-for-like comparison with Megatron's recompute here.
        for label, kw in (("", {}), (" recompute only", {"allow_swap": False})):
            try:
                plan = plan_memory(merged, budget_bytes=budget, **kw)
            except ValueError as e:
                refused[f"{name}{label}"] = f"{budget} B: {e}"
                continue
            plans[f"moerail{label} @ {short}"] = plan.to_dict()
    # Megatron's full recompute carried out by moerail (every layer rebuilt whole), as the model
    # predicts it, whether or not the planner picks it at a budget.
    whole = MemoryPlan(tuple(LayerPlan(lc.layer, recompute_layer=True, vpp_stage=lc.vpp_stage)
                             for lc in merged.layers))
    try:
        plans["moerail whole layers (every layer)"] = evaluate_plan(merged, whole).to_dict()
    except ValueError as e:
        refused["moerail whole layers (every layer)"] = str(e)
    # The same plans costed on the CPU-time table.
    pred_cpu = {n: evaluate_plan(merged_cpu, MemoryPlan.from_dict(p)).predicted_added_seconds for n, p in plans.items()}
    arms2 = _arms(plans)
    t1 = time.monotonic()
    res2 = mm.run({"steps": steps, "runs": [{"layout": (1, 1, 4), "arms": arms2, "model": model}]},
                  tempfile.mkdtemp(), timeout_s=3600)
    loads.append(_load())
    meas = _summary(res2)
    keep = meas["keep"]
    added = {n: {c: _added(meas, n, c) for c in ("wall", "cpu")} for n in meas}
    keep_wall, keep_cpu = _quartiles(keep["wall"][1:])[1], _quartiles(keep["cpu"][1:])[1]
    lines += [f"Model: GPTModel {model['layers']} layers, hidden {model['hidden']}, expert FFN {model['ffn']}, "
              f"{model['experts']} experts top-{model['topk']}, seq {model['seq']}, {model['micro_batches']} "
              f"micro-batches; TP1 PP1 EP4 DP4, megatron-core {res2[0]['megatron_core']}; profile: {steps} traced steps, "
              f"{rounds} rounds an action; {steps} steps an arm in each launch ({steps - 2} bracketed rounds); first launch "
              f"{t_first:.0f} s, second {time.monotonic() - t1:.0f} s; load average (1 min) "
              + " / ".join(f"{x:.1f}" for x in loads) + " at the start, between the launches and at the end.", ""]

    def off(meas_v, pred_v):
        return f"{(pred_v - meas_v) / abs(meas_v) * 100:+.0f}%" if abs(meas_v) > 0 else "n/a"

    def within(meas_v, pred_v):
        return abs(meas_v - pred_v) <= 0.1 * abs(meas_v)

    lines += ["| arm | peak saved bytes (max over ranks) | vs keep-all | predicted peak (measured vs it) "
              "| added wall s: median [IQR] | predicted wall s (off) | added CPU s: median [IQR] "
              "| predicted CPU s (off) | bit-identical to keep-all |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, m in meas.items():
        p = plans.get(name)
        pred_peak = f"{p['predicted_peak_bytes']:.0f} ({(m['peak'] / p['predicted_peak_bytes'] - 1) * 100:+.1f}%)" \
            if p and p.get("predicted_peak_bytes") else ""
        cells = []
        for clock, pred in (("wall", p and p.get("predicted_added_seconds")), ("cpu", pred_cpu.get(name))):
            q1, med, q3 = added[name][clock]
            cells.append(f"{med:+.3f} [{q1:+.3f}, {q3:+.3f}]" if name != "keep" else
                         f"0 (step {keep_wall if clock == 'wall' else keep_cpu:.3f})")
            cells.append(f"{pred:+.3f} ({off(med, pred)})" if p and pred is not None else "")
        same = "yes" if name in plans and m["diff"] == 0.0 else ("no" if name in plans else "")
        lines.append(f"| {name} | {m['peak']:.0f} | {m['peak'] / keep['peak']:.2f} | {pred_peak} | "
                     + " | ".join(cells) + f" | {same} |")
    for name, why in refused.items():
        lines += ["", f"moerail's planner refused the budget {name} reached: {why}"]
    w, f = meas.get("moerail whole layers (every layer)"), meas.get("megatron full")
    if w and f:
        lines += ["", f"Whole-layer recompute in every layer, carried out by moerail's executor, held {w['peak']:.0f} B "
                  f"at its peak against {f['peak']:.0f} B for Megatron's full recompute of the same layers, at "
                  f"{added['moerail whole layers (every layer)']['wall'][1]:+.3f} s vs "
                  f"{added['megatron full']['wall'][1]:+.3f} s added (wall; CPU "
                  f"{added['moerail whole layers (every layer)']['cpu'][1]:+.3f} s vs "
                  f"{added['megatron full']['cpu'][1]:+.3f} s)."]
    over = [n for n, m in meas.items() if n in plans and plans[n].get("budget_bytes")
            and m["peak"] > plans[n]["budget_bytes"]]
    lines += ["", "Plans whose measured peak went over their budget: " + (", ".join(over) if over else "none") + "."]
    rows = [n for n in meas if n in plans and plans[n].get("predicted_peak_bytes")]
    if rows:
        worst = max(abs(meas[n]["peak"] / plans[n]["predicted_peak_bytes"] - 1) for n in rows)
        lines += ["", f"Predicted peaks: within {worst:.2%} of the measured ones for every plan."]
        for clock, label in (("wall", "wall-clock"), ("cpu", "CPU time")):
            pred = {n: plans[n]["predicted_added_seconds"] if clock == "wall" else pred_cpu[n] for n in rows}
            t_in = [n for n in rows if within(added[n][clock][1], pred[n])]
            t_out = [n for n in rows if n not in t_in]
            # a prediction inside the measurement's own interquartile range is as close as this
            # measurement can tell
            in_iqr = [n for n in t_out if added[n][clock][0] <= pred[n] <= added[n][clock][2]]
            lines += ["", f"Predicted added {label}: within 10% of the measured median for {len(t_in)} of "
                      f"{len(rows)} plans" + (f" ({', '.join(t_in)})" if t_in else "") + "."
                      + (" Off by more: " + "; ".join(
                          f"{n} (measured {added[n][clock][1]:+.3f} s [{added[n][clock][0]:+.3f}, "
                          f"{added[n][clock][2]:+.3f}], predicted {pred[n]:+.3f} s, {off(added[n][clock][1], pred[n])}"
                          + (", inside the measured interquartile range" if n in in_iqr else "") + ")"
                          for n in t_out) + "." if t_out else "")]
    if rows:
        # Spread: the interquartile range of the arms' paired differences, the median over arms, on each clock.
        arms = [n for n in meas if n != "keep"]
        width = {c: _quartiles([added[n][c][2] - added[n][c][0] for n in arms])[1] for c in ("wall", "cpu")}
        n_acts = {n: sum(1 if lp.get("recompute_layer") else len(lp["actions"]) for lp in plans[n]["layers"])
                  for n in rows}
        lines += ["", f"Spread: the interquartile range of an arm's added time over rounds is {width['wall'] * 1e3:.0f} ms "
                  f"on wall-clock time and {width['cpu'] * 1e3:.0f} ms on CPU time (the median over arms), against "
                  f"a keep-all step of {keep_wall:.3f} s wall / {keep_cpu:.3f} s CPU: four ranks share this "
                  "machine's two cores with other work, so a rank's step waits for cores as the load comes and "
                  "goes; its own computing does not. A plan's prediction adds up its actions' costs ("
                  + ", ".join(f"{n}: {k}" for n, k in n_acts.items()) + " per-layer actions); the whole-layer plan "
                  "is a single profiled trial (every layer whole, as profiled), so it checks the measurement "
                  "without the sum, the others check the sum too."]
        # The profile's own spread: an action's trial, the interquartile range of its paired differences.
        tw = {c: _quartiles([sum(m["trial_added_quartiles"][a][c][1] - m["trial_added_quartiles"][a][c][0]
                                 for m in metas) / len(metas) for a in metas[0]["trial_added_quartiles"]])[1]
              for c in ("wall", "cpu")}
        lines += ["", f"The predictions carry the profile's spread: an action's trial (every layer, {rounds} "
                  f"rounds) has an interquartile range of {tw['wall'] * 1e3:.0f} ms wall / {tw['cpu'] * 1e3:.0f} ms "
                  "CPU (the median over actions, the mean over ranks), against a step's added "
                  "time of tens to hundreds of milliseconds: a plan's prediction is within 10% only where "
                  "its actions' medians happen to land that close."]
    for name, short in (("megatron layernorm", "layernorm"), ("megatron moe", "moe"), ("megatron full", "full")):
        mg = meas.get(name)
        ours = [n for n in (f"moerail @ {short}", f"moerail recompute only @ {short}") if n in meas]
        if mg and ours:
            lines += ["", f"At {name}'s budget ({mg['peak']:.0f} B, {added[name]['wall'][1]:+.3f} s wall / "
                      f"{added[name]['cpu'][1]:+.3f} s CPU added): "
                      + "; ".join(f"{n} {meas[n]['peak']:.0f} B, {added[n]['wall'][1]:+.3f} s / "
                                  f"{added[n]['cpu'][1]:+.3f} s" for n in ours) + "."]
    if plans:
        lines += ["", "The plans (per layer):", ""]
        for name, p in plans.items():
            acts = "; ".join(f"layer {lp['layer']}: " + ("whole layer recomputed" if lp.get("recompute_layer") else
                                                          ", ".join(f"{m} {a}" for m, a in lp["actions"].items()))
                             for lp in p["layers"] if lp["actions"] or lp.get("recompute_layer"))
            budget = f"budget {p['budget_bytes']} B" if p.get("budget_bytes") else "no budget"
            lines.append(f"- {name} ({budget}): {acts or 'keep everything'}")
    lines += ["", "What each action added to a step with it in every layer, as profiled (median over rounds of "
              "the pair's difference, the mean over ranks, ms; wall [interquartile range] / CPU "
              "[interquartile range]):", ""]
    acts = list(metas[0]["trial_added_seconds"])
    lines.append("- " + ", ".join(
        f"{a.replace(':', ' ')} " + " / ".join(
            f"{sum(m['trial_added_seconds'][a][c] for m in metas) / len(metas) * 1e3:.1f} ["
            + ", ".join(f"{sum(m['trial_added_quartiles'][a][c][i] for m in metas) / len(metas) * 1e3:.1f}"
                        for i in (0, 1)) + "]" for c in ("wall", "cpu"))
        for a in acts))
    lines += ["", "Per layer and micro-batch, as the planner reads them (wall / CPU, ms):", ""]
    for key, sec in merged.saved_tensors.get("seconds", {}).items():
        cpu = merged_cpu.saved_tensors["seconds"].get(key, {})
        lines.append(f"- layer {key.split(':')[0]}: " + ", ".join(
            f"{a.replace(':', ' ')} {v * 1e3:.1f} / {cpu.get(a, 0.0) * 1e3:.1f}" for a, v in sec.items()))
    raw = {launch: {n: {"peak": m["peak"], "wall": [round(x, 4) for x in m["wall"]],
                        "cpu": [round(x, 4) for x in m["cpu"]], "diff": m["diff"]} for n, m in ms.items()}
           for launch, ms in (("first_launch", meas1), ("second_launch", meas))}
    lines += ["", "Raw (per step: wall, the largest over ranks; CPU, the mean over ranks): " + json.dumps(raw)]
    return "\n".join(lines)

if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
