"""benches/sim_memory_published.py: the simulator's per-device memory for the Megatron-Core MoE report's
DeepSeek-V3 configuration (PP4 x VPP4 x EP64, 256 GPUs). Weights, gradients and optimizer state are
checked against an independent fp64 count of the model's parameters on each pipeline stage (Megatron's
modules, from DeepSeek-V3's architecture), not against the published figures, which are what the bench
measures the simulator against."""

from __future__ import annotations

import pathlib
import sys
import time

import pytest

from moerail import sim

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benches"))
import sim_memory_published as smp  # noqa: E402

GIB = 2.0**30


def _stage_parameters(stage: int):
    """(non-expert, expert) parameters a GPU holds on ``stage`` of PP4 x VPP4 x EP64 with the layout
    Et*4|(tttt|)*14tmL, TP 1, counted module by module as Megatron builds them."""
    m = sim.model_presets()["DeepSeek-V3"]["model"]
    h, heads = float(m["hidden_size"]), float(m["num_attention_heads"])
    ql, kvl = float(m["q_lora_rank"]), float(m["kv_lora_rank"])
    qk, rope, vd = float(m["qk_head_dim"]), float(m["qk_pos_emb_head_dim"]), float(m["v_head_dim"])
    experts, fe, fs = float(m["num_moe_experts"]), float(m["moe_ffn_hidden_size"]), float(
        m["moe_shared_expert_intermediate_size"])
    ep = 64.0
    attention = (h  # input_layernorm
                 + h * ql + ql + ql * heads * (qk + rope)  # q down, q norm, q up
                 + h * (kvl + rope) + kvl + kvl * heads * (qk + vd)  # kv down, kv norm, kv up
                 + heads * vd * h)  # output projection
    dense_layer = attention + h + 3.0 * h * m["ffn_hidden_size"]  # pre-MLP norm, SwiGLU fc1 (2 f) and fc2
    moe_non_expert = attention + h + experts * h + 3.0 * h * fs  # pre-MLP norm, router, shared expert
    moe_expert = experts * 3.0 * h * fe / ep
    embedding = float(m["vocab_size"]) * h
    # Virtual stage v holds layers 4v..4v+3 (the first also the embedding, the last layer 60, the MTP
    # layer and the output layer); physical stage r holds virtual stages r, r+4, r+8, r+12.
    non_expert = expert = 0.0
    for v in range(stage, 16, 4):
        layers = range(4 * v, min(4 * v + 4, 61)) if v < 15 else [60]
        for layer in layers:
            if m["moe_layer_freq"][layer]:
                non_expert += moe_non_expert
                expert += moe_expert
            else:
                non_expert += dense_layer
        if v == 0:
            non_expert += embedding
        if v == 15:
            # MTP: enorm, hnorm, eh_proj (2h -> h), one MoE layer, its final norm; then the final norm
            # and the untied output layer.
            non_expert += 2 * h + 2 * h * h + moe_non_expert + h + h + embedding
            expert += moe_expert
    return non_expert, expert


@pytest.fixture(scope="module")
def rows():
    return smp.published_memory_rows()


def _row(rows, part, stage):
    return next(r for r in rows if r["part"] == part and r["device"].startswith(f"stage {stage} "))


@pytest.mark.parametrize("stage", [0, 1])
def test_weights_gradients_optimizer_against_an_independent_parameter_count(rows, stage):
    non_expert, expert = _stage_parameters(stage)
    dp, edp = 256 / (1 * 4), 256 / (4 * 64 * 1)
    # bf16 weights and fp32 gradients; fp32 main weights and two Adam moments over the data-parallel ranks.
    assert _row(rows, "weights and gradients", stage)["predicted"] == pytest.approx(
        6.0 * (non_expert + expert) / GIB, rel=1e-9)
    assert _row(rows, "main weights and optimizer states", stage)["predicted"] == pytest.approx(
        12.0 * (non_expert / dp + expert / edp) / GIB, rel=1e-9)


def test_last_stage_parameters_include_mtp_and_output_layer():
    rep = sim.simulate(smp.config())
    stages = rep["breakdown_s"]["per_stage"]
    for s in range(4):
        assert stages[s]["parameters"] == pytest.approx(sum(_stage_parameters(s)), rel=1e-12), s


def test_rows_carry_the_published_figures_and_their_errors(rows):
    assert {r["table"] for r in rows} == {"Table 3", "Table 4"}
    for r in rows:
        pub = smp.TABLE3.get(r["part"]) if r["table"] == "Table 3" else None
        if pub is not None:
            assert r["published"] == pub
        assert r["error"] == pytest.approx(r["predicted"] / r["published"] - 1.0)
        assert r["assumption"]
    # The binding stage is the one the simulator reports; the other holds MoE layers only.
    devices = list(dict.fromkeys(r["device"] for r in rows))
    assert devices[0].startswith(f"stage {sim.simulate(smp.config())['memory_gib']['stage']} ")
    assert "dense" not in devices[1]
    for d in devices:
        t3 = {r["part"]: r["predicted"] for r in rows if r["device"] == d and r["table"] == "Table 3"}
        assert t3["total"] == pytest.approx(t3["weights and gradients"] + t3["main weights and optimizer states"]
                                            + t3["activations"])
        t4 = [r["predicted"] for r in rows if r["device"] == d and r["table"] == "Table 4"]
        assert all(x > 0 for x in t4)


def test_render_is_fast_and_names_every_assumption():
    t0 = time.perf_counter()
    text = smp.render()
    assert time.perf_counter() - t0 < 5.0
    assert "arXiv 2603.07685" in text
    for value in smp.ASSUMED.values():
        assert value in text
