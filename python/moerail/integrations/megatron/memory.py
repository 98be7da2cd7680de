"""``apply_memory_plan``: a :class:`moerail.memory.MemoryPlan` carried out on a built Megatron-Core
model, through its own modules (instance attributes wrap their ``forward`` / the token
dispatcher's methods; no Megatron code is copied or changed).

Where each module of the plan is in a Megatron ``TransformerLayer``:

=================  ==============================================================================
``layernorm``      ``input_layernorm`` (group ``attn``) and ``pre_mlp_layernorm`` (group ``mlp``)
``attention``      ``self_attention`` (QKV, core attention, output projection)
``mla_up_proj``    Multi-Latent Attention's up-projections and RoPE: recompute only, through
                   Megatron's own output-discarding checkpoint of that part
                   (``MLASelfAttention.recompute_up_proj``) switched on in the planned layers; a
                   swap of them is the attention's swap (it moves the queries, keys and values
                   they make, as Megatron's ``core_attn`` offload does)
``router``         ``mlp.router``
``permute``        ``mlp.token_dispatcher.dispatch_preprocess`` (and the saved tensors of the
                   exchange and of ``dispatch_postprocess``)
``expert_fc1``     every local expert's ``linear_fc1``; ``recompute_exchange``: the dispatcher's
                   ``dispatch_preprocess``, ``token_dispatch`` and ``dispatch_postprocess`` (the
                   permute and the exchange run again from the pre-MLP norm's output)
``expert_act``     every local expert's ``activation_func`` (the saved tensors of the rest of the
                   expert MLP between fc1 and fc2 are attributed to it too)
``expert_fc2``     every local expert's ``linear_fc2``
``unpermute``      ``combine_preprocess`` / ``combine_postprocess`` (and ``token_combine``'s saved
                   tensors)
``shared_expert``  ``mlp.shared_experts``
=================  ==============================================================================

Works with Megatron's own ``alltoall`` dispatcher (the replay installs the dispatcher's attributes
as they were in the forward: split sizes, sorted indices, routing map) and with moerail's
(``use_moerail``: the exchange replays on the forward's route, no count exchange). Apply the plan
after ``use_moerail`` and before training.
"""

from __future__ import annotations

import hashlib
import os
from typing import List, Optional

import torch

from ...memory.executor import Executor
from ...memory.plan import Action, MemoryPlan

__all__ = ["apply_memory_plan", "memory_plan_layers", "validate_memory_plan"]


def _chunks(model) -> List[torch.nn.Module]:
    if isinstance(model, (list, tuple)):
        out = list(model)
    else:
        out = [model]
    for m in out:
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module or a list of model chunks, got {type(m).__name__}")
    return out


def memory_plan_layers(model):
    """``[(vpp_stage, layer_index, TransformerLayer)]`` of a Megatron model (or its list of virtual
    pipeline chunks); ``layer_index`` is Megatron's global ``layer_number - 1``."""
    from megatron.core.transformer.transformer_layer import TransformerLayer  # noqa: PLC0415

    found = []
    for vpp, chunk in enumerate(_chunks(model)):
        for m in chunk.modules():
            if isinstance(m, TransformerLayer):
                found.append((vpp, int(m.layer_number) - 1, m))
    return found


def _is_identity(m) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp  # noqa: PLC0415

    return m is None or isinstance(m, IdentityOp)


def _local_experts(mlp) -> Optional[list]:
    experts = getattr(mlp, "experts", None)
    return list(experts.local_experts) if experts is not None and hasattr(experts, "local_experts") else None


def _available_host_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _has(layer, module: str) -> Optional[str]:
    """None if ``layer`` has ``module`` (for the plan's actions), else why not."""
    from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: PLC0415

    mlp = layer.mlp
    moe = isinstance(mlp, MoELayer)
    if module == "layernorm":
        if _is_identity(layer.input_layernorm) and _is_identity(layer.pre_mlp_layernorm):
            return "it has no layer norm of its own (fused into the linear layers?)"
        return None
    if module == "attention":
        return "it has no self-attention" if _is_identity(layer.self_attention) else None
    if module == "mla_up_proj":
        if getattr(layer.self_attention, "linear_kv_up_proj", None) is None:
            return "it has no Multi-Latent Attention up-projections"
        return None
    if not moe:
        return "it is a dense layer (no MoE block)"
    if module == "shared_expert":
        return None if getattr(mlp, "shared_experts", None) is not None else "the model has no shared experts"
    if module in ("expert_fc1", "expert_act", "expert_fc2") and _local_experts(mlp) is None:
        return (f"its experts ({type(mlp.experts).__name__}) are grouped GEMMs; per-module actions on them need "
                "SequentialMLP experts (moe_grouped_gemm=False)")
    if module == "expert_act":
        for e in _local_experts(mlp):
            if e.config.gated_linear_unit or e.config.bias_activation_fusion or e.config.use_te_activation_func:
                return "its experts fuse the activation (gated linear unit or bias-activation fusion)"
    return None


