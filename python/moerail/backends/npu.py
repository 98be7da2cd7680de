"""NPU paths of moerail's ops (Ascend through ``torch_npu``).

moerail has no native Ascend kernels. On NPU tensors every op runs on the device as
  * torch_npu's fused MoE op where its result is exactly moerail's. The permutes use
    ``npu_moe_token_permute_with_routing_map`` and ``npu_moe_token_permute``: they only move rows;
  * otherwise torch formulas written to give the same result as the CPU kernels. They run on any
    device.

The formulas follow the CPU path's contracts: ties go to the lower expert or token index, the
router computes in fp32 (fp64 for fp64 data) and rounds once, and unpermute sums each token's
rows in ascending row order in fp32, so the result has the same bits on every run. The results
match the CPU path bit for bit, with two exceptions, both within fp32 rounding:
  * the router's probabilities, because torch's softmax / sigmoid are not moerail's;
  * the gradient of unpermute's probs, a dot product over the hidden size that torch reduces in
    its own (deterministic) order.

Why unpermute does not use ``npu_moe_token_unpermute``: its accumulation order and precision are
not documented, and moerail's combine promises a fixed order.

**The index convention.** torch_npu's permutes return the *inverse* of Megatron's
``sorted_indices``. Megatron's gives, for each output row, the token it came from (ordered by
expert, then token). torch_npu's gives, for each top-k slot ``t * k + j``, the output row it
went to (``sortedIndicesOut = argsort(argsort(flat expert ids))``). ``_rows_from_inverse``
converts it back, so the rest of moerail (unpermute, the backward passes, the dispatcher) sees
one convention. The fused permute assumes every token has the same number of experts (its
``topK = num_out_tokens // num_tokens``). When the routing map does not have that, the torch
formula runs instead.

Every function has the signature of the op of the same name in ``ops.py``. ``ops`` calls these
for NPU tensors. The tests call them for CPU tensors too (:func:`use_for_cpu`), because the
formulas are device-generic. The tests also load a stand-in ``torch_npu`` that implements the
two fused ops by their published formulas (``tests/npu_standin``).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch import Tensor

from .. import _checks as _args
from .. import _native
from . import cuda as _device
from .cuda import acc_dtype

_for_cpu = False
_NORM_EPS = 1e-20

# The reductions that are torch formulas on every device already (_device has them).
load_balancing_loss = _device.load_balancing_loss
load_balancing_loss_backward = _device.load_balancing_loss_backward
z_loss = _device.z_loss
z_loss_backward = _device.z_loss_backward
expert_bias_update = _device.expert_bias_update
apply_token_dropping = _device.apply_token_dropping


def use_for_cpu(on: bool) -> None:
    """Send CPU tensors through these NPU formulas (a test hook, as ``_device.use_emulator``)."""
    global _for_cpu
    _for_cpu = bool(on)


def wants(args) -> bool:
    """True when the op's tensors live on an NPU (or on the CPU with :func:`use_for_cpu`)."""
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type == "npu" or (_for_cpu and a.device.type == "cpu")
    return False


def torch_npu():
    """The ``torch_npu`` module if the process imported it (moerail never imports it itself:
    importing it initialises the NPU runtime)."""
    return sys.modules.get("torch_npu")


def _fused(name: str):
    mod = torch_npu()
    return getattr(mod, name, None) if mod is not None else None


def _checks(t: Tensor) -> bool:
    return _device._value_checks(t)


# ----------------------------------------------------------------------------------------------
# Router: Megatron's topk_routing_with_score_function, in the accumulation dtype
# ----------------------------------------------------------------------------------------------


def _scores(x: Tensor, score_function: str) -> Tensor:
    if score_function == "softmax":
        return torch.softmax(x, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(x)
    if score_function == "sqrtsoftplus":
        return torch.sqrt(torch.nn.functional.softplus(x))
    raise ValueError(f"score_function: expected 'softmax', 'sigmoid' or 'sqrtsoftplus', got '{score_function}'")


def _topk(s: Tensor, k: int) -> Tensor:
    """Indices of the k largest per row, largest first, ties to the lower index."""
    return torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]


