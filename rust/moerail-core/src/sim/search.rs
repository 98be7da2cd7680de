//! Layout search: enumerate the valid layouts of a model on a number of devices (attention
//! TP x CP x DP x PP folded with expert ETP x EP x EDP x PP, virtual pipeline, micro-batch
//! size, recomputation), simulate each, keep the fastest that fit.

use rayon::prelude::*;

use crate::error::{ensure, Result};
use crate::sim::config::{Recompute, RecomputeMethod, RecomputeModules, SimConfig};
use crate::sim::{simulate, Evaluation};
use crate::util::pool;

/// Recomputation choices the search tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecomputeChoice {
    None,
    /// Norms and expert activations (plus MLA up-projections on MLA models).
    Light,
    /// Also core attention and shared experts.
    Heavy,
    /// Full, uniform, one layer per checkpoint.
    Full,
    /// The memory planner's cheapest plan that fits (`crate::memory`): nothing when the layout
    /// fits as it is, else per-module recompute chosen by exposed time per byte.
    Plan,
}

impl RecomputeChoice {
    pub const ALL: [RecomputeChoice; 4] = [
        RecomputeChoice::None,
        RecomputeChoice::Light,
        RecomputeChoice::Heavy,
        RecomputeChoice::Full,
    ];

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "light" | "selective" => Ok(Self::Light),
            "heavy" => Ok(Self::Heavy),
            "full" => Ok(Self::Full),
            "plan" => Ok(Self::Plan),
            other => Err(crate::error::invalid(
                "recompute",
                format!("unknown choice '{other}' (expected plan, none, light, heavy or full)"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Light => "light",
            Self::Heavy => "heavy",
            Self::Full => "full",
            Self::Plan => "plan",
        }
    }

    fn apply(self, cfg: &mut SimConfig) {
        let t = &mut cfg.training;
        let mla = cfg.model.multi_latent_attention;
        match self {
            Self::None | Self::Plan => t.recompute_granularity = Recompute::None,
            Self::Light | Self::Heavy => {
                t.recompute_granularity = Recompute::Selective;
                t.recompute_modules = RecomputeModules {
                    layernorm: true,
                    moe_act: true,
                    mla_up_proj: mla,
                    core_attn: self == Self::Heavy,
                    shared_experts: self == Self::Heavy,
                    ..Default::default()
                };
            }
            Self::Full => {
                t.recompute_granularity = Recompute::Full;
                t.recompute_method = RecomputeMethod::Uniform;
                t.recompute_num_layers = Some(1);
            }
        }
    }
}

/// One point of the search space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub tp: usize,
    pub cp: usize,
    pub pp: usize,
    pub vpp: usize,
    pub ep: usize,
    pub etp: usize,
    pub mbs: usize,
    pub recompute: RecomputeChoice,
    /// Uneven pipeline: layers on the first and last stage (0 = even split).
    pub first: usize,
    pub last: usize,
    /// Count the embedding and the loss as one layer each in the pipeline split.
    pub account: bool,
    /// Place the layers (and MTP layers) by a [`padded_layout`] of `pp * vpp` equal chunks,
    /// the spare slots no-op layers.
    pub padded: bool,
}

impl Candidate {
    /// `base` with this layout applied.
    pub fn apply(&self, base: &SimConfig) -> SimConfig {
        let mut c = base.clone();
        let p = &mut c.parallel;
        p.tp = self.tp;
        p.cp = self.cp;
        p.pp = self.pp;
        p.vpp = if self.vpp > 1 { Some(self.vpp) } else { None };
        p.num_layers_per_virtual_pipeline_stage = None;
        p.ep = self.ep;
        p.etp = Some(self.etp);
        p.decoder_first_pipeline_num_layers = (self.first > 0).then_some(self.first);
        p.decoder_last_pipeline_num_layers = (self.last > 0).then_some(self.last);
        p.account_for_embedding_in_pipeline_split = self.account;
        p.account_for_loss_in_pipeline_split = self.account;
        p.pipeline_model_parallel_layout = if self.padded {
            padded_layout(
                c.model.num_layers,
                c.model.mtp_num_layers,
                self.pp,
                self.vpp,
            )
        } else {
            None
        };
        c.training.micro_batch_size = self.mbs;
        self.recompute.apply(&mut c);
        c
    }
}

