"""The copy timelines of `moerail.memory.timeline` against the implementations they model:
Megatron-Core's own fine-grained activation offload manager, driven on the CPU through the
schedule (its CUDA streams and events stand-ins that do nothing, everything else its code), and
moerail's own executor on a small model, whose swap-in requests are recorded."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from moerail.memory import MODULES, LayerCosts, MemoryCosts, MemoryPlan, ModuleCost
from moerail.memory.timeline import (
    MEGATRON_OFFLOAD_GROUPS,
    SEGMENTS,
    attention_parts,
    megatron_offload_groups,
    megatron_offload_wait,
    schedule_ops,
)

M = 2**20


def moe_costs(layers_per_chunk=2, pp=4, rank=1, vpp=2, m=8, host=64 * 2**30, link=20e9):
    layers = []
    for c in range(vpp):
        for j in range(layers_per_chunk):
            layers.append(
                LayerCosts(
                    layer=c * 100 + j,
                    vpp_stage=c,
                    modules={
                        "layernorm": ModuleCost(56 * M, 1e-4),
                        "attention": ModuleCost(64 * M, 6e-4),
                        "mla_up_proj": ModuleCost(256 * M, 3e-4),
                        "router": ModuleCost(4 * M, 4e-5),
                        "expert_fc1": ModuleCost(352 * M, 1.2e-3, exchange_seconds=6e-3, exchange_bytes=224 * M),
                        "expert_act": ModuleCost(64 * M, 1.6e-4),
                        "shared_expert": ModuleCost(24 * M, 5e-4),
                    },
                    forward_seconds=0.016,
                    backward_seconds=0.021,
                    other_saved_bytes=72 * M,
                    transient_bytes=800 * M,
                    input_bytes=28 * M,
                )
            )
    return MemoryCosts(
        layers=tuple(layers), static_bytes=20 * 2**30, device_bytes=80 * 2**30, host_bytes=host,
        host_link_bytes_per_second=link, pipeline_size=pp, pipeline_rank=rank, virtual_pipeline_size=vpp,
        num_microbatches=m,
    )  # fmt: skip


# ----------------------------------------------------------------------------- Megatron's manager


class _Stream:
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        pass


class _Event:
    def __init__(self, *a, **k):
        pass

    def record(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


def _megatron_trace(costs, offload, monkeypatch, iterations=2):
    """The commit / reload events of Megatron-Core's offload manager in the last of
    ``iterations`` steps over this stage's schedule."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module("megatron.core.pipeline_parallel.fine_grained_activation_offload")
    import inspect

    if "activation_offload_fraction" not in inspect.signature(mod.PipelineOffloadManager.init_model_chunk_offload_handler).parameters:
        pytest.skip("this megatron-core's offload manager predates the one modelled (0.19: offload fraction, "
                    "group_offload); make test runs this again on 0.19")
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(mod, "print_offload_summary_table", lambda *a, **k: None)
    log = []
    info = {}  # id(group) -> (key, layer, name)
    handler_key = {}
    orig = mod.ChunkOffloadHandler.bulk_reload_group

    def bulk_reload_group(self):
        log.append(("reload",) + info[id(self._groups_to_reload[-1])])
        return orig(self)

    monkeypatch.setattr(mod.ChunkOffloadHandler, "bulk_reload_group", bulk_reload_group)

    class Tag(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, event):
            ctx.event = event
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            log.append(ctx.event)
            return g, None

    mod.PipelineOffloadManager.reset_instance()
    mgr = mod.PipelineOffloadManager.get_instance()
    chunks = {}
    for lc in costs.layers:
        chunks.setdefault(lc.vpp_stage, []).append(lc)
    v = costs.virtual_pipeline_size
    for it in range(iterations):
        log.clear()
        graphs = {}
        for forward, c, mb in schedule_ops(costs):
            key = (c, mb)
            if not forward:
                graphs.pop(key).sum().backward()
                continue
            mod.FineGrainedActivationOffloadingInterface.init_chunk_handler(
                costs.pipeline_rank, v if v > 1 else None, c if v > 1 else None, 0, 0, 1.0)
            x = torch.ones(1, requires_grad=True)
            started = []
            for lc in chunks[c]:
                groups = megatron_offload_groups(lc, offload)
                for s in range(len(SEGMENTS)):
                    for g in sorted((g for g in groups if g.start == s), key=lambda g: g.commit, reverse=True):
                        x = mod.fine_grained_offloading_group_start(x, g.name)
                        started.append((lc.layer, g.name))
                    x = x * 1.0
                    for g in (g for g in groups if g.commit == s):
                        x = mod.fine_grained_offloading_group_offload(x, g.name)
                        x = Tag.apply(x, ("commit", key, lc.layer, g.name))
            if it == 0:
                h = mgr.cur_forward_chunk()
                handler_key[id(h)] = key
                for grp, (layer, name) in zip(h.offload_groups, started):
                    assert grp._name == name
                    info[id(grp)] = (key, layer, name)
            graphs[key] = x
        assert not graphs
        mgr.reset()
    return list(log)


