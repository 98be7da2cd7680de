"""moerail.topk_route against Megatron-Core's topk_routing_with_score_function."""

from __future__ import annotations

import pytest
import torch

import moerail

CASES = {
    "softmax": dict(score_function="softmax"),
    "softmax-pre": dict(score_function="softmax", use_pre_softmax=True),
    "softmax-groups": dict(score_function="softmax", num_groups=4, group_topk=2),
    "softmax-pre-groups-scaled": dict(score_function="softmax", use_pre_softmax=True, num_groups=8, group_topk=4, scaling_factor=1.5),
    "sigmoid": dict(score_function="sigmoid"),
    "sigmoid-bias-scaled": dict(score_function="sigmoid", expert_bias=True, scaling_factor=2.5),
    "sigmoid-dsv3": dict(score_function="sigmoid", num_groups=8, group_topk=4, expert_bias=True, scaling_factor=2.5),
    "sqrtsoftplus-bias": dict(score_function="sqrtsoftplus", expert_bias=True),
}


def _args(case, num_experts, seed=1):
    kw = dict(case)
    if kw.pop("expert_bias", False):
        g = torch.Generator().manual_seed(seed)
        kw["expert_bias"] = (torch.rand(num_experts, generator=g) - 0.5) * 0.2
    return kw


def _megatron(mcore, logits, topk, kw):
    return mcore.topk_routing_with_score_function(logits, topk, **kw)


def _skip_unsupported(mcore_api, kw):
    if kw.get("score_function") == "sqrtsoftplus" and mcore_api == "0.16":
        pytest.skip("megatron-core 0.16 has no sqrtsoftplus score function (added in 0.17)")


@pytest.mark.megatron
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", [(257, 32, 4), (64, 64, 8), (33, 16, 1)])
def test_forward_matches_megatron_fp32(mcore, mcore_api, name, shape):
    t, e, k = shape
    kw = _args(CASES[name], e)
    _skip_unsupported(mcore_api, kw)
    if kw.get("group_topk") and (k < kw["group_topk"] or e % kw["num_groups"]):
        pytest.skip(f"topk={k} is below group_topk={kw['group_topk']}: not a valid group-limited routing")
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t + e + k))
    ref_probs, ref_map = _megatron(mcore, logits, k, kw)
    probs, routing_map, tpe = moerail.topk_route(logits, k, return_tokens_per_expert=True, **kw)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(probs, ref_probs, rtol=2e-6, atol=1e-7)
    assert torch.equal(tpe, ref_map.sum(0))
    # The compact form holds the same selection, in descending score order.
    pk, idx = moerail.topk_route(logits, k, dense_output=True, **kw)
    assert torch.equal(torch.zeros_like(ref_map).scatter(1, idx, True), ref_map)
    torch.testing.assert_close(pk, probs.gather(1, idx), rtol=0, atol=0)


