"""Two emulated nodes for the dispatcher: two network namespaces joined by a veth pair shaped
with ``tc`` (a token-bucket rate limit; netem, for an added delay, is not in every kernel and is
not used), two gloo ranks in each.

Ranks inside a namespace reach each other through the namespace's own address, which the kernel
routes over loopback (unshaped); ranks of different namespaces go over the veth pair (shaped),
so the veth is the slow inter-node link, shared by the node's two ranks. Needs root (``ip netns``,
``tc``); :func:`available` says why not where it can't run.

Used by ``benches/bench_a2a.py`` (``make bench``) and ``tests/test_a2a_netns.py``. Run a worker
by hand: ``ip netns exec moerail_n0 python benches/netns_a2a.py worker RANK PORT JSON``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

NS = ("moerail_n0", "moerail_n1")
VETH = ("moerail_v0", "moerail_v1")
ADDR = ("10.231.0.1", "10.231.0.2")
WORLD, RANKS_PER_NODE = 4, 2


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def available() -> Optional[str]:
    """None if the emulation can run here, else why not."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root for ip netns / tc"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = "moerail_probe"
    r = _sh("ip", "netns", "add", probe)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    _sh("ip", "netns", "del", probe)
    return None


def teardown() -> None:
    for ns in NS:
        _sh("ip", "netns", "del", ns)
    _sh("ip", "link", "del", VETH[0])


