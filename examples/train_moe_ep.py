"""Expert-parallel MoE training on 4 CPU ranks (2 virtual nodes x 2) with moerail end to end.

A byte-level MoE GPT (default: 4 layers, d_model 128, 16 routed experts top-4 plus a shared
expert) trained on Python's standard-library source, data parallel over 4 gloo ranks for the
dense parts and expert parallel (EP=4) for the experts. Every MoE layer, every step::

    probs, routing_map = moerail.topk_route(router(x) + zipf_prior, k)   # skewed routing
    tokens, tokens_per_slot, p = sent = dispatcher.dispatch(x, probs, routing_map)  # moerail.AllToAllDispatcher
    y = local experts over their slots' rows * p                           # replicas share weights
    out = dispatcher.combine(y, sent.handle) + shared_expert(x)

The dispatcher plans each exchange (flat / 2dh / dedup / allgather, ``--strategy auto`` picks by
its alpha-beta cost model for ``--ranks-per-node 2``). A fixed Zipf prior on the router logits
keeps a few experts hot, as real routers are; EDPB rebalancing is on: a ``moerail.LoadTracker``
records tokens per expert per layer per step (all-reduced), and every ``--rebalance-every`` steps
the predicted load is placed on ``--slots`` expert slots (``rebalance_experts(mode="refine")``,
hot experts replicated), the move is planned (``plan_migration``), decided
(``should_migrate``) and carried out by ``migrate_experts`` (weights and Adam state), and the
dispatchers switch to the new placement. Output: a progress bar, per-step loss / tokens/s /
strategy / inter-node bytes, device max/mean load before and after each rebalance, and in
``--out``: ``report.json``, ``load_trace.json`` and ``load_heatmap.png``.

Run: ``python examples/train_moe_ep.py`` (``make demo``); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import List

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_moe  # noqa: E402  (data loading, shared with the single-process example)

import moerail  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

VOCAB = 256


class EPMoE(nn.Module):
    """A MoE block whose experts live in this rank's slots; tokens travel by the dispatcher."""

    def __init__(self, args, layer: int, rank: int, phy2log: torch.Tensor, expert_init):
        super().__init__()
        d = args.d_model
        self.args, self.rank, self.layer = args, rank, layer
        self.router = nn.Linear(d, args.experts, bias=False)
        # A fixed Zipf prior: expert of popularity rank r gets -zipf * log(r) added to its logit.
        g = torch.Generator().manual_seed(1000 + layer)
        ranks = torch.randperm(args.experts, generator=g).float() + 1
        self.register_buffer("prior", -args.zipf * torch.log(ranks))
        self.shared = nn.Sequential(nn.Linear(d, args.d_shared), nn.GELU(), nn.Linear(args.d_shared, d))
        w1, w2 = expert_init
        loc = args.slots // args.world
        self.slots = nn.ParameterList()
        for s in range(loc):
            e = int(phy2log[rank * loc + s])
            self.slots.append(nn.Parameter(w1[e].clone()))
            self.slots.append(nn.Parameter(w2[e].clone()))
        self.set_placement(phy2log)
        self.counts = torch.zeros(args.experts)

    def set_placement(self, phy2log: torch.Tensor) -> None:
        a = self.args
        self.phy2log = phy2log.clone()
        self.dispatcher = moerail.AllToAllDispatcher(a.experts, None, ranks_per_node=a.ranks_per_node,
                                                     strategy=a.strategy, placement=self.phy2log,
                                                     link=moerail.LinkModel(**a.link))

    def slot_params(self) -> List[List[nn.Parameter]]:
        return [[self.slots[2 * s], self.slots[2 * s + 1]] for s in range(len(self.slots) // 2)]

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x) + self.prior
        probs, routing_map = moerail.topk_route(logits, self.args.topk)
        _, scores, counts = moerail.routing_scores_for_aux_loss(logits, self.args.topk, "softmax",
                                                                return_tokens_per_expert=True)
        aux = moerail.switch_load_balancing_loss(scores, counts, x.shape[0], self.args.topk, self.args.experts,
                                                 self.args.aux_loss_coeff) + moerail.z_loss(logits, 1e-3)
        if self.training:
            self.counts += routing_map.sum(0).float()
        rows, per_slot, p = sent = self.dispatcher.dispatch(x, probs, routing_map)
        outs = []
        for (w1, w2), chunk, n in zip(self.slot_params(), torch.split(rows, per_slot.tolist()), per_slot.tolist()):
            outs.append(F.gelu(chunk @ w1) @ w2 if n else chunk)
        y = torch.cat(outs) * p[:, None].to(rows.dtype) if outs else rows
        out = self.dispatcher.combine(y, sent.handle) + self.shared(x)
        return out.reshape(shape), aux


class Block(nn.Module):
    def __init__(self, args, layer, rank, phy2log, expert_init):
        super().__init__()
        d = args.d_model
        self.heads = args.heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.moe = EPMoE(args, layer, rank, phy2log, expert_init)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d))
        y, aux = self.moe(self.ln2(x))
        return x + y, aux


