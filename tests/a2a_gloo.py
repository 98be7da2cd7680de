"""Worker of the multi-process dispatcher tests (tests/test_a2a_gloo.py): run with
``python -m`` semantics through ``torch.multiprocessing.spawn``.

Every rank generates every rank's inputs from one seed, so each rank computes the dense,
single-process reference for everything locally: the rows a rank must receive (grouped by local
slot, then source rank, then token), and the MoE output of its own tokens with its gradients
(``out[t] = sum_j p[t, j] * (x[t] @ W[slot(t, j)])`` by plain autograd)."""

from __future__ import annotations

import os
import random
import socket
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

import moerail

HIDDEN = 8


def free_port() -> int:
    """A free TCP port for a gloo rendezvous, below the kernel's ephemeral range: a port the OS
    hands out (``bind(("", 0))``) can be handed out again to another socket's connect between
    this call and rank 0 binding it; one below that range is only ever taken by an explicit bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()  # not the tests' seeded generators
    for _ in range(200 if low > 2048 else 0):  # a range starting low leaves no room below it
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every candidate taken: an ephemeral one after all
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, world: int, *args, timeout: float = 300) -> dict:
    """Runs ``target(rank, world, port, *args, queue)`` in ``world`` spawned processes and
    returns ``{rank: what it put on the queue}`` (a traceback string where a rank failed)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in procs:
            rank, res = q.get(timeout=timeout)
            out[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


def inputs(case: dict, rank: int):
    """Rank ``rank``'s hidden [T, H], probs [T, E], routing_map [T, E] (fp64 for exact checks
    where possible)."""
    g = torch.Generator().manual_seed(1000 * case["seed"] + rank)
    t = case["tokens"][rank]
    e = case["experts"]
    k = case["topk"]
    dtype = case.get("dtype", torch.float64)
    hidden = torch.randn(t, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64)
    if case.get("skew"):
        logits[:, : case["skew"]] += 3.0  # hot experts; some experts get nothing
    if case.get("empty_experts"):
        logits[:, case["empty_experts"]] = -1e9
    probs, routing_map = moerail.topk_route(logits.float(), k)
    return hidden, probs.to(torch.float32), routing_map


def expert_weights(case: dict, num_slots: int):
    g = torch.Generator().manual_seed(7 + case["seed"])
    w = torch.randn(case["experts"], HIDDEN, HIDDEN, generator=g, dtype=torch.float64)
    return w  # replicas of an expert share its weights


def reference(case: dict, world: int, rank: int, disp: moerail.AllToAllDispatcher):
    """Rows this rank receives (and their probs), tokens per local slot; and for its own
    tokens the output and the gradients of ``sum(out * gy)`` w.r.t. hidden and probs."""
    loc = disp.num_local_experts
    rows, rprobs, counts = [], [], []
    per_src = []
    for src in range(world):
        h, p, m = inputs(case, src)
        if case.get("capacity_factor"):
            p, m = moerail.apply_token_dropping(p, m, case["topk"], case["capacity_factor"],
                                                case.get("drop_policy", "probs"), case.get("pad", False))
        idx = moerail.ep.plan._compact(m)
        slots = moerail.select_replicas(idx, disp.log2phy, disp.logcnt, disp.num_slots, offset=src)
        w = p.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0)
        per_src.append((h, p, m, idx, slots, w))
    for s in range(rank * loc, (rank + 1) * loc):
        n = 0
        for src in range(world):
            h, _, _, _, slots, w = per_src[src]
            hit = (slots == s)
            tok = hit.any(1).nonzero().flatten()
            rows.append(h[tok])
            rprobs.append(w[hit])
            n += tok.numel()
        counts.append(n)
    h, p, m, idx, slots, w = per_src[rank]
    return torch.cat(rows), torch.cat(rprobs), torch.tensor(counts), per_src[rank]


def dense_moe(h, probs_full, routing_map, slots, phy2log, weights, case):
    """Plain autograd reference of the MoE output for one rank's tokens."""
    idx = moerail.ep.plan._compact(routing_map)
    w = probs_full.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0)
    out = h.to(torch.float64) * 0 + probs_full.to(torch.float64).sum() * 0  # in the graph even when empty
    for j in range(idx.shape[1]):
        valid = slots[:, j] >= 0
        ex = phy2log[slots[:, j].clamp(min=0)]
        y = torch.einsum("th,thk->tk", h.to(torch.float64), weights[ex])
        out = out + torch.where(valid[:, None], y * w[:, j : j + 1].to(torch.float64), torch.zeros_like(y))
    return out