@pytest.mark.megatron
@pytest.mark.parametrize(
    "offload,pp,rank,vpp,m",
    [
        (("core_attn", "expert_fc1"), 4, 1, 2, 8),
        (("attn_norm", "core_attn", "attn_proj", "expert_fc1", "moe_act"), 4, 0, 2, 8),
        (("expert_fc1", "moe_act"), 2, 0, 3, 4),
        (("core_attn",), 4, 2, 1, 6),
        (("core_attn", "moe_act"), 4, 3, 2, 8),  # the last stage: a chunk's backward right after its forward
        (("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm", "expert_fc1", "moe_act"), 4, 0, 2, 8),
        (("qkv_linear", "mlp_norm"), 4, 1, 2, 8),
        (("attn_norm", "mlp_norm", "moe_act"), 2, 1, 1, 4),
    ],
)
def test_megatron_offload_events_match_megatron_manager(offload, pp, rank, vpp, m, monkeypatch):
    costs = moe_costs(pp=pp, rank=rank, vpp=vpp, m=m)
    ref = _megatron_trace(costs, offload, monkeypatch)
    mine = []
    megatron_offload_wait(costs, offload, trace=mine)
    assert [e[0] for e in mine].count("reload") > 0
    assert mine == ref, (mine, ref)


def test_megatron_groups_follow_megatron_boundaries():
    # Each group starts and commits where Megatron-Core's modules call group_start /
    # group_offload: core attention alone; moe_act from the activation to after linear_fc2; the
    # input norm's group until the attention's residual add.
    assert MEGATRON_OFFLOAD_GROUPS["moe_act"] == (SEGMENTS.index("moe_act"), SEGMENTS.index("expert_fc2"))
    assert MEGATRON_OFFLOAD_GROUPS["attn_norm"] == (SEGMENTS.index("input_norm"), SEGMENTS.index("attn_proj"))
    # The pre-MLP norm's group until the MLP's residual add (the layer's end); the QKV projections'
    # (with MLA the down and up projections) until the queries, keys and values.
    assert MEGATRON_OFFLOAD_GROUPS["mlp_norm"] == (SEGMENTS.index("pre_mlp_norm"), len(SEGMENTS) - 1)
    assert MEGATRON_OFFLOAD_GROUPS["qkv_linear"] == (SEGMENTS.index("qkv_down"), SEGMENTS.index("mla_up_proj"))
    lc = moe_costs().layers[0]
    by = {g.name: g for g in megatron_offload_groups(lc, ("attn_norm", "core_attn", "attn_proj", "expert_fc1", "moe_act"))}
    fc1 = lc.modules["expert_fc1"]
    assert by["expert_fc1"].freed + by["moe_act"].freed == fc1.saved_bytes
    assert by["core_attn"].freed == lc.modules["mla_up_proj"].saved_bytes
    assert by["core_attn"].moved == lc.modules["mla_up_proj"].saved_bytes + lc.modules["attention"].saved_bytes


_DSV3 = dict(model="DeepSeek-V3", devices=1024, pipeline_model_parallel_size=8, virtual_pipeline_model_parallel_size=4,
             expert_model_parallel_size=64, pipeline_model_parallel_layout="Et|(tt|)*30mL")  # fmt: skip
_MIXTRAL = dict(model="Mixtral-8x7B", devices=64, pipeline_model_parallel_size=4, expert_model_parallel_size=8)