class Model(nn.Module):
    def __init__(self, args, rank, placement):
        super().__init__()
        g = torch.Generator().manual_seed(args.seed)
        self.tok = nn.Embedding(VOCAB, args.d_model)
        self.pos = nn.Embedding(args.seq_len, args.d_model)
        inits = [(torch.randn(args.experts, args.d_model, args.d_ffn, generator=g) * 0.02,
                  torch.randn(args.experts, args.d_ffn, args.d_model, generator=g) * 0.02 / math.sqrt(2 * args.layers))
                 for _ in range(args.layers)]
        self.blocks = nn.ModuleList(Block(args, i, rank, placement[i], inits[i]) for i in range(args.layers))
        self.ln_f = nn.LayerNorm(args.d_model)
        for m in self.modules():  # GPT-2 initialisation (the expert slots are set above)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        aux = x.new_zeros(())
        for b in self.blocks:
            x, a = b(x)
            aux = aux + a
        return self.ln_f(x) @ self.tok.weight.T, aux

    def moe(self) -> List[EPMoE]:
        return [b.moe for b in self.blocks]


def expert_param_ids(model: Model):
    return {id(p) for m in model.moe() for p in m.slots}


def train(rank: int, args, port: int) -> None:
    torch.set_num_threads(1)
    moerail.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world,
                            timeout=timedelta(seconds=300))
    torch.manual_seed(args.seed)  # dense weights identical on every rank
    nodes = args.world // args.ranks_per_node
    placement, _, _ = moerail.rebalance_experts(torch.ones(args.layers, args.experts), args.slots, 1, 1, args.world)
    model = Model(args, rank, placement)
    expert_ids = expert_param_ids(model)
    dense = [p for p in model.parameters() if id(p) not in expert_ids]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    tracker = moerail.LoadTracker(args.layers, args.experts, group=dist.group.WORLD, window=64)
    tracker.set_placement(placement, args.world, nodes)
    corpus, _ = train_moe.load_corpus(args.data_bytes)
    batches = train_moe.Batches(corpus, args.seq_len, args.batch_size, args.seed + 17 * rank)
    lead = rank == 0
    log = print if not tqdm else tqdm.write
    report = {"args": {k: v for k, v in vars(args).items()}, "steps": [], "rebalances": []}
    if lead:
        print(f"moerail {moerail.__version__}: {args.world} ranks as {nodes} nodes x {args.ranks_per_node}, "
              f"{args.layers} layers, {args.experts} experts top-{args.topk} + shared expert on {args.slots} slots "
              f"({args.slots // args.world} a rank), Zipf prior {args.zipf}, strategy {args.strategy}")
    bar = tqdm(range(1, args.steps + 1), desc="train", unit="step", disable=not lead) if tqdm else range(1, args.steps + 1)
    tokens_per_step = args.batch_size * args.seq_len * args.world
    t_train, n_timed = 0.0, 0
    for step in bar:
        t0 = time.perf_counter()
        x, y = batches.next()
        logits, aux = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # Dense weights: data parallel (mean over ranks). Experts: each slot's gradient holds every
        # rank's tokens already; scale like the mean loss, then sum over an expert's replicas.
        flat = torch.cat([p.grad.flatten() for p in dense])
        dist.all_reduce(flat)
        flat /= args.world
        i = 0
        for p in dense:
            p.grad.copy_(flat[i : i + p.numel()].view_as(p))
            i += p.numel()
        for m in model.moe():
            for p in m.slots:
                p.grad /= args.world
        moerail.allreduce_replica_grads([m.slot_params() for m in model.moe()],
                                        torch.stack([m.phy2log for m in model.moe()]))
        opt.step()
        for layer, m in enumerate(model.moe()):
            tracker.record(layer, m.counts)
            m.counts.zero_()
        rec = tracker.step()
        dt = time.perf_counter() - t0
        if step > 2:
            t_train += dt
            n_timed += 1
        stats = model.moe()[0].dispatcher.last_stats
        total = torch.tensor([loss.item()])
        dist.all_reduce(total)
        entry = {"step": step, "loss": float(total) / args.world, "tokens_per_s": tokens_per_step / dt,
                 "strategy": stats["strategy"],
                 "inter_node_bytes": sum(m.dispatcher.last_stats["planned"][p]["inter_node_bytes"]
                                         for m in model.moe() for p in ("dispatch", "combine")),
                 "max_mean_device": rec["summary"]["max_mean_device"]}
        report["steps"].append(entry)
        if lead and tqdm:
            bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:,.0f}",
                            strategy=entry["strategy"], inter_MB=f"{entry['inter_node_bytes'] / 1e6:.2f}",
                            dev_max_mean=f"{entry['max_mean_device']:.2f}")
        if lead and (step % args.log_every == 0 or step == 1):
            log(f"step {step:4d}: loss {entry['loss']:.3f}  {entry['tokens_per_s']:,.0f} tok/s  strategy "
                f"{entry['strategy']}  inter-node {entry['inter_node_bytes'] / 1e6:.2f} MB/step (dispatch+combine)  device "
                f"max/mean {entry['max_mean_device']:.2f}")
        if args.rebalance_every and step % args.rebalance_every == 0 and step < args.steps:
            report["rebalances"].append(rebalance(model, opt, tracker, args, nodes, step, log, lead))
    if lead and tqdm:
        bar.close()
    # Outputs.
    if lead:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tracker.save_trace(str(out / "load_trace.json"))
        current = torch.stack([m.phy2log for m in model.moe()])
        tracker.plot_heatmap(str(out / "load_heatmap.png"), current, args.world, nodes)
        steps = report["steps"]
        first = sum(s["loss"] for s in steps[:5]) / len(steps[:5])
        last = sum(s["loss"] for s in steps[-5:]) / len(steps[-5:])
        report["summary"] = {"loss_first": first, "loss_last": last,
                             "tokens_per_s": n_timed * tokens_per_step / max(t_train, 1e-9),
                             "strategies": sorted({s["strategy"] for s in steps})}
        (out / "report.json").write_text(json.dumps(report, indent=1))
        print(f"\nloss {first:.3f} -> {last:.3f}; {report['summary']['tokens_per_s']:,.0f} tokens/s over "
              f"{args.world} ranks; strategies used {report['summary']['strategies']}")
        for r in report["rebalances"]:
            print(f"  step {r['step']}: device max/mean {r['before']:.2f} -> {r['after']:.2f} (predicted load), "
                  f"{'migrated' if r['migrated'] else 'kept'}: {r['moved_slots']} slots moved, "
                  f"{r['bytes'] / 1e6:.1f} MB")
        print(f"wrote {out / 'report.json'}, {out / 'load_trace.json'}, {out / 'load_heatmap.png'}")
    dist.barrier()
    dist.destroy_process_group()


