"""Per-device memory predicted by ``moerail.sim.simulate`` against the figures the Megatron-Core MoE
report (arXiv 2603.07685) publishes for a configuration it names: Table 3 (DeepSeek-V3 in BF16,
PP4 x VPP4 x EP64 on 256 GPUs: weights and gradients, main weights and optimizer states,
activations) and Table 4 (the memory that recomputing MLA's up-projections, the SwiGLU activation
and LayerNorm saves in that same configuration).

:func:`published_memory_rows` gives one row a part and pipeline stage; :func:`render` the markdown
table with its method note. A few simulator calls: well under a second.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from moerail import sim

__all__ = ["ASSUMED", "TABLE3", "TABLE4", "config", "published_memory_rows", "render"]

REPORT = "Megatron-Core MoE report (arXiv 2603.07685)"

#: Section 4.1.1, Table 3: "Memory breakdown per GPU for DeepSeek-V3 with BF16 training
#: (PP4xVPP4xEP64, 256 GPUs)", in the report's GB.
TABLE3 = {
    "weights and gradients": 36.4,
    "main weights and optimizer states": 32.1,
    "activations": 131.0,
    "total": 199.5,
}

#: Section 4.1.4, Table 4: "Memory reduction per GPU from fine-grained recomputation for DeepSeek-V3
#: (PP4xVPP4xEP64, 256 GPUs)", keyed by Megatron's ``--recompute-modules`` name of each target.
TABLE4 = {
    "mla_up_proj": 30.4,
    "moe_act": 3.8,
    "layernorm": 8.2,
    "mla_up_proj+moe_act+layernorm": 42.4,
}

_TABLE4_NAMES = {
    "mla_up_proj": "MLA up-projection",
    "moe_act": "activation function (SwiGLU)",
    "layernorm": "LayerNorm",
    "mla_up_proj+moe_act+layernorm": "all three",
}

#: The settings the report does not state for Tables 3 and 4, as assumed here (and why).
ASSUMED = {
    "tensor parallel": "TP 1 (the report's own PP4 VPP4 EP64 DeepSeek-V3 runs on 256 GPUs, Table 20, use TP 1)",
    "micro-batch, sequence": "micro-batch 1, sequence 4096, global batch 8192 (the same runs; the global batch "
    "only has to exceed the micro-batches in flight)",
    "pipeline layout": "`Et*4|(tttt|)*14tmL`: embedding and 4 layers on the first virtual stage, 4 layers on each "
    "of the next 14, the last layer, the MTP layer and the loss on the last (the 16-chunk DeepSeek-V3 layout "
    "of Megatron's recipes)",
    "MTP": "one MTP layer (DeepSeek-V3's own), on the last stage",
    "optimizer": "Megatron's distributed optimizer (the row's own technique column names it): bf16 weights, fp32 "
    "gradient buffers, fp32 main weights and Adam moments sharded over the data-parallel ranks (64 for the "
    "dense parameters, 1 for the experts at EP64); no BF16 moments (the report lists them as a further saving)",
    "recomputation": "none (Table 4 lists what recomputation saves from this configuration)",
    "routing": "balanced experts, dropless",
    "unit": "the report's GB read as GiB (2^30 bytes)",
}

_LAYOUT = "Et*4|(tttt|)*14tmL"


def config(recompute_modules: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """The simulator configuration of Table 3 (with ``recompute_modules``: Table 4's)."""
    training: Dict[str, Any] = {
        "seq_length": 4096,
        "global_batch_size": 8192,
        "micro_batch_size": 1,
        "precision": "bf16",
        "use_distributed_optimizer": True,
    }
    if recompute_modules:
        training.update(recompute_granularity="selective", recompute_modules=list(recompute_modules))
    return {
        "model": {"preset": "DeepSeek-V3"},
        # The parts compared do not depend on the device; the report names none for Table 3.
        "cluster": {"preset": "H100-SXM", "devices": 256},
        "training": training,
        "layout": {
            "tensor_model_parallel_size": 1,
            "pipeline_model_parallel_size": 4,
            "virtual_pipeline_model_parallel_size": 4,
            "expert_model_parallel_size": 64,
            "pipeline_model_parallel_layout": _LAYOUT,
        },
    }


def _stage_name(rep: dict, stage: int) -> str:
    s = rep["breakdown_s"]["per_stage"][stage]
    parts = []
    if stage == 0:
        parts.append("embedding")
    if s["dense_layers"]:
        parts.append(f"{s['dense_layers']} dense")
    parts.append(f"{s['moe_layers']} MoE layers")
    return f"stage {stage} ({', '.join(parts)})"


def published_memory_rows() -> List[Dict[str, Any]]:
    """Published against predicted per-device memory, GiB, for two pipeline stages: the one the
    simulator reports as binding (the most memory) and the first stage that holds only MoE layers.

    Each row: ``table``, ``part``, ``device`` (the stage), ``published``, ``predicted``, ``error``
    (predicted / published - 1) and ``assumption`` (what the prediction assumes beyond
    :data:`ASSUMED`)."""
    base = sim.simulate(config())
    stages = base["breakdown_s"]["per_stage"]
    binding = base["memory_gib"]["stage"]
    moe_only = next(i for i, s in enumerate(stages) if s["dense_layers"] == 0 and i != binding)
    saved = {mods: sim.simulate(config(mods.split("+")))["breakdown_s"]["per_stage"] for mods in TABLE4}

    rows: List[Dict[str, Any]] = []

    def add(table: str, part: str, stage: int, published: float, predicted: float, assumption: str) -> None:
        rows.append({"table": table, "part": part, "device": _stage_name(base, stage), "published": published,
                     "predicted": predicted, "error": predicted / published - 1.0, "assumption": assumption})

    for st in (binding, moe_only):
        s = stages[st]
        wg = s["weights_gib"] + s["gradients_gib"]
        parts = {
            "weights and gradients": (wg, "bf16 weights (2 bytes a parameter), fp32 gradients (4)"),
            "main weights and optimizer states": (s["optimizer_gib"], "12 bytes a parameter over its data-parallel ranks"),
            "activations": (s["activations_gib"], "saved tensors of the micro-batches in flight under the "
                            "interleaved schedule, flash attention, no recomputation"),
        }
        for part, (pred, why) in parts.items():
            add("Table 3", part, st, TABLE3[part], pred, why)
        total = wg + s["optimizer_gib"] + s["activations_gib"]
        add("Table 3", "total", st, TABLE3["total"], total,
            "the three parts above (the simulator's dispatch buffers, transients and allocator reserve left out, "
            "as the report's total leaves them out)")
        for mods, pub in TABLE4.items():
            pred = s["activations_gib"] - saved[mods][st]["activations_gib"]
            add("Table 4", f"recomputing {_TABLE4_NAMES[mods]} saves", st, pub, pred,
                f"selective recomputation of `{mods.replace('+', '`, `')}`")
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render(rows: Optional[List[Dict[str, Any]]] = None) -> str:
    """Markdown: the method note and the table of :func:`published_memory_rows`."""
    rows = published_memory_rows() if rows is None else rows
    by = {(r["table"], r["part"], r["device"]): r for r in rows}
    devices = list(dict.fromkeys(r["device"] for r in rows))
    w = [by[("Table 3", "weights and gradients", d)]["error"] for d in devices]
    o = [by[("Table 3", "main weights and optimizer states", d)]["error"] for d in devices]
    a = [by[("Table 3", "activations", d)]["error"] for d in devices]

    def t4(mods: str) -> str:
        part = f"recomputing {_TABLE4_NAMES[mods]} saves"
        return " / ".join(_pct(by[("Table 4", part, d)]["error"]) for d in devices)

    out = [f"### Memory against the {REPORT}", ""]
    out.append(
        "The report gives a per-GPU memory breakdown for one configuration it names (Section 4.1.1, Table 3: "
        "DeepSeek-V3, BF16, PP4 x VPP4 x EP64 on 256 GPUs) and what recomputing three modules saves in that same "
        "configuration (Section 4.1.4, Table 4). It presents the 199.5 GB as what the configuration needs before "
        "any memory optimization (beyond an 80 GB H100), without saying whether it was measured or estimated, "
        "for which pipeline stage, or the settings below; each is assumed here as stated: "
        + "; ".join(f"{k}: {v}" for k, v in ASSUMED.items()) + ". "
        "`moerail.sim.simulate` predicts every pipeline stage; the table shows the stage the simulator finds "
        "binding (the most memory: embedding, the dense layers and the most micro-batches in flight) and the "
        "first stage of MoE layers only. Error = predicted / published - 1. Read as 10^9 bytes instead of GiB, "
        "every published figure would be 6.9% smaller than read here, and every error 7.4% larger."
    )
    out.append("")
    out.append(_table(
        ["source", "part", "device", "published GiB", "predicted GiB", "error", "prediction"],
        [[r["table"], r["part"], r["device"], f"{r['published']:.1f}", f"{r['predicted']:.1f}", _pct(r["error"]),
          r["assumption"]] for r in rows]))
    out.append("")
    out.append(
        f"Weights with gradients and the optimizer's share follow from the parameter count alone: on the stage "
        f"of MoE layers only they are {_pct(w[1])} and {_pct(o[1])} off the report, on the binding stage (whose "
        f"embedding and dense layers add parameters the 64 data-parallel ranks share the optimizer state of) "
        f"{_pct(w[0])} and {_pct(o[0])}: the report's first two figures fit a stage of MoE layers "
        f"only. Activations: {_pct(a[0])} on the binding stage, {_pct(a[1])} on the other; the report does not "
        "say whether its 131.0 GB already has Memory-Efficient Permutation applied (the simulator keeps no "
        "expert output for the router's backward, as with it; Section 4.1.2 puts the saving at about 26.3 GB), "
        "which routing imbalance or token padding it counts, nor for which stage and schedule point it is "
        f"taken. Recomputation savings (Table 4: the simulator's saved tensors with and without the module "
        f"recomputed), binding stage / other stage: LayerNorm {t4('layernorm')}, MLA up-projections "
        f"{t4('mla_up_proj')}, SwiGLU activation {t4('moe_act')}; the simulator drops the activation's output "
        "for every routed token (tokens x top-8 x 2048 x 2 bytes a MoE layer and micro-batch), and the report "
        "does not say what its 3.8 GB nets out. Not compared: Table 5's memory baselines (169 GB for "
        "DeepSeek-V3 at TP1 PP8 EP32 VPP4 in MXFP8, 172 GB for Qwen3-235B), for which the report names neither "
        "the GPUs, the micro-batch, the sequence nor the recomputation, nor (Qwen3-235B) the pipeline sizes."
    )
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