def run_case(case: dict, world: int, rank: int) -> dict:
    case = {**case, **case.get("per_rank", {}).get(rank, {})}
    disp = moerail.AllToAllDispatcher(
        case["experts"], None, ranks_per_node=case["rpn"], strategy=case["strategy"],
        placement=case.get("placement"), topk=case["topk"], capacity_factor=case.get("capacity_factor"),
        drop_policy=case.get("drop_policy", "probs"), pad_to_capacity=case.get("pad", False),
        num_chunks=case.get("chunks", 1), timeout=timedelta(seconds=60), exchange=case.get("exchange", "auto"))
    ref_rows, ref_probs, ref_counts, mine = reference(case, world, rank, disp)
    h0, p0, m0 = inputs(case, rank)
    h = h0.clone().requires_grad_(True)
    p = p0.clone().requires_grad_(True)
    if case.get("bad_probs"):
        snapshot = (h.detach().clone(), p.detach().clone(), m0.clone())
        try:
            disp.dispatch(h, p[:, :-1], m0)
        finally:
            assert torch.equal(h.detach(), snapshot[0]) and torch.equal(p.detach(), snapshot[1])
    weights = expert_weights(case, disp.num_slots)
    loc = disp.num_local_experts

    def experts(rows, tpe, rprobs):
        outs, start = [], 0
        for slot, n in enumerate(tpe.tolist()):
            ex = int(disp.phy2log[rank * loc + slot])
            outs.append((rows[start : start + n].to(torch.float64) @ weights[ex]).to(rows.dtype)
                        * rprobs[start : start + n, None].to(rows.dtype))
            start += n
        return torch.cat(outs) if outs else rows * 0

    if case.get("chunks", 1) > 1:
        return run_chunked(case, disp, experts, h, p, h0, p0, m0, mine, weights, rank)
    rows, tpe, rprobs = sent = disp.dispatch(h, p, m0)
    res = {}
    res["rows_equal"] = torch.equal(rows.detach(), ref_rows)
    res["probs_equal"] = torch.equal(rprobs.detach(), ref_probs)
    res["counts_equal"] = torch.equal(tpe, ref_counts)
    out = disp.combine(experts(rows, tpe, rprobs), sent.handle)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(99 + rank), dtype=torch.float64)
    (out.to(torch.float64) * gy).sum().backward()
    # Dense reference on this rank's tokens.
    hr = h0.clone().to(torch.float64).requires_grad_(True)
    pr = p0.clone().to(torch.float64).requires_grad_(True)
    pp, mm = pr, m0
    if case.get("capacity_factor"):
        pp, mm = moerail.apply_token_dropping(pr, m0, case["topk"], case["capacity_factor"],
                                              case.get("drop_policy", "probs"), case.get("pad", False))
    ref_out = dense_moe(hr, pp, mm, mine[4], disp.phy2log, weights, case)
    (ref_out * gy).sum().backward()
    tol = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(
        h0.dtype, dict(rtol=3e-2, atol=3e-2))
    res["out_close"] = torch.allclose(out.to(torch.float64), ref_out, **tol)
    res["grad_hidden_close"] = torch.allclose(h.grad.to(torch.float64), hr.grad, **tol)
    res["grad_probs_close"] = torch.allclose(p.grad.to(torch.float64), pr.grad, **({**tol, "rtol": max(tol["rtol"], 1e-4)}))
    res["out"] = out.detach().double().tolist()  # plain data through the queue
    # Bytes: what this rank sent across nodes, summed over the group, against the plan.
    stats = disp.last_stats
    sent = torch.tensor([[stats["measured"][ps]["sent_inter_node_bytes"], stats["measured"][ps]["sent_intra_node_bytes"]]
                         for ps in ("dispatch", "combine", "combine_backward", "dispatch_backward")], dtype=torch.int64)
    dist.all_reduce(sent)
    planned = torch.tensor([[stats["planned"][ps]["inter_node_bytes"], stats["planned"][ps]["intra_node_bytes"]]
                            for ps in ("dispatch", "combine", "combine_backward", "dispatch_backward")], dtype=torch.int64)
    res["bytes_equal"] = torch.equal(sent, planned)
    res["sent"] = sent.tolist()
    res["planned"] = planned.tolist()
    res["strategy"] = stats["strategy"]
    res["executor"] = stats["executor"]
    return res


