"""moerail.rank_groups against Megatron-Core's own rank generation.

Two references, both Megatron-Core's code (pure Python, runs on CPU):

* ``megatron.core.parallel_state.RankGenerator`` for every group kind, built exactly as
  ``initialize_model_parallel`` builds its two generators (attention: ep = 1; experts: cp = 1);
* ``initialize_model_parallel`` itself, run with ``torch.distributed`` stubbed so that
  ``new_group`` records the ranks and ``group_desc`` of every group it creates: moerail must
  list the same groups, kind by kind, in the same order.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import warnings
from unittest import mock

import pytest
import torch

import moerail

# Run again by `make test` against megatron-core 0.19 (MOERAIL_MEGATRON_PATH).
pytestmark = pytest.mark.megatron

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps

HAVE_EINOPS = importlib.util.find_spec("einops") is not None

# moerail's kind -> (generator, Megatron token)
ATTENTION_TOKENS = {
    "tp": "tp",
    "cp": "cp",
    "dp": "dp",
    "pp": "pp",
    "dp-cp": "dp-cp",
    "tp-cp": "tp-cp",
    "tp-dp": "tp-dp",
    "tp-dp-cp": "tp-dp-cp",
    "tp-pp": "tp-pp",
}
EXPERT_TOKENS = {"ep": "ep", "etp": "tp", "edp": "dp", "tp-ep": "tp-ep", "tp-ep-pp": "tp-ep-pp"}

# Megatron's group_desc -> moerail's kind
DESC_TO_KIND = {
    "DATA_PARALLEL_GROUP_WITH_CP": "dp-cp",
    "INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP": "intra-partial-dp-cp",
    "DATA_PARALLEL_GROUP": "dp",
    "CONTEXT_PARALLEL_GROUP": "cp",
    "MODEL_PARALLEL_GROUP": "tp-pp",
    "TENSOR_MODEL_PARALLEL_GROUP": "tp",
    "PIPELINE_MODEL_PARALLEL_GROUP": "pp",
    "EMBEDDING_GROUP": "embedding",
    "POSITION_EMBEDDING_GROUP": "position-embedding",
    "TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP": "tp-dp-cp",
    "TENSOR_AND_DATA_PARALLEL_GROUP": "tp-dp",
    "TENSOR_AND_CONTEXT_PARALLEL_GROUP": "tp-cp",
    "EXPERT_MODEL_PARALLEL_GROUP": "ep",
    "EXPERT_TENSOR_PARALLEL_GROUP": "etp",
    "EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP": "tp-ep",
    "EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP": "tp-ep-pp",
    "EXPERT_DATA_PARALLEL_GROUP": "edp",
    "INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP": "intra-dist-opt-instance",
    "HIERARCHICAL_EXPERT_DATA_PARALLEL_GROUP_L0": "intra-partial-edp",
    "HIERARCHICAL_EXPERT_DATA_PARALLEL_GROUP_L1": "inter-partial-edp",
}
# megatron-core >= 0.19 also builds groups for GTP weight rematerialization (not modelled by
# moerail). At its default size 1 they are singletons, and the "with GTP" variants repeat the
# groups above: checked as such.
GTP_SINGLETONS = {"GTP_WEIGHT_REMAT_GROUP", "EXPERT_GTP_WEIGHT_REMAT_GROUP"}
GTP_SAME_AS = {
    "DATA_PARALLEL_GROUP_WITH_GTP_REMAT": "dp",
    "DATA_PARALLEL_GROUP_WITH_CP_WITH_GTP_REMAT": "dp-cp",
    "EXPERT_DATA_PARALLEL_GROUP_WITH_GTP_REMAT": "edp",
    "EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP_WITH_EGTP": "tp-ep-pp",
}


def _layouts():
    """Valid layouts over 8..256 ranks: (world, tp, cp, pp, ep, etp)."""
    out = []
    sizes = (1, 2, 4, 8)
    for world in (8, 16, 32, 64, 128, 256):
        for tp, cp, pp, ep, etp in itertools.product(sizes, (1, 2), (1, 2, 4, 8), sizes, (1, 2, 4)):
            if world % (tp * cp * pp) or world % (etp * ep * pp):
                continue
            out.append((world, tp, cp, pp, ep, etp))
    # Keep the suite quick: every layout up to 32 ranks, a spread of the larger ones.
    small = [x for x in out if x[0] <= 32]
    large = [x for x in out if x[0] > 32][::7]
    return small + large


LAYOUTS = _layouts()
FOLDING = [
    # The MoE Parallel Folding paper's layouts (arXiv 2504.14960).
    (128, 2, 1, 8, 8, 1),  # Mixtral-8x22B folded
    (128, 2, 1, 8, 4, 2),  # Mixtral-8x22B coupled
    (64, 2, 1, 4, 4, 1),  # Qwen2-57B-A14B folded
    (64, 2, 1, 4, 4, 2),  # Qwen2-57B-A14B coupled
    (64, 1, 8, 1, 8, 1),  # CP folded with EP (README of megatron/core/transformer/moe)
    (256, 2, 2, 4, 32, 1),
]


@pytest.mark.parametrize("layout", FOLDING + LAYOUTS, ids=lambda x: "w{}-tp{}-cp{}-pp{}-ep{}-etp{}".format(*x))
def test_every_kind_matches_rank_generator(layout):
    world, tp, cp, pp, ep, etp = layout
    order = "tp-cp-ep-dp-pp"
    got = moerail.rank_groups(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    dp = world // (tp * cp * pp)
    edp = world // (etp * ep * pp)
    attn = ps.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    expert = ps.RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order=order)
    for kind, token in ATTENTION_TOKENS.items():
        assert got[kind] == attn.get_ranks(token), kind
    for kind, token in EXPERT_TOKENS.items():
        assert got[kind] == expert.get_ranks(token), kind


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "tp-ep-cp-dp-pp", "cp-tp-ep-dp-pp", "tp-dp-pp", "TP-CP-EP-DP-PP"])
def test_orders_match_rank_generator(order):
    world, tp, pp, ep, etp = 64, 2, 2, 4, 1
    cp = 1 if "cp" not in order.lower() else 2
    if "ep" not in order.lower():
        ep, etp = 1, tp
    got = moerail.rank_groups(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
    dp = world // (tp * cp * pp)
    attn = ps.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    expert = ps.RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order=order)
    for kind, token in ATTENTION_TOKENS.items():
        assert got[kind] == attn.get_ranks(token), kind
    for kind, token in EXPERT_TOKENS.items():
        assert got[kind] == expert.get_ranks(token), kind


def _megatron_groups(world, tp, cp, pp, ep, etp, order="tp-cp-ep-dp-pp", instances=1, hcp=None):
    """Runs Megatron's initialize_model_parallel with torch.distributed stubbed; returns
    {group_desc: [ranks, ...]} of every (non-gloo) group it creates."""
    recorded = collections.OrderedDict()

    def new_group(ranks=None, backend=None, group_desc=None, **kwargs):
        if backend != "gloo":
            recorded.setdefault(group_desc, []).append(list(ranks))
        return object()

    with mock.patch.object(torch.distributed, "is_initialized", lambda: True), mock.patch.object(
        torch.distributed, "get_world_size", lambda *a, **k: world
    ), mock.patch.object(torch.distributed, "get_rank", lambda *a, **k: 0), mock.patch.object(
        torch.distributed, "new_group", new_group
    ):
        try:
            ps.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                context_parallel_size=cp,
                expert_model_parallel_size=ep,
                expert_tensor_parallel_size=etp,
                num_distributed_optimizer_instances=instances,
                hierarchical_context_parallel_sizes=hcp,
                order=order,
                create_gloo_process_groups=False,
            )
        finally:
            ps.destroy_model_parallel()
    return recorded


def _compare_with_initialize(world, tp, cp, pp, ep, etp, order="tp-cp-ep-dp-pp", instances=1, hcp=None):
    ref = _megatron_groups(world, tp, cp, pp, ep, etp, order, instances, hcp)
    got = moerail.rank_groups(
        world,
        tp=tp,
        cp=cp,
        pp=pp,
        ep=ep,
        etp=etp,
        order=order,
        num_distributed_optimizer_instances=instances,
        hierarchical_context_parallel_sizes=hcp,
    )
    mapped = {}
    for desc, groups in ref.items():
        if desc in GTP_SINGLETONS:
            assert groups == [[r] for r in range(world)], desc
            continue
        if desc in GTP_SAME_AS:
            assert groups == got[GTP_SAME_AS[desc]], desc
            continue
        if desc.startswith("HIERARCHICAL_CONTEXT_PARALLEL_GROUP_L"):
            kind = "hierarchical-cp-" + desc.rsplit("L", 1)[1]
        else:
            kind = DESC_TO_KIND[desc]
        mapped[kind] = groups
    assert sorted(mapped) == sorted(got), (sorted(mapped), sorted(got))
    for kind, groups in mapped.items():
        assert got[kind] == groups, kind


@pytest.mark.parametrize("layout", FOLDING + LAYOUTS[::5], ids=lambda x: "w{}-tp{}-cp{}-pp{}-ep{}-etp{}".format(*x))
def test_all_groups_match_initialize_model_parallel(layout):
    _compare_with_initialize(*layout)


def test_folding_tp2_cp1_pp8_ep8_etp1_on_128():
    """The paper's folded Mixtral layout: experts of a layer stay inside one node of 8."""
    _compare_with_initialize(128, 2, 1, 8, 8, 1)
    g = moerail.rank_groups(128, tp=2, cp=1, pp=8, ep=8, etp=1)
    assert all(len({r // 8 for r in grp}) == 1 for grp in g["ep"])
    assert len(g["edp"]) == 64 and all(len(x) == 2 for x in g["edp"])
    assert len(g["dp"]) == 16 and all(len(x) == 8 for x in g["dp"])


@pytest.mark.skipif(not HAVE_EINOPS, reason="einops is not installed: Megatron's hierarchical groups need it")
@pytest.mark.parametrize(
    "layout,instances,hcp",
    [((64, 2, 1, 2, 4, 1), 2, None), ((64, 1, 4, 2, 8, 1), 2, [2, 2]), ((128, 2, 2, 2, 8, 1), 4, [2, 1])],
)
def test_partial_distributed_optimizer_and_hierarchical_cp(layout, instances, hcp):
    _compare_with_initialize(*layout, instances=instances, hcp=hcp)


def test_pp_not_last_order():
    # Megatron allows a non-pp-last order when the attention and expert dp match.
    _compare_with_initialize(32, 2, 1, 2, 1, 2, order="tp-cp-ep-pp-dp")


def _megatron_rejects(*args, **kwargs):
    try:
        _megatron_groups(*args, **kwargs)
    except (AssertionError, RuntimeError, ValueError):
        return True
    return False


@pytest.mark.parametrize(
    "args,kwargs,arg",
    [
        ((100, 2, 1, 8, 8, 1), {}, "world_size"),
        ((128, 2, 1, 8, 32, 1), {}, "world_size"),
        ((32, 2, 1, 2, 4, 1), {"order": "tp-cp-ep-pp-dp"}, "order"),
    ],
)
def test_invalid_layouts_rejected_like_megatron(args, kwargs, arg):
    assert _megatron_rejects(*args, **kwargs)
    world, tp, cp, pp, ep, etp = args
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        moerail.rank_groups(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, **kwargs)


@pytest.mark.parametrize(
    "call,exc,arg",
    [
        (lambda: moerail.rank_groups("8"), TypeError, "world_size"),
        (lambda: moerail.rank_groups(8, tp=0), ValueError, "tp"),
        (lambda: moerail.rank_groups(8, tp=2.0), TypeError, "tp"),
        (lambda: moerail.rank_groups(8, ep=-1), ValueError, "ep"),
        (lambda: moerail.rank_groups(8, tp=2, order="tp-xp-dp-pp"), ValueError, "order"),
        (lambda: moerail.rank_groups(8, tp=2, order="tp-tp-dp-pp"), ValueError, "order"),
        (lambda: moerail.rank_groups(8, tp=2, cp=2, order="tp-dp-pp"), ValueError, "order"),
        (lambda: moerail.rank_groups(8, tp=2, order=3), TypeError, "order"),
        (lambda: moerail.rank_groups(8, tp=2, num_distributed_optimizer_instances=3), ValueError, "num_distributed_optimizer_instances"),
        (lambda: moerail.rank_groups(8, cp=4, hierarchical_context_parallel_sizes=[3]), ValueError, "hierarchical_context_parallel_sizes"),
    ],
)
def test_bad_arguments_name_the_argument(call, exc, arg):
    with pytest.raises(exc, match=rf"^{arg}:"):
        call()
