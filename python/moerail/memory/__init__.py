"""Memory planning for MoE activations: keep, recompute or swap each module's saved tensors.

`plan.py` holds the plan (the typed value the planner, the executor and the Megatron-Core
integration share).
"""

from .plan import MODULES, Action, LayerPlan, MemoryPlan

__all__ = ["MODULES", "Action", "LayerPlan", "MemoryPlan"]
