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
it). Its efficiency parameters are per device type and were fitted once, by
:func:`calibrate`, on the four published MoE Parallel Folding runs on H100 (arXiv 2504.14960,
seq 4096, GBS 256, token drop with capacity factor 1, BF16, MFU against 989.5 TFLOPS counted
with non-causal attention):

=====================================================  ==========  =======  ======
run                                                    published   moerail  error
=====================================================  ==========  =======  ======
Mixtral-8x22B, 128 GPUs, TP2 PP8 EP8 ETP1 (folded)     49.3 %      48.6 %   -1.5 %
Mixtral-8x22B, 128 GPUs, TP2 PP8 EP4 ETP2 (coupled)    46.3 %      45.4 %   -1.9 %
Qwen2-57B-A14B, 64 GPUs, TP2 PP4 EP4 ETP1 (folded)     39.0 %      40.2 %   +3.2 %
Qwen2-57B-A14B, 64 GPUs, TP2 PP4 EP4 ETP2 (coupled)    35.3 %      35.6 %   +0.9 %
=====================================================  ==========  =======  ======

Fitted H100 values (priors in brackets): ``gemm_efficiency`` 0.7493 (0.75),
``attention_efficiency`` 0.5605 (0.55), ``memory_efficiency`` 0.5721 (0.70),
``intra_node_comm_efficiency`` 0.6454 (0.75), ``kernel_overhead_us`` 4.08 (4.0); unfitted
priors: ``gemm_dim_knee`` 64, ``inter_node_comm_efficiency`` 0.8, ``tp_overlap_efficiency``
0.8, ``overlap_efficiency`` 0.8.

Fitting procedure (:func:`calibrate`): maximum a posteriori over the log of five parameters
(``gemm_efficiency``, ``attention_efficiency``, ``memory_efficiency``,
``intra_node_comm_efficiency``, ``kernel_overhead_us``). The objective is
``sum_runs (log(pred / published) / 0.02)^2 + sum_params (log(value / prior) / 0.15)^2``: a
2 % measurement noise on each published MFU and a Gaussian prior of width 0.15 (in log space)
around each microbenchmark-based prior, minimised by Nelder-Mead from the priors. The other
parameters stay at their priors. The fitted values are stored in
``presets/clusters/h100-sxm.json`` (H800 and H200 share them: same Hopper silicon), and listed
by :data:`H100_CALIBRATION`. Ascend efficiencies are uncalibrated priors. The folded layouts
come out faster than the coupled ones because the model charges the expert-TP all-gather /
reduce-scatter and the narrower expert GEMMs, not because the fit is told so: the ordering
holds at the priors already.

Modules: :mod:`.ranks` (process groups), :mod:`.config` (presets, files, Megatron command lines),
:mod:`.step` (simulate, search), :mod:`.calibration` (fitted efficiencies).
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
