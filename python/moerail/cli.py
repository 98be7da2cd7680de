"""The ``moerail`` command.

Subcommands (one function each, registered on an argparse subparser):

* ``moerail plan``: simulate a training step for a layout, or search the layouts.
* ``moerail balance``: expert placement for recorded loads: the before/after balance table (max/mean
  device and node load, CV, the lower bound), a heatmap, the placement and its migration plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

# ----------------------------------------------------------------------------- plan

_LAYOUT_FLAGS = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "vpp": "virtual_pipeline_model_parallel_size",
    "cp": "context_parallel_size",
    "ep": "expert_model_parallel_size",
    "etp": "expert_tensor_parallel_size",
}
_LAYOUT_KEYS = set(_LAYOUT_FLAGS.values())


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _kv_list(items: Optional[List[str]], flag: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_tokens(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def _layout_line(lay: Dict[str, Any]) -> str:
    s = (
        f"TP{lay['tp']} CP{lay['cp']} PP{lay['pp']}"
        + (f" VPP{lay['vpp']}" if lay.get("vpp", 1) > 1 else "")
        + f" EP{lay['ep']} ETP{lay['etp']} | DP{lay['dp']} EDP{lay['edp']}"
    )
    if lay.get("folded"):
        s += " (folded)"
    return s


def _print_report(rep: Dict[str, Any], cluster: str) -> None:
    m, lay, t, b, mem = rep["model"], rep["layout"], rep["time"], rep["breakdown_s"], rep["memory_gib"]
    name = m.get("name") or "model"
    print(f"{name} on {lay['world_size']} x {cluster or 'devices'}: {_layout_line(lay)}")
    rc = lay.get("recompute") or "none"
    print(
        f"  micro-batch {lay['micro_batch_size']} x {lay['num_microbatches']} per step, recompute {rc}, "
        f"stage layers {lay['stage_layers']}"
    )
    print(
        f"  parameters {m['parameters'] / 1e9:.1f}B ({m['active_parameters'] / 1e9:.1f}B active); "
        f"FLOPs/token {m['flops_per_token'] / 1e9:.1f} GF causal, {m['flops_per_token_noncausal'] / 1e9:.1f} GF non-causal"
    )
    print(
        f"  step {_fmt_s(t['step_s'])}, {_fmt_tokens(t['tokens_per_s'])} tokens/s, "
        f"{t['tflops_per_device']:.0f} TFLOPS/device, MFU {100 * t['mfu']:.1f}% "
        f"(non-causal {100 * t['mfu_noncausal']:.1f}%)"
    )
    comp = ", ".join(f"{k} {_fmt_s(v)}" for k, v in b["compute"].items() if v > 0 and k != "recompute")
    print(f"  compute (stage {b['critical_stage']}, per step): {comp}")
    if b["compute"].get("recompute", 0) > 0:
        print(f"    of which recompute {_fmt_s(b['compute']['recompute'])}")
    comm = ", ".join(
        f"{k} {_fmt_s(v['exposed'])} exposed / {_fmt_s(v['total'])}" for k, v in b["communication"].items() if v["total"] > 0
    )
    if comm:
        print(f"  communication: {comm}")
    print(f"  pipeline bubble {_fmt_s(b['pipeline_bubble'])}, optimizer {_fmt_s(b['optimizer'])}")
    act = mem["activations"]
    print(
        f"  memory (stage {mem['stage']}, GiB): weights {mem['weights']:.1f}, gradients {mem['gradients']:.1f}, "
        f"optimizer {mem['optimizer']:.1f} (without distributed optimizer {mem['optimizer_without_distributed_optimizer']:.1f}), "
        f"activations {act['total']:.1f} (attention {act['attention']:.1f}, mlp {act['mlp']:.1f}, "
        f"embedding/logits {act['embedding_and_logits']:.1f}; {mem['inflight_microbatches']:.0f} micro-batches in flight), "
        f"dispatch/transient {mem['moe_dispatch_and_transient']:.1f}, reserved {mem['reserved']:.1f}"
    )
    saved = []
    if mem["recompute_savings"] > 0:
        saved.append(f"recompute saves {mem['recompute_savings']:.1f}")
    if mem["offload_savings"] > 0:
        saved.append(f"offload saves {mem['offload_savings']:.1f}")
    verdict = "fits" if rep["fits"] else "DOES NOT FIT"
    print(
        f"  total {mem['total']:.1f} of {mem['capacity']:.1f} GiB: {verdict}" + (f" ({', '.join(saved)})" if saved else "")
    )


def _print_search(out: Dict[str, Any], cluster: str) -> None:
    st = out["stats"]
    rate = st["evaluated"] / st["seconds"] if st["seconds"] > 0 else float("inf")
    print(
        f"searched {st['evaluated']} layouts in {st['seconds']:.2f} s ({rate:,.0f}/s): "
        f"{st['fit']} fit in memory, {st['invalid']} invalid"
    )
    if not out["results"]:
        print("no layout fits: try more devices, --include-oom, or a smaller micro-batch / more recomputation")
        return
    header = f"{'#':>3}  {'layout':<56} {'mbs':>3} {'recompute':<9} {'MFU':>6} {'tokens/s':>9} {'step':>9} {'mem GiB':>8}"
    print(header)
    for i, r in enumerate(out["results"], 1):
        lay, rep = r["layout"], r["report"]
        lo = rep["layout"]
        text = _layout_line(lo)
        if lay.get("decoder_first_pipeline_num_layers"):
            text += f" [{lay['decoder_first_pipeline_num_layers']}..{lay['decoder_last_pipeline_num_layers']}]"
        elif lay.get("account_for_embedding_and_loss_in_pipeline_split"):
            text += " [emb+loss]"
        mark = "" if rep["fits"] else " OOM"
        print(
            f"{i:>3}  {text:<56} {lay['micro_batch_size']:>3} {lay['recompute']:<9} "
            f"{100 * rep['time']['mfu']:>5.1f}% {_fmt_tokens(rep['time']['tokens_per_s']):>9} "
            f"{_fmt_s(rep['time']['step_s']):>9} {rep['memory_gib']['total']:>8.1f}{mark}"
        )
    print(f"(cluster {cluster}; MFU with causal attention FLOPs, Megatron's current formula)")


def cmd_plan(args: argparse.Namespace) -> int:
    from . import sim

    if args.list_presets:
        print("models:  " + ", ".join(sorted(sim.model_presets())))
        print("clusters: " + ", ".join(sorted(sim.cluster_presets())))
        return 0
    overrides: Dict[str, Any] = {k: _parse_value(v) for k, v in _kv_list(args.set, "--set").items()}
    if args.gbs is not None:
        overrides["training.global_batch_size"] = args.gbs
    if args.seq is not None:
        overrides["training.seq_length"] = args.seq
    if args.mbs is not None:
        overrides["training.micro_batch_size"] = args.mbs
    for flag, key in _LAYOUT_FLAGS.items():
        v = getattr(args, flag)
        if v is not None:
            overrides[f"layout.{key}"] = v
    cfg = sim.resolve_config(
        args.config,
        model=args.model,
        cluster=args.cluster,
        devices=args.devices,
        megatron_args=args.megatron_args,
        **overrides,
    )
    ignored: List[str] = []
    if args.megatron_args is not None:
        _, ignored = sim.parse_megatron_args(args.megatron_args)
        if ignored and not args.json and not args.quiet:
            print(f"(not modelled, ignored: {' '.join(ignored)})", file=sys.stderr)
    if not cfg["training"].get("seq_length"):
        cfg["training"]["seq_length"] = 4096
    cluster_name = cfg["cluster"].get("name", "")
    has_layout = any(k in cfg["layout"] for k in _LAYOUT_KEYS)
    searching = args.search or args.top is not None or not has_layout
    if searching:
        space: Dict[str, List[Any]] = {}
        for k, v in _kv_list(args.space, "--space").items():
            items = [x.strip() for x in v.split(",") if x.strip()]
            space[k] = items if k == "recompute" else [int(x) for x in items]
        out = sim.search(
            cfg,
            top=args.top or 10,
            space=space or None,
            include_oom=args.include_oom,
            progress=not (args.quiet or args.json) or args.progress,
        )
        if args.json:
            print(json.dumps(out))
        else:
            _print_search(out, cluster_name)
        return 0
    rep = sim.simulate(cfg)
    if args.json:
        print(json.dumps(rep))
    else:
        _print_report(rep, cluster_name)
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="simulate a training step for a layout, or search the layouts",
        description=(
            "Predicts step time, MFU and per-device memory of a MoE training run, or searches the "
            "parallel layouts (TP/CP/PP/VPP/EP/ETP, micro-batch, recomputation) and prints the fastest "
            "that fit. With a layout (a config's [layout] section, --megatron-args with parallel sizes, "
            "or --tp/--pp/...) it simulates; otherwise, or with --top/--search, it searches."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="TOML or JSON with sections model, training, layout, cluster")
    p.add_argument("--megatron-args", metavar="ARGS", help="a Megatron-LM command line (quoted)")
    p.add_argument("--model", help="model preset (see --list-presets)")
    p.add_argument("--cluster", help="cluster preset (see --list-presets)")
    p.add_argument("--devices", type=int, help="number of devices (GPUs / NPUs)")
    p.add_argument("--gbs", type=int, help="global batch size (sequences)")
    p.add_argument("--seq", type=int, help="sequence length (default 4096)")
    p.add_argument("--mbs", type=int, help="micro-batch size")
    for flag in _LAYOUT_FLAGS:
        p.add_argument(f"--{flag}", type=int, help=f"{_LAYOUT_FLAGS[flag]}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="set any config key (repeatable)")
    p.add_argument("--search", action="store_true", help="search layouts even if a layout is given")
    p.add_argument("--top", type=int, help="how many layouts to print (search; default 10)")
    p.add_argument(
        "--space", action="append", metavar="DIM=V1,V2", help="restrict a search dimension: tp, cp, pp, vpp, ep, etp, mbs, recompute"
    )
    p.add_argument("--include-oom", action="store_true", help="rank layouts that do not fit in memory too")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    p.add_argument("--progress", action="store_true", help="progress bar even with --json")
    p.add_argument("--list-presets", action="store_true", help="list model and cluster presets")
    p.set_defaults(func=cmd_plan)


# ----------------------------------------------------------------------------- balance


def _balance_table(header, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def cmd_balance(args: argparse.Namespace) -> int:
    import torch

    from . import balance

    try:
        load = balance.load_loads(args.loads)
    except OSError as e:
        raise ValueError(f"--loads: {e}") from None
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
        row(before_name, before)
    modes = ["eplb", "refine", "improve"] if args.mode == "all" else [args.mode]
    current = None if before is None else balance.expand_placement(before, replicas, args.gpus)
    for mode in modes:
        if mode == "improve":
            if current is None:
                if args.mode == "improve":
                    raise ValueError("--mode improve: needs the current placement (--current, or E divisible by --gpus)")
                continue
            p, l2p, c = balance.improve_placement(load, current, args.gpus, args.nodes, max_moves=args.max_moves)
            name = "improve (from " + ("current)" if args.current else "before)")
        else:
            p, l2p, c = balance.rebalance_experts(load, replicas, groups, args.nodes, args.gpus, mode=mode)
            name = mode
        placements[mode] = (p, l2p, c)
        m = row(name, p)
    bound = m["lower_bound"]
    rows.append(["lower bound", f"{float(bound.mean()):.3f}", f"{float(bound.max()):.3f}", "", "", ""]
                + ([""] if args.capacity is not None else []))  # fmt: skip
    header = ["placement", "max/mean dev", "worst layer", "step max/mean", "max/mean node", "CV dev"]
    if args.capacity is not None:
        header.append("dropped")
    print(_balance_table(header, rows))
    print("(max/mean dev: mean over layers of busiest / mean device load; step: sum over layers of the busiest "
          "load / sum of the mean)")  # fmt: skip
    use = args.use if args.use in placements else list(placements)[-1]
    best = placements[use]
    if current is not None and args.expert_bytes is not None:
        # (a layout with fewer slots first fills its new slots locally: expand_placement)
        plan = balance.plan_migration(current, best[0], args.gpus, args.nodes, expert_bytes=args.expert_bytes,
                                      keep_nodes=groups % args.nodes == 0 and args.nodes > 1)  # fmt: skip
        print(
            f"migration {before_name} -> {use}: {len(plan.transfers)} copies "
            f"({plan.num_network_transfers} over the network, {plan.inter_node_bytes / 1e9:.2f} GB between nodes, "
            f"{plan.intra_node_bytes / 1e9:.2f} GB inside nodes), {plan.seconds * 1e3:.1f} ms on the link model"
        )
        best = (plan.phy2log, *balance.log2phy_from_phy2log(plan.phy2log, num_experts))
        if args.seconds_per_token is not None:
            d = balance.should_migrate(load, current, plan, args.gpus, args.nodes, seconds_per_token=args.seconds_per_token,
                                       horizon_steps=args.horizon, log=False)  # fmt: skip
            print(str(d))
    if args.save:
        torch.save({"phy2log": best[0], "log2phy": best[1], "logcnt": best[2]}, args.save)
        print(f"wrote {args.save}")
    if args.plot:
        balance.plot_heatmap(args.plot, load, best[0], args.gpus, args.nodes, before=before)
        print(f"wrote {args.plot}")
    return 0


def _add_balance(sub: argparse._SubParsersAction) -> None:
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
    b.add_argument("--mode", choices=["eplb", "refine", "improve", "all"], default="all",
                   help="placements to compute (improve: incremental from the current one; default all)")
    b.add_argument("--use", choices=["eplb", "refine", "improve"], default="refine",
                   help="the placement to plan, save and plot (default refine)")
    b.add_argument("--max-moves", type=int, default=None, help="improve: at most this many changed slots a layer")
    b.add_argument("--capacity", type=float, default=None, help="tokens per slot (reports dropped tokens)")
    b.add_argument("--current", default=None, help="the current phy2log (.pt/.npy/.csv) instead of the E/G-a-device layout")
    b.add_argument("--expert-bytes", type=float, default=None, help="bytes of one expert with its optimizer state: plan the migration")
    b.add_argument("--seconds-per-token", type=float, default=None, help="expert seconds per routed token: decide the migration")
    b.add_argument("--horizon", type=float, default=100.0, help="steps until the next decision (default 100)")
    b.add_argument("--save", default=None, help="write the new placement (phy2log, log2phy, logcnt) to this .pt file")
    b.add_argument("--plot", default=None, help="write a heatmap PNG (layers x experts, layers x devices before/after)")
    b.set_defaults(func=cmd_balance)


# ----------------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from . import _native, backends

    r = backends.report(probe=not args.no_probe)
    if args.compile:
        archs = [int(a) for a in args.compile.split(",")]
        try:
            r["compile"] = list(_native.device_compile_check(archs))
        except RuntimeError as e:
            r["compile_error"] = str(e)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return 0
    print(backends.format_report(r))
    if "compile" in r:
        print()
        print("NVRTC compile of every kernel module:")
        for c in r["compile"]:
            missing = f", MISSING {c['missing']}" if c["missing"] else ""
            print(f"  {c['module']:<16}{c['arch']:<10}{c['kernels']:>3} kernels {c['bytes'] / 1024:8.1f} KB "
                  f"{c['seconds']:6.2f} s{missing}")
    elif "compile_error" in r:
        print(f"\nNVRTC compile: {r['compile_error']}")
    return 1 if any(c["missing"] for c in r.get("compile", [])) or "compile_error" in r else 0


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "doctor",
        help="what moerail found: versions, CPU threads, CUDA driver/NVRTC/kernel cache, CANN/HCCL, backend per op",
        description="Reports moerail's build, the frameworks installed, the CUDA driver and devices, NVRTC, the "
        "kernel cache, CANN and HCCL (found or why not), and which backend each op uses.",
    )
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--no-probe", action="store_true", help="do not load NVRTC or initialise CANN (cheap lookups only)")
    d.add_argument("--compile", metavar="ARCHS", default=None,
                   help="also compile every kernel with NVRTC for these architectures, e.g. 80,90 (no GPU needed)")
    d.set_defaults(func=cmd_doctor)


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moerail", description="moerail: faster Mixture-of-Experts training")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plan(sub)
    _add_balance(sub)
    _add_doctor(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as e:
        print(f"moerail {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moerail {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
