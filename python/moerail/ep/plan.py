"""The expert-parallel token exchange: ``plan_all_to_all`` and ``AllToAllDispatcher``.

Expert parallelism moves every routed token to the ranks holding its experts and the expert
outputs back. The EP group has ``W`` ranks, ``ranks_per_node`` to a node (rank ``r`` on node
``r // ranks_per_node``); each rank holds ``L`` expert *slots* (slot ``s`` on rank ``s // L``),
filled by a placement ``phy2log [W * L]`` (slot -> expert; replicas allowed). Each (token,
expert) pair picks one replica of its expert (:func:`moerail.select_replicas`: deterministic,
even), so tokens address slots.

Strategies (the planner in ``moerail-core/src/a2a`` has the exact per-stage row matrices):

1. ``flat``: one all-to-all-v, one row per (token, slot) copy. Its splits are Megatron-Core's
   ``MoEAlltoAllTokenDispatcher`` numbers (``input_splits``, ``output_splits``,
   ``num_global_tokens_per_local_expert``).
2. ``2dh`` (Tutel): copies regroup inside the node by the destination's local rank, then cross
   the network between ranks of the same local rank: the same inter-node bytes in fewer, larger
   messages.
3. ``dedup`` (DeepEP's two hops): a token crosses the network once per destination *node*, to
   the rank of its own local rank there, which forwards it once per destination rank inside the
   node; the combine sums a rank's copies, then a node's partial sums, before the trip back.
4. ``allgather`` (MindSpeed's hierarchical all-to-all-v): every token goes to every node, each
   node keeps what its slots need and forwards it inside the node as ``dedup`` does.

Rows travel packed, ``[rows, row_bytes]`` uint8, in the planner's row format (hidden state, then
fp32 routing weights, then int32 slot ids for the token strategies), so the bytes the planner
reports are the bytes sent. The cost model is alpha-beta per stage:
``t_stage = max over ranks of sum over its messages (latency + bytes / bandwidth)`` with the
link class (inside a node, between nodes) of each message; ``auto`` takes the cheapest plan.

Every strategy returns the same rows in the same order (grouped by local slot, then source
rank, then token: Megatron's order), so its outputs are the same as ``flat``'s; sums (combine,
gradients) accumulate in fp32 in a fixed order and round once per hop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _checks, _native
from ..balance import LinkModel, log2phy_from_phy2log, select_replicas

__all__ = ["STRATEGIES", "AllToAllPlan", "plan_all_to_all"]

STRATEGIES = ("flat", "2dh", "dedup", "allgather")


def _links(link: Optional[LinkModel]) -> _native.ep.Links:
    """The link model as the planner takes it, checked once (in Rust)."""
    lk = link if link is not None else LinkModel()
    inter_lat = lk.latency if lk.inter_node_latency is None else lk.inter_node_latency
    return _native.ep.Links(float(lk.intra_node_bw), float(lk.inter_node_bw), float(lk.node_bw), float(lk.latency),
                         float(inter_lat), float(lk.local_bw), float(lk.stage_overhead))


def _strategies(strategy: str) -> List[_native.ep.Strategy]:
    """The candidate strategies of a ``strategy`` argument, parsed once (in Rust)."""
    if not isinstance(strategy, str):
        raise ValueError(f"strategy: expected 'auto', 'flat', '2dh', 'dedup' or 'allgather', got {strategy!r}")
    return _native.ep.Strategy.candidates(strategy)


@dataclass
class AllToAllPlan:
    """Plans of one exchange for every candidate strategy, and the chosen one.

    ``stages[s]`` lists strategy ``s``'s stages in dispatch order as ``(name, rows [W, W])``
    (rows source rank -> destination rank; the diagonal is a local copy); ``traffic[s][pass]``
    the exact bytes and estimated seconds of each of the four passes (``dispatch``,
    ``dispatch_backward``, ``combine``, ``combine_backward``): ``inter_node_bytes``,
    ``intra_node_bytes``, ``inter_node_rows`` (token copies crossing node boundaries),
    ``messages``, ``row_bytes``, ``stage_seconds``, ``seconds``."""

    strategy: str
    estimates: Dict[str, float]
    stages: Dict[str, List[Tuple[str, torch.Tensor]]]
    traffic: Dict[str, Dict[str, dict]]
    slot_counts: torch.Tensor  # [W, R] copies per (source rank, slot)
    rank_tokens: torch.Tensor  # [W, W] tokens per (source rank, destination rank)
    node_tokens: torch.Tensor  # [W, N] tokens per (source rank, destination node)
    ranks_per_node: int
    entries: int

    def __repr__(self) -> str:
        t = self.traffic[self.strategy]["dispatch"]
        est = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in self.estimates.items())
        return (
            f"AllToAllPlan(strategy={self.strategy!r}, ranks={self.num_ranks}, ranks_per_node={self.ranks_per_node}, "
            f"inter_node_bytes={int(t['inter_node_bytes'])}, intra_node_bytes={int(t['intra_node_bytes'])}, "
            f"estimates={{{est}}})"
        )

    @property
    def inter_node_copies(self) -> int:
        """Rows of the chosen dispatch that cross a node boundary."""
        return int(self.traffic[self.strategy]["dispatch"]["inter_node_rows"])

    @property
    def estimated_seconds(self) -> float:
        """Estimated dispatch + combine seconds of the chosen strategy."""
        return float(self.estimates[self.strategy])

    def megatron_splits(self, rank: int) -> Tuple[List[int], List[int], torch.Tensor]:
        """``flat``'s splits on ``rank`` as Megatron's MoEAlltoAllTokenDispatcher has them:
        ``(input_splits [W], output_splits [W], num_global_tokens_per_local_expert [W, L])``."""
        rows = self.stages["flat"][0][1] if "flat" in self.stages else _copies(self.slot_counts, self.num_ranks)
        w = self.num_ranks
        local = self.slot_counts.shape[1] // w
        return (
            rows[rank].tolist(),
            rows[:, rank].tolist(),
            self.slot_counts[:, rank * local : (rank + 1) * local].clone(),
        )

    @property
    def num_ranks(self) -> int:
        return int(self.slot_counts.shape[0])

    def summary(self) -> Dict[str, object]:
        t = self.traffic[self.strategy]["dispatch"]
        return {
            "strategy": self.strategy,
            "estimated_seconds": self.estimated_seconds,
            "estimates": dict(self.estimates),
            "inter_node_bytes": int(t["inter_node_bytes"]),
            "intra_node_bytes": int(t["intra_node_bytes"]),
            "inter_node_copies": int(t["inter_node_rows"]),
        }


def _copies(slot_counts: torch.Tensor, w: int) -> torch.Tensor:
    return slot_counts.view(w, w, -1).sum(-1)


def _make_plan(gathered: torch.Tensor, w: int, rpn: int, local: int, strategy: str, hidden: int,
               hidden_elem: int, probs_grad: bool, link: Optional[LinkModel]) -> AllToAllPlan:
    out = _native.ep.a2a_plan(gathered.contiguous(), w, rpn, local, _strategies(strategy), hidden, hidden_elem, 4,
                           probs_grad, _links(link))
    return _plan_from(out, gathered, w, rpn, local)


def _plan_from(out: dict, gathered: torch.Tensor, w: int, rpn: int, local: int) -> AllToAllPlan:
    """The :class:`AllToAllPlan` of the planner's result ``out`` for the gathered counts."""
    stages, traffic, est = {}, {}, {}
    for p in out["plans"]:
        s = p["strategy"]
        est[s] = p["seconds"]
        stages[s] = [(name, torch.frombuffer(bytearray(rows), dtype=torch.int64).view(w, w)) for name, rows in p["stages"]]
        traffic[s] = p["passes"]
    v = gathered.view(w, -1)
    r = w * local
    return AllToAllPlan(
        strategy=out["plans"][out["best"]]["strategy"],
        estimates=est,
        stages=stages,
        traffic=traffic,
        slot_counts=v[:, 4 : 4 + r].clone(),
        rank_tokens=v[:, 4 + r : 4 + r + w].clone(),
        node_tokens=v[:, 4 + r + w :].clone(),
        ranks_per_node=rpn,
        entries=int(out["entries"]),
    )


