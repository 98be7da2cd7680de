"""One small case of each of moerail's CUDA kernels, forward and backward, for
``compute-sanitizer`` (memcheck, racecheck) in ``benches/gpu_check.py``: the router (softmax,
pre-softmax, sigmoid with groups and bias, sqrtsoftplus; fp32, bf16, fp16, fp64), the aux-loss
scores, permute / permute_by_indices (dropless, aligned, drop-and-pad), unpermute (1-wide and
vector paths), sort_chunks and the dispatch layout. Sizes are odd on purpose (tails of every
loop). ``--dry`` only imports and lists the cases (what the CPU rehearsal runs)."""

from __future__ import annotations

import sys

import torch

import moerail


def cases(dev):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(dev).requires_grad_(dtype.is_floating_point)

    def router(dtype, **kw):
        x = rnd(37, 64, dtype=dtype)
        p, m = moerail.topk_route(x, **kw)
        p.float().sum().backward()
        return p

    yield "router softmax fp32", lambda: router(torch.float32, topk=4)
    yield "router pre-softmax bf16", lambda: router(torch.bfloat16, topk=2, use_pre_softmax=True)
    yield "router sigmoid groups bias fp16", lambda: router(
        torch.float16, topk=8, num_groups=8, group_topk=4, score_function="sigmoid",
        expert_bias=torch.linspace(0, 0.1, 64, device=dev), scaling_factor=2.5)
    yield "router sqrtsoftplus fp64", lambda: router(torch.float64, topk=4, score_function="sqrtsoftplus")

    def compact():
        x = rnd(37, 64, dtype=torch.bfloat16)
        p, idx = moerail.topk_route(x, 6, dense_output=True)
        p.float().sum().backward()

    yield "router compact bf16", compact

    def aux():
        x = rnd(37, 32, dtype=torch.float32)
        s = moerail.routing_scores_for_aux_loss(x, 4, "softmax")[1]
        s.sum().backward()

    yield "aux-loss scores", aux

    def perm(h, dtype, **kw):
        t, e, k = 53, 16, 4
        logits = torch.randn(t, e, generator=g)
        probs, rmap = moerail.topk_route(logits, k)
        x = rnd(t, h, dtype=dtype)
        pd = probs.to(dtype).to(dev).requires_grad_()
        rmap = rmap.to(dev)
        out = moerail.permute(x, rmap, probs=pd, **kw)
        y = moerail.unpermute(out[0] * 2, out[2], restore_shape=(t, h), probs=pd, routing_map=rmap,
                              drop_and_pad=bool(kw.get("drop_and_pad")), pad_offsets=out[3])
        y.float().sum().backward()
        un2 = moerail.unpermute(out[0].detach().requires_grad_(), out[2], restore_shape=(t, h))
        un2.float().sum().backward()

    yield "permute+unpermute dropless bf16 H=64 (vector path)", lambda: perm(64, torch.bfloat16)
    yield "permute+unpermute num_out fp32 H=33 (1-wide path)", lambda: perm(33, torch.float32, num_out_tokens=212)
    yield "permute+unpermute align16 fp16", lambda: perm(40, torch.float16, align_size=16)
    yield "permute+unpermute drop_and_pad bf16", lambda: perm(
        24, torch.bfloat16, drop_and_pad=True, num_out_tokens=12 * 16)

    def by_idx():
        t, e, k = 41, 12, 3
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(dev)
        x = rnd(t, 24, dtype=torch.bfloat16)
        p = torch.rand(t, k, generator=g).bfloat16().to(dev).requires_grad_()
        out = moerail.permute_by_indices(x, idx, e, probs=p)
        (out[0].float().sum() + out[1].float().sum()).backward()

    yield "permute_by_indices bf16", by_idx

    def chunks():
        sizes = torch.tensor([3, 0, 5, 2, 7, 1], device=dev)
        order = torch.tensor([4, 2, 0, 5, 1, 3], device=dev)
        x = rnd(18, 40, dtype=torch.bfloat16)
        y = moerail.sort_chunks_by_idxs(x, sizes, order)[0]
        y.float().sum().backward()

    yield "sort_chunks bf16", chunks


def main() -> int:
    dry = "--dry" in sys.argv
    dev = torch.device("cpu" if dry else "cuda")
    n = 0
    for name, fn in cases(dev):
        n += 1
        if dry:
            print(f"case: {name}")
            continue
        fn()
        torch.cuda.synchronize()
        print(f"ran: {name}", flush=True)
    print(f"{n} cases{' (dry: listed only)' if dry else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
