"""Issue 17: the activation memory plan (keep / recompute / swap per module and layer) by
simulation, for Pangu Ultra MoE 718B on its published layout, DeepSeek-V3 on 1024 H100 and
Mixtral-8x22B on 128 H100 (non-interleaved 1F1B),
against every static Megatron-Core setting (recompute_modules x offload_modules x
activation_offload_fraction, and full recompute) under the same budget, each side's copies timed
as its implementation issues them."""

from __future__ import annotations

import dataclasses

from _common import table
from moerail import sim
from moerail.memory import MemoryCosts, MemoryPlan, evaluate_plan, megatron_static_plans, plan_memory
from moerail.memory.planner import best_static, executor_added_seconds

TITLE = "Activation memory plan, by simulation"
G = 2**30

# 61 layers (3 dense) + MTP on PP16 x VPP2 (EP32: MindSpeed's --moe-tp-extend-ep, EP4 x TP8), on
# the published layout (the validation table's): 64 slots, the embedding and two layers in the
# first chunk, MTP and the loss in the last.
PANGU = dict(
    model="Pangu-Ultra-MoE-718B", cluster="Ascend-800T-A2", devices=6144, seq_length=4096, global_batch_size=6144,
    micro_batch_size=1, tensor_model_parallel_size=8, pipeline_model_parallel_size=16,
    virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=32, expert_tensor_parallel_size=1,
    num_layers=61, moe_layer_freq=[0, 0, 0] + [1] * 58, pipeline_model_parallel_layout="Ett|(tt|)*29t|mL",
)  # fmt: skip
# Megatron-Bridge's DeepSeek-V3 recipe on 1024 H100 (TP2 PP8 VPP4 EP64, GBS 8192) on its layout.
DSV3 = dict(
    model="DeepSeek-V3", cluster="H100-SXM", devices=1024, seq_length=4096, global_batch_size=8192, micro_batch_size=1,
    tensor_model_parallel_size=2, pipeline_model_parallel_size=8, virtual_pipeline_model_parallel_size=4,
    expert_model_parallel_size=64, expert_tensor_parallel_size=1, num_layers=61, moe_layer_freq=[0, 0, 0] + [1] * 58,
    pipeline_model_parallel_layout="Et|(tt|)*30mL",
)  # fmt: skip
# The last field: whether the device's host link also carries its NIC's traffic. DGX H100: each GPU
# and its ConnectX-7 NIC sit on one PCIe Gen5 switch, so the exchange's GPUDirect RDMA traffic and
# host copies share the GPU's x16 link. Atlas 800T A2: the Ascend 910's RoCE ports are on the NPU
# itself, so the exchange does not cross the host link.
# The MoE Parallel Folding paper's Mixtral-8x22B layout (arXiv 2504.14960) without virtual pipeline
# stages: plain 1F1B, where Megatron's offload margin and reloads ahead matter most.
MIXTRAL = dict(
    model="Mixtral-8x22B", cluster="H100-SXM", devices=128, seq_length=4096, global_batch_size=256, micro_batch_size=1,
    tensor_model_parallel_size=2, pipeline_model_parallel_size=8, expert_model_parallel_size=8,
    expert_tensor_parallel_size=1,
)  # fmt: skip
CASES = [
    ("Pangu Ultra MoE 718B, 6144 x Ascend 800T A2 (64 GB), TP8 PP16 VPP2 EP32", PANGU, 64 * G, False),
    ("DeepSeek-V3, 1024 x H100 (80 GB), TP2 PP8 VPP4 EP64", DSV3, 128 * G, True),
    ("Mixtral-8x22B, 128 x H100 (80 GB), TP2 PP8 EP8", MIXTRAL, 64 * G, False),
]


SUMMARY: list = []
CURVE: list = []


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _chosen_plan(costs, b):
    """The plan with the executor's setting chosen (``lookahead`` and ``prefetch_groups`` "auto",
    as ``moerail plan --memory`` does; its copies ahead counted in the peak) and its executor-timed
    added seconds, or ``None``."""
    try:
        p = plan_memory(costs, b, lookahead="auto", prefetch_groups="auto")
    except ValueError:
        return None
    return p, executor_added_seconds(costs, p)["added_seconds"]


