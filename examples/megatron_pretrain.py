"""Megatron-Core's own training loop, stock vs moerail, on 4 CPU ranks (one node, or two emulated
nodes joined by a shaped link).

A GPT-MoE model is built the way Megatron's ``pretrain_gpt.py`` builds one:
``parallel_state.initialize_model_parallel`` (TP / PP / EP, expert TP 1) on gloo, ``GPTModel`` from
Megatron's own local layer spec (attention + MoE layers, ``SequentialMLP`` experts, aux loss and the
aux-loss-free expert bias), Megatron's ``DistributedDataParallel`` and ``get_megatron_optimizer``
(Adam), ``get_forward_backward_func()`` (no pipelining, or 1F1B with ``--pp 2``) and
``finalize_model_grads``; data: byte-level text, Python's standard-library source. Four arms of the
same model, same data, same sizes, trained side by side in the same processes (one step of each arm
in turn, so a busy machine slows them alike):

1. ``stock``   Megatron as shipped (its ``alltoall`` token dispatcher);
2. ``patched`` ``moerail.integrations.megatron.patch_moe_utils()`` only (Megatron's ``moe_utils``
   functions on moerail's ops), around that arm's steps;
3. ``moerail`` moerail's router and ``AllToAllDispatcher`` (``with_moerail_dispatcher(spec,
   strategy=...)``, the exchange planned every step: ``auto`` picks flat / 2dh / dedup / allgather);
4. ``placed``  arm 3 plus dynamic expert placement: the load each layer's router sends every expert is
   summed over the EP group every step (``moerail.LoadTracker``), and every ``--rebalance-every``
   steps (a global-batch boundary) ``update_expert_placement`` re-places the experts for the
   tracker's EMA (``--placement-mode``) and moves their weights and Adam state.

``overlap`` is arm 3 with ``use_moerail(num_chunks=--num-chunks)``: each MoE layer's dispatch,
experts and combine run as a chunked pipeline, one chunk's exchange beside the experts' compute of
another, forward and backward. A last arm, ``stock_ulp``, is stock Megatron with every router weight moved by one ulp
(``torch.nextafter``): how far Megatron's own training drifts from a rounding-sized change, the
floor against which the other arms' agreement is read.

``--zipf S`` adds a fixed Zipf prior to every router's logits (expert of popularity rank r gets
``-S*log r``), the skewed routing real models show; it is the same for every arm.

Output: a progress bar, per-step loss of every arm, tokens/s, the exchange strategy, inter-node
bytes, and with ``--out DIR`` ``results.json`` (every step of every arm, the breakdown) for
``benches/bench_e2e.py``.

Run (one node): ``python examples/megatron_pretrain.py``; two emulated nodes (root, network
namespaces and ``tc``): ``python examples/megatron_pretrain.py --cluster netns --link-mbit 1000``;
each emulated node runs on its own half of the CPU cores (``--pin-nodes``), as real nodes compute
apart.
``--help`` lists the layout and model options.

On CPU, Megatron-Core makes a few CUDA calls even with gloo; ``cpu_stand_ins`` stands in for them in
these processes only (see its docstring). None of that is needed on GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
import types
import warnings
from datetime import timedelta
from typing import Dict, List, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ARMS = ("stock", "patched", "moerail", "placed", "overlap", "stock_ulp")
ARM_DOC = {
    "stock": "stock Megatron-Core (alltoall dispatcher)",
    "stock_ulp": "stock Megatron-Core, router weights one ulp off (the noise floor)",
    "patched": "patch_moe_utils() only",
    "moerail": "moerail router + AllToAllDispatcher",
    "placed": "moerail + dynamic expert placement",
    "overlap": "moerail, exchange overlapped with the experts (num_chunks)",
}
STRATEGIES = ("auto", "flat", "2dh", "dedup", "allgather")


# ------------------------------------------------------------------------------------------------
# Options and their checks (every rank makes the same checks before any collective, so a bad
# configuration fails at start-up with one message on every rank)
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arms", default="stock,patched,moerail,placed",
                    help=f"comma-separated arms to train side by side: {', '.join(ARMS)}")
    ap.add_argument("--world", type=int, default=4, help="ranks")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (sequence parallel when > 1)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline parallel size (1F1B when > 1)")
    ap.add_argument("--ep", type=int, default=4, help="expert parallel size (expert TP is 1)")
    ap.add_argument("--layouts", default=None,
                    help="several layouts run one after the other in the same processes, as TPxPPxEP "
                         "comma-separated (e.g. 1x1x4,2x1x2,1x2x2); overrides --tp/--pp/--ep")
    ap.add_argument("--cluster", choices=("local", "netns"), default="local",
                    help="local: every rank on loopback; netns: 2 emulated nodes x 2 ranks joined by a shaped link")
    ap.add_argument("--link-mbit", type=float, default=1000.0, help="netns: bandwidth of the inter-node link")
    ap.add_argument("--pin-nodes", choices=("auto", "on", "off"), default="auto",
                    help="netns: give each emulated node its own CPU cores (half of those this process may use), "
                         "so that a node's compute is its own, as on real nodes; auto: on when there are 2 or more")
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="ranks a node for moerail's planner (default: 2 with --cluster netns, else the EP size)")
    ap.add_argument("--strategy", default="auto", help=f"moerail's exchange strategy: {', '.join(STRATEGIES)}")
    ap.add_argument("--num-chunks", type=int, default=2,
                    help="arm 'overlap': use_moerail(num_chunks=N), the exchange of a MoE layer's tokens in N chunks, "
                         "each one's hidden behind the experts' compute of another, forward and backward")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the tokens/s median")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=128, help="expert FFN hidden size")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches a global batch (per DP rank)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--aux-loss", type=float, default=1e-2, help="moe_aux_loss_coeff")
    ap.add_argument("--expert-bias", type=int, default=1, help="1: aux-loss-free expert bias on (sigmoid router)")
    ap.add_argument("--zipf", type=float, default=0.0, help="Zipf prior on the router logits (0: none)")
    ap.add_argument("--rebalance-every", type=int, default=5, help="arm 'placed': steps between re-placements")
    ap.add_argument("--placement-mode", default="refine", choices=("refine", "eplb", "incremental"),
                    help="arm 'placed': update_expert_placement's mode (incremental: improve the current placement "
                         "by swaps, few experts move; refine / eplb: place from scratch)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None, help="folder for results.json")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the launcher kills the ranks")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--master", default="127.0.0.1:0", help=argparse.SUPPRESS)
    ap.add_argument("--cores", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def layouts(a: argparse.Namespace) -> List[argparse.Namespace]:
    """The options of each layout to run (``--layouts``, else ``--tp/--pp/--ep``); ValueError if
    ``--layouts`` does not parse."""
    if not a.layouts:
        return [a]
    out = []
    for item in a.layouts.split(","):
        try:
            tp, pp, ep = (int(x) for x in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--layouts: expected TPxPPxEP items such as 1x1x4, got {item!r}") from None
        out.append(argparse.Namespace(**{**vars(a), "tp": tp, "pp": pp, "ep": ep, "layouts": None}))
    return out


def check_config(a: argparse.Namespace) -> Optional[str]:
    """Why the configuration cannot run (one message, the same on every rank), or None."""
    if a.layouts:
        try:
            runs = layouts(a)
        except ValueError as e:
            return str(e)
        for r in runs:
            err = check_config(r)
            if err:
                return f"layout TP{r.tp} PP{r.pp} EP{r.ep}: {err}"
        return None
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    bad = [s for s in arms if s not in ARMS]
    if bad or not arms:
        return f"--arms: unknown arm(s) {bad or '(none)'}; expected some of {', '.join(ARMS)}"
    if a.strategy not in STRATEGIES:
        return f"--strategy: moerail knows {', '.join(STRATEGIES)}, got {a.strategy!r}"
    for name in ("world", "tp", "pp", "ep", "num_chunks", "steps", "layers", "hidden", "ffn", "heads", "experts", "topk", "seq",
                 "micro_batch", "micro_batches"):
        if getattr(a, name) < 1:
            return f"--{name.replace('_', '-')}: must be at least 1, got {getattr(a, name)}"
    if a.world % (a.tp * a.pp):
        return f"layout: TP {a.tp} x PP {a.pp} does not divide the {a.world} ranks"
    dp = a.world // (a.tp * a.pp)
    if (a.tp * dp) % a.ep:
        return (f"layout: EP {a.ep} does not divide the {a.tp * dp} ranks of a pipeline stage "
                f"(TP {a.tp} x DP {dp}; experts are folded over TP x DP with expert TP 1)")
    if a.ep > a.experts:
        return f"layout: EP {a.ep} is larger than the {a.experts} experts (every EP rank needs at least one)"
    if a.experts % a.ep:
        return f"layout: EP {a.ep} does not divide the {a.experts} experts"
    if a.topk > a.experts:
        return f"--topk {a.topk} is larger than --experts {a.experts}"
    if a.layers % a.pp:
        return f"layout: PP {a.pp} does not divide the {a.layers} layers"
    if a.hidden % a.heads or a.heads % a.tp:
        return f"--hidden {a.hidden} / --heads {a.heads} / TP {a.tp}: heads must divide hidden and TP the heads"
    if a.seq % a.tp:
        return f"--seq {a.seq}: sequence parallelism needs TP {a.tp} to divide it"
    rpn = a.ranks_per_node
    if rpn is not None and (rpn < 1 or a.ep % rpn):
        return f"--ranks-per-node {rpn} does not divide EP {a.ep}"
    if a.cluster == "netns" and a.world != 4:
        return "--cluster netns emulates 2 nodes x 2 ranks: use --world 4"
    return None


# ------------------------------------------------------------------------------------------------
# CPU stand-ins for Megatron-Core's CUDA-only calls (these processes only; not needed on GPUs)
# ------------------------------------------------------------------------------------------------


def cpu_stand_ins() -> None:
    """Lets Megatron-Core 0.16-0.19 train on CPU ranks with gloo:

    * ``torch.cuda.current_device`` -> the CPU (buffers, the DDP grad buffers, p2p shapes);
    * the all-to-all dispatcher's side stream and device-to-host step (its split sizes become
      host numbers, as Megatron's D2H copy makes them); ``moe_utils.te_general_gemm`` where 0.16
      names it without TransformerEngine;
    * ``pipeline_parallel.schedules`` and ``p2p_communication`` see a ``torch`` whose
      ``zeros`` / ``ones`` / ``empty`` / ``tensor`` map ``device="cuda"`` to the CPU and whose
      ``cuda.synchronize`` does nothing (the token counter, the 1F1B p2p shapes), and so do
      ``optimizer.optimizer``, ``optimizer.clip_grads`` and ``utils`` (loss scale, grad norm);
    * the CUDA RNG tracker's ``fork`` is a no-op context (dropout is 0 here);
    * without apex, the local spec's LayerNorm is :class:`SequenceParallelLayerNorm` (apex's
      ``FusedLayerNorm`` in plain torch) so that TP > 1 runs with sequence parallelism.

    Not stood in for: gradient clipping (``clip_grad_by_total_norm_fp32`` asserts CUDA tensors: the
    optimizer runs with ``clip_grad=0``; the grad norm is still computed) and Megatron's
    distributed optimizer (it asserts ``torch.cuda.FloatTensor`` parameters): the optimizer here is
    Megatron's ``FP32Optimizer`` (Adam) per parameter group, chained for dense and expert params."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe import token_dispatcher as td

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()

    def dtoh(self, point, tokens_per_expert=None):
        if not getattr(self, "drop_and_pad", False) and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                v = getattr(self, name, None)
                if isinstance(v, torch.Tensor):
                    setattr(self, name, v.numpy())
        return tokens_per_expert

    td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh

    def cpu(fn):
        def wrapped(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cuda":
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)

        return wrapped

    shim = types.ModuleType("torch_cpu_for_megatron")
    shim.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    for name in ("zeros", "ones", "empty", "tensor"):
        setattr(shim, name, cpu(getattr(torch, name)))
    shim.cuda = types.SimpleNamespace(**{k: getattr(torch.cuda, k) for k in dir(torch.cuda) if not k.startswith("__")})
    shim.cuda.synchronize = lambda *a, **k: None
    shim.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    for mod in (schedules, p2p_communication, mcore_optimizer, clip_grads, mcore_utils):
        mod.torch = shim

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()

    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if transformer_block.LayerNormImpl is WrappedTorchNorm:  # no apex: the final norm (layers: see layer_spec)
        transformer_block.LayerNormImpl = SequenceParallelLayerNorm


