//! Migration from one placement to another: slot matching, the transfer list, its time on a
//! link model, and the decision whether the move pays for itself.
//!
//! **Matching.** A placement's devices are interchangeable (each has the same number of slots),
//! and so are the slots of one device. Before planning, the new placement's devices are
//! renumbered to keep as many experts where they already are as possible: an assignment problem
//! (Hungarian algorithm, exact) on the number of experts two devices share. With `keep_nodes`
//! (EPLB's hierarchical policy, where each node owns whole groups) nodes are matched first and
//! devices only inside a node. Inside a device an expert that stays keeps its slot.
//!
//! **Transfers.** Each slot of the matched placement that does not already hold its expert gets
//! it from the same device when that device held it (a local copy), else from a device that held
//! it: one in the same node if any, the one with the fewest sends so far, the lowest rank.
//!
//! **Cost.** Per device: bytes sent and received inside the node and across nodes; the two links
//! work at once, each message costs a latency, local copies run at memory bandwidth. The
//! migration takes as long as its slowest device.
//!
//! **Decision.** A layer's experts take as long as its busiest device: the gain of a step is
//! `sum over layers (max device load now - max device load after) * seconds_per_token`; migrate
//! when `horizon_steps * gain > migration seconds + overhead`.

use rayon::prelude::*;

use super::stats::placement_metrics;
use super::{check_placement, Topology};
use crate::error::{ensure, Result};
use crate::util::pool;

/// One expert copy: into slot `dst_slot` of rank `dst_rank` from slot `src_slot` of `src_rank`
/// (the same rank for a local copy). Slots are local to the rank (`0 .. R / num_gpus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub layer: usize,
    pub expert: usize,
    pub src_rank: usize,
    pub src_slot: usize,
    pub dst_rank: usize,
    pub dst_slot: usize,
}

/// Bandwidths in bytes per second, latency in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkModel {
    pub gpus_per_node: usize,
    /// Per device, each direction, inside a node (NVLink / HCCS).
    pub intra_node_bw: f64,
    /// Per device, each direction, between nodes (the NIC).
    pub inter_node_bw: f64,
    /// Per message.
    pub latency: f64,
    /// Device memory copy bandwidth (local copies).
    pub local_bw: f64,
}

impl LinkModel {
    fn check(&self) -> Result<()> {
        for (v, name) in [
            (self.intra_node_bw, "intra_node_bw"),
            (self.inter_node_bw, "inter_node_bw"),
            (self.local_bw, "local_bw"),
        ] {
            ensure(v.is_finite() && v > 0.0, name, || {
                format!("must be finite and > 0, got {v}")
            })?;
        }
        ensure(
            self.latency.is_finite() && self.latency >= 0.0,
            "latency",
            || format!("must be finite and >= 0, got {}", self.latency),
        )?;
        ensure(self.gpus_per_node >= 1, "gpus_per_node", || {
            "must be >= 1".into()
        })
    }
}

/// The time of a transfer list and its volumes.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationCost {
    pub seconds: f64,
    pub intra_node_bytes: f64,
    pub inter_node_bytes: f64,
    pub local_bytes: f64,
    /// Per rank: (bytes sent, bytes received) over the network.
    pub per_rank: Vec<(f64, f64)>,
}

/// A migration plan: the matched new placement `phy2log [L, R]`, the transfers and their cost.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationPlan {
    pub phy2log: Vec<i64>,
    pub transfers: Vec<Transfer>,
    pub cost: MigrationCost,
}

