"""AllToAllDispatcher with moerail's HCCL executor (``exchange="hccl"``) on 4 ranks, against the
CANN/HCCL stand-in (rust/moerail-device/tests/ascend_standin) in its rendezvous mode: its
``HcclAlltoAllV`` really moves each rank's blocks between the processes (through files), so the
whole path runs: plan -> counts and displacements in elements -> ``HcclAlltoAllV`` -> unpack.

There is no Ascend hardware here, so the rows are CPU tensors (the stand-in reads device
pointers as host pointers). Checked, per rank and strategy:

* the same checks as the gloo tests (tests/test_a2a_gloo.py): rows, weights and counts
  bit-identical to the dense reference's order, output and gradients against plain autograd,
  bytes sent against the plan;
* the output is bit-identical to the same case exchanged by torch.distributed (gloo);
* the rows went through HCCL (the stand-in's log has the rank's HcclAlltoAllV calls, one per hop
  of each of the four passes) and ``last_stats["executor"]`` says so;
* a rank that finds no HCCL makes every rank raise the same error, at once (no rank waits in the
  communicator set-up).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import a2a_gloo
import pytest
import torch

WORLD = 4
STRATEGIES = ("flat", "2dh", "dedup", "allgather")
HOPS = {"flat": 1, "2dh": 2, "dedup": 2, "allgather": 2}


def _cases():
    base = dict(seed=11, tokens=[12, 9, 0, 7], experts=8, topk=3, skew=2, rpn=2)
    cases = []
    for strat in STRATEGIES:
        for ex in ("torch", "hccl"):
            cases.append(dict(base, strategy=strat, exchange=ex, name=f"{strat} {ex}"))
    for ex in ("torch", "hccl"):
        cases.append(dict(base, seed=6, strategy="dedup", dtype=torch.bfloat16, exchange=ex, name=f"bf16 dedup {ex}"))
        cases.append(dict(base, seed=12, strategy="allgather", dtype=torch.float32, placement=[0, 4, 1, 0, 2, 5, 3, 1],
                          experts=6, exchange=ex, name=f"f32 replicas allgather {ex}"))
        cases.append(dict(base, seed=13, tokens=[30, 21, 9, 16], strategy="2dh", chunks=3, exchange=ex,
                          name=f"3 chunks 2dh {ex}"))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def run(ascend_standin, tmp_path_factory):
    rdv = tmp_path_factory.mktemp("hccl_rdv")
    log = rdv / "calls.log"
    env = {"MOERAIL_ASCEND_LIB_DIR": str(ascend_standin / "lib64"), "STANDIN_RDV_DIR": str(rdv),
           "STANDIN_LOG": str(log), "MOERAIL_QUIET": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)  # the spawned ranks inherit it
        out = a2a_gloo.spawn(a2a_gloo.worker, WORLD, CASES)
    for rank, res in out.items():
        assert not isinstance(res, str), f"rank {rank} failed:\n{res}"
    return out, log.read_text().splitlines()


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_matches_dense_reference(run, i):
    results, _ = run
    for rank in range(WORLD):
        r = results[rank][i]
        for key in ("rows_equal", "probs_equal", "counts_equal", "out_close", "grad_hidden_close",
                    "grad_probs_close", "bytes_equal"):
            assert r[key], f"rank {rank}: {key} failed ({CASES[i]['name']})"
        want = "hccl" if CASES[i]["exchange"] == "hccl" else "torch.distributed"
        assert r["executor"] == want, (rank, r["executor"])


@pytest.mark.parametrize("name", [c["name"][: -len(" hccl")] for c in CASES if c["exchange"] == "hccl"])
def test_same_bits_as_torch_distributed(run, name):
    results, _ = run
    by = {c["name"]: i for i, c in enumerate(CASES)}
    for rank in range(WORLD):
        a = results[rank][by[f"{name} torch"]]["out"]
        b = results[rank][by[f"{name} hccl"]]["out"]
        assert torch.equal(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)), (rank, name)


def test_rows_went_through_hccl(run):
    """Every rank's HcclAlltoAllV calls: one per hop of the four passes of each HCCL case (the
    chunked case: per chunk), with counts in elements of one packed row (row bytes, as uint8)."""
    _, log = run
    calls = [x for x in log if x.startswith("HcclAlltoAllV send=")]
    expected = 0
    for c in CASES:
        if c["exchange"] == "hccl":
            expected += 4 * HOPS[c["strategy"]] * c.get("chunks", 1)
    for rank in range(WORLD):
        mine = [x for x in calls if f"comm={rank}/{WORLD}" in x]
        assert len(mine) == expected, (rank, len(mine), expected)
        assert all(" type=7 " in x for x in mine), mine[:2]  # packed rows travel as uint8 (HCCL_DATA_TYPE_UINT8)
    # Counts sent by one rank equal what its peers expected to receive (the stand-in checks it
    # and fails the call otherwise): no "expected" line was logged.
    assert not [x for x in log if "expected" in x], [x for x in log if "expected" in x][:3]
    sizes = [int(n) for x in calls for n in re.findall(r"counts=\[([0-9,]+)\]", x)[0].split(",")]
    assert sum(sizes) > 0


def test_rank_without_hccl_fails_everywhere(ascend_standin, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"MOERAIL_ASCEND_LIB_DIR": str(ascend_standin / "lib64"), "STANDIN_RDV_DIR": str(tmp_path),
           "MOERAIL_QUIET": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        out = a2a_gloo.spawn(a2a_gloo.hccl_unavailable_worker, 2, str(empty))
    for rank in range(2):
        err = out[rank]
        assert err and "HCCL executor: not available on rank(s) 1" in err, (rank, err)
        assert str(empty) in err, err  # names where it looked


def test_exchange_arguments_that_disagree_fail_everywhere(ascend_standin, tmp_path):
    # HcclExchange.exchange's fixed-size header: before it, counts that disagree went to
    # HcclAlltoAllV (on real HCCL: a hang or rows read past a buffer), and a rank whose own
    # arguments failed left its peer waiting in the collective.
    env = {"MOERAIL_ASCEND_LIB_DIR": str(ascend_standin / "lib64"), "STANDIN_RDV_DIR": str(tmp_path),
           "MOERAIL_QUIET": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        out = a2a_gloo.spawn(a2a_gloo.hccl_mismatch_worker, 2, timeout=150)
    for rank in range(2):
        assert not isinstance(out[rank], str), f"rank {rank} failed:\n{out[rank]}"
    want = {
        "counts": ["RuntimeError: HCCL exchange: the ranks' send_rows and recv_rows disagree: rank 1 sends rank 0 3 "
                   "rows, rank 0 expects 2"] * 2,
        "row": ["RuntimeError: HCCL exchange: the ranks disagree on the configuration (row shape, dtype)"] * 2,
        "bad_args": ["RuntimeError: HCCL exchange: rank(s) [1] rejected their arguments",
                     "ValueError: send_rows: expected 2 entries (one per rank), got 3"],
    }
    for name, msgs in want.items():
        for rank in range(2):
            assert out[rank][name].startswith(msgs[rank]), (name, rank, out[rank][name])
    # Rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 2 to rank 0 and 2 to itself.
    assert out[0]["after"] == ((3, 8), [0.0, 100.0, 108.0])
    assert out[1]["after"] == ((4, 8), [8.0, 16.0, 116.0, 124.0])


BAD_ARGS = r"""
import os, torch, torch.distributed as dist
from datetime import timedelta
import moerail
dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=0, world_size=1)
for exchange, exc in [("nccl", ValueError), (object(), TypeError), (42, TypeError)]:
    try:
        moerail.AllToAllDispatcher(4, None, ranks_per_node=1, exchange=exchange)
    except exc as e:
        assert str(e).startswith("exchange: expected 'auto', 'torch', 'hccl' or an object"), e
    else:
        raise AssertionError(f"exchange={exchange!r} accepted")
