"""The simulator's per-device memory against a real Megatron-Core GPTModel on CPU gloo ranks
(tests/memory_sim_megatron.py): bf16 weights, fp32 gradient buffers and the mixed-precision Adam's
state counted byte for byte on every rank, and the step's saved-tensor peak with 1F1B (PP 2).

Runs once, on the installed megatron-core (0.16), like tests/test_memory_exec.py's training-loop tests:
0.19's DDP asks for CUDA streams in its gradient reduction."""

from __future__ import annotations

import pytest

# TP1 PP2 EP2 (1F1B, 2 micro-batches) and TP1 PP1 EP4 with the distributed optimizer.
JOB = {"runs": [{"layout": (1, 2, 2)}, {"layout": (1, 1, 4), "dist_opt": True}]}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    pytest.importorskip("megatron.core")
    import memory_sim_megatron as h

    measured = h.run(JOB, str(tmp_path_factory.mktemp("sim_memory")), timeout_s=400)
    return h.compare(measured, JOB)


def _err(r):
    return (r["predicted"] - r["measured"]) / r["measured"]


def test_weights_gradients_optimizer_are_exact(rows):
    for r in rows:
        if r["component"].split()[0] in ("weights", "gradients", "optimizer"):
            # The distributed optimizer's buffers are padded to a multiple of the data-parallel size per
            # bucket (here 1% of a 34k-parameter model; the simulator does not count the padding).
            tol = 0.02 if "dist-opt" in r["layout"] else 0.0
            assert abs(_err(r)) <= tol, r


def test_activations_at_the_1f1b_peak(rows):
    act = [r for r in rows if r["component"] == "  the rest"]
    assert act
    for r in act:
        # Beyond the unfused attention's s x s tensors and the fp32 logits (which the simulator counts as
        # flash attention and as a transient), the simulator still under-predicts this tiny model's
        # saved tensors by about a third (measured -32%); the bound holds it there.
        assert -0.40 <= _err(r) <= 0.0, r
