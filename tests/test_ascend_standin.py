"""moerail's HCCL executor and `moerail doctor` against a stand-in CANN/HCCL (the C library of
rust/moerail-device/tests/ascend_standin, built here as lib64/libascendcl.so and libhccl.so):
the counts and displacements HCCL receives, data moved for a rank's own block, errors, and
the doctor rows. There is no Ascend hardware here; the stand-in records every call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def standin(ascend_standin):
    return ascend_standin


def _run(standin, code, **env):
    e = dict(os.environ, MOERAIL_ASCEND_LIB_DIR=str(standin / "lib64"), STANDIN_LOG=str(standin / "calls.log"),
             MOERAIL_QUIET="1")
    e.update(env)
    (standin / "calls.log").unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)
    log = (standin / "calls.log").read_text().splitlines() if (standin / "calls.log").exists() else []
    return r, log


EXCHANGE = r"""
import torch
from moerail.backends.hccl import HcclExchange
root = HcclExchange.root_info()
x = HcclExchange(4, 2, root)
buf = torch.arange(6 * 8, dtype=torch.bfloat16).reshape(6, 8)
out = x.exchange(buf, [1, 0, 3, 2], [2, 1, 3, 0], stream=0xabc, check=False)  # one process of 4: no peers to agree with
assert out.shape == (6, 8), out.shape
# rank 2 sends rows 1..4 to itself; they land after the 3 rows from ranks 0 and 1
assert torch.equal(out[3:6], buf[1:4]), (out, buf)
g = x.all_gather(torch.ones(3, dtype=torch.float32), stream=7)
assert g.shape == (4, 3) and torch.equal(g[2], torch.ones(3))
for bad, arg in [(([1, 0, 3], [2, 1, 3, 0]), "send_counts"), (([1, 0, 3, 2], [2, 1, 3, 9]), "recv_displs")]:
    try:
        x.comm.alltoallv(buf, *__import__("moerail")._native.ascend.hccl_counts_from_rows(bad[0], 8),
                         torch.empty(48, dtype=torch.bfloat16), [16, 8, 24, 72], [0, 16, 24, 48], 0)
    except ValueError as e:
        assert str(e).startswith(arg) or "recv_displs" in str(e), e
    else:
        raise AssertionError("bad counts accepted")
before = buf.clone()
for args, exc, arg in [(([1, 1], [2, 1, 3, 0]), ValueError, "send_rows"), (([1, 0, 3, 2], [2, 1, -3, 6]), ValueError, "recv_rows"),
                       (([1, 0, 3, 1], [2, 1, 3, 0]), ValueError, "send_rows"), (("ab", [2, 1, 3, 0]), TypeError, "send_rows")]:
    try:
        x.exchange(buf, *args, check=False)
    except exc as e:
        assert str(e).startswith(arg), e
    else:
        raise AssertionError(f"accepted {args}")
assert torch.equal(buf, before)
try:
    x.exchange([1, 2], [1, 0, 0, 0], [1, 0, 0, 0], check=False)
except TypeError as e:
    assert str(e).startswith("buf"), e
x.close()
print("ok")
"""


def test_exchange_marshals_counts_in_elements(standin):
    r, log = _run(standin, EXCHANGE)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    a2a = [x for x in log if x.startswith("HcclAlltoAllV")]
    assert len(a2a) == 1, log  # the rejected calls never reached HCCL
    for part in ["counts=[8,0,24,16]", "sdispls=[0,8,8,32]", "type=11", "rcounts=[16,8,24,0]",
                 "rdispls=[0,16,24,48]", "comm=2/4", "stream=0xabc"]:
        assert part in a2a[0], (part, a2a[0])
    assert any("HcclAllGather" in x and "count=3 type=4 comm=2/4 stream=0x7" in x for x in log), log
    assert any(x.startswith("HcclCommInitRootInfo n=4 rank=2 root=standin-root") for x in log), log
    assert log[-1].startswith("HcclCommDestroy comm=2/4"), log


def test_hccl_error_names_the_call_and_code(standin):
    code = ("import torch\nfrom moerail.backends.hccl import HcclExchange\nx = HcclExchange(1, 0, HcclExchange.root_info())\n"
            "try:\n    x.exchange(torch.ones(2, 4), [2], [2])\nexcept RuntimeError as e:\n    print(e)\n")
    r, _ = _run(standin, code, STANDIN_FAIL="HcclAlltoAllV:9")
    assert r.returncode == 0, r.stderr
    assert "HcclAlltoAllV failed: HCCL_E_TIMEOUT" in r.stdout, r.stdout


def test_doctor_reports_cann_found_and_missing(standin):
    r, log = _run(standin, "import moerail.cli as c, sys; sys.exit(c.main(['doctor', '--json']))")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)["ascend"]
    assert a["acl"]["how"] == "MOERAIL_ASCEND_LIB_DIR" and a["hccl"]["path"].endswith("lib64/libhccl.so")
    assert a["npu_devices"] == 8 and a["acl_version"] == [8, 0, 1]
    assert sum(x.startswith("aclInit") for x in log) == 1
    empty = standin / "empty"
    empty.mkdir(exist_ok=True)
    r, _ = _run(standin, "import moerail.cli as c, sys; sys.exit(c.main(['doctor']))",
                MOERAIL_ASCEND_LIB_DIR=str(empty))
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("CANN (libascendcl)"))
    assert "not found" in line and str(empty / "libascendcl.so") in line, line
