"""Issue 15's fuzzer of every public op and planner / placement entry point (run by
tests/test_fuzz.py in a child process, so a crash fails the test instead of killing pytest).

Each entry point has a valid baseline call; hypothesis replaces one to three of its arguments with
values drawn up to the int64 edges (2**k +- 1, 2**62, 2**63 - 1, -2**63), negative numbers, NaN /
inf, wrong types and odd tensors (empty, wrong dtype, wrong rank, non-contiguous, huge values).
Every call must return or raise TypeError / ValueError (or torch's allocation error, a
RuntimeError saying it cannot allocate, for sizes that fit int64 but not memory); any other
exception fails, and a signal kills the child, which the parent reports.

    python tests/fuzz_entry_points.py [--examples N] [--seconds S] [--only NAME] [--list]
prints one line per entry point: ``fuzz <name>: <cases> cases, <errors> clean errors``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("MOERAIL_QUIET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import moerail  # noqa: E402

warnings.simplefilter("ignore")
torch.set_num_threads(1)

EDGE_INTS = [0, 1, -1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**40, 2**55, 2**59, 2**61, 2**62, 2**63 - 1, -(2**63),
             -(2**62), 2**64, 2**63]
INTS = st.one_of(st.integers(-4, 70), st.sampled_from(EDGE_INTS),
                 st.integers(0, 63).map(lambda b: 2**b + 1), st.integers(0, 63).map(lambda b: 2**b - 1))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e308, 1e-320]))


def tensors():
    def make(kind):
        g = torch.Generator().manual_seed(kind[1])
        shape = kind[2]
        dt = kind[0]
        if dt == torch.bool:
            return torch.rand(shape, generator=g) < 0.4
        if dt.is_floating_point:
            t = torch.randn(shape, generator=g).to(dt)
            return t * kind[3] if kind[3] else t
        return torch.randint(-3, 9, shape, generator=g).to(dt) * (kind[3] or 1)

    shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
    dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                              torch.int32, torch.bool, torch.uint8, torch.complex64])
    scale = st.sampled_from([0, 1, 2**40, 2**62, float("nan"), float("inf"), -1])
    base = st.tuples(dtypes, st.integers(0, 3), shapes, scale).map(
        lambda k: make((k[0], k[1], k[2], k[3] if not (k[0].is_complex or (not k[0].is_floating_point and isinstance(k[3], float))) else 0)))
    return st.one_of(base, base.map(lambda t: t.t() if t.dim() == 2 else t), st.none(),
                     st.sampled_from(["x", [1, 2], (3,), 1.5]))


VALUES = st.one_of(INTS, INTS, FLOATS, tensors(), st.sampled_from([None, True, "softmax", "sigmoid", "bogus", ""]))


def _routing(t=6, e=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    idx = logits.topk(k, dim=1).indices
    rmap = torch.zeros(t, e, dtype=torch.bool).scatter_(1, idx, True)
    probs = torch.softmax(logits, 1) * rmap
    return logits, idx, rmap, probs


def _placement():
    p = moerail.default_placement(2, 4, 2)
    return p


def baselines():
    logits, idx, rmap, probs = _routing()
    x = torch.randn(6, 8)
    perm = moerail.permute(x, rmap)
    load = torch.rand(2, 4) * 10
    p0 = _placement()
    l2p, cnt = (t[0] for t in moerail.log2phy_from_phy2log(p0, 4))
    tpe = rmap.sum(0)
    return {
        "permute": (moerail.permute, dict(tokens=x, routing_map=rmap, probs=probs, num_out_tokens=None,
                                          drop_and_pad=False, align_size=0, tokens_per_expert=None)),
        "permute_by_indices": (moerail.permute_by_indices, dict(tokens=x, indices=idx, num_experts=4, probs=None,
                                                                align_size=0)),
        "unpermute": (moerail.unpermute, dict(permuted_tokens=perm[0], sorted_indices=perm[2], restore_shape=(6, 8),
                                              probs=None, routing_map=None, drop_and_pad=False, pad_offsets=None,
                                              permuted_probs=None)),
        "sort_chunks_by_idxs": (moerail.sort_chunks_by_idxs, dict(input=torch.randn(10, 3), split_sizes=[2, 3, 5],
                                                                  sorted_idxs=[2, 0, 1], probs=None)),
        "topk_route": (moerail.topk_route, dict(logits=logits, topk=2, use_pre_softmax=False, num_groups=None,
                                                group_topk=None, scaling_factor=None, score_function="softmax",
                                                expert_bias=None)),
        "apply_token_dropping": (moerail.apply_token_dropping, dict(probs=probs, routing_map=rmap, topk=2,
                                                                    capacity_factor=1.0, drop_policy="probs",
                                                                    pad_to_capacity=False)),
        "get_capacity": (moerail.get_capacity, dict(num_tokens=6, num_experts=4, capacity_factor=1.0,
                                                    min_capacity=None)),
        "switch_load_balancing_loss": (moerail.switch_load_balancing_loss, dict(
            probs=torch.softmax(logits, 1), tokens_per_expert=tpe, total_num_tokens=6, topk=2, num_experts=4,
            coeff=0.01)),
        "sequence_load_balancing_loss": (moerail.sequence_load_balancing_loss, dict(
            probs=torch.softmax(logits, 1), routing_map=rmap, seq_length=3, batch_size=2, topk=2, coeff=0.01)),
        "z_loss": (moerail.z_loss, dict(logits=logits, coeff=0.001)),
        "expert_bias_update": (moerail.expert_bias_update, dict(tokens_per_expert=tpe.float(),
                                                                expert_bias=torch.zeros(4),
                                                                expert_bias_update_rate=1e-3)),
        "routing_scores_for_aux_loss": (moerail.routing_scores_for_aux_loss, dict(logits=logits, topk=2,
                                                                                  score_function="softmax")),
        "rebalance_experts": (moerail.rebalance_experts, dict(weight=load, num_replicas=6, num_groups=1,
                                                              num_nodes=1, num_gpus=2, mode="eplb")),
        "improve_placement": (moerail.improve_placement, dict(weight=load, current_phy2log=p0, num_gpus=2,
                                                              num_nodes=1, max_moves=None)),
        "select_replicas": (moerail.select_replicas, dict(indices=idx, log2phy=l2p, logcnt=cnt, num_replicas=4,
                                                          offset=0)),
        "select_replicas_map": (moerail.select_replicas_map, dict(routing_map=rmap, log2phy=l2p, logcnt=cnt,
                                                                  num_replicas=4, probs=None, offset=0)),
        "default_placement": (moerail.default_placement, dict(num_layers=2, num_experts=4, num_gpus=2)),
        "log2phy_from_phy2log": (moerail.log2phy_from_phy2log, dict(phy2log=p0, num_experts=4)),
        "expand_placement": (moerail.expand_placement, dict(phy2log=p0, num_replicas=6, num_gpus=2)),
        "placement_metrics": (moerail.placement_metrics, dict(load=load, phy2log=p0, num_gpus=2, num_nodes=1,
                                                              capacity=None)),
        "lower_bound": (moerail.lower_bound, dict(load=load, num_replicas=6, num_gpus=2)),
        "plan_migration": (moerail.plan_migration, dict(old_phy2log=p0, new_phy2log=p0.flip(1), num_gpus=2,
                                                        num_nodes=1, expert_bytes=1e6)),
        "plan_all_to_all": (moerail.plan_all_to_all, dict(ranks_per_node=1, tokens_per_expert=torch.tensor([[3, 1],
                                                          [2, 2]]), num_tokens=[4, 4], hidden_size=16,
                                                          dtype=torch.bfloat16, strategy="auto")),
        "plan_all_to_all_maps": (moerail.plan_all_to_all, dict(ranks_per_node=1, routing_maps=[rmap, rmap],
                                                               hidden_size=16, strategy="auto")),
        "rank_groups": (moerail.rank_groups, dict(world_size=8, tp=2, cp=1, pp=2, ep=2, etp=None)),
    }


def acceptable(e: BaseException) -> bool:
    if isinstance(e, (TypeError, ValueError)):
        return "internal error" not in str(e)
    if isinstance(e, (RuntimeError, MemoryError)):
        s = str(e)
        # Sizes that fit int64 but not memory: torch's allocator says so (a clean exception).
        return "alloc" in s and "internal error" not in s
    return False


def fuzz_one(name: str, fn, base: dict, examples: int, deadline: float) -> tuple:
    """Runs batches of at most 200 examples (fresh random draws each) until ``examples`` cases
    ran or ``deadline`` passed: hypothesis itself has no time budget."""
    stats = {"cases": 0, "errors": 0}
    keys = list(base)

    def body(changes):
        kw = dict(base)
        for k, v in changes:
            if isinstance(base[k], bool) and isinstance(v, torch.Tensor):
                v = bool(v.numel() == 1)  # flags are Python bools: torch's truth test is not moerail's
            kw[k] = v
        stats["cases"] += 1
        try:
            fn(**kw)
        except Exception as e:  # noqa: BLE001 - the point: only clean exceptions pass
            if not acceptable(e):
                raise AssertionError(f"{name}({', '.join(f'{k}={v!r}' for k, v in changes)}): "
                                     f"{type(e).__name__}: {e}") from e
            stats["errors"] += 1

    while stats["cases"] < examples and time.monotonic() < deadline:
        batch = min(200, examples - stats["cases"])
        case = settings(max_examples=batch, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))(
            given(st.lists(st.tuples(st.sampled_from(keys), VALUES), min_size=1, max_size=3))(body))
        case()
    return stats["cases"], stats["errors"]


def _limit_memory(gib: float) -> None:
    """Caps this process's address space, so a size that fits int64 but not memory fails as an
    allocation error (a clean exception) instead of waking the OOM killer on a shared machine."""
    import resource

    cap = int(gib * 2**30)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def main() -> int:
    _limit_memory(float(os.environ.get("MOERAIL_FUZZ_MEMORY_GIB", "10")))
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=1e9, help="time budget per entry point")
    ap.add_argument("--only", default=None, help="comma-separated entry point names")
    ap.add_argument("--list", action="store_true", help="print the entry points' names and stop")
    a = ap.parse_args()
    if a.list:
        print("\n".join(baselines()))
        return 0
    failed = False
    for name, (fn, base) in baselines().items():
        if a.only and name not in a.only.split(","):
            continue
        fn(**base)  # the baseline itself is valid
        try:
            n, errs = fuzz_one(name, fn, base, a.examples, time.monotonic() + a.seconds)
            print(f"fuzz {name}: {n} cases, {errs} clean errors", flush=True)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - hypothesis may group several failures
            failed = True
            subs = getattr(e, "exceptions", None) or [e]
            for sub in subs:
                print(f"FUZZ FAILURE {name}: {str(sub).splitlines()[0][:400]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
