"""moerail's NPU path (``moerail.backends.npu``): torch_npu's fused permutes plus torch formulas. Both are
checked here against moerail's CPU path, which the other test files compare with Megatron-Core.

No NPU exists here. The formulas are device-generic, so they run on CPU tensors
(``_npu.use_for_cpu``). torch_npu's two fused permutes come from a stand-in written from their
published formulas (``tests/npu_standin/torch_npu.py``). That checks the part that is moerail's:
the arguments it passes, and the conversion of the inverse index they return into Megatron's
sorted_indices.

Contract: everything is bit-identical to the CPU path, with two exceptions, both within fp32
rounding:
  * the router's probabilities and gradients, which come from torch's softmax / sigmoid instead
    of moerail's kernels (the experts chosen are the same);
  * the gradient of the probs in unpermute, a dot product over the hidden size that torch reduces
    in its own order where the CPU kernel uses 8 lanes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import moerail
from moerail import backends
from moerail.backends import cuda as _device
from moerail.backends import npu as _npu

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _load_standin():
    spec = importlib.util.spec_from_file_location("torch_npu", Path(__file__).parent / "npu_standin" / "torch_npu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def standin(monkeypatch):
    mod = _load_standin()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    return mod


@pytest.fixture
def no_torch_npu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)


@contextlib.contextmanager
def npu_path():
    _npu.use_for_cpu(True)
    try:
        yield
    finally:
        _npu.use_for_cpu(False)


def both(fn):
    """(CPU path, NPU path) results of ``fn()``."""
    a = fn()
    with npu_path():
        b = fn()
    return a, b


STEP = ["permuted", "permuted_probs", "sorted_indices", "out", "grad tokens", "grad probs"]


def same_step(a, b):
    for what, x, y in zip(STEP, a, b):
        if what == "grad probs":  # a dot product over hidden: torch's order vs the CPU's 8 lanes
            assert x.dtype == y.dtype and x.shape == y.shape
            torch.testing.assert_close(y.double(), x.double(), rtol=1e-5, atol=1e-6 * float(x.abs().max()))
        else:
            same(x, y, what)


def same(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    assert torch.equal(a, b), f"{what}: max diff {(a.double() - b.double()).abs().max().item()}"


def _routing(t=67, e=16, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    probs, rmap = moerail.topk_route(logits, k)
    return probs, rmap


def _tokens(t, h, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, h, generator=g, dtype=torch.float64).to(dtype)


def _step(tokens, probs, rmap, **permute_kw):
    """permute -> expert (x 1.5) -> unpermute with probs, forward and backward."""
    x = tokens.clone().requires_grad_()
    p = probs.clone().requires_grad_()
    r = moerail.permute(x, rmap, probs=p, **permute_kw)
    permuted, permuted_probs, sorted_indices = r[0], r[1], r[2]
    y = permuted * 1.5
    kw = {}
    if permute_kw.get("drop_and_pad"):
        kw["drop_and_pad"] = True
    if r[3] is not None:  # pad_offsets (align_size)
        kw["pad_offsets"] = r[3]
    out = moerail.unpermute(y, sorted_indices, restore_shape=x.shape, probs=p, routing_map=rmap, **kw)
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    (out * grad).sum().backward()
    return permuted.detach(), permuted_probs.detach(), sorted_indices, out.detach(), x.grad, p.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_permute_with_routing_map_and_unpermute_match_cpu(standin, dtype):
    probs, rmap = _routing()
    tokens = _tokens(67, 40, dtype)
    a, b = both(lambda: _step(tokens, probs, rmap, num_out_tokens=67 * 4))
    assert [c[0] for c in standin.calls] == ["npu_moe_token_permute_with_routing_map"]
    # The fused op was asked for T * k rows (its topK = num_out_tokens // num_tokens).
    assert standin.calls[0][1] == 67 * 4 and standin.calls[0][3] is True
    same_step(a, b)


def test_inverse_index_is_converted_to_megatron_sorted_indices(standin):
    """The stand-in returns torch_npu's inverse (slot -> row); moerail's sorted_indices is row ->
    token, expert-major then ascending token, which is Megatron's."""
    rmap = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    tokens = torch.arange(4, dtype=torch.float32).unsqueeze(1) * 10
    with npu_path():
        out, _, si, rows = _npu.permute(tokens, rmap, None, 8, False, 0)
    assert standin.calls and standin.calls[0][0] == "npu_moe_token_permute_with_routing_map"
    assert si.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]
    assert out.squeeze(1).tolist() == [0, 10, 30, 10, 20, 0, 20, 30]
    assert rows.tolist() == [3, 2, 3]


