"""End to end: Megatron-Core's own training loop (``examples/megatron_pretrain.py``) on two emulated
nodes, stock vs moerail, the arms trained side by side in the same processes.

Two runs of the example on 4 ranks as 2 nodes x 2 (network namespaces joined by a ``tc``-shaped veth,
loopback inside a node; the link measured in the same run): uniform routing (stock, patched,
moerail, overlap, stock_ulp) and skewed routing (a fixed Zipf prior on the router logits; stock,
moerail, placed). Per
arm: tokens/s (median over the steps after warm-up, and the mean over them, which counts the
re-placement steps), the step-time breakdown, inter-node bytes per step, the busiest/mean device
load; a PNG beside BENCHMARKS.md with the losses and tokens/s. Re-run alone:
``python benches/run_all.py --only e2e`` (root, for the namespaces).
"""

from __future__ import annotations

import json
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
RESULTS = HERE / "e2e_results.json"
# 250 Mbit/s between the nodes: relative to what a rank computes here, still a faster network than
# GPU nodes have (the section states the ratio measured in the run next to an H100 node's).
LINK_MBIT = 250
#: An H100 SXM node: 989 TFLOP/s dense BF16 at 40% MFU per GPU, one 400 Gbit/s NIC (50 GB/s) per GPU.
GPU_FLOP_PER_BYTE = 989e12 * 0.4 / 50e9
MODEL = ["--layers", "4", "--hidden", "128", "--ffn", "128", "--heads", "4", "--experts", "32", "--topk", "8",
         "--seq", "128", "--micro-batch", "4", "--micro-batches", "2"]
TARGETS = {"moerail": 1.5, "placed": 1.73}


def _model(ffn: int) -> List[str]:
    return [*MODEL[:MODEL.index("--ffn") + 1], str(ffn), *MODEL[MODEL.index("--ffn") + 2:]]


#: Skewed routing: a fixed Zipf prior on the router logits, and DeepSeek-V3's balancing: the
#: aux-loss-free expert bias with a complementary sequence-wise aux loss of weight 1e-4 (its report,
#: section 2.1.2), so the skew persists and a placement made for the last steps holds for the next.
SKEW = ["--arms", "stock,moerail,placed", "--zipf", "1.0", "--aux-loss", "1e-4", "--rebalance-every", "5",
        "--placement-mode", "incremental"]


def _runs(quick: bool) -> List[Dict]:
    steps, warmup = (8, 2) if quick else (30, 5)
    return [
        {"name": "uniform routing", "model": MODEL, "argv": ["--arms", "stock,patched,moerail,overlap,stock_ulp"]},
        {"name": "skewed routing (Zipf prior 1.0, re-placement every 5 steps)", "model": MODEL, "argv": SKEW},
        {"name": "skewed routing, experts 4x larger (expert FFN 512)", "model": _model(512), "argv": SKEW},
        {"name": "skewed routing, experts 8x larger (expert FFN 1024)", "model": _model(1024), "argv": SKEW},
    ], ["--steps", str(steps), "--warmup", str(warmup)]