def _distinct_half_logits(t, e, dtype, seed):
    """Per row, distinct logits m/32 (|m| < 128): exact in bf16 and fp16, so no selection ties."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(256, generator=g)[:e] for _ in range(t)]
    return ((torch.stack(rows) - 128).double() / 32).to(dtype)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_is_fp32_math_rounded_once(name, dtype):
    """Contract: half logits are routed with fp32 math and the probs rounded once."""
    kw = _args(CASES[name], 64)
    logits = torch.randn(300, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    ref_probs, ref_map = moerail.topk_route(logits.float(), 8, **kw)
    probs, routing_map = moerail.topk_route(logits, 8, **kw)
    assert probs.dtype == dtype
    assert torch.equal(routing_map, ref_map)
    assert torch.equal(probs, ref_probs.to(dtype))


@pytest.mark.megatron
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "group_topk" not in c])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_half_matches_megatron_fp32_math(mcore, mcore_api, name, dtype):
    """Megatron-Core >= 0.17 also computes in fp32 and casts once, so the reference is Megatron on
    the exact fp32 upcast of the same half logits, rounded at the end (0.16 rounds intermediate
    scores to the logits' dtype; comparing against fp32 math covers both)."""
    kw = _args(CASES[name], 64)
    _skip_unsupported(mcore_api, kw)
    logits = _distinct_half_logits(300, 64, dtype, seed=7)
    ref_probs, ref_map = _megatron(mcore, logits.float(), 8, kw)
    probs, routing_map = moerail.topk_route(logits, 8, **kw)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(probs.float(), ref_probs.to(dtype).float(), rtol=2**-7, atol=1e-6)


@pytest.mark.megatron
@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_megatron(mcore, mcore_api, name):
    kw = _args(CASES[name], 32)
    _skip_unsupported(mcore_api, kw)
    logits = torch.randn(96, 32, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(96, 32, generator=torch.Generator().manual_seed(4))
    a = logits.clone().requires_grad_()
    ref_probs, _ = _megatron(mcore, a, 4, kw)
    (ref_probs * grad).sum().backward()
    b = logits.clone().requires_grad_()
    probs, _ = moerail.topk_route(b, 4, **kw)
    (probs * grad).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    # The compact output carries the same gradient.
    c = logits.clone().requires_grad_()
    pk, idx = moerail.topk_route(c, 4, dense_output=True, **kw)
    (pk * grad.gather(1, idx)).sum().backward()
    torch.testing.assert_close(c.grad, a.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_fp64(name):
    kw = _args(CASES[name], 16)
    if kw.get("expert_bias") is not None:
        kw["expert_bias"] = kw["expert_bias"].double()
    logits = torch.randn(12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    torch.autograd.gradcheck(lambda x: moerail.topk_route(x, 4, **kw)[0], (logits,))
    torch.autograd.gradcheck(lambda x: moerail.topk_route(x, 4, dense_output=True, **kw)[0], (logits,))


def _stable_topk(scores, k):
    """Reference tie rule: a stable descending sort keeps the lower index first."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_ties_go_to_lower_expert(score_function):
    logits = torch.zeros(5, 8)
    logits[1, 5] = 1.0
    logits[2] = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    probs, idx = moerail.topk_route(logits, 3, dense_output=True, score_function=score_function)
    assert torch.equal(idx, _stable_topk(logits, 3))
    # Equal scores get equal probabilities.
    assert torch.allclose(probs[0], probs[0, :1].expand(3))


@pytest.mark.megatron
def test_tied_scores_have_megatron_probabilities(mcore):
    """With ties Megatron's pick among equals is torch.topk's (unspecified); the probabilities
    of the chosen experts and the number chosen per token agree."""
    logits = torch.zeros(6, 8)
    ref_probs, ref_map = mcore.topk_routing_with_score_function(logits, 3)
    probs, routing_map = moerail.topk_route(logits, 3)
    assert torch.equal(routing_map.sum(1), ref_map.sum(1))
    torch.testing.assert_close(probs.sum(1), ref_probs.sum(1))
    torch.testing.assert_close(probs[routing_map], ref_probs[ref_map])


@pytest.mark.megatron
@pytest.mark.parametrize(
    "t,e,k",
    [(0, 8, 2), (1, 8, 2), (5, 1, 1), (7, 6, 6), (16, 4, 4)],
    ids=["T=0", "T=1", "E=1", "k=E", "k=E-small"],
)
def test_edge_shapes(mcore, t, e, k):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(11))
    for sf in ("softmax", "sigmoid"):
        ref_probs, ref_map = mcore.topk_routing_with_score_function(logits, k, score_function=sf)
        probs, routing_map = moerail.topk_route(logits, k, score_function=sf)
        assert probs.shape == (t, e) and routing_map.shape == (t, e)
        assert torch.equal(routing_map, ref_map)
        torch.testing.assert_close(probs, ref_probs, rtol=2e-6, atol=1e-7)


def test_all_tokens_to_one_expert():
    logits = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    logits[:, 9] += 100.0
    probs, routing_map, tpe = moerail.topk_route(logits, 2, return_tokens_per_expert=True)
    assert bool(routing_map[:, 9].all())
    assert tpe[9].item() == 200 and tpe.sum().item() == 400
    # Post-softmax top-2 of a 100-logit gap: the winner takes (almost) all.
    assert bool((probs[:, 9] > 0.999).all())


def test_expert_bias_selects_only():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(9))
    bias = torch.zeros(8)
    bias[3] = 10.0
    probs, routing_map = moerail.topk_route(logits, 2, score_function="sigmoid", expert_bias=bias)
    assert bool(routing_map[:, 3].all())
    scores = torch.sigmoid(logits)
    sel = scores * routing_map
    torch.testing.assert_close(probs, sel / (sel.sum(1, keepdim=True) + 1e-20))


@pytest.mark.parametrize("kwargs, num_experts, bias", [
    (dict(topk=9), 8, False),
    (dict(topk=2, num_groups=3, group_topk=1), 8, False),
    (dict(topk=2, group_topk=2), 8, False),
    (dict(topk=1, num_groups=4, group_topk=2), 8, False),
    (dict(topk=2, scaling_factor=float("inf")), 8, False),
    (dict(topk=2), 8, True),
])
def test_router_config_is_the_one_check(kwargs, num_experts, bias):
    """The typed RouterConfig (parsed once in Rust) is the check every backend runs: its
    validate() raises the CPU router's own error, word for word."""
    cfg = moerail._native.ops.RouterConfig(**kwargs)
    with pytest.raises(ValueError) as from_config:
        cfg.validate(num_experts, bias)
    logits = torch.randn(4, num_experts)
    with pytest.raises(ValueError) as from_router:
        moerail.topk_route(logits, score_function="softmax",
                           expert_bias=torch.zeros(num_experts) if bias else None, **kwargs)
    assert str(from_config.value) == str(from_router.value)


def test_router_config_parses_the_score_function_once():
    cfg = moerail._native.ops.RouterConfig(4, "sigmoid", num_groups=8, group_topk=2, scaling_factor=2.5)
    assert (cfg.topk, cfg.score_function, cfg.num_groups, cfg.group_topk, cfg.scaling_factor) == (4, "sigmoid", 8, 2, 2.5)
    assert repr(cfg) == ("RouterConfig(topk=4, score_function='sigmoid', use_pre_softmax=False, num_groups=8, "
                         "group_topk=2, scaling_factor=2.5)")
    cfg.validate(64, True)
    with pytest.raises(ValueError, match="score_function: expected 'softmax', 'sigmoid' or 'sqrtsoftplus'"):
        moerail._native.ops.RouterConfig(4, "relu")


def test_scaling_factor_tensor_is_a_clear_error():
    """A multi-element tensor as scaling_factor names the argument (it hit torch's truth test);
    a 0-d tensor is a number, as Megatron passes it."""
    logits = torch.randn(4, 8)
    with pytest.raises(TypeError, match="scaling_factor: expected a number"):
        moerail.topk_route(logits, 2, scaling_factor=torch.ones(3))
    a = moerail.topk_route(logits, 2, scaling_factor=torch.tensor(2.5))
    b = moerail.topk_route(logits, 2, scaling_factor=2.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
