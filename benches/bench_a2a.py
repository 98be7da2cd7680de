"""The dispatcher's strategies on two emulated nodes, and the planner's speed."""

from __future__ import annotations

import time

import netns_a2a
import torch

import _common
import moerail
from moerail.ep.plan import _compact, _links, _make_plan, _strategies

TITLE = "Expert-parallel exchange: flat vs 2dh vs dedup on two emulated nodes, planning time"


def _planning(quick: bool) -> str:
    rows = []
    for w, rpn, e in ((64, 8, 256), (64, 8, 64)):
        t, k = 4096, 8
        g = torch.Generator().manual_seed(0)
        idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices.sort(dim=1).values.contiguous()
        # What a dispatch first does on the host: the routing map to each entry's slot.
        rmap = torch.zeros(t, e, dtype=torch.bool).scatter_(1, idx, True)
        log2phy, logcnt = moerail.log2phy_from_phy2log(torch.arange(e).view(1, -1), e)
        sargs = (rmap, log2phy[0], logcnt[0], e)
        to_slots = _common.timeit(lambda a=sargs: moerail.select_replicas(_compact(a[0]), *a[1:], offset=1), warmup=10,
                                  repeat=51)
        vec = torch.zeros(4 + e + w + w // rpn, dtype=torch.int64)
        args = (idx, w, rpn, e // w, 0, 0, vec, False)
        threads = moerail.get_num_threads()
        layout = {}
        for n in sorted({1, threads}):
            moerail.set_num_threads(n)
            layout[n] = _common.timeit(lambda a=args: moerail._native.ep.a2a_counts(*a), warmup=20, repeat=200)
        moerail.set_num_threads(threads)
        gathered = vec.repeat(w, 1)
        pargs = (gathered, w, rpn, e // w, "auto", 7168, 2, True, None)
        plan = _common.timeit(lambda a=pargs: _make_plan(*a), warmup=10, repeat=51)
        # What a dispatch runs: the same plans and choice, plus rank 0's route (every hop's index
        # and row counts), in one call (the identity placement: slot = expert).
        rargs = (gathered, idx, 0, rpn, e // w, _strategies("auto"), 7168, 2, True, _links(None))
        route = _common.timeit(lambda a=rargs: moerail._native.ep.a2a_route(*a), warmup=10, repeat=51)
        rows.append([f"T={t}, k={k}, EP={w} ({w // rpn} nodes x {rpn}), {e} experts", f"{to_slots * 1e6:.0f}",
                     " / ".join(f"{layout[n] * 1e6:.0f}" for n in sorted(layout)), f"{plan * 1e6:.0f}",
                     f"{route * 1e6:.0f}"])
    return _common.table(["size", "routing map to slots, all threads (us)",
                          "dispatch layout of one rank, 1 / all threads (us)",
                          "4 plans + auto, Python objects incl. (us)",
                          "4 plans + auto + this rank's route, one call (us)"], rows)


def run(quick: bool) -> str:
    parts = [
        "### Planning time",
        "",
        "First the routing map `[T, E]` (on the host) becomes each entry's slot (`_compact`: the experts of each "
        "row in ascending order; `select_replicas`: the replica each goes to, here one per expert). "
        "The dispatch layout is what every rank computes from its routed tokens before the exchange (DeepEP's "
        "`get_dispatch_layout`: copies per slot, tokens per rank and per node; the counts the ranks all-gather), "
        "through the Python binding as the dispatcher calls it (slot ids range-checked, no repeat check: they come "
        f"from a routing map), on 1 and on {moerail.get_num_threads()} thread(s); target 50 us. The plans of all four "
        "strategies from the gathered counts, with their traffic of all four passes as Python dicts, and the `auto` "
        "choice; the last column is what `AllToAllDispatcher.dispatch` calls: the same plans and choice plus this "
        "rank's route (every hop's gather index and row counts, the output order), built in Rust in one call "
        "(`_native.ep.a2a_route`), which keeps the plans in Rust (a pass reads only the chosen plan's row layout).",
        "",
        _planning(quick),
        "",
    ]
    why = netns_a2a.available()
    parts += ["### Two emulated nodes", ""]
    if why:
        return "\n".join(parts + [f"Not run here: {why}."])
    cfg = dict(tokens=128 if quick else 256, hidden=256, experts=16, topk=8, warmup=1, repeat=3 if quick else 5,
               strategies=["flat", "2dh", "dedup", "allgather", "auto"], overlap=3)
    rate = 100
    netns_a2a.setup(rate)
    try:
        t0 = time.perf_counter()
        rows = netns_a2a.run(cfg)
        wall = time.perf_counter() - t0
    finally:
        netns_a2a.teardown()
    link = rows.pop()["link"]
    overlap = [r for r in rows if "overlap_chunks" in r]
    rows = [r for r in rows if "overlap_chunks" not in r]
    table = [[r["strategy"], f"{r['inter_node_bytes'] / 1e6:.2f}", _common.ms(r["measured_s"]),
              _common.ms(r["predicted_s"]), f"{r['measured_s'] / r['predicted_s']:.2f}"] for r in rows]
    parts += [
        f"Method: two network namespaces joined by a veth pair, each end limited to {rate} Mbit/s with `tc` tbf "
        "(netem, for an added delay, is not in this kernel); 2 gloo ranks per namespace (inside a namespace they "
        "talk over loopback). One rank = one process with 1 thread. Each rank routes "
        f"{cfg['tokens']} tokens (hidden {cfg['hidden']}, fp32) to top-{cfg['topk']} of {cfg['experts']} experts "
        "(4 per rank, so a token reaches both nodes, several experts on each). Measured: dispatch + combine, the "
        f"slowest rank, median of {cfg['repeat']} after a warm-up. Predicted: the planner's alpha-beta model with "
        "the link parameters measured in the same run by plain gloo exchanges (loopback "
        f"{link['intra_node_bw'] / 1e6:.0f} MB/s, veth {link['inter_node_bw'] / 1e6:.1f} MB/s per node, latency "
        f"{link['latency'] * 1e6:.0f} us inside / {link['inter_node_latency'] * 1e6:.0f} us between nodes). "
        f"Whole run {wall:.0f} s.",
        "",
        _common.table(["strategy", "inter-node MB (dispatch + combine)", "measured (ms)", "predicted (ms)", "measured / predicted"],
                      table),
        "",
        "dedup sends a token across the network once per destination node instead of once per expert: at top-8 of "
        "16 experts on 2 nodes that is ~4x fewer inter-node bytes, and the measured time follows. 2dh moves the same "
        "bytes as flat in fewer messages, which only pays where latency dominates (not on this link).",
        "",
        "Overlap: `AllToAllDispatcher.forward(hidden, probs, routing_map, experts)` with `dedup` and an expert "
        "function of a few matmuls per row; with `num_chunks=4` a helper thread runs the exchanges of the other "
        "chunks while the experts compute one. Measured: dispatch + experts + combine, slowest rank, median.",
        "",
        _common.table(["num_chunks", "forward (ms)", "exchange hidden behind the experts"],
                      [[r["overlap_chunks"], _common.ms(r["measured_s"]), f"{100 * r['hidden_fraction']:.0f}%"]
                       for r in overlap]),
    ]
    return "\n".join(parts)
