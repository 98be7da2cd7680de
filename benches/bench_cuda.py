"""GPU rows: moerail's CUDA kernels against the device's copy bandwidth and Megatron-Core's
unfused ops, measured in the same run on CUDA tensors (CUDA events, median of repeats).

Sizes of the issue: T=4096 tokens, H=7168, top-8 of 256 experts, bf16 (DeepSeek-V3's layer).
Without a GPU the section says so and measures nothing.
"""

from __future__ import annotations

import statistics
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


def run(quick: bool) -> str:
    if not torch.cuda.is_available():
        return ("Not measured: this run had no CUDA GPU (`torch.cuda.is_available()` is False). On a GPU machine "
                "`make bench` adds: permute and unpermute at T=4096, H=7168, top-8 of 256, bf16 against the "
                "device's copy bandwidth (a same-size `copy_` measured in the same run) and against Megatron-Core's "
                "unfused `permute` / `unpermute`, and the router against Megatron's `topk_routing_with_score_function`.")
    import moerail
    from moerail.integrations.megatron import megatron_api

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe import moe_utils
    mc = megatron_api(moe_utils)
    t, h, e, k = (1024, 2048, 64, 8) if quick else (4096, 7168, 256, 8)
    dev = torch.device("cuda")
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
    copy_s = _cuda_time(lambda: dst.copy_(src))
    copy_bw = 2 * nbytes / copy_s
    res = []

    def row(name, ours, ref, moved):
        bw = moved / ours
        res.append([name, f"{ours * 1e6:.1f}", f"{ref * 1e6:.1f}", f"{ref / ours:.2f}x",
                    f"{bw / 1e9:.0f} GB/s", f"{100 * bw / copy_bw:.0f}%"])

    row("permute (with probs)", _cuda_time(lambda: moerail.permute(x, rmap, probs=probs, num_out_tokens=rows)),
        _cuda_time(lambda: mc.permute(x, rmap, probs=probs, num_out_tokens=rows)), 2 * nbytes)
    row("unpermute (with probs)",
        _cuda_time(lambda: moerail.unpermute(y, perm[2], x.shape, probs=probs, routing_map=rmap)),
        _cuda_time(lambda: mc.unpermute(y, perm[2], x.shape, probs=probs, routing_map=rmap)), 2 * nbytes)
    lb = logits.bfloat16()
    ours_r = _cuda_time(lambda: moerail.topk_route(lb, k, score_function="sigmoid", num_groups=8, group_topk=4))
    ref_r = _cuda_time(lambda: moe_utils.topk_routing_with_score_function(
        lb, k, use_pre_softmax=False, num_groups=8, group_topk=4, score_function="sigmoid"))
    res.append(["router (sigmoid, 8 groups, top-4 groups)", f"{ours_r * 1e6:.1f}", f"{ref_r * 1e6:.1f}",
                f"{ref_r / ours_r:.2f}x", "", ""])
    head = (f"Device: {torch.cuda.get_device_name()}; T={t}, H={h}, top-{k} of {e}, bf16, {rows} rows "
            f"({nbytes / 2**20:.0f} MiB); copy bandwidth (same-size `copy_`, read+write) {copy_bw / 1e9:.0f} GB/s. "
            "Times are medians of CUDA-event timings; moerail with its default value checks (one small "
            "device-to-host read per call; `MOERAIL_DEVICE_CHECKS=0` removes it).")
    return head + "\n\n" + table(["op", "moerail us", "Megatron us", "speed-up", "moerail bandwidth", "of copy"], res)
