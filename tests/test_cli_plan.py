"""``moerail plan`` and ``moerail --version`` as a first user meets them: what is missing is named
by its flag, a search that finds nothing says which constraint failed and exits 1, and the chosen
layout is printed as Megatron-LM flags that Megatron-LM's own argument parser reads back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import moerail
from moerail import cli

BASE = ["plan", "--model", "Mixtral-8x7B", "--cluster", "H100-SXM", "--quiet"]


def run(capsys, *argv):
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_version():
    r = subprocess.run([sys.executable, "-m", "moerail", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"moerail {moerail.__version__}"


def test_missing_batch_size_is_named(capsys):
    rc, out, err = run(capsys, *BASE, "--devices", "64")
    assert rc == 2 and out == ""
    assert err.startswith("moerail plan: error: --gbs: no global batch size") and "0 fit" not in err


def test_missing_cluster_is_named(capsys):
    rc, out, err = run(capsys, "plan", "--model", "Mixtral-8x7B", "--devices", "64", "--gbs", "512", "--quiet")
    assert rc == 2 and "--cluster: no accelerator described" in err and "H100-SXM" in err
    assert "peak_tflops_bf16: is required" not in err


def test_nothing_searched_exits_nonzero_with_the_constraint(capsys):
    rc, out, err = run(capsys, *BASE, "--devices", "100", "--gbs", "512")
    assert rc == 1 and "searched 0 layouts" in out
    assert "nothing searched: no data-parallel size divides the global batch" in err
    assert "--gbs 512" in err


def test_no_fit_names_memory(capsys):
    rc, out, err = run(capsys, *BASE, "--devices", "2", "--gbs", "64")
    assert rc == 1
    assert "no layout fits: memory: the smallest of the" in err and "GiB a device" in err


def _megatron_parse(flags):
    """Megatron-LM's own argument parser (megatron.training.arguments) on the flags, or None when
    this megatron-core wheel does not ship megatron.training."""
    try:
        from megatron.training.arguments import parse_args  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - megatron-core wheels do not ship megatron.training
        return None
    old = sys.argv
    sys.argv = ["pretrain_gpt.py", *flags]
    try:
        return parse_args(ignore_unknown_args=True)
    finally:
        sys.argv = old


def test_search_prints_megatron_flags_of_the_best(capsys):
    # Recomputation Megatron's flags can say (a per-layer memory plan, 'plan', comes from
    # `moerail plan --memory` for the chosen layout, not from these flags).
    space = ("--space", "recompute=none,light,heavy,full")
    rc, out, err = run(capsys, *BASE, "--devices", "64", "--gbs", "512", "--top", "2", *space)
    assert rc == 0, err
    line = out.split("Megatron-LM flags of #1:")[1].strip().splitlines()[0].split()
    rc, js, _ = run(capsys, *BASE, "--devices", "64", "--gbs", "512", "--top", "2", "--json", *space)
    res = json.loads(js)
    assert res["megatron_flags"] == line
    best = {**res["results"][0]["layout"], **res["results"][0]["report"]["layout"]}
    # The flags round-trip through moerail's own reader of Megatron command lines ...
    cfg, ignored = moerail.sim.parse_megatron_args(" ".join(line))
    lay = cfg["layout"]
    assert lay["tensor_model_parallel_size"] == best["tp"] and lay["pipeline_model_parallel_size"] == best["pp"]
    assert lay["expert_model_parallel_size"] == best["ep"] and lay["expert_tensor_parallel_size"] == best["etp"]
    assert cfg["training"]["micro_batch_size"] == best["micro_batch_size"]
    assert cfg["training"]["global_batch_size"] == 512
    assert not ignored
    # ... and simulating the model with the layout and training settings they say gives the
    # search's numbers for that layout (the flags leave nothing the simulation assumed unsaid).
    said = {f"{sec}.{k}": v for sec in ("layout", "training") for k, v in cfg[sec].items()}
    rep = moerail.sim.simulate(None, model="Mixtral-8x7B", cluster="H100-SXM", devices=64, **said)
    assert rep["time"]["step_s"] == pytest.approx(res["results"][0]["report"]["time"]["step_s"], rel=1e-9)
    args = _megatron_parse(line)
    if args is not None:
        assert args.tensor_model_parallel_size == best["tp"] and args.expert_model_parallel_size == best["ep"]


def test_search_whose_best_needs_a_memory_plan_says_how_to_get_it(capsys):
    # Without --space the best layout may fit only with a per-layer plan, which Megatron's
    # one-setting-for-every-layer flags cannot say: the output says so, and the command it names
    # (the printed flags plus --memory at the device's capacity) prints a plan that fits.
    rc, out, err = run(capsys, *BASE, "--devices", "64", "--gbs", "512", "--top", "1")
    assert rc == 0, err
    rows = out.split("Megatron-LM flags of #1:")
    best_row = [x for x in rows[0].splitlines() if x.strip().startswith("1 ")][0]
    flags, note = rows[1].strip().splitlines()[:2]
    if " plan " not in best_row:
        pytest.skip("the best layout fits without a memory plan with these presets")
    assert "per-layer memory plan" in note and "--memory" in note
    mem = note.split("--memory ")[1].split("`")[0]
    rc, out, err = run(capsys, *BASE, "--devices", "64", "--megatron-args", flags.strip(), "--memory", mem)
    assert rc == 0, err
    assert "predicted peak" in out and "Megatron flags:" in out


def test_simulation_prints_megatron_flags(capsys):
    rc, out, err = run(capsys, *BASE, "--devices", "64", "--gbs", "512", "--tp", "2", "--pp", "4", "--ep", "8")
    assert rc == 0, err
    flags = out.split("Megatron-LM flags: ")[1].split()
    assert flags[:4] == ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4"]
    assert "--sequence-parallel" in flags and flags[flags.index("--expert-model-parallel-size") + 1] == "8"


@pytest.mark.parametrize("recompute,config", [
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
     {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}),
    (["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "moe_act"],
     {"recompute_granularity": "selective", "recompute_modules": ["layernorm", "moe_act"]}),
])  # fmt: skip
def test_simulated_recompute_comes_back_as_the_same_megatron_flags(capsys, recompute, config):
    # The report carries the recomputation as Megatron's TransformerConfig fields (its label for
    # tables beside them); the printed flags are built from those fields, and say what was given.
    import json

    args = [*BASE, "--devices", "64", "--gbs", "512", "--tp", "2", "--pp", "4", "--ep", "8",
            "--megatron-args", " ".join(["--sequence-parallel", *recompute])]  # fmt: skip
    rc, out, err = run(capsys, *args, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    got = rep["layout"]["recompute_config"]
    assert {**got, **({"recompute_modules": sorted(got["recompute_modules"])} if "recompute_modules" in got else {})} == config
    label = {"full": "full/block/2", "selective": "selective/" + ",".join(got.get("recompute_modules", []))}
    assert rep["layout"]["recompute"] == label[config["recompute_granularity"]]
    flags = rep["megatron_flags"]
    i = flags.index("--recompute-granularity")
    given = recompute if config["recompute_granularity"] == "full" else [*recompute[:3], *got["recompute_modules"]]
    assert flags[i:i + len(given)] == given