def _select(s: Tensor, topk: int, num_groups: Optional[int], group_topk: Optional[int]) -> Tensor:
    if not (num_groups and group_topk):
        return _topk(s, topk)
    t, e = s.shape
    per = e // num_groups
    grouped = s.reshape(t, num_groups, per)
    best = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., : topk // group_topk]
    group_scores = best.sum(dim=-1)
    keep = torch.zeros((t, num_groups), dtype=torch.bool, device=s.device)
    keep.scatter_(1, _topk(group_scores, group_topk), True)
    masked = s.masked_fill(~keep.repeat_interleave(per, dim=1), float("-inf"))
    return _topk(masked, topk)


def _probs_at(x: Tensor, idx: Tensor, topk: int, pre: bool, scale: Optional[float], score_function: str) -> Tensor:
    """The top-k probabilities of logits ``x`` (accumulation dtype) at the chosen experts ``idx``:
    the differentiable part of the router."""
    if score_function == "softmax":
        p = torch.softmax(x, dim=-1).gather(1, idx) if pre else torch.softmax(x.gather(1, idx), dim=-1)
    else:
        p = _scores(x, score_function).gather(1, idx)
        if topk > 1:
            p = p / (p.sum(dim=-1, keepdim=True) + _NORM_EPS)
    return p * scale if scale else p


def _route(logits, topk, pre, num_groups, group_topk, scale, score_function, bias):
    t, e = logits.shape
    # The router's one check (moerail-core's RouterConfig::validate), as the CPU and CUDA paths run it.
    _native.ops.RouterConfig(topk, score_function, pre, num_groups, group_topk, scale).validate(e, bias is not None)
    _device._finite(logits, "logits")
    x = logits.to(acc_dtype(logits.dtype))
    if score_function == "softmax":
        choice = torch.softmax(x, dim=-1) if pre else x
    else:
        choice = _scores(x, score_function)
        if bias is not None:
            _device._finite(bias, "expert_bias")
            choice = choice + bias.to(choice.dtype)
    idx = _select(choice, topk, num_groups, group_topk)
    probs_k = _probs_at(x, idx, topk, pre, scale, score_function)
    tpe = torch.bincount(idx.reshape(-1), minlength=e)
    return probs_k.to(logits.dtype), idx, tpe


def topk_route(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias):
    probs_k, idx, tpe = _route(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
                               score_function, expert_bias)
    probs = torch.zeros_like(logits, memory_format=torch.contiguous_format).scatter_(1, idx, probs_k)
    routing_map = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, idx, True)
    return probs, routing_map, idx, tpe


def topk_route_compact(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function,
                       expert_bias):
    return _route(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias)


def topk_route_backward(grad_probs, logits, indices, topk, use_pre_softmax, scaling_factor, score_function):
    t, e = logits.shape
    # Dense [T, E] or compact [T, k] gradient, as the CPU kernel reads it.
    g = grad_probs.gather(1, indices) if tuple(grad_probs.shape) == (t, e) else grad_probs
    with torch.enable_grad():
        x = logits.detach().to(acc_dtype(logits.dtype)).requires_grad_(True)
        p = _probs_at(x, indices, topk, use_pre_softmax, scaling_factor, score_function)
        (gx,) = torch.autograd.grad(p, x, g.to(p.dtype))
    return gx.to(logits.dtype).contiguous()


def _aux_scores(x: Tensor, score_function: str) -> Tensor:
    s = _scores(x, score_function)
    return s if score_function == "softmax" else s / (s.sum(dim=-1, keepdim=True) + _NORM_EPS)