def _budget_rows(costs, statics, budgets, act, step, model=""):
    rows = []
    for label, b in budgets:
        if b > costs.device_bytes:
            rows.append([label, f"{b / G:.1f}", "above the device's memory: not a budget", "", "", "", "", "", ""])
            continue
        bs = best_static(statics, b)
        ms = "none fits" if bs is None else f"{bs.name}: {bs.plan.predicted_added_seconds:.3f} ({_pct(bs.plan.predicted_added_seconds / step)})"
        try:
            p = plan_memory(costs, b)
        except ValueError as e:
            rows.append([label, f"{b / G:.1f}", f"refused: {e}", "", "", "", "", "", ms])
            continue
        pe = p.evaluation
        bound = pe["recompute_seconds"] + pe["exchange_seconds"] + pe["swap_bound_seconds"]
        ex = executor_added_seconds(costs, p)["added_seconds"]
        two = _chosen_plan(costs, b) if costs.host_bytes > 0 else None
        if costs.host_bytes > 0 and label.endswith("% of activations saved"):
            CURVE.append((model, label.split("%")[0], ex / step,
                          None if bs is None else bs.plan.predicted_added_seconds / step,
                          None if two is None else two[1] / step,
                          bs))  # fmt: skip
        if costs.host_bytes == 0:
            cell2 = "(no swaps)"
        elif two is None:
            cell2 = "does not fit"
        else:
            cell2 = (f"{two[1]:.3f} ({_pct(two[1] / step)}) with ({two[0].lookahead}, {two[0].prefetch_groups}); "
                     f"ahead {two[0].evaluation.get('ahead_bytes', 0.0) / G:.2f} GiB, "
                     f"peak {two[0].predicted_peak_bytes / G:.1f}")  # fmt: skip
        rows.append(
            [
                label,
                f"{b / G:.1f}",
                f"{pe['peak_bytes'] / G:.1f}",
                _pct(1 - pe["activation_bytes"] / act),
                f"{pe['added_seconds']:.3f} ({_pct(pe['added_seconds'] / step)}); bound {bound:.3f}",
                f"{ex:.3f} ({_pct(ex / step)})",
                cell2,
                f"{pe['host_bytes'] / G:.1f}",
                ms,
            ]
        )
    return table(
        ["budget", "GiB", "moerail peak GiB", "activations saved", "moerail added s, planner's model (of step); its bound",
         "moerail added s, executor's copies (of step)",
         "same, executor's setting chosen: added s (of step) with (lookahead, prefetch groups); copies ahead GiB, "
         "peak GiB", "host GiB",
         "best Megatron setting that fits, as its implementation runs: added s (of step)"],
        rows,
    )  # fmt: skip


def _plan_line(p) -> str:
    groups = {}
    for lp in p.layers:
        key = "whole layer recomputed" if lp.recompute_layer else (
            ", ".join(f"{m} {a.value}" for m, a in lp.actions.items()) or "keep all")
        groups.setdefault(key, []).append(lp.layer)
    flags = p.to_megatron_flags(multi_latent_attention=True)
    text = "; ".join(f"layers {v}: {k}" for k, v in groups.items())
    fl = " ".join(flags.args) or "(none)"
    notes = f" (not expressible: {'; '.join(flags.notes)})" if flags.notes else ""
    return f"{text}. As Megatron flags: `{fl}`{notes}."


def _link_left_by_exchange(cfg: dict, costs) -> float:
    """The host link left to swaps, on average, when the NIC traffic of the expert-parallel
    exchange shares it: the link less the NIC's rate (the cluster's inter-node bandwidth times its
    efficiency) for the fraction of the step the simulator's exchange runs."""
    r = sim.simulate(**cfg)
    ep = r["breakdown_s"]["communication"]["ep"]["total"]
    cl = costs.meta["config"]["cluster"]
    nic = cl["inter_node_bandwidth_gb_s"] * 1e9 * cl.get("inter_node_comm_efficiency", 1.0)
    return max(0.0, costs.host_link_bytes_per_second - nic * min(1.0, ep / r["time"]["step_s"]))


