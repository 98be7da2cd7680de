"""The bytes a real Megatron-Core ``GPTModel`` holds per rank, counted exactly, for comparison with
the simulator's per-device memory (``moerail.sim.simulate``'s ``memory_gib``); not a test module.

On CPU gloo ranks (tests/memory_megatron.py's model and stand-ins, in bf16 with Megatron's
``Float16Module``, fp32 gradient buffers and its mixed-precision Adam) each rank reports:

* ``weights``: the bytes of its model parameters (distinct storages);
* ``gradients``: the bytes of its DDP gradient buffers (``main_grad``, fp32);
* ``optimizer``: the bytes of its optimizer's fp32 master parameters and Adam ``exp_avg`` /
  ``exp_avg_sq`` after one step (distinct storages, every chained optimizer);
* ``activations``: the peak of saved-tensor bytes over one training step
  (``SavedTensorCounter`` through ``saved_tensors_hooks``; 1F1B with PP 2).

With ``dist_opt`` the optimizer is Megatron's distributed optimizer; gloo has no reduce-scatter, so
that arm builds it and creates its Adam state on its own shard (one inner step of the wrapped torch
optimizer on zero gradients) without running a training step.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch


@contextlib.contextmanager
def _cuda_type_names():
    """Megatron's mixed-precision optimizers accept parameters whose ``type()`` is a CUDA type name:
    CPU tensors answer with one while they are built (these processes only)."""
    orig = torch.Tensor.type

    def typ(self, *args, **kwargs):
        if not args and not kwargs and not self.is_cuda:
            return orig(self).replace("torch.", "torch.cuda.", 1)
        return orig(self, *args, **kwargs)

    torch.Tensor.type = typ
    try:
        yield
    finally:
        torch.Tensor.type = orig


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def _inner_optimizers(opt) -> list:
    subs = getattr(opt, "chained_optimizers", None) or [opt]
    return [s.optimizer for s in subs]


def _optimizer_bytes(opt) -> Dict[str, int]:
    main, state = [], []
    for inner in _inner_optimizers(opt):
        for g in inner.param_groups:
            main.extend(g["params"])
        for st in inner.state.values():
            state.extend(v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"master": _storage_bytes(main), "moments": _storage_bytes(state)}


def measure(layout, m: Dict, dist_opt: bool) -> Dict:
    import megatron_pretrain as ex
    import memory_megatron as mm
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from moerail.memory.executor import SavedTensorCounter

    tp, pp, ep = layout
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                                 create_gloo_process_groups=False)
    cfg = mm._config(m, tp, pp, ep, {})
    cfg.bf16 = True
    cfg.params_dtype = torch.bfloat16
    cfg.pipeline_dtype = torch.bfloat16
    torch.manual_seed(1234)
    model = GPTModel(config=cfg, transformer_layer_spec=ex.layer_spec(m["experts"]), vocab_size=mm.VOCAB,
                     max_sequence_length=m["seq"], pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    model = Float16Module(cfg, model)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=dist_opt)
    ddp = DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=model)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=2e-3, weight_decay=0.0, clip_grad=0.0, bf16=True,
                              params_dtype=torch.bfloat16, use_distributed_optimizer=dist_opt)
    with _cuda_type_names():
        opt = get_megatron_optimizer(opt_cfg, [ddp], use_gloo_process_groups=False)
    params = list(ddp.module.parameters())
    out = {"weights": _storage_bytes(params),
           "gradients": sum(b.grad_data.nbytes for b in list(ddp.buffers) + list(ddp.expert_parallel_buffers)),
           "params": sum(p.numel() for p in params)}
    if dist_opt:
        for inner in _inner_optimizers(opt):
            for g in inner.param_groups:
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            inner.step()
        out.update(_optimizer_bytes(opt))
        ps.destroy_model_parallel()
        return out
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    counter = SavedTensorCounter()
    seen, kinds = {}, {"attention_scores": 0, "logits": 0, "attention": 0, "mlp": 0, "embedding_and_logits": 0}
    scope = ["embedding_and_logits"]
    parts = {"input_layernorm": "attention", "self_attention": "attention", "pre_mlp_layernorm": "mlp", "mlp": "mlp"}
    for name, mod in ddp.module.named_modules():
        part = parts.get(name.rsplit(".", 1)[-1]) if ".layers." in name else None
        if part is not None:
            mod.register_forward_pre_hook(lambda mod, args, part=part: scope.append(part) and None)
            mod.register_forward_hook(lambda mod, args, output: scope.pop() and None)

    def classify(t, tag) -> None:
        # What the simulator does not hold as activations: the unfused attention's s x s scores and
        # probabilities (it models flash attention) and the loss's fp32 logits (its transient).
        st = t.untyped_storage()
        if st._cdata in seen:
            return
        seen[st._cdata] = st  # held for the step: a freed storage's identity is not reused
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] == m["seq"]:
            kinds["attention_scores"] += st.nbytes()
        elif t.dtype == torch.float32 and t.dim() >= 1 and t.shape[-1] == mm.VOCAB // tp:
            kinds["logits"] += st.nbytes()
        else:
            kinds[scope[-1]] += st.nbytes()

    counter.observer = classify
    data = mm._Data(m, ps.get_data_parallel_rank())
    ddp.zero_grad_buffer()
    opt.zero_grad()
    counter.reset_peak()
    with counter.hooks(params):
        get_forward_backward_func()(forward_step_func=mm._forward_step, data_iterator=data, model=[ddp],
                                    num_microbatches=m["micro_batches"], seq_length=m["seq"],
                                    micro_batch_size=m["micro_batch"], forward_only=False)
    with _cuda_type_names():
        opt.step()
    out["activations"] = counter.peak
    out.update({k: v // m["micro_batches"] for k, v in kinds.items()})  # per micro-batch
    out.update(_optimizer_bytes(opt))
    ps.destroy_model_parallel()
    return out


def sim_config(layout, m: Dict, dist_opt: bool, world: int = 4, vocab: int = 256) -> Dict:
    """The simulator's configuration of the same model, layout and precision as :func:`measure`
    (``world`` ranks, a vocabulary of ``vocab``)."""
    tp, pp, ep = layout
    return {
        "model": dict(num_layers=m["layers"], hidden_size=m["hidden"], num_attention_heads=m["heads"],
                      ffn_hidden_size=4 * m["hidden"], num_moe_experts=m["experts"], moe_router_topk=m["topk"],
                      moe_ffn_hidden_size=m["ffn"], vocab_size=vocab, make_vocab_size_divisible_by=1, swiglu=False,
                      untie_embeddings_and_output_weights=True, add_bias_linear=False, hidden_dropout=0.0,
                      attention_dropout=0.0),
        "training": dict(seq_length=m["seq"], micro_batch_size=m["micro_batch"],
                         global_batch_size=m["micro_batch"] * m["micro_batches"] * world // (tp * pp),
                         precision="bf16", use_distributed_optimizer=dist_opt, moe_token_dispatcher_type="alltoall",
                         sequence_parallel=tp > 1),
        "layout": dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                       expert_tensor_parallel_size=1),
        "cluster": dict(devices=world, memory_reserved_gib=0.0),
    }


def predicted(layout, m: Dict, dist_opt: bool) -> List[Dict]:
    """The simulator's bytes per pipeline stage (``moerail.sim.simulate``'s per-stage memory), and for
    the stage its ``memory_gib`` reports, the activations by part."""
    import moerail.sim as sim

    rep = sim.simulate(sim_config(layout, m, dist_opt), cluster="h100")
    gib = float(1 << 30)
    mem = rep["memory_gib"]
    out = []
    for s, st in enumerate(rep["breakdown_s"]["per_stage"]):
        d = {"weights": st["weights_gib"] * gib, "gradients": st["gradients_gib"] * gib,
             "optimizer": st["optimizer_gib"] * gib, "activations": st["activations_gib"] * gib}
        if s == mem["stage"]:
            d["parts"] = {k: v * gib for k, v in mem["activations"].items() if k != "total"}
        out.append(d)
    return out


def _ranks_body(rank: int, world: int, job: Dict) -> Dict:
    import sys

    import memory_megatron as mm

    sys.path.insert(0, str(mm.ROOT / "examples"))
    mm._stand_ins()
    return {"runs": [measure(tuple(r["layout"]), {**mm.SMALL, **job.get("model", {})}, r.get("dist_opt", False))
                     for r in job["runs"]]}


def run(job: Dict, out_dir: str, world: int = 4, timeout_s: float = 300.0) -> List[Dict]:
    """``job``: ``runs`` [{``layout``: (tp, pp, ep), ``dist_opt``}], ``model`` overrides of
    memory_megatron.SMALL; returns each rank's ``runs``."""
    from megatron_gloo import run_job

    return [res["runs"] for res in run_job(_ranks_body, world, job, out_dir, timeout_s, deterministic=False)]


