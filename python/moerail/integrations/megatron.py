"""Megatron-Core integration: moerail's ops behind Megatron's exact ``moe_utils`` signatures and
return conventions, a patch that puts them under stock Megatron layers, and a router class.

Three API generations of ``moe_utils`` are spoken (``megatron_api()`` says which one is installed):

* megatron-core 0.11-0.12: ``permute`` returns ``(permuted, sorted_indices)``, ``sort_chunks_by_idxs``
  one tensor (``"0.11"``);
* megatron-core 0.13-0.16: ``permute`` returns ``(permuted, permuted_probs, sorted_indices)`` (``"0.16"``);
* megatron-core >= 0.17: ``permute`` returns ``(permuted, permuted_probs, sorted_indices, pad_offsets,
  tokens_per_expert)`` and ``unpermute`` takes ``pad_offsets`` (``"0.17"``).

Use in a trainer:

* ``patch_moe_utils()`` / ``unpatch_moe_utils()`` (or ``with moe_utils_patched():``): every
  ``moe_utils`` function moerail implements is replaced, in ``moe_utils`` and in every module that
  imported it by name (router, token dispatchers, ``finalize_model_grads``, ...), so stock
  ``MoELayer`` modules run on moerail's ops. Unpatching restores the original objects.
* ``MoerailTopKRouter``: a ``TopKRouter`` whose routing runs on moerail's ops without patching
  anything global; ``with_moerail_router(spec)`` / ``get_moe_module_spec(...)`` build layers with it.
* ``update_expert_bias(model, rate)``: the aux-loss-free expert-bias step at a global-batch boundary
  for loops that do not call Megatron's ``finalize_model_grads`` (which does it itself).

Nothing here imports Megatron at import time: the adapters are usable (and tested) without it.
"""

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

from .. import dispatch, router

__all__ = [
    "API_2_TUPLE",
    "API_3_TUPLE",
    "API_5_TUPLE",
    "MOE_UTILS_FUNCTIONS",
    "MoeUtilsPatch",
    "get_moe_module_spec",
    "is_patched",
    "megatron_api",
    "moe_utils_patched",
    "patch_moe_utils",
    "patch_stats",
    "unpatch_moe_utils",
    "update_expert_bias",
    "with_moerail_router",
]

API_2_TUPLE = "0.11"
API_3_TUPLE = "0.16"
API_5_TUPLE = "0.17"


def megatron_api(moe_utils=None) -> str:
    """``"0.11"`` (2-tuple permute), ``"0.16"`` (3-tuple) or ``"0.17"`` (5-tuple) for the given or
    installed ``megatron.core.transformer.moe.moe_utils`` (also while it is patched)."""
    if moe_utils is None:
        from megatron.core.transformer.moe import moe_utils  # noqa: PLC0415
    params = inspect.signature(moe_utils.permute).parameters
    if "align_size" in params or "tokens_per_expert" in params:
        return API_5_TUPLE
    return API_3_TUPLE if "probs" in params else API_2_TUPLE


def _no_fused(fused: bool) -> None:
    if fused:
        raise ValueError("fused: moerail replaces Megatron's fused (TransformerEngine) path; pass fused=False")


# --------------------------------------------------------------------------------------------
# Adapters: Megatron's signatures and return conventions, moerail's ops.
# --------------------------------------------------------------------------------------------


def permute_v011(tokens, routing_map, num_out_tokens=None, fused=False, drop_and_pad=False):
    """Megatron-Core 0.11-0.12 ``permute``: ``(permuted, sorted_indices)``."""
    _no_fused(fused)
    out, _, sorted_indices, _, _ = dispatch.permute(tokens, routing_map, None, num_out_tokens, drop_and_pad)
    return out, sorted_indices


