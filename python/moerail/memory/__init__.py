"""Memory planning for MoE activations: keep, recompute or swap each module's saved tensors.

`plan.py` holds the plan (the typed value the planner, the executor and the Megatron-Core
integration share); `costs.py` what the planner reads (per-module bytes and times, the
schedule, host memory and link), built from the simulator or from measurements.
"""

from .costs import LayerCosts, MemoryCosts, ModuleCost, tokens_per_expert_skew
from .plan import MODULES, Action, LayerPlan, MemoryPlan

__all__ = [
    "MODULES",
    "Action",
    "LayerCosts",
    "LayerPlan",
    "MemoryCosts",
    "MemoryPlan",
    "ModuleCost",
    "tokens_per_expert_skew",
]
