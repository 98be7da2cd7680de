"""Router top-k, expert capacity and the load-balancing losses, with Megatron-Core's semantics
(``megatron/core/transformer/moe/moe_utils.py``) and argument names.

All router math runs in fp32 (fp64 for fp64 logits) and is rounded once to the logits' dtype,
as Megatron-Core >= 0.17 does. Selection ties go to the lower expert index.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _checks, _native
from . import custom_ops as _ops

__all__ = [
    "topk_route",
    "get_capacity",
    "apply_token_dropping",
    "routing_scores_for_aux_loss",
    "switch_load_balancing_loss",
    "sequence_load_balancing_loss",
    "z_loss",
    "expert_bias_update",
]

SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
_INT64_MAX = 2**63 - 1


def _logits(logits) -> torch.Tensor:
    return _checks.tensor(
        logits, "logits", ndim=2, dtypes=_checks.FLOAT_DTYPES, shape_doc="[num_tokens, num_experts]"
    )


def topk_route(
    logits: torch.Tensor,
    topk: int,
    *,
    use_pre_softmax: bool = False,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: Optional[float] = None,
    score_function: str = "softmax",
    expert_bias: Optional[torch.Tensor] = None,
    dense_output: bool = False,
    return_tokens_per_expert: bool = False,
) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Top-k routing with a score function: Megatron's ``topk_routing_with_score_function``.

    For a token with logits ``x`` (``E`` experts):

    * ``softmax`` (post): ``idx = topk(x)``, ``p = softmax(x[idx])``;
      with ``use_pre_softmax``: ``s = softmax(x)``, ``idx = topk(s)``, ``p = s[idx]``.
    * ``sigmoid`` / ``sqrtsoftplus``: ``s = sigmoid(x)`` or ``sqrt(softplus(x))``,
      ``idx = topk(s + expert_bias)``, ``p = s[idx] / (sum(s[idx]) + 1e-20)`` if ``topk > 1``.
    * group-limited (``num_groups``, ``group_topk``): a group scores the sum of its top
      ``topk // group_topk`` scores; experts outside the best ``group_topk`` groups are masked.
    * ``p *= scaling_factor``.

    Returns ``(probs [T, E], routing_map bool [T, E])``, or with ``dense_output=True`` the compact
    ``(probs [T, k], indices int64 [T, k])`` (descending score order). With
    ``return_tokens_per_expert=True`` a third value, ``tokens_per_expert int64 [E]``, counted in
    the same pass. Differentiable with respect to ``logits`` (``expert_bias`` only selects).
    """
    logits = _logits(logits)
    num_experts = logits.shape[1]
    # Types here; values once, by the router's own check in Rust (what every backend runs).
    topk = _checks.integer(topk, "topk", minimum=1, maximum=_INT64_MAX)
    if not isinstance(score_function, str):
        raise TypeError(f"score_function: expected a str, got {type(score_function).__name__}")
    if num_groups is not None:
        num_groups = _checks.integer(num_groups, "num_groups", minimum=1, maximum=_INT64_MAX)
    if group_topk is not None:
        group_topk = _checks.integer(group_topk, "group_topk", minimum=1, maximum=_INT64_MAX)
    sf = None if scaling_factor is None else (_checks.real(scaling_factor, "scaling_factor") or None)
    if not torch.compiler.is_compiling():  # traced: the kernel runs the same check when it runs
        config = _native.ops.RouterConfig(topk, score_function, bool(use_pre_softmax), num_groups, group_topk, sf)
        config.validate(num_experts, expert_bias is not None)
    if expert_bias is not None:
        expert_bias = _checks.tensor(expert_bias, "expert_bias", ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if expert_bias.shape[0] != num_experts:
            raise ValueError(f"expert_bias: expected {num_experts} entries (one per expert), got {expert_bias.shape[0]}")
        expert_bias = expert_bias.detach().to(torch.float32).contiguous()
    args = (logits, topk, bool(use_pre_softmax), num_groups, group_topk, sf, score_function, expert_bias)
    if dense_output:
        probs, indices, tpe = _ops.topk_route_compact(*args)
        return (probs, indices, tpe) if return_tokens_per_expert else (probs, indices)
    probs, routing_map, _, tpe = _ops.topk_route(*args)
    return (probs, routing_map, tpe) if return_tokens_per_expert else (probs, routing_map)


def get_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: Optional[int] = None) -> int:
    """Expert capacity: ``ceil((num_tokens / num_experts) * capacity_factor)``, at least ``min_capacity``."""
    num_tokens = _checks.integer(num_tokens, "num_tokens", minimum=0)
    num_experts = _checks.integer(num_experts, "num_experts", minimum=1)
    capacity_factor = _checks.real(capacity_factor, "capacity_factor", positive=True)
    if min_capacity is not None:
        min_capacity = _checks.integer(min_capacity, "min_capacity", minimum=0)
    return _native.ops.get_capacity(num_tokens, num_experts, capacity_factor, min_capacity)


