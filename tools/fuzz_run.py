"""The long fuzz run behind ``make fuzz`` (issue 15): the core's harness
(rust/moerail-core/tests/fuzz.rs, test profile, so overflow checks are on) seed after seed, then every
Python entry point of tests/fuzz_entry_points.py, each in its own child process (a crash in one is
reported and the others still run). Ends with one table: cases tried, clean errors and crashes per
entry point, and exits 1 if anything crashed.

    python tools/fuzz_run.py [--minutes 20] [--core-share 0.5] [--cases-per-seed 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"fuzz ([^:]+): (\d+) cases, (\d+) clean errors")


def core_binary() -> str:
    """Builds the core's fuzz test (test profile) once and returns its executable."""
    p = subprocess.run(["cargo", "test", "-p", "moerail-core", "--test", "fuzz", "--no-run", "-q",
                        "--message-format=json"], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"building the core's fuzz harness failed:\n{p.stderr[-3000:]}")
    for line in p.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "fuzz" \
                and msg.get("executable"):
            return msg["executable"]
    sys.exit("building the core's fuzz harness gave no executable")


def tally(text: str, counts: dict, errors: dict) -> set:
    seen = set()
    for line in text.splitlines():
        m = LINE.search(line)
        if m:
            counts[m.group(1)] += int(m.group(2))
            errors[m.group(1)] += int(m.group(3))
            seen.add(m.group(1))
    return seen


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--core-share", type=float, default=0.5, help="the core harness's share of the time")
    ap.add_argument("--cases-per-seed", type=int, default=2000)
    ap.add_argument("--first-seed", type=int, default=1000)
    a = ap.parse_args()
    start = time.monotonic()
    total = a.minutes * 60
    core_end = start + total * a.core_share
    end = start + total
    print(f"make fuzz: {a.minutes:g} minutes from {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
          flush=True)

    counts: dict = defaultdict(int)
    errors: dict = defaultdict(int)
    crashes: dict = defaultdict(int)
    failures: list = []

    exe = core_binary()
    env = dict(os.environ, MOERAIL_FUZZ_CASES=str(a.cases_per_seed))
    seed = a.first_seed
    core_names: set = set()
    while time.monotonic() < core_end:
        env["MOERAIL_FUZZ_SEED"] = str(seed)
        p = subprocess.run([exe, "--nocapture", "-q", "--test-threads=1"], env=env, capture_output=True, text=True)
        seen = tally(p.stdout, counts, errors)
        core_names |= seen
        if p.returncode != 0:
            # A panicking test prints no count line; libtest names it in a "---- <test> stdout ----" line.
            failed = re.findall(r"---- (\S+) stdout ----", p.stdout) or ["?"]
            for t in failed:
                crashes[f"core {t} (seed {seed})"] += 1
            failures.append(f"core seed {seed}: exit {p.returncode}\n{(p.stdout + p.stderr)[-2000:]}")
            print(f"core seed {seed}: FAILED (exit {p.returncode})", flush=True)
        else:
            print(f"core seed {seed}: {len(seen)} entry points clean", flush=True)
        seed += 1
    print(f"core harness: seeds {a.first_seed}..{seed - 1}, {a.cases_per_seed} cases per entry point each",
          flush=True)

    fuzzer = ROOT / "tests" / "fuzz_entry_points.py"
    names = subprocess.run([sys.executable, str(fuzzer), "--list"], capture_output=True, text=True,
                           check=True).stdout.split()
    overhead = 5.0  # a child's start (torch, moerail, the baselines), re-measured after each child
    for i, name in enumerate(names):
        budget = max(1.0, (end - time.monotonic()) / (len(names) - i) - overhead)
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, str(fuzzer), "--only", name, "--examples", "1000000000",
                            "--seconds", f"{budget:.1f}"], capture_output=True, text=True)
        overhead = max(1.0, time.monotonic() - t0 - budget)
        seen = tally(p.stdout, counts, errors)
        bad = [ln for ln in p.stdout.splitlines() if ln.startswith("FUZZ FAILURE")]
        if p.returncode != 0 or bad or name not in seen:
            crashes[name] += 1
            failures.append(f"{name}: exit {p.returncode} (a negative code is a signal)\n"
                            f"{(p.stdout + p.stderr)[-2000:]}")
            print(f"python {name}: FAILED (exit {p.returncode})", flush=True)
        else:
            print(f"python {name}: {counts[name]} cases, {errors[name]} clean errors", flush=True)

    minutes = (time.monotonic() - start) / 60
    print(f"\nfuzz summary ({minutes:.1f} minutes):")
    print(f"{'entry point':<34} {'cases':>12} {'clean errors':>13} {'crashes':>8}")
    for group, keys in (("core", sorted(core_names)), ("python", names)):
        for k in keys:
            print(f"{group + ' ' + k:<34} {counts[k]:>12} {errors[k]:>13} {crashes[k]:>8}")
    for k, v in crashes.items():
        if k.startswith("core ") and "(seed" in k:
            print(f"{k:<34} {'':>12} {'':>13} {v:>8}")
    n_core = sum(counts[k] for k in core_names)
    n_py = sum(counts[k] for k in names)
    print(f"total: {n_core} core cases, {n_py} python cases, {sum(crashes.values())} crashes")
    for f in failures:
        print("\n" + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
