"""permute / unpermute / sort_chunks_by_idxs against Megatron-Core, plus properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moerail
from conftest import bf16_ulp, make_routing
from moerail.integrations import megatron as mi

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _mc_permute(mcore, mcore_api, tokens, routing_map, probs=None, num_out_tokens=None, drop_and_pad=False):
    """Megatron's permute on either API, as (permuted, permuted_probs, sorted_indices)."""
    if num_out_tokens is None:
        num_out_tokens = int(routing_map.sum())
    out = mcore.permute(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens, drop_and_pad=drop_and_pad)
    assert len(out) == (5 if mcore_api == mi.API_5_TUPLE else 3)
    return out[0], out[1], out[2]


@pytest.mark.megatron
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 16, 2, 24), (64, 64, 8, 8), (1, 4, 4, 3), (0, 8, 2, 5), (50, 1, 1, 6)])
def test_permute_rows_bit_identical(mcore, mcore_api, dtype, shape):
    t, e, k, h = shape
    _, probs, routing_map = make_routing(t, e, k, seed=t + e)
    tokens = torch.randn(t, h, generator=torch.Generator().manual_seed(1)).to(dtype)
    probs = probs.to(dtype)
    ref = _mc_permute(mcore, mcore_api, tokens, routing_map, probs)
    out, pp, si, pad_offsets, tpe = moerail.permute(tokens, routing_map, probs, num_out_tokens=t * k)
    assert torch.equal(out, ref[0]) and torch.equal(pp, ref[1]) and torch.equal(si, ref[2])
    assert pad_offsets is None
    assert torch.equal(tpe, routing_map.sum(0))
    # Without probs, and without num_out_tokens.
    out2, pp2, si2, _, _ = moerail.permute(tokens, routing_map)
    assert pp2 is None and torch.equal(out2, ref[0]) and torch.equal(si2, ref[2])


@pytest.mark.megatron
def test_permute_after_capacity_dropping(mcore, mcore_api):
    """Dropped routing maps have uneven and empty experts."""
    _, probs, routing_map = make_routing(400, 32, 4, seed=3)
    probs, routing_map = moerail.apply_token_dropping(probs, routing_map, 4, 0.5)
    tokens = torch.randn(400, 16, dtype=torch.bfloat16)
    n = int(routing_map.sum())
    ref = _mc_permute(mcore, mcore_api, tokens, routing_map, probs, num_out_tokens=n)
    out, pp, si, _, _ = moerail.permute(tokens, routing_map, probs, num_out_tokens=n)
    assert torch.equal(out, ref[0]) and torch.equal(pp, ref[1]) and torch.equal(si, ref[2])


@pytest.mark.megatron
@pytest.mark.parametrize("pad_to_capacity", [True, False])
def test_permute_drop_and_pad(mcore, mcore_api, pad_to_capacity):
    t, e, k = 240, 12, 3
    _, probs, routing_map = make_routing(t, e, k, seed=4)
    probs, routing_map = moerail.apply_token_dropping(probs, routing_map, k, 0.8, pad_to_capacity=pad_to_capacity)
    capacity = moerail.get_capacity(t * k, e, 0.8)
    tokens = torch.randn(t, 10)
    ref = _mc_permute(mcore, mcore_api, tokens, routing_map, probs, num_out_tokens=capacity * e, drop_and_pad=True)
    out, pp, si, _, tpe = moerail.permute(tokens, routing_map, probs, num_out_tokens=capacity * e, drop_and_pad=True)
    assert torch.equal(out, ref[0]) and torch.equal(pp, ref[1]) and torch.equal(si, ref[2])
    assert tpe.tolist() == [capacity] * e
    # ... and back, with probs, as Megatron's drop-and-pad unpermute.
    y = torch.randn_like(out)
    got = moerail.unpermute(y, si, tokens.shape, probs=probs, routing_map=routing_map, drop_and_pad=True)
    want = mcore.unpermute(y, ref[2], tokens.shape, probs=probs, routing_map=routing_map, drop_and_pad=True)
    assert torch.equal(got, want)


@pytest.mark.megatron
@pytest.mark.parametrize("tokens_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpermute_with_fp32_probs_is_bit_identical(mcore, mcore_api, tokens_dtype):
    """Megatron multiplies by fp32 probs (promoting to fp32), scatter-adds in ascending row order
    and casts once: the same arithmetic, so the same bits."""
    t, e, k, h = 333, 24, 6, 40
    _, probs, routing_map = make_routing(t, e, k, seed=5)
    tokens = torch.randn(t, h).to(tokens_dtype)
    _, _, si = _mc_permute(mcore, mcore_api, tokens, routing_map)
    y = torch.randn(t * k, h).to(tokens_dtype)
    want = mcore.unpermute(y, si, tokens.shape, probs=probs, routing_map=routing_map)
    got = moerail.unpermute(y, si, tokens.shape, probs=probs, routing_map=routing_map)
    assert got.dtype == tokens_dtype
    assert torch.equal(got, want)


def _fp64_unpermute(y, si, num_tokens, w=None):
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float64)
    yy = y.double() if w is None else y.double() * w.double().unsqueeze(1)
    keep = si >= 0
    out.index_add_(0, si[keep], yy[keep])
    return out


