"""Bad input: a clear TypeError/ValueError naming the argument, inputs untouched, no panic."""

from __future__ import annotations

import pytest
import torch

import moerail

T, E, K, H = 12, 8, 2, 4


def _routing():
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    probs, routing_map = moerail.topk_route(logits, K)
    return logits, probs, routing_map


LOGITS, PROBS, MAP = _routing()
TOKENS = torch.randn(T, H)
PERM, PP, SI, _, TPE = moerail.permute(TOKENS, MAP, PROBS)
_, IDX = moerail.topk_route(LOGITS, K, dense_output=True)
NAN_LOGITS = LOGITS.clone()
NAN_LOGITS[3, 5] = float("nan")
INF_LOGITS = LOGITS.clone()
INF_LOGITS[7, 1] = float("inf")
BAD_IDX = IDX.clone()
BAD_IDX[4, 1] = E
DUP_IDX = IDX.clone()
DUP_IDX[2, 1] = DUP_IDX[2, 0]
HUGE_IDX = IDX.clone()
HUGE_IDX[0, 0] = 2**40
BAD_SI = SI.clone()
BAD_SI[0] = 2**35

CASES = [
    # router
    ("logits not a tensor", lambda: moerail.topk_route(LOGITS.tolist(), K), TypeError, "logits"),
    ("logits int", lambda: moerail.topk_route(LOGITS.long(), K), TypeError, "logits"),
    ("logits 3-D", lambda: moerail.topk_route(LOGITS.view(3, 4, E), K), ValueError, "logits"),
    ("topk > E", lambda: moerail.topk_route(LOGITS, E + 1), ValueError, "topk"),
    ("topk = 0", lambda: moerail.topk_route(LOGITS, 0), ValueError, "topk"),
    ("topk negative", lambda: moerail.topk_route(LOGITS, -3), ValueError, "topk"),
    ("topk huge", lambda: moerail.topk_route(LOGITS, 2**63), ValueError, "topk"),
    ("topk float", lambda: moerail.topk_route(LOGITS, 2.0), TypeError, "topk"),
    ("num_groups not dividing E", lambda: moerail.topk_route(LOGITS, K, num_groups=3, group_topk=1), ValueError, "num_groups"),
    ("group_topk > num_groups", lambda: moerail.topk_route(LOGITS, K, num_groups=2, group_topk=4), ValueError, "group_topk"),
    ("group_topk without num_groups", lambda: moerail.topk_route(LOGITS, K, group_topk=2), ValueError, "num_groups"),
    ("NaN logits", lambda: moerail.topk_route(NAN_LOGITS, K), ValueError, "logits: must be finite"),
    ("Inf logits", lambda: moerail.topk_route(INF_LOGITS, K, score_function="sigmoid"), ValueError, "logits: must be finite"),
    ("NaN logits aux", lambda: moerail.routing_scores_for_aux_loss(NAN_LOGITS, K), ValueError, "logits"),
    ("NaN logits z-loss", lambda: moerail.z_loss(NAN_LOGITS, 0.1), ValueError, "logits"),
    ("score function", lambda: moerail.topk_route(LOGITS, K, score_function="relu"), ValueError, "score_function"),
    ("bias shape", lambda: moerail.topk_route(LOGITS, K, score_function="sigmoid", expert_bias=torch.zeros(E + 1)), ValueError, "expert_bias"),
    ("bias with softmax", lambda: moerail.topk_route(LOGITS, K, expert_bias=torch.zeros(E)), ValueError, "expert_bias"),
    ("bias NaN", lambda: moerail.topk_route(LOGITS, K, score_function="sigmoid", expert_bias=torch.full((E,), float("nan"))), ValueError, "expert_bias"),
    ("scaling factor inf", lambda: moerail.topk_route(LOGITS, K, scaling_factor=float("inf")), ValueError, "scaling_factor"),
    # capacity and dropping
    ("capacity factor 0", lambda: moerail.get_capacity(10, 4, 0.0), ValueError, "capacity_factor"),
    ("capacity factor NaN", lambda: moerail.get_capacity(10, 4, float("nan")), ValueError, "capacity_factor"),
    ("capacity overflow", lambda: moerail.get_capacity(2**62, 1, 1e6), ValueError, "capacity_factor"),
    ("num_experts 0", lambda: moerail.get_capacity(10, 0, 1.0), ValueError, "num_experts"),
    ("drop policy", lambda: moerail.apply_token_dropping(PROBS, MAP, K, 1.0, "random"), ValueError, "drop_policy"),
    ("drop map shape", lambda: moerail.apply_token_dropping(PROBS, MAP[:5], K, 1.0), ValueError, "routing_map"),
    ("drop map float", lambda: moerail.apply_token_dropping(PROBS, MAP.float() * 0.5, K, 1.0), TypeError, "routing_map"),
    ("drop NaN probs", lambda: moerail.apply_token_dropping(PROBS.masked_fill(MAP, float("nan")), MAP, K, 0.5), ValueError, "probs"),
    # losses
    ("switch tpe shape", lambda: moerail.switch_load_balancing_loss(PROBS, TPE[:3], T, K, E, 0.1), ValueError, "tokens_per_expert"),
    ("switch experts", lambda: moerail.switch_load_balancing_loss(PROBS, TPE, T, K, E + 1, 0.1), ValueError, "probs"),
    ("switch total 0", lambda: moerail.switch_load_balancing_loss(PROBS, TPE, 0, K, E, 0.1), ValueError, "total_num_tokens"),
    ("seq shape", lambda: moerail.sequence_load_balancing_loss(PROBS, MAP, 5, 2, K, 0.1), ValueError, "probs"),
    ("bias update shape", lambda: moerail.expert_bias_update(TPE[:4], torch.zeros(E), 0.1), ValueError, "tokens_per_expert"),
    ("bias update negative", lambda: moerail.expert_bias_update(-TPE, torch.zeros(E), 0.1), ValueError, "tokens_per_expert"),
    ("bias update rate", lambda: moerail.expert_bias_update(TPE, torch.zeros(E), float("nan")), ValueError, "expert_bias_update_rate"),
    # permute
    ("tokens 1-D", lambda: moerail.permute(TOKENS.view(-1), MAP), ValueError, "tokens"),
    ("tokens complex", lambda: moerail.permute(TOKENS.to(torch.complex64), MAP), TypeError, "tokens"),
    ("mismatched T", lambda: moerail.permute(TOKENS[:-1], MAP), ValueError, "routing_map"),
    ("map float", lambda: moerail.permute(TOKENS, MAP.float()), TypeError, "routing_map"),
    ("probs shape", lambda: moerail.permute(TOKENS, MAP, PROBS[:, :3]), ValueError, "probs"),
    ("num_out_tokens wrong", lambda: moerail.permute(TOKENS, MAP, num_out_tokens=5), ValueError, "num_out_tokens"),
    ("num_out_tokens huge", lambda: moerail.permute(TOKENS, MAP, num_out_tokens=2**40), ValueError, "num_out_tokens"),
    ("num_out_tokens negative", lambda: moerail.permute(TOKENS, MAP, num_out_tokens=-1), ValueError, "num_out_tokens"),
    ("drop_and_pad not multiple", lambda: moerail.permute(TOKENS, MAP, num_out_tokens=E + 1, drop_and_pad=True), ValueError, "num_out_tokens"),
    ("align negative", lambda: moerail.permute(TOKENS, MAP, align_size=-8), ValueError, "align_size"),
    ("index out of range", lambda: moerail.permute_by_indices(TOKENS, BAD_IDX, E), ValueError, "indices"),
    ("index huge", lambda: moerail.permute_by_indices(TOKENS, HUGE_IDX, E), ValueError, "indices"),
    ("index repeated", lambda: moerail.permute_by_indices(TOKENS, DUP_IDX, E), ValueError, "indices"),
    ("index float", lambda: moerail.permute_by_indices(TOKENS, IDX.float(), E), TypeError, "indices"),
    ("index T", lambda: moerail.permute_by_indices(TOKENS[:3], IDX, E), ValueError, "indices"),
    # unpermute
    ("unpermute rows", lambda: moerail.unpermute(PERM[:-1], SI, TOKENS.shape), ValueError, "sorted_indices"),
    ("unpermute hidden", lambda: moerail.unpermute(PERM, SI, (T, H + 1)), ValueError, "restore_shape"),
    ("unpermute shape type", lambda: moerail.unpermute(PERM, SI, T), TypeError, "restore_shape"),
    ("unpermute overflow", lambda: moerail.unpermute(PERM, SI, (2**60, H)), ValueError, "restore_shape"),
    ("unpermute bad index", lambda: moerail.unpermute(PERM, BAD_SI, TOKENS.shape), ValueError, "sorted_indices"),
    ("unpermute too few tokens", lambda: moerail.unpermute(PERM, SI, (2, H)), ValueError, "sorted_indices"),
    ("unpermute probs w/o map", lambda: moerail.unpermute(PERM, SI, TOKENS.shape, probs=PROBS), ValueError, "routing_map"),
    ("unpermute probs shape", lambda: moerail.unpermute(PERM, SI, TOKENS.shape, probs=PROBS[:4], routing_map=MAP[:4]), ValueError, "probs"),
    ("unpermute wrong map", lambda: moerail.unpermute(PERM, SI, TOKENS.shape, probs=PROBS, routing_map=torch.ones_like(MAP)), ValueError, "routing_map"),
    ("unpermute pp shape", lambda: moerail.unpermute(PERM, SI, TOKENS.shape, permuted_probs=PP[:-2]), ValueError, "permuted_probs"),
    ("unpermute int tokens", lambda: moerail.unpermute(PERM.long(), SI, TOKENS.shape), TypeError, "permuted_tokens"),
    # sort chunks
    ("chunks sum", lambda: moerail.sort_chunks_by_idxs(TOKENS, [3, 3], [1, 0]), ValueError, "split_sizes"),
    ("chunks negative", lambda: moerail.sort_chunks_by_idxs(TOKENS, [14, -2], [1, 0]), ValueError, "split_sizes"),
    ("chunks not a permutation", lambda: moerail.sort_chunks_by_idxs(TOKENS, [6, 6], [0, 0]), ValueError, "sorted_idxs"),
    ("chunks order length", lambda: moerail.sort_chunks_by_idxs(TOKENS, [6, 6], [0]), ValueError, "sorted_idxs"),
    ("chunks order type", lambda: moerail.sort_chunks_by_idxs(TOKENS, [6, 6], "01"), TypeError, "sorted_idxs"),
    ("chunks probs rows", lambda: moerail.sort_chunks_by_idxs(TOKENS, [6, 6], [1, 0], probs=torch.ones(5)), ValueError, "probs"),
]


