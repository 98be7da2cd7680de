"""Parallel layouts and the training-step simulator.

* :func:`rank_groups` lists every process group Megatron-Core makes for a MoE Parallel Folding
  layout (attention TP x CP x DP x PP and experts ETP x EP x EDP x PP over the same ranks),
  identical to ``megatron.core.parallel_state``.
* :func:`simulate` predicts one training step of a model on a cluster under a layout: model
  FLOPs (Megatron's formula, causal and not), step time and its breakdown, MFU, tokens/s and
  per-device memory by part. :func:`search` enumerates and ranks layouts.
* Configurations use Megatron-LM's argument names, in four sections (``model``, ``training``,
  ``layout``, ``cluster``), from TOML, JSON, a dict, presets, or a Megatron command line
  (:func:`parse_megatron_args`). :func:`config_keys` lists the keys.

A configuration file (TOML; JSON takes the same structure)::

    [model]
    preset = "Mixtral-8x22B"        # or every key: num_layers, hidden_size, ...

    [training]
    seq_length = 4096
    global_batch_size = 256
    micro_batch_size = 1
    moe_expert_capacity_factor = 1.0
    moe_pad_expert_input_to_capacity = true
    recompute_granularity = "selective"
    recompute_modules = ["layernorm", "moe_act"]

    [layout]
    tensor_model_parallel_size = 2
    pipeline_model_parallel_size = 8
    expert_model_parallel_size = 8
    expert_tensor_parallel_size = 1   # folded: experts use their own TP size

    [cluster]
    preset = "H100"
    devices = 128

``moerail plan --config plan.toml`` prints the prediction (``--json``: one JSON object);
without a ``[layout]`` (or with ``--top``) it searches the layouts instead.

The cost model itself lives in Rust (``moerail_core::sim``; its module documentation describes
it). Its efficiency parameters are per device type and were fitted once, by
:func:`calibrate`, on the four published MoE Parallel Folding runs on H100 (arXiv 2504.14960,
seq 4096, GBS 256, token drop with capacity factor 1, BF16, MFU against 989.5 TFLOPS counted
with non-causal attention):

=====================================================  ==========  =======  ======
run                                                    published   moerail  error
=====================================================  ==========  =======  ======
Mixtral-8x22B, 128 GPUs, TP2 PP8 EP8 ETP1 (folded)     49.3 %      48.6 %   -1.5 %
Mixtral-8x22B, 128 GPUs, TP2 PP8 EP4 ETP2 (coupled)    46.3 %      45.4 %   -1.9 %
Qwen2-57B-A14B, 64 GPUs, TP2 PP4 EP4 ETP1 (folded)     39.0 %      40.2 %   +3.2 %
Qwen2-57B-A14B, 64 GPUs, TP2 PP4 EP4 ETP2 (coupled)    35.3 %      35.6 %   +0.9 %
=====================================================  ==========  =======  ======

Fitted H100 values (priors in brackets): ``gemm_efficiency`` 0.7493 (0.75),
``attention_efficiency`` 0.5605 (0.55), ``memory_efficiency`` 0.5721 (0.70),
``intra_node_comm_efficiency`` 0.6454 (0.75), ``kernel_overhead_us`` 4.08 (4.0); unfitted
priors: ``gemm_dim_knee`` 64, ``inter_node_comm_efficiency`` 0.8, ``tp_overlap_efficiency``
0.8, ``overlap_efficiency`` 0.8.

Fitting procedure (:func:`calibrate`): maximum a posteriori over the log of five parameters
(``gemm_efficiency``, ``attention_efficiency``, ``memory_efficiency``,
``intra_node_comm_efficiency``, ``kernel_overhead_us``). The objective is
``sum_runs (log(pred / published) / 0.02)^2 + sum_params (log(value / prior) / 0.15)^2``: a
2 % measurement noise on each published MFU and a Gaussian prior of width 0.15 (in log space)
around each microbenchmark-based prior, minimised by Nelder-Mead from the priors. The other
parameters stay at their priors. The fitted values are stored in
``presets/clusters/h100-sxm.json`` (H800 and H200 share them: same Hopper silicon), and listed
by :data:`H100_CALIBRATION`. Ascend efficiencies are uncalibrated priors. The folded layouts
come out faster than the coupled ones because the model charges the expert-TP all-gather /
reduce-scatter and the narrower expert GEMMs, not because the fit is told so: the ordering
holds at the priors already.
"""

