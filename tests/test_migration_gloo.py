"""Migration while training, on 4 gloo ranks (issue 4).

A small expert-parallel MoE model (2 MoE layers, 6 experts with top-2 routing skewed towards a few
experts, 8 expert slots on 4 ranks, so 2 experts are replicated) is trained twice from the same
start and the same data:

* **static**: the first placement all the way;
* **migrated**: after step 4 the tracked loads are predicted, experts are re-placed
  (``rebalance_experts(mode="refine")``, hierarchical with 2 nodes of 2 ranks), the move is planned
  and decided, and ``migrate_experts`` moves the expert weights and their Adam state between the
  ranks; training goes on with the new placement.

Both runs must give the same losses and the same parameters and optimizer state (float64, within
rounding: the replicas' partial sums add in another order). Right after the migration every slot
must hold exactly (bit for bit) the weights, ``exp_avg``, ``exp_avg_sq`` and ``step`` that its
expert had before.

The tokens travel by ``moerail.AllToAllDispatcher`` (2 virtual nodes x 2, strategy ``auto``),
which sends each (token, expert) to one replica of the expert (``select_replicas``); moerail also
provides the replica gradient all-reduce, the load tracking, placement, planning and migration,
and the dispatchers switch to the new placement after the move.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from a2a_gloo import free_port

import moerail

WORLD = 4
NODES = 2
LAYERS = 2
EXPERTS = 6
TOPK = 2
SLOTS = 8
PER_RANK = SLOTS // WORLD
HIDDEN = 8
FFN = 12
TOKENS = 24  # per rank and step
STEPS = 8
MIGRATE_AFTER = 4
TIMEOUT_S = 240


def expert_forward(params, x):
    w1, w2 = params
    return torch.nn.functional.silu(x @ w1) @ w2


def moe_layer(x, router_w, skew, slot_params, dispatcher):
    """Top-2 routing; moerail's dispatcher sends each (token, expert) to one replica of the
    expert (``select_replicas``: deterministic, even), the local slots compute, combine back."""
    logits = x @ router_w + skew
    probs, indices = torch.softmax(logits, dim=-1).topk(TOPK, dim=-1)
    routing_map = torch.zeros(x.shape[0], EXPERTS, dtype=torch.bool).scatter(1, indices, True)
    dense_probs = torch.zeros(x.shape[0], EXPERTS, dtype=probs.dtype).scatter(1, indices, probs)
    rows, per_slot, row_probs = dispatcher.dispatch(x, dense_probs, routing_map)
    outs = [expert_forward(slot_params[s], chunk) * p.unsqueeze(1).to(chunk.dtype)
            for s, (chunk, p) in enumerate(zip(torch.split(rows, per_slot.tolist()),
                                               torch.split(row_probs, per_slot.tolist())))]
    counts = torch.bincount(indices.flatten(), minlength=EXPERTS)
    return dispatcher.combine(torch.cat(outs)), counts


def initial_weights():
    g = torch.Generator().manual_seed(1234)
    w1 = torch.randn(LAYERS, EXPERTS, HIDDEN, FFN, generator=g, dtype=torch.float64) / HIDDEN**0.5
    w2 = torch.randn(LAYERS, EXPERTS, FFN, HIDDEN, generator=g, dtype=torch.float64) / FFN**0.5
    router = torch.randn(LAYERS, HIDDEN, EXPERTS, generator=g, dtype=torch.float64) * 0.3
    # Zipf-like skew: expert of popularity rank r gets +1.5 * -log(r)
    skew = torch.stack([-1.5 * torch.log(torch.randperm(EXPERTS, generator=g).double() + 1) for _ in range(LAYERS)])
    return w1, w2, router, skew


def batch(rank, step):
    g = torch.Generator().manual_seed(10_000 + 100 * step + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    y = torch.tanh(x.flip(1)) * 0.5
    return x, y


def slot_state(slot_params, opt, phy2log, rank):
    """{(layer, logical expert): [w1, w2, and their Adam tensors]} of this rank's slots."""
    out = []
    for layer in range(LAYERS):
        for s in range(PER_RANK):
            e = int(phy2log[layer, rank * PER_RANK + s])
            ts = []
            for p in slot_params[layer][s]:
                ts.append(p.detach().clone())
                st = opt.state.get(p, {})
                ts.extend(st[k].detach().clone() for k in ("exp_avg", "exp_avg_sq", "step") if k in st)
            out.append((layer, e, ts))
    return out


