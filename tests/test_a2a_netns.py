"""The dispatcher across two emulated nodes (issue 3): network namespaces joined by a veth pair
limited with tc, 2 gloo ranks each (benches/netns_a2a.py). Needs root and iproute2; skips with
the reason otherwise.

At top-8 of 16 experts, dedup sends a quarter of flat's inter-node bytes; on a slow link its
measured dispatch + combine must be faster than flat's, ``auto`` must pick a token strategy, and
the cost model (with link parameters measured in the same run) must predict each strategy's time
within a factor of 3 (the shaped veth's throughput itself varies by ~2x from run to run here; the
bench records the typical agreement, 0.8-1.2x)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benches"))
import netns_a2a  # noqa: E402

WHY = netns_a2a.available()


@pytest.mark.skipif(WHY is not None, reason=f"two-node emulation not possible here: {WHY}")
def test_dedup_beats_flat_across_a_slow_link():
    netns_a2a.setup(100)
    try:
        rows = netns_a2a.run(dict(tokens=128, hidden=256, experts=16, topk=8, warmup=1, repeat=3,
                                  strategies=["flat", "dedup", "auto"]))
    finally:
        netns_a2a.teardown()
    link = rows.pop()["link"]
    by = {r["strategy"].split(" ")[0]: r for r in rows}
    print("\n" + "\n".join(f"{r['strategy']}: measured {r['measured_s'] * 1e3:.1f} ms, predicted "
                           f"{r['predicted_s'] * 1e3:.1f} ms, {r['inter_node_bytes']} inter-node bytes" for r in rows)
          + f"\nlink: {link}")
    assert by["dedup"]["inter_node_bytes"] * 3 < by["flat"]["inter_node_bytes"]
    assert by["dedup"]["measured_s"] < by["flat"]["measured_s"]
    assert by["dedup"]["predicted_s"] < by["flat"]["predicted_s"]
    assert by["auto"]["strategy"] in ("auto -> dedup", "auto -> allgather")
    for r in rows:
        assert 1 / 3 < r["measured_s"] / r["predicted_s"] < 3.0, r


def test_namespaces_are_cleaned_up():
    import subprocess

    if WHY is not None:
        pytest.skip(f"two-node emulation not possible here: {WHY}")
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "moerail_n0" not in out and "moerail_n1" not in out