/// Which values each dimension may take (empty = moerail's defaults).
#[derive(Clone, Debug, Default)]
pub struct Space {
    pub tp: Vec<usize>,
    pub cp: Vec<usize>,
    pub pp: Vec<usize>,
    pub vpp: Vec<usize>,
    pub ep: Vec<usize>,
    pub etp: Vec<usize>,
    pub mbs: Vec<usize>,
    pub recompute: Vec<RecomputeChoice>,
}

fn pow2_upto(n: usize) -> Vec<usize> {
    let mut v = vec![1];
    while v.last().unwrap() * 2 <= n {
        v.push(v.last().unwrap() * 2);
    }
    v
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n % d == 0).collect()
}

/// `(first, last)` layer counts of an uneven split of `layers` over `pp` stages whose middle
/// stages carry `ceil(layers / pp)` or more layers, lighter ends (Megatron's
/// `decoder_first/last_pipeline_num_layers`); `None` when no such split exists.
pub fn uneven_split(layers: usize, pp: usize) -> Option<(usize, usize)> {
    if pp == 2 && layers >= 2 {
        return Some((layers - layers / 2, layers / 2));
    }
    if pp < 3 {
        return None;
    }
    let mid = pp - 2;
    (layers.div_ceil(pp)..=layers / mid).find_map(|q| {
        let rest = layers.checked_sub(q * mid)?;
        let last = rest / 2;
        let first = rest - last;
        (last >= 1 && first <= q).then_some((first, last))
    })
}

/// A `pipeline_model_parallel_layout` putting `layers` transformer layers and `mtp` MTP layers
/// on `pp * vpp` chunks of equal slots, as a run pads its layers with no-op layers (Pangu Ultra
/// MoE: 61 layers + MTP on PP16 x VPP2 x 2 slots): the spare slots are taken from the last
/// chunk (which also holds the output layer and loss) down to its MTP layers, then from the
/// chunks before it, from the end. `None`
/// when the layers fill the slots exactly or the padding does not fit.
pub fn padded_layout(layers: usize, mtp: usize, pp: usize, vpp: usize) -> Option<String> {
    let chunks = pp * vpp.max(1);
    let total = layers + mtp;
    if pp < 2 || chunks < 3 || total < chunks {
        return None;
    }
    let k = total.div_ceil(chunks);
    let pad = chunks * k - total;
    if pad == 0 || pad > chunks - 2 || k <= mtp {
        return None;
    }
    // The last chunk (output layer, loss, MTP) sheds its spare slots first, down to its MTP
    // layers; the rest come off the chunks before it, from the end.
    let mut counts = vec![k; chunks];
    let from_last = pad.min(k - mtp.max(1).min(k));
    counts[chunks - 1] -= from_last;
    for c in counts.iter_mut().rev().skip(1).take(pad - from_last) {
        *c -= 1;
    }
    let mut out = String::with_capacity(total + 2 * chunks);
    let mut placed = 0;
    for (i, &n) in counts.iter().enumerate() {
        if i > 0 {
            out.push('|');
        } else {
            out.push('E');
        }
        for _ in 0..n {
            out.push(if placed < layers { 't' } else { 'm' });
            placed += 1;
        }
    }
    out.push('L');
    Some(out)
}