disp = moerail.AllToAllDispatcher(4, None, ranks_per_node=1, timeout=timedelta(seconds=20))
h = torch.randn(5, 8)
probs, rmap = moerail.topk_route(torch.randn(5, 4), 2)
snap = (h.clone(), probs.clone(), rmap.clone())
for args, arg in [((h, probs.to("meta"), rmap), "probs"), ((h, probs, rmap.to("meta")), "routing_map")]:
    try:
        disp.dispatch(*args)
    except ValueError as e:
        assert str(e).startswith(f"{arg}: expected a tensor on cpu (the device of hidden)"), e
    else:
        raise AssertionError(f"{arg} on meta accepted")
assert torch.equal(h, snap[0]) and torch.equal(probs, snap[1]) and torch.equal(rmap, snap[2])
rows, tpe, rp = disp.dispatch(h, probs, rmap)  # the group still works after the rejected calls
assert rows.shape == (10, 8) and int(tpe.sum()) == 10 and disp.last_stats["executor"] == "torch.distributed"
dist.destroy_process_group()
print("ok")
"""


def test_bad_exchange_and_device_arguments(tmp_path):
    env = dict(os.environ, STORE=str(tmp_path / "store"), MOERAIL_QUIET="1")
    r = subprocess.run([sys.executable, "-c", BAD_ARGS], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