@pytest.mark.parametrize("cfg,mla", [(_DSV3, True), (_MIXTRAL, False)])
def test_megatron_norm_and_attention_offloads_free_what_the_simulator_counts(cfg, mla):
    # The simulator counts, per layer and local token (bf16): the layer's input and the residual
    # stream entering the pre-MLP norm (each hidden wide: what attn_norm and mlp_norm move, all of
    # the MoE layer's saved bytes that no module action frees, with no dropout); the input norm's
    # output (what qkv_linear moves; half of what layernorm's recompute drops); with MLA the
    # compressed latents (2 q_lora_rank + 2 kv_lora_rank + the keys' RoPE dims; qkv_linear moves
    # them too), without MLA the queries, keys and values of every sequence position (heads + 2
    # query groups, kv_channels wide, split over TP; core_attn frees them): the attention's swap
    # moves these besides core attention's output and statistics.
    from moerail.memory import MemoryCosts

    costs = MemoryCosts.from_simulator(cluster="H100-SXM", seq_length=4096, global_batch_size=1024, micro_batch_size=1,
                                       tensor_model_parallel_size=2, host_bytes=64 * 2**30, **cfg)  # fmt: skip
    m = costs.meta["config"]["model"]
    lc = next(lc for lc in costs.layers if "expert_fc1" in lc.modules)
    local = lc.input_bytes / (m["hidden_size"] * 2)  # tokens on this rank (sequence parallel)
    if mla:
        want = (local * 2 * (2 * m["q_lora_rank"] + 2 * m["kv_lora_rank"] + m["qk_pos_emb_head_dim"]), 0.0)
    else:
        heads, groups = m["num_attention_heads"], m["num_query_groups"]
        d = m["hidden_size"] / heads
        want = (0.0, 4096 * (heads + 2 * groups) * d / 2 * 2)
    parts = attention_parts(costs)
    assert parts == pytest.approx(want, rel=1e-12)
    with pytest.raises(TypeError, match="costs: expected a MemoryCosts"):
        attention_parts(costs.layers)
    attn = lc.modules["attention"]
    heads_tp = m["num_attention_heads"] / 2
    core = 4096 * heads_tp * (m["v_head_dim"] if mla else m["hidden_size"] / m["num_attention_heads"]) * 2 + 4 * 4096 * heads_tp
    # moerail's attention is the whole module: its recompute (a replay of it) frees what its swap
    # moves; Megatron's core_attn recompute frees core attention's bytes and takes its time alone.
    assert attn.saved_bytes == attn.recompute_saved_bytes == pytest.approx(core + sum(want), rel=1e-12)
    core_bytes, core_seconds = costs.meta["core_attn_recompute"]
    assert core_bytes == pytest.approx(core, rel=1e-12)
    assert 0 < core_seconds < attn.recompute_seconds < lc.forward_seconds
    assert lc.other_saved_bytes == pytest.approx(2 * lc.input_bytes, rel=1e-12)
    names = ("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm")
    by = {g.name: g for g in megatron_offload_groups(lc, names, 0, parts)}
    assert by["attn_norm"].freed == by["mlp_norm"].freed == lc.input_bytes
    assert by["qkv_linear"].freed == pytest.approx(lc.input_bytes + want[0], rel=1e-12)
    assert dict((s, x) for s, x, _ in by["qkv_linear"].sources)["layernorm"] == pytest.approx(
        lc.modules["layernorm"].saved_bytes / 2)
    assert by["attn_proj"].freed == pytest.approx(core, rel=1e-12)
    qkv = lc.modules["mla_up_proj"].saved_bytes if mla else want[1]
    assert by["core_attn"].freed == pytest.approx(qkv, rel=1e-12)
    assert by["core_attn"].moved == pytest.approx(qkv + core, rel=1e-12)


def test_megatron_wait_against_hand_replay():
    # One chunk, one micro-batch: the first backward chunk keeps the last group of each name
    # (the margin), so with one layer nothing moves and nothing waits.
    c1 = moe_costs(layers_per_chunk=1, pp=1, rank=0, vpp=1, m=1, link=1e9)
    r1 = megatron_offload_wait(c1, ("expert_fc1", "moe_act"))
    assert r1["wait_seconds"] == 0.0 and r1["moved_bytes"] == 0.0
    assert r1["margin_bytes"] == c1.layers[0].modules["expert_fc1"].saved_bytes

    # Two layers, two micro-batches, stage 0 of 2 (forward 0, forward 1, backward 0, backward 1):
    # in backward 0 layer 1's groups stay (margin), layer 0's are reloaded at layer 1's two group
    # starts, then micro-batch 1's layer-1 groups are reloaded ahead at layer 0's two group starts.
    c3 = moe_costs(layers_per_chunk=2, pp=2, rank=0, vpp=1, m=2, link=1e9)
    trace = []
    r3 = megatron_offload_wait(c3, ("expert_fc1", "moe_act"), trace=trace)
    reloads = [e for e in trace if e[0] == "reload"]
    assert reloads[:4] == [
        ("reload", (0, 0), 0, "moe_act"), ("reload", (0, 0), 0, "expert_fc1"),
        ("reload", (0, 1), 1, "moe_act"), ("reload", (0, 1), 1, "expert_fc1"),
    ]  # fmt: skip
    # At 1 GB/s a 224 MiB group takes 0.23 s, far more than the milliseconds between a reload and
    # its commit: the backward waits.
    assert r3["wait_seconds"] > 0.2
    assert r3["moved_bytes"] == 3 * sum(g.moved for g in megatron_offload_groups(c3.layers[0], ("expert_fc1", "moe_act")))


# ----------------------------------------------------------------------------- moerail's executor


