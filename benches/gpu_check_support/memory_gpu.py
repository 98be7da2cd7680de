"""Stage 5 of ``benches/gpu_check.py``: activation memory of a Megatron-Core GPT-MoE on one GPU,
Megatron's recompute settings against moerail's memory plans, and the simulator's per-device memory
against the allocator's, measured in one process.

    memory_gpu.py OUT.json [--dry] [--time-limit 90]

World size 1 (one GPU: expert parallelism is 1, the all-to-all dispatcher exchanges with itself).
The model: ``GPTModel`` with Megatron's local layer spec (attention + MoE layers, ``SequentialMLP``
experts, sigmoid router with aux loss and z-loss), bf16 (``Float16Module``), deterministic mode.

1. Simulator: one Megatron training set-up (DDP with fp32 gradient buffers, Megatron's
   mixed-precision Adam, ``get_forward_backward_func``), two steps; ``torch.cuda.max_memory_allocated``
   over them (above what was allocated before the model was built) and the bytes of its weights,
   gradient buffers and optimizer state against ``moerail.sim.simulate``'s ``memory_gib`` for the
   same model and layout.
2. Arms, each its own copy of the same weights, the same micro-batches every step (no optimizer
   step: the weights and the routing stay, so a plan meets the routing it was profiled on):
   keep-all; Megatron ``recompute_modules=["layernorm"]``, ``["moe_act", "layernorm"]`` (Megatron
   refuses it unless the experts are grouped GEMMs, TransformerEngine's or the ``grouped_gemm``
   package's: the bundle carries neither, and moerail's expert actions wrap ``SequentialMLP``
   experts; the refusal is recorded), ``["moe"]`` and full recompute;
   ``moerail.memory.profile(measure="actions")`` on a keep-all copy (3 to 7 rounds a trial, as many
   as fit in a third of the time limit), then ``plan_memory`` at each
   budget a Megatron arm reached (its saved-tensor peak on top of the weights and gradients), with
   and without swaps (pinned host memory, a side stream), run by ``apply_memory_plan``. Per arm and step: the
   exact saved-tensor peak (``SavedTensorCounter`` around the step), ``max_memory_allocated`` above
   the memory at the step's start, the step time (synchronized) and whether losses and gradients
   are keep-all's bits. Arms take turns, one step each, keep-all first in each round; an arm's added
   time in a round is its step minus the mean of the keep-all steps that bracket it; the median
   over rounds after the first (warm-up).

``--dry`` (or no GPU): the same on the CPU at a tiny size (gloo, the test stand-ins of
tests/memory_megatron.py), one round of every arm: it proves the script, it measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional

# cuBLAS needs this before CUDA starts for deterministic algorithms.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
for sub in ("tests", "examples", "benches"):
    sys.path.insert(0, str(ROOT / sub))

TITLE = "Activation memory on one GPU: Megatron's recompute settings vs moerail's memory plans"
GPU_MODEL = dict(layers=4, hidden=1024, ffn=2048, heads=8, experts=8, topk=2, seq=1024, micro_batch=4,
                 micro_batches=2, vocab=2048)
DRY_MODEL = dict(layers=2, hidden=32, ffn=32, heads=4, experts=4, topk=2, seq=32, micro_batch=1,
                 micro_batches=2, vocab=256)
MEGATRON_ARMS = [
    ("megatron layernorm", {"recompute_granularity": "selective", "recompute_modules": ["layernorm"]}),
    ("megatron moe_act+layernorm", {"recompute_granularity": "selective",
                                    "recompute_modules": ["moe_act", "layernorm"]}),
    ("megatron moe", {"recompute_granularity": "selective", "recompute_modules": ["moe"]}),
    ("megatron full", {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
]
HEAD = ["arm", "saved bytes at peak", "vs keep-all", "predicted peak (measured vs it)", "max_memory_allocated above start",
        "added ms: median [IQR]", "predicted ms (off)", "bit-identical"]


def _config(m: Dict, extra: Dict, gpu: bool, init: bool = True):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=m["layers"], hidden_size=m["hidden"], ffn_hidden_size=4 * m["hidden"],
        moe_ffn_hidden_size=m["ffn"], num_attention_heads=m["heads"], num_moe_experts=m["experts"],
        moe_router_topk=m["topk"], moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, moe_router_score_function="sigmoid", moe_router_dtype="fp32",
        use_cpu_initialization=not gpu, perform_initialization=init, add_bias_linear=False, bf16=True,
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False, init_method_std=0.02,
        deterministic_mode=True, **extra,
    )  # fmt: skip


def _build(m: Dict, extra: Dict, gpu: bool, weights: Optional[Dict] = None):
    """``Float16Module(GPTModel)`` on the device; with ``weights`` (a state dict) those weights."""
    import megatron_pretrain as ex
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    cfg = _config(m, extra, gpu, init=weights is None)
    torch.manual_seed(1234)
    model = GPTModel(config=cfg, transformer_layer_spec=ex.layer_spec(m["experts"]), vocab_size=m["vocab"],
                     max_sequence_length=m["seq"], share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    model = Float16Module(cfg, model.to(_device(gpu)))
    if weights is not None:
        model.module.load_state_dict(weights)
    return model, cfg


def _device(gpu: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")


def _batches(m: Dict, gpu: bool, n: int) -> List[List[Dict]]:
    """``n`` steps' micro-batches, on the device."""
    dev = _device(gpu)
    g = torch.Generator().manual_seed(4321)
    pos = torch.arange(m["seq"], device=dev).unsqueeze(0).expand(m["micro_batch"], -1)
    mask = torch.triu(torch.ones(m["seq"], m["seq"], dtype=torch.bool, device=dev), 1)[None, None]
    out = []
    for _ in range(n):
        step = []
        for _ in range(m["micro_batches"]):
            win = torch.randint(m["vocab"], (m["micro_batch"], m["seq"] + 1), generator=g).to(dev)
            step.append({"tokens": win[:, :-1].contiguous(), "labels": win[:, 1:].contiguous(), "pos": pos,
                         "mask": mask})
        out.append(step)
    return out


