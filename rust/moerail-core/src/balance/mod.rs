//! Expert load balancing: statistics, placement, replica choice and migration planning
//! (what Pangu Ultra MoE calls EDPB, and DeepSeek's EPLB).
//!
//! * [`eplb`]: DeepSeek's published EPLB algorithm (balanced packing, replication by largest
//!   per-replica load, hierarchical and global policies).
//! * [`refine`]: a placement that starts from EPLB's and only accepts improving moves (swaps of
//!   replicas between devices, moves of a redundant replica to another expert, swaps of whole
//!   groups between nodes): never worse than EPLB on the busiest device. [`improve_placement`]
//!   runs the same moves from the current placement instead (incremental, within a move budget).
//! * [`stats`]: load predictors (EMA, window mean, linear trend), their backtest, and the metrics
//!   of a placement (max/mean per device and node, CV, lower bound, dropped tokens).
//! * [`migration`]: slot matching between two placements, the transfer list, its time from a
//!   link model, and the migrate-or-not decision.
//! * [`replica`]: the deterministic, even choice of a replica for each routed token.
//!
//! Placements use EPLB's format: `phy2log [L, R]` (the logical expert in each physical slot;
//! slot `s` lives on GPU `s / (R / num_gpus)`), `logcnt [L, E]` (replicas per expert) and
//! `log2phy [L, E, X]` (the slots of each expert by replica rank, padded with -1).
//!
//! Layers are independent: every function here runs them in parallel in moerail's pool, and
//! the results are the same bits for any thread count.

pub mod eplb;
pub mod migration;
pub mod refine;
pub mod replica;
pub mod stats;

use rayon::prelude::*;

use crate::error::{ensure, invalid, Result};
use crate::util::pool;

/// Which placement algorithm [`rebalance_experts`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// DeepSeek's EPLB, exactly.
    Eplb,
    /// EPLB followed by improving local moves (never worse on the busiest device).
    Refine,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "eplb" => Ok(Self::Eplb),
            "refine" => Ok(Self::Refine),
            _ => Err(invalid(
                "mode",
                format!("expected 'eplb' or 'refine', got {s:?}"),
            )),
        }
    }
}

/// The cluster and model sizes a placement is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Logical experts per layer (E).
    pub num_experts: usize,
    /// Physical expert slots per layer (R), a multiple of `num_gpus`.
    pub num_replicas: usize,
    /// Expert groups (group-limited routing); divides E.
    pub num_groups: usize,
    /// Server nodes; divides `num_gpus`.
    pub num_nodes: usize,
    /// Devices (EP ranks).
    pub num_gpus: usize,
}

/// The most slots a layer (`num_replicas`) a [`Topology`] takes.
pub const MAX_REPLICAS: usize = 1 << 24;

impl Topology {
    /// Checks the sizes; errors name the argument at fault.
    pub fn new(
        num_experts: usize,
        num_replicas: usize,
        num_groups: usize,
        num_nodes: usize,
        num_gpus: usize,
    ) -> Result<Self> {
        ensure(num_experts >= 1, "weight", || {
            "expected at least one expert (a [num_layers, num_experts] tensor with num_experts >= 1)"
                .into()
        })?;
        ensure(num_gpus >= 1, "num_gpus", || {
            format!("must be >= 1, got {num_gpus}")
        })?;
        ensure(num_nodes >= 1, "num_nodes", || {
            format!("must be >= 1, got {num_nodes}")
        })?;
        ensure(num_groups >= 1, "num_groups", || {
            format!("must be >= 1, got {num_groups}")
        })?;
        ensure(num_replicas >= num_experts, "num_replicas", || {
            format!(
                "must be >= the number of experts ({num_experts}): every expert needs a slot, got {num_replicas}"
            )
        })?;
        // Placements are `[layers, num_replicas]` tables: a size no cluster has is an error
        // naming the argument, not an allocation failure that aborts the process.
        ensure(num_replicas <= MAX_REPLICAS, "num_replicas", || {
            format!("at most {MAX_REPLICAS} slots a layer, got {num_replicas}")
        })?;
        ensure(num_replicas % num_gpus == 0, "num_replicas", || {
            format!(
                "must be a multiple of num_gpus ({num_gpus}) so every device has the same number of slots, got {num_replicas}"
            )
        })?;
        ensure(num_gpus % num_nodes == 0, "num_gpus", || {
            format!("must be a multiple of num_nodes ({num_nodes}), got {num_gpus}")
        })?;
        ensure(num_experts % num_groups == 0, "num_groups", || {
            format!("must divide the number of experts ({num_experts}), got {num_groups}")
        })?;
        Ok(Self {
            num_experts,
            num_replicas,
            num_groups,
            num_nodes,
            num_gpus,
        })
    }

