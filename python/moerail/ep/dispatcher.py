"""``AllToAllDispatcher``: runs the planned expert-parallel exchange (see :mod:`moerail.ep.plan`
for the strategies and the cost model): rows packed in the planner's row format, moved by
torch.distributed or moerail's HCCL executor, summed back in fp32 in a fixed order."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .. import _agree, _checks, _native
from ..backends import cuda as _device
from ..balance import LinkModel, select_replicas
from ..ops import custom_ops as ops
from .autograd import _Combine, _Dispatch, _EtpGather, _EtpReduceScatter
from .overlap import Overlapped
from .plan import AllToAllPlan, _compact, _links, _placement_tables, _plan_from, _strategies

__all__ = ["AllToAllDispatcher", "DispatchHandle", "DispatchOutput"]

_PASSES = ("dispatch", "dispatch_backward", "combine", "combine_backward")


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

    def __init__(self, native: _native.ep.Route, make_plan: Callable[[], AllToAllPlan], slots: torch.Tensor,
                 hidden: int, dtype: torch.dtype, device: torch.device):
        self.native = native
        self._make_plan: Optional[Callable[[], AllToAllPlan]] = make_plan
        self._plan: Optional[AllToAllPlan] = None
        self._layouts: Dict[str, dict] = {}
        self.entries: int = native.entries  # slots a token row of the token strategies carries
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

    @property
    def plan(self) -> AllToAllPlan:
        """Every candidate's plan and the choice (:class:`AllToAllPlan`), built on first use: the
        passes need only :meth:`layout`."""
        if self._plan is None:
            self._plan, self._make_plan = self._make_plan(), None
        return self._plan

    def layout(self, pass_: str) -> dict:
        """The chosen plan's row layout and traffic of ``pass_`` (``plan.traffic[strategy][pass_]``)."""
        lay = self._layouts.get(pass_)
        if lay is None:
            lay = self._layouts[pass_] = self.native.pass_layout(pass_)
        return lay

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
    on ``ep_group``; ``"hccl"``, moerail's HCCL executor (:class:`moerail.backends.hccl.HcclExchange`:
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
        #: Seconds of exchange work in overlapped passes (``num_chunks > 1``, forward and backward)
        #: and the part the experts waited for, summed since the caller last reset them.
        self.overlap_totals: Dict[str, float] = {"exchange_seconds": 0.0, "exposed_seconds": 0.0}
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
        self._config_hash_cache = None
        self.num_slots = phy2log.numel()
        self.num_local_experts = self.num_slots // self.world
        # Expert e in slot e, one replica each: a token's slots are its experts (no replica choice).
        self._slot_is_expert = bool(torch.equal(phy2log, torch.arange(self.num_experts, dtype=phy2log.dtype)))

    # -- helpers --------------------------------------------------------------------------------

    def _wait(self, work) -> None:
        try:
            done = work.wait(self.timeout)
        except RuntimeError as e:  # a peer exited, was killed or never arrived
            raise RuntimeError(
                f"ep_group: a collective failed (a peer rank exited, was killed or did not arrive within "
                f"{self.timeout}): {e}"
            ) from e
        if not done:
            raise RuntimeError(f"ep_group: collective did not finish within {self.timeout}")

    def _config_hash(self, hidden: int, dtype: torch.dtype, device: torch.device) -> int:
        # Hashing the placement costs tens of microseconds a dispatch; it changes only through
        # set_placement, which drops the cache (or an in-place write, which bumps the tensor's version).
        key = (hidden, dtype, device.type, self.strategy, self.num_chunks, id(self.exchange), self.phy2log._version)
        cached = self._config_hash_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        h = _agree.config_hash(self.num_experts, self.world, self.ranks_per_node, self.num_slots, self.strategy,
                               self.num_chunks, hidden, str(dtype), device.type, self._executor_name(device),
                               self.phy2log.tolist())
        self._config_hash_cache = (key, h)
        return h

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
        try:
            out, per_slot, out_probs, route = self._dispatch_prepared(prepared, error, hidden)
        except Exception as e:
            if self.etp_size > 1:  # the ETP peers (in other EP groups) wait in the ETP header: tell them
                self._etp_agree(hidden, e)
            raise
        self._last = route
        if self.etp_size > 1:
            self._etp_agree(out, None)
            out, per_slot, out_probs = self._etp_gather(route, out, per_slot, out_probs)
        return DispatchOutput(out, per_slot, out_probs, route)

    def _etp_agree(self, rows, error: Optional[BaseException]) -> None:
        """The ETP group's fixed-size header before its gathers, whose sizes depend on the
        configuration (the local experts' count vector, then rows of the hidden size): ranks of
        different EP groups configured otherwise all raise here, and a rank whose dispatch failed
        (``error``) makes its ETP peers raise instead of waiting for its rows."""
        cfg = length = 0
        if error is None:
            cfg = _agree.config_hash(self.num_local_experts, self.etp_size, tuple(rows.shape[1:]), str(rows.dtype),
                                     rows.device.type)
            length = self.num_local_experts
        _agree.agree(
            lambda hdr: self._gather_counts(hdr, rows, self.etp_group),
            "etp_group",
            "local experts, etp_size, hidden size or dtype",
            cfg, length, error, ("dispatch", "expert-tensor-parallel"),
        )

    def _etp_gather(self, route: DispatchHandle, rows, per_slot, probs):
        """Expert tensor parallelism: every rank of ``etp_group`` gets the rows of all of them
        (their experts hold a shard of each expert's weights), grouped by local slot, then ETP
        rank, as Megatron's dispatcher orders them after its all-gather."""
        g, loc = self.etp_group, self.num_local_experts
        sizes = self._gather_counts(per_slot.contiguous(), rows, g)  # [ETP, L]
        order = torch.empty(int(sizes.sum()), dtype=torch.int64)
        _native.ep.a2a_block_order(sizes.flatten().tolist(), self.etp_size, loc, order)
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
        """The plan (:meth:`_route_prepared`) and the exchange of ``prepared = (hidden, weights,
        slots)``; returns ``(rows, tokens_per_local_expert, probs, route)``."""
        route = self._route_prepared(prepared, error, raw_hidden)
        hidden, weights, _ = prepared
        out, out_probs = _Dispatch.apply(hidden, weights, self, route)
        return out, route.tokens_per_local_expert, out_probs, route

    def _route_prepared(self, prepared, error, raw_hidden, probs_grad: Optional[bool] = None) -> DispatchHandle:
        """The counts' all-gather (with every rank's status and configuration hash) and the plan
        of ``prepared = (hidden, weights, slots)`` (``slots`` on the host; ``raw_hidden``, the
        caller's argument, says where the collectives run): this rank's route, nothing moved.
        ``probs_grad``: whether the backward carries the weights' gradient (default: whether
        ``weights`` requires grad)."""
        return self._route_chunks([prepared] if error is None else [], error, raw_hidden, probs_grad)[0]

    def _route_chunks(self, chunks, error, raw_hidden, probs_grad: Optional[bool] = None) -> List[DispatchHandle]:
        """:meth:`_route_prepared` for several token chunks ``[(hidden, weights, slots), ...]`` at
        once: one header and one all-gather carry every chunk's counts, then each chunk gets its
        own plan and route (the chunked pipeline plans them all before moving any row)."""
        w, rank, rpn, loc = self.world, self.rank, self.ranks_per_node, self.num_local_experts
        v = 4 + self.num_slots + w + w // rpn
        n = max(1, len(chunks))
        vec = torch.zeros(n, v, dtype=torch.int64)
        cfg = 0
        if error is None:
            hidden = chunks[0][0]
            cfg = self._config_hash(hidden.shape[1], hidden.dtype, hidden.device)
            try:
                for i, (_, _, slots) in enumerate(chunks):
                    vec[i, 3] = cfg
                    # Distinct experts of a routing-map row map to distinct slots: no repeat check.
                    _native.ep.a2a_counts(slots, w, rpn, loc, 0, cfg, vec[i], False)
            except ValueError as e:
                error = e
        # The first collective has a fixed size on every rank (status, configuration hash, the
        # count vector's length): a rank configured otherwise makes every rank raise here, before
        # the count vectors, whose length depends on the configuration, are gathered.
        _agree.agree(
            lambda hdr: self._gather_counts(hdr, raw_hidden),
            "ep_group",
            "num_experts, placement slots, ranks_per_node, strategy, num_chunks, hidden size or dtype",
            cfg, n * v, error, ("dispatch", "dispatcher"),
        )
        gathered_all = self._gather_counts(vec.reshape(-1), raw_hidden).view(w, n, v)
        routes = []
        for i, (hidden, weights, slots) in enumerate(chunks):
            gathered = gathered_all[:, i].contiguous()
            hashes = gathered[:, 3].tolist()
            if len(set(hashes)) != 1:  # cannot happen after the header check; kept as a guard
                raise RuntimeError(
                    f"ep_group: the ranks disagree on the dispatcher configuration: per-rank hashes {hashes}")
            h, dtype = hidden.shape[1], hidden.dtype
            # The plan of every candidate, the cheapest, and this rank's route: one call.
            native = _native.ep.a2a_route(gathered, slots, rank, rpn, loc, self._candidates, h, hidden.element_size(),
                                       weights.requires_grad if probs_grad is None else probs_grad, self._links)
            def make_plan(native=native, gathered=gathered):
                return _plan_from(native.plans, gathered, w, rpn, loc)

            routes.append(DispatchHandle(native, make_plan, slots, h, dtype, hidden.device))
        return routes

    def forward(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, experts) -> torch.Tensor:
        """Dispatch, ``experts(tokens, tokens_per_local_expert, probs) -> expert_output``, combine.

        With ``num_chunks > 1`` the tokens go in that many chunks and the exchanges of the other
        chunks run while the experts compute one, in the forward and in the backward
        (:mod:`moerail.ep.overlap`: a helper thread issues the collectives, in the same order on
        every rank). ``last_stats["overlap"]`` reports the exchange seconds, the seconds the
        experts waited for them, and the fraction hidden. Each token's rows are summed in the same
        order as with one chunk; the experts see smaller batches of the same rows.

        ``experts`` must make no collective on ``ep_group`` (it runs beside the helper's)."""
        n = self.num_chunks
        prepared, error = self._try_prepare(hidden, probs, routing_map)
        if n == 1 or error is not None:
            out, per_slot, p, route = self._dispatch_prepared(prepared, error, hidden)
            self._last = route
            return self.combine(experts(out, per_slot, p), route)
        h, wts, slots = prepared
        bounds = torch.linspace(0, h.shape[0], n + 1).round().long().tolist()
        chunks = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            # As one dispatch would compact it: as many entry columns as the chunk's fullest token.
            s = slots[a:b]
            width = int((s >= 0).sum(1).max()) if s.numel() else 0
            chunks.append((a, b, s[:, :width].contiguous()))
        return Overlapped.apply(h, wts, self, chunks, experts, torch.is_grad_enabled())

    def _note_overlap(self, n: int, work: float, exposed: float, backward: bool = False) -> None:
        """Records one overlapped pass: ``work``, the seconds of exchange work (plans, packing,
        all-to-alls, sums; in the helper thread or not), ``exposed``, the seconds the experts'
        thread waited for it. ``last_stats["overlap"]`` holds the last forward's (and its
        backward's, ``backward_*``); ``overlap_totals`` sums every pass since it was last reset."""
        if backward:
            self._overlap.update({"backward_exchange_seconds": work, "backward_exposed_seconds": exposed})
        else:
            self._overlap = {"num_chunks": n, "exchange_seconds": work, "exposed_seconds": exposed,
                             "hidden_fraction": max(0.0, 1.0 - exposed / work) if work > 0 else 0.0}
        self.overlap_totals["exchange_seconds"] += work
        self.overlap_totals["exposed_seconds"] += exposed

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
            from ..ops.router import apply_token_dropping

            probs, routing_map = apply_token_dropping(probs, routing_map, self.topk, self.capacity_factor,
                                                      self.drop_policy, self.pad_to_capacity)
        # The plan is made on the host: the routing map comes over (T x E bytes); the token
        # rows and their weights stay where they are.
        idx = _compact(routing_map.cpu())
        if self._slot_is_expert:
            slots = idx
        else:
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
        out["planned"] = {p: {k: r.layout(p)[k]
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
            if executor is self._hccl:  # the ranks agreed on the plan (the dispatch's header): no second header
                out = executor.exchange(buf, send, recv, check=False)
            else:
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
            from ..backends.hccl import HcclExchange

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
        lay = route.layout(pass_)
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
            ent = route.entries
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
        lay = route.layout(pass_)
        log: list = []
        h, dtype = route.hidden, route.dtype
        hops = route.hops
        n_last = sum(hops[-1].recv)
        acc = _sum_rows(rows, route.out_rows, n_last)
        p = None
        if lay["num_probs"]:
            width = 1 if route.copy_rows else route.entries
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
