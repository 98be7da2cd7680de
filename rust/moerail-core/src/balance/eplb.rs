//! DeepSeek's EPLB placement (deepseek-ai/EPLB), from its published description:
//!
//! * **balanced packing**: `n` weighted items into `m` packs of exactly `n / m` items each, the
//!   heaviest item first, each to the lightest pack that still has room (with one item per pack,
//!   item `i` goes to pack `i`);
//! * **replication**: `num_phy - num_log` extra replicas, each to the expert with the largest
//!   load per replica `w / count` at that moment; the first `num_log` slots hold experts
//!   `0..num_log` with replica rank 0, each extra slot the next rank of its expert;
//! * **hierarchical policy** (the number of nodes divides the number of groups): groups (of
//!   `E / num_groups` consecutive experts) to nodes by balanced packing of the group loads;
//!   inside each node, replication of its experts onto its `R / num_nodes` slots; the node's
//!   replicas (weighing `w / count`) to its GPUs by balanced packing;
//! * **global policy** otherwise: the same with one group and one node.
//!
//! Ties go to the lower index everywhere (lighter pack, heavier item, larger per-replica load):
//! the output is a pure function of the loads. All arithmetic is f64.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{Key, Topology};

/// Where one layer's placement goes: `phy2log [R]`, `phyrank [R]`, `logcnt [E]`.
pub struct LayerOut<'a> {
    pub phy2log: &'a mut [i64],
    pub phyrank: &'a mut [i64],
    pub logcnt: &'a mut [i64],
}

/// Reusable buffers (one per thread), so a layer allocates nothing in steady state.
#[derive(Default)]
pub struct Scratch {
    keys: Vec<u128>,
    pack_keys: Vec<u64>,
    block_min: Vec<(u64, usize)>,
    order: Vec<usize>,
    extra_keys: Vec<u128>,
    loads: Vec<f64>,
    items: Vec<usize>,
    values: Vec<f64>,
    phy: Vec<usize>,
    rank: Vec<usize>,
    per_replica: Vec<f64>,
    pack: Vec<usize>,
    rip: Vec<usize>,
    wn: Vec<f64>,
    mlog2log: Vec<usize>,
    group_w: Vec<f64>,
    gpack: Vec<usize>,
    grank: Vec<usize>,
}

fn reset<T: Clone>(v: &mut Vec<T>, n: usize, x: T) {
    v.clear();
    v.resize(n, x);
}

/// Sort keys: heaviest first, equal weights in ascending index order. Non-negative f64 order
/// like their bit patterns (`+ 0.0` turns -0.0 into 0.0).
fn fill_desc_keys(w: &[f64], keys: &mut Vec<u128>) {
    keys.clear();
    keys.extend(
        w.iter()
            .enumerate()
            .map(|(i, &x)| ((!(x + 0.0).to_bits() as u128) << 64) | i as u128),
    );
    keys.sort_unstable();
}

/// Balanced packing of `w` (finite, >= 0) into `num_packs` packs of `w.len() / num_packs`
/// items: writes each item's pack and its rank (position) inside the pack.
fn balanced_packing_with(
    w: &[f64],
    num_packs: usize,
    pack: &mut [usize],
    rank: &mut [usize],
    sc: &mut Scratch,
) {
    let n = w.len();
    debug_assert!(num_packs > 0 && n % num_packs == 0);
    if n == num_packs {
        for i in 0..n {
            pack[i] = i;
            rank[i] = 0;
        }
        return;
    }
    fill_desc_keys(w, &mut sc.keys);
    let mut order = std::mem::take(&mut sc.order);
    order.clear();
    order.extend(sc.keys.iter().map(|&k| (k as u64) as usize));
    pack_sorted(w, &order, num_packs, pack, rank, sc);
    sc.order = order;
}