def layer_spec(num_experts: int):
    """Megatron's local GPT layer spec (``SequentialMLP`` experts); without apex its norms become
    :class:`SequenceParallelLayerNorm`."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    sub = spec.submodules
    norms = {f.name: SequenceParallelLayerNorm for f in dataclasses.fields(sub)
             if getattr(sub, f.name) is WrappedTorchNorm}
    return dataclasses.replace(spec, submodules=dataclasses.replace(sub, **norms)) if norms else spec


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """What apex's ``FusedLayerNorm`` is to Megatron's local spec, in plain torch: a LayerNorm whose
    parameters say ``sequence_parallel`` so ``finalize_model_grads`` sums their gradients over the
    TP group (torch's own, ``WrappedTorchNorm``, refuses sequence parallelism, which Megatron needs
    with TP and EP together)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)


# ------------------------------------------------------------------------------------------------
# Where the time goes: forward hooks and wrappers, the same for every arm
# ------------------------------------------------------------------------------------------------


class Profile:
    """Seconds per part of a step and the exchange's bytes, for the arm now running.

    ``exchange`` times every ``all_to_all_single`` (forward and backward, until its wait returns:
    none of them overlaps compute in these arms, so all of it is exposed); ``router`` / ``experts``
    are those modules' forward; ``permute`` / ``combine`` the dispatcher's forward methods around
    the exchange (Megatron's six-method API, the same in both dispatchers), less the exchange inside
    them; ``grad sync`` is ``finalize_model_grads`` (DDP's all-reduces, the expert-bias step);
    ``optimizer`` the optimizer step; ``rest`` all else (attention, embeddings, loss and the
    backward compute). Bytes: the rows each rank sends to ranks of another node.

    With ``--num-chunks N > 1`` (moerail's overlapped pipeline) the exchange runs in a helper
    thread beside the experts: ``exchange`` is then the seconds the step waited for it (the first
    chunk's dispatch, the last one's combine, and whatever the experts did not cover, forward and
    backward) and ``exchange hidden`` the rest of its work (plans, packing, all-to-alls, sums) that
    ran while the experts computed; ``permute`` / ``combine`` keep only the reshaping around it.
    ``exchange hidden`` is not part of the step's sum."""

    KEYS = ("router", "permute", "exchange", "experts", "combine", "grad sync", "optimizer", "exchange hidden")

    def __init__(self, node_of_global: List[int]) -> None:
        self.node_of = node_of_global
        self.acc: Dict[str, float] = {k: 0.0 for k in self.KEYS}
        self.inter_bytes = 0
        self.intra_bytes = 0
        self._a2a = 0.0  # exchange seconds so far (to take off the methods around it)
        self._nodes: Dict[object, List[int]] = {}
        self.overlapped: List = []  # AllToAllDispatchers running the chunked pipeline (they time it)

    def reset(self) -> None:
        self.acc = {k: 0.0 for k in self.KEYS}
        self.inter_bytes = self.intra_bytes = 0
        for ex in self.overlapped:
            ex.overlap_totals.update(exchange_seconds=0.0, exposed_seconds=0.0)

    def finish(self) -> None:
        """Takes in the overlapped pipelines' own timings (waited for, and hidden)."""
        for ex in self.overlapped:
            t = ex.overlap_totals
            self.acc["exchange"] += t["exposed_seconds"]
            self.acc["exchange hidden"] += max(0.0, t["exchange_seconds"] - t["exposed_seconds"])

    def timed(self, key: str, fn):
        prof = self

        def wrapped(*args, **kwargs):
            a0, t0 = prof._a2a, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.acc[key] += time.perf_counter() - t0 - (prof._a2a - a0)

        return wrapped

    def module(self, mod: torch.nn.Module, key: str) -> None:
        mod.register_forward_pre_hook(lambda m, i: setattr(m, "_t0", (time.perf_counter(), self._a2a)))

        def post(m, i, o):
            t0, a0 = m._t0
            self.acc[key] += time.perf_counter() - t0 - (self._a2a - a0)

        mod.register_forward_hook(post)

    def _group_nodes(self, group) -> List[int]:
        if group not in self._nodes:
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            self._nodes[group] = [self.node_of[r] for r in ranks]
        return self._nodes[group]