from __future__ import annotations

import ast
import json
import math
import os
import pathlib
import shlex
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native

__all__ = [
    "PUBLISHED",
    "H100_CALIBRATION",
    "calibrate",
    "cluster_presets",
    "config_keys",
    "load_config",
    "model_presets",
    "parse_megatron_args",
    "rank_groups",
    "resolve_config",
    "search",
    "simulate",
]

PRESETS = pathlib.Path(__file__).resolve().parent / "presets"
SECTIONS = ("model", "training", "layout", "cluster")

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], None]


# ----------------------------------------------------------------------------- rank groups


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")
    return value


def rank_groups(
    world_size: int,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    order: str = "tp-cp-ep-dp-pp",
    *,
    num_distributed_optimizer_instances: int = 1,
    hierarchical_context_parallel_sizes: Optional[Sequence[int]] = None,
) -> Dict[str, List[List[int]]]:
    """Every process group Megatron-Core's ``initialize_model_parallel`` creates for a layout.

    Attention layers use the grid ``TP x CP x DP x PP`` and expert layers ``ETP x EP x EDP x
    PP`` over the same ranks (MoE Parallel Folding; ``etp`` defaults to ``tp``, the coupled
    layout). ``order`` lists the dimensions, first fastest, as Megatron's ``RankGenerator``.

    Returns a dict from group kind to its groups (lists of global ranks), in Megatron's order:

    * attention: ``tp``, ``cp``, ``dp``, ``pp``, ``dp-cp`` (gradient reduction of the dense
      parameters), ``tp-cp``, ``tp-dp``, ``tp-dp-cp``, ``tp-pp`` (model parallel),
      ``embedding`` (first and last pipeline rank), ``position-embedding``;
    * experts: ``ep``, ``etp``, ``edp`` (gradient reduction of the experts), ``tp-ep``
      (expert tensor x expert parallel), ``tp-ep-pp``, ``intra-dist-opt-instance``;
    * with several distributed-optimizer instances also ``intra-partial-dp-cp``,
      ``intra-partial-edp``, ``inter-partial-edp``; with hierarchical context parallelism
      ``hierarchical-cp-0``, ``hierarchical-cp-1``, ...

    Raises ValueError naming the argument when the sizes do not fit (as Megatron's asserts).
    """
    world_size = _positive_int("world_size", world_size)
    tp, cp, pp, ep = (_positive_int(n, v) for n, v in (("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep)))
    if etp is not None:
        etp = _positive_int("etp", etp)
    if not isinstance(order, str):
        raise TypeError(f"order: expected a str such as 'tp-cp-ep-dp-pp', got {type(order).__name__}")
    inst = _positive_int("num_distributed_optimizer_instances", num_distributed_optimizer_instances)
    hcp = None
    if hierarchical_context_parallel_sizes is not None:
        hcp = [
            _positive_int("hierarchical_context_parallel_sizes", int(x) if not isinstance(x, bool) else x)
            for x in hierarchical_context_parallel_sizes
        ]
    groups = _native.rank_groups(world_size, tp, cp, pp, ep, etp, order, inst, hcp)
    return dict(groups)


# ----------------------------------------------------------------------------- presets


def _load_json(path: pathlib.Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _presets(kind: str) -> Dict[str, dict]:
    out = {}
    for path in sorted((PRESETS / kind).glob("*.json")):
        data = _load_json(path)
        data["_file"] = path.stem
        out[data["name"]] = data
    return out


def model_presets() -> Dict[str, dict]:
    """The model presets: name -> ``{"name", "source", "model": {...}}``."""
    return _presets("models")


def cluster_presets() -> Dict[str, dict]:
    """The cluster presets: name -> ``{"name", "source", "cluster": {...}, "efficiency": {...}}``."""
    return _presets("clusters")


def _find_preset(kind: str, name: str) -> dict:
    key = name.strip().lower()
    table = _presets(kind)
    for data in table.values():
        names = [data["name"].lower(), data["_file"].lower()] + [a.lower() for a in data.get("aliases", [])]
        if key in names:
            return data
    what = "model" if kind == "models" else "cluster"
    raise ValueError(f"{what}: unknown preset {name!r} (known: {', '.join(sorted(table))})")


def _cluster_preset(name: str) -> dict:
    data = _find_preset("clusters", name)
    out = dict(data["cluster"])
    out["name"] = data["name"]
    eff = data.get("efficiency") or {}
    if isinstance(eff, str):  # shares another preset's calibrated efficiencies
        eff = _find_preset("clusters", eff).get("efficiency") or {}
    out.update(eff)
    return out


def _model_preset(name: str) -> dict:
    data = _find_preset("models", name)
    out = dict(data["model"])
    out["name"] = data["name"]
    return out


# ----------------------------------------------------------------------------- config files


def config_keys() -> Dict[str, List[str]]:
    """The keys of each configuration section (Megatron's argument names where one exists)."""
    return {s: list(k) for s, k in _native.sim_keys()}


def _read_file(path: Union[str, os.PathLike]) -> dict:
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"config: file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {p}: invalid JSON: {e}") from None
    if p.suffix.lower() == ".toml":
        try:
            import tomllib  # Python >= 3.11
        except ImportError:  # pragma: no cover - Python < 3.11
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ValueError("config: reading TOML needs Python >= 3.11 or the 'tomli' package") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config: {p}: invalid TOML: {e}") from None
    raise ValueError(f"config: {p}: expected a .toml or .json file")


def load_config(source: ConfigLike) -> Dict[str, dict]:
    """Reads a configuration (a path to TOML/JSON, or a dict) into its four sections.

    A section may name a preset: ``[model] preset = "DeepSeek-V3"`` (then override keys), or
    the section itself may be the preset's name (``model = "DeepSeek-V3"``). Unknown
    sections are an error.
    """
    if source is None:
        raw: Mapping[str, Any] = {}
    elif isinstance(source, (str, os.PathLike)):
        raw = _read_file(source)
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise TypeError(f"config: expected a path or a dict, got {type(source).__name__}")
    out: Dict[str, dict] = {s: {} for s in SECTIONS}
    for key, value in raw.items():
        section = "layout" if key == "parallel" else key
        if section == "efficiency":
            if not isinstance(value, Mapping):
                raise ValueError("efficiency: expected a table of efficiency parameters")
            out["cluster"].update(value)
            continue
        if section not in SECTIONS:
            raise ValueError(
                f"{key}: unknown section (expected {', '.join(SECTIONS)}; the keys go inside them, "
                f"e.g. [model] hidden_size = 4096)"
            )
        if isinstance(value, str) and section in ("model", "cluster"):
            value = {"preset": value}
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a table of keys, got {type(value).__name__}")
        value = dict(value)
        preset = value.pop("preset", None)
        if preset is not None:
            if section == "model":
                out["model"].update(_model_preset(preset))
            elif section == "cluster":
                out["cluster"].update(_cluster_preset(preset))
            else:
                raise ValueError(f"{key}.preset: presets exist only for model and cluster")
        out[section].update(value)
    return out


def _merge(base: Dict[str, dict], extra: Mapping[str, Any]) -> None:
    """Merges flat or sectioned overrides into ``base``."""
    keys = config_keys()
    where = {}
    for s, ks in keys.items():
        for k in ks:
            where.setdefault(k, s)
    for key, value in extra.items():
        if key in SECTIONS and isinstance(value, Mapping):
            base[key].update(value)
            continue
        if "." in key:
            s, k = key.split(".", 1)
            s = "layout" if s == "parallel" else s
            if s not in SECTIONS:
                raise ValueError(f"{key}: unknown section {s!r}")
            base[s][k] = value
            continue
        s = where.get(key)
        if s is None:
            raise ValueError(f"{key}: unknown key (see moerail.sim.config_keys())")
        base[s][key] = value


def resolve_config(
    config: ConfigLike = None,
    *,
    model: Optional[str] = None,
    cluster: Optional[str] = None,
    devices: Optional[int] = None,
    megatron_args: Union[str, Sequence[str], None] = None,
    **overrides: Any,
) -> Dict[str, dict]:
    """The configuration :func:`simulate` would use, as four sections (for inspection).

    Precedence (later wins): the model / cluster presets named here, the config file or dict,
    the Megatron command line, ``devices``, then ``overrides`` (flat keys like
    ``tensor_model_parallel_size=2`` or ``"layout.tensor_model_parallel_size"``).
    """
    cfg: Dict[str, dict] = {s: {} for s in SECTIONS}
    if model is not None:
        cfg["model"].update(_model_preset(model))
    if cluster is not None:
        cfg["cluster"].update(_cluster_preset(cluster))
    loaded = load_config(config)
    for s in SECTIONS:
        cfg[s].update(loaded[s])
    if megatron_args is not None:
        parsed, _ignored = parse_megatron_args(megatron_args)
        for s in SECTIONS:
            cfg[s].update(parsed[s])
    if devices is not None:
        cfg["cluster"]["devices"] = _positive_int("devices", devices)
    _merge(cfg, overrides)
    return cfg


def _entries(cfg: Mapping[str, Mapping[str, Any]]) -> List[Tuple[str, Any]]:
    out = []
    for s in SECTIONS:
        for k, v in cfg.get(s, {}).items():
            out.append((f"{s}.{k}", v))
    return out


# ----------------------------------------------------------------------------- Megatron CLI

# Megatron flags whose absence means something moerail's defaults do not assume.
_MEGATRON_DEFAULTS = {
    "training": {
        "use_distributed_optimizer": False,
        "overlap_grad_reduce": False,
        "overlap_param_gather": False,
        "moe_grouped_gemm": False,
        "sequence_parallel": False,
        "moe_token_dispatcher_type": "allgather",
        "tp_comm_overlap": False,
    },
    "model": {"group_query_attention": False, "hidden_dropout": 0.1, "attention_dropout": 0.1},
}
_ALIASES = {"num_experts": "num_moe_experts"}
_IGNORED_VALUE_FLAGS = {"moe_router_dtype"}


def _eval_layer_freq(text: str) -> Union[int, List[int]]:
    """Megatron's ``--moe-layer-freq``: an int, or a Python list expression such as
    ``([0]*3+[1]*58)``; evaluated without ``eval`` (lists, ints, ``+`` and ``*`` only)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"moe_layer_freq: cannot parse {text!r}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"moe_layer_freq: unsupported expression {text!r}")

    out = ev(tree)
    if isinstance(out, int) or (isinstance(out, list) and all(isinstance(x, int) for x in out)):
        return out
    raise ValueError(f"moe_layer_freq: expected an int or a list of 0/1, got {text!r}")


def _scalar(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_megatron_args(argv: Union[str, Sequence[str]]) -> Tuple[Dict[str, dict], List[str]]:
    """Reads a Megatron-LM command line into configuration sections.

    Flags become keys (``--hidden-size 6144`` is ``hidden_size = 6144``; ``--swiglu`` is
    ``swiglu = true``; ``--no-X`` sets ``X = false``; ``--num-experts`` is
    ``num_moe_experts``; ``--bf16`` / ``--fp16`` / ``--fp8-format`` set the precision). Flags
    moerail's defaults assume but Megatron does not (distributed optimizer, overlaps, grouped
    GEMM, sequence parallelism, the all-to-all dispatcher, dropout 0) are set to Megatron's
    defaults unless present. Returns ``(sections, ignored_flags)``: flags the simulator does
    not model are listed, not rejected, so a full training command line can be pasted.
    """
    if isinstance(argv, str):
        tokens = shlex.split(argv)
    else:
        tokens = [str(t) for t in argv]
    keys = config_keys()
    where: Dict[str, str] = {}
    for s, ks in keys.items():
        for k in ks:
            where.setdefault(k, s)
    out: Dict[str, dict] = {s: {} for s in SECTIONS}
    for s, d in _MEGATRON_DEFAULTS.items():
        out[s].update(d)
    ignored: List[str] = []
    i = 0
    skip = {"python", "torchrun", "pretrain_gpt.py"}
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            if not (tok in skip or tok.endswith(".py") or "=" in tok and not tok.startswith("-")):
                ignored.append(tok)
            i += 1
            continue
        flag = tok[2:]
        inline = None
        if "=" in flag:
            flag, inline = flag.split("=", 1)
        key = flag.replace("-", "_")
        values: List[str] = []
        if inline is not None:
            values = [inline]
        else:
            j = i + 1
            while j < len(tokens) and not tokens[j].startswith("--"):
                values.append(tokens[j])
                j += 1
            i = j - 1
        i += 1
        key = _ALIASES.get(key, key)
        if key in ("bf16", "fp16") and not values:
            out["training"]["precision"] = key
            continue
        if key == "fp8_format":
            out["training"]["precision"] = "fp8"
            continue
        if key.startswith("no_") and key[3:] in where and not values:
            out[where[key[3:]]][key[3:]] = False
            continue
        if key == "moe_layer_freq":
            out["model"]["moe_layer_freq"] = _eval_layer_freq(" ".join(values))
            continue
        if key not in where or key in _IGNORED_VALUE_FLAGS:
            ignored.append(tok)
            continue
        if not values:
            value: Any = True
        elif key == "recompute_modules" or len(values) > 1:
            value = [_scalar(v) for v in values]
        else:
            value = _scalar(values[0])
        out[where[key]][key] = value
    return out, ignored


# ----------------------------------------------------------------------------- simulate / search


def simulate(
    config: ConfigLike = None,
    *,
    model: Optional[str] = None,
    cluster: Optional[str] = None,
    devices: Optional[int] = None,
    megatron_args: Union[str, Sequence[str], None] = None,
    **overrides: Any,
) -> Dict[str, Any]:
    """Predicts one training step; returns the report (the JSON of ``moerail plan --json``).

    ``config`` is a TOML/JSON path or a dict with sections ``model``, ``training``,
    ``layout``, ``cluster`` (Megatron's argument names; :func:`config_keys`). ``model`` /
    ``cluster`` name presets (:func:`model_presets`, :func:`cluster_presets`);
    ``megatron_args`` is a Megatron command line; ``overrides`` set single keys.

    The report holds ``model`` (parameters, FLOPs per token causal and non-causal),
    ``layout`` (sizes, micro-batches, whether the experts are folded), ``time`` (step time,
    tokens/s, TFLOPS per device, MFU in both FLOPs conventions), ``breakdown_s`` (compute by
    part, communication by kind — total, exposed and overlapped — pipeline bubble, optimizer,
    per stage), ``memory_gib`` (weights, gradients, optimizer with and without the
    distributed optimizer, activations by part, MoE dispatch buffers, recompute and offload
    savings, total, capacity, fits) and ``fits``.
    """
    cfg = resolve_config(
        config, model=model, cluster=cluster, devices=devices, megatron_args=megatron_args, **overrides
    )
    return json.loads(_native.sim_simulate(_entries(cfg)))


def _progress_bar(enabled: bool) -> Tuple[Optional[Callable[[int, int], None]], Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        state = {"last": -1}

        def plain(done: int, total: int) -> None:
            pct = 100 * done // max(total, 1)
            if pct // 10 != state["last"]:
                state["last"] = pct // 10
                print(f"\rsearching layouts: {done}/{total} ({pct}%)", end="", file=sys.stderr, flush=True)

        return plain, lambda: print(file=sys.stderr)
    bar = {"b": None}

    def update(done: int, total: int) -> None:
        if bar["b"] is None:
            bar["b"] = tqdm(total=total, unit="layout", desc="searching layouts", file=sys.stderr, leave=False)
        bar["b"].update(done - bar["b"].n)

    def close() -> None:
        if bar["b"] is not None:
            bar["b"].close()

    return update, close


def search(
    config: ConfigLike = None,
    *,
    model: Optional[str] = None,
    cluster: Optional[str] = None,
    devices: Optional[int] = None,
    megatron_args: Union[str, Sequence[str], None] = None,
    top: int = 10,
    space: Optional[Mapping[str, Sequence[Any]]] = None,
    include_oom: bool = False,
    progress: Union[bool, Callable[[int, int], Any]] = False,
    **overrides: Any,
) -> Dict[str, Any]:
    """Enumerates the valid layouts and returns the ``top`` fastest that fit in memory.

    The space covers TP, CP, PP (uneven first/last stages when PP does not divide the
    layers), virtual pipeline, EP, ETP (folded and coupled), micro-batch size and
    recomputation (``none``, ``light`` = norms + expert activations (+ MLA up-projections),
    ``heavy`` = also core attention and shared experts, ``full``). ``space`` restricts any of
    ``tp, cp, pp, vpp, ep, etp, mbs`` (lists of sizes) and ``recompute`` (list of names).
    ``progress``: True for a progress bar on stderr, or a callable ``(done, total)``.

    Returns ``{"results": [{"layout": {...}, "report": {...}}, ...], "stats": {...}}``.
    """
    top = _positive_int("top", top)
    cfg = resolve_config(
        config, model=model, cluster=cluster, devices=devices, megatron_args=megatron_args, **overrides
    )
    # The search picks the layout: drop the sizes a config may carry.
    for k in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size",
        "num_layers_per_virtual_pipeline_stage",
        "context_parallel_size",
        "expert_model_parallel_size",
        "expert_tensor_parallel_size",
        "decoder_first_pipeline_num_layers",
        "decoder_last_pipeline_num_layers",
    ):
        cfg["layout"].pop(k, None)
    for k in ("micro_batch_size", "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules"):
        cfg["training"].pop(k, None)
    if space is not None and not isinstance(space, Mapping):
        raise TypeError(f"space: expected a dict of lists, got {type(space).__name__}")
    sp = {k: list(v) for k, v in (space or {}).items()}
    if callable(progress):
        cb, close = progress, (lambda: None)
    else:
        cb, close = _progress_bar(bool(progress))
    try:
        text = _native.sim_search(_entries(cfg), sp, top, bool(include_oom), cb)
    finally:
        close()
    return json.loads(text)


# ----------------------------------------------------------------------------- calibration

_H100_BASE = {
    "training": {
        "seq_length": 4096,
        "global_batch_size": 256,
        "micro_batch_size": 1,
        "precision": "bf16",
        "moe_expert_capacity_factor": 1.0,
        "moe_pad_expert_input_to_capacity": True,
        "moe_token_dispatcher_type": "alltoall",
        "use_distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "tp_comm_overlap": True,
    },
}


def _case(model: str, devices: int, tp: int, pp: int, ep: int, etp: int) -> dict:
    return {
        "model": {"preset": model},
        "cluster": {"preset": "H100-SXM", "devices": devices},
        "training": dict(_H100_BASE["training"]),
        "layout": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "expert_model_parallel_size": ep,
            "expert_tensor_parallel_size": etp,
        },
    }


#: The published runs the H100 efficiencies are fitted on: MoE Parallel Folding (arXiv
#: 2504.14960), H100, seq 4096, GBS 256, token drop with capacity factor 1, BF16, MFU against
#: 989.5 TFLOPS with non-causal attention FLOPs (``report["time"]["mfu_noncausal"]``).
PUBLISHED: List[Dict[str, Any]] = [
    {"name": "Mixtral-8x22B TP2 CP1 PP8 EP8 ETP1 (folded), 128 H100", "mfu": 0.493,
     "config": _case("Mixtral-8x22B", 128, 2, 8, 8, 1)},
    {"name": "Mixtral-8x22B TP2 PP8 EP4 ETP2 (coupled), 128 H100", "mfu": 0.463,
     "config": _case("Mixtral-8x22B", 128, 2, 8, 4, 2)},
    {"name": "Qwen2-57B-A14B TP2 PP4 EP4 ETP1 (folded), 64 H100", "mfu": 0.390,
     "config": _case("Qwen2-57B-A14B", 64, 2, 4, 4, 1)},
    {"name": "Qwen2-57B-A14B TP2 PP4 EP4 ETP2 (coupled), 64 H100", "mfu": 0.353,
     "config": _case("Qwen2-57B-A14B", 64, 2, 4, 4, 2)},
]

#: Priors of the efficiency parameters (H100 microbenchmarks; see the Rust `sim` docs).
PRIORS: Dict[str, float] = {
    "gemm_efficiency": 0.75,
    "attention_efficiency": 0.55,
    "memory_efficiency": 0.70,
    "intra_node_comm_efficiency": 0.75,
    "kernel_overhead_us": 4.0,
}

#: The H100 efficiencies in use (the cluster preset's ``efficiency`` table).
H100_CALIBRATION: Dict[str, float] = dict(_find_preset("clusters", "h100-sxm").get("efficiency") or {})

_UPPER = {
    "gemm_efficiency": 1.0,
    "attention_efficiency": 1.0,
    "memory_efficiency": 1.0,
    "intra_node_comm_efficiency": 1.0,
    "inter_node_comm_efficiency": 1.0,
    "tp_overlap_efficiency": 1.0,
    "overlap_efficiency": 1.0,
}


def _nelder_mead(f: Callable[[List[float]], float], x0: List[float], step: float = 0.1, iters: int = 400) -> List[float]:
    n = len(x0)
    pts = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=lambda i: vals[i])
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < 1e-10:
            break
        cen = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        refl = [c + (c - w) for c, w in zip(cen, pts[-1])]
        fr = f(refl)
        if fr < vals[0]:
            exp = [c + 2 * (c - w) for c, w in zip(cen, pts[-1])]
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(cen, pts[-1])]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = [pts[0][j] + 0.5 * (pts[i][j] - pts[0][j]) for j in range(n)]
                    vals[i] = f(pts[i])
    return pts[min(range(n + 1), key=lambda i: vals[i])]


def calibrate(
    cases: Optional[Sequence[Mapping[str, Any]]] = None,
    priors: Optional[Mapping[str, float]] = None,
    *,
    noise: float = 0.02,
    prior_width: float = 0.15,
    metric: str = "mfu_noncausal",
) -> Dict[str, Any]:
    """Fits per-device efficiency parameters to measured runs (maximum a posteriori).

    ``cases``: dicts with ``config`` (as :func:`simulate` takes) and the measured ``mfu``
    (default: :data:`PUBLISHED`); ``priors``: parameter -> prior value (default
    :data:`PRIORS`); the objective is ``sum (log(pred/measured)/noise)^2 + sum
    (log(value/prior)/prior_width)^2``, minimised by Nelder-Mead in log space. ``metric`` is
    the report's ``time`` field compared with ``mfu``.

    Returns ``{"efficiency": {...}, "cases": [{"name", "measured", "predicted",
    "relative_error"}], "objective": float}``. Use the efficiencies in a cluster preset or a
    config's ``[cluster]`` section.
    """
    cases = list(PUBLISHED if cases is None else cases)
    if not cases:
        raise ValueError("cases: expected at least one measured run")
    pri = dict(PRIORS if priors is None else priors)
    names = list(pri)
    for k, v in pri.items():
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"priors.{k}: expected a positive number, got {v!r}")
    resolved = []
    for i, c in enumerate(cases):
        if "config" not in c or "mfu" not in c:
            raise ValueError(f"cases[{i}]: expected keys 'config' and 'mfu'")
        base = resolve_config(c["config"])
        resolved.append((c.get("name", f"case {i}"), float(c["mfu"]), base))

    def predict(eff: Mapping[str, float]) -> List[float]:
        out = []
        for _, _, base in resolved:
            cfg = {s: dict(v) for s, v in base.items()}
            cfg["cluster"].update(eff)
            rep = json.loads(_native.sim_simulate(_entries(cfg)))
            out.append(rep["time"][metric])
        return out

    def decode(x: List[float]) -> Dict[str, float]:
        eff = {}
        for k, v in zip(names, x):
            val = pri[k] * math.exp(v)
            eff[k] = min(val, _UPPER.get(k, math.inf))
        return eff

    def objective(x: List[float]) -> float:
        try:
            preds = predict(decode(x))
        except ValueError:
            return 1e12
        err = sum((math.log(p / m) / noise) ** 2 for p, (_, m, _) in zip(preds, resolved))
        reg = sum((v / prior_width) ** 2 for v in x)
        return err + reg

    best = _nelder_mead(objective, [0.0] * len(names))
    eff = {k: round(v, 4) for k, v in decode(best).items()}
    preds = predict(eff)
    return {
        "efficiency": eff,
        "cases": [
            {"name": n, "measured": m, "predicted": p, "relative_error": p / m - 1.0}
            for (n, m, _), p in zip(resolved, preds)
        ],
        "objective": objective([math.log(eff[k] / pri[k]) for k in names]),
    }


