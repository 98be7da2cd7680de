"""Expert load statistics and dynamic expert placement (EDPB): measure, predict, place, migrate.

The loop, as Pangu Ultra MoE's EDPB and DeepSeek's EPLB run it:

1. **Measure** - :class:`LoadTracker` accumulates tokens per expert per MoE layer from the
   router's counts (no extra pass over tokens), reduces them across ranks once per step, keeps
   a sliding window, and exports a per-step dict, a JSON/CSV trace and a heatmap.
2. **Predict** - EMA, window mean or linear trend of the next interval's load;
   :meth:`LoadTracker.backtest` says which predicts best on the recorded history.
3. **Place** - :func:`rebalance_experts` (EPLB's format: ``phy2log``, ``log2phy``, ``logcnt``),
   ``mode="eplb"`` (DeepSeek's algorithm exactly) or ``mode="refine"`` (never worse).
4. **Decide** - :func:`plan_migration` lists the transfers (slots matched so experts stay put)
   and prices them on a :class:`LinkModel`; :func:`should_migrate` weighs the predicted step
   time gain over a horizon against that cost, and logs the decision.
5. **Migrate** - :func:`migrate_experts` moves expert weights and their optimizer state between
   ranks with torch.distributed. Replicas stay identical: :func:`allreduce_replica_grads` sums
   their gradients, and :func:`select_replicas` sends each token to one replica of its expert,
   deterministically and evenly.

The algorithms run in Rust (``moerail._native``), in parallel over layers, with results that do
not depend on the thread count. Placements live on the CPU as int64 tensors: ``phy2log [L, R]``
is the logical expert in each physical slot; slot ``s`` is slot ``s % (R // G)`` of rank
``s // (R // G)`` for ``G`` devices (EP ranks).

Modules: :mod:`.placement` (place), :mod:`.tracker` (measure, predict; :mod:`.plot` draws the
heatmap), :mod:`.link` (the link model), :mod:`.migration` (decide, migrate), :mod:`.replicas`
(replica choice, replica gradients).
"""

from __future__ import annotations

from . import link, migration, placement, replicas, tracker
from .link import *  # noqa: F403
from .migration import *  # noqa: F403
from .migration import SlotTensors as SlotTensors
from .migration import logger as logger
from .placement import *  # noqa: F403
from .placement import MODES as MODES
from .plot import plot_heatmap as plot_heatmap
from .replicas import *  # noqa: F403
from .tracker import *  # noqa: F403
from .tracker import PREDICTORS as PREDICTORS

__all__ = sorted([*link.__all__, *migration.__all__, *placement.__all__, *replicas.__all__, *tracker.__all__])
