"""Simulator configurations: the presets (``moerail/presets``), TOML/JSON files, dicts and Megatron-LM
command lines (:func:`parse_megatron_args`), in four sections (``model``, ``training``, ``layout``,
``cluster``), merged by :func:`resolve_config`."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shlex
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .. import _native
from .ranks import _positive_int

__all__ = ["cluster_presets", "config_keys", "load_config", "model_presets", "parse_megatron_args", "resolve_config"]

PRESETS = pathlib.Path(__file__).resolve().parent.parent / "presets"
SECTIONS = ("model", "training", "layout", "cluster")

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], None]


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
    return {s: list(k) for s, k in _native.sim.sim_keys()}


def _read_file(path: Union[str, os.PathLike]) -> dict:
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"config: file {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"config: {p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config: cannot read {p}: {e}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {p}: invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config: {p}: expected a JSON object with sections, got a {type(data).__name__}")
        return data
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
        try:
            tokens = shlex.split(argv)
        except ValueError as e:
            raise ValueError(f"megatron_args: cannot split the command line: {e}") from None
    else:
        tokens = [str(t) for t in argv]
    if not tokens:
        raise ValueError("megatron_args: the command line is empty")
    keys = config_keys()
    where: Dict[str, str] = {}
    for s, ks in keys.items():
        for k in ks:
            where.setdefault(k, s)
    out: Dict[str, dict] = {s: {} for s in SECTIONS}
    for s, d in _MEGATRON_DEFAULTS.items():
        out[s].update(d)
    ignored: List[str] = []
    graph_impl: Optional[str] = None
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
        if key == "cuda_graph_impl":
            graph_impl = values[0] if values else None
            ignored.append(tok)
            continue
        if key not in where or key in _IGNORED_VALUE_FLAGS:
            ignored.append(tok)
            continue
        if not values:
            value: Any = True
        elif key in ("recompute_modules", "cuda_graph_scope") or len(values) > 1:
            value = [_scalar(v) for v in values]
        else:
            value = _scalar(values[0])
        out[where[key]][key] = value
    # Megatron captures the scopes only with a CUDA graph implementation chosen.
    if graph_impl in (None, "none") and "cuda_graph_scope" in out["training"]:
        out["training"].pop("cuda_graph_scope")
        ignored.append("--cuda-graph-scope")
    return out, ignored
