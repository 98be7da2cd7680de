"""Dynamic expert placement on skewed (Zipf) routing: measure, predict, place, decide, migrate.

A small MoE regression model trains on CPU with expert parallelism simulated on one process:
``--gpus`` devices in ``--nodes`` nodes, ``--replicas`` expert slots per layer. The router is
skewed: a fixed ``-s * log(r)`` is added to the logit of the expert of popularity rank r, so
the routed tokens follow a Zipf-like law. Every step:

* ``moerail.topk_route(..., return_tokens_per_expert=True)`` routes the tokens and counts them in
  the same pass; ``LoadTracker.record`` takes the counts, ``step()`` closes the step;
* ``moerail.select_replicas`` sends each routed token to one replica of its expert (what an EP
  dispatcher does), and the tokens each device really receives are counted.

Until ``--rebalance-at`` the experts sit in Megatron's layout (E/G experts a device, no replicas).
Then the tracker predicts the next interval's load (the predictor that backtests best),
``rebalance_experts`` places and replicates the experts (``--mode``), ``plan_migration`` prices the
move on a link model, ``should_migrate`` decides, and the model continues on the new placement.
The table at the end shows the busiest device over the mean, per layer, before and after.

Run: ``python examples/balance_zipf.py`` (``--help`` for the options; ``--plot out.png`` writes a
heatmap, ``--trace out.json`` the per-step trace).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import moerail  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step (all devices)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--groups", type=int, default=4, help="expert groups (hierarchical placement when nodes divide them)")
    ap.add_argument("--replicas", type=int, default=40, help="expert slots per layer (a multiple of --gpus)")
    ap.add_argument("--zipf", type=float, default=1.2, help="skew s: -s * log(r) is added to the logit of popularity rank r")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rebalance-at", type=int, default=30)
    ap.add_argument("--mode", choices=["eplb", "refine"], default="refine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="write a heatmap PNG (layers x experts, layers x devices before/after)")
    ap.add_argument("--trace", default=None, help="write the per-step trace (.json or .csv)")
    return ap.parse_args()


class MoELayer(torch.nn.Module):
    def __init__(self, hidden: int, ffn: int, experts: int, topk: int, skew: torch.Tensor):
        super().__init__()
        self.topk = topk
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        torch.nn.init.normal_(self.router.weight, std=1.5 / hidden**0.5)  # logits ~ N(0, 1.5^2)
        self.w1 = torch.nn.Parameter(torch.randn(experts, hidden, ffn) / hidden**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(experts, ffn, hidden) / ffn**0.5)
        self.register_buffer("skew", skew)

    def forward(self, x: torch.Tensor):
        logits = self.router(x) + self.skew
        probs, indices, tokens_per_expert = moerail.topk_route(
            logits, self.topk, dense_output=True, return_tokens_per_expert=True
        )
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            rows, cols = (indices == e).nonzero(as_tuple=True)
            if rows.numel():
                h = torch.nn.functional.silu(x[rows] @ self.w1[e]) @ self.w2[e]
                out = out.index_add(0, rows, h * probs[rows, cols].unsqueeze(1))
        return x + out, indices, tokens_per_expert


def device_tokens(indices, log2phy, logcnt, num_replicas, gpus, sources):
    """Tokens each device receives: every source rank picks replicas for its own tokens."""
    per_slot = torch.zeros(num_replicas, dtype=torch.int64)
    for src, chunk in enumerate(indices.chunk(sources)):
        slots = moerail.select_replicas(chunk, log2phy, logcnt, num_replicas, offset=src)
        per_slot += torch.bincount(slots.flatten(), minlength=num_replicas)
    return per_slot.view(gpus, -1).sum(1)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    L, E, G, N, R = args.layers, args.experts, args.gpus, args.nodes, args.replicas
    skews = []
    for _ in range(L):
        rank = torch.randperm(E).double() + 1
        skews.append((-args.zipf * torch.log(rank)).float())
    model = torch.nn.ModuleList([MoELayer(args.hidden, args.ffn, E, args.topk, s) for s in skews])
    teacher = torch.randn(args.hidden, args.hidden) / args.hidden**0.5
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tracker = moerail.LoadTracker(L, E, window=64)

    phy2log = moerail.default_placement(L, E, G)
    log2phy, logcnt = moerail.log2phy_from_phy2log(phy2log, E)
    tracker.set_placement(phy2log, G, N)
    measured = {"before": [], "after": []}
    t0 = time.perf_counter()
    for step in range(args.steps):
        if step == args.rebalance_at:
            predicted = tracker.predict("best", horizon=args.steps - step)
            bt = tracker.backtest(horizon=4)
            print(
                "predictors (WAPE on the recorded steps, horizon 4): "
                + ", ".join(f"{m} {bt[m]['wape']:.3f}" for m in ("ema", "mean", "trend"))
                + f" -> using {bt['best']}"
            )
            new, _, _ = moerail.rebalance_experts(predicted, R, args.groups, N, G, mode=args.mode)
            expert_bytes = 2 * args.hidden * args.ffn * 4 * 3  # fp32 weights + Adam's two moments
            # the current layout has E slots: its devices first fill their new slots locally
            old = moerail.balance.expand_placement(phy2log, R, G)
            plan = moerail.plan_migration(old, new, G, N, expert_bytes=expert_bytes)
            spt = moerail.expert_seconds_per_token(args.hidden, args.ffn, flops_per_second=50e9, efficiency=0.5)
            decision = moerail.should_migrate(
                predicted, old, plan, G, N, seconds_per_token=spt, horizon_steps=args.steps - step
            )
            if decision.migrate:
                # One process holds every expert here, so "moving" an expert is adopting the new
                # table; with real ranks migrate_experts(plan, expert_slot_tensors(...)) moves
                # the weights and the Adam state (tests/test_migration_gloo.py).
                phy2log = plan.phy2log
                log2phy, logcnt = moerail.log2phy_from_phy2log(phy2log, E)
                tracker.set_placement(phy2log, G, N)
                print(f"migrated: {len(plan.transfers)} copies, {plan.num_network_transfers} over the network")
        x = torch.randn(args.tokens, args.hidden)
        y = torch.tanh(x @ teacher)
        h = x
        per_layer = []
        for layer, m in enumerate(model):
            h, indices, tpe = m(h)
            tracker.record(layer, tpe)
            dev = device_tokens(indices, log2phy[layer], logcnt[layer], phy2log.shape[1], G, G)
            per_layer.append(float(dev.max()) / float(dev.float().mean()))
        loss = torch.nn.functional.mse_loss(h, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = tracker.step()
        measured["before" if step < args.rebalance_at else "after"].append(per_layer)
        if step % 10 == 0 or step == args.steps - 1:
            print(
                f"step {step:3d}  loss {loss.item():.4f}  device max/mean (measured) "
                + " ".join(f"{v:.2f}" for v in per_layer)
                + f"  (tracker: {rec['summary']['max_mean_device']:.2f})"
            )
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s")

    before = torch.tensor(measured["before"]).mean(0)
    after = torch.tensor(measured["after"]).mean(0) if measured["after"] else torch.full((L,), float("nan"))
    bound = moerail.lower_bound(tracker.history.mean(0), R, G)
    print(f"\nbusiest device / mean device tokens, averaged over the steps ({G} devices, {N} nodes, {R} slots, "
          f"Zipf s={args.zipf}, mode={args.mode}):")  # fmt: skip
    print(f"{'layer':>5}  {'before':>8}  {'after':>8}  {'bound':>8}")
    for layer in range(L):
        print(f"{layer:>5}  {before[layer]:8.3f}  {after[layer]:8.3f}  {bound[layer]:8.3f}")
    print(f"{'mean':>5}  {before.mean():8.3f}  {after.mean():8.3f}  {bound.mean():8.3f}")
    if args.trace:
        tracker.save_trace(args.trace)
        print(f"wrote {args.trace}")
    if args.plot:
        tracker.plot_heatmap(args.plot, phy2log, G, N, before=moerail.default_placement(L, E, G))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