def test_non_uniform_routing_map_uses_the_formula(standin):
    """After token dropping a token has fewer than k experts: the fused op's topK rule does not
    hold, so the torch formula runs, with the same results as the CPU path."""
    probs, rmap = _routing(t=64, e=8, k=2)
    probs, rmap = moerail.apply_token_dropping(probs, rmap, 2, capacity_factor=0.5)
    assert len(set(rmap.sum(1).tolist())) > 1
    tokens = _tokens(64, 24, torch.bfloat16)
    a, b = both(lambda: _step(tokens, probs, rmap))
    assert standin.calls == []
    same_step(a, b)


@pytest.mark.parametrize("kw", [dict(align_size=16), dict(drop_and_pad=True, capacity=10)], ids=["align16", "drop_and_pad"])
def test_padded_layouts_match_cpu(standin, kw):
    probs, rmap = _routing(t=40, e=8, k=2)
    if kw.get("drop_and_pad"):
        probs, rmap = moerail.apply_token_dropping(probs, rmap, 2, capacity_factor=1.0, pad_to_capacity=True)
        cap = int(rmap.sum(0)[0])
        permute_kw = dict(drop_and_pad=True, num_out_tokens=cap * 8)
    else:
        permute_kw = dict(align_size=16)
    tokens = _tokens(40, 24, torch.float32)
    a, b = both(lambda: _step(tokens, probs, rmap, **permute_kw))
    assert standin.calls == []
    same_step(a, b)


def test_without_torch_npu_the_formula_runs(no_torch_npu):
    probs, rmap = _routing()
    tokens = _tokens(67, 40, torch.bfloat16)
    a, b = both(lambda: _step(tokens, probs, rmap))
    same_step(a, b)


@pytest.mark.parametrize("with_probs", [False, True])
def test_permute_by_indices_matches_cpu(standin, with_probs):
    g = torch.Generator().manual_seed(5)
    t, e, k = 50, 12, 3
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    p = torch.rand(t, k, generator=g) if with_probs else None
    tokens = _tokens(t, 20, torch.bfloat16)

    def run():
        r = moerail.permute_by_indices(tokens, idx, e, probs=p)
        return r[0], r[2], (r[1] if with_probs else torch.empty(0))

    a, b = both(run)
    # Without probs torch_npu's npu_moe_token_permute does it (its inverse index converted).
    assert [c[0] for c in standin.calls] == ([] if with_probs else ["npu_moe_token_permute"])
    for what, x, y in zip(["permuted", "sorted_indices", "permuted_probs"], a, b):
        same(x, y, what)


ROUTERS = {
    "softmax": dict(topk=2),
    "pre_softmax": dict(topk=4, use_pre_softmax=True),
    "sigmoid_bias_scale": dict(topk=4, score_function="sigmoid", scaling_factor=2.5, bias=True),
    "group_limited": dict(topk=8, num_groups=8, group_topk=4, score_function="sigmoid", bias=True),
    "group_uneven": dict(topk=6, num_groups=8, group_topk=4, score_function="sigmoid"),
    "sqrtsoftplus": dict(topk=4, score_function="sqrtsoftplus"),
    "topk_eq_e": dict(topk=16),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_matches_cpu(name, dtype):
    c = dict(ROUTERS[name])
    t, e = 67, 64 if name.startswith("group") else 16
    bias = (torch.arange(e, dtype=torch.float32) % 5 * 0.01) if c.pop("bias", False) else None
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(t, e, generator=g, dtype=torch.float64).to(dtype)

    def run():
        x = logits.clone().requires_grad_()
        probs, rmap, tpe = moerail.topk_route(x, expert_bias=bias, return_tokens_per_expert=True, **c)
        (probs * grad).sum().backward()
        pk, ik = moerail.topk_route(logits, expert_bias=bias, dense_output=True, **c)
        return probs.detach(), rmap, tpe, x.grad, pk, ik

    (p0, m0, t0, g0, pk0, ik0), (p1, m1, t1, g1, pk1, ik1) = both(run)
    same(m0, m1, "routing_map")
    same(t0, t1, "tokens_per_expert")
    same(ik0, ik1, "compact indices (descending score, ties to the lower expert)")
    # fp32 math rounded once: a few fp32 ulps, or one ulp of a half type.
    tol = dict(rtol=1e-6, atol=1e-7) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(p1, p0, **tol)
    torch.testing.assert_close(pk1, pk0, **tol)
    gtol = dict(rtol=1e-5, atol=1e-6) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(g1, g0, **gtol)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_aux_scores_and_losses_match_cpu(score_function):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(48, 16, generator=g)

    def run():
        x = logits.clone().requires_grad_()
        rmap, scores = moerail.routing_scores_for_aux_loss(x, 4, score_function)
        loss = moerail.switch_load_balancing_loss(scores, rmap.sum(0), 48, 4, 16, 1e-2) + moerail.z_loss(x, 1e-3)
        loss.backward()
        return rmap, scores.detach(), loss.detach(), x.grad

    (m0, s0, l0, g0), (m1, s1, l1, g1) = both(run)
    same(m0, m1, "routing_map")
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)


