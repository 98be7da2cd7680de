//! Activation memory planning: for every layer of one device and every module of the layer,
//! keep its saved tensors, recompute them in the backward, swap them to host memory, or (for
//! the expert inputs) drop them and run the dispatch exchange again — chosen to minimise the
//! step time the plan exposes under a device memory budget.
//!
//! # Model
//!
//! * **Peak memory** = static bytes (weights, gradients, optimizer state) + the kept
//!   activations of the micro-batches in flight + the transient of one layer's backward (its
//!   working buffers plus the tensors rebuilt or swapped back in for it). The micro-batches in
//!   flight come from a step-by-step replay of Megatron-Core's schedule on this stage
//!   ([`Schedule`]): 1F1B holds `min(p - rank, m)`; the interleaved schedule warms up
//!   `2 (p - rank - 1) + (v - 1) p` chunk-micro-batches (Megatron's count) and its in-flight
//!   mix of model chunks changes during the steady state, so every distinct mix is a
//!   constraint, not one sum.
//! * **Exposed time** per step = `m` x (recompute seconds + exchange seconds of
//!   `recompute_exchange`) + the swap time the schedule cannot hide: per layer and
//!   micro-batch, the larger of the planner's bound — `2 S / B` (out and back in over the host
//!   link) minus the compute between the layer's forward and its backward on this stage's
//!   timeline — and, given the [`Executor`], the backward's wait for its copies back as that
//!   executor issues them (a group's copies start `prefetch_groups` groups ahead within a model
//!   chunk, so a chunk's first group waits for all of its own unless `lookahead` 2 started them in the
//!   previous backward; each layer's copies taken alone on the link); never less than the
//!   link's total busy time beyond the step's compute (`m sum S / B - compute`): all swaps in
//!   flight share the link.
//! * **Host memory** = the swapped bytes of the micro-batches in flight (same mixes).
//!
//! # Solver
//!
//! Per layer, every combination of module actions is an option (and, where the layer's
//! `input_bytes` is known, whole-layer recompute: the input kept, every activation rebuilt by
//! one more forward, all of them in the transient) with recompute seconds,
//! unhidden swap latency, a transient (its working buffers plus what it rebuilds or swaps back
//! in), kept bytes and swapped bytes. The objective and every constraint grow with each of
//! these (the peak and the host memory with the per-chunk sums weighted by every in-flight
//! mix, the transient as a running maximum, the link term with the swapped sum), so the
//! multiple-choice knapsack over layers is solved exactly by merging Pareto frontiers layer by
//! layer: a partial plan is dropped only when another is no worse in every criterion, or when
//! it is already over the device or host budget. The cheapest complete plan by the exact
//! model wins. When a frontier grows past [`Options::frontier_limit`] points it is thinned
//! (the cheapest point per size bucket) and a local search (one layer's option at a time)
//! polishes the result; [`Plan::exact`] says whether that happened. Tests check the solver
//! against exhaustive search.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, unreachable, Result};

/// The modules of one transformer layer (`moerail.memory.MODULES`): in forward order, except
/// `mla_up_proj` (Multi-Latent Attention's up-projections, which run before core attention),
/// last so that the other modules keep their indices.
pub const MODULES: [&str; N_MODULES] = [
    "layernorm",
    "attention",
    "router",
    "permute",
    "expert_fc1",
    "expert_act",
    "expert_fc2",
    "unpermute",
    "shared_expert",
    "mla_up_proj",
];
/// How many modules a layer plan decides.
pub const N_MODULES: usize = 10;
/// Index of the one module whose exchange `recompute_exchange` repeats (the expert inputs).
pub const EXCHANGE_MODULE: usize = 4;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A size in an error message: GiB, or MiB / bytes for small ones (as the Python layer writes
/// them), so a small device's figures do not all read "0.00 GiB".
fn size(bytes: f64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= GIB {
        format!("{:.2} GiB", bytes / GIB)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes / MIB)
    } else {
        format!("{bytes:.0} B")
    }
}

/// What happens to one module's saved tensors between its forward and its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Keep,
    Recompute,
    Swap,
    RecomputeExchange,
    /// The whole layer: only its input is kept and the backward runs its forward again
    /// (Megatron's `recompute_granularity="full"` for one layer). A row takes it in every
    /// module or in none.
    RecomputeLayer,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Keep,
        Action::Recompute,
        Action::Swap,
        Action::RecomputeExchange,
        Action::RecomputeLayer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Keep => "keep",
            Action::Recompute => "recompute",
            Action::Swap => "swap",
            Action::RecomputeExchange => "recompute_exchange",
            Action::RecomputeLayer => "recompute_layer",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
            invalid(
                "action",
                format!(
                    "unknown action {s:?}; expected keep, recompute, swap, recompute_exchange or recompute_layer"
                ),
            )
        })
    }
}

/// One module of one layer, per micro-batch (see `moerail.memory.ModuleCost`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleCost {
    pub saved_bytes: f64,
    pub recompute_seconds: f64,
    #[serde(default)]
    pub exchange_seconds: f64,
    #[serde(default)]
    pub exchange_bytes: f64,
    /// What `recompute_exchange` takes off the device (`recompute` frees this less
    /// `exchange_bytes`): a recompute also frees the copies of the module's outputs its
    /// consumers saved and holds its inputs, so it need not free what a swap (`saved_bytes`)
    /// does. `None`: `saved_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_saved_bytes: Option<f64>,
}

impl ModuleCost {
    /// The bytes `recompute_exchange` frees (`recompute`: less `exchange_bytes`).
    pub fn recompute_bytes(&self) -> f64 {
        self.recompute_saved_bytes.unwrap_or(self.saved_bytes)
    }
}

/// One layer on this device, per micro-batch (see `moerail.memory.LayerCosts`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerCosts {
    pub layer: usize,
    #[serde(default)]
    pub vpp_stage: usize,
    /// Indexed like [`MODULES`]; an absent module is all zeros.
    pub modules: [ModuleCost; N_MODULES],
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    #[serde(default)]
    pub other_saved_bytes: f64,
    #[serde(default)]
    pub transient_bytes: f64,
    /// The layer's input, the one tensor a whole-layer recompute keeps; `None` (unknown): no
    /// whole-layer recompute is planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_bytes: Option<f64>,
}

impl LayerCosts {
    /// Every activation the layer saves when it keeps all of them.
    pub fn saved_bytes(&self) -> f64 {
        self.other_saved_bytes + self.modules.iter().map(|m| m.saved_bytes).sum::<f64>()
    }
}

/// Megatron-Core's pipeline schedule as seen from one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub pipeline_size: usize,
    pub pipeline_rank: usize,
    pub virtual_pipeline_size: usize,
    pub num_microbatches: usize,
}

/// One operation of the schedule on this stage: a forward or backward of `chunk` for micro-batch
/// `microbatch` (numbered per chunk, in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub forward: bool,
    pub chunk: usize,
    pub microbatch: usize,
}

impl Schedule {
    pub fn validate(&self) -> Result<()> {
        let s = self;
        if s.pipeline_size == 0 {
            return Err(invalid("pipeline_size", "expected >= 1"));
        }
        if s.pipeline_rank >= s.pipeline_size {
            return Err(invalid(
                "pipeline_rank",
                format!(
                    "expected 0..{}, got {}",
                    s.pipeline_size - 1,
                    s.pipeline_rank
                ),
            ));
        }
        if s.virtual_pipeline_size == 0 {
            return Err(invalid("virtual_pipeline_size", "expected >= 1"));
        }
        if s.num_microbatches == 0 {
            return Err(invalid("num_microbatches", "expected >= 1"));
        }
        if s.num_microbatches.saturating_mul(s.virtual_pipeline_size) > 1 << 22 {
            return Err(invalid(
                "num_microbatches",
                "too many micro-batches to replay",
            ));
        }
        Ok(())
    }

    fn interleaved(&self) -> bool {
        self.virtual_pipeline_size > 1 && self.pipeline_size > 1
    }

