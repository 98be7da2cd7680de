"""The README as a user reads it: its first example is what the installed-package smoke test runs
(``tools/smoke.py``, in a fresh venv in ``make test``) and runs here too; every number its
"Numbers" section states is one ``benches/BENCHMARKS.md`` holds; it speaks of the user's machine,
not the development one; the files it names exist."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_first_example_is_the_smoke_tests_and_runs():
    block = re.search(r"## First example \(plain PyTorch\)\n\n```python\n(.*?)```", README, re.S).group(1)
    smoke = runpy.run_path(str(ROOT / "tools" / "smoke.py"), run_name="not_main")
    assert smoke["README_EXAMPLE"] == block
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("torch.Size([64, 32])")


def test_numbers_are_benchmarks_numbers():
    bench = (ROOT / "benches" / "BENCHMARKS.md").read_text()
    text = _section("Numbers") + _section("Plan a layout before burning the cluster")
    numbers = re.findall(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(x|%| MB| ms)(?![\w])", text)
    assert len(numbers) > 30
    missing = [n + u for n, u in numbers if n + u not in bench and f"{n}{u.strip()}" not in bench
               and f"{n}{u}".replace(" ", "") not in bench.replace(" ", "")]
    assert not missing, f"README numbers not in benches/BENCHMARKS.md: {missing}"
    a2a = _section("Expert-parallel exchange: `AllToAllDispatcher`")
    for n in re.findall(r"\d+\.\d+ (?:MB|ms)", a2a):
        assert n.split()[0] in bench, n
    assert "AMD EPYC, 2 logical cores" in bench and "2-core AMD EPYC" in _section("Numbers")


def test_speaks_to_users():
    for phrase in ("this build machine", "this project's", "../shared", "shared/DESIGN", "one for one"):
        assert phrase not in README, phrase
    for name in re.findall(r"`((?:examples|benches|tools|tests|python|rust|csrc|\.github)/[\w./-]+)`", README):
        assert (ROOT / name).exists(), name