def _shared_link_line(name: str, cfg: dict, costs, budget: int, step: float, act: float) -> str:
    link = _link_left_by_exchange(cfg, costs)
    shared = dataclasses.replace(costs, host_link_bytes_per_second=link)
    p = plan_memory(shared, budget)
    added = executor_added_seconds(shared, p)["added_seconds"]
    two = _chosen_plan(shared, budget)
    bs = best_static(megatron_static_plans(shared, multi_latent_attention=True), budget)
    meg = None if bs is None else bs.plan.predicted_added_seconds / step
    if two is not None:
        SUMMARY.append((name.split(",")[0], "swap and recompute, host link shared with the NIC",
                        1 - two[0].evaluation["activation_bytes"] / act, two[1] / step, meg))  # fmt: skip
    return (
        f"Host link shared with the NIC (this device's PCIe link also carries the exchange's inter-node traffic): "
        f"{link / 1e9:.0f} GB/s left to swaps on average. At the 70% budget moerail adds "
        f"{added:.3f} s ({_pct(added / step)}) with its executor's copies one group ahead (planner's model "
        f"{p.predicted_added_seconds:.3f} s), "
        + ("with the executor's setting chosen no plan fits; " if two is None else
           f"with the executor's setting chosen (lookahead={two[0].lookahead}, prefetch_groups="
           f"{two[0].prefetch_groups}) {two[1]:.3f} s ({_pct(two[1] / step)}, "
           f"{two[0].evaluation.get('ahead_bytes', 0.0) / G:.2f} GiB copied ahead); ")
        + "the best Megatron setting "
        + ("none fits." if bs is None else f"({bs.name}) {bs.plan.predicted_added_seconds:.3f} s ({_pct(meg)}).")
    )


def case(name: str, cfg: dict, host: float, nic_on_host_link: bool) -> str:
    out = [f"#### {name}", ""]
    for h in (0.0, host):
        costs = MemoryCosts.from_simulator(host_bytes=h, **cfg)
        keep = evaluate_plan(costs, MemoryPlan(()))
        ev = keep.evaluation
        act = ev["activation_bytes_keep_all"]
        step = costs.step_seconds
        statics = megatron_static_plans(costs, multi_latent_attention=True)
        if h == 0:
            out.append(
                f"Stage {costs.pipeline_rank} of {costs.pipeline_size} (the one with the most memory), "
                f"{len(costs.layers)} layers in {costs.virtual_pipeline_size} model chunk(s), {costs.num_microbatches} "
                f"micro-batches; static (weights, gradients, optimizer, reserve) {costs.static_bytes / G:.1f} GiB; "
                f"keep-all activations in flight {act / G:.1f} GiB, peak {ev['peak_bytes'] / G:.1f} GiB of "
                f"{costs.device_bytes / G:.0f} GiB; predicted step {step:.2f} s."
            )
            out.append("")
            out.append("Recompute only (no host memory):")
        else:
            out.append(
                f"With swap: {h / G:.0f} GiB of pinned host memory a device (assumed), host link "
                f"{costs.host_link_bytes_per_second / 1e9:.0f} GB/s (the cluster preset's):"
            )
        out.append("")
        budgets = [
            (f"{pct}% of activations saved", int(costs.static_bytes + (1 - pct / 100) * act + ev["transient_bytes"]))
            for pct in ((70, 75, 80, 85, 90) if h else (70,))
        ]
        for want in (("layernorm", "moe_act"), ("moe",), ("full",)):
            for st in statics:
                if tuple(sorted(st.recompute)) == tuple(sorted(want)) and not st.offload:
                    budgets.append((f"as Megatron {st.name}", int(st.plan.predicted_peak_bytes) + 1))
        out.append(_budget_rows(costs, statics, budgets, act, step, name.split(",")[0]))
        out.append("")
        try:
            p70 = plan_memory(costs, budgets[0][1], lookahead="auto", prefetch_groups="auto")
            out.append(f"Plan at the 70% budget (lookahead={p70.lookahead}, prefetch_groups={p70.prefetch_groups}): "
                       + _plan_line(p70))  # fmt: skip
            bs = best_static(statics, budgets[0][1])
            SUMMARY.append(
                (
                    name.split(",")[0],
                    "swap and recompute" if h else "recompute only",
                    1 - p70.evaluation["activation_bytes"] / act,
                    executor_added_seconds(costs, p70)["added_seconds"] / step,
                    None if bs is None else bs.plan.predicted_added_seconds / step,
                )
            )
        except ValueError as e:
            out.append(f"At the 70% budget: {e}")
        if h and nic_on_host_link:
            out.append("")
            out.append(_shared_link_line(name, cfg, costs, budgets[0][1], step, act))
        out.append(
            f"Megatron settings compared: {len(statics)} (every accepted recompute_modules"
            f"{' x offload_modules' if h else ''} combination with a distinct effect, and full recompute)."
        )
        out.append("")
    return "\n".join(out)


