"""Installs what ``make wheel`` built as a user would, and runs ``tools/smoke.py`` on it.

    python tools/check_dist.py --dist dist            # the wheel: fresh venv, no Rust on PATH
    python tools/check_dist.py --dist dist --sdist    # also: build a wheel from the sdist, install it

* The wheel: ``auditwheel show`` must report a manylinux tag; it is installed with ``pip --no-index
  --no-deps`` into a fresh venv made from the base interpreter; the smoke script runs there with a
  PATH that has no cargo or rustc, from a temporary directory (so no source tree is importable).
* The sdist: must hold the CUDA kernel sources (``rust/moerail-device`` includes them at compile
  time) and LICENSE; it is built into a wheel by pip (maturin, cargo; ``--no-build-isolation``:
  this venv's maturin), which is installed into another fresh venv and smoke-tested the same way.

torch and numpy, which the wheel depends on, are not downloaded again (about 3 GB with CUDA): the
fresh venvs see this venv's site-packages through a ``.pth`` file, after their own, so ``moerail``
itself can only come from the installed wheel (the smoke script checks where it was imported from).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tools" / "smoke.py"


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def clean_path() -> str:
    """PATH without any directory holding cargo or rustc."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(os.path.exists(os.path.join(d, t)) for t in ("cargo", "rustc", "rustup"))]
    return os.pathsep.join(keep)


def fresh_venv(where: Path) -> Path:
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", "--without-pip", where])
    py = where / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # torch and numpy from this venv, after the fresh venv's own site-packages (see the docstring).
    (Path(purelib) / "_moerail_check_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def install_and_smoke(wheel: Path, tmp: Path, name: str, version: str) -> None:
    py = fresh_venv(tmp / name)
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-index", "--no-deps", wheel])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CARGO_TARGET_DIR")}
    env["PATH"] = f"{py.parent}{os.pathsep}{clean_path()}"
    probe = subprocess.run([py, "-c", "import shutil; print(shutil.which('cargo') or '', shutil.which('rustc') or '')"],
                           env=env, capture_output=True, text=True, check=True).stdout.split()
    assert not probe, f"a Rust toolchain is still on PATH: {probe}"
    work = tmp / f"{name}-cwd"
    work.mkdir()
    shutil.copy(SMOKE, work / "smoke.py")
    run([py, "smoke.py", "--expect-version", version], cwd=work, env=env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dist", default=str(ROOT / "dist"))
    ap.add_argument("--sdist", action="store_true", help="also build and install the sdist")
    a = ap.parse_args(argv)
    dist = Path(a.dist).resolve()
    wheels = sorted(dist.glob("moerail-*.whl"))
    sdists = sorted(dist.glob("moerail-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise SystemExit(f"{dist}: expected one moerail wheel and one sdist (make wheel), found {wheels + sdists}")
    wheel, sdist = wheels[0], sdists[0]
    version = wheel.name.split("-")[1]
    show = subprocess.run([Path(sys.executable).parent / "auditwheel", "show", wheel],
                          capture_output=True, text=True, check=True).stdout
    print(show)
    assert "manylinux_2_17_x86_64" in wheel.name and '"manylinux_2_17_x86_64"' in show, show
    assert "-abi3-" in wheel.name, wheel.name
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
    top = sdist.name[: -len(".tar.gz")]
    kernels = sorted(p.name for p in (ROOT / "csrc" / "cuda").iterdir())
    missing = [k for k in kernels if f"{top}/csrc/cuda/{k}" not in names] + \
        [f for f in ("LICENSE", "pyproject.toml") if f"{top}/{f}" not in names]
    assert not missing, f"{sdist.name} lacks {missing}"
    with tempfile.TemporaryDirectory(prefix="moerail-dist-") as d:
        tmp = Path(d)
        install_and_smoke(wheel, tmp, "wheel-venv", version)
        if a.sdist:
            built = tmp / "from-sdist"
            # The dev profile: the sdist's build is checked, not its speed, and `cargo test` has
            # already built the dependencies in that profile (release would build them all again).
            env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
            env.setdefault("MATURIN_PEP517_ARGS", "--profile dev")
            run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", built, sdist],
                env=env, cwd=tmp)
            (sw,) = sorted(built.glob("moerail-*.whl"))
            install_and_smoke(sw, tmp, "sdist-venv", version)
    print(f"DIST OK: {wheel.name} and {sdist.name}" + (" (sdist built and installed)" if a.sdist else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