def run_chunked(case, disp, experts, h, p, h0, p0, m0, mine, weights, rank) -> dict:
    """forward() with num_chunks > 1 against the dense reference; the overlap it reports."""
    out = disp.forward(h, p, m0, experts)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(99 + rank), dtype=torch.float64)
    (out.to(torch.float64) * gy).sum().backward()
    hr = h0.clone().to(torch.float64).requires_grad_(True)
    pr = p0.clone().to(torch.float64).requires_grad_(True)
    ref_out = dense_moe(hr, pr, m0, mine[4], disp.phy2log, weights, case)
    (ref_out * gy).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10)
    ov = disp.last_stats["overlap"]
    return {
        "rows_equal": True, "probs_equal": True, "counts_equal": True, "bytes_equal": True, "sent": [], "planned": [],
        "out_close": torch.allclose(out.detach().double(), ref_out, **tol),
        "grad_hidden_close": torch.allclose(h.grad.double(), hr.grad, **tol),
        "grad_probs_close": torch.allclose(p.grad.double(), pr.grad, rtol=1e-6, atol=1e-8),
        "overlap": ov, "strategy": disp.last_stats["strategy"], "out": out.detach().double().tolist(),
        "executor": disp.last_stats["executor"],
    }


def run_etp_case(case: dict, rank: int, ep_group, etp_group) -> dict:
    """EP2 x ETP2 on 4 ranks (ETP groups {0,1} {2,3}, EP groups {0,2} {1,3}): each ETP rank holds
    half of every local expert's FFN (fc1 columns, fc2 rows); every rank's output and gradients
    must equal the dense computation with whole experts."""
    e, ffn = case["experts"], 12
    disp = moerail.AllToAllDispatcher(e, ep_group, ranks_per_node=1, strategy=case["strategy"], etp_group=etp_group,
                                      timeout=timedelta(seconds=60))
    g = torch.Generator().manual_seed(31)
    w1 = torch.randn(e, HIDDEN, ffn, generator=g, dtype=torch.float64) / HIDDEN**0.5
    w2 = torch.randn(e, ffn, HIDDEN, generator=g, dtype=torch.float64) / ffn**0.5
    h0, p0, m0 = inputs(case, rank)
    h, p = h0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
    rows, per_slot, rprobs = sent = disp.dispatch(h, p, m0)
    ep_rank, etp_rank, loc = dist.get_rank(ep_group), dist.get_rank(etp_group), disp.num_local_experts
    sh = slice(etp_rank * ffn // 2, (etp_rank + 1) * ffn // 2)
    outs, start = [], 0
    for slot, n in enumerate(per_slot.tolist()):
        ex = ep_rank * loc + slot
        x = rows[start : start + n]
        outs.append(torch.nn.functional.silu(x @ w1[ex][:, sh]) @ w2[ex][sh, :] * rprobs[start : start + n, None])
        start += n
    out = disp.combine(torch.cat(outs), sent.handle)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(5 + rank), dtype=torch.float64)
    (out * gy).sum().backward()
    hr, pr = h0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
    idx = moerail.ep.plan._compact(m0)
    wts = pr.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0)
    ref = hr * 0 + pr.sum() * 0
    for j in range(idx.shape[1]):
        ex = idx[:, j].clamp(min=0)
        y = torch.einsum("tf,tfh->th", torch.nn.functional.silu(torch.einsum("th,thf->tf", hr, w1[ex])), w2[ex])
        ref = ref + torch.where((idx[:, j] >= 0)[:, None], y * wts[:, j : j + 1], torch.zeros_like(y))
    (ref * gy).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10)
    return {"out_close": torch.allclose(out, ref, **tol), "grad_hidden_close": torch.allclose(h.grad, hr.grad, **tol),
            "grad_probs_close": torch.allclose(p.grad.double(), pr.grad.double(), rtol=1e-6, atol=1e-8),
            "rows": int(rows.shape[0]), "strategy": disp.last_stats["strategy"]}