def command(model: List[str], extra: List[str]) -> str:
    return ("python examples/megatron_pretrain.py --cluster netns --link-mbit "
            f"{LINK_MBIT} {' '.join(model)} {' '.join(extra)}")


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
        hidden = parts.pop("exchange hidden", 0.0)  # ran beside the experts: not part of the step's sum
        parts["rest"] = max(0.0, med - sum(parts.values()))
        parts["exchange hidden"] = hidden
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
    for j, (ax, (name, res)) in enumerate(zip(axes[:-1], results)):
        for r in _arm_rows(res):
            ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=r["arm"], lw=1.2)
            bars.append((r["arm"], r["tps"], j))
        ax.set_title(f"loss, {name.split(' (')[0]}")
        ax.set_xlabel("step")
        ax.legend()
    ax = axes[-1]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[colors[b[2] % len(colors)] for b in bars])
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7, rotation=60)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors[j % len(colors)], label=name.split(" (")[0])
                       for j, (name, _) in enumerate(results)], fontsize=7)
    ax.set_title("tokens/s (median after warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(quick: bool) -> str:
    import megatron_pretrain
    import netns_a2a

    why = netns_a2a.available()
    runs, common = _runs(quick)
    if why:
        return _intro() + f"\n\nNot run here: {why}."
    load0 = os.getloadavg()
    results = []
    t0 = time.perf_counter()
    for r in runs:
        argv = ["--cluster", "netns", "--link-mbit", str(LINK_MBIT), *r["model"], *common, *r["argv"], "--no-progress"]
        res = megatron_pretrain.launch(argv)
        results.append({"name": r["name"], "cmd": command(r["model"], [*common, *r["argv"]]), "res": res})
    saved = {"runs": results, "wall_s": time.perf_counter() - t0, "load_before": load0[0],
             "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "load_after": os.getloadavg()[0], "machine": _common.machine()}
    RESULTS.write_text(json.dumps(saved))
    return render(saved)


def _intro() -> str:
    return "\n".join([
        "Megatron-Core's own loop as `pretrain_gpt.py` builds it (`GPTModel` from the local layer spec: attention + "
        "MoE layers, `SequentialMLP` experts, sigmoid router with aux loss, z-loss and the aux-loss-free expert bias; "
        "`DistributedDataParallel`, `get_megatron_optimizer` (Adam), `get_forward_backward_func()`, "
        "`finalize_model_grads`; fp32; byte-level text from Python's standard library), 4 gloo ranks, TP1 PP1 EP4. "
        "Same model, same data, same sizes in every arm; the arms train side by side in the same processes, one "
        "step of each in turn, so a busy machine slows them alike and the ratios are taken in the same run. "
        "Arms: `stock` (Megatron's alltoall dispatcher), `patched` (`patch_moe_utils()` only), `moerail` "
        "(`use_moerail`: moerail's router and `AllToAllDispatcher`, strategy `auto` planned with the link measured "
        "below), `overlap` (`moerail` with `use_moerail(num_chunks=2)`: each MoE layer's dispatch, experts and "
        "combine as a two-chunk pipeline, one chunk's exchange in a helper thread while the experts compute the "
        "other, forward and backward), `placed` (`moerail` plus `update_expert_placement(mode=\"incremental\")` "
        "every 5 steps, at a global-batch boundary, for the load `LoadTracker.predict(\"ema\")` expects in the "
        "next 5 steps: the current placement improved by swaps within and across nodes; weights and Adam state "
        "moved), `stock_ulp` (stock with its router weights one ulp off: the noise "
        "floor).",
        "",
        f"Model: {' '.join(MODEL)} (4096 tokens a step; the last two runs with experts 4x and 8x larger). Inter-node link: veth "
        f"shaped to {LINK_MBIT} Mbit/s each way by `tc tbf`, loopback inside a node. Each emulated node has its own "
        "CPU cores (`--pin-nodes`, on by default: the cores split in halves, a node's 2 ranks on its half), as real "
        "nodes have: without it a node waiting on the link lends its cores to the other node, which hides any "
        "difference of work between the nodes. Raw results: `benches/e2e_results.json`; "
        "`python benches/bench_e2e.py --render` re-writes this section from them.",
    ])


def _train_flops_per_token(c: Dict) -> float:
    """Training FLOPs per token (3x the forward's matmuls): attention projections, scores and
    context (not halved for the causal mask), router, top-k experts (fc1 + fc2), output layer."""
    h, s, f = c["hidden"], c["seq"], c["ffn"]
    layer = 8 * h * h + 4 * s * h + 2 * h * c["experts"] + c["topk"] * 4 * h * f
    return 3 * (c["layers"] * layer + 2 * h * 256)


def _compute_to_network(res: Dict, link: Dict) -> str:
    """What a rank computes per byte its share of the inter-node link carries, here and on GPU nodes."""
    run = res["runs"][0]
    st = _arm_rows(res)[0]
    compute_s = max(1e-9, st["step_s"] - st["parts"]["exchange"])
    flops = _train_flops_per_token(run["config"]) * run["tokens_per_step"]
    rank_flops = flops / compute_s / run["config"]["world"]
    rank_bw = link["inter_node_bw"] / run["ranks_per_node"]
    here = rank_flops / rank_bw
    return (f"Compute against network: stock's step outside the exchange ({compute_s:.2f} s) does "
            f"{flops / 1e9:.0f} GFLOP (training FLOPs of the model, 4096 tokens), {rank_flops / 1e9:.1f} GFLOP/s a "
            f"rank; a rank's share of the measured inter-node link is {rank_bw / 1e6:.1f} MB/s: {here:.0f} FLOP per "
            f"inter-node byte. An H100 node (989 TFLOP/s dense BF16 at 40% MFU, one 400 Gbit/s NIC per GPU) does "
            f"{GPU_FLOP_PER_BYTE:.0f}: the emulated link is still {GPU_FLOP_PER_BYTE / here:.0f}x faster relative to "
            f"compute than such a cluster's ({GPU_FLOP_PER_BYTE / here / 2:.0f}x counting that these rows are fp32, "
            "twice BF16's bytes), so the exchange weighs less in this step than it would on GPU nodes, not more. "
            "The same link for every arm.")


def render(saved: Dict) -> str:
    results = [(r["name"], r["res"]) for r in saved["runs"]]
    first = results[0][1]
    link = first["link"]
    busy = max(saved["load_before"], saved["load_after"]) > 4.5
    parts = [
        _intro(),
        "",
        f"Machine: {saved['machine']}; megatron-core {first['megatron_core']}, torch {first['torch']}"
        + (f"; finished {saved['finished']}. " if "finished" in saved else ". ") +
        f"Load average {saved['load_before']:.1f} before and {saved['load_after']:.1f} after the "
        f"{saved['wall_s'] / 60:.0f}-minute run: "
        + ("**other jobs shared the 2 cores, so absolute numbers are noisy; the ratios are arm against arm in the "
           "same run.**" if busy else "no other heavy job at the start and end (4 ranks on 2 cores all the same)."),
        "",
        f"Link measured in the run (plain gloo exchanges between the namespaces): inter-node "
        f"{link['inter_node_bw'] * 8 / 1e6:.0f} Mbit/s a node, latency {link['inter_node_latency'] * 1e3:.2f} ms; "
        f"intra-node {link['intra_node_bw'] * 8 / 1e9:.1f} Gbit/s, latency {link['latency'] * 1e3:.2f} ms.",
        "",
        _compute_to_network(first, link),
        "",
    ]
    verdicts, notes = [], []
    for r, (name, res) in zip(saved["runs"], results):
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
                  "`exchange`: the exposed exchange, every all-to-all forward and backward until it returns, "
                  "including the wait for the slowest rank; in `overlap` the seconds the step waited for its "
                  "pipeline's exchange work (packing, all-to-alls, sums; `permute` / `combine` then hold only the "
                  "reshaping around it), and `exchange hidden` the rest of that work, which ran beside the experts "
                  "and is not part of the step's sum; `rest`: attention, embeddings, loss, backward compute):", ""]
        parts.append(_common.table(["arm", *keys], [[x["arm"], *[f"{x['parts'][k]:.3f}" for k in keys]] for x in rows]))
        diffs = res["runs"][0]["param_diff_vs_first"]
        stock = rows[0]["loss"]
        agree = []
        names = [x["arm"] for x in rows]
        for x in rows[1:]:
            rel = [abs(a - b) / abs(a) for a, b in zip(stock, x["loss"])]
            upto = next((i for i, v in enumerate(rel) if v > 1e-5), len(rel))
            d = diffs.get(x["arm"], {})
            end = ("experts moved, so not compared" if x["arm"] == "placed"
                   else f"||diff||/||param|| {d.get('max_norm_rel', float('nan')):.1g}")
            agree.append(f"`{x['arm']}` agrees with `stock` to <= 1e-5 (relative) through step {upto} of {len(rel)}, "
                         f"largest difference {max(rel):.1g}, parameters at the end: {end}")
        text = "Losses against `stock`, step by step: " + "; ".join(agree) + "."
        if "stock_ulp" in names:
            ulp = next(x for x in rows if x["arm"] == "stock_ulp")
            text += (" Top-k routing makes training chaotic: a rounding-sized difference (moerail's router ops are "
                     "within fp32 rounding of Megatron's, not bit-identical) sends a token at a near tie to another "
                     "expert, and from there the runs drift apart. `stock_ulp`, stock Megatron with its router "
                     "weights one ulp off, is the floor: Megatron against itself after a rounding-sized change "
                     "(numbers above). It also runs the same code as `stock`, so its speed ratio "
                     f"({ulp['tps'] / base:.2f}x) shows this run's timing noise. The step-for-step agreement for 30 "
                     "steps in three layouts is checked at a small size in `make test` "
                     "(`tests/test_megatron_pretrain.py`).")
        parts += ["", text]
        for x in rows:
            if x["rebalances"]:
                parts.append("Re-placements (busiest/mean device load: measured over the 5 steps before, then "
                             "predicted for the next 5 with the current placement -> with the new one; experts "
                             "moved, of " f"{4 * 32} in 4 layers): " + ", ".join(
                                 f"step {b['step']}: {b.get('window', float('nan')):.2f}; {b['before']:.2f} -> "
                                 f"{b['after']:.2f} ({b['moved']})" for b in x["rebalances"]) + ".")
        m = {x["arm"]: x for x in rows}
        for x in rows:
            if x["arm"] in TARGETS:
                verdicts.append((f"{x['arm']} vs stock", name, x["tps"] / base, TARGETS[x["arm"]], False))
        if "placed" in m and "moerail" in m:
            verdicts.append(("placed vs moerail", name, m["placed"]["tps"] / m["moerail"]["tps"], 1.0, True))
        short = name.split(" (")[0]
        if "moerail" in m and "stock" in m and not notes:
            st, mo = m["stock"], m["moerail"]
            ceiling = st["step_s"] / max(1e-9, st["step_s"] - st["parts"]["exchange"])
            notes.append(
                f"Where the time goes ({short}): moerail changes the exchange, {st['parts']['exchange']:.2f} s -> "
                f"{mo['parts']['exchange']:.2f} s a step ({st['inter'] / max(1, mo['inter']):.1f}x fewer inter-node "
                f"bytes: `{mo['strategy']}` sends a token once per node, Megatron once per expert); everything else "
                f"(attention, embeddings, loss, backward compute, experts) is the same code in both arms and takes "
                f"{st['step_s'] - st['parts']['exchange']:.2f} s of stock's {st['step_s']:.2f} s step, so a free "
                f"exchange would give at most {ceiling:.2f}x here. What is left of moerail's exchange "
                f"({mo['parts']['exchange']:.2f} s) is mostly the link: its inter-node bytes (each node sends half) "
                f"need {mo['inter'] / 2 / (LINK_MBIT * 1e6 / 8):.2f} s at the shaped {LINK_MBIT} Mbit/s and "
                f"{mo['inter'] / 2 / link['inter_node_bw']:.2f} s at the rate measured at the start under this "
                "load; the rest is per-message cost and waiting for the slowest rank (8 MoE layer passes a step, "
                "4 layers x 2 micro-batches, each with two small all-gathers for the plan and, for `dedup`, two "
                "hops each way forward and backward). Less would need fewer bytes: BF16 rows (half), or "
                "node-limited routing (fewer nodes per token), both choices of the model, not of the exchange.")
        if "overlap" in m and "moerail" in m:
            ov, mo = m["overlap"], m["moerail"]
            work = ov["parts"]["exchange"] + ov["parts"]["exchange hidden"]
            faster = ov["tps"] > mo["tps"]
            notes.append(
                f"Overlap ({short}): `use_moerail(num_chunks=2)` hid {ov['parts']['exchange hidden']:.2f} s of its "
                f"{work:.2f} s of exchange work a step behind the experts and waited {ov['parts']['exchange']:.2f} s "
                f"(moerail without it: {mo['parts']['exchange']:.2f} s exposed, plus "
                f"{mo['parts']['permute'] + mo['parts']['combine']:.2f} s of packing in `permute` / `combine`); "
                f"{ov['tps'] / mo['tps']:.2f}x moerail's tokens/s. "
                + ("It pays here. " if faster else
                   f"It does not pay on this machine: the exchange's work (packing, gloo's copies, the TCP stack that "
                   f"moves the bytes) runs on the same 2 CPU cores as the experts, so the work the helper thread "
                   f"hides is taken from the experts' cores (experts {ov['parts']['experts']:.2f} s forward against "
                   f"{mo['parts']['experts']:.2f} s without overlap), and a second chunk adds a round of messages. ")
                + "On GPUs the exchange runs on the NICs and copy engines beside the SMs, which is where the "
                "pipeline is meant to hide it; there it wants experts whose compute is comparable to the "
                "exchange's transfer time. The `moerail` and `placed` arms do not use it.")
        if "placed" in m and "moerail" in m:
            pl, mo = m["placed"], m["moerail"]
            later = [f"{b['window']:.2f}" for b in pl["rebalances"][1:] if "window" in b]
            moved = [b["moved"] for b in pl["rebalances"]]
            steps = res["runs"][0]["arms"]["placed"]["step_s"]
            at = {b["step"] - 1 for b in pl["rebalances"]}
            cost = _median([steps[i] for i in at if i < len(steps)]) - _median(
                [x for i, x in enumerate(steps) if i not in at])
            balanced = pl["load"] < mo["load"] - 0.02
            faster = pl["tps"] > mo["tps"]
            gain = 3 * mo["parts"]["experts"] * max(0.0, 1 - pl["load"] / mo["load"])
            predicted = ", ".join(f"{b['after']:.2f}" for b in pl["rebalances"][:-1]) or "n/a"
            notes.append(
                f"Placement ({short}): busiest/mean device load, mean over the steps after warm-up, {pl['load']:.2f} "
                f"with re-placement against {mo['load']:.2f} without (the windows after each re-placement measured "
                f"{', '.join(later) or 'n/a'}, where each placement predicted "
                f"{predicted}: the router keeps "
                "learning, so a placement made for the last steps fits the next ones less well as they pass); "
                f"{', '.join(str(x) for x in moved) or 'no'} experts moved at the re-placements, each re-placement "
                f"step {cost:.2f} s longer than the others (weights and Adam state over the link; in the mean column, "
                "not in the median). Inter-node bytes "
                f"{pl['inter'] / 1e6:.1f} MB against {mo['inter'] / 1e6:.1f} MB a step: with top-8 of 32 experts on 2 "
                "nodes nearly every token reaches both nodes whatever the placement. So placement changes only the "
                f"experts' balance: the experts' forward is {mo['parts']['experts']:.2f} s of moerail's "
                f"{mo['step_s']:.2f} s step (about 3x that with backward), and with a balanced load no rank waits "
                f"in the exchange for the busiest one (exchange {mo['parts']['exchange']:.2f} s -> "
                f"{pl['parts']['exchange']:.2f} s). Balancing can save at most about {gain:.2f} s a step here "
                f"({gain / mo['step_s']:.0%}): the busiest device's extra expert work, forward and backward, "
                f"3 x {mo['parts']['experts']:.2f} s x (1 - {pl['load']:.2f} / {mo['load']:.2f}). "
                f"placed/moerail: {pl['tps'] / mo['tps']:.2f}x"
                + (", a difference larger than the balance can account for: timing noise of this run, or a cost of "
                   "placement that this run does not separate. " if abs(
                    pl["tps"] / mo["tps"] - 1) > gain / mo["step_s"] and not faster else ". ")
                + ("" if balanced else "Placement hardly changed the measured balance, so that difference is "
                   "re-placement's cost plus this run's timing noise, not a balance gain. ")
                + ("" if faster and pl["tps"] / rows[0]["tps"] >= TARGETS["placed"] else
                   "What would make placement pay more: a step where the experts are a larger share"
                   + ("" if "larger" in short else " (the run with larger experts shows the trend)") + ", a router that has settled (later in training, where the load "
                   "of one window predicts the next), or replicas of the hot experts on both nodes (the planner "
                   "takes replicas; Megatron's experts module holds E/EP experts a rank, so the integration cannot "
                   "give it spare slots yet)."))
        parts.append("")
    _plot(results, PNG)
    parts += ["### Targets", ""]
    parts.append(_common.table(["comparison", "run", "measured", "target", "met"],
                               [[a, n.split(" (")[0], f"{v:.2f}x", f"{'>' if strict else '>='} {t:.2f}x",
                                 "yes" if (v > t if strict else v >= t) else "**no**"]
                                for a, n, v, t, strict in verdicts]))
    parts += ["", *[f"{x}\n" for x in notes], f"![loss vs step and tokens/s per arm]({PNG.name})", ""]
    return "\n".join(parts)


def main() -> None:
    """``--render``: re-writes this section of BENCHMARKS.md from ``benches/e2e_results.json``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if not args.render:
        ap.error("run it through benches/run_all.py --only e2e; --render re-writes the section from saved results")
    body = f"## {TITLE}\n\nSource: `benches/{pathlib.Path(__file__).name}`.\n\n" + render(
        json.loads(RESULTS.read_text())).strip() + "\n"
    out = HERE / "BENCHMARKS.md"
    text = out.read_text()
    start = text.find(f"## {TITLE}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + 3)
        text = text[:start] + body + (text[end:] if end >= 0 else "")
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