def train(rank, migrate):
    w1, w2, router0, skew = initial_weights()
    phy2log, _, _ = moerail.rebalance_experts(torch.ones(LAYERS, EXPERTS), SLOTS, 1, 1, WORLD)
    slot_params = [
        [
            [torch.nn.Parameter(w1[layer, int(phy2log[layer, rank * PER_RANK + s])].clone()),
             torch.nn.Parameter(w2[layer, int(phy2log[layer, rank * PER_RANK + s])].clone())]
            for s in range(PER_RANK)
        ]
        for layer in range(LAYERS)
    ]  # fmt: skip
    router = [torch.nn.Parameter(router0[layer].clone()) for layer in range(LAYERS)]
    params = router + [p for layer in slot_params for slot in layer for p in slot]
    opt = torch.optim.Adam(params, lr=2e-2)
    tracker = moerail.LoadTracker(LAYERS, EXPERTS, group=dist.group.WORLD)

    def dispatchers(placement):
        return [moerail.AllToAllDispatcher(EXPERTS, None, ranks_per_node=WORLD // NODES, strategy="auto",
                                           placement=placement[layer], timeout=timedelta(seconds=60))
                for layer in range(LAYERS)]

    disp = dispatchers(phy2log)
    losses, info = [], {}
    for step in range(STEPS):
        x, y = batch(rank, step)
        h = x
        for layer in range(LAYERS):
            out, counts = moe_layer(h, router[layer], skew[layer], slot_params[layer], disp[layer])
            tracker.record(layer, counts)
            h = h + out
        loss = ((h - y) ** 2).sum() / (TOKENS * WORLD * HIDDEN)
        opt.zero_grad()
        loss.backward()
        for p in params:  # a slot that got no token still steps (with a zero gradient)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for p in router:  # data-parallel gradient
            dist.all_reduce(p.grad)
        replicated = moerail.allreduce_replica_grads(slot_params, phy2log)
        info.setdefault("replicated", replicated)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
        tracker.step()

        if migrate and step + 1 == MIGRATE_AFTER:
            predicted = tracker.predict("best")
            new, _, _ = moerail.rebalance_experts(predicted, SLOTS, 2, NODES, WORLD, mode="refine")
            tensors = moerail.expert_slot_tensors(slot_params, opt)
            expert_bytes = sum(t.numel() * t.element_size() for t in tensors[0][0])
            plan = moerail.plan_migration(phy2log, new, WORLD, NODES, expert_bytes=expert_bytes)
            decision = moerail.should_migrate(
                predicted, phy2log, plan, WORLD, NODES, seconds_per_token=1e-3, horizon_steps=1e6
            )
            before = [None] * WORLD
            dist.all_gather_object(before, slot_state(slot_params, opt, phy2log, rank))
            stats = moerail.migrate_experts(plan, tensors)
            phy2log = plan.phy2log
            disp = dispatchers(phy2log)
            after = slot_state(slot_params, opt, phy2log, rank)
            info.update(
                before=before, after=after, old=plan.old_phy2log, new=phy2log, transfers=plan.transfers,
                stats=stats, decision=decision.migrate, gain=decision.gain,
            )  # fmt: skip
    info["final"] = slot_state(slot_params, opt, phy2log, rank)
    info["router"] = [p.detach().clone() for p in router] + [opt.state[p]["exp_avg"].clone() for p in router]
    info["losses"] = losses
    info["placement"] = phy2log
    return info


def worker(rank, port, out_dir):
    try:
        torch.set_num_threads(1)
        moerail.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
        )
        res = {"static": train(rank, migrate=False), "migrated": train(rank, migrate=True)}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gloo"))
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, out), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.endswith(".err")]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def by_expert(states):
    """{(layer, expert): [tensors of each replica]} over all ranks."""
    out = {}
    for layer, e, ts in states:
        out.setdefault((layer, e), []).append(ts)
    return out


def test_migration_really_moves_experts(results):
    m = results[0]["migrated"]
    assert not torch.equal(m["old"], m["new"]), "the new placement differs"
    t = m["transfers"]
    assert (t[:, 2] != t[:, 4]).any(), "some experts cross ranks"
    assert m["decision"] and m["gain"] > 0
    assert results[0]["static"]["replicated"] > 0, "replica gradients are all-reduced"
    sent = sum(r["migrated"]["stats"]["bytes_sent"] for r in results)
    received = sum(r["migrated"]["stats"]["bytes_received"] for r in results)
    assert sent == received > 0


def test_optimizer_state_moved_with_the_weights(results):
    before = by_expert([s for r in results[0]["migrated"]["before"] for s in r])
    for key, replicas in before.items():
        for other in replicas[1:]:  # replicas are identical before the move
            for a, b in zip(replicas[0], other):
                assert torch.equal(a, b), key
    for r in results:
        for layer, e, ts in r["migrated"]["after"]:
            src = before[(layer, e)][0]
            assert len(ts) == len(src) == 2 * 4  # w1, w2, each with exp_avg, exp_avg_sq, step
            for a, b in zip(ts, src):
                assert torch.equal(a, b), (layer, e)


def test_same_losses_and_parameters_as_without_migration(results):
    ls, lm = results[0]["static"]["losses"], results[0]["migrated"]["losses"]
    assert len(ls) == STEPS
    torch.testing.assert_close(torch.tensor(lm), torch.tensor(ls), rtol=1e-12, atol=0)
    assert ls[-1] < ls[0]
    for run in ("static", "migrated"):
        # every rank saw the same global loss
        for r in results[1:]:
            assert r[run]["losses"] == results[0][run]["losses"]
    final = {run: by_expert([s for r in results for s in r[run]["final"]]) for run in ("static", "migrated")}
    assert set(final["static"]) == set(final["migrated"]) == {(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)}
    for key in final["static"]:
        for run in ("static", "migrated"):
            reps = final[run][key]
            for other in reps[1:]:  # replicas stay bit-identical
                for a, b in zip(reps[0], other):
                    assert torch.equal(a, b), (run, key)
        for a, b in zip(final["migrated"][key][0], final["static"][key][0]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for r in results:
        for a, b in zip(r["migrated"]["router"], r["static"]["router"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
