"""The custom ops as torch sees them: opcheck (schema, fake kernels, autograd registration,
dynamic shapes) and torch.compile(fullgraph=True) of a MoE block."""

from __future__ import annotations

import pytest
import torch

import moerail

T, E, K, H = 24, 8, 2, 6


def _samples():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    probs, rmap = moerail.topk_route(logits, K)
    _, idx = moerail.topk_route(logits, K, dense_output=True)
    x = torch.randn(T, H, generator=g)
    out, pp, si, _, tpe = moerail.permute(x, rmap, probs)
    ops = torch.ops.moerail
    return [
        (ops.topk_route, (logits.requires_grad_(), K, False, None, None, None, "softmax", None)),
        (ops.topk_route, (logits, K, True, 4, 2, 1.5, "softmax", None)),
        (ops.topk_route_compact, (logits.double(), K, False, 4, 2, 2.5, "sigmoid", torch.randn(E))),
        (ops.topk_route_backward, (probs, logits.detach(), idx, K, False, None, "softmax")),
        (ops.aux_loss_scores, (logits, K, "sigmoid")),
        (ops.aux_loss_scores_backward, (torch.randn(T, E), logits.detach(), "softmax")),
        (ops.load_balancing_loss, (probs.detach().requires_grad_(), tpe, 1, 0.01)),
        (ops.z_loss, (logits.detach().requires_grad_(), 0.01)),
        (ops.expert_bias_update, (tpe, torch.zeros(E), 0.001)),
        (ops.apply_token_dropping, (probs.detach().requires_grad_(), rmap, K, 0.5, "probs", True)),
        (ops.permute, (x.requires_grad_(), rmap, probs.detach().requires_grad_(), T * K, False, 0)),
        (ops.permute, (x, rmap, None, -1, False, 4)),
        (ops.permute, (x, rmap, probs.detach(), 2 * E, True, 0)),
        (ops.permute_by_indices, (x, idx, E, probs.gather(1, idx).detach().requires_grad_(), 0)),
        (ops.unpermute, (out.detach().requires_grad_(), si, T, pp.detach().requires_grad_())),
        (ops.unpermute_backward, (torch.randn(T, H), out.detach(), si, pp.detach())),
        (ops.row_weights, (probs.detach().requires_grad_(), si, tpe, torch.float32)),
        (ops.scatter_rows, (pp.detach(), si, tpe, T, E)),
        (ops.sort_chunks, (x, torch.tensor([5, 0, 19]), torch.tensor([2, 0, 1]))),
    ]


@pytest.mark.parametrize("i", range(len(_samples())))
def test_opcheck(i):
    op, args = _samples()[i]
    torch.library.opcheck(op, args)


def _moe_block(x, logits, w_in, w_out):
    probs, routing_map = moerail.topk_route(logits, K, score_function="sigmoid")
    rm_aux, scores = moerail.routing_scores_for_aux_loss(logits, K, "sigmoid")
    aux = moerail.switch_load_balancing_loss(scores, rm_aux.sum(0), x.shape[0], K, E, 0.01) + moerail.z_loss(logits, 1e-3)
    out, pp, si, _, tpe = moerail.permute(x, routing_map, probs, num_out_tokens=x.shape[0] * K)
    h = torch.tanh(out @ w_in) @ w_out
    y = moerail.unpermute(h * pp.unsqueeze(-1), si, x.shape)
    return y, aux


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x, logits = torch.randn(T, H, generator=g), torch.randn(T, E, generator=g)
    w_in, w_out = torch.randn(H, 16, generator=g), torch.randn(16, H, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, logits, w_in, w_out)]
        y, aux = fn(*leaves)
        (y.square().sum() + aux).backward()
        return [y.detach(), aux.detach()] + [t.grad for t in leaves]

    eager = run(_moe_block)
    compiled = run(torch.compile(_moe_block, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_dropless_without_num_out_tokens():
    """A data-dependent number of rows traces as an unbacked size."""
    torch._dynamo.reset()

    def f(x, rmap):
        out, _, si, _, _ = moerail.permute(x, rmap)
        return moerail.unpermute(out * 2, si, x.shape)

    x = torch.randn(T, H)
    _, rmap = moerail.topk_route(torch.randn(T, E), K)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, rmap), f(x, rmap))