    /// Megatron-Core's warm-up count (`get_pp_rank_microbatches`), over chunk-micro-batches.
    pub fn warmup(&self) -> usize {
        let (p, r, v) = (
            self.pipeline_size,
            self.pipeline_rank,
            self.virtual_pipeline_size,
        );
        let total = self.num_microbatches * v;
        let w = if p == 1 {
            0
        } else if !self.interleaved() {
            p - r - 1
        } else if self.num_microbatches == p {
            total
        } else {
            2 * (p - r - 1) + (v - 1) * p
        };
        w.min(total)
    }

    /// The model chunk of the `k`-th forward (`get_schedule_table`, group size = `p`).
    fn table(&self) -> Vec<usize> {
        let (m, v, g) = (
            self.num_microbatches,
            self.virtual_pipeline_size,
            self.pipeline_size.max(1),
        );
        let mut t = Vec::with_capacity(m * v);
        let mut lo = 0;
        while lo < m {
            let hi = if lo + g >= m { m } else { lo + g };
            for c in 0..v {
                for _ in lo..hi {
                    t.push(c);
                }
            }
            lo = hi;
        }
        t
    }

    /// The operations of one step on this stage, in order: warm-up forwards, then one forward
    /// and one backward at a time, then the cool-down backwards.
    pub fn ops(&self) -> Vec<Op> {
        let v = self.virtual_pipeline_size;
        let table = self.table();
        let total = table.len();
        let w = self.warmup();
        let mut fcount = vec![0usize; v];
        let mut bcount = vec![0usize; v];
        let mut ops = Vec::with_capacity(2 * total);
        let fwd = |k: usize, ops: &mut Vec<Op>, fcount: &mut Vec<usize>| {
            let c = table[k];
            ops.push(Op {
                forward: true,
                chunk: c,
                microbatch: fcount[c],
            });
            fcount[c] += 1;
        };
        let bwd = |k: usize, ops: &mut Vec<Op>, bcount: &mut Vec<usize>| {
            let c = v - 1 - table[k];
            ops.push(Op {
                forward: false,
                chunk: c,
                microbatch: bcount[c],
            });
            bcount[c] += 1;
        };
        for k in 0..w {
            fwd(k, &mut ops, &mut fcount);
        }
        for i in 0..total - w {
            fwd(w + i, &mut ops, &mut fcount);
            bwd(i, &mut ops, &mut bcount);
        }
        for i in total - w..total {
            bwd(i, &mut ops, &mut bcount);
        }
        ops
    }

    /// Every distinct mix of in-flight micro-batches per chunk right after a forward (where the
    /// live activations peak), with the mixes another one dominates removed.
    pub fn inflight_mixes(&self) -> Vec<Vec<u32>> {
        let v = self.virtual_pipeline_size;
        let mut n = vec![0u32; v];
        let mut mixes: Vec<Vec<u32>> = Vec::new();
        for op in self.ops() {
            if op.forward {
                n[op.chunk] += 1;
                if !mixes.contains(&n) {
                    mixes.push(n.clone());
                }
            } else {
                n[op.chunk] -= 1;
            }
        }
        let dominated = |a: &Vec<u32>, b: &Vec<u32>| a != b && a.iter().zip(b).all(|(x, y)| x <= y);
        let keep: Vec<Vec<u32>> = mixes
            .iter()
            .filter(|a| !mixes.iter().any(|b| dominated(a, b)))
            .cloned()
            .collect();
        keep
    }

    /// The most chunk-micro-batches in flight at once, in closed form: `min(p - rank, m)` for
    /// 1F1B, Megatron's warm-up count plus one (at most `m v`) for the interleaved schedule.
    pub fn peak_inflight(&self) -> usize {
        let total = self.num_microbatches * self.virtual_pipeline_size;
        (self.warmup() + 1).min(total)
    }
}

/// Everything the planner knows about one device (see `moerail.memory.MemoryCosts`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryCosts {
    pub layers: Vec<LayerCosts>,
    pub static_bytes: f64,
    pub device_bytes: f64,
    #[serde(default)]
    pub host_bytes: f64,
    #[serde(default)]
    pub host_link_bytes_per_second: f64,
    pub schedule: Schedule,
    /// moerail's executor, to price each swap as it copies the bytes back; `None`: by the
    /// planner's bound alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<Executor>,
}

/// Most segments an [`ExecutorLayer`] divides a layer's backward into.
pub const MAX_SEGMENTS: usize = 32;

/// How moerail's executor copies swapped tensors back (`moerail.memory.timeline`'s
/// `executor_swap_wait` replays it): a layer's backward runs its segments last to first in two
/// groups, `attn` (segments before `mlp_first_segment`) and `mlp` (the rest). A group's copies
/// start when its backward starts, last saved first, on one copy stream; with `lookahead` 1 the
/// next `prefetch_groups` groups' of the same model chunk (in backward order) start with them;
/// with 2 the chunk's last group also starts those of the next backward chunk's first group,
/// once that chunk has run its forward.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Executor {
    pub lookahead: u32,
    /// Groups copied back ahead within a model chunk's backward (with `lookahead` 1 or 2).
    #[serde(default = "one_group")]
    pub prefetch_groups: u32,
    pub mlp_first_segment: usize,
    /// One per layer of [`MemoryCosts::layers`].
    pub layers: Vec<ExecutorLayer>,
}

/// One layer's backward as the executor sees it, per micro-batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorLayer {
    /// Backward seconds of each segment, in forward order.
    pub segment_seconds: Vec<f64>,
    /// Per module ([`MODULES`] order): the bytes of its swap that each segment's backward reads
    /// first (empty: the module swaps nothing).
    pub reads: [Vec<f64>; N_MODULES],
}

/// Most groups [`Executor::prefetch_groups`] copies back ahead.
pub const MAX_PREFETCH_GROUPS: u32 = 8;

fn one_group() -> u32 {
    1
}

