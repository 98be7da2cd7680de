"""Worker of tests/test_faults_gloo.py (issue 15): ranks that disagree on the configuration, and
peers that exit, are killed or never arrive. Each surviving rank reports the message it raised
and then exits (os._exit, so no process-group teardown can hang it)."""

from __future__ import annotations

import os
import signal
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import moerail

HIDDEN = 8

MISMATCHES = ["num_experts", "slots", "ranks_per_node", "strategy", "dtype", "hidden", "placement_switched",
              "hidden_reused", "tracker", "migration"]


def _inputs(rank: int, experts: int, hidden: int = HIDDEN, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + rank)
    logits = torch.randn(6, experts, generator=g)
    probs, rmap = moerail.topk_route(logits, 2)
    return torch.randn(6, hidden, generator=g).to(dtype), probs, rmap


def _dispatch(rank: int, experts=4, rpn=1, strategy="flat", placement=None, hidden=HIDDEN, dtype=torch.float32,
              timeout=20):
    disp = moerail.AllToAllDispatcher(experts, None, ranks_per_node=rpn, strategy=strategy, placement=placement,
                                      timeout=timedelta(seconds=timeout))
    h, p, m = _inputs(rank, experts, hidden, dtype)
    return disp.dispatch(h, p, m)


def _mismatch(name: str, rank: int) -> None:
    odd = rank == 1
    if name == "num_experts":
        _dispatch(rank, experts=8 if odd else 4)
    elif name == "slots":
        # Rank 1 places 6 slots (2 redundant) for the same 4 experts: a longer count vector.
        _dispatch(rank, placement=torch.tensor([0, 1, 2, 3, 0, 1]) if odd else None)
    elif name == "ranks_per_node":
        _dispatch(rank, rpn=2 if odd else 1, strategy="2dh")
    elif name == "strategy":
        _dispatch(rank, strategy="dedup" if odd else "flat")
    elif name == "dtype":
        _dispatch(rank, dtype=torch.float64 if odd else torch.float32)
    elif name == "hidden":
        _dispatch(rank, hidden=16 if odd else HIDDEN)
    elif name in ("placement_switched", "hidden_reused"):
        # One dispatcher, agreed once (its configuration hash cached), then configured otherwise on
        # rank 1: a new placement of the same slots, or other rows.
        disp = moerail.AllToAllDispatcher(4, None, ranks_per_node=1, timeout=timedelta(seconds=20))
        h, p, m = _inputs(rank, 4)
        disp.dispatch(h, p, m)
        if odd and name == "placement_switched":
            disp.set_placement(torch.tensor([1, 0, 3, 2]))
        if odd and name == "hidden_reused":
            h, p, m = _inputs(rank, 4, hidden=16)
        disp.dispatch(h, p, m)
    elif name == "tracker":
        tr = moerail.LoadTracker(1, 8 if odd else 4, group=dist.group.WORLD)
        tr.record(0, torch.ones(8 if odd else 4))
        tr.step()
    elif name == "migration":
        old = moerail.default_placement(1, 4, 2)
        new = old.flip(1) if odd else old.roll(1, 1)
        plan = moerail.plan_migration(old, new, 2, expert_bytes=64.0)
        slots = [[[torch.full((4,), float(rank * 10 + s))] for s in range(2)]]
        moerail.migrate_experts(plan, slots)
    else:
        raise AssertionError(name)


def mismatch_worker(rank: int, world: int, port: int, out_q) -> None:
    os.environ["MOERAIL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    res = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        for name in MISMATCHES:
            t0 = time.monotonic()
            try:
                _mismatch(name, rank)
                res[name] = ("no error", time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - reported to the parent
                res[name] = (f"{type(e).__name__}: {e}", time.monotonic() - t0)
        # The group still works after every rejected call.
        out = _dispatch(rank)
        res["after"] = (f"ok {tuple(out[0].shape)}", 0.0)
    except BaseException:  # noqa: BLE001
        res["crash"] = (traceback.format_exc(), 0.0)
    out_q.put((rank, res))
    out_q.close()
    out_q.join_thread()
    os._exit(0)


ETP_MISMATCHES = ["etp_num_experts", "etp_hidden", "etp_bad_args"]


def _etp_mismatch(name: str, rank: int, ep_group, etp_group) -> None:
    """EP2 x ETP2 on 4 ranks (ETP groups {0,1} {2,3}, EP groups {0,2} {1,3}): the EP group of
    ranks 1 and 3 is configured otherwise, so each EP group agrees with itself and only the ETP
    gathers (count vectors of the local experts, then rows of the hidden size) see the mismatch."""
    odd = rank % 2 == 1
    experts, hidden = 4, HIDDEN
    if name == "etp_num_experts":
        experts = 8 if odd else 4  # 4 local experts against 2: count vectors of another length
    elif name == "etp_hidden":
        hidden = 16 if odd else HIDDEN  # rows of another width
    disp = moerail.AllToAllDispatcher(experts, ep_group, ranks_per_node=1, strategy="flat", etp_group=etp_group,
                                      timeout=timedelta(seconds=20))
    h, p, m = _inputs(rank, experts, hidden)
    if name == "etp_bad_args" and rank == 1:
        m = m[:, :3]  # a routing map of the wrong width: rank 1's own ValueError
    disp.dispatch(h, p, m)


def etp_worker(rank: int, world: int, port: int, out_q) -> None:
    os.environ["MOERAIL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    res = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        etp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        ep_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        ep, etp = ep_groups[rank % 2], etp_groups[rank // 2]
        for name in ETP_MISMATCHES:
            t0 = time.monotonic()
            try:
                _etp_mismatch(name, rank, ep, etp)
                res[name] = ("no error", time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - reported to the parent
                res[name] = (f"{type(e).__name__}: {e}", time.monotonic() - t0)
        disp = moerail.AllToAllDispatcher(4, ep, ranks_per_node=1, etp_group=etp, timeout=timedelta(seconds=20))
        out = disp.dispatch(*_inputs(rank, 4))
        res["after"] = (f"ok {tuple(out[0].shape)}", 0.0)
    except BaseException:  # noqa: BLE001
        res["crash"] = (traceback.format_exc(), 0.0)
    out_q.put((rank, res))
    out_q.close()
    out_q.join_thread()
    os._exit(0)


def peer_worker(rank: int, world: int, port: int, mode: str, out_q) -> None:
    """Rank 1 exits, is killed, or never arrives at the dispatch; rank 0 dispatches."""
    os.environ["MOERAIL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    dist.barrier()
    if rank == 1:
        if mode == "exits":
            os._exit(3)
        if mode == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)  # never arrives; the parent kills it
        os._exit(0)
    t0 = time.monotonic()
    try:
        _dispatch(rank, timeout=8)
        msg = "no error"
    except Exception as e:  # noqa: BLE001 - reported to the parent
        msg = f"{type(e).__name__}: {e}"
    out_q.put((rank, (msg, time.monotonic() - t0)))
    out_q.close()
    out_q.join_thread()
    os._exit(0)
