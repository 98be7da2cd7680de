"""AllToAllDispatcher with its tokens on a device: the rows are packed, exchanged and summed where
they live, and the results are the CPU run's bits (tests/a2a_device_worker.py: every strategy,
fp32 and bf16, dropless and with a capacity, forward and backward through moerail's router).

* ``emulator``: 2 gloo ranks whose sums run through moerail's CUDA unpermute kernel on the
  CPU emulator (tests/cuda_emu), as they do on a GPU;
* ``cuda``: the GPUs torch sees (up to 2), NCCL. Skips, with the reason, where there is none.

The reference is the same worker on 2 (or as many) gloo ranks with CPU tensors and the Rust
kernels, which tests/test_a2a_gloo.py checks against a dense reference.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emu

WORKER = Path(__file__).with_name("a2a_device_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, device: str, backend: str, out: Path, **env) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    port = _port()
    base = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DEVICE=device,
                BACKEND=backend, OUT=str(out), MOERAIL_QUIET="1", MOERAIL_NUM_THREADS="1", **env)
    procs = [subprocess.Popen([sys.executable, str(WORKER)], env=dict(base, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errs.append(err[-3000:])
    assert not errs, "\n".join(errs)
    return {r: torch.load(out / f"rank{r}.pt") for r in range(world)}


@pytest.mark.parametrize("where", ["emulator", "cuda"])
def test_device_dispatch_matches_cpu(where, tmp_path):
    if where == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU here (torch.cuda.is_available() is False); this runs on a GPU machine")
        world = min(2, torch.cuda.device_count())
        got = _run(world, "cuda", "nccl", tmp_path / "cuda")
    else:
        try:
            lib = cuda_emu.build()
        except cuda_emu.Unavailable as e:
            pytest.skip(str(e))
        world = 2
        got = _run(world, "cpu", "gloo", tmp_path / "emu", MOERAIL_CUDA_EMULATOR=lib)
    ref = _run(world, "cpu", "gloo", tmp_path / "cpu")
    for rank in range(world):
        assert set(got[rank]) == set(ref[rank])
        for case, r in ref[rank].items():
            g = got[rank][case]
            assert g["executor"] == "torch.distributed"
            for what, want in r.items():
                if what == "executor":
                    continue
                have = g[what]
                assert have.dtype == want.dtype and have.shape == want.shape, (rank, case, what)
                assert torch.equal(have, want), (rank, case, what, (have.double() - want.double()).abs().max())


def test_dispatcher_sums_skip_the_value_checks_in_their_thread_only(monkeypatch):
    """The dispatcher's sums use indices it built itself: inside ``trusted_indices`` the device
    path's value checks (a host sync each) are off, in that thread only, and back on after."""
    import threading

    from moerail.backends import cuda as _device

    monkeypatch.setattr(_device, "_CHECKS", True)
    t = torch.empty(1)
    seen = []
    assert _device._value_checks(t)
    with _device.trusted_indices():
        assert not _device._value_checks(t)
        th = threading.Thread(target=lambda: seen.append(_device._value_checks(t)))
        th.start()
        th.join()
        with _device.trusted_indices():
            pass
        assert not _device._value_checks(t)
    assert seen == [True] and _device._value_checks(t)