def _within_one_rounding(got, ref64, terms_abs_sum, dtype):
    """|got - ref| <= half a spacing of `dtype` at ref, plus the fp32 accumulation error."""
    if dtype == torch.bfloat16:
        half_ulp = bf16_ulp(ref64) / 2
    elif dtype == torch.float16:
        a = ref64.abs().clamp_min(2.0**-14)
        half_ulp = torch.exp2(torch.floor(torch.log2(a)) - 10) / 2
    else:
        half_ulp = ref64.abs() * 2.0**-24
    acc_err = terms_abs_sum * 16 * 2.0**-24
    return bool(((got.double() - ref64).abs() <= half_ulp + acc_err + 1e-300).all())


@pytest.mark.megatron
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpermute_half_without_probs_vs_megatron(mcore, mcore_api, dtype):
    """Megatron sums copies in the half dtype (a rounding per add); moerail sums in fp32 and
    rounds once: within one rounding of fp64, and never further from it than Megatron."""
    t, e, k, h = 256, 16, 8, 64
    _, _, routing_map = make_routing(t, e, k, seed=6)
    tokens = torch.randn(t, h).to(dtype)
    _, _, si = _mc_permute(mcore, mcore_api, tokens, routing_map)
    y = torch.randn(t * k, h).to(dtype)
    want = mcore.unpermute(y, si, tokens.shape)
    got = moerail.unpermute(y, si, tokens.shape)
    ref = _fp64_unpermute(y, si, t)
    terms = _fp64_unpermute(y.abs(), si, t)
    assert _within_one_rounding(got, ref, terms, dtype)
    assert (got.double() - ref).abs().sum() <= (want.double() - ref).abs().sum()


@pytest.mark.megatron
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_megatron(mcore, mcore_api, dtype):
    t, e, k, h = 120, 10, 3, 12
    _, probs, routing_map = make_routing(t, e, k, seed=8)
    tokens = torch.randn(t, h).to(dtype)
    g_out = torch.randn(t, h).to(dtype)

    def run(permute, unpermute):
        x = tokens.clone().requires_grad_()
        p = probs.clone().requires_grad_()
        out, pp, si = permute(x, routing_map, p)[:3]
        y = out * 1.5 + pp.unsqueeze(1).to(dtype)
        z = unpermute(y, si, x.shape, probs=p, routing_map=routing_map)
        (z.float() * g_out.float()).sum().backward()
        return z, x.grad, p.grad

    zr, gxr, gpr = run(lambda x, m, p: _mc_permute(mcore, mcore_api, x, m, p), mcore.unpermute)
    zm, gxm, gpm = run(lambda x, m, p: moerail.permute(x, m, p), moerail.unpermute)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(zm, zr, **tol)
    torch.testing.assert_close(gxm, gxr, **tol)
    torch.testing.assert_close(gpm, gpr, **tol)


def test_gradcheck_fp64():
    t, e, k, h = 9, 5, 2, 3
    _, probs, routing_map = make_routing(t, e, k, seed=9, dtype=torch.float64)
    x = torch.randn(t, h, dtype=torch.float64, requires_grad=True)
    p = probs.detach().clone().requires_grad_()

    def f(x, p):
        out, pp, si, _, _ = moerail.permute(x, routing_map, p)
        y = torch.tanh(out) * pp.unsqueeze(1)
        return moerail.unpermute(y, si, x.shape, probs=p, routing_map=routing_map)

    torch.autograd.gradcheck(f, (x, p))
    # The permuted-probs form of unpermute and the index form of permute.
    pk, idx = moerail.topk_route(torch.randn(t, e, dtype=torch.float64), k, dense_output=True)
    pk = pk.detach().requires_grad_()

    def g(x, pk):
        out, pp, si, _, _ = moerail.permute_by_indices(x, idx, e, pk, align_size=4)
        return moerail.unpermute(out.sin(), si, x.shape, permuted_probs=pp)

    torch.autograd.gradcheck(g, (x, pk))


def test_index_form_equals_map_form():
    t, e, k, h = 200, 12, 3, 7
    logits = torch.randn(t, e)
    probs, routing_map = moerail.topk_route(logits, k)
    pk, idx = moerail.topk_route(logits, k, dense_output=True)
    x = torch.randn(t, h, dtype=torch.bfloat16)
    a = moerail.permute(x, routing_map, probs)
    b = moerail.permute_by_indices(x, idx, e, pk)
    for u, v in zip(a, b):
        assert (u is None and v is None) or torch.equal(u, v)
    y = torch.randn_like(a[0])
    u1 = moerail.unpermute(y, a[2], x.shape, probs=probs, routing_map=routing_map)
    u2 = moerail.unpermute(y, b[2], x.shape, permuted_probs=b[1])
    assert torch.equal(u1, u2)
    # -1 marks a dropped slot.
    idx2 = idx.clone()
    idx2[::3, 1] = -1
    c = moerail.permute_by_indices(x, idx2, e, pk)
    keep = idx2 >= 0
    assert c[0].shape[0] == int(keep.sum())
    assert torch.equal(c[4], torch.bincount(idx2[keep], minlength=e))


