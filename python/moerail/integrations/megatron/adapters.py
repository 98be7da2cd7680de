"""moerail's ops behind Megatron-Core's exact ``moe_utils`` signatures and return conventions, one
adapter per API generation (``megatron_api()`` says which one is installed: ``"0.11"``, ``"0.16"``
or ``"0.17"``; :func:`permute_for` / :func:`unpermute_for` pick the adapter of a generation)."""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from ...ops import permutation as dispatch
from ...ops import router

__all__ = ["API_2_TUPLE", "API_3_TUPLE", "API_5_TUPLE", "megatron_api"]

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
