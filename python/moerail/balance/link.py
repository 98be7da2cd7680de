"""The alpha-beta link model that prices expert migrations and token exchanges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["LinkModel"]


@dataclass
class LinkModel:
    """Bandwidths in bytes/s per device and direction, latency in seconds per message.

    Defaults: H800-class nodes (DeepEP measures ~153-158 GB/s over NVLink inside a node and
    43-58 GB/s over 400 Gb/s InfiniBand between nodes)."""

    intra_node_bw: float = 150e9
    inter_node_bw: float = 45e9
    latency: float = 20e-6
    local_bw: float = 1.0e12
    #: Latency of a message between nodes (None: ``latency``).
    inter_node_latency: Optional[float] = None
    #: Bytes/s a node can send between nodes in all (all its NICs); inf: no shared limit.
    node_bw: float = float("inf")
    #: Fixed seconds a stage of an exchange costs (launch, synchronisation).
    stage_overhead: float = 0.0