@pytest.mark.megatron
@pytest.mark.parametrize("align", [4, 16, 128])
def test_alignment_padding(mcore, mcore_api, align):
    t, e, k, h = 150, 8, 2, 6
    _, probs, routing_map = make_routing(t, e, k, seed=10)
    x = torch.randn(t, h, dtype=torch.bfloat16)
    out, pp, si, pad_offsets, tpe = moerail.permute(x, routing_map, probs, align_size=align)
    counts = routing_map.sum(0)
    padded = (counts + align - 1) // align * align
    assert torch.equal(tpe, padded) and out.shape[0] == int(padded.sum())
    pads = padded - counts
    assert torch.equal(pad_offsets, torch.cumsum(pads, 0) - pads)
    ref_out, ref_pp, ref_si = _mc_permute(mcore, mcore_api, x, routing_map, probs)
    start, ref_start = 0, 0
    for ex in range(e):
        c, p = int(counts[ex]), int(padded[ex])
        assert torch.equal(out[start : start + c], ref_out[ref_start : ref_start + c])
        assert torch.equal(pp[start : start + c], ref_pp[ref_start : ref_start + c])
        assert torch.equal(si[start : start + c], ref_si[ref_start : ref_start + c])
        assert bool((out[start + c : start + p] == 0).all()) and bool((si[start + c : start + p] == -1).all())
        assert bool((pp[start + c : start + p] == 0).all())
        start, ref_start = start + p, ref_start + c
    # Unpermute ignores the padding rows (with or without pad_offsets for the probs form).
    y = torch.randn_like(out)
    y_unpadded = torch.cat([y[int(padded[:i].sum()) : int(padded[:i].sum()) + int(counts[i])] for i in range(e)])
    want = moerail.unpermute(y_unpadded, ref_si, x.shape, probs=probs, routing_map=routing_map)
    got = moerail.unpermute(y, si, x.shape, probs=probs, routing_map=routing_map, pad_offsets=pad_offsets)
    assert torch.equal(got, want)
    assert torch.equal(moerail.unpermute(y, si, x.shape), moerail.unpermute(y_unpadded, ref_si, x.shape))


@pytest.mark.megatron
@pytest.mark.parametrize("with_probs", [False, True])
def test_sort_chunks_matches_megatron(mcore, with_probs):
    g = torch.Generator().manual_seed(12)
    sizes = torch.randint(0, 7, (24,), generator=g)
    sizes[5] = 0
    order = torch.randperm(24, generator=g)
    n = int(sizes.sum())
    x = torch.randn(n, 9, dtype=torch.bfloat16)
    p = torch.rand(n) if with_probs else None
    want = mcore.sort_chunks_by_idxs(x, sizes, order, probs=p)
    got = moerail.sort_chunks_by_idxs(x, sizes, order, probs=p)
    assert torch.equal(got[0], want[0])
    assert (got[1] is None and want[1] is None) or torch.equal(got[1], want[1])
    # Lists work like tensors; the backward is the inverse order.
    xr = x.float().requires_grad_()
    out, _ = moerail.sort_chunks_by_idxs(xr, sizes.tolist(), order.tolist())
    w = torch.randn_like(out)
    (out * w).sum().backward()
    xm = x.float().requires_grad_()
    (mcore.sort_chunks_by_idxs(xm, sizes, order)[0] * w).sum().backward()
    assert torch.equal(xr.grad, xm.grad)
    torch.autograd.gradcheck(
        lambda z: moerail.sort_chunks_by_idxs(z, sizes, order)[0], (torch.randn(n, 2, dtype=torch.float64, requires_grad=True),)
    )


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(0, 40),
    e=st.integers(1, 9),
    h=st.integers(1, 17),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_property_round_trip_counts_copies(t, e, h, seed, dtype):
    """unpermute(permute(x)) == x * (number of copies), exactly (half values sum exactly in fp32)."""
    g = torch.Generator().manual_seed(seed)
    routing_map = torch.rand(t, e, generator=g) < 0.4
    x = (torch.randn(t, h, generator=g) * 4).to(dtype)
    out, _, si, _, _ = moerail.permute(x, routing_map)
    back = moerail.unpermute(out, si, x.shape)
    copies = routing_map.sum(1, keepdim=True).double()
    assert torch.equal(back, (x.double() * copies).to(dtype))


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 40),
    e=st.integers(1, 9),
    k=st.integers(1, 9),
    h=st.integers(1, 17),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_property_weighted_combine_within_one_rounding(t, e, k, h, seed, dtype):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    probs, routing_map = moerail.topk_route(logits, k, score_function="sigmoid")
    x = (torch.randn(t, h, generator=g) * 3).to(dtype)
    out, pp, si, _, _ = moerail.permute(x, routing_map, probs)
    got = moerail.unpermute(out, si, x.shape, probs=probs, routing_map=routing_map)
    ref = _fp64_unpermute(out, si, t, pp)
    terms = _fp64_unpermute(out.abs(), si, t, pp.abs())
    assert _within_one_rounding(got, ref, terms, dtype)