/// Balanced packing given the items in packing order (heaviest first, lower index on ties).
fn pack_sorted(
    w: &[f64],
    order: &[usize],
    num_packs: usize,
    pack: &mut [usize],
    rank: &mut [usize],
    sc: &mut Scratch,
) {
    let n = w.len();
    let per_pack = n / num_packs;
    if per_pack == 1 {
        for i in 0..n {
            pack[i] = i;
            rank[i] = 0;
        }
        return;
    }
    // Pack keys are the bits of the pack loads (non-negative finite f64 order like their bits);
    // a full pack's key is +inf, above every finite load.
    const FULL: u64 = 0x7ff0_0000_0000_0000;
    reset(&mut sc.items, num_packs, 0);
    reset(&mut sc.loads, num_packs, 0.0);
    let loads = &mut sc.loads[..num_packs];
    let items = &mut sc.items[..num_packs];
    if num_packs <= 16 {
        // Few packs: a scan (the first minimum is the lower index).
        let mut keys = [0u64; 16];
        let keys = &mut keys[..num_packs];
        for &item in order {
            let mut p = 0;
            let mut best = keys[0];
            for (q, &x) in keys.iter().enumerate().skip(1) {
                if x < best {
                    best = x;
                    p = q;
                }
            }
            pack[item] = p;
            rank[item] = items[p];
            items[p] += 1;
            loads[p] += w[item];
            keys[p] = if items[p] < per_pack {
                (loads[p] + 0.0).to_bits()
            } else {
                FULL
            };
        }
        return;
    }
    // Many packs: blocks of about sqrt(packs) packs, each with its lightest pack (the first on
    // ties); a query scans the block minima, an update rescans one block.
    let bsz = (num_packs as f64).sqrt().ceil() as usize;
    let nb = num_packs.div_ceil(bsz);
    let keys = &mut sc.pack_keys;
    keys.clear();
    keys.resize(num_packs, 0);
    let bmin = &mut sc.block_min;
    bmin.clear();
    bmin.extend((0..nb).map(|b| (0u64, b * bsz)));
    for &item in order {
        let mut best = bmin[0];
        for &m in bmin.iter().skip(1) {
            if m.0 < best.0 {
                best = m;
            }
        }
        let p = best.1;
        pack[item] = p;
        rank[item] = items[p];
        items[p] += 1;
        loads[p] += w[item];
        keys[p] = if items[p] < per_pack {
            (loads[p] + 0.0).to_bits()
        } else {
            FULL
        };
        let b = p / bsz;
        let lo = b * bsz;
        let block = &keys[lo..(lo + bsz).min(num_packs)];
        let mut m = (block[0], lo);
        for (j, &k) in block.iter().enumerate().skip(1) {
            if k < m.0 {
                m = (k, lo + j);
            }
        }
        bmin[b] = m;
    }
}

/// Replicates `w.len()` experts onto `phy2log.len()` slots (greedy by largest per-replica load).
pub fn replicate(w: &[f64], phy2log: &mut [usize], rank: &mut [usize], cnt: &mut [usize]) {
    replicate_with(w, phy2log, rank, cnt, &mut Vec::new())
}

fn replicate_with(
    w: &[f64],
    phy2log: &mut [usize],
    rank: &mut [usize],
    cnt: &mut [usize],
    values: &mut Vec<f64>,
) {
    let n = w.len();
    let extra = phy2log.len() - n;
    // Only the `extra` heaviest experts (heaviest first, lower index on ties) can receive an
    // extra replica: any other expert is beaten by all of them while one still has a single
    // replica, and that holds until the last extra replica is placed.
    let cand: Vec<usize> = if extra > 0 && extra < n {
        let mut keys: Vec<u128> = w
            .iter()
            .enumerate()
            .map(|(i, &x)| ((!(x + 0.0).to_bits() as u128) << 64) | i as u128)
            .collect();
        keys.select_nth_unstable(extra - 1);
        keys.truncate(extra);
        keys.into_iter().map(|k| (k as u64) as usize).collect()
    } else {
        (0..n).collect()
    };
    replicate_candidates(w, cand, phy2log, rank, cnt, values);
}

