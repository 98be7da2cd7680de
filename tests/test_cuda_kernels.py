"""moerail's CUDA kernels (``csrc/cuda``) against moerail's CPU path — which the other test files
compare with Megatron-Core's own functions — on two backends:

* ``emulator``: the kernels compiled for the CPU by g++ against ``tests/cuda_emu/emulator.h``
  (each block's threads run as fibers with CUDA's barrier and warp semantics), launched through
  the same Rust launch sequences and Python glue as on a GPU. Runs everywhere (skips without a
  C++ compiler).
* ``cuda``: a real GPU (NVRTC compile on first use, torch's current stream). Skips, with the
  reason printed, where torch sees no GPU.

Results must be bit-identical to the CPU path (the kernels sum in the CPU's order, with
``--fmad=false``); the score function ``sqrtsoftplus`` may differ by an ulp (libm's log1p/exp).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import cuda_emu
import moerail
from moerail.backends import cuda as _device
from moerail.ops import custom_ops as ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", params=["emulator", "cuda"])
def dev(request):
    """The device the kernels run on; CPU tensors for the emulator."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU here (torch.cuda.is_available() is False); these run on a GPU machine")
        yield torch.device("cuda")
        return
    try:
        path = cuda_emu.build()
    except cuda_emu.Unavailable as e:
        pytest.skip(str(e))
    _device.use_emulator(path)
    try:
        yield torch.device("cpu")
    finally:
        _device.use_emulator(None)


@contextlib.contextmanager
def cpu_path():
    """Runs the CPU kernels even while the emulator is on."""
    saved = _device._emulator
    if saved is not None:
        _device.use_emulator(None)
    try:
        yield
    finally:
        if saved is not None:
            _device.use_emulator(saved)


def ref(fn, *args, **kw):
    """``fn`` on CPU copies of the arguments, through the CPU kernels."""
    def to_cpu(a):
        return a.detach().cpu().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a

    with cpu_path():
        return fn(*[to_cpu(a) for a in args], **{k: to_cpu(v) for k, v in kw.items()})


def same(a, b, what=""):
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
    b = b.cpu()
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    assert torch.equal(a, b), f"{what}: max diff {(a.double() - b.double()).abs().max().item()}"


ROUTERS = {
    "softmax": dict(topk=2),
    "pre_softmax": dict(topk=4, use_pre_softmax=True),
    "sigmoid_bias_scale": dict(topk=4, score_function="sigmoid", scaling_factor=2.5, bias=True),
    "group_limited": dict(topk=8, num_groups=8, group_topk=4, score_function="sigmoid", bias=True),
    "sqrtsoftplus": dict(topk=4, score_function="sqrtsoftplus"),
    "topk_eq_e": dict(topk=16),
}