def _sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


class Arm:
    def __init__(self, name: str, model, plan=None) -> None:
        from moerail.integrations import megatron as mi
        from moerail.memory.executor import SavedTensorCounter

        self.name, self.model = name, model
        self.params = list(model.parameters())
        for p in self.params:  # gradients held from the start: the first step allocates nothing more
            p.grad = torch.zeros_like(p)
        self.counter = SavedTensorCounter()
        self.executor = mi.apply_memory_plan(model, plan, min_swap_bytes=0) if plan is not None else None
        if self.executor is not None:
            self.executor.counter = self.counter
        self.hist: Dict[str, list] = {k: [] for k in ("peak", "alloc", "step_s", "diff")}

    def step(self, batch: List[Dict], gpu: bool) -> Dict:
        """Forward and backward of every micro-batch (gradients accumulate, no optimizer step)."""
        from megatron.core.transformer.moe import moe_utils

        moe_utils.clear_aux_losses_tracker()
        for p in self.params:
            p.grad.zero_()
        self.counter.reset_peak()
        _sync(gpu)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if gpu else 0
        t0, c0 = time.perf_counter(), time.process_time()
        losses = []
        with self.counter.hooks(self.params):
            for mb in batch:
                out = self.model(mb["tokens"], mb["pos"], mb["mask"], labels=mb["labels"])
                loss = out.float().mean()
                loss.backward()
                losses.append(loss.detach())
        _sync(gpu)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        alloc = torch.cuda.max_memory_allocated() - start if gpu else 0
        return {"step_s": dt, "cpu_s": cpu, "peak": self.counter.peak, "alloc": alloc, "losses": losses}


def _same(arm: Arm, ref_losses, ref_grads, losses) -> float:
    """0.0 when the losses and every gradient are the reference's bits, else the largest difference."""
    worst = 0.0
    for a, b in list(zip(losses, ref_losses)) + [(p.grad, g) for p, g in zip(arm.params, ref_grads)]:
        if not torch.equal(a, b):
            worst = max(worst, float((a.double() - b.double()).abs().max()), 1e-300)
    return worst


def _quartiles(xs):
    import bench_memory

    return bench_memory._quartiles(xs) if xs else (float("nan"),) * 3