def apply_token_dropping(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    topk: int,
    capacity_factor: float,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Megatron's ``apply_router_token_dropping``.

    ``capacity = get_capacity(num_tokens * topk, num_experts, capacity_factor)``; each expert keeps
    its ``capacity`` highest-probability tokens (``drop_policy="probs"``) or its earliest ones
    (``"position"``). With ``pad_to_capacity`` every expert gets exactly ``capacity`` tokens (the
    padding tokens carry probability 0). Ties go to the lower token index. Returns
    ``(probs * kept, kept)``; differentiable with respect to ``probs``.
    """
    probs = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES, shape_doc="[num_tokens, num_experts]")
    routing_map = _checks.routing_map(routing_map)
    if routing_map.shape != probs.shape:
        raise ValueError(f"routing_map: expected shape {tuple(probs.shape)} (the shape of probs), got {tuple(routing_map.shape)}")
    topk = _checks.integer(topk, "topk", minimum=1, maximum=max(probs.shape[1], 1))
    capacity_factor = _checks.real(capacity_factor, "capacity_factor", positive=True)
    _checks.one_of(drop_policy, "drop_policy", ("probs", "position"))
    return _ops.apply_token_dropping(probs, routing_map, topk, capacity_factor, drop_policy, bool(pad_to_capacity))


def routing_scores_for_aux_loss(
    logits: torch.Tensor, topk: int, score_function: str = "softmax", return_tokens_per_expert: bool = False
):
    """Megatron's ``compute_routing_scores_for_aux_loss``: ``(routing_map [T, E], scores [T, E])``.

    ``scores`` is ``softmax(logits)``, or ``sigmoid`` / ``sqrt(softplus)`` normalised to sum 1 per
    token, in fp32 (fp64 for fp64 logits); ``routing_map`` marks each token's top-k scores.
    Differentiable with respect to ``logits`` through ``scores``.
    """
    logits = _logits(logits)
    topk = _checks.integer(topk, "topk", minimum=1, maximum=max(logits.shape[1], 1))
    _checks.one_of(score_function, "score_function", SCORE_FUNCTIONS)
    scores, routing_map, tpe = _ops.aux_loss_scores(logits, topk, score_function)
    return (routing_map, scores, tpe) if return_tokens_per_expert else (routing_map, scores)


def _counts(tokens_per_expert, name: str, shape) -> torch.Tensor:
    t = _checks.tensor(tokens_per_expert, name)
    if t.dtype == torch.bool:
        raise TypeError(f"{name}: expected counts (an integer or float tensor), got bool")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t.detach()


def switch_load_balancing_loss(
    probs: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    total_num_tokens: int,
    topk: int,
    num_experts: int,
    coeff: float,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Megatron's ``switch_load_balancing_loss_func``):

    ``loss = E * coeff / (topk * N^2) * sum_e (sum_t probs[t, e]) * tokens_per_expert[e]``
    with ``N = total_num_tokens``. Differentiable with respect to ``probs``.
    """
    probs = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES, shape_doc="[num_tokens, num_experts]")
    num_experts = _checks.integer(num_experts, "num_experts", minimum=1)
    if probs.shape[1] != num_experts:
        raise ValueError(f"probs: expected {num_experts} columns (num_experts), got {probs.shape[1]}")
    tpe = _counts(tokens_per_expert, "tokens_per_expert", (num_experts,))
    total = _checks.integer(total_num_tokens, "total_num_tokens", minimum=1)
    topk = _checks.integer(topk, "topk", minimum=1)
    coeff = _checks.real(coeff, "coeff")
    scale = num_experts * coeff / (topk * total * total)
    return _ops.load_balancing_loss(probs, tpe, 1, scale)


