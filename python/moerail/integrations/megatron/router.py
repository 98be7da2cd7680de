"""``MoerailTopKRouter`` (built on first use from the installed ``TopKRouter``), the layer specs that
use it, and ``update_expert_bias``."""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Dict, List, Optional

import torch

from ...ops import router
from .patch import _LOCK, _wrappers

__all__ = ["get_moe_module_spec", "update_expert_bias", "with_moerail_router"]


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
            "__module__": __package__,  # moerail.integrations.megatron, which resolves it
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