def test_executor_prefetch_order_matches_executor(monkeypatch):
    """The order in which moerail's executor starts copying groups back (recorded on the tiny
    model, three layers, one micro-batch) is the one the timeline charges."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory_tiny as mt

    from moerail.memory import LayerPlan
    from moerail.memory.executor import Executor, LayerRun
    from moerail.memory.timeline import executor_swap_wait

    acts = [{"attention": "swap", "expert_fc1": "swap"}, {"expert_fc1": "swap"}, {"attention": "swap", "layernorm": "swap"}]
    log = []
    orig = LayerRun.backward_starts

    def backward_starts(self, group):
        if self.triggered[group]:
            return orig(self, group)
        runs = [r for r in (self, self.prev) if r is not None]
        before = [(r.layer, g, [st for st in r.swapped[g] if st.in_done is None and st.dev is None])
                  for r in runs for g in ("mlp", "attn")]  # fmt: skip
        log.append(("start", self.layer, group))
        orig(self, group)
        # The groups whose copies back this start began, in the executor's order (own, then next).
        began = [(layer, g) for layer, g, sts in before if any(st.in_done is not None for st in sts)]
        began.sort(key=lambda lg: (lg != (self.layer, group), -lg[0], lg[1] != "mlp"))
        log.extend(("issue", layer, g) for layer, g in began)

    monkeypatch.setattr(LayerRun, "backward_starts", backward_starts)
    model = mt.Model(layers=3)
    plan = MemoryPlan(tuple(LayerPlan(i, a) for i, a in enumerate(acts)), host_bytes=1 << 24)
    mt.attach(Executor(plan, min_swap_bytes=0), model)
    mt.run(model, micro=1)
    ref = [e for e in log]

    layers = [LayerCosts(layer=i, modules={m: ModuleCost(M, 1e-4, exchange_bytes=M / 2 if m == "expert_fc1" else 0.0)
                                            for m in ("layernorm", "attention", "expert_fc1")},
                         forward_seconds=0.01, backward_seconds=0.02) for i in range(3)]  # fmt: skip
    costs = MemoryCosts(layers=tuple(layers), static_bytes=1.0, device_bytes=2**40, host_bytes=2**30,
                        host_link_bytes_per_second=1e9, num_microbatches=1)  # fmt: skip
    modules = ("layernorm", "attention", "expert_fc1")
    trace = []
    executor_swap_wait(costs, [[a.get(m, "keep") for m in modules] for a in acts], modules, trace=trace)
    mine = [(e[0], e[2], e[3]) for e in trace]
    assert mine == ref, (mine, ref)


def _one_f_one_b(model, order, seed=5):
    """Forwards and backwards of micro-batches in ``order`` (``("f", i)`` / ``("b", i)``), as a
    pipeline stage runs them; the outputs and parameter gradients."""
    import memory_tiny as mt

    mt.TRACKER.clear()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = 1 + max(i for _, i in order)
    xs = [torch.randn(8, 2, 16, generator=g) for _ in range(n)]
    ws = [torch.randn(8, 2, 16, generator=g) for _ in range(n)]
    losses, outs = {}, {}
    for op, i in order:
        if op == "f":
            y = model(xs[i])
            outs[i] = y.detach().clone()
            losses[i] = (y * ws[i]).sum()
        else:
            losses.pop(i).backward()
    return outs, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# Stage 0 of two, three micro-batches: Megatron-Core's 1F1B order.
_ORDER = [("f", 0), ("f", 1), ("b", 0), ("f", 2), ("b", 1), ("b", 2)]
_ACTS = [{"attention": "swap", "expert_fc1": "swap"}, {"expert_fc1": "swap"}, {"attention": "swap", "expert_fc1": "swap"}]


def _recorded(lookahead, monkeypatch, steps=2, prefetch_groups=1):
    """Runs the tiny model (three layers) under a swap plan in ``_ORDER`` for ``steps`` steps and
    records, in the last one, each group's backward start and the groups whose copies back it
    began, keyed by micro-batch."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory_tiny as mt

    from moerail.memory import LayerPlan
    from moerail.memory.executor import Executor, LayerRun

    runs: list = []
    orig_init, orig = LayerRun.__init__, LayerRun.backward_starts
    chunks: dict = {}

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        runs.append(self)

    def mb(run):
        return chunks.setdefault(id(run.chunk), len(chunks) % 3)

    log: list = []
    ready_before: dict = {}

    def backward_starts(self, group):
        if self.triggered[group]:
            return orig(self, group)
        live = [r for r in runs if r.chunk is not None]
        before = [(r, g, [st for st in r.swapped[g] if st.in_done is None and st.dev is None]) for r in live
                  for g in ("mlp", "attn")]  # fmt: skip
        ready_before[(mb(self), self.layer, group)] = [st.in_done is not None for st in self.swapped[group]]
        log.append(("start", mb(self), self.layer, group))
        orig(self, group)
        began = [(r, g) for r, g, sts in before if any(st.in_done is not None for st in sts)]
        began.sort(key=lambda rg: ((rg[0], rg[1]) != (self, group), rg[0].chunk is not self.chunk, -rg[0].layer,
                                   rg[1] != "mlp"))  # fmt: skip
        log.extend(("issue", mb(r), r.layer, g) for r, g in began)

    with monkeypatch.context() as mp:
        mp.setattr(LayerRun, "__init__", init)
        mp.setattr(LayerRun, "backward_starts", backward_starts)
        model = mt.Model(layers=3)
        plan = MemoryPlan(tuple(LayerPlan(i, a) for i, a in enumerate(_ACTS)), host_bytes=1 << 24)
        ex = mt.attach(Executor(plan, min_swap_bytes=0, lookahead=lookahead, prefetch_groups=prefetch_groups), model)
        for _ in range(steps):
            log.clear()
            ready_before.clear()
            runs.clear()
            chunks.clear()
            res = _one_f_one_b(model, _ORDER)
        ex.close()
    return log, ready_before, ex, res