/// Greedy replication where only `cand` can receive extra replicas.
fn replicate_candidates(
    w: &[f64],
    mut cand: Vec<usize>,
    phy2log: &mut [usize],
    rank: &mut [usize],
    cnt: &mut [usize],
    values: &mut Vec<f64>,
) {
    let n = w.len();
    for e in 0..n {
        phy2log[e] = e;
        rank[e] = 0;
        cnt[e] = 1;
    }
    if phy2log.len() == n {
        return;
    }
    cand.sort_unstable();
    if cand.len() <= 64 {
        // Scan the candidates (ascending index, so the first maximum is the lower index).
        values.clear();
        values.extend(cand.iter().map(|&e| w[e]));
        for s in n..phy2log.len() {
            let mut j = 0;
            let mut best = values[0];
            for (x, &v) in values.iter().enumerate().skip(1) {
                if v > best {
                    best = v;
                    j = x;
                }
            }
            let e = cand[j];
            phy2log[s] = e;
            rank[s] = cnt[e];
            cnt[e] += 1;
            values[j] = w[e] / cnt[e] as f64;
        }
        return;
    }
    // Max-heap by (w / cnt, lower index first).
    let mut heap: BinaryHeap<(Key, Reverse<usize>)> =
        cand.iter().map(|&e| (Key(w[e], 0), Reverse(e))).collect();
    for s in n..phy2log.len() {
        let (_, Reverse(e)) = heap.pop().expect("at least one expert");
        phy2log[s] = e;
        rank[s] = cnt[e];
        cnt[e] += 1;
        heap.push((Key(w[e] / cnt[e] as f64, 0), Reverse(e)));
    }
}

/// Replica counts minimising the largest per-replica load (greedy replication), and that load.
pub fn min_max_replica_load(w: &[f64], num_phy: usize) -> f64 {
    let n = w.len();
    if n == 0 {
        return 0.0;
    }
    let mut p = vec![0; num_phy.max(n)];
    let mut r = vec![0; num_phy.max(n)];
    let mut c = vec![0; n];
    replicate(w, &mut p, &mut r, &mut c);
    (0..n).map(|e| w[e] / c[e] as f64).fold(0.0, f64::max)
}

/// One node's replication and packing (EPLB steps 2 and 3): experts `w` (node-local order) onto
/// `out_e.len()` slots on `gpus` GPUs. Writes the node-local expert and replica rank of each slot
/// (GPU-major) and the replica counts.
fn place_node_with(
    w: &[f64],
    gpus: usize,
    out_e: &mut [usize],
    out_r: &mut [usize],
    cnt: &mut [usize],
    sc: &mut Scratch,
) {
    let n = w.len();
    let slots = out_e.len();
    let extra = slots - n;
    let mut phy = std::mem::take(&mut sc.phy);
    let mut rank = std::mem::take(&mut sc.rank);
    let mut per_replica = std::mem::take(&mut sc.per_replica);
    let mut pack = std::mem::take(&mut sc.pack);
    let mut rip = std::mem::take(&mut sc.rip);
    let mut order = std::mem::take(&mut sc.order);
    reset(&mut phy, slots, 0);
    reset(&mut rank, slots, 0);
    reset(&mut pack, slots, 0);
    reset(&mut rip, slots, 0);
    // The experts heaviest first (lower index on ties), once: the first `extra` are the
    // replication candidates, and the rest keeps its order among the replicas to pack.
    fill_desc_keys(w, &mut sc.keys);
    let cand: Vec<usize> = sc.keys[..extra.min(n)]
        .iter()
        .map(|&k| (k as u64) as usize)
        .collect();
    replicate_candidates(w, cand, &mut phy, &mut rank, cnt, &mut sc.values);
    per_replica.clear();
    per_replica.extend(phy.iter().map(|&e| w[e] / cnt[e] as f64));
    if gpus < slots {
        // Packing order of the replicas: experts with one replica keep the sorted order (their
        // slot is their index); the replicas of replicated experts are sorted apart and merged.
        sc.extra_keys.clear();
        sc.extra_keys.extend(
            (0..slots)
                .filter(|&p| cnt[phy[p]] > 1)
                .map(|p| ((!(per_replica[p] + 0.0).to_bits() as u128) << 64) | p as u128),
        );
        sc.extra_keys.sort_unstable();
        order.clear();
        let mut b = sc.extra_keys.iter().peekable();
        for &k in &sc.keys {
            let e = (k as u64) as usize;
            if cnt[e] > 1 {
                continue;
            }
            let ka = ((!(w[e] + 0.0).to_bits() as u128) << 64) | e as u128;
            while let Some(&&kb) = b.peek() {
                if kb < ka {
                    order.push((kb as u64) as usize);
                    b.next();
                } else {
                    break;
                }
            }
            order.push(e);
        }
        order.extend(b.map(|&k| (k as u64) as usize));
    }
    pack_sorted(&per_replica, &order, gpus, &mut pack, &mut rip, sc);
    let per_gpu = slots / gpus;
    for p in 0..slots {
        let s = pack[p] * per_gpu + rip[p];
        out_e[s] = phy[p];
        out_r[s] = rank[p];
    }
    sc.phy = phy;
    sc.rank = rank;
    sc.per_replica = per_replica;
    sc.pack = pack;
    sc.rip = rip;
    sc.order = order;
}

