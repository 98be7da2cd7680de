"""Megatron-Core's own training loop on CPU gloo ranks, several memory settings side by side: the
harness of the executor's exactness tests and of ``benches/bench_memory.py`` (not a test module).

Every arm is the same ``GPTModel`` (Megatron's local layer spec: attention + MoE layers,
``SequentialMLP`` experts, sigmoid router with aux loss, z-loss and the aux-loss-free expert bias),
built from the same seed, with Megatron's ``DistributedDataParallel``, its Adam
(``get_megatron_optimizer``), ``get_forward_backward_func()`` (1F1B with PP 2) and
``finalize_model_grads``; the arms train in turn on the same data, one step each, in the same
processes. An arm is a dict:

* ``name``; ``dispatcher``: ``"moerail"`` (``use_moerail``) or ``"megatron"`` (its alltoall);
* ``plan``: a ``MemoryPlan.to_dict()`` for ``apply_memory_plan`` (``None``: no plan);
  ``throttle_s`` / ``prefetch_delay_s`` / ``min_swap_bytes`` / ``lookahead`` / ``prefetch_groups`` for it;
* ``megatron``: ``TransformerConfig`` recompute settings (``recompute_granularity``, ...);
* ``ref``: the arm it must match bit for bit (losses, every ``main_grad`` after the gradient
  reduction, the aux-loss tracker, the router token counts before the bias update, the expert bias).

Per arm and step it reports the loss, the step time (wall-clock, and the rank's CPU time: all
its threads, which other work on the machine does not add to), the exact peak of saved-tensor bytes (one
counter through ``saved_tensors_hooks`` around the whole step, Megatron's own recomputation in the
backward included), and the differences from its reference.

Test-only stand-ins (these processes only): examples/megatron_pretrain.py's ``cpu_stand_ins``; for
Megatron's checkpoint functions on a machine without CUDA, its CUDA RNG state get/set; without
TransformerEngine, the FP8 state its ``CheckpointWithoutOutput`` asks for (FP8 off).
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 256

SMALL = dict(layers=2, hidden=32, ffn=32, heads=4, experts=8, topk=2, seq=32, micro_batch=1, micro_batches=2)


def _config(m: Dict, tp: int, pp: int, ep: int, extra: Dict):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=m["layers"], hidden_size=m["hidden"], ffn_hidden_size=4 * m["hidden"],
        moe_ffn_hidden_size=m["ffn"], num_attention_heads=m["heads"], num_moe_experts=m["experts"],
        moe_router_topk=m["topk"], tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=1, sequence_parallel=tp > 1,
        pipeline_dtype=torch.float32, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3,
        moe_shared_expert_intermediate_size=m.get("shared"),
        moe_router_dtype="fp32", use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=False, fp16=False, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, init_method_std=0.02, deterministic_mode=True,
        **extra,
    )  # fmt: skip


def _stand_ins() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import megatron_pretrain as ex

    ex.cpu_stand_ins()
    from megatron.core.tensor_parallel import random as mrandom

    if not torch.cuda.is_available():  # Megatron's checkpoints save and restore the CUDA RNG state
        mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
        mrandom._set_cuda_rng_state = lambda *a, **k: None
    if not getattr(mrandom, "HAVE_TE", True):
        # megatron-core 0.16's CheckpointWithoutOutput (its layernorm / moe_act recompute) sets
        # ``fp8 = fp8 is not None``, True for its default False, and then calls TransformerEngine's FP8
        # state: without TransformerEngine, FP8 off.
        import contextlib
        import types

        mrandom.FP8GlobalStateManager = types.SimpleNamespace(is_fp8_enabled=lambda: False,
                                                              get_fp8_recipe=lambda: None)
        mrandom.activation_recompute_forward = lambda *a, **k: contextlib.nullcontext()
        mrandom.fp8_autocast = lambda *a, **k: contextlib.nullcontext()


class _Data:
    def __init__(self, m: Dict, dp_rank: int, seed: int = 1234) -> None:
        self.m = m
        self.gen = torch.Generator().manual_seed(seed + 7919 * dp_rank)

    def __iter__(self):
        return self

    def __next__(self):
        win = torch.randint(VOCAB, (self.m["micro_batch"], self.m["seq"] + 1), generator=self.gen)
        return {"tokens": win[:, :-1].contiguous(), "labels": win[:, 1:].contiguous()}


def _forward_step(data_iterator, model):
    import megatron_pretrain as ex  # the example's step: the same loss in both harnesses

    return ex.forward_step(data_iterator, model)


class Arm:
    def __init__(self, spec: Dict, m: Dict, tp: int, pp: int, ep: int) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.moe.moe_layer import MoELayer

        from moerail.integrations import megatron as mi
        from moerail.memory import MemoryPlan
        from moerail.memory.executor import SavedTensorCounter

        sys.path.insert(0, str(ROOT / "examples"))
        import megatron_pretrain as ex

        self.spec = spec
        self.name = spec["name"]
        self.cfg = _config(m, tp, pp, ep, spec.get("megatron", {}))
        torch.manual_seed(1234)
        model = GPTModel(config=self.cfg, transformer_layer_spec=ex.layer_spec(m["experts"]), vocab_size=VOCAB,
                         max_sequence_length=m["seq"], pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=False)
        self.moe = [x for x in model.modules() if isinstance(x, MoELayer)]
        if spec.get("dispatcher", "moerail") == "moerail":
            for layer in self.moe:
                mi.use_moerail(layer, strategy="flat")
        self.executor = None
        if spec.get("plan") is not None:
            plan = spec["plan"] if isinstance(spec["plan"], MemoryPlan) else MemoryPlan.from_dict(spec["plan"])
            self.executor = mi.apply_memory_plan(model, plan, min_swap_bytes=spec.get("min_swap_bytes", 0),
                                                 throttle_s=spec.get("throttle_s", 0.0),
                                                 prefetch_delay_s=spec.get("prefetch_delay_s", 0.0),
                                                 lookahead=spec.get("lookahead", 1),
                                                 prefetch_groups=spec.get("prefetch_groups", 1))
        self.counter = SavedTensorCounter()
        if self.executor is not None:
            self.executor.counter = self.counter
        self.params = list(model.parameters())
        self.plain = bool(spec.get("plain"))
        if self.plain:
            # No DDP, no optimizer, no schedule: micro-batches forward and backward one after the other
            # (for Megatron-Core versions whose DDP needs CUDA streams).
            self.model, self.module = model, model
            self.data = _Data(m, ps.get_data_parallel_rank())
            self.m = m
            return
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=False, overlap_grad_reduce=False,
                                                use_distributed_optimizer=False)
        self.model = DistributedDataParallel(config=self.cfg, ddp_config=ddp_cfg, module=model)
        opt_cfg = OptimizerConfig(optimizer="adam", lr=2e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                                  clip_grad=0.0, bf16=False, fp16=False, params_dtype=torch.float32,
                                  use_distributed_optimizer=False)
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.model], use_gloo_process_groups=False)
        self.cfg.no_sync_func = self.model.no_sync
        self.cfg.grad_scale_func = self.optimizer.scale_loss
        self.counts: List[torch.Tensor] = []

        def finalize(*args, **kwargs):
            # The router token counts as the step left them, before the expert-bias update uses them.
            self.counts = [x.router.local_tokens_per_expert.detach().clone() for x in self.moe]
            return finalize_model_grads(*args, **kwargs)

        self.cfg.finalize_model_grads_func = finalize
        self.data = _Data(m, ps.get_data_parallel_rank())
        self.m = m

    def _plain_step(self) -> Dict:
        from megatron.core.transformer.moe import moe_utils

        moe_utils.clear_aux_losses_tracker()
        self.model.zero_grad(set_to_none=True)
        for x in self.moe:
            x.router.local_tokens_per_expert.zero_()
        self.counter.reset_peak()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        losses = []
        with self.counter.hooks(self.params):
            for _ in range(self.m["micro_batches"]):
                out, loss_func = _forward_step(self.data, self.model)
                loss, _ = loss_func(out)
                loss.backward()
                losses.append(loss.detach().clone())
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        tracker = {k: v["values"].detach().clone() for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()
                   if isinstance(v, dict) and isinstance(v.get("values"), torch.Tensor)}
        return {"loss": float(sum(losses)) / len(losses), "losses": losses, "grads": grads, "tracker": tracker,
                "counts": [x.router.local_tokens_per_expert.detach().clone() for x in self.moe], "bias": [],
                "peak": self.counter.peak, "step_s": dt, "cpu_s": cpu,
                "replays": self.executor.stats["replays"] if self.executor else 0,
                "swapped": self.executor.stats["swapped_bytes"] if self.executor else 0,
                "waits": (dict(self.executor._swapper.stats) | {"chunk_prefetches": self.executor.stats["chunk_prefetches"]}
                          if self.executor and self.executor._swapper else {})}

    def step(self, fb, train: bool = True) -> Dict:
        """One step of every micro-batch; ``train=False``: no optimizer step (the weights stay)."""
        from megatron.core.transformer.moe import moe_utils

        if self.plain:
            return self._plain_step()
        moe_utils.clear_aux_losses_tracker()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.counter.reset_peak()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        with self.counter.hooks(self.params):
            losses = fb(forward_step_func=_forward_step, data_iterator=self.data, model=[self.model],
                        num_microbatches=self.m["micro_batches"], seq_length=self.m["seq"],
                        micro_batch_size=self.m["micro_batch"], forward_only=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        grads = {n: p.main_grad.detach().clone() for n, p in self.model.module.named_parameters()}
        tracker = {k: v["values"].detach().clone() for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()
                   if isinstance(v, dict) and isinstance(v.get("values"), torch.Tensor)}
        if train:
            self.optimizer.step()
        bias = [x.router.expert_bias.detach().clone() for x in self.moe]
        loss = sum(float(x["lm loss"]) for x in losses) / len(losses) if losses else None
        return {"loss": loss, "losses": [x["lm loss"].clone() for x in losses] if losses else [], "grads": grads,
                "tracker": tracker, "counts": self.counts, "bias": bias, "peak": self.counter.peak,
                "step_s": dt, "cpu_s": cpu, "replays": self.executor.stats["replays"] if self.executor else 0,
                "swapped": self.executor.stats["swapped_bytes"] if self.executor else 0,
                "waits": (dict(self.executor._swapper.stats) | {"chunk_prefetches": self.executor.stats["chunk_prefetches"]}
                          if self.executor and self.executor._swapper else {})}


def _diff(a, b) -> float:
    """0.0 when bit-identical; else the largest absolute difference (inf: shapes or names differ)."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return float("inf")
        return max([_diff(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        return max([_diff(x, y) for x, y in zip(a, b)], default=0.0)
    if a.shape != b.shape:
        return float("inf")
    if torch.equal(a, b):
        return 0.0
    return max(float((a.double() - b.double()).abs().max()), 1e-300)


def run_layout(layout, arms: List[Dict], m: Dict, steps: int) -> Dict:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp, pp, ep = layout
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                                 create_gloo_process_groups=False)
    built = [Arm(spec, m, tp, pp, ep) for spec in arms]
    fb = get_forward_backward_func()
    profiles = {}
    for a in built:
        if a.spec.get("profile"):
            from moerail.memory import profile

            kw = a.spec["profile"] if isinstance(a.spec["profile"], dict) else {}

            # The profile's warm-up, keep-all and traced steps train as the arms' steps do (the trace
            # follows the routing as it drifts); its timed trials, hundreds of steps, do not, so they
            # time the model in the state the arms run in, not one trained far beyond it.
            trained = 2 + kw.get("trace_steps", 1)
            calls = [0]

            def run_step(a=a, calls=calls, trained=trained):
                calls[0] += 1
                r = a.step(fb, train=calls[0] <= trained)
                return r["step_s"], r["cpu_s"]  # the step proper: not the barrier before it

            costs = profile(a.executor, run_step, num_microbatches=m["micro_batches"],
                            pipeline_size=pp, pipeline_rank=ps.get_pipeline_model_parallel_rank(), static_bytes=0.0,
                            host_bytes=float(1 << 30), warmup=1, **kw)
            profiles[a.name] = costs.to_dict() | {"meta": dict(costs.meta)}
    hist: Dict[str, Dict[str, list]] = {a.name: {k: [] for k in ("loss", "step_s", "cpu_s", "peak", "diff", "replays",
                                                                  "swapped", "waits")} for a in built}
    # Only the results other arms compare against stay alive through a round: every result held
    # grows the process's heap, and the arms after it would pay for fresh pages (page faults, on
    # CPU ranks tens of milliseconds a step) that the arms before it did not.
    refs = {a.spec.get("ref") for a in built}
    for _ in range(steps):
        res = {}
        for a in built:
            r = a.step(fb)
            if a.name in refs:
                res[a.name] = r
            h = hist[a.name]
            h["loss"].append(r["loss"])
            h["step_s"].append(r["step_s"])
            h["cpu_s"].append(r["cpu_s"])
            h["peak"].append(r["peak"])
            h["replays"].append(r["replays"])
            h["swapped"].append(r["swapped"])
            h["waits"].append(r["waits"])
            ref = a.spec.get("ref")
            if ref:
                b = res[ref]
                h["diff"].append({k: _diff(r[k], b[k]) for k in ("losses", "grads", "tracker", "counts", "bias")})
            del r
    ps.destroy_model_parallel()
    return hist | ({"_profiles": profiles} if profiles else {})


def refusals(layout, bad_plans: List[Dict], m: Dict, rank: int) -> List[str]:
    """What ``apply_memory_plan`` says to each bad plan (``""``: it was accepted). A plan given as
    ``{"per_rank": [plan_dict, ...]}`` is a different plan on each rank."""
    from megatron.core import parallel_state as ps

    from moerail.integrations import megatron as mi
    from moerail.memory import MemoryPlan

    if not bad_plans:
        return []
    tp, pp, ep = layout
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                                 create_gloo_process_groups=False)
    out = []
    for bad in bad_plans:
        extra = {"recompute_granularity": "selective", "recompute_modules": ["layernorm"]} if bad.get("megatron") else {}
        arm = Arm({"name": "bad", "dispatcher": "moerail", "megatron": extra}, m, tp, pp, ep)
        d = bad["per_rank"][rank] if "per_rank" in bad else {k: v for k, v in bad.items() if k != "megatron"}
        try:
            mi.apply_memory_plan(arm.model.module, MemoryPlan.from_dict(d))
            out.append("")
        except ValueError as e:
            out.append(str(e))
    ps.destroy_model_parallel()
    return out


def _ranks_body(rank: int, world: int, job: Dict) -> Dict:
    _stand_ins()
    import megatron.core as mc

    result: Dict = {"megatron_core": mc.__version__, "runs": []}
    for r in job["runs"]:
        m = {**SMALL, **r.get("model", {})}
        result["runs"].append({"layout": list(r["layout"]),
                               "arms": run_layout(tuple(r["layout"]), r["arms"], m, job["steps"]),
                               "refused": refusals(tuple(r["layout"]), r.get("bad_plans", []), m, rank)})
    return result


def run(job: Dict, out_dir: str, world: int = 4, timeout_s: float = 300.0) -> List[Dict]:
    """Runs ``job`` (``runs``: [{``layout``: (tp, pp, ep), ``arms``, ``model`` overrides,
    ``bad_plans``}], ``steps``) on ``world`` gloo ranks; returns each rank's result (a rank that hangs is killed after
    ``timeout_s``)."""
    from megatron_gloo import run_job

    return run_job(_ranks_body, world, job, out_dir, timeout_s)
