"""Megatron-Core GPT-MoE with Multi-Latent Attention on CPU gloo ranks (EP over all of them): the
harness of tests/test_memory_mla.py (not a test module).

Every arm is the same ``GPTModel`` (Megatron's local layer spec with ``multi_latent_attention``,
``SequentialMLP`` experts, Megatron's alltoall dispatcher), built from the same seed, trained on the
same micro-batches with plain forward / backward and an SGD update (no DDP: each rank's gradients are
compared as they come out of the backward). An arm is a dict: ``name``; ``megatron``: recompute
settings of ``MLATransformerConfig``; ``plan``: a ``MemoryPlan.to_dict()`` for
``apply_memory_plan``. Per arm and step: the losses, every parameter gradient and the exact peak of
saved-tensor bytes (``SavedTensorCounter`` around the whole step, recomputations included).

Test-only stand-ins (these processes only), besides tests/memory_megatron.py's: a plain-torch core
attention (Megatron's local ``DotProductAttention`` does not take the query and value head sizes that
MLA gives its core attention; TransformerEngine's does), and ``TELinear`` as a class where
TransformerEngine is absent (MLA's constructor asks ``isinstance(..., TELinear)``); where Megatron's
output-discarding checkpoint refills the discarded storages through a C++ extension it compiles at
run time (megatron-core 0.19) and no compiler toolchain is at hand, the same refill in torch (the
storage resized back and the recomputed values copied in: the same storage, the same bytes).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory_megatron as mm  # noqa: E402

MODEL = dict(layers=2, hidden=32, heads=4, experts=4, topk=2, ffn=32, seq=16, micro_batch=1, micro_batches=2,
             q_lora=16, kv_lora=16, qk_head=8, qk_pos=4, v_head=8)  # fmt: skip


class CoreAttention(torch.nn.Module):
    """Causal softmax attention over ``[s, b, heads, d]`` queries and keys and ``[s, b, heads, d_v]``
    values, in plain torch."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type=None, softmax_scale=None, **_):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, **_):
        s, b, n, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        scale = self.softmax_scale if self.softmax_scale is not None else d**-0.5
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        return torch.matmul(probs, v).permute(2, 0, 1, 3).reshape(s, b, -1)


def _share_storage(dst: torch.Tensor, src: torch.Tensor) -> None:
    st = dst.untyped_storage()
    st.resize_(src.untyped_storage().nbytes())
    st.copy_(src.untyped_storage())


def _stand_ins() -> None:
    import shutil

    from megatron.core.tensor_parallel import random as mrandom

    mm._stand_ins()
    if hasattr(mrandom, "_get_share_storage") and shutil.which("ninja") is None:
        mrandom._get_share_storage = lambda: _share_storage


def _model(m: Dict, ep: int, extra: Dict):
    import dataclasses

    import megatron.core.transformer.multi_latent_attention as mla
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    if not isinstance(mla.TELinear, type):
        mla.TELinear = type("TELinearAbsent", (), {})
    cfg = MLATransformerConfig(
        num_layers=m["layers"], hidden_size=m["hidden"], ffn_hidden_size=4 * m["hidden"], moe_ffn_hidden_size=m["ffn"],
        num_attention_heads=m["heads"], num_moe_experts=m["experts"], moe_router_topk=m["topk"],
        multi_latent_attention=True, q_lora_rank=m["q_lora"], kv_lora_rank=m["kv_lora"], qk_head_dim=m["qk_head"],
        qk_pos_emb_head_dim=m["qk_pos"], v_head_dim=m["v_head"], rope_type="rope",
        expert_model_parallel_size=ep, moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_router_dtype="fp32", use_cpu_initialization=True, add_bias_linear=False,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False, deterministic_mode=True,
        **extra,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(num_experts=m["experts"], moe_grouped_gemm=False, multi_latent_attention=True)
    attn = spec.submodules.self_attention
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=dataclasses.replace(
        attn, submodules=dataclasses.replace(attn.submodules, core_attention=CoreAttention))))
    torch.manual_seed(1234)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=mm.VOCAB, max_sequence_length=m["seq"],
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def _step(model, data, params, counter, m: Dict) -> Dict:
    from megatron.core.transformer.moe import moe_utils

    moe_utils.clear_aux_losses_tracker()
    model.zero_grad(set_to_none=True)
    counter.reset_peak()
    losses = []
    with counter.hooks(params):
        for _ in range(m["micro_batches"]):
            out, loss_func = mm._forward_step(data, model)
            loss, _ = loss_func(out)
            loss.backward()
            losses.append(loss.detach().clone())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
    return {"losses": losses, "grads": grads, "peak": counter.peak}


def run_arms(arms: List[Dict], bad_plans: List[Dict], m: Dict, steps: int, world: int) -> Dict:
    from megatron.core import parallel_state as ps

    from moerail.integrations import megatron as mi
    from moerail.memory import MemoryPlan
    from moerail.memory.executor import SavedTensorCounter

    ps.initialize_model_parallel(expert_model_parallel_size=world, create_gloo_process_groups=False)
    out: Dict = {"arms": {}, "refused": []}
    for spec in arms:
        model = _model(m, world, spec.get("megatron", {}))
        data, counter, params = mm._Data(m, ps.get_data_parallel_rank()), SavedTensorCounter(), list(model.parameters())
        if spec.get("plan") is not None:
            # The executor's hooks sit inside the layers: they count into the same counter.
            mi.apply_memory_plan(model, MemoryPlan.from_dict(spec["plan"]), min_swap_bytes=0).counter = counter
        out["arms"][spec["name"]] = [_step(model, data, params, counter, m) for _ in range(steps)]
    for bad in bad_plans:
        try:
            mi.apply_memory_plan(_model(m, world, {}), MemoryPlan.from_dict(bad))
            out["refused"].append("")
        except (ValueError, TypeError) as e:
            out["refused"].append(str(e))
    ps.destroy_model_parallel()
    return out


def _ranks_body(rank: int, world: int, job: Dict) -> Dict:
    _stand_ins()
    return run_arms(job["arms"], job.get("bad_plans", []), {**MODEL, **job.get("model", {})}, job["steps"], world)


def run(job: Dict, out_dir: str, world: int = 2, timeout_s: float = 240.0) -> List[Dict]:
    """Runs ``job`` (``arms``, ``bad_plans``, ``steps``, ``model`` overrides) on ``world`` gloo ranks."""
    from megatron_gloo import run_job

    return run_job(_ranks_body, world, job, out_dir, timeout_s)