    /// EPLB's choice: hierarchical when the nodes divide the groups.
    pub fn hierarchical(&self) -> bool {
        self.num_groups % self.num_nodes == 0
    }

    /// (groups, nodes) the algorithm really uses: the global policy is the hierarchical one with
    /// one group and one node.
    pub fn effective(&self) -> (usize, usize) {
        if self.hierarchical() {
            (self.num_groups, self.num_nodes)
        } else {
            (1, 1)
        }
    }

    pub fn gpus_per_node(&self) -> usize {
        self.num_gpus / self.num_nodes
    }
}

/// A placement of every layer: `phy2log [L, R]`, `phyrank [L, R]` (the replica rank of each
/// slot), `logcnt [L, E]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub num_layers: usize,
    pub num_experts: usize,
    pub num_replicas: usize,
    pub phy2log: Vec<i64>,
    pub phyrank: Vec<i64>,
    pub logcnt: Vec<i64>,
}

impl Placement {
    /// The largest replica count (the last dimension of `log2phy`).
    pub fn max_replicas(&self) -> usize {
        self.logcnt.iter().copied().max().unwrap_or(1).max(1) as usize
    }

    /// `log2phy [L, E, max_replicas]`: slot of replica rank r of expert e, -1 past its count.
    pub fn log2phy(&self) -> Vec<i64> {
        let x = self.max_replicas();
        let mut out = vec![0i64; self.num_layers * self.num_experts * x];
        fill_log2phy(
            &self.phy2log,
            Some(&self.phyrank),
            self.num_layers,
            self.num_experts,
            x,
            &mut out,
        )
        .expect("a placement from rebalance_experts is consistent");
        out
    }
}

/// Writes `log2phy [layers, E, x]` of `phy2log [layers, R]`: the slot of replica rank `r` of
/// expert `e`, -1 past its count. Replica ranks come from `phyrank` or, without it, ascending slot
/// order. Every (expert, rank) must be unique and `rank < x`.
pub fn fill_log2phy(
    phy2log: &[i64],
    phyrank: Option<&[i64]>,
    layers: usize,
    num_experts: usize,
    x: usize,
    out: &mut [i64],
) -> Result<()> {
    ensure(out.len() == layers * num_experts * x, "log2phy", || {
        format!(
            "expected {layers} x {num_experts} x {x} values, got {}",
            out.len()
        )
    })?;
    if layers == 0 {
        return Ok(());
    }
    let r_n = phy2log.len() / layers;
    ensure(phy2log.len() == layers * r_n, "phy2log", || {
        format!("expected {layers} rows, got {} values", phy2log.len())
    })?;
    if let Some(r) = phyrank {
        ensure(r.len() == phy2log.len(), "phyrank", || {
            format!("expected {} values (the shape of phy2log)", phy2log.len())
        })?;
    }
    let chunk = (num_experts * x).max(1);
    let fill_layer = |l: usize, o: &mut [i64], next: &mut Vec<usize>| -> Result<()> {
        o.fill(-1);
        next.clear();
        next.resize(num_experts, 0);
        for s in 0..r_n {
            let e = phy2log[l * r_n + s];
            if e < 0 || e as usize >= num_experts {
                return Err(invalid(
                    "phy2log",
                    format!("expert id {e} at [{l}, {s}] is outside [0, {num_experts})"),
                ));
            }
            let e = e as usize;
            let r = match phyrank {
                Some(pr) => pr[l * r_n + s],
                None => next[e] as i64,
            };
            next[e] += 1;
            if r < 0 || r as usize >= x || o[e * x + r as usize] != -1 {
                return Err(invalid(
                    "phyrank",
                    format!(
                        "replica rank {r} of expert {e} in layer {l} is out of range or repeated"
                    ),
                ));
            }
            o[e * x + r as usize] = s as i64;
        }
        Ok(())
    };
    // A memory-bound pass: threads only pay off on large placements.
    if out.len() < (1 << 20) {
        let mut next = Vec::new();
        return out
            .chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(l, o)| fill_layer(l, o, &mut next));
    }
    let results: Vec<Result<()>> = pool::install(|| {
        out.par_chunks_mut(chunk)
            .enumerate()
            .map_init(Vec::new, |next, (l, o)| fill_layer(l, o, next))
            .collect()
    });
    results.into_iter().collect()
}

