"""Expert parallelism: the token exchange between the ranks of an expert-parallel group.

* :mod:`.plan`: ``plan_all_to_all`` and ``AllToAllPlan`` (the strategies ``flat``, ``2dh``,
  ``dedup``, ``allgather``, their per-stage rows, bytes and alpha-beta cost);
* :mod:`.dispatcher`: ``AllToAllDispatcher``, which runs the planned exchange (dispatch and
  combine, differentiable);
* :mod:`.autograd`: the ``torch.autograd.Function`` classes it uses, expert tensor parallelism
  (ETP) included.
"""

from __future__ import annotations

from . import dispatcher, plan
from .dispatcher import *  # noqa: F403
from .plan import *  # noqa: F403

__all__ = [*plan.__all__, *dispatcher.__all__]
