"""Token permutation for expert dispatch: ``permute``, ``unpermute`` and
``sort_chunks_by_idxs`` with Megatron-Core's semantics and argument names.

``permute`` output is expert-major and, inside one expert, in ascending token order: the rows
Megatron's ``moe_utils.permute`` produces, bit for bit. ``unpermute`` sums a token's copies in
fp32 (fp64 for fp64), in ascending expert order, and rounds once — deterministic for any
thread count.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _checks
from . import custom_ops as _ops

__all__ = ["permute", "permute_by_indices", "unpermute", "sort_chunks_by_idxs"]

PermuteResult = Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor], torch.Tensor]


def _tokens(tokens) -> torch.Tensor:
    tokens = _checks.tensor(tokens, "tokens", ndim=2, shape_doc="[num_tokens, hidden]")
    if tokens.dtype == torch.bool or tokens.element_size() not in (1, 2, 4, 8):
        raise TypeError(f"tokens: unsupported dtype {tokens.dtype}")
    return tokens


def _align_size(align_size, num_tokens: int, num_experts: int, row_bytes: int) -> int:
    """``align_size`` checked so that every expert's padded row count, their sum and the bytes of
    that many rows fit int64 (at most ``num_tokens + align_size - 1`` rows per expert)."""
    align_size = _checks.integer(align_size, "align_size", minimum=0)
    if align_size > 1 and num_experts * (num_tokens + align_size) * max(row_bytes, 8) >= 2**63:
        raise ValueError(
            f"align_size: {align_size} is too large: padding {num_experts} experts' rows to a multiple of it "
            "overflows int64 row or byte counts"
        )
    return align_size


def _pad_offsets(row_counts: torch.Tensor, counts: torch.Tensor) -> Optional[torch.Tensor]:
    pads = row_counts - counts
    if not bool(pads.any()):
        return None
    return torch.cumsum(pads, 0) - pads


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    num_out_tokens: Optional[Union[int, torch.Tensor]] = None,
    drop_and_pad: bool = False,
    align_size: int = 0,
    tokens_per_expert: Optional[torch.Tensor] = None,
) -> PermuteResult:
    """Group token copies by expert: Megatron's ``permute`` (0.17+ return convention).

    Row ``r`` of the output is ``tokens[sorted_indices[r]]``; rows are expert-major and ascending
    in token order within an expert. ``permuted_probs[r] = probs[sorted_indices[r], expert(r)]``.

    * ``drop_and_pad``: each expert takes ``capacity = num_out_tokens // num_experts`` rows —
      its routed tokens, then (if fewer) the earliest tokens not routed to it, as Megatron does.
    * ``align_size > 0``: each expert's rows are padded with zero rows (``sorted_indices == -1``)
      up to a multiple of ``align_size`` (FP8/FP4 GEMMs); ``pad_offsets[e]`` is the padding
      before expert ``e``'s rows (``None`` when nothing was padded).

    Returns ``(permuted_tokens, permuted_probs, sorted_indices, pad_offsets, tokens_per_expert)``
    where ``tokens_per_expert`` counts each expert's rows (padded when aligned). Megatron 0.16's
    3-tuple is the first three. Differentiable with respect to ``tokens`` and ``probs``.
    """
    tokens = _tokens(tokens)
    routing_map = _checks.routing_map(routing_map)
    _checks.same_rows(tokens, "tokens", routing_map, "routing_map")
    if probs is not None:
        probs = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES)
        if probs.shape != routing_map.shape:
            raise ValueError(f"probs: expected shape {tuple(routing_map.shape)} (the shape of routing_map), got {tuple(probs.shape)}")
    num_tokens, num_experts = routing_map.shape
    if num_experts < 1:
        raise ValueError("routing_map: expected at least one expert column")
    align_size = _align_size(align_size, num_tokens, num_experts, tokens.shape[1] * tokens.element_size())
    n_out = -1
    if num_out_tokens is not None:
        n_out = _checks.integer(num_out_tokens, "num_out_tokens", minimum=0, maximum=num_tokens * num_experts)
    if drop_and_pad and num_out_tokens is not None:
        if align_size > 1:
            raise ValueError("align_size: cannot be combined with drop_and_pad (capacity already fixes the rows)")
        if n_out % num_experts != 0:
            raise ValueError(f"num_out_tokens: with drop_and_pad must be capacity * num_experts, got {n_out} for {num_experts} experts")
        if n_out // num_experts > num_tokens:
            raise ValueError(f"num_out_tokens: capacity {n_out // num_experts} exceeds num_tokens={num_tokens}")
    else:
        drop_and_pad = False  # Megatron: drop_and_pad without num_out_tokens is the dropless path.
    if tokens_per_expert is not None:
        tokens_per_expert = _counts_arg(tokens_per_expert, num_experts)
    if n_out >= 0 and align_size > 1 and not drop_and_pad:
        # num_out_tokens counts the routed copies before padding (Megatron's), on every backend;
        # the aligned row count is read back anyway, so this costs no extra synchronisation.
        routed = int(routing_map.sum())
        if routed != n_out:
            raise ValueError(f"num_out_tokens: routing_map routes {routed} token copies, but num_out_tokens={n_out}")
    out, pp, sorted_indices, row_counts = _ops.permute(
        tokens, routing_map, probs, n_out, bool(drop_and_pad), align_size
    )
    pad_offsets = None
    if align_size > 1:
        counts = routing_map.sum(dim=0)
        if tokens_per_expert is not None and not torch.equal(
            tokens_per_expert.to(device=counts.device, dtype=torch.int64), counts.to(torch.int64)
        ):
            # Counts that disagree with the map would give negative pad offsets.
            raise ValueError(
                f"tokens_per_expert: {tokens_per_expert.tolist()} disagrees with routing_map, which routes "
                f"{counts.tolist()} tokens to each expert"
            )
        pad_offsets = _pad_offsets(row_counts, counts)
    return out, (pp if probs is not None else None), sorted_indices, pad_offsets, row_counts


def _counts_arg(tokens_per_expert, num_experts: int) -> torch.Tensor:
    t = _checks.tensor(tokens_per_expert, "tokens_per_expert", ndim=1)
    if t.shape[0] != num_experts:
        raise ValueError(f"tokens_per_expert: expected {num_experts} entries, got {t.shape[0]}")
    return t


def permute_by_indices(
    tokens: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    probs: Optional[torch.Tensor] = None,
    align_size: int = 0,
) -> PermuteResult:
    """The index form of :func:`permute`, from top-k expert ids ``indices [T, k]`` (``-1`` marks a
    dropped slot) and their ``probs [T, k]``. Same rows, same return values."""
    tokens = _tokens(tokens)
    indices = _checks.tensor(indices, "indices", ndim=2, dtypes=_checks.INT_DTYPES, shape_doc="[num_tokens, topk]")
    _checks.same_rows(tokens, "tokens", indices, "indices")
    num_experts = _checks.integer(num_experts, "num_experts", minimum=1, maximum=1 << 24)
    if probs is not None:
        probs = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES)
        if probs.shape != indices.shape:
            raise ValueError(f"probs: expected shape {tuple(indices.shape)} (the shape of indices), got {tuple(probs.shape)}")
    align_size = _align_size(align_size, indices.shape[0] * indices.shape[1], num_experts,
                             tokens.shape[1] * tokens.element_size())
    out, pp, sorted_indices, row_counts = _ops.permute_by_indices(
        tokens, indices.to(torch.int64), num_experts, probs, align_size
    )
    pad_offsets = None
    if align_size > 1:
        counts = torch.bincount(indices[indices >= 0].to(torch.int64), minlength=num_experts)
        pad_offsets = _pad_offsets(row_counts, counts)
    return out, (pp if probs is not None else None), sorted_indices, pad_offsets, row_counts


def _restore_shape(restore_shape, hidden: int) -> int:
    if isinstance(restore_shape, torch.Tensor) or not isinstance(restore_shape, (tuple, list, torch.Size)):
        raise TypeError(f"restore_shape: expected (num_tokens, hidden), got {type(restore_shape).__name__}")
    if len(restore_shape) != 2:
        raise ValueError(f"restore_shape: expected (num_tokens, hidden), got {tuple(restore_shape)}")
    num_tokens = _checks.integer(restore_shape[0], "restore_shape[0]", minimum=0)
    h = _checks.integer(restore_shape[1], "restore_shape[1]", minimum=0)
    if h != hidden:
        raise ValueError(f"restore_shape: hidden size {h} does not match permuted_tokens ({hidden})")
    if num_tokens * max(hidden, 1) >= 2**62:
        raise ValueError(f"restore_shape: {tuple(restore_shape)} is too large")
    return num_tokens


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape: Sequence[int],
    probs: Optional[torch.Tensor] = None,
    routing_map: Optional[torch.Tensor] = None,
    drop_and_pad: bool = False,
    pad_offsets: Optional[torch.Tensor] = None,
    permuted_probs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Combine: Megatron's ``unpermute``.

    ``out[t] = sum over the rows r with sorted_indices[r] == t of permuted_tokens[r] * w[r]``,
    summed in ascending row (= expert) order in fp32 (fp64 for fp64) and rounded once. The
    weights ``w[r] = probs[t, expert(r)]`` come from ``probs [T, E]`` (which needs
    ``routing_map``), or directly from ``permuted_probs [N]``; without either, ``w = 1``.
    Rows with ``sorted_indices == -1`` (alignment padding) are skipped. Differentiable with
    respect to ``permuted_tokens`` and the probs.
    """
    x = _checks.tensor(permuted_tokens, "permuted_tokens", ndim=2, dtypes=_checks.FLOAT_DTYPES, shape_doc="[num_rows, hidden]")
    sorted_indices = _checks.tensor(sorted_indices, "sorted_indices", ndim=1, dtypes=_checks.INT_DTYPES)
    if sorted_indices.shape[0] != x.shape[0]:
        raise ValueError(f"sorted_indices: expected {x.shape[0]} entries (the rows of permuted_tokens), got {sorted_indices.shape[0]}")
    sorted_indices = sorted_indices.to(torch.int64)
    num_tokens = _restore_shape(restore_shape, x.shape[1])
    weights = None
    if probs is not None and permuted_probs is not None:
        raise ValueError("permuted_probs: give either probs [T, E] or permuted_probs [N], not both")
    if probs is not None:
        probs = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES, shape_doc="[num_tokens, num_experts]")
        if routing_map is None:
            raise ValueError("routing_map: is required to unpermute with probs (it locates each row's expert)")
        routing_map = _checks.routing_map(routing_map)
        if probs.shape != routing_map.shape or probs.shape[0] != num_tokens:
            raise ValueError(
                f"probs: expected shape {(num_tokens, routing_map.shape[1])} (restore_shape rows x experts), "
                f"got {tuple(probs.shape)} with routing_map {tuple(routing_map.shape)}"
            )
        row_counts = _row_counts(routing_map, sorted_indices.shape[0], drop_and_pad, pad_offsets)
        weights = _ops.row_weights(probs, sorted_indices, row_counts, _ops.acc_dtype(x.dtype))
    elif permuted_probs is not None:
        permuted_probs = _checks.tensor(permuted_probs, "permuted_probs", ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if permuted_probs.shape[0] != x.shape[0]:
            raise ValueError(f"permuted_probs: expected {x.shape[0]} entries, got {permuted_probs.shape[0]}")
        weights = permuted_probs
    return _ops.unpermute(x, sorted_indices, num_tokens, weights)


def _row_counts(routing_map: torch.Tensor, num_rows: int, drop_and_pad: bool, pad_offsets) -> torch.Tensor:
    num_experts = routing_map.shape[1]
    if drop_and_pad:
        if num_rows % num_experts:
            raise ValueError(f"sorted_indices: {num_rows} rows are not capacity * num_experts ({num_experts})")
        return torch.full((num_experts,), num_rows // num_experts, dtype=torch.int64, device=routing_map.device)
    counts = routing_map.sum(dim=0).to(torch.int64)
    if pad_offsets is None:
        return counts
    pad_offsets = _checks.tensor(pad_offsets, "pad_offsets", ndim=1, dtypes=_checks.INT_DTYPES)
    if pad_offsets.shape[0] != num_experts:
        raise ValueError(f"pad_offsets: expected {num_experts} entries, got {pad_offsets.shape[0]}")
    pad_offsets = pad_offsets.to(routing_map.device)
    tail = torch.tensor([num_rows - int(counts.sum())], device=routing_map.device)
    ends = torch.cat([pad_offsets[1:].to(torch.int64), tail])
    pads = ends - pad_offsets.to(torch.int64)
    if bool((pads < 0).any()):
        raise ValueError("pad_offsets: must be non-decreasing and consistent with the number of rows")
    return counts + pads


def sort_chunks_by_idxs(
    input: torch.Tensor,
    split_sizes: Union[torch.Tensor, Sequence[int]],
    sorted_idxs: Union[torch.Tensor, Sequence[int]],
    probs: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Megatron's ``sort_chunks_by_idxs``: split ``input`` (and ``probs``) along rows into chunks
    of ``split_sizes`` and concatenate them in the order ``sorted_idxs`` (a permutation of the
    chunks). Pure data movement; differentiable (the backward applies the inverse order)."""
    input = _checks.tensor(input, "input")
    if input.dim() < 1:
        raise ValueError("input: expected at least one dimension")
    split_sizes = _index_list(split_sizes, "split_sizes", input.device)
    sorted_idxs = _index_list(sorted_idxs, "sorted_idxs", input.device)
    out = _ops.sort_chunks(input, split_sizes, sorted_idxs)
    permuted_probs = None
    if probs is not None:
        probs = _checks.tensor(probs, "probs")
        if probs.dim() < 1:
            raise ValueError("probs: expected at least one dimension (its rows are split like input's)")
        _checks.same_rows(input, "input", probs, "probs")
        permuted_probs = _ops.sort_chunks(probs, split_sizes, sorted_idxs)
    return out, permuted_probs


def _index_list(v, name: str, device: torch.device) -> torch.Tensor:
    """Chunk sizes / order as int64 on the input's device (CUDA kernels read them there)."""
    if isinstance(v, torch.Tensor):
        _checks.tensor(v, name, ndim=1, dtypes=_checks.INT_DTYPES)
        return v.detach().to(device=device, dtype=torch.int64).contiguous()
    try:
        return torch.tensor([_checks.integer(x, name) for x in v], dtype=torch.int64, device=device)
    except TypeError:
        raise TypeError(f"{name}: expected a 1-D integer tensor or a list of ints") from None