def _placement_tables(placement, num_experts: int, w: int):
    """``(phy2log [R], log2phy [E, X], logcnt [E])`` of a one-layer placement (None: expert e in
    slot e)."""
    if placement is None:
        p = torch.arange(num_experts, dtype=torch.int64)
    else:
        p = _checks.tensor(torch.as_tensor(placement), "placement", ndim=1, dtypes=_checks.INT_DTYPES,
                           shape_doc="[num_slots] (slot -> expert, one layer)")
        p = p.detach().to("cpu", torch.int64).contiguous()
    if p.numel() == 0 or p.numel() % w:
        raise ValueError(f"placement: expected a number of slots that is a positive multiple of the EP size {w}, "
                         f"got {p.numel()}")
    log2phy, logcnt = log2phy_from_phy2log(p.view(1, -1), num_experts)
    return p, log2phy[0].contiguous(), logcnt[0].contiguous()


def _compact(routing_map: torch.Tensor) -> torch.Tensor:
    """``[T, K]`` ascending expert ids of each row of the host ``routing_map``, then -1s (``K``
    the fullest row)."""
    routing_map = routing_map.contiguous()
    out = torch.empty(routing_map.shape[0], _native.ep.a2a_max_row_count(routing_map), dtype=torch.int64)
    _native.ep.a2a_compact_routing_map(routing_map, out)
    return out