@pytest.mark.parametrize("name,call,exc,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_named_error(name, call, exc, needle):
    snapshot = [t.clone() for t in (LOGITS, PROBS, MAP, TOKENS, PERM, PP, SI, TPE, IDX)]
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value), f"{name}: message {info.value!r} does not name {needle!r}"
    for before, after in zip(snapshot, (LOGITS, PROBS, MAP, TOKENS, PERM, PP, SI, TPE, IDX)):
        assert torch.equal(before, after), "an input was modified by a rejected call"


def test_native_layer_rejects_what_python_would():
    """The native functions check again: a direct call with wrong outputs cannot write."""
    from moerail import _native

    out = torch.zeros(SI.shape[0], H + 1)
    with pytest.raises(ValueError, match="out"):
        _native.ops.gather_rows(TOKENS, SI, out)
    assert bool((out == 0).all())
    with pytest.raises(ValueError, match="overlaps"):
        _native.ops.gather_rows(PERM, SI, PERM)
    with pytest.raises(TypeError, match="tokens"):
        _native.ops.gather_rows([1, 2], SI, out)
    counts = torch.zeros(E, dtype=torch.int64)
    with pytest.raises(TypeError, match="routing_map"):
        _native.ops.count_routing_map(MAP.float(), counts)


def test_non_contiguous_inputs_are_handled():
    logits_t = LOGITS.t().contiguous().t()  # same values, column-major
    assert not logits_t.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(moerail.topk_route(logits_t, K), moerail.topk_route(LOGITS, K)))
    tokens_nc = torch.randn(H, T).t()
    a = moerail.permute(tokens_nc, MAP, PROBS)
    b = moerail.permute(tokens_nc.contiguous(), MAP, PROBS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    strided = torch.randn(SI.shape[0], 2 * H)[:, ::2]
    assert torch.equal(moerail.unpermute(strided, SI, TOKENS.shape), moerail.unpermute(strided.contiguous(), SI, TOKENS.shape))
    wide = torch.zeros(T, E + 3, dtype=torch.bool)
    wide[:, :E] = MAP
    assert torch.equal(moerail.permute(TOKENS, wide[:, :E])[0], moerail.permute(TOKENS, MAP)[0])


def test_integer_routing_map_is_refused_not_misread():
    """A top-k index tensor [T, k] (DeepEP / TransformerEngine style) passed as the routing map was
    read as ``x != 0``: wrong rows and tokens_per_expert, no error. It is refused, pointing at
    permute_by_indices, which gives what Megatron's permute gives for the same routing."""
    idx = torch.tensor([[0, 3], [1, 2], [3, 1], [2, 0], [0, 1], [3, 2], [1, 0], [2, 3]])
    x = torch.randn(8, 5)
    with pytest.raises(TypeError, match=r"routing_map: expected a bool tensor.*permute_by_indices"):
        moerail.permute(x, idx)
    with pytest.raises(TypeError, match="routing_map.*permute_by_indices"):
        moerail.permute(TOKENS, MAP.to(torch.int32), PROBS)
    with pytest.raises(TypeError, match="routing_map"):
        moerail.unpermute(PERM, SI, TOKENS.shape, probs=PROBS, routing_map=MAP.to(torch.uint8))
    # The index form of the same routing: Megatron's own permute on the equivalent bool map.
    from megatron.core.transformer.moe import moe_utils

    rmap = torch.zeros(8, 4, dtype=torch.bool).scatter_(1, idx, True)
    want = moe_utils.permute(x, rmap, num_out_tokens=16)
    got = moerail.permute_by_indices(x, idx, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert got[4].tolist() == rmap.sum(0).tolist() == [4, 4, 4, 4]
