"""moerail.integrations.megatron: Megatron's exact signatures and return conventions for the
installed megatron-core (0.16's 3-tuple permute, or 0.17+'s 5-tuple one)."""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import make_routing
from moerail.integrations import megatron as mi

pytestmark = pytest.mark.megatron


def test_api_detection(mcore, mcore_api):
    n = len(inspect.signature(mcore.permute).parameters)
    assert mcore_api == (mi.API_5_TUPLE if n >= 8 else mi.API_3_TUPLE)
    # Our replacements accept every argument Megatron's functions take, in the same order.
    for ours, theirs in [
        (mi.permute_for(mcore_api), mcore.permute),
        (mi.unpermute_for(mcore_api), mcore.unpermute),
        (mi.sort_chunks_by_idxs, mcore.sort_chunks_by_idxs),
        (mi.apply_router_token_dropping, mcore.apply_router_token_dropping),
        (mi.get_capacity, mcore.get_capacity),
    ]:
        mine = list(inspect.signature(ours).parameters)
        assert mine[: len(inspect.signature(theirs).parameters)] == list(inspect.signature(theirs).parameters)


@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("drop_and_pad", [False, True])
def test_permute_unpermute_drop_in(mcore, mcore_api, with_probs, drop_and_pad):
    t, e, k, h = 160, 8, 2, 16
    _, probs, routing_map = make_routing(t, e, k, seed=1)
    n = t * k
    if drop_and_pad:
        probs, routing_map = mi.apply_router_token_dropping(probs, routing_map, k, 1.0, "probs", True)
        n = mi.get_capacity(t * k, e, 1.0) * e
    x = torch.randn(t, h, dtype=torch.bfloat16)
    p = probs if with_probs else None
    want = mcore.permute(x, routing_map, probs=p, num_out_tokens=n, drop_and_pad=drop_and_pad)
    got = mi.permute_for(mcore_api)(x, routing_map, probs=p, num_out_tokens=n, drop_and_pad=drop_and_pad)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    y = torch.randn(want[0].shape, dtype=torch.bfloat16)
    kw = dict(probs=probs, routing_map=routing_map, drop_and_pad=drop_and_pad)
    assert torch.equal(mi.unpermute_for(mcore_api)(y, got[2], x.shape, **kw), mcore.unpermute(y, want[2], x.shape, **kw))


def test_router_drop_in(mcore):
    logits = torch.randn(64, 16)
    for kw in (dict(), dict(score_function="sigmoid", expert_bias=torch.randn(16) * 0.1, num_groups=4, group_topk=2)):
        want = mcore.topk_routing_with_score_function(logits, 4, **kw)
        got = mi.topk_routing_with_score_function(logits, 4, **kw)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)
    want = mcore.compute_routing_scores_for_aux_loss(logits, 4, "softmax")
    got = mi.compute_routing_scores_for_aux_loss(logits, 4, "softmax")
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    tpe = want[0].sum(0)
    torch.testing.assert_close(
        mi.switch_load_balancing_loss_func(want[1], tpe, 64, 4, 16, 0.01),
        mcore.switch_load_balancing_loss_func(want[1], tpe, 64, 4, 16, 0.01),
    )
    torch.testing.assert_close(mi.z_loss_func(logits, 0.001), mcore.z_loss_func(logits, 0.001))


def test_fused_is_refused_clearly():
    x = torch.randn(4, 2)
    _, _, rm = make_routing(4, 3, 1)
    with pytest.raises(ValueError, match="fused"):
        mi.permute_v016(x, rm, fused=True)
