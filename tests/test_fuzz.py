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
SECONDS = float(os.environ.get("MOERAIL_FUZZ_SECONDS", "4"))
NAMES = sorted(baselines())
GROUPS = [NAMES[i::4] for i in range(4)]  # four children: torch is imported once per group


@pytest.mark.parametrize("names", GROUPS, ids=[g[0] for g in GROUPS])
def test_fuzz_entry_points(names):
    p = subprocess.run([sys.executable, str(HERE / "fuzz_entry_points.py"), "--only", ",".join(names),
                        "--examples", str(EXAMPLES), "--seconds", str(SECONDS)], capture_output=True, text=True,
                       timeout=120 + 2 * SECONDS * len(names))
    assert p.returncode == 0, f"exit {p.returncode} (a negative code is a signal)\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    for name in names:
        assert f"fuzz {name}:" in p.stdout, p.stdout