def aux_loss_scores(logits, topk, score_function):
    _device._finite(logits, "logits")
    t, e = logits.shape
    if not 1 <= topk <= e:
        raise ValueError(f"topk: must be in [1, num_experts={e}], got {topk}")
    scores = _aux_scores(logits.to(acc_dtype(logits.dtype)), score_function)
    idx = _topk(scores, topk)
    routing_map = torch.zeros((t, e), dtype=torch.bool, device=logits.device).scatter_(1, idx, True)
    return scores.contiguous(), routing_map, torch.bincount(idx.reshape(-1), minlength=e)


def aux_loss_scores_backward(grad_scores, logits, score_function):
    with torch.enable_grad():
        x = logits.detach().to(acc_dtype(logits.dtype)).requires_grad_(True)
        s = _aux_scores(x, score_function)
        (gx,) = torch.autograd.grad(s, x, grad_scores.to(s.dtype))
    return gx.to(logits.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# Permutation
# ----------------------------------------------------------------------------------------------


def _experts_of_rows(row_counts: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(row_counts.numel(), device=row_counts.device), row_counts)


def _gather(tokens: Tensor, sorted_indices: Tensor) -> Tensor:
    """Row r = tokens[sorted_indices[r]]; padding rows (-1) are zero."""
    out = tokens.index_select(0, sorted_indices.clamp(min=0))
    pad = sorted_indices < 0
    return out.masked_fill_(pad.unsqueeze(1), 0) if bool(pad.any()) else out


def _rows_from_inverse(inverse: Tensor, topk: int, rows: int) -> Tensor:
    """torch_npu's inverse index (top-k slot -> row) to Megatron's sorted_indices (row -> token)."""
    sorted_indices = torch.empty((rows,), dtype=torch.int64, device=inverse.device)
    slots = torch.arange(inverse.numel(), device=inverse.device)
    sorted_indices[inverse.to(torch.int64)] = slots // topk
    return sorted_indices


def _map_layout(routing_map: Tensor, probs: Optional[Tensor], align_size: int, tokens: Tensor):
    """Megatron's dropless layout: rows by expert, then token, each expert's rows padded with -1
    up to a multiple of ``align_size`` (the padded rows of ``tokens`` must fit the device).
    (sorted_indices, permuted_probs or None, row_counts)."""
    t, e = routing_map.shape
    counts = routing_map.sum(dim=0)
    tokens_of = torch.arange(t, device=routing_map.device).expand(e, t).masked_select(routing_map.t())
    pp = None if probs is None else probs.t().masked_select(routing_map.t())
    if align_size <= 1:
        return tokens_of, pp, counts
    padded = (counts + align_size - 1) // align_size * align_size
    n = tokens_of.numel()
    experts = _experts_of_rows(counts)
    rank = torch.arange(n, device=routing_map.device) - (counts.cumsum(0) - counts)[experts]
    row = (padded.cumsum(0) - padded)[experts] + rank
    total = int(padded.sum())
    _args.padded_rows_fit(total, _args.permuted_row_bytes(tokens, probs), align_size, tokens.device)
    sorted_indices = torch.full((total,), -1, dtype=torch.int64, device=routing_map.device)
    sorted_indices[row] = tokens_of
    pp_padded = None
    if pp is not None:
        pp_padded = torch.zeros((total,), dtype=pp.dtype, device=pp.device)
        pp_padded[row] = pp
    return sorted_indices, pp_padded, padded


def _uniform_topk(per_token: Tensor) -> Optional[int]:
    """k when every token has exactly k > 0 experts (one small read), else None."""
    if per_token.numel() == 0:
        return None
    lo, hi = (int(v) for v in torch.aminmax(per_token))
    return lo if lo == hi and lo > 0 else None


def _fused_permute_map(tokens, routing_map, probs, k):
    op = _fused("npu_moe_token_permute_with_routing_map")
    t = tokens.shape[0]
    out, pp, inverse = op(tokens, routing_map, probs=probs, num_out_tokens=t * k, drop_and_pad=False)
    return out, pp, _rows_from_inverse(inverse, k, t * k)


def permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad, align_size):
    t, e = routing_map.shape
    _device.check_token_rows(tokens, t)
    if drop_and_pad:
        # Megatron's capacity layout: each expert's first `capacity` tokens, routed ones first.
        capacity = num_out_tokens // e
        order = torch.sort(routing_map.t().to(torch.int8), dim=-1, descending=True, stable=True).indices
        sorted_indices = order[:, :capacity].contiguous().view(-1)
        pp = None
        if probs is not None:
            pp = probs.t().gather(1, sorted_indices.view(e, capacity)).reshape(-1)
        row_counts = torch.full((e,), capacity, dtype=torch.int64, device=tokens.device)
        out = tokens.index_select(0, sorted_indices)
    else:
        k = None
        if align_size <= 1 and _fused("npu_moe_token_permute_with_routing_map") is not None:
            k = _uniform_topk(routing_map.sum(dim=1))
        if k is not None:
            out, pp, sorted_indices = _fused_permute_map(tokens, routing_map, probs, k)
            row_counts = routing_map.sum(dim=0)
        else:
            sorted_indices, pp, row_counts = _map_layout(routing_map, probs, align_size, tokens)
            out = _gather(tokens, sorted_indices)
        rows = sorted_indices.numel()
        if num_out_tokens >= 0 and align_size <= 1 and num_out_tokens != rows:
            raise ValueError(
                f"num_out_tokens: routing_map routes {rows} token copies, but num_out_tokens={num_out_tokens}"
            )
    if pp is None:
        pp = torch.empty((0,), dtype=tokens.dtype if probs is None else probs.dtype, device=tokens.device)
    return out, pp, sorted_indices, row_counts


