"""One rank of tests/test_a2a_devices.py: AllToAllDispatcher (every strategy, forward and
backward, with and without a capacity) on tokens on ``DEVICE`` (``cpu`` or ``cuda``), over
``BACKEND`` (gloo or nccl). Writes what it computed to ``OUT/rank<r>.pt`` on the host.

Run as a script with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, DEVICE, BACKEND and OUT set."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

import moerail

STRATEGIES = ("flat", "2dh", "dedup", "allgather")


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(os.environ["DEVICE"])
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(os.environ["BACKEND"], rank=rank, world_size=world, timeout=timedelta(seconds=120))
    experts, topk, hidden = 8, 3, 16
    rpn = 1 if world == 1 else world // 2
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for strategy in STRATEGIES:
            for cf in (None, 1.0):
                g = torch.Generator().manual_seed(100 * rank + len(results))
                t = 11 + 3 * rank
                x = torch.randn(t, hidden, generator=g).to(dtype)
                logits = torch.randn(t, experts, generator=g)
                w = torch.randn(experts, hidden, hidden, generator=g).to(dtype)
                gy = torch.randn(t, hidden, generator=g).to(dtype)
                disp = moerail.AllToAllDispatcher(experts, None, ranks_per_node=rpn, strategy=strategy, topk=topk,
                                                  capacity_factor=cf, timeout=timedelta(seconds=60))
                loc = disp.num_local_experts
                x_d = x.to(device).requires_grad_(True)
                logits_d = logits.to(device).requires_grad_(True)
                probs, rmap = moerail.topk_route(logits_d, topk)
                rows, tpe, rprobs = sent = disp.dispatch(x_d, probs, rmap)
                assert rows.device == device and rprobs.device == device and tpe.device.type == "cpu"
                outs, start = [], 0
                for slot, n in enumerate(tpe.tolist()):
                    ex = int(disp.phy2log[rank * loc + slot])
                    r = rows[start : start + n]
                    outs.append((r @ w[ex].to(device)) * rprobs[start : start + n, None].to(dtype))
                    start += n
                y = disp.combine(torch.cat(outs), sent.handle)
                assert y.device == device
                (y * gy.to(device)).sum().backward()
                key = f"{dtype} {strategy} cf={cf}"
                results[key] = {k: v.detach().cpu() for k, v in (
                    ("rows", rows), ("tokens_per_expert", tpe), ("row_probs", rprobs), ("out", y),
                    ("grad_hidden", x_d.grad), ("grad_logits", logits_d.grad))}
                results[key]["executor"] = disp.last_stats["executor"]
    torch.save(results, os.path.join(os.environ["OUT"], f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