/// EPLB steps 2 and 3 on one node: `(expert of each slot, replica rank, counts)`, slots GPU-major.
pub fn place_node(w: &[f64], slots: usize, gpus: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let mut e = vec![0; slots];
    let mut r = vec![0; slots];
    let mut c = vec![0; w.len()];
    place_node_with(w, gpus, &mut e, &mut r, &mut c, &mut Scratch::default());
    (e, r, c)
}

/// Experts of each node after packing groups to nodes (EPLB step 1): `mlog2log`, the logical
/// expert of each node-major position (node `n` holds positions `n * E/N .. (n+1) * E/N`).
pub fn groups_to_nodes(w: &[f64], num_groups: usize, num_nodes: usize) -> Vec<usize> {
    let mut out = Vec::new();
    groups_to_nodes_with(w, num_groups, num_nodes, &mut out, &mut Scratch::default());
    out
}

fn groups_to_nodes_with(
    w: &[f64],
    num_groups: usize,
    num_nodes: usize,
    mlog2log: &mut Vec<usize>,
    sc: &mut Scratch,
) {
    let e_n = w.len();
    let gs = e_n / num_groups;
    let gpn = num_groups / num_nodes;
    reset(mlog2log, e_n, 0);
    if num_groups == 1 {
        for (e, m) in mlog2log.iter_mut().enumerate() {
            *m = e;
        }
        return;
    }
    let mut group_w = std::mem::take(&mut sc.group_w);
    let mut gpack = std::mem::take(&mut sc.gpack);
    let mut grank = std::mem::take(&mut sc.grank);
    group_w.clear();
    group_w
        .extend((0..num_groups).map(|g| w[g * gs..(g + 1) * gs].iter().fold(0.0, |a, &x| a + x)));
    reset(&mut gpack, num_groups, 0);
    reset(&mut grank, num_groups, 0);
    balanced_packing_with(&group_w, num_nodes, &mut gpack, &mut grank, sc);
    for e in 0..e_n {
        let g = e / gs;
        mlog2log[(gpack[g] * gpn + grank[g]) * gs + e % gs] = e;
    }
    sc.group_w = group_w;
    sc.gpack = gpack;
    sc.grank = grank;
}

/// EPLB on one layer.
pub fn rebalance_layer(w: &[f64], topo: &Topology, out: &mut LayerOut<'_>) {
    rebalance_layer_with(w, topo, out, &mut Scratch::default())
}

