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