def rebalance(model: Model, opt, tracker, args, nodes: int, step: int, log, lead: bool) -> dict:
    """Predict, place, plan, decide, migrate (identical decisions on every rank: same inputs)."""
    moe = model.moe()
    current = torch.stack([m.phy2log for m in moe])
    predicted = tracker.predict("best")
    new, _, _ = moerail.rebalance_experts(predicted, args.slots, 1, nodes, args.world, mode="refine")
    tensors = moerail.expert_slot_tensors([m.slot_params() for m in moe], opt)
    expert_bytes = sum(t.numel() * t.element_size() for t in tensors[0][0])
    plan = moerail.plan_migration(current, new, args.world, nodes, expert_bytes=expert_bytes)
    before = moerail.placement_metrics(predicted, current, args.world, nodes)["summary"]["max_mean_device"]
    after = moerail.placement_metrics(predicted, plan.phy2log, args.world, nodes)["summary"]["max_mean_device"]
    decision = moerail.should_migrate(predicted, current, plan, args.world, nodes,
                                      seconds_per_token=args.expert_seconds_per_token,
                                      horizon_steps=args.rebalance_every, log=False)
    moved = int((plan.phy2log != current).sum())
    if decision.migrate:
        moerail.migrate_experts(plan, tensors)
        for layer, m in enumerate(moe):
            m.set_placement(plan.phy2log[layer])
        tracker.set_placement(plan.phy2log, args.world, nodes)
    if lead:
        log(f"step {step:4d}: rebalance: device max/mean {before:.2f} -> {after:.2f} on the predicted load; "
            f"gain {decision.gain * 1e3:.1f} ms over {args.rebalance_every} steps vs move {decision.cost * 1e3:.2f} ms -> "
            f"{'migrate' if decision.migrate else 'keep'} ({moved} slots, {plan.inter_node_bytes / 1e6:.1f} MB "
            f"between nodes)")
    return {"step": step, "before": before, "after": after, "migrated": bool(decision.migrate), "moved_slots": moved,
            "bytes": float(plan.intra_node_bytes + plan.inter_node_bytes), "gain_s": decision.gain,
            "cost_s": decision.cost}


