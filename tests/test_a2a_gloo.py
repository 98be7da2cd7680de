"""AllToAllDispatcher on 4 gloo ranks (issue 3): every strategy against a dense single-process
reference, for 2 nodes x 2 ranks, 1 x 4 and 4 x 1.

One launch of 4 processes runs every case (tests/a2a_gloo.py); each rank regenerates every
rank's inputs from the case's seed, so it can compute the reference of what it must receive and
of its own tokens' MoE output and gradients by plain autograd. Checked per rank and case:

* the dispatched rows and their weights are bit-identical to the reference's (local slot, source
  rank, token) order, and ``tokens_per_local_expert`` matches;
* the combined output and the gradients w.r.t. hidden and probs match the dense computation
  (fp64 inputs: 1e-10; bf16: 3e-2);
* the bytes the ranks sent between nodes and inside nodes, summed over the group, equal the
  planner's numbers exactly, for all four passes;
* a bad argument on one rank, or ranks that disagree on the configuration, raise on every rank
  (no hang).
"""

from __future__ import annotations

import a2a_gloo
import pytest
import torch

WORLD = 4
STRATEGIES = ("flat", "2dh", "dedup", "allgather")


def _cases():
    base = dict(seed=1, tokens=[12, 9, 0, 7], experts=8, topk=3, skew=2)
    cases = []
    for rpn in (2, 4, 1):
        for strat in STRATEGIES + ("auto",):
            cases.append(dict(base, rpn=rpn, strategy=strat, name=f"uneven rpn{rpn} {strat}"))
    for strat in STRATEGIES:
        cases.append(dict(base, rpn=2, strategy=strat, capacity_factor=1.0, name=f"drop probs {strat}"))
        cases.append(dict(base, rpn=2, strategy=strat, capacity_factor=0.8, drop_policy="position",
                          name=f"drop position {strat}"))
        cases.append(dict(base, rpn=2, strategy=strat, capacity_factor=1.0, pad=True, name=f"pad {strat}"))
        cases.append(dict(seed=2, tokens=[10, 10, 6, 3], experts=4, topk=2, rpn=2, strategy=strat,
                          name=f"1 local expert {strat}"))
        cases.append(dict(seed=3, tokens=[16, 5, 9, 11], experts=12, topk=4, rpn=2, strategy=strat,
                          empty_experts=[3, 4, 10], name=f"3 local experts, empty {strat}"))
        cases.append(dict(base, seed=4, rpn=2, strategy=strat, placement=[5, 2, 7, 0, 3, 6, 1, 4],
                          name=f"non-contiguous {strat}"))
        cases.append(dict(seed=5, tokens=[14, 8, 11, 6], experts=6, topk=2, skew=1, rpn=2, strategy=strat,
                          placement=[0, 4, 1, 0, 2, 5, 3, 1], name=f"replicas {strat}"))
        cases.append(dict(base, seed=6, rpn=2, strategy=strat, dtype=torch.bfloat16, name=f"bf16 {strat}"))
    for strat in STRATEGIES:
        cases.append(dict(base, seed=7, tokens=[30, 21, 9, 16], rpn=2, strategy=strat, chunks=3,
                          name=f"3 chunks {strat}"))
    for strat in STRATEGIES:
        cases.append(dict(seed=8, tokens=[12, 9, 7, 10], experts=8, topk=3, rpn=1, strategy=strat, etp=2,
                          name=f"EP2 x ETP2 {strat}"))
    errors = [
        dict(base, rpn=2, strategy="flat", per_rank={1: {"strategy": "dedup"}}, expect_error=True,
             name="strategy differs on rank 1"),
        dict(base, rpn=2, strategy="flat", per_rank={2: {"bad_probs": True}}, expect_error=True,
             name="bad probs on rank 2"),
        dict(base, rpn=2, strategy="2dh", name="after the errors, the group still works"),
    ]
    return cases + errors


CASES = _cases()


@pytest.fixture(scope="module")
def results():
    out = a2a_gloo.spawn(a2a_gloo.worker, WORLD, CASES)
    for rank, res in out.items():
        assert not isinstance(res, str), f"rank {rank} failed:\n{res}"
    return out


@pytest.mark.parametrize("i", [i for i, c in enumerate(CASES) if not c.get("expect_error") and not c.get("etp")],
                         ids=[c["name"] for c in CASES if not c.get("expect_error") and not c.get("etp")])
