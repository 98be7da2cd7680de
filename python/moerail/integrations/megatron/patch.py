"""``patch_moe_utils``: the adapters under stock Megatron layers, in ``moe_utils`` and in every module
that imported its functions by name; ``unpatch_moe_utils`` restores them."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import os
import sys
import threading
import types
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ...ops import router
from .adapters import (
    _group_size,
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    get_capacity,
    get_updated_expert_bias,
    megatron_api,
    permute_v011,
    permute_v016,
    permute_v017,
    sequence_load_balancing_loss_func,
    sort_chunks_by_idxs,
    sort_chunks_by_idxs_v011,
    switch_load_balancing_loss_func,
    switch_load_balancing_loss_func_v011,
    topk_routing_with_score_function,
    topk_softmax_with_capacity,
    unpermute_v016,
    unpermute_v017,
    z_loss_func,
)

__all__ = ["MOE_UTILS_FUNCTIONS", "MoeUtilsPatch", "is_patched", "moe_utils_patched", "patch_moe_utils", "patch_stats", "unpatch_moe_utils"]


# --------------------------------------------------------------------------------------------
# patch_moe_utils: the adapters under stock Megatron layers.
# --------------------------------------------------------------------------------------------

# For each moe_utils name, the adapters of the versions moerail speaks, most specific first: the
# first whose parameters start with exactly the original's parameters (same names, same order)
# replaces it. A function whose signature matches none is left alone (reported as skipped).
_CANDIDATES: Dict[str, Tuple[Callable, ...]] = {
    "permute": (permute_v011, permute_v016, permute_v017),
    "unpermute": (unpermute_v016, unpermute_v017),
    "sort_chunks_by_idxs": (sort_chunks_by_idxs_v011, sort_chunks_by_idxs),
    "topk_routing_with_score_function": (topk_routing_with_score_function,),
    "apply_router_token_dropping": (apply_router_token_dropping,),
    "compute_routing_scores_for_aux_loss": (compute_routing_scores_for_aux_loss,),
    "switch_load_balancing_loss_func": (switch_load_balancing_loss_func_v011, switch_load_balancing_loss_func),
    "z_loss_func": (z_loss_func,),
    "get_updated_expert_bias": (get_updated_expert_bias,),
    "get_capacity": (get_capacity,),
    # <= 0.13 names
    "topk_softmax_with_capacity": (topk_softmax_with_capacity,),
    "sequence_load_balancing_loss_func": (sequence_load_balancing_loss_func,),
}

MOE_UTILS_FUNCTIONS: Tuple[str, ...] = tuple(_CANDIDATES)

# Device types moerail's ops run on (CPU: Rust; CUDA: moerail's kernels; NPU: torch_npu's fused
# permutes and torch formulas); a patched call with tensors elsewhere (meta, XLA, ...) goes to
# Megatron's own function (with a warning, once per function and reason).
SERVED_DEVICE_TYPES = frozenset({"cpu", "cuda", "npu"})


def _params(fn) -> List[str]:
    return list(inspect.signature(fn).parameters)


def _choose(name: str, original) -> Tuple[Optional[Callable], str]:
    try:
        theirs = _params(original)
    except (TypeError, ValueError):
        return None, "no inspectable signature"
    for cand in _CANDIDATES[name]:
        if _params(cand)[: len(theirs)] == theirs:
            return cand, ""
    return None, f"signature ({', '.join(theirs)}) matches no version moerail speaks"


def _why_not(name: str, args: Dict[str, object], accepted: Iterable[str]) -> Optional[str]:
    """Why moerail cannot serve this call (None: it can)."""
    for k in args:
        if k not in accepted:
            return f"argument {k!r}"
    for v in args.values():
        if isinstance(v, torch.Tensor) and v.device.type not in SERVED_DEVICE_TYPES:
            return f"tensors on {v.device.type}"
    if args.get("fused") and not _SERVE_FUSED[0]:
        return "fused=True"
    if name == "topk_routing_with_score_function":
        if args.get("router_replay") is not None:
            return "router_replay"
        if args.get("precomputed_indices") is not None:
            return "precomputed_indices"
        if args.get("score_function", "softmax") not in router.SCORE_FUNCTIONS:
            return f"score_function {args.get('score_function')!r}"
    if name == "sequence_load_balancing_loss_func":
        g = args.get("sequence_partition_group")
        if g is not None and _group_size(g) > 1:
            return "sequence_partition_group"
    return None


_STATS: collections.Counter = collections.Counter()
_WARNED: set = set()
# Whether calls with fused=True (Megatron's --moe-permute-fusion / --moe-router-fusion:
# TransformerEngine's fused kernels) are served by moerail. Off by default: moerail's GPU kernels
# have not been timed against TE's on a GPU yet, so the user gets the kernels they asked for.
_SERVE_FUSED = [os.environ.get("MOERAIL_SERVE_FUSED", "0") == "1"]
# Reasons that are the user's own choice, handed back without a warning.
_QUIET_REASONS = frozenset({"fused=True"})


def patch_stats(reset: bool = False) -> Dict[str, Dict[str, int]]:
    """Calls of the patched functions so far: ``{name: {"moerail": n, "megatron": m}}`` (``megatron``
    counts the calls handed back to Megatron's own function, e.g. for tensors on a device moerail's
    build does not serve)."""
    out: Dict[str, Dict[str, int]] = {}
    for (name, who), n in _STATS.items():
        out.setdefault(name, {"moerail": 0, "megatron": 0})[who] = n
    if reset:
        _STATS.clear()
    return out


def _wrap(name: str, original: Callable, impl: Callable) -> Callable:
    sig = inspect.signature(original)
    accepted = frozenset(_params(impl))

    @functools.wraps(original)
    def patched(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # Megatron's own error for a bad call
        a = dict(bound.arguments)
        why = _why_not(name, a, accepted)
        if why is None:
            a.pop("fused", None)  # fused=True reaches here only with serve_fused
            _STATS[(name, "moerail")] += 1
            return impl(**a)
        _STATS[(name, "megatron")] += 1
        if why not in _QUIET_REASONS and (name, why) not in _WARNED:
            _WARNED.add((name, why))
            warnings.warn(f"moerail: {name} handed to Megatron-Core's own function ({why})", RuntimeWarning, stacklevel=2)
        return original(*args, **kwargs)

    patched.__moerail_original__ = original
    patched.__moerail_impl__ = impl
    return patched


@dataclasses.dataclass
class MoeUtilsPatch:
    """What ``patch_moe_utils`` did: the module, its API generation, the replaced functions, the
    names left alone (with why), and every ``(module name, attribute)`` rebound."""

    moe_utils: types.ModuleType
    api: str
    originals: Dict[str, Callable]
    wrappers: Dict[str, Callable]
    skipped: Dict[str, str]
    sites: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def patched(self) -> List[str]:
        return sorted(self.wrappers)


_LOCK = threading.RLock()
_ACTIVE: Dict[int, MoeUtilsPatch] = {}  # id(moe_utils) -> patch
_WRAPPERS: Dict[int, MoeUtilsPatch] = {}  # id(moe_utils) -> wrappers built from the originals


def _moe_utils(moe_utils):
    if moe_utils is None:
        from megatron.core.transformer.moe import moe_utils  # noqa: PLC0415
    return moe_utils


def _wrappers(moe_utils) -> MoeUtilsPatch:
    """The wrappers for ``moe_utils`` (built once, from its original functions)."""
    key = id(moe_utils)
    with _LOCK:
        w = _WRAPPERS.get(key)
        if w is not None and w.moe_utils is moe_utils:
            return w
        originals, wrappers, skipped = {}, {}, {}
        for name in MOE_UTILS_FUNCTIONS:
            fn = getattr(moe_utils, name, None)
            if fn is None:
                continue
            fn = getattr(fn, "__moerail_original__", fn)
            impl, why = _choose(name, fn)
            if impl is None:
                skipped[name] = why
                continue
            originals[name] = fn
            wrappers[name] = _wrap(name, fn, impl)
        api = megatron_api(moe_utils)
        w = MoeUtilsPatch(moe_utils, api, originals, wrappers, skipped)
        _WRAPPERS[key] = w
        return w


def _module_dicts():
    for mod_name, mod in list(sys.modules.items()):
        if mod is None:
            continue
        try:
            d = vars(mod)
        except TypeError:
            continue
        if isinstance(d, dict):
            yield mod_name, d


def _rebind_everywhere(mapping: Dict[int, Tuple[object, object]]) -> List[Tuple[str, str]]:
    """Sets every module attribute that *is* ``old`` to ``new``, for ``id(old) -> (old, new)``."""
    sites = []
    for mod_name, d in _module_dicts():
        hits = [(k, v) for k, v in list(d.items()) if id(v) in mapping and mapping[id(v)][0] is v]
        for k, v in hits:
            d[k] = mapping[id(v)][1]
            sites.append((mod_name, k))
    return sites


def patch_moe_utils(
    moe_utils=None, *, functions: Optional[Iterable[str]] = None, serve_fused: Optional[bool] = None
) -> MoeUtilsPatch:
    """Replaces Megatron-Core's ``moe_utils`` functions with moerail's, wherever they were imported.

    Every name of ``MOE_UTILS_FUNCTIONS`` present in ``moe_utils`` (or those of ``functions``) whose
    signature matches a Megatron version moerail speaks is replaced by a wrapper with the same
    signature (``inspect.signature`` still shows Megatron's) that runs moerail's op — in
    ``moe_utils`` itself and in every loaded module holding the original object (``router``,
    ``token_dispatcher``, ``experts``, ``finalize_model_grads``, anything that did ``from
    ...moe_utils import X``); modules imported later take the wrapper from ``moe_utils``.

    Calls moerail cannot serve go to Megatron's own function, with a ``RuntimeWarning`` once per
    function and reason: tensors on a device outside ``SERVED_DEVICE_TYPES``, ``router_replay``,
    ``precomputed_indices``, arguments of a newer Megatron.

    ``fused=True`` calls (``--moe-permute-fusion``, ``--moe-router-fusion``: TransformerEngine's
    fused kernels) go to Megatron's function, i.e. to the kernels the user asked for, unless
    ``serve_fused=True`` (or ``MOERAIL_SERVE_FUSED=1``) opts in to moerail serving them too.
    ``serve_fused=None`` keeps the current setting (off unless the environment variable says 1).

    Idempotent (a second call only rebinds modules imported since); returns what was patched.
    """
    moe_utils = _moe_utils(moe_utils)
    if serve_fused is not None:
        if not isinstance(serve_fused, bool):
            raise TypeError(f"serve_fused: expected a bool or None, got {type(serve_fused).__name__}")
        _SERVE_FUSED[0] = serve_fused
    with _LOCK:
        w = _wrappers(moe_utils)
        names = set(w.wrappers) if functions is None else set(functions)
        unknown = names - set(MOE_UTILS_FUNCTIONS)
        if unknown:
            raise ValueError(f"functions: unknown names {sorted(unknown)}; expected some of {list(MOE_UTILS_FUNCTIONS)}")
        active = _ACTIVE.get(id(moe_utils))
        if active is None:
            active = MoeUtilsPatch(moe_utils, w.api, {}, {}, dict(w.skipped))
            _ACTIVE[id(moe_utils)] = active
        for n in sorted(names):
            if n in w.wrappers:
                active.originals[n] = w.originals[n]
                active.wrappers[n] = w.wrappers[n]
            elif n not in active.skipped and functions is not None:
                active.skipped[n] = "not in this megatron-core"
        mapping = {id(active.originals[n]): (active.originals[n], active.wrappers[n]) for n in active.wrappers}
        active.sites.extend(_rebind_everywhere(mapping))
        return active


def unpatch_moe_utils(moe_utils=None) -> bool:
    """Puts Megatron's original functions back wherever the patch (or a module imported while it
    was on) holds a moerail wrapper. Returns False if nothing was patched."""
    moe_utils = _moe_utils(moe_utils)
    with _LOCK:
        active = _ACTIVE.pop(id(moe_utils), None)
        if active is None:
            return False
        mapping = {id(active.wrappers[n]): (active.wrappers[n], active.originals[n]) for n in active.wrappers}
        _rebind_everywhere(mapping)
        return True


def is_patched(moe_utils=None) -> bool:
    return id(_moe_utils(moe_utils)) in _ACTIVE


@contextlib.contextmanager
def moe_utils_patched(moe_utils=None, *, functions: Optional[Iterable[str]] = None, serve_fused: Optional[bool] = None):
    """``with moe_utils_patched(): ...`` — patched inside, restored after (unless it was already
    patched on entry, in which case it stays patched); ``serve_fused`` as in :func:`patch_moe_utils`,
    restored on exit."""
    moe_utils = _moe_utils(moe_utils)
    was = is_patched(moe_utils)
    fused_before = _SERVE_FUSED[0]
    info = patch_moe_utils(moe_utils, functions=functions, serve_fused=serve_fused)
    try:
        yield info
    finally:
        _SERVE_FUSED[0] = fused_before
        if not was:
            unpatch_moe_utils(moe_utils)