def sequence_load_balancing_loss(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    seq_length: int,
    batch_size: int,
    topk: int,
    coeff: float,
    tokens_per_expert: Optional[torch.Tensor] = None,
    total_num_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Sequence-level load-balancing loss (DeepSeek-V2/V3; Megatron's ``seq_aux_loss``).

    Tokens are in Megatron's ``[seq_length, batch_size]`` order (token ``t`` belongs to sequence
    ``t % batch_size``). For each sequence ``b`` the switch loss is taken over its own tokens,
    and the losses are averaged over the batch::

        loss = E * coeff / (topk * S^2 * B) * sum_b sum_e P[b, e] * f[b, e]

    with ``P[b, e]`` the sum of ``probs`` over sequence ``b``, ``f[b, e]`` its tokens routed to
    ``e`` (from ``routing_map``, or ``tokens_per_expert [B, E]`` already reduced across the
    sequence-parallel group) and ``S = total_num_tokens`` (default ``seq_length``).
    """
    probs = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES, shape_doc="[num_tokens, num_experts]")
    routing_map = _checks.routing_map(routing_map)
    if routing_map.shape != probs.shape:
        raise ValueError(f"routing_map: expected shape {tuple(probs.shape)}, got {tuple(routing_map.shape)}")
    seq_length = _checks.integer(seq_length, "seq_length", minimum=1)
    batch_size = _checks.integer(batch_size, "batch_size", minimum=1)
    if seq_length * batch_size != probs.shape[0]:
        raise ValueError(
            f"probs: expected seq_length * batch_size = {seq_length * batch_size} rows, got {probs.shape[0]}"
        )
    num_experts = probs.shape[1]
    topk = _checks.integer(topk, "topk", minimum=1)
    coeff = _checks.real(coeff, "coeff")
    if tokens_per_expert is None:
        tpe = routing_map.view(seq_length, batch_size, num_experts).sum(dim=0)
    else:
        tpe = _counts(tokens_per_expert, "tokens_per_expert", (batch_size, num_experts))
    total = seq_length if total_num_tokens is None else _checks.integer(total_num_tokens, "total_num_tokens", minimum=1)
    scale = num_experts * coeff / (topk * total * total) / batch_size
    return _ops.load_balancing_loss(probs, tpe, batch_size, scale)


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss: ``coeff * mean_t logsumexp(logits[t])^2``. Differentiable."""
    logits = _logits(logits)
    coeff = _checks.real(coeff, "coeff")
    return _ops.z_loss(logits, coeff)[0]


def expert_bias_update(
    tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor, expert_bias_update_rate: float
) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3; Megatron's ``get_updated_expert_bias``):
    ``expert_bias + rate * sign(mean(tokens_per_expert) - tokens_per_expert)``, per row of a
    ``[num_layers, num_experts]`` stack. Reduce ``tokens_per_expert`` across the data-parallel
    group first, once per global batch. Returns the new bias (float32); no gradient.
    """
    expert_bias = _checks.tensor(expert_bias, "expert_bias", dtypes=_checks.FLOAT_DTYPES)
    if expert_bias.dim() not in (1, 2):
        raise ValueError(f"expert_bias: expected [num_experts] or [num_layers, num_experts], got shape {tuple(expert_bias.shape)}")
    tpe = _counts(tokens_per_expert, "tokens_per_expert", tuple(expert_bias.shape))
    rate = _checks.real(expert_bias_update_rate, "expert_bias_update_rate")
    with torch.no_grad():
        return _ops.expert_bias_update(tpe, expert_bias.detach(), rate)
