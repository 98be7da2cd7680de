"""The ``moerail`` command.

Subcommands (one function each, registered on an argparse subparser):

* ``moerail plan``: simulate a training step for a layout, or search the layouts.
* ``moerail balance``: expert placement for recorded loads: the before/after balance table (max/mean
  device and node load, CV, the lower bound), a heatmap, the placement and its migration plan.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def _print_report(
    rep: Dict[str, Any], cluster: str, training: Optional[Dict[str, Any]] = None, num_layers: Optional[int] = None
) -> None:
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
    if training is not None:
        print("  Megatron-LM flags: " + _flags_line(lay, training, num_layers))


def _print_search(
    out: Dict[str, Any], cluster: str, training: Optional[Dict[str, Any]] = None, num_layers: Optional[int] = None
) -> None:
    st = out["stats"]
    rate = st["evaluated"] / st["seconds"] if st["seconds"] > 0 else float("inf")
    print(
        f"searched {st['evaluated']} layouts in {st['seconds']:.2f} s ({rate:,.0f}/s): "
        f"{st['fit']} fit in memory, {st['invalid']} invalid"
        + (f", {st['pruned']} not planned (slower than the best even keeping every activation)" if st.get("pruned") else "")
    )
    if not out["results"]:
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
    best = out["results"][0]
    print("Megatron-LM flags of #1:")
    line = _flags_line({**best["layout"], **best["report"]["layout"]}, training or {}, num_layers)
    print("  " + line)
    if best["layout"]["recompute"] == "plan":
        # Megatron's flags apply one recompute setting to every layer; a per-layer plan is printed
        # (and, where flags can say it, turned into flags) by the memory planner for this layout.
        cap = best["report"]["memory_gib"]["capacity"]
        print(f"  #1 fits only with moerail's per-layer memory plan ('plan'), which these flags leave out: "
              f"`moerail plan ... --megatron-args '<the flags above>' --memory {cap:g}GiB` prints it, with the "
              "Megatron flags that come closest; moerail.integrations.megatron.apply_memory_plan carries it out")



# Training settings the simulator assumes unless told otherwise (moerail-core's sim defaults) where
# Megatron-LM's default differs: the flags must say them for Megatron to run what was simulated.
_SIM_TRAINING = {
    "moe_token_dispatcher_type": "alltoall",
    "moe_grouped_gemm": True,
    "use_distributed_optimizer": True,
    "overlap_grad_reduce": True,
    "sequence_parallel": True,
}


def megatron_flags(layout: Dict[str, Any], training: Dict[str, Any], num_layers: Optional[int] = None) -> List[str]:
    """Megatron-LM command-line flags of a simulated layout (a report's ``layout`` section; for a
    search result, merged with the result's ``layout``) and of the training settings the simulation
    assumed where Megatron's defaults differ (dispatcher, grouped GEMM, distributed optimizer,
    overlaps, sequence parallelism, recomputation, CUDA graph scopes, batch sizes)."""
    t = {**_SIM_TRAINING, **{k: v for k, v in training.items() if v is not None}}
    flags = [
        "--tensor-model-parallel-size", str(layout["tp"]),
        "--pipeline-model-parallel-size", str(layout["pp"]),
        "--context-parallel-size", str(layout["cp"]),
        "--expert-model-parallel-size", str(layout["ep"]),
        "--expert-tensor-parallel-size", str(layout["etp"]),
    ]  # fmt: skip
    account = bool(layout.get("account_for_embedding_and_loss_in_pipeline_split"))
    if layout.get("pipeline_model_parallel_layout"):
        # Explicit placement (chunks of layers; short chunks hold the no-op padding).
        flags += ["--pipeline-model-parallel-layout", str(layout["pipeline_model_parallel_layout"])]
    elif layout.get("vpp", 1) > 1:
        if num_layers is None:
            raise ValueError("num_layers: needed for a virtual pipeline layout")
        per_stage = (num_layers + 2 * account) // layout["pp"]
        flags += ["--num-layers-per-virtual-pipeline-stage", str(per_stage // layout["vpp"])]
    if layout.get("decoder_first_pipeline_num_layers"):
        flags += ["--decoder-first-pipeline-num-layers", str(layout["decoder_first_pipeline_num_layers"]),
                  "--decoder-last-pipeline-num-layers", str(layout["decoder_last_pipeline_num_layers"])]  # fmt: skip
    if account:
        flags += ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"]
    if layout["tp"] > 1 and t["sequence_parallel"]:
        flags.append("--sequence-parallel")
    flags += ["--micro-batch-size", str(layout["micro_batch_size"])]
    if t.get("global_batch_size"):
        flags += ["--global-batch-size", str(t["global_batch_size"])]
    if t.get("seq_length"):
        flags += ["--seq-length", str(t["seq_length"])]
    rc = layout.get("recompute_config")
    if rc is not None:
        from .memory.plan import _megatron_settings

        if rc["recompute_granularity"] == "full":
            flags += _megatron_settings(full=(rc["recompute_method"], rc["recompute_num_layers"])).args
        else:
            flags += _megatron_settings(rc["recompute_modules"]).args
    flags += ["--moe-token-dispatcher-type", str(t["moe_token_dispatcher_type"])]
    if t["moe_grouped_gemm"]:
        flags.append("--moe-grouped-gemm")
    if t.get("cuda_graph_scope"):
        flags += ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-scope", *t["cuda_graph_scope"]]
    if t["use_distributed_optimizer"]:
        flags.append("--use-distributed-optimizer")
    if t["overlap_grad_reduce"]:
        flags.append("--overlap-grad-reduce")
        if t["use_distributed_optimizer"] and t.get("overlap_param_gather", True):
            flags.append("--overlap-param-gather")
    return flags


def _flags_line(layout: Dict[str, Any], training: Dict[str, Any], num_layers: Optional[int] = None) -> str:
    # Quoted for a shell: a pipeline layout holds '|' and '*'.
    return shlex.join(megatron_flags(layout, training, num_layers))


def _require_inputs(cfg: Dict[str, Any]) -> None:
    """The inputs a step cannot be simulated without, named by the flags that give them."""
    if not cfg["training"].get("global_batch_size"):
        raise ValueError(
            "--gbs: no global batch size (sequences per step): pass --gbs N, or --global-batch-size in "
            "--megatron-args, or training.global_batch_size in --config"
        )
    if not cfg["cluster"].get("peak_tflops_bf16"):
        from . import sim

        raise ValueError(
            "--cluster: no accelerator described: pass --cluster with one of "
            f"{', '.join(sorted(sim.cluster_presets()))}, or a [cluster] section in --config "
            "(peak_tflops_bf16, memory_gib, devices_per_node, link bandwidths; see moerail.sim.config_keys())"
        )
    if not cfg["cluster"].get("devices"):
        raise ValueError("--devices: how many devices (GPUs / NPUs) to lay the model out on")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _splits(layers: int, pp: int) -> bool:
    """Whether the search can split ``layers`` over ``pp`` stages: evenly, evenly counting the
    embedding and the loss as layers, or with lighter first/last stages (its ``uneven_split``)."""
    if layers % pp == 0 or (pp > 1 and (layers + 2) % pp == 0 and (layers + 2) // pp > 1):
        return True
    if pp == 2:
        return layers >= 2
    if pp < 3:
        return False
    mid = pp - 2
    for q in range(-(-layers // pp), layers // mid + 1):
        rest = layers - q * mid
        if rest >= 0 and rest // 2 >= 1 and rest - rest // 2 <= q:
            return True
    return False


def _why_no_candidates(cfg: Dict[str, Any]) -> str:
    """Which of the search's divisibility rules left no layout (the rules of its enumeration)."""
    m, t, c = cfg["model"], cfg["training"], cfg["cluster"]
    world, gbs = int(c["devices"]), int(t["global_batch_size"])
    layers, heads = int(m.get("num_layers", 1)), int(m.get("num_attention_heads", 1))
    experts = int(m.get("num_moe_experts") or 0)
    per_node = int(c.get("devices_per_node", 8))
    tps = [x for x in (1, 2, 4, 8, 16, 32, 64) if x <= min(per_node, world) and world % x == 0 and heads % x == 0]
    pps = [p for p in _divisors(world) if p <= layers and _splits(layers, p)]
    dps = sorted({world // (tp * pp) for tp in tps for pp in pps if world % (tp * pp) == 0})
    facts = f"{world} devices, {layers} layers, global batch {gbs}" + (f", {experts} experts" if experts else "")
    if experts and not [e for e in _divisors(experts) if world % e == 0]:
        return f"no expert-parallel size divides both the {experts} experts and the {world} devices ({facts})"
    if not pps:
        return f"no pipeline size divides the {world} devices and splits the {layers} layers ({facts})"
    if not [d for d in dps if any(gbs % (mbs * d) == 0 for mbs in (1, 2, 4))]:
        return (
            f"no data-parallel size divides the global batch: with {world} devices the data-parallel sizes "
            f"possible are {dps[:8]}{'...' if len(dps) > 8 else ''}, none of which (times a micro-batch of "
            f"1, 2 or 4) divides --gbs {gbs} ({facts}); pick --devices or --gbs with more common factors"
        )
    return f"no layout passes the search's divisibility rules (TP, CP, PP, EP, ETP, micro-batch; {facts})"


def _why_nothing_fits(cfg: Dict[str, Any], args: argparse.Namespace, space, stats: Dict[str, Any]) -> str:
    from . import sim

    if stats["fit"] == 0 and stats["invalid"] == stats["evaluated"]:
        # Every layout was refused by the simulator: its reason for the first one says why.
        out = sim.search(cfg, top=1, space=space or None, include_oom=True)
        if not out["results"]:
            lay = {"layout.tensor_model_parallel_size": 1, "layout.pipeline_model_parallel_size": 1}
            try:
                sim.simulate(cfg, **lay)
            except ValueError as e:
                return f"every layout was invalid: {e}"
        return "every layout was invalid"
    out = sim.search(cfg, top=max(1, stats["evaluated"]), space=space or None, include_oom=True)
    if not out["results"]:
        return "every layout was invalid"
    best = min(out["results"], key=lambda r: r["report"]["memory_gib"]["total"])
    mem = best["report"]["memory_gib"]
    return (
        f"memory: the smallest of the {stats['evaluated'] - stats['invalid']} layouts "
        f"({_layout_line(best['report']['layout'])}, micro-batch {best['layout']['micro_batch_size']}, recompute "
        f"{best['layout']['recompute']}) needs {mem['total']:.1f} GiB of {mem['capacity']:.1f} GiB a device; "
        "try more devices, --include-oom, or a cluster with more memory"
    )


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
    ignored: List[str] = []
    if args.megatron_args is not None:
        try:
            _, ignored = sim.parse_megatron_args(args.megatron_args)
        except ValueError as e:  # the library names its parameter; the user typed the flag
            raise ValueError(re.sub(r"^megatron_args\b", "--megatron-args", str(e))) from None
    cfg = sim.resolve_config(
        args.config,
        model=args.model,
        cluster=args.cluster,
        devices=args.devices,
        megatron_args=args.megatron_args,
        **overrides,
    )
    if args.megatron_args is not None:
        if ignored and not args.json and not args.quiet:
            print(f"(not modelled, ignored: {' '.join(ignored)})", file=sys.stderr)
    if not cfg["training"].get("seq_length"):
        cfg["training"]["seq_length"] = 4096
    _require_inputs(cfg)
    nl = cfg["model"].get("num_layers")
    cluster_name = cfg["cluster"].get("name", "")
    has_layout = any(k in cfg["layout"] for k in _LAYOUT_KEYS)
    searching = args.search or args.top is not None or not has_layout
    if args.memory is not None:
        _check_memory_flags(args)
        if searching:
            raise ValueError("--memory: plans one layout; give it (--tp/--pp/--ep/... or a config's [layout]), not a search")
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
        st = out["stats"]
        if args.json:
            if out["results"]:
                out["megatron_flags"] = megatron_flags({**out["results"][0]["layout"],
                                                        **out["results"][0]["report"]["layout"]}, cfg["training"], nl)  # fmt: skip
            print(json.dumps(out))
        else:
            _print_search(out, cluster_name, cfg["training"], nl)
        if st["evaluated"] == 0:
            print(f"moerail plan: nothing searched: {_why_no_candidates(cfg)}", file=sys.stderr)
            return 1
        if not out["results"]:
            print(f"moerail plan: no layout fits: {_why_nothing_fits(cfg, args, space, st)}", file=sys.stderr)
            return 1
        return 0
    if args.memory is not None:
        return _cmd_memory(args, cfg)
    rep = sim.simulate(cfg)
    if args.json:
        rep["megatron_flags"] = megatron_flags(rep["layout"], cfg["training"], nl)
        print(json.dumps(rep))
    else:
        _print_report(rep, cluster_name, cfg["training"], nl)
    return 0


def _check_memory_flags(args: argparse.Namespace) -> None:
    from .memory import parse_bytes

    args.memory_bytes = parse_bytes(args.memory, "--memory")
    args.host_memory_bytes = 0 if args.host_memory in (None, "0") else parse_bytes(args.host_memory, "--host-memory")
    if args.stage is not None and args.stage < 0:
        raise ValueError(f"--stage: expected a pipeline stage >= 0, got {args.stage}")
    if args.percentile is not None and not 0 < args.percentile <= 100:
        raise ValueError(f"--percentile: expected a number in (0, 100], got {args.percentile}")
    if args.lookahead != "auto":
        if args.lookahead not in ("1", "2"):
            raise ValueError(f"--lookahead: expected 1, 2 or auto, got {args.lookahead}")
        args.lookahead = int(args.lookahead)
    if args.prefetch_groups != "auto":
        from .memory.plan import MAX_PREFETCH_GROUPS

        try:
            groups = int(args.prefetch_groups)
        except ValueError:
            groups = 0
        if not 1 <= groups <= MAX_PREFETCH_GROUPS:
            raise ValueError(f"--prefetch-groups: expected 1 to {MAX_PREFETCH_GROUPS} or auto, got {args.prefetch_groups}")
        args.prefetch_groups = groups


def _groups(plan) -> List[Tuple[List[int], str]]:
    """Consecutive layers with the same actions, as (layers, text)."""
    out: List[Tuple[List[int], str]] = []
    for lp in plan.layers:
        acts = "recompute whole layer" if lp.recompute_layer else ", ".join(
            f"{m} {a.value}" for m, a in lp.actions.items()) or "keep all"
        if lp.vpp_stage:
            acts = f"{acts}"
        if out and out[-1][1] == acts and out[-1][0][-1] + 1 == lp.layer:
            out[-1][0].append(lp.layer)
        else:
            out.append(([lp.layer], acts))
    return out


def _cmd_memory(args: argparse.Namespace, cfg: Dict[str, Any]) -> int:
    from . import memory

    G = 2**30
    tpe = None
    if args.loads is not None:
        tpe = _read_loads(args.loads)
    costs = memory.MemoryCosts.from_simulator(
        cfg,
        pipeline_rank=args.stage,
        tokens_per_expert=tpe,
        percentile=args.percentile if args.percentile is not None else 99.0,
        host_bytes=args.host_memory_bytes,
    )
    try:
        plan = memory.plan_memory(costs, args.memory_bytes, lookahead=args.lookahead,
                                  prefetch_groups=args.prefetch_groups)
    except ValueError as e:
        text = str(e).replace("budget_bytes:", "--memory:", 1).replace("host_bytes:", "--host-memory:", 1)
        raise ValueError(text) from None
    mla = bool(cfg["model"].get("multi_latent_attention"))
    flags = plan.to_megatron_flags(multi_latent_attention=mla)
    statics = memory.megatron_static_plans(costs, multi_latent_attention=mla)
    best = memory.planner.best_static(statics, args.memory_bytes)
    ev = plan.evaluation
    keep = ev["activation_bytes_keep_all"]
    saved = 1 - ev["activation_bytes"] / keep if keep > 0 else 0.0
    step = costs.step_seconds
    executor = memory.planner.executor_added_seconds(costs, plan)
    # Where Megatron's own setting costs less than this plan as moerail's executor runs it, the
    # user is told so and given its flags, not left to compare two numbers; less at the precision
    # printed (milliseconds), so that it never reads "+0.000 s against +0.000 s".
    megatron_wins = best is not None and round(best.plan.predicted_added_seconds, 3) < round(executor["added_seconds"], 3)
    if args.json:
        out = {
            "plan": plan.to_dict(),
            "executor_added_seconds": executor["added_seconds"],
            "lookahead": plan.lookahead,
            "prefetch_groups": plan.prefetch_groups,
            "stage": costs.meta.get("stage"),
            "megatron_flags": list(flags.args),
            "megatron_notes": list(flags.notes),
            "best_megatron_setting": None
            if best is None
            else {"name": best.name, "added_seconds": best.plan.predicted_added_seconds,
                  "peak_bytes": best.plan.predicted_peak_bytes, "megatron_flags": list(best.megatron_flags.args),
                  "adds_less_than_plan": megatron_wins},
        }  # fmt: skip
        print(json.dumps(out))
        return 0
    name = cfg["model"].get("name") or args.model or "model"
    print(f"memory plan for {name}, pipeline stage {costs.pipeline_rank} of {costs.pipeline_size}"
          f"{f' (VPP {costs.virtual_pipeline_size})' if costs.virtual_pipeline_size > 1 else ''}, "
          f"{costs.num_microbatches} micro-batches, budget {args.memory_bytes / G:.1f} GiB a device")  # fmt: skip
    if costs.routing_skew > 1:
        print(f"  routing skew: p{args.percentile or 99:g} of tokens per expert rank = {costs.routing_skew:.2f} x the mean")
    for layers, acts in _groups(plan):
        span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
        print(f"  {span:<14} {acts}")
    print(f"predicted peak      {ev['peak_bytes'] / G:.1f} GiB (static {ev['static_bytes'] / G:.1f}, activations in "
          f"flight {ev['activation_bytes'] / G:.1f}, one layer's transient {ev['transient_bytes'] / G:.1f})")  # fmt: skip
    print(f"activations saved   {100 * saved:.1f}% of keep-all ({keep / G:.1f} GiB -> {ev['activation_bytes'] / G:.1f} GiB)")
    pct = f" ({100 * ev['added_seconds'] / step:.2f}% of the {step:.2f} s step)" if step > 0 else ""
    print(f"added step time     {ev['added_seconds']:.3f} s{pct}: recompute {ev['recompute_seconds']:.3f} s, "
          f"exchange {ev['exchange_seconds']:.3f} s, unhidden swap {ev['swap_exposed_seconds']:.3f} s")  # fmt: skip
    if ev["host_bytes"] > 0:
        n = plan.prefetch_groups
        ahead = f"{n} group{'s' if n > 1 else ''} ahead within a model chunk"
        if plan.lookahead == 2:
            ahead += ", and the next backward chunk's first group at a chunk's last"
        if executor["ahead_bytes"] > 0:
            ahead += f"; the {executor['ahead_bytes'] / G:.2f} GiB they hold ahead are in the peak"
        print(f"with the executor   {executor['added_seconds']:.3f} s added: its swap-ins wait "
              f"{executor['swap_wait_seconds']:.3f} s (copies back start {ahead}; lookahead={plan.lookahead}, "
              f"prefetch_groups={n}, which apply_memory_plan takes from the plan)")  # fmt: skip
    print(f"host memory used    {ev['host_bytes'] / G:.1f} GiB of {costs.host_bytes / G:.1f} GiB"
          + ("" if costs.host_bytes > 0 else " (no --host-memory: no swap)"))
    if best is not None:
        print(f"best Megatron static setting that fits: {best.name}: +{best.plan.predicted_added_seconds:.3f} s"
              + (" (its offload timed as Megatron issues the copies)" if best.offload else ""))  # fmt: skip
    else:
        print("no Megatron static setting (recompute_modules / offload_modules / full) fits this budget")
    print("Megatron flags: " + (" ".join(flags.args) or "(none: keep everything)"))
    for n in flags.notes:
        print(f"  note: {n}")
    if megatron_wins:
        # Said only where it decides: without recomputing a module and offloading the input its
        # recompute holds, which a moerail plan cannot, no Megatron setting beats the plan.
        both = best.offloaded_recompute_inputs
        rest = [s for s in statics if not s.offloaded_recompute_inputs]
        other = memory.planner.best_static(rest, args.memory_bytes)
        why = ""
        if both and (other is None or other.plan.predicted_added_seconds >= executor["added_seconds"]):
            why = (f" It recomputes {' and '.join(best.recomputed_with_offloaded_inputs)} and offloads the inputs those recomputes hold "
                   f"({' / '.join(both)}), which a moerail plan, one action per module, does not combine; "
                   "without that no Megatron setting adds less.")
        print(f"Megatron's setting adds less time: +{best.plan.predicted_added_seconds:.3f} s against this plan's "
              f"+{executor['added_seconds']:.3f} s with moerail's executor.{why} Run Megatron's instead: "
              + str(best.megatron_flags))  # fmt: skip
    return 0


def _read_loads(path: str):
    import numpy as np

    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    elif path.endswith(".pt"):
        import torch

        arr = torch.load(path, map_location="cpu", weights_only=True)
        arr = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
    elif path.endswith(".csv"):
        arr = np.loadtxt(path, delimiter=",", ndmin=2)
    else:
        raise ValueError(f"--loads: expected a .npy, .pt or .csv of tokens per expert (steps x experts), got {path}")
    return arr


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
        "--space", action="append", metavar="DIM=V1,V2", help="restrict a search dimension: tp, cp, pp, vpp, ep, etp, mbs, recompute (plan, none, light, heavy, full)"
    )
    p.add_argument("--include-oom", action="store_true", help="rank layouts that do not fit in memory too")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    p.add_argument("--progress", action="store_true", help="progress bar even with --json")
    p.add_argument("--list-presets", action="store_true", help="list model and cluster presets")
    p.add_argument("--memory", metavar="SIZE",
                   help="plan activation memory per layer (keep / recompute / swap) to fit SIZE a device, e.g. 60GiB")
    p.add_argument("--host-memory", metavar="SIZE",
                   help="with --memory: pinned host memory a device may use for swapped activations (default 0: no swap)")
    p.add_argument("--stage", type=int, help="with --memory: the pipeline stage to plan (default: the one with the most memory)")
    p.add_argument("--loads", metavar="FILE",
                   help="with --memory: tokens per expert (steps x experts, .npy/.pt/.csv) to plan for their skew")
    p.add_argument("--percentile", type=float, help="with --loads: the percentile of tokens per expert rank to plan for (99)")
    p.add_argument("--lookahead", default="auto",
                   help="with --memory and --host-memory: the executor's prefetch of swapped activations (1: within a "
                        "model chunk; 2: also the next backward chunk's first group, held through the forward before it "
                        "and counted in the peak; auto (default): the one whose plan adds the least time)")
    p.add_argument("--prefetch-groups", default="auto",
                   help="with --memory and --host-memory: how many groups (a layer's attention or MLP half) ahead within "
                        "a model chunk's backward the executor copies swapped activations back (1 to 8; more hides longer "
                        "copies and holds more, counted in the peak; auto (default): 1 to 3, the one whose plan adds the "
                        "least time)")
    p.set_defaults(func=cmd_plan)


# ----------------------------------------------------------------------------- balance


def _balance_table(header, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _need(module: str, flag: str, extra: str) -> None:
    """A one-line error when an optional dependency is missing (no traceback, before any work)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(f"{flag}: needs {module}, which is not installed: pip install 'moerail[{extra}]'")


def _read_current(path: str):
    """``--current``: a phy2log ``[L, R]`` (.pt / .npy / .csv / .json), read with the flag named."""
    import torch

    from . import balance

    if not os.path.isfile(path):
        raise ValueError(f"--current: {path}: no such file")
    try:
        if path.endswith((".pt", ".pth")):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            obj = obj.get("phy2log") if isinstance(obj, dict) else obj
            if not isinstance(obj, torch.Tensor):
                raise ValueError("holds no phy2log tensor")
            return obj
        return balance.load_loads(path).to(torch.int64)
    except ValueError as e:
        raise ValueError(f"--current: {path}: {str(e).removeprefix('loads: ')}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file raises anything
        raise ValueError(f"--current: {path} is not a readable placement ({type(e).__name__}: {e})") from None


def _check_writable(path: str, flag: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path} is a folder")


def cmd_balance(args: argparse.Namespace) -> int:
    import torch

    from . import balance

    if args.plot:
        _need("matplotlib", "--plot", "plot")
        _check_writable(args.plot, "--plot")
    if args.save:
        _check_writable(args.save, "--save")
    try:
        load = balance.load_loads(args.loads)
    except OSError as e:
        raise ValueError(f"--loads: {e}") from None
    num_layers, num_experts = load.shape
    if args.redundant is not None and args.redundant < 0:
        raise ValueError(f"--num-redundant-experts: must be >= 0, got {args.redundant}")
    replicas = args.slots if args.slots is not None else num_experts + (args.redundant or 0)
    slots_flag = "--slots" if args.slots is not None else "--num-redundant-experts"
    if args.devices < 1:
        raise ValueError(f"--expert-model-parallel-size (--gpus): must be >= 1, got {args.devices}")
    if args.nodes < 1:
        raise ValueError(f"--nodes: must be >= 1, got {args.nodes}")
    if args.devices % args.nodes:
        raise ValueError(f"--nodes: {args.nodes} nodes must divide --expert-model-parallel-size {args.devices}")
    if replicas < num_experts or replicas % args.devices:
        raise ValueError(
            f"{slots_flag}: {replicas} slots per layer must be at least the {num_experts} experts and a multiple of "
            f"--expert-model-parallel-size {args.devices} (slots = experts + --num-redundant-experts)"
        )
    groups = args.groups if args.groups is not None else 1
    if not 1 <= groups <= num_experts:
        raise ValueError(f"--moe-router-num-groups (--groups): must be in [1, {num_experts}] (the experts), got {groups}")
    if args.max_moves is not None and not 0 <= args.max_moves < 2**62:
        raise ValueError(f"--max-moves: must be >= 0, got {args.max_moves}")
    print(
        f"loads: {args.loads} ({num_layers} layers x {num_experts} experts, {load.sum():.0f} tokens); "
        f"{replicas} slots on {args.devices} devices in {args.nodes} nodes, {groups} groups "
        f"({'hierarchical' if groups % args.nodes == 0 else 'global'} policy)"
    )
    if args.current is not None:
        before = _read_current(args.current)
        before_name = "current"
    elif num_experts % args.devices == 0:
        before = balance.default_placement(num_layers, num_experts, args.devices)
        before_name = "before (E/EP experts a device)"
    else:
        before, before_name = None, None

    rows = []
    placements = {}

    def row(name, phy2log):
        m = balance.placement_metrics(load, phy2log, args.devices, args.nodes, args.capacity)
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
    current = None if before is None else balance.expand_placement(before, replicas, args.devices)
    for mode in modes:
        if mode == "improve":
            if current is None:
                if args.mode == "improve":
                    raise ValueError("--mode improve: needs the current placement (--current, or E divisible by "
                                     "--expert-model-parallel-size)")
                continue
            p, l2p, c = balance.improve_placement(load, current, args.devices, args.nodes, max_moves=args.max_moves)
            name = "improve (from " + ("current)" if args.current else "before)")
        else:
            p, l2p, c = balance.rebalance_experts(load, replicas, groups, args.nodes, args.devices, mode=mode)
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
        plan = balance.plan_migration(current, best[0], args.devices, args.nodes, expert_bytes=args.expert_bytes,
                                      keep_nodes=groups % args.nodes == 0 and args.nodes > 1)  # fmt: skip
        print(
            f"migration {before_name} -> {use}: {len(plan.transfers)} copies "
            f"({plan.num_network_transfers} over the network, {plan.inter_node_bytes / 1e9:.2f} GB between nodes, "
            f"{plan.intra_node_bytes / 1e9:.2f} GB inside nodes), {plan.seconds * 1e3:.1f} ms on the link model"
        )
        best = (plan.phy2log, *balance.log2phy_from_phy2log(plan.phy2log, num_experts))
        if args.seconds_per_token is not None:
            d = balance.should_migrate(load, current, plan, args.devices, args.nodes, seconds_per_token=args.seconds_per_token,
                                       horizon_steps=args.horizon, log=False)  # fmt: skip
            print(str(d))
    if args.save:
        _check_writable(args.save, "--save")
        torch.save({"phy2log": best[0], "log2phy": best[1], "logcnt": best[2]}, args.save)
        print(f"wrote {args.save}")
    if args.plot:
        balance.plot_heatmap(args.plot, load, best[0], args.devices, args.nodes, before=before,
                             after_name=use, before_name=before_name)
        print(f"wrote {args.plot}")
    return 0


def _add_balance(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "balance",
        help="expert placement for recorded loads: the before/after table",
        description="Places and replicates experts for recorded loads (EPLB and refined) and prints the "
        "before/after balance table. Sizes use Megatron-LM's flag names.",
    )
    b.add_argument("--loads", required=True, help="loads [layers, experts]: .npy, .pt, .csv or .json (a LoadTracker trace)")
    b.add_argument("--expert-model-parallel-size", "--ep", "--devices", "--gpus", dest="devices", type=int, required=True,
                   metavar="EP", help="devices the experts are spread over (EP ranks; --gpus is the old name)")
    b.add_argument("--nodes", "--nnodes", dest="nodes", type=int, default=1, help="nodes the EP ranks span (default 1)")
    slots = b.add_mutually_exclusive_group()
    slots.add_argument("--num-redundant-experts", dest="redundant", type=int, default=None, metavar="R",
                       help="extra expert slots per layer beyond one per expert: E + R slots (default 0)")
    slots.add_argument("--slots", "--replicas", dest="slots", type=int, default=None, metavar="S",
                       help="total expert slots per layer, E + R (--replicas is the old name)")
    b.add_argument("--moe-router-num-groups", "--groups", dest="groups", type=int, default=None, metavar="G",
                   help="expert groups (Megatron's group-limited routing; default 1; hierarchical placement when "
                   "the nodes divide them)")
    b.add_argument("--mode", choices=["eplb", "refine", "improve", "all"], default="all",
                   help="placements to compute (improve: incremental from the current one; default all)")
    b.add_argument("--use", choices=["eplb", "refine", "improve"], default="refine",
                   help="the placement to plan, save and plot (default refine)")
    b.add_argument("--max-moves", type=int, default=None, help="improve: at most this many changed slots a layer")
    b.add_argument("--capacity", type=float, default=None, help="tokens per slot (reports dropped tokens)")
    b.add_argument("--current", default=None, help="the current phy2log (.pt/.npy/.csv) instead of the E/EP-a-device layout")
    b.add_argument("--expert-bytes", type=float, default=None, help="bytes of one expert with its optimizer state: plan the migration")
    b.add_argument("--seconds-per-token", type=float, default=None, help="expert seconds per routed token: decide the migration")
    b.add_argument("--horizon", type=float, default=100.0, help="steps until the next decision (default 100)")
    b.add_argument("--save", default=None, help="write the new placement (phy2log, log2phy, logcnt) to this .pt file")
    b.add_argument("--plot", default=None,
                   help="write a heatmap PNG (expert load; device load before/after, node boundaries); needs moerail[plot]")
    b.set_defaults(func=cmd_balance)


# Old spellings of balance's flags: still accepted, with a note naming the new one.
_OLD_BALANCE_FLAGS = {"--gpus": "--expert-model-parallel-size", "--groups": "--moe-router-num-groups",
                      "--replicas": "--slots (or --num-redundant-experts R for E + R slots)"}  # fmt: skip


# ----------------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from . import _native, backends

    r = backends.report(probe=not args.no_probe)
    if args.compile:
        archs = [int(a) for a in args.compile.split(",")]
        try:
            r["compile"] = list(_native.cuda.device_compile_check(archs))
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
    from . import __version__

    parser = argparse.ArgumentParser(prog="moerail", description="moerail: faster Mixture-of-Experts training")
    parser.add_argument("--version", action="version", version=f"moerail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plan(sub)
    _add_balance(sub)
    _add_doctor(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "balance":
        for old, new in _OLD_BALANCE_FLAGS.items():
            if any(a == old or a.startswith(old + "=") for a in argv):
                print(f"moerail balance: note: {old} is now {new}", file=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as e:
        print(f"moerail {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"moerail {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, never a traceback (MOERAIL_DEBUG=1 shows it)
        if os.environ.get("MOERAIL_DEBUG"):
            raise
        print(f"moerail {args.command}: error: {type(e).__name__}: {e} (MOERAIL_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moerail {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
