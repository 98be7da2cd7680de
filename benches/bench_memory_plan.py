"""Issue 17: the activation memory plan (keep / recompute / swap per module and layer) by
simulation, for Pangu Ultra MoE 718B on its published layout and DeepSeek-V3 on 1024 H100,
against every static Megatron-Core setting (recompute_modules x offload_modules, and full
recompute) under the same budget and the same cost model."""

from __future__ import annotations

from _common import table
from moerail.memory import MemoryCosts, MemoryPlan, evaluate_plan, megatron_static_plans, plan_memory
from moerail.memory.planner import best_static

TITLE = "Activation memory plan (issue 17), by simulation"
G = 2**30

# 61 layers (3 dense) + MTP on PP16 x VPP2: the published layout pads to 64 slots with no-op
# layers; here the 3 pad slots are simulated as MoE layers (conservative: more memory and time
# on the last stages). The planned stage, stage 0 (the most micro-batches in flight), holds
# layers 0-1 and 32-33 in both.
PANGU = dict(
    model="Pangu-Ultra-MoE-718B", cluster="Ascend-800T-A2", devices=6144, seq_length=4096, global_batch_size=6144,
    micro_batch_size=1, tensor_model_parallel_size=8, pipeline_model_parallel_size=16,
    virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=32, expert_tensor_parallel_size=1,
    num_layers=64, moe_layer_freq=[0, 0, 0] + [1] * 61,
)  # fmt: skip
# Megatron-Bridge's DeepSeek-V3 recipe on 1024 H100 (TP2 PP8 VPP4 EP64, GBS 8192); its layout
# Et|(tt|)*30mL is simulated as an even split of 64 layers (stage 0: 8 layers instead of 7).
DSV3 = dict(
    model="DeepSeek-V3", cluster="H100-SXM", devices=1024, seq_length=4096, global_batch_size=8192, micro_batch_size=1,
    tensor_model_parallel_size=2, pipeline_model_parallel_size=8, virtual_pipeline_model_parallel_size=4,
    expert_model_parallel_size=64, expert_tensor_parallel_size=1, num_layers=64, moe_layer_freq=[0, 0, 0] + [1] * 61,
)  # fmt: skip
CASES = [
    ("Pangu Ultra MoE 718B, 6144 x Ascend 800T A2 (64 GB), TP8 PP16 VPP2 EP32", PANGU, 64 * G),
    ("DeepSeek-V3, 1024 x H100 (80 GB), TP2 PP8 VPP4 EP64", DSV3, 128 * G),
]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def case(name: str, cfg: dict, host: float) -> str:
    costs = MemoryCosts.from_simulator(host_bytes=host, **cfg)
    keep = evaluate_plan(costs, MemoryPlan(()))
    ev = keep.evaluation
    act = ev["activation_bytes_keep_all"]
    step = costs.step_seconds
    statics = megatron_static_plans(costs, multi_latent_attention=True)
    out = [f"#### {name}", ""]
    out.append(
        f"Stage {costs.pipeline_rank} of {costs.pipeline_size} (the one with the most memory), "
        f"{len(costs.layers)} layers in {costs.virtual_pipeline_size} model chunk(s), {costs.num_microbatches} "
        f"micro-batches; static (weights, gradients, optimizer, reserve) {costs.static_bytes / G:.1f} GiB; keep-all "
        f"activations in flight {act / G:.1f} GiB, peak {ev['peak_bytes'] / G:.1f} GiB of "
        f"{costs.device_bytes / G:.0f} GiB; predicted step {step:.2f} s. Host memory for swap: "
        f"{host / G:.0f} GiB a device (assumed), host link {costs.host_link_bytes_per_second / 1e9:.0f} GB/s."
    )
    out.append("")
    budgets = []
    # The budget that saves 70 % of the activations (Pangu's published figure).
    b70 = int(costs.static_bytes + 0.30 * act + ev["transient_bytes"] * 1.0)
    budgets.append(("70% of activations saved", b70))
    for want in (("layernorm", "moe_act"), ("moe",), ("full",)):
        for s in statics:
            if tuple(sorted(s.recompute)) == tuple(sorted(want)) and not s.offload:
                budgets.append((f"Megatron {s.name}", int(s.plan.predicted_peak_bytes) + 1))
    budgets.append(("the device", int(costs.device_bytes)))
    rows = []
    for label, b in budgets:
        try:
            p = plan_memory(costs, b)
        except ValueError as e:
            rows.append([label, f"{b / G:.1f}", f"refused: {e}", "", "", "", ""])
            continue
        pe = p.evaluation
        bs = best_static(statics, b)
        rows.append(
            [
                label,
                f"{b / G:.1f}",
                f"{pe['peak_bytes'] / G:.1f}",
                _pct(1 - pe["activation_bytes"] / act),
                f"{pe['added_seconds']:.3f} ({_pct(pe['added_seconds'] / step)})",
                f"{pe['host_bytes'] / G:.1f}",
                "none fits" if bs is None else f"{bs.name}: {bs.plan.predicted_added_seconds:.3f} ({_pct(bs.plan.predicted_added_seconds / step)})",
            ]
        )
    out.append(
        table(
            ["budget", "GiB", "moerail peak GiB", "activations saved", "moerail added s (of step)", "host GiB",
             "best Megatron static setting that fits: added s"],
            rows,
        )  # fmt: skip
    )
    out.append("")
    p = plan_memory(costs, b70)
    groups = {}
    for lp in p.layers:
        key = ", ".join(f"{m} {a.value}" for m, a in lp.actions.items()) or "keep all"
        groups.setdefault(key, []).append(lp.layer)
    out.append("Plan at the 70% budget: " + "; ".join(f"layers {v}: {k}" for k, v in groups.items()) + ".")
    flags = p.to_megatron_flags(multi_latent_attention=True)
    out.append(f"As Megatron flags: `{' '.join(flags.args) or '(none)'}`" + (f" (not expressible: {'; '.join(flags.notes)})" if flags.notes else "") + ".")
    out.append(f"Static Megatron settings compared: {len(statics)} (every accepted recompute_modules x offload_modules combination, and full).")
    out.append("")
    return "\n".join(out)


def run(quick: bool) -> str:
    out = [
        "Method: `MemoryCosts.from_simulator` (the simulator's cost model: per-module bytes and rebuild times from the "
        "engine with each of Megatron's recompute flags, the router and expert inputs from its formulas), "
        "`plan_memory` (exact Pareto-frontier solve, local search when a frontier is thinned) and, for the "
        "comparison, every static Megatron setting as a uniform plan evaluated by the same model. The peak counts the "
        "micro-batches in flight on the interleaved schedule (replayed), static memory and one layer's transient. "
        "Added time = recompute + repeated exchange + swap time not hidden behind this stage's compute. All numbers "
        "are predictions of the model, not measurements.",
        "",
    ]
    for name, cfg, host in CASES:
        out.append(case(name, cfg, host))
    return "\n".join(out)


if __name__ == "__main__":
    print(run(quick=False))