def test_cross_chunk_prefetch_happens_and_stays_exact(monkeypatch):
    """With ``lookahead=2`` the first group of each later micro-batch's backward (the last layer's
    MLP) finds its copies back already started by the previous backward; results are bit-identical
    to keeping everything, and to ``lookahead=1``, which starts none ahead."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory_tiny as mt

    from moerail.memory.executor import Executor

    _, ready2, ex2, (out2, g2) = _recorded(2, monkeypatch)
    _, ready1, ex1, (out1, g1) = _recorded(1, monkeypatch)
    _, _, _, (out3, g3) = _recorded(2, monkeypatch, prefetch_groups=3)  # every group of a backward ahead
    model = mt.Model(layers=3)
    mt.attach(Executor(None), model)
    out0, g0 = _one_f_one_b(model, _ORDER)
    for i in out0:
        assert torch.equal(out0[i], out2[i]) and torch.equal(out0[i], out1[i]) and torch.equal(out0[i], out3[i])
    assert g0.keys() == g2.keys() == g1.keys() == g3.keys()
    for k in g0:
        assert torch.equal(g0[k], g2[k]) and torch.equal(g0[k], g1[k]) and torch.equal(g0[k], g3[k]), k
    for m in (1, 2):  # the backwards that follow another one
        assert ready2[(m, 2, "mlp")] and all(ready2[(m, 2, "mlp")]), ready2
        assert not any(ready1[(m, 2, "mlp")])
    assert not any(ready2[(0, 2, "mlp")])  # the first backward of the step: nothing before it
    assert ex2.stats["chunk_prefetches"] == 4 and ex1.stats["chunk_prefetches"] == 0  # two per step


@pytest.mark.parametrize("lookahead,prefetch_groups", [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3)])
def test_executor_cross_chunk_order_matches_timeline(lookahead, prefetch_groups, monkeypatch):
    """The executor's recorded order of backward starts and copies back in a 1F1B stage (stage 0
    of two, three micro-batches, second step) is the one the timeline charges, ``lookahead`` and
    ``prefetch_groups`` as the executor's; and what the copies ahead hold beyond the running
    layer's own swapped bytes, by hand."""
    from moerail.memory.timeline import executor_swap_wait

    log, _, _, _ = _recorded(lookahead, monkeypatch, prefetch_groups=prefetch_groups)
    layers = [LayerCosts(layer=i, modules={m: ModuleCost(M, 1e-4, exchange_bytes=M / 2 if m == "expert_fc1" else 0.0)
                                            for m in ("layernorm", "attention", "expert_fc1")},
                         forward_seconds=0.01, backward_seconds=0.02) for i in range(3)]  # fmt: skip
    costs = MemoryCosts(layers=tuple(layers), static_bytes=1.0, device_bytes=2**40, host_bytes=2**30,
                        host_link_bytes_per_second=1e9, num_microbatches=3, pipeline_size=2, pipeline_rank=0)  # fmt: skip
    modules = ("layernorm", "attention", "expert_fc1")
    trace = []
    r = executor_swap_wait(costs, [[a.get(m, "keep") for m in modules] for a in _ACTS], modules, trace=trace,
                           lookahead=lookahead, prefetch_groups=prefetch_groups)  # fmt: skip
    mine = [(e[0], e[1][1], e[2], e[3]) for e in trace]
    assert mine == log, (mine, log)
    # Swapped per group (M each): layer 2 attn + mlp, layer 1 mlp, layer 0 attn + mlp. lookahead=2:
    # layer 2's mlp group held through the forward before its backward (M). Two groups ahead: at
    # layer 2's mlp, layer 1's mlp is back beyond layer 2's own (M); at layer 1's attn, layer 0's
    # two groups beyond layer 1's own M (M). Three: at layer 1's mlp, layer 0's two (2 M).
    want_ahead = {1: M if lookahead == 2 else 0.0, 2: M, 3: 2 * M}[prefetch_groups]
    assert r["ahead_bytes"] == want_ahead