def plan_all_to_all(
    *,
    ranks_per_node: int,
    routing_maps: Optional[Sequence[torch.Tensor]] = None,
    tokens_per_expert: Optional[torch.Tensor] = None,
    num_tokens: Optional[Sequence[int]] = None,
    placement=None,
    hidden_size: int,
    dtype: torch.dtype = torch.bfloat16,
    strategy: str = "auto",
    link: Optional[LinkModel] = None,
    probs_grad: bool = True,
) -> AllToAllPlan:
    """Plans the exchange of an EP group of ``W`` ranks.

    Give either every rank's ``routing_maps [T_r, E]`` (exact token-level counts: what
    ``dedup`` sends depends on which tokens share a node), or ``tokens_per_expert [W, E]`` with
    ``num_tokens [W]`` (token-level counts estimated assuming independent expert choices).
    ``placement`` is ``phy2log [R]`` (slot -> expert, ``R`` a multiple of ``W``; default expert
    ``e`` in slot ``e``). Row bytes follow ``hidden_size`` and ``dtype``; ``link`` the link
    parameters (:class:`moerail.LinkModel`)."""
    rpn = _checks.integer(ranks_per_node, "ranks_per_node", minimum=1)
    hidden = _checks.integer(hidden_size, "hidden_size", minimum=1)
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    elem = torch.empty((), dtype=dtype).element_size()
    if (routing_maps is None) == (tokens_per_expert is None):
        raise ValueError("routing_maps / tokens_per_expert: give exactly one of them")
    if routing_maps is not None:
        if not isinstance(routing_maps, (list, tuple)) or not routing_maps:
            raise TypeError("routing_maps: expected a non-empty list of [num_tokens, num_experts] bool tensors")
        maps = [_checks.routing_map(m) for m in routing_maps]
        e = maps[0].shape[1]
        for i, m in enumerate(maps):
            if m.shape[1] != e:
                raise ValueError(f"routing_maps[{i}]: expected {e} experts, got {m.shape[1]}")
        w = len(maps)
    else:
        tpe = _checks.tensor(tokens_per_expert, "tokens_per_expert", ndim=2, dtypes=_checks.INT_DTYPES,
                             shape_doc="[num_ranks, num_experts]")
        w, e = tpe.shape
        if w < 1 or e < 1:
            raise ValueError(f"tokens_per_expert: expected at least one rank and one expert, got shape {tuple(tpe.shape)}")
        if num_tokens is None or len(num_tokens) != w:
            raise ValueError(f"num_tokens: expected {w} values (one per rank)")
    phy2log, log2phy, logcnt = _placement_tables(placement, e, w)
    r = phy2log.numel()
    local = r // w
    if w % rpn:
        raise ValueError(f"ranks_per_node: must divide the number of ranks ({w}), got {rpn}")
    v = 4 + r + w + w // rpn
    gathered = torch.zeros(w, v, dtype=torch.int64)
    if routing_maps is not None:
        for i, m in enumerate(maps):
            idx = _compact(m.detach().cpu())
            slots = select_replicas(idx, log2phy, logcnt, r, offset=i)
            _native.ep.a2a_counts(slots, w, rpn, local, 0, 0, gathered[i])
    else:
        tok = torch.tensor([_checks.integer(x, "num_tokens", minimum=0) for x in num_tokens], dtype=torch.int64)
        tpe = tpe.detach().to("cpu", torch.int64)
        if bool((tpe < 0).any()) or bool((tpe > tok[:, None]).any()):
            raise ValueError("tokens_per_expert: every count must be in [0, num_tokens of its rank]")
        slot_counts = _split_over_replicas(tpe, phy2log, logcnt)
        _native.ep.a2a_estimate_counts(slot_counts.contiguous(), tok, w, rpn, local, gathered)
    return _make_plan(gathered, w, rpn, local, strategy, hidden, elem, probs_grad, link)


def _split_over_replicas(tpe: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """Copies per (rank, slot) when expert ``e``'s ``n`` tokens of rank ``i`` spread as
    :func:`select_replicas` spreads them (offset ``i``): replica ``j`` gets
    ``n // c + ((j - i) mod c < n mod c)``."""
    w = tpe.shape[0]
    out = torch.zeros(w, phy2log.numel(), dtype=torch.int64)
    rank_of = torch.zeros_like(phy2log)
    seen: Dict[int, int] = {}
    for s, ex in enumerate(phy2log.tolist()):
        rank_of[s] = seen.get(ex, 0)
        seen[ex] = seen.get(ex, 0) + 1
    c = logcnt[phy2log]
    for i in range(w):
        n = tpe[i, phy2log]
        out[i] = n // c + (((rank_of - i) % c) < (n % c)).to(torch.int64)
    return out