def measure_simulator(m: Dict, gpu: bool, batches) -> Dict:
    """Megatron's own training set-up (DDP, fp32 gradient buffers, mixed-precision Adam), two steps:
    the allocator's peak and the exact bytes of each part against the simulator's."""
    import memory_sim_megatron as msm
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import moerail.sim as sim
    from moerail.memory.executor import SavedTensorCounter

    _sync(gpu)
    base = torch.cuda.memory_allocated() if gpu else 0
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    model, cfg = _build(m, {}, gpu)
    ddp = DistributedDataParallel(config=cfg, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, clip_grad=0.0, bf16=True,
                              params_dtype=torch.bfloat16, use_distributed_optimizer=False)
    # CPU tensors must answer with a CUDA type name to Megatron's mixed-precision optimizer (dry run).
    cuda_names = contextlib.nullcontext if gpu else msm._cuda_type_names
    with cuda_names():
        opt = get_megatron_optimizer(opt_cfg, [ddp], use_gloo_process_groups=False)
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    params = list(ddp.module.parameters())
    counter = SavedTensorCounter()
    scores = {"attention_scores": 0, "logits": 0}
    seen = set()

    def classify(t, tag) -> None:
        # What the simulator does not hold as activations: the unfused attention's s x s scores (it
        # models flash attention) and the loss's fp32 logits (its transient).
        st = t.untyped_storage()
        if st._cdata in seen:
            return
        seen.add(st._cdata)
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] == m["seq"]:
            scores["attention_scores"] += st.nbytes()
        elif t.dtype == torch.float32 and t.dim() >= 1 and t.shape[-1] == m["vocab"]:
            scores["logits"] += st.nbytes()

    counter.observer = classify
    fb = get_forward_backward_func()
    peak_saved = 0
    for batch in batches[:2]:
        it = iter(batch)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        counter.reset_peak()
        seen.clear()
        scores.update(attention_scores=0, logits=0)
        with counter.hooks(params):
            fb(forward_step_func=_forward_step, data_iterator=it, model=[ddp], num_microbatches=len(batch),
               seq_length=m["seq"], micro_batch_size=m["micro_batch"], forward_only=False)
        with cuda_names():
            opt.step()
        peak_saved = max(peak_saved, counter.peak)
    _sync(gpu)
    peak = torch.cuda.max_memory_allocated() - base if gpu else None
    got = {"weights": msm._storage_bytes(params),
           "gradients": sum(b.grad_data.nbytes for b in list(ddp.buffers) + list(ddp.expert_parallel_buffers)),
           "optimizer": sum(msm._optimizer_bytes(opt).values()), "activations": peak_saved,
           "attention_scores_and_logits": (scores["attention_scores"] + scores["logits"]) // len(batches[0]),
           "max_memory_allocated": peak}
    cfg_sim = msm.sim_config((1, 1, 1), m, False, world=1, vocab=m["vocab"])
    rep = sim.simulate(cfg_sim, cluster="h100")
    gib = float(1 << 30)
    mem = rep["memory_gib"]
    st = rep["breakdown_s"]["per_stage"][mem["stage"]]
    pred = {"weights": st["weights_gib"] * gib, "gradients": st["gradients_gib"] * gib,
            "optimizer": st["optimizer_gib"] * gib, "activations": st["activations_gib"] * gib,
            "total": mem["total"] * gib}
    return {"measured": got, "predicted": pred}


def _forward_step(data_iterator, model):
    mb = next(data_iterator)
    out = model(mb["tokens"], mb["pos"], mb["mask"], labels=mb["labels"])

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    return out, loss_func


