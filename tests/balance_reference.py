"""Straightforward numpy implementations the balance tests and benchmarks compare against.

``rebalance_experts`` is DeepSeek's EPLB algorithm written from its published description
(deepseek-ai/EPLB README and DeepSeek-V3 report): balanced packing with equal item counts per
pack, replication by largest per-replica load, the hierarchical policy (groups to nodes,
replication inside nodes, replicas to GPUs) and the global policy (one group, one node). Ties go
to the lower index (stable descending sort, first arg-min / arg-max). Loads are float64.

The metrics are the plain definitions: an expert's load is split evenly over its replicas; a
device's load is the sum over its slots.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int):
    """``weight [X, n]`` into ``num_packs`` packs of ``n / num_packs`` items: heaviest item
    first, into the lightest pack with room. Returns ``(pack_index, rank_in_pack)``."""
    num_rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (num_rows, 1)), np.zeros((num_rows, n), dtype=np.int64)
    pack_index = np.full((num_rows, n), -1, dtype=np.int64)
    rank_in_pack = np.full((num_rows, n), -1, dtype=np.int64)
    for i in range(num_rows):
        loads = np.zeros(num_packs)
        counts = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[i], kind="stable"):
            open_packs = np.flatnonzero(counts < per_pack)
            p = open_packs[np.argmin(loads[open_packs])]
            pack_index[i, item] = p
            rank_in_pack[i, item] = counts[p]
            loads[p] += weight[i, item]
            counts[p] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int):
    """``weight [X, n]`` onto ``num_phy`` slots: slots ``0..n`` hold experts ``0..n``, each
    further slot the expert with the largest ``weight / count``. Returns
    ``(phy2log, rank, logcnt)``."""
    num_rows, n = weight.shape
    phy2log = np.tile(np.arange(num_phy), (num_rows, 1))
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, n), dtype=np.int64)
    rows = np.arange(num_rows)
    for i in range(n, num_phy):
        best = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, i] = best
        rank[:, i] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    rows = np.arange(perm.shape[0])[:, None]
    inv[rows, perm] = np.arange(perm.shape[1])[None, :]
    return inv


def rebalance_hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. groups to nodes (sequential sum over each group's experts)
    grouped = weight.reshape(num_layers, num_groups, group_size)
    group_load = grouped[..., 0].copy()
    for j in range(1, group_size):
        group_load = group_load + grouped[..., j]
    gpack, grank = balanced_packing(group_load, num_nodes)
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[..., None] + np.arange(group_size)).reshape(
        num_layers, num_log
    )
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node: rows are (layer, node)
    w_mlog = np.take_along_axis(weight, mlog2log, axis=-1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(w_mlog, num_phy // num_nodes)

    # 3. replicas to GPUs inside each node
    w_phy = np.take_along_axis(w_mlog / mlogcnt, phy2mlog, axis=-1)
    pack, rank_in_pack = balanced_packing(w_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * phy_per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1).reshape(num_layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * (num_log // num_nodes))[None, :, None]).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=-1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=-1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """EPLB: ``(phy2log [L, R], log2phy [L, E, X] padded with -1, logcnt [L, E])``."""
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_log = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    x = int(logcnt.max())
    log2phy = np.full((num_layers, num_log, x), -1, dtype=np.int64)
    for layer in range(num_layers):
        log2phy[layer, phy2log[layer], rank[layer]] = np.arange(num_replicas)
    return phy2log, log2phy, logcnt


def device_loads(load: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L, num_gpus]``: each expert's load split evenly over its replicas."""
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_log = load.shape
    cnt = np.stack([np.bincount(p, minlength=num_log) for p in phy2log])
    per_slot = np.take_along_axis(load / cnt, phy2log, axis=-1)
    return per_slot.reshape(num_layers, num_gpus, -1).sum(-1)


def min_max_replica_load(load_row: np.ndarray, num_replicas: int) -> float:
    _, _, cnt = replicate_experts(np.asarray(load_row, dtype=np.float64)[None], num_replicas)
    return float((load_row / cnt[0]).max())
