"""GPU rows: moerail's CUDA kernels against the device's copy bandwidth and Megatron-Core's
unfused ops, measured in the same run on CUDA tensors (CUDA events, median of repeats).

Sizes: T=4096 tokens, H=7168, top-8 of 256 experts, bf16 (DeepSeek-V3's layer).
Without a GPU the section says so and measures nothing.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

from _common import table

TITLE = "GPU kernels (CUDA)"


def _cuda_time(fn, repeat: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _host_time(fn, repeat: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(dev: torch.device, t: int, h: int, e: int, k: int, timer) -> tuple:
    """The rows of the section on ``dev`` (``timer(fn) -> seconds``): permute and unpermute
    against a same-size ``copy_`` and Megatron's unfused ops, with moerail's value checks on
    (the default) and off, and the router against Megatron's. Returns ``(rows, copy_bw, nrows)``.
    The test suite runs it on CPU tensors through the kernels' emulator at small sizes."""
    import moerail
    from moerail.backends import cuda as _device

    # Megatron's 3- and 5-tuple permute both take these arguments; only their time is used.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe import moe_utils
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(t, e, generator=g).to(dev)
    x = torch.randn(t, h, generator=g).bfloat16().to(dev)
    probs, rmap = moerail.topk_route(logits, k)
    rows = int(rmap.sum())
    perm = moerail.permute(x, rmap, probs=probs, num_out_tokens=rows)
    y = perm[0].clone()
    # Copy bandwidth: read + write of the permuted rows' bytes.
    nbytes = rows * h * x.element_size()
    src = torch.empty(rows, h, dtype=x.dtype, device=dev)
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src))
    copy_bw = 2 * nbytes / copy_s
    res = []

    def row(name, ours, ref, moved):
        bw = moved / ours
        res.append([name, f"{ours * 1e6:.1f}", f"{ref * 1e6:.1f}", f"{ref / ours:.2f}x",
                    f"{bw / 1e9:.0f} GB/s", f"{100 * bw / copy_bw:.0f}%"])

    ref_p = timer(lambda: moe_utils.permute(x, rmap, probs=probs, num_out_tokens=rows))
    ref_u = timer(lambda: moe_utils.unpermute(y, perm[2], x.shape, probs=probs, routing_map=rmap))
    saved = _device._CHECKS
    try:
        for checks in (True, False):
            _device._CHECKS = checks
            tag = "" if checks else ", value checks off"
            row(f"permute (with probs{tag})",
                timer(lambda: moerail.permute(x, rmap, probs=probs, num_out_tokens=rows)), ref_p, 2 * nbytes)
            row(f"unpermute (with probs{tag})",
                timer(lambda: moerail.unpermute(y, perm[2], x.shape, probs=probs, routing_map=rmap)), ref_u,
                2 * nbytes)
    finally:
        _device._CHECKS = saved
    lb = logits.bfloat16()
    ours_r = timer(lambda: moerail.topk_route(lb, k, score_function="sigmoid", num_groups=8, group_topk=4))
    ref_r = timer(lambda: moe_utils.topk_routing_with_score_function(
        lb, k, use_pre_softmax=False, num_groups=8, group_topk=4, score_function="sigmoid"))
    res.append(["router (sigmoid, 8 groups, top-4 groups)", f"{ours_r * 1e6:.1f}", f"{ref_r * 1e6:.1f}",
                f"{ref_r / ours_r:.2f}x", "", ""])
    return res, copy_bw, rows


def run(quick: bool) -> str:
    if not torch.cuda.is_available():
        return ("Not measured: this run had no CUDA GPU (`torch.cuda.is_available()` is False). On a GPU machine "
                "`make bench` adds: permute and unpermute at T=4096, H=7168, top-8 of 256, bf16 against the "
                "device's copy bandwidth (a same-size `copy_` measured in the same run) and against Megatron-Core's "
                "unfused `permute` / `unpermute` (with moerail's value checks on and off), and the router against "
                "Megatron's `topk_routing_with_score_function`.")
    t, h, e, k = (1024, 2048, 64, 8) if quick else (4096, 7168, 256, 8)
    res, copy_bw, rows = measure(torch.device("cuda"), t, h, e, k, _cuda_time)
    nbytes = rows * h * 2
    head = (f"Device: {torch.cuda.get_device_name()}; T={t}, H={h}, top-{k} of {e}, bf16, {rows} rows "
            f"({nbytes / 2**20:.0f} MiB); copy bandwidth (same-size `copy_`, read+write) {copy_bw / 1e9:.0f} GB/s. "
            "Times are medians of CUDA-event timings. moerail's value checks are off by default on a device "
            "(no host read); the debug mode (`MOERAIL_DEVICE_CHECKS=1`) adds one small device-to-host read per call: "
            "rows with and without.")
    return head + "\n\n" + table(["op", "moerail us", "Megatron us", "speed-up", "moerail bandwidth", "of copy"], res)