def test_matches_dense_reference(results, i):
    for rank in range(WORLD):
        r = results[rank][i]
        for key in ("rows_equal", "probs_equal", "counts_equal", "out_close", "grad_hidden_close",
                    "grad_probs_close", "bytes_equal"):
            assert r[key], f"rank {rank}: {key} failed ({CASES[i]['name']}; sent {r['sent']} planned {r['planned']})"


def test_strategies_give_the_same_bits(results):
    """flat and 2dh sum a token's copies in the same order (one rounding): same bits; the token
    strategies round once per hop, so within rounding."""
    by = {c["name"]: i for i, c in enumerate(CASES)}
    for rank in range(WORLD):
        for prefix in ("uneven rpn2", "bf16"):
            outs = {s: torch.tensor(results[rank][by[f"{prefix} {s}"]]["out"], dtype=torch.float64) for s in STRATEGIES}
            assert torch.equal(outs["flat"], outs["2dh"])
            for s in ("dedup", "allgather"):
                assert torch.allclose(outs["flat"], outs[s], rtol=2e-2, atol=2e-2)


def test_auto_picks_a_strategy(results):
    by = {c["name"]: i for i, c in enumerate(CASES)}
    for rpn in (2, 4, 1):
        chosen = {results[r][by[f"uneven rpn{rpn} auto"]]["strategy"] for r in range(WORLD)}
        assert len(chosen) == 1 and chosen <= set(STRATEGIES), chosen


def test_inconsistent_configuration_raises_on_every_rank(results):
    i = [c["name"] for c in CASES].index("strategy differs on rank 1")
    for rank in range(WORLD):
        err = results[rank][i]["error"]
        assert err and "disagree on the dispatcher configuration" in err, (rank, err)


def test_bad_input_on_one_rank_raises_everywhere(results):
    i = [c["name"] for c in CASES].index("bad probs on rank 2")
    for rank in range(WORLD):
        err = results[rank][i]["error"]
        if rank == 2:
            assert err.startswith("ValueError: routing_map") or err.startswith("ValueError: probs"), err
        else:
            assert "rank(s) [2] rejected their dispatch arguments" in err, (rank, err)


def test_chunked_overlap_reports(results):
    """forward() with 3 chunks: the same as the dense reference (checked above); the exchange time,
    the part the experts waited for, and the hidden fraction are reported."""
    by = {c["name"]: i for i, c in enumerate(CASES)}
    for strat in STRATEGIES:
        for rank in range(WORLD):
            ov = results[rank][by[f"3 chunks {strat}"]]["overlap"]
            assert ov["num_chunks"] == 3
            assert 0 <= ov["exposed_seconds"] <= ov["exchange_seconds"] + 1e-3
            assert 0.0 <= ov["hidden_fraction"] <= 1.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expert_tensor_parallel(results, strategy):
    """EP2 x ETP2: experts sharded over the ETP group give the dense result (outputs, gradients)."""
    i = [c["name"] for c in CASES].index(f"EP2 x ETP2 {strategy}")
    for rank in range(WORLD):
        r = results[rank][i]
        assert r["out_close"] and r["grad_hidden_close"] and r["grad_probs_close"], (rank, r)
        assert r["strategy"] == strategy
    # The two ranks of an ETP group see the same rows.
    assert results[0][i]["rows"] == results[1][i]["rows"] and results[2][i]["rows"] == results[3][i]["rows"]


@pytest.mark.parametrize("strategy", ["flat", "dedup"])
def test_combine_takes_the_handle_of_its_dispatch(strategy):
    """``dispatch`` returns a handle that ``combine`` takes: two dispatches combined in reverse
    order give the bits of dispatch-then-combine, forward and backward (no route is kept in the
    dispatcher between them); ``combine`` without the handle still works for one release, with a
    DeprecationWarning; anything else as the handle is a TypeError naming it."""
    out = a2a_gloo.spawn(a2a_gloo.handles_worker, WORLD, strategy)
    for rank, res in out.items():
        assert not isinstance(res, str), f"rank {rank} failed:\n{res}"
        assert res["same_bits"], rank
        assert res["deprecated_warns"] and res["deprecated_same"], rank
        assert res["bad_handle"] and res["bad_handle"].startswith("handle: expected the DispatchHandle"), res
