"""moerail.integrations.megatron in one process: what ``patch_moe_utils`` replaces and restores,
where calls go, the adapters Megatron's layers reach only in some configurations (padding masks,
the sequence-level loss shape, <= 0.13 names), the router class and the spec helpers.

The multi-rank comparisons of whole MoE layers are in ``test_integration_megatron_gloo.py``.
"""

from __future__ import annotations

import functools
import inspect
import pickle
import sys
import types
import warnings

import pytest
import torch

import moerail
from conftest import make_routing
from moerail.integrations import megatron as mi

pytestmark = pytest.mark.megatron


@pytest.fixture
def mods(mcore):
    """moe_utils and the modules that import its functions by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.distributed.finalize_model_grads  # noqa: F401
        from megatron.core.transformer.moe import experts, moe_layer, router, token_dispatcher  # noqa: F401
    fmg = sys.modules["megatron.core.distributed.finalize_model_grads"]
    yield types.SimpleNamespace(moe_utils=mcore, router=router, token_dispatcher=token_dispatcher, fmg=fmg)
    mi.unpatch_moe_utils(mcore)


def _snapshot(mods):
    """Every module attribute that is one of moe_utils' replaceable functions."""
    targets = {id(getattr(mods.moe_utils, n)) for n in mi.MOE_UTILS_FUNCTIONS if hasattr(mods.moe_utils, n)}
    snap = {}
    for name, mod in list(sys.modules.items()):
        d = getattr(mod, "__dict__", None)
        if isinstance(d, dict):
            for k, v in list(d.items()):
                if id(v) in targets:
                    snap[(name, k)] = v
    return snap


def test_patch_rebinds_every_importer_and_unpatch_restores_exactly(mods):
    mu = mods.moe_utils
    before = _snapshot(mods)
    originals = {n: getattr(mu, n) for n in mi.MOE_UTILS_FUNCTIONS if hasattr(mu, n)}
    assert ("megatron.core.transformer.moe.router", "topk_routing_with_score_function") in before
    assert ("megatron.core.transformer.moe.token_dispatcher", "permute") in before
    assert ("megatron.core.distributed.finalize_model_grads", "get_updated_expert_bias") in before

    info = mi.patch_moe_utils()
    assert mi.is_patched()
    assert set(info.patched) == set(originals), info.skipped
    for (mod_name, attr), orig in before.items():
        now = getattr(sys.modules[mod_name], attr)
        assert now is not orig and now.__moerail_original__ is orig, (mod_name, attr)
    assert mods.router.apply_router_token_dropping is mu.apply_router_token_dropping
    assert mods.token_dispatcher.unpermute is mu.unpermute
    assert mods.fmg.get_updated_expert_bias is mu.get_updated_expert_bias
    # Megatron's signatures are what callers (and megatron_api) see
    for n, orig in originals.items():
        assert inspect.signature(getattr(mu, n)) == inspect.signature(orig), n
    assert mi.megatron_api(mu) == info.api

    again = mi.patch_moe_utils()  # idempotent: the same patch, nothing wrapped twice
    assert again is info
    assert mu.permute.__moerail_original__ is originals["permute"]

    assert mi.unpatch_moe_utils() is True
    assert not mi.is_patched()
    assert _snapshot(mods) == before
    for (mod_name, attr), orig in before.items():
        assert getattr(sys.modules[mod_name], attr) is orig
    assert mi.unpatch_moe_utils() is False


def test_module_imported_while_patched_is_restored(mods):
    with mi.moe_utils_patched():
        late = types.ModuleType("late_importer_for_test")
        sys.modules[late.__name__] = late
        exec("from megatron.core.transformer.moe.moe_utils import permute, z_loss_func as zl", late.__dict__)
        assert late.permute.__moerail_original__ is not None
    try:
        assert late.permute is mods.moe_utils.permute and not hasattr(late.permute, "__moerail_original__")
        assert not hasattr(late.zl, "__moerail_original__")
    finally:
        del sys.modules[late.__name__]


