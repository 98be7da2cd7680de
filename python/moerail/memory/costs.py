"""What the memory planner needs to know about one device: per-module activation bytes and the
time to rebuild or move them, per layer; the fixed memory; the host memory and link; and the
pipeline schedule that decides how many micro-batches' activations are alive at once.

Two producers build a :class:`MemoryCosts`: :meth:`MemoryCosts.from_simulator` (the
simulator's cost model for a configuration or preset, one pipeline stage) and
``moerail.memory.profile`` (measured on the running job). One consumer reads it:
``moerail.memory.plan_memory``.

Units everywhere: bytes (float, per device, per micro-batch unless said otherwise) and seconds.
Every value is checked when the object is built; a bad one is a ``ValueError`` naming the field.

This interface is stable: fields are only ever added, with defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .plan import _EXCHANGE_MODULES, MODULES

__all__ = ["LayerCosts", "MemoryCosts", "ModuleCost", "tokens_per_expert_skew"]


def _nonneg(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModuleCost:
    """One module of one layer, for one micro-batch on this device.

    * ``saved_bytes`` — bytes of the tensors autograd saves in this module's forward for its
      backward (what *recompute* or *swap* takes off the device until the backward).
    * ``recompute_seconds`` — time to rebuild them in the backward (the module's forward again).
    * ``exchange_seconds`` — for the expert inputs (``expert_fc1``) only: the time of running
      the dispatch exchange (and permute) again in the backward, the cost of
      ``recompute_exchange``; 0 where the module has no exchange to repeat.
    * ``exchange_bytes`` — the part of ``saved_bytes`` that ``recompute_exchange`` frees on top of
      ``recompute`` (the dispatched rows); 0 elsewhere.
    * ``recompute_saved_bytes`` — the bytes *recompute* takes off the device (with
      ``recompute_exchange``; plain ``recompute`` frees this less ``exchange_bytes``). A
      recompute also frees the copies of the module's outputs that its consumers saved and holds
      the inputs it recomputes from, so it need not free what a swap (``saved_bytes``) frees.
      ``None`` (default): ``saved_bytes``.
    """

    saved_bytes: float
    recompute_seconds: float
    exchange_seconds: float = 0.0
    exchange_bytes: float = 0.0
    recompute_saved_bytes: Optional[float] = None

    def __post_init__(self):
        if self.recompute_saved_bytes is None:
            object.__setattr__(self, "recompute_saved_bytes", self.saved_bytes)
        for name in ("saved_bytes", "recompute_seconds", "exchange_seconds", "exchange_bytes",
                     "recompute_saved_bytes"):
            object.__setattr__(self, name, _nonneg(getattr(self, name), name))
        if self.exchange_bytes > self.recompute_saved_bytes:
            raise ValueError(
                f"exchange_bytes: {self.exchange_bytes} is more than recompute_saved_bytes "
                f"{self.recompute_saved_bytes} (the rows are part of what recompute_exchange frees)"
            )


@dataclass(frozen=True)
class LayerCosts:
    """One transformer layer on this device, per micro-batch.

    * ``layer`` — global layer number (0-based, Megatron's ``layer_number - 1``).
    * ``vpp_stage`` — the virtual pipeline stage (model chunk) it runs in; 0 without VPP.
    * ``modules`` — module name (one of ``moerail.memory.MODULES``) to :class:`ModuleCost`;
      modules the layer does not have are left out.
    * ``forward_seconds`` / ``backward_seconds`` — the layer's forward and backward time, the
      compute that can hide swaps of other layers.
    * ``other_saved_bytes`` — saved bytes no module action can free (the layer input on the
      residual stream, dropout masks).
    * ``transient_bytes`` — working memory alive only while the layer runs (dispatch buffers,
      gradients of the activations); counted once, on top of the activations in flight.
    * ``input_bytes`` — the layer's input (the residual stream entering it), all that a
      whole-layer recompute (``LayerPlan(recompute_layer=True)``) keeps; ``None`` (unknown):
      the planner does not consider whole-layer recompute for this layer.
    """

    layer: int
    modules: Mapping[str, ModuleCost]
    forward_seconds: float
    backward_seconds: float
    vpp_stage: int = 0
    other_saved_bytes: float = 0.0
    transient_bytes: float = 0.0
    input_bytes: Optional[float] = None

    def __post_init__(self):
        _int(self.layer, "layer", 0)
        _int(self.vpp_stage, "vpp_stage", 0)
        if not isinstance(self.modules, Mapping):
            raise ValueError(
                f"modules: expected a dict of module name to ModuleCost, got {type(self.modules).__name__}"
            )
        checked: Dict[str, ModuleCost] = {}
        for name, cost in self.modules.items():
            if name not in MODULES:
                raise ValueError(
                    f"modules: unknown module {name!r} in layer {self.layer}; expected one of {', '.join(MODULES)}"
                )
            if isinstance(cost, Mapping):
                cost = ModuleCost(**cost)
            if not isinstance(cost, ModuleCost):
                raise ValueError(f"modules[{name!r}]: expected a ModuleCost, got {type(cost).__name__}")
            if name not in _EXCHANGE_MODULES and (cost.exchange_seconds or cost.exchange_bytes):
                raise ValueError(
                    f"modules[{name!r}]: only {', '.join(sorted(_EXCHANGE_MODULES))} has an exchange to repeat"
                )
            checked[name] = cost
        object.__setattr__(self, "modules", {m: checked[m] for m in MODULES if m in checked})
        for name in ("forward_seconds", "backward_seconds", "other_saved_bytes", "transient_bytes"):
            object.__setattr__(self, name, _nonneg(getattr(self, name), name))
        if self.input_bytes is not None:
            object.__setattr__(self, "input_bytes", _nonneg(self.input_bytes, "input_bytes"))

    @property
    def saved_bytes(self) -> float:
        """Everything this layer keeps per micro-batch when every module keeps."""
        return self.other_saved_bytes + sum(c.saved_bytes for c in self.modules.values())


@dataclass(frozen=True)
class MemoryCosts:
    """One device (one pipeline stage) of a training job.

    * ``layers`` — the layers this device runs, :class:`LayerCosts`, in forward order within each
      virtual pipeline stage.
    * ``static_bytes`` — memory that does not depend on the plan: weights, gradients, optimizer
      state (its distributed share), framework reserve.
    * ``device_bytes`` — the device's memory capacity (what a budget may not exceed).
    * ``host_bytes`` — pinned host memory this device may use for swapped activations; 0 means
      no swap.
    * ``host_link_bytes_per_second`` — device-host copy bandwidth per device and direction
      (PCIe / HCCS share per device), shared by every swap in flight.
    * ``pipeline_size`` / ``pipeline_rank`` — PP size and this device's stage (0-based).
    * ``virtual_pipeline_size`` — model chunks per stage (1 without interleaving).
    * ``num_microbatches`` — micro-batches per step and data-parallel rank.
    * ``step_seconds`` — the predicted (or measured) step time with every activation kept, for
      reporting a plan's cost as a fraction; 0 when unknown.
    * ``routing_skew`` — the factor expert-side costs were scaled by: the high percentile of
      tokens per expert rank over its mean (1.0 = the mean, no skew applied).
    * ``source`` — ``"simulator"`` or ``"profile"``, for reports.
    * ``saved_tensors`` — from ``profile``: which storages each module saved, each recompute
      region's inputs and outputs, per micro-batch, and the measured seconds of each action per
      layer (see ``moerail.memory.exact``). When present (and without virtual pipeline stages),
      the planner computes the bytes a plan holds as the size of a union of those storages and
      its added time from those seconds, instead of adding per-module savings up.
    """

    layers: Tuple[LayerCosts, ...]
    static_bytes: float
    device_bytes: float
    host_bytes: float = 0.0
    host_link_bytes_per_second: float = 0.0
    pipeline_size: int = 1
    pipeline_rank: int = 0
    virtual_pipeline_size: int = 1
    num_microbatches: int = 1
    step_seconds: float = 0.0
    routing_skew: float = 1.0
    source: str = "simulator"
    meta: Mapping[str, Any] = field(default_factory=dict)
    saved_tensors: Optional[Mapping[str, Any]] = None

    def __post_init__(self):
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("layers: expected at least one LayerCosts")
        for lc in layers:
            if not isinstance(lc, LayerCosts):
                raise ValueError(f"layers: expected LayerCosts entries, got {type(lc).__name__}")
        object.__setattr__(self, "layers", layers)
        for name in ("static_bytes", "host_bytes", "host_link_bytes_per_second", "step_seconds"):
            object.__setattr__(self, name, _nonneg(getattr(self, name), name))
        dev = _nonneg(self.device_bytes, "device_bytes")
        if dev <= 0:
            raise ValueError(f"device_bytes: expected a positive number, got {self.device_bytes!r}")
        object.__setattr__(self, "device_bytes", dev)
        skew = _nonneg(self.routing_skew, "routing_skew")
        if skew < 1.0:
            raise ValueError(f"routing_skew: expected a number >= 1 (a percentile over the mean), got {skew!r}")
        object.__setattr__(self, "routing_skew", skew)
        _int(self.pipeline_size, "pipeline_size", 1)
        _int(self.virtual_pipeline_size, "virtual_pipeline_size", 1)
        _int(self.num_microbatches, "num_microbatches", 1)
        if _int(self.pipeline_rank, "pipeline_rank", 0) >= self.pipeline_size:
            raise ValueError(f"pipeline_rank: expected 0..{self.pipeline_size - 1}, got {self.pipeline_rank}")
        seen = set()
        for lc in layers:
            if lc.vpp_stage >= self.virtual_pipeline_size:
                raise ValueError(
                    f"layers: layer {lc.layer} is in vpp stage {lc.vpp_stage}, but virtual_pipeline_size is "
                    f"{self.virtual_pipeline_size}"
                )
            if (lc.layer, lc.vpp_stage) in seen:
                raise ValueError(f"layers: layer {lc.layer} (vpp stage {lc.vpp_stage}) appears twice")
            seen.add((lc.layer, lc.vpp_stage))
        if self.virtual_pipeline_size > 1 and self.pipeline_size > 1 and self.num_microbatches % self.pipeline_size:
            raise ValueError(
                f"num_microbatches: the interleaved schedule needs a multiple of pipeline_size "
                f"({self.pipeline_size}), got {self.num_microbatches}"
            )
        if self.source not in ("simulator", "profile"):
            raise ValueError(f"source: expected 'simulator' or 'profile', got {self.source!r}")
        if self.saved_tensors is not None and (
            not isinstance(self.saved_tensors, Mapping) or not isinstance(self.saved_tensors.get("microbatches"), list)
        ):
            raise ValueError("saved_tensors: expected the profile's record (a dict with a 'microbatches' list)")

    @property
    def exact_model(self) -> bool:
        """Whether the planner uses the held-bytes model of ``saved_tensors`` for these costs."""
        return self.saved_tensors is not None and self.virtual_pipeline_size == 1

    def to_dict(self) -> dict:
        return {
            "layers": [
                {
                    "layer": lc.layer,
                    "vpp_stage": lc.vpp_stage,
                    "forward_seconds": lc.forward_seconds,
                    "backward_seconds": lc.backward_seconds,
                    "other_saved_bytes": lc.other_saved_bytes,
                    "transient_bytes": lc.transient_bytes,
                    **({"input_bytes": lc.input_bytes} if lc.input_bytes is not None else {}),
                    "modules": {
                        m: {
                            "saved_bytes": c.saved_bytes,
                            "recompute_seconds": c.recompute_seconds,
                            "exchange_seconds": c.exchange_seconds,
                            "exchange_bytes": c.exchange_bytes,
                            "recompute_saved_bytes": c.recompute_saved_bytes,
                        }
                        for m, c in lc.modules.items()
                    },
                }
                for lc in self.layers
            ],
            "static_bytes": self.static_bytes,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "host_link_bytes_per_second": self.host_link_bytes_per_second,
            "pipeline_size": self.pipeline_size,
            "pipeline_rank": self.pipeline_rank,
            "virtual_pipeline_size": self.virtual_pipeline_size,
            "num_microbatches": self.num_microbatches,
            "step_seconds": self.step_seconds,
            "routing_skew": self.routing_skew,
            "source": self.source,
            **({"saved_tensors": self.saved_tensors} if self.saved_tensors is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemoryCosts:
        if not isinstance(d, Mapping) or not isinstance(d.get("layers"), list):
            raise ValueError("costs: expected an object with a 'layers' list")
        layers = tuple(LayerCosts(**dict(entry)) for entry in d["layers"])
        rest = {k: v for k, v in d.items() if k != "layers"}
        return cls(layers=layers, **rest)

    @property
    def activation_bytes_keep_all(self) -> float:
        """Per micro-batch, all layers: the saved bytes with every module keeping."""
        return sum(lc.saved_bytes for lc in self.layers)

    @classmethod
    def from_simulator(
        cls,
        config: Any = None,
        *,
        pipeline_rank: Optional[int] = None,
        tokens_per_expert: Any = None,
        percentile: float = 99.0,
        host_bytes: Optional[float] = None,
        **kwargs: Any,
    ) -> MemoryCosts:
        """The simulator's cost model for a configuration (as :func:`moerail.sim.simulate` takes:
        a path, a dict, presets via ``model=``/``cluster=``, overrides), for one pipeline stage.

        ``pipeline_rank``: the stage (default: the stage with the most activation memory, the one
        that sets the peak). ``tokens_per_expert``: load statistics — a
        ``moerail.balance.LoadTracker`` or an array of shape ``(steps, experts)`` of tokens per
        expert — from which the ``percentile`` (default p99) of tokens per expert-parallel rank
        over its mean scales the expert-side costs (plan for the skew, not the mean); without
        it the configuration's ``moe_expert_load_imbalance`` is used. ``host_bytes``: pinned
        host memory per device for swap (default: the cluster preset's host memory per device).
        """
        from .simcosts import costs_from_simulator

        return costs_from_simulator(
            config,
            pipeline_rank=pipeline_rank,
            tokens_per_expert=tokens_per_expert,
            percentile=percentile,
            host_bytes=host_bytes,
            **kwargs,
        )


def tokens_per_expert_skew(tokens_per_expert: Any, ep: int, percentile: float = 99.0) -> float:
    """The ``percentile`` of tokens per expert-parallel rank over the mean, from load statistics:
    a ``LoadTracker`` (its history) or an array ``(steps, experts)``, ``(steps, layers, experts)``
    or ``(experts,)`` of token counts. Experts are laid out contiguously over ``ep`` ranks, as Megatron does. >= 1."""
    import numpy as np

    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ValueError(f"percentile: expected a number in (0, 100], got {percentile!r}")
    ep = _int(ep, "ep", 1)
    counts = tokens_per_expert
    for attr in ("history", "tokens_per_expert_history", "counts"):
        if hasattr(counts, attr) and not isinstance(counts, (list, tuple)):
            counts = getattr(counts, attr)
            counts = counts() if callable(counts) else counts
            break
    try:
        arr = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            "tokens_per_expert: expected an array (steps, experts) of token counts or a LoadTracker"
        ) from None
    if arr.ndim == 1:
        arr = arr[None, :]
    elif arr.ndim == 3:  # a LoadTracker's history: (steps, layers, experts)
        arr = arr.reshape(-1, arr.shape[-1])
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"tokens_per_expert: expected shape (steps, experts), got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("tokens_per_expert: expected finite counts >= 0")
    experts = arr.shape[1]
    if experts % ep:
        raise ValueError(f"tokens_per_expert: {experts} experts do not split over ep={ep} ranks")
    per_rank = arr.reshape(arr.shape[0], ep, experts // ep).sum(axis=2)
    mean = per_rank.mean(axis=1, keepdims=True)
    ratio = per_rank[mean[:, 0] > 0] / mean[mean[:, 0] > 0]
    if ratio.size == 0:
        return 1.0
    return max(1.0, float(np.percentile(ratio, percentile)))


def _as_layers(layers: Sequence[Mapping[str, Any]]) -> Tuple[LayerCosts, ...]:
    return tuple(LayerCosts(**dict(entry)) for entry in layers)
