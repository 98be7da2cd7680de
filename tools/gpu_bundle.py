"""``make gpu-bundle``: everything an offline GPU machine needs to check moerail, in one folder.

    python tools/gpu_bundle.py --out gpu-bundle --wheel dist --megatron-tests ../shared/third_party

The folder gets moerail's abi3 wheel (built here, release), the megatron-core wheels the tests
compare against (0.16 and 0.19; cp312 manylinux x86-64 wheels, downloaded with ``pip download
--no-deps`` and kept across runs), Megatron-LM's MoE unit-test tarballs for those releases, and
``manifest.json``: each file's name, kind, size and sha256, and the total, which must stay under
64 MiB (the script fails otherwise). Nothing the GPU machine already has is bundled (torch, pytest,
pytest-timeout, hypothesis, numpy, packaging, einops, NVRTC): megatron-core's own requirements
are torch, numpy and packaging.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LIMIT = 64 * 2**20
MEGATRON = ["0.16.1", "0.19.2"]
# The offline GPU machine: CPython 3.12 on x86-64 Linux.
TARGET_PYTHON = "3.12"
TARGET_PLATFORM = "manylinux_2_28_x86_64"
TEST_TARBALL = "megatron-lm-core_v{tag}-moe-tests.tar.gz"
TEST_TAGS = {"0.16": "0.16.1", "0.19": "0.19.0"}  # the release tags the tests were taken at


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_tags(name: str) -> dict:
    # name-version(-build)?-python-abi-platform.whl
    parts = name[:-4].split("-")
    return {"python_tag": parts[-3], "abi_tag": parts[-2], "platform_tag": parts[-1]}


def copy_wheel(dist: Path, out: Path) -> Path:
    """The wheel `make wheel` built (manylinux_2_17, abi3) into the bundle."""
    wheels = sorted(dist.glob("moerail-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"{dist}: expected one moerail wheel (make wheel), found {[w.name for w in wheels]}")
    (w,) = wheels
    if "abi3" not in w.name:
        raise SystemExit(f"{w.name}: not an abi3 wheel (the GPU machine runs Python {TARGET_PYTHON})")
    for old in out.glob("moerail-*.whl"):
        old.unlink()
    shutil.copy(w, out / w.name)
    return out / w.name


def build_wheel(maturin: str, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([maturin, "build", "--release", "-q", "--out", d], check=True, cwd=Path(__file__).parents[1])
        (w,) = Path(d).glob("moerail-*.whl")
        if "abi3" not in w.name:
            raise SystemExit(f"{w.name}: not an abi3 wheel (the GPU machine runs Python {TARGET_PYTHON})")
        for old in out.glob("moerail-*.whl"):
            old.unlink()
        shutil.copy(w, out / w.name)
        return out / w.name


def megatron_wheel(version: str, out: Path, pip: list) -> Path:
    have = sorted(out.glob(f"megatron_core-{version}-*.whl"))
    if have:
        return have[0]
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([*pip, "download", "-q", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
                        "--python-version", TARGET_PYTHON, "--implementation", "cp", "--platform", TARGET_PLATFORM,
                        "-d", d, f"megatron-core=={version}"], check=True)
        (w,) = Path(d).glob("megatron_core-*.whl")
        shutil.copy(w, out / w.name)
        return out / w.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-bundle"))
    ap.add_argument("--maturin", default=shutil.which("maturin") or "maturin")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip", help="the pip command (for pip download)")
    ap.add_argument("--megatron-tests", type=Path, default=Path("../shared/third_party"),
                    help="folder holding megatron-lm-core_v<tag>-moe-tests.tar.gz")
    ap.add_argument("--no-build", action="store_true", help="keep the moerail wheel already in --out")
    ap.add_argument("--wheel", type=Path, default=None, help="take moerail's wheel from this folder (make wheel's dist/)")
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    files = []
    missing = []
    if a.wheel is not None:
        wheel = copy_wheel(a.wheel, out)
    elif a.no_build and list(out.glob("moerail-*.whl")):
        wheel = sorted(out.glob("moerail-*.whl"))[-1]
    else:
        wheel = build_wheel(a.maturin, out)
    files.append(dict(name=wheel.name, kind="moerail-wheel", version=wheel.name.split("-")[1], **wheel_tags(wheel.name)))
    for v in MEGATRON:
        w = megatron_wheel(v, out, a.pip.split())
        files.append(dict(name=w.name, kind="megatron-core-wheel", version=v, **wheel_tags(w.name)))
    for minor, tag in TEST_TAGS.items():
        src = a.megatron_tests / TEST_TARBALL.format(tag=tag)
        dst = out / src.name
        if src.is_file():
            shutil.copy(src, dst)
        if dst.is_file():
            files.append(dict(name=dst.name, kind="megatron-tests", version=tag, for_megatron_core=minor))
        else:
            missing.append(f"{src}: not found (Megatron's MoE tests for {minor} will be reported as not run)")
    keep = {f["name"] for f in files} | {"manifest.json"}
    for p in out.iterdir():
        if p.name not in keep:
            p.unlink() if p.is_file() else shutil.rmtree(p)
    for f in files:
        p = out / f["name"]
        f["bytes"] = p.stat().st_size
        f["sha256"] = sha256(p)
    total = sum(f["bytes"] for f in files)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1]).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).parents[1]).stdout.strip()
    manifest = {"files": files, "total_bytes": total, "limit_bytes": LIMIT, "missing": missing,
                "target": f"CPython {TARGET_PYTHON}, {TARGET_PLATFORM}",
                "source_commit": commit + (" (with uncommitted changes)" if dirty else "")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    w = max(len(f["name"]) for f in files)
    for f in files:
        print(f"  {f['name']:<{w}}  {f['bytes'] / 2**20:7.2f} MiB  {f['sha256'][:16]}")
    print(f"gpu-bundle: {len(files)} files, {total / 2**20:.2f} MiB in all (limit {LIMIT / 2**20:.0f} MiB) -> "
          f"{os.path.abspath(out)}")
    for m in missing:
        print(f"gpu-bundle: warning: {m}", file=sys.stderr)
    if total >= LIMIT:
        print(f"gpu-bundle: {total} bytes is over the {LIMIT}-byte limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
