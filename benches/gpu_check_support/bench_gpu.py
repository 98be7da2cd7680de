"""Stage 4 of ``benches/gpu_check.py``: the GPU rows of ``benches/bench_cuda.py`` (permute and
unpermute at T=4096, H=7168, top-8 of 256, bf16 against the device's copy bandwidth and
Megatron-Core's unfused ops, value checks on and off; the router against Megatron's) written to
``OUTDIR/bench.md`` (a Markdown section) and ``OUTDIR/bench.json``. Without a GPU (or with
``--dry``) both files say why nothing was measured."""

from __future__ import annotations

import json
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_cuda  # noqa: E402

from _common import table  # noqa: E402

HEAD = ["op", "moerail us", "Megatron us", "speed-up", "moerail bandwidth", "of copy"]


def main() -> int:
    out = Path(sys.argv[-1])
    out.mkdir(parents=True, exist_ok=True)
    dry = "--dry" in sys.argv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core as mc
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "megatron_core": mc.__version__,
            "python": platform.python_version()}
    if dry or not torch.cuda.is_available():
        reason = "no CUDA GPU (torch.cuda.is_available() is False)" if not torch.cuda.is_available() else "--dry"
        text = bench_cuda.run(quick=False) if not torch.cuda.is_available() else f"Not measured ({reason})."
        (out / "bench.md").write_text(f"## {bench_cuda.TITLE}\n\n{text}\n")
        (out / "bench.json").write_text(json.dumps(dict(info, measured=False, reason=reason), indent=1))
        print(f"bench: not measured: {reason}")
        return 0
    t, h, e, k = 4096, 7168, 256, 8
    rows, copy_bw, n = bench_cuda.measure(torch.device("cuda"), t, h, e, k, bench_cuda._cuda_time)
    props = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(), sm=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), driver=_driver())
    head = (f"Device: {info['device']} (driver {info['driver']}), torch {info['torch']} (CUDA {info['torch_cuda']}), "
            f"megatron-core {info['megatron_core']}; T={t}, H={h}, top-{k} of {e}, bf16, {n} rows "
            f"({n * h * 2 / 2**20:.0f} MiB); copy bandwidth (same-size `copy_`, read+write) {copy_bw / 1e9:.0f} GB/s. "
            "Times are medians of 20 CUDA-event timings after 3 warm-ups; rows with moerail's value checks off "
            "(the default: no host read) and on (`MOERAIL_DEVICE_CHECKS=1`, the debug mode: one small device-to-host "
            "read per call).")
    (out / "bench.md").write_text(f"## {bench_cuda.TITLE}\n\n{head}\n\n{table(HEAD, rows)}\n")
    recs = [{"op": r[0], "moerail_us": float(r[1]), "megatron_us": float(r[2]), "speedup": float(r[3].rstrip("x")),
             "moerail_GBps": float(r[4].split()[0]) if r[4] else None,
             "of_copy_pct": float(r[5].rstrip("%")) if r[5] else None} for r in rows]
    (out / "bench.json").write_text(json.dumps(dict(info, measured=True, T=t, H=h, E=e, topk=k, rows_permuted=n,
                                                    copy_GBps=copy_bw / 1e9, rows=recs), indent=1))
    print(table(HEAD, rows))
    return 0


def _driver() -> str:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


if __name__ == "__main__":
    sys.exit(main())