def permute_by_indices(tokens, indices, num_experts, probs, align_size):
    _device.check_index_shape(tokens, indices)
    t, k = indices.shape
    valid = indices >= 0
    if _checks(indices) and indices.numel():
        if bool((indices >= num_experts).any()) or bool((indices < -1).any()):
            raise ValueError(f"indices: expert ids must be in [0, {num_experts}) or -1 (dropped)")
    # The same layout as the map form: one routed (token, expert) pair per valid slot.
    routing_map = torch.zeros((t, num_experts), dtype=torch.bool, device=indices.device)
    routing_map[torch.arange(t, device=indices.device).unsqueeze(1).expand(t, k)[valid], indices[valid]] = True
    if _checks(indices) and int(routing_map.sum()) != int(valid.sum()):
        raise ValueError("indices: a token lists the same expert twice")
    dense_probs = None
    if probs is not None:
        dense_probs = torch.zeros((t, num_experts), dtype=probs.dtype, device=probs.device)
        dense_probs[torch.arange(t, device=indices.device).unsqueeze(1).expand(t, k)[valid], indices[valid]] = probs[valid]
    fused = _fused("npu_moe_token_permute")
    if fused is not None and align_size <= 1 and t and bool(valid.all()) and probs is None:
        out, inverse = fused(tokens, indices, num_out_tokens=t * k)
        sorted_indices = _rows_from_inverse(inverse, k, t * k)
        pp = torch.empty((0,), dtype=tokens.dtype, device=tokens.device)
        return out, pp, sorted_indices, routing_map.sum(dim=0)
    sorted_indices, pp, row_counts = _map_layout(routing_map, dense_probs, align_size, tokens)
    out = _gather(tokens, sorted_indices)
    if pp is None:
        pp = torch.empty((0,), dtype=tokens.dtype, device=tokens.device)
    return out, pp, sorted_indices, row_counts


def _token_rows(sorted_indices: Tensor, num_tokens: int):
    """[num_tokens, max rows per token] of row ids in ascending order, -1 where a token has fewer."""
    valid = sorted_indices >= 0
    rows = torch.nonzero(valid).squeeze(1)
    tok = sorted_indices[rows]
    order = torch.sort(tok, stable=True).indices  # by token, then ascending row
    rows, tok = rows[order], tok[order]
    counts = torch.bincount(tok, minlength=num_tokens)
    width = int(counts.max()) if counts.numel() and rows.numel() else 0
    slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[tok]
    table = torch.full((num_tokens, width), -1, dtype=torch.int64, device=rows.device)
    table[tok, slot] = rows
    return table


