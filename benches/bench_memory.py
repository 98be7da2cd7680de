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
included; parameters excluded), the largest over ranks and steps. Added time: the arm's fastest
step minus keep-all's fastest (other work on a shared machine only adds time). The planner's costs
come from
``moerail.memory.profile(measure="actions", trace_steps=4, repeats=3)`` run on the keep-all model in
the first launch: four keep-all steps record which storages each module's forward saved, each
recompute region's inputs and the outputs it frees (``saved_tensors``), so that the bytes a plan
holds are the size of a union of storages, placed in time (end of the forward, each layer's forward,
each group's backward start with its replays and swap-ins, the bytes outside the layers before and
after them); one trial step per module and action (three for the time) measures what each action
adds to the step (fastest trial step minus fastest keep-all step), shared between the layers as
their replay times (a recompute: at least its replay as the executor timed it) or swapped bytes (a
swap: at least its memory copies, which on CPU ranks run on the cores that compute). The
ranks' records are planned together (the largest over their micro-batches: the expert activations
follow the routing); the plans are made for the measured peaks and run in a second launch with all
arms again. Predicted vs measured: the plan's ``predicted_peak_bytes`` /
``predicted_added_seconds`` against what the second launch measured.
"""

from __future__ import annotations

import dataclasses
import json
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


def _summary(res, run=0):
    out = {}
    names = list(res[0]["runs"][run]["arms"])
    for name in names:
        if name.startswith("_"):
            continue
        hs = [r["runs"][run]["arms"][name] for r in res]
        steps = len(hs[0]["step_s"])
        # a step lasts until the slowest rank is done
        step_s = [max(h["step_s"][i] for h in hs) for i in range(steps)]
        # the fastest step (the first left out): on a shared machine other work only ever adds time
        out[name] = {"peak": max(max(h["peak"]) for h in hs), "step_s": min(step_s[1:] or step_s),
                     "diff": max((v for h in hs for d in h["diff"] for v in d.values()), default=0.0)}
    return out


def run(quick: bool = False) -> str:
    import memory_megatron as mm

    from moerail.memory import MemoryCosts

    steps = 4 if quick else 8
    model = {"layers": 2, "hidden": 128, "ffn": 128, "experts": 8, "topk": 2, "seq": 128, "micro_batches": 2}
    t0 = time.monotonic()
    first = [{"name": "profile", "dispatcher": "megatron", "plan": {"layers": []},
              "profile": {"measure": "actions", "repeats": 3, "trace_steps": 4}, "min_swap_bytes": 0}] + _arms()
    res1 = mm.run({"steps": steps, "runs": [{"layout": (1, 1, 4), "arms": first, "model": model}]},
                  tempfile.mkdtemp(), timeout_s=1800)
    meas1 = _summary(res1)
    def costs_of(name):
        return [MemoryCosts.from_dict({k: v for k, v in r["runs"][0]["arms"]["_profiles"][name].items()
                                       if k != "meta"}) for r in res1]

    costs = costs_of("profile")
    # One plan for every rank (they must agree), for all of them: the ranks' traces together (the
    # model takes the largest over their micro-batches), each action's seconds the largest over ranks
    # (a step lasts until the slowest rank is done).
    merged = costs[0]
    if all(c.saved_tensors for c in costs):
        st = {"microbatches": [mb for c in costs for mb in c.saved_tensors["microbatches"]], "seconds": {}}
        for c in costs:
            for key, sec in c.saved_tensors.get("seconds", {}).items():
                d = st["seconds"].setdefault(key, {})
                for a, v in sec.items():
                    d[a] = max(d.get(a, 0.0), v)
        merged = dataclasses.replace(max(costs, key=lambda x: x.activation_bytes_keep_all), saved_tensors=st)
    try:
        from moerail.memory import plan_memory
    except ImportError:
        plan_memory = None
    lines = [__doc__.split("\n\n", 1)[1].strip(), ""]
    plans = {}
    refused = {}
    if plan_memory is not None:
        # One plan for every rank (they must agree): planned on the rank whose keep-all activations are largest.
        c = merged
        for name, _ in MEGATRON_ARMS:
            budget = int(meas1[name]["peak"])
            short = name.split(" ", 1)[1]
            # On CPU ranks a swap copies host memory to host memory on the same cores: the recompute-only
            # plans are the like-for-like comparison with Megatron's recompute here.
            for label, kw in (("", {}), (" recompute only", {"allow_swap": False})):
                try:
                    plan = plan_memory(c, budget_bytes=budget, **kw)
                except ValueError as e:
                    refused[f"{name}{label}"] = f"{budget} B: {e}"
                    continue
                plans[f"moerail{label} @ {short}"] = plan.to_dict()
        # Megatron's full recompute carried out by moerail (every layer rebuilt whole), as the model
        # predicts it, whether or not the planner picks it at a budget.
        from moerail.memory import LayerPlan, MemoryPlan, evaluate_plan

        whole = MemoryPlan(tuple(LayerPlan(lc.layer, recompute_layer=True, vpp_stage=lc.vpp_stage) for lc in c.layers))
        try:
            plans["moerail whole layers (every layer)"] = evaluate_plan(c, whole).to_dict()
        except ValueError as e:
            refused["moerail whole layers (every layer)"] = str(e)
    arms2 = _arms(plans)
    res2 = mm.run({"steps": steps, "runs": [{"layout": (1, 1, 4), "arms": arms2, "model": model}]},
                  tempfile.mkdtemp(), timeout_s=1800)
    meas = _summary(res2)
    keep = meas["keep"]
    lines += [f"Model: GPTModel {model['layers']} layers, hidden {model['hidden']}, {model['experts']} experts top-"
              f"{model['topk']}, seq {model['seq']}, {model['micro_batches']} micro-batches; TP1 PP1 EP4 DP4, "
              f"megatron-core {res2[0]['megatron_core']}; {steps} steps an arm; total {time.monotonic() - t0:.0f} s.", ""]
    lines += ["| arm | peak saved bytes (max over ranks) | vs keep-all | step (fastest, s) | added time vs keep-all |"
              " predicted peak (measured vs it) | predicted added s (measured - it) | bit-identical to keep-all |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in meas.items():
        p = plans.get(name)
        pred_peak = f"{p['predicted_peak_bytes']:.0f} ({(m['peak'] / p['predicted_peak_bytes'] - 1) * 100:+.1f}%)" \
            if p and p.get("predicted_peak_bytes") else ""
        added = m["step_s"] - keep["step_s"]
        pred_t = (f"{p['predicted_added_seconds']:+.3f} ({added - p['predicted_added_seconds']:+.3f} s off)"
                  if p and p.get("predicted_added_seconds") is not None else "")
        same = "yes" if name in plans and m["diff"] == 0.0 else ("no" if name in plans else "")
        lines.append(f"| {name} | {m['peak']:.0f} | {m['peak'] / keep['peak']:.2f} | {m['step_s']:.3f} | "
                     f"{m['step_s'] - keep['step_s']:+.3f} | {pred_peak} | {pred_t} | {same} |")
    for name, why in refused.items():
        lines += ["", f"moerail's planner refused the budget {name} reached: {why}"]
    w, f = meas.get("moerail whole layers (every layer)"), meas.get("megatron full")
    if w and f:
        lines += ["", f"Whole-layer recompute in every layer, carried out by moerail's executor, held {w['peak']:.0f} B "
                  f"at its peak against {f['peak']:.0f} B for Megatron's full recompute of the same layers, at "
                  f"{w['step_s'] - keep['step_s']:+.3f} s vs {f['step_s'] - keep['step_s']:+.3f} s added."]
    over = [n for n, m in meas.items() if n in plans and plans[n].get("budget_bytes")
            and m["peak"] > plans[n]["budget_bytes"]]
    lines += ["", "Plans whose measured peak went over their budget: " + (", ".join(over) if over else "none") + "."]
    rows = [(n, m, plans[n]) for n, m in meas.items() if n in plans and plans[n].get("predicted_peak_bytes")]
    if rows:
        worst = max(abs(m["peak"] / p["predicted_peak_bytes"] - 1) for _, m, p in rows)
        t_in = [n for n, m, p in rows if abs((m["step_s"] - keep["step_s"]) - p["predicted_added_seconds"])
                <= 0.1 * max(abs(m["step_s"] - keep["step_s"]), 1e-9)]
        lines += ["", f"Predicted peaks: within {worst:.1%} of the measured ones for every plan. Predicted added "
                  f"times: within 10% of the measured ones for {len(t_in)} of {len(rows)} plans"
                  + (f" ({', '.join(t_in)})" if t_in else "") + "; the measured added times are differences of "
                  "two step times on this shared machine, a few milliseconds to hundredths of a second at this "
                  "size, and the predictions add up trial steps of the first launch, which ran under its own "
                  "load: at this size the machine's load moves them more than 10%."]
    for name, short in (("megatron layernorm", "layernorm"), ("megatron moe", "moe"), ("megatron full", "full")):
        mg = meas.get(name)
        ours = [(n, meas[n]) for n in (f"moerail @ {short}", f"moerail recompute only @ {short}") if n in meas]
        if mg and ours:
            lines += ["", f"At {name}'s budget ({mg['peak']:.0f} B, {mg['step_s'] - keep['step_s']:+.3f} s added): "
                      + "; ".join(f"{n} {m['peak']:.0f} B, {m['step_s'] - keep['step_s']:+.3f} s" for n, m in ours)
                      + "."]
    lines += ["", "Step times are the fastest of the steps of one run on a shared CPU machine (4 ranks on its cores, "
              "gloo; the load average is in the header): the added times, differences of two such times, carry the "
              "machine's noise."]
    if plans:
        lines += ["", "The plans (per layer):", ""]
        for name, p in plans.items():
            acts = "; ".join(f"layer {lp['layer']}: " + ("whole layer recomputed" if lp.get("recompute_layer") else
                                                          ", ".join(f"{m} {a}" for m, a in lp["actions"].items()))
                             for lp in p["layers"] if lp["actions"] or lp.get("recompute_layer"))
            budget = f"budget {p['budget_bytes']} B" if p.get("budget_bytes") else "no budget"
            lines.append(f"- {name} ({budget}): {acts or 'keep everything'}")
    if plan_memory is None:
        lines += ["", "moerail's rows are missing: `moerail.memory.plan_memory` (the planner) is not in this build "
                  "yet. The profile the planner would read was measured (per layer, per micro-batch):", ""]
        c = costs[0]
        for lc in c.layers:
            mods = ", ".join(f"{k} {v.saved_bytes:.0f} B / {v.recompute_seconds * 1e3:.2f} ms"
                             for k, v in lc.modules.items())
            lines.append(f"- layer {lc.layer}: other {lc.other_saved_bytes:.0f} B; {mods}")
    if merged.saved_tensors:
        lines += ["", "What each action adds per layer and micro-batch, as profiled (largest over ranks, ms):", ""]
        for key, sec in merged.saved_tensors.get("seconds", {}).items():
            acts = ", ".join(f"{a.replace(':', ' ')} {v * 1e3:.1f}" for a, v in sec.items())
            lines.append(f"- layer {key.split(':')[0]}: {acts}")
    lines += ["", "Raw: " + json.dumps({"first_launch": meas1, "second_launch": meas})]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