def run(dry: bool, time_limit: float) -> Dict:
    from megatron.core import parallel_state as ps

    from moerail.memory import MemoryCosts, MemoryPlan, plan_memory, profile

    t_start = time.monotonic()
    end = t_start + time_limit
    gpu = torch.cuda.is_available() and not dry
    m = dict(DRY_MODEL if not gpu else GPU_MODEL)
    # An op without a deterministic kernel warns rather than stops the stage: bit-identity is measured.
    torch.use_deterministic_algorithms(True, warn_only=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=0, world_size=1)
    if gpu:
        torch.cuda.set_device(0)
    else:
        import memory_megatron as mm

        mm._stand_ins()
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1, create_gloo_process_groups=False)
    if gpu:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    import megatron.core as mc

    # At most this many rounds (fewer where the time limit comes first); the same micro-batches every
    # step (the routing the plans were profiled on).
    rounds = 30 if gpu else 1
    batches = _batches(m, gpu, 2)
    res: Dict = {"megatron_core": mc.__version__, "torch": torch.__version__, "model": m, "measured": gpu,
                 "device": torch.cuda.get_device_name() if gpu else "cpu (dry run)", "refused": {}, "failed": {}}
    # One part failing (a single GPU window) must not cost the others their numbers: each failure is
    # recorded with its traceback's tail and the stage reports it.
    try:
        res["simulator"] = measure_simulator(m, gpu, batches)
    except Exception:  # noqa: BLE001
        res["failed"]["simulator"] = traceback.format_exc()[-1500:]
    if gpu:
        torch.cuda.empty_cache()

    keep_model, _ = _build(m, {}, gpu)
    weights = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
               for k, v in keep_model.module.state_dict().items()}
    arms = [Arm("keep", keep_model)]
    for name, extra in MEGATRON_ARMS:
        try:
            model, _ = _build(m, extra, gpu, weights)
        except (ValueError, AssertionError) as e:  # Megatron's own refusal of the setting
            res["refused"][name] = f"Megatron: {e}"
            continue
        arms.append(Arm(name, model))

    # The costs: a keep-all copy under an empty plan, profiled.
    prof_model, _ = _build(m, {}, gpu, weights)
    prof = Arm("profile", prof_model, MemoryPlan(()))

    def run_step(arm=prof):
        r = arm.step(batches[0], gpu)
        return r["step_s"], r["cpu_s"]

    # The profile's trials, about 18 (a recompute and a swap per module, the exchange, whole layers),
    # take 2 steps a round: as many rounds (3 to 7) as fit in a third of the time limit.
    warm = [prof.step(batches[0], gpu)["step_s"] for _ in range(2)][-1]
    repeats = max(3, min(7, int(time_limit / 3 / (36 * 1.5 * warm)))) if gpu else 1
    res["profile_repeats"] = repeats
    # The weights and their gradients (no optimizer here): what no plan changes, planned around.
    static = 2 * sum(p.numel() * p.element_size() for p in prof.params)
    res["static_bytes"] = static
    t_prof = time.monotonic()
    costs: Optional[MemoryCosts] = None
    try:
        costs = profile(prof.executor, run_step, num_microbatches=m["micro_batches"], static_bytes=static,
                        host_bytes=float(16 << 30 if gpu else 1 << 30), warmup=1, measure="actions",
                        repeats=repeats, trace_steps=1)
    except Exception:  # noqa: BLE001
        res["failed"]["profile"] = traceback.format_exc()[-1500:]
    res["profile_s"] = round(time.monotonic() - t_prof, 1)
    del run_step, prof, prof_model  # its copy of the model is not an arm

    # Each Megatron arm's saved-tensor peak (one step each) on top of the weights and gradients is a
    # budget for moerail's planner.
    plans = {}
    for a in list(arms[1:]):
        try:
            budget = static + int(a.step(batches[0], gpu)["peak"])
        except Exception:  # noqa: BLE001
            res["failed"][a.name] = traceback.format_exc()[-1500:]
            arms.remove(a)
            continue
        short = a.name.split(" ", 1)[1]
        for label, kw in (("", {}), (" recompute only", {"allow_swap": False})):
            if costs is None:
                continue
            try:
                plans[f"moerail{label} @ {short}"] = plan_memory(costs, budget_bytes=budget, **kw)
            except ValueError as e:
                res["refused"][f"moerail{label} @ {short}"] = f"{budget} B: {e}"
    for name, plan in plans.items():
        model, _ = _build(m, {}, gpu, weights)
        try:
            arms.append(Arm(name, model, plan))
        except Exception:  # noqa: BLE001
            res["failed"][name] = traceback.format_exc()[-1500:]

    # Rounds: one step an arm in turn, keep-all first; bit-identity against the same round's keep-all.
    done = 0
    for _ in range(rounds):
        t_round = time.monotonic()
        ref = None
        for a in list(arms):
            try:
                got = a.step(batches[0], gpu)
            except Exception:  # noqa: BLE001 - keep-all's own failure ends the run
                if a is arms[0]:
                    raise
                res["failed"][a.name] = traceback.format_exc()[-1500:]
                arms.remove(a)
                continue
            if ref is None:
                ref = (got["losses"], [p.grad.detach().clone() for p in a.params])
                diff = 0.0
            else:
                diff = _same(a, ref[0], ref[1], got["losses"])
            for k in ("peak", "alloc", "step_s"):
                a.hist[k].append(got[k])
            a.hist["diff"].append(diff)
        done += 1
        # Stop before the stage's time limit: at least 3 rounds (2 bracketed) where there is time.
        if done >= 3 and time.monotonic() + 1.5 * (time.monotonic() - t_round) > end:
            break
    res["rounds"] = done
    res["arms"] = {}
    keep = arms[0].hist["step_s"]
    for a in arms:
        h = a.hist
        added = ([h["step_s"][i] - (keep[i] + keep[i + 1]) / 2 for i in range(1, done - 1)]
                 if a.name != "keep" else [])
        q = _quartiles(added) if a.name != "keep" else (0.0, 0.0, 0.0)
        p = plans.get(a.name)
        res["arms"][a.name] = {
            "peak_saved_bytes": max(h["peak"]), "peak_alloc_above_start": max(h["alloc"]),
            "step_s_median": _quartiles(h["step_s"][1:] or h["step_s"])[1], "added_s": list(q),
            "max_diff": max(h["diff"]), "steps": h["step_s"],
            "plan": p.to_dict() if p is not None else None,
            "predicted_peak_bytes": p.predicted_peak_bytes - static if p is not None else None,
            "predicted_added_s": p.predicted_added_seconds if p is not None else None,
        }
    res["seconds"] = round(time.monotonic() - t_start, 1)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return res