def run(quick: bool) -> str:
    out = [
        "Method: `MemoryCosts.from_simulator` (the simulator's cost model: per-module bytes and rebuild times from the "
        "engine with each of Megatron's recompute flags, so that core attention (`core_attn`) and MLA's up-projections "
        "(`mla_up_proj`) are separate modules, as in Megatron; an `attention` swap moves every tensor the attention "
        "saved: besides core attention's output and statistics, which its recompute frees, what the QKV projections "
        "save inside (MLA's compressed latents, q / k norms) and, without MLA, the queries, keys and values; the router "
        "and expert inputs from its formulas) and "
        "`plan_memory` (exact Pareto-frontier solve, local search when a frontier is thinned). The peak counts the "
        "micro-batches in flight on the interleaved schedule (replayed), static memory and one layer's transient. "
        "Added time = recompute + repeated exchange + swap time not hidden behind compute. All numbers are predictions "
        "of the model, not measurements.\n\n"
        "Swaps and offloads are timed as each implementation issues its copies, on a replay of this stage's schedule "
        "(`moerail.memory.timeline`; a layer's backward divided among its parts in proportion to their forward time; "
        "waits on other stages not counted, for either side). moerail's executor starts copying a group's swapped "
        "tensors back (its `attn` or `mlp` half of a layer) when that group's backward starts, and those of the next "
        "`prefetch_groups` groups of the same model chunk in backward order (`lookahead=1`); with one group ahead "
        "(`prefetch_groups=1`) a layer's MLP copies start with the attention backward of the layer after it. Nothing "
        "is copied ahead across model chunks at `lookahead=1`, so the first group of each chunk's backward waits for "
        "its own copies. With `lookahead=2` the last group of a chunk's backward (its first layer's attention) also "
        "starts copying back the first group (the last layer's MLP) of the next backward chunk, when that chunk has "
        "run its forward; the executor learns the schedule's order of backward chunks in its first step (these "
        "figures are the steps after it). Those bytes stay on the device through the forward between the two "
        "backwards, and with `prefetch_groups` >= 2 the copies of later layers are on the device beside the running "
        "layer's: `plan_memory` adds what they hold beyond the running layer's own swapped bytes to the plan's peak "
        "and plans under the budget less them until the plan fits, so at a tight budget it may recompute more. "
        "`plan_memory(..., lookahead=\"auto\", prefetch_groups=\"auto\")`, as `moerail plan --memory` runs by "
        "default, plans for lookahead 1 and 2 with 1 to 3 groups ahead and keeps the plan the executor's replay times "
        "cheapest; the plan carries that setting and `apply_memory_plan` runs it so. The planner prices each swap as "
        "its executor, with the setting it is given, issues the copy back (each layer's copies taken alone on the "
        "link), so it keeps or recomputes what a chunk's first groups would wait for; its prediction and its bound "
        "(the copy back may start as early as the layer's forward ends) are shown next to the executor's figures, "
        "which are the ones compared. The targets below are the chosen setting's. Megatron's "
        "`offload_modules` are modelled as its fine-grained activation offloading runs them: one group per offloaded "
        "module, layer and micro-batch, committed at the module's output; `core_attn` moves what core attention saved "
        "but frees only the queries, keys and values (the output projection still holds the attention output, which "
        "`attn_proj` offloads), `expert_fc1` moves the dispatched rows and `moe_act` fc1's output, `attn_norm` the "
        "layer's input and `mlp_norm` the residual stream entering the pre-MLP norm (each committed after its half's "
        "residual add), `qkv_linear` what the QKV projections saved (the input norm's output and, with MLA, the "
        "compressed latents; committed at the queries, keys and values; checked against Megatron-Core 0.19's own "
        "offload manager's commit and reload order in the tests); a backward that reaches a group's start reloads the previous offloaded group of that chunk, a "
        "commit waits for its group, and when a chunk has nothing left to reload the last group of the next backward "
        "chunk is reloaded ahead. After its first iteration Megatron keeps the first group of each name in backward "
        "order on the device (its offload margin), which leaves the reloads of every later chunk as many groups ahead "
        "as there are offloaded names; the margin and the groups reloaded ahead are added to Megatron's peak. (On the "
        "last pipeline stage a chunk whose backward comes next keeps its last group of each name; "
        "`delta_offload_bytes_across_pp_ranks`, which only keeps more on the device, is left at 0.) Every "
        "accepted `recompute_modules` x `offload_modules` combination (the offload modules Megatron-Core 0.19 "
        "accepts but `fused_group_mlp`, which needs TransformerEngine's op fuser and replaces `expert_fc1` and "
        "`moe_act` with one group) is compared, each at "
        "`activation_offload_fraction` 1, 0.75, 0.5 and 0.25, and full recompute. Tensors under Megatron's "
        "`min_offloaded_tensor_size` (1M elements) stay on the device: in these configurations that is core "
        "attention's softmax statistics and the routing probabilities, which the cost model does not count apart "
        "(under 2% of a group's bytes). Megatron's `core_attn` offload covers `attention` and `mla_up_proj` together; "
        "a plan that swaps `mla_up_proj` alone has no Megatron flag, and `apply_memory_plan` refuses it (it "
        "recomputes MLA's up-projections, per layer, through Megatron's own output-discarding checkpoint of them).",
        "",
    ]
    SUMMARY.clear()
    CURVE.clear()
    for name, cfg, host, nic in CASES:
        out.append(case(name, cfg, host, nic))
    rows = [
        [n, mode, _pct(saved), _pct(added), "none fits" if meg is None else _pct(meg),
         "yes" if saved >= 0.70 and added <= 0.05 else "no",
         "yes" if meg is None or added < meg else ("tie" if added == meg else "no")]
        for n, mode, saved, added, meg in SUMMARY
    ]  # fmt: skip
    out.append("#### Targets at the 70% budget")
    out.append("")
    out.append(
        table(
            ["model", "actions", "activations saved", "added step time", "best Megatron setting's added time",
             ">= 70% saved at <= 5%", "less than Megatron's best"],
            rows,
        )  # fmt: skip
    )
    out.append("")
    losses = [f"{n} ({mode}: moerail {_pct(added)}, Megatron {_pct(meg)})" for n, mode, saved, added, meg in SUMMARY
              if meg is not None and added > meg]  # fmt: skip
    ties = [f"{n} ({mode})" for n, mode, saved, added, meg in SUMMARY if meg is not None and added == meg]
    misses = [f"{n} ({mode}: {_pct(added)})" for n, mode, saved, added, meg in SUMMARY if added > 0.05]
    notes = []
    if losses:
        notes.append(
            "Megatron's offload costs less than moerail's plan at the 70% budget for " + "; ".join(losses) + ": with "
            "its offload margin Megatron keeps each offloaded module's first group of the backward on the device and "
            "reloads several groups ahead, while moerail's planner keeps or recomputes what its executor's copies "
            "would leave exposed (each chunk's first groups in the backward) in every micro-batch in flight, where "
            "Megatron's margin holds one."
        )
    if ties:
        notes.append("Equal added time (each side's copies all hidden): " + "; ".join(ties) + ".")
    if misses:
        notes.append("Over the 5% target: " + "; ".join(misses) + ".")
    out.append(" ".join(notes) or "Every target met.")
    out.append("")
    out.append("#### With swap, every budget: added step time, moerail (executor's copies, one group ahead / "
               "setting chosen) / Megatron's best setting")
    out.append("")
    pcts = sorted({c[1] for c in CURVE}, key=int)
    crow = []
    tally = {1: {"moerail less": 0, "equal": 0, "Megatron less": 0, "none fits": 0},
             2: {"moerail less": 0, "equal": 0, "Megatron less": 0, "none fits": 0}}  # fmt: skip

    def mark(a, b):
        if a is None:
            return None
        return "none fits" if b is None else ("moerail less" if a < b else ("equal" if a == b else "Megatron less"))

    for model in dict.fromkeys(c[0] for c in CURVE):
        cells = []
        for pct in pcts:
            a, b, a2 = next((a, b, a2) for m, p, a, b, a2, _ in CURVE if m == model and p == pct)
            m1, m2 = mark(a, b), mark(a2, b)
            tally[1][m1] += 1
            if m2 is not None:
                tally[2][m2] += 1
            cells.append(f"{_pct(a)} / {'-' if a2 is None else _pct(a2)} / {'-' if b is None else _pct(b)} "
                         f"({m1}; chosen: {m2 or 'does not fit'})")  # fmt: skip
        crow.append([model] + cells)
    out.append(table(["model"] + [f"{p}% saved" for p in pcts], crow))
    out.append("")

    def said(t):
        return (f"less time at {t['moerail less']}, the same at {t['equal']} and more at {t['Megatron less']}"
                + (f"; no Megatron setting fits at {t['none fits']}" if t["none fits"] else ""))  # fmt: skip

    out.append(
        f"Of these {len(CURVE)} budgets moerail's plan, with its executor copying one group ahead within a chunk "
        f"(lookahead=1, prefetch_groups=1), adds {said(tally[1])}; with the executor's setting chosen (its copies "
        f"ahead counted in the peak) it adds {said(tally[2])}"
        + (f" (it does not fit at {len(CURVE) - sum(tally[2].values())})" if len(CURVE) > sum(tally[2].values()) else "")
        + "."
        + (" Where moerail adds more with one group ahead, a layer's copies back have only the next group's backward "
           "to hide behind and a chunk's first group none, while Megatron's reloads, kept several groups ahead by its "
           "offload margin, are hidden; the planner keeps or recomputes the groups its executor would wait for, which "
           "costs memory or time in every micro-batch in flight where Megatron's margin holds one group."
           if tally[1]["Megatron less"] else "")
        + (" Where it still adds more with the setting chosen: " + "; ".join(
            f"{m} at {p}% saved, where Megatron's best setting ({st.name}) "
            + (f"recomputes {' and '.join(st.recomputed_with_offloaded_inputs)} and offloads "
               f"the inputs those recomputes hold ({' / '.join(st.offloaded_recompute_inputs)}), two actions on one "
               "module, which a moerail plan (one action per module) does not have"
               if st.offloaded_recompute_inputs else
               "hides copies that moerail's executor, with its copies ahead, does not")
            for m, p, _, b, a2, st in CURVE if a2 is not None and b is not None and a2 > b) + "."
           if tally[2]["Megatron less"] else "")
    )  # fmt: skip
    held = {}
    for m, p, _, b, a, _ in CURVE:
        if a is not None and int(p) >= 70 and a <= 0.05 and (b is None or a < b):
            held.setdefault(m, []).append(f"{p}%")
    out.append("")
    out.append(
        "The target at every one of these budgets (each saves at least 70% of the activations): at most 5% added "
        "step time and less than Megatron's best setting at the same budget, moerail's executor's setting chosen: "
        + "; ".join(f"{m}: met at {len(held.get(m, []))} of {len(pcts)} budgets ({', '.join(held.get(m, [])) or 'none'} saved)"
                    for m in dict.fromkeys(c[0] for c in CURVE))
        + " (at the others both sides hide every copy, or Megatron adds less)."
    )  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    print(run(quick=False))
