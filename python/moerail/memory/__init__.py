"""Memory planning for MoE activations: keep, recompute or swap each module's saved tensors.

`plan.py` holds the plan (the typed value the planner, the executor and the Megatron-Core
integration share); `costs.py` what the planner reads (per-module bytes and times, the
schedule, host memory and link), built from the simulator or from measurements; `executor.py`
(with `swap.py`) carries a plan out exactly (`moerail.integrations.megatron.apply_memory_plan` on a
Megatron-Core model); `profile.py` measures the costs on the running job; `timeline.py` times the
swap and offload copies on the stage's schedule as moerail's executor and Megatron-Core's
fine-grained activation offloading issue them.
"""

from .costs import LayerCosts, MemoryCosts, ModuleCost, tokens_per_expert_skew
from .executor import Executor, SavedTensorCounter
from .plan import MODULES, Action, LayerPlan, MegatronFlags, MemoryPlan
from .planner import (
    BudgetUnreachableError,
    StaticSetting,
    evaluate_plan,
    megatron_static_plans,
    parse_bytes,
    plan_memory,
)
from .profile import measure_host_link, profile

__all__ = [
    "MODULES",
    "Action",
    "BudgetUnreachableError",
    "Executor",
    "SavedTensorCounter",
    "measure_host_link",
    "profile",
    "LayerCosts",
    "LayerPlan",
    "MemoryCosts",
    "MegatronFlags",
    "MemoryPlan",
    "ModuleCost",
    "StaticSetting",
    "evaluate_plan",
    "megatron_static_plans",
    "parse_bytes",
    "plan_memory",
    "tokens_per_expert_skew",
]