/// EPLB on one layer with reusable buffers.
pub fn rebalance_layer_with(w: &[f64], topo: &Topology, out: &mut LayerOut<'_>, sc: &mut Scratch) {
    let (groups, nodes) = topo.effective();
    let mut mlog2log = std::mem::take(&mut sc.mlog2log);
    let mut wn = std::mem::take(&mut sc.wn);
    groups_to_nodes_with(w, groups, nodes, &mut mlog2log, sc);
    let epn = topo.num_experts / nodes;
    let spn = topo.num_replicas / nodes;
    let gpus = topo.num_gpus / nodes;
    let mut phy = vec![0usize; spn];
    let mut rank = vec![0usize; spn];
    let mut cnt = vec![0usize; epn];
    for node in 0..nodes {
        let experts = &mlog2log[node * epn..(node + 1) * epn];
        wn.clear();
        wn.extend(experts.iter().map(|&e| w[e]));
        place_node_with(&wn, gpus, &mut phy, &mut rank, &mut cnt, sc);
        for s in 0..spn {
            out.phy2log[node * spn + s] = experts[phy[s]] as i64;
            out.phyrank[node * spn + s] = rank[s] as i64;
        }
        for (i, &e) in experts.iter().enumerate() {
            out.logcnt[e] = cnt[i] as i64;
        }
    }
    sc.mlog2log = mlog2log;
    sc.wn = wn;
}

#[cfg(test)]
mod tests {
    use super::super::{rebalance_experts, Mode, Topology};
    use super::*;

    /// The example of EPLB's README: 2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes,
    /// 8 GPUs, and the `phy2log` it prints.
    #[test]
    fn readme_example() {
        let weight: Vec<f64> = [
            90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86, 20, 107, 104, 64, 19, 197, 187, 157,
            172, 86, 16, 27,
        ]
        .iter()
        .map(|&x| x as f64)
        .collect();
        let topo = Topology::new(12, 16, 4, 2, 8).unwrap();
        let p = rebalance_experts(&weight, 2, &topo, Mode::Eplb).unwrap();
        let expect: Vec<i64> = vec![
            5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1, //
            7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1,
        ];
        assert_eq!(p.phy2log, expect);
        // logcnt agrees with phy2log; log2phy lists each expert's slots.
        for l in 0..2 {
            for e in 0..12 {
                let n = expect[l * 16..(l + 1) * 16]
                    .iter()
                    .filter(|&&x| x == e as i64)
                    .count();
                assert_eq!(p.logcnt[l * 12 + e], n as i64);
            }
        }
        let x = p.max_replicas();
        let l2p = p.log2phy();
        for l in 0..2 {
            for e in 0..12 {
                for r in 0..x {
                    let s = l2p[(l * 12 + e) * x + r];
                    if (r as i64) < p.logcnt[l * 12 + e] {
                        assert_eq!(p.phy2log[l * 16 + s as usize], e as i64);
                    } else {
                        assert_eq!(s, -1);
                    }
                }
            }
        }
    }

    #[test]
    fn packing_fills_packs_evenly() {
        let w = [5.0, 1.0, 4.0, 2.0, 3.0, 3.5];
        let mut pack = [0; 6];
        let mut rank = [0; 6];
        balanced_packing_with(&w, 2, &mut pack, &mut rank, &mut Scratch::default());
        // 5 -> p0, 4 -> p1, 3.5 -> p1 (4 < 5), 3 -> p0, then p1 (7.5) vs p0 (8): 2 -> p1 full,
        // 1 -> p0.
        assert_eq!(pack, [0, 0, 1, 1, 0, 1]);
        let mut seen = [[false; 3]; 2];
        for i in 0..6 {
            assert!(!seen[pack[i]][rank[i]]);
            seen[pack[i]][rank[i]] = true;
        }
    }

    #[test]
    fn replication_minimises_the_largest_replica_load() {
        let w = [10.0, 1.0, 6.0];
        let mut phy = [0; 6];
        let mut rank = [0; 6];
        let mut cnt = [0; 3];
        replicate(&w, &mut phy, &mut rank, &mut cnt);
        // 10 -> 5, 6 -> 3, 5 vs 6: 6 splits -> 3 ... greedy: e0(10), e2(6), e0(5)
        assert_eq!(phy, [0, 1, 2, 0, 2, 0]);
        assert_eq!(rank, [0, 0, 0, 1, 1, 2]);
        assert_eq!(cnt, [3, 1, 2]);
        assert!((min_max_replica_load(&w, 6) - 10.0 / 3.0).abs() < 1e-12);
    }
}