/// Exact maximum-weight perfect matching on an `n x n` weight matrix (Hungarian algorithm,
/// O(n^3)). Returns `col[row]`.
pub fn max_weight_matching(n: usize, weight: &[i64]) -> Vec<usize> {
    debug_assert_eq!(weight.len(), n * n);
    if n == 0 {
        return Vec::new();
    }
    const INF: i64 = i64::MAX / 4;
    let cost = |i: usize, j: usize| -weight[(i - 1) * n + (j - 1)];
    let mut u = vec![0i64; n + 1];
    let mut v = vec![0i64; n + 1];
    let mut p = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![INF; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = INF;
            let mut j1 = 0usize;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost(i0, j) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut col = vec![0usize; n];
    for j in 1..=n {
        col[p[j] - 1] = j - 1;
    }
    col
}

/// Size of the intersection of two sorted multisets.
fn overlap(a: &[i64], b: &[i64]) -> i64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// Matches units (`new` to `old` positions) maximising shared experts; on equal sharing it keeps
/// a unit where it is.
fn match_units(old: &[Vec<i64>], new: &[Vec<i64>]) -> Vec<usize> {
    let n = old.len();
    let scale = n as i64 + 1;
    let mut w = vec![0i64; n * n];
    for i in 0..n {
        for j in 0..n {
            w[i * n + j] = overlap(&new[i], &old[j]) * scale + i64::from(i == j);
        }
    }
    max_weight_matching(n, &w)
}

fn sorted(v: &[i64]) -> Vec<i64> {
    let mut s = v.to_vec();
    s.sort_unstable();
    s
}

/// Renumbers the devices (and nodes, with `keep_nodes`) of one layer's `new` placement and
/// orders the slots of each device to keep experts where `old` has them.
pub fn match_layer(
    old: &[i64],
    new: &[i64],
    num_gpus: usize,
    num_nodes: usize,
    keep_nodes: bool,
) -> Vec<i64> {
    let r_n = old.len();
    let pg = r_n / num_gpus;
    let gpn = num_gpus / num_nodes;
    let gpu = |p: &[i64], g: usize| sorted(&p[g * pg..(g + 1) * pg]);
    // new device j goes to position gpu_pos[j].
    let mut gpu_pos = vec![0usize; num_gpus];
    if keep_nodes && num_nodes > 1 {
        let node = |p: &[i64], n: usize| sorted(&p[n * gpn * pg..(n + 1) * gpn * pg]);
        let old_nodes: Vec<Vec<i64>> = (0..num_nodes).map(|n| node(old, n)).collect();
        let new_nodes: Vec<Vec<i64>> = (0..num_nodes).map(|n| node(new, n)).collect();
        let node_pos = match_units(&old_nodes, &new_nodes);
        for (nj, &ni) in node_pos.iter().enumerate() {
            let old_g: Vec<Vec<i64>> = (0..gpn).map(|k| gpu(old, ni * gpn + k)).collect();
            let new_g: Vec<Vec<i64>> = (0..gpn).map(|k| gpu(new, nj * gpn + k)).collect();
            for (kj, ki) in match_units(&old_g, &new_g).into_iter().enumerate() {
                gpu_pos[nj * gpn + kj] = ni * gpn + ki;
            }
        }
    } else {
        let old_g: Vec<Vec<i64>> = (0..num_gpus).map(|g| gpu(old, g)).collect();
        let new_g: Vec<Vec<i64>> = (0..num_gpus).map(|g| gpu(new, g)).collect();
        gpu_pos = match_units(&old_g, &new_g);
    }
    let mut out = vec![-1i64; r_n];
    for (j, &pos) in gpu_pos.iter().enumerate() {
        let old_slots = &old[pos * pg..(pos + 1) * pg];
        let mut pending = sorted(&new[j * pg..(j + 1) * pg]);
        let dst = &mut out[pos * pg..(pos + 1) * pg];
        for (s, &e) in old_slots.iter().enumerate() {
            if let Some(k) = pending.iter().position(|&x| x == e) {
                dst[s] = e;
                pending.remove(k);
            }
        }
        let mut rest = pending.into_iter();
        for d in dst.iter_mut().filter(|d| **d < 0) {
            *d = rest.next().expect("as many experts as slots");
        }
    }
    out
}

/// The transfers that turn `old` into `new` (already matched), all layers.
pub fn transfers(
    old: &[i64],
    new: &[i64],
    layers: usize,
    num_replicas: usize,
    num_gpus: usize,
    num_nodes: usize,
) -> Vec<Transfer> {
    let pg = num_replicas / num_gpus;
    let gpn = num_gpus / num_nodes;
    let mut sends = vec![0usize; num_gpus];
    let mut out = Vec::new();
    for l in 0..layers {
        let o = &old[l * num_replicas..(l + 1) * num_replicas];
        let n = &new[l * num_replicas..(l + 1) * num_replicas];
        for s in 0..num_replicas {
            let e = n[s];
            if o[s] == e {
                continue;
            }
            let d = s / pg;
            let local = (d * pg..(d + 1) * pg).find(|&x| o[x] == e);
            let src = match local {
                Some(x) => x,
                None => {
                    let mut best: Option<(bool, usize, usize, usize)> = None;
                    for x in (0..num_replicas).filter(|&x| o[x] == e) {
                        let g = x / pg;
                        let key = (g / gpn != d / gpn, sends[g], g, x);
                        if best.is_none_or(|b| key < b) {
                            best = Some(key);
                        }
                    }
                    let (_, _, g, x) =
                        best.expect("every expert has a replica in the old placement");
                    sends[g] += 1;
                    x
                }
            };
            out.push(Transfer {
                layer: l,
                expert: e as usize,
                src_rank: src / pg,
                src_slot: src % pg,
                dst_rank: d,
                dst_slot: s % pg,
            });
        }
    }
    out
}

/// The time of `transfers` when an expert of layer `l` weighs `expert_bytes[l]`.
pub fn migration_cost(
    transfers: &[Transfer],
    expert_bytes: &[f64],
    num_gpus: usize,
    link: &LinkModel,
) -> Result<MigrationCost> {
    link.check()?;
    if let Some(b) = expert_bytes.iter().find(|b| !(b.is_finite() && **b >= 0.0)) {
        return Err(crate::error::invalid(
            "expert_bytes",
            format!("must be finite and >= 0, got {b}"),
        ));
    }
    let gpn = link.gpus_per_node;
    // Per rank: intra send/recv, inter send/recv, messages sent/recv, local bytes.
    let mut acc = vec![[0.0f64; 7]; num_gpus];
    let (mut intra, mut inter, mut local) = (0.0, 0.0, 0.0);
    for t in transfers {
        ensure(t.layer < expert_bytes.len(), "expert_bytes", || {
            format!("needs one value per layer; layer {} has none", t.layer)
        })?;
        ensure(
            t.src_rank < num_gpus && t.dst_rank < num_gpus,
            "transfers",
            || format!("rank outside [0, {num_gpus})"),
        )?;
        let b = expert_bytes[t.layer];
        if t.src_rank == t.dst_rank {
            acc[t.src_rank][6] += b;
            local += b;
        } else if t.src_rank / gpn == t.dst_rank / gpn {
            acc[t.src_rank][0] += b;
            acc[t.dst_rank][1] += b;
            acc[t.src_rank][4] += 1.0;
            acc[t.dst_rank][5] += 1.0;
            intra += b;
        } else {
            acc[t.src_rank][2] += b;
            acc[t.dst_rank][3] += b;
            acc[t.src_rank][4] += 1.0;
            acc[t.dst_rank][5] += 1.0;
            inter += b;
        }
    }
    let seconds = acc
        .iter()
        .map(|a| {
            (a[0].max(a[1]) / link.intra_node_bw).max(a[2].max(a[3]) / link.inter_node_bw)
                + link.latency * a[4].max(a[5])
                + a[6] / link.local_bw
        })
        .fold(0.0, f64::max);
    Ok(MigrationCost {
        seconds,
        intra_node_bytes: intra,
        inter_node_bytes: inter,
        local_bytes: local,
        per_rank: acc.iter().map(|a| (a[0] + a[2], a[1] + a[3])).collect(),
    })
}

/// Matches `new` to `old` layer by layer, lists the transfers and prices them.
#[allow(clippy::too_many_arguments)]
pub fn plan_migration(
    old: &[i64],
    new: &[i64],
    layers: usize,
    topo: &Topology,
    keep_nodes: bool,
    expert_bytes: &[f64],
    link: &LinkModel,
) -> Result<MigrationPlan> {
    check_placement(old, layers, topo, "old_phy2log")?;
    check_placement(new, layers, topo, "new_phy2log")?;
    ensure(expert_bytes.len() == layers, "expert_bytes", || {
        format!(
            "expected one value per layer ({layers}), got {}",
            expert_bytes.len()
        )
    })?;
    ensure(link.gpus_per_node == topo.gpus_per_node(), "link", || {
        format!(
            "gpus_per_node {} does not match num_gpus / num_nodes = {}",
            link.gpus_per_node,
            topo.gpus_per_node()
        )
    })?;
    let r_n = topo.num_replicas;
    let mut matched = vec![0i64; layers * r_n];
    if layers > 0 {
        pool::install(|| {
            matched
                .par_chunks_mut(r_n)
                .zip(old.par_chunks(r_n))
                .zip(new.par_chunks(r_n))
                .for_each(|((m, o), n)| {
                    m.copy_from_slice(&match_layer(
                        o,
                        n,
                        topo.num_gpus,
                        topo.num_nodes,
                        keep_nodes,
                    ))
                })
        });
    }
    let t = transfers(old, &matched, layers, r_n, topo.num_gpus, topo.num_nodes);
    let cost = migration_cost(&t, expert_bytes, topo.num_gpus, link)?;
    Ok(MigrationPlan {
        phy2log: matched,
        transfers: t,
        cost,
    })
}

/// The numbers behind a migrate-or-not decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub migrate: bool,
    /// Sum over layers of the busiest device's load (tokens), now and after.
    pub current_max_load: f64,
    pub new_max_load: f64,
    /// Seconds saved per step, and over the horizon.
    pub gain_per_step: f64,
    pub gain: f64,
    /// Migration seconds + overhead.
    pub cost: f64,
}