def permute_v016(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
    """Megatron-Core 0.13-0.16 ``permute``: 3 values."""
    _no_fused(fused)
    out, pp, sorted_indices, _, _ = dispatch.permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    return out, pp, sorted_indices


def permute_v017(
    tokens,
    routing_map,
    probs=None,
    num_out_tokens=None,
    fused=False,
    drop_and_pad=False,
    tokens_per_expert: Optional[torch.Tensor] = None,
    align_size: int = 0,
):
    """Megatron-Core 0.17+ ``permute``: 5 values; ``tokens_per_expert`` is passed through as
    Megatron does (alignment padding returns the padded counts)."""
    _no_fused(fused)
    out, pp, sorted_indices, pad_offsets, row_counts = dispatch.permute(
        tokens, routing_map, probs, num_out_tokens, drop_and_pad, align_size, tokens_per_expert
    )
    tpe = row_counts if align_size > 0 else tokens_per_expert
    return out, pp, sorted_indices, pad_offsets, tpe


def unpermute_v016(
    permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False, drop_and_pad=False
):
    _no_fused(fused)
    return dispatch.unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad)


def unpermute_v017(
    permuted_tokens,
    sorted_indices,
    restore_shape,
    probs=None,
    routing_map=None,
    fused=False,
    drop_and_pad=False,
    pad_offsets=None,
):
    _no_fused(fused)
    return dispatch.unpermute(
        permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad, pad_offsets
    )


def sort_chunks_by_idxs_v011(input, split_sizes, sorted_idxs, fused=False):
    """Megatron-Core 0.11-0.12 ``sort_chunks_by_idxs``: one tensor."""
    _no_fused(fused)
    return dispatch.sort_chunks_by_idxs(input, split_sizes, sorted_idxs)[0]


def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None, fused=False):
    _no_fused(fused)
    return dispatch.sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs)


def topk_routing_with_score_function(
    logits,
    topk,
    use_pre_softmax=False,
    num_groups=None,
    group_topk=None,
    scaling_factor=None,
    score_function="softmax",
    expert_bias=None,
    fused=False,
    router_replay=None,
    dense_output=False,
    precomputed_indices=None,
):
    _no_fused(fused)
    if router_replay is not None or precomputed_indices is not None:
        raise ValueError("router_replay / precomputed_indices: not supported by moerail's router")
    if score_function == "softmax":
        expert_bias = None  # Megatron's softmax path ignores the bias (its config refuses the pair)
    return router.topk_route(
        logits,
        topk,
        use_pre_softmax=use_pre_softmax,
        num_groups=num_groups,
        group_topk=group_topk,
        scaling_factor=scaling_factor,
        score_function=score_function,
        expert_bias=expert_bias,
        dense_output=dense_output,
    )


def topk_softmax_with_capacity(
    logits,
    topk,
    capacity_factor=None,
    pad_to_capacity=False,
    drop_policy="probs",
    use_pre_softmax=False,
    num_groups=None,
    group_topk=None,
    scaling_factor=None,
    deterministic_mode=False,
    score_function="softmax",
    expert_bias=None,
):
    """Megatron-Core <= 0.13 ``topk_softmax_with_capacity``: routing and token dropping in one call,
    ``(probs [T, E], routing_map [T, E], tokens_per_expert [E])`` (the counts before dropping)."""
    if score_function == "softmax":
        expert_bias = None
    probs, routing_map, tpe = router.topk_route(
        logits,
        topk,
        use_pre_softmax=use_pre_softmax,
        num_groups=num_groups,
        group_topk=group_topk,
        scaling_factor=scaling_factor,
        score_function=score_function,
        expert_bias=expert_bias,
        return_tokens_per_expert=True,
    )
    if capacity_factor is not None:
        probs, routing_map = router.apply_token_dropping(
            probs, routing_map, topk, capacity_factor, drop_policy, pad_to_capacity
        )
    return probs, routing_map, tpe


def apply_router_token_dropping(
    routing_probs, routing_map, router_topk, capacity_factor, drop_policy="probs", pad_to_capacity=False
):
    return router.apply_token_dropping(
        routing_probs, routing_map, router_topk, capacity_factor, drop_policy, pad_to_capacity
    )


def compute_routing_scores_for_aux_loss(logits, topk, score_function, fused=False, padding_mask=None):
    """``padding_mask`` as Megatron's code reads it: True marks a padding token."""
    _no_fused(fused)
    routing_map, scores = router.routing_scores_for_aux_loss(logits, topk, score_function)
    if padding_mask is not None:
        valid = (~padding_mask).unsqueeze(-1)
        routing_map = routing_map * valid
        scores = scores * valid
    return routing_map, scores


