"""Megatron-Core's own training loop with moerail switched on (examples/megatron_pretrain.py), small:
``GPTModel`` from Megatron's local layer spec (attention + MoE layers, sigmoid router with aux loss,
z-loss and the aux-loss-free expert bias), Megatron's ``DistributedDataParallel``,
``get_megatron_optimizer`` (Adam), ``get_forward_backward_func()`` and ``finalize_model_grads``, 4
gloo ranks. The reference is Megatron itself: the stock arm (its alltoall dispatcher) trained side by
side, same weights, same data, in the same processes.

* arms stock / patched (``patch_moe_utils()``) / moerail (moerail's router and ``AllToAllDispatcher``
  via ``use_moerail``) give the same loss at every one of 30 steps (relative difference <= 1e-5)
  and the same parameters at the end, in three layouts: TP1/PP1/EP4, TP2/EP2 (folded, expert TP 1,
  sequence parallel) and PP2/EP2 (1F1B);
* the overlap arm (``use_moerail(num_chunks=2)``: dispatch, experts and combine as one chunked
  pipeline, the exchange of one chunk in a helper thread while the experts compute the other,
  forward and backward) gives stock's loss at every step too;
* bad configurations stop at start-up with one clear message on every rank (no hang).

moerail's router ops are within fp32 rounding of Megatron's, not bit-identical (sigmoid, z-loss): the
trajectories stay together until a top-k near tie routes a token differently; at these sizes none
does in 30 steps.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "megatron_pretrain.py"
SMALL = ["--layers", "2", "--hidden", "32", "--ffn", "32", "--heads", "4", "--experts", "8", "--topk", "2",
         "--seq", "32", "--micro-batch", "1", "--micro-batches", "2", "--no-progress"]

pytest.importorskip("megatron.core")


def test_arms_match_in_megatrons_loop(tmp_path):
    steps = 30
    cmd = [sys.executable, str(EXAMPLE), "--arms", "stock,patched,moerail", "--layouts", "1x1x4,2x1x2,1x2x2",
           "--steps", str(steps), *SMALL, "--out", str(tmp_path)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads((tmp_path / "results.json").read_text())
    print(f"3 layouts x 3 arms x {steps} steps in {time.monotonic() - t0:.0f} s; megatron-core {res['megatron_core']}")
    assert len(res["runs"]) == 3
    for run in res["runs"]:
        c = run["config"]
        lay = f"TP{c['tp']} PP{c['pp']} EP{c['ep']}"
        arms = run["arms"]
        stock = arms["stock"]["loss"]
        assert len(stock) == steps
        assert stock[-1] < stock[0] - 0.3, f"{lay}: the loss goes down ({stock[0]:.3f} -> {stock[-1]:.3f})"
        for name in ("patched", "moerail"):
            loss = arms[name]["loss"]
            rel = [abs(a - b) / abs(a) for a, b in zip(stock, loss)]
            worst = max(range(steps), key=lambda i: rel[i])
            assert rel[worst] <= 1e-5, f"{lay}, {name}: step {worst + 1} loss {loss[worst]} vs stock {stock[worst]}"
            d = run["param_diff_vs_first"][name]
            assert not d["names_differ"], f"{lay}, {name}: moerail adds or drops no parameter"
            # Adam divides by sqrt(v): an fp32 rounding in a near-zero gradient is a visible change of
            # that element's update, so parameters get a looser bound than the loss.
            assert d["max_norm_rel"] <= 5e-5, f"{lay}, {name}: parameters at the end differ: {d}"
            print(f"{lay} {name}: largest loss rel diff {rel[worst]:.2g}, params {d['max_norm_rel']:.2g}")
        assert set(arms["stock"]["strategy"]) == {"megatron alltoall"}
        assert set(arms["moerail"]["strategy"]) <= {"flat", "2dh", "dedup", "allgather"}
        bd = arms["moerail"]["breakdown"][-1]
        assert bd["exchange"] > 0 and bd["experts"] > 0 and bd["optimizer"] > 0


def test_overlapped_pipeline_matches_stock(tmp_path):
    steps = 30
    cmd = [sys.executable, str(EXAMPLE), "--arms", "stock,overlap", "--num-chunks", "2", "--steps", str(steps),
           *SMALL, "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    stock, loss = run["arms"]["stock"]["loss"], run["arms"]["overlap"]["loss"]
    rel = [abs(a - b) / abs(a) for a, b in zip(stock, loss)]
    assert len(loss) == steps and max(rel) <= 1e-5, rel
    assert run["param_diff_vs_first"]["overlap"]["max_norm_rel"] <= 5e-5, run["param_diff_vs_first"]
    bd = run["arms"]["overlap"]["breakdown"][-1]
    # The pipeline times its exchanges itself: some waited for, some run beside the experts.
    assert bd["exchange"] > 0 and bd["exchange hidden"] > 0 and bd["experts"] > 0


BAD = [
    (["--ep", "3"], "EP 3 does not divide"),
    (["--experts", "2", "--topk", "1"], "EP 4 is larger than the 2 experts"),
    (["--strategy", "fastest"], "moerail knows auto, flat, 2dh, dedup, allgather"),
    (["--layouts", "1x2x4"], "EP 4 does not divide the 2 ranks"),
    (["--tp", "3"], "TP 3 x PP 1 does not divide the 4 ranks"),
    (["--pp", "2", "--ep", "2", "--layers", "3"], "PP 2 does not divide the 3 layers"),
]


@pytest.mark.parametrize("bad,msg", BAD, ids=[m for _, m in BAD])
def test_bad_configuration_message(bad, msg):
    sys.path.insert(0, str(EXAMPLE.parent))
    import megatron_pretrain

    err = megatron_pretrain.check_config(megatron_pretrain.parse_args([*SMALL, *bad]))
    assert err is not None and msg in err, err


def test_bad_configuration_one_message_every_rank():
    bad, msg = BAD[0]
    # The launcher refuses before starting anything ...
    r = subprocess.run([sys.executable, str(EXAMPLE), *SMALL, *bad], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("megatron_pretrain:") == 1
    # ... and so does every rank started on its own (e.g. by torchrun), before any collective: no
    # rank waits for another (the master address is never contacted).
    procs = [subprocess.Popen([sys.executable, str(EXAMPLE), *SMALL, *bad, "--worker", str(rank), "--master",
                               "127.0.0.1:1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
             for rank in range(4)]
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2, err[-2000:]
        assert f"megatron_pretrain (rank {rank}): " in err and msg in err, err[-2000:]


def test_each_emulated_node_gets_its_own_cores(monkeypatch):
    """``--pin-nodes``: the 2 emulated nodes split the cores this process may use in halves, so a node
    waiting on the link cannot lend its cores to the other (as real nodes cannot)."""
    sys.path.insert(0, str(EXAMPLE.parent))
    import megatron_pretrain

    def cores(*argv):
        return megatron_pretrain._node_cores(megatron_pretrain.parse_args([*SMALL, *argv]))

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5})
    assert cores() == [[0, 1], [2, 3]]
    assert cores("--pin-nodes", "off") is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {7})
    assert cores() is None  # auto: one core cannot be split, every rank shares it
    with pytest.raises(SystemExit, match="--pin-nodes on needs 2 or more CPU cores"):
        cores("--pin-nodes", "on")
