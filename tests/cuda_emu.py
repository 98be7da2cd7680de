"""Builds the CPU emulator of moerail's CUDA kernels (``tests/cuda_emu``): ``csrc/cuda/*.cu``
compiled with g++ against ``emulator.h``, which runs each block's threads as fibers with CUDA's
barrier and warp semantics. The library is cached by a hash of the sources.

``build()`` returns the library's path, or raises ``Unavailable`` with the reason (no C++
compiler) so the tests can skip with it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*")) + sorted((ROOT / "tests" / "cuda_emu").glob("*"))
FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-DMOERAIL_EMULATE"]


class Unavailable(RuntimeError):
    pass


def build() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise Unavailable("no C++ compiler (g++/c++) to build the CUDA emulator")
    h = hashlib.sha256()
    for p in SOURCES:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(" ".join(FLAGS).encode())
    cache = Path(os.environ.get("MOERAIL_CACHE_DIR", Path.home() / ".cache" / "moerail")) / "cuda_emu"
    lib = cache / f"libmoerail_cuda_emu-{h.hexdigest()[:16]}.so"
    if lib.exists():
        return str(lib)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS, "-I", str(ROOT / "csrc" / "cuda"), "-I", str(ROOT / "tests" / "cuda_emu"),
           str(ROOT / "tests" / "cuda_emu" / "emu_main.cpp"), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}")
    os.replace(tmp, lib)
    return str(lib)


if __name__ == "__main__":
    print(build())