def test_plan_with_copies_ahead_counts_them_in_its_peak():
    """``plan_memory(..., lookahead=2)`` or ``prefetch_groups`` >= 2: the peak is the model's peak
    plus what the executor's copies ahead hold beyond it (the timeline's ``ahead_bytes``,
    recomputed here), and fits the budget; ``lookahead`` and ``prefetch_groups`` are checked."""
    from moerail.memory import evaluate_plan, plan_memory
    from moerail.memory.planner import _rows, executor_added_seconds
    from moerail.memory.timeline import executor_swap_wait

    costs = moe_costs(link=5e9)
    keep = evaluate_plan(costs, MemoryPlan(())).evaluation
    budget = int(costs.static_bytes + 0.2 * keep["activation_bytes_keep_all"] + keep["transient_bytes"])
    for lookahead, groups in ((2, 1), (1, 2), (2, 3)):
        p2 = plan_memory(costs, budget, lookahead=lookahead, prefetch_groups=groups)
        base = evaluate_plan(costs, p2).evaluation["peak_bytes"]
        ahead = executor_swap_wait(costs, _rows(costs, p2), MODULES, lookahead=lookahead,
                                   prefetch_groups=groups)["ahead_bytes"]  # fmt: skip
        assert ahead > 0  # the plan swaps groups that are copied back ahead
        assert p2.evaluation["ahead_bytes"] == ahead
        assert p2.predicted_peak_bytes == pytest.approx(base + ahead) and p2.predicted_peak_bytes <= budget
        # Copying ahead never makes the executor wait longer for the same plan.
        assert (executor_added_seconds(costs, p2, lookahead=lookahead, prefetch_groups=groups)["swap_wait_seconds"]
                <= executor_added_seconds(costs, p2, lookahead=1)["swap_wait_seconds"])  # fmt: skip
    for bad in (3, -1, True, 1.0):
        with pytest.raises(ValueError, match="lookahead"):
            plan_memory(costs, budget, lookahead=bad)
        with pytest.raises(ValueError, match="lookahead"):
            executor_swap_wait(costs, _rows(costs, p2), MODULES, lookahead=bad)
    for bad in (0, 9, True, 2.0):
        with pytest.raises(ValueError, match="prefetch_groups"):
            plan_memory(costs, budget, prefetch_groups=bad)
        with pytest.raises(ValueError, match="prefetch_groups"):
            evaluate_plan(costs, p2, prefetch_groups=bad)


@pytest.mark.parametrize("lookahead,prefetch_groups", [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3)])
def test_planner_prices_swaps_as_the_executor_replay_waits(lookahead, prefetch_groups):
    """The planner's model of its executor's waits (``swap_wait_seconds``) against the timeline's
    replay of the executor, on random small cost sets (1F1B and interleaved, every rank, a few
    links) and plans that swap random modules of one layer (the model takes each layer's copies
    alone on the link): the same seconds; and what the planner charges (``swap_exposed_seconds``)
    is at least those waits and its own bound (``swap_bound_seconds``)."""
    import random

    from moerail.memory import LayerPlan, evaluate_plan
    from moerail.memory.planner import _rows
    from moerail.memory.timeline import executor_swap_wait

    rng = random.Random(17 + lookahead + 3 * prefetch_groups)
    waited = 0
    for _ in range(40):
        pp = rng.choice((1, 2, 4))
        vpp = rng.choice((1, 2)) if pp > 1 else 1
        costs = moe_costs(layers_per_chunk=rng.choice((2, 3)), pp=pp, rank=rng.randrange(pp), vpp=vpp,
                          m=pp * rng.choice((1, 2, 3)), link=rng.choice((5e9, 20e9, 60e9)))  # fmt: skip
        pick = rng.randrange(len(costs.layers))
        acts = {m: "swap" for m in costs.layers[pick].modules if rng.random() < 0.5} or {"expert_act": "swap"}
        plan = MemoryPlan(tuple(LayerPlan(lc.layer, acts if i == pick else {}, lc.vpp_stage)
                                for i, lc in enumerate(costs.layers)))  # fmt: skip
        ev = evaluate_plan(costs, plan, lookahead=lookahead, prefetch_groups=prefetch_groups).evaluation
        replay = executor_swap_wait(costs, _rows(costs, plan), MODULES, lookahead=lookahead,
                                    prefetch_groups=prefetch_groups)["wait_seconds"]  # fmt: skip
        assert ev["swap_wait_seconds"] == pytest.approx(replay, rel=1e-9, abs=1e-12), (acts, pick)
        assert ev["swap_exposed_seconds"] >= max(replay, ev["swap_bound_seconds"]) - 1e-12
        waited += replay > 0
    assert waited > 10  # the cases exercise the waits, not only hidden copies


