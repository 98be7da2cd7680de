"""Megatron-Core integration: moerail's ops behind Megatron's exact ``moe_utils`` signatures and
return conventions, a patch that puts them under stock Megatron layers, and a router class.

Three API generations of ``moe_utils`` are spoken (``megatron_api()`` says which one is installed):

* megatron-core 0.11-0.12: ``permute`` returns ``(permuted, sorted_indices)``, ``sort_chunks_by_idxs``
  one tensor (``"0.11"``);
* megatron-core 0.13-0.16: ``permute`` returns ``(permuted, permuted_probs, sorted_indices)`` (``"0.16"``);
* megatron-core >= 0.17: ``permute`` returns ``(permuted, permuted_probs, sorted_indices, pad_offsets,
  tokens_per_expert)`` and ``unpermute`` takes ``pad_offsets`` (``"0.17"``).

Use in a trainer:

* ``patch_moe_utils()`` / ``unpatch_moe_utils()`` (or ``with moe_utils_patched():``): every
  ``moe_utils`` function moerail implements is replaced, in ``moe_utils`` and in every module that
  imported it by name (router, token dispatchers, ``finalize_model_grads``, ...), so stock
  ``MoELayer`` modules run on moerail's ops. Unpatching restores the original objects.
* ``MoerailTopKRouter``: a ``TopKRouter`` whose routing runs on moerail's ops without patching
  anything global; ``with_moerail_router(spec)`` / ``get_moe_module_spec(...)`` build layers with it.
* ``update_expert_bias(model, rate)``: the aux-loss-free expert-bias step at a global-batch boundary
  for loops that do not call Megatron's ``finalize_model_grads`` (which does it itself).

Nothing here imports Megatron at import time: the adapters are usable (and tested) without it.

* ``use_moerail(layer)`` / ``with_moerail_dispatcher(spec)``: moerail's router and
  ``AllToAllDispatcher`` in a Megatron ``MoELayer``; ``update_expert_placement`` re-places and
  migrates its experts.
* ``apply_memory_plan(model, plan)``: a :class:`moerail.memory.MemoryPlan` (keep / recompute / swap /
  recompute_exchange per layer and module) carried out on a built model, checked against it first.

Modules: :mod:`.adapters` (the per-version adapters), :mod:`.patch` (``patch_moe_utils``),
:mod:`.router` (``MoerailTopKRouter``, specs, expert bias), :mod:`.dispatcher` (``use_moerail``),
:mod:`.placement` (``update_expert_placement``), :mod:`.memory` (``apply_memory_plan``). ``MoerailTopKRouter`` and
``MoerailTokenDispatcher`` are built from the installed Megatron-Core on first access (resolving
them imports Megatron-Core).
"""

from __future__ import annotations

from .adapters import API_2_TUPLE, API_3_TUPLE, API_5_TUPLE, megatron_api
from .adapters import apply_router_token_dropping as apply_router_token_dropping
from .adapters import compute_routing_scores_for_aux_loss as compute_routing_scores_for_aux_loss
from .adapters import get_capacity as get_capacity
from .adapters import get_updated_expert_bias as get_updated_expert_bias
from .adapters import permute_for as permute_for
from .adapters import permute_v011 as permute_v011
from .adapters import permute_v016 as permute_v016
from .adapters import permute_v017 as permute_v017
from .adapters import sequence_load_balancing_loss_func as sequence_load_balancing_loss_func
from .adapters import sort_chunks_by_idxs as sort_chunks_by_idxs
from .adapters import sort_chunks_by_idxs_v011 as sort_chunks_by_idxs_v011
from .adapters import switch_load_balancing_loss_func as switch_load_balancing_loss_func
from .adapters import switch_load_balancing_loss_func_v011 as switch_load_balancing_loss_func_v011
from .adapters import topk_routing_with_score_function as topk_routing_with_score_function
from .adapters import topk_softmax_with_capacity as topk_softmax_with_capacity
from .adapters import unpermute_for as unpermute_for
from .adapters import unpermute_v016 as unpermute_v016
from .adapters import unpermute_v017 as unpermute_v017
from .adapters import z_loss_func as z_loss_func
from .dispatcher import _dispatcher_class, use_moerail, with_moerail_dispatcher
from .memory import apply_memory_plan, validate_memory_plan
from .patch import (
    MOE_UTILS_FUNCTIONS,
    MoeUtilsPatch,
    is_patched,
    moe_utils_patched,
    patch_moe_utils,
    patch_stats,
    unpatch_moe_utils,
)
from .patch import SERVED_DEVICE_TYPES as SERVED_DEVICE_TYPES
from .placement import update_expert_placement
from .router import MOERAIL_TOPK_ROUTER_DOC as MOERAIL_TOPK_ROUTER_DOC
from .router import _router_class, get_moe_module_spec, update_expert_bias, with_moerail_router

__all__ = [
    "apply_memory_plan",
    "validate_memory_plan",
    "API_2_TUPLE",
    "API_3_TUPLE",
    "API_5_TUPLE",
    "MOE_UTILS_FUNCTIONS",
    "get_moe_module_spec",
    "is_patched",
    "megatron_api",
    "moe_utils_patched",
    "MoerailTokenDispatcher",
    "MoerailTopKRouter",
    "MoeUtilsPatch",
    "patch_moe_utils",
    "patch_stats",
    "unpatch_moe_utils",
    "update_expert_bias",
    "update_expert_placement",
    "use_moerail",
    "with_moerail_dispatcher",
    "with_moerail_router",
]


def __getattr__(name: str):
    if name == "MoerailTopKRouter":
        return _router_class()
    if name == "MoerailTokenDispatcher":
        return _dispatcher_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