/// Every candidate of `space` that passes the cheap divisibility checks.
pub fn enumerate(base: &SimConfig, space: &Space) -> Result<Vec<Candidate>> {
    let world = base.world_size()?;
    let m = &base.model;
    let t = &base.training;
    let dpn = base.cluster.devices_per_node;
    let or = |v: &Vec<usize>, d: Vec<usize>| if v.is_empty() { d } else { v.clone() };
    let tps = or(&space.tp, pow2_upto(dpn.min(world)));
    let cps = or(&space.cp, pow2_upto((t.seq_length / 2048).clamp(1, 32)));
    let pps = or(
        &space.pp,
        divisors(world)
            .into_iter()
            .filter(|&p| p <= m.num_layers)
            .collect(),
    );
    let eps = if m.is_moe() {
        or(
            &space.ep,
            divisors(m.experts())
                .into_iter()
                .filter(|e| world % e == 0)
                .collect(),
        )
    } else {
        vec![1]
    };
    let etps = if m.is_moe() {
        or(&space.etp, pow2_upto(dpn.min(world)))
    } else {
        vec![0]
    };
    let mbss = or(&space.mbs, vec![1, 2, 4]);
    let recs = if space.recompute.is_empty() {
        vec![RecomputeChoice::Plan]
    } else {
        space.recompute.clone()
    };
    let heads = m.num_attention_heads;
    let groups = if m.multi_latent_attention {
        heads
    } else {
        m.query_groups()
    };
    let mut out = Vec::new();
    for &tp in &tps {
        if world % tp != 0 || heads % tp != 0 || groups % tp != 0 || m.ffn() % tp != 0 {
            continue;
        }
        for &cp in &cps {
            if cp > 1 && t.seq_length % (2 * cp * tp) != 0 {
                continue;
            }
            for &pp in &pps {
                let model_par = tp * cp * pp;
                if world % model_par != 0 {
                    continue;
                }
                let dp = world / model_par;
                // Even split; else count embedding and loss as layers when that evens it
                // out (Megatron's account_for_*_in_pipeline_split); else lighter end stages.
                let (first, last, account) = if m.num_layers % pp == 0 {
                    (0, 0, false)
                } else if pp > 1 && (m.num_layers + 2) % pp == 0 && (m.num_layers + 2) / pp > 1 {
                    (0, 0, true)
                } else {
                    match uneven_split(m.num_layers, pp) {
                        Some((f, l)) => (f, l, false),
                        None => continue,
                    }
                };
                let per_stage = if first > 0 {
                    0
                } else {
                    (m.num_layers + 2 * usize::from(account)) / pp
                };
                let vpps: Vec<usize> = if !space.vpp.is_empty() {
                    space.vpp.clone()
                } else if pp > 1 && per_stage > 1 {
                    divisors(per_stage)
                } else {
                    vec![1]
                };
                // Layers that do not split evenly may also be padded with no-op layers to
                // equal chunks (with interleaving where the chunks allow it).
                let mut shapes: Vec<(usize, bool)> = vpps.iter().map(|&v| (v, false)).collect();
                if pp > 1 && (first > 0 || account) {
                    let total = m.num_layers + m.mtp_num_layers;
                    let vs: Vec<usize> = if space.vpp.is_empty() {
                        (1..=(total / pp).min(4)).collect()
                    } else {
                        space.vpp.clone()
                    };
                    shapes.extend(
                        vs.into_iter()
                            .filter(|&v| {
                                padded_layout(m.num_layers, m.mtp_num_layers, pp, v).is_some()
                            })
                            .map(|v| (v, true)),
                    );
                }
                for &(vpp, padded) in &shapes {
                    if !padded && vpp > 1 && (pp == 1 || per_stage == 0 || per_stage % vpp != 0) {
                        continue;
                    }
                    let (first, last, account) = if padded {
                        (0, 0, false)
                    } else {
                        (first, last, account)
                    };
                    for &ep in &eps {
                        for &etp in &etps {
                            let etp = if m.is_moe() { etp } else { tp };
                            if m.is_moe() && (m.moe_ffn() % etp != 0) {
                                continue;
                            }
                            if world % (etp * ep * pp) != 0 {
                                continue;
                            }
                            for &mbs in &mbss {
                                if t.global_batch_size % (mbs * dp) != 0 {
                                    continue;
                                }
                                let nmb = t.global_batch_size / (mbs * dp);
                                if vpp > 1 && nmb % pp != 0 {
                                    continue;
                                }
                                for &recompute in &recs {
                                    out.push(Candidate {
                                        tp,
                                        cp,
                                        pp,
                                        vpp,
                                        ep,
                                        etp,
                                        mbs,
                                        recompute,
                                        first,
                                        last,
                                        account,
                                        padded,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// A ranked result.
#[derive(Clone, Debug)]
pub struct Ranked {
    pub candidate: Candidate,
    pub evaluation: Evaluation,
}

/// Counts of a search.
/// The `plan` choice: the memory planner's uniform plan, or Megatron's `light` selective
/// recompute where the engine predicts it faster (the planner's `attention` module holds core
/// attention and the MLA up-projections together, so it cannot recompute the up-projections
/// alone as `light` does on MLA models).
///
/// `bound`: the tokens/s a layout must beat to enter the ranking. Recompute only adds time, so a
/// layout that does not fit and whose keep-all tokens/s is already below it cannot rank; it is
/// not planned (`Ok(None)`), which keeps the search fast without changing what it returns.
fn plan_or_light(cfg: &SimConfig, bound: Option<f64>) -> Result<Option<Evaluation>> {
    let eng = crate::sim::engine::Engine::new(cfg)?;
    let keep_all = crate::sim::simulate_engine(&eng)?;
    if keep_all.fits {
        return Ok(Some(keep_all));
    }
    if bound.is_some_and(|b| keep_all.tokens_per_s < b) {
        return Ok(None);
    }
    let (e, _) = crate::sim::memory::plan_evaluation_from(&eng, keep_all)?;
    let mut light = cfg.clone();
    RecomputeChoice::Light.apply(&mut light);
    match crate::sim::simulate_engine(&eng.with_recompute(&light)) {
        Ok(l) if l.fits && (!e.fits || l.tokens_per_s > e.tokens_per_s) => Ok(Some(l)),
        _ => Ok(Some(e)),
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SearchStats {
    pub candidates: usize,
    pub evaluated: usize,
    pub invalid: usize,
    pub fit: usize,
    /// Layouts that did not fit without recompute and were not planned: even keeping every
    /// activation they were slower than the `top` already found (see `plan_or_light`).
    pub pruned: usize,
    pub seconds: f64,
}

/// Simulates every candidate (in parallel) and returns the `top` fastest that fit in memory
/// (or, with `include_oom`, the fastest regardless). `progress(done, total)` is called
/// between chunks; returning `false` stops the search early.
///
/// Two passes, so that the memory planner (the `plan` choice) runs only where it can matter:
/// first every layout keeping all activations (what fits is final), then the `plan` layouts that
/// did not fit, fastest first, each planned only while its keep-all speed can still reach the
/// ranking (recompute only adds time). The bound moves between fixed-size chunks, so the result
/// does not depend on the thread count, and it is the one planning every layout would give.
pub fn search(
    base: &SimConfig,
    candidates: &[Candidate],
    top: usize,
    include_oom: bool,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<(Vec<Ranked>, SearchStats)> {
    ensure(top >= 1, "top", || "must be >= 1".into())?;
    let start = std::time::Instant::now();
    let total = candidates.len();
    let mut stats = SearchStats {
        candidates: total,
        ..Default::default()
    };
    let mut best: Vec<Ranked> = Vec::new();
    let mut pending: Vec<(Candidate, f64)> = Vec::new();
    for part in candidates.chunks(4096) {
        let results: Vec<Option<FirstPass>> =
            pool::install(|| part.par_iter().map(|c| first_pass(base, c)).collect());
        for r in results {
            match r {
                None => {
                    stats.evaluated += 1;
                    stats.invalid += 1;
                }
                Some(FirstPass::Done(c, e)) => {
                    stats.evaluated += 1;
                    record(&mut stats, &mut best, c, *e, include_oom);
                }
                Some(FirstPass::Plan(c, keep_all_tokens_per_s)) => {
                    pending.push((c, keep_all_tokens_per_s))
                }
            }
        }
        rank(&mut best, top);
        if !progress(stats.evaluated, total) {
            stats.seconds = start.elapsed().as_secs_f64();
            return Ok((best, stats));
        }
    }
    // Stable: equal speeds keep the candidates' order.
    pending.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (pi, part) in pending.chunks(256).enumerate() {
        let bound =
            (!include_oom && best.len() >= top).then(|| best[top - 1].evaluation.tokens_per_s);
        if bound.is_some_and(|b| part[0].1 < b) {
            // Sorted: no layout left can rank.
            let left = pending.len() - pi * 256;
            stats.evaluated += left;
            stats.pruned += left;
            progress(stats.evaluated, total);
            break;
        }
        let results: Vec<Option<(Candidate, Option<Evaluation>)>> = pool::install(|| {
            part.par_iter()
                .map(|(c, _)| plan_or_light(&c.apply(base), bound).ok().map(|e| (*c, e)))
                .collect()
        });
        for r in results {
            stats.evaluated += 1;
            match r {
                None => stats.invalid += 1,
                Some((_, None)) => stats.pruned += 1,
                Some((c, Some(e))) => record(&mut stats, &mut best, c, e, include_oom),
            }
        }
        rank(&mut best, top);
        if !progress(stats.evaluated, total) {
            break;
        }
    }
    stats.seconds = start.elapsed().as_secs_f64();
    Ok((best, stats))
}

/// A layout's first-pass result: final, or (the `plan` choice, not fitting while keeping every
/// activation) its keep-all tokens/s, the bound on what planning can reach.
enum FirstPass {
    Done(Candidate, Box<Evaluation>),
    Plan(Candidate, f64),
}

fn first_pass(base: &SimConfig, c: &Candidate) -> Option<FirstPass> {
    // `plan` applies no recompute: this is the keep-all evaluation.
    let e = simulate(&c.apply(base)).ok()?;
    Some(if c.recompute == RecomputeChoice::Plan && !e.fits {
        FirstPass::Plan(*c, e.tokens_per_s)
    } else {
        FirstPass::Done(*c, Box::new(e))
    })
}

fn record(
    stats: &mut SearchStats,
    best: &mut Vec<Ranked>,
    c: Candidate,
    e: Evaluation,
    include_oom: bool,
) {
    if e.fits {
        stats.fit += 1;
    }
    if e.fits || include_oom {
        best.push(Ranked {
            candidate: c,
            evaluation: e,
        });
    }
}

fn rank(best: &mut Vec<Ranked>, top: usize) {
    best.sort_by(|a, b| {
        b.evaluation
            .tokens_per_s
            .total_cmp(&a.evaluation.tokens_per_s)
            .then(
                a.evaluation
                    .memory_peak
                    .total_cmp(&b.evaluation.memory_peak),
            )
    });
    best.truncate(top);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::tests::mixtral_8x22b;

    #[test]
    fn cached_spans_are_the_computed_ones() {
        use crate::sim::engine::Spans;
        for dims in [
            [2, 1, 8, 8, 1, 8, 16, 8],
            [4, 1, 96, 16, 1, 16, 24, 8],
            [1, 2, 4, 8, 2, 4, 4, 8],
        ] {
            let want = Spans::compute(dims, "tp-cp-ep-dp-pp").unwrap();
            assert_eq!(Spans::cached(dims, "tp-cp-ep-dp-pp").unwrap(), want);
            assert_eq!(Spans::cached(dims, "tp-cp-ep-dp-pp").unwrap(), want);
        }
        assert_ne!(
            Spans::cached([2, 1, 8, 8, 1, 8, 16, 8], "tp-cp-ep-dp-pp").unwrap(),
            Spans::cached([2, 1, 8, 8, 1, 8, 16, 8], "tp-cp-ep-pp-dp").unwrap()
        );
    }

    #[test]
    fn uneven_splits() {
        assert_eq!(uneven_split(61, 16), Some((3, 2)));
        let (f, l) = uneven_split(61, 8).unwrap();
        assert_eq!((61 - f - l) % 6, 0);
        assert!(f <= (61 - f - l) / 6 && l >= 1);
        assert_eq!(uneven_split(11, 2), Some((6, 5)));
        assert_eq!(uneven_split(3, 4), None);
    }

    #[test]
    fn padded_layouts_put_noop_slots_at_the_end() {
        // Pangu Ultra MoE: 61 layers + 1 MTP on PP16 x VPP2 chunks of 2 slots.
        let l = padded_layout(61, 1, 16, 2).unwrap();
        let chunks = crate::sim::config::parse_layout(&l).unwrap();
        assert_eq!(chunks.len(), 32);
        let sizes: Vec<usize> = chunks
            .iter()
            .map(|c| c.iter().filter(|&&x| x == 't' || x == 'm').count())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 62);
        assert_eq!(&sizes[28..], &[2, 2, 1, 1]);
        assert_eq!(chunks[31], vec!['m', 'L']);
        assert_eq!(l, "Ett|".to_string() + &"tt|".repeat(29) + "t|mL");
        // Exact fits and impossible paddings have none.
        assert_eq!(padded_layout(64, 0, 16, 2), None);
        assert_eq!(padded_layout(61, 1, 1, 4), None);
        assert_eq!(padded_layout(5, 0, 2, 4), None);
    }

    #[test]
    fn search_finds_fitting_layouts() {
        let base = mixtral_8x22b(1, 1, 1, 1);
        let space = Space {
            mbs: vec![1],
            recompute: vec![RecomputeChoice::None, RecomputeChoice::Full],
            ..Default::default()
        };
        let cands = enumerate(&base, &space).unwrap();
        assert!(cands.len() > 50, "{}", cands.len());
        let mut calls = 0;
        let (best, stats) = search(&base, &cands, 5, false, &mut |_, _| {
            calls += 1;
            true
        })
        .unwrap();
        assert!(calls >= 1);
        assert_eq!(stats.evaluated, cands.len());
        assert!(!best.is_empty() && best.len() <= 5);
        assert!(best.iter().all(|r| r.evaluation.fits));
        for w in best.windows(2) {
            assert!(w[0].evaluation.tokens_per_s >= w[1].evaluation.tokens_per_s);
        }
    }

    #[test]
    fn pruning_by_the_keep_all_bound_changes_nothing() {
        // The `plan` choice skips layouts whose keep-all tokens/s cannot reach the ranking; the
        // ranking must equal the one evaluating every layout (top = all: the bound never applies).
        let base = mixtral_8x22b(1, 1, 1, 1);
        let space = Space {
            mbs: vec![1, 2],
            recompute: vec![RecomputeChoice::Plan],
            ..Default::default()
        };
        let cands = enumerate(&base, &space).unwrap();
        let (all, full_stats) =
            search(&base, &cands, cands.len(), false, &mut |_, _| true).unwrap();
        assert_eq!(full_stats.pruned, 0);
        for top in [1, 3, 10] {
            let (best, stats) = search(&base, &cands, top, false, &mut |_, _| true).unwrap();
            assert_eq!(stats.evaluated, cands.len());
            let want: Vec<_> = all
                .iter()
                .take(top)
                .map(|r| (r.candidate, r.evaluation.tokens_per_s))
                .collect();
            let got: Vec<_> = best
                .iter()
                .map(|r| (r.candidate, r.evaluation.tokens_per_s))
                .collect();
            assert_eq!(got, want, "top {top}");
        }
    }
}
