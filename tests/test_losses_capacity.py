"""Capacity, token dropping, aux-loss scores, load-balancing losses, z-loss and the expert-bias
update against Megatron-Core's functions."""

from __future__ import annotations

import pytest
import torch

import moerail


@pytest.mark.megatron
@pytest.mark.parametrize(
    "args",
    [(4096 * 8, 64, 1.0), (10, 4, 1.0), (8, 4, 0.1), (1000, 7, 1.3), (0, 4, 1.0), (17, 3, 2.0), (5, 8, 0.5)],
)
@pytest.mark.parametrize("min_capacity", [None, 3])
def test_get_capacity(mcore, args, min_capacity):
    assert moerail.get_capacity(*args, min_capacity=min_capacity) == mcore.get_capacity(*args, min_capacity=min_capacity)


def _tie_free_probs(t, e, k, seed):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(seed))
    return moerail.topk_route(logits, k, score_function="sigmoid")


@pytest.mark.megatron
@pytest.mark.parametrize("capacity_factor", [0.25, 0.7, 1.0, 1.5, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probs_policy_matches_megatron(mcore, capacity_factor, dtype):
    t, e, k = 300, 16, 4
    probs, routing_map = _tie_free_probs(t, e, k, seed=1)
    probs = probs.to(dtype)
    want_p, want_m = mcore.apply_router_token_dropping(probs, routing_map, k, capacity_factor, "probs", False)
    got_p, got_m = moerail.apply_token_dropping(probs, routing_map, k, capacity_factor, "probs")
    if dtype == torch.bfloat16:
        # Rounded probs tie; Megatron's pick among equal probs is torch.topk's. Kept counts and
        # the kept probability mass agree.
        assert torch.equal(got_m.sum(0), want_m.sum(0))
        torch.testing.assert_close(got_p.float().sum(0), want_p.float().sum(0))
    else:
        assert torch.equal(got_m, want_m) and torch.equal(got_p, want_p)


def _stable_keep(key: torch.Tensor, capacity: int) -> torch.Tensor:
    """Reference: per expert, the `capacity` best keys, ties to the lower token (stable sort)."""
    order = torch.sort(key, dim=0, descending=True, stable=True).indices[:capacity]
    return torch.zeros_like(key, dtype=torch.bool).scatter(0, order, True)


@pytest.mark.megatron
@pytest.mark.parametrize("pad_to_capacity", [False, True])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_dropping_semantics(mcore, policy, pad_to_capacity):
    """Position drops the latest tokens; padding fills with the earliest others. Megatron uses
    torch.topk, whose choice among equal keys is unspecified, so the comparison with it is on
    the kept counts, and the exact rows are checked against a stable reference."""
    t, e, k, cf = 200, 8, 2, 0.6
    probs, routing_map = _tie_free_probs(t, e, k, seed=2)
    capacity = moerail.get_capacity(t * k, e, cf)
    got_p, got_m = moerail.apply_token_dropping(probs, routing_map, k, cf, policy, pad_to_capacity)
    want_p, want_m = mcore.apply_router_token_dropping(probs, routing_map, k, cf, policy, pad_to_capacity)
    assert torch.equal(got_m.sum(0), want_m.sum(0))
    key = probs if policy == "probs" else routing_map.float()
    keep = _stable_keep(key, capacity)
    expect_map = keep if pad_to_capacity else keep & routing_map
    assert torch.equal(got_m, expect_map)
    assert torch.equal(got_p, probs * expect_map)
    if policy == "probs":
        # Routed tokens kept are the same (ties there are only among zero-probability pads).
        assert torch.equal(got_m & routing_map, want_m & routing_map)


def test_dropping_gradient():
    probs, routing_map = _tie_free_probs(50, 6, 2, seed=3)
    p = probs.double().requires_grad_()
    out, kept = moerail.apply_token_dropping(p, routing_map, 2, 0.5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    assert torch.equal(p.grad, g * kept)


@pytest.mark.megatron
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_aux_scores_match_megatron(mcore, mcore_api, score_function):
    if score_function == "sqrtsoftplus" and mcore_api == "0.16":
        pytest.skip("megatron-core 0.16 has no sqrtsoftplus score function (added in 0.17)")
    logits = torch.randn(150, 32, generator=torch.Generator().manual_seed(4))
    want_m, want_s = mcore.compute_routing_scores_for_aux_loss(logits, 6, score_function)
    got_m, got_s, tpe = moerail.routing_scores_for_aux_loss(logits, 6, score_function, return_tokens_per_expert=True)
    assert torch.equal(got_m, want_m) and torch.equal(tpe, want_m.sum(0))
    torch.testing.assert_close(got_s, want_s, rtol=2e-6, atol=1e-7)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    w = torch.randn(150, 32)
    (mcore.compute_routing_scores_for_aux_loss(a, 6, score_function)[1] * w).sum().backward()
    (moerail.routing_scores_for_aux_loss(b, 6, score_function)[1] * w).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: moerail.routing_scores_for_aux_loss(z, 2, score_function)[1], (x,))


@pytest.mark.megatron
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_switch_load_balancing_loss(mcore, dtype):
    logits = torch.randn(256, 16, dtype=dtype)
    routing_map, scores = moerail.routing_scores_for_aux_loss(logits, 4, "softmax")
    tpe = routing_map.sum(0)
    a = scores.detach().clone().requires_grad_()
    b = scores.detach().clone().requires_grad_()
    want = mcore.switch_load_balancing_loss_func(a, tpe, 1024, 4, 16, 0.01)
    got = moerail.switch_load_balancing_loss(b, tpe, 1024, 4, 16, 0.01)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    want.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=0)
    torch.autograd.gradcheck(
        lambda p: moerail.switch_load_balancing_loss(p, tpe, 256, 4, 16, 0.3), (scores.detach().double().requires_grad_(),)
    )


@pytest.mark.megatron
def test_sequence_load_balancing_loss(mcore):
    """Megatron's router computes the sequence-level loss by viewing [seq, batch * E] and dividing
    the switch loss by the batch size: that is the reference."""
    seq, bsz, e, k, coeff = 64, 3, 8, 2, 0.02
    logits = torch.randn(seq * bsz, e)
    routing_map, scores = moerail.routing_scores_for_aux_loss(logits, k, "sigmoid")
    ref_s = scores.detach().clone().requires_grad_()
    tpe = routing_map.reshape(seq, -1).sum(0)
    want = mcore.switch_load_balancing_loss_func(ref_s.reshape(seq, -1), tpe, seq, k, e, coeff) / bsz
    s = scores.detach().clone().requires_grad_()
    got = moerail.sequence_load_balancing_loss(s, routing_map, seq, bsz, k, coeff)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    want.backward()
    got.backward()
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-6, atol=0)
    # With per-sequence counts given (already reduced across the sequence-parallel group).
    got2 = moerail.sequence_load_balancing_loss(scores, routing_map, seq, bsz, k, coeff, tokens_per_expert=tpe.view(bsz, e))
    torch.testing.assert_close(got2, want.detach(), rtol=1e-6, atol=0)


