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
//! [`improve_layer`] runs moves 1 and 2 from a given placement (incremental rebalancing), counting
//! changed slots against an optional budget.
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
    /// Load of the replica in each slot (`w / cnt` of its expert).
    item: Vec<f64>,
    /// Load of each GPU.
    loads: Vec<f64>,
    per_gpu: usize,
    /// With a move budget: the starting slots, the budget, and the slots changed so far.
    budget: Option<(Vec<usize>, usize)>,
    changed: usize,
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
            item: vec![0.0; num_slots],
            loads: vec![0.0; gpus],
            per_gpu: num_slots / gpus,
            budget: None,
            changed: 0,
        };
        s.recompute_all();
        s
    }

    /// A node's current placement: `slots` holds logical ids (all replicas of these experts are
    /// here); `max_moves` bounds the slots that may change.
    fn from_current(slots: &[i64], layer_w: &[f64], gpus: usize, max_moves: Option<usize>) -> Self {
        let mut experts: Vec<usize> = slots.iter().map(|&e| e as usize).collect();
        experts.sort_unstable();
        experts.dedup();
        let local = |e: usize| experts.binary_search(&e).expect("listed above");
        let local_slots: Vec<usize> = slots.iter().map(|&e| local(e as usize)).collect();
        let mut cnt = vec![0usize; experts.len()];
        for &l in &local_slots {
            cnt[l] += 1;
        }
        let w: Vec<f64> = experts.iter().map(|&e| layer_w[e]).collect();
        let mut s = Self {
            experts,
            w,
            cnt,
            budget: max_moves.map(|m| (local_slots.clone(), m)),
            slots: local_slots,
            item: vec![0.0; slots.len()],
            loads: vec![0.0; gpus],
            per_gpu: slots.len() / gpus,
            changed: 0,
        };
        s.recompute_all();
        s
    }

    /// The change of `changed` if `slot` held `e`.
    #[inline]
    fn delta(&self, slot: usize, e: usize) -> isize {
        match &self.budget {
            None => 0,
            Some((orig, _)) => {
                isize::from(e != orig[slot]) - isize::from(self.slots[slot] != orig[slot])
            }
        }
    }

    #[inline]
    fn within_budget(&self, delta: isize) -> bool {
        match &self.budget {
            None => true,
            Some((_, max)) => self.changed as isize + delta <= *max as isize,
        }
    }

    fn recompute(&mut self, g: usize) {
        let pg = self.per_gpu;
        self.loads[g] = self.item[g * pg..(g + 1) * pg]
            .iter()
            .fold(0.0, |a, &x| a + x);
    }

    /// Recomputes the replica loads (after a change of counts) and the GPU loads.
    fn recompute_all(&mut self) {
        for (it, &e) in self.item.iter_mut().zip(&self.slots) {
            *it = self.w[e] / self.cnt[e] as f64;
        }
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

    /// Pairwise swaps out of the busiest GPU while one helps: the swap that leaves the lower
    /// maximum of the pair (the first such on ties).
    fn swap_search(&mut self) {
        self.swap_search_capped(64 * self.loads.len() + 64);
    }

    /// [`Self::swap_search`] with at most `cap` swaps.
    fn swap_search_capped(&mut self, cap: usize) {
        let gpus = self.loads.len();
        if gpus < 2 {
            return;
        }
        let pg = self.per_gpu;
        let mut mine = vec![0.0f64; pg];
        for _ in 0..cap {
            let (a, la) = self.busiest();
            let limit = la - TOL * la.abs();
            mine.copy_from_slice(&self.item[a * pg..(a + 1) * pg]);
            // (resulting pair max, b, slot in a, slot in b)
            let mut bar = limit;
            let mut best: Option<(usize, usize, usize)> = None;
            for b in 0..gpus {
                let lb = self.loads[b];
                // A swap leaves the pair's max at (la + lb) / 2 or more.
                if b == a || lb >= limit || 0.5 * (la + lb) >= bar {
                    continue;
                }
                let theirs = &self.item[b * pg..(b + 1) * pg];
                for (x, &pa) in mine.iter().enumerate() {
                    for (y, &pb) in theirs.iter().enumerate() {
                        let d = pa - pb;
                        if d <= 0.0 {
                            continue;
                        }
                        let cand = (la - d).max(lb + d);
                        if cand < bar {
                            let (sa, sb) = (a * pg + x, b * pg + y);
                            if self.budget.is_some() {
                                let dl =
                                    self.delta(sa, self.slots[sb]) + self.delta(sb, self.slots[sa]);
                                if !self.within_budget(dl) {
                                    continue;
                                }
                            }
                            bar = cand;
                            best = Some((b, sa, sb));
                        }
                    }
                }
            }
            let Some((b, sa, sb)) = best else { break };
            let dl = self.delta(sa, self.slots[sb]) + self.delta(sb, self.slots[sa]);
            self.changed = (self.changed as isize + dl) as usize;
            self.slots.swap(sa, sb);
            self.item.swap(sa, sb);
            self.recompute(a);
            self.recompute(b);
        }
    }

    /// The trial of turning `slot` (a replica of `d`) into a replica of `r`, screened with a
    /// few swaps.
    fn trial(&self, slot: usize, r: usize) -> Option<NodeSol> {
        let dl = self.delta(slot, r);
        if !self.within_budget(dl) {
            return None;
        }
        let d = self.slots[slot];
        let mut t = self.clone();
        t.changed = (t.changed as isize + dl) as usize;
        t.slots[slot] = r;
        t.cnt[r] += 1;
        t.cnt[d] -= 1;
        t.recompute_all();
        t.swap_search_capped(2 * self.loads.len() + 8);
        Some(t)
    }

    /// Changes replica counts while that lowers the busiest GPU: (A) a replica of a cheap expert
    /// becomes one of an expert on the busiest GPU; (B) a replica on the busiest GPU of an expert
    /// with several replicas becomes one of a light expert. The best screened trial is kept.
    fn rereplicate(&mut self) {
        let n = self.w.len();
        let pg = self.per_gpu;
        let by = |key: &dyn Fn(usize) -> f64, v: &mut Vec<usize>| {
            v.sort_by(|&x, &y| {
                key(x)
                    .partial_cmp(&key(y))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(x.cmp(&y))
            })
        };
        for _ in 0..16 {
            let (a, la) = self.busiest();
            let limit = la - TOL * la.abs();
            let per = |e: usize| self.w[e] / self.cnt[e] as f64;
            let mut on_a: Vec<usize> = (a * pg..(a + 1) * pg).map(|s| self.slots[s]).collect();
            on_a.sort_unstable();
            on_a.dedup();
            by(&|e| -per(e), &mut on_a);
            let mut trials: Vec<(usize, usize)> = Vec::new();
            // (A) receivers on the busiest GPU, donors whose replicas are cheapest to lose.
            let mut donors: Vec<usize> = (0..n).filter(|&e| self.cnt[e] >= 2).collect();
            by(&|e| self.w[e] / (self.cnt[e] - 1) as f64, &mut donors);
            for &r in on_a.iter().take(2) {
                for &d in donors.iter().filter(|&&d| d != r).take(3) {
                    // the donor's replica on its least loaded GPU
                    let slot = (0..self.slots.len())
                        .filter(|&s| self.slots[s] == d)
                        .min_by(|&x, &y| {
                            self.loads[x / pg]
                                .partial_cmp(&self.loads[y / pg])
                                .unwrap_or(std::cmp::Ordering::Equal)
                                .then(x.cmp(&y))
                        })
                        .expect("a donor has replicas");
                    trials.push((slot, r));
                }
            }
            // (B) a replicated expert's slot on the busiest GPU goes to a light expert.
            let mut light: Vec<usize> = (0..n).collect();
            by(&|e| self.w[e] / (self.cnt[e] + 1) as f64, &mut light);
            for &d in on_a.iter().filter(|&&d| self.cnt[d] >= 2).take(2) {
                let slot = (a * pg..(a + 1) * pg)
                    .find(|&s| self.slots[s] == d)
                    .expect("d is on the busiest GPU");
                for &r in light.iter().filter(|&&r| r != d).take(3) {
                    trials.push((slot, r));
                }
            }
            let mut best: Option<NodeSol> = None;
            for (slot, r) in trials {
                let Some(t) = self.trial(slot, r) else {
                    continue;
                };
                if t.max_load() < best.as_ref().map_or(limit, |b| b.max_load()) {
                    best = Some(t);
                }
            }
            match best {
                Some(mut t) => {
                    t.swap_search();
                    *self = t;
                }
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

/// Pairwise swaps of groups between the heaviest node and another while they lower the heaviest
/// node's total load. `nodes[n]` lists the groups of node `n`.
fn balance_group_sums(group_w: &[f64], nodes: &mut [Vec<usize>]) {
    let sum = |gs: &Vec<usize>| gs.iter().fold(0.0, |a, &g| a + group_w[g]);
    for _ in 0..64 * nodes.len() {
        let loads: Vec<f64> = nodes.iter().map(sum).collect();
        let a = (0..loads.len()).fold(0, |b, i| if loads[i] > loads[b] { i } else { b });
        let la = loads[a];
        let limit = la - TOL * la.abs();
        let mut best: Option<(f64, usize, usize, usize)> = None;
        for b in (0..nodes.len()).filter(|&b| b != a) {
            for (ia, &ga) in nodes[a].iter().enumerate() {
                for (ib, &gb) in nodes[b].iter().enumerate() {
                    let d = group_w[ga] - group_w[gb];
                    if d <= 0.0 {
                        continue;
                    }
                    let cand = (la - d).max(loads[b] + d);
                    if cand < limit && best.is_none_or(|(c, ..)| cand < c) {
                        best = Some((cand, b, ia, ib));
                    }
                }
            }
        }
        let Some((_, b, ia, ib)) = best else { break };
        let ga = nodes[a][ia];
        nodes[a][ia] = nodes[b][ib];
        nodes[b][ib] = ga;
    }
}

/// Node-local expert lists (whole groups, ascending) of a group partition.
fn experts_of(groups: &[usize], gs: usize) -> Vec<usize> {
    let mut g = groups.to_vec();
    g.sort_unstable();
    g.iter().flat_map(|&g| g * gs..(g + 1) * gs).collect()
}

fn layer_max(sols: &[NodeSol]) -> (usize, f64) {
    sols.iter()
        .enumerate()
        .map(|(i, s)| (i, s.max_load()))
        .fold(
            (0, f64::NEG_INFINITY),
            |acc, x| if x.1 > acc.1 { x } else { acc },
        )
}

/// Refined placement of one layer (see the module documentation).
pub fn rebalance_layer(w: &[f64], topo: &Topology, out: &mut LayerOut<'_>) {
    let (groups, nodes) = topo.effective();
    let e_n = topo.num_experts;
    let gs = e_n / groups;
    let epn = e_n / nodes;
    let spn = topo.num_replicas / nodes;
    let gpus = topo.num_gpus / nodes;

    let solve = |node_experts: &[Vec<usize>]| -> Vec<NodeSol> {
        node_experts
            .iter()
            .map(|ex| {
                let mut s = NodeSol::from_eplb(ex.clone(), w, spn, gpus);
                s.improve();
                s
            })
            .collect()
    };
    // Start 1: EPLB's groups-to-nodes packing.
    let mlog2log = eplb::groups_to_nodes(w, groups, nodes);
    let eplb_nodes: Vec<Vec<usize>> = (0..nodes)
        .map(|n| mlog2log[n * epn..(n + 1) * epn].to_vec())
        .collect();
    let mut sols = solve(&eplb_nodes);

    if nodes > 1 {
        let group_w: Vec<f64> = (0..groups)
            .map(|g| w[g * gs..(g + 1) * gs].iter().fold(0.0, |a, &x| a + x))
            .collect();
        let groups_of = |ex: &[usize]| -> Vec<usize> { ex.chunks(gs).map(|c| c[0] / gs).collect() };
        // Start 2: the group partition with the lighter heaviest node (swap search on sums).
        let mut part: Vec<Vec<usize>> = eplb_nodes.iter().map(|ex| groups_of(ex)).collect();
        balance_group_sums(&group_w, &mut part);
        let part_nodes: Vec<Vec<usize>> = part.iter().map(|g| experts_of(g, gs)).collect();
        if part_nodes
            .iter()
            .zip(&eplb_nodes)
            .any(|(a, b)| experts_of(&groups_of(a), gs) != experts_of(&groups_of(b), gs))
        {
            let other = solve(&part_nodes);
            if layer_max(&other).1 < layer_max(&sols).1 {
                sols = other;
            }
        }
        // Polish: swap a group of the busiest node with a lighter one of another node when both
        // nodes then place below the old maximum. A node's busiest device carries at least the
        // node's mean, which prunes most candidates without solving them.
        for _ in 0..4 * nodes {
            let (a, va) = layer_max(&sols);
            let limit = va - TOL * va.abs();
            let ga_list = groups_of(&sols[a].experts);
            let sum_a: f64 = ga_list.iter().map(|&g| group_w[g]).sum();
            let mut best: Option<(f64, usize, NodeSol, NodeSol)> = None;
            for b in (0..nodes).filter(|&b| b != a) {
                let gb_list = groups_of(&sols[b].experts);
                let sum_b: f64 = gb_list.iter().map(|&g| group_w[g]).sum();
                for &ga in &ga_list {
                    for &gb in &gb_list {
                        let d = group_w[ga] - group_w[gb];
                        if d <= 0.0 || (sum_a - d).max(sum_b + d) / gpus as f64 >= limit {
                            continue;
                        }
                        let swap = |gl: &[usize], from: usize, to: usize| -> Vec<usize> {
                            let v: Vec<usize> =
                                gl.iter().map(|&g| if g == from { to } else { g }).collect();
                            experts_of(&v, gs)
                        };
                        let mut sa = NodeSol::from_eplb(swap(&ga_list, ga, gb), w, spn, gpus);
                        sa.swap_search();
                        if sa.max_load() >= best.as_ref().map_or(limit, |x| x.0) {
                            continue;
                        }
                        let mut sb = NodeSol::from_eplb(swap(&gb_list, gb, ga), w, spn, gpus);
                        sb.swap_search();
                        let cand = sa.max_load().max(sb.max_load());
                        if cand < best.as_ref().map_or(limit, |x| x.0) {
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

/// Improves one layer's `current` placement in place (`keep_nodes`: every expert's replicas stay
/// in their node): the same improving moves as [`rebalance_layer`] from `current` instead of
/// EPLB's placement, changing at most `max_moves` slots. Never busier than `current`.
pub fn improve_layer(
    w: &[f64],
    current: &[i64],
    num_gpus: usize,
    num_nodes: usize,
    keep_nodes: bool,
    max_moves: Option<usize>,
    out: &mut LayerOut<'_>,
) {
    let nodes = if keep_nodes { num_nodes } else { 1 };
    let spn = current.len() / nodes;
    let gpus = num_gpus / nodes;
    let mut sols: Vec<NodeSol> = (0..nodes)
        .map(|n| NodeSol::from_current(&current[n * spn..(n + 1) * spn], w, gpus, None))
        .collect();
    // Busiest node first, each with what is left of the budget.
    let mut order: Vec<usize> = (0..nodes).collect();
    order.sort_by(|&a, &b| {
        sols[b]
            .max_load()
            .partial_cmp(&sols[a].max_load())
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut left = max_moves;
    for n in order {
        let mut sol = NodeSol::from_current(&current[n * spn..(n + 1) * spn], w, gpus, left);
        sol.improve();
        if let Some(l) = left.as_mut() {
            *l -= sol.changed.min(*l);
        }
        sols[n] = sol;
    }
    let mut next_rank = vec![0i64; w.len()];
    for (n, sol) in sols.iter().enumerate() {
        for (s, &le) in sol.slots.iter().enumerate() {
            let e = sol.experts[le];
            out.phy2log[n * spn + s] = e as i64;
            out.phyrank[n * spn + s] = next_rank[e];
            next_rank[e] += 1;
        }
    }
    out.logcnt.copy_from_slice(&next_rank);
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
