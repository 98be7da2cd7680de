"""Megatron-Core compatibility: moerail's ops behind Megatron's exact ``moe_utils`` signatures
and return conventions, for both APIs in use:

* megatron-core <= 0.16: ``permute`` returns ``(permuted, permuted_probs, sorted_indices)``.
* megatron-core >= 0.17: ``permute`` returns ``(permuted, permuted_probs, sorted_indices,
  pad_offsets, tokens_per_expert)`` and ``unpermute`` takes ``pad_offsets``.

``megatron_api()`` says which one the installed megatron-core speaks. Functions here never
import Megatron themselves, so they are usable (and tested) without it.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from .. import dispatch, router

API_3_TUPLE = "0.16"
API_5_TUPLE = "0.17"


def megatron_api(moe_utils=None) -> str:
    """``"0.16"`` (3-tuple permute) or ``"0.17"`` (5-tuple permute) for the given or installed
    ``megatron.core.transformer.moe.moe_utils``."""
    if moe_utils is None:
        from megatron.core.transformer.moe import moe_utils  # noqa: PLC0415
    params = inspect.signature(moe_utils.permute).parameters
    return API_5_TUPLE if "align_size" in params or "tokens_per_expert" in params else API_3_TUPLE


def _no_fused(fused: bool) -> None:
    if fused:
        raise ValueError("fused: moerail replaces Megatron's fused (TransformerEngine) path; pass fused=False")


def permute_v016(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
    """Megatron-Core 0.16 ``permute``: 3 values."""
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


def apply_router_token_dropping(
    routing_probs, routing_map, router_topk, capacity_factor, drop_policy="probs", pad_to_capacity=False
):
    return router.apply_token_dropping(
        routing_probs, routing_map, router_topk, capacity_factor, drop_policy, pad_to_capacity
    )


def compute_routing_scores_for_aux_loss(logits, topk, score_function, fused=False, padding_mask=None):
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
    _no_fused(fused)
    if padding_mask is not None:
        probs = probs * padding_mask.unsqueeze(-1)
    return router.switch_load_balancing_loss(
        probs, tokens_per_expert, total_num_tokens, topk, num_experts, moe_aux_loss_coeff
    )


def z_loss_func(logits, z_loss_coeff, padding_mask=None):
    if padding_mask is not None:
        raise ValueError("padding_mask: not supported by moerail's z_loss yet")
    return router.z_loss(logits, z_loss_coeff)


def get_capacity(num_tokens, num_experts, capacity_factor, min_capacity=None):
    return router.get_capacity(num_tokens, num_experts, capacity_factor, min_capacity)


def permute_for(api: str):
    """The ``permute`` of the given API (``megatron_api()``)."""
    return permute_v017 if api == API_5_TUPLE else permute_v016


def unpermute_for(api: str):
    return unpermute_v017 if api == API_5_TUPLE else unpermute_v016