def setup(rate_mbit: float) -> None:
    """Two namespaces and a veth pair between them, each end's egress limited to ``rate_mbit``
    (tbf)."""
    teardown()
    steps = [
        ("ip", "netns", "add", NS[0]),
        ("ip", "netns", "add", NS[1]),
        ("ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1]),
    ]
    for i in range(2):
        steps += [
            ("ip", "link", "set", VETH[i], "netns", NS[i]),
            ("ip", "netns", "exec", NS[i], "ip", "addr", "add", f"{ADDR[i]}/24", "dev", VETH[i]),
            ("ip", "netns", "exec", NS[i], "ip", "link", "set", VETH[i], "up"),
            ("ip", "netns", "exec", NS[i], "ip", "link", "set", "lo", "up"),
            ("ip", "netns", "exec", NS[i], "tc", "qdisc", "add", "dev", VETH[i], "root", "tbf",
             "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "2000ms"),
        ]
    for cmd in steps:
        r = _sh(*cmd)
        if r.returncode != 0:
            teardown()
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def run(config: Dict, timeout: float = 300) -> List[Dict]:
    """Runs the 4 workers (ranks 0-1 in the first namespace) and returns rank 0's results."""
    port = 29600 + os.getpid() % 1000
    procs = []
    env = dict(os.environ, MOERAIL_NUM_THREADS="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    for rank in range(WORLD):
        node = rank // RANKS_PER_NODE
        env_r = dict(env, GLOO_SOCKET_IFNAME=VETH[node])
        cmd = ["ip", "netns", "exec", NS[node], sys.executable, os.path.abspath(__file__), "worker", str(rank),
               str(port), json.dumps(config)]
        procs.append(subprocess.Popen(cmd, env=env_r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    deadline = time.time() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
            if p.returncode != 0:
                raise RuntimeError(f"worker failed ({p.returncode}):\n{err[-3000:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return json.loads(outs[0].strip().splitlines()[-1])


def _worker(rank: int, port: int, config: Dict) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import moerail

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{ADDR[0]}:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    t, h, e, k = config["tokens"], config["hidden"], config["experts"], config["topk"]
    g = torch.Generator().manual_seed(rank)
    hidden = torch.randn(t, h, generator=g)
    probs, routing_map = moerail.topk_route(torch.randn(t, e, generator=g), k)
    link = _calibrate(rank) if config.get("calibrate", True) else moerail.LinkModel(**config["link"])
    rows = []
    for strategy in config["strategies"]:
        disp = moerail.AllToAllDispatcher(e, None, ranks_per_node=RANKS_PER_NODE, strategy=strategy, link=link,
                                          timeout=timedelta(seconds=120))
        times = []
        for rep in range(config["warmup"] + config["repeat"]):
            dist.barrier()
            t0 = time.perf_counter()
            out, _, p_local = sent = disp.dispatch(hidden, probs, routing_map)
            disp.combine(out * p_local[:, None], sent.handle)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
            if rep >= config["warmup"]:
                times.append(float(dt))
        stats = disp.last_stats
        times.sort()
        rows.append({
            "strategy": strategy if strategy != "auto" else f"auto -> {stats['strategy']}",
            "measured_s": times[len(times) // 2],
            "predicted_s": stats["estimated_seconds"],
            "inter_node_bytes": stats["planned"]["dispatch"]["inter_node_bytes"]
            + stats["planned"]["combine"]["inter_node_bytes"],
        })
    if config.get("overlap"):
        w1 = torch.randn(h, 4 * h, generator=g) / h**0.5

        def experts(x, per_slot, p):
            y = x
            for _ in range(config["overlap"]):  # expert work comparable to the exchange
                y = torch.tanh(y @ w1) @ w1.t() / 4
            return y * p[:, None]

        for chunks in (1, 4):
            disp = moerail.AllToAllDispatcher(e, None, ranks_per_node=RANKS_PER_NODE, strategy="dedup", link=link,
                                              num_chunks=chunks, timeout=timedelta(seconds=120))
            times, hidden_frac = [], []
            for rep in range(config["warmup"] + config["repeat"]):
                dist.barrier()
                t0 = time.perf_counter()
                disp.forward(hidden, probs, routing_map, experts)
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if rep >= config["warmup"]:
                    times.append(float(dt))
                    hidden_frac.append(disp.last_stats.get("overlap", {}).get("hidden_fraction", 0.0))
            times.sort()
            rows.append({"overlap_chunks": chunks, "measured_s": times[len(times) // 2],
                         "hidden_fraction": sorted(hidden_frac)[len(hidden_frac) // 2]})
    dist.destroy_process_group()
    if rank == 0:
        rows.append({"link": {k: getattr(link, k) for k in ("intra_node_bw", "inter_node_bw", "node_bw", "latency",
                                                             "inter_node_latency")}})
        print(json.dumps(rows))


def _timed_exchange(rank: int, peer_bytes: Dict[int, int], reps: int = 3) -> float:
    """Median seconds of an all-to-all where this rank sends ``peer_bytes[dst]`` bytes."""
    import torch
    import torch.distributed as dist

    send = [peer_bytes.get(d, 0) for d in range(WORLD)]
    recv = torch.zeros(WORLD, dtype=torch.int64)
    dist.all_to_all_single(recv, torch.tensor(send, dtype=torch.int64))
    buf = torch.zeros(sum(send), dtype=torch.uint8)
    out = torch.empty(int(recv.sum()), dtype=torch.uint8)
    times = []
    for _ in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(out, buf, output_split_sizes=recv.tolist(), input_split_sizes=send)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(float(dt))
    return sorted(times[1:])[reps // 2]


def _calibrate(rank: int):
    """The link model of this emulation, measured with plain gloo exchanges: every rank sends
    ``n`` bytes to its counterpart on the other node (the veth carries the node's ranks' bytes
    each way), or to its neighbour in the node (loopback); one-byte messages give the latencies,
    which are taken off the transfer times (at most half of them: a noisy latency must not make
    a bandwidth absurd)."""
    import moerail

    node, local = rank // RANKS_PER_NODE, rank % RANKS_PER_NODE
    remote = (1 - node) * RANKS_PER_NODE + local
    near = node * RANKS_PER_NODE + (1 - local)
    lat_inter = _timed_exchange(rank, {remote: 1}, reps=5)
    lat_intra = _timed_exchange(rank, {near: 1}, reps=5)

    def bandwidth(peer: int, n: int, lat: float) -> float:
        t = _timed_exchange(rank, {peer: n})
        return n / max(t - lat, 0.5 * t)

    node_bw = RANKS_PER_NODE * bandwidth(remote, 4 << 20, lat_inter)
    return moerail.LinkModel(intra_node_bw=bandwidth(near, 8 << 20, lat_intra), inter_node_bw=node_bw,
                             node_bw=node_bw, latency=lat_intra, inter_node_latency=lat_inter)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
    else:
        print(__doc__)
