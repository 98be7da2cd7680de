"""End to end: Megatron-Core's own training loop (``examples/megatron_pretrain.py``) on two emulated
nodes, stock vs moerail, the arms trained side by side in the same processes.

Two runs of the example on 4 ranks as 2 nodes x 2 (network namespaces joined by a ``tc``-shaped veth,
loopback inside a node; the link measured in the same run): uniform routing (stock, patched,
moerail) and skewed routing (a fixed Zipf prior on the router logits; stock, moerail, placed). Per
arm: tokens/s (median over the steps after warm-up, and the mean over them, which counts the
re-placement steps), the step-time breakdown, inter-node bytes per step, the busiest/mean device
load; a PNG beside BENCHMARKS.md with the losses and tokens/s. Re-run alone:
``python benches/run_all.py --only e2e`` (root, for the namespaces).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time
from typing import Dict, List

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

import _common  # noqa: E402

TITLE = "End to end: Megatron-Core's training loop on two emulated nodes, stock vs moerail"
PNG = HERE / "e2e.png"
LINK_MBIT = 1000
MODEL = ["--layers", "4", "--hidden", "128", "--ffn", "128", "--heads", "4", "--experts", "32", "--topk", "8",
         "--seq", "128", "--micro-batch", "4", "--micro-batches", "2"]
TARGETS = {"moerail": 1.5, "placed": 1.73}


def _runs(quick: bool) -> List[Dict]:
    steps, warmup = (8, 2) if quick else (30, 5)
    return [
        {"name": "uniform routing", "argv": ["--arms", "stock,patched,moerail"]},
        {"name": f"skewed routing (Zipf prior 1.0, re-placement every {5 if quick else 10} steps)",
         "argv": ["--arms", "stock,moerail,placed", "--zipf", "1.0", "--rebalance-every", "5" if quick else "10"]},
    ], ["--steps", str(steps), "--warmup", str(warmup)]


def command(extra: List[str]) -> str:
    return ("python examples/megatron_pretrain.py --cluster netns --link-mbit "
            f"{LINK_MBIT} {' '.join(MODEL)} {' '.join(extra)}")


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _arm_rows(res: Dict) -> List[Dict]:
    run = res["runs"][0]
    warm = run["config"]["warmup"]
    tok = run["tokens_per_step"]
    out = []
    for name, h in run["arms"].items():
        steps = h["step_s"][warm:]
        bd = h["breakdown"][warm:]
        parts = {k: _median([b[k] for b in bd]) for k in bd[0]}
        med = _median(steps)
        parts["rest"] = max(0.0, med - sum(parts.values()))
        out.append({"arm": name, "tps": tok / med, "tps_mean": tok * len(steps) / sum(steps), "step_s": med,
                    "parts": parts, "inter": _median(h["inter_node_bytes"][warm:]),
                    "intra": _median(h["intra_node_bytes"][warm:]),
                    "strategy": ", ".join(sorted({str(s) for s in h["strategy"][warm:]})),
                    "load": statistics.mean(h["max_mean_load"][warm:]), "loss": h["loss"],
                    "rebalances": h["rebalances"]})
    return out


def _plot(results: List[Dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(results), figsize=(5 * (1 + len(results)), 4))
    bars = []
    for ax, (name, res) in zip(axes[:-1], results):
        for r in _arm_rows(res):
            ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=r["arm"], lw=1.2)
            bars.append((f"{r['arm']}\n({name.split(' ')[0]})", r["tps"]))
        ax.set_title(f"loss, {name.split(' (')[0]}")
        ax.set_xlabel("step")
        ax.legend()
    ax = axes[-1]
    ax.bar(range(len(bars)), [b[1] for b in bars], color="tab:blue")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_title("tokens/s (median after warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(quick: bool) -> str:
    import megatron_pretrain
    import netns_a2a

    why = netns_a2a.available()
    runs, common = _runs(quick)
    parts = [
        "Megatron-Core's own loop as `pretrain_gpt.py` builds it (`GPTModel` from the local layer spec: attention + "
        "MoE layers, `SequentialMLP` experts, sigmoid router with aux loss, z-loss and the aux-loss-free expert bias; "
        "`DistributedDataParallel`, `get_megatron_optimizer` (Adam), `get_forward_backward_func()`, "
        "`finalize_model_grads`; fp32; byte-level text from Python's standard library), 4 gloo ranks, TP1 PP1 EP4. "
        "Same model, same data, same sizes in every arm; the arms train side by side in the same processes, one "
        "step of each in turn, so a busy machine slows them alike and the ratios are taken in the same run. "
        "Arms: `stock` (Megatron's alltoall dispatcher), `patched` (`patch_moe_utils()` only), `moerail` "
        "(`use_moerail`: moerail's router and `AllToAllDispatcher`, strategy `auto` planned with the link measured "
        "below), `placed` (`moerail` plus `update_expert_placement` at global-batch boundaries, weights and Adam "
        "state moved).",
        "",
        f"Model: {' '.join(MODEL)} (4096 tokens a step). Inter-node link: veth shaped to {LINK_MBIT} Mbit/s each "
        "way by `tc tbf`, loopback inside a node.",
        "",
    ]
    if why:
        return "\n".join(parts + [f"Not run here: {why}."])
    load0 = os.getloadavg()
    results = []
    t0 = time.perf_counter()
    for r in runs:
        argv = ["--cluster", "netns", "--link-mbit", str(LINK_MBIT), *MODEL, *common, *r["argv"], "--no-progress"]
        res = megatron_pretrain.launch(argv)
        results.append((r["name"], res))
        parts_cmd = command([*common, *r["argv"]])
        r["cmd"] = parts_cmd
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    link = results[0][1]["link"]
    parts += [
        f"Machine: {_common.machine()}; megatron-core {results[0][1]['megatron_core']}, torch {results[0][1]['torch']}. "
        f"Load average {load0[0]:.1f} before and {load1[0]:.1f} after the {wall / 60:.0f}-minute run: "
        + ("**other jobs shared the 2 cores, so absolute numbers are noisy; the ratios are arm against arm in the "
           "same run.**" if max(load0[0], load1[0]) > 4.5 else "a quiet machine."),
        "",
        f"Link measured in the run (plain gloo exchanges between the namespaces): inter-node "
        f"{link['inter_node_bw'] * 8 / 1e6:.0f} Mbit/s a node, latency {link['inter_node_latency'] * 1e3:.2f} ms; "
        f"intra-node {link['intra_node_bw'] * 8 / 1e9:.1f} Gbit/s, latency {link['latency'] * 1e3:.2f} ms.",
        "",
    ]
    verdicts = []
    for (name, res), r in zip(results, runs):
        rows = _arm_rows(res)
        base = rows[0]["tps"]
        parts += [f"### {name[0].upper() + name[1:]}", "", f"`{r['cmd']}`", ""]
        parts.append(_common.table(
            ["arm", "tokens/s (median)", "vs stock", "tokens/s (mean, all steps after warm-up)", "step s",
             "inter-node MB/step", "intra-node MB/step", "strategy", "busiest/mean device load", "loss at the end"],
            [[x["arm"], f"{x['tps']:.0f}", f"{x['tps'] / base:.2f}x", f"{x['tps_mean']:.0f}", f"{x['step_s']:.2f}",
              f"{x['inter'] / 1e6:.1f}", f"{x['intra'] / 1e6:.1f}", x["strategy"], f"{x['load']:.2f}",
              f"{x['loss'][-1]:.4f}"] for x in rows]))
        keys = list(rows[0]["parts"])
        parts += ["", "Step-time breakdown (seconds a step, median over steps after warm-up, mean over ranks; "
                  "`exchange`: every all-to-all, forward and backward, until it returns, including the wait for "
                  "the slowest rank; none overlaps compute in these arms, so it is all exposed, 0 hidden):", ""]
        parts.append(_common.table(["arm", *keys], [[x["arm"], *[f"{x['parts'][k]:.3f}" for k in keys]] for x in rows]))
        diffs = res["runs"][0]["param_diff_vs_first"]
        losses = {x["arm"]: x["loss"] for x in rows}
        same = [a for a in losses if a != "placed"]
        worst = max((abs(a - b) / abs(a) for n in same for a, b in zip(losses["stock"], losses[n])), default=0.0)
        parts += ["", f"Losses: the arms without re-placement agree at every step to a relative {worst:.1g}; "
                  + "; ".join(f"{n} vs stock parameters at the end: largest ||diff||/||param|| {d['max_norm_rel']:.1g}"
                              for n, d in diffs.items() if n != "placed") + "."]
        for x in rows:
            if x["rebalances"]:
                parts.append("Re-placements (predicted busiest/mean device load on the window's load, before -> "
                             "after; experts moved): " + ", ".join(
                                 f"step {b['step']}: {b['before']:.2f} -> {b['after']:.2f} ({b['moved']})"
                                 for b in x["rebalances"]) + ".")
        for x in rows:
            if x["arm"] in TARGETS:
                ratio = x["tps"] / base
                verdicts.append((x["arm"], name, ratio, TARGETS[x["arm"]]))
        if any(x["arm"] == "placed" for x in rows):
            m = {x["arm"]: x["tps"] for x in rows}
            verdicts.append(("placed > moerail", name, m["placed"] / m["moerail"], 1.0))
        parts.append("")
    _plot(results, PNG)
    parts += ["### Targets", ""]
    parts.append(_common.table(["comparison", "run", "measured", "target", "met"],
                               [[a if ">" in a else f"{a} vs stock", n.split(" (")[0], f"{v:.2f}x",
                                 f"{'>' if t == 1.0 else '>='} {t:.2f}x", "yes" if (v > t if t == 1.0 else v >= t)
                                 else "**no**"] for a, n, v, t in verdicts]))
    parts += ["", f"![loss vs step and tokens/s per arm]({PNG.name})", ""]
    return "\n".join(parts)