@pytest.mark.megatron
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_z_loss(mcore, dtype):
    """fp32 math, one rounding: half-precision logits are compared with Megatron on their exact
    fp32 upcast (Megatron itself would round every intermediate to bf16)."""
    logits = (torch.randn(128, 24) * 3).to(dtype)
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    a = logits.to(ref_dtype).detach().clone().requires_grad_()
    b = logits.detach().clone().requires_grad_()
    want = mcore.z_loss_func(a, 1e-3)
    got = moerail.z_loss(b, 1e-3)
    assert got.dtype == dtype
    want.backward()
    got.backward()
    if dtype == torch.bfloat16:
        torch.testing.assert_close(got, want.to(dtype), rtol=2**-7, atol=0)
        torch.testing.assert_close(b.grad, a.grad.to(dtype), rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-12)
    torch.autograd.gradcheck(lambda z: moerail.z_loss(z, 0.5), (torch.randn(6, 4, dtype=torch.float64, requires_grad=True),))


@pytest.mark.megatron
@pytest.mark.parametrize("shape", [(16,), (4, 16)])
def test_expert_bias_update(mcore, monkeypatch, shape):
    """Megatron all-reduces the counts over the data-parallel group first; with one rank that is
    the identity, which the test shims (no process group exists here)."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None, **kw: None)
    monkeypatch.setattr(mcore.parallel_state, "get_tensor_and_data_parallel_group", lambda **kw: None)
    g = torch.Generator().manual_seed(5)
    tpe = torch.randint(0, 40, shape, generator=g).float()
    tpe.view(-1)[0] = tpe.view(-1, shape[-1]).mean(-1)[0].round()  # an expert exactly at the mean is possible
    bias = torch.randn(shape, generator=g) * 0.01
    kwargs = {}
    want = mcore.get_updated_expert_bias(tpe.clone(), bias, 1e-3, **kwargs)
    got = moerail.expert_bias_update(tpe, bias, 1e-3)
    assert torch.equal(got, want)
    assert torch.equal(moerail.expert_bias_update(tpe.long(), bias, 1e-3), want)
