"""The memory plan: for every layer (and virtual pipeline stage), what happens to each module's
saved activations between its forward and its backward.

A plan is a typed value, checked once when it is built, and shared by the three users of it:
the planner (`moerail.memory.plan_memory`, costs from the simulator's model or from
`moerail.memory.profile`), the executor (`moerail.memory.executor`, `saved_tensors_hooks` and
output-discarding checkpoints) and the Megatron-Core integration
(`moerail.integrations.megatron.apply_memory_plan`, `MemoryPlan.to_megatron_flags`).

Actions:

* ``keep`` — autograd keeps the saved tensors (the default; what Megatron does without flags).
* ``recompute`` — the module's output is freed once its consumer has saved what it needs and
  rebuilt just before the backward needs it; the replay reuses the saved routing map, sorted
  indices, split sizes and RNG state, so routing and exchanges cannot change.
* ``swap`` — the saved tensors go to a pinned host pool (a side stream on GPU, a copy thread on
  CPU) and come back before the backward uses them; every swap-in waits on its own swap-out.
* ``recompute_exchange`` — expert inputs only: the dispatched rows are dropped and the exchange
  is run again in the backward (MindSpeed's "zero memory" idea).

A layer may instead be recomputed whole (``LayerPlan(layer, recompute_layer=True)``): only its
input is kept and its backward runs its forward again first, as Megatron's
``recompute_granularity="full"`` does per layer; its modules then take no action of their own.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .. import _native


class Action(str, enum.Enum):
    KEEP = "keep"
    RECOMPUTE = "recompute"
    SWAP = "swap"
    RECOMPUTE_EXCHANGE = "recompute_exchange"


# The modules of one transformer layer whose saved activations a plan decides, in forward order
# except `mla_up_proj` (it runs before core attention), which comes last so that the others keep
# their positions in the core's JSON rows.
MODULES: Tuple[str, ...] = (
    "layernorm",  # the pre-attention and pre-MLP norms
    "attention",  # the attention module: QKV projections, core attention, output projection
    "router",  # gate logits, top-k, aux losses
    "permute",  # the local permute before the exchange
    "expert_fc1",  # the expert inputs (dispatched rows) and fc1's output
    "expert_act",  # the activation (SwiGLU / GeLU) inside the experts
    "expert_fc2",  # fc2's input and output
    "unpermute",  # the combine after the exchange back
    "shared_expert",  # the shared expert's MLP, where the model has one
    "mla_up_proj",  # Multi-Latent Attention's up-projections of queries, keys and values (after RoPE)
)

# `recompute_exchange` drops the dispatched rows, which only the expert inputs hold.
_EXCHANGE_MODULES = frozenset({"expert_fc1"})


def _action(value, where: str) -> Action:
    if isinstance(value, Action):
        return value
    try:
        return Action(value)
    except ValueError:
        known = ", ".join(a.value for a in Action)
        raise ValueError(f"{where}: unknown action {value!r}; expected one of {known}") from None


@dataclass(frozen=True)
class LayerPlan:
    """The actions of one layer. `layer` is the global layer number (0-based, Megatron's
    `layer_number - 1`); `vpp_stage` the virtual pipeline stage it runs in (0 without VPP).
    Modules not named keep their activations. `recompute_layer`: the whole layer is rebuilt
    from its input in the backward (no module actions then)."""

    layer: int
    actions: Mapping[str, Action] = field(default_factory=dict)
    vpp_stage: int = 0
    recompute_layer: bool = False

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer: expected an int >= 0, got {self.layer!r}")
        if isinstance(self.vpp_stage, bool) or not isinstance(self.vpp_stage, int) or self.vpp_stage < 0:
            raise ValueError(f"vpp_stage: expected an int >= 0, got {self.vpp_stage!r}")
        checked: Dict[str, Action] = {}
        for module, value in dict(self.actions).items():
            if module not in MODULES:
                raise ValueError(
                    f"layer {self.layer}: unknown module {module!r}; expected one of {', '.join(MODULES)}"
                )
            action = _action(value, f"layer {self.layer} module {module!r}")
            if action is Action.RECOMPUTE_EXCHANGE and module not in _EXCHANGE_MODULES:
                raise ValueError(
                    f"layer {self.layer} module {module!r}: recompute_exchange applies to the expert "
                    f"inputs only ({', '.join(sorted(_EXCHANGE_MODULES))})"
                )
            checked[module] = action
        if not isinstance(self.recompute_layer, bool):
            raise ValueError(f"layer {self.layer}: recompute_layer: expected a bool, got {self.recompute_layer!r}")
        if self.recompute_layer:
            acting = sorted(m for m, a in checked.items() if a is not Action.KEEP)
            if acting:
                raise ValueError(
                    f"layer {self.layer}: recompute_layer rebuilds the whole layer; its modules cannot also "
                    f"recompute or swap ({', '.join(acting)})"
                )
            checked = {}
        object.__setattr__(self, "actions", checked)

    def action(self, module: str) -> Action:
        if module not in MODULES:
            raise ValueError(f"module: unknown module {module!r}; expected one of {', '.join(MODULES)}")
        return self.actions.get(module, Action.KEEP)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-layer actions plus what the planner predicted for them.

    `predicted_peak_bytes` is the peak device memory on the pipeline schedule's timeline (weights,
    gradients, optimizer state and the activations of the micro-batches in flight);
    `predicted_added_seconds` the step time the plan exposes (recompute plus unhidden swap);
    `host_bytes` the pinned host memory the swaps need per device; `lookahead` and
    `prefetch_groups` how moerail's executor copies swapped tensors back for those predictions
    (:class:`~moerail.memory.executor.Executor` runs the plan with them unless told otherwise)."""

    layers: Tuple[LayerPlan, ...]
    budget_bytes: Optional[int] = None
    predicted_peak_bytes: Optional[float] = None
    predicted_added_seconds: Optional[float] = None
    host_bytes: int = 0
    # What the planner's model says about the plan (peak by part, seconds by kind, keep-all
    # activations, whether the solve was exact); empty for a plan built by hand.
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    lookahead: int = 1
    prefetch_groups: int = 1

    def __post_init__(self):
        layers = tuple(self.layers)
        seen = set()
        for lp in layers:
            if not isinstance(lp, LayerPlan):
                raise TypeError(f"layers: expected LayerPlan entries, got {type(lp).__name__}")
            key = (lp.layer, lp.vpp_stage)
            if key in seen:
                raise ValueError(f"layers: layer {lp.layer} (vpp stage {lp.vpp_stage}) appears twice")
            seen.add(key)
        object.__setattr__(self, "layers", layers)
        if self.budget_bytes is not None and (
            isinstance(self.budget_bytes, bool) or not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0
        ):
            raise ValueError(f"budget_bytes: expected a positive int, got {self.budget_bytes!r}")
        if isinstance(self.host_bytes, bool) or not isinstance(self.host_bytes, int) or self.host_bytes < 0:
            raise ValueError(f"host_bytes: expected an int >= 0, got {self.host_bytes!r}")
        for name in ("predicted_peak_bytes", "predicted_added_seconds"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < 0):
                raise ValueError(f"{name}: expected a finite number >= 0 or None, got {v!r}")
        if not isinstance(self.evaluation, Mapping):
            raise ValueError(f"evaluation: expected a dict, got {type(self.evaluation).__name__}")
        object.__setattr__(self, "evaluation", dict(self.evaluation))
        check_prefetch(self.lookahead, self.prefetch_groups)

    @classmethod
    def uniform(cls, num_layers: int, actions: Mapping[str, Action], **kw) -> MemoryPlan:
        """The same actions in every one of `num_layers` layers."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers: expected an int >= 0, got {num_layers!r}")
        return cls(tuple(LayerPlan(i, dict(actions)) for i in range(num_layers)), **kw)

    def action(self, layer: int, module: str, vpp_stage: int = 0) -> Action:
        for lp in self.layers:
            if lp.layer == layer and lp.vpp_stage == vpp_stage:
                return lp.action(module)
        if module not in MODULES:
            raise ValueError(f"module: unknown module {module!r}; expected one of {', '.join(MODULES)}")
        return Action.KEEP

    def recompute_layer(self, layer: int, vpp_stage: int = 0) -> bool:
        """Whether `layer` (in `vpp_stage`) is recomputed whole."""
        return any(lp.recompute_layer for lp in self.layers if lp.layer == layer and lp.vpp_stage == vpp_stage)

    def modules_with(self, action: Action) -> Iterable[Tuple[int, str]]:
        for lp in self.layers:
            for module, a in lp.actions.items():
                if a is action:
                    yield lp.layer, module

    def to_dict(self) -> dict:
        return {
            "layers": [
                {
                    "layer": lp.layer,
                    "vpp_stage": lp.vpp_stage,
                    "actions": {m: a.value for m, a in lp.actions.items()},
                    **({"recompute_layer": True} if lp.recompute_layer else {}),
                }
                for lp in self.layers
            ],
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_added_seconds": self.predicted_added_seconds,
            "host_bytes": self.host_bytes,
            "lookahead": self.lookahead,
            "prefetch_groups": self.prefetch_groups,
            **({"evaluation": dict(self.evaluation)} if self.evaluation else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping) -> MemoryPlan:
        if not isinstance(d, Mapping) or not isinstance(d.get("layers"), list):
            raise ValueError("plan: expected an object with a 'layers' list")
        layers = []
        for i, entry in enumerate(d["layers"]):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("actions", {}), Mapping):
                raise ValueError(f"plan: layers[{i}]: expected an object with 'layer' and 'actions'")
            layers.append(
                LayerPlan(
                    entry.get("layer"),
                    dict(entry.get("actions", {})),
                    entry.get("vpp_stage", 0),
                    entry.get("recompute_layer", False),
                )
            )
        return cls(
            tuple(layers),
            budget_bytes=d.get("budget_bytes"),
            predicted_peak_bytes=d.get("predicted_peak_bytes"),
            predicted_added_seconds=d.get("predicted_added_seconds"),
            host_bytes=d.get("host_bytes", 0),
            evaluation=d.get("evaluation") or {},
            lookahead=d.get("lookahead", 1),
            prefetch_groups=d.get("prefetch_groups", 1),
        )

    def to_megatron_flags(self, *, multi_latent_attention: bool = False, strict: bool = False) -> MegatronFlags:
        """The plan as Megatron-Core's own settings, where they can say it.

        Megatron's settings are the same for every layer: ``--recompute-granularity selective
        --recompute-modules ...`` (TransformerConfig ``recompute_modules``), ``--recompute-
        granularity full --recompute-method uniform --recompute-num-layers 1`` when every module
        is rebuilt, and ``--fine-grained-activation-offloading --offload-modules ...``
        (``offload_modules``). Module names: ``layernorm`` -> ``layernorm`` (recompute) /
        ``attn_norm`` + ``mlp_norm`` (offload); ``attention`` -> ``core_attn``; ``mla_up_proj``
        -> ``mla_up_proj`` (recompute, only with ``multi_latent_attention``); ``attention`` and
        ``mla_up_proj`` swapped -> ``core_attn`` (its offload moves both); ``expert_act`` ->
        ``moe_act``; ``shared_expert`` -> ``shared_experts``; ``expert_fc1`` swapped ->
        ``expert_fc1``; router + expert inputs with the exchange + activation (+ shared expert)
        recomputed -> ``moe``. Whole-layer recompute (``recompute_layer``) in every layer ->
        ``--recompute-granularity full --recompute-method uniform --recompute-num-layers 1``; in
        the first N layers of every model chunk (and nothing else anywhere) ->
        ``--recompute-method block --recompute-num-layers N``. What Megatron cannot say (different actions per layer, the router
        or the expert inputs alone, swapping the router or the shared expert) goes to
        ``notes``; with ``strict`` it raises ``ValueError`` instead."""
        return _megatron_flags(self, multi_latent_attention, strict)


@dataclass(frozen=True)
class MegatronFlags:
    """A plan as Megatron-Core's settings: ``args`` (the command line), ``config``
    (TransformerConfig fields) and ``notes`` (what they cannot express; empty when exact)."""

    args: Tuple[str, ...]
    config: Mapping[str, Any]
    notes: Tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not self.notes

    def __str__(self) -> str:
        return " ".join(self.args)


def _megatron_settings(recompute: Sequence[str] = (), offload: Sequence[str] = (), *,
                       full: Optional[Tuple[str, int]] = None, offload_fraction: float = 1.0,
                       notes: Sequence[str] = ()) -> MegatronFlags:
    """Megatron-Core's command line and TransformerConfig fields for full recomputation
    (``full``: its method and number of layers) or ``recompute_modules``, and fine-grained
    offloading of ``offload_modules`` at ``activation_offload_fraction``."""
    args: List[str] = []
    config: Dict[str, Any] = {}
    if full is not None:
        method, n = full
        args += ["--recompute-granularity", "full", "--recompute-method", method, "--recompute-num-layers", str(n)]
        config.update(recompute_granularity="full", recompute_method=method, recompute_num_layers=n)
    elif recompute:
        args += ["--recompute-granularity", "selective", "--recompute-modules", *recompute]
        config.update(recompute_granularity="selective", recompute_modules=list(recompute))
    if offload:
        args += ["--fine-grained-activation-offloading", "--offload-modules", *offload]
        config.update(fine_grained_activation_offloading=True, offload_modules=list(offload))
        if offload_fraction < 1.0:
            args += ["--activation-offload-fraction", f"{offload_fraction:g}"]
            config["activation_offload_fraction"] = offload_fraction
    return MegatronFlags(tuple(args), config, tuple(notes))


_RECOMPUTE_NAMES = {"layernorm": ("layernorm",), "expert_act": ("moe_act",), "shared_expert": ("shared_experts",)}
_OFFLOAD_NAMES = {
    "layernorm": ("attn_norm", "mlp_norm"),
    "attention": ("core_attn",),
    "expert_fc1": ("expert_fc1",),
    "expert_act": ("moe_act",),
}


def _full_flags(plan: MemoryPlan, strict: bool) -> Optional[MegatronFlags]:
    """Megatron's full recompute where the plan rebuilds whole layers; `None` when it does not."""
    whole = [lp for lp in plan.layers if lp.recompute_layer]
    if not whole:
        return None
    notes: List[str] = []
    chunks: Dict[int, List[LayerPlan]] = {}
    for lp in plan.layers:
        chunks.setdefault(lp.vpp_stage, []).append(lp)
    prefixes = set()
    for lps in chunks.values():
        flags = [lp.recompute_layer for lp in sorted(lps, key=lambda lp: lp.layer)]
        n = flags.index(False) if False in flags else len(flags)
        prefixes.add(n if not any(flags[n:]) else -1)
    if len(whole) == len(plan.layers):
        method, n = "uniform", 1
    else:
        method, n = "block", (prefixes.pop() if len(prefixes) == 1 else -1)
        if n <= 0:
            notes.append(
                "whole layers are recomputed other than the first N of every model chunk; Megatron's "
                "--recompute-method block recomputes those only, so these flags recompute every layer"
            )
            method, n = "uniform", 1
    if any(lp.actions for lp in plan.layers if not lp.recompute_layer):
        notes.append(
            "other layers recompute or swap modules; Megatron's full recompute cannot be combined with "
            "recompute_modules or offload_modules; left out"
        )
    if strict and notes:
        raise ValueError("plan: Megatron's flags cannot express it: " + "; ".join(notes))
    return _megatron_settings(full=(method, n), notes=notes)


