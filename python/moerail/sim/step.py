"""One training step simulated (:func:`simulate`) and the layouts ranked (:func:`search`)."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from .. import _native
from .config import ConfigLike, _entries, resolve_config
from .ranks import _positive_int

__all__ = ["search", "simulate"]


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
    return json.loads(_native.sim.sim_simulate(_entries(cfg)))


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
    recomputation. By default recomputation is ``plan``: the memory planner
    (:mod:`moerail.memory`) keeps everything when the layout fits and otherwise picks the
    cheapest per-module recompute plan (the same for every layer, no host memory) that fits the
    device, charging its added time to the step. The fixed choices ``none``, ``light`` = norms +
    expert activations (+ MLA up-projections), ``heavy`` = also core attention and shared
    experts, and ``full`` can be asked for through ``space``. ``space`` restricts any of
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
        text = _native.sim.sim_search(_entries(cfg), sp, top, bool(include_oom), cb)
    finally:
        close()
    return json.loads(text)
