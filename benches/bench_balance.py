"""Expert placement: moerail.rebalance_experts against a straightforward numpy implementation of
the same algorithm (DeepSeek's EPLB, ``tests/balance_reference.py``), and the balance it reaches.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import torch

import moerail

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import balance_reference as ref  # noqa: E402

import _common  # noqa: E402

TITLE = "Expert placement (EPLB / refine) and migration planning"

# (name, layers, experts, replicas, groups, nodes, gpus)
SIZES = [
    ("DeepSeek-V3-like: 256 experts + 32 redundant, 32 GPUs in 4 nodes (hierarchical)", 58, 256, 288, 8, 4, 32),
    ("288 slots on 144 GPUs in 18 nodes (global)", 58, 256, 288, 8, 18, 144),
]


def zipf_loads(rng, layers, experts, s):
    """Expert of popularity rank r gets ~ 1 / r^s tokens (ranks shuffled per layer), x U(0.8, 1.2)."""
    out = np.empty((layers, experts))
    for layer in range(layers):
        out[layer] = 1e5 / (rng.permutation(experts) + 1) ** s * rng.uniform(0.8, 1.2, size=experts)
    return out


def _speed(quick: bool) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for name, layers, experts, replicas, groups, nodes, gpus in SIZES:
        if quick:
            layers = 8
        w = zipf_loads(rng, layers, experts, 1.2)
        wt = torch.from_numpy(w)
        args = (replicas, groups, nodes, gpus)
        same = np.array_equal(moerail.rebalance_experts(wt, *args)[0].numpy(), ref.rebalance_experts(w, *args)[0])
        t_np = _common.timeit(lambda w=w, a=args: ref.rebalance_experts(w, *a), warmup=1, repeat=3 if quick else 5)
        t_eplb = _common.timeit(
            lambda w=wt, a=args: moerail.rebalance_experts(w, *a), warmup=3, repeat=20, min_time=0.5
        )
        t_ref = _common.timeit(
            lambda w=wt, a=args: moerail.rebalance_experts(w, *a, mode="refine"), warmup=1, repeat=5
        )
        rows.append(
            [name, f"{layers} x {experts}", _common.ms(t_np), _common.ms(t_eplb), f"**{t_np / t_eplb:.0f}x**",
             "yes" if same else "NO", _common.ms(t_ref)]
        )  # fmt: skip
    return _common.table(
        ["size", "layers x experts", "numpy EPLB (ms)", "moerail eplb (ms)", "speed-up", "same phy2log",
         "moerail refine (ms)"],
        rows,
    )  # fmt: skip


def _quality(quick: bool) -> str:
    rng = np.random.default_rng(1)
    rows = []
    for name, layers, experts, replicas, groups, nodes, gpus in SIZES:
        if quick:
            layers = 8
        for s in (1.0, 1.2, 1.5):
            w = zipf_loads(rng, layers, experts, s)
            if experts % gpus == 0:
                static = moerail.default_placement(layers, experts, gpus)
            else:  # load-agnostic: the placement for uniform loads
                static, _, _ = moerail.rebalance_experts(np.ones((layers, experts)), replicas, groups, nodes, gpus)
            before = moerail.placement_metrics(w, static, gpus, nodes)
            res = {}
            for mode in ("eplb", "refine"):
                p, _, _ = moerail.rebalance_experts(w, replicas, groups, nodes, gpus, mode=mode)
                res[mode] = moerail.placement_metrics(w, p, gpus, nodes)["summary"]
            bound = res["eplb"]["lower_bound"]
            rows.append(
                [name.split(":")[0].split(" (")[0], f"{s}", f"{before['summary']['max_mean_device']:.3f}",
                 f"{res['eplb']['max_mean_device']:.3f}", f"{res['refine']['max_mean_device']:.3f}", f"{bound:.3f}",
                 f"{res['eplb']['max_mean_node']:.3f} / {res['refine']['max_mean_node']:.3f}"]
            )  # fmt: skip
    return _common.table(
        ["size", "Zipf s", "before (static)", "eplb", "refine", "lower bound", "node max/mean eplb / refine"],
        rows,
    )


def _new_placement(label, w1, old, topo):
    replicas, groups, nodes, gpus = topo
    if label == "keep the placement":
        return old
    if label.endswith("from scratch"):
        return moerail.rebalance_experts(w1, *topo, mode=label.split()[0])[0]
    max_moves = 16 if "max_moves" in label else None
    return moerail.improve_placement(w1, old, gpus, nodes, max_moves=max_moves)[0]


def _migration(quick: bool) -> str:
    rng = np.random.default_rng(2)
    rows = []
    expert_bytes = 3 * 7168 * 2048 * (2 + 4 + 4 + 4)  # bf16 weights, fp32 main copy, Adam m and v
    for name, layers, experts, replicas, groups, nodes, gpus in SIZES:
        if quick:
            layers = 8
        short = name.split(":")[0].split(" (")[0]
        w0 = zipf_loads(rng, layers, experts, 1.2)
        # the next interval: the same experts stay hot, with 20% noise
        w1 = w0 * rng.uniform(0.8, 1.2, size=w0.shape)
        old, _, _ = moerail.rebalance_experts(w0, replicas, groups, nodes, gpus)
        keep = groups % nodes == 0 and nodes > 1
        topo = (replicas, groups, nodes, gpus)
        candidates = [
            "keep the placement",
            "eplb from scratch",
            "refine from scratch",
            "improve_placement",
            "improve_placement, max_moves=16",
        ]
        for label in candidates:
            t0 = time.perf_counter()
            new = _new_placement(label, w1, old, topo)
            t_place = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan = moerail.plan_migration(old, new, gpus, nodes, expert_bytes=expert_bytes, keep_nodes=keep)
            t_plan = time.perf_counter() - t0
            ratio = moerail.placement_metrics(w1, plan.phy2log, gpus, nodes)["summary"]["max_mean_device"]
            rows.append(
                [short, label, f"{ratio:.3f}", _common.ms(t_place), _common.ms(t_plan), int((old != new).sum()),
                 len(plan.transfers), plan.num_network_transfers, f"{plan.inter_node_bytes / 1e9:.1f}",
                 f"{plan.seconds:.3f}"]
            )  # fmt: skip
    return _common.table(
        ["size", "new placement", "max/mean (next loads)", "place (ms)", "plan (ms)", "slots changed (unmatched)",
         "copies after matching", "over the network", "inter-node GB", "migration s (link model)"],
        rows,
    )  # fmt: skip


def run(quick: bool) -> str:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return "\n".join(
        [
            "Method: `moerail.rebalance_experts(weight, 288, 8, nodes, gpus)` (the public Python call, output "
            "tensors included) against `tests/balance_reference.py`, a straightforward numpy implementation of "
            "EPLB's published algorithm (per-row Python loops for balanced packing, a loop over redundant slots "
            "vectorised over layers for replication), on the same Zipf(s=1.2) loads, median wall time. "
            "`same phy2log` checks the outputs are identical in the same run. Zipf loads: expert of popularity "
            "rank r gets ~1/r^s tokens, ranks shuffled per layer, x U(0.8, 1.2).",
            "",
            _speed(quick),
            "",
            "Balance (mean over layers of busiest / mean device load; lower bound: the best any placement on these "
            "slots can do, max(1, largest per-replica load of the best replica counts / mean)). 'before' is "
            "Megatron's layout (E/G consecutive experts a device, no replicas) where G divides E, else the "
            "placement EPLB makes for uniform loads (load-agnostic). In the hierarchical policy each "
            "node keeps whole groups, so the node column bounds what the devices can reach.",
            "",
            _quality(quick),
            "",
            "Migration: the placement made for one interval's loads, then the next interval (same hot experts, "
            "20% noise): keep it, re-place from scratch, or improve it in place (`improve_placement`: refine's "
            "moves starting from the current placement, optionally at most 16 changed slots a layer). Devices and "
            "slots of the new placement are renumbered (Hungarian matching) so experts stay put; an expert = 3 x "
            "7168 x 2048 parameters with bf16 weights, fp32 main copy and Adam moments; link model: 150 GB/s "
            "inside a node, 45 GB/s between nodes, 20 us a message.",
            "",
            _migration(quick),
        ]
    )
