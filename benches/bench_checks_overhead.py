"""What the argument and size checks cost on the hot paths: two builds of moerail timed in the same
run, interleaved, on the same inputs.

Each build runs in its own worker process (``PYTHONPATH`` pointing at that build's ``python/``
folder, which holds its ``_native.abi3.so``); the parent asks the workers for one sample of every
case in turn, alternating which build goes first (ABBA), for ``--rounds`` rounds. A sample is the
median of a batch of calls (about 20 ms of them, the same count for both builds). The table gives each build's median sample, the
ratio after / before (the median of the per-round ratios, so load that changes from round to round
cancels) and its spread (the 25th to 75th percentile of the per-round ratios): the noise.

    git worktree add /tmp/moerail-before <commit>      # and build it: maturin build --release,
    unzip -o -j <wheel> 'moerail/_native.abi3.so' -d /tmp/moerail-before/python/moerail
    python benches/bench_checks_overhead.py --before /tmp/moerail-before/python [--rounds 31]
    python benches/bench_checks_overhead.py --header    # the dispatcher's header exchange, gloo

The dispatcher's fixed-size header is a collective of its own (one small all-gather per dispatch),
so ``--header`` times it against a whole dispatch + combine on gloo instead.

Both workers run moerail and torch on one thread, pinned to the same core: only one of them runs at
a time, and whatever else runs on the machine slows both alike (unpinned, the scheduler can leave
one build on a busier core for minutes, which the alternation does not cancel).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
SIZES = {"small": (256, 256), "large": (4096, 2048)}  # tokens, hidden (bf16, 64 experts, top-8)


def _op_cases(size: str, t: int, h: int) -> dict:
    import torch

    import moerail

    g = torch.Generator().manual_seed(0)
    e, k = 64, 8
    tokens = torch.randn(t, h, generator=g).to(torch.bfloat16)
    logits = torch.randn(t, e, generator=g)
    probs, rmap = moerail.topk_route(logits, k)
    n = int(rmap.sum())
    permuted, pprobs, sidx = moerail.permute(tokens, rmap, probs=probs, num_out_tokens=n)[:3]
    idx = logits.topk(k, dim=1).indices
    split = rmap.sum(0)
    ep = 8
    sorted_idxs = torch.tensor([r * (e // ep) + le for le in range(e // ep) for r in range(ep)])
    lg_b = torch.randn(t, 256, generator=g)
    bias = 0.1 * torch.randn(256, generator=g)
    d = f"T={t}, H={h}"
    return {
        f"permute {size}": (f"permute, probs ({d})",
                            lambda: moerail.permute(tokens, rmap, probs=probs, num_out_tokens=n)),
        f"permute_align {size}": (f"permute, align_size=16 ({d})",
                                  lambda: moerail.permute(tokens, rmap, probs=probs, align_size=16)),
        f"permute_by_indices {size}": (f"permute_by_indices ({d})", lambda: moerail.permute_by_indices(tokens, idx, e)),
        f"unpermute_probs {size}": (f"unpermute, probs ({d})",
                                    lambda: moerail.unpermute(permuted, sidx, tokens.shape, probs=probs,
                                                              routing_map=rmap)),
        f"unpermute {size}": (f"unpermute ({d})", lambda: moerail.unpermute(permuted, sidx, tokens.shape)),
        f"sort_chunks {size}": (f"sort_chunks_by_idxs, probs ({d})",
                                lambda: moerail.sort_chunks_by_idxs(permuted, split, sorted_idxs, probs=pprobs)),
        f"topk_route {size}": (f"topk_route, softmax, E=64 (T={t})", lambda: moerail.topk_route(logits, k)),
        f"topk_route_group {size}": (
            f"topk_route, sigmoid, 8 groups, bias, E=256 (T={t})",
            lambda: moerail.topk_route(lg_b, 8, num_groups=8, group_topk=4, scaling_factor=2.5,
                                       score_function="sigmoid", expert_bias=bias)),
    }


def _cases():
    """name -> (label, zero-argument callable), the same inputs in every worker."""
    import torch

    import moerail
    from moerail.ep.plan import _links, _strategies

    cases = {}
    for size, (t, h) in SIZES.items():
        cases.update(_op_cases(size, t, h))
    # The dispatcher's planning on the host: one rank's count vector and the one-call route
    # (every candidate plan, the cheapest, this rank's route), as benches/bench_a2a.py times them.
    w, rpn, e, t, k = 64, 8, 256, 4096, 8
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices.sort(dim=1).values.contiguous()
    vec = torch.zeros(4 + e + w + w // rpn, dtype=torch.int64)
    cargs = (idx, w, rpn, e // w, 0, 0, vec, False)
    moerail._native.ep.a2a_counts(*cargs)
    gathered = vec.repeat(w, 1)
    rargs = (gathered, idx, 0, rpn, e // w, _strategies("auto"), 7168, 2, True, _links(None))
    d = f"T={t}, k={k}, EP={w}, E={e}"
    cases[f"a2a_counts {w}"] = (f"a2a_counts, one rank's counts ({d})", lambda: moerail._native.ep.a2a_counts(*cargs))
    cases[f"a2a_route {w}"] = (f"a2a_route, plans + choice + route ({d})",
                               lambda: moerail._native.ep.a2a_route(*rargs))
    return cases


def worker() -> None:
    import torch

    import moerail

    torch.set_num_threads(1)
    moerail.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):  # both builds on the same core: they take turns on it
        os.sched_setaffinity(0, {int(os.environ["MOERAIL_BENCH_CPU"])})
    cases = _cases()
    first = {}
    for name, (_, fn) in cases.items():  # warm up
        fn()
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    print(json.dumps({"ready": {n: c[0] for n, c in cases.items()}, "first": first, "file": moerail.__file__}),
          flush=True)
    for line in sys.stdin:
        name, batch = line.rsplit(" ", 1)
        fn = cases[name][1]
        times = []
        for _ in range(int(batch)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"t": statistics.median(times)}), flush=True)


def _header_rank(rank: int, world: int, port: int, out_q) -> None:
    """One gloo rank of ``--header``: the dispatcher's fixed-size header exchange alone, and a
    whole dispatch + combine (which includes it), each the median of many calls."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import moerail
    from moerail import _agree

    torch.set_num_threads(1)
    moerail.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    disp = moerail.AllToAllDispatcher(64, None, ranks_per_node=1, strategy="flat")
    g = torch.Generator().manual_seed(rank)
    t, h = 256, 256
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    probs, rmap = moerail.topk_route(torch.randn(t, 64, generator=g), 8)
    gather = _agree.all_gather_fixed(dist, None)

    def header():
        _agree.agree(gather, "bench", "", 1, 4)

    def step():
        out = disp.dispatch(x, probs, rmap)
        disp.combine(out[0], out.handle)

    res = {}
    for name, fn, n in (("header", header, 300), ("dispatch + combine", step, 60), ("header ", header, 300)):
        for _ in range(5):
            fn()
        times = []
        for _ in range(n):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[name] = statistics.median(times)
    out_q.put((rank, res))
    dist.barrier()
    dist.destroy_process_group()


