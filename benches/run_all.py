"""`make bench`: runs each ``benches/bench_*.py`` and writes ``benches/BENCHMARKS.md``.

Each bench module defines ``TITLE`` and ``run(quick: bool) -> str`` returning a Markdown section
(its method, sizes, the reference it is measured against in the same run, and the ratios).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "BENCHMARKS.md"))
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--only", default=None,
                    help="run only bench_<ONLY>.py and replace its section in --out (other sections are kept)")
    args = ap.parse_args()

    import torch

    import moerail

    parts = [
        "# moerail benchmarks",
        "",
        f"Written by `make bench` ({'quick' if args.quick else 'full'} run) on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"- Machine: {_common.machine()}",
        f"- torch {torch.__version__} ({torch.get_num_threads()} threads), moerail {moerail.__version__} "
        f"({moerail.get_num_threads()} threads)",
        f"- OpenMP wait policy: `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: libgomp spins)')}`. "
        "`make bench` sets PASSIVE: with libgomp's default, torch's OpenMP workers spin for milliseconds after "
        "every parallel region and take the cores from any other thread pool in the process, moerail's included "
        "(measured: a 2 ms moerail op after a 0.25 ms `torch.sum` took 4.8 ms with the default, 2.7 ms with PASSIVE). "
        "The same setting is recommended for CPU training with moerail (`examples/train_moe.py` sets it).",
        "",
    ]
    for path in sorted(HERE.glob("bench_*.py")):
        if args.only and path.stem != f"bench_{args.only}":
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses and pickling look modules up by name
        spec.loader.exec_module(mod)
        t0 = time.perf_counter()
        print(f"[bench] {path.name} ...", flush=True)
        section = mod.run(quick=args.quick)
        print(f"[bench] {path.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
        parts += [f"## {mod.TITLE}", "", f"Source: `benches/{path.name}`.", "", section.strip(), ""]
    out = pathlib.Path(args.out)
    if args.only and out.exists():
        # Replace (or append) just this bench's section; the rest of the file stays as measured.
        body = "\n".join(parts[parts.index(next(p for p in parts if p.startswith("## "))):])
        # A section measured alone names its own machine and load (the header's is the full run's).
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        body = body.replace("Source: `benches/", f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} "
                            f"(`make bench` with --only {args.only}) on {_common.machine()}, load average "
                            f"{load:.1f}. Source: `benches/", 1)
        title = body.split("\n", 1)[0]
        text = out.read_text()
        start = text.find(title + "\n")
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + body
        else:
            end = text.find("\n## ", start + len(title))
            text = text[:start] + body.rstrip("\n") + ("\n" + text[end:] if end >= 0 else "\n")
        out.write_text(text)
    else:
        out.write_text("\n".join(parts + _kept_sections(out)))
    print(f"wrote {args.out}")


KEEP = "<!-- measured by hand, kept by make bench -->"


def _kept_sections(out: pathlib.Path) -> list:
    """Sections of the existing file that no bench module writes (measurements that need two
    builds or a long run, e.g. the checks' cost and the fuzz run): they carry :data:`KEEP` on the
    line after their title and stay as measured."""
    if not out.exists():
        return []
    text = out.read_text()
    kept = []
    for chunk in ("\n" + text).split("\n## ")[1:]:
        lines = chunk.split("\n")
        if len(lines) > 1 and lines[1].strip() == KEEP:
            kept += ["## " + chunk.rstrip("\n"), ""]
    return kept


if __name__ == "__main__":
    main()
