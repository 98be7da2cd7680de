"""MindSpeed integration: moerail as a MindSpeed feature.

MindSpeed (Ascend/MindSpeed) applies its optimisations as *features*: subclasses of
``mindspeed.features_manager.feature.MindSpeedFeature`` listed in
``MindSpeedFeaturesManager.FEATURES_LIST``, whose ``register_args`` add command-line options and
whose ``register_patches(patch_manager, args)`` register replacements of Megatron functions with
``patch_manager.register_patch(target, obj, force_patch=False, create_dummy=False)``. The list is
applied when ``mindspeed.megatron_adaptor`` is imported, so a third-party feature is appended before
that import — in the launch script (``pretrain_gpt.py`` or MindSpeed-LLM's ``pretrain_gpt.py``)::

    import moerail.integrations.mindspeed as moerail_mindspeed
    moerail_mindspeed.enable()            # appends MoerailFeature() to FEATURES_LIST
    import mindspeed.megatron_adaptor     # noqa: E402  (applies every feature's patches)

and then on the command line::

    --moerail-ops                         # Megatron's moe_utils functions run on moerail's ops
    --moerail-ops permute,unpermute       # ... only these
    --moerail-dispatcher auto             # flat | 2dh | dedup | allgather | auto: moerail's dispatcher
    --moerail-expert-placement refine     # eplb | refine: dynamic expert placement (needs the dispatcher)

``--moerail-ops`` registers one patch per ``megatron.core.transformer.moe.moe_utils`` function (the
same version-aware wrappers as ``moerail.integrations.megatron.patch_moe_utils``); MindSpeed's
``remove_patches()`` undoes them. A function another feature already replaced (e.g. MindSpeed's own
``--moe-permute-fusion``, which is declared incompatible) is left to it. ``--moerail-dispatcher``
decorates ``MoELayer.__init__`` so each built layer gets moerail's token dispatcher through
``moerail.integrations.megatron.use_moerail``; it needs ``moerail.AllToAllDispatcher`` and says so
clearly when this build of moerail has none.

MindSpeed itself cannot be installed outside an Ascend environment (the ``mindspeed`` name on the
package index is an empty placeholder), so moerail's tests run this feature against a minimal
stand-in of exactly the published interface (``tests/mindspeed_standin``): the feature base class,
``MindSpeedFeaturesManager`` and ``MindSpeedPatchesManager``. Where ``mindspeed`` is not importable,
``MoerailFeature`` subclasses a local class with the same interface.

On NPU tensors, until moerail's CANN backend serves them, the patched functions hand the calls to
Megatron's own implementations (a ``RuntimeWarning`` says so once per function).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Dict, List, Optional

__all__ = [
    "DISPATCHER_STRATEGIES",
    "EXPERT_PLACEMENTS",
    "MOE_UTILS_MODULE",
    "enable",
    "feature_class",
    "moe_layer_init_wrapper_for",
    "parse_ops",
]

LOG = logging.getLogger(__name__)

MOE_UTILS_MODULE = "megatron.core.transformer.moe.moe_utils"
MOE_LAYER_INIT = "megatron.core.transformer.moe.moe_layer.MoELayer.__init__"
DISPATCHER_STRATEGIES = ("flat", "2dh", "dedup", "allgather", "auto")
EXPERT_PLACEMENTS = ("eplb", "refine")
FEATURE_NAME = "moerail-ops"

# MindSpeed features that patch the same targets.
_OPS_CONFLICTS = ("moe_permute_fusion", "use_fused_moe_token_permute_and_unpermute")
_DISPATCHER_CONFLICTS = (
    "moe_alltoall_overlap_comm",
    "moe_allgather_overlap_comm",
    "moe_alltoall_mc2",
    "moe_fb_overlap",
    "moe_tp_extend_ep",
)
_PLACEMENT_CONFLICTS = ("enable_expert_placement", "balanced_moe_experts")
_PERMUTE_FAMILY = ("permute", "unpermute", "sort_chunks_by_idxs")


def parse_ops(value) -> List[str]:
    """The moe_utils names selected by ``--moerail-ops`` (``"all"``, or comma-separated names)."""
    from .megatron import MOE_UTILS_FUNCTIONS

    if value is None or value is False:
        return []
    if value is True or (isinstance(value, str) and value.strip().lower() in ("", "all")):
        return list(MOE_UTILS_FUNCTIONS)
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(n).strip() for n in items if str(n).strip()]
    unknown = [n for n in names if n not in MOE_UTILS_FUNCTIONS]
    if unknown:
        raise ValueError(f"--moerail-ops: unknown functions {unknown}; expected 'all' or some of {list(MOE_UTILS_FUNCTIONS)}")
    return names


def _dispatcher_missing() -> Optional[str]:
    """Why moerail's dispatcher cannot be used (None: it can)."""
    import moerail

    from . import megatron as mi

    if getattr(moerail, "AllToAllDispatcher", None) is None:
        return (
            "--moerail-dispatcher needs moerail.AllToAllDispatcher, which this build of moerail "
            f"({moerail.__version__}) does not have; upgrade moerail or drop --moerail-dispatcher"
        )
    if getattr(mi, "use_moerail", None) is None:
        return "--moerail-dispatcher needs moerail.integrations.megatron.use_moerail, which this build of moerail does not have"
    return None