/// Checks a `[layers, experts]` load matrix: finite and non-negative.
pub fn check_loads(weight: &[f64], layers: usize, experts: usize, arg: &str) -> Result<()> {
    ensure(weight.len() == layers * experts, arg, || {
        format!(
            "expected {layers} x {experts} = {} values, got {}",
            layers * experts,
            weight.len()
        )
    })?;
    // Branch-free scan first (vectorises); locate the culprit only on failure.
    let bad = weight
        .iter()
        .fold(false, |b, &w| b | !(w.is_finite() & (w >= 0.0)));
    if !bad {
        return Ok(());
    }
    if let Some(i) = weight.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(invalid(
            arg,
            format!(
                "loads must be finite and >= 0, got {} at [{}, {}]",
                weight[i],
                i / experts.max(1),
                i % experts.max(1)
            ),
        ));
    }
    Ok(())
}

/// Checks a `phy2log [layers, R]` placement against `topo`: ids in range, every expert at
/// least once. Returns the replica counts `[layers, E]`.
pub fn check_placement(
    phy2log: &[i64],
    layers: usize,
    topo: &Topology,
    arg: &str,
) -> Result<Vec<i64>> {
    let (e_n, r_n) = (topo.num_experts, topo.num_replicas);
    ensure(phy2log.len() == layers * r_n, arg, || {
        format!(
            "expected {layers} x {r_n} slots (num_layers x num_replicas), got {} values",
            phy2log.len()
        )
    })?;
    let mut cnt = vec![0i64; layers * e_n];
    for l in 0..layers {
        for s in 0..r_n {
            let e = phy2log[l * r_n + s];
            if e < 0 || e as usize >= e_n {
                return Err(invalid(
                    arg,
                    format!("expert id {e} at [{l}, {s}] is outside [0, {e_n})"),
                ));
            }
            cnt[l * e_n + e as usize] += 1;
        }
        if let Some(e) = (0..e_n).find(|&e| cnt[l * e_n + e] == 0) {
            return Err(invalid(
                arg,
                format!("layer {l} has no slot for expert {e}: every expert needs a replica"),
            ));
        }
    }
    Ok(cnt)
}

/// Places `weight [layers, E]` (expected tokens per expert) onto `topo.num_replicas` slots.
pub fn rebalance_experts(
    weight: &[f64],
    layers: usize,
    topo: &Topology,
    mode: Mode,
) -> Result<Placement> {
    let (e_n, r_n) = (topo.num_experts, topo.num_replicas);
    crate::error::checked_mul(layers, r_n, "weight")?;
    let mut p = Placement {
        num_layers: layers,
        num_experts: e_n,
        num_replicas: r_n,
        phy2log: vec![0; layers * r_n],
        phyrank: vec![0; layers * r_n],
        logcnt: vec![0; layers * e_n],
    };
    rebalance_experts_into(
        weight,
        layers,
        topo,
        mode,
        &mut p.phy2log,
        &mut p.phyrank,
        &mut p.logcnt,
    )?;
    Ok(p)
}

/// [`rebalance_experts`] writing into caller-provided buffers (`[L, R]`, `[L, R]`, `[L, E]`).
pub fn rebalance_experts_into(
    weight: &[f64],
    layers: usize,
    topo: &Topology,
    mode: Mode,
    phy2log: &mut [i64],
    phyrank: &mut [i64],
    logcnt: &mut [i64],
) -> Result<()> {
    let (e_n, r_n) = (topo.num_experts, topo.num_replicas);
    check_loads(weight, layers, e_n, "weight")?;
    for (buf, n, name) in [
        (phy2log.len(), r_n, "phy2log"),
        (phyrank.len(), r_n, "phyrank"),
        (logcnt.len(), e_n, "logcnt"),
    ] {
        ensure(buf == layers * n, name, || {
            format!("expected {} values, got {buf}", layers * n)
        })?;
    }
    if layers == 0 {
        return Ok(());
    }
    pool::install(|| {
        weight
            .par_chunks(e_n)
            .zip(phy2log.par_chunks_mut(r_n))
            .zip(phyrank.par_chunks_mut(r_n))
            .zip(logcnt.par_chunks_mut(e_n))
            .for_each_init(eplb::Scratch::default, |sc, (((w, p2l), rank), cnt)| {
                let mut out = eplb::LayerOut {
                    phy2log: p2l,
                    phyrank: rank,
                    logcnt: cnt,
                };
                match mode {
                    Mode::Eplb => eplb::rebalance_layer_with(w, topo, &mut out, sc),
                    Mode::Refine => refine::rebalance_layer(w, topo, &mut out),
                }
            })
    });
    Ok(())
}

