"""Parallel layouts and the training-step simulator.

* :func:`rank_groups` lists every process group Megatron-Core makes for a MoE Parallel Folding
  layout (attention TP x CP x DP x PP and experts ETP x EP x EDP x PP over the same ranks),
  identical to ``megatron.core.parallel_state``.
* :func:`simulate` predicts one training step of a model on a cluster under a layout: model
  FLOPs (Megatron's formula, causal and not), step time and its breakdown, MFU, tokens/s and
  per-device memory by part. :func:`search` enumerates and ranks layouts.
* Configurations use Megatron-LM's argument names, in four sections (``model``, ``training``,
  ``layout``, ``cluster``), from TOML, JSON, a dict, presets, or a Megatron command line
  (:func:`parse_megatron_args`). :func:`config_keys` lists the keys.

A configuration file (TOML; JSON takes the same structure)::

    [model]
    preset = "Mixtral-8x22B"        # or every key: num_layers, hidden_size, ...

    [training]
    seq_length = 4096
    global_batch_size = 256
    micro_batch_size = 1
    moe_expert_capacity_factor = 1.0
    moe_pad_expert_input_to_capacity = true
    recompute_granularity = "selective"
    recompute_modules = ["layernorm", "moe_act"]

    [layout]
    tensor_model_parallel_size = 2
    pipeline_model_parallel_size = 8
    expert_model_parallel_size = 8
    expert_tensor_parallel_size = 1   # folded: experts use their own TP size

    [cluster]
    preset = "H100"
    devices = 128

``moerail plan --config plan.toml`` prints the prediction (``--json``: one JSON object);
without a ``[layout]`` (or with ``--top``) it searches the layouts instead.

The cost model itself lives in Rust (``moerail_core::sim``; its module documentation describes
it). Its efficiency parameters are per device family (Hopper, Blackwell, Ascend), never per run:
the presets hold the maximum a posteriori fit per family (:func:`moerail.sim.validation.fit`) on
the public table of published MoE training runs ``benches/sim_validation.csv`` (MoE Parallel
Folding, Megatron-MoE-ModelZoo, Megatron-Bridge, DeepSeek-V3, Pangu Ultra MoE; each row with its
source and stated settings). ``benches/bench_sim_validation.py`` refits with each run and each
source held out (:func:`moerail.sim.validation.cross_validate`) and ``benches/BENCHMARKS.md``
reports those errors by source and by group; read them before trusting a prediction on a kind of
run the table does not hold. Ascend keeps its priors: the table has one Ascend run.

:func:`calibrate` is the older fit on the four Parallel Folding runs (:data:`PUBLISHED`), kept for
fitting one's own measured runs.

Modules: :mod:`.ranks` (process groups), :mod:`.config` (presets, files, Megatron command lines),
:mod:`.step` (simulate, search), :mod:`.calibration` (fitting efficiencies), :mod:`.validation`
(the published-runs table, per-family fit, cross-validation).
"""

from __future__ import annotations

from . import calibration, config, ranks, step
from .calibration import *  # noqa: F403
from .calibration import PRIORS as PRIORS
from .config import *  # noqa: F403
from .config import PRESETS as PRESETS
from .config import SECTIONS as SECTIONS
from .config import ConfigLike as ConfigLike
from .ranks import *  # noqa: F403
from .step import *  # noqa: F403

__all__ = [*calibration.__all__, *config.__all__, *ranks.__all__, *step.__all__]