def test_executor_learns_the_interleaved_order(monkeypatch):
    """Two model chunks of two layers on stage 0 of two, four micro-batches, Megatron-Core's
    interleaved order (:func:`schedule_ops`), ``lookahead=2``: in the first step the executor
    copies nothing ahead across chunks (it does not know the order yet), from the second step on
    its backward starts and copies back are the timeline's, keyed by (chunk, micro-batch), and
    the results stay bit-identical to keeping everything."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory_tiny as mt

    from moerail.memory import LayerPlan
    from moerail.memory.executor import Executor, LayerRun
    from moerail.memory.timeline import executor_swap_wait, schedule_ops

    acts = {(0, 0): {"attention": "swap", "expert_fc1": "swap"}, (1, 0): {"expert_fc1": "swap"},
            (2, 1): {"attention": "swap"}, (3, 1): {"attention": "swap", "expert_fc1": "swap"}}  # fmt: skip
    layers = [LayerCosts(layer=i, vpp_stage=v, modules={m: ModuleCost(M, 1e-4, exchange_bytes=M / 2 if m == "expert_fc1"
                                                                      else 0.0) for m in ("layernorm", "attention", "expert_fc1")},
                         forward_seconds=0.01, backward_seconds=0.02) for (i, v) in acts]  # fmt: skip
    costs = MemoryCosts(layers=tuple(layers), static_bytes=1.0, device_bytes=2**40, host_bytes=2**30,
                        host_link_bytes_per_second=1e9, num_microbatches=4, pipeline_size=2, pipeline_rank=0,
                        virtual_pipeline_size=2)  # fmt: skip
    ops = schedule_ops(costs)

    class Staged(Executor):
        """The tiny model's glue with the virtual pipeline stage of the chunk being attached."""

        stage = 0

        def layer(self, fn, layer, vpp_stage=0, **kw):
            return super().layer(fn, layer, self.stage, **kw)

    def build(plan, lookahead):
        ex = Staged(plan, min_swap_bytes=0, lookahead=lookahead)
        chunks = []
        for c in range(2):
            ex.stage = c
            model = mt.Model(layers=2, seed=c)
            for j, layer in enumerate(model.layers):
                layer.layer = j + 2 * c  # the tiny glue tags modules with it
            mt.attach(ex, model)
            chunks.append(model)
        return ex, chunks

    def step(models):
        g = torch.Generator().manual_seed(7)
        torch.manual_seed(7)
        for m in models:
            m.zero_grad(set_to_none=True)
        data = {(c, i): (torch.randn(8, 2, 16, generator=g), torch.randn(8, 2, 16, generator=g))
                for c in range(2) for i in range(4)}  # fmt: skip
        losses, outs = {}, {}
        for fwd, c, i in ops:
            if fwd:
                y = models[c](data[(c, i)][0])
                outs[(c, i)] = y.detach().clone()
                losses[(c, i)] = (y * data[(c, i)][1]).sum()
            else:
                losses.pop((c, i)).backward()
        return outs, {(c, k): p.grad.clone() for c, m in enumerate(models) for k, p in m.named_parameters()
                      if p.grad is not None}  # fmt: skip

    keys: dict = {}
    log: list = []
    runs: list = []
    orig_init, orig = LayerRun.__init__, LayerRun.backward_starts

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        runs.append(self)

    def key(run):  # (chunk, micro-batch): the n-th chunk run of a stage in the step is micro-batch n
        c = run.chunk
        if id(c) not in keys:
            keys[id(c)] = (c.vpp_stage, sum(1 for v in keys.values() if v[0] == c.vpp_stage))
        return keys[id(c)]

    def backward_starts(self, group):
        if self.triggered[group]:
            return orig(self, group)
        before = [(r, g, [st for st in r.swapped[g] if st.in_done is None and st.dev is None]) for r in runs
                  for g in ("mlp", "attn")]  # fmt: skip
        log.append(("start", key(self), self.layer, group))
        orig(self, group)
        began = [(r, g) for r, g, sts in before if any(st.in_done is not None for st in sts)]
        began.sort(key=lambda rg: ((rg[0], rg[1]) != (self, group), rg[0].chunk is not self.chunk, -rg[0].layer,
                                   rg[1] != "mlp"))  # fmt: skip
        log.extend(("issue", key(r), r.layer, g) for r, g in began)

    plan = MemoryPlan(tuple(LayerPlan(i, a, v) for (i, v), a in acts.items()), host_bytes=1 << 24)
    logs = []
    with monkeypatch.context() as mp:
        mp.setattr(LayerRun, "__init__", init)
        mp.setattr(LayerRun, "backward_starts", backward_starts)
        ex, models = build(plan, 2)
        for _ in range(2):
            log.clear()
            runs.clear()
            keys.clear()
            got = step(models)
            logs.append(list(log))
        ex.close()
    _, ref_models = build(None, 1)
    ref = step(ref_models)
    for k in ref[0]:
        assert torch.equal(ref[0][k], got[0][k]), k
    assert ref[1].keys() == got[1].keys()
    for k in ref[1]:
        assert torch.equal(ref[1][k], got[1][k]), k

    modules = ("layernorm", "attention", "expert_fc1")
    rows = [[a.get(m, "keep") for m in modules] for a in acts.values()]
    trace2, trace1 = [], []
    executor_swap_wait(costs, rows, modules, trace=trace2, lookahead=2)
    executor_swap_wait(costs, rows, modules, trace=trace1, lookahead=1)
    assert logs[1] == [(e[0], e[1], e[2], e[3]) for e in trace2]
    assert logs[0] == [(e[0], e[1], e[2], e[3]) for e in trace1]  # first step: within chunks only
    assert ex.stats["chunk_prefetches"] > 0


