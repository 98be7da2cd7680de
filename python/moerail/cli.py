"""The ``moerail`` command: ``python -m moerail.cli <subcommand> ...`` (or ``moerail ...``).

Subcommands:

* ``balance``: expert placement for recorded loads - the before/after table (max/mean device
  load, node load, CV, the lower bound), optionally a heatmap, the placement file and the
  migration plan from the current placement.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _table(header, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def cmd_balance(args: argparse.Namespace) -> int:
    import torch

    from . import balance

    load = balance.load_loads(args.loads)
    num_layers, num_experts = load.shape
    replicas = args.replicas if args.replicas is not None else num_experts
    groups = args.groups if args.groups is not None else 1
    print(
        f"loads: {args.loads} ({num_layers} layers x {num_experts} experts, {load.sum():.0f} tokens); "
        f"{replicas} slots on {args.gpus} devices in {args.nodes} nodes, {groups} groups "
        f"({'hierarchical' if groups % args.nodes == 0 else 'global'} policy)"
    )
    if args.current is not None:
        before = balance.load_loads(args.current).to(torch.int64) if not args.current.endswith((".pt", ".pth")) else None
        if before is None:
            obj = torch.load(args.current, map_location="cpu", weights_only=True)
            before = obj["phy2log"] if isinstance(obj, dict) else obj
        before_name = "current"
    elif num_experts % args.gpus == 0:
        before = balance.default_placement(num_layers, num_experts, args.gpus)
        before_name = "before (E/G experts a device)"
    else:
        before, before_name = None, None

    rows = []
    placements = {}

    def row(name, phy2log):
        m = balance.placement_metrics(load, phy2log, args.gpus, args.nodes, args.capacity)
        s = m["summary"]
        rows.append(
            [name, f"{s['max_mean_device']:.3f}", f"{s['max_mean_device_worst']:.3f}", f"{s['step_max_mean']:.3f}",
             f"{s['max_mean_node']:.3f}", f"{s['cv_device']:.3f}"]
            + ([f"{100 * s['dropped_rate']:.2f}%"] if args.capacity is not None else [])
        )  # fmt: skip
        return m

    if before is not None:
        bm = row(before_name, before)
    modes = ["eplb", "refine"] if args.mode == "both" else [args.mode]
    for mode in modes:
        p, l2p, c = balance.rebalance_experts(load, replicas, groups, args.nodes, args.gpus, mode=mode)
        placements[mode] = (p, l2p, c)
        m = row(mode, p)
    bound = m["lower_bound"]
    rows.append(["lower bound", f"{float(bound.mean()):.3f}", f"{float(bound.max()):.3f}", "", "", ""]
                + ([""] if args.capacity is not None else []))  # fmt: skip
    header = ["placement", "max/mean dev", "worst layer", "step max/mean", "max/mean node", "CV dev"]
    if args.capacity is not None:
        header.append("dropped")
    print(_table(header, rows))
    print("(max/mean dev: mean over layers of busiest / mean device load; step: sum over layers of the busiest "
          "load / sum of the mean)")  # fmt: skip
    best = placements[modes[-1]]
    if before is not None and args.expert_bytes is not None:
        plan = balance.plan_migration(before, best[0], args.gpus, args.nodes, expert_bytes=args.expert_bytes,
                                      keep_nodes=groups % args.nodes == 0 and args.nodes > 1)  # fmt: skip
        print(
            f"migration {before_name} -> {modes[-1]}: {len(plan.transfers)} copies "
            f"({plan.num_network_transfers} over the network, {plan.inter_node_bytes / 1e9:.2f} GB between nodes, "
            f"{plan.intra_node_bytes / 1e9:.2f} GB inside nodes), {plan.seconds * 1e3:.1f} ms on the link model"
        )
        best = (plan.phy2log, *balance.log2phy_from_phy2log(plan.phy2log, num_experts))
        if args.seconds_per_token is not None:
            d = balance.should_migrate(load, before, plan, args.gpus, args.nodes, seconds_per_token=args.seconds_per_token,
                                       horizon_steps=args.horizon, log=False)  # fmt: skip
            print(str(d))
    if args.save:
        torch.save({"phy2log": best[0], "log2phy": best[1], "logcnt": best[2]}, args.save)
        print(f"wrote {args.save}")
    if args.plot:
        balance.plot_heatmap(args.plot, load, best[0], args.gpus, args.nodes, before=before)
        print(f"wrote {args.plot}")
    _ = bm if before is not None else None
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moerail", description="moerail: faster Mixture-of-Experts training")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "balance",
        help="expert placement for recorded loads: the before/after table",
        description="Places and replicates experts for recorded loads (EPLB and refined) and prints the "
        "before/after balance table.",
    )
    b.add_argument("--loads", required=True, help="loads [layers, experts]: .npy, .pt, .csv or .json (a LoadTracker trace)")
    b.add_argument("--gpus", type=int, required=True, help="devices (EP ranks)")
    b.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    b.add_argument("--replicas", type=int, default=None, help="physical slots per layer (default: the number of experts)")
    b.add_argument("--groups", type=int, default=None, help="expert groups (default 1)")
    b.add_argument("--mode", choices=["eplb", "refine", "both"], default="both")
    b.add_argument("--capacity", type=float, default=None, help="tokens per slot (reports dropped tokens)")
    b.add_argument("--current", default=None, help="the current phy2log (.pt/.npy/.csv) instead of the E/G-a-device layout")
    b.add_argument("--expert-bytes", type=float, default=None, help="bytes of one expert with its optimizer state: plan the migration")
    b.add_argument("--seconds-per-token", type=float, default=None, help="expert seconds per routed token: decide the migration")
    b.add_argument("--horizon", type=float, default=100.0, help="steps until the next decision (default 100)")
    b.add_argument("--save", default=None, help="write the new placement (phy2log, log2phy, logcnt) to this .pt file")
    b.add_argument("--plot", default=None, help="write a heatmap PNG (layers x experts, layers x devices before/after)")
    b.set_defaults(func=cmd_balance)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"moerail {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
