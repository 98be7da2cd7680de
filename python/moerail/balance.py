"""Expert load statistics and dynamic expert placement (EDPB): measure, predict, place, migrate.

The loop, as Pangu Ultra MoE's EDPB and DeepSeek's EPLB run it:

1. **Measure** - :class:`LoadTracker` accumulates tokens per expert per MoE layer from the
   router's counts (no extra pass over tokens), reduces them across ranks once per step, keeps
   a sliding window, and exports a per-step dict, a JSON/CSV trace and a heatmap.
2. **Predict** - EMA, window mean or linear trend of the next interval's load;
   :meth:`LoadTracker.backtest` says which predicts best on the recorded history.
3. **Place** - :func:`rebalance_experts` (EPLB's format: ``phy2log``, ``log2phy``, ``logcnt``),
   ``mode="eplb"`` (DeepSeek's algorithm exactly) or ``mode="refine"`` (never worse).
4. **Decide** - :func:`plan_migration` lists the transfers (slots matched so experts stay put)
   and prices them on a :class:`LinkModel`; :func:`should_migrate` weighs the predicted step
   time gain over a horizon against that cost, and logs the decision.
5. **Migrate** - :func:`migrate_experts` moves expert weights and their optimizer state between
   ranks with torch.distributed. Replicas stay identical: :func:`allreduce_replica_grads` sums
   their gradients, and :func:`select_replicas` sends each token to one replica of its expert,
   deterministically and evenly.

The algorithms run in Rust (``moerail._native``), in parallel over layers, with results that do
not depend on the thread count. Placements live on the CPU as int64 tensors: ``phy2log [L, R]``
is the logical expert in each physical slot; slot ``s`` is slot ``s % (R // G)`` of rank
``s // (R // G)`` for ``G`` devices (EP ranks).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _checks, _native

__all__ = [
    "LinkModel",
    "LoadTracker",
    "MigrationDecision",
    "MigrationPlan",
    "allreduce_replica_grads",
    "default_placement",
    "expand_placement",
    "expert_seconds_per_token",
    "expert_slot_tensors",
    "improve_placement",
    "load_loads",
    "log2phy_from_phy2log",
    "lower_bound",
    "migrate_experts",
    "placement_metrics",
    "plan_migration",
    "rebalance_experts",
    "select_replicas",
    "select_replicas_map",
    "should_migrate",
]

logger = logging.getLogger("moerail.balance")

MODES = ("eplb", "refine")
PREDICTORS = ("ema", "mean", "trend")

# ------------------------------------------------------------------------------------------------
# argument helpers
# ------------------------------------------------------------------------------------------------


def _loads(x, name: str, *, ndim: int = 2, doc: str = "[num_layers, num_experts]") -> torch.Tensor:
    """A float64 CPU contiguous copy of a load matrix (tensor, numpy array or nested list)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}: expected a tensor or an array of numbers ({e})") from None
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: expected real numbers, got {str(x.dtype).replace('torch.', '')}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {doc}, got shape {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float64).contiguous()


