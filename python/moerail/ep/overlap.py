"""Chunked overlap of the exchange with the experts, forward and backward: the
``torch.autograd.Function`` behind ``AllToAllDispatcher.forward(..., num_chunks > 1)``.

The tokens go in ``n`` chunks, planned together (one all-gather carries every chunk's counts) and
exchanged one by one. A helper thread runs the exchanges (packing, all-to-alls, sums) of the other
chunks while the calling thread runs the experts on one:

* forward: dispatch ``i + 1`` and combine ``i - 1`` while the experts compute chunk ``i``;
* backward: the combine's backward of chunk ``i + 1`` and the dispatch's backward of chunk
  ``i - 1`` while the experts' backward runs for chunk ``i`` (``torch.autograd.backward`` on the
  chunk's own graph, as reentrant activation checkpointing does, so parameter gradients
  accumulate through their usual hooks, e.g. Megatron's DDP ``main_grad``).

The helper issues the collectives in the same order on every rank and the calling thread issues
none of the group's while it waits, so ranks cannot cross. Each token's rows are summed in the same
order as with one chunk; the experts see the same rows in smaller batches, so the outputs are
those of one chunk up to the experts' own rounding on a different batch size (a GEMM may block
its rows differently), and the parameter gradients are sums over chunks.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable, List, Optional

import torch

if TYPE_CHECKING:
    from .dispatcher import AllToAllDispatcher

__all__: List[str] = []


class _Helper:
    """Runs one list of jobs in a thread; ``join`` returns the seconds the caller waited and
    re-raises a job's error in the caller."""

    def __init__(self, jobs: List[Callable[[], None]]):
        self.error: Optional[BaseException] = None
        self.busy = 0.0
        self.thread = None
        if jobs:
            self.thread = threading.Thread(target=self._run, args=(jobs,), daemon=True)
            self.thread.start()

    def _run(self, jobs) -> None:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                for job in jobs:
                    job()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            self.error = e
        self.busy = time.perf_counter() - t0

    def join(self) -> float:
        if self.thread is None:
            return 0.0
        t0 = time.perf_counter()
        self.thread.join()
        waited = time.perf_counter() - t0
        if self.error is not None:
            raise self.error
        return waited


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


class Overlapped(torch.autograd.Function):
    """``forward(ctx, hidden [T, H], weights [T, K], disp, chunks, experts, build_graph)``:
    ``chunks`` is a list of ``(start, stop, slots)`` token ranges (``slots [stop - start, k]``, the
    first ``k`` entry columns of ``weights`` for those tokens); ``experts(rows,
    tokens_per_local_expert, probs) -> rows``; ``build_graph``: whether grad mode was on at the
    call (inside ``forward`` it is off), so the experts' graphs are kept for the backward. Returns the combined ``[T, H]``; the seconds of exchange work and of waiting
    for it go to ``disp._overlap`` (this call) and ``disp.overlap_totals`` (running sums)."""

    @staticmethod
    def forward(ctx, hidden, weights, disp: AllToAllDispatcher, chunks, experts, build_graph: bool):
        n = len(chunks)
        h_all, w_all = hidden.detach(), weights.detach()
        probs_grad = build_graph and weights.requires_grad
        routes: list = [None] * n
        rows: list = [None] * n
        outs: List[Optional[torch.Tensor]] = [None] * n
        xs: list = [None] * n
        ps: list = [None] * n
        ys: list = [None] * n

        def dispatch(i):
            a, b, slots = chunks[i]
            rows[i] = disp._forward_pass(routes[i], h_all[a:b], w_all[a:b, : slots.shape[1]], "dispatch")

        def combine(i):
            outs[i], _ = disp._reverse_pass(routes[i], ys[i].detach().contiguous(), None, "combine")

        def plan():
            routes[:] = disp._route_chunks([(h_all[a:b], w_all[a:b, : s.shape[1]], s) for a, b, s in chunks], None,
                                           hidden, probs_grad)
            dispatch(0)

        work = _timed(plan)
        exposed = work
        for i in range(n):
            helper = _Helper(([lambda i=i: combine(i - 1)] if i else []) + ([lambda i=i: dispatch(i + 1)] if i + 1 < n
                                                                           else []))
            r, rp = rows[i]
            x = r.detach().requires_grad_(build_graph and hidden.requires_grad)
            p = rp.detach().requires_grad_(build_graph and weights.requires_grad) if rp is not None else None
            with torch.set_grad_enabled(build_graph):
                ys[i] = experts(x, routes[i].tokens_per_local_expert, p)
            xs[i], ps[i] = x, p
            waited = helper.join()
            exposed += min(waited, helper.busy)  # a wait beyond the helper's work is its start-up
            work += helper.busy
        tail = _timed(lambda: combine(n - 1))
        work += tail
        exposed += tail
        disp._last = routes[-1]
        disp._note_overlap(n, work, exposed)
        if build_graph:
            ctx.disp, ctx.chunks, ctx.routes = disp, chunks, routes
            ctx.xs, ctx.ps, ctx.ys = xs, ps, ys
            ctx.weights_dtype, ctx.weights_shape = weights.dtype, weights.shape
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out):
        disp, chunks, routes = ctx.disp, ctx.chunks, ctx.routes
        n = len(chunks)
        g_rows: list = [None] * n
        g_h: list = [None] * n
        g_w: list = [None] * n
        g = grad_out.contiguous()

        def combine_backward(i):
            a, b, _ = chunks[i]
            g_rows[i], _ = disp._forward_pass(routes[i], g[a:b], None, "combine_backward")

        def dispatch_backward(i):
            x, p, route = ctx.xs[i], ctx.ps[i], routes[i]
            gx = x.grad if x.grad is not None else torch.zeros_like(x)
            gp = p.grad if p is not None and p.grad is not None else torch.zeros(x.shape[0], dtype=torch.float32,
                                                                                  device=x.device)
            g_h[i], g_w[i] = disp._reverse_pass(route, gx.contiguous(), gp, "dispatch_backward")

        work = _timed(lambda: combine_backward(0))
        exposed = work
        for i in range(n):
            helper = _Helper(([lambda i=i: dispatch_backward(i - 1)] if i else [])
                             + ([lambda i=i: combine_backward(i + 1)] if i + 1 < n else []))
            y = ctx.ys[i]
            if y.requires_grad:
                torch.autograd.backward(y, g_rows[i])
            waited = helper.join()
            exposed += min(waited, helper.busy)  # a wait beyond the helper's work is its start-up
            work += helper.busy
        tail = _timed(lambda: dispatch_backward(n - 1))
        work += tail
        exposed += tail
        disp._note_overlap(n, work, exposed, backward=True)
        ctx.xs = ctx.ps = ctx.ys = None
        gw = None
        if any(x is not None for x in g_w):
            gw = torch.zeros(ctx.weights_shape, dtype=ctx.weights_dtype, device=grad_out.device)
            for (a, b, slots), x in zip(chunks, g_w):
                if x is not None:
                    gw[a:b, : slots.shape[1]] = x
        return torch.cat(g_h), gw, None, None, None, None
