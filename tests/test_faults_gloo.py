"""Issue 15: distributed faults on gloo. Ranks that disagree on num_experts, the placement
slots, ranks_per_node, the strategy, the dtype or the hidden size (and a LoadTracker or a
migration over ranks that disagree) all raise moerail's own error, the same on every rank, and
the group still works; a peer that exits, is killed or never arrives makes the surviving rank
raise moerail's message within its timeout, and its process exits. With expert tensor parallelism
(EP2 x ETP2 on 4 ranks), EP groups configured otherwise, or a rank whose dispatch failed, make
every rank of the ETP groups raise too."""

from __future__ import annotations

import fault_gloo
import pytest
from a2a_gloo import free_port


def _spawn(target, world, *args, timeout=150, reporters=None):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world if reporters is None else reporters):
            try:
                rank, res = q.get(timeout=timeout)
            except Exception:  # noqa: BLE001 - a rank that reports nothing
                break
            out[rank] = res
    finally:
        codes = {}
        for r, p in enumerate(procs):
            p.join(timeout=20 if r in out else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
                codes[r] = "killed by the test"
            else:
                codes[r] = p.exitcode
    return out, codes


@pytest.fixture(scope="module")
def mismatches():
    return _spawn(fault_gloo.mismatch_worker, 2)


EXPECTED = {
    "num_experts": "disagree on the dispatcher configuration",
    "slots": "disagree on the dispatcher configuration",
    "ranks_per_node": "disagree on the dispatcher configuration",
    "strategy": "disagree on the dispatcher configuration",
    "dtype": "disagree on the dispatcher configuration",
    "hidden": "disagree on the dispatcher configuration",
    "placement_switched": "disagree on the dispatcher configuration",
    "hidden_reused": "disagree on the dispatcher configuration",
    "tracker": "LoadTracker.group: the ranks disagree",
    "migration": "migrate_experts: the ranks disagree",
}


@pytest.mark.parametrize("name", fault_gloo.MISMATCHES)
def test_mismatch_raises_the_same_error_on_every_rank(mismatches, name):
    out, codes = mismatches
    assert set(out) == {0, 1}, (out, codes)
    for rank in (0, 1):
        assert "crash" not in out[rank], out[rank]["crash"][0]
        msg, secs = out[rank][name]
        assert msg.startswith("RuntimeError: ") and EXPECTED[name] in msg, (rank, msg)
        assert secs < 15, (rank, secs)
    assert out[0][name][0] == out[1][name][0]  # the same message on every rank
    assert codes == {0: 0, 1: 0}, codes


def test_the_group_works_after_the_rejected_calls(mismatches):
    out, _ = mismatches
    for rank in (0, 1):
        assert out[rank]["after"][0].startswith("ok"), out[rank]


@pytest.fixture(scope="module")
def etp_mismatches():
    return _spawn(fault_gloo.etp_worker, 4)


@pytest.mark.parametrize("name", fault_gloo.ETP_MISMATCHES)
def test_etp_mismatch_raises_on_every_rank(etp_mismatches, name):
    # EP2 x ETP2: each EP group agrees with itself, the ETP groups see the mismatch. Before the
    # ETP header, the count vectors of another length (or rows of another width) went straight
    # into gloo's all-gather.
    out, codes = etp_mismatches
    assert set(out) == {0, 1, 2, 3}, (out, codes)
    for rank in range(4):
        assert "crash" not in out[rank], out[rank]["crash"][0]
        msg, secs = out[rank][name]
        assert secs < 15, (rank, secs)
        if name == "etp_bad_args":
            want = {1: "ValueError: routing_map", 3: "RuntimeError: ep_group: rank(s) [0] rejected their dispatch"}.get(
                rank, "RuntimeError: etp_group: rank(s) [1] rejected their dispatch arguments")
            assert msg.startswith(want), (rank, msg)
        else:
            assert msg.startswith("RuntimeError: etp_group: the ranks disagree on the expert-tensor-parallel "
                                  "configuration"), (rank, msg)
    if name != "etp_bad_args":
        assert out[0][name][0] == out[1][name][0] and out[2][name][0] == out[3][name][0]
    assert codes == {r: 0 for r in range(4)}, codes


def test_etp_group_works_after_the_rejected_calls(etp_mismatches):
    out, _ = etp_mismatches
    for rank in range(4):
        assert out[rank]["after"][0].startswith("ok"), out[rank]


@pytest.mark.parametrize("mode", ["exits", "killed", "never_arrives"])
def test_peer_failure_raises_moerails_message_and_exits(mode):
    out, codes = _spawn(fault_gloo.peer_worker, 2, mode, timeout=60, reporters=1)
    assert 0 in out, (out, codes)
    msg, secs = out[0]
    assert msg.startswith("RuntimeError: ep_group: "), msg
    assert secs < 8 + 10, secs  # within its timeout (8 s) and a little
    assert codes[0] == 0, codes