class _TimedWork:
    def __init__(self, work, prof: Profile, t0: float) -> None:
        self.work, self.prof, self.t0 = work, prof, t0

    def wait(self, *args, **kwargs):
        out = self.work.wait(*args, **kwargs)
        dt = time.perf_counter() - self.t0
        self.prof._a2a += dt
        self.prof.acc["exchange"] += dt
        return out

    def __getattr__(self, name):
        return getattr(self.work, name)


def instrument(model: torch.nn.Module, prof: Profile, loads: List[torch.Tensor]) -> None:
    """Timers on every MoE layer of ``model``; ``loads[i]`` accumulates the tokens layer ``i``'s
    router sends each expert (its routing map's column sums)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
        prof.module(layer.router, "router")
        prof.module(layer.experts, "experts")
        td = layer.token_dispatcher
        ex = getattr(td, "exchange", None)
        if ex is not None and ex.num_chunks > 1:
            prof.overlapped.append(ex)
        for name, key in (("dispatch_preprocess", "permute"), ("token_dispatch", "permute"),
                          ("dispatch_postprocess", "permute"), ("combine_preprocess", "combine"),
                          ("token_combine", "combine"), ("combine_postprocess", "combine")):
            setattr(td, name, prof.timed(key, getattr(td, name)))
        count = torch.zeros(layer.config.num_moe_experts, dtype=torch.float64)
        loads.append(count)

        def hook(m, i, o, count=count):
            count += o[1].reshape(-1, count.numel()).sum(0).to(torch.float64)

        layer.router.register_forward_hook(hook)


# ------------------------------------------------------------------------------------------------
# The model, the data and the loop, as pretrain_gpt.py builds them
# ------------------------------------------------------------------------------------------------

VOCAB = 256  # bytes


def make_config(a: argparse.Namespace):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=4 * a.hidden, moe_ffn_hidden_size=a.ffn,
        num_attention_heads=a.heads, num_moe_experts=a.experts, moe_router_topk=a.topk,
        tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp, expert_model_parallel_size=a.ep,
        expert_tensor_parallel_size=1, sequence_parallel=a.tp > 1, pipeline_dtype=torch.float32,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=a.aux_loss, moe_z_loss_coeff=1e-3,
        moe_router_score_function="sigmoid" if a.expert_bias else "softmax",
        moe_router_enable_expert_bias=bool(a.expert_bias), moe_router_bias_update_rate=1e-3,
        moe_router_dtype="fp32", use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=False, fp16=False, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, init_method_std=0.02,
    )  # fmt: skip


def build_arm(arm: str, a: argparse.Namespace, cfg, link, rpn: int):
    """One arm's model chunk (DDP-wrapped) and optimizer, from the same seed as every other arm."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from moerail.integrations import megatron as mi

    spec = layer_spec(a.experts)
    torch.manual_seed(a.seed)  # the same weights in every arm
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=a.seq,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=False)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if arm in ("moerail", "placed", "overlap"):
        chunks = getattr(a, "num_chunks", 2) if arm == "overlap" else 1
        for layer in layers:  # moerail's router and AllToAllDispatcher in Megatron's own MoELayer
            mi.use_moerail(layer, ranks_per_node=rpn, strategy=a.strategy, link=link, num_chunks=chunks)
    if arm == "stock_ulp":
        with torch.no_grad():
            for layer in layers:
                w = layer.router.weight
                w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))
    if a.zipf:
        for layer in layers:
            g = torch.Generator().manual_seed(1000 + layer.layer_number)
            prior = -a.zipf * torch.log(torch.randperm(a.experts, generator=g).double() + 1).float()
            gating = layer.router.gating
            layer.router.gating = lambda x, gating=gating, prior=prior: gating(x) + prior
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=False, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    model = DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=model)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=a.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                              clip_grad=0.0, bf16=False, fp16=False, params_dtype=torch.float32,
                              use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(opt_cfg, [model], use_gloo_process_groups=False)
    return model, optimizer