def switch_load_balancing_loss_func(
    probs, tokens_per_expert, total_num_tokens, topk, num_experts, moe_aux_loss_coeff, fused=False, padding_mask=None
):
    """``padding_mask`` as Megatron's code reads it here: True marks a valid token.

    ``probs`` may have more columns than ``num_experts``: Megatron's sequence-level loss passes
    ``[seq, batch * experts]`` scores (with as many counts) and the loss is the same sum over all
    columns, scaled by ``num_experts``."""
    _no_fused(fused)
    if padding_mask is not None:
        probs = probs * padding_mask.unsqueeze(-1)
    cols = probs.shape[1] if isinstance(probs, torch.Tensor) and probs.dim() == 2 else num_experts
    coeff = moe_aux_loss_coeff
    if cols != num_experts and isinstance(num_experts, int) and num_experts > 0 and cols % num_experts == 0:
        coeff = moe_aux_loss_coeff * num_experts / cols
        num_experts = cols
    return router.switch_load_balancing_loss(probs, tokens_per_expert, total_num_tokens, topk, num_experts, coeff)


def _group_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


def switch_load_balancing_loss_func_v011(
    probs, tokens_per_expert, topk, moe_aux_loss_coeff, sequence_partition_group=None
):
    """Megatron-Core 0.11-0.13 ``switch_load_balancing_loss_func``: the counts are all-reduced in
    place over ``sequence_partition_group`` and the token count is the group's."""
    n = _group_size(sequence_partition_group)
    if sequence_partition_group is not None:
        torch.distributed.all_reduce(tokens_per_expert, group=sequence_partition_group)
    num_experts = probs.shape[1]
    return router.switch_load_balancing_loss(
        probs, tokens_per_expert, probs.shape[0] * n, topk, num_experts, moe_aux_loss_coeff
    )


def sequence_load_balancing_loss_func(
    probs, routing_map, batch_size, seq_length, topk, moe_aux_loss_coeff, sequence_partition_group=None
):
    """Megatron-Core 0.11-0.13 ``sequence_load_balancing_loss_func`` (tokens ``[seq, batch]``
    order). A partitioned sequence (``sequence_partition_group`` of more than one rank) is not
    served here: the patch leaves such calls to Megatron."""
    if _group_size(sequence_partition_group) > 1:
        raise ValueError("sequence_partition_group: a partitioned sequence is not supported by this adapter")
    return router.sequence_load_balancing_loss(probs, routing_map, seq_length, batch_size, topk, moe_aux_loss_coeff)


def z_loss_func(logits, z_loss_coeff, padding_mask=None):
    """``padding_mask`` as Megatron's code reads it: True marks a padding token (excluded; the mean
    is over the valid tokens)."""
    if padding_mask is None:
        return router.z_loss(logits, z_loss_coeff)
    valid = ~padding_mask.reshape(-1).to(torch.bool)
    if bool(valid.all()):
        return router.z_loss(logits, z_loss_coeff)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return router.z_loss(logits[valid], z_loss_coeff)


def get_capacity(num_tokens, num_experts, capacity_factor, min_capacity=None):
    return router.get_capacity(num_tokens, num_experts, capacity_factor, min_capacity)


def get_updated_expert_bias(tokens_per_expert, expert_bias, expert_bias_update_rate, tp_dp_cp_group=None):
    """Megatron's ``get_updated_expert_bias``: the counts are all-reduced in place over the tensor-,
    data- and context-parallel group (Megatron's own default when ``tp_dp_cp_group`` is None),
    then moerail's update ``bias + rate * sign(mean(counts) - counts)`` runs on the sums."""
    with torch.no_grad():
        if tp_dp_cp_group is None:
            from megatron.core import parallel_state  # noqa: PLC0415

            tp_dp_cp_group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(tokens_per_expert, group=tp_dp_cp_group)
        updated = router.expert_bias_update(tokens_per_expert, expert_bias, expert_bias_update_rate)
        return updated.to(torch.promote_types(expert_bias.dtype, torch.float32))


