"""moerail.plan_all_to_all (issue 3): the planner's splits, stage matrices, bytes and cost.

References: Megatron-Core's MoEAlltoAllTokenDispatcher split formulas (``preprocess``:
``input_splits = tokens_per_expert.reshape(ep, L).sum(1)``, ``num_global_tokens_per_local_expert
= all_gathered[:, local experts]``, ``output_splits = its row sums``), brute-force counting of
the routed tokens for the token-level strategies, and the alpha-beta formula written out here."""

from __future__ import annotations

import math
import time

import pytest
import torch

import moerail
from moerail.ep.plan import _compact


def _maps(w, t, e, k, seed=0, skew=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _r in range(w):
        logits = torch.randn(t, e, generator=g)
        if skew:
            logits[:, :skew] += 2.0
        out.append(moerail.topk_route(logits, k)[1])
    return out


def _dest_slots(maps, placement=None):
    e = maps[0].shape[1]
    phy = torch.arange(e) if placement is None else torch.as_tensor(placement)
    log2phy, logcnt = moerail.log2phy_from_phy2log(phy.view(1, -1), e)
    return [moerail.select_replicas(_compact(m), log2phy[0], logcnt[0], phy.numel(), offset=i)
            for i, m in enumerate(maps)]


@pytest.mark.parametrize("w,rpn,e,k", [(4, 2, 8, 2), (8, 4, 32, 8), (8, 1, 16, 4), (4, 4, 12, 3)])
def test_flat_splits_are_megatrons(w, rpn, e, k):
    maps = _maps(w, 40, e, k, seed=w + e)
    plan = moerail.plan_all_to_all(ranks_per_node=rpn, routing_maps=maps, hidden_size=16, strategy="flat")
    loc = e // w
    gathered = torch.stack([m.sum(0) for m in maps])  # [ep, E]: Megatron's all-gathered tokens_per_expert
    for rank in range(w):
        inp, outp, ngtple = plan.megatron_splits(rank)
        assert inp == gathered[rank].view(w, loc).sum(1).tolist()
        ref = gathered[:, rank * loc : (rank + 1) * loc]
        assert torch.equal(ngtple, ref)
        assert outp == ref.sum(1).tolist()


def _pairs(slots, w, loc, rpn):
    """Brute force: (copies to each rank, tokens with a slot on each rank / node) per source."""
    copies = torch.zeros(w, w, dtype=torch.int64)
    tok_rank = torch.zeros(w, w, dtype=torch.int64)
    tok_node = torch.zeros(w, w // rpn, dtype=torch.int64)
    for src, s in enumerate(slots):
        for row in s.tolist():
            ranks = [x // loc for x in row if x >= 0]
            for r in ranks:
                copies[src, r] += 1
            for r in set(ranks):
                tok_rank[src, r] += 1
            for n in {r // rpn for r in ranks}:
                tok_node[src, n] += 1
    return copies, tok_rank, tok_node


@pytest.mark.parametrize("placement", [None, [5, 2, 7, 0, 3, 6, 1, 4, 9, 8, 11, 10, 13, 12, 15, 14],
                                       [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 0, 2, 3, 1]])
def test_stage_matrices_and_bytes(placement):
    w, rpn, e, k, h = 4, 2, 16 if placement is None or len(set(placement)) == 16 else 10, 4, 32
    maps = _maps(w, 50, e, k, seed=3, skew=3)
    slots = _dest_slots(maps, placement)
    loc = 16 // w
    copies, tok_rank, tok_node = _pairs(slots, w, loc, rpn)
    plan = moerail.plan_all_to_all(ranks_per_node=rpn, routing_maps=maps, hidden_size=h, dtype=torch.float32,
                                   placement=placement)
    st = plan.stages
    assert torch.equal(st["flat"][0][1], copies)
    node_of = torch.arange(w) // rpn
    # 2dh: the same copies cross the network, in messages between ranks of one local rank.
    a, b = st["2dh"][0][1], st["2dh"][1][1]
    assert a.sum() == b.sum() == copies.sum()
    for s in range(w):
        for d in range(w):
            if a[s, d]:
                assert node_of[s] == node_of[d]
            if b[s, d]:
                assert s % rpn == d % rpn
    # dedup: once per destination node, then once per destination rank.
    d1, d2 = st["dedup"][0][1], st["dedup"][1][1]
    for s in range(w):
        for n in range(w // rpn):
            assert d1[s, n * rpn + s % rpn] == tok_node[s, n]
    assert d2.sum() == tok_rank.sum()
    # allgather: every token to every node.
    g1 = st["allgather"][0][1]
    assert g1.sum() == 50 * w * (w // rpn)
    # Bytes between nodes of the dispatch, from the row formats.
    tr = plan.traffic
    row_copy = h * 4 + 4  # hidden + one fp32 weight
    inter_copies = sum(int(copies[s, d]) for s in range(w) for d in range(w) if node_of[s] != node_of[d])
    assert tr["flat"]["dispatch"]["inter_node_bytes"] == inter_copies * row_copy
    assert tr["2dh"]["dispatch"]["inter_node_bytes"] == inter_copies * row_copy
    ent = plan.entries
    row_tok = h * 4 + 8 * ent  # hidden + fp32 weights + int32 slot ids of `entries`
    remote_tokens = sum(int(tok_node[s, n]) for s in range(w) for n in range(w // rpn) if n != node_of[s])
    assert tr["dedup"]["dispatch"]["inter_node_rows"] == remote_tokens
    assert tr["dedup"]["dispatch"]["inter_node_bytes"] == remote_tokens * row_tok
    assert tr["dedup"]["combine"]["inter_node_bytes"] == remote_tokens * h * 4
    assert tr["flat"]["combine"]["inter_node_bytes"] == inter_copies * h * 4


def _alpha_beta(rows, rpn, row_bytes, lk):
    """The cost of one stage: per rank, intra and inter links in parallel (bytes = the larger of
    sent and received), plus a latency per message and the local copies; the slowest rank."""
    w = rows.shape[0]
    node = torch.arange(w) // rpn
    worst = 0.0
    for r in range(w):
        same = node == node[r]
        other = ~same
        own = torch.zeros(w, dtype=torch.bool)
        own[r] = True
        si, so = rows[r][same & ~own], rows[r][other]
        ri, ro = rows[:, r][same & ~own], rows[:, r][other]
        intra = max(int(si.sum()), int(ri.sum()))
        inter = max(int(so.sum()), int(ro.sum()))
        msg_i = max(int((si != 0).sum()), int((ri != 0).sum()))
        msg_o = max(int((so != 0).sum()), int((ro != 0).sum()))
        local = int(rows[r].sum()) + int(rows[:, r].sum())
        t = (max(intra * row_bytes / lk.intra_node_bw, inter * row_bytes / lk.inter_node_bw)
             + msg_i * lk.latency + msg_o * (lk.inter_node_latency or lk.latency) + local * row_bytes / lk.local_bw)
        worst = max(worst, t)
    return worst


def test_cost_model_is_alpha_beta_and_auto_takes_the_cheapest():
    lk = moerail.LinkModel(intra_node_bw=100e9, inter_node_bw=5e9, latency=10e-6, inter_node_latency=30e-6)
    maps = _maps(8, 256, 32, 8, seed=11)
    plan = moerail.plan_all_to_all(ranks_per_node=4, routing_maps=maps, hidden_size=1024, link=lk)
    for s, stages in plan.stages.items():
        for ps in ("dispatch", "combine"):
            tr = plan.traffic[s][ps]
            order = stages if ps == "dispatch" else stages[::-1]
            ref = [_alpha_beta(m if ps == "dispatch" else m.t(), 4, tr["row_bytes"], lk) for _, m in order]
            assert tr["stage_seconds"] == pytest.approx(ref, rel=1e-12)
        assert plan.estimates[s] == pytest.approx(plan.traffic[s]["dispatch"]["seconds"]
                                                  + plan.traffic[s]["combine"]["seconds"], rel=1e-12)
    assert plan.strategy == min(plan.estimates, key=plan.estimates.get)
    # k = 8 over 32 experts on 2 nodes with a slow network: dedup sends fewer inter-node bytes.
    assert plan.traffic["dedup"]["dispatch"]["inter_node_bytes"] < plan.traffic["flat"]["dispatch"]["inter_node_bytes"]
    assert plan.strategy == "dedup"
    # One node: nothing crosses the network; dedup still sends a token once per rank (not once
    # per expert), and auto still takes the cheapest.
    one = moerail.plan_all_to_all(ranks_per_node=8, routing_maps=maps, hidden_size=1024, link=lk)
    assert all(one.traffic[s]["dispatch"]["inter_node_bytes"] == 0 for s in one.stages)
    assert one.strategy == min(one.estimates, key=one.estimates.get)


def test_counts_only_estimate():
    maps = _maps(4, 64, 16, 4, seed=5)
    tpe = torch.stack([m.sum(0) for m in maps])
    exact = moerail.plan_all_to_all(ranks_per_node=2, routing_maps=maps, hidden_size=8)
    est = moerail.plan_all_to_all(ranks_per_node=2, tokens_per_expert=tpe, num_tokens=[64] * 4, hidden_size=8)
    assert torch.equal(est.slot_counts, exact.slot_counts)
    assert torch.equal(est.stages["flat"][0][1], exact.stages["flat"][0][1])
    # Token-level counts are estimates: within the bounds any routing satisfies.
    assert bool((est.rank_tokens <= est.stages["flat"][0][1]).all())
    assert bool((est.node_tokens <= 64).all())
    # Replicas: counts spread as select_replicas spreads them.
    pl = list(range(16)) + [0, 1, 2, 3]
    pl = pl[:16]
    rep = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 0, 2]
    maps12 = _maps(4, 64, 12, 3, seed=6)
    tpe12 = torch.stack([m.sum(0) for m in maps12])
    ex = moerail.plan_all_to_all(ranks_per_node=2, routing_maps=maps12, hidden_size=8, placement=rep)
    es = moerail.plan_all_to_all(ranks_per_node=2, tokens_per_expert=tpe12, num_tokens=[64] * 4, hidden_size=8,
                                 placement=rep)
    assert torch.equal(ex.slot_counts, es.slot_counts)


def test_planning_speed_deepep_size():
    """T=4096, k=8, 256 experts over EP=64 (8 nodes of 8): the layout of one rank's tokens and
    the plans of all four strategies from the gathered counts (printed; make bench records it)."""
    w, t, e, k = 64, 4096, 256, 8
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices.sort(dim=1).values
    vec = torch.zeros(4 + e + w + w // 8, dtype=torch.int64)
    moerail._native.ep.a2a_counts(idx, w, 8, e // w, 0, 0, vec)
    gathered = vec.repeat(w, 1)
    from moerail.ep.plan import _make_plan

    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        moerail._native.ep.a2a_counts(idx, w, 8, e // w, 0, 0, vec)
        best = min(best, time.perf_counter() - t0)
    p0 = time.perf_counter()
    _make_plan(gathered, w, 8, e // w, "auto", 7168, 2, True, None)
    print(f"\nlayout of 4096 x 8 on EP=64: {best * 1e6:.1f} us; four plans: {(time.perf_counter() - p0) * 1e6:.0f} us")


@pytest.mark.parametrize("kwargs,match", [
    (dict(ranks_per_node=3), "ranks_per_node"),
    (dict(ranks_per_node=2, placement=[0, 1, 2]), "placement"),
    (dict(ranks_per_node=2, placement=[0, 1, 2, 3, 4, 5, 6, 6]), "phy2log"),
    (dict(ranks_per_node=2, strategy="ring"), "strategy"),
    (dict(ranks_per_node=2, hidden_size=0), "hidden_size"),
])
def test_bad_arguments(kwargs, match):
    maps = _maps(4, 8, 8, 2)
    args = dict(routing_maps=maps, hidden_size=8)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        moerail.plan_all_to_all(**args)


def test_bad_counts():
    with pytest.raises(ValueError, match="routing_maps / tokens_per_expert"):
        moerail.plan_all_to_all(ranks_per_node=2, hidden_size=8)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        moerail.plan_all_to_all(ranks_per_node=2, hidden_size=8, tokens_per_expert=torch.tensor([[5, -1], [0, 0]]),
                                num_tokens=[5, 5])
    with pytest.raises(ValueError, match="num_tokens"):
        moerail.plan_all_to_all(ranks_per_node=2, hidden_size=8, tokens_per_expert=torch.ones(2, 2, dtype=torch.int64),
                                num_tokens=[5])


@pytest.mark.parametrize("strategy", ["auto", "flat", "2dh", "dedup", "allgather"])
def test_route_pass_layout_is_the_chosen_plans(strategy):
    """A dispatch reads only the chosen plan's row layout of each pass (``Route.pass_layout``);
    every candidate's plan (``Route.plans``) is built only when asked for. Both say the same."""
    from moerail.ep.plan import _links, _strategies

    w, rpn, e, t, k = 8, 4, 32, 64, 4
    maps = _maps(w, t, e, k, seed=3)
    slots = _dest_slots(maps)
    vecs = []
    for s in slots:
        v = torch.zeros(4 + e + w + w // rpn, dtype=torch.int64)
        moerail._native.ep.a2a_counts(s, w, rpn, e // w, 0, 0, v, False)
        vecs.append(v)
    gathered = torch.stack(vecs)
    route = moerail._native.ep.a2a_route(gathered, slots[1], 1, rpn, e // w, _strategies(strategy), 64, 2, True,
                                         _links(None))
    plans = route.plans
    chosen = plans["plans"][plans["best"]]
    assert chosen["strategy"] == route.strategy.name
    if strategy != "auto":
        assert route.strategy.name == strategy
    for pass_ in ("dispatch", "dispatch_backward", "combine", "combine_backward"):
        assert route.pass_layout(pass_) == chosen["passes"][pass_]
    with pytest.raises(ValueError, match="pass_: expected dispatch"):
        route.pass_layout("forward")