def header_cost(world: int = 2) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_header_rank, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    hdr = statistics.median([res[r][k] for r in res for k in ("header", "header ")])
    step = statistics.median([res[r]["dispatch + combine"] for r in res])
    print(f"gloo, {world} ranks on this machine, one thread each: the header all-gather {hdr * 1e6:.0f} us; "
          f"a dispatch + combine (T=256, H=256 bf16, 64 experts, top-8, flat) {step * 1e6:.0f} us, of which "
          f"the header is {100 * hdr / step:.1f}%")


def _start(pythonpath: str) -> tuple:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    env = dict(os.environ, PYTHONPATH=pythonpath, MOERAIL_QUIET="1", OMP_NUM_THREADS="1",
               MOERAIL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MOERAIL_BENCH_CPU=str(cpus[-1]),
               # A fixed mmap threshold: glibc's moves with what a process freed before, so two
               # processes could serve the same output from fresh pages in one and reused memory
               # in the other (seen once: the same small permute 3x apart).
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    p = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).resolve()), "--worker"], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    hello = json.loads(p.stdout.readline())
    return p, hello


def _ask(p, name: str, batch: int) -> float:
    p.stdin.write(f"{name} {batch}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())["t"]


def _q(xs, f):
    xs = sorted(xs)
    i = f * (len(xs) - 1)
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def _fmt(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--header", action="store_true",
                    help="instead: what the dispatcher's fixed-size header costs a dispatch (gloo, 2 ranks)")
    ap.add_argument("--before", required=not {"--worker", "--header"} & set(sys.argv),
                    help="the python/ folder of the build before the checks (with its _native.abi3.so)")
    ap.add_argument("--after", default=str(HERE.parent / "python"), help="the build after (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--only", default=None, help="comma-separated case names (substrings)")
    a = ap.parse_args()
    if a.worker:
        worker()
        return 0
    if a.header:
        header_cost()
        return 0
    (pa, ha), (pb, hb) = _start(a.before), _start(a.after)
    if ha["file"] == hb["file"]:
        sys.exit(f"--before and --after import the same moerail ({ha['file']})")
    labels = ha["ready"]
    names = [n for n in labels if n in hb["ready"] and (not a.only or any(s in n for s in a.only.split(",")))]
    before = {n: [] for n in names}
    after = {n: [] for n in names}
    t0 = time.monotonic()
    # The same batch for both builds (about 20 ms of calls), so both run the same sequence of calls.
    batch = {n: max(1, min(200, int(0.02 / max(ha["first"][n], hb["first"][n], 1e-7)))) for n in names}
    for r in range(a.rounds):
        for n in names:
            if r % 2 == 0:
                before[n].append(_ask(pa, n, batch[n]))
                after[n].append(_ask(pb, n, batch[n]))
            else:
                after[n].append(_ask(pb, n, batch[n]))
                before[n].append(_ask(pa, n, batch[n]))
    for p in (pa, pb):
        p.stdin.close()
        p.wait()
    print(f"{a.rounds} rounds, ABBA, {time.monotonic() - t0:.0f} s; before: {ha['file']}; after: {hb['file']}\n")
    print("| op (bf16 tokens, 64 experts, top-8) | before | after | after / before | spread of the ratio (p25-p75) |")
    print("|---|---:|---:|---:|---:|")
    for n in names:
        ratios = [b / x for x, b in zip(before[n], after[n])]
        print(f"| {labels[n]} | {_fmt(statistics.median(before[n]))} | {_fmt(statistics.median(after[n]))} | "
              f"{statistics.median(ratios):.3f} | {_q(ratios, 0.25):.3f}-{_q(ratios, 0.75):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