def permute_for(api: str):
    """The ``permute`` of the given API (``megatron_api()``)."""
    return {API_5_TUPLE: permute_v017, API_2_TUPLE: permute_v011}.get(api, permute_v016)


def unpermute_for(api: str):
    return unpermute_v017 if api == API_5_TUPLE else unpermute_v016


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
            a.pop("fused", None)  # moerail serves the call whether or not TE's fused path was asked for
            _STATS[(name, "moerail")] += 1
            return impl(**a)
        _STATS[(name, "megatron")] += 1
        if (name, why) not in _WARNED:
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


def patch_moe_utils(moe_utils=None, *, functions: Optional[Iterable[str]] = None) -> MoeUtilsPatch:
    """Replaces Megatron-Core's ``moe_utils`` functions with moerail's, wherever they were imported.

    Every name of ``MOE_UTILS_FUNCTIONS`` present in ``moe_utils`` (or those of ``functions``) whose
    signature matches a Megatron version moerail speaks is replaced by a wrapper with the same
    signature (``inspect.signature`` still shows Megatron's) that runs moerail's op — in
    ``moe_utils`` itself and in every loaded module holding the original object (``router``,
    ``token_dispatcher``, ``experts``, ``finalize_model_grads``, anything that did ``from
    ...moe_utils import X``); modules imported later take the wrapper from ``moe_utils``.

    Calls moerail cannot serve go to Megatron's own function, with a ``RuntimeWarning`` once per
    function and reason: tensors on a device outside ``SERVED_DEVICE_TYPES``, ``router_replay``,
    ``precomputed_indices``, arguments of a newer Megatron. ``fused=True`` is served by moerail.

    Idempotent (a second call only rebinds modules imported since); returns what was patched.
    """
    moe_utils = _moe_utils(moe_utils)
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
def moe_utils_patched(moe_utils=None, *, functions: Optional[Iterable[str]] = None):
    """``with moe_utils_patched(): ...`` — patched inside, restored after (unless it was already
    patched on entry, in which case it stays patched)."""
    moe_utils = _moe_utils(moe_utils)
    was = is_patched(moe_utils)
    info = patch_moe_utils(moe_utils, functions=functions)
    try:
        yield info
    finally:
        if not was:
            unpatch_moe_utils(moe_utils)


# --------------------------------------------------------------------------------------------
# MoerailTopKRouter and the layer specs.
# --------------------------------------------------------------------------------------------


def _code_names(code) -> set:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def _with_globals(fn: types.FunctionType, overrides: Dict[str, object]) -> types.FunctionType:
    """A copy of ``fn`` whose module-level names in ``overrides`` resolve to the given objects
    (Megatron's method body, moerail's functions; the module itself is left untouched)."""
    g = dict(fn.__globals__)
    g.update(overrides)
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__dict__.update(fn.__dict__)
    return new


_ROUTER_CLASS = None


def _router_class():
    global _ROUTER_CLASS
    with _LOCK:
        if _ROUTER_CLASS is not None:
            return _ROUTER_CLASS
        from megatron.core.transformer.moe import moe_utils  # noqa: PLC0415
        from megatron.core.transformer.moe.router import TopKRouter  # noqa: PLC0415

        overrides = dict(_wrappers(moe_utils).wrappers)
        ns: Dict[str, object] = {
            "__module__": __name__,
            "__qualname__": "MoerailTopKRouter",
            "__doc__": MOERAIL_TOPK_ROUTER_DOC,
            "moerail_functions": tuple(sorted(overrides)),
        }
        for klass in reversed(TopKRouter.__mro__):
            for attr, fn in vars(klass).items():
                if isinstance(fn, types.FunctionType) and _code_names(fn.__code__) & overrides.keys():
                    ns[attr] = _with_globals(fn, overrides)
        _ROUTER_CLASS = type("MoerailTopKRouter", (TopKRouter,), ns)
        return _ROUTER_CLASS