def _router_args(name, e, device):
    c = dict(ROUTERS[name])
    bias = None
    if c.pop("bias", False):
        bias = (torch.arange(e, dtype=torch.float32) % 5 * 0.01).to(device)
    return c, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_forward_backward(dev, name, dtype):
    t, e = 67, 64 if name == "group_limited" else 16
    c, bias = _router_args(name, e, dev)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64).to(dtype).to(dev, copy=True).requires_grad_()
    out = moerail.topk_route(logits, expert_bias=bias, return_tokens_per_expert=True, **c)
    want = ref(moerail.topk_route, logits, expert_bias=bias, return_tokens_per_expert=True, **c)
    grad = torch.randn(t, e, generator=g, dtype=torch.float64).to(dtype)
    (out[0] * grad.to(dev)).sum().backward()
    gl = logits.grad
    lw = logits.detach().cpu().requires_grad_()
    with cpu_path():
        w2 = moerail.topk_route(lw, expert_bias=None if bias is None else bias.cpu(), **c)
        (w2[0] * grad).sum().backward()
    if name == "sqrtsoftplus":
        tol = dict(rtol=2e-6, atol=1e-7) if dtype in (torch.float32, torch.float64) else dict(rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(out[0].cpu(), want[0], **tol)
        torch.testing.assert_close(gl.cpu(), lw.grad, **tol)
    else:
        same(out[0].detach(), want[0].detach(), "probs")
        same(gl, lw.grad, "grad logits")
    same(out[1], want[1], "routing_map")
    same(out[2], want[2], "tokens_per_expert")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_compact_and_compact_backward(dev, dtype):
    t, e, k = 45, 32, 4
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(5)).to(dtype).to(dev, copy=True).requires_grad_()
    p, idx, tpe = moerail.topk_route(logits, k, dense_output=True, return_tokens_per_expert=True)
    wp, widx, wtpe = ref(moerail.topk_route, logits, k, dense_output=True, return_tokens_per_expert=True)
    same(p.detach(), wp.detach(), "probs")
    same(idx, widx, "indices")
    same(tpe, wtpe, "tokens_per_expert")
    p.sum().backward()
    lw = logits.detach().cpu().requires_grad_()
    with cpu_path():
        moerail.topk_route(lw, k, dense_output=True)[0].sum().backward()
    same(logits.grad, lw.grad, "grad logits")


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aux_loss_scores(dev, score_function, dtype):
    t, e, k = 53, 16, 4
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(9)).to(dtype).to(dev, copy=True).requires_grad_()
    s, m, tpe = ops.aux_loss_scores(logits, k, score_function)
    lw = logits.detach().cpu().requires_grad_()
    with cpu_path():
        ws, wm, wtpe = ops.aux_loss_scores(lw, k, score_function)
    same(s.detach(), ws.detach(), "scores")
    same(m, wm, "routing_map")
    same(tpe, wtpe, "tokens_per_expert")
    g = torch.linspace(-1, 1, t * e, dtype=s.dtype).reshape(t, e)
    (s * g.to(dev)).sum().backward()
    with cpu_path():
        (ws * g).sum().backward()
    same(logits.grad, lw.grad, "grad logits")


def _routing(t, e, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64).to(dtype)
    with cpu_path():
        probs, rmap = moerail.topk_route(logits, k)
    return probs, rmap


PERMUTES = {
    "dropless": dict(),
    "num_out_tokens": dict(num_out=True),
    "align16": dict(align_size=16),
    "drop_and_pad": dict(drop_and_pad=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PERMUTES))