def test_sort_chunks_matches_cpu():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 8, generator=g).requires_grad_()
    sizes = torch.tensor([3, 0, 7, 5, 15])
    order = torch.tensor([4, 2, 0, 3, 1])

    def run():
        xx = x.detach().clone().requires_grad_()
        y, _ = moerail.sort_chunks_by_idxs(xx, sizes, order)
        (y * torch.arange(30.0).unsqueeze(1)).sum().backward()
        return y.detach(), xx.grad

    (y0, g0), (y1, g1) = both(run)
    same(y0, y1, "sorted chunks")
    same(g0, g1, "backward")



def test_same_bits_twice(standin):
    probs, rmap = _routing()
    tokens = _tokens(67, 40, torch.bfloat16)
    with npu_path():
        a = _step(tokens, probs, rmap)
        b = _step(tokens, probs, rmap)
    for x, y in zip(a, b):
        same(x, y)


def test_bad_inputs_on_the_npu_path(standin):
    probs, rmap = _routing(t=8, e=4, k=2)
    tokens = _tokens(8, 6, torch.float32)
    before = tokens.clone()
    with npu_path(), _device.device_checks():  # the debug mode: value checks on
        with pytest.raises(ValueError, match="num_out_tokens"):
            _npu.permute(tokens, rmap, None, 7, False, 0)
        with pytest.raises(ValueError, match="indices"):
            _npu.permute_by_indices(tokens, torch.full((8, 2), 9), 4, None, 0)
        with pytest.raises(ValueError, match="same expert twice"):
            _npu.permute_by_indices(tokens, torch.zeros((8, 2), dtype=torch.int64), 4, None, 0)
        with pytest.raises(ValueError, match="sorted_indices"):
            _npu.unpermute(tokens, torch.full((8,), 99), 8, None)
        with pytest.raises(ValueError, match="num_groups"):
            _npu.topk_route(torch.randn(8, 4), 2, False, None, 2, None, "sigmoid", None)
        with pytest.raises(ValueError, match="expert_bias"):
            _npu.topk_route(torch.randn(8, 4), 2, False, None, None, None, "softmax", torch.zeros(4))
        with pytest.raises(ValueError, match="logits"):
            _npu.topk_route(torch.full((8, 4), float("nan")), 2, False, None, None, None, "softmax", None)
        with pytest.raises(ValueError, match="sorted_idxs"):
            _npu.sort_chunks(tokens, torch.tensor([4, 4]), torch.tensor([0, 0]))
    assert torch.equal(tokens, before)


def test_doctor_npu_column():
    rows = {r["op"]: r["npu"] for r in backends.op_backends(False, True, {"driver_error": "x"})}
    assert rows["permute"].startswith("torch_npu fused")
    assert "fixed fp32 order" in rows["unpermute"]
    assert all("not yet" not in v for v in rows.values())
    assert rows["AllToAllDispatcher exchange"].startswith("moerail.backends.hccl.HcclExchange")


def test_npu_tensors_are_routed_to_the_npu_path():
    """ops picks _npu for tensors whose device type is 'npu' (checked on the dispatch rule: no
    NPU tensor can be made here)."""

    t = torch.empty(2)
    assert not _npu.wants((t,))
    with npu_path():
        assert _npu.wants((t, 1))
    assert not _npu.wants((1, "x"))