MOERAIL_TOPK_ROUTER_DOC = """Megatron-Core's ``TopKRouter`` routing on moerail's ops, with nothing patched globally.

Same constructor, parameters, buffers and state dict as ``TopKRouter`` (checkpoints load either
way). Its methods are ``TopKRouter``'s own (so z-loss, aux-loss bookkeeping, token dropping, expert-
bias counting and logging behave exactly as in the installed Megatron-Core), with the ``moe_utils``
functions they call — ``topk_routing_with_score_function``, ``apply_router_token_dropping``,
``compute_routing_scores_for_aux_loss``, ``switch_load_balancing_loss_func``, ``z_loss_func`` —
resolved to moerail's (``moerail_functions`` lists them). The expert bias is updated at global-batch
boundaries as Megatron does: ``finalize_model_grads`` finds ``expert_bias`` and
``local_tokens_per_expert`` on it, or call ``update_expert_bias``.
"""


def __getattr__(name: str):
    if name == "MoerailTopKRouter":
        return _router_class()
    if name == "MoerailTokenDispatcher":
        return _dispatcher_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_moerail_router(spec, router_class=None):
    """A copy of a Megatron layer spec (a GPT layer or block spec, an MoE module spec: ``ModuleSpec``
    or ``functools.partial(MoELayer, submodules=...)`` in 0.19+) in which every ``MoESubmodules``
    routes with ``MoerailTopKRouter`` (or ``router_class``). The given spec is not modified."""
    from megatron.core.transformer.moe.moe_layer import MoESubmodules  # noqa: PLC0415

    if "router" not in {f.name for f in dataclasses.fields(MoESubmodules)}:
        raise NotImplementedError(
            "this megatron-core's MoESubmodules has no router field (< 0.16): use patch_moe_utils() instead"
        )
    router_class = _router_class() if router_class is None else router_class

    def replace(obj):
        if isinstance(obj, MoESubmodules):
            return dataclasses.replace(obj, router=router_class)
        return None

    out, found = _rewrite_spec(spec, replace)
    if not found:
        raise ValueError("spec: no MoE layer (MoESubmodules) found in it")
    return out


def _rewrite_spec(spec, replace):
    """A copy of ``spec`` (nested dataclasses such as ``ModuleSpec``, ``functools.partial``,
    lists and tuples) with every object for which ``replace(obj)`` returns something swapped for
    it; returns ``(new spec, number of replacements)``. Unchanged branches are shared."""
    found = [0]

    def walk(obj, depth=0):
        if depth > 32:
            return obj
        new = replace(obj)
        if new is not None:
            found[0] += 1
            return new
        if isinstance(obj, functools.partial):
            args = tuple(walk(a, depth + 1) for a in obj.args)
            kw = {k: walk(v, depth + 1) for k, v in obj.keywords.items()}
            if all(a is b for a, b in zip(args, obj.args)) and all(kw[k] is obj.keywords[k] for k in kw):
                return obj
            return functools.partial(obj.func, *args, **kw)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            changes = {}
            for f in dataclasses.fields(obj):
                if not f.init:
                    continue
                v = getattr(obj, f.name)
                nv = walk(v, depth + 1)
                if nv is not v:
                    changes[f.name] = nv
            return dataclasses.replace(obj, **changes) if changes else obj
        if isinstance(obj, (list, tuple)):
            items = [walk(v, depth + 1) for v in obj]
            if all(a is b for a, b in zip(items, obj)):
                return obj
            return type(obj)(items) if isinstance(obj, list) else tuple(items)
        return obj

    return walk(spec), found[0]


