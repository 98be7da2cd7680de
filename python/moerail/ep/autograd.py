"""The ``torch.autograd.Function`` classes behind :class:`moerail.ep.AllToAllDispatcher`: dispatch
and combine (each one's backward is the other exchange) and the expert-tensor-parallel (ETP)
gather / reduce-scatter of the rows around the experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .dispatcher import AllToAllDispatcher, DispatchHandle


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weights, disp: AllToAllDispatcher, route: DispatchHandle):
        ctx.disp, ctx.route = disp, route
        ctx.weights_dtype = weights.dtype
        with torch.no_grad():
            return disp._forward_pass(route, hidden.detach(), weights.detach(), "dispatch")

    @staticmethod
    def backward(ctx, grad_rows, grad_probs):
        route = ctx.route
        n = route.out_rows.numel()
        if grad_rows is None:
            grad_rows = torch.zeros(n, route.hidden, dtype=route.dtype, device=route.device)
        if grad_probs is None:
            grad_probs = torch.zeros(n, dtype=torch.float32, device=route.device)
        g_hidden, g_w = ctx.disp._reverse_pass(route, grad_rows.contiguous(), grad_probs, "dispatch_backward")
        if g_w is not None:
            g_w = g_w.to(ctx.weights_dtype)
        return g_hidden, g_w, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, disp: AllToAllDispatcher, route: DispatchHandle):
        ctx.disp, ctx.route = disp, route
        with torch.no_grad():
            out, _ = disp._reverse_pass(route, rows.detach().contiguous(), None, "combine")
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, _ = ctx.disp._forward_pass(ctx.route, grad.contiguous(), None, "combine_backward")
        return rows, None, None


def _etp_all_rows(disp: AllToAllDispatcher, x: torch.Tensor, info) -> torch.Tensor:
    """Every ETP rank's rows of ``x`` (uneven counts: padded to the largest), concatenated in
    ETP-rank order."""
    sizes, _, _ = info
    m = max(sizes) if sizes else 0
    pad = torch.zeros(m, *x.shape[1:], dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    disp._wait(dist.all_gather(parts, pad, group=disp.etp_group, async_op=True))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _etp_own_sum(disp: AllToAllDispatcher, full: torch.Tensor, info) -> torch.Tensor:
    """The sum over ETP ranks of ``full`` (ETP-rank order), this rank's rows of it."""
    sizes, _, me = info
    full = full.contiguous().clone()
    disp._wait(dist.all_reduce(full, group=disp.etp_group, async_op=True))
    start = sum(sizes[:me])
    return full[start : start + sizes[me]].clone()


class _EtpGather(torch.autograd.Function):
    """All ETP ranks' rows, in (local slot, ETP rank) order; backward: each rank's rows get the
    sum of every ETP rank's gradient for them (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, disp, info):
        ctx.disp, ctx.info = disp, info
        return _etp_all_rows(disp, x.detach(), info)[info[1]]

    @staticmethod
    def backward(ctx, grad):
        order = ctx.info[1]
        full = torch.zeros_like(grad)
        full[order] = grad
        return _etp_own_sum(ctx.disp, full, ctx.info), None, None


class _EtpReduceScatter(torch.autograd.Function):
    """The expert outputs (partial sums from each ETP rank's weight shard) summed over the ETP
    group, this rank's rows; backward: every rank's gradient rows gathered."""

    @staticmethod
    def forward(ctx, y, disp, info):
        ctx.disp, ctx.info = disp, info
        full = torch.zeros_like(y)
        full[info[1]] = y.detach()
        return _etp_own_sum(disp, full, info)

    @staticmethod
    def backward(ctx, grad):
        return _etp_all_rows(ctx.disp, grad.contiguous(), ctx.info)[ctx.info[1]], None, None
