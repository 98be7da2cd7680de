//! `mode="refine"`: EPLB's placement improved by local search, never worse on the busiest device.
//!
//! It starts from exactly EPLB's placement of the layer and accepts only moves that lower the
//! load of the busiest device of a node (or of the whole layer), under EPLB's constraints (every
//! device the same number of slots; in the hierarchical policy each node keeps whole groups and
//! all replicas of its experts):
//!
//! 1. **swap**: exchange two replicas between the busiest device and another one when both
//!    end up below the busiest device's load (the best such exchange first);
//! 2. **re-replication**: give one replica of a cheap expert (one with several replicas) to an
//!    expert on the busiest device, then swap again (joint replication and packing);
//! 3. **group swap** (hierarchical): exchange a group of the busiest node with a lighter group
//!    of another node when both nodes then place below the old maximum.
//!
//! Each accepted move strictly lowers the maximum or the number of devices at it, so the search
//! ends; iteration caps bound its time. Everything is sequential inside a layer, so the result is
//! a pure function of the loads.

use super::eplb::{self, LayerOut};
use super::Topology;

/// Relative tolerance under which a move counts as no improvement.
const TOL: f64 = 1e-12;

/// One node's (or the whole layer's, in the global policy) replication and packing.
#[derive(Clone, Debug)]
struct NodeSol {
    /// Logical ids of the node's experts (node-local index -> logical id).
    experts: Vec<usize>,
    /// Load of each node-local expert.
    w: Vec<f64>,
    /// Replicas of each node-local expert.
    cnt: Vec<usize>,
    /// Node-local expert of each slot, GPU-major.
    slots: Vec<usize>,
    /// Load of each GPU.
    loads: Vec<f64>,
    per_gpu: usize,
}

impl NodeSol {
    fn from_eplb(experts: Vec<usize>, layer_w: &[f64], num_slots: usize, gpus: usize) -> Self {
        let w: Vec<f64> = experts.iter().map(|&e| layer_w[e]).collect();
        let (slots, _, cnt) = eplb::place_node(&w, num_slots, gpus);
        let mut s = Self {
            experts,
            w,
            cnt,
            slots,
            loads: vec![0.0; gpus],
            per_gpu: num_slots / gpus,
        };
        s.recompute_all();
        s
    }

    #[inline]
    fn replica_load(&self, slot: usize) -> f64 {
        let e = self.slots[slot];
        self.w[e] / self.cnt[e] as f64
    }

    fn recompute(&mut self, g: usize) {
        let mut acc = 0.0;
        for s in g * self.per_gpu..(g + 1) * self.per_gpu {
            acc += self.replica_load(s);
        }
        self.loads[g] = acc;
    }

    fn recompute_all(&mut self) {
        for g in 0..self.loads.len() {
            self.recompute(g);
        }
    }

    /// (busiest GPU, its load); the lower index on ties.
    fn busiest(&self) -> (usize, f64) {
        let mut best = (0, f64::NEG_INFINITY);
        for (g, &l) in self.loads.iter().enumerate() {
            if l > best.1 {
                best = (g, l);
            }
        }
        best
    }

    fn max_load(&self) -> f64 {
        self.busiest().1
    }

    /// Pairwise swaps out of the busiest GPU while one helps.
    fn swap_search(&mut self) {
        let gpus = self.loads.len();
        if gpus < 2 {
            return;
        }
        let pg = self.per_gpu;
        let cap = 64 * gpus + 64;
        for _ in 0..cap {
            let (a, la) = self.busiest();
            let limit = la - TOL * la.abs();
            // (resulting pair max, b, slot in a, slot in b)
            let mut best: Option<(f64, usize, usize, usize)> = None;
            for b in 0..gpus {
                let lb = self.loads[b];
                if b == a || lb >= limit {
                    continue;
                }
                for sa in a * pg..(a + 1) * pg {
                    let pa = self.replica_load(sa);
                    for sb in b * pg..(b + 1) * pg {
                        let d = pa - self.replica_load(sb);
                        if d <= 0.0 {
                            continue;
                        }
                        let cand = (la - d).max(lb + d);
                        if cand < limit && best.is_none_or(|(c, ..)| cand < c) {
                            best = Some((cand, b, sa, sb));
                        }
                    }
                }
            }
            let Some((_, b, sa, sb)) = best else { break };
            self.slots.swap(sa, sb);
            self.recompute(a);
            self.recompute(b);
        }
    }