def get_moe_module_spec(use_te: Optional[bool] = False, num_experts: Optional[int] = None, moe_grouped_gemm: Optional[bool] = False, **kwargs):
    """Megatron's ``get_moe_module_spec`` (local modules by default: ``SequentialMLP`` experts)
    with ``MoerailTopKRouter`` as the router."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec as mcore_spec  # noqa: PLC0415

    return with_moerail_router(
        mcore_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, **kwargs)
    )


def _bias_modules(model) -> List[torch.nn.Module]:
    models = model if isinstance(model, (list, tuple)) else [model]
    out = []
    for m in models:
        for mod in m.modules():
            if getattr(mod, "expert_bias", None) is not None and getattr(mod, "local_tokens_per_expert", None) is not None:
                out.append(mod)
    return out


def update_expert_bias(model, expert_bias_update_rate: float, group=None, *, reset: bool = True) -> int:
    """The aux-loss-free balancing step at a global-batch boundary, as Megatron's
    ``finalize_model_grads`` does it: the ``local_tokens_per_expert`` of every router in ``model``
    (a module or a list of model chunks) are stacked, summed over ``group`` (default: Megatron's
    tensor+data+context-parallel group when ``torch.distributed`` is initialised), each
    ``expert_bias`` becomes ``bias + rate * sign(mean - counts)`` (moerail's op), and the counts are
    zeroed (``reset``). Returns the number of routers updated."""
    mods = _bias_modules(model)
    if not mods:
        return 0
    with torch.no_grad():
        counts = torch.stack([m.local_tokens_per_expert for m in mods]).to(torch.float32)
        bias = torch.stack([m.expert_bias for m in mods]).to(torch.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if group is None:
                from megatron.core import parallel_state  # noqa: PLC0415

                group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
            torch.distributed.all_reduce(counts, group=group)
        new = router.expert_bias_update(counts, bias, expert_bias_update_rate)
        for m, b in zip(mods, new):
            m.expert_bias.copy_(b)
            if reset:
                m.local_tokens_per_expert.zero_()
    return len(mods)


# ------------------------------------------------------------------------------------------------
# moerail's dispatcher in a Megatron MoELayer
# ------------------------------------------------------------------------------------------------

_DISPATCHER_CLASS = None


def _dispatcher_class():
    global _DISPATCHER_CLASS
    with _LOCK:
        if _DISPATCHER_CLASS is not None:
            return _DISPATCHER_CLASS
        from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher  # noqa: PLC0415

        from ..a2a import AllToAllDispatcher  # noqa: PLC0415

        class MoerailTokenDispatcher(MoETokenDispatcher):
            """Megatron's token-dispatcher interface over :class:`moerail.AllToAllDispatcher`.

            The six methods ``MoELayer`` calls: ``dispatch_preprocess`` flattens the tokens and
            keeps the routing map, ``token_dispatch`` runs the planned exchange (flat / 2dh / dedup
            / allgather), ``dispatch_postprocess`` hands the experts their rows grouped by local
            expert with ``tokens_per_expert`` (CPU int64) and the rows' probs (the experts apply
            them, as with Megatron's dispatchers), ``combine_preprocess`` passes the expert output
            on, ``token_combine`` runs the reverse exchange (fp32 sums in a fixed order) and
            ``combine_postprocess`` restores the hidden states' shape. Token dropping and padding
            come from the router's routing map. Expert tensor parallelism (``expert_tensor_
            parallel_size > 1``) is not handled: the constructor refuses it."""

            def __init__(self, base, num_experts: int, *, ranks_per_node: int, strategy: str, placement, link,
                         timeout) -> None:
                # The groups of the dispatcher it replaces (no ProcessGroupCollection needed).
                self.config = base.config
                self.shared_experts = getattr(base, "shared_experts", None)
                self.ep_group = base.ep_group
                self.tp_group = getattr(base, "tp_group", None)
                self.tp_ep_group = getattr(base, "tp_ep_group", None)
                self.tp_size = getattr(base, "tp_size", 1)
                self.tp_rank = getattr(base, "tp_rank", 0)
                self.ep_size = getattr(base, "ep_size", 1)
                self.cudagraph_attrs = []
                self.valid_cudagraph_attrs = None
                if self.tp_size != 1:
                    raise NotImplementedError(
                        f"use_moerail: expert_tensor_parallel_size={self.tp_size}: moerail's dispatcher handles "
                        "expert tensor parallelism 1 (e.g. MoE Parallel Folding's ETP1); keep Megatron's dispatcher")
                self.num_local_experts = base.num_local_experts
                self.local_expert_indices = list(base.local_expert_indices)
                self.exchange = AllToAllDispatcher(num_experts, self.ep_group, ranks_per_node=ranks_per_node,
                                                   strategy=strategy, placement=placement, link=link,
                                                   timeout=timeout)
                if self.exchange.num_local_experts != self.num_local_experts:
                    raise ValueError(
                        f"placement: {self.exchange.num_slots} slots give {self.exchange.num_local_experts} a rank, "
                        f"the layer's experts module holds {self.num_local_experts}")
                self.tokens_per_expert = None

            def dispatch_preprocess(self, hidden_states, routing_map, probs):
                self.hidden_shape = hidden_states.shape
                self.routing_map = routing_map.reshape(-1, routing_map.shape[-1])
                return hidden_states.reshape(-1, self.hidden_shape[-1]), probs

            def token_dispatch(self, hidden_states, probs, *args, **kwargs):
                rows, self.tokens_per_expert, row_probs = self.exchange.dispatch(hidden_states, probs,
                                                                                 self.routing_map)
                return rows, row_probs

            def dispatch_postprocess(self, hidden_states, probs):
                return hidden_states, self.tokens_per_expert, probs

            def combine_preprocess(self, hidden_states):
                return hidden_states

            def token_combine(self, hidden_states, *args, **kwargs):
                return self.exchange.combine(hidden_states)

            def combine_postprocess(self, hidden_states):
                return hidden_states.view(self.hidden_shape)

        MoerailTokenDispatcher.__module__ = __name__
        _DISPATCHER_CLASS = MoerailTokenDispatcher
        return _DISPATCHER_CLASS


def use_moerail(moe_layer, *, ranks_per_node: Optional[int] = None, strategy: str = "auto", placement=None,
                router: bool = True, link=None, timeout=None):
    """Puts moerail into an existing Megatron ``MoELayer``: its router becomes
    ``MoerailTopKRouter`` (same parameters and state; ``router=False`` keeps it) and its token
    dispatcher a :class:`MoerailTokenDispatcher` over :class:`moerail.AllToAllDispatcher` on the
    layer's expert-parallel group, with the exchange strategy planned per step (``strategy``:
    ``auto``, ``flat``, ``2dh``, ``dedup`` or ``allgather``) for ``ranks_per_node`` ranks a node
    (default: ``LOCAL_WORLD_SIZE`` as torchrun sets it, else the whole EP group on one node).
    ``placement`` (slot -> expert, one entry per expert of the layer) says which expert each local
    expert module of each rank holds (default: Megatron's contiguous blocks). Returns the layer."""
    from datetime import timedelta  # noqa: PLC0415

    if not hasattr(moe_layer, "token_dispatcher") or not hasattr(moe_layer, "router"):
        raise TypeError(f"moe_layer: expected a Megatron MoELayer, got {type(moe_layer).__name__}")
    base = moe_layer.token_dispatcher
    if ranks_per_node is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        ranks_per_node = int(env) if env else base.ep_size
        if base.ep_size % ranks_per_node:
            ranks_per_node = base.ep_size
    cls = _dispatcher_class()
    num_experts = moe_layer.config.num_moe_experts
    moe_layer.token_dispatcher = cls(base, num_experts, ranks_per_node=ranks_per_node, strategy=strategy,
                                     placement=placement, link=link, timeout=timeout or timedelta(minutes=10))
    if router:
        from megatron.core.transformer.moe.router import TopKRouter  # noqa: PLC0415

        if type(moe_layer.router) is TopKRouter:
            moe_layer.router.__class__ = _router_class()  # a subclass with the same state: nothing to copy
    return moe_layer


def with_moerail_dispatcher(spec, *, ranks_per_node: Optional[int] = None, strategy: str = "auto"):
    """A copy of a Megatron layer spec whose MoE layers are built with moerail's router and
    dispatcher (:func:`use_moerail` applied to each ``MoELayer`` the spec builds)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: PLC0415
    from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: PLC0415

    layer_cls = type("MoerailMoELayer", (MoELayer,), {
        "__module__": __name__,
        "__doc__": "Megatron's MoELayer with moerail's router and AllToAllDispatcher (see use_moerail).",
        "__init__": _moerail_layer_init(MoELayer, ranks_per_node, strategy),
    })

    def replace(obj):
        if isinstance(obj, ModuleSpec) and obj.module is MoELayer:
            return dataclasses.replace(obj, module=layer_cls)
        if isinstance(obj, functools.partial) and obj.func is MoELayer:
            return functools.partial(layer_cls, *obj.args, **obj.keywords)
        return None

    out, found = _rewrite_spec(spec, replace)
    if not found:
        raise ValueError("spec: no MoELayer found in it")
    return out


def _moerail_layer_init(base_cls, ranks_per_node, strategy):
    def __init__(self, *args, **kwargs):
        base_cls.__init__(self, *args, **kwargs)
        use_moerail(self, ranks_per_node=ranks_per_node, strategy=strategy)

    return __init__


def _dispatched_layers(model) -> list:
    cls = _dispatcher_class()
    layers = [m for m in model.modules() if isinstance(getattr(m, "token_dispatcher", None), cls)]
    if not layers:
        raise ValueError("model: no MoE layer with moerail's dispatcher in it (apply use_moerail first)")
    return layers


def update_expert_placement(model, load, optimizer=None, *, num_nodes: int = 1, mode: str = "refine",
                            seconds_per_token: Optional[float] = None, horizon_steps: Optional[float] = None):
    """Re-places the experts of every ``use_moerail`` layer of ``model`` for ``load [L, E]``
    (e.g. ``LoadTracker.predict()`` over these layers, in module order) and moves them: call it on
    every rank of the EP group at a global-batch boundary, after the optimizer step.

    Megatron's experts module holds ``E / ep`` experts a rank, so the new placement packs experts
    onto ranks (``rebalance_experts(load, E, 1, num_nodes, ep, mode)``, no replicas); the move is
    planned to keep experts where they are (``plan_migration``), and with ``seconds_per_token`` and
    ``horizon_steps`` it is made only when ``should_migrate`` says it pays. ``migrate_experts``
    moves each expert's weights and, with ``optimizer`` (a torch optimizer holding them, e.g.
    Adam), their state; then every layer's dispatcher routes by the new placement. Local-spec
    ``SequentialMLP`` experts only (grouped-GEMM experts keep their weights in one tensor).
    Returns ``{"migrated", "plan", "decision", "before", "after"}`` (device max/mean on ``load``)."""
    import moerail  # noqa: PLC0415

    layers = _dispatched_layers(model)
    slot_params = []
    for m in layers:
        local = getattr(m.experts, "local_experts", None)
        if local is None:
            raise NotImplementedError(
                f"update_expert_placement: {type(m.experts).__name__} experts keep their weights in shared "
                "tensors; use the local spec (SequentialMLP)")
        slot_params.append([list(e.parameters()) for e in local])
    d0 = layers[0].token_dispatcher.exchange
    w, e = d0.world, d0.num_experts
    load = torch.as_tensor(load, dtype=torch.float64)
    if tuple(load.shape) != (len(layers), e):
        raise ValueError(f"load: expected shape ({len(layers)}, {e}) (moerail MoE layers x experts), got "
                         f"{tuple(load.shape)}")
    current = torch.stack([m.token_dispatcher.exchange.phy2log for m in layers])
    new, _, _ = moerail.rebalance_experts(load, e, 1, num_nodes, w, mode=mode)
    tensors = moerail.expert_slot_tensors(slot_params, optimizer)
    expert_bytes = sum(t.numel() * t.element_size() for t in tensors[0][0])
    plan = moerail.plan_migration(current, new, w, num_nodes, expert_bytes=expert_bytes)
    before = moerail.placement_metrics(load, current, w, num_nodes)["summary"]["max_mean_device"]
    after = moerail.placement_metrics(load, plan.phy2log, w, num_nodes)["summary"]["max_mean_device"]
    decision = None
    migrate = True
    if seconds_per_token is not None and horizon_steps is not None:
        decision = moerail.should_migrate(load, current, plan, w, num_nodes, seconds_per_token=seconds_per_token,
                                          horizon_steps=horizon_steps)
        migrate = decision.migrate
    if migrate:
        moerail.migrate_experts(plan, tensors, group=d0.ep_group)
        for i, m in enumerate(layers):
            m.token_dispatcher.exchange.set_placement(plan.phy2log[i])
    return {"migrated": migrate, "plan": plan, "decision": decision, "before": before, "after": after}
