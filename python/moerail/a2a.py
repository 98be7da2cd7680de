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

import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import _checks, _device, _native, ops
from .balance import LinkModel, log2phy_from_phy2log, select_replicas

__all__ = ["STRATEGIES", "AllToAllPlan", "plan_all_to_all", "AllToAllDispatcher", "DispatchHandle", "DispatchOutput"]

STRATEGIES = ("flat", "2dh", "dedup", "allgather")
_PASSES = ("dispatch", "dispatch_backward", "combine", "combine_backward")


def _links(link: Optional[LinkModel]) -> _native.Links:
    """The link model as the planner takes it, checked once (in Rust)."""
    lk = link if link is not None else LinkModel()
    inter_lat = lk.latency if lk.inter_node_latency is None else lk.inter_node_latency
    return _native.Links(float(lk.intra_node_bw), float(lk.inter_node_bw), float(lk.node_bw), float(lk.latency),
                         float(inter_lat), float(lk.local_bw), float(lk.stage_overhead))


def _strategies(strategy: str) -> List[_native.Strategy]:
    """The candidate strategies of a ``strategy`` argument, parsed once (in Rust)."""
    if not isinstance(strategy, str):
        raise ValueError(f"strategy: expected 'auto', 'flat', '2dh', 'dedup' or 'allgather', got {strategy!r}")
    return _native.Strategy.candidates(strategy)


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
    out = _native.a2a_plan(gathered.contiguous(), w, rpn, local, _strategies(strategy), hidden, hidden_elem, 4,
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
    out = torch.empty(routing_map.shape[0], _native.a2a_max_row_count(routing_map), dtype=torch.int64)
    _native.a2a_compact_routing_map(routing_map, out)
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
            _native.a2a_counts(slots, w, rpn, local, 0, 0, gathered[i])
    else:
        tok = torch.tensor([_checks.integer(x, "num_tokens", minimum=0) for x in num_tokens], dtype=torch.int64)
        tpe = tpe.detach().to("cpu", torch.int64)
        if bool((tpe < 0).any()) or bool((tpe > tok[:, None]).any()):
            raise ValueError("tokens_per_expert: every count must be in [0, num_tokens of its rank]")
        slot_counts = _split_over_replicas(tpe, phy2log, logcnt)
        _native.a2a_estimate_counts(slot_counts.contiguous(), tok, w, rpn, local, gathered)
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


# ------------------------------------------------------------------------------------------------
# execution
# ------------------------------------------------------------------------------------------------


def _pack(layout: dict, hidden: torch.Tensor, probs: Optional[torch.Tensor] = None,
          ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``[n, row_bytes]`` uint8 in the planner's row format."""
    n = hidden.shape[0]
    buf = torch.zeros(n, layout["row_bytes"], dtype=torch.uint8, device=hidden.device)
    hb = layout["hidden_bytes"]
    buf[:, :hb] = hidden.contiguous().view(torch.uint8).view(n, hb)
    if layout["num_probs"]:
        o, k = layout["probs_offset"], layout["num_probs"]
        buf[:, o : o + 4 * k] = probs.to(torch.float32).contiguous().view(torch.uint8).view(n, 4 * k)
    if layout["num_ids"]:
        o, k = layout["ids_offset"], layout["num_ids"]
        buf[:, o : o + 4 * k] = ids.to(torch.int32).contiguous().view(torch.uint8).view(n, 4 * k)
    return buf


def _unpack(layout: dict, buf: torch.Tensor, hidden: int, dtype: torch.dtype):
    n = buf.shape[0]
    hb = layout["hidden_bytes"]
    h = buf[:, :hb].contiguous().view(dtype).view(n, hidden)
    p = None
    if layout["num_probs"]:
        o, k = layout["probs_offset"], layout["num_probs"]
        p = buf[:, o : o + 4 * k].contiguous().view(torch.float32).view(n, k)
    return h, p


def _sum_rows(src: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """``out[t] = sum of src[i] over index[i] == t``, in ascending ``i``, accumulated in fp32
    (fp64 for fp64) and rounded once to ``src``'s dtype.

    It is moerail's unpermute kernel (CPU, CUDA or NPU, by where ``src`` is), not
    ``index_add_``: on a GPU ``index_add_`` adds with float atomics, in no fixed order. The
    indices are the dispatcher's own, so the device path skips its value checks (a host sync)."""
    with _device.trusted_indices():
        return ops.unpermute.kernel(src.contiguous(), index, rows, None)


def _int64(raw: bytes, device: torch.device) -> torch.Tensor:
    """A route's index array (native-endian int64 bytes) as a tensor on ``device``."""
    if not raw:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).to(device)


@dataclass
class _Hop:
    """One all-to-all: rows gathered by ``index`` from the previous buffer, sent with
    ``send[dst]`` rows to each rank, ``recv[src]`` received."""

    index: torch.Tensor
    send: List[int]
    recv: List[int]
    stage: str


class DispatchHandle:
    """What one :meth:`AllToAllDispatcher.dispatch` decided: the route of the exchange (built
    in Rust in one call from the plan and this rank's slots), its indices on the rows' device,
    and what the passes measured. :meth:`AllToAllDispatcher.combine` takes it, so nothing lives
    in the dispatcher between the two (DeepEP's ``handle``); the backward passes use it too."""

    def __init__(self, native: _native.Route, plan: AllToAllPlan, slots: torch.Tensor, hidden: int,
                 dtype: torch.dtype, device: torch.device):
        self.native = native
        self.plan = plan
        self.strategy: str = native.strategy.name
        self.copy_rows: bool = native.strategy.copy_rows
        self.num_tokens: int = native.num_tokens
        self.hidden = hidden
        self.dtype = dtype
        self.device = device  # where the token rows and the indices live
        self.slots = slots.to(device)  # [T, K] slot of each (token, entry), -1 empty
        self.hops: List[_Hop] = []
        for i in range(native.num_hops):
            stage, send, recv = native.hop(i)
            self.hops.append(_Hop(_int64(native.hop_index(i), device), send, recv, stage))
        self.out_rows = _int64(native.out_rows(), device)  # rows of the last buffer, in output order
        self.out_entries: Optional[torch.Tensor] = None  # token strategies: entry of each output row
        # copy strategies: t * K + j of each send row
        self.rows_entry = _int64(native.rows_entry(), device) if self.copy_rows else None
        self.tokens_per_local_expert = torch.tensor(native.tokens_per_local_expert, dtype=torch.int64)
        self.etp: Optional[tuple] = None  # expert TP: (rows per ETP rank, order, this ETP rank)
        self.stats: Dict[str, object] = {}

    def arrive(self, hop: int, buf: torch.Tensor, layout: dict) -> None:
        """``dedup`` / ``allgather``: reads the slot ids of the rows hop ``hop`` delivered;
        after hop 0 the forwarding index of hop 1 is known, after hop 1 the output order."""
        ids_offset, num_ids = layout["ids_offset"], layout["num_ids"]
        if buf.device.type != "cpu":
            # Only the slot-id columns come to the host (4 bytes an entry, not the hidden state).
            buf = buf[:, ids_offset : ids_offset + 4 * num_ids].cpu()
            ids_offset = 0
        self.native.arrive(hop, buf.contiguous(), ids_offset, num_ids)
        if hop == 0:
            self.hops[1].index = _int64(self.native.hop_index(1), self.device)
        else:
            self.out_rows = _int64(self.native.out_rows(), self.device)
            self.out_entries = _int64(self.native.out_entries(), self.device)

    @property
    def num_rows(self) -> int:
        """Rows the dispatch returned on this rank (before expert-TP gathering)."""
        return int(self.tokens_per_local_expert.sum())


class DispatchOutput(tuple):
    """``(tokens, tokens_per_local_expert, probs)`` of a dispatch; ``handle`` is what
    :meth:`AllToAllDispatcher.combine` takes back."""

    handle: DispatchHandle

    def __new__(cls, tokens, tokens_per_local_expert, probs, handle: DispatchHandle):
        out = super().__new__(cls, (tokens, tokens_per_local_expert, probs))
        out.handle = handle
        return out


class AllToAllDispatcher:
    """Expert-parallel dispatch and combine over ``ep_group`` with a planned strategy.

    ``dispatch(hidden [T, H], probs [T, E], routing_map [T, E])`` returns
    ``(tokens [N, H], tokens_per_local_expert [L] int64 CPU, probs [N] fp32)``: this rank's rows
    grouped by local expert slot, then source rank, then token (Megatron's order), with each
    row's routing weight; the experts multiply by it (Megatron's convention) and
    ``combine(expert_output [N, H])`` sums each token's rows back into ``[T, H]``. Both are
    differentiable (backward of dispatch is the reverse exchange). ``last_stats`` has the plan's
    and the measured numbers of the last exchange.

    ``placement``: ``phy2log [R]`` slot -> expert, ``R = W * L`` (replicas allowed; default
    expert ``e`` in slot ``e``). ``capacity_factor`` (with ``topk``) drops tokens as Megatron's
    router does (``moerail.apply_token_dropping``, ``drop_policy``, ``pad_to_capacity``).

    Devices: the tokens may live on the CPU, a CUDA GPU or an Ascend NPU (``ep_group`` then
    gloo, NCCL or HCCL). Their rows are packed, exchanged and summed where they are (the sums
    by moerail's unpermute kernel: fp32, fixed order, no atomics); the plan is made on the host
    from the routing map and the all-gathered counts, one small device-to-host read a dispatch
    (``dedup`` / ``allgather`` also read the slot-id columns of their first hop back, 4 bytes an
    entry). ``tokens_per_local_expert`` is a host tensor, as in Megatron.

    ``exchange`` says who moves the rows: ``"torch"``, ``torch.distributed.all_to_all_single``
    on ``ep_group``; ``"hccl"``, moerail's HCCL executor (:class:`moerail.ascend.HcclExchange`:
    ``HcclAlltoAllV`` with the plan's counts in elements, its own communicator over the ranks of
    ``ep_group``, built at the first exchange); ``"auto"`` (default), the HCCL executor for NPU
    tokens and torch.distributed otherwise; or any object with ``exchange(buf, send_rows,
    recv_rows) -> received rows``.

    The first collective of every dispatch all-gathers each rank's counts together with a status
    and a hash of its configuration: a rank whose arguments failed, or whose configuration
    (experts, slots, ``ranks_per_node``, strategy, hidden size, dtype, device type, exchange)
    differs, makes every rank raise the same error instead of hanging. Every wait has
    ``timeout``."""

    def __init__(
        self,
        num_experts: int,
        ep_group=None,
        *,
        ranks_per_node: int,
        strategy: str = "auto",
        placement=None,
        topk: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        drop_policy: str = "probs",
        pad_to_capacity: bool = False,
        num_chunks: int = 1,
        etp_group=None,
        link: Optional[LinkModel] = None,
        timeout: timedelta = timedelta(minutes=5),
        exchange="auto",
    ):
        self.num_experts = _checks.integer(num_experts, "num_experts", minimum=1)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ep_group: torch.distributed is not initialised (call init_process_group first)")
        self.ep_group = ep_group
        self.world = dist.get_world_size(ep_group)
        self.rank = dist.get_rank(ep_group)
        self.ranks_per_node = _checks.integer(ranks_per_node, "ranks_per_node", minimum=1)
        if self.world % self.ranks_per_node:
            raise ValueError(f"ranks_per_node: must divide the EP group size ({self.world}), got {ranks_per_node}")
        self.strategy = strategy
        self._candidates = _strategies(strategy)
        self.set_placement(placement)
        if capacity_factor is not None:
            if topk is None:
                raise ValueError("topk: needed with capacity_factor (the capacity is num_tokens * topk / num_experts)")
            self.topk = _checks.integer(topk, "topk", minimum=1)
            if not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
                raise ValueError(f"capacity_factor: expected a positive number, got {capacity_factor!r}")
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.pad_to_capacity = bool(pad_to_capacity)
        self.num_chunks = _checks.integer(num_chunks, "num_chunks", minimum=1)
        self.etp_group = etp_group
        self.etp_size = dist.get_world_size(etp_group) if etp_group is not None else 1
        if self.etp_size > 1 and self.num_chunks > 1:
            raise ValueError("num_chunks: chunked overlap is not combined with expert tensor parallelism "
                             "(etp_group of more than one rank); use num_chunks=1")
        self._overlap: Dict[str, float] = {}
        self.link = link
        self._links = _links(link)
        if not isinstance(timeout, timedelta):
            raise TypeError(f"timeout: expected a datetime.timedelta, got {type(timeout).__name__}")
        self.timeout = timeout
        if isinstance(exchange, str):
            if exchange not in ("auto", "torch", "hccl"):
                raise ValueError(f"exchange: expected 'auto', 'torch', 'hccl' or an object with an exchange(buf, "
                                 f"send_rows, recv_rows) method, got {exchange!r}")
        elif not callable(getattr(exchange, "exchange", None)):
            raise TypeError(f"exchange: expected 'auto', 'torch', 'hccl' or an object with an exchange(buf, "
                            f"send_rows, recv_rows) method, got {type(exchange).__name__}")
        self.exchange = exchange
        self._hccl = None
        self._last: Optional[DispatchHandle] = None  # for last_stats and the deprecated combine(y)

    def set_placement(self, placement) -> None:
        """Switches to ``placement`` (``phy2log [R]``, slot -> expert; None: expert ``e`` in slot
        ``e``), e.g. after :func:`moerail.migrate_experts` moved the experts. Every rank of the
        group must switch before its next dispatch (the configuration hash checks it)."""
        phy2log, log2phy, logcnt = _placement_tables(placement, self.num_experts, self.world)
        if getattr(self, "num_slots", phy2log.numel()) != phy2log.numel():
            raise ValueError(f"placement: expected {self.num_slots} slots (as before), got {phy2log.numel()}")
        self.phy2log, self.log2phy, self.logcnt = phy2log, log2phy, logcnt
        self.num_slots = phy2log.numel()
        self.num_local_experts = self.num_slots // self.world

    # -- helpers --------------------------------------------------------------------------------

    def _wait(self, work) -> None:
        if not work.wait(self.timeout):
            raise RuntimeError(f"ep_group: collective did not finish within {self.timeout}")

    def _config_hash(self, hidden: int, dtype: torch.dtype, device: torch.device) -> int:
        key = repr((self.num_experts, self.world, self.ranks_per_node, self.num_slots, self.strategy,
                    self.num_chunks, hidden, str(dtype), device.type, self._executor_name(device),
                    self.phy2log.tolist()))
        return zlib.crc32(key.encode())

    def _count_device(self, hidden, group=None) -> torch.device:
        """Where the small count vectors go for ``ep_group``'s collectives: the host for a group
        that gloo serves (CPU, or a mixed ``cpu:gloo,cuda:nccl`` group), else the rows' device,
        since NCCL and HCCL take device tensors only. Known even when ``hidden`` is bad, so a
        rank whose arguments failed still joins the collective."""
        backend = str(dist.get_backend(self.ep_group if group is None else group)).lower()
        if "gloo" in backend:
            return torch.device("cpu")
        if isinstance(hidden, torch.Tensor) and hidden.device.type != "cpu":
            return hidden.device
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        npu = getattr(torch, "npu", None)
        if "hccl" in backend and npu is not None:
            return torch.device("npu", npu.current_device())
        return torch.device("cpu")

    def _gather_counts(self, vec: torch.Tensor, hidden, group=None) -> torch.Tensor:
        """Every rank's ``vec`` (host int64), stacked; it travels on the collective's device and
        comes back to the host (the one device-to-host read of a dispatch, as in Megatron)."""
        group = self.ep_group if group is None else group
        v = vec.to(self._count_device(hidden, group))
        parts = [torch.empty_like(v) for _ in range(dist.get_world_size(group))]
        self._wait(dist.all_gather(parts, v, group=group, async_op=True))
        return torch.stack(parts).cpu()

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> DispatchOutput:
        """Sends every token's rows to the ranks of its experts. Returns ``(tokens [N, H],
        tokens_per_local_expert [L], probs [N])``, a tuple whose ``handle`` attribute
        :meth:`combine` takes: ``out = disp.combine(expert_output, result.handle)``."""
        prepared, error = self._try_prepare(hidden, probs, routing_map)
        out, per_slot, out_probs, route = self._dispatch_prepared(prepared, error, hidden)
        self._last = route
        if self.etp_size > 1:
            out, per_slot, out_probs = self._etp_gather(route, out, per_slot, out_probs)
        return DispatchOutput(out, per_slot, out_probs, route)

    def _etp_gather(self, route: DispatchHandle, rows, per_slot, probs):
        """Expert tensor parallelism: every rank of ``etp_group`` gets the rows of all of them
        (their experts hold a shard of each expert's weights), grouped by local slot, then ETP
        rank, as Megatron's dispatcher orders them after its all-gather."""
        g, loc = self.etp_group, self.num_local_experts
        sizes = self._gather_counts(per_slot.contiguous(), rows, g)  # [ETP, L]
        order = torch.empty(int(sizes.sum()), dtype=torch.int64)
        _native.a2a_block_order(sizes.flatten().tolist(), self.etp_size, loc, order)
        info = (sizes.sum(1).tolist(), order.to(rows.device), dist.get_rank(g))
        route.etp = info
        rows = _EtpGather.apply(rows, self, info)
        probs = _EtpGather.apply(probs.unsqueeze(1), self, info)[:, 0]
        return rows, sizes.sum(0), probs

    def _try_prepare(self, hidden, probs, routing_map):
        try:
            return self._prepare(hidden, probs, routing_map), None
        except (TypeError, ValueError) as e:
            return None, e

    def _dispatch_prepared(self, prepared, error, raw_hidden):
        """The counts' all-gather (with every rank's status and configuration hash), the plan,
        and the exchange of ``prepared = (hidden, weights, slots)`` (``slots`` on the host;
        ``raw_hidden``, the caller's argument, says where the collectives run)."""
        w, rank, rpn, loc = self.world, self.rank, self.ranks_per_node, self.num_local_experts
        v = 4 + self.num_slots + w + w // rpn
        vec = torch.zeros(v, dtype=torch.int64)
        if error is None:
            hidden, weights, slots = prepared
            vec[3] = self._config_hash(hidden.shape[1], hidden.dtype, hidden.device)
            try:
                # Distinct experts of a routing-map row map to distinct slots: no repeat check.
                _native.a2a_counts(slots, w, rpn, loc, 0, int(vec[3]), vec, False)
            except ValueError as e:
                error = e
        if error is not None:
            vec.zero_()
            vec[0] = 1
        gathered = self._gather_counts(vec, raw_hidden)
        bad = (gathered[:, 0] != 0).nonzero().flatten().tolist()
        if error is not None:
            raise error
        if bad:
            raise RuntimeError(f"ep_group: rank(s) {bad} rejected their dispatch arguments (see their errors)")
        hashes = gathered[:, 3].tolist()
        if len(set(hashes)) != 1:
            raise RuntimeError(
                "ep_group: the ranks disagree on the dispatcher configuration (num_experts, placement, "
                f"ranks_per_node, strategy, num_chunks, hidden size or dtype): per-rank hashes {hashes}")
        h, dtype = hidden.shape[1], hidden.dtype
        # The plan of every candidate, the cheapest, and this rank's route: one call.
        native = _native.a2a_route(gathered, slots, rank, rpn, loc, self._candidates, h, hidden.element_size(),
                                   weights.requires_grad, self._links)
        plan = _plan_from(native.plans, gathered, w, rpn, loc)
        route = DispatchHandle(native, plan, slots, h, dtype, hidden.device)
        out, out_probs = _Dispatch.apply(hidden, weights, self, route)
        return out, route.tokens_per_local_expert, out_probs, route

    def forward(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, experts) -> torch.Tensor:
        """Dispatch, ``experts(tokens, tokens_per_local_expert, probs) -> expert_output``, combine.

        With ``num_chunks > 1`` the tokens go in that many chunks and the exchanges of the other
        chunks run while the experts compute one (a helper thread issues the collectives, in
        the same order on every rank: dispatch ``i + 1`` and combine ``i - 1`` while the experts
        run chunk ``i``). ``last_stats["overlap"]`` reports the exchange seconds, the seconds the
        experts waited for them, and the fraction hidden. Same outputs and gradients as one
        chunk (each token's rows are summed in the same order)."""
        n = self.num_chunks
        prepared, error = self._try_prepare(hidden, probs, routing_map)
        if n == 1 or error is not None:
            out, per_slot, p, route = self._dispatch_prepared(prepared, error, hidden)
            self._last = route
            return self.combine(experts(out, per_slot, p), route)
        h, wts, slots = prepared
        bounds = torch.linspace(0, h.shape[0], n + 1).round().long().tolist()
        chunks = [(h[a:b], wts[a:b], slots[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        grad_mode = torch.is_grad_enabled()
        dispatched: List[Optional[tuple]] = [None] * n
        combined: List[Optional[torch.Tensor]] = [None] * n
        ys: List[Optional[torch.Tensor]] = [None] * n
        exchange_s = exposed_s = 0.0

        def run_jobs(jobs, box):
            t0 = time.perf_counter()
            try:
                with torch.set_grad_enabled(grad_mode):
                    for kind, i in jobs:
                        if kind == "dispatch":
                            dispatched[i] = self._dispatch_prepared(chunks[i], None, hidden)
                        else:
                            combined[i] = _Combine.apply(ys[i], self, dispatched[i][3])
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                box.append(e)
            box.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        dispatched[0] = self._dispatch_prepared(chunks[0], None, hidden)
        exchange_s += time.perf_counter() - t0
        for i in range(n):
            jobs = ([("combine", i - 1)] if i >= 1 else []) + ([("dispatch", i + 1)] if i + 1 < n else [])
            box: list = []
            helper = threading.Thread(target=run_jobs, args=(jobs, box), daemon=True)
            helper.start()
            out, per_slot, p, _ = dispatched[i]
            ys[i] = experts(out, per_slot, p)
            t_wait = time.perf_counter()
            helper.join()
            exposed_s += time.perf_counter() - t_wait
            if box and isinstance(box[0], BaseException):
                raise box[0]
            exchange_s += box[-1]
        t0 = time.perf_counter()
        combined[n - 1] = _Combine.apply(ys[n - 1], self, dispatched[n - 1][3])
        tail = time.perf_counter() - t0
        exchange_s += tail
        exposed_s += tail
        self._last = dispatched[n - 1][3]
        self._overlap = {"num_chunks": n, "exchange_seconds": exchange_s, "exposed_seconds": exposed_s,
                         "hidden_fraction": max(0.0, 1.0 - exposed_s / exchange_s) if exchange_s > 0 else 0.0}
        return torch.cat(combined)

    def _prepare(self, hidden, probs, routing_map):
        hidden = _checks.tensor(hidden, "hidden", ndim=2, dtypes=_checks.FLOAT_DTYPES, shape_doc="[num_tokens, hidden]")
        probs = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES, shape_doc="[num_tokens, num_experts]")
        routing_map = _checks.routing_map(routing_map)
        for name, x in (("probs", probs), ("routing_map", routing_map)):
            if x.device != hidden.device:
                raise ValueError(f"{name}: expected a tensor on {hidden.device} (the device of hidden), got {x.device}")
        _checks.same_rows(hidden, "hidden", probs, "probs")
        if tuple(routing_map.shape) != tuple(probs.shape):
            raise ValueError(f"routing_map: expected shape {tuple(probs.shape)} (the shape of probs), "
                             f"got {tuple(routing_map.shape)}")
        if probs.shape[1] != self.num_experts:
            raise ValueError(f"probs: expected {self.num_experts} experts (num_experts), got {probs.shape[1]}")
        if self.capacity_factor is not None:
            from .router import apply_token_dropping

            probs, routing_map = apply_token_dropping(probs, routing_map, self.topk, self.capacity_factor,
                                                      self.drop_policy, self.pad_to_capacity)
        # The plan is made on the host: the routing map comes over (T x E bytes); the token
        # rows and their weights stay where they are.
        idx = _compact(routing_map.cpu())
        slots = select_replicas(idx, self.log2phy, self.logcnt, self.num_slots, offset=self.rank)
        idx_here = idx.to(probs.device)
        weights = probs.gather(1, idx_here.clamp(min=0)).masked_fill(idx_here < 0, 0.0)
        return hidden, weights, slots


    # -- combine --------------------------------------------------------------------------------

    def combine(self, expert_output: torch.Tensor, handle: Optional[DispatchHandle] = None) -> torch.Tensor:
        """Sums each token's expert rows back into ``[T, H]``, by the ``handle`` of the
        dispatch that made the rows (``dispatch(...).handle``)."""
        if handle is None:
            warnings.warn("AllToAllDispatcher.combine: pass the dispatch's handle (combine(expert_output, "
                          "dispatch(...).handle)); combine without it uses the last dispatch and goes away in the "
                          "next release", DeprecationWarning, stacklevel=2)
            handle = self._last
            if handle is None:
                raise RuntimeError("combine: call dispatch first")
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the DispatchHandle of a dispatch, got {type(handle).__name__}")
        route = handle
        y = _checks.tensor(expert_output, "expert_output", ndim=2, dtypes=_checks.FLOAT_DTYPES,
                           shape_doc="[num_rows, hidden]")
        n = route.out_rows.numel() if route.etp is None else int(route.etp[1].numel())
        if tuple(y.shape) != (n, route.hidden):
            raise ValueError(f"expert_output: expected shape ({n}, {route.hidden}) (the rows dispatch returned), "
                             f"got {tuple(y.shape)}")
        if y.dtype != route.dtype:
            raise TypeError(f"expert_output: expected dtype {route.dtype} (the dtype of the dispatched hidden), "
                            f"got {y.dtype}")
        if self.etp_size > 1:
            y = _EtpReduceScatter.apply(y, self, route.etp)
        return _Combine.apply(y, self, route)

    @property
    def last_stats(self) -> Dict[str, object]:
        """The last exchange: the plan's summary (strategy, estimates, planned bytes of every
        pass over the whole group), what this rank measured (bytes it sent inside and between
        nodes, seconds in collectives) per pass run so far, and the ``executor`` that moved the
        rows (``torch.distributed``, ``hccl`` or the class of the object given)."""
        r = self._last
        if r is None:
            return {}
        out: Dict[str, object] = dict(r.plan.summary())
        out["planned"] = {p: {k: r.plan.traffic[r.strategy][p][k]
                              for k in ("inter_node_bytes", "intra_node_bytes", "inter_node_rows", "seconds")}
                          for p in _PASSES}
        out["measured"] = {p: dict(v) for p, v in r.stats.items()}
        out["executor"] = self._executor_name(r.device)
        if self._overlap:
            out["overlap"] = dict(self._overlap)
        return out

    # -- the passes -----------------------------------------------------------------------------

    def _exchange(self, buf: torch.Tensor, send: List[int], recv: List[int], log: list) -> torch.Tensor:
        t0 = time.perf_counter()
        executor = self._executor(buf.device)
        if executor is not None:
            out = executor.exchange(buf, send, recv)
        else:
            out = torch.empty(sum(recv), buf.shape[1], dtype=buf.dtype, device=buf.device)
            self._wait(dist.all_to_all_single(out, buf.contiguous(), output_split_sizes=recv,
                                              input_split_sizes=send, group=self.ep_group, async_op=True))
        log.append(([s * buf.shape[1] for s in send], time.perf_counter() - t0))
        return out

    def _executor(self, device: torch.device):
        """Who runs an exchange step: None for torch.distributed's ``all_to_all_single`` on
        ``ep_group``, else an object with ``exchange(buf, send_rows, recv_rows)`` (moerail's HCCL
        executor for NPU rows). Every rank of the group makes the same choice: the rows of all
        of them are on the same kind of device (the configuration hash covers it)."""
        name = self._executor_name(device)
        if name == "torch.distributed":
            return None
        if name != "hccl":
            return self.exchange
        if self._hccl is None:  # collective: every rank gets here in its first exchange
            from .ascend import HcclExchange

            self._hccl = HcclExchange.from_group(self.ep_group)
        return self._hccl

    def _executor_name(self, device: torch.device) -> str:
        """``torch.distributed``, ``hccl`` or the class name of the ``exchange`` object given."""
        ex = self.exchange
        if not isinstance(ex, str):
            return type(ex).__name__
        if ex == "torch" or (ex == "auto" and device.type != "npu"):
            return "torch.distributed"
        return "hccl"

    def _record(self, route: DispatchHandle, pass_: str, log: list) -> None:
        rpn = self.ranks_per_node
        node = self.rank // rpn
        inter = intra = 0
        secs = 0.0
        for sent, dt in log:
            secs += dt
            for dst, b in enumerate(sent):
                if dst == self.rank:
                    continue
                if dst // rpn == node:
                    intra += b
                else:
                    inter += b
        route.stats[pass_] = {"sent_inter_node_bytes": inter, "sent_intra_node_bytes": intra, "seconds": secs}

    def _forward_pass(self, route: DispatchHandle, hidden: torch.Tensor, weights: Optional[torch.Tensor], pass_: str):
        """Token rows -> expert rows: the dispatch (with weights), or the combine's backward."""
        lay = route.plan.traffic[route.strategy][pass_]
        log: list = []
        h, dtype = route.hidden, route.dtype
        hop0 = route.hops[0]
        sel = hop0.index
        if route.copy_rows:
            p = None
            if lay["num_probs"]:
                p = weights.reshape(-1)[route.rows_entry].to(torch.float32).unsqueeze(1)
            buf = _pack(lay, hidden.index_select(0, sel), p)
        else:
            ent = route.plan.entries
            k = route.slots.shape[1]
            ids = probs = None
            if lay["num_ids"]:
                ids = torch.full((route.num_tokens, ent), -1, dtype=torch.int64, device=route.device)
                ids[:, :k] = route.slots
                ids = ids.index_select(0, sel)
            if lay["num_probs"]:
                probs = torch.zeros(route.num_tokens, ent, dtype=torch.float32, device=route.device)
                probs[:, :k] = weights.to(torch.float32)
                probs = probs.index_select(0, sel)
            buf = _pack(lay, hidden.index_select(0, sel), probs, ids)
        for i, hop in enumerate(route.hops):
            if i > 0:
                buf = buf.index_select(0, hop.index)
            buf = self._exchange(buf, hop.send, hop.recv, log)
            if route.native.pending == i:
                route.arrive(i, buf, lay)
        rows, rp = _unpack(lay, buf.index_select(0, route.out_rows), h, dtype)
        out_p = None
        if rp is not None:
            out_p = rp[:, 0] if route.copy_rows else rp.gather(1, route.out_entries.unsqueeze(1))[:, 0]
            out_p = out_p.contiguous()
        self._record(route, pass_, log)
        return rows.contiguous(), out_p

    def _reverse_pass(self, route: DispatchHandle, rows: torch.Tensor, probs_grad: Optional[torch.Tensor], pass_: str):
        """Expert rows -> token rows, summed: the combine, or the dispatch's backward (then also
        the gradient of the weights, ``[T, K]``)."""
        lay = route.plan.traffic[route.strategy][pass_]
        log: list = []
        h, dtype = route.hidden, route.dtype
        hops = route.hops
        n_last = sum(hops[-1].recv)
        acc = _sum_rows(rows, route.out_rows, n_last)
        p = None
        if lay["num_probs"]:
            width = 1 if route.copy_rows else route.plan.entries
            p = torch.zeros(n_last, width, dtype=torch.float32, device=route.device)
            col = torch.zeros_like(route.out_rows) if route.copy_rows else route.out_entries
            p[route.out_rows, col] = probs_grad.to(torch.float32)
        buf = _pack(lay, acc.to(dtype), p)
        gw = None
        for i in range(len(hops) - 1, -1, -1):
            hop = hops[i]
            back = self._exchange(buf, hop.recv, hop.send, log)
            n_prev = route.num_tokens if i == 0 else sum(hops[i - 1].recv)
            hh, pp = _unpack(lay, back, h, dtype)
            acc = _sum_rows(hh, hop.index, n_prev)
            if i == 0 and pp is not None:
                k = route.slots.shape[1]
                if route.copy_rows:
                    # One weight a copy row: back to its (token, entry).
                    gw = torch.zeros(route.num_tokens * k, dtype=torch.float32, device=route.device)
                    gw[route.rows_entry] = pp[:, 0]
                    gw = gw.view(route.num_tokens, k)
                else:
                    gw = _sum_rows(pp, hop.index, n_prev)[:, :k]
            elif pp is not None:
                pp = _sum_rows(pp, hop.index, n_prev)
            if i > 0:
                buf = _pack(lay, acc.to(dtype), pp)
        self._record(route, pass_, log)
        return acc.to(dtype), gw


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weights, disp: AllToAllDispatcher, route: DispatchHandle):
        ctx.disp, ctx.route = disp, route
        ctx.weights_dtype = weights.dtype
        with torch.no_grad():
            return disp._forward_pass(route, hidden.detach(), weights.detach(), "dispatch")

    @staticmethod
    def backward(ctx, grad_rows, grad_probs):
        route = ctx.route
        n = route.out_rows.numel()
        if grad_rows is None:
            grad_rows = torch.zeros(n, route.hidden, dtype=route.dtype, device=route.device)
        if grad_probs is None:
            grad_probs = torch.zeros(n, dtype=torch.float32, device=route.device)
        g_hidden, g_w = ctx.disp._reverse_pass(route, grad_rows.contiguous(), grad_probs, "dispatch_backward")
        if g_w is not None:
            g_w = g_w.to(ctx.weights_dtype)
        return g_hidden, g_w, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, disp: AllToAllDispatcher, route: DispatchHandle):
        ctx.disp, ctx.route = disp, route
        with torch.no_grad():
            out, _ = disp._reverse_pass(route, rows.detach().contiguous(), None, "combine")
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, _ = ctx.disp._forward_pass(ctx.route, grad.contiguous(), None, "combine_backward")
        return rows, None, None


def _etp_all_rows(disp: AllToAllDispatcher, x: torch.Tensor, info) -> torch.Tensor:
    """Every ETP rank's rows of ``x`` (uneven counts: padded to the largest), concatenated in
    ETP-rank order."""
    sizes, _, _ = info
    m = max(sizes) if sizes else 0
    pad = torch.zeros(m, *x.shape[1:], dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    disp._wait(dist.all_gather(parts, pad, group=disp.etp_group, async_op=True))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _etp_own_sum(disp: AllToAllDispatcher, full: torch.Tensor, info) -> torch.Tensor:
    """The sum over ETP ranks of ``full`` (ETP-rank order), this rank's rows of it."""
    sizes, _, me = info
    full = full.contiguous().clone()
    disp._wait(dist.all_reduce(full, group=disp.etp_group, async_op=True))
    start = sum(sizes[:me])
    return full[start : start + sizes[me]].clone()


class _EtpGather(torch.autograd.Function):
    """All ETP ranks' rows, in (local slot, ETP rank) order; backward: each rank's rows get the
    sum of every ETP rank's gradient for them (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, disp, info):
        ctx.disp, ctx.info = disp, info
        return _etp_all_rows(disp, x.detach(), info)[info[1]]

    @staticmethod
    def backward(ctx, grad):
        order = ctx.info[1]
        full = torch.zeros_like(grad)
        full[order] = grad
        return _etp_own_sum(ctx.disp, full, ctx.info), None, None


class _EtpReduceScatter(torch.autograd.Function):
    """The expert outputs (partial sums from each ETP rank's weight shard) summed over the ETP
    group, this rank's rows; backward: every rank's gradient rows gathered."""

    @staticmethod
    def forward(ctx, y, disp, info):
        ctx.disp, ctx.info = disp, info
        full = torch.zeros_like(y)
        full[info[1]] = y.detach()
        return _etp_own_sum(disp, full, info)

    @staticmethod
    def backward(ctx, grad):
        return _etp_all_rows(ctx.disp, grad.contiguous(), ctx.info)[ctx.info[1]], None, None
