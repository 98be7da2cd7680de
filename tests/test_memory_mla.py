"""MLA's up-projections under a moerail memory plan, on a Megatron-Core GPT-MoE with Multi-Latent
Attention and EP on 2 gloo ranks: bit-identical to keeping everything, and, recomputed in every
layer, holding exactly the bytes Megatron's own ``recompute_modules=["mla_up_proj"]`` holds."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import memory_mla as mla  # noqa: E402

from moerail.memory import LayerPlan, MemoryPlan  # noqa: E402

STEPS = 3


def _plan(*layers) -> dict:
    return MemoryPlan(tuple(layers)).to_dict()


ARMS = [
    {"name": "keep"},
    {"name": "megatron mla_up_proj", "megatron": {"recompute_granularity": "selective",
                                                   "recompute_modules": ["mla_up_proj"]}},
    {"name": "moerail every layer", "plan": MemoryPlan.uniform(2, {"mla_up_proj": "recompute"}).to_dict()},
    {"name": "moerail layer 0", "plan": _plan(LayerPlan(0, {"mla_up_proj": "recompute"}))},
    # Layer 1's attention is recomputed whole (which rebuilds the up-projections too); layer 0 swaps its
    # expert inputs next to the up-projections' recompute.
    {"name": "moerail mixed", "plan": MemoryPlan((LayerPlan(0, {"mla_up_proj": "recompute", "expert_fc1": "swap"}),
                                                  LayerPlan(1, {"mla_up_proj": "recompute", "attention": "recompute"})),
                                                 host_bytes=1 << 26).to_dict()},
]
BAD = [
    _plan(LayerPlan(0, {"mla_up_proj": "swap"})),
    MemoryPlan((LayerPlan(1, {"mla_up_proj": "recompute", "attention": "swap"}),), host_bytes=1 << 26).to_dict(),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return mla.run({"arms": ARMS, "bad_plans": BAD, "steps": STEPS}, str(tmp_path_factory.mktemp("mla")))


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("arm", [a["name"] for a in ARMS[1:]])
def test_losses_and_gradients_are_bit_identical_to_keep_all(ranks, arm):
    for r in ranks:
        keep, got = r["arms"]["keep"], r["arms"][arm]
        for step in range(STEPS):
            assert _same(got[step]["losses"], keep[step]["losses"]), (arm, step, "losses")
            assert _same(got[step]["grads"], keep[step]["grads"]), (arm, step, "grads")


def test_every_layer_holds_what_megatrons_own_setting_holds(ranks):
    for r in ranks:
        keep = [s["peak"] for s in r["arms"]["keep"]]
        megatron = [s["peak"] for s in r["arms"]["megatron mla_up_proj"]]
        ours = [s["peak"] for s in r["arms"]["moerail every layer"]]
        one = [s["peak"] for s in r["arms"]["moerail layer 0"]]
        assert ours == megatron
        assert all(m < k for m, k in zip(megatron, keep))
        assert all(o < f < k for o, f, k in zip(ours, one, keep))


def test_plans_megatron_cannot_carry_out_are_refused(ranks):
    for r in ranks:
        swap, clash = r["refused"]
        assert "module 'mla_up_proj' (swap)" in swap and "swap 'attention'" in swap
        assert "module 'mla_up_proj' (recompute)" in clash and "swaps 'attention'" in clash