# The layouts compared (TP, PP, EP), on 4 ranks; PP 2 runs 1F1B over 2 micro-batches.
JOB = {"runs": [{"layout": (1, 1, 4)}, {"layout": (1, 1, 4), "dist_opt": True}, {"layout": (1, 2, 2)},
                {"layout": (2, 1, 2)}]}


def compare(measured: List[List[Dict]], job: Dict = JOB, world: int = 4) -> List[Dict]:
    """Per run, pipeline stage and component: the simulator's bytes and the largest measured bytes
    over that stage's ranks. Activations: the saved-tensor peak; what of it the simulator does not
    hold as activations by design (the unfused attention's s x s tensors of every micro-batch in
    flight, the loss's fp32 logits); the rest; and, on the stage the simulator reports, the rest by
    part (per micro-batch times the micro-batches in flight)."""
    import memory_megatron as mm

    m = {**mm.SMALL, **job.get("model", {})}
    rows = []
    for i, r in enumerate(job["runs"]):
        tp, pp, ep = r["layout"]
        dist_opt = r.get("dist_opt", False)
        for s, pred in enumerate(predicted(r["layout"], m, dist_opt)):
            ranks = [measured[k][i] for k in range(world) if k // (world // pp) == s]
            name = f"TP{tp} PP{pp} EP{ep}" + (" dist-opt" if dist_opt else "") + (f" stage {s}" if pp > 1 else "")

            def row(component, p, f, name=name, ranks=ranks):
                rows.append({"layout": name, "component": component, "predicted": p,
                             "measured": max(f(x) for x in ranks)})

            row("weights", pred["weights"], lambda x: x["weights"])
            row("gradients (fp32 main_grad)", pred["gradients"], lambda x: x["gradients"])
            row("optimizer (fp32 master + Adam moments)", pred["optimizer"], lambda x: x["master"] + x["moments"])
            if dist_opt:
                continue
            k = min(pp - s, m["micro_batches"])  # 1F1B: micro-batches in flight on stage s
            row(f"activations: saved-tensor peak ({k} in flight)", pred["activations"], lambda x: x["activations"])
            row("  not held by the simulator: s x s attention, fp32 logits", 0.0,
                lambda x, k=k: k * x["attention_scores"] + x["logits"])
            row("  the rest", pred["activations"], lambda x, k=k: x["activations"] - k * x["attention_scores"] - x["logits"])
            for part, p in pred.get("parts", {}).items():
                row(f"    {part.replace('_', ' ')}", p, lambda x, part=part, k=k: k * x[part])
    return rows