def _install_dispatcher(layer, strategy: str, placement: Optional[str]) -> None:
    why = _dispatcher_missing()
    if why is not None:
        raise ImportError(why)
    from . import megatron as mi

    mi.use_moerail(layer, strategy=strategy)
    # The placement policy (eplb / refine) is applied by the training loop at global-batch
    # boundaries (LoadTracker -> rebalance_experts(mode=...) -> migrate_experts); the layer
    # carries it for that loop.
    layer.moerail_expert_placement = placement


def moe_layer_init_wrapper_for(strategy: str, placement: Optional[str] = None):
    """A MindSpeed decorator-patch (its name ends in ``wrapper``) for ``MoELayer.__init__``: the
    layer is built as usual, then gets moerail's dispatcher (``use_moerail``)."""
    if strategy not in DISPATCHER_STRATEGIES:
        raise ValueError(f"--moerail-dispatcher: expected one of {DISPATCHER_STRATEGIES}, got {strategy!r}")

    def moe_layer_init_wrapper(init):
        @functools.wraps(init)
        def wrapper(self, *args, **kwargs):
            init(self, *args, **kwargs)
            _install_dispatcher(self, strategy, placement)

        wrapper.__moerail_strategy__ = (strategy, placement)
        return wrapper

    return moe_layer_init_wrapper


class _FeatureBase:
    """The published ``MindSpeedFeature`` interface, for use where MindSpeed is not importable."""

    def __init__(self, feature_name: str, optimization_level: int = 2):
        self.feature_name = feature_name.lower().strip().replace("-", "_")
        self.optimization_level = optimization_level
        self.default_patches = self.optimization_level == 0

    def is_need_apply(self, args):
        return (self.optimization_level <= args.optimization_level and getattr(args, self.feature_name, None)) or self.default_patches

    def register_args(self, parser):
        pass

    def pre_validate_args(self, args):
        pass

    def validate_args(self, args):
        pass

    def post_validate_args(self, args):
        pass

    def pre_register_patches(self, patch_manager, args):
        pass

    def register_patches(self, patch_manager, args):
        pass

    def incompatible_check(self, global_args, check_args):
        if getattr(global_args, self.feature_name, None) and getattr(global_args, check_args, None):
            raise AssertionError(f"{self.feature_name} and {check_args} are incompatible.")

    def dependency_check(self, global_args, check_args):
        if getattr(global_args, self.feature_name, None) and not getattr(global_args, check_args, None):
            raise AssertionError(f"{self.feature_name} requires {check_args}.")


def _base_class():
    try:
        from mindspeed.features_manager.feature import MindSpeedFeature
    except ImportError:
        return _FeatureBase
    return MindSpeedFeature