def worker(rank: int, args, port: int) -> None:
    if rank != 0:
        # moerail's one-time "no accelerator backend" notice: rank 0 says it for all four.
        os.environ.setdefault("MOERAIL_QUIET", "1")
    try:
        train(rank, args, port)
    except BaseException:
        traceback.print_exc()
        raise


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--strategy", default="auto", choices=("auto", "flat", "2dh", "dedup", "allgather"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ffn", type=int, default=128)
    ap.add_argument("--d-shared", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--slots", type=int, default=20, help="expert slots over all ranks (> experts: replicas)")
    ap.add_argument("--zipf", type=float, default=1.2, help="strength of the fixed Zipf prior on the router")
    ap.add_argument("--aux-loss-coeff", type=float, default=1e-3)
    ap.add_argument("--rebalance-every", type=int, default=50)
    ap.add_argument("--expert-seconds-per-token", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per rank and step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--data-bytes", type=int, default=2_000_000)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args(argv)
    if args.slots % args.world or args.slots < args.experts:
        ap.error("--slots must be a multiple of --world and at least --experts")
    if args.world % args.ranks_per_node:
        ap.error("--ranks-per-node must divide --world")
    # The emulated cluster the planner costs: NVLink-class inside a node, a NIC between nodes.
    args.link = dict(intra_node_bw=150e9, inter_node_bw=25e9, latency=10e-6, inter_node_latency=20e-6)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    mp.start_processes(worker, args=(args, port), nprocs=args.world, start_method="spawn")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
