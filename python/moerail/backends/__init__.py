"""Which accelerator backends this process can use, and ``moerail doctor``.

moerail's wheel carries no CUDA or CANN code that is linked at build time: the CUDA kernels are
compiled by NVRTC on first use (``moerail.backends.cuda``) and CANN/HCCL are opened with the dynamic
loader. :func:`report` looks for each part and says what it found, or why not;
:func:`format_report` renders the table ``moerail doctor`` prints. :func:`notice_cpu_only` is
what the ops call the first time they run on CPU tensors: when neither CUDA nor CANN is usable
it says so once (a :class:`BackendNotFoundWarning`), naming what was not found.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import threading
import warnings
from typing import Any, Dict, List, Optional

import torch

from .. import _native
from . import cuda as _device

__all__ = ["BackendNotFoundWarning", "report", "format_report", "notice_cpu_only"]


class BackendNotFoundWarning(UserWarning):
    """No accelerator backend was found; moerail runs its ops on the CPU."""


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ascend(probe: bool) -> Dict[str, Any]:
    try:
        return dict(_native.ascend.ascend_status(probe))
    except Exception as e:  # the loader itself reports every expected failure as text
        return {"acl_error": f"status failed: {e}", "hccl_error": f"status failed: {e}"}


def _cuda_usable(cuda: Dict[str, Any]) -> bool:
    return "driver" in cuda and bool(cuda["driver"].get("devices")) and "nvrtc_error" not in cuda


def report(probe: bool = True) -> Dict[str, Any]:
    """Everything ``moerail doctor`` shows, as a dict. ``probe=False`` skips loading NVRTC and
    initialising CANN (only cheap lookups)."""
    cuda = _device.status(probe_driver=True, probe_nvrtc=probe)
    ascend = _ascend(probe)
    npu = _version("torch_npu") or _version("torch-npu")
    cuda_ok = _cuda_usable(cuda) if probe else "driver" in cuda and bool(cuda["driver"].get("devices"))
    return {
        "moerail": {"version": _native.__version__, "native": _native.__file__},
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu_threads": {"moerail": _native.util.get_num_threads(), "os": os.cpu_count(),
                        "torch": torch.get_num_threads()},
        "packages": {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "torch_npu": npu,
            "megatron-core": _version("megatron-core"),
            "mindspore": _version("mindspore"),
        },
        "cuda": cuda,
        "ascend": ascend,
        "ops": op_backends(cuda_ok, npu is not None, cuda),
    }


_KERNEL_OPS = ["topk_route", "routing_scores_for_aux_loss", "permute", "permute_by_indices", "unpermute",
               "sort_chunks_by_idxs"]
_TORCH_OPS = ["apply_token_dropping", "switch/sequence load-balancing loss", "z_loss", "expert_bias_update"]


# NPU tensors (moerail.backends.npu): torch_npu's fused permutes where they give moerail's result, torch
# formulas elsewhere; "torch on the NPU" for the rest.
_NPU_ROWS = {
    "permute": "torch_npu fused (uniform top-k) / torch",
    "permute_by_indices": "torch_npu fused (no probs) / torch",
    "unpermute": "torch on the NPU (fixed fp32 order)",
}


def op_backends(cuda_ok: bool, npu: bool, cuda: Dict[str, Any]) -> List[Dict[str, str]]:
    """Per op: what runs it for CPU, CUDA and NPU tensors."""
    if "driver_error" in cuda:
        why = "no CUDA driver"
    elif not cuda.get("driver", {}).get("devices"):
        why = "no CUDA device"
    else:
        why = "no NVRTC"
    rows = []
    for op in _KERNEL_OPS:
        rows.append({
            "op": op,
            "cpu": "Rust (moerail-core)",
            "cuda": "CUDA kernel (NVRTC)" if cuda_ok else f"unavailable ({why})",
            "npu": _NPU_ROWS.get(op, "torch on the NPU"),
        })
    for op in _TORCH_OPS:
        rows.append({
            "op": op,
            "cpu": "Rust (moerail-core)",
            "cuda": "torch on the GPU" if cuda_ok else f"unavailable ({why})",
            "npu": "torch on the NPU",
        })
    rows.append({
        "op": "AllToAllDispatcher exchange",
        "cpu": "torch.distributed (gloo)",
        "cuda": "torch.distributed (NCCL), rows stay on the GPU",
        "npu": "moerail.backends.hccl.HcclExchange (HCCL), rows stay on the NPU",
    })
    return rows


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_report(r: Dict[str, Any]) -> str:
    """The table ``moerail doctor`` prints."""
    rows: List[tuple] = []
    m = r["moerail"]
    rows.append(("moerail", f"{m['version']} ({m['native']})"))
    rows.append(("python / machine", f"{r['python']} / {r['machine']}"))
    t = r["cpu_threads"]
    rows.append(("CPU threads", f"moerail {t['moerail']}, torch {t['torch']}, OS {t['os']}"))
    for name, v in r["packages"].items():
        rows.append((name, v or "not installed"))
    c = r["cuda"]
    if "driver" in c:
        d = c["driver"]
        v = d["version"]
        rows.append(("CUDA driver", f"{v // 1000}.{v % 1000 // 10} ({d.get('path') or 'libcuda'})"))
        for dev in d["devices"]:
            rows.append((f"  GPU {dev['ordinal']}", f"{dev['name']}, sm_{dev['cc'][0]}{dev['cc'][1]}, "
                         f"{dev['sm_count']} SMs, {_fmt_bytes(dev['total_mem'])}"))
    else:
        rows.append(("CUDA driver", f"not found: {c.get('driver_error', '?')}"))
    if "nvrtc" in c:
        n = c["nvrtc"]
        rows.append(("NVRTC", f"{n['version'][0]}.{n['version'][1]} at {n['path']} (found via {n['how']})"))
    elif "nvrtc_error" in c:
        rows.append(("NVRTC", f"not found: {c['nvrtc_error']}"))
    else:
        rows.append(("NVRTC", "not probed"))
    cache = f"{c['cache_dir']} ({c['cache_files']} files, {_fmt_bytes(c['cache_bytes'])})"
    if c.get("cache_error"):
        cache += f"; last error: {c['cache_error']}"
    rows.append(("kernel cache", cache))
    if c.get("emulator"):
        rows.append(("CUDA emulator", c["emulator"]))
    a = r["ascend"]
    for part, label in (("acl", "CANN (libascendcl)"), ("hccl", "HCCL (libhccl)")):
        if part in a:
            rows.append((label, f"{a[part]['path']} (found via {a[part]['how']})"))
        else:
            rows.append((label, f"not found: {a.get(part + '_error', '?')}"))
    for k in ("acl_version", "npu_devices"):
        if a.get(k) is not None:
            rows.append((k.replace("_", " "), str(a[k])))
    width = max(len(k) for k, _ in rows) + 2
    out = [f"{k:<{width}}{v}" for k, v in rows]
    out.append("")
    ops = r["ops"]
    w0 = max(len(o["op"]) for o in ops) + 2
    w1 = max(len(o["cpu"]) for o in ops) + 2
    w2 = min(max(len(o["cuda"]) for o in ops), 60) + 2
    out.append(f"{'op':<{w0}}{'CPU tensors':<{w1}}{'CUDA tensors':<{w2}}NPU tensors")
    for o in ops:
        cu = o["cuda"] if len(o["cuda"]) <= 60 else o["cuda"][:57] + "..."
        out.append(f"{o['op']:<{w0}}{o['cpu']:<{w1}}{cu:<{w2}}{o['npu']}")
    return "\n".join(out)


_noticed = False
_notice_lock = threading.Lock()


def notice_cpu_only() -> None:
    """Once per process, when an op first runs on CPU tensors: if neither CUDA (a driver with a
    GPU) nor CANN is usable, warn with what was not found. ``MOERAIL_QUIET=1`` silences it."""
    global _noticed
    if _noticed:
        return
    with _notice_lock:
        if _noticed:
            return
        _noticed = True
        if os.environ.get("MOERAIL_QUIET", "") not in ("", "0"):
            return
        try:
            cuda = _device.status(probe_driver=True, probe_nvrtc=False)
            ascend = _ascend(False)
        except Exception as e:  # pragma: no cover - the probes report failures as text
            cuda, ascend = {"driver_error": str(e)}, {}
        if "driver" in cuda and cuda["driver"].get("devices"):
            return
        if "acl" in ascend:
            return
        cuda_why = cuda.get("driver_error") or "no GPU visible to the driver"
        acl_why = ascend.get("acl_error", "libascendcl.so not found")
        warnings.warn(
            "moerail: no accelerator backend found, ops run on the CPU. "
            f"CUDA: {cuda_why}. CANN: {acl_why}. "
            "`python -m moerail doctor` shows the details; MOERAIL_QUIET=1 silences this.",
            BackendNotFoundWarning,
            stacklevel=3,
        )
