"""Expert replicas: which replica of its expert each token goes to (:func:`select_replicas`,
what the dispatcher calls) and keeping replicas identical (:func:`allreduce_replica_grads`)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import _checks, _native
from ._args import _int, _placement
from .migration import _dist

__all__ = ["allreduce_replica_grads", "select_replicas", "select_replicas_map"]


# ------------------------------------------------------------------------------------------------
# replica choice (what the dispatcher calls)
# ------------------------------------------------------------------------------------------------


def _as_tensor(v, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(v)
    except (RuntimeError, TypeError, ValueError, OverflowError):
        raise TypeError(f"{name}: expected an integer tensor, got {type(v).__name__}") from None


def _table(log2phy, logcnt) -> Tuple[torch.Tensor, torch.Tensor]:
    t = _checks.tensor(_as_tensor(log2phy, "log2phy"), "log2phy", ndim=2, dtypes=_checks.INT_DTYPES,
                       shape_doc="[num_experts, max_replicas] (one layer)")
    c = _checks.tensor(_as_tensor(logcnt, "logcnt"), "logcnt", ndim=1, dtypes=_checks.INT_DTYPES, shape_doc="[num_experts]")
    if c.shape[0] != t.shape[0]:
        raise ValueError(f"logcnt: expected {t.shape[0]} entries (the rows of log2phy), got {c.shape[0]}")
    return t.detach().to("cpu", torch.int64).contiguous(), c.detach().to("cpu", torch.int64).contiguous()


def select_replicas(indices, log2phy, logcnt, num_replicas: int, offset: int = 0) -> torch.Tensor:
    """Physical slot of each routed token (one layer): ``indices [T, k]`` logical expert ids ->
    ``[T, k]`` slots (-1 where the id is negative).

    The ``j``-th assignment to expert ``e`` (token order) goes to replica ``(j + offset) mod
    logcnt[e]``: deterministic, and each replica gets ``floor`` or ``ceil`` of ``n / logcnt[e]``
    of the expert's ``n`` tokens. Pass a different ``offset`` per source rank (its EP rank) so the
    remainders spread over the replicas."""
    idx = _checks.tensor(indices, "indices", ndim=2, dtypes=_checks.INT_DTYPES, shape_doc="[num_tokens, topk]")
    t, c = _table(log2phy, logcnt)
    num_replicas = _int(num_replicas, "num_replicas")
    offset = _int(offset, "offset", minimum=0)
    dev = idx.device
    idx_cpu = idx.detach().to("cpu", torch.int64).contiguous()
    out = torch.empty_like(idx_cpu)
    _native.balance.select_replicas(idx_cpu, t, c, num_replicas, offset, out)
    return out.to(dev)


def select_replicas_map(
    routing_map, log2phy, logcnt, num_replicas: int, probs=None, offset: int = 0
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dense form of :func:`select_replicas`: ``routing_map [T, E]`` (and ``probs [T, E]``) ->
    ``(map [T, R], probs [T, R] or None)`` over physical slots, for Megatron-style permute."""
    m = _checks.routing_map(routing_map)
    t, c = _table(log2phy, logcnt)
    num_replicas = _int(num_replicas, "num_replicas")
    offset = _int(offset, "offset", minimum=0)
    dev = m.device
    m_cpu = m.detach().to("cpu").contiguous()
    out_map = torch.empty(m.shape[0], num_replicas, dtype=torch.bool)
    if probs is None:
        _native.balance.select_replicas_map(m_cpu, t, c, num_replicas, offset, out_map)
        return out_map.to(dev), None
    p = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if p.shape != m.shape:
        raise ValueError(f"probs: expected shape {tuple(m.shape)} (the shape of routing_map), got {tuple(p.shape)}")
    p_cpu = p.detach().to("cpu").contiguous()
    out_probs = torch.empty(m.shape[0], num_replicas, dtype=p.dtype)
    _native.balance.select_replicas_map(m_cpu, t, c, num_replicas, offset, out_map, p_cpu, out_probs)
    return out_map.to(dev), out_probs.to(dev)


def allreduce_replica_grads(slot_params, phy2log, *, group=None) -> int:
    """Sums the gradients of the replicas of each expert across ``group`` (the EP group), so
    replicas that started identical stay identical after the optimizer step.

    ``slot_params[layer][local_slot]`` lists the parameters of this rank's expert in that slot
    (the same order on every rank); ``phy2log [L, R]`` (or ``[R]`` with one layer) is the current
    placement. Experts with one replica are left alone; a replicated expert's gradient becomes the
    sum over its replicas (a missing ``.grad`` counts as zeros). One all-reduce over a buffer of
    the replicated experts only. Returns the number of replicated (layer, expert) pairs."""
    dist = _dist()
    p = _placement(phy2log, "phy2log")
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    num_layers, num_replicas = p.shape
    if num_replicas % world:
        raise ValueError(f"phy2log: {num_replicas} slots do not split over {world} ranks")
    per = num_replicas // world
    if len(slot_params) != num_layers:
        raise ValueError(f"slot_params: expected {num_layers} layers, got {len(slot_params)}")
    rows: Dict[Tuple[int, int], int] = {}
    for layer in range(num_layers):
        counts = torch.bincount(p[layer])
        for e in torch.nonzero(counts >= 2).flatten().tolist():
            rows[(layer, e)] = len(rows)
    if not rows:
        return 0
    first = slot_params[0][0] if num_layers and len(slot_params[0]) else None
    if first is None or len(first) == 0:
        raise ValueError("slot_params: expected the parameters of every local slot")
    numel = sum(q.numel() for q in first)
    for layer in range(num_layers):
        if len(slot_params[layer]) != per:
            raise ValueError(f"slot_params: expected {per} slots in layer {layer}, got {len(slot_params[layer])}")
        for params in slot_params[layer]:
            if sum(q.numel() for q in params) != numel:
                raise ValueError("slot_params: every slot must hold the same parameter sizes")
    dtype = first[0].dtype
    acc = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    buf = torch.zeros(len(rows), numel, dtype=acc, device=first[0].device)
    mine = []
    for layer in range(num_layers):
        for s in range(per):
            e = int(p[layer, rank * per + s])
            r = rows.get((layer, e))
            if r is None:
                continue
            params = slot_params[layer][s]
            off = 0
            for q in params:
                if q.grad is not None:
                    buf[r, off : off + q.numel()] += q.grad.detach().reshape(-1).to(buf.dtype)
                off += q.numel()
            mine.append((r, params))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    with torch.no_grad():
        for r, params in mine:
            off = 0
            for q in params:
                g = buf[r, off : off + q.numel()].view(q.shape).to(q.dtype)
                if q.grad is None:
                    q.grad = g.clone()
                else:
                    q.grad.copy_(g)
                off += q.numel()
    return len(rows)
