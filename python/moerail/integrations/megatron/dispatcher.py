"""moerail's dispatcher in a Megatron ``MoELayer``: ``MoerailTokenDispatcher`` (built on first use
over :class:`moerail.AllToAllDispatcher`), ``use_moerail`` and ``with_moerail_dispatcher``."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

from .patch import _LOCK
from .router import _rewrite_spec, _router_class

__all__ = ["use_moerail", "with_moerail_dispatcher"]


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

        from ...ep import AllToAllDispatcher  # noqa: PLC0415

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
            parallel_size > 1``) is not handled: the constructor refuses it.

            With ``num_chunks > 1`` (``use_moerail(..., num_chunks=n)``) the layer runs dispatch,
            experts and combine as one chunked pipeline instead (:meth:`overlapped_experts`): the
            exchange of the other chunks runs while the experts compute one, forward and
            backward."""

            def __init__(self, base, num_experts: int, *, ranks_per_node: int, strategy: str, placement, link,
                         timeout, num_chunks: int = 1) -> None:
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
                                                   timeout=timeout, num_chunks=num_chunks)
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
                out = self.exchange.dispatch(hidden_states, probs, self.routing_map)
                # Megatron's dispatcher API keeps the state between token_dispatch and token_combine.
                self.handle = out.handle
                rows, self.tokens_per_expert, row_probs = out
                return rows, row_probs

            def dispatch_postprocess(self, hidden_states, probs):
                return hidden_states, self.tokens_per_expert, probs

            def combine_preprocess(self, hidden_states):
                return hidden_states

            def token_combine(self, hidden_states, *args, **kwargs):
                return self.exchange.combine(hidden_states, self.handle)

            def combine_postprocess(self, hidden_states):
                return hidden_states.view(self.hidden_shape)

            def overlapped_experts(self, hidden_states, probs, experts):
                """Dispatch, ``experts`` (Megatron's experts module: ``(rows, tokens_per_expert,
                probs) -> (output, bias)``) and combine of the tokens ``dispatch_preprocess`` gave,
                as ``AllToAllDispatcher.forward``'s chunked pipeline; returns the combined
                ``[T, H]`` (``combine_postprocess`` restores the shape)."""

                def run(rows, tokens_per_expert, row_probs):
                    out, bias = experts(rows, tokens_per_expert, row_probs)
                    if bias is not None:  # use_moerail refuses num_chunks > 1 with add_bias_linear
                        raise RuntimeError("num_chunks > 1: the experts returned a bias output")
                    return out

                return self.exchange.forward(hidden_states, probs, self.routing_map, run)

        MoerailTokenDispatcher.__module__ = __package__  # moerail.integrations.megatron, which resolves it
        _DISPATCHER_CLASS = MoerailTokenDispatcher
        return _DISPATCHER_CLASS


def use_moerail(moe_layer, *, ranks_per_node: Optional[int] = None, strategy: str = "auto", placement=None,
                router: bool = True, link=None, timeout=None, num_chunks: int = 1):
    """Puts moerail into an existing Megatron ``MoELayer``: its router becomes
    ``MoerailTopKRouter`` (same parameters and state; ``router=False`` keeps it) and its token
    dispatcher a :class:`MoerailTokenDispatcher` over :class:`moerail.AllToAllDispatcher` on the
    layer's expert-parallel group, with the exchange strategy planned per step (``strategy``:
    ``auto``, ``flat``, ``2dh``, ``dedup`` or ``allgather``) for ``ranks_per_node`` ranks a node
    (default: ``LOCAL_WORLD_SIZE`` as torchrun sets it, else the whole EP group on one node).
    ``placement`` (slot -> expert, one entry per expert of the layer) says which expert each local
    expert module of each rank holds (default: Megatron's contiguous blocks).

    ``num_chunks > 1`` hides the exchange behind the experts: the layer's ``dispatch``,
    ``routed_experts_compute`` and ``combine`` become one pipeline over ``num_chunks`` chunks of
    its tokens (the exchange of the others runs while the experts compute one, in the forward and
    in the backward; see ``AllToAllDispatcher.forward``). One all-gather plans every chunk, but each
    chunk's rows travel in their own messages: it pays where the exchange runs beside the experts
    (NICs and copy engines beside the GPU's SMs) and the experts' compute is comparable to the
    transfer time, not where per-message latency dominates or the exchange needs the experts' own
    cores (CPU ranks). Returns the layer."""
    from datetime import timedelta  # noqa: PLC0415

    if not hasattr(moe_layer, "token_dispatcher") or not hasattr(moe_layer, "router"):
        raise TypeError(f"moe_layer: expected a Megatron MoELayer, got {type(moe_layer).__name__}")
    if num_chunks != 1 and getattr(moe_layer.config, "add_bias_linear", False):
        # The pipeline combines each chunk's expert output as it comes; an expert bias (which
        # Megatron's alltoall dispatcher refuses as well) would have to travel with it.
        raise ValueError(
            f"num_chunks: {num_chunks} chunks need experts without a bias output; this layer has "
            "add_bias_linear=True (use num_chunks=1)"
        )
    base = moe_layer.token_dispatcher
    if ranks_per_node is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        ranks_per_node = int(env) if env else base.ep_size
        if base.ep_size % ranks_per_node:
            ranks_per_node = base.ep_size
    cls = _dispatcher_class()
    num_experts = moe_layer.config.num_moe_experts
    td = cls(base, num_experts, ranks_per_node=ranks_per_node, strategy=strategy, placement=placement, link=link,
             timeout=timeout or timedelta(minutes=10), num_chunks=num_chunks)
    moe_layer.token_dispatcher = td
    if td.exchange.num_chunks > 1:
        _overlap_layer(moe_layer)
    if router:
        from megatron.core.transformer.moe.router import TopKRouter  # noqa: PLC0415

        if type(moe_layer.router) is TopKRouter:
            moe_layer.router.__class__ = _router_class()  # a subclass with the same state: nothing to copy
    return moe_layer


def _overlap_layer(layer) -> None:
    """``MoELayer.forward`` calls ``dispatch`` -> ``routed_experts_compute`` -> ``combine``; the
    whole pipeline runs in the middle one (the layer's own methods, per instance)."""

    def routed_experts_compute(hidden_states, probs):
        return layer.token_dispatcher.overlapped_experts(hidden_states, probs, layer.experts), None

    layer.dispatch = lambda hidden_states, probs: (hidden_states, probs)
    layer.routed_experts_compute = routed_experts_compute
    layer.combine = lambda output: output


def with_moerail_dispatcher(spec, *, ranks_per_node: Optional[int] = None, strategy: str = "auto",
                            num_chunks: int = 1):
    """A copy of a Megatron layer spec whose MoE layers are built with moerail's router and
    dispatcher (:func:`use_moerail` applied to each ``MoELayer`` the spec builds, with these
    arguments)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: PLC0415
    from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: PLC0415

    layer_cls = type("MoerailMoELayer", (MoELayer,), {
        "__module__": __package__,
        "__doc__": "Megatron's MoELayer with moerail's router and AllToAllDispatcher (see use_moerail).",
        "__init__": _moerail_layer_init(MoELayer, ranks_per_node, strategy, num_chunks),
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


def _moerail_layer_init(base_cls, ranks_per_node, strategy, num_chunks=1):
    def __init__(self, *args, **kwargs):
        base_cls.__init__(self, *args, **kwargs)
        use_moerail(self, ranks_per_node=ranks_per_node, strategy=strategy, num_chunks=num_chunks)

    return __init__