def unpermute(permuted_tokens, sorted_indices, num_tokens, row_weights):
    _device._check_rows(sorted_indices, num_tokens)
    x = permuted_tokens
    acc = acc_dtype(x.dtype)
    table = _token_rows(sorted_indices, num_tokens)
    total = torch.zeros((num_tokens, x.shape[1]), dtype=acc, device=x.device)
    w = None if row_weights is None else row_weights.to(acc)
    # One row of every token per step, in ascending row order: the CPU kernel's order of sums.
    for j in range(table.shape[1]):
        r = table[:, j]
        has = (r >= 0).unsqueeze(1)
        rr = r.clamp(min=0)
        term = x.index_select(0, rr).to(acc)
        if w is not None:
            term = term * w.index_select(0, rr).unsqueeze(1)
        total = torch.where(has, total + term, total)
    return total.to(x.dtype)


def unpermute_backward(grad_out, permuted_tokens, sorted_indices, row_weights):
    acc = acc_dtype(grad_out.dtype)
    valid = (sorted_indices >= 0).unsqueeze(1)
    g = grad_out.index_select(0, sorted_indices.clamp(min=0)).to(acc)
    if row_weights is not None:
        grad_x = g * row_weights.to(acc).unsqueeze(1)
    else:
        grad_x = g
    grad_x = torch.where(valid, grad_x, torch.zeros((), dtype=acc, device=g.device)).to(grad_out.dtype)
    if permuted_tokens is None:
        return grad_x, torch.empty((0,), dtype=acc, device=grad_out.device)
    grad_w = (g * permuted_tokens.to(acc)).sum(dim=1).masked_fill(~valid.squeeze(1), 0)
    return grad_x, grad_w


def row_weights(probs, sorted_indices, row_counts, acc):
    n = sorted_indices.shape[0]
    if _checks(row_counts) and int(row_counts.sum()) != n:
        raise ValueError(f"routing_map: routes {int(row_counts.sum())} token copies, but there are {n} rows")
    experts = _experts_of_rows(row_counts)
    w = probs[sorted_indices.clamp(min=0), experts].to(acc)
    return w.masked_fill(sorted_indices < 0, 0)


def scatter_rows(values, sorted_indices, row_counts, num_tokens, num_experts):
    out = torch.zeros((num_tokens, num_experts), dtype=values.dtype, device=values.device)
    experts = _experts_of_rows(row_counts)
    valid = sorted_indices >= 0
    out[sorted_indices[valid], experts[valid]] = values[valid]
    return out


def sort_chunks(input, split_sizes, sorted_idxs):
    sizes = [int(s) for s in split_sizes.tolist()]
    order = [int(i) for i in sorted_idxs.tolist()]
    if len(order) != len(sizes):
        raise ValueError(f"sorted_idxs: expected the shape of split_sizes [{len(sizes)}], got [{len(order)}]")
    if sum(sizes) != input.shape[0] or any(s < 0 for s in sizes):
        raise ValueError(f"split_sizes: expected non-negative sizes summing to {input.shape[0]} rows")
    if sorted(order) != list(range(len(sizes))):
        raise ValueError(f"sorted_idxs: expected a permutation of 0..{len(sizes) - 1}")
    chunks = torch.split(input, sizes)
    if not chunks:
        return torch.empty_like(input, memory_format=torch.contiguous_format)
    return torch.cat([chunks[i] for i in order]).contiguous()


def status() -> dict:
    """What ``moerail doctor`` reports for NPU tensors."""
    mod = torch_npu()
    fused = [n for n in ("npu_moe_token_permute_with_routing_map", "npu_moe_token_permute") if _fused(n) is not None]
    return {
        "torch_npu": None if mod is None else getattr(mod, "__version__", "?"),
        "fused": fused,
    }



if os.environ.get("MOERAIL_NPU_PATH_ON_CPU"):  # pragma: no cover - a debugging switch
    use_for_cpu(True)