def worker(rank: int, world: int, port: int, cases: list, out_q) -> None:
    os.environ["MOERAIL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        # Groups for the ETP cases (every rank creates every group, in the same order).
        etp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        ep_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        results = []
        for case in cases:
            if case.get("etp"):
                results.append(run_etp_case(case, rank, ep_groups[rank % 2], etp_groups[rank // 2]))
                continue
            if case.get("expect_error"):
                try:
                    run_case(case, world, rank)
                    results.append({"error": None})
                except Exception as e:  # noqa: BLE001 - the test checks the message
                    results.append({"error": f"{type(e).__name__}: {e}"})
                continue
            results.append(run_case(case, world, rank))
        out_q.put((rank, results))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        out_q.put((rank, traceback.format_exc()))


def hccl_unavailable_worker(rank: int, world: int, port: int, empty_dir: str, out_q) -> None:
    """``exchange="hccl"`` where rank 1 finds no HCCL: every rank must raise the same error (the
    others must not wait in HCCL's communicator set-up)."""
    try:
        if rank == 1:
            os.environ["MOERAIL_ASCEND_LIB_DIR"] = empty_dir
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        case = dict(seed=1, tokens=[6, 5], experts=4, topk=2)
        disp = moerail.AllToAllDispatcher(4, None, ranks_per_node=1, strategy="flat", exchange="hccl",
                                          timeout=timedelta(seconds=30))
        h, p, m = inputs(case, rank)
        try:
            disp.dispatch(h, p, m)
            out_q.put((rank, None))
        except RuntimeError as e:
            out_q.put((rank, str(e)))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        out_q.put((rank, traceback.format_exc()))


HCCL_MISMATCHES = ["counts", "row", "bad_args"]


def hccl_mismatch_worker(rank: int, world: int, port: int, out_q) -> None:
    """``HcclExchange.exchange`` on 2 ranks whose arguments disagree (rank 1 sends rank 0 more rows
    than rank 0 expects; rows of another width; rank 1's own bad send_rows): every rank must raise,
    before HCCL sees the counts; then a consistent exchange still works."""
    try:
        from moerail.backends.hccl import HcclExchange

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        x = HcclExchange.from_group(None)
        send, recv = ([1, 2], [1, 2]) if rank == 0 else ([2, 2], [2, 2])
        res = {}
        for name in HCCL_MISMATCHES:
            s, width = list(send), 8
            if rank == 1 and name == "counts":
                s = [3, 2]
            if rank == 1 and name == "row":
                width = 16
            if rank == 1 and name == "bad_args":
                s = [2, 2, 0]
            buf = torch.zeros(sum(s), width)
            try:
                x.exchange(buf, s, recv, stream=0)
                res[name] = "no error"
            except Exception as e:  # noqa: BLE001 - reported to the parent
                res[name] = f"{type(e).__name__}: {e}"
        buf = torch.arange(sum(send) * 8, dtype=torch.float32).reshape(-1, 8) + 100 * rank
        out = x.exchange(buf, send, recv, stream=0)
        res["after"] = (tuple(out.shape), out[:, 0].tolist())
        x.close()
        out_q.put((rank, res))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        out_q.put((rank, traceback.format_exc()))


def handles_worker(rank: int, world: int, port: int, strategy: str, out_q) -> None:
    """Two micro-batches dispatched one after the other and combined in reverse order, each by
    its own handle (as a pipeline schedule that overlaps them does), against dispatch-then-
    combine of each alone: the same bits, forward and backward. Then the deprecated combine
    without a handle (the last dispatch's route, with a DeprecationWarning) and a bad handle."""
    os.environ["MOERAIL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        disp = moerail.AllToAllDispatcher(8, None, ranks_per_node=2, strategy=strategy)
        cases = [dict(seed=11, tokens=[9, 7, 12, 5], experts=8, topk=3),
                 dict(seed=12, tokens=[4, 10, 6, 8], experts=8, topk=3)]

        def run(order):
            leaves, outs = [], [None, None]
            sent = []
            for c in cases:
                h, p, m = inputs(c, rank)
                h, p = h.clone().requires_grad_(True), p.clone().requires_grad_(True)
                leaves.append((h, p))
                sent.append((disp.dispatch(h, p, m), h))
                if order == "each":
                    rows, _, rp = sent[-1][0]
                    outs[len(sent) - 1] = disp.combine(rows * 2.0 * rp[:, None], sent[-1][0].handle)
            if order == "reverse":
                for i in (1, 0):
                    rows, _, rp = sent[i][0]
                    outs[i] = disp.combine(rows * 2.0 * rp[:, None], sent[i][0].handle)
            (outs[0].sum() + (outs[1] * 3).sum()).backward()
            return [o.detach() for o in outs] + [t.grad for pair in leaves for t in pair]

        each, reverse = run("each"), run("reverse")
        res = {"same_bits": all(torch.equal(a, b) for a, b in zip(each, reverse))}
        h, p, m = inputs(cases[0], rank)
        rows, _, rp = sent = disp.dispatch(h, p, m)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            old = disp.combine(rows * rp[:, None])
        res["deprecated_warns"] = any(issubclass(x.category, DeprecationWarning) for x in w)
        res["deprecated_same"] = torch.equal(old, disp.combine(rows * rp[:, None], sent.handle))
        try:
            disp.combine(rows * rp[:, None], "not a handle")
            res["bad_handle"] = None
        except TypeError as e:
            res["bad_handle"] = str(e)
        out_q.put((rank, res))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        out_q.put((rank, traceback.format_exc()))