def test_permute_unpermute_with_probs(dev, case, dtype):
    t, e, k, h = 61, 8, 2, 40
    c = dict(PERMUTES[case])
    probs, rmap = _routing(t, e, k, seed=1, dtype=dtype)
    kw = {}
    if c.get("num_out"):
        kw["num_out_tokens"] = t * k
    if c.get("align_size"):
        kw["align_size"] = c["align_size"]
    if c.get("drop_and_pad"):
        kw.update(drop_and_pad=True, num_out_tokens=(t * k // e - 3) * e)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(2)).to(dtype)
    xd = x.to(dev, copy=True).requires_grad_()
    pd = probs.to(dev, copy=True).requires_grad_()
    out = moerail.permute(xd, rmap.to(dev), probs=pd, **kw)
    xr, pr = x.clone().requires_grad_(), probs.clone().requires_grad_()
    with cpu_path():
        want = moerail.permute(xr, rmap, probs=pr, **kw)
    for a, b, what in zip(out, want, ["rows", "probs", "sorted_indices", "pad_offsets"]):
        if isinstance(a, torch.Tensor):
            same(a.detach(), b.detach(), what)
    rows, si = out[0], out[2]
    # Expert work, then the weighted combine back (the row probs of the permute).
    y = rows * 1.5
    back = moerail.unpermute(y, si, restore_shape=(t, h), probs=pd, routing_map=rmap.to(dev),
                             drop_and_pad=bool(kw.get("drop_and_pad")), pad_offsets=out[3])
    with cpu_path():
        wback = moerail.unpermute(want[0] * 1.5, want[2], restore_shape=(t, h), probs=pr, routing_map=rmap,
                                  drop_and_pad=bool(kw.get("drop_and_pad")), pad_offsets=want[3])
    same(back.detach(), wback.detach(), "unpermute")
    go = torch.randn(t, h, generator=torch.Generator().manual_seed(4)).to(dtype)
    (back * go.to(dev)).sum().backward()
    with cpu_path():
        (wback * go).sum().backward()
    same(xd.grad, xr.grad, "grad tokens")
    same(pd.grad, pr.grad, "grad probs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_permute_by_indices_and_gradients(dev, dtype):
    t, e, k, h = 50, 12, 3, 24
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(t, e, generator=g).to(dtype)
    with cpu_path():
        probs_k, idx = moerail.topk_route(logits, k, dense_output=True)
    x = torch.randn(t, h, generator=g).to(dtype)
    xd, pd = x.to(dev, copy=True).requires_grad_(), probs_k.to(dev, copy=True).requires_grad_()
    out = moerail.permute_by_indices(xd, idx.to(dev), e, probs=pd)
    xr, pr = x.clone().requires_grad_(), probs_k.clone().requires_grad_()
    with cpu_path():
        want = moerail.permute_by_indices(xr, idx, e, probs=pr)
    for i, (a, b) in enumerate(zip(out, want)):
        if isinstance(a, torch.Tensor):
            same(a.detach(), b.detach(), f"output {i}")
    w = torch.randn(out[0].shape, generator=g).to(dtype)
    (out[0] * w.to(dev)).sum().backward(retain_graph=True)
    (out[1].float() * 3).sum().backward()
    with cpu_path():
        (want[0] * w).sum().backward(retain_graph=True)
        (want[1].float() * 3).sum().backward()
    same(xd.grad, xr.grad, "grad tokens")
    same(pd.grad, pr.grad, "grad probs")


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_backward_with_weight_gradient(dev, dtype):
    t, e, k, h = 40, 8, 3, 33  # odd hidden: the one-element-per-thread kernels
    probs, rmap = _routing(t, e, k, seed=7, dtype=dtype)
    with cpu_path():
        rows, _, si = moerail.permute(torch.randn(t, h).to(dtype), rmap)[:3]
    xd = rows.to(dev, copy=True).requires_grad_()
    pd = probs.to(dev, copy=True).requires_grad_()
    out = moerail.unpermute(xd, si.to(dev), restore_shape=(t, h), probs=pd, routing_map=rmap.to(dev))
    xr, pr = rows.clone().requires_grad_(), probs.clone().requires_grad_()
    with cpu_path():
        want = moerail.unpermute(xr, si, restore_shape=(t, h), probs=pr, routing_map=rmap)
    same(out.detach(), want.detach(), "unpermute")
    go = torch.randn(t, h, generator=torch.Generator().manual_seed(8)).to(dtype)
    (out * go.to(dev)).sum().backward()
    with cpu_path():
        (want * go).sum().backward()
    same(xd.grad, xr.grad, "grad permuted tokens")
    same(pd.grad, pr.grad, "grad probs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_sort_chunks(dev, dtype):
    sizes = torch.tensor([3, 0, 5, 2, 7, 1])
    order = torch.tensor([4, 2, 0, 5, 1, 3])
    x = torch.arange(18 * 6).reshape(18, 6).to(dtype)
    out = ops.sort_chunks(x.to(dev), sizes.to(dev), order.to(dev))
    with cpu_path():
        want = ops.sort_chunks(x, sizes, order)
    same(out, want, "sort_chunks")
    if dtype.is_floating_point:
        xd = x.to(dev, copy=True).requires_grad_()
        y = moerail.sort_chunks_by_idxs(xd, sizes.to(dev), order.to(dev))[0]
        (y * torch.arange(y.numel()).reshape(y.shape).to(dtype).to(dev)).sum().backward()
        xr = x.clone().requires_grad_()
        with cpu_path():
            yr = moerail.sort_chunks_by_idxs(xr, sizes, order)[0]
            (yr * torch.arange(yr.numel()).reshape(yr.shape).to(dtype)).sum().backward()
        same(xd.grad, xr.grad, "grad")


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
def test_token_dropping_and_losses(dev, policy, pad):
    t, e, k = 64, 8, 2
    probs, rmap = _routing(t, e, k, seed=11)
    out = moerail.apply_token_dropping(probs.to(dev), rmap.to(dev), topk=k, capacity_factor=0.75,
                                       drop_policy=policy, pad_to_capacity=pad)
    want = ref(moerail.apply_token_dropping, probs, rmap, topk=k, capacity_factor=0.75,
               drop_policy=policy, pad_to_capacity=pad)
    same(out[0], want[0], "probs")
    same(out[1], want[1], "routing_map")
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    ld = logits.to(dev, copy=True).requires_grad_()
    lr = logits.clone().requires_grad_()
    z = moerail.z_loss(ld, 1e-3)
    with cpu_path():
        zr = moerail.z_loss(lr, 1e-3)
        zr.backward()
    torch.testing.assert_close(z.detach().cpu(), zr.detach(), rtol=1e-12, atol=0)
    z.backward()
    torch.testing.assert_close(ld.grad.cpu(), lr.grad, rtol=1e-12, atol=1e-18)
    _, scores, tpe = moerail.routing_scores_for_aux_loss(ld.detach(), k, "softmax", return_tokens_per_expert=True)
    sd = scores.clone().requires_grad_()
    loss = moerail.switch_load_balancing_loss(sd, tpe, total_num_tokens=t, topk=k, num_experts=e, coeff=0.01)
    sr = scores.detach().cpu().requires_grad_()
    with cpu_path():
        lref = moerail.switch_load_balancing_loss(sr, tpe.cpu(), total_num_tokens=t, topk=k, num_experts=e, coeff=0.01)
        lref.backward()
    torch.testing.assert_close(loss.detach().cpu(), lref.detach(), rtol=1e-12, atol=0)
    loss.backward()
    torch.testing.assert_close(sd.grad.cpu(), sr.grad, rtol=1e-12, atol=0)
    bias = torch.zeros(e)
    same(moerail.expert_bias_update(tpe, bias.to(dev), 1e-3), ref(moerail.expert_bias_update, tpe, bias, 1e-3), "bias")


def test_training_step_matches_cpu(dev):
    """Router -> permute -> expert matmul -> unpermute, forward and backward, bf16."""
    t, e, k, h = 48, 8, 2, 32
    g = torch.Generator().manual_seed(21)
    x = torch.randn(t, h, generator=g).bfloat16()
    wr = torch.randn(h, e, generator=g).bfloat16()
    we = torch.randn(e, h, h, generator=g).bfloat16() * 0.1

    def step(x, wr, we):
        logits = x @ wr
        probs, rmap = moerail.topk_route(logits, k)
        rows, _, si = moerail.permute(x, rmap)[:3]
        counts = rmap.sum(0).tolist()
        y = torch.cat([r @ we[i] for i, r in enumerate(rows.split(counts))])
        return moerail.unpermute(y, si, restore_shape=x.shape, probs=probs, routing_map=rmap)

    args = [a.to(dev, copy=True).requires_grad_() for a in (x, wr, we)]
    out = step(*args)
    out.float().square().sum().backward()
    rargs = [a.clone().requires_grad_() for a in (x, wr, we)]
    with cpu_path():
        rout = step(*rargs)
        rout.float().square().sum().backward()
    same(out.detach(), rout.detach(), "output")
    for a, b, n in zip(args, rargs, ["x", "router weight", "expert weights"]):
        same(a.grad, b.grad, f"grad {n}")


def test_same_bits_twice(dev):
    probs, rmap = _routing(97, 16, 4, seed=14, dtype=torch.bfloat16)
    x = torch.randn(97, 64).bfloat16().to(dev)
    a = moerail.permute(x, rmap.to(dev), probs=probs.to(dev))
    b = moerail.permute(x, rmap.to(dev), probs=probs.to(dev))
    same(a[0], b[0].cpu())
    ua = moerail.unpermute(a[0], a[2], restore_shape=x.shape, probs=probs.to(dev), routing_map=rmap.to(dev))
    ub = moerail.unpermute(b[0], b[2], restore_shape=x.shape, probs=probs.to(dev), routing_map=rmap.to(dev))
    same(ua, ub.cpu())


def test_device_value_checks_are_a_debug_mode(dev, monkeypatch):
    """Each value check is a host synchronisation per op call: off by default on devices, so a
    training step does not sync; on with MOERAIL_DEVICE_CHECKS=1 or device_checks()."""
    import subprocess
    import sys

    code = "import moerail.backends.cuda as c; print(c.device_checks_enabled())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "MOERAIL_DEVICE_CHECKS"}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra},  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout.strip()
    assert run({}) == "False" and run({"MOERAIL_DEVICE_CHECKS": "1"}) == "True"
    assert not _device.device_checks_enabled()
    x = torch.randn(6, 4).to(dev)
    assert _device._status(x) is None  # no status word: nothing to read back
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t.device) or real_item(t))
    logits = torch.randn(6, 4).to(dev)

    def step():
        probs, rmap = moerail.topk_route(logits, 2)
        out = moerail.permute(x, rmap, probs, num_out_tokens=12)
        return moerail.unpermute(out[0], out[2], x.shape, probs=probs, routing_map=rmap)

    step()
    assert reads == []  # router + permute + unpermute with the row count given: no host read
    with _device.device_checks():
        assert _device.device_checks_enabled() and _device._status(x) is not None
        step()
        assert reads  # the status words were read back
    assert not _device.device_checks_enabled()
    # Off, a num_out_tokens larger than the routed copies is trusted (no read back): the extra rows
    # are zero rows, never unwritten memory, and unpermute ignores them.
    probs, rmap = moerail.topk_route(logits, 2)
    out = moerail.permute(x, rmap, probs, num_out_tokens=14)
    same(out[0][12:].cpu(), torch.zeros(2, 4), "extra rows")
    assert out[2][12:].tolist() == [-1, -1]
    same(moerail.unpermute(out[0], out[2], x.shape).cpu(), moerail.unpermute(out[0][:12], out[2][:12], x.shape).cpu())
    with pytest.raises(TypeError, match="enabled"):
        _device.set_device_checks("yes")


def test_bad_input_on_the_device_path(dev):
    """In the debug mode (device value checks on) the device path raises what the CPU path raises."""
    with _device.device_checks():
        t, e, h = 10, 4, 8
        x = torch.randn(t, h).to(dev)
        idx = torch.zeros(t, 2, dtype=torch.int64)
        idx[:, 1] = 1
        idx[4, 1] = 9  # out of range
        idx_d = idx.to(dev)
        before = idx_d.clone()
        with pytest.raises(ValueError, match="indices"):
            moerail.permute_by_indices(x, idx_d, e)
        same(idx_d.cpu(), before.cpu(), "indices untouched")
        _, rmap = _routing(t, e, 2)
        with pytest.raises(ValueError, match="num_out_tokens"):
            moerail.permute(x, rmap.to(dev), num_out_tokens=t * 2 + 1)
        with pytest.raises((ValueError, TypeError), match="probs"):
            moerail.permute(x, rmap.to(dev), probs=torch.ones(t, e + 1).to(dev))
        with pytest.raises(ValueError, match="split_sizes"):
            ops.sort_chunks(x, torch.tensor([3, 3]).to(dev), torch.tensor([1, 0]).to(dev))
        with pytest.raises(ValueError, match="sorted_idxs"):
            ops.sort_chunks(x, torch.tensor([5, 5]).to(dev), torch.tensor([1, 1]).to(dev))
        with pytest.raises(ValueError, match="workspace"):
            _device._native.cuda.device_unpermute(x, torch.zeros(t, dtype=torch.int64).to(dev), None, torch.empty_like(x),
                                             torch.empty(3, dtype=torch.uint8).to(dev), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (torch.cuda.is_available() is False)")
def test_cuda_mixed_devices_and_graph_capture():
    x = torch.randn(16, 8, device="cuda")
    _, rmap = _routing(16, 4, 2)
    with pytest.raises(ValueError, match="routing_map|device"):
        _device.permute(x, rmap, None, -1, False, 1)
    rmap = rmap.cuda()
    probs = torch.rand(16, 4, device="cuda")
    static = moerail.permute(x, rmap, probs=probs, num_out_tokens=32)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moerail.permute(x, rmap, probs=probs, num_out_tokens=32)
        back = moerail.unpermute(captured[0], captured[2], restore_shape=x.shape, probs=probs, routing_map=rmap)
    graph.replay()
    torch.cuda.synchronize()
    same(captured[0].cpu(), static[0].cpu(), "replayed permute")
    with cpu_path():
        want = moerail.unpermute(static[0].cpu(), static[2].cpu(), restore_shape=x.shape, probs=probs.cpu(),
                                 routing_map=rmap.cpu())
    same(back.cpu(), want, "replayed unpermute")


@pytest.mark.megatron
def test_matches_megatron_permute(dev, mcore):
    """Rows, probs and sorted_indices of Megatron-Core's own unfused permute (3- or 5-tuple), and
    its unpermute's output, on this backend (T=4096 on a GPU; smaller under the emulator)."""
    t, e, k, h = (4096, 64, 8, 256) if dev.type == "cuda" else (256, 16, 4, 32)
    probs, rmap = _routing(t, e, k, seed=30, dtype=torch.bfloat16)
    x = torch.randn(t, h).bfloat16().to(dev)
    probs, rmap = probs.to(dev), rmap.to(dev)
    n = int(rmap.sum())
    ours = moerail.permute(x, rmap, probs=probs, num_out_tokens=n)
    with cpu_path():
        theirs = mcore.permute(x.cpu(), rmap.cpu(), probs=probs.cpu(), num_out_tokens=n)
        back = mcore.unpermute(theirs[0], theirs[2], x.shape, probs=probs.cpu().float(), routing_map=rmap.cpu())
    same(theirs[0], ours[0], "rows vs Megatron")
    same(theirs[1], ours[1], "permuted probs vs Megatron")
    same(theirs[2], ours[2], "sorted_indices vs Megatron")
    mine = moerail.unpermute(ours[0], ours[2], x.shape, probs=probs.float(), routing_map=rmap)
    same(back, mine, "unpermute (fp32 probs) vs Megatron")


@pytest.mark.megatron
def test_gpu_bench_section_runs(dev):
    """benches/bench_cuda.py's measurements (what `make bench` runs on a GPU) at small sizes on
    this backend: every row is measured (permute and unpermute with checks on and off, the
    router), so the script's first run on a GPU does not stop on its Python."""
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
    try:
        import bench_cuda
    finally:
        sys.path.pop(0)
    timer = bench_cuda._cuda_time if dev.type == "cuda" else (lambda fn: bench_cuda._host_time(fn, 1, 0))
    rows, copy_bw, n = bench_cuda.measure(dev, 32, 16, 16, 4, timer)
    assert n == 32 * 4 and copy_bw > 0
    assert [r[0].split(" (")[0] for r in rows] == ["permute", "unpermute", "permute", "unpermute", "router"]
    for r in rows:
        # Both timings measured; the ratio is printed to 2 decimals, so a slow emulator can show 0.00x.
        assert float(r[1]) > 0 and float(r[2]) > 0, r
        ratio = float(r[3].rstrip("x"))
        assert math.isfinite(ratio) and ratio >= 0, r
