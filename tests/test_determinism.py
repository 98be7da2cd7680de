"""Same inputs, same bits: for any thread count, across runs, and in a forked child."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

import moerail


def _run_all_ops(seed: int = 0):
    """Every op, forward and backward, at sizes that split across many parallel tasks."""
    g = torch.Generator().manual_seed(seed)
    t, e, k, h = 3000, 64, 6, 40
    logits = torch.randn(t, e, generator=g).requires_grad_()
    bias = torch.randn(e, generator=g) * 0.1
    outs = []
    for kw in (dict(), dict(score_function="sigmoid", num_groups=8, group_topk=4, expert_bias=bias, scaling_factor=2.5)):
        probs, routing_map = moerail.topk_route(logits, k, **kw)
        probs.square().sum().backward()
        outs += [probs.detach(), routing_map, logits.grad.clone()]
        logits.grad = None
    rm, scores = moerail.routing_scores_for_aux_loss(logits, k, "softmax")
    aux = moerail.switch_load_balancing_loss(scores, rm.sum(0), t, k, e, 0.01) + moerail.z_loss(logits, 1e-3)
    aux = aux + moerail.sequence_load_balancing_loss(scores, rm, 1000, 3, k, 0.01)
    aux.backward()
    outs += [aux.detach(), logits.grad.clone()]
    probs, routing_map = moerail.topk_route(logits.detach(), k)
    probs, routing_map = moerail.apply_token_dropping(probs, routing_map, k, 0.8, "probs")
    x = torch.randn(t, h, generator=g).to(torch.bfloat16).requires_grad_()
    p = probs.clone().requires_grad_()
    out, pp, si, _, tpe = moerail.permute(x, routing_map, p)
    y = out * 1.25
    z = moerail.unpermute(y, si, x.shape, probs=p, routing_map=routing_map)
    z.float().pow(2).sum().backward()
    outs += [out.detach(), pp.detach(), si, tpe, z.detach(), x.grad, p.grad]
    sizes = tpe[:60].clone()
    order = torch.randperm(60, generator=g)
    sc, _ = moerail.sort_chunks_by_idxs(out.detach()[: int(sizes.sum())], sizes, order)
    outs.append(sc)
    return outs


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype == torch.bool else t.view(torch.uint8)


def _same_bits(a, b):
    return len(a) == len(b) and all(torch.equal(_bits(u), _bits(v)) for u, v in zip(a, b))


def test_identical_bits_for_any_thread_count(restore_threads):
    results = []
    for n in (1, 2, 3, 8):
        moerail.set_num_threads(n)
        results.append(_run_all_ops())
    for r in results[1:]:
        assert _same_bits(results[0], r)


def test_identical_bits_across_runs():
    assert _same_bits(_run_all_ops(seed=4), _run_all_ops(seed=4))


def _child(q):
    # As DataLoader workers do: torch's own OpenMP pool (libgomp) cannot be used again after
    # fork() once the parent used it. moerail's pool keeps 2 threads and is rebuilt here.
    torch.set_num_threads(1)
    try:
        q.put([t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy() for t in _run_all_ops(seed=2)])
    except Exception as e:  # pragma: no cover - reported through the queue
        q.put(repr(e))


def test_works_in_forked_child(restore_threads):
    """moerail's pool is rebuilt in a forked child (DataLoader workers) instead of hanging."""
    moerail.set_num_threads(2)
    parent = _run_all_ops(seed=2)  # the parent's pool exists and is busy-capable before fork
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q,))
    proc.start()
    try:
        got = q.get(timeout=120)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            pytest.fail("forked child hung")
    assert not isinstance(got, str), got
    for a, b in zip(parent, got):
        a = a.view(torch.int16) if a.dtype == torch.bfloat16 else a
        assert torch.equal(a, torch.from_numpy(b))


def test_thread_count_setting():
    with pytest.raises(ValueError, match="num_threads"):
        moerail.set_num_threads(0)
    with pytest.raises(TypeError, match="num_threads"):
        moerail.set_num_threads(1.5)
