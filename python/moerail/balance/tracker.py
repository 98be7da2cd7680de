"""Expert load statistics: :class:`LoadTracker` (measure, predict, export a trace) and
:func:`load_loads` (read a trace or an array of loads back)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _checks, _native
from ._args import _int, _placement
from .placement import placement_metrics
from .plot import plot_heatmap

__all__ = ["LoadTracker", "load_loads"]

PREDICTORS = ("ema", "mean", "trend")


# ------------------------------------------------------------------------------------------------
# load files
# ------------------------------------------------------------------------------------------------


def load_loads(path: str) -> torch.Tensor:
    """Reads loads from a file: ``.npy``, ``.pt`` (a tensor), ``.csv`` (a LoadTracker trace with
    columns ``step,layer,expert,tokens``, or a plain matrix with one layer a row), ``.json`` (a
    LoadTracker trace, or a nested list ``[L][E]``). Returns ``[L, E]`` float64; a trace gives the
    mean over its steps, a ``[T, L, E]`` array the mean over ``T``."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in (".npy", ".pt", ".pth", ".json", ".csv"):
        raise ValueError(f"loads: unknown file type {ext!r} (expected .npy, .pt, .csv or .json)")
    try:
        arr = _read_loads(path, ext)
    except OSError as e:
        raise ValueError(f"loads: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        if str(e).startswith("loads: "):
            raise
        raise ValueError(f"loads: {path} is not a valid {ext} loads file: {e}") from None
    except Exception as e:  # noqa: BLE001 - corrupt files raise anything (pickle, zip, json, numpy)
        raise ValueError(f"loads: {path} is not a valid {ext} loads file ({type(e).__name__}: {e})") from None
    if not isinstance(arr, torch.Tensor):
        raise ValueError(f"loads: {path} holds no tensor")
    if arr.is_complex():
        raise ValueError(f"loads: {path} holds complex values ({arr.dtype}); token counts are real")
    if not (arr.is_floating_point() or arr.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"loads: {path} holds {arr.dtype} values; expected numbers")
    arr = arr.to(torch.float64)
    if arr.dim() == 3:
        if arr.shape[0] == 0:
            raise ValueError(f"loads: {path} holds no step")
        arr = arr.mean(0)
    if arr.dim() == 1:
        arr = arr.unsqueeze(0)
    if arr.dim() != 2:
        raise ValueError(f"loads: expected [num_layers, num_experts] in {path}, got shape {tuple(arr.shape)}")
    if arr.numel() == 0:
        raise ValueError(f"loads: {path} is empty (shape {tuple(arr.shape)}); expected [num_layers, num_experts]")
    if not bool(torch.isfinite(arr).all()) or bool((arr < 0).any()):
        raise ValueError(f"loads: {path} holds negative or non-finite counts")
    return arr.contiguous()


def _read_loads(path: str, ext: str):
    if ext == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.dtype.kind not in "biuf c":
            raise ValueError(f"loads: {path} holds {a.dtype} values; expected numbers")
        return torch.as_tensor(a) if a.dtype.kind != "b" else torch.as_tensor(a.astype(np.float64))
    if ext in (".pt", ".pth"):
        arr = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(arr, dict):
            arr = arr.get("loads", arr.get("history"))
        return arr
    if ext == ".json":
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "steps" in data:
            return torch.tensor([s["loads"] for s in data["steps"]], dtype=torch.float64)
        if isinstance(data, dict) and "loads" in data:
            return torch.tensor(data["loads"], dtype=torch.float64)
        return torch.tensor(data, dtype=torch.float64)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows and [c.strip() for c in rows[0][:4]] == ["step", "layer", "expert", "tokens"]:
        body = np.array([[float(c) for c in r[:4]] for r in rows[1:] if r], dtype=np.float64)
        if body.shape[0] == 0:
            raise ValueError(f"loads: the trace {path} has a header but no rows")
        if body.ndim != 2 or body.shape[1] != 4:
            raise ValueError(f"loads: every row of the trace {path} needs step,layer,expert,tokens")
        ids = body[:, 1:3]
        if (ids < 0).any() or (ids != np.floor(ids)).any() or (ids > 2**20).any():
            raise ValueError(f"loads: the trace {path} has a layer or expert id that is not an integer in [0, 2**20]")
        steps = np.unique(body[:, 0])
        num_layers = int(body[:, 1].max()) + 1
        num_experts = int(body[:, 2].max()) + 1
        a = np.zeros((len(steps), num_layers, num_experts))
        step_index = {s: i for i, s in enumerate(steps)}
        for s, layer, expert, tokens in body:
            a[step_index[s], int(layer), int(expert)] = tokens
        return torch.as_tensor(a)
    return torch.as_tensor(np.array([[float(c) for c in r] for r in rows if r], dtype=np.float64))


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
        # The step is closed whatever happens below: a bad step (NaN counts) raises once and the
        # next step starts from zero.
        self._acc = None if self._acc is None else torch.zeros_like(self._acc)
        if self.group is not None:
            import torch.distributed as dist

            from .. import _agree

            # A fixed-size header first: ranks that disagree on the matrix's shape raise here
            # instead of failing the all-reduce's size check.
            _agree.agree(
                _agree.all_gather_fixed(dist, self.group, device=acc.device),
                "LoadTracker.group", "num_layers, num_experts",
                _agree.config_hash(self.num_layers, self.num_experts), acc.numel(),
            )
            dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=self.group)
        loads = acc.detach().to("cpu", copy=True)
        if bool((loads < 0).any()) or not bool(torch.isfinite(loads).all()):
            raise ValueError("tokens_per_expert: recorded counts must be finite and >= 0")
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
        _native.balance.predict_load(h, method, self.ema_alpha, self.trend_window, horizon, out)
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
            abs_err, total, sq, count = _native.balance.backtest_predictor(
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
    ) -> Dict[str, object]:
        """Writes a PNG (:func:`moerail.balance.plot_heatmap`): load per (layer, expert) on its own
        scale and, with ``num_gpus``, per (layer, device) before (``before``, or Megatron's default
        layout when ``num_gpus`` divides the experts) and after (``phy2log``) on a shared scale
        centred on the mean, with node boundaries. ``load`` defaults to the window's mean."""
        if load is None:
            h = self.history
            if h.shape[0] == 0:
                raise ValueError("history: no step recorded yet (call step() first)")
            load = h.mean(0)
        return plot_heatmap(path, load, phy2log, num_gpus, num_nodes, before=before)

    def state_dict(self) -> Dict[str, object]:
        return {"history": self.history, "steps": self._steps}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        h = state["history"]
        self._history = deque(list(h), maxlen=self.window)
        self._steps = int(state["steps"])