    /// Moves one replica of a cheap expert to an expert of the busiest GPU while that helps.
    fn rereplicate(&mut self) {
        let n = self.w.len();
        let pg = self.per_gpu;
        for _ in 0..16 {
            let (a, la) = self.busiest();
            let limit = la - TOL * la.abs();
            // Receivers: distinct experts on the busiest GPU, largest per-replica load first.
            let mut recv: Vec<usize> = (a * pg..(a + 1) * pg).map(|s| self.slots[s]).collect();
            recv.sort_unstable();
            recv.dedup();
            recv.sort_by(|&x, &y| {
                let (px, py) = (
                    self.w[x] / self.cnt[x] as f64,
                    self.w[y] / self.cnt[y] as f64,
                );
                py.partial_cmp(&px)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(x.cmp(&y))
            });
            recv.truncate(2);
            // Donors: experts with spare replicas, smallest load per replica after giving one.
            let mut donors: Vec<usize> = (0..n).filter(|&e| self.cnt[e] >= 2).collect();
            donors.sort_by(|&x, &y| {
                let (px, py) = (
                    self.w[x] / (self.cnt[x] - 1) as f64,
                    self.w[y] / (self.cnt[y] - 1) as f64,
                );
                px.partial_cmp(&py)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(x.cmp(&y))
            });
            let mut best: Option<NodeSol> = None;
            for &r in &recv {
                for &d in donors.iter().filter(|&&d| d != r).take(3) {
                    // The donor's replica on its least loaded GPU becomes a replica of r.
                    let slot = (0..self.slots.len())
                        .filter(|&s| self.slots[s] == d)
                        .min_by(|&x, &y| {
                            self.loads[x / pg]
                                .partial_cmp(&self.loads[y / pg])
                                .unwrap_or(std::cmp::Ordering::Equal)
                                .then(x.cmp(&y))
                        })
                        .expect("a donor has replicas");
                    let mut t = self.clone();
                    t.slots[slot] = r;
                    t.cnt[r] += 1;
                    t.cnt[d] -= 1;
                    t.recompute_all();
                    t.swap_search();
                    let m = t.max_load();
                    let bar = best.as_ref().map_or(limit, |b| b.max_load());
                    if m < bar {
                        best = Some(t);
                    }
                }
            }
            match best {
                Some(t) => *self = t,
                None => break,
            }
        }
    }

    fn improve(&mut self) {
        self.swap_search();
        self.rereplicate();
    }
}

/// Device loads of a written layer placement (slot order sums), for the final safety check.
fn device_max(w: &[f64], phy2log: &[i64], logcnt: &[i64], gpus: usize) -> f64 {
    let pg = phy2log.len() / gpus;
    (0..gpus)
        .map(|g| {
            phy2log[g * pg..(g + 1) * pg]
                .iter()
                .fold(0.0, |a, &e| a + w[e as usize] / logcnt[e as usize] as f64)
        })
        .fold(f64::NEG_INFINITY, f64::max)
}

