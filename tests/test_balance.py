"""Expert load statistics and placement (issue 4), against plain references:

* placement: ``balance_reference.rebalance_experts`` (our numpy implementation of DeepSeek's
  published EPLB algorithm) and the expected output printed in EPLB's README;
* metrics and predictors: the plain numpy definitions, computed here;
* migration: replaying the transfer list, brute force over device permutations, the link model
  recomputed in Python; replica choice: a plain Python loop.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import moerail
from moerail import balance

sys.path.insert(0, os.path.dirname(__file__))
import balance_reference as ref  # noqa: E402

# ------------------------------------------------------------------------------------------------
# load generators (continuous values: ties have probability zero)
# ------------------------------------------------------------------------------------------------


def uniform_loads(rng, layers, experts):
    return rng.uniform(1.0, 1000.0, size=(layers, experts))


def lognormal_loads(rng, layers, experts, sigma=1.5):
    return rng.lognormal(mean=5.0, sigma=sigma, size=(layers, experts))


def zipf_loads(rng, layers, experts, s=1.2):
    """Expert of popularity rank r gets ~ 1 / r^s, ranks shuffled per layer, with noise."""
    out = np.empty((layers, experts))
    for layer in range(layers):
        ranks = rng.permutation(experts) + 1
        out[layer] = 1e5 / ranks**s * rng.uniform(0.8, 1.2, size=experts)
    return out


GENERATORS = {"uniform": uniform_loads, "lognormal": lognormal_loads, "zipf": zipf_loads}

# (experts, replicas, groups, nodes, gpus): hierarchical (groups % nodes == 0) and global
CONFIGS = [
    (12, 16, 4, 2, 8),  # the README's
    (64, 80, 8, 4, 16),
    (64, 72, 4, 4, 8),
    (60, 64, 6, 2, 8),
    (32, 64, 4, 2, 8),  # 2 slots per expert
    (48, 48, 4, 2, 8),  # no redundancy
    (64, 72, 4, 3, 6),  # global: 4 groups on 3 nodes
    (256, 288, 8, 18, 144),  # global: 288 slots on 144 GPUs
    (256, 288, 8, 4, 32),  # DeepSeek-V3-like, hierarchical
    (40, 48, 5, 2, 8),  # global: 5 groups on 2 nodes
]


def is_hierarchical(cfg):
    return cfg[2] % cfg[3] == 0


# ------------------------------------------------------------------------------------------------
# EPLB mode == the published algorithm
# ------------------------------------------------------------------------------------------------

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_readme_example():
    phy2log, log2phy, logcnt = moerail.rebalance_experts(torch.tensor(README_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    r_phy2log, r_log2phy, r_logcnt = ref.rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)
    assert r_phy2log.tolist() == README_PHY2LOG  # the reference reproduces the README too
    assert torch.equal(log2phy, torch.from_numpy(r_log2phy))
    assert torch.equal(logcnt, torch.from_numpy(r_logcnt))
    check_consistent(phy2log, log2phy, logcnt, (12, 16, 4, 2, 8), "eplb")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "E{}-R{}-g{}-n{}-G{}".format(*c))
@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_eplb_equals_reference(cfg, kind):
    experts, replicas, groups, nodes, gpus = cfg
    rng = np.random.default_rng(zlib.crc32(repr((cfg, kind)).encode()))
    layers = 3 if experts > 64 else 6
    w = GENERATORS[kind](rng, layers, experts)
    phy2log, log2phy, logcnt = moerail.rebalance_experts(torch.from_numpy(w), replicas, groups, nodes, gpus)
    r_phy2log, r_log2phy, r_logcnt = ref.rebalance_experts(w, replicas, groups, nodes, gpus)
    np.testing.assert_array_equal(phy2log.numpy(), r_phy2log)
    np.testing.assert_array_equal(logcnt.numpy(), r_logcnt)
    np.testing.assert_array_equal(log2phy.numpy(), r_log2phy)
    check_consistent(phy2log, log2phy, logcnt, cfg, "eplb")


def test_eplb_accepts_integer_and_float32_loads():
    w = torch.tensor(README_WEIGHT)
    for dt in (torch.int32, torch.float32, torch.float64):
        assert moerail.rebalance_experts(w.to(dt), 16, 4, 2, 8)[0].tolist() == README_PHY2LOG
    assert moerail.rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)[0].tolist() == README_PHY2LOG


# ------------------------------------------------------------------------------------------------
# consistency of every output
# ------------------------------------------------------------------------------------------------


def check_consistent(phy2log, log2phy, logcnt, cfg, mode):
    experts, replicas, groups, nodes, gpus = cfg
    layers = phy2log.shape[0]
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (layers, replicas) and logcnt.shape == (layers, experts)
    assert log2phy.shape == (layers, experts, int(logcnt.max()))
    p = phy2log.numpy()
    assert p.min() >= 0 and p.max() < experts
    for layer in range(layers):
        cnt = np.bincount(p[layer], minlength=experts)
        np.testing.assert_array_equal(cnt, logcnt[layer].numpy())
        assert cnt.min() >= 1, "every expert needs a replica"
        for e in range(experts):
            slots = log2phy[layer, e].numpy()
            c = cnt[e]
            assert (slots[c:] == -1).all()
            assert sorted(slots[:c].tolist()) == np.flatnonzero(p[layer] == e).tolist()
        if is_hierarchical(cfg):
            # each group's replicas sit in one node, and each node holds whole groups
            group = p[layer] // (experts // groups)
            node = np.arange(replicas) // (replicas // nodes)
            for g in range(groups):
                assert len(set(node[group == g].tolist())) == 1, f"{mode}: group {g} split over nodes"
    # equal slot counts per GPU hold by construction: R slots, R / G per device


# ------------------------------------------------------------------------------------------------
# refine: never worse, closer to the bound
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "E{}-R{}-g{}-n{}-G{}".format(*c))
@pytest.mark.parametrize("kind", ["lognormal", "zipf"])
def test_refine_never_worse(cfg, kind):
    experts, replicas, groups, nodes, gpus = cfg
    rng = np.random.default_rng(1 + zlib.crc32(repr((cfg, kind)).encode()))
    layers = 4 if experts > 64 else 8
    w = GENERATORS[kind](rng, layers, experts)
    e_phy2log, _, _ = moerail.rebalance_experts(w, replicas, groups, nodes, gpus, mode="eplb")
    phy2log, log2phy, logcnt = moerail.rebalance_experts(w, replicas, groups, nodes, gpus, mode="refine")
    check_consistent(phy2log, log2phy, logcnt, cfg, "refine")
    mean = w.sum(1) / gpus
    eplb_ratio = ref.device_loads(w, e_phy2log.numpy(), gpus).max(1) / mean
    refine_ratio = ref.device_loads(w, phy2log.numpy(), gpus).max(1) / mean
    bound = np.array([max(1.0, ref.min_max_replica_load(w[i], replicas) / mean[i]) for i in range(layers)])
    assert (refine_ratio <= eplb_ratio * (1 + 1e-12)).all()
    assert (refine_ratio >= bound * (1 - 1e-9)).all()


def test_refine_gets_closer_to_the_bound_on_zipf():
    rng = np.random.default_rng(5)
    w = zipf_loads(rng, 16, 64)
    gap = {}
    for mode in ("eplb", "refine"):
        p, _, _ = moerail.rebalance_experts(w, 80, 8, 4, 16, mode=mode)
        m = moerail.placement_metrics(w, p, 16, 4)
        gap[mode] = float((m["max_mean_device"] - m["lower_bound"]).sum())
    assert gap["refine"] < gap["eplb"]


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(3)
    w = torch.from_numpy(zipf_loads(rng, 20, 64))
    old, _, _ = moerail.rebalance_experts(torch.from_numpy(zipf_loads(rng, 20, 64)), 80, 8, 4, 16)
    hist = torch.from_numpy(rng.poisson(50, size=(40, 20 * 64)).astype(np.float64))
    idx = torch.from_numpy(rng.integers(0, 64, size=(20000, 4)))
    n = moerail.get_num_threads()
    try:
        outs = []
        for t in (1, 3):
            moerail.set_num_threads(t)
            res = [x for m in ("eplb", "refine") for x in moerail.rebalance_experts(w, 80, 8, 4, 16, mode=m)]
            plan = moerail.plan_migration(old, res[0], 16, 4, expert_bytes=1e6)
            res += [plan.phy2log, plan.transfers, torch.tensor(plan.seconds)]
            res += [moerail.placement_metrics(w, res[0], 16, 4, capacity=10.0)[k] for k in ("device_load", "dropped")]
            pred = torch.empty(hist.shape[1], dtype=torch.float64)
            moerail._native.balance.predict_load(hist, "trend", 0.2, 8, 3, pred)
            res += [pred, torch.tensor(moerail._native.balance.backtest_predictor(hist, "trend", 0.2, 8, 3, 4))]
            res.append(moerail.select_replicas(idx, res[1][0], res[2][0], 80, offset=2))
            outs.append(res)
        for x, y in zip(*outs):
            assert torch.equal(x, y)
    finally:
        moerail.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.ones(12), 16, 4, 2, 8), ValueError, r"^weight: expected a 2-D"),
        ((torch.ones(2, 3, 4), 16, 4, 2, 8), ValueError, r"^weight: expected a 2-D"),
        ((torch.ones(2, 12), 15, 4, 2, 8), ValueError, r"^num_replicas: must be a multiple of num_gpus"),
        ((torch.ones(2, 12), 8, 4, 2, 8), ValueError, r"^num_replicas: must be >= the number of experts"),
        ((torch.ones(2, 12), 16, 5, 2, 8), ValueError, r"^num_groups: must divide"),
        ((torch.ones(2, 12), 16, 4, 3, 8), ValueError, r"^num_gpus: must be a multiple of num_nodes"),
        ((torch.ones(2, 12), 16, 4, 2, 0), ValueError, r"^num_gpus: must be >= 1"),
        ((-torch.ones(2, 12), 16, 4, 2, 8), ValueError, r"^weight: loads must be finite and >= 0, got -1"),
        ((torch.full((2, 12), float("nan")), 16, 4, 2, 8), ValueError, r"^weight: .*NaN"),
        ((torch.full((2, 12), float("inf")), 16, 4, 2, 8), ValueError, r"^weight: .*inf"),
        ((torch.ones(2, 12, dtype=torch.bool), 16, 4, 2, 8), TypeError, r"^weight:"),
        (("nope", 16, 4, 2, 8), TypeError, r"^weight:"),
        ((torch.ones(2, 12), 16.0, 4, 2, 8), TypeError, r"^num_replicas:"),
    ],
)
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        moerail.rebalance_experts(*args)


def test_bad_mode():
    with pytest.raises(ValueError, match=r"^mode: expected one of"):
        moerail.rebalance_experts(torch.ones(2, 12), 16, 4, 2, 8, mode="greedy")


def test_bad_placements_and_loads_elsewhere():
    w = torch.ones(2, 12)
    p = torch.arange(16).remainder(12).repeat(2, 1)
    with pytest.raises(ValueError, match=r"^phy2log: .*expert id 12"):
        moerail.placement_metrics(w, p + 1, 8)
    with pytest.raises(ValueError, match=r"^phy2log: layer 0 has no slot for expert 1:"):
        moerail.placement_metrics(w, torch.zeros(2, 16, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match=r"^load: loads must be finite"):
        moerail.placement_metrics(-w, p, 8)
    with pytest.raises(ValueError, match=r"^num_replicas: must be a multiple of num_gpus"):
        moerail.placement_metrics(w, p, 5)
    with pytest.raises(ValueError, match=r"^new_phy2log: expected shape"):
        moerail.plan_migration(p, p[:, :8], 8, expert_bytes=1.0)
    with pytest.raises(ValueError, match=r"^expert_bytes: expected 2 values"):
        moerail.plan_migration(p, p, 8, expert_bytes=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"^intra_node_bw: must be finite and > 0"):
        moerail.plan_migration(p, p, 8, 2, expert_bytes=1.0, link=moerail.LinkModel(intra_node_bw=0.0))
    with pytest.raises(ValueError, match=r"^seconds_per_token:"):
        moerail.should_migrate(w, p, p, 8, seconds_per_token=-1.0, horizon_steps=1, migration_seconds=0.0)
    t = moerail.LoadTracker(2, 12)
    with pytest.raises(ValueError, match=r"^tokens_per_expert: expected 12"):
        t.record(0, torch.ones(11))
    with pytest.raises(ValueError, match=r"^layer: must be <= 1"):
        t.record(2, torch.ones(12))
    with pytest.raises(ValueError, match=r"^history: no step"):
        t.predict("ema")
    t.record(0, -torch.ones(12))
    with pytest.raises(ValueError, match=r"^tokens_per_expert: recorded counts must be finite and >= 0"):
        t.step()


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------


def test_metrics_against_numpy():
    rng = np.random.default_rng(11)
    layers, experts, replicas, gpus, nodes = 5, 32, 40, 8, 2
    w = lognormal_loads(rng, layers, experts)
    p, _, _ = moerail.rebalance_experts(w, replicas, 1, 1, gpus)
    cap = float(np.median(w)) / 2
    m = moerail.placement_metrics(w, p, gpus, nodes, capacity=cap)
    pn = p.numpy()
    dev = ref.device_loads(w, pn, gpus)
    node = dev.reshape(layers, nodes, -1).sum(-1)
    mean = w.sum(1) / gpus
    np.testing.assert_allclose(m["device_load"].numpy(), dev, rtol=1e-12)
    np.testing.assert_allclose(m["node_load"].numpy(), node, rtol=1e-12)
    np.testing.assert_allclose(m["max_mean_device"].numpy(), dev.max(1) / mean, rtol=1e-12)
    np.testing.assert_allclose(m["max_mean_node"].numpy(), node.max(1) / (w.sum(1) / nodes), rtol=1e-12)
    np.testing.assert_allclose(m["cv_device"].numpy(), dev.std(1) / mean, rtol=1e-9)
    bound = [max(1.0, ref.min_max_replica_load(w[i], replicas) / mean[i]) for i in range(layers)]
    np.testing.assert_allclose(m["lower_bound"].numpy(), bound, rtol=1e-12)
    np.testing.assert_allclose(moerail.lower_bound(w, replicas, gpus).numpy(), bound, rtol=1e-12)
    cnt = np.stack([np.bincount(r, minlength=experts) for r in pn])
    per_slot = np.take_along_axis(w / cnt, pn, axis=1)
    dropped = np.maximum(per_slot - cap, 0).sum(1)
    np.testing.assert_allclose(m["dropped"].numpy(), dropped, rtol=1e-12)
    np.testing.assert_allclose(m["dropped_rate"].numpy(), dropped / w.sum(1), rtol=1e-12)
    s = m["summary"]
    assert math.isclose(s["step_max_mean"], dev.max(1).sum() / mean.sum(), rel_tol=1e-12)
    assert math.isclose(s["dropped_rate"], dropped.sum() / w.sum(), rel_tol=1e-12)
    # the default (Megatron) layout
    d = moerail.default_placement(layers, experts, gpus)
    md = moerail.placement_metrics(w, d, gpus)
    np.testing.assert_allclose(md["device_load"].numpy(), w.reshape(layers, gpus, -1).sum(-1), rtol=1e-12)
    # a layout spread over more slots per device keeps every device's load
    wide = moerail.expand_placement(d, 2 * experts, gpus)
    assert wide.shape == (layers, 2 * experts)
    np.testing.assert_allclose(moerail.placement_metrics(w, wide, gpus)["device_load"].numpy(), md["device_load"].numpy())
    # log2phy of an arbitrary placement
    l2p, lc = moerail.log2phy_from_phy2log(p, experts)
    np.testing.assert_array_equal(lc.numpy(), cnt)
    for layer in range(layers):
        for e in range(experts):
            assert l2p[layer, e, : cnt[layer, e]].tolist() == np.flatnonzero(pn[layer] == e).tolist()


# ------------------------------------------------------------------------------------------------
# predictors
# ------------------------------------------------------------------------------------------------


def np_ema(h, alpha):
    s = h[0].copy()
    for x in h[1:]:
        s = alpha * x + (1 - alpha) * s
    return s


def np_trend(h, window, horizon):
    y = h[-window:]
    n = len(y)
    if n == 1:
        return y[0].copy()
    x = np.arange(n, dtype=np.float64)
    slope, intercept = np.polyfit(x, y.reshape(n, -1), 1)
    xf = np.arange(n, n + horizon, dtype=np.float64).mean()
    return np.maximum(intercept + slope * xf, 0).reshape(y.shape[1:])


def test_predictors_against_numpy():
    rng = np.random.default_rng(2)
    steps, layers, experts = 40, 3, 16
    base = rng.uniform(50, 150, size=(layers, experts))
    slope = rng.uniform(-1, 2, size=(layers, experts))
    t = moerail.LoadTracker(layers, experts, window=32, ema_alpha=0.3, trend_window=10)
    hist = []
    for s in range(steps):
        x = np.maximum(base + slope * s + rng.normal(0, 5, size=base.shape), 0)
        hist.append(x)
        for layer in range(layers):
            t.record(layer, torch.from_numpy(x[layer]))
        rec = t.step()
        assert rec["step"] == s and math.isclose(rec["tokens"], x.sum())
    h = np.stack(hist[-32:])
    np.testing.assert_allclose(t.history.numpy(), h)
    assert t.num_steps == steps
    np.testing.assert_allclose(t.predict("ema").numpy(), np_ema(h, 0.3), rtol=1e-12)
    np.testing.assert_allclose(t.predict("mean").numpy(), h[-10:].mean(0), rtol=1e-12)
    for horizon in (1, 5):
        np.testing.assert_allclose(t.predict("trend", horizon).numpy(), np_trend(h, 10, horizon), rtol=1e-9)
    # backtest: WAPE over every prefix, in numpy
    bt = t.backtest(horizon=2, warmup=4)
    for method, fn in [
        ("ema", lambda p: np_ema(p, 0.3)),
        ("mean", lambda p: p[-10:].mean(0)),
        ("trend", lambda p: np_trend(p, 10, 2)),
    ]:
        err = tot = 0.0
        pts = 0
        for i in range(4, len(h) - 2 + 1):
            actual = h[i : i + 2].mean(0)
            err += np.abs(fn(h[:i]) - actual).sum()
            tot += actual.sum()
            pts += actual.size
        assert math.isclose(bt[method]["wape"], err / tot, rel_tol=1e-9), method
        assert bt[method]["points"] == pts
    assert bt["best"] == min(("ema", "mean", "trend"), key=lambda k: bt[k]["wape"])
    assert bt["best"] == "trend"  # a drifting load: the trend model wins
    np.testing.assert_allclose(t.predict("best", 2).numpy(), np_trend(h, 10, 2), rtol=1e-9)


def test_tracker_accumulates_per_step_and_keeps_a_window():
    t = moerail.LoadTracker(2, 4, window=3)
    for s in range(5):
        t.record(0, torch.tensor([1, 2, 3, 4]) * (s + 1))
        t.record(0, torch.tensor([1, 0, 0, 0]))  # two micro-batches of one step add up
        t.record(1, torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float32))
        t.step()
    h = t.history
    assert h.shape == (3, 2, 4)
    assert h[-1, 0].tolist() == [6.0, 10.0, 15.0, 20.0]
    assert h[0, 0].tolist() == [4.0, 6.0, 9.0, 12.0]
    assert t.trace[-1]["max_mean_expert"][1] == 1.0


def test_tracker_hooks_routers():
    """Megatron-style routers (probs, routing_map) and moerail-style ones (with counts) alike."""

    class MapRouter(torch.nn.Module):  # like Megatron's TopKRouter
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 6))

        def forward(self, x):
            probs, idx = torch.softmax(x @ self.w, -1).topk(2, dim=-1)
            routing_map = torch.zeros(x.shape[0], 6, dtype=torch.bool).scatter(1, idx, True)
            return torch.zeros_like(routing_map, dtype=x.dtype).scatter(1, idx, probs), routing_map

    class CountRouter(MapRouter):  # moerail.topk_route(..., return_tokens_per_expert=True)
        def forward(self, x):
            return moerail.topk_route(x @ self.w, 2, dense_output=True, return_tokens_per_expert=True)

    routers = [MapRouter(), CountRouter()]
    t = moerail.LoadTracker(2, 6)
    handles = t.hook_routers(routers)
    x = torch.randn(50, 8)
    expect = [routers[0](x)[1].sum(0).double(), torch.bincount(routers[1](x)[1].flatten(), minlength=6).double()]
    t._acc.zero_()  # the two calls above were counted too
    for _ in range(3):
        for r in routers:
            r(x)
    with torch.no_grad():  # recomputation / evaluation: not counted
        routers[0](x)
    t.step()
    assert torch.equal(t.history[-1], torch.stack(expect) * 3)
    for h in handles:
        h.remove()


def test_trace_files_and_heatmap(tmp_path):
    rng = np.random.default_rng(4)
    t = moerail.LoadTracker(3, 16)
    p, _, _ = moerail.rebalance_experts(zipf_loads(rng, 3, 16), 20, 4, 2, 4)
    t.set_placement(p, 4, 2)
    hist = []
    for _ in range(6):
        x = rng.poisson(100, size=(3, 16)).astype(np.float64)
        hist.append(x)
        t.record_all(torch.from_numpy(x))
        rec = t.step()
    assert set(rec) >= {"max_mean_device", "max_mean_node", "cv_device", "lower_bound", "summary"}
    m = moerail.placement_metrics(hist[-1], p, 4, 2)
    assert rec["max_mean_device"] == m["max_mean_device"].tolist()
    t.save_trace(str(tmp_path / "t.json"))
    t.save_trace(str(tmp_path / "t.csv"))
    data = json.loads((tmp_path / "t.json").read_text())
    assert len(data["steps"]) == 6 and data["num_experts"] == 16
    mean = np.mean(hist, axis=0)
    for name in ("t.json", "t.csv"):
        np.testing.assert_allclose(balance.load_loads(str(tmp_path / name)).numpy(), mean)
    np.save(tmp_path / "l.npy", mean)
    np.testing.assert_allclose(balance.load_loads(str(tmp_path / "l.npy")).numpy(), mean)
    t.plot_heatmap(str(tmp_path / "h.png"), p, 4, 2)
    t.plot_heatmap(str(tmp_path / "h2.png"), num_gpus=4)
    for name in ("h.png", "h2.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# migration planning and decision
# ------------------------------------------------------------------------------------------------


def replay(old, plan):
    """Applies the transfers to a copy of ``old`` (reading sources before writing)."""
    per = plan.slots_per_gpu
    new = old.clone()
    for layer, expert, sr, ss, dr, ds in plan.transfers.tolist():
        assert int(old[layer, sr * per + ss]) == expert, "the source holds the expert"
        new[layer, dr * per + ds] = expert
    return new


def gpu_multisets(p, gpus):
    per = p.shape[-1] // gpus
    return [sorted(p[g * per : (g + 1) * per].tolist()) for g in range(gpus)]


@pytest.mark.parametrize("keep_nodes", [False, True])
def test_plan_replays_and_is_a_renumbering(keep_nodes):
    rng = np.random.default_rng(8)
    layers, experts, replicas, gpus, nodes = 6, 24, 32, 8, 2
    old, _, _ = moerail.rebalance_experts(lognormal_loads(rng, layers, experts), replicas, 4, 2, gpus)
    new, _, _ = moerail.rebalance_experts(lognormal_loads(rng, layers, experts), replicas, 4, 2, gpus, mode="refine")
    plan = moerail.plan_migration(old, new, gpus, nodes, expert_bytes=3e6, keep_nodes=keep_nodes)
    assert torch.equal(replay(old, plan), plan.phy2log)
    per_node = gpus // nodes
    for layer in range(layers):
        a = gpu_multisets(plan.phy2log[layer], gpus)
        b = gpu_multisets(new[layer], gpus)
        assert sorted(a) == sorted(b), "same devices, renumbered"
        if keep_nodes:
            na = sorted(sorted(sum(a[n * per_node : (n + 1) * per_node], [])) for n in range(nodes))
            nb = sorted(sorted(sum(b[n * per_node : (n + 1) * per_node], [])) for n in range(nodes))
            assert na == nb, "whole nodes renumbered"
    # every transfer is needed: its destination slot held another expert before
    per = plan.slots_per_gpu
    for layer, expert, _, _, dr, ds in plan.transfers.tolist():
        assert int(old[layer, dr * per + ds]) != expert


def test_matching_keeps_the_most_experts_in_place():
    """Brute force over all device renumberings (and in-device slot orders)."""
    rng = np.random.default_rng(9)
    gpus, experts, replicas = 5, 8, 10
    for _ in range(10):
        old = torch.from_numpy(np.concatenate([rng.permutation(experts), rng.integers(0, experts, 2)]))[None]
        new = torch.from_numpy(np.concatenate([rng.permutation(experts), rng.integers(0, experts, 2)]))[None]
        plan = moerail.plan_migration(old, new, gpus, expert_bytes=1.0, keep_nodes=False)
        a, b = gpu_multisets(old[0], gpus), gpu_multisets(new[0], gpus)

        def shared(x, y):
            return sum(min(x.count(e), y.count(e)) for e in set(x))

        best = max(sum(shared(a[g], b[perm[g]]) for g in range(gpus)) for perm in itertools.permutations(range(gpus)))
        kept = int((plan.phy2log == old).sum())
        assert kept == best
        # a device that keeps an expert only moves what it must: transfers + kept slots = all slots
        assert len(plan.transfers) == replicas - kept


def test_renumbered_placement_moves_nothing():
    rng = np.random.default_rng(10)
    old, _, _ = moerail.rebalance_experts(zipf_loads(rng, 3, 32), 48, 4, 2, 8)
    perm_gpu = torch.from_numpy(np.concatenate([rng.permutation(4), 4 + rng.permutation(4)]))
    new = old.view(3, 8, 6)[:, perm_gpu].flip(-1).reshape(3, 48)  # devices shuffled inside nodes
    plan = moerail.plan_migration(old, new, 8, 2, expert_bytes=1e9)
    assert len(plan.transfers) == 0 and plan.seconds == 0.0
    assert torch.equal(plan.phy2log, old)


def test_transfer_cost_follows_the_link_model():
    rng = np.random.default_rng(12)
    layers, gpus, nodes = 4, 8, 2
    old, _, _ = moerail.rebalance_experts(zipf_loads(rng, layers, 16), 24, 1, 1, gpus)
    new, _, _ = moerail.rebalance_experts(zipf_loads(rng, layers, 16), 24, 1, 1, gpus)
    link = moerail.LinkModel(intra_node_bw=100e9, inter_node_bw=20e9, latency=1e-5, local_bw=1e12)
    eb = [1e8, 2e8, 3e8, 4e8]
    plan = moerail.plan_migration(old, new, gpus, nodes, expert_bytes=eb, link=link, keep_nodes=False)
    per_node = gpus // nodes
    acc = np.zeros((gpus, 7))
    for layer, _, sr, _, dr, _ in plan.transfers.tolist():
        b = eb[layer]
        if sr == dr:
            acc[sr, 6] += b
        elif sr // per_node == dr // per_node:
            acc[sr, 0] += b
            acc[dr, 1] += b
            acc[sr, 4] += 1
            acc[dr, 5] += 1
        else:
            acc[sr, 2] += b
            acc[dr, 3] += b
            acc[sr, 4] += 1
            acc[dr, 5] += 1
    t = (
        np.maximum(np.maximum(acc[:, 0], acc[:, 1]) / 100e9, np.maximum(acc[:, 2], acc[:, 3]) / 20e9)
        + 1e-5 * np.maximum(acc[:, 4], acc[:, 5])
        + acc[:, 6] / 1e12
    )
    assert math.isclose(plan.seconds, t.max(), rel_tol=1e-12)
    assert math.isclose(plan.inter_node_bytes, acc[:, 2].sum(), rel_tol=1e-12)
    assert math.isclose(plan.intra_node_bytes, acc[:, 0].sum(), rel_tol=1e-12)
    np.testing.assert_allclose(plan.rank_bytes[:, 0].numpy(), acc[:, 0] + acc[:, 2])
    # a source in the destination's node is used whenever the old placement has one
    per = plan.slots_per_gpu
    for layer, expert, sr, _, dr, _ in plan.transfers.tolist():
        holders = {s // per for s in np.flatnonzero(old[layer].numpy() == expert)}
        if dr in holders:
            assert sr == dr
        elif any(h // per_node == dr // per_node for h in holders):
            assert sr // per_node == dr // per_node


@pytest.mark.parametrize("cfg", [(64, 80, 8, 4, 16), (64, 72, 4, 3, 6), (256, 288, 8, 18, 144)], ids=str)
@pytest.mark.parametrize("max_moves", [None, 0, 3, 10])
def test_improve_placement_is_incremental(cfg, max_moves):
    experts, replicas, groups, nodes, gpus = cfg
    rng = np.random.default_rng(zlib.crc32(repr((cfg, max_moves)).encode()))
    layers = 4
    w0 = zipf_loads(rng, layers, experts)
    w1 = w0 * rng.uniform(0.7, 1.3, size=w0.shape)  # the next interval
    cur, _, _ = moerail.rebalance_experts(w0, replicas, groups, nodes, gpus)
    phy2log, log2phy, logcnt = moerail.improve_placement(w1, cur, gpus, nodes, max_moves=max_moves)
    check_consistent(phy2log, log2phy, logcnt, (experts, replicas, 1, 1, gpus), "improve")
    mean = w1.sum(1) / gpus
    before = ref.device_loads(w1, cur.numpy(), gpus).max(1) / mean
    after = ref.device_loads(w1, phy2log.numpy(), gpus).max(1) / mean
    assert (after <= before * (1 + 1e-12)).all()
    changed = (phy2log != cur).sum(1)
    if max_moves is not None:
        assert (changed <= max_moves).all()
    if max_moves == 0:
        assert torch.equal(phy2log, cur)
    if max_moves is None:
        assert (after < before).any()
    keep = is_hierarchical(cfg)  # EPLB's hierarchical placements keep experts inside nodes
    if keep:
        spn = replicas // nodes
        for layer in range(layers):
            for n in range(nodes):
                a = set(cur[layer, n * spn : (n + 1) * spn].tolist())
                b = set(phy2log[layer, n * spn : (n + 1) * spn].tolist())
                assert a == b, "every expert stays in its node"
    # the migration moves at most the changed slots (matching may renumber devices to move fewer)
    plan = moerail.plan_migration(cur, phy2log, gpus, nodes, expert_bytes=1.0, keep_nodes=keep)
    assert len(plan.transfers) <= int(changed.sum())


def test_improve_placement_rejects_experts_split_over_nodes():
    cur = torch.tensor([[0, 1, 2, 3, 0, 4, 5, 6]])  # expert 0 in both nodes
    with pytest.raises(ValueError, match=r"^current_phy2log: expert 0 of layer 0 has replicas in nodes 0 and 1"):
        moerail.improve_placement(torch.ones(1, 7), cur, 4, 2, keep_nodes=True)
    p, _, _ = moerail.improve_placement(torch.ones(1, 7), cur, 4, 2)  # detected: global moves
    assert p.shape == (1, 8)
    with pytest.raises(ValueError, match=r"^max_moves: must be >= 0"):
        moerail.improve_placement(torch.ones(1, 7), cur, 4, 2, max_moves=-1)


def test_should_migrate_weighs_gain_against_cost(caplog):
    rng = np.random.default_rng(13)
    layers, experts, gpus = 4, 32, 8
    w = zipf_loads(rng, layers, experts)
    cur = moerail.default_placement(layers, experts, gpus)
    new, _, _ = moerail.rebalance_experts(w, experts, 1, 1, gpus)
    plan = moerail.plan_migration(cur, new, gpus, expert_bytes=5e7)
    spt = 2e-7
    busiest_cur = ref.device_loads(w, cur.numpy(), gpus).max(1).sum()
    busiest_new = ref.device_loads(w, plan.phy2log.numpy(), gpus).max(1).sum()
    gain_per_step = (busiest_cur - busiest_new) * spt
    assert gain_per_step > 0
    with caplog.at_level(logging.INFO, logger="moerail.balance"):
        d = moerail.should_migrate(w, cur, plan, gpus, seconds_per_token=spt, horizon_steps=1000)
    assert math.isclose(d.gain_per_step, gain_per_step, rel_tol=1e-12)
    assert math.isclose(d.cost, plan.seconds)
    assert d.migrate == (1000 * gain_per_step > plan.seconds)
    assert any("busiest-device load" in r.getMessage() for r in caplog.records)
    # just below and above the break-even horizon
    h = plan.seconds / gain_per_step
    assert not moerail.should_migrate(w, cur, plan, gpus, seconds_per_token=spt, horizon_steps=h * 0.99).migrate
    assert moerail.should_migrate(w, cur, plan, gpus, seconds_per_token=spt, horizon_steps=h * 1.01).migrate
    assert not moerail.should_migrate(
        w, cur, plan, gpus, seconds_per_token=spt, horizon_steps=h * 1.01, overhead_seconds=plan.seconds
    ).migrate


def test_expert_seconds_per_token():
    s = moerail.expert_seconds_per_token(7168, 2048, flops_per_second=989.5e12, efficiency=0.5)
    assert math.isclose(s, 2 * 7168 * 2048 * 3 * 3 / (989.5e12 * 0.5))


# ------------------------------------------------------------------------------------------------
# replica choice
# ------------------------------------------------------------------------------------------------


def test_select_replicas_is_deterministic_and_even():
    rng = np.random.default_rng(14)
    experts, replicas, gpus = 16, 24, 4
    w = zipf_loads(rng, 1, experts)
    _, log2phy, logcnt = moerail.rebalance_experts(w, replicas, 1, 1, gpus)
    l2p, lc = log2phy[0], logcnt[0]
    tokens, k = 5000, 3
    idx = torch.from_numpy(np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)]))
    idx[7, 1] = -1  # a dropped entry
    for offset in (0, 3):
        out = moerail.select_replicas(idx, l2p, lc, replicas, offset=offset)
        # plain loop
        seen = [0] * experts
        expect = torch.empty_like(idx)
        for t in range(tokens):
            for j in range(k):
                e = int(idx[t, j])
                if e < 0:
                    expect[t, j] = -1
                    continue
                expect[t, j] = l2p[e, (seen[e] + offset) % int(lc[e])]
                seen[e] += 1
        assert torch.equal(out, expect)
        per_slot = torch.bincount(out[out >= 0], minlength=replicas)
        for e in range(experts):
            slots = l2p[e, : int(lc[e])]
            counts = per_slot[slots]
            assert int(counts.max() - counts.min()) <= 1
        # the dense form gives the same slots, and carries the probabilities
        routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
        probs = torch.zeros(tokens, experts, dtype=torch.float32)
        ok = idx >= 0
        rows = torch.arange(tokens).unsqueeze(1).expand_as(idx)
        routing_map[rows[ok], idx[ok]] = True
        probs[rows[ok], idx[ok]] = torch.rand(int(ok.sum()))
        pmap, pprobs = moerail.select_replicas_map(routing_map, l2p, lc, replicas, probs=probs, offset=offset)
        expect_map = torch.zeros(tokens, replicas, dtype=torch.bool)
        expect_map[rows[ok], out[ok]] = True
        assert torch.equal(pmap, expect_map)
        expect_probs = torch.zeros(tokens, replicas)
        expect_probs[rows[ok], out[ok]] = probs[rows[ok], idx[ok]]
        assert torch.equal(pprobs, expect_probs)
    with pytest.raises(ValueError, match=r"^indices: expert id 16"):
        moerail.select_replicas(torch.full((2, 2), 16), l2p, lc, replicas)
    with pytest.raises(ValueError, match=r"^logcnt: expected 16 entries"):
        moerail.select_replicas(idx, l2p, lc[:5], replicas)


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------


def test_cli_balance(tmp_path):
    rng = np.random.default_rng(15)
    w = zipf_loads(rng, 4, 32)
    np.save(tmp_path / "loads.npy", w)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(moerail.__path__[0]), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "moerail.cli", "balance", "--loads", str(tmp_path / "loads.npy"),
           "--expert-model-parallel-size", "8", "--nodes", "2", "--num-redundant-experts", "8",
           "--moe-router-num-groups", "4", "--plot", str(tmp_path / "p.png")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for row in ("before", "eplb", "refine", "improve (from before)", "lower bound"):
        assert row in out
    before = moerail.placement_metrics(w, moerail.default_placement(4, 32, 8), 8, 2)["summary"]["max_mean_device"]
    assert f"{before:.3f}" in out
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # with a migration plan and decision, and the placement saved
    r = subprocess.run(cmd + ["--expert-bytes", "1e8", "--seconds-per-token", "1e-7", "--save", str(tmp_path / "p.pt")],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "migration before" in r.stdout and "busiest-device load" in r.stdout
    saved = torch.load(tmp_path / "p.pt")
    l2p, cnt = moerail.log2phy_from_phy2log(saved["phy2log"], 32)
    assert torch.equal(l2p, saved["log2phy"]) and torch.equal(cnt, saved["logcnt"])
    bad_cmd = cmd[:6] + ["--expert-model-parallel-size", "7", "--nodes", "1", "--slots", "40"]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--slots: 40 slots per layer must be" in bad.stderr
    assert "multiple of --expert-model-parallel-size 7" in bad.stderr and "Traceback" not in bad.stderr
    # The old spellings (--gpus, --replicas = total slots, --groups) still work, with a note each.
    old = cmd[:6] + ["--gpus", "8", "--nodes", "2", "--replicas", "40", "--groups", "4"]
    r_old = subprocess.run(old, capture_output=True, text=True, env=env, timeout=120)
    assert r_old.returncode == 0, r_old.stderr
    assert "--gpus is now --expert-model-parallel-size" in r_old.stderr and "--replicas is now --slots" in r_old.stderr
    assert r_old.stdout.split("lower bound")[0].splitlines()[1:] == out.split("lower bound")[0].splitlines()[1:]


def test_cli_balance_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    """`--plot` without matplotlib: one line naming the extra, before any table, no traceback."""
    from moerail import cli

    np.save(tmp_path / "loads.npy", zipf_loads(np.random.default_rng(1), 2, 16))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = cli.main(["balance", "--loads", str(tmp_path / "loads.npy"), "--expert-model-parallel-size", "4",
                   "--plot", str(tmp_path / "p.png")])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    assert cap.err.strip().splitlines() == [
        "moerail balance: error: --plot: needs matplotlib, which is not installed: pip install 'moerail[plot]'"]
    with pytest.raises(ImportError, match=r"moerail\[plot\]"):
        moerail.balance.plot_heatmap(str(tmp_path / "q.png"), torch.ones(2, 16))
    assert not (tmp_path / "p.png").exists()


def test_heatmap_scales_nodes_and_titles(tmp_path):
    """Experts and devices on separate colour scales (one hot expert must not wash out the device
    panels), before/after devices on one shared scale centred on the mean, node boundaries drawn."""
    pytest.importorskip("matplotlib")
    w = torch.ones(3, 16)
    w[:, 0] = 40.0  # one expert 40x the others: ~12x the layer mean
    after, _, _ = moerail.rebalance_experts(w, 24, 1, 2, 8)
    info = moerail.balance.plot_heatmap(str(tmp_path / "h.png"), w, after, 8, 2)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    expert, before_p, after_p = info["panels"]
    assert "expert load" in expert["title"] and "before" in before_p["title"] and "after" in after_p["title"]
    rel = w / w.mean(1, keepdim=True)
    assert expert["vmax"] == pytest.approx(float(rel.max()))
    dev_before = moerail.placement_metrics(w, moerail.default_placement(3, 16, 8), 8, 2)["device_load"]
    assert before_p["vmax"] == after_p["vmax"] == pytest.approx(float((dev_before / dev_before.mean(1, keepdim=True)).max()))
    assert before_p["vmax"] < expert["vmax"]  # its own scale
    assert before_p["vmin"] < 1.0 < before_p["vmax"]
    assert before_p["node_boundaries"] == after_p["node_boundaries"] == [3.5]


def test_example_zipf_training_shows_before_and_after(tmp_path):
    """examples/balance_zipf.py: Zipf-skewed routing, rebalanced mid-training; the measured busiest
    device (tokens the replicas really receive) gets closer to the mean."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(moerail.__path__[0]), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, os.path.join(root, "examples", "balance_zipf.py"), "--steps", "8", "--rebalance-at", "4",
           "--tokens", "256", "--plot", str(tmp_path / "z.png")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    mean_row = [line for line in r.stdout.splitlines() if line.strip().startswith("mean")][-1].split()
    before, after = float(mean_row[1]), float(mean_row[2])
    assert after < before
    assert "migrate:" in r.stdout + r.stderr
    assert (tmp_path / "z.png").read_bytes()[:4] == b"\x89PNG"
