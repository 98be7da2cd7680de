"""Expert migration: plan the transfers (:func:`plan_migration`), decide whether they pay
(:func:`should_migrate`), and move expert weights with their optimizer state (:func:`migrate_experts`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from .. import _checks, _native
from ._args import _int, _loads, _placement
from .link import LinkModel

__all__ = ["MigrationDecision", "MigrationPlan", "expert_seconds_per_token", "expert_slot_tensors", "migrate_experts", "plan_migration", "should_migrate"]

logger = logging.getLogger("moerail.balance")


# ------------------------------------------------------------------------------------------------
# migration planning and decision
# ------------------------------------------------------------------------------------------------


@dataclass
class MigrationPlan:
    """What :func:`plan_migration` returns.

    ``phy2log``: the new placement with its devices and slots renumbered to keep experts where
    they are (use it, not the placement you passed). ``transfers [n, 6]`` int64 rows ``(layer,
    expert, src_rank, src_slot, dst_rank, dst_slot)`` with rank-local slots; ``src_rank ==
    dst_rank`` is a local copy. ``seconds`` on the link model; byte counts; ``rank_bytes [G, 2]``
    network bytes sent / received per rank."""

    old_phy2log: torch.Tensor
    phy2log: torch.Tensor
    transfers: torch.Tensor
    expert_bytes: torch.Tensor
    num_gpus: int
    num_nodes: int
    seconds: float
    intra_node_bytes: float
    inter_node_bytes: float
    local_bytes: float
    rank_bytes: torch.Tensor
    link: LinkModel = field(default_factory=LinkModel)

    def __repr__(self) -> str:
        return (
            f"MigrationPlan(layers={self.phy2log.shape[0]}, slots={self.phy2log.shape[1]}, num_gpus={self.num_gpus}, "
            f"num_nodes={self.num_nodes}, transfers={len(self.transfers)} ({self.num_network_transfers} over the "
            f"network), inter_node_bytes={self.inter_node_bytes:.4g}, intra_node_bytes={self.intra_node_bytes:.4g}, "
            f"seconds={self.seconds:.4g})"
        )

    @property
    def slots_per_gpu(self) -> int:
        return self.phy2log.shape[1] // self.num_gpus

    @property
    def num_network_transfers(self) -> int:
        return int((self.transfers[:, 2] != self.transfers[:, 4]).sum()) if len(self.transfers) else 0

    def summary(self) -> Dict[str, float]:
        return {
            "transfers": float(len(self.transfers)),
            "network_transfers": float(self.num_network_transfers),
            "seconds": self.seconds,
            "intra_node_bytes": self.intra_node_bytes,
            "inter_node_bytes": self.inter_node_bytes,
            "local_bytes": self.local_bytes,
        }


def _expert_bytes(expert_bytes, num_layers: int) -> torch.Tensor:
    if isinstance(expert_bytes, (int, float)) and not isinstance(expert_bytes, bool):
        b = torch.full((num_layers,), float(expert_bytes), dtype=torch.float64)
    else:
        b = _loads(expert_bytes, "expert_bytes", ndim=1, doc="[num_layers]")
        if b.shape[0] != num_layers:
            raise ValueError(f"expert_bytes: expected {num_layers} values (one per layer), got {b.shape[0]}")
    return b


def plan_migration(
    old_phy2log,
    new_phy2log,
    num_gpus: int,
    num_nodes: int = 1,
    *,
    expert_bytes: Union[float, Sequence[float], torch.Tensor],
    link: Optional[LinkModel] = None,
    keep_nodes: Optional[bool] = None,
    num_experts: Optional[int] = None,
) -> MigrationPlan:
    """Plans the move from ``old_phy2log`` to ``new_phy2log`` (both ``[L, R]``).

    Devices of the new placement are renumbered (exactly, by the Hungarian algorithm) to maximise
    the experts that stay on their device; with ``keep_nodes`` (default when ``num_nodes > 1``:
    required for EPLB's hierarchical placements, whose nodes own whole groups) whole nodes are
    matched first and devices only inside a node; a staying expert keeps its slot. Each other slot
    gets its expert by a local copy when its device held it, else from a holder in the same node if
    any, the one with the fewest sends so far. ``expert_bytes``: bytes of one expert (weights +
    optimizer state), a number or one per layer."""
    old = _placement(old_phy2log, "old_phy2log")
    new = _placement(new_phy2log, "new_phy2log", old.shape[0])
    if new.shape != old.shape:
        raise ValueError(f"new_phy2log: expected shape {tuple(old.shape)} (the shape of old_phy2log), got {tuple(new.shape)}")
    num_gpus = _int(num_gpus, "num_gpus")
    num_nodes = _int(num_nodes, "num_nodes")
    link = link or LinkModel()
    if keep_nodes is None:
        keep_nodes = num_nodes > 1
    num_layers, num_replicas = old.shape
    if num_experts is None:
        num_experts = int(max(int(old.max()), int(new.max()))) + 1 if old.numel() else 1
    b = _expert_bytes(expert_bytes, num_layers)
    matched = torch.empty_like(old)
    transfers = torch.empty(num_layers * num_replicas, 6, dtype=torch.int64)
    rank_bytes = torch.empty(num_gpus, 2, dtype=torch.float64)
    n, seconds, intra, inter, local = _native.balance.plan_migration(
        old, new, num_experts, num_gpus, num_nodes, bool(keep_nodes), b,
        float(link.intra_node_bw), float(link.inter_node_bw), float(link.latency), float(link.local_bw),
        matched, transfers, rank_bytes,
    )  # fmt: skip
    return MigrationPlan(
        old_phy2log=old,
        phy2log=matched,
        transfers=transfers[:n].clone(),
        expert_bytes=b,
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        seconds=seconds,
        intra_node_bytes=intra,
        inter_node_bytes=inter,
        local_bytes=local,
        rank_bytes=rank_bytes,
        link=link,
    )


@dataclass
class MigrationDecision:
    """The migrate-or-not decision and its numbers (loads in tokens, times in seconds)."""

    migrate: bool
    current_max_load: float
    new_max_load: float
    gain_per_step: float
    horizon_steps: float
    gain: float
    migration_seconds: float
    overhead_seconds: float
    cost: float

    def __str__(self) -> str:
        verdict = "migrate" if self.migrate else "keep"
        return (
            f"{verdict}: busiest-device load {self.current_max_load:.1f} -> {self.new_max_load:.1f} tokens "
            f"(summed over layers), gain {self.gain_per_step * 1e3:.3f} ms/step x {self.horizon_steps:g} steps "
            f"= {self.gain:.4f} s vs cost {self.cost:.4f} s (migration {self.migration_seconds:.4f} s + "
            f"overhead {self.overhead_seconds:.4f} s)"
        )


def expert_seconds_per_token(
    hidden_size: int,
    ffn_hidden_size: int,
    *,
    flops_per_second: float,
    efficiency: float = 0.5,
    gated: bool = True,
    backward: bool = True,
) -> float:
    """Seconds one device spends on one routed token in one expert: ``2 * H * F`` FLOPs per
    matrix (3 matrices with a gated activation, else 2), x3 with the backward pass, at
    ``flops_per_second * efficiency``."""
    h = _int(hidden_size, "hidden_size")
    f = _int(ffn_hidden_size, "ffn_hidden_size")
    fps = _checks.real(flops_per_second, "flops_per_second", positive=True)
    eff = _checks.real(efficiency, "efficiency", positive=True)
    flops = 2.0 * h * f * (3 if gated else 2) * (3 if backward else 1)
    return flops / (fps * eff)


def should_migrate(
    predicted_load,
    current_phy2log,
    new_phy2log,
    num_gpus: int,
    num_nodes: int = 1,
    *,
    seconds_per_token: float,
    horizon_steps: float,
    migration_seconds: Optional[float] = None,
    overhead_seconds: float = 0.0,
    log: bool = True,
) -> MigrationDecision:
    """Migrate only when the predicted gain over the horizon exceeds the migration's cost.

    Each MoE layer waits for its busiest device, so a step's expert time is
    ``sum over layers of max device load * seconds_per_token``. ``gain = horizon_steps *
    (that now - that after)``; migrate iff ``gain > migration_seconds + overhead_seconds``.
    ``new_phy2log`` may be a :class:`MigrationPlan` (its ``seconds`` is the migration time).
    The decision is logged on the ``moerail.balance`` logger."""
    w = _loads(predicted_load, "predicted_load")
    if isinstance(new_phy2log, MigrationPlan):
        if migration_seconds is None:
            migration_seconds = new_phy2log.seconds
        new_phy2log = new_phy2log.phy2log
    if migration_seconds is None:
        raise ValueError("migration_seconds: needed unless new_phy2log is a MigrationPlan")
    cur = _placement(current_phy2log, "current_phy2log", w.shape[0])
    new = _placement(new_phy2log, "new_phy2log", w.shape[0])
    res = _native.balance.decide_migration(
        w, cur, new, _int(num_gpus, "num_gpus"), _int(num_nodes, "num_nodes"),
        _checks.real(seconds_per_token, "seconds_per_token"), _checks.real(horizon_steps, "horizon_steps"),
        _checks.real(migration_seconds, "migration_seconds"), _checks.real(overhead_seconds, "overhead_seconds"),
    )  # fmt: skip
    migrate, cur_max, new_max, gain_per_step, gain, cost = res
    d = MigrationDecision(
        migrate=bool(migrate),
        current_max_load=cur_max,
        new_max_load=new_max,
        gain_per_step=gain_per_step,
        horizon_steps=float(horizon_steps),
        gain=gain,
        migration_seconds=float(migration_seconds),
        overhead_seconds=float(overhead_seconds),
        cost=cost,
    )
    if log:
        logger.info("expert placement: %s", d)
    return d


# ------------------------------------------------------------------------------------------------
# moving experts and keeping replicas identical (torch.distributed)
# ------------------------------------------------------------------------------------------------

SlotTensors = Sequence[Sequence[Sequence[torch.Tensor]]]


def expert_slot_tensors(
    slot_params: Sequence[Sequence[Sequence[torch.nn.Parameter]]],
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    stacked: bool = False,
) -> List[List[List[torch.Tensor]]]:
    """The tensors to move for each local expert slot: ``[layer][slot] -> [tensors]``.

    ``slot_params[layer][slot]`` lists the parameters of the expert in that slot (one module per
    expert, like Megatron's SequentialMLP), or with ``stacked=True`` ``slot_params[layer]`` lists
    parameters whose first dimension is the slot (like GroupedMLP's weights reshaped to
    ``[num_local_experts, ...]``). Each slot gets its parameters and every tensor in the
    optimizer's state for them (Adam's ``exp_avg``, ``exp_avg_sq`` and per-parameter ``step``;
    with ``stacked`` the slot's slice of states shaped like the parameter). Tensors are detached
    views: writing into them updates the model and the optimizer in place."""

    def states(p) -> List[torch.Tensor]:
        if optimizer is None or p not in optimizer.state:
            return []
        st = optimizer.state[p]
        return [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]

    out: List[List[List[torch.Tensor]]] = []
    for layer_params in slot_params:
        if not stacked:
            out.append([[t.detach() for p in params for t in [p, *states(p)]] for params in layer_params])
            continue
        params = list(layer_params)
        if not params:
            out.append([])
            continue
        num_slots = params[0].shape[0]
        slots = []
        for s in range(num_slots):
            ts = []
            for p in params:
                if p.shape[0] != num_slots:
                    raise ValueError(f"slot_params: stacked parameters must share their first dimension ({num_slots})")
                ts.append(p.detach()[s])
                ts.extend(x[s] for x in states(p) if x.shape == p.shape)
            slots.append(ts)
        out.append(slots)
    return out


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised (init_process_group first)")
    return dist


_ALIGN = 16  # bytes: every tensor starts aligned inside a packed buffer


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _as_bytes(t: torch.Tensor) -> List[torch.Tensor]:
    """The tensor's bytes, padded to a multiple of ``_ALIGN``."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = _aligned(b.numel()) - b.numel()
    return [b, torch.zeros(pad, dtype=torch.uint8, device=b.device)] if pad else [b]


def migrate_experts(
    plan: MigrationPlan,
    slot_tensors: Union[SlotTensors, Callable[[int, int], Sequence[torch.Tensor]]],
    *,
    group=None,
) -> Dict[str, float]:
    """Executes ``plan`` on this rank: every rank of ``group`` (the EP group, rank ``g`` holding
    slots ``g * R/G .. (g+1) * R/G``) calls it with its own slot tensors.

    ``slot_tensors[layer][local_slot]`` (or a callable ``(layer, local_slot) -> tensors``) lists
    the tensors of the expert in that slot - weights and optimizer state, e.g. from
    :func:`expert_slot_tensors`; every rank lists the same shapes and dtypes in the same order.
    All sources are read before anything is written (so swaps work); messages between a pair of
    ranks are packed into one buffer each way and sent with ``batch_isend_irecv``. Afterwards the
    slots hold ``plan.phy2log``'s experts. Returns byte and message counts for this rank."""
    dist = _dist()
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    if world != plan.num_gpus:
        raise ValueError(f"group: the plan is for {plan.num_gpus} ranks, the group has {world}")
    get = slot_tensors if callable(slot_tensors) else (lambda layer, slot: slot_tensors[layer][slot])
    tr = plan.transfers.tolist()

    device = get(0, 0)[0].device if len(tr) else torch.device("cpu")

    def pack(rows) -> Optional[torch.Tensor]:
        parts = [b.to(device) for (layer, _, _, s_slot, _, _) in rows for t in get(layer, s_slot) for b in _as_bytes(t)]
        return torch.cat(parts) if parts else None

    def nbytes(rows) -> int:
        return sum(
            _aligned(t.numel() * t.element_size()) for (layer, _, _, _, _, d_slot) in rows for t in get(layer, d_slot)
        )

    # A fixed-size header first: ranks holding different plans or expert shapes would post
    # sends and receives of different sizes (a hang or a size error); they all raise here instead.
    from .. import _agree

    sig = _agree.shapes_key(get(0, 0)) if len(tr) else ()
    _agree.agree(
        _agree.all_gather_fixed(dist, group, device=device),
        "migrate_experts", "the plan (phy2log, transfers) or the shapes and dtypes of the slot tensors",
        _agree.config_hash(plan.phy2log.tolist(), tr, sig), len(tr),
    )

    local = [r for r in tr if r[2] == rank and r[4] == rank]
    sends: Dict[int, list] = {}
    recvs: Dict[int, list] = {}
    for r in tr:
        if r[2] == rank and r[4] != rank:
            sends.setdefault(r[4], []).append(r)
        elif r[4] == rank and r[2] != rank:
            recvs.setdefault(r[2], []).append(r)

    # Read every source first.
    local_buf = pack(local)
    send_bufs = {peer: pack(rows) for peer, rows in sorted(sends.items())}
    recv_bufs = {
        peer: torch.empty(nbytes(rows), dtype=torch.uint8, device=device) for peer, rows in sorted(recvs.items())
    }
    ops = []
    glob = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    for peer, buf in send_bufs.items():
        ops.append(dist.P2POp(dist.isend, buf, glob(peer), group))
    for peer, buf in recv_bufs.items():
        ops.append(dist.P2POp(dist.irecv, buf, glob(peer), group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    def unpack(rows, buf) -> None:
        off = 0
        with torch.no_grad():
            for layer, _, _, _, _, d_slot in rows:
                for t in get(layer, d_slot):
                    n = t.numel() * t.element_size()
                    t.copy_(buf[off : off + n].view(t.dtype).view(t.shape))
                    off += _aligned(n)

    if local_buf is not None:
        unpack(local, local_buf)
    for peer, rows in recvs.items():
        unpack(rows, recv_bufs[peer])
    return {
        "bytes_sent": float(sum(b.numel() for b in send_bufs.values() if b is not None)),
        "bytes_received": float(sum(b.numel() for b in recv_bufs.values())),
        "local_bytes": float(local_buf.numel() if local_buf is not None else 0),
        "messages": float(len(ops)),
    }
