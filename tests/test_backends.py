"""`moerail doctor`, the once-per-process "no accelerator" notice, the device bindings' checks
on a machine without a GPU, and the native stubs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moerail
from moerail import _native, backends

ROOT = Path(__file__).resolve().parent.parent


def _run(args, env=None, code=None):
    e = dict(os.environ)
    e.pop("MOERAIL_QUIET", None)
    e.update(env or {})
    cmd = [sys.executable, "-W", "default"] + (["-c", code] if code else ["-m", "moerail", *args])
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300)


def test_doctor_table_names_every_part():
    r = _run(["doctor"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for row in ["moerail", "CPU threads", "torch", "torch_npu", "megatron-core", "CUDA driver", "NVRTC",
                "kernel cache", "CANN (libascendcl)", "HCCL (libhccl)", "CPU tensors", "CUDA tensors",
                "NPU tensors", "permute", "unpermute", "topk_route", "AllToAllDispatcher exchange"]:
        assert row in out, f"{row!r} missing from:\n{out}"
    if not torch.cuda.is_available():
        assert "CUDA driver" in out and "not found" in out.split("CUDA driver", 1)[1].splitlines()[0]


def test_doctor_json_and_nvrtc_override():
    r = _run(["doctor", "--json"], env={"MOERAIL_NVRTC_PATH": "/nonexistent/libnvrtc.so.13"})
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["moerail"]["version"] == moerail.__version__
    assert {"cuda", "ascend", "ops", "packages", "cpu_threads"} <= set(rep)
    # A copy torch already loaded wins over nothing, but the override is tried first and named.
    nv = rep["cuda"].get("nvrtc_error", "")
    assert "nvrtc" in rep["cuda"] or "MOERAIL_NVRTC_PATH=/nonexistent" in nv
    if "nvrtc_error" in rep["cuda"]:
        assert "no such file" in nv
    ops = {o["op"]: o for o in rep["ops"]}
    assert ops["permute"]["cpu"].startswith("Rust")


def test_notice_once_and_quiet():
    code = "import torch, moerail\nfor _ in range(3):\n    moerail.topk_route(torch.randn(4, 4), 2)\n"
    r = _run([], code=code)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "BackendNotFoundWarning" in x]
    if torch.cuda.is_available():
        assert not lines
        return
    assert len(lines) == 1, r.stderr
    assert "CUDA:" in lines[0] and "CANN:" in lines[0] and "moerail doctor" in lines[0]
    q = _run([], env={"MOERAIL_QUIET": "1"}, code=code)
    assert q.returncode == 0 and "BackendNotFoundWarning" not in q.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_device_bindings_refuse_cpu_tensors_without_emulator():
    x = torch.randn(4, 8)
    si = torch.arange(4)
    out = torch.empty(4, 8)
    before = out.clone()
    with pytest.raises(ValueError, match="tokens: expected a CUDA tensor"):
        _native.device_gather_rows(x, si, out, 0)
    assert torch.equal(out, before) or bool(torch.isnan(before).any())
    with pytest.raises(TypeError, match="sorted_indices: expected int64"):
        _native.device_gather_rows(x, si.to(torch.int32), out, 0)
    with pytest.raises(ValueError, match="kind"):
        _native.device_workspace_bytes("nope", 1)


def test_report_without_probing_is_cheap_and_complete():
    r = backends.report(probe=False)
    assert r["cuda"].get("nvrtc") is None and "nvrtc_error" not in r["cuda"]
    assert "NVRTC" in backends.format_report(r)


def test_native_stubs_declare_every_function():
    tree = ast.parse((ROOT / "python" / "moerail" / "_native.pyi").read_text())
    declared = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    public = {n for n in dir(_native) if not n.startswith("_") and callable(getattr(_native, n))}
    assert public - declared == set(), f"missing from _native.pyi: {sorted(public - declared)}"