class _MoerailFeatureMixin:
    """moerail as a MindSpeed feature (see the module documentation)."""

    def __init__(self):
        super().__init__(FEATURE_NAME, optimization_level=2)

    # -- arguments ------------------------------------------------------------------------
    def register_args(self, parser: argparse.ArgumentParser):
        group = parser.add_argument_group(title="moerail")
        group.add_argument(
            "--moerail-ops",
            nargs="?",
            const="all",
            default=None,
            metavar="FUNCS",
            help="Run Megatron-Core's moe_utils functions (router top-k, token dropping, aux losses, "
            "permute/unpermute, expert-bias update) on moerail's ops: 'all' (the default when given "
            "without a value) or a comma-separated list of moe_utils function names.",
        )
        group.add_argument(
            "--moerail-dispatcher",
            choices=DISPATCHER_STRATEGIES,
            default=None,
            help="Replace each MoE layer's token dispatcher with moerail's: flat all-to-all-v, 2dh "
            "(two-level hierarchical), dedup (node-deduplicated two-hop), allgather, or auto (the "
            "cheapest by moerail's cost model).",
        )
        group.add_argument(
            "--moerail-expert-placement",
            choices=EXPERT_PLACEMENTS,
            default=None,
            help="Dynamic expert placement with moerail's dispatcher: eplb (DeepSeek EPLB's algorithm) "
            "or refine (EPLB improved by local search).",
        )

    @staticmethod
    def _values(args):
        return (
            getattr(args, "moerail_ops", None),
            getattr(args, "moerail_dispatcher", None),
            getattr(args, "moerail_expert_placement", None),
        )

    def is_need_apply(self, args):
        ops, dispatcher, placement = self._values(args)
        level = getattr(args, "optimization_level", 2)
        return self.optimization_level <= level and bool(ops or dispatcher or placement)

    def validate_args(self, args):
        # MindSpeed also validates TransformerConfig objects with the features' hooks: objects
        # without moerail's options are left alone.
        ops, dispatcher, placement = self._values(args)
        names = parse_ops(ops)
        if names and any(n in _PERMUTE_FAMILY for n in names):
            for other in _OPS_CONFLICTS:
                self.incompatible_check(args, other)
        if dispatcher is not None:
            if dispatcher not in DISPATCHER_STRATEGIES:
                raise ValueError(f"--moerail-dispatcher: expected one of {DISPATCHER_STRATEGIES}, got {dispatcher!r}")
            for other in _DISPATCHER_CONFLICTS:
                if getattr(args, other, None):
                    raise AssertionError(f"--moerail-dispatcher and --{other.replace('_', '-')} are incompatible.")
            why = _dispatcher_missing()
            if why is not None:
                raise ImportError(why)
        if placement is not None:
            if placement not in EXPERT_PLACEMENTS:
                raise ValueError(f"--moerail-expert-placement: expected one of {EXPERT_PLACEMENTS}, got {placement!r}")
            if dispatcher is None:
                raise AssertionError("--moerail-expert-placement requires --moerail-dispatcher.")
            for other in _PLACEMENT_CONFLICTS:
                if getattr(args, other, None):
                    raise AssertionError(f"--moerail-expert-placement and --{other.replace('_', '-')} are incompatible.")

    # -- patches --------------------------------------------------------------------------
    def register_patches(self, patch_manager, args):
        ops, dispatcher, placement = self._values(args)
        registered = self.registered = {}
        names = parse_ops(ops)
        if names:
            from megatron.core.transformer.moe import moe_utils

            from .megatron.patch import _wrappers

            wrappers = _wrappers(moe_utils).wrappers
            taken = _replaced_elsewhere(patch_manager)
            for name in names:
                target = f"{MOE_UTILS_MODULE}.{name}"
                if name not in wrappers:
                    continue  # not in this megatron-core, or a signature moerail does not speak
                if target in taken:
                    LOG.warning("moerail: %s is already replaced by another MindSpeed feature; left to it", target)
                    continue
                patch_manager.register_patch(target, wrappers[name])
                registered[target] = wrappers[name]
        if dispatcher is not None:
            wrapper = moe_layer_init_wrapper_for(dispatcher, placement)
            patch_manager.register_patch(MOE_LAYER_INIT, wrapper)
            registered[MOE_LAYER_INIT] = wrapper
        return registered


def _replaced_elsewhere(patch_manager) -> Dict[str, object]:
    """Targets another feature already registered a replacement (not a decorator) for."""
    info = getattr(patch_manager, "patches_info", None) or {}
    return {k: p for k, p in info.items() if getattr(p, "patch_func", None) is not None}


_CLASSES: Dict[type, type] = {}


def feature_class() -> type:
    """``MoerailFeature``: a subclass of MindSpeed's ``MindSpeedFeature`` (or, without MindSpeed,
    of a local class with the same interface)."""
    base = _base_class()
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(
            "MoerailFeature",
            (_MoerailFeatureMixin, base),
            {"__module__": __name__, "__qualname__": "MoerailFeature", "__doc__": _MoerailFeatureMixin.__doc__},
        )
        _CLASSES[base] = cls
    return cls


def __getattr__(name: str):
    if name == "MoerailFeature":
        return feature_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable(features_manager=None):
    """Appends a ``MoerailFeature`` to ``MindSpeedFeaturesManager.FEATURES_LIST`` (once) and returns
    it. Call it before ``import mindspeed.megatron_adaptor``, which applies the features."""
    if features_manager is None:
        from mindspeed.features_manager import MindSpeedFeaturesManager as features_manager
    cls = feature_class()
    for f in features_manager.FEATURES_LIST:
        if isinstance(f, _MoerailFeatureMixin):
            return f
    if "mindspeed.megatron_adaptor" in sys.modules:
        raise RuntimeError(
            "moerail.integrations.mindspeed.enable(): mindspeed.megatron_adaptor is already imported and has "
            "applied its features; call enable() before importing it"
        )
    feature = cls()
    features_manager.FEATURES_LIST.append(feature)
    return feature