def _megatron_flags(plan: MemoryPlan, mla: bool, strict: bool) -> MegatronFlags:
    whole = _full_flags(plan, strict)
    if whole is not None:
        return whole
    notes: List[str] = []
    rows = {tuple(sorted((m, a.value) for m, a in lp.actions.items() if a is not Action.KEEP)) for lp in plan.layers}
    if len(rows) > 1:
        notes.append(
            f"the plan differs between layers ({len(rows)} different layer plans); Megatron's settings apply to "
            "every layer alike, so these flags take the union (more memory saved, more time) of the layers' actions"
        )
    union: Dict[str, Action] = {}
    rank = {Action.KEEP: 0, Action.SWAP: 1, Action.RECOMPUTE: 2, Action.RECOMPUTE_EXCHANGE: 3}
    for lp in plan.layers:
        for m, a in lp.actions.items():
            if rank[a] > rank[union.get(m, Action.KEEP)]:
                union[m] = a
    rec = {m for m, a in union.items() if a in (Action.RECOMPUTE, Action.RECOMPUTE_EXCHANGE)}
    swp = {m for m, a in union.items() if a is Action.SWAP}
    full: Optional[Tuple[str, int]] = None
    names: List[str] = []
    off: List[str] = []
    everything = set(MODULES) - {"permute", "expert_fc2", "unpermute"}
    if rec >= everything - {"shared_expert", "mla_up_proj"} and union.get("expert_fc1") is Action.RECOMPUTE_EXCHANGE and not swp:
        full = ("uniform", 1)
    else:
        moe_block = {"router", "expert_fc1", "expert_act"}
        if moe_block <= rec and union.get("expert_fc1") is Action.RECOMPUTE_EXCHANGE:
            names.append("moe")
            rec = rec - moe_block - {"shared_expert"}
        else:
            for m in sorted(rec & {"router", "expert_fc1"}):
                notes.append(
                    f"{m} is recomputed{' with the exchange' if union[m] is Action.RECOMPUTE_EXCHANGE else ''}: "
                    "Megatron recomputes it only with the whole MoE block ('moe'); left out"
                )
            rec = rec - {"router", "expert_fc1"}
        for m in sorted(rec, key=MODULES.index):
            if m == "attention":
                names.append("core_attn")
                notes.append("attention is recomputed: moerail replays the whole attention module; Megatron's "
                             "core_attn recomputes core attention alone (less memory saved, less time)")
            elif m == "mla_up_proj":
                if mla:
                    names.append("mla_up_proj")
                else:
                    notes.append("mla_up_proj is recomputed: Megatron accepts it only with multi_latent_attention; left out")
            elif m in _RECOMPUTE_NAMES:
                names += list(_RECOMPUTE_NAMES[m])
            else:
                notes.append(f"{m} is recomputed: Megatron has no recompute module for it; left out")
    if {"attention", "mla_up_proj"} <= swp:
        swp = swp - {"mla_up_proj"}  # Megatron's core_attn offload moves MLA's queries, keys and values too
    for m in sorted(swp, key=MODULES.index):
        if m in _OFFLOAD_NAMES:
            off += list(_OFFLOAD_NAMES[m])
        else:
            notes.append(f"{m} is swapped: Megatron has no offload module for it; left out")
    if "moe" in names:
        dropped = [o for o in off if o in ("expert_fc1", "moe_act")]
        if dropped:
            notes.append(f"Megatron cannot offload {', '.join(dropped)} inside a recomputed 'moe' block; left out")
            off = [o for o in off if o not in dropped]
    if strict and notes:
        raise ValueError("plan: Megatron's flags cannot express it: " + "; ".join(notes))
    return _megatron_settings(names, off, full=full, notes=notes)


#: Most groups moerail's executor copies back ahead within a model chunk (``prefetch_groups``; the
#: core's limit).
MAX_PREFETCH_GROUPS: int = _native.memory.MAX_PREFETCH_GROUPS


def check_prefetch(lookahead: Any, prefetch_groups: Any) -> None:
    """Refuses (``ValueError`` naming the argument) what moerail's executor cannot run:
    ``lookahead`` 0, 1 or 2 and ``prefetch_groups`` 1 to :data:`MAX_PREFETCH_GROUPS`."""
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead not in (0, 1, 2):
        raise ValueError(f"lookahead: expected 0, 1 or 2, got {lookahead!r}")
    if (isinstance(prefetch_groups, bool) or not isinstance(prefetch_groups, int)
            or not 1 <= prefetch_groups <= MAX_PREFETCH_GROUPS):  # fmt: skip
        raise ValueError(f"prefetch_groups: expected an int from 1 to {MAX_PREFETCH_GROUPS}, got {prefetch_groups!r}")