def _placement(x, name: str, num_layers: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {str(x.dtype).replace('torch.', '')}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [num_layers, num_replicas], got shape {tuple(x.shape)}")
    if num_layers is not None and x.shape[0] != num_layers:
        raise ValueError(f"{name}: expected {num_layers} layers, got {x.shape[0]}")
    return x.detach().to(device="cpu", dtype=torch.int64).contiguous()


def _int(v, name: str, minimum: int = 1) -> int:
    return _checks.integer(v, name, minimum=minimum)


# ------------------------------------------------------------------------------------------------
# placement
# ------------------------------------------------------------------------------------------------


def rebalance_experts(
    weight,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    mode: str = "eplb",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Places and replicates experts so the busiest device carries little more than the mean.

    ``weight [num_layers, num_experts]``: expected load (tokens) per expert, finite and >= 0.
    ``num_replicas`` physical slots per layer (a multiple of ``num_gpus``, at least the number of
    experts), ``num_groups`` expert groups (dividing the number of experts), ``num_nodes`` nodes
    (dividing ``num_gpus``).

    * ``mode="eplb"``: DeepSeek's EPLB, identical output on inputs without ties. Hierarchical
      when ``num_groups % num_nodes == 0`` (groups packed to nodes, replication inside each node,
      replicas packed to its GPUs), else global (one group, one node). Ties go to the lower index.
    * ``mode="refine"``: EPLB followed by improving swaps, re-replication and (hierarchical)
      group swaps between nodes; never a busier device than ``eplb``, same constraints.

    Returns EPLB's ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])`` (int64, CPU):
    ``log2phy[l, e, r]`` is the slot of replica ``r`` of expert ``e``, -1 past ``logcnt[l, e]``.
    """
    w = _loads(weight, "weight")
    num_replicas = _int(num_replicas, "num_replicas")
    num_groups = _int(num_groups, "num_groups")
    num_nodes = _int(num_nodes, "num_nodes")
    num_gpus = _int(num_gpus, "num_gpus")
    _checks.one_of(mode, "mode", MODES)
    num_layers, num_experts = w.shape
    phy2log = torch.empty(num_layers, num_replicas, dtype=torch.int64)
    phyrank = torch.empty_like(phy2log)
    logcnt = torch.empty(num_layers, num_experts, dtype=torch.int64)
    _native.rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus, mode, phy2log, phyrank, logcnt)
    return phy2log, _log2phy(phy2log, phyrank, logcnt), logcnt


def improve_placement(
    weight,
    current_phy2log,
    num_gpus: int,
    num_nodes: int = 1,
    *,
    keep_nodes: Optional[bool] = None,
    max_moves: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebalances incrementally: improves ``current_phy2log [L, R]`` for the loads ``weight [L, E]``
    with ``mode="refine"``'s moves (swapping replicas between devices, giving a replica to another
    expert) instead of placing from scratch, so the migration stays small. At most ``max_moves``
    slots change per layer (default: no limit); the busiest device is never busier than with
    ``current_phy2log``; unchanged slots keep their expert, so ``plan_migration`` moves at most the
    changed slots. ``keep_nodes`` (default: when ``num_nodes > 1`` and every expert's replicas are
    in one node, as in EPLB's hierarchical placements) keeps each expert's replicas in its node.
    Returns ``(phy2log, log2phy, logcnt)`` like :func:`rebalance_experts`."""
    w = _loads(weight, "weight")
    cur = _placement(current_phy2log, "current_phy2log", w.shape[0])
    num_gpus = _int(num_gpus, "num_gpus")
    num_nodes = _int(num_nodes, "num_nodes")
    if max_moves is not None:
        max_moves = _int(max_moves, "max_moves", minimum=0)
    if keep_nodes is None:
        keep_nodes = num_nodes > 1 and cur.shape[1] % num_nodes == 0 and _within_nodes(cur, num_nodes)
    num_layers, num_experts = w.shape
    phy2log = torch.empty_like(cur)
    phyrank = torch.empty_like(cur)
    logcnt = torch.empty(num_layers, num_experts, dtype=torch.int64)
    _native.improve_placement(w, cur, num_gpus, num_nodes, bool(keep_nodes), max_moves, phy2log, phyrank, logcnt)
    return phy2log, _log2phy(phy2log, phyrank, logcnt), logcnt


def _within_nodes(p: torch.Tensor, num_nodes: int) -> bool:
    """Whether every expert's replicas sit in one node."""
    num_layers, num_replicas = p.shape
    node = (torch.arange(num_replicas) // (num_replicas // num_nodes)).expand(num_layers, -1)
    e_max = int(p.max()) + 1 if p.numel() else 1
    lo = torch.full((num_layers, e_max), num_nodes, dtype=torch.int64).scatter_reduce(1, p, node, "amin")
    hi = torch.full((num_layers, e_max), -1, dtype=torch.int64).scatter_reduce(1, p, node, "amax")
    present = hi >= 0
    return bool((lo[present] == hi[present]).all())


def _log2phy(phy2log: torch.Tensor, phyrank: Optional[torch.Tensor], logcnt: torch.Tensor) -> torch.Tensor:
    x = max(int(logcnt.max()) if logcnt.numel() else 1, 1)
    out = torch.empty(phy2log.shape[0], logcnt.shape[1], x, dtype=torch.int64)
    _native.fill_log2phy(phy2log, out, phyrank)
    return out


def log2phy_from_phy2log(phy2log, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log2phy [L, E, X], logcnt [L, E])`` of a placement, replica ranks in ascending slot
    order (for placements that did not come from :func:`rebalance_experts`)."""
    p = _placement(phy2log, "phy2log")
    num_experts = _int(num_experts, "num_experts")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_experts):
        raise ValueError(f"phy2log: expert ids must be in [0, {num_experts})")
    num_layers, num_replicas = p.shape
    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    logcnt.scatter_add_(1, p, torch.ones_like(p))
    if bool((logcnt == 0).any()):
        layer, expert = (logcnt == 0).nonzero()[0].tolist()
        raise ValueError(f"phy2log: layer {layer} has no slot for expert {expert}: every expert needs a replica")
    return _log2phy(p, None, logcnt), logcnt


def default_placement(num_layers: int, num_experts: int, num_gpus: int) -> torch.Tensor:
    """Megatron's layout without replication: expert ``e`` on EP rank ``e // (E / G)``
    (``phy2log[l] = arange(E)``)."""
    num_layers = _int(num_layers, "num_layers", minimum=0)
    num_experts = _int(num_experts, "num_experts")
    num_gpus = _int(num_gpus, "num_gpus")
    if num_experts % num_gpus:
        raise ValueError(f"num_gpus: must divide num_experts ({num_experts}) for the default layout, got {num_gpus}")
    return torch.arange(num_experts, dtype=torch.int64).repeat(num_layers, 1)


def expand_placement(phy2log, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """A placement on more slots per device without moving anything: each device keeps its
    experts and fills its new slots with copies of them, in turn (the state right after a device
    allocates its new slots locally). ``phy2log [L, R0]`` -> ``[L, num_replicas]``; a placement
    that already has ``num_replicas`` slots is returned as is."""
    p = _placement(phy2log, "phy2log")
    num_replicas = _int(num_replicas, "num_replicas")
    num_gpus = _int(num_gpus, "num_gpus")
    num_layers, r0 = p.shape
    if r0 == num_replicas:
        return p
    if r0 % num_gpus or num_replicas % num_gpus or num_replicas < r0:
        raise ValueError(
            f"num_replicas: expected a multiple of num_gpus ({num_gpus}) no smaller than the current {r0} slots, "
            f"got {num_replicas}"
        )
    old, new = r0 // num_gpus, num_replicas // num_gpus
    per_device = p.view(num_layers, num_gpus, old)
    idx = torch.arange(new) % old
    return per_device[:, :, idx].reshape(num_layers, num_replicas).contiguous()


def placement_metrics(
    load,
    phy2log,
    num_gpus: int,
    num_nodes: int = 1,
    capacity: Optional[float] = None,
) -> Dict[str, object]:
    """Metrics of a placement for given loads (an expert's load is split evenly over its
    replicas, as :func:`select_replicas` does).

    Per layer (tensors ``[L]`` unless noted): ``device_load [L, G]``, ``node_load [L, N]``,
    ``max_mean_device``, ``max_mean_node``, ``cv_device`` (std / mean), ``lower_bound`` (the best
    max/mean any placement on these slots can reach), ``dropped`` and ``dropped_rate`` (tokens
    over ``capacity`` tokens per slot, 0 without capacity), ``total``. ``summary`` holds floats:
    means over layers, the worst layer, and ``step_max_mean`` = sum of busiest loads / sum of mean
    loads (what a step waits for when layers run one after another).
    """
    w = _loads(load, "load")
    p = _placement(phy2log, "phy2log", w.shape[0])
    num_gpus = _int(num_gpus, "num_gpus")
    num_nodes = _int(num_nodes, "num_nodes")
    if capacity is not None:
        capacity = _checks.real(capacity, "capacity")
    num_layers = w.shape[0]
    device_load = torch.empty(num_layers, num_gpus, dtype=torch.float64)
    node_load = torch.empty(num_layers, num_nodes, dtype=torch.float64)
    scalars = torch.empty(num_layers, 6, dtype=torch.float64)
    _native.placement_metrics(w, p, num_gpus, num_nodes, capacity, device_load, node_load, scalars)
    total = scalars[:, 5]
    dropped = scalars[:, 4]
    out: Dict[str, object] = {
        "device_load": device_load,
        "node_load": node_load,
        "max_mean_device": scalars[:, 0].clone(),
        "max_mean_node": scalars[:, 1].clone(),
        "cv_device": scalars[:, 2].clone(),
        "lower_bound": scalars[:, 3].clone(),
        "dropped": dropped.clone(),
        "dropped_rate": torch.where(total > 0, dropped / total.clamp_min(1e-300), torch.zeros_like(total)),
        "total": total.clone(),
    }
    mean_load = total / num_gpus
    busiest = device_load.max(dim=1).values if num_layers else torch.zeros(0, dtype=torch.float64)
    sum_mean = float(mean_load.sum())
    out["summary"] = {
        "max_mean_device": float(scalars[:, 0].mean()) if num_layers else 1.0,
        "max_mean_device_worst": float(scalars[:, 0].max()) if num_layers else 1.0,
        "max_mean_node": float(scalars[:, 1].mean()) if num_layers else 1.0,
        "cv_device": float(scalars[:, 2].mean()) if num_layers else 0.0,
        "lower_bound": float(scalars[:, 3].mean()) if num_layers else 1.0,
        "step_max_mean": float(busiest.sum()) / sum_mean if sum_mean > 0 else 1.0,
        "dropped_rate": float(dropped.sum() / total.sum()) if float(total.sum()) > 0 else 0.0,
    }
    return out


def lower_bound(load, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """Per layer, the smallest max/mean device load any placement on ``num_replicas`` slots of
    ``num_gpus`` devices can reach: ``max(1, G * min over replica counts of max_e w_e / c_e / W)``."""
    w = _loads(load, "load")
    num_replicas = _int(num_replicas, "num_replicas")
    num_gpus = _int(num_gpus, "num_gpus")
    num_layers, num_experts = w.shape
    # any valid placement gives the same bound: use EPLB's
    p, _, _ = rebalance_experts(w, num_replicas, 1, 1, num_gpus)
    return placement_metrics(w, p, num_gpus)["lower_bound"]


# ------------------------------------------------------------------------------------------------
# load files
# ------------------------------------------------------------------------------------------------


def load_loads(path: str) -> torch.Tensor:
    """Reads loads from a file: ``.npy``, ``.pt`` (a tensor), ``.csv`` (a LoadTracker trace with
    columns ``step,layer,expert,tokens``, or a plain matrix with one layer a row), ``.json`` (a
    LoadTracker trace, or a nested list ``[L][E]``). Returns ``[L, E]`` float64; a trace gives the
    mean over its steps, a ``[T, L, E]`` array the mean over ``T``."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        arr = torch.as_tensor(np.load(path))
    elif ext in (".pt", ".pth"):
        arr = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(arr, dict):
            arr = arr.get("loads", arr.get("history"))
    elif ext == ".json":
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "steps" in data:
            arr = torch.tensor([s["loads"] for s in data["steps"]], dtype=torch.float64)
        elif isinstance(data, dict) and "loads" in data:
            arr = torch.tensor(data["loads"], dtype=torch.float64)
        else:
            arr = torch.tensor(data, dtype=torch.float64)
    elif ext == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if rows and [c.strip() for c in rows[0][:4]] == ["step", "layer", "expert", "tokens"]:
            body = np.array([[float(c) for c in r[:4]] for r in rows[1:] if r], dtype=np.float64)
            steps = np.unique(body[:, 0])
            num_layers = int(body[:, 1].max()) + 1
            num_experts = int(body[:, 2].max()) + 1
            a = np.zeros((len(steps), num_layers, num_experts))
            step_index = {s: i for i, s in enumerate(steps)}
            for s, layer, expert, tokens in body:
                a[step_index[s], int(layer), int(expert)] = tokens
            arr = torch.as_tensor(a)
        else:
            arr = torch.as_tensor(np.array([[float(c) for c in r] for r in rows if r], dtype=np.float64))
    else:
        raise ValueError(f"loads: unknown file type {ext!r} (expected .npy, .pt, .csv or .json)")
    if not isinstance(arr, torch.Tensor):
        raise ValueError(f"loads: {path} holds no tensor")
    arr = arr.to(torch.float64)
    if arr.dim() == 3:
        arr = arr.mean(0)
    if arr.dim() == 1:
        arr = arr.unsqueeze(0)
    if arr.dim() != 2:
        raise ValueError(f"loads: expected [num_layers, num_experts] in {path}, got shape {tuple(arr.shape)}")
    return arr.contiguous()


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


class LoadTracker:
    """Tokens per expert per MoE layer, step by step.

    Call :meth:`record` with each layer's ``tokens_per_expert`` (what ``moerail.topk_route(...,
    return_tokens_per_expert=True)`` or Megatron's router counts), and :meth:`step` once per
    training step: it all-reduces the step's counts over ``group`` (the ranks that route different
    tokens for these layers: data-parallel x context-parallel x expert-parallel, e.g. Megatron's
    ``get_tensor_and_data_parallel_group(with_context_parallel=True)``), appends them to a
    sliding window of ``window`` steps and returns the step's record. Counts accumulate on their
    own device; the only host sync is in :meth:`step`.

    Predictions (:meth:`predict`) are the mean load per step over the next ``horizon`` steps:
    ``"ema"`` (``ema_alpha``), ``"mean"`` and ``"trend"`` (least-squares line over the last
    ``trend_window`` steps), or ``"best"``: the one with the smallest backtest error
    (:meth:`backtest`) on the recorded window.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        window: int = 128,
        ema_alpha: float = 0.2,
        trend_window: int = 16,
        group=None,
        keep_trace: bool = True,
    ):
        self.num_layers = _int(num_layers, "num_layers")
        self.num_experts = _int(num_experts, "num_experts")
        self.window = _int(window, "window")
        self.ema_alpha = _checks.real(ema_alpha, "ema_alpha", positive=True)
        if self.ema_alpha > 1:
            raise ValueError(f"ema_alpha: must be in (0, 1], got {self.ema_alpha}")
        self.trend_window = _int(trend_window, "trend_window")
        self.group = group
        self.keep_trace = keep_trace
        self._acc: Optional[torch.Tensor] = None
        self._history: deque = deque(maxlen=self.window)
        self._steps = 0
        self._placement: Optional[Tuple[torch.Tensor, int, int, Optional[float]]] = None
        self.trace: List[Dict[str, object]] = []

    # -- recording --------------------------------------------------------------------------

    def record(self, layer: int, tokens_per_expert: torch.Tensor) -> None:
        """Adds one layer's counts ``[num_experts]`` (any device, integer or float) to this step."""
        layer = _checks.integer(layer, "layer", minimum=0, maximum=self.num_layers - 1)
        t = _checks.tensor(tokens_per_expert, "tokens_per_expert", ndim=1)
        if t.shape[0] != self.num_experts:
            raise ValueError(f"tokens_per_expert: expected {self.num_experts} entries, got {t.shape[0]}")
        if self._acc is None:
            self._acc = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=t.device)
        self._acc[layer].add_(t.detach().to(device=self._acc.device, dtype=torch.float64))

    def record_all(self, tokens: torch.Tensor) -> None:
        """Adds all layers' counts ``[num_layers, num_experts]`` to this step."""
        t = _checks.tensor(tokens, "tokens", ndim=2)
        if tuple(t.shape) != (self.num_layers, self.num_experts):
            raise ValueError(f"tokens: expected shape {(self.num_layers, self.num_experts)}, got {tuple(t.shape)}")
        for layer in range(self.num_layers):
            self.record(layer, t[layer])

    def hook_routers(self, routers: Sequence[torch.nn.Module]) -> list:
        """Records router ``i``'s counts as layer ``i`` on each of its forward passes; returns the
        hook handles (``handle.remove()`` detaches).

        A router's output is ``(probs, routing_map [T, E])`` (Megatron's ``TopKRouter``: the count
        is one column sum of the boolean map, not a pass over the hidden states), or a tuple whose
        third value is ``tokens_per_expert`` (``moerail.topk_route(...,
        return_tokens_per_expert=True)`` wrapped in a module: counted in the routing pass itself).
        Forward passes without grad (evaluation, activation recomputation) are not counted, as
        Megatron's own expert-bias counts are not."""
        if len(routers) != self.num_layers:
            raise ValueError(f"routers: expected {self.num_layers} (one per MoE layer), got {len(routers)}")

        def make(layer: int):
            def hook(module, inputs, output):
                if not torch.is_grad_enabled():
                    return
                if not isinstance(output, (tuple, list)) or len(output) < 2:
                    raise TypeError("routers: expected a router returning (probs, routing_map[, tokens_per_expert])")
                if len(output) >= 3 and isinstance(output[2], torch.Tensor) and output[2].dim() == 1:
                    counts = output[2]
                else:
                    counts = output[1].reshape(-1, self.num_experts).sum(0)
                self.record(layer, counts)

            return hook

        return [r.register_forward_hook(make(i)) for i, r in enumerate(routers)]

    def set_placement(self, phy2log, num_gpus: int, num_nodes: int = 1, capacity: Optional[float] = None) -> None:
        """The placement the per-step records measure (device and node balance)."""
        p = _placement(phy2log, "phy2log", self.num_layers)
        self._placement = (p, _int(num_gpus, "num_gpus"), _int(num_nodes, "num_nodes"), capacity)

    def step(self) -> Dict[str, object]:
        """Closes the step: reduces its counts across ``group``, records them, returns a dict."""
        acc = self._acc
        if acc is None:
            acc = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=self.group)
        loads = acc.detach().to("cpu", copy=True)
        if bool((loads < 0).any()) or not bool(torch.isfinite(loads).all()):
            raise ValueError("tokens_per_expert: recorded counts must be finite and >= 0")
        self._acc = None if self._acc is None else torch.zeros_like(self._acc)
        self._history.append(loads)
        rec = self._record(self._steps, loads)
        self._steps += 1
        if self.keep_trace:
            self.trace.append(rec)
        return rec

    def _record(self, step: int, loads: torch.Tensor) -> Dict[str, object]:
        per_layer = loads.sum(1)
        mean = per_layer / self.num_experts
        expert_max_mean = torch.where(mean > 0, loads.max(1).values / mean.clamp_min(1e-300), torch.ones_like(mean))
        rec: Dict[str, object] = {
            "step": step,
            "tokens": float(per_layer.sum()),
            "loads": loads.tolist(),
            "max_mean_expert": expert_max_mean.tolist(),
        }
        if self._placement is not None:
            p, g, n, cap = self._placement
            m = placement_metrics(loads, p, g, n, cap)
            for k in ("max_mean_device", "max_mean_node", "cv_device", "lower_bound", "dropped_rate"):
                rec[k] = m[k].tolist()
            rec["summary"] = m["summary"]
        return rec

    # -- history and prediction ---------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Steps recorded so far (the window keeps the last ``window``)."""
        return self._steps

    @property
    def history(self) -> torch.Tensor:
        """``[T, num_layers, num_experts]`` float64, oldest step first (the last ``window``)."""
        if not self._history:
            return torch.zeros(0, self.num_layers, self.num_experts, dtype=torch.float64)
        return torch.stack(list(self._history))

    def _flat_history(self) -> torch.Tensor:
        h = self.history
        if h.shape[0] == 0:
            raise ValueError("history: no step recorded yet (call step() first)")
        return h.reshape(h.shape[0], -1).contiguous()

    def predict(self, method: str = "best", horizon: int = 1) -> torch.Tensor:
        """Predicted mean load per step over the next ``horizon`` steps, ``[L, E]`` float64."""
        _checks.one_of(method, "method", PREDICTORS + ("best",))
        horizon = _int(horizon, "horizon")
        if method == "best":
            method = self.backtest(horizon)["best"]
        h = self._flat_history()
        out = torch.empty(h.shape[1], dtype=torch.float64)
        _native.predict_load(h, method, self.ema_alpha, self.trend_window, horizon, out)
        return out.view(self.num_layers, self.num_experts)

    @property
    def ema(self) -> torch.Tensor:
        """EMA of the window, ``[L, E]``."""
        return self.predict("ema")

    def backtest(self, horizon: int = 1, warmup: Optional[int] = None) -> Dict[str, object]:
        """Replays the window: from each prefix, predict the next ``horizon`` steps' mean and
        compare. Returns ``{method: {"wape", "rmse", "points"}, "best": method}`` (WAPE = sum of
        absolute errors / sum of actual loads). With too short a history, ``best`` is ``"ema"``."""
        horizon = _int(horizon, "horizon")
        h = self._flat_history()
        if warmup is None:
            warmup = min(max(2, self.trend_window // 2), max(1, h.shape[0] - horizon))
        warmup = _int(warmup, "warmup")
        out: Dict[str, object] = {}
        best, best_err = "ema", math.inf
        for m in PREDICTORS:
            abs_err, total, sq, count = _native.backtest_predictor(
                h, m, self.ema_alpha, self.trend_window, horizon, warmup
            )
            wape = abs_err / total if total > 0 else (0.0 if abs_err == 0 else math.inf)
            rmse = math.sqrt(sq / count) if count else math.nan
            out[m] = {"wape": wape, "rmse": rmse, "points": count}
            if count and wape < best_err:
                best, best_err = m, wape
        out["best"] = best
        return out

    # -- metrics and export -------------------------------------------------------------------

    def metrics(self, phy2log, num_gpus: int, num_nodes: int = 1, capacity=None, load=None) -> Dict[str, object]:
        """:func:`placement_metrics` of ``phy2log`` on ``load`` (default: the window's mean)."""
        if load is None:
            h = self.history
            if h.shape[0] == 0:
                raise ValueError("history: no step recorded yet (call step() first)")
            load = h.mean(0)
        return placement_metrics(load, phy2log, num_gpus, num_nodes, capacity)

    def save_trace(self, path: str) -> None:
        """Writes the per-step records: ``.json`` (everything) or ``.csv`` (``step,layer,expert,
        tokens`` plus per-layer metrics when a placement is set)."""
        ext = os.path.splitext(path)[1].lower()
        if ext == ".json":
            with open(path, "w") as f:
                json.dump(
                    {"num_layers": self.num_layers, "num_experts": self.num_experts, "steps": self.trace}, f
                )
        elif ext == ".csv":
            with open(path, "w", newline="") as f:
                wr = csv.writer(f)
                extra = [k for k in ("max_mean_device", "max_mean_node", "cv_device") if self.trace and k in self.trace[0]]
                wr.writerow(["step", "layer", "expert", "tokens", "max_mean_expert", *extra])
                for rec in self.trace:
                    for layer, row in enumerate(rec["loads"]):
                        layer_vals = [rec["max_mean_expert"][layer]] + [rec[k][layer] for k in extra]
                        for expert, tokens in enumerate(row):
                            wr.writerow([rec["step"], layer, expert, tokens, *layer_vals])
        else:
            raise ValueError(f"path: expected a .json or .csv file, got {path!r}")

    def plot_heatmap(
        self, path: str, phy2log=None, num_gpus: Optional[int] = None, num_nodes: int = 1, load=None, before=None
    ) -> None:
        """Writes a PNG: load per (layer, expert) and, with a placement (or ``num_gpus`` dividing
        the number of experts, for Megatron's default layout), per (layer, device), each as a
        multiple of the layer's mean; ``before`` adds the device panel of another placement."""
        if load is None:
            h = self.history
            if h.shape[0] == 0:
                raise ValueError("history: no step recorded yet (call step() first)")
            load = h.mean(0)
        plot_heatmap(path, load, phy2log, num_gpus, num_nodes, before=before)

    def state_dict(self) -> Dict[str, object]:
        return {"history": self.history, "steps": self._steps}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        h = state["history"]
        self._history = deque(list(h), maxlen=self.window)
        self._steps = int(state["steps"])


def plot_heatmap(
    path: str,
    load,
    phy2log=None,
    num_gpus: Optional[int] = None,
    num_nodes: int = 1,
    *,
    before=None,
) -> None:
    """Heatmaps, each value a multiple of its layer's mean: ``load [L, E]`` (layers x experts),
    then layers x devices for ``before`` (a placement to compare with) and ``phy2log`` (or
    Megatron's default layout when ``num_gpus`` divides the number of experts). Needs
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("plot_heatmap needs matplotlib (pip install matplotlib)") from e
    w = _loads(load, "load")
    num_layers, num_experts = w.shape
    rel = (w / w.mean(1, keepdim=True).clamp_min(1e-300)).numpy()
    panels = [("tokens per expert / layer mean", rel, "expert")]
    if phy2log is None and num_gpus is not None and num_experts % num_gpus == 0:
        phy2log = default_placement(num_layers, num_experts, num_gpus)
    if (phy2log is not None or before is not None) and num_gpus is None:
        raise ValueError("num_gpus: needed with a placement")
    for name, p in (("before", before), ("placement", phy2log)):
        if p is None:
            continue
        m = placement_metrics(w, p, num_gpus, num_nodes)
        dl = m["device_load"]
        title = (
            f"{name}: device load / mean (max/mean {m['summary']['max_mean_device']:.3f}, "
            f"bound {m['summary']['lower_bound']:.3f})"
        )
        panels.append((title, (dl / dl.mean(1, keepdim=True).clamp_min(1e-300)).numpy(), "device"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.25 * num_layers + 2.5), squeeze=False)
    vmax = max(float(d.max()) for _, d, _ in panels)
    for ax, (title, data, xlabel) in zip(axes[0], panels):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# migration planning and decision
# ------------------------------------------------------------------------------------------------


@dataclass
class LinkModel:
    """Bandwidths in bytes/s per device and direction, latency in seconds per message.

    Defaults: H800-class nodes (DeepEP measures ~153-158 GB/s over NVLink inside a node and
    43-58 GB/s over 400 Gb/s InfiniBand between nodes)."""

    intra_node_bw: float = 150e9
    inter_node_bw: float = 45e9
    latency: float = 20e-6
    local_bw: float = 1.0e12
    #: Latency of a message between nodes (None: ``latency``).
    inter_node_latency: Optional[float] = None
    #: Bytes/s a node can send between nodes in all (all its NICs); inf: no shared limit.
    node_bw: float = float("inf")
    #: Fixed seconds a stage of an exchange costs (launch, synchronisation).
    stage_overhead: float = 0.0


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
    n, seconds, intra, inter, local = _native.plan_migration(
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
    res = _native.decide_migration(
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
# replica choice (what the dispatcher calls)
# ------------------------------------------------------------------------------------------------


def _table(log2phy, logcnt) -> Tuple[torch.Tensor, torch.Tensor]:
    t = _checks.tensor(torch.as_tensor(log2phy), "log2phy", ndim=2, dtypes=_checks.INT_DTYPES,
                       shape_doc="[num_experts, max_replicas] (one layer)")
    c = _checks.tensor(torch.as_tensor(logcnt), "logcnt", ndim=1, dtypes=_checks.INT_DTYPES, shape_doc="[num_experts]")
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
    _native.select_replicas(idx_cpu, t, c, num_replicas, offset, out)
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
        _native.select_replicas_map(m_cpu, t, c, num_replicas, offset, out_map)
        return out_map.to(dev), None
    p = _checks.tensor(probs, "probs", ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if p.shape != m.shape:
        raise ValueError(f"probs: expected shape {tuple(m.shape)} (the shape of routing_map), got {tuple(p.shape)}")
    p_cpu = p.detach().to("cpu").contiguous()
    out_probs = torch.empty(m.shape[0], num_replicas, dtype=p.dtype)
    _native.select_replicas_map(m_cpu, t, c, num_replicas, offset, out_map, p_cpu, out_probs)
    return out_map.to(dev), out_probs.to(dev)


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
