"""The simulator's validation table (benches/sim_validation.csv): published MoE training runs, each
with its source. Every row must be expressible by the simulator and name where its number comes
from; with the efficiencies the presets ship (fitted per device family on the table), the table's
runs stay within the bounds BENCHMARKS.md reports."""

from __future__ import annotations

import pathlib
import statistics

import pytest

from moerail import sim
from moerail.sim import validation as val

CSV = pathlib.Path(__file__).resolve().parents[1] / "benches" / "sim_validation.csv"
ROWS = val.load_table(CSV)


def test_table_is_broad_and_sourced():
    assert len(ROWS) >= 30
    sources = {r["source"] for r in ROWS}
    assert len(sources) >= 3, sources
    assert {"folding", "modelzoo", "bridge", "pangu"} <= sources
    for r in ROWS:
        ref = r["reference"]
        # A paper and its table / section, or a repository file at a commit.
        assert "arXiv" in ref or ("@" in ref and "/" in ref), (r["id"], ref)
        assert r["status"] in ("ok", "excluded"), r["id"]
        if r["status"] == "excluded":
            assert r["notes"].strip(), f"{r['id']}: an excluded row says why"
    assert len({r["id"] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_every_row_is_expressible(row):
    rep = sim.simulate(val.row_config(row))
    assert rep["time"][row["metric"]] > 0
    assert val.family(row) in val.PRIOR_WIDTH


def test_pangu_layout_pads_to_64_slots():
    row = next(r for r in ROWS if r["source"] == "pangu")
    rep = sim.simulate(val.row_config(row))
    lay = rep["layout"]
    assert (lay["tp"], lay["pp"], lay["vpp"], lay["ep"], lay["etp"]) == (8, 16, 2, 32, 1)
    assert sum(lay["stage_layers"]) == 61
    assert lay["pipeline_model_parallel_layout"] == row["pipeline_layout"]


def test_shipped_efficiencies_reproduce_the_table():
    # The presets hold the per-family fit on the table's fittable rows (benches/bench_sim_validation.py);
    # with them, the in-sample errors of BENCHMARKS.md follow. Leave-one-out is in the bench (minutes).
    ok = [r for r in ROWS if r["status"] == "ok"]
    preds = val.predict(ok, {})
    errs = {p["id"]: p["error"] for p in preds}
    fit_errs = [abs(errs[r["id"]]) for r in ok if val.fits_on(r)]
    assert statistics.mean(fit_errs) <= 0.10, statistics.mean(fit_errs)
    pangu = next(r["id"] for r in ok if r["source"] == "pangu")
    assert abs(errs[pangu]) <= 0.10, errs[pangu]


def test_search_pads_uneven_layers_with_noop_layers():
    row = next(r for r in ROWS if r["source"] == "pangu")
    out = sim.search(val.row_config(row), top=1, space={"tp": [8], "cp": [1], "pp": [16], "vpp": [2], "ep": [32],
                                                        "etp": [1], "mbs": [1], "recompute": ["light"]})
    best = out["results"][0]
    assert best["layout"]["padded_with_noop_layers"] is True
    assert best["report"]["layout"]["pipeline_model_parallel_layout"].endswith("|t|mL")


def test_plan_prints_the_padded_layout_as_a_megatron_flag(capsys):
    import shlex

    from moerail import cli

    argv = ["plan", "--model", "Pangu-Ultra-MoE-718B", "--cluster", "Ascend-800T-A2", "--devices", "6144", "--gbs",
            "6144", "--top", "1", "--quiet"]
    for dim in ("tp=8", "cp=1", "pp=16", "vpp=2", "ep=32", "etp=1"):
        argv += ["--space", dim]
    assert cli.main(argv) in (0, None)
    out = capsys.readouterr().out
    line = out.split("Megatron-LM flags of #1:")[1].strip().splitlines()[0]
    flags = shlex.split(line)
    i = flags.index("--pipeline-model-parallel-layout")
    assert flags[i + 1].endswith("|t|mL")
    cfg, ignored = sim.parse_megatron_args(line)
    assert cfg["layout"]["pipeline_model_parallel_layout"] == flags[i + 1]
    assert "--num-layers-per-virtual-pipeline-stage" not in flags


def test_cuda_graph_scope_launches_captured_scopes_once():
    # A Megatron-Bridge GB200 recipe captures attention, router and dispatch preprocessing as CUDA
    # graphs: every kernel keeps its own time, only the per-kernel launch overhead of those scopes goes.
    row = next(r for r in ROWS if "cuda_graph_scope=attn+moe_router+moe_preprocess" in r["settings"])
    cfg = val.row_config(row)
    assert cfg["training"]["cuda_graph_scope"] == ["attn", "moe_router", "moe_preprocess"]
    graphed = sim.simulate(cfg)["breakdown_s"]["compute"]
    cfg["training"].pop("cuda_graph_scope")
    eager = sim.simulate(cfg)["breakdown_s"]["compute"]
    for part, t in eager.items():
        if part != "kernel_overhead":
            assert graphed[part] == pytest.approx(t), part
    assert 0 < graphed["kernel_overhead"] < eager["kernel_overhead"]
    cfg["training"]["cuda_graph_scope"] = ["attention"]
    with pytest.raises(ValueError, match="cuda_graph_scope"):
        sim.simulate(cfg)


def test_cuda_graph_scope_needs_a_graph_implementation_in_megatron_flags():
    cfg, ignored = sim.parse_megatron_args("--cuda-graph-impl transformer_engine --cuda-graph-scope attn moe_router")
    assert cfg["training"]["cuda_graph_scope"] == ["attn", "moe_router"]
    # Megatron captures nothing without --cuda-graph-impl: the scope alone is listed as ignored.
    cfg, ignored = sim.parse_megatron_args("--cuda-graph-scope attn")
    assert "cuda_graph_scope" not in cfg["training"]
    assert "--cuda-graph-scope" in ignored


def _one_f_one_b_makespan(fwd, bwd, m):
    """Megatron's non-interleaved 1F1B (warm-up forwards, steady one-forward-one-backward,
    cool-down backwards) as an event simulation: each stage runs its passes in that order, a
    forward waits for the previous stage's, a backward for the next stage's (free hand-offs)."""
    p = len(fwd)
    order = []
    for s in range(p):
        w = min(p - s - 1, m)
        ops = [("F", i) for i in range(w)]
        for i in range(m - w):
            ops += [("F", w + i), ("B", i)]
        ops += [("B", i) for i in range(m - w, m)]
        order.append(ops)
    done = {}
    pos = [0] * p
    clock = [0.0] * p
    while any(pos[s] < len(order[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pos[s] < len(order[s]):
                kind, i = order[s][pos[s]]
                dep = (kind, s - 1, i) if kind == "F" and s > 0 else (kind, s + 1, i) if kind == "B" and s < p - 1 else None
                if dep is not None and dep not in done:
                    break
                start = max(clock[s], done[dep] if dep else 0.0)
                clock[s] = start + (fwd[s] if kind == "F" else bwd[s])
                done[(kind, s, i)] = clock[s]
                pos[s] += 1
                progressed = True
        assert progressed
    return max(clock)


def test_engine_bubble_is_megatrons_1f1b_fill_and_drain():
    # The simulator's pipeline bubble against an event simulation of the schedule with the stage
    # times it reports (the forward a third of each): Mixtral 8x22B, TP2 PP8 at 1024 and 128 GPUs.
    row = dict(next(r for r in ROWS if r["id"] == "folding-ss-4"), vpp="1")
    for devices in (1024, 128):
        rep = sim.simulate(val.row_config(dict(row, devices=str(devices))))
        b = rep["breakdown_s"]
        times = [s["time_per_microbatch_s"] for s in b["per_stage"]]
        m = rep["layout"]["num_microbatches"]
        assert m == val.microbatches_per_pipeline(dict(row, devices=str(devices)))
        span = _one_f_one_b_makespan([t / 3 for t in times], [2 * t / 3 for t in times], m)
        assert b["pipeline_bubble"] == pytest.approx(span - m * max(times), rel=1e-6)
        # One micro-batch (forward + backward) of each of the other pp - 1 stages, not more.
        assert (len(times) - 1) * min(times) <= b["pipeline_bubble"] <= (len(times) - 1) * max(times)


def _interleaved_makespan(fwd, bwd, m, v):
    """Megatron's interleaved 1F1B (``forward_backward_pipelining_with_interleaving``) as an event
    simulation: stage ``s`` runs chunk ``c`` (virtual stage ``c * p + s``) of each micro-batch, a
    chunk taking ``1 / v`` of the stage's time; warm-up ``(p - s - 1) * 2 + (v - 1) * p`` virtual
    micro-batches, then one forward one backward, then the cool-down; micro-batches go to the chunks
    in groups of ``p``. A forward waits for the previous virtual stage's, a backward for the next's."""
    p, total = len(fwd), m * v

    def chunk(k, forward):
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    order = []
    for s in range(p):
        w = min((p - s - 1) * 2 + (v - 1) * p, total)
        ops = [("F", k) for k in range(w)]
        for i in range(total - w):
            ops += [("F", w + i), ("B", i)]
        ops += [("B", k) for k in range(total - w, total)]
        order.append([(kind, chunk(k, kind == "F"), (k // (p * v)) * p + k % p) for kind, k in ops])
    done, pos, clock = {}, [0] * p, [0.0] * p
    while any(pos[s] < len(order[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pos[s] < len(order[s]):
                kind, c, i = order[s][pos[s]]
                if kind == "F":
                    dep = ("F", c, s - 1, i) if s > 0 else ("F", c - 1, p - 1, i) if c > 0 else None
                else:
                    dep = ("B", c, s + 1, i) if s < p - 1 else ("B", c + 1, 0, i) if c < v - 1 else None
                if dep is not None and dep not in done:
                    break
                start = max(clock[s], done[dep] if dep else 0.0)
                clock[s] = start + (fwd[s] if kind == "F" else bwd[s]) / v
                done[(kind, c, s, i)] = clock[s]
                pos[s] += 1
                progressed = True
        assert progressed
    return max(clock)


@pytest.mark.parametrize("pp,m,v", [(4, 8, 7), (8, 16, 7), (4, 128, 7), (8, 16, 2), (4, 32, 1)])
def test_interleaved_schedule_fills_in_pp_minus_one_over_v(pp, m, v):
    span = _interleaved_makespan([1 / 3] * pp, [2 / 3] * pp, m, v)
    assert span - m == pytest.approx((pp - 1) / v, rel=1e-9)


def test_engine_bubble_is_megatrons_interleaved_fill_and_drain():
    # The folding rows assume one layer a virtual stage (VPP7): the engine's bubble against the event
    # simulation of Megatron's interleaved order with the stage times it reports (its closed form
    # takes the mean stage, so uneven first and last stages leave it within 1%).
    row = next(r for r in ROWS if r["id"] == "folding-ss-4")
    assert row["vpp"] == "7"
    for devices in (1024, 128):
        rep = sim.simulate(val.row_config(dict(row, devices=str(devices))))
        b = rep["breakdown_s"]
        times = [s["time_per_microbatch_s"] for s in b["per_stage"]]
        m = rep["layout"]["num_microbatches"]
        span = _interleaved_makespan([t / 3 for t in times], [2 * t / 3 for t in times], m, 7)
        assert b["pipeline_bubble"] == pytest.approx(span - m * max(times), rel=0.01)


@pytest.mark.parametrize("pp,c", [(4, 0.0), (8, 0.0), (8, 3.0)])
def test_pipeline_fill_bound_recovers_the_schedule(pp, c):
    # Throughputs from the event simulation (uniform stages, a per-step cost c micro-batch times
    # larger on the bigger device count) give back 1F1B's pp - 1 as the bound, or a looser one: it
    # is never below the schedule's true fill and drain.
    t = 1.0
    rows = []
    for i, devices in enumerate((64, 512)):
        m = 128 * 64 // devices
        step = _one_f_one_b_makespan([t / 3] * pp, [2 * t / 3] * pp, m) + (c if devices == 512 else 0.0)
        rows.append({"id": f"r{i}", "source": "s", "model": "x", "cluster": "c", "precision": "bf16",
                     "seq_length": "4096", "micro_batch_size": "1", "tp": "2", "cp": "1", "pp": str(pp), "vpp": "1",
                     "ep": "4", "etp": "1", "pipeline_layout": "", "dispatcher": "alltoall", "balance": "capacity",
                     "recompute": "none", "overlap": "", "settings": "", "metric": "mfu_noncausal", "status": "ok",
                     "devices": str(devices), "global_batch_size": str(128 * 64 // (2 * pp)),
                     "published": str(m / step)})
    (e,) = val.pipeline_fill_bound(rows)
    assert e["microbatches"] == (16, 128) and e["one_f_one_b"] == pp - 1
    if c == 0.0:
        assert e["bound"] == pytest.approx(pp - 1, rel=1e-9)
    else:
        assert e["bound"] > pp - 1


def test_folding_runs_fill_less_than_non_interleaved_1f1b():
    # The MoE Parallel Folding paper's runs of one layout at 32 and 128 micro-batches on the same
    # GPUs (Table 3 at global batch 256, Table 4 at 1024), and its sweeps to 1,024 GPUs, lose less to
    # fewer micro-batches than 1F1B without virtual stages can, whatever a micro-batch or a step
    # costs: their fill and drain is under half of pp - 1 micro-batch times on the same GPUs, and
    # under two thirds of it along the sweeps. The interleaving the rows assume fits under every bound.
    bounds = val.pipeline_fill_bound([r for r in ROWS if r["source"] == "folding"])
    assert len(bounds) == 8
    for e in bounds:
        same = e["devices"][0] == e["devices"][1]
        assert e["non_interleaved"] == e["pp"] - 1
        assert e["bound"] < (0.5 if same else 2 / 3) * e["non_interleaved"], e
        assert e["vpp"] == 7 and e["one_f_one_b"] <= e["bound"], e
    # The rows' notes quote these bounds.
    for e in bounds:
        if e["devices"][0] != e["devices"][1]:
            same = next(o for o in bounds if o["ids"][1] == e["ids"][1] and o["devices"][0] == o["devices"][1])
            for r in ROWS:
                if r["sweep"] == next(x for x in ROWS if x["id"] == e["ids"][0])["sweep"]:
                    assert (f"at most {same['bound']:.1f} and {e['bound']:.1f} micro-batch times against "
                            f"pp - 1 = {e['pp'] - 1}") in r["notes"], r["id"]
            table3 = next(x for x in ROWS if x["id"] == same["ids"][0])
            assert f"at most {same['bound']:.1f} micro-batch times against pp - 1 = {e['pp'] - 1}" in table3["notes"]


def test_microbatches_per_pipeline_names_a_bad_row():
    row = dict(next(r for r in ROWS if r["id"] == "folding-ss-4"), devices="1000")
    with pytest.raises(ValueError, match="folding-ss-4: devices 1000"):
        val.microbatches_per_pipeline(row)


def test_strong_scaling_mfu_counts_the_global_batch_over_all_gpus():
    # At 1,024 GPUs the MFU is the global batch's tokens (1,024 x 4,096, over DP = 64 pipelines of
    # 16 micro-batches) times Megatron's FLOPs a token, over the step and 1,024 x 989.5 TFLOPS.
    row = next(r for r in ROWS if r["id"] == "folding-ss-4")
    rep = sim.simulate(val.row_config(row))
    t, m, lay = rep["time"], rep["model"], rep["layout"]
    assert (lay["dp"], lay["num_microbatches"]) == (64, 16)
    tokens = 1024 * 4096
    assert t["tokens_per_s_per_device"] * 1024 * t["step_s"] == pytest.approx(tokens, rel=1e-12)
    assert m["flops_per_step_noncausal"] == pytest.approx(tokens * m["flops_per_token_noncausal"], rel=1e-12)
    assert t["mfu_noncausal"] == pytest.approx(
        tokens * m["flops_per_token_noncausal"] / (t["step_s"] * 1024 * 989.5e12), rel=1e-9)


def test_fit_imbalance_recovers_the_load_imbalance_that_made_the_numbers():
    # Published numbers made by the simulator itself at a known busiest-rank load (1.4x the mean):
    # the fit on them, with a prior too loose to pull, returns that load; rows balanced by
    # forced balance or token drop carry no information about it and do not move it.
    eff = {"hopper": dict(val.FIT_PRIORS)}
    drop = [dict(r) for r in ROWS if val.routed_unbalanced(r)]
    assert len(drop) >= 2
    for r in drop:
        r["published"] = str(val.predict([r], eff, imbalance=1.4)[0]["predicted"])
    forced = [r for r in ROWS if r["balance"] == "forced" and val.family(r) == "hopper"]
    got = val.fit_imbalance(drop + forced, eff, prior_width=100.0)
    assert got == pytest.approx(1.4, abs=2e-3)
    # No dropless row on real routing (a fold that holds out its source): the prior.
    assert val.fit_imbalance(forced, eff) == val.IMBALANCE_PRIOR


def test_imbalance_only_weighs_on_dropless_rows_on_real_routing():
    eff = {"hopper": dict(val.FIT_PRIORS)}
    drop = next(r for r in ROWS if val.routed_unbalanced(r))
    forced = next(r for r in ROWS if r["balance"] == "forced" and val.family(r) == "hopper")
    at = lambda r, imb: val.predict([r], eff, imbalance=imb)[0]["predicted"]  # noqa: E731
    assert at(drop, 1.5) < at(drop, 1.0)
    assert at(forced, 1.5) == at(forced, 1.0)
    with pytest.raises(ValueError, match="imbalance"):
        val.predict([drop], eff, imbalance=0.5)


def test_fill_bound_helpers_refuse_malformed_rows():
    good = dict(ROWS[0])
    with pytest.raises(ValueError, match="column 'tp'"):
        val.microbatches_per_pipeline({**good, "tp": "0"})
    with pytest.raises(ValueError, match="column 'micro_batch_size'"):
        val.microbatches_per_pipeline({k: v for k, v in good.items() if k != "micro_batch_size"})
    with pytest.raises(TypeError, match="row: expected a mapping"):
        val.microbatches_per_pipeline("folding-1")
    with pytest.raises(ValueError, match="lacks the column"):
        val.pipeline_fill_bound([{"id": "x"}])
    with pytest.raises(TypeError, match="rows: expected mappings"):
        val.pipeline_fill_bound(["x"])
