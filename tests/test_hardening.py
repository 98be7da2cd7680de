"""Issue 15: each input that crashed, aborted or gave wrong numbers, now a clear error.

The cases that killed the process (SIGSEGV, SIGABRT, killed for memory) run in a child
process, so a regression fails the test instead of taking pytest down."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import moerail
from moerail import _native


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter; a signal shows as a negative return code."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def expect_value_error(call: str, arg: str) -> None:
    p = run_child(f"""
        import torch, moerail
        try:
            {call}
        except ValueError as e:
            print("VALUEERROR", e)
        """)
    assert p.returncode == 0, f"child died with {p.returncode}: {p.stderr[-2000:]}"
    assert "VALUEERROR" in p.stdout and f"VALUEERROR {arg}:" in p.stdout, p.stdout + p.stderr[-2000:]


# -------------------------------------------------------------------------- memory safety / aborts


_CAPPED = """
    import resource, torch, moerail
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))  # an allocation error, never the OOM killer
    from moerail import _checks
    mem = _checks.device_memory(torch.device("cpu"))
"""


_BEYOND_MEMORY = [
    "moerail.permute(torch.randn(4, 8), torch.eye(4, dtype=torch.bool), align_size={align})",
    "moerail.permute(torch.randn(4, 8), torch.eye(4, dtype=torch.bool), probs=torch.eye(4), align_size={align})",
    "moerail.permute_by_indices(torch.randn(4, 8), torch.arange(4).view(4, 1), 4, align_size={align})",
]


def test_align_size_beyond_memory_is_a_value_error():
    # Fits int64, but 4 experts padded to a multiple of it need more bytes than the machine has
    # (2**40: 160 TiB; the other: twice its RAM): was torch's allocation error (or, without an
    # address-space cap, the kernel's OOM killer while the padding is zeroed). One child runs all.
    calls = [c.format(align=a) for a in ("2**40", "mem // 40 // 2 + 1") for c in _BEYOND_MEMORY]
    body = "".join(f"""
    try:
        {c}
        print("RETURNED")
    except ValueError as e:
        print("VALUEERROR", e)
    except BaseException as e:
        print("OTHER", type(e).__name__, e)
    """ for c in calls)
    p = run_child(_CAPPED + body)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    lines = p.stdout.strip().splitlines()
    assert len(lines) == len(calls), p.stdout
    for c, line in zip(calls, lines):
        assert line.startswith("VALUEERROR align_size: ") and " bytes (" in line and "of memory of cpu" in line, \
            f"{c}: {line}"


def test_padded_rows_limit_is_the_device_memory():
    from moerail import _checks

    cpu = torch.device("cpu")
    mem = _checks.device_memory(cpu)
    assert 0 < mem <= 1 << 47
    _checks.padded_rows_fit(mem // 40, 40, 16, cpu)  # exactly fits: fine
    with pytest.raises(ValueError, match=rf"^align_size: padding .* multiple of 16 gives {mem // 40 + 1} rows, "):
        _checks.padded_rows_fit(mem // 40 + 1, 40, 16, cpu)
    # An ordinary alignment still works and pads as before.
    out = moerail.permute(torch.randn(4, 8), torch.eye(4, dtype=torch.bool), align_size=128)
    assert out[0].shape == (512, 8) and out[4].tolist() == [128] * 4


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cpu_memory_is_the_cgroup_limit_where_lower(tmp_path, monkeypatch):
    # A container's memory limit, not the machine's RAM, is what a CPU process may use: v2 reads
    # memory.max on the process's path (the smallest up to the root), v1 memory.limit_in_bytes;
    # "max" and v1's 2**63-ish "unlimited" are no limit.
    from moerail import _checks

    v2 = tmp_path / "v2"
    _write(v2 / "cgroup.controllers", "memory\n")
    _write(v2 / "memory.max", "max\n")
    _write(v2 / "job" / "memory.max", str(6 << 30) + "\n")
    _write(v2 / "job" / "step" / "memory.max", "max\n")
    _write(tmp_path / "cg2", "0::/job/step\n")
    assert _checks.cgroup_memory_limit(str(tmp_path / "cg2"), str(v2)) == 6 << 30

    v1 = tmp_path / "v1"
    _write(v1 / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(v1 / "memory" / "pod" / "memory.limit_in_bytes", str(3 << 30) + "\n")
    _write(tmp_path / "cg1", "9:pids:/\n4:memory:/pod\n0::/\n")
    assert _checks.cgroup_memory_limit(str(tmp_path / "cg1"), str(v1)) == 3 << 30

    _write(tmp_path / "none", "4:memory:/\n")
    assert _checks.cgroup_memory_limit(str(tmp_path / "none"), str(v1)) is None
    assert _checks.cgroup_memory_limit(str(tmp_path / "missing"), str(v1)) is None

    # device_memory takes the lower of RAM and the limit, and the align_size check follows it.
    monkeypatch.setattr(_checks, "_MEMORY", {})
    monkeypatch.setattr(_checks, "cgroup_memory_limit", lambda: 1 << 30)
    cpu = torch.device("cpu")
    assert _checks.device_memory(cpu) == 1 << 30
    with pytest.raises(ValueError, match=r"^align_size: .* more than the 1073741824 bytes \(1\.0 GiB\) of memory of cpu"):
        _checks.padded_rows_fit((1 << 30) // 40 + 1, 40, 16, cpu)


def test_align_size_beyond_memory_on_the_npu_path():
    from moerail.backends import npu as _npu

    _npu.use_for_cpu(True)
    try:
        with pytest.raises(ValueError, match="^align_size: .* of memory of cpu"):
            moerail.permute(torch.randn(4, 8), torch.eye(4, dtype=torch.bool), align_size=2**40)
    finally:
        _npu.use_for_cpu(False)


@pytest.mark.parametrize("align", [2**61, 2**62, 2**63 - 1])
def test_permute_huge_align_size(align):
    expect_value_error(f"moerail.permute(torch.randn(4, 8), torch.eye(4, dtype=torch.bool), align_size={align})",
                       "align_size")


@pytest.mark.parametrize("align", [2**62, 2**63 - 1])
def test_permute_by_indices_huge_align_size(align):
    expect_value_error(f"moerail.permute_by_indices(torch.randn(4, 8), torch.arange(4).view(4, 1), 4, align_size={align})",
                       "align_size")


def test_native_layout_rejects_wrapping_alignment_and_writes_nothing():
    # The binding itself (what the Python check sits in front of): no out-of-bounds write.
    m = torch.eye(4, dtype=torch.bool)
    si = torch.full((4,), 7, dtype=torch.int64)
    counts = torch.full((4,), 7, dtype=torch.int64)
    with pytest.raises(ValueError, match="^align_size: "):
        _native.ops.permute_map_layout(m, 2**62, None, si, None, counts)
    assert torch.equal(si, torch.full((4,), 7)) and torch.equal(counts, torch.full((4,), 7))


def test_sort_chunks_split_sizes_that_wrap():
    expect_value_error("moerail.sort_chunks_by_idxs(torch.randn(10, 3), [2**63 - 1, 2**63 - 1, 12], [2, 0, 1])",
                       "split_sizes")


def test_rank_groups_huge_world():
    expect_value_error("moerail.rank_groups(2**40, 1, 1, 1, 1, 1)", "world_size")


# ------------------------------------------------------------------------------ silent wrong numbers


@pytest.mark.parametrize("kw", [dict(hidden_size=2**59), dict(hidden_size=2**62), dict(hidden_size=2**63 - 1)])
def test_plan_all_to_all_huge_hidden(kw):
    tpe = torch.tensor([[3, 1], [2, 2]])
    with pytest.raises(ValueError, match="^hidden_size: "):
        moerail.plan_all_to_all(ranks_per_node=1, tokens_per_expert=tpe, num_tokens=[4, 4], **kw)


@pytest.mark.parametrize("n", [2**55, 2**61, 2**62])
def test_plan_all_to_all_huge_counts(n):
    tpe = torch.tensor([[n, n], [n, n]])
    with pytest.raises(ValueError) as ei:
        moerail.plan_all_to_all(ranks_per_node=1, tokens_per_expert=tpe, num_tokens=[n, n], hidden_size=4096)
    assert str(ei.value).split(":")[0] in ("counts", "hidden_size", "tokens_per_expert", "num_tokens"), ei.value
    assert "internal error" not in str(ei.value)


def test_plan_all_to_all_fitting_counts_give_non_negative_bytes():
    n = 2**40
    tpe = torch.tensor([[n, n], [n, n]])
    plan = moerail.plan_all_to_all(ranks_per_node=1, tokens_per_expert=tpe, num_tokens=[n, n], hidden_size=16)
    for passes in plan.traffic.values():
        for t in passes.values() if isinstance(passes, dict) else passes:
            for k, v in (t.items() if isinstance(t, dict) else []):
                if k.endswith("bytes") and isinstance(v, (int, float)):
                    assert v >= 0, (k, v)


def test_permute_checks_num_out_tokens_with_alignment():
    m = torch.eye(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="^num_out_tokens: "):
        moerail.permute(torch.randn(4, 8), m, num_out_tokens=3, align_size=4)
    out = moerail.permute(torch.randn(4, 8), m, num_out_tokens=4, align_size=4)
    assert out[0].shape[0] == 16


def test_permute_tokens_per_expert_disagreeing_with_the_map():
    m = torch.eye(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="^tokens_per_expert: "):
        moerail.permute(torch.randn(4, 8), m, align_size=4, tokens_per_expert=torch.tensor([5, 0, 0, 0]))
    _, _, _, pad_offsets, counts = moerail.permute(torch.randn(4, 8), m, align_size=4,
                                                    tokens_per_expert=torch.tensor([1, 1, 1, 1]))
    assert torch.equal(pad_offsets, torch.tensor([0, 3, 6, 9])) and torch.equal(counts, torch.full((4,), 4))


def test_complex_npy_loads_are_rejected(tmp_path):
    import numpy as np

    f = tmp_path / "loads.npy"
    np.save(f, np.array([[1 + 2j, 3 + 0j]]))
    with pytest.raises(ValueError, match="^loads: .*complex"):
        moerail.balance.load_loads(str(f))


# ----------------------------------------------------------------------------------------- state


def test_load_tracker_recovers_after_a_bad_step():
    tr = moerail.LoadTracker(1, 2)
    tr.record(0, torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="^tokens_per_expert: "):
        tr.step()
    tr.record(0, torch.tensor([2.0, 3.0]))
    rec = tr.step()
    assert rec["loads"] == [[2.0, 3.0]]


def test_sort_chunks_zero_dim_probs_found_by_the_fuzzer():
    with pytest.raises(ValueError, match="^probs: "):
        moerail.sort_chunks_by_idxs(torch.randn(10, 3), [2, 3, 5], [2, 0, 1], probs=torch.tensor(1.5))


def test_permute_by_indices_many_experts_is_an_error_not_an_abort():
    # Found by the fuzzer: num_experts sizes the layout's per-expert tables; under a memory cap
    # their allocation failed inside Rust and aborted the process (now a clean error).
    p = run_child("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (10 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        import torch, moerail
        try:
            moerail.permute_by_indices(torch.randn(4, 8), torch.zeros(4, 1, dtype=torch.int64), 2**27)
            print("RAISED none")
        except (ValueError, RuntimeError) as e:
            print("RAISED", type(e).__name__, e)
        """)
    assert p.returncode == 0 and "RAISED" in p.stdout, (p.returncode, p.stderr[-1500:])