class Data:
    """Random windows of Python's standard-library source, as bytes: the same stream for every arm;
    each data-parallel rank draws its own (TP and PP ranks of one replica share it)."""

    def __init__(self, corpus: torch.Tensor, a: argparse.Namespace, dp_rank: int) -> None:
        self.corpus, self.a = corpus, a
        self.gen = torch.Generator().manual_seed(a.seed + 7919 * dp_rank)

    def __iter__(self):
        return self

    def __next__(self):
        a = self.a
        starts = torch.randint(len(self.corpus) - a.seq - 1, (a.micro_batch,), generator=self.gen)
        win = torch.stack([self.corpus[s: s + a.seq + 1] for s in starts.tolist()])
        return {"tokens": win[:, :-1].contiguous(), "labels": win[:, 1:].contiguous()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool), 1)[None, None]
    out = model(tokens, pos, mask, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    return out, loss_func


def _device_max_mean(load: torch.Tensor, phy2log: torch.Tensor, world: int) -> float:
    """Busiest device's tokens over the mean device's, for one layer's expert load and placement."""
    dev = load[phy2log].reshape(world, -1).sum(1)
    return float(dev.max() / dev.mean()) if float(dev.sum()) > 0 else 1.0


class Arm:
    """One arm: its model chunk, optimizer, data stream, timers and history."""

    def __init__(self, name: str, a: argparse.Namespace, corpus, link, rpn: int, node_of: List[int]) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads

        self.name, self.a = name, a
        self.cfg = make_config(a)
        self.model, self.optimizer = build_arm(name, a, self.cfg, link, rpn)
        self.prof = Profile(node_of)
        self.loads: List[torch.Tensor] = []
        instrument(self.model, self.prof, self.loads)
        self.cfg.no_sync_func = self.model.no_sync
        self.cfg.grad_scale_func = self.optimizer.scale_loss
        self.cfg.finalize_model_grads_func = self.prof.timed("grad sync", finalize_model_grads)
        self.data = Data(corpus, a, ps.get_data_parallel_rank())
        self.hist: Dict[str, list] = {k: [] for k in ("loss", "step_s", "breakdown", "inter_node_bytes",
                                                       "intra_node_bytes", "strategy", "max_mean_load",
                                                       "rebalances", "grad_norm")}
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.layers = [m for m in self.model.modules() if isinstance(m, MoELayer)]
        self.tracker = None
        if name == "placed" and self.loads:
            import moerail

            # Load per expert, summed over the EP group every step; its EMA (the load the next
            # window is expected to bring) drives the re-placement.
            self.tracker = moerail.LoadTracker(len(self.loads), a.experts, window=4 * a.rebalance_every,
                                               group=self._ep_group(), keep_trace=False)

    def _ep_group(self):
        return self.layers[0].token_dispatcher.exchange.ep_group

    def _phy2log(self, layer) -> torch.Tensor:
        ex = getattr(layer.token_dispatcher, "exchange", None)
        return ex.phy2log if ex is not None else torch.arange(self.a.experts)

    def step(self, i: int, fb) -> None:
        from megatron.core import parallel_state as ps

        from moerail.integrations import megatron as mi

        a = self.a
        if self.name == "patched":
            mi.patch_moe_utils()
        try:
            self.prof.reset()
            dist.barrier()
            t0 = time.perf_counter()
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            losses = fb(forward_step_func=forward_step, data_iterator=self.data, model=[self.model],
                        num_microbatches=a.micro_batches, seq_length=a.seq, micro_batch_size=a.micro_batch,
                        forward_only=False)
            t1 = time.perf_counter()
            _, grad_norm, _ = self.optimizer.step()
            self.prof.acc["optimizer"] += time.perf_counter() - t1
            rebalance = None
            if self.tracker is not None:
                self.tracker.record_all(torch.stack(self.loads))
                self.tracker.step()
                if i % a.rebalance_every == 0:
                    rebalance = self._rebalance()
            dt = time.perf_counter() - t0
            self.prof.finish()
        finally:
            if self.name == "patched":
                mi.unpatch_moe_utils()
        # Bookkeeping, outside the timed step: loss, step time, breakdown, bytes, load.
        last = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        loss = sum(float(x["lm loss"]) for x in losses) / len(losses) if last and losses else 0.0
        w = dist.get_world_size()
        vec = torch.tensor([loss, float(last), dt, self.prof.inter_bytes, self.prof.intra_bytes,
                            *[self.prof.acc[k] for k in Profile.KEYS]], dtype=torch.float64)
        dist.all_reduce(vec)
        tmax = torch.tensor([dt], dtype=torch.float64)
        dist.all_reduce(tmax, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank is done
        h = self.hist
        h["loss"].append(float(vec[0] / vec[1]))
        h["step_s"].append(float(tmax))
        h["inter_node_bytes"].append(int(vec[3]))
        h["intra_node_bytes"].append(int(vec[4]))
        h["breakdown"].append({k: float(vec[5 + j]) / w for j, k in enumerate(Profile.KEYS)})
        h["grad_norm"].append(float(grad_norm) if grad_norm is not None else None)
        ex = getattr(self.layers[0].token_dispatcher, "exchange", None) if self.layers else None
        h["strategy"].append(ex.last_stats.get("strategy") if ex is not None else "megatron alltoall")
        ratios = []
        for layer, x in zip(self.layers, self.loads):
            g = layer.token_dispatcher.exchange.ep_group if ex is not None else ps.get_expert_model_parallel_group()
            tot = x.clone()
            dist.all_reduce(tot, group=g)
            ratios.append(_device_max_mean(tot, self._phy2log(layer), dist.get_world_size(g)))
            x.zero_()
        h["max_mean_load"].append(sum(ratios) / max(1, len(ratios)))
        if rebalance is not None:
            h["rebalances"].append({"step": i, **rebalance})

    def _rebalance(self) -> Dict:
        """Re-places this stage's experts for the load the tracker's EMA predicts for the next window
        (global-batch boundary, after the optimizer step) and moves weights and Adam state."""
        import moerail
        from moerail.integrations import megatron as mi

        a = self.a
        g = self._ep_group()
        world = dist.get_world_size(g)
        rpn = self.layers[0].token_dispatcher.exchange.ranks_per_node
        nodes = max(1, world // rpn)
        hist = self.tracker.history[-a.rebalance_every:].mean(0)
        current = torch.stack([self._phy2log(layer) for layer in self.layers])
        window = moerail.placement_metrics(hist, current, world, nodes)["summary"]["max_mean_device"]
        load = self.tracker.predict("ema", horizon=a.rebalance_every)
        states = {}
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            states.update(opt.optimizer.state)
        info = mi.update_expert_placement(self.model, load, types.SimpleNamespace(state=states), num_nodes=nodes,
                                          mode=a.placement_mode)
        return {"migrated": bool(info["migrated"]), "window": float(window), "before": float(info["before"]),
                "after": float(info["after"]), "moved": len(info["plan"].transfers)}

    def params(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.module.named_parameters()}


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def worker(a: argparse.Namespace) -> None:
    rank = a.worker
    err = check_config(a)
    if err:
        print(f"megatron_pretrain (rank {rank}): {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if a.cores:
        os.sched_setaffinity(0, [int(c) for c in a.cores.split(",")])
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    import moerail

    moerail.set_num_threads(1)
    host, port = a.master.rsplit(":", 1)
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=a.world,
                            timeout=timedelta(seconds=300))
    cpu_stand_ins()

    sys.path.insert(0, str(HERE))
    import train_moe  # the demo's corpus loader: Python's standard-library source as bytes

    netns = a.cluster == "netns"
    node_size = 2 if netns else a.world
    node_of = [r // node_size for r in range(a.world)]
    link = None
    if netns:
        sys.path.insert(0, str(HERE.parent / "benches"))
        import netns_a2a

        link = netns_a2a._calibrate(rank)
    corpus_bytes, corpus_doc = train_moe.load_corpus(2_000_000)
    corpus = torch.frombuffer(bytearray(corpus_bytes), dtype=torch.uint8).long()
    current: Dict = {}
    _route_a2a(current)
    results = {"megatron_core": _mcore_version(), "torch": torch.__version__, "data": corpus_doc,
               "link": None if link is None else {k: getattr(link, k) for k in (
                   "intra_node_bw", "inter_node_bw", "node_bw", "latency", "inter_node_latency")},
               "runs": []}
    for lay in layouts(a):
        results["runs"].append(run_layout(lay, rank, corpus, corpus_doc, link, node_of, current))
        if rank == 0 and a.out:
            pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
            (pathlib.Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def run_layout(a: argparse.Namespace, rank: int, corpus, corpus_doc: str, link, node_of: List[int],
               current: Dict) -> Dict:
    """Trains the arms side by side in one layout; returns (on every rank) its results."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    netns = a.cluster == "netns"
    rpn = a.ranks_per_node or (2 if netns and a.ep % 2 == 0 and a.ep == a.world else a.ep)
    ps.initialize_model_parallel(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                 expert_model_parallel_size=a.ep, expert_tensor_parallel_size=1,
                                 create_gloo_process_groups=False)
    arm_names = [s.strip() for s in a.arms.split(",") if s.strip()]
    arms = [Arm(n, a, corpus, link, rpn, node_of) for n in arm_names]
    current["prof"] = arms[0].prof
    fb = get_forward_backward_func()
    dp = a.world // (a.tp * a.pp)
    tokens_per_step = a.seq * a.micro_batch * a.micro_batches * dp
    bar = None
    if rank == 0:
        print(f"megatron-core {_mcore_version()}: GPTModel {a.layers} layers, hidden {a.hidden}, {a.experts} experts "
              f"top-{a.topk} (expert FFN {a.ffn}), TP{a.tp} PP{a.pp} EP{a.ep} DP{dp} on {a.world} ranks "
              f"({'2 emulated nodes x 2, ' + f'{a.link_mbit:g} Mbit/s between them' if netns else 'one node'}"
              f"{f', each node on its own CPU cores (rank 0: {a.cores})' if a.cores else ''}); "
              f"{tokens_per_step} tokens a step; data: {corpus_doc}", flush=True)
        if link is not None:
            print(f"link measured: inter-node {link.inter_node_bw * 8 / 1e6:.0f} Mbit/s a node, latency "
                  f"{link.inter_node_latency * 1e3:.2f} ms; intra-node {link.intra_node_bw * 8 / 1e9:.1f} Gbit/s",
                  flush=True)
        if not a.no_progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=a.steps, desc="steps", file=sys.stderr)
            except ImportError:
                bar = None
    for i in range(1, a.steps + 1):
        for arm in arms:
            current["prof"] = arm.prof
            arm.step(i, fb)
        if rank == 0:
            line = (f"step {i:3d}  loss " + " ".join(f"{x.name} {x.hist['loss'][-1]:.5f}" for x in arms)
                    + "  | tok/s " + " ".join(f"{tokens_per_step / x.hist['step_s'][-1]:.0f}" for x in arms)
                    + "  | inter-node/step " + " ".join(_fmt_bytes(x.hist["inter_node_bytes"][-1]) for x in arms)
                    + "  | strategy " + ",".join(sorted({str(x.hist["strategy"][-1]) for x in arms
                                                         if x.name in ("moerail", "placed", "overlap")})))
            for x in arms:
                for rb in x.hist["rebalances"]:
                    if rb["step"] == i:
                        line += (f"  | re-placed: max/mean last window {rb['window']:.2f}, predicted {rb['before']:.2f} -> "
                                 f"{rb['after']:.2f}, {rb['moved']} moved")
            (bar.write if bar is not None else print)(line)
            if bar is not None:
                bar.update(1)
            sys.stdout.flush()
    if bar is not None:
        bar.close()
    # Parameters at the end, each arm against the first (same names: moerail adds none): the largest
    # absolute difference, and the largest of each tensor's ||difference|| / ||parameter||.
    ref = arms[0].params()
    diffs = {}
    for arm in arms[1:]:
        p = arm.params()
        same = set(p) == set(ref)
        d = torch.tensor([max((float((p[n] - r).abs().max()) for n, r in ref.items()), default=0.0) if same else 0,
                          max((float((p[n] - r).norm() / r.norm().clamp_min(1e-30)) for n, r in ref.items()),
                              default=0.0) if same else 0, float(not same)], dtype=torch.float64)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        diffs[arm.name] = {"max_abs": float(d[0]), "max_norm_rel": float(d[1]), "names_differ": bool(d[2])}
    res = {"config": {k: v for k, v in vars(a).items() if k not in ("worker", "master")},
           "tokens_per_step": tokens_per_step, "ranks_per_node": rpn,
           "arms": {x.name: x.hist for x in arms}, "param_diff_vs_first": diffs}
    if rank == 0:
        print(summary(res), flush=True)
    ps.destroy_model_parallel()
    return res


def _route_a2a(current: Dict) -> None:
    """``dist.all_to_all_single`` (Megatron's and moerail's exchanges both call it) charged to
    ``current["prof"]``, the arm now running: its seconds (until the wait returns) and the bytes
    each rank sends inside and between nodes."""
    orig = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        prof = current["prof"]
        nodes = prof._group_nodes(group)
        me = dist.get_rank(group)
        row = input[0].numel() * input.element_size() if input.dim() and input.shape[0] else 0
        splits = list(input_split_sizes) if input_split_sizes is not None else \
            [input.shape[0] // len(nodes)] * len(nodes)
        for d, n in enumerate(splits):
            if d != me:
                if nodes[d] == nodes[me]:
                    prof.intra_bytes += int(n) * row
                else:
                    prof.inter_bytes += int(n) * row
        if prof.overlapped:  # the overlapped pipeline times its exchanges itself
            return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
        t0 = time.perf_counter()
        work = orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
        if async_op:
            return _TimedWork(work, prof, t0)
        dt = time.perf_counter() - t0
        prof._a2a += dt
        prof.acc["exchange"] += dt
        return work

    dist.all_to_all_single = all_to_all_single


def _mcore_version() -> str:
    import megatron.core as mc

    return getattr(mc, "__version__", "?")


def summary(res: Dict) -> str:
    """Per arm: median tokens/s after warm-up, its ratio to the first arm, last loss, inter-node bytes."""
    warm = res["config"]["warmup"]
    first = None
    lines = ["", "arm        tokens/s  vs first  last loss  inter-node/step  strategy"]
    for name, h in res["arms"].items():
        steps = sorted(h["step_s"][warm:] or h["step_s"])
        med = steps[len(steps) // 2]
        tps = res["tokens_per_step"] / med
        first = first or tps
        inter = sorted(h["inter_node_bytes"][warm:] or h["inter_node_bytes"])
        strat = sorted({str(s) for s in h["strategy"]})
        lines.append(f"{name:9s} {tps:9.0f}  {tps / first:7.2f}x  {h['loss'][-1]:9.5f}  "
                     f"{_fmt_bytes(inter[len(inter) // 2]):>15s}  {','.join(strat)}")
    for name, d in res["param_diff_vs_first"].items():
        lines.append(f"parameters at the end, {name} vs {next(iter(res['arms']))}: max abs diff {d['max_abs']:.3g}, "
                     f"largest ||diff||/||param|| {d['max_norm_rel']:.3g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The launcher: 4 processes on loopback, or in two network namespaces joined by a shaped veth
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: List[str]) -> Dict:
    """Starts the ranks and waits for them; returns rank 0's results (``--out`` or a temp folder).
    A rank that fails stops the others within seconds (no hang); its message is shown."""
    import tempfile

    a = parse_args(argv)
    err = check_config(a)
    if err:
        raise SystemExit(f"megatron_pretrain: {err}")
    netns_mod = None
    if a.cluster == "netns":
        sys.path.insert(0, str(HERE.parent / "benches"))
        import netns_a2a as netns_mod

        # Names of its own, so that an exchange benchmark running beside it keeps its namespaces.
        netns_mod.NS, netns_mod.VETH = ("moerail_e2e0", "moerail_e2e1"), ("moerail_e2e_v0", "moerail_e2e_v1")
        netns_mod.ADDR = ("10.231.7.1", "10.231.7.2")
        why = netns_mod.available()
        if why:
            print(f"megatron_pretrain: two emulated nodes are not available here ({why}); running on one node "
                  "(--cluster local) instead", flush=True)
            a.cluster, netns_mod = "local", None
    out = a.out or tempfile.mkdtemp(prefix="moerail_megatron_")
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    res_path = pathlib.Path(out) / "results.json"
    if res_path.exists():
        res_path.unlink()
    if netns_mod is not None:
        netns_mod.setup(a.link_mbit)
        host = netns_mod.ADDR[0]
        port = 29000 + os.getpid() % 2000
    else:
        host, port = "127.0.0.1", _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MOERAIL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONWARNINGS="ignore")
    node_cores = _node_cores(a) if netns_mod is not None else None
    procs, logs = [], []
    try:
        for r in range(a.world):
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--cluster", a.cluster, "--out", out,
                   "--worker", str(r), "--master", f"{host}:{port}"]
            env_r = dict(env)
            if netns_mod is not None:
                node = r // 2
                if node_cores is not None:
                    cmd += ["--cores", ",".join(map(str, node_cores[node]))]
                cmd = ["ip", "netns", "exec", netns_mod.NS[node], *cmd]
                env_r["GLOO_SOCKET_IFNAME"] = netns_mod.VETH[node]
            log = open(pathlib.Path(out) / f"rank{r}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env_r, stdout=None if r == 0 else subprocess.DEVNULL,
                                          stderr=None if r == 0 else log))
        deadline = time.monotonic() + a.timeout
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if time.monotonic() > deadline or (failed_at is not None and time.monotonic() - failed_at > 15):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)
        for p in procs:
            p.wait()
        bad = [r for r, p in enumerate(procs) if p.returncode != 0]
        if bad:
            msgs = []
            for r in bad:
                if r == 0:
                    msgs.append("rank 0: see above")
                    continue
                logs[r].seek(0)
                tail = logs[r].read()[-2000:].strip()
                msgs.append(f"rank {r} (exit {procs[r].returncode}): {tail or '(killed: another rank failed)'}")
            raise RuntimeError("megatron_pretrain: ranks failed\n" + "\n".join(msgs))
        return json.loads(res_path.read_text())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
        if netns_mod is not None:
            netns_mod.teardown()


def _node_cores(a: argparse.Namespace) -> Optional[List[List[int]]]:
    """The CPU cores of each of the 2 emulated nodes: the cores this process may use, split in halves.
    Without it the 4 ranks share every core, and a node waiting on the link lends its cores to the
    other node, which real nodes cannot do (it hides any imbalance of work between the nodes)."""
    cores = sorted(os.sched_getaffinity(0))
    if a.pin_nodes == "off" or (a.pin_nodes == "auto" and len(cores) < 2):
        return None
    if len(cores) < 2:
        raise SystemExit(f"megatron_pretrain: --pin-nodes on needs 2 or more CPU cores, this process may use {len(cores)}")
    half = len(cores) // 2
    return [cores[:half], cores[half:2 * half]]


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.worker is not None:
        try:
            worker(a)
        except SystemExit:
            raise
        except BaseException:
            print(f"megatron_pretrain (rank {a.worker}):\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            sys.exit(1)
        return
    try:
        launch(argv)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