/// Improves the `current` placement `[layers, R]` for loads `weight [layers, E]` in place,
/// without re-placing from scratch: the refine moves (swaps between devices, moving a replica to
/// another expert) starting from `current`, at most `max_moves` changed slots per layer, never a
/// busier device than `current`. With `keep_nodes` every expert's replicas stay in their node
/// (which `current` must already satisfy); unchanged slots keep their expert, so a migration
/// moves at most the changed slots.
#[allow(clippy::too_many_arguments)]
pub fn improve_placement(
    weight: &[f64],
    layers: usize,
    num_experts: usize,
    current: &[i64],
    num_replicas: usize,
    num_gpus: usize,
    num_nodes: usize,
    keep_nodes: bool,
    max_moves: Option<usize>,
) -> Result<Placement> {
    let (e_n, r_n) = (num_experts, num_replicas);
    let topo = Topology::new(e_n, r_n, 1, num_nodes, num_gpus)?;
    check_loads(weight, layers, e_n, "weight")?;
    check_placement(current, layers, &topo, "current_phy2log")?;
    if keep_nodes && num_nodes > 1 {
        let spn = r_n / num_nodes;
        for l in 0..layers {
            let mut node_of = vec![usize::MAX; e_n];
            for s in 0..r_n {
                let e = current[l * r_n + s] as usize;
                let n = s / spn;
                if node_of[e] != usize::MAX && node_of[e] != n {
                    return Err(invalid(
                        "current_phy2log",
                        format!(
                            "expert {e} of layer {l} has replicas in nodes {} and {n}; pass keep_nodes=False",
                            node_of[e]
                        ),
                    ));
                }
                node_of[e] = n;
            }
        }
    }
    let mut p = Placement {
        num_layers: layers,
        num_experts: e_n,
        num_replicas: r_n,
        phy2log: vec![0; layers * r_n],
        phyrank: vec![0; layers * r_n],
        logcnt: vec![0; layers * e_n],
    };
    if layers == 0 {
        return Ok(p);
    }
    pool::install(|| {
        weight
            .par_chunks(e_n)
            .zip(current.par_chunks(r_n))
            .zip(p.phy2log.par_chunks_mut(r_n))
            .zip(p.phyrank.par_chunks_mut(r_n))
            .zip(p.logcnt.par_chunks_mut(e_n))
            .for_each(|((((w, cur), p2l), rank), cnt)| {
                refine::improve_layer(
                    w,
                    cur,
                    num_gpus,
                    num_nodes,
                    keep_nodes && num_nodes > 1,
                    max_moves,
                    &mut eplb::LayerOut {
                        phy2log: p2l,
                        phyrank: rank,
                        logcnt: cnt,
                    },
                )
            })
    });
    Ok(p)
}

/// The smallest possible `max device load / mean device load` of any placement of `weight`
/// (one layer) on `num_replicas` slots and `num_gpus` devices: the busiest device carries at
/// least the mean, and at least the largest per-replica load `w_e / c_e` of the best replica
/// counts (which greedy replication by largest per-replica load attains).
pub fn lower_bound_ratio(weight: &[f64], num_replicas: usize, num_gpus: usize) -> f64 {
    let total: f64 = weight.iter().sum();
    if total <= 0.0 || num_gpus == 0 {
        return 1.0;
    }
    let mean = total / num_gpus as f64;
    let best_max_replica = eplb::min_max_replica_load(weight, num_replicas);
    (best_max_replica / mean).max(1.0)
}

/// A total order on f64 for heaps and sorts (the values here are finite).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Key(pub f64, pub usize);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    /// By value, then by index.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .partial_cmp(&other.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(self.1.cmp(&other.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_errors_name_the_argument() {
        let arg = |r: Result<Topology>| match r {
            Err(crate::Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("{other:?}"),
        };
        assert_eq!(arg(Topology::new(12, 15, 4, 2, 8)), "num_replicas");
        assert_eq!(arg(Topology::new(12, 8, 4, 2, 8)), "num_replicas");
        assert_eq!(arg(Topology::new(12, 16, 5, 2, 8)), "num_groups");
        assert_eq!(arg(Topology::new(12, 16, 4, 3, 8)), "num_gpus");
        assert_eq!(arg(Topology::new(12, 16, 4, 2, 0)), "num_gpus");
        assert!(Topology::new(12, 16, 4, 2, 8).unwrap().hierarchical());
        assert!(!Topology::new(12, 16, 3, 2, 8).unwrap().hierarchical());
    }

    #[test]
    fn loads_must_be_finite_and_non_negative() {
        assert!(check_loads(&[1.0, 2.0], 1, 2, "weight").is_ok());
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let e = check_loads(&[1.0, bad], 1, 2, "weight").unwrap_err();
            assert!(e.to_string().starts_with("weight:"), "{e}");
        }
        assert!(check_loads(&[1.0], 1, 2, "weight").is_err());
    }
}