/// Refined placement of one layer (see the module documentation).
pub fn rebalance_layer(w: &[f64], topo: &Topology, out: &mut LayerOut<'_>) {
    let (groups, nodes) = topo.effective();
    let e_n = topo.num_experts;
    let gs = e_n / groups;
    let epn = e_n / nodes;
    let spn = topo.num_replicas / nodes;
    let gpus = topo.num_gpus / nodes;

    let mlog2log = eplb::groups_to_nodes(w, groups, nodes);
    let mut node_experts: Vec<Vec<usize>> = (0..nodes)
        .map(|n| mlog2log[n * epn..(n + 1) * epn].to_vec())
        .collect();
    let mut sols: Vec<NodeSol> = node_experts
        .iter()
        .map(|ex| {
            let mut s = NodeSol::from_eplb(ex.clone(), w, spn, gpus);
            s.improve();
            s
        })
        .collect();

    if nodes > 1 {
        let group_load = |g: usize| w[g * gs..(g + 1) * gs].iter().fold(0.0, |a, &x| a + x);
        let groups_of =
            |ex: &Vec<usize>| -> Vec<usize> { ex.chunks(gs).map(|c| c[0] / gs).collect() };
        for _ in 0..4 * nodes {
            let (a, va) = sols
                .iter()
                .enumerate()
                .map(|(i, s)| (i, s.max_load()))
                .fold(
                    (0, f64::NEG_INFINITY),
                    |acc, x| if x.1 > acc.1 { x } else { acc },
                );
            let limit = va - TOL * va.abs();
            let mut ga_list = groups_of(&node_experts[a]);
            ga_list.sort_by(|&x, &y| {
                group_load(y)
                    .partial_cmp(&group_load(x))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(x.cmp(&y))
            });
            ga_list.truncate(4);
            let mut best: Option<(f64, usize, NodeSol, NodeSol)> = None;
            for b in (0..nodes).filter(|&b| b != a) {
                let mut gb_list = groups_of(&node_experts[b]);
                gb_list.sort_by(|&x, &y| {
                    group_load(x)
                        .partial_cmp(&group_load(y))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(x.cmp(&y))
                });
                gb_list.truncate(4);
                for &ga in &ga_list {
                    for &gb in &gb_list {
                        if group_load(gb) >= group_load(ga) {
                            continue;
                        }
                        let swap = |ex: &Vec<usize>, from: usize, to: usize| -> Vec<usize> {
                            ex.iter()
                                .map(|&e| if e / gs == from { to * gs + e % gs } else { e })
                                .collect()
                        };
                        let mut sa =
                            NodeSol::from_eplb(swap(&node_experts[a], ga, gb), w, spn, gpus);
                        sa.swap_search();
                        let mut sb =
                            NodeSol::from_eplb(swap(&node_experts[b], gb, ga), w, spn, gpus);
                        sb.swap_search();
                        let cand = sa.max_load().max(sb.max_load());
                        let bar = best.as_ref().map_or(limit, |x| x.0);
                        if cand < bar {
                            best = Some((cand, b, sa, sb));
                        }
                    }
                }
            }
            let Some((_, b, mut sa, mut sb)) = best else {
                break;
            };
            sa.rereplicate();
            sb.rereplicate();
            node_experts[a] = sa.experts.clone();
            node_experts[b] = sb.experts.clone();
            sols[a] = sa;
            sols[b] = sb;
        }
    }

    // Write: node-major slots, replica ranks in ascending slot order.
    let mut next_rank = vec![0i64; e_n];
    for (n, sol) in sols.iter().enumerate() {
        for (s, &le) in sol.slots.iter().enumerate() {
            let e = sol.experts[le];
            out.phy2log[n * spn + s] = e as i64;
            out.phyrank[n * spn + s] = next_rank[e];
            next_rank[e] += 1;
        }
    }
    out.logcnt.copy_from_slice(&next_rank);

    // Safety net: never return something worse than EPLB.
    let mine = device_max(w, out.phy2log, out.logcnt, topo.num_gpus);
    let mut p2l = vec![0i64; topo.num_replicas];
    let mut rank = vec![0i64; topo.num_replicas];
    let mut cnt = vec![0i64; e_n];
    eplb::rebalance_layer(
        w,
        topo,
        &mut LayerOut {
            phy2log: &mut p2l,
            phyrank: &mut rank,
            logcnt: &mut cnt,
        },
    );
    if device_max(w, &p2l, &cnt, topo.num_gpus) < mine {
        out.phy2log.copy_from_slice(&p2l);
        out.phyrank.copy_from_slice(&rank);
        out.logcnt.copy_from_slice(&cnt);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{lower_bound_ratio, rebalance_experts, Mode, Topology};

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64) / ((1u64 << 53) as f64)
    }

    fn max_mean(w: &[f64], p2l: &[i64], cnt: &[i64], gpus: usize) -> f64 {
        let pg = p2l.len() / gpus;
        let loads: Vec<f64> = (0..gpus)
            .map(|g| {
                p2l[g * pg..(g + 1) * pg]
                    .iter()
                    .map(|&e| w[e as usize] / cnt[e as usize] as f64)
                    .sum()
            })
            .collect();
        loads.iter().cloned().fold(0.0, f64::max) * gpus as f64 / loads.iter().sum::<f64>()
    }

    #[test]
    fn refine_is_never_worse_and_respects_constraints() {
        let mut seed = 7u64;
        for &(e_n, r_n, g_n, n_n, m_n) in &[
            (64usize, 80usize, 8usize, 4usize, 16usize),
            (64, 72, 4, 3, 6),
            (32, 32, 4, 2, 8),
            (48, 64, 48, 4, 16),
        ] {
            let topo = Topology::new(e_n, r_n, g_n, n_n, m_n).unwrap();
            let layers = 6;
            // Zipf-like loads with noise.
            let w: Vec<f64> = (0..layers * e_n)
                .map(|i| 1000.0 / (1.0 + (i % e_n) as f64).powf(1.1) * (0.5 + lcg(&mut seed)))
                .collect();
            let a = rebalance_experts(&w, layers, &topo, Mode::Eplb).unwrap();
            let b = rebalance_experts(&w, layers, &topo, Mode::Refine).unwrap();
            for l in 0..layers {
                let wl = &w[l * e_n..(l + 1) * e_n];
                let pa = &a.phy2log[l * r_n..(l + 1) * r_n];
                let pb = &b.phy2log[l * r_n..(l + 1) * r_n];
                let ca = &a.logcnt[l * e_n..(l + 1) * e_n];
                let cb = &b.logcnt[l * e_n..(l + 1) * e_n];
                let (ma, mb) = (max_mean(wl, pa, ca, m_n), max_mean(wl, pb, cb, m_n));
                assert!(mb <= ma * (1.0 + 1e-12), "refine {mb} > eplb {ma}");
                assert!(mb >= lower_bound_ratio(wl, r_n, m_n) * (1.0 - 1e-9));
                // counts agree, whole groups per node in hierarchical mode
                for (e, &c) in cb.iter().enumerate() {
                    assert_eq!(pb.iter().filter(|&&x| x == e as i64).count() as i64, c);
                    assert!(c >= 1);
                }
                if topo.hierarchical() {
                    let spn = r_n / n_n;
                    let gs = e_n / g_n;
                    let mut node_of_group = vec![usize::MAX; g_n];
                    for (s, &e) in pb.iter().enumerate() {
                        let g = e as usize / gs;
                        let n = s / spn;
                        assert!(node_of_group[g] == usize::MAX || node_of_group[g] == n);
                        node_of_group[g] = n;
                    }
                }
            }
        }
    }
}
