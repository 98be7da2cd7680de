"""moerail's MoE ops on torch tensors, with Megatron-Core's semantics and argument names.

* :mod:`.router`: top-k routing, expert capacity and token dropping, the load-balancing and
  z losses, the aux-loss-free expert-bias update;
* :mod:`.permutation`: ``permute`` / ``unpermute`` (tokens grouped by expert and back),
  ``permute_by_indices``, ``sort_chunks_by_idxs``;
* :mod:`.custom_ops` (internal): the torch custom ops (``torch.ops.moerail.*``) both call, with
  their fake kernels and autograd formulas; the CPU kernels are Rust (``moerail._native``), the
  CUDA and NPU paths live in :mod:`moerail.backends`.
"""

from __future__ import annotations

from . import permutation, router
from .permutation import *  # noqa: F403
from .router import *  # noqa: F403
from .router import SCORE_FUNCTIONS

__all__ = ["SCORE_FUNCTIONS", *router.__all__, *permutation.__all__]