impl Executor {
    fn validate(&self, layers: usize) -> Result<()> {
        if self.lookahead > 2 {
            return Err(invalid(
                "lookahead",
                format!("expected 0, 1 or 2, got {}", self.lookahead),
            ));
        }
        if !(1..=MAX_PREFETCH_GROUPS).contains(&self.prefetch_groups) {
            return Err(invalid(
                "prefetch_groups",
                format!(
                    "expected 1 to {MAX_PREFETCH_GROUPS}, got {}",
                    self.prefetch_groups
                ),
            ));
        }
        if self.layers.len() != layers {
            return Err(invalid(
                "executor.layers",
                format!("has {} layers, the costs {layers}", self.layers.len()),
            ));
        }
        for (i, el) in self.layers.iter().enumerate() {
            let n = el.segment_seconds.len();
            if !(2..=MAX_SEGMENTS).contains(&n) {
                return Err(invalid(
                    "executor.layers",
                    format!("layer row {i}: expected 2 to {MAX_SEGMENTS} segments, got {n}"),
                ));
            }
            if self.mlp_first_segment == 0 || self.mlp_first_segment >= n {
                return Err(invalid(
                    "executor.mlp_first_segment",
                    format!("expected 1..{}, got {}", n - 1, self.mlp_first_segment),
                ));
            }
            let bad = |x: &f64| !(x.is_finite() && *x >= 0.0);
            if el.segment_seconds.iter().any(bad) {
                return Err(invalid(
                    "executor.layers",
                    format!("layer row {i}: segment_seconds must be finite and >= 0"),
                ));
            }
            for (j, r) in el.reads.iter().enumerate() {
                if !(r.is_empty() || r.len() == n) || r.iter().any(bad) {
                    return Err(invalid(
                        "executor.layers",
                        format!(
                            "layer row {i}: reads[{}] must be empty or {n} finite numbers >= 0",
                            MODULES[j]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl MemoryCosts {
    pub fn validate(&self) -> Result<()> {
        self.schedule.validate()?;
        if self.layers.is_empty() {
            return Err(invalid("layers", "expected at least one layer"));
        }
        if let Some(ex) = &self.executor {
            ex.validate(self.layers.len())?;
        }
        let finite = |x: f64, name: &str| -> Result<()> {
            if x.is_finite() && x >= 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    name,
                    format!("expected a finite number >= 0, got {x}"),
                ))
            }
        };
        finite(self.static_bytes, "static_bytes")?;
        finite(self.device_bytes, "device_bytes")?;
        finite(self.host_bytes, "host_bytes")?;
        finite(
            self.host_link_bytes_per_second,
            "host_link_bytes_per_second",
        )?;
        for lc in &self.layers {
            if lc.vpp_stage >= self.schedule.virtual_pipeline_size {
                return Err(invalid(
                    "layers",
                    format!(
                        "layer {} is in vpp stage {}, but virtual_pipeline_size is {}",
                        lc.layer, lc.vpp_stage, self.schedule.virtual_pipeline_size
                    ),
                ));
            }
            finite(lc.forward_seconds, "forward_seconds")?;
            finite(lc.backward_seconds, "backward_seconds")?;
            finite(lc.other_saved_bytes, "other_saved_bytes")?;
            finite(lc.transient_bytes, "transient_bytes")?;
            if let Some(b) = lc.input_bytes {
                finite(b, "input_bytes")?;
            }
            for (i, mc) in lc.modules.iter().enumerate() {
                let n = MODULES[i];
                finite(mc.saved_bytes, &format!("modules[{n}].saved_bytes"))?;
                finite(
                    mc.recompute_seconds,
                    &format!("modules[{n}].recompute_seconds"),
                )?;
                finite(
                    mc.exchange_seconds,
                    &format!("modules[{n}].exchange_seconds"),
                )?;
                finite(mc.exchange_bytes, &format!("modules[{n}].exchange_bytes"))?;
                if let Some(r) = mc.recompute_saved_bytes {
                    finite(r, &format!("modules[{n}].recompute_saved_bytes"))?;
                }
                if mc.exchange_bytes > mc.recompute_bytes() {
                    return Err(invalid(
                        format!("modules[{n}].exchange_bytes"),
                        "is more than recompute_saved_bytes",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Per layer and micro-batch, the compute between the end of the layer's forward and the
    /// start of its backward on this stage's serial timeline (waits for other stages only add
    /// to it, so this is the least the schedule hides).
    pub fn swap_windows(&self) -> Vec<Vec<f64>> {
        let v = self.schedule.virtual_pipeline_size;
        let m = self.schedule.num_microbatches;
        let mut fsum = vec![0.0; v];
        let mut bsum = vec![0.0; v];
        for lc in &self.layers {
            fsum[lc.vpp_stage] += lc.forward_seconds;
            bsum[lc.vpp_stage] += lc.backward_seconds;
        }
        let mut fstart = vec![vec![0.0; m]; v];
        let mut bstart = vec![vec![0.0; m]; v];
        let mut t = 0.0;
        for op in self.schedule.ops() {
            if op.forward {
                fstart[op.chunk][op.microbatch] = t;
                t += fsum[op.chunk];
            } else {
                bstart[op.chunk][op.microbatch] = t;
                t += bsum[op.chunk];
            }
        }
        let mut out = Vec::with_capacity(self.layers.len());
        for (i, lc) in self.layers.iter().enumerate() {
            let c = lc.vpp_stage;
            let before: f64 = self.layers[..=i]
                .iter()
                .filter(|l| l.vpp_stage == c)
                .map(|l| l.forward_seconds)
                .sum();
            let after: f64 = self.layers[i + 1..]
                .iter()
                .filter(|l| l.vpp_stage == c)
                .map(|l| l.backward_seconds)
                .sum();
            out.push(
                (0..m)
                    .map(|mb| (bstart[c][mb] + after - fstart[c][mb] - before).max(0.0))
                    .collect(),
            );
        }
        out
    }

    /// Per layer and micro-batch, how far ahead of the layer's backward the executor starts its
    /// copies back, as the backward compute between (the link taken as free): `[0]` for the
    /// `mlp` group (the layer's backward starts with it), `[1]` for the `attn` group, both up to
    /// the start of the `mlp` group. With `lookahead` 1 a group's copies start with the backward
    /// of the group `prefetch_groups` before it in the chunk's backward, or with the chunk's
    /// first; with `lookahead` 2 those of the chunk's last layer's `mlp` group start in the
    /// previous backward chunk (that chunk's first-layer `attn` group and the forwards between
    /// the two backwards). Empty without an executor.
    pub fn copy_in_windows(&self) -> Vec<Vec<[f64; 2]>> {
        let Some(ex) = &self.executor else {
            return Vec::new();
        };
        let k = ex.mlp_first_segment;
        let attn = |i: usize| -> f64 { ex.layers[i].segment_seconds[..k].iter().sum() };
        let mlp = |i: usize| -> f64 { ex.layers[i].segment_seconds[k..].iter().sum() };
        let v = self.schedule.virtual_pipeline_size;
        let m = self.schedule.num_microbatches;
        let mut chunks: Vec<Vec<usize>> = vec![Vec::new(); v];
        for (i, lc) in self.layers.iter().enumerate() {
            chunks[lc.vpp_stage].push(i);
        }
        let mut out = vec![vec![[0.0; 2]; m]; self.layers.len()];
        if ex.lookahead == 0 {
            return out;
        }
        let d = ex.prefetch_groups as usize;
        for idx in &chunks {
            // Start of each group in the chunk's backward (mlp, attn of the last layer first).
            let mut start = Vec::with_capacity(2 * idx.len() + 1);
            start.push(0.0);
            for &i in idx.iter().rev() {
                let t = start[start.len() - 1];
                start.push(t + mlp(i));
                start.push(t + mlp(i) + attn(i));
            }
            for (pos, &i) in idx.iter().enumerate() {
                let g = 2 * (idx.len() - 1 - pos);
                let ahead = |h: usize| start[g] - start[h.saturating_sub(d)];
                out[i] = vec![[ahead(g), ahead(g + 1)]; m];
            }
        }
        if ex.lookahead < 2 {
            return out;
        }
        // The copies ahead start at the previous backward's first-layer `attn` group if this
        // chunk-micro-batch ran its forward by then, and have the forwards between the two.
        let mut fsum = vec![0.0; v];
        for lc in &self.layers {
            fsum[lc.vpp_stage] += lc.forward_seconds;
        }
        let ops = self.schedule.ops();
        let mut fpos = vec![vec![usize::MAX; m]; v];
        for (p, op) in ops.iter().enumerate() {
            if op.forward {
                fpos[op.chunk][op.microbatch] = p;
            }
        }
        let backs: Vec<usize> = (0..ops.len()).filter(|&p| !ops[p].forward).collect();
        for w in backs.windows(2) {
            let (a, b) = (ops[w[0]], ops[w[1]]);
            if fpos[b.chunk][b.microbatch] > w[0] {
                continue;
            }
            let (Some(&first), Some(&last)) = (chunks[a.chunk].first(), chunks[b.chunk].last())
            else {
                continue;
            };
            let between: f64 = ops[w[0] + 1..w[1]].iter().map(|o| fsum[o.chunk]).sum();
            out[last][b.microbatch][0] = attn(first) + between;
        }
        out
    }
}

/// What a plan costs, by the model above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Evaluation {
    /// Predicted peak device memory: static + activations in flight + one layer's transient.
    pub peak_bytes: f64,
    pub static_bytes: f64,
    /// Kept activations of the micro-batches in flight at their peak.
    pub activation_bytes: f64,
    /// The same with every module keeping.
    pub activation_bytes_keep_all: f64,
    pub transient_bytes: f64,
    /// Pinned host memory the swaps need at their peak.
    pub host_bytes: f64,
    /// Step time the plan adds: recompute + exchange + exposed swap.
    pub added_seconds: f64,
    pub recompute_seconds: f64,
    pub exchange_seconds: f64,
    pub swap_exposed_seconds: f64,
    /// The planner's bound on it: every copy back may start as soon as the layer's forward
    /// ends (what `swap_exposed_seconds` is without an executor).
    pub swap_bound_seconds: f64,
    /// Of `swap_exposed_seconds`, the backward's waits for the executor's copies back (each
    /// layer's alone on the link; `None` without an executor).
    pub swap_wait_seconds: Option<f64>,
    /// Bytes copied to the host per step (one direction).
    pub swapped_bytes_per_step: f64,
}

/// A plan's actions: one row of [`MODULES`] actions per layer of [`MemoryCosts::layers`].
pub type Actions = Vec<[Action; N_MODULES]>;

#[derive(Clone, Copy, Debug, Default)]
struct Effect {
    kept: f64,
    rebuilt: f64,
    swapped: f64,
    seconds: f64,
    exchange: f64,
}

/// The effect of `a` on module `i` of a layer, or `None` where the action does not apply
/// (recompute_exchange outside the expert inputs) or frees nothing.
fn effect(i: usize, mc: &ModuleCost, a: Action) -> Option<Effect> {
    let s = mc.saved_bytes;
    match a {
        Action::Keep => Some(Effect {
            kept: s,
            ..Default::default()
        }),
        Action::Recompute => {
            let freed = mc.recompute_bytes() - mc.exchange_bytes;
            (freed > 0.0).then_some(Effect {
                kept: s - freed,
                rebuilt: freed,
                seconds: mc.recompute_seconds,
                ..Default::default()
            })
        }
        Action::Swap => (s > 0.0).then_some(Effect {
            rebuilt: s,
            swapped: s,
            ..Default::default()
        }),
        Action::RecomputeLayer => None,
        Action::RecomputeExchange => {
            (i == EXCHANGE_MODULE && mc.exchange_bytes > 0.0).then_some(Effect {
                kept: s - mc.recompute_bytes(),
                rebuilt: mc.recompute_bytes(),
                seconds: mc.recompute_seconds,
                exchange: mc.exchange_seconds,
                ..Default::default()
            })
        }
    }
}

/// Sum of the module effects of one layer under `actions`; errors name the layer and module.
fn layer_effect(lc: &LayerCosts, actions: &[Action; N_MODULES]) -> Result<Effect> {
    let whole = actions
        .iter()
        .filter(|&&a| a == Action::RecomputeLayer)
        .count();
    if whole == N_MODULES {
        return whole_layer(lc).ok_or_else(|| {
            invalid(
                "plan",
                format!(
                    "layer {}: recompute_layer needs the layer's input size (input_bytes)",
                    lc.layer
                ),
            )
        });
    }
    if whole > 0 {
        return Err(invalid(
            "plan",
            format!(
                "layer {}: recompute_layer rebuilds the whole layer; it cannot be mixed with module actions",
                lc.layer
            ),
        ));
    }
    let mut e = Effect {
        kept: lc.other_saved_bytes,
        ..Default::default()
    };
    for (i, (mc, &a)) in lc.modules.iter().zip(actions).enumerate() {
        let x = match effect(i, mc, a) {
            Some(x) => x,
            None if a == Action::RecomputeExchange && i != EXCHANGE_MODULE => {
                return Err(invalid(
                    "plan",
                    format!(
                        "layer {} module {:?}: recompute_exchange applies to the expert inputs (expert_fc1) only",
                        lc.layer, MODULES[i]
                    ),
                ))
            }
            // Frees nothing: same as keep.
            None => effect(i, mc, Action::Keep).unwrap_or_default(),
        };
        e.kept += x.kept;
        e.rebuilt += x.rebuilt;
        e.swapped += x.swapped;
        e.seconds += x.seconds;
        e.exchange += x.exchange;
    }
    // A recompute may free more than its module saved (its consumers' copies of its
    // outputs), never more than the layer keeps.
    e.kept = e.kept.max(0.0);
    Ok(e)
}

/// Whole-layer recompute: the input stays, the backward rebuilds every activation of the layer
/// (its transient) by running the forward again. `None` without `input_bytes`.
fn whole_layer(lc: &LayerCosts) -> Option<Effect> {
    let input = lc.input_bytes?;
    let all = lc.saved_bytes();
    Some(Effect {
        kept: input.min(all),
        rebuilt: all,
        seconds: lc.forward_seconds,
        ..Default::default()
    })
}

/// The planner's bound on one micro-batch's unhidden swap time: the copy out and back in
/// against all the compute between the layer's forward and its backward.
fn bound_latency(swapped: f64, link: f64, window: f64) -> f64 {
    (2.0 * swapped / link - window).max(0.0)
}

/// Seconds one layer's backward waits for its swapped bytes (`need`, by the segment that first
/// reads them) as the executor copies them back: the `mlp` group's copies start `window[0]`
/// seconds before that group's backward on a free link, the `attn` group's `window[1]` seconds
/// before it, behind them (`lookahead` 1 or 2), or with their own group's backward (0).
fn copy_in_wait(
    segs: &[f64],
    need: &[f64],
    k: usize,
    lookahead: u32,
    link: f64,
    window: [f64; 2],
) -> f64 {
    let n = segs.len();
    let mut ready = [0.0f64; MAX_SEGMENTS];
    let mut free = -window[0];
    // Last saved, first read: a group's copies in reverse segment order.
    let issue = |lo: usize, hi: usize, at: f64, free: &mut f64, ready: &mut [f64]| {
        for s in (lo..hi).rev() {
            if need[s] > 0.0 {
                *free = free.max(at) + need[s] / link;
                ready[s] = *free;
            }
        }
    };
    issue(k, n, -window[0], &mut free, &mut ready);
    if lookahead > 0 {
        issue(0, k, -window[1], &mut free, &mut ready);
    }
    let (mut t, mut wait) = (0.0f64, 0.0);
    for s in (0..n).rev() {
        if s + 1 == k && lookahead == 0 {
            issue(0, k, t, &mut free, &mut ready);
        }
        if need[s] > 0.0 && ready[s] > t {
            wait += ready[s] - t;
            t = ready[s];
        }
        t += segs[s];
    }
    wait
}

fn weighted(mixes: &[Vec<u32>], per_chunk: &[f64]) -> f64 {
    mixes
        .iter()
        .map(|mix| {
            mix.iter()
                .zip(per_chunk)
                .map(|(&n, &a)| n as f64 * a)
                .sum::<f64>()
        })
        .fold(0.0, f64::max)
}

/// Precomputed schedule facts shared by every evaluation of one [`MemoryCosts`].
struct Ctx<'a> {
    costs: &'a MemoryCosts,
    mixes: Vec<Vec<u32>>,
    windows: Vec<Vec<f64>>,
    /// [`MemoryCosts::copy_in_windows`] where swaps are priced as the executor copies.
    copy_in: Vec<Vec<[f64; 2]>>,
    compute: f64,
    keep_all: f64,
}

/// One layer's swap time per step: what the model exposes and, of it, the executor's waits.
#[derive(Clone, Copy, Debug, Default)]
struct SwapTime {
    exposed: f64,
    bound: f64,
    wait: f64,
}

impl<'a> Ctx<'a> {
    fn new(costs: &'a MemoryCosts) -> Result<Self> {
        costs.validate()?;
        let mixes = costs.schedule.inflight_mixes();
        // The swap windows need a timed replay; without a host link nothing swaps.
        let swaps = costs.host_link_bytes_per_second > 0.0 && costs.host_bytes > 0.0;
        let windows = if swaps {
            costs.swap_windows()
        } else {
            vec![Vec::new(); costs.layers.len()]
        };
        let copy_in = if swaps {
            costs.copy_in_windows()
        } else {
            Vec::new()
        };
        let m = costs.schedule.num_microbatches as f64;
        let compute = m * costs
            .layers
            .iter()
            .map(|l| l.forward_seconds + l.backward_seconds)
            .sum::<f64>();
        let mut ctx = Ctx {
            costs,
            mixes,
            windows,
            copy_in,
            compute,
            keep_all: 0.0,
        };
        let v = costs.schedule.virtual_pipeline_size;
        let mut per = vec![0.0; v];
        for lc in &costs.layers {
            per[lc.vpp_stage] += lc.saved_bytes();
        }
        ctx.keep_all = weighted(&ctx.mixes, &per);
        Ok(ctx)
    }

    /// Layer `i`'s swap time per step for `actions`, which swap `swapped` bytes a micro-batch:
    /// per micro-batch the larger of the planner's bound and the executor's wait for its
    /// copies back (the copy out must end before the copy back can); without an executor, the
    /// bound.
    fn swap_time(&self, i: usize, actions: &[Action; N_MODULES], swapped: f64) -> SwapTime {
        let c = self.costs;
        let link = c.host_link_bytes_per_second;
        if swapped <= 0.0 {
            return SwapTime::default();
        }
        let windows = &self.windows[i];
        let (Some(ex), Some(copy_in)) = (&c.executor, self.copy_in.get(i)) else {
            let bound = windows
                .iter()
                .map(|&w| bound_latency(swapped, link, w))
                .sum();
            return SwapTime {
                exposed: bound,
                bound,
                wait: 0.0,
            };
        };
        let el = &ex.layers[i];
        let n = el.segment_seconds.len();
        let mut need = [0.0f64; MAX_SEGMENTS];
        for (j, a) in actions.iter().enumerate() {
            if *a == Action::Swap {
                for (x, r) in need.iter_mut().zip(&el.reads[j]) {
                    *x += r;
                }
            }
        }
        let mut out = SwapTime::default();
        let mut last: Option<([f64; 2], f64)> = None; // most micro-batches share a window
        for (&w, &cw) in windows.iter().zip(copy_in) {
            let wait = match last {
                Some((x, y)) if x == cw => y,
                _ => copy_in_wait(
                    &el.segment_seconds,
                    &need[..n],
                    ex.mlp_first_segment,
                    ex.lookahead,
                    link,
                    cw,
                ),
            };
            last = Some((cw, wait));
            let bound = bound_latency(swapped, link, w);
            out.exposed += bound.max(wait);
            out.bound += bound;
            out.wait += wait;
        }
        out
    }

    fn evaluate(&self, actions: &Actions) -> Result<Evaluation> {
        let c = self.costs;
        if actions.len() != c.layers.len() {
            return Err(invalid(
                "plan",
                format!("has {} layers, the costs {}", actions.len(), c.layers.len()),
            ));
        }
        let v = c.schedule.virtual_pipeline_size;
        let m = c.schedule.num_microbatches as f64;
        let (mut kept, mut host) = (vec![0.0; v], vec![0.0; v]);
        let mut ev = Evaluation {
            static_bytes: c.static_bytes,
            activation_bytes_keep_all: self.keep_all,
            ..Default::default()
        };
        let mut time = SwapTime::default();
        let mut swapped_total = 0.0;
        for (i, (lc, a)) in c.layers.iter().zip(actions).enumerate() {
            let e = layer_effect(lc, a)?;
            kept[lc.vpp_stage] += e.kept;
            host[lc.vpp_stage] += e.swapped;
            ev.transient_bytes = ev.transient_bytes.max(lc.transient_bytes + e.rebuilt);
            ev.recompute_seconds += m * e.seconds;
            ev.exchange_seconds += m * e.exchange;
            if e.swapped > 0.0 {
                if c.host_link_bytes_per_second <= 0.0 {
                    return Err(invalid(
                        "plan",
                        format!(
                            "layer {} swaps, but host_link_bytes_per_second is 0 (no host link)",
                            lc.layer
                        ),
                    ));
                }
                if self.windows[i].is_empty() {
                    // No host memory, so no replay: count every copy as exposed.
                    let all = m * 2.0 * e.swapped / c.host_link_bytes_per_second;
                    time.exposed += all;
                    time.bound += all;
                } else {
                    let t = self.swap_time(i, a, e.swapped);
                    time.exposed += t.exposed;
                    time.bound += t.bound;
                    time.wait += t.wait;
                }
                swapped_total += e.swapped;
            }
        }
        ev.activation_bytes = weighted(&self.mixes, &kept);
        ev.host_bytes = weighted(&self.mixes, &host);
        ev.peak_bytes = c.static_bytes + ev.activation_bytes + ev.transient_bytes;
        ev.swapped_bytes_per_step = m * swapped_total;
        let busy = if swapped_total > 0.0 {
            m * swapped_total / c.host_link_bytes_per_second
        } else {
            0.0
        };
        ev.swap_exposed_seconds = time.exposed.max(busy - self.compute);
        ev.swap_bound_seconds = time.bound.max(busy - self.compute);
        ev.swap_wait_seconds =
            (c.executor.is_some() && !self.copy_in.is_empty()).then_some(time.wait);
        ev.added_seconds = ev.recompute_seconds + ev.exchange_seconds + ev.swap_exposed_seconds;
        Ok(ev)
    }
}

/// The exact cost of a plan under the model.
pub fn evaluate(costs: &MemoryCosts, actions: &Actions) -> Result<Evaluation> {
    Ctx::new(costs)?.evaluate(actions)
}

/// Evaluates a given plan and refuses it when it cannot run: over `budget_bytes` (when given),
/// or swapping more than the host memory holds, or swapping without host memory.
pub fn check(
    costs: &MemoryCosts,
    actions: &Actions,
    budget_bytes: Option<f64>,
) -> Result<Evaluation> {
    let e = evaluate(costs, actions)?;
    if e.host_bytes > 0.0 && costs.host_bytes <= 0.0 {
        return Err(invalid(
            "plan",
            "swaps activations, but no host memory is given for them (host_bytes is 0)",
        ));
    }
    if e.host_bytes > costs.host_bytes * (1.0 + 1e-9) {
        return Err(invalid(
            "plan",
            format!(
                "swaps {} of activations to host memory, more than the {} given (host_bytes)",
                size(e.host_bytes),
                size(costs.host_bytes)
            ),
        ));
    }
    if let Some(b) = budget_bytes {
        if e.peak_bytes > b * (1.0 + 1e-9) {
            return Err(invalid(
                "plan",
                format!(
                    "its peak {} is over the budget of {}",
                    size(e.peak_bytes),
                    size(b)
                ),
            ));
        }
    }
    Ok(e)
}

/// The cheapest plan that takes the same action for a module in every layer, as Megatron's
/// static settings do, among the actions `opts` allows. Tries every combination over the
/// modules the layers have; `None` when none fits `opts.budget_bytes` (and the host memory).
pub fn solve_uniform(costs: &MemoryCosts, opts: &Options) -> Result<Option<Plan>> {
    let ctx = Ctx::new(costs)?;
    uniform(&ctx, opts)
}

fn uniform(ctx: &Ctx, opts: &Options) -> Result<Option<Plan>> {
    let costs = ctx.costs;
    let budget_bytes = opts.budget_bytes;
    let swap_ok =
        opts.allow_swap && costs.host_link_bytes_per_second > 0.0 && costs.host_bytes > 0.0;
    let allowed: Vec<Action> = Action::ALL
        .into_iter()
        .filter(|a| match a {
            Action::Keep => true,
            Action::Recompute => opts.allow_recompute,
            Action::Swap => swap_ok,
            Action::RecomputeExchange => opts.allow_recompute_exchange,
            Action::RecomputeLayer => false,
        })
        .collect();
    let mut present = [false; N_MODULES];
    for lc in &costs.layers {
        for (j, mc) in lc.modules.iter().enumerate() {
            present[j] |= mc.saved_bytes > 0.0 || mc.recompute_bytes() > 0.0;
        }
    }
    let mods: Vec<usize> = (0..N_MODULES).filter(|&j| present[j]).collect();
    let per: Vec<Vec<Action>> = (0..N_MODULES)
        .map(|j| {
            allowed
                .iter()
                .copied()
                .filter(|&a| a != Action::RecomputeExchange || j == EXCHANGE_MODULE)
                .collect()
        })
        .collect();
    let choices = |j: usize| -> &[Action] { &per[j] };
    let total: usize = mods.iter().map(|&j| choices(j).len()).product();
    let mut best: Option<Plan> = None;
    // Megatron's full recompute: every layer rebuilt from its input.
    let whole = opts.allow_recompute && costs.layers.iter().all(|l| l.input_bytes.is_some());
    let rows = (0..total).map(Some).chain(whole.then_some(None));
    for k in rows {
        let acts: Actions = match k {
            None => vec![[Action::RecomputeLayer; N_MODULES]; costs.layers.len()],
            Some(mut k) => {
                let mut row = [Action::Keep; N_MODULES];
                for &j in &mods {
                    let c = choices(j);
                    row[j] = c[k % c.len()];
                    k /= c.len();
                }
                costs
                    .layers
                    .iter()
                    .map(|lc| {
                        let mut r = row;
                        for (j, mc) in lc.modules.iter().enumerate() {
                            if effect(j, mc, r[j]).is_none() {
                                r[j] = Action::Keep;
                            }
                        }
                        r
                    })
                    .collect()
            }
        };
        let e = ctx.evaluate(&acts)?;
        if e.peak_bytes <= budget_bytes * (1.0 + 1e-9)
            && e.host_bytes <= costs.host_bytes * (1.0 + 1e-9)
            && best
                .as_ref()
                .is_none_or(|b| e.added_seconds < b.evaluation.added_seconds)
        {
            best = Some(Plan {
                actions: acts,
                evaluation: e,
                exact: false,
            });
        }
    }
    Ok(best)
}

/// Solver settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Options {
    /// Device memory the plan may use, bytes.
    pub budget_bytes: f64,
    /// Consider swapping to host memory (needs host memory and a host link).
    pub allow_swap: bool,
    /// Consider `recompute_exchange` for the expert inputs.
    pub allow_recompute_exchange: bool,
    /// Consider recomputation (off: swap only).
    pub allow_recompute: bool,
    /// Most points kept on a Pareto frontier; beyond it the frontier is thinned (and the result
    /// is no longer guaranteed optimal).
    pub frontier_limit: usize,
}

impl Options {
    pub fn new(budget_bytes: f64) -> Self {
        Options {
            budget_bytes,
            allow_swap: true,
            allow_recompute_exchange: true,
            allow_recompute: true,
            frontier_limit: 512,
        }
    }
}

/// A solved plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Actions,
    pub evaluation: Evaluation,
    /// True when no frontier was thinned or the plan adds no time: it is optimal for the model.
    pub exact: bool,
}

#[derive(Clone, Debug)]
struct LayerOption {
    actions: [Action; N_MODULES],
    /// Recompute and exchange seconds per step.
    seconds: f64,
    /// Swap seconds per step the layer's own windows do not hide.
    latency: f64,
    kept: f64,
    rebuilt: f64,
    swapped: f64,
}

fn layer_options(ctx: &Ctx, i: usize, opts: &Options) -> Vec<LayerOption> {
    let lc = &ctx.costs.layers[i];
    let link = ctx.costs.host_link_bytes_per_second;
    let swap_ok = opts.allow_swap && link > 0.0 && ctx.costs.host_bytes > 0.0;
    let m = ctx.costs.schedule.num_microbatches as f64;
    let mut out = vec![LayerOption {
        actions: [Action::Keep; N_MODULES],
        seconds: 0.0,
        latency: 0.0,
        kept: lc.other_saved_bytes,
        rebuilt: 0.0,
        swapped: 0.0,
    }];
    for (j, mc) in lc.modules.iter().enumerate() {
        // The actions that do something for this module.
        let mut acts = vec![(
            Action::Keep,
            effect(j, mc, Action::Keep).unwrap_or_default(),
        )];
        for a in [Action::Recompute, Action::Swap, Action::RecomputeExchange] {
            let allowed = match a {
                Action::Recompute => opts.allow_recompute,
                Action::Swap => swap_ok,
                Action::RecomputeExchange => opts.allow_recompute_exchange,
                Action::Keep | Action::RecomputeLayer => true,
            };
            if allowed {
                if let Some(e) = effect(j, mc, a) {
                    acts.push((a, e));
                }
            }
        }
        let mut next = Vec::with_capacity(out.len() * acts.len());
        for o in &out {
            for (a, e) in &acts {
                let mut n = o.clone();
                n.actions[j] = *a;
                n.kept += e.kept;
                n.rebuilt += e.rebuilt;
                n.swapped += e.swapped;
                n.seconds += m * (e.seconds + e.exchange);
                next.push(n);
            }
        }
        out = next;
    }
    if opts.allow_recompute {
        if let Some(e) = whole_layer(lc) {
            if e.kept < lc.saved_bytes() {
                out.push(LayerOption {
                    actions: [Action::RecomputeLayer; N_MODULES],
                    seconds: m * e.seconds,
                    latency: 0.0,
                    kept: e.kept,
                    rebuilt: e.rebuilt,
                    swapped: 0.0,
                });
            }
        }
    }
    for o in &mut out {
        o.kept = o.kept.max(0.0);
        if o.swapped > 0.0 {
            o.latency = ctx.swap_time(i, &o.actions, o.swapped).exposed;
        }
    }
    out
}

/// One partial plan over layers `0..=k`: its criteria (`[seconds, latency, transient,
/// kept per chunk.., swapped per chunk..]`, all to be minimised, and every constraint and the
/// objective grow with each), the option picked at layer `k` and the point it extends.
#[derive(Clone, Debug)]
struct Point {
    key: Vec<f64>,
    option: u32,
    parent: u32,
}

fn dominates(a: &[f64], b: &[f64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x <= y)
}

/// Keeps the points no other point dominates (ties: one of them). Beyond `limit` points, keeps
/// the cheapest in each of `limit` buckets of `size(key)`; returns whether it had to.
fn pareto(points: Vec<Point>, limit: usize, size: impl Fn(&[f64]) -> f64) -> (Vec<Point>, bool) {
    let mut points = points;
    points.sort_by(|a, b| {
        (a.key[0] + a.key[1])
            .total_cmp(&(b.key[0] + b.key[1]))
            .then_with(|| {
                a.key
                    .iter()
                    .zip(&b.key)
                    .map(|(x, y)| x.total_cmp(y))
                    .find(|o| o.is_ne())
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
    });
    let mut out: Vec<Point> = Vec::with_capacity(points.len().min(limit.saturating_mul(2)));
    for p in points {
        if !out.iter().any(|q| dominates(&q.key, &p.key)) {
            out.push(p);
        }
    }
    if out.len() <= limit {
        return (out, false);
    }
    let sizes: Vec<f64> = out.iter().map(|p| size(&p.key)).collect();
    let lo = sizes.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = sizes.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let step = ((hi - lo) / limit as f64).max(f64::MIN_POSITIVE);
    let mut taken = vec![false; limit + 1];
    let mut kept = Vec::with_capacity(limit + 1);
    // `out` is in cost order: the first point of a bucket is its cheapest.
    for (p, sz) in out.into_iter().zip(sizes) {
        let b = (((sz - lo) / step) as usize).min(limit);
        if !taken[b] {
            taken[b] = true;
            kept.push(p);
        }
    }
    (kept, true)
}

/// The fast frontier for large merges: undominated in (cost, transient, `size`) only — the
/// bound every in-flight mix meets — then thinned to `limit`. Not exact (another criterion
/// may have kept a point); the caller marks the result so.
fn pareto_fast(points: Vec<Point>, limit: usize, size: impl Fn(&[f64]) -> f64) -> Vec<Point> {
    let mut pts: Vec<(f64, f64, f64, Point)> = points
        .into_iter()
        .map(|p| (p.key[0] + p.key[1], p.key[2], size(&p.key), p))
        .collect();
    pts.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then(a.1.total_cmp(&b.1))
            .then(a.2.total_cmp(&b.2))
    });
    let mut ts: Vec<f64> = pts.iter().map(|p| p.1).collect();
    ts.sort_by(f64::total_cmp);
    ts.dedup();
    // Fenwick tree of prefix minima of size over the transient's rank.
    let n = ts.len();
    let mut tree = vec![f64::INFINITY; n + 1];
    let mut out = Vec::new();
    for (_, t, sz, p) in pts {
        let r = ts.partition_point(|&x| x < t) + 1;
        let mut i = r;
        let mut best = f64::INFINITY;
        while i > 0 {
            best = best.min(tree[i]);
            i &= i - 1;
        }
        if best <= sz {
            continue;
        }
        let mut i = r;
        while i <= n {
            tree[i] = tree[i].min(sz);
            i += i & i.wrapping_neg();
        }
        out.push(p);
    }
    if out.len() <= limit {
        return out;
    }
    let sizes: Vec<f64> = out.iter().map(|p| size(&p.key) + p.key[2]).collect();
    let lo = sizes.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = sizes.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let step = ((hi - lo) / limit as f64).max(f64::MIN_POSITIVE);
    let mut taken = vec![false; limit + 1];
    let mut kept = Vec::with_capacity(limit + 1);
    for (p, sz) in out.into_iter().zip(sizes) {
        let b = (((sz - lo) / step) as usize).min(limit);
        if !taken[b] {
            taken[b] = true;
            kept.push(p);
        }
    }
    kept
}

/// Above this many candidates a merge uses [`pareto_fast`].
const EXACT_MERGE: usize = 40_000;

struct Solved {
    actions: Actions,
    evaluation: Evaluation,
}

/// The multiple-choice knapsack over layers, by Pareto frontiers: every partial plan no other
/// beats in every criterion, partial plans over the device or host budget dropped. Returns
/// the cheapest complete plan by the exact model, or `None`; sets `thinned`.
fn knapsack(
    ctx: &Ctx,
    options: &[Vec<LayerOption>],
    budget: f64,
    host_cap: f64,
    limit: usize,
    thinned: &mut bool,
) -> Result<Option<Solved>> {
    let c = ctx.costs;
    let v = c.schedule.virtual_pipeline_size;
    let dims = 3 + 2 * v;
    let mixes: Vec<Vec<f64>> = ctx
        .mixes
        .iter()
        .map(|m| m.iter().map(|&n| n as f64).collect())
        .collect();
    let worst = |xs: &[f64]| -> f64 {
        mixes
            .iter()
            .map(|m| m.iter().zip(xs).map(|(n, x)| n * x).sum::<f64>())
            .fold(0.0, f64::max)
    };
    let over = |key: &[f64]| -> bool {
        c.static_bytes + key[2] + worst(&key[3..3 + v]) > budget * (1.0 + 1e-9)
            || worst(&key[3 + v..]) > host_cap * (1.0 + 1e-9)
    };
    let size = |key: &[f64]| key[2] + worst(&key[3..3 + v]);
    // Criteria that cannot bind are left at 0, so they do not split the frontiers: the swapped
    // bytes matter only when the host memory or the link's busy time can bind, the latency
    // apart from the recompute seconds only when the link's busy time can.
    let m = c.schedule.num_microbatches as f64;
    let link = c.host_link_bytes_per_second;
    let mut max_swapped = vec![0.0; v];
    for (lc, os) in c.layers.iter().zip(options) {
        max_swapped[lc.vpp_stage] += os.iter().map(|o| o.swapped).fold(0.0, f64::max);
    }
    let total_swapped: f64 = max_swapped.iter().sum();
    let busy_binds = total_swapped > 0.0 && m * total_swapped / link > ctx.compute;
    let host_binds = worst(&max_swapped) > host_cap * (1.0 + 1e-9);
    let track_swapped = busy_binds || host_binds;
    let mut levels: Vec<Vec<Point>> = Vec::with_capacity(c.layers.len() + 1);
    levels.push(vec![Point {
        key: vec![0.0; dims],
        option: 0,
        parent: 0,
    }]);
    for (i, lc) in c.layers.iter().enumerate() {
        let ch = lc.vpp_stage;
        // The layer's own undominated options first.
        let own: Vec<Point> = options[i]
            .iter()
            .enumerate()
            .map(|(k, o)| {
                let mut key = vec![0.0; dims];
                if busy_binds {
                    key[0] = o.seconds;
                    key[1] = o.latency;
                } else {
                    key[0] = o.seconds + o.latency;
                }
                key[2] = o.rebuilt + lc.transient_bytes;
                key[3 + ch] = o.kept;
                if track_swapped {
                    key[3 + v + ch] = o.swapped;
                }
                Point {
                    key,
                    option: k as u32,
                    parent: 0,
                }
            })
            .collect();
        let (own, _) = pareto(own, usize::MAX, size);
        let prev = levels.last().expect("the first level is there");
        let mut next = Vec::with_capacity(prev.len() * own.len());
        for (pi, p) in prev.iter().enumerate() {
            for o in &own {
                let mut key = p.key.clone();
                key[0] += o.key[0];
                key[1] += o.key[1];
                key[2] = key[2].max(o.key[2]);
                for (k, x) in key.iter_mut().zip(&o.key).skip(3) {
                    *k += x;
                }
                if !over(&key) {
                    next.push(Point {
                        key,
                        option: o.option,
                        parent: pi as u32,
                    });
                }
            }
        }
        if next.is_empty() {
            return Ok(None);
        }
        let next = if next.len() > EXACT_MERGE {
            *thinned = true;
            // Bound every mix by the per-chunk maxima of the in-flight counts.
            let safe: Vec<f64> = (0..v)
                .map(|ch| mixes.iter().map(|m| m[ch]).fold(0.0, f64::max))
                .collect();
            pareto_fast(next, limit, |k: &[f64]| {
                k[3..3 + v]
                    .iter()
                    .zip(&safe)
                    .map(|(x, w)| x * w)
                    .sum::<f64>()
            })
        } else {
            let (next, t) = pareto(next, limit, size);
            *thinned |= t;
            next
        };
        levels.push(next);
    }
    // The exact objective of each complete plan: recompute + the larger of the unhidden copy
    // latency and the link's busy time beyond the compute.
    let last = levels.last().expect("one level per layer");
    let objective = |key: &[f64]| -> f64 {
        let swapped: f64 = key[3 + v..].iter().sum();
        let busy = if swapped > 0.0 {
            m * swapped / link
        } else {
            0.0
        };
        key[0] + key[1].max(busy - ctx.compute)
    };
    let Some((mut idx, _)) = last
        .iter()
        .enumerate()
        .min_by(|a, b| objective(&a.1.key).total_cmp(&objective(&b.1.key)))
    else {
        return Ok(None);
    };
    let mut actions = vec![[Action::Keep; N_MODULES]; c.layers.len()];
    for i in (0..c.layers.len()).rev() {
        let p = &levels[i + 1][idx];
        actions[i] = options[i][p.option as usize].actions;
        idx = p.parent as usize;
    }
    let evaluation = ctx.evaluate(&actions)?;
    Ok(Some(Solved {
        actions,
        evaluation,
    }))
}

/// The plan that minimises the exposed time under `opts.budget_bytes`.
///
/// Errors (`InvalidArgument`, naming the argument): a budget at or below the static bytes, a
/// budget above the device, a budget no plan reaches (the message gives the least reachable
/// peak), swaps that need more host memory than given.
pub fn solve(costs: &MemoryCosts, opts: &Options) -> Result<Plan> {
    let ctx = Ctx::new(costs)?;
    let budget = opts.budget_bytes;
    if !budget.is_finite() || budget <= 0.0 {
        return Err(invalid(
            "budget_bytes",
            format!("expected a positive number of bytes, got {budget}"),
        ));
    }
    if budget > costs.device_bytes * (1.0 + 1e-9) {
        return Err(invalid(
            "budget_bytes",
            format!(
                "{} is more than the device's {}",
                size(budget),
                size(costs.device_bytes)
            ),
        ));
    }
    if budget <= costs.static_bytes {
        return Err(invalid(
            "budget_bytes",
            format!(
                "{} is not above what the weights, gradients and optimizer state take on this device ({})",
                size(budget),
                size(costs.static_bytes)
            ),
        ));
    }
    let options: Vec<Vec<LayerOption>> = (0..costs.layers.len())
        .map(|i| layer_options(&ctx, i, opts))
        .collect();
    let mut thinned = false;
    let limit = opts.frontier_limit.max(16);
    let host_cap = costs.host_bytes;
    let mut best = knapsack(&ctx, &options, budget, host_cap, limit, &mut thinned)?;
    if thinned {
        // The frontier was thinned: start from the better of it and the best uniform plan
        // (so the result never loses to one of Megatron's static settings), then polish by
        // changing one layer at a time.
        if let Some(u) = uniform(&ctx, opts)? {
            if best
                .as_ref()
                .is_none_or(|b| u.evaluation.added_seconds < b.evaluation.added_seconds)
            {
                best = Some(Solved {
                    actions: u.actions,
                    evaluation: u.evaluation,
                });
            }
        }
        if let Some(b) = best.as_mut() {
            local_search(&ctx, &options, budget, host_cap, b)?;
        }
    }
    if let Some(b) = best.as_mut() {
        tie_break(&ctx, &options, budget, host_cap, b)?;
    }
    match best {
        Some(s) => Ok(Plan {
            actions: s.actions,
            evaluation: s.evaluation,
            // Nothing adds less than no time, thinned or not.
            exact: !thinned || s.evaluation.added_seconds <= 0.0,
        }),
        None => {
            let mut t = false;
            let no_host_limit = knapsack(&ctx, &options, budget, f64::INFINITY, limit, &mut t)?;
            if no_host_limit.is_some() {
                return Err(unreachable(
                    "host_bytes",
                    format!(
                        "the plans that reach {} swap more than the {} of host memory given",
                        size(budget),
                        size(host_cap)
                    ),
                ));
            }
            let least = min_peak(&ctx, &options)?;
            let recompute = opts.allow_recompute || opts.allow_recompute_exchange;
            let swap = opts.allow_swap && costs.host_bytes > 0.0;
            let most = match (recompute, swap) {
                (true, true) => "everything recomputed or swapped",
                (true, false) => "everything recomputed",
                (false, true) => "everything swapped",
                (false, false) => "everything kept (recompute and swap not allowed)",
            };
            Err(unreachable(
                "budget_bytes",
                format!(
                    "{} cannot be reached: the least this device needs is {} ({} static + activations with {most})",
                    size(budget),
                    size(least),
                    size(costs.static_bytes),
                ),
            ))
        }
    }
}

/// How many of a layer's module actions Megatron-Core's flags cannot express (and
/// `apply_memory_plan` leaves to them): a swap of the router, the shared expert or the
/// permute / fc2 / unpermute buffers, of MLA's up-projections without core attention (whose
/// offload moves both), the router or the expert inputs recomputed outside the whole MoE block
/// (`moe`), a recompute of the permute / fc2 / unpermute buffers.
pub fn inexpressible(a: &[Action; N_MODULES]) -> u32 {
    use Action::*;
    if a.iter().all(|&x| x == RecomputeLayer) {
        return 0;
    }
    let moe_block =
        a[2] == Recompute && a[EXCHANGE_MODULE] == RecomputeExchange && a[5] == Recompute;
    let mut n = 0;
    for (j, &x) in a.iter().enumerate() {
        let bad = match (MODULES[j], x) {
            (_, Keep) => false,
            ("layernorm" | "attention" | "expert_fc1" | "expert_act", Swap) => false,
            ("mla_up_proj", Swap) => a[1] != Swap,
            (_, Swap) => true,
            (
                "layernorm" | "attention" | "expert_act" | "shared_expert" | "mla_up_proj",
                Recompute,
            ) => false,
            ("router", Recompute) | ("expert_fc1", RecomputeExchange) => !moe_block,
            _ => true,
        };
        n += bad as u32;
    }
    n
}

fn non_keep(a: &[Action; N_MODULES]) -> u32 {
    if a.iter().all(|&x| x == Action::RecomputeLayer) {
        return 1;
    }
    a.iter().filter(|&&x| x != Action::Keep).count() as u32
}

/// Among the plans that fit and add no more time than `best` (within a relative 1e-10, at least
/// 1e-12 s), moves one layer at a time to the plan with fewer actions Megatron cannot express,
/// then fewer actions, then less host memory; deterministic (layers and options in order).
fn tie_break(
    ctx: &Ctx,
    options: &[Vec<LayerOption>],
    budget: f64,
    host_cap: f64,
    best: &mut Solved,
) -> Result<()> {
    let limit = best.evaluation.added_seconds + (best.evaluation.added_seconds * 1e-10).max(1e-12);
    let score = |acts: &Actions| -> (u32, u32) {
        acts.iter()
            .fold((0, 0), |(p, n), a| (p + inexpressible(a), n + non_keep(a)))
    };
    let mut cur = score(&best.actions);
    for _round in 0..16 {
        let mut improved = false;
        for (i, os) in options.iter().enumerate() {
            let mine = (inexpressible(&best.actions[i]), non_keep(&best.actions[i]));
            for o in os {
                let theirs = (inexpressible(&o.actions), non_keep(&o.actions));
                if theirs > mine || o.actions == best.actions[i] {
                    continue;
                }
                let mut trial = best.actions.clone();
                trial[i] = o.actions;
                let sc = score(&trial);
                if sc > cur {
                    continue;
                }
                let e = ctx.evaluate(&trial)?;
                let better = sc < cur || e.host_bytes < best.evaluation.host_bytes * (1.0 - 1e-9);
                if better
                    && e.peak_bytes <= budget * (1.0 + 1e-9)
                    && e.host_bytes <= host_cap * (1.0 + 1e-9)
                    && e.added_seconds <= limit
                {
                    best.actions = trial;
                    best.evaluation = e;
                    cur = sc;
                    improved = true;
                    break;
                }
            }
        }
        if !improved {
            break;
        }
    }
    Ok(())
}

fn local_search(
    ctx: &Ctx,
    options: &[Vec<LayerOption>],
    budget: f64,
    host_cap: f64,
    best: &mut Solved,
) -> Result<()> {
    for _round in 0..8 {
        let mut improved = false;
        for (i, os) in options.iter().enumerate() {
            for o in os {
                if o.actions == best.actions[i] {
                    continue;
                }
                let mut trial = best.actions.clone();
                trial[i] = o.actions;
                let e = ctx.evaluate(&trial)?;
                if e.peak_bytes <= budget * (1.0 + 1e-9)
                    && e.host_bytes <= host_cap * (1.0 + 1e-9)
                    && e.added_seconds < best.evaluation.added_seconds * (1.0 - 1e-12)
                {
                    best.actions = trial;
                    best.evaluation = e;
                    improved = true;
                }
            }
        }
        if !improved {
            break;
        }
    }
    Ok(())
}

/// The least peak any plan reaches (everything that frees memory, trying every transient
/// cap), host memory ignored.
fn min_peak(ctx: &Ctx, options: &[Vec<LayerOption>]) -> Result<f64> {
    let costs = ctx.costs;
    let mut ts: Vec<f64> = costs
        .layers
        .iter()
        .zip(options)
        .flat_map(|(lc, os)| os.iter().map(move |o| o.rebuilt + lc.transient_bytes))
        .collect();
    ts.sort_by(f64::total_cmp);
    ts.dedup();
    let mut least = f64::INFINITY;
    for t in ts {
        let mut acts = Vec::with_capacity(costs.layers.len());
        let mut ok = true;
        for (lc, os) in costs.layers.iter().zip(options) {
            match os
                .iter()
                .filter(|o| o.rebuilt + lc.transient_bytes <= t)
                .min_by(|a, b| a.kept.total_cmp(&b.kept))
            {
                Some(o) => acts.push(o.actions),
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            least = least.min(ctx.evaluate(&acts)?.peak_bytes);
        }
    }
    Ok(least)
}

/// Every plan, evaluated (tests: the optimum on small cases). `None` when none fits.
pub fn exhaustive(costs: &MemoryCosts, opts: &Options) -> Result<Option<Plan>> {
    let ctx = Ctx::new(costs)?;
    let options: Vec<Vec<LayerOption>> = (0..costs.layers.len())
        .map(|i| layer_options(&ctx, i, opts))
        .collect();
    let total: usize = options.iter().map(|o| o.len()).product();
    if total > 5_000_000 {
        return Err(invalid("costs", "too many plans for exhaustive search"));
    }
    let mut idx = vec![0usize; options.len()];
    let mut best: Option<Plan> = None;
    loop {
        let acts: Actions = idx
            .iter()
            .zip(&options)
            .map(|(&k, o)| o[k].actions)
            .collect();
        let e = ctx.evaluate(&acts)?;
        if e.peak_bytes <= opts.budget_bytes * (1.0 + 1e-9)
            && e.host_bytes <= costs.host_bytes * (1.0 + 1e-9)
            && best
                .as_ref()
                .is_none_or(|b| e.added_seconds < b.evaluation.added_seconds)
        {
            best = Some(Plan {
                actions: acts,
                evaluation: e,
                exact: true,
            });
        }
        // Next combination.
        let mut k = 0;
        loop {
            if k == idx.len() {
                return Ok(best);
            }
            idx[k] += 1;
            if idx[k] < options[k].len() {
                break;
            }
            idx[k] = 0;
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests;