/// Decides whether moving from `current` to `new` pays off over `horizon_steps` steps with the
/// `predicted` loads `[layers, E]`.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    predicted: &[f64],
    layers: usize,
    current: &[i64],
    new: &[i64],
    topo: &Topology,
    seconds_per_token: f64,
    horizon_steps: f64,
    migration_seconds: f64,
    overhead_seconds: f64,
) -> Result<Decision> {
    for (v, name) in [
        (seconds_per_token, "seconds_per_token"),
        (horizon_steps, "horizon_steps"),
        (migration_seconds, "migration_seconds"),
        (overhead_seconds, "overhead_seconds"),
    ] {
        ensure(v.is_finite() && v >= 0.0, name, || {
            format!("must be finite and >= 0, got {v}")
        })?;
    }
    let busiest = |p: &[i64], name: &str| -> Result<f64> {
        check_placement(p, layers, topo, name)?;
        let m = placement_metrics(
            predicted,
            layers,
            topo.num_experts,
            p,
            topo.num_replicas,
            topo.num_gpus,
            topo.num_nodes,
            None,
        )?;
        Ok(m.iter()
            .map(|x| x.device_load.iter().cloned().fold(0.0, f64::max))
            .sum())
    };
    let current_max_load = busiest(current, "current_phy2log")?;
    let new_max_load = busiest(new, "new_phy2log")?;
    let gain_per_step = (current_max_load - new_max_load) * seconds_per_token;
    let gain = gain_per_step * horizon_steps;
    let cost = migration_seconds + overhead_seconds;
    Ok(Decision {
        migrate: gain > cost,
        current_max_load,
        new_max_load,
        gain_per_step,
        gain,
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force_best(n: usize, w: &[i64]) -> i64 {
        fn rec(i: usize, n: usize, w: &[i64], used: &mut Vec<bool>) -> i64 {
            if i == n {
                return 0;
            }
            let mut best = i64::MIN;
            for j in 0..n {
                if !used[j] {
                    used[j] = true;
                    best = best.max(w[i * n + j] + rec(i + 1, n, w, used));
                    used[j] = false;
                }
            }
            best
        }
        rec(0, n, w, &mut vec![false; n])
    }

    #[test]
    fn hungarian_is_optimal() {
        let mut seed = 1u64;
        for n in 1..=6 {
            for _ in 0..20 {
                let w: Vec<i64> = (0..n * n)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((seed >> 33) % 7) as i64
                    })
                    .collect();
                let col = max_weight_matching(n, &w);
                let mut seen = vec![false; n];
                for &c in &col {
                    assert!(!seen[c]);
                    seen[c] = true;
                }
                let got: i64 = (0..n).map(|i| w[i * n + col[i]]).sum();
                assert_eq!(got, brute_force_best(n, &w));
            }
        }
    }

    #[test]
    fn a_renumbered_placement_needs_no_transfer() {
        // 8 experts, 4 GPUs x 3 slots; new = old with GPUs and slots permuted.
        let old: Vec<i64> = vec![0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3];
        let new: Vec<i64> = vec![2, 1, 0, 7, 6, 0, 5, 4, 3, 3, 2, 1];
        let topo = Topology::new(8, 12, 1, 2, 4).unwrap();
        let link = LinkModel {
            gpus_per_node: 2,
            intra_node_bw: 1e11,
            inter_node_bw: 1e10,
            latency: 1e-5,
            local_bw: 1e12,
        };
        let plan = plan_migration(&old, &new, 1, &topo, false, &[1e6], &link).unwrap();
        assert_eq!(plan.phy2log, old);
        assert!(plan.transfers.is_empty());
        assert_eq!(plan.cost.seconds, 0.0);
    }

    #[test]
    fn transfers_prefer_the_same_node() {
        // 4 GPUs (2 per node), 1 slot each; expert 0 is on GPU 0 and GPU 2 in the old placement.
        let old = vec![0, 1, 0, 2];
        let new = vec![0, 1, 2, 0]; // after matching GPU 3 needs expert 0 (or GPU 2 needs 2)
        let topo = Topology::new(3, 4, 1, 2, 4).unwrap();
        let link = LinkModel {
            gpus_per_node: 2,
            intra_node_bw: 1e11,
            inter_node_bw: 1e10,
            latency: 0.0,
            local_bw: 1e12,
        };
        let plan = plan_migration(&old, &new, 1, &topo, false, &[1e9], &link).unwrap();
        // Old GPU 2 and 3 hold {0} and {2}: new {2} matches old GPU 3, {0} old GPU 2: nothing moves.
        assert!(plan.transfers.is_empty());
        let new2 = vec![0, 2, 1, 1]; // {1} goes to old GPU 2 (node 1), expert 1 only on GPU 1
        let plan = plan_migration(&old, &new2, 1, &topo, false, &[1e9], &link).unwrap();
        assert_eq!(plan.transfers.len(), 1);
        let t = plan.transfers[0];
        assert_eq!((t.expert, t.dst_rank), (1, 2));
        assert_eq!(t.src_rank, 1); // the only holder of expert 1 (other node)
        assert!((plan.cost.seconds - 1e9 / 1e10).abs() < 1e-12);
    }

    #[test]
    fn decision_weighs_gain_against_cost() {
        // 2 experts, 2 GPUs x 2 slots.
        let topo4 = Topology::new(2, 4, 1, 1, 2).unwrap();
        let load = [30.0, 10.0];
        let cur = [0, 0, 1, 1]; // GPU0 30, GPU1 10
        let new = [0, 1, 0, 1]; // 20 / 20
        let d = decide(&load, 1, &cur, &new, &topo4, 1e-3, 100.0, 0.5, 0.0).unwrap();
        assert!((d.gain_per_step - 0.01).abs() < 1e-12);
        assert!(d.migrate);
        let d = decide(&load, 1, &cur, &new, &topo4, 1e-3, 10.0, 0.5, 0.0).unwrap();
        assert!(!d.migrate);
    }
}