def test_context_manager_nesting_and_subsets(mods):
    mu = mods.moe_utils
    orig_perm, orig_z = mu.permute, mu.z_loss_func
    with mi.moe_utils_patched(functions=["permute"]) as info:
        assert info.patched == ["permute"]
        assert mu.permute is not orig_perm and mu.z_loss_func is orig_z
        with mi.moe_utils_patched():  # already patched on entry: stays patched on exit
            assert mu.z_loss_func is not orig_z
        assert mi.is_patched() and mu.permute is not orig_perm
    assert mu.permute is orig_perm and mu.z_loss_func is orig_z
    with pytest.raises(ValueError, match="unknown names"):
        mi.patch_moe_utils(functions=["not_a_function"])
    assert not mi.is_patched()


def test_patched_calls_run_moerail_and_match(mods, mcore_api):
    mu = mods.moe_utils
    logits = torch.randn(96, 16)
    want_probs, want_map = mu.topk_routing_with_score_function(logits, 4, score_function="sigmoid", num_groups=4, group_topk=2)
    x = torch.randn(96, 8)
    want = mu.permute(x, want_map, probs=want_probs, num_out_tokens=96 * 4)
    mi.patch_stats(reset=True)
    with mi.moe_utils_patched():
        probs, rmap = mods.router.topk_routing_with_score_function(
            logits, 4, score_function="sigmoid", num_groups=4, group_topk=2
        )
        got = mods.token_dispatcher.permute(x, rmap, probs=probs, num_out_tokens=96 * 4)
    stats = mi.patch_stats()
    assert stats["topk_routing_with_score_function"] == {"moerail": 1, "megatron": 0}
    assert stats["permute"] == {"moerail": 1, "megatron": 0}
    assert torch.equal(rmap, want_map)
    torch.testing.assert_close(probs, want_probs, rtol=2e-6, atol=1e-7)
    assert len(got) == len(want) == (5 if mcore_api == mi.API_5_TUPLE else 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


def test_fused_calls_go_to_what_the_user_asked_for(mods):
    """--moe-permute-fusion / --moe-router-fusion (fused=True) mean TransformerEngine's fused kernels:
    the patch hands those calls to Megatron's own function (silently: it is the user's choice) unless
    serve_fused=True opts in. Megatron's function is the judge: with TE it runs TE's kernels, without
    TE it raises its own error, and either way moerail did not answer the call."""
    mu = mods.moe_utils
    _, _, rmap = make_routing(24, 4, 2)
    x = torch.randn(24, 8)
    try:
        want = ("ok", mu.permute(x, rmap, num_out_tokens=48, fused=True))
    except Exception as e:  # noqa: BLE001 - Megatron's own refusal (no TransformerEngine here)
        want = ("raised", type(e), str(e))
    mi.patch_stats(reset=True)
    with mi.moe_utils_patched(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = mods.token_dispatcher.permute(x, rmap, num_out_tokens=48, fused=True)
            got = ("ok", out)
        except Exception as e:  # noqa: BLE001
            got = ("raised", type(e), str(e))
        unfused = mods.token_dispatcher.permute(x, rmap, num_out_tokens=48)
    assert got[0] == want[0] and (got[1:] == want[1:] if got[0] == "raised" else torch.equal(got[1][0], want[1][0]))
    assert mi.patch_stats(reset=True)["permute"] == {"moerail": 1, "megatron": 1}
    assert not [w for w in caught if "moerail" in str(w.message)]
    assert torch.equal(unfused[0], mu.permute(x, rmap, num_out_tokens=48)[0])
    # Opting in: moerail serves fused=True calls too (the setting stays until changed).
    with mi.moe_utils_patched(serve_fused=True):
        got = mods.token_dispatcher.permute(x, rmap, num_out_tokens=48, fused=True)
    assert torch.equal(got[0], unfused[0])
    assert mi.patch_stats(reset=True)["permute"] == {"moerail": 1, "megatron": 0}
    with pytest.raises(TypeError, match="serve_fused"):
        mi.patch_moe_utils(serve_fused="yes")


def test_calls_moerail_cannot_serve_go_to_megatron(mods):
    mu = mods.moe_utils
    mi.patch_stats(reset=True)
    with mi.moe_utils_patched(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = mods.router.z_loss_func(torch.randn(4, 8, device="meta"), 0.1)  # a device moerail does not serve
        assert z.device.type == "meta"
        if "precomputed_indices" in inspect.signature(mu.topk_routing_with_score_function).parameters:
            logits = torch.randn(6, 8)
            idx = torch.tensor([[0, 1]] * 6)
            probs, rmap = mu.topk_routing_with_score_function(logits, 2, precomputed_indices=idx)
            assert rmap[:, :2].all() and not rmap[:, 2:].any()
        with pytest.raises(TypeError):  # a bad call gets Megatron's own error
            mu.get_capacity()
    stats = mi.patch_stats(reset=True)
    assert stats["z_loss_func"] == {"moerail": 0, "megatron": 1}
    assert any("tensors on meta" in str(w.message) for w in caught)


def test_padding_masks_match_megatron(mcore):
    params = inspect.signature(mcore.z_loss_func).parameters
    if "padding_mask" not in params:
        pytest.skip("this megatron-core has no padding masks")
    logits = torch.randn(40, 8, requires_grad=True)
    pad = torch.zeros(40, dtype=torch.bool)
    pad[::3] = True  # True = padding, as Megatron's code reads it
    for mask in (pad, torch.zeros(40, dtype=torch.bool), torch.ones(40, dtype=torch.bool)):
        want = mcore.z_loss_func(logits, 0.01, padding_mask=mask)
        got = mi.z_loss_func(logits, 0.01, padding_mask=mask)
        torch.testing.assert_close(got, want)
        (gw,) = torch.autograd.grad(want, logits)
        (gg,) = torch.autograd.grad(got, logits)
        torch.testing.assert_close(gg, gw)
    want = mcore.compute_routing_scores_for_aux_loss(logits, 2, "softmax", padding_mask=pad)
    got = mi.compute_routing_scores_for_aux_loss(logits, 2, "softmax", padding_mask=pad)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    valid = ~pad  # switch loss: True = valid
    tpe = want[0].sum(0).float()
    torch.testing.assert_close(
        mi.switch_load_balancing_loss_func(want[1], tpe, 40, 2, 8, 0.1, padding_mask=valid),
        mcore.switch_load_balancing_loss_func(want[1], tpe, 40, 2, 8, 0.1, padding_mask=valid),
    )


def test_sequence_level_loss_shape_matches_megatron(mcore):
    """Megatron's seq aux loss calls the switch loss with [seq, batch * experts] scores."""
    seq, bsz, e, k = 12, 3, 8, 2
    logits = torch.randn(seq * bsz, e)
    rmap, scores = mcore.compute_routing_scores_for_aux_loss(logits, k, "softmax")
    s2, m2 = scores.reshape(seq, -1), rmap.reshape(seq, -1)
    tpe = m2.sum(0).float()
    want = mcore.switch_load_balancing_loss_func(s2, tpe, seq, k, e, 0.01) / bsz
    got = mi.switch_load_balancing_loss_func(s2, tpe, seq, k, e, 0.01) / bsz
    torch.testing.assert_close(got, want)
    # and it is moerail's sequence-level loss
    torch.testing.assert_close(moerail.sequence_load_balancing_loss(scores, rmap, seq, bsz, k, 0.01), want)


def test_position_drop_policy_keeps_the_earliest_tokens(mcore):
    """Megatron ranks 0/1 flags with torch.topk, so which of the routed tokens it keeps is left to
    the sort's tie order; moerail keeps the earliest ones (the policy's intent). Counts agree."""
    _, probs, rmap = make_routing(64, 8, 2, seed=3)
    want = mcore.apply_router_token_dropping(probs, rmap, 2, 0.5, "position")
    got = mi.apply_router_token_dropping(probs, rmap, 2, 0.5, "position")
    assert torch.equal(got[1].sum(0), want[1].sum(0))
    cap = mi.get_capacity(64 * 2, 8, 0.5)
    for e in range(8):
        routed = rmap[:, e].nonzero().flatten()
        assert torch.equal(got[1][:, e].nonzero().flatten(), routed[:cap])


def test_softmax_ignores_expert_bias_as_megatron_does(mcore):
    logits = torch.randn(32, 8)
    bias = torch.randn(8)
    want = mcore.topk_routing_with_score_function(logits, 2, expert_bias=bias)
    got = mi.topk_routing_with_score_function(logits, 2, expert_bias=bias)
    assert torch.equal(got[1], want[1])


# ---- <= 0.13 names and signatures (megatron-core 0.11-0.13 are not installed here: the references
# are the current Megatron functions these old ones were split into, and the formulas).


def test_legacy_topk_softmax_with_capacity(mcore):
    logits = torch.randn(48, 8, requires_grad=True)
    for kw in (dict(), dict(capacity_factor=1.0), dict(capacity_factor=1.0, pad_to_capacity=True), dict(score_function="sigmoid", expert_bias=torch.randn(8) * 0.1, scaling_factor=2.0)):
        probs, rmap, tpe = mi.topk_softmax_with_capacity(logits, 2, **kw)
        rkw = {k: v for k, v in kw.items() if k in ("score_function", "expert_bias", "scaling_factor")}
        wp, wm = mcore.topk_routing_with_score_function(logits, 2, **rkw)
        assert torch.equal(tpe, wm.sum(0)), "counts before dropping"
        if "capacity_factor" in kw:
            wp, wm = mcore.apply_router_token_dropping(wp, wm, 2, kw["capacity_factor"], "probs", kw.get("pad_to_capacity", False))
        torch.testing.assert_close(probs, wp)
        # the padding rows (probability 0) that fill an expert up to capacity are a tie Megatron
        # leaves to torch.topk; moerail takes the lowest token indices. Same kept tokens, same counts.
        assert torch.equal(rmap & (probs > 0), wm & (wp > 0))
        assert torch.equal(rmap.sum(0), wm.sum(0))


def test_legacy_losses_and_permute(mcore):
    seq, bsz, e, k = 10, 4, 8, 2
    logits = torch.randn(seq * bsz, e)
    rmap, scores = mcore.compute_routing_scores_for_aux_loss(logits, k, "softmax")
    tpe = rmap.sum(0).float()
    torch.testing.assert_close(
        mi.switch_load_balancing_loss_func_v011(scores, tpe, k, 0.01),
        mcore.switch_load_balancing_loss_func(scores, tpe, seq * bsz, k, e, 0.01),
    )
    # 0.11-0.13 sequence loss: coeff * mean_b sum_e (f_be * E / (S k)) * mean_s p_bse
    p = scores.view(seq, bsz, e)
    f = rmap.view(seq, bsz, e).sum(0).float() / (seq * k / e)
    want = (f * p.mean(0)).sum(1).mean() * 0.01
    torch.testing.assert_close(mi.sequence_load_balancing_loss_func(scores, rmap, bsz, seq, k, 0.01), want)
    x = torch.randn(seq * bsz, 6)
    full = mcore.permute(x, rmap, num_out_tokens=int(rmap.sum()))
    two = mi.permute_v011(x, rmap, num_out_tokens=int(rmap.sum()))
    assert len(two) == 2 and torch.equal(two[0], full[0]) and torch.equal(two[1], full[2])
    split = torch.tensor([3, 5, 2])
    order = torch.tensor([2, 0, 1])
    y = torch.randn(10, 3)
    assert torch.equal(mi.sort_chunks_by_idxs_v011(y, split, order), mcore.sort_chunks_by_idxs(y, split, order)[0])


def _fake_legacy_moe_utils():
    """A moe_utils with megatron-core 0.12's signatures (bodies irrelevant: they are replaced)."""
    m = types.ModuleType("fake_moe_utils_v012")
    src = '''
def permute(tokens, routing_map, num_out_tokens=None, fused=False, drop_and_pad=False): return "orig"
def unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False, drop_and_pad=False): return "orig"
def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, fused=False): return "orig"
def switch_load_balancing_loss_func(probs, tokens_per_expert, topk, moe_aux_loss_coeff, sequence_partition_group=None): return "orig"
def sequence_load_balancing_loss_func(probs, routing_map, batch_size, seq_length, topk, moe_aux_loss_coeff, sequence_partition_group=None): return "orig"
def z_loss_func(logits, z_loss_coeff): return "orig"
def get_capacity(num_tokens, num_experts, capacity_factor, min_capacity=None): return "orig"
def topk_softmax_with_capacity(logits, topk, capacity_factor=None, pad_to_capacity=False, drop_policy="probs", use_pre_softmax=False, num_groups=None, group_topk=None, scaling_factor=None, deterministic_mode=False, score_function="softmax", expert_bias=None): return "orig"
def get_updated_expert_bias(tokens_per_expert, expert_bias, expert_bias_update_rate): return "orig"
def permute_newer_than_moerail(tokens, some_new_argument): return "orig"
'''
    exec(src, m.__dict__)
    m.apply_router_token_dropping = lambda routing_probs, new_argument: "orig"  # a signature moerail doesn't know
    sys.modules[m.__name__] = m
    return m


def test_patching_a_legacy_moe_utils_picks_the_legacy_adapters():
    m = _fake_legacy_moe_utils()
    user = types.ModuleType("fake_user_v012")
    user.permute, user.sort = m.permute, m.sort_chunks_by_idxs
    sys.modules[user.__name__] = user
    try:
        assert mi.megatron_api(m) == mi.API_2_TUPLE
        info = mi.patch_moe_utils(m)
        assert info.api == mi.API_2_TUPLE
        impl = {n: w.__moerail_impl__ for n, w in info.wrappers.items()}
        assert impl["permute"] is mi.permute_v011
        assert impl["sort_chunks_by_idxs"] is mi.sort_chunks_by_idxs_v011
        assert impl["switch_load_balancing_loss_func"] is mi.switch_load_balancing_loss_func_v011
        assert impl["topk_softmax_with_capacity"] is mi.topk_softmax_with_capacity
        assert impl["sequence_load_balancing_loss_func"] is mi.sequence_load_balancing_loss_func
        assert "apply_router_token_dropping" in info.skipped and m.apply_router_token_dropping.__name__ == "<lambda>"
        assert user.permute is m.permute and user.sort is m.sort_chunks_by_idxs  # the importer is rebound
        _, _, rmap = make_routing(20, 4, 2)
        x = torch.randn(20, 3)
        out, sorted_indices = user.permute(x, rmap, num_out_tokens=40)
        assert torch.equal(out, x[sorted_indices])
        assert isinstance(user.sort(x, [10, 10], [1, 0]), torch.Tensor)
    finally:
        mi.unpatch_moe_utils(m)
        del sys.modules[m.__name__], sys.modules[user.__name__]
    assert user.permute(None, None) == "orig" and m.z_loss_func(None, None) == "orig"


# ---- the router class and the specs


def test_router_class_and_specs(mcore):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter

    R = mi.MoerailTopKRouter
    assert issubclass(R, TopKRouter) and R is mi.MoerailTopKRouter
    assert "topk_routing_with_score_function" in R.moerail_functions
    assert pickle.loads(pickle.dumps(R)) is R
    # Megatron's own method bodies, with moerail's functions resolved in them
    assert R.routing.__code__ is TopKRouter.routing.__code__
    assert R.routing.__globals__["topk_routing_with_score_function"].__moerail_impl__ is mi.topk_routing_with_score_function
    assert TopKRouter.routing.__globals__["topk_routing_with_score_function"] is mcore.topk_routing_with_score_function

    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    new = mi.with_moerail_router(spec)

    def subs(s):
        mlp = s.submodules.mlp
        return mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules

    assert isinstance(subs(new), MoESubmodules) and subs(new).router is R
    assert subs(spec).router is TopKRouter, "the given spec is not modified"
    assert subs(new).experts is subs(spec).experts
    moe = mi.get_moe_module_spec(num_experts=8)
    assert (moe.keywords["submodules"] if isinstance(moe, functools.partial) else moe.submodules).router is R
    with pytest.raises(ValueError, match="no MoE layer"):
        mi.with_moerail_router(get_gpt_layer_local_spec())


def test_dispatcher_spec(mcore):
    """with_moerail_dispatcher swaps MoELayer for a subclass that applies use_moerail (the layer
    itself is tested on gloo ranks); the given spec is not modified."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    new = mi.with_moerail_dispatcher(spec, ranks_per_node=2, strategy="dedup")

    def layer_cls(s):
        mlp = s.submodules.mlp
        return mlp.func if isinstance(mlp, functools.partial) else mlp.module

    assert layer_cls(spec) is MoELayer, "the given spec is not modified"
    cls = layer_cls(new)
    assert cls is not MoELayer and issubclass(cls, MoELayer) and cls.__name__ == "MoerailMoELayer"
    assert new.submodules.self_attention is spec.submodules.self_attention, "unchanged branches are shared"
    with pytest.raises(ValueError, match="no MoELayer"):
        mi.with_moerail_dispatcher(get_gpt_layer_local_spec())


def test_update_expert_bias_without_distributed():
    class Router(torch.nn.Module):
        def __init__(self, counts, bias):
            super().__init__()
            self.register_buffer("local_tokens_per_expert", torch.tensor(counts, dtype=torch.float32))
            self.register_buffer("expert_bias", torch.tensor(bias, dtype=torch.float32))

    model = torch.nn.Sequential(Router([1, 5, 3, 3], [0, 0, 0.5, 0]), torch.nn.Linear(2, 2), Router([4, 4, 4, 4], [1, 2, 3, 4]))
    assert mi.update_expert_bias(model, 0.1) == 2
    torch.testing.assert_close(model[0].expert_bias, torch.tensor([0.1, -0.1, 0.5, 0.0]))
    torch.testing.assert_close(model[2].expert_bias, torch.tensor([1.0, 2, 3, 4]))
    assert not model[0].local_tokens_per_expert.any()
    assert mi.update_expert_bias(torch.nn.Linear(2, 2), 0.1) == 0


def test_wrappers_keep_megatron_metadata(mcore):
    with mi.moe_utils_patched() as info:
        for n, w in info.wrappers.items():
            orig = info.originals[n]
            assert w.__name__ == orig.__name__ and w.__doc__ == orig.__doc__ and w.__wrapped__ is orig
    assert info.sites


def test_use_moerail_refuses_chunks_with_expert_bias_before_touching_the_layer():
    """The chunked pipeline combines expert outputs without a bias (Megatron's alltoall dispatcher
    refuses one too): a layer with add_bias_linear=True is refused by name, and left as it was."""
    from moerail.integrations.megatron import use_moerail

    dispatcher, router = object(), object()
    layer = types.SimpleNamespace(token_dispatcher=dispatcher, router=router,
                                  config=types.SimpleNamespace(add_bias_linear=True, num_moe_experts=8))
    with pytest.raises(ValueError, match="num_chunks"):
        use_moerail(layer, num_chunks=2)
    assert layer.token_dispatcher is dispatcher and layer.router is router
