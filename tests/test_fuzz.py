"""Issue 15: the fuzzers run as part of the tests, each in a child process (a crash or an abort
fails the test instead of killing pytest), with a bounded number of examples; ``make fuzz`` runs
them for longer (MOERAIL_FUZZ_EXAMPLES / MOERAIL_FUZZ_SECONDS)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

from fuzz_entry_points import baselines  # noqa: E402

EXAMPLES = int(os.environ.get("MOERAIL_FUZZ_EXAMPLES", "40"))
SECONDS = float(os.environ.get("MOERAIL_FUZZ_SECONDS", "6"))


@pytest.mark.parametrize("name", sorted(baselines()))
def test_fuzz_entry_point(name):
    p = subprocess.run([sys.executable, str(HERE / "fuzz_entry_points.py"), "--only", name, "--examples",
                        str(EXAMPLES), "--seconds", str(SECONDS)], capture_output=True, text=True,
                       timeout=120 + 2 * SECONDS)
    assert p.returncode == 0, f"{name}: exit {p.returncode} (a negative code is a signal)\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert f"fuzz {name}:" in p.stdout, p.stdout
