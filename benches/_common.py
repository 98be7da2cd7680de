"""Shared benchmark helpers: timing, the machine's copy bandwidth, Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, List, Sequence

import torch


def timeit(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 7, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs (more if ``min_time`` asks)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def memcpy_bandwidth(nbytes: int = 256 << 20) -> float:
    """This machine's copy bandwidth in GB/s, counting bytes read + bytes written, measured with
    torch's own copy on ``nbytes`` (larger than any cache)."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), warmup=2, repeat=9)
    return 2 * nbytes / t / 1e9


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Linux {platform.release()}, Python {platform.python_version()}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"