def test_auto_prefetch_picks_the_cheapest_executor_setting_and_the_plan_carries_it():
    """``plan_memory(..., lookahead="auto", prefetch_groups="auto")``: the plan of each setting is
    searched; the one chosen costs no more, as the executor's replay times it, than any of them,
    and here that is two groups ahead (its copies of the next layer's MLP start a whole layer's
    backward earlier, room the budget has). The plan carries its setting through ``to_dict`` /
    ``from_dict``, and the executor runs it with that unless told otherwise."""
    from moerail.memory import evaluate_plan, plan_memory
    from moerail.memory.executor import Executor
    from moerail.memory.planner import executor_added_seconds

    costs = moe_costs(layers_per_chunk=3, link=10e9, vpp=1, pp=4, rank=0, m=8)
    keep = evaluate_plan(costs, MemoryPlan(())).evaluation
    budget = int(costs.static_bytes + 0.5 * keep["activation_bytes_keep_all"] + keep["transient_bytes"])
    auto = plan_memory(costs, budget, lookahead="auto", prefetch_groups="auto")
    timed = {}
    for la in (1, 2):
        for g in (1, 2, 3):
            p = plan_memory(costs, budget, lookahead=la, prefetch_groups=g)
            assert (p.lookahead, p.prefetch_groups) == (la, g)
            timed[(la, g)] = executor_added_seconds(costs, p)["added_seconds"]
    got = executor_added_seconds(costs, auto)["added_seconds"]
    assert got == min(timed.values()) and got < timed[(1, 1)], timed
    assert (auto.lookahead, auto.prefetch_groups) == (1, 2) and auto.predicted_peak_bytes <= budget
    # "auto" for one of them searches that one only.
    assert plan_memory(costs, budget, prefetch_groups="auto").lookahead == 1
    again = MemoryPlan.from_dict(auto.to_dict())
    assert (again.lookahead, again.prefetch_groups) == (1, 2)
    assert MemoryPlan.from_dict({"layers": []}).prefetch_groups == 1  # plans written before the field
    ex = Executor(again)
    assert (ex.lookahead, ex.prefetch_groups) == (1, 2)
    ex.set_plan(MemoryPlan(()))
    assert (ex.lookahead, ex.prefetch_groups) == (1, 1)
    assert Executor(again, prefetch_groups=3).prefetch_groups == 3
    with pytest.raises(ValueError, match="prefetch_groups"):
        MemoryPlan((), prefetch_groups=0)
    with pytest.raises(ValueError, match="lookahead"):
        plan_memory(costs, budget, lookahead="fast")


def test_megatron_core_attn_recompute_is_core_attention_alone():
    # On simulator costs moerail's attention recompute replays the whole module; Megatron's core_attn
    # recompute, as megatron_static_plans prices it, rebuilds core attention alone: the same uniform
    # plan adds the module's forward per layer and micro-batch on moerail's side, core attention's on
    # Megatron's.
    from moerail.memory import LayerPlan, evaluate_plan, megatron_static_plans

    costs = MemoryCosts.from_simulator(cluster="H100-SXM", seq_length=4096, global_batch_size=1024, micro_batch_size=1,
                                       tensor_model_parallel_size=2, **_MIXTRAL)  # fmt: skip
    core_bytes, core_seconds = costs.meta["core_attn_recompute"]
    n = costs.num_microbatches * len(costs.layers)
    mine = evaluate_plan(costs, MemoryPlan(tuple(LayerPlan(lc.layer, {"attention": "recompute"}) for lc in costs.layers)))
    attn = costs.layers[0].modules["attention"]
    assert mine.predicted_added_seconds == pytest.approx(n * attn.recompute_seconds, rel=1e-9)
    meg = next(s for s in megatron_static_plans(costs) if s.recompute == ("core_attn",) and not s.offload)
    assert meg.plan.predicted_added_seconds == pytest.approx(n * core_seconds, rel=1e-9)
    keep = evaluate_plan(costs, MemoryPlan(()))
    saved_meg = keep.evaluation["activation_bytes"] - meg.plan.evaluation["activation_bytes"]
    saved_mine = keep.evaluation["activation_bytes"] - mine.evaluation["activation_bytes"]
    assert saved_meg < saved_mine