def _ms(x: float) -> str:
    return f"{x * 1e3:+.1f} ms" if math.isfinite(x) else "n/a"


def _off(meas: float, pred: Optional[float]) -> str:
    if pred is None:
        return ""
    return f"{(pred - meas) / abs(meas) * 100:+.0f}%" if meas else "n/a"


def markdown(res: Dict) -> str:
    """The stage's section of bench.md."""
    from _common import table

    m = res["model"]
    lines = [f"## {TITLE}", ""]
    if not res["measured"]:
        lines += ["Not measured (dry run on the CPU at a tiny size: it checks the script, not the numbers).", ""]
    lines += [f"Device: {res['device']}; torch {res['torch']}, megatron-core {res['megatron_core']}. GPTModel "
              f"{m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, expert FFN {m['ffn']}, {m['experts']} "
              f"experts top-{m['topk']}, seq {m['seq']} x micro-batch {m['micro_batch']}, {m['micro_batches']} "
              f"micro-batches, vocab {m['vocab']}, bf16, local spec (SequentialMLP experts, unfused attention); "
              f"world size 1 (EP 1: expert parallelism needs more than one GPU). Rounds: {res['rounds']}; "
              f"profile {res['profile_s']} s (trial rounds: {res['profile_repeats']}), stage script "
              f"{res['seconds']} s.", ""]
    keep = res["arms"]["keep"]
    rows = []
    for name, a in res["arms"].items():
        pp = a["predicted_peak_bytes"]
        pred_peak = f"{pp:.0f} ({(a['peak_saved_bytes'] / pp - 1) * 100:+.1f}%)" if pp else ""
        q1, med, q3 = a["added_s"]
        if name == "keep":
            added = f"0 (step {keep['step_s_median'] * 1e3:.1f})"
        else:  # a single round brackets none
            added = f"{med * 1e3:+.1f} [{q1 * 1e3:+.1f}, {q3 * 1e3:+.1f}]" if math.isfinite(med) else "n/a"
        pa = a["predicted_added_s"]
        pred_t = f"{pa * 1e3:+.1f} ({_off(med, pa) if math.isfinite(med) else 'n/a'})" if pa is not None else ""
        same = "yes" if a["max_diff"] == 0.0 else f"no ({a['max_diff']:.3g})"
        rows.append([name, f"{a['peak_saved_bytes']:.0f}", f"{a['peak_saved_bytes'] / keep['peak_saved_bytes']:.2f}",
                     pred_peak, f"{a['peak_alloc_above_start']:.0f}" if res["measured"] else "", added, pred_t,
                     "" if name == "keep" else same])
    lines.append(table(HEAD, rows))
    for name, why in res["refused"].items():
        lines += ["", f"Not run: {name}: {why}"]
    for name, tb in res["failed"].items():
        lines += ["", f"FAILED: {name}: {tb.strip().splitlines()[-1]}"]
    for name, a in res["arms"].items():
        if not name.startswith("megatron "):
            continue
        short = name.split(" ", 1)[1]
        ours = [n for n in (f"moerail @ {short}", f"moerail recompute only @ {short}") if n in res["arms"]]
        if ours:
            def less(n, a=a):
                mine, theirs = res["arms"][n]["added_s"][1], a["added_s"][1]
                return "n/a" if not math.isfinite(mine + theirs) else ("yes" if mine < theirs else "NO")

            lines += ["", f"At {name}'s budget ({a['peak_saved_bytes']:.0f} B saved, {_ms(a['added_s'][1])} added): "
                      + "; ".join(f"{n} {res['arms'][n]['peak_saved_bytes']:.0f} B, {_ms(res['arms'][n]['added_s'][1])}"
                                  f" (less added time: {less(n)})" for n in ours) + "."]
    planned = [a for a in res["arms"].values() if a["predicted_peak_bytes"]]
    if planned:
        peak_ok = sum(abs(a["peak_saved_bytes"] - a["predicted_peak_bytes"]) <= 0.1 * a["peak_saved_bytes"]
                      for a in planned)
        time_ok = sum(abs(a["added_s"][1] - a["predicted_added_s"]) <= 0.1 * abs(a["added_s"][1]) for a in planned)
        lines += ["", f"Within 10% of the measured: predicted peak for {peak_ok} of {len(planned)} plans, predicted "
                  f"added time (against the median) for {time_ok} of {len(planned)}."]
    if "simulator" not in res:
        return "\n".join(lines) + "\n"
    s = res["simulator"]
    mib = float(1 << 20)
    rest = s["measured"]["activations"] - s["measured"]["attention_scores_and_logits"]
    lines += ["", "Simulator (`moerail.sim.simulate`, same model, TP1 PP1 EP1, the non-distributed optimizer) against "
              "Megatron's training set-up (DDP, fp32 gradient buffers, mixed-precision Adam), two steps:", "",
              table(["part", "predicted MiB", "measured MiB", "off"], [
                  [k, f"{s['predicted'][k] / mib:.2f}", f"{s['measured'][k] / mib:.2f}",
                   _off(s["measured"][k], s["predicted"][k])] for k in ("weights", "gradients", "optimizer",
                                                                         "activations")]
              + [["activations less s x s attention and fp32 logits", f"{s['predicted']['activations'] / mib:.2f}",
                  f"{rest / mib:.2f}", _off(rest, s["predicted"]["activations"])]]
              + [["total vs max_memory_allocated", f"{s['predicted']['total'] / mib:.2f}",
                  f"{s['measured']['max_memory_allocated'] / mib:.2f}" if s["measured"]["max_memory_allocated"]
                  else "n/a (no GPU)", _off(s["measured"]["max_memory_allocated"], s["predicted"]["total"])
                  if s["measured"]["max_memory_allocated"] else ""]]),
              "", f"Of the measured activations, {s['measured']['attention_scores_and_logits'] / mib:.2f} MiB a "
              "micro-batch are the unfused attention's s x s tensors and the loss's fp32 logits, which the simulator "
              "does not hold (it models flash attention and counts the logits as a transient)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="results JSON (the markdown section goes beside it, .md)")
    ap.add_argument("--dry", action="store_true", help="the CPU at a tiny size, one round of every arm")
    ap.add_argument("--time-limit", type=float, default=90.0, help="seconds the rounds must end within")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # Megatron's notes about missing TransformerEngine / apex
    import logging

    logging.disable(logging.WARNING)
    try:
        res = run(a.dry or not torch.cuda.is_available(), a.time_limit)
    except Exception:  # noqa: BLE001 - the stage reports it
        a.out.write_text(json.dumps({"error": traceback.format_exc()}))
        print(traceback.format_exc(), file=sys.stderr)
        return 1
    text = markdown(res)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    a.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