def _mla_conflict(actions, module: str, action: Action) -> Optional[str]:
    """Why MLA's up-projections cannot take ``action`` next to the layer's other ``actions`` (None:
    they can)."""
    if module != "mla_up_proj":
        return None
    if action is not Action.RECOMPUTE:
        return ("MLA's up-projections are recomputed or kept; to move the queries, keys and values they make "
                "to host memory, swap 'attention' (as Megatron's core_attn offload does)")
    if actions.get("attention") is Action.SWAP:
        return ("the same layer swaps 'attention', which saves the queries, keys and values this recompute "
                "discards; recompute 'attention' instead, or keep MLA's up-projections")
    return None


def _plan_hash(plan: MemoryPlan) -> int:
    h = hashlib.sha256(repr(sorted((lp.layer, lp.vpp_stage, lp.recompute_layer,
                                    sorted((m, a.value) for m, a in lp.actions.items()))
                                   for lp in plan.layers)).encode()).digest()
    return int.from_bytes(h[:7], "little")


def _check_same_plan_everywhere(plan: MemoryPlan, device: torch.device) -> None:
    """Every rank must carry out the same plan: a replayed exchange pairs with the other EP ranks'
    replays only if all of them replay it. Checked with one all-reduce (min and max of a hash)."""
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dev = torch.device("cpu") if dist.get_backend() == "gloo" else device
    h = _plan_hash(plan)
    t = torch.tensor([h, -h], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != h or int(t[1]) != -h:
        raise ValueError("plan: the ranks were given different memory plans; every rank must apply the same plan "
                         "(a replayed exchange would wait for ranks that do not replay it)")


def validate_memory_plan(model, plan: MemoryPlan, *, num_layers: Optional[int] = None) -> None:
    """Raises ValueError, naming the argument, for a plan the model cannot carry out: layers beyond
    the model's, a module a layer does not have, swaps without host memory, a budget below the
    weights. Called by :func:`apply_memory_plan` before anything is wrapped."""
    if not isinstance(plan, MemoryPlan):
        raise TypeError(f"plan: expected a moerail.memory.MemoryPlan, got {type(plan).__name__}")
    chunks = _chunks(model)
    layers = memory_plan_layers(chunks)
    if not layers:
        raise ValueError("model: no Megatron TransformerLayer found in it")
    cfg = layers[0][2].config
    total = num_layers if num_layers is not None else int(cfg.num_layers)
    by_key = {(vpp, idx): layer for vpp, idx, layer in layers}
    for lp in plan.layers:
        if lp.layer >= total:
            raise ValueError(f"plan: layer {lp.layer} is beyond the model's {total} layers (0..{total - 1})")
        if lp.vpp_stage >= len(chunks):
            raise ValueError(f"plan: layer {lp.layer} names virtual pipeline stage {lp.vpp_stage}; the model has "
                             f"{len(chunks)} chunk(s) here")
        layer = by_key.get((lp.vpp_stage, lp.layer))
        if layer is None:
            continue  # another pipeline stage's layer
        for module, action in lp.actions.items():
            if action is Action.KEEP:
                continue
            why = _has(layer, module) or _mla_conflict(lp.actions, module, action)
            if why:
                raise ValueError(f"plan: layer {lp.layer} module {module!r} ({action.value}): {why}")
    acting = [(lp.layer, m) for lp in plan.layers for m, a in lp.actions.items() if a is not Action.KEEP]
    acting += [(lp.layer, "layer") for lp in plan.layers if lp.recompute_layer]
    if acting and getattr(cfg, "recompute_granularity", None) is not None:
        raise ValueError(f"plan: the model already recomputes with Megatron's recompute_granularity="
                         f"{cfg.recompute_granularity!r}; use either Megatron's recompute settings or a moerail plan "
                         "(build the model without recompute_granularity to apply this plan)")
    swaps = list(plan.modules_with(Action.SWAP))
    if swaps:
        if plan.host_bytes <= 0:
            layer, module = swaps[0]
            raise ValueError(f"plan: layer {layer} module {module!r} swaps to host memory but plan.host_bytes is 0 "
                             f"({len(swaps)} swap(s) in the plan); give the host pool a size")
        avail = _available_host_bytes()
        if avail is not None and plan.host_bytes > avail:
            raise ValueError(f"plan: host_bytes {plan.host_bytes / 2**30:.2f} GiB is more than this machine's free "
                             f"host memory ({avail / 2**30:.2f} GiB); swap less or free host memory")
    if plan.budget_bytes is not None:
        weights = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
        if plan.budget_bytes < weights:
            raise ValueError(f"plan: budget_bytes {plan.budget_bytes} is below the weights this rank holds "
                             f"({weights} bytes), before any activation: no plan can meet it")


def _tracker_guard():
    """Megatron's layer-wise aux-loss tracker as it is now; the closure puts it back (a replay of the
    router must not log its aux losses again)."""
    try:
        from megatron.core.transformer.moe import moe_utils  # noqa: PLC0415

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    except Exception:  # noqa: BLE001 - no tracker in this version: nothing to guard
        return lambda: None
    keys = set(tracker)
    snap = {}
    for k, v in tracker.items():
        if isinstance(v, dict):
            snap[k] = (dict(v), {kk: vv.detach().clone() for kk, vv in v.items() if isinstance(vv, torch.Tensor)})

    def restore():
        for k in list(tracker):
            if k not in keys:
                del tracker[k]
        for k, (d, tens) in snap.items():
            entry = tracker.get(k)
            if entry is None:
                continue
            entry.clear()
            entry.update(d)
            with torch.no_grad():
                for kk, vv in tens.items():
                    d[kk].copy_(vv)

    return restore


def _moerail_exchange_replay(td):
    """The replay of moerail's ``token_dispatch``: the forward's route (no header, no count
    exchange, no new plan), the weights recomputed from the probs."""
    from ...ep.autograd import _Dispatch  # noqa: PLC0415

    def factory(state):
        handle, rmap, exchange = state["handle"], state["routing_map"], td.exchange

        def replay(hidden_states, probs, *args, **kwargs):
            stats = dict(handle.stats)
            hidden, weights, _ = exchange._prepare(hidden_states, probs, rmap)
            try:
                return _Dispatch.apply(hidden, weights, exchange, handle)
            finally:
                handle.stats.clear()
                handle.stats.update(stats)

        return replay

    return factory


def apply_memory_plan(model, plan: MemoryPlan, *, min_swap_bytes: int = 1 << 16, throttle_s: Optional[float] = None,
                      prefetch_delay_s: float = 0.0, count: bool = False, check_ranks: bool = True,
                      lookahead: Optional[int] = None, prefetch_groups: Optional[int] = None) -> Executor:
    """Carries out ``plan`` on a built Megatron-Core model (``GPTModel``, a DDP-wrapped one, or the
    list of virtual-pipeline chunks): the plan is checked against the model first
    (:func:`validate_memory_plan`; with ``torch.distributed`` up, every rank must hold the same
    plan), then each layer's modules are wrapped. Returns the :class:`~moerail.memory.executor.Executor`
    (``executor.counter`` with ``count=True``: the exact saved-tensor bytes; ``executor.stats``).

    ``min_swap_bytes``: smaller saved tensors stay on the device; ``throttle_s`` /
    ``prefetch_delay_s``: slow every copy / delay every swap-in (stress tests); ``lookahead`` and
    ``prefetch_groups``: the executor's copies back ahead (``prefetch_groups`` groups ahead within
    a model chunk; ``lookahead=2``: also the next backward chunk's first group), by default the
    plan's (those ``plan_memory`` planned it for: its peak counts what they hold)."""
    validate_memory_plan(model, plan)
    chunks = _chunks(model)
    params = [p for c in chunks for p in c.parameters()]
    device = params[0].device if params else torch.device("cpu")
    if check_ranks:
        _check_same_plan_everywhere(plan, device)
    ex = Executor(plan, device=device, min_swap_bytes=min_swap_bytes, throttle_s=throttle_s,
                  prefetch_delay_s=prefetch_delay_s, count=count, params=params, lookahead=lookahead,
                  prefetch_groups=prefetch_groups)
    ex.state_guards.append(_tracker_guard)
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # noqa: PLC0415

        tracker = get_cuda_rng_tracker()
        ex.rng_sources.append((tracker.get_states, tracker.set_states))
    except Exception:  # noqa: BLE001 - no model-parallel RNG tracker: the torch generators suffice
        pass
    for vpp, idx, layer in memory_plan_layers(chunks):
        _wrap_layer(ex, layer, idx, vpp)
    return ex


def _plan_mla_up_proj(ex: Executor, attn, idx: int, vpp: int) -> None:
    """MLA's up-projections and RoPE recomputed in this layer alone: Megatron's own output-discarding
    checkpoint of that part (what ``recompute_modules=["mla_up_proj"]`` turns on in every layer),
    switched on for each forward the plan recomputes them in and keeps the attention (a recomputed
    attention or layer rebuilds them anyway)."""
    built_with = bool(attn.recompute_up_proj)
    forward = attn.forward

    def planned_forward(*args, **kwargs):
        attn.recompute_up_proj = built_with or (ex.action(idx, "mla_up_proj", vpp) is Action.RECOMPUTE
                                                and ex.action(idx, "attention", vpp) is Action.KEEP
                                                and not ex.recomputes_layer(idx, vpp))
        return forward(*args, **kwargs)

    attn.forward = planned_forward


def _wrap_layer(ex: Executor, layer, idx: int, vpp: int) -> None:
    from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: PLC0415

    from .dispatcher import _dispatcher_class  # noqa: PLC0415

    td = getattr(layer.mlp, "token_dispatcher", None)
    layer.forward = ex.layer(layer.forward, idx, vpp, owner=td, buffers_of=layer)
    if not _is_identity(layer.input_layernorm):
        m = layer.input_layernorm
        m.forward = ex.region(m.forward, "layernorm", "attn", buffers_of=m)
    if not _is_identity(layer.pre_mlp_layernorm):
        m = layer.pre_mlp_layernorm
        m.forward = ex.region(m.forward, "layernorm", "mlp", buffers_of=m)
    if not _is_identity(layer.self_attention):
        m = layer.self_attention
        if getattr(m, "linear_kv_up_proj", None) is not None and hasattr(m, "recompute_up_proj"):
            _plan_mla_up_proj(ex, m, idx, vpp)
        m.forward = ex.region(m.forward, "attention", "attn", buffers_of=m)
        m.register_forward_hook(lambda mod, i, o: ex.group_output(o, "attn"))
    mlp = layer.mlp
    mlp.register_forward_hook(lambda mod, i, o: ex.group_output(o, "mlp"))
    if not isinstance(mlp, MoELayer):
        return
    r = mlp.router
    r.forward = ex.region(r.forward, "router", "mlp", buffers_of=r)
    td = mlp.token_dispatcher
    moerail_td = isinstance(td, _dispatcher_class())
    td.dispatch_preprocess = ex.region(td.dispatch_preprocess, "permute", "mlp", owner=td,
                                       also=(("expert_fc1", Action.RECOMPUTE_EXCHANGE),))
    td.token_dispatch = ex.region(td.token_dispatch, "expert_fc1", "mlp", actions=(Action.RECOMPUTE_EXCHANGE,),
                                  owner=td, tag_as="permute",
                                  replay=_moerail_exchange_replay(td) if moerail_td else None)
    td.dispatch_postprocess = ex.region(td.dispatch_postprocess, "expert_fc1", "mlp",
                                        actions=(Action.RECOMPUTE_EXCHANGE,), owner=td, tag_as="permute")
    td.combine_preprocess = ex.region(td.combine_preprocess, "unpermute", "mlp", owner=td)
    td.token_combine = ex.tag(td.token_combine, "unpermute")
    td.combine_postprocess = ex.region(td.combine_postprocess, "unpermute", "mlp", owner=td)
    experts = _local_experts(mlp)
    if experts is not None:
        for e in experts:
            e.forward = ex.tag(e.forward, "expert_act")
            e.linear_fc1.forward = ex.region(e.linear_fc1.forward, "expert_fc1", "mlp", buffers_of=e.linear_fc1)
            e.activation_func = ex.region(e.activation_func, "expert_act", "mlp")
            e.linear_fc2.forward = ex.region(e.linear_fc2.forward, "expert_fc2", "mlp", buffers_of=e.linear_fc2)
    else:
        mlp.experts.forward = ex.tag(mlp.experts.forward, "expert_fc1")
    if getattr(mlp, "shared_experts", None) is not None:
        s = mlp.shared_experts
        s.forward = ex.region(s.forward, "shared_expert", "mlp", buffers_of=s)
