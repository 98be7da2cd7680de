//! Plans: the exact rows every rank sends to every rank at each stage of a strategy.
//!
//! The input is every rank's [`DispatchLayout`](super::dispatch_layout::DispatchLayout) counts, all-gathered
//! ([`Counts`]). A plan lists its stages in dispatch order; each stage is a `[W, W]` matrix of
//! rows (source-major; the diagonal is a rank's rows to itself, a local copy). The combine runs
//! the stages in reverse order with the matrices transposed. Rows of a pass have one byte size
//! ([`RowFormat::row`]), so the planned bytes of each link class are exact.
//!
//! Stage matrices, with `C[src][dst]` the copies `src` has for `dst`'s slots, rank `(n, g)` the
//! `g`-th rank of node `n`, `rank_tokens` and `node_tokens` the token-level counts:
//!
//! * `flat`: `C`.
//! * `2dh`: `A[(n,g)][(n,g')] = sum_n' C[(n,g)][(n',g')]` (inside the node, by the destination's
//!   local rank), then `B[(n,g')][(n',g')] = sum_g C[(n,g)][(n',g')]` (between nodes).
//! * `dedup`: `D1[(n,g)][(n',g)] = node_tokens[(n,g)][n']` (between nodes, once per node), then
//!   `D2[(n',g)][(n',g')] = sum_n rank_tokens[(n,g)][(n',g')]` (inside the node, once per rank).
//! * `allgather`: `G1[(n,g)][(n',g)] = tokens[(n,g)]` (every token to every node), then `D2`.

use super::cost::{Links, StageLoad};
use super::dispatch_layout::DispatchLayout;
use super::{EpGroup, Strategy};
use crate::error::{ensure, invalid, Result};

/// Entries before the counts in a rank's all-gathered vector: status, tokens, max entries,
/// configuration hash.
pub const HEADER: usize = 4;

/// Every rank's layout counts (gathered over the EP group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Tokens of each rank `[W]`.
    pub tokens: Vec<i64>,
    /// The most slots any token of any rank has.
    pub entries: usize,
    /// `[W, R]`: copies per (source rank, slot).
    pub slot_counts: Vec<i64>,
    /// `[W, W]`: tokens per (source rank, destination rank).
    pub rank_tokens: Vec<i64>,
    /// `[W, N]`: tokens per (source rank, destination node).
    pub node_tokens: Vec<i64>,
}

impl Counts {
    /// Entries of one rank's vector: `HEADER + R + W + N`.
    pub fn vector_len(topo: &EpGroup) -> usize {
        HEADER + topo.slots() + topo.ranks + topo.nodes()
    }

    /// One rank's vector: `[status, tokens, max_entries, hash, slot_counts, rank_tokens,
    /// node_tokens]`.
    pub fn write_vector(
        layout: &DispatchLayout,
        num_tokens: usize,
        status: i64,
        hash: i64,
        out: &mut [i64],
    ) -> Result<()> {
        ensure(out.len() > HEADER, "out", || "too short".into())?;
        out[0] = status;
        out[1] = num_tokens as i64;
        out[2] = layout.max_entries as i64;
        out[3] = hash;
        layout.write_counts(&mut out[HEADER..])
    }

    /// Parses the gathered vectors `[W, vector_len]` and checks them.
    pub fn from_gathered(gathered: &[i64], topo: &EpGroup) -> Result<Self> {
        let (w_n, r_n, n_n) = (topo.ranks, topo.slots(), topo.nodes());
        let v = Self::vector_len(topo);
        ensure(gathered.len() == w_n * v, "counts", || {
            format!(
                "expected [{w_n}, {v}] (ranks x (4 + slots + ranks + nodes)), got {} values",
                gathered.len()
            )
        })?;
        let mut c = Counts {
            tokens: Vec::with_capacity(w_n),
            entries: 0,
            slot_counts: Vec::with_capacity(w_n * r_n),
            rank_tokens: Vec::with_capacity(w_n * w_n),
            node_tokens: Vec::with_capacity(w_n * n_n),
        };
        for row in gathered.chunks_exact(v) {
            c.tokens.push(row[1]);
            ensure(row[2] >= 0, "counts", || "negative entries".into())?;
            c.entries = c.entries.max(row[2] as usize);
            let rest = &row[HEADER..];
            c.slot_counts.extend_from_slice(&rest[..r_n]);
            c.rank_tokens.extend_from_slice(&rest[r_n..r_n + w_n]);
            c.node_tokens.extend_from_slice(&rest[r_n + w_n..]);
        }
        c.check(topo)?;
        Ok(c)
    }

    /// Counts from every rank's layout.
    pub fn from_layouts(layouts: &[DispatchLayout], tokens: &[i64]) -> Self {
        Counts {
            tokens: tokens.to_vec(),
            entries: layouts.iter().map(|l| l.max_entries).max().unwrap_or(0),
            slot_counts: layouts.iter().flat_map(|l| l.slot_counts.clone()).collect(),
            rank_tokens: layouts.iter().flat_map(|l| l.rank_tokens.clone()).collect(),
            node_tokens: layouts.iter().flat_map(|l| l.node_tokens.clone()).collect(),
        }
    }

    /// Sizes and the relations every real layout satisfies (a rank's tokens on a rank are at
    /// most its tokens and at most its copies there, at least one when it has copies there, and
    /// so on): a check that the ranks agree on the layout format.
    pub fn check(&self, topo: &EpGroup) -> Result<()> {
        let (w_n, r_n, n_n, l_n, g_n) = (
            topo.ranks,
            topo.slots(),
            topo.nodes(),
            topo.slots_per_rank,
            topo.ranks_per_node,
        );
        ensure(
            self.tokens.len() == w_n
                && self.slot_counts.len() == w_n * r_n
                && self.rank_tokens.len() == w_n * w_n
                && self.node_tokens.len() == w_n * n_n,
            "counts",
            || format!("expected the counts of {w_n} ranks, {r_n} slots and {n_n} nodes"),
        )?;
        // total_rows, summed here from the copies this loop counts anyway (no second pass).
        let mut total = 0i64;
        let n_n_i = i64::try_from(n_n).map_err(|_| invalid("counts", "too many nodes"))?;
        for src in 0..w_n {
            let t = self.tokens[src];
            let bad = |what: String| invalid("counts", format!("rank {src}: {what}"));
            if t < 0 {
                return Err(bad(format!("{t} tokens")));
            }
            let slots = &self.slot_counts[src * r_n..(src + 1) * r_n];
            let mut copies = 0i64;
            let wraps = || bad("the counts' sum overflows int64".into());
            // Every slot count is checked to lie in [0, t] before it is summed, so this rank's
            // sums are at most r_n * t: when that fits, plain (vectorised) sums cannot wrap.
            let bounded = t.checked_mul(r_n as i64).is_some();
            for dst in 0..w_n {
                let s = &slots[dst * l_n..(dst + 1) * l_n];
                if s.iter().any(|&x| x < 0 || x > t) {
                    return Err(bad(format!("a slot count on rank {dst} outside [0, {t}]")));
                }
                let c = if bounded {
                    s.iter().sum::<i64>()
                } else {
                    s.iter()
                        .try_fold(0i64, |a, &x| a.checked_add(x))
                        .ok_or_else(wraps)?
                };
                copies = copies.checked_add(c).ok_or_else(wraps)?;
                let rt = self.rank_tokens[src * w_n + dst];
                // ceil(c / l_n) without `c + l_n - 1`, which wraps near i64::MAX.
                let lo = c / l_n as i64 + i64::from(c % l_n as i64 != 0);
                if rt < lo || rt > c.min(t) {
                    return Err(bad(format!(
                        "{rt} tokens for rank {dst}, which gets {c} copies (expected {lo}..={})",
                        c.min(t)
                    )));
                }
            }
            if copies > t.saturating_mul(self.entries as i64) {
                return Err(bad(format!(
                    "{copies} copies of {t} tokens with at most {} slots each",
                    self.entries
                )));
            }
            total = t
                .checked_mul(n_n_i)
                .and_then(|x| x.checked_add(copies))
                .and_then(|x| x.checked_mul(2))
                .and_then(|x| x.checked_add(total))
                .ok_or_else(|| invalid("counts", "the rows of all ranks overflow int64"))?;
            for n in 0..n_n {
                let per: Vec<i64> = (0..g_n)
                    .map(|g| self.rank_tokens[src * w_n + topo.rank(n, g)])
                    .collect();
                let nt = self.node_tokens[src * n_n + n];
                let (lo, hi) = (
                    per.iter().copied().max().unwrap_or(0),
                    per.iter()
                        .try_fold(0i64, |a, &x| a.checked_add(x))
                        .ok_or_else(wraps)?
                        .min(t),
                );
                if nt < lo || nt > hi {
                    return Err(bad(format!(
                        "{nt} tokens for node {n} (expected {lo}..={hi} from its ranks)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// An upper bound of the rows any strategy's stages move in one pass, summed over all
    /// stages (every copy, plus every token once per node): checked, so that the stages' sums
    /// and their byte counts can be bounded before they are computed.
    pub fn total_rows(&self, topo: &EpGroup) -> Result<i64> {
        let wraps = || invalid("counts", "the rows of all ranks overflow int64");
        let n_n = i64::try_from(topo.nodes()).map_err(|_| wraps())?;
        let mut total = 0i64;
        let r_n = topo.slots();
        for (src, &t) in self.tokens.iter().enumerate() {
            let slots = &self.slot_counts[src * r_n..(src + 1) * r_n];
            // The largest term bounds the sum: when max * r_n fits, a plain (vectorised) sum is
            // exact; only counts near the int64 edge take the checked path.
            let max = slots.iter().map(|&x| x.max(0)).max().unwrap_or(0);
            let copies = if max.checked_mul(r_n as i64).is_some() {
                slots.iter().map(|&x| x.max(0)).sum::<i64>()
            } else {
                slots
                    .iter()
                    .try_fold(0i64, |a, &x| a.checked_add(x.max(0)))
                    .ok_or_else(wraps)?
            };
            total = t
                .max(0)
                .checked_mul(n_n)
                .and_then(|x| x.checked_add(copies))
                .and_then(|x| x.checked_mul(2))
                .and_then(|x| x.checked_add(total))
                .ok_or_else(wraps)?;
        }
        Ok(total)
    }

    /// `C [W, W]`: copies per (source rank, destination rank).
    pub fn copies(&self, topo: &EpGroup) -> Vec<i64> {
        let (w_n, r_n, l_n) = (topo.ranks, topo.slots(), topo.slots_per_rank);
        let mut c = vec![0i64; w_n * w_n];
        for src in 0..w_n {
            let slots = &self.slot_counts[src * r_n..(src + 1) * r_n];
            for (dst, chunk) in slots.chunks_exact(l_n).enumerate() {
                c[src * w_n + dst] = chunk.iter().sum();
            }
        }
        c
    }
}

/// One of the four passes of a training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    /// Tokens (and routing weights) to the experts.
    Dispatch,
    /// Gradients of the dispatched rows (and of their weights) back to the tokens.
    DispatchBackward,
    /// Expert outputs back to the tokens.
    Combine,
    /// Gradients of the output to the expert rows.
    CombineBackward,
}

impl Pass {
    pub const ALL: [Pass; 4] = [
        Pass::Dispatch,
        Pass::DispatchBackward,
        Pass::Combine,
        Pass::CombineBackward,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Dispatch => "dispatch",
            Self::DispatchBackward => "dispatch_backward",
            Self::Combine => "combine",
            Self::CombineBackward => "combine_backward",
        }
    }

    /// Whether the pass runs the stages backwards (expert side to token side).
    pub fn reverse(self) -> bool {
        matches!(self, Self::DispatchBackward | Self::Combine)
    }
}

/// The byte layout of one row of the exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    /// Bytes per row.
    pub stride: usize,
    /// The hidden state: `hidden_bytes` bytes at offset 0.
    pub hidden_bytes: usize,
    /// Routing weights (or their gradients): `probs` values at `probs_off`.
    pub probs_off: usize,
    pub probs: usize,
    /// Slot ids (int32): `ids` values at `ids_off`.
    pub ids_off: usize,
    pub ids: usize,
}

/// What a row carries, for every pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowFormat {
    /// Hidden size (elements) and element bytes of the tokens.
    pub hidden: usize,
    pub hidden_elem: usize,
    /// Element bytes of the routing weights.
    pub prob_elem: usize,
    /// Weights a token row carries (the most slots of any token).
    pub entries: usize,
    /// Whether the weights' gradients travel back in the dispatch backward.
    pub probs_grad: bool,
}

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a.max(1)) * a.max(1)
}

impl RowFormat {
    pub fn check(&self) -> Result<()> {
        for (v, name) in [
            (self.hidden_elem, "hidden_elem"),
            (self.prob_elem, "prob_elem"),
        ] {
            ensure(matches!(v, 1 | 2 | 4 | 8), name, || {
                format!("element size must be 1, 2, 4 or 8 bytes, got {v}")
            })?;
        }
        self.max_stride().map(|_| ())
    }

    /// An upper bound of every pass's row stride, in checked arithmetic: once it fits an `i64`,
    /// [`RowFormat::row`]'s sums cannot overflow.
    pub fn max_stride(&self) -> Result<i64> {
        let big = || {
            invalid(
                "hidden_size",
                format!(
                    "{} elements of {} bytes (with {} weights per row) overflow a row's byte count",
                    self.hidden, self.hidden_elem, self.entries
                ),
            )
        };
        let hidden = self.hidden.checked_mul(self.hidden_elem).ok_or_else(big)?;
        let extra = self
            .entries
            .checked_mul(self.prob_elem + 4)
            .and_then(|x| x.checked_add(3 * 8))
            .ok_or_else(big)?;
        hidden
            .checked_add(extra)
            .and_then(|x| i64::try_from(x).ok())
            .ok_or_else(big)
    }

    /// The row of `pass` for copy rows (`flat`, `2dh`) or token rows (`dedup`, `allgather`).
    pub fn row(&self, copy_rows: bool, pass: Pass) -> RowLayout {
        let hidden_bytes = self.hidden * self.hidden_elem;
        let per_row = if copy_rows { 1 } else { self.entries };
        let (probs, ids) = match pass {
            Pass::Dispatch => (per_row, if copy_rows { 0 } else { self.entries }),
            Pass::DispatchBackward => (if self.probs_grad { per_row } else { 0 }, 0),
            Pass::Combine | Pass::CombineBackward => (0, 0),
        };
        let mut end = hidden_bytes;
        let mut a = self.hidden_elem;
        let probs_off = if probs > 0 {
            a = a.max(self.prob_elem);
            align(end, self.prob_elem)
        } else {
            end
        };
        end = probs_off + probs * self.prob_elem;
        let ids_off = if ids > 0 {
            a = a.max(4);
            align(end, 4)
        } else {
            end
        };
        end = ids_off + ids * 4;
        RowLayout {
            stride: align(end, a),
            hidden_bytes,
            probs_off,
            probs,
            ids_off,
            ids,
        }
    }
}

/// One stage: rows per (source rank, destination rank), source-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub name: &'static str,
    pub rows: Vec<i64>,
    pub(crate) load: StageLoad,
}

/// A strategy's stages for one exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub strategy: Strategy,
    pub topo: EpGroup,
    pub stages: Vec<Stage>,
}

/// The traffic and estimated time of one pass of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Traffic {
    /// Bytes per row.
    pub row_bytes: usize,
    /// `[N, N]` bytes between distinct ranks by (source node, destination node): the diagonal
    /// is traffic inside a node, the rest crosses the network.
    pub node_bytes: Vec<i64>,
    pub intra_bytes: i64,
    pub inter_bytes: i64,
    /// Rows a rank sends to itself (a copy, no link), in bytes.
    pub local_bytes: i64,
    /// Rows that cross a node boundary.
    pub inter_rows: i64,
    /// Nonempty messages between distinct ranks.
    pub messages: i64,
    /// Estimated seconds per stage (in the order the pass runs them) and in total.
    pub stage_seconds: Vec<f64>,
    pub seconds: f64,
}

fn stage(name: &'static str, rows: Vec<i64>, topo: &EpGroup) -> Stage {
    let load = StageLoad::new(&rows, topo);
    Stage { name, rows, load }
}

/// Stages shared between strategies, built once per set of counts.
#[derive(Default)]
struct Shared {
    copies: Option<Vec<i64>>,
    flat: Option<Stage>,
    forward: Option<Stage>,
}

impl Shared {
    fn copies(&mut self, topo: &EpGroup, counts: &Counts) -> &Vec<i64> {
        self.copies.get_or_insert_with(|| counts.copies(topo))
    }
}

impl Plan {
    /// The stages of `strategy` for `counts`.
    pub fn new(strategy: Strategy, topo: &EpGroup, counts: &Counts) -> Result<Self> {
        Self::build(strategy, topo, counts, &mut Shared::default())
    }

    fn build(
        strategy: Strategy,
        topo: &EpGroup,
        counts: &Counts,
        shared: &mut Shared,
    ) -> Result<Self> {
        let (w_n, n_n) = (topo.ranks, topo.nodes());
        let stages = match strategy {
            Strategy::Flat => {
                if shared.flat.is_none() {
                    let c = shared.copies(topo, counts).clone();
                    shared.flat = Some(stage("all_to_all", c, topo));
                }
                vec![shared.flat.clone().expect("built above")]
            }
            Strategy::TwoLevel => {
                let c = shared.copies(topo, counts);
                let g_n = topo.ranks_per_node;
                let mut a = vec![0i64; w_n * w_n];
                let mut b = vec![0i64; w_n * w_n];
                for src in 0..w_n {
                    let n = topo.node(src);
                    let row = &c[src * w_n..(src + 1) * w_n];
                    // To (n', g'): first to (n, g') in the node, then to (n', g') between nodes.
                    for (n2, block) in row.chunks_exact(g_n).enumerate() {
                        for (g2, &v) in block.iter().enumerate() {
                            let mid = n * g_n + g2;
                            a[src * w_n + mid] += v;
                            b[mid * w_n + n2 * g_n + g2] += v;
                        }
                    }
                }
                vec![stage("intra_node", a, topo), stage("inter_node", b, topo)]
            }
            Strategy::Dedup | Strategy::AllGather => {
                let mut first = vec![0i64; w_n * w_n];
                for src in 0..w_n {
                    let g = topo.local(src);
                    for n2 in 0..n_n {
                        first[src * w_n + topo.rank(n2, g)] = if strategy == Strategy::Dedup {
                            counts.node_tokens[src * n_n + n2]
                        } else {
                            counts.tokens[src]
                        };
                    }
                }
                if shared.forward.is_none() {
                    let mut second = vec![0i64; w_n * w_n];
                    for src in 0..w_n {
                        let g = topo.local(src);
                        let row = &counts.rank_tokens[src * w_n..(src + 1) * w_n];
                        for (dst, &v) in row.iter().enumerate() {
                            let proxy = topo.rank(topo.node(dst), g);
                            second[proxy * w_n + dst] += v;
                        }
                    }
                    shared.forward = Some(stage("intra_node", second, topo));
                }
                let name = if strategy == Strategy::Dedup {
                    "inter_node"
                } else {
                    "inter_node_allgather"
                };
                vec![
                    stage(name, first, topo),
                    shared.forward.clone().expect("built above"),
                ]
            }
        };
        Ok(Plan {
            strategy,
            topo: *topo,
            stages,
        })
    }

    /// Traffic and time of `pass` with rows of `fmt` on `links`.
    pub fn traffic(&self, fmt: &RowFormat, pass: Pass, links: &Links) -> Traffic {
        let topo = &self.topo;
        let (w_n, n_n) = (topo.ranks, topo.nodes());
        let row = fmt.row(self.strategy.copy_rows(), pass);
        let b = row.stride as i64;
        let mut t = Traffic {
            row_bytes: row.stride,
            node_bytes: vec![0; n_n * n_n],
            intra_bytes: 0,
            inter_bytes: 0,
            local_bytes: 0,
            inter_rows: 0,
            messages: 0,
            stage_seconds: Vec::with_capacity(self.stages.len()),
            seconds: 0.0,
        };
        for st in &self.stages {
            for src in 0..w_n {
                for dst in 0..w_n {
                    let rows = st.rows[src * w_n + dst];
                    if rows == 0 {
                        continue;
                    }
                    // The reverse passes send dst -> src.
                    let (s, d) = if pass.reverse() {
                        (dst, src)
                    } else {
                        (src, dst)
                    };
                    if s == d {
                        t.local_bytes += rows * b;
                        continue;
                    }
                    t.messages += 1;
                    let (ns, nd) = (topo.node(s), topo.node(d));
                    t.node_bytes[ns * n_n + nd] += rows * b;
                    if ns == nd {
                        t.intra_bytes += rows * b;
                    } else {
                        t.inter_bytes += rows * b;
                        t.inter_rows += rows;
                    }
                }
            }
        }
        let order: Vec<&Stage> = if pass.reverse() {
            self.stages.iter().rev().collect()
        } else {
            self.stages.iter().collect()
        };
        for st in order {
            let s = st.load.seconds(row.stride as f64, links);
            t.stage_seconds.push(s);
            t.seconds += s;
        }
        t
    }

    /// Estimated seconds of one dispatch plus one combine (the forward exchange).
    pub fn forward_seconds(&self, fmt: &RowFormat, links: &Links) -> f64 {
        [Pass::Dispatch, Pass::Combine]
            .iter()
            .map(|&p| {
                let row = fmt.row(self.strategy.copy_rows(), p).stride as f64;
                self.stages
                    .iter()
                    .map(|s| s.load.seconds(row, links))
                    .sum::<f64>()
            })
            .sum()
    }
}

/// The plan of every strategy in `candidates` and the index of the cheapest (dispatch plus
/// combine on `links`; ties go to the earlier candidate).
pub fn plan_best(
    candidates: &[Strategy],
    topo: &EpGroup,
    counts: &Counts,
    fmt: &RowFormat,
    links: &Links,
) -> Result<(Vec<Plan>, Vec<f64>, usize)> {
    ensure(!candidates.is_empty(), "strategy", || {
        "needs at least one candidate".into()
    })?;
    fmt.check()?;
    links.check()?;
    // Every byte count below is at most `total_rows * max_stride`: check that product once.
    let rows = counts.total_rows(topo)?;
    let stride = fmt.max_stride()?;
    ensure(rows.checked_mul(stride).is_some(), "hidden_size", || {
        format!(
            "{rows} rows of up to {stride} bytes (hidden_size={}) overflow an int64 byte count",
            fmt.hidden
        )
    })?;
    let mut plans = Vec::with_capacity(candidates.len());
    let mut secs = Vec::with_capacity(candidates.len());
    let mut best = 0;
    let mut shared = Shared::default();
    for (i, &s) in candidates.iter().enumerate() {
        let p = Plan::build(s, topo, counts, &mut shared)?;
        let t = p.forward_seconds(fmt, links);
        if t < secs.get(best).copied().unwrap_or(f64::INFINITY) {
            best = i;
        }
        secs.push(t);
        plans.push(p);
    }
    Ok((plans, secs, best))
}

/// Estimated token-level counts from copies only (when the routing of single tokens is not
/// known): a token of `src` lands on rank `d` with probability `1 - prod_slots(1 - c_s / T)`
/// (its slots chosen independently), and on node `n` likewise over the node's slots.
pub fn estimate_token_counts(
    slot_counts: &[i64],
    tokens: &[i64],
    topo: &EpGroup,
) -> Result<Counts> {
    let (w_n, r_n, n_n, l_n) = (topo.ranks, topo.slots(), topo.nodes(), topo.slots_per_rank);
    ensure(slot_counts.len() == w_n * r_n, "tokens_per_expert", || {
        format!(
            "expected [{w_n}, {r_n}] copies per (rank, slot), got {} values",
            slot_counts.len()
        )
    })?;
    ensure(tokens.len() == w_n, "num_tokens", || {
        format!("expected {w_n} values, got {}", tokens.len())
    })?;
    let mut rank_tokens = vec![0i64; w_n * w_n];
    let mut node_tokens = vec![0i64; w_n * n_n];
    let mut entries = 0usize;
    for src in 0..w_n {
        let t = tokens[src];
        let sc = &slot_counts[src * r_n..(src + 1) * r_n];
        ensure(
            sc.iter().all(|&c| c >= 0 && c <= t),
            "tokens_per_expert",
            || format!("rank {src}: every count must be in [0, num_tokens={t}]"),
        )?;
        let total: i64 = sc.iter().sum();
        if t > 0 {
            entries = entries.max(((total + t - 1) / t) as usize);
        }
        let miss = |slots: &[i64]| -> f64 {
            if t == 0 {
                return 1.0;
            }
            slots.iter().map(|&c| 1.0 - c as f64 / t as f64).product()
        };
        for d in 0..w_n {
            let s = &sc[d * l_n..(d + 1) * l_n];
            let c: i64 = s.iter().sum();
            let est = ((1.0 - miss(s)) * t as f64).round() as i64;
            rank_tokens[src * w_n + d] = est.clamp((c + l_n as i64 - 1) / l_n as i64, c.min(t));
        }
        for n in 0..n_n {
            let lo = topo.rank(n, 0) * l_n;
            let hi = topo.rank(n, topo.ranks_per_node - 1) * l_n + l_n;
            let est = ((1.0 - miss(&sc[lo..hi])) * t as f64).round() as i64;
            let per: Vec<i64> = (0..topo.ranks_per_node)
                .map(|g| rank_tokens[src * w_n + topo.rank(n, g)])
                .collect();
            let lo_b = per.iter().copied().max().unwrap_or(0);
            let hi_b = per.iter().sum::<i64>().min(t);
            node_tokens[src * n_n + n] = est.clamp(lo_b, hi_b.max(lo_b));
        }
    }
    let c = Counts {
        tokens: tokens.to_vec(),
        entries,
        slot_counts: slot_counts.to_vec(),
        rank_tokens,
        node_tokens,
    };
    c.check(topo)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::super::dispatch_layout::{layout, tests::random_slots};
    use super::*;

    fn counts_for(topo: &EpGroup, t: usize, k: usize, seed: u64) -> (Vec<Vec<i64>>, Counts) {
        let slots: Vec<Vec<i64>> = (0..topo.ranks)
            .map(|r| random_slots(t + r, k, topo.slots(), seed + r as u64))
            .collect();
        let layouts: Vec<DispatchLayout> = slots
            .iter()
            .enumerate()
            .map(|(r, s)| layout(s, t + r, k, topo, None, true).unwrap())
            .collect();
        let tokens: Vec<i64> = (0..topo.ranks).map(|r| (t + r) as i64).collect();
        (slots, Counts::from_layouts(&layouts, &tokens))
    }

    /// Simulates each strategy row by row (which copy or token goes where, stage by stage) and
    /// checks the plan's matrices and that every copy ends at its slot's rank.
    #[test]
    fn stages_follow_the_rows() {
        for (w, g, l) in [(4, 2, 2), (8, 4, 3), (4, 1, 5), (4, 4, 1), (6, 3, 2)] {
            let topo = EpGroup::new(w, g, l).unwrap();
            let k = 4.min(topo.slots());
            let (slots, counts) = counts_for(&topo, 50, k, w as u64 * 31 + l as u64);
            counts.check(&topo).unwrap();
            let idx = |m: &mut Vec<i64>, s: usize, d: usize| m[s * w + d] += 1;
            for strategy in Strategy::ALL {
                let plan = Plan::new(strategy, &topo, &counts).unwrap();
                let mut m: Vec<Vec<i64>> = vec![vec![0; w * w]; plan.stages.len()];
                for (src, sl) in slots.iter().enumerate() {
                    let t_n = sl.len() / k;
                    let n_src = topo.node(src);
                    let g_src = topo.local(src);
                    for t in 0..t_n {
                        let row: Vec<usize> = sl[t * k..(t + 1) * k]
                            .iter()
                            .filter(|&&s| s >= 0)
                            .map(|&s| s as usize)
                            .collect();
                        let dsts: Vec<usize> = row.iter().map(|&s| topo.rank_of_slot(s)).collect();
                        match strategy {
                            Strategy::Flat => dsts.iter().for_each(|&d| idx(&mut m[0], src, d)),
                            Strategy::TwoLevel => {
                                for &d in &dsts {
                                    let mid = topo.rank(n_src, topo.local(d));
                                    idx(&mut m[0], src, mid);
                                    idx(&mut m[1], mid, d);
                                }
                            }
                            Strategy::Dedup | Strategy::AllGather => {
                                let mut nodes: Vec<usize> =
                                    dsts.iter().map(|&d| topo.node(d)).collect();
                                nodes.sort();
                                nodes.dedup();
                                let mut ranks = dsts.clone();
                                ranks.sort();
                                ranks.dedup();
                                if strategy == Strategy::Dedup {
                                    for &n in &nodes {
                                        idx(&mut m[0], src, topo.rank(n, g_src));
                                    }
                                } else {
                                    for n in 0..topo.nodes() {
                                        idx(&mut m[0], src, topo.rank(n, g_src));
                                    }
                                }
                                for &d in &ranks {
                                    idx(&mut m[1], topo.rank(topo.node(d), g_src), d);
                                }
                            }
                        }
                    }
                }
                for (s, st) in plan.stages.iter().enumerate() {
                    assert_eq!(
                        st.rows,
                        m[s],
                        "{} stage {s} on {w}x{g}x{l}",
                        strategy.name()
                    );
                }
            }
        }
    }

    #[test]
    fn traffic_bytes_and_row_formats() {
        let fmt = RowFormat {
            hidden: 7,
            hidden_elem: 2,
            prob_elem: 4,
            entries: 3,
            probs_grad: true,
        };
        let r = fmt.row(true, Pass::Dispatch);
        assert_eq!((r.probs_off, r.probs, r.ids, r.stride), (16, 1, 0, 20));
        let r = fmt.row(false, Pass::Dispatch);
        assert_eq!(
            (r.probs_off, r.probs, r.ids_off, r.ids, r.stride),
            (16, 3, 28, 3, 40)
        );
        let r = fmt.row(false, Pass::DispatchBackward);
        assert_eq!((r.probs, r.ids, r.stride), (3, 0, 28));
        let r = fmt.row(false, Pass::Combine);
        assert_eq!((r.probs, r.stride), (0, 14));

        let topo = EpGroup::new(4, 2, 2).unwrap();
        let (_, counts) = counts_for(&topo, 40, 3, 5);
        let links = Links::default();
        for s in Strategy::ALL {
            let p = Plan::new(s, &topo, &counts).unwrap();
            let fwd = p.traffic(&fmt, Pass::Dispatch, &links);
            let back = p.traffic(&fmt, Pass::Combine, &links);
            assert_eq!(fwd.inter_rows, back.inter_rows);
            // Combine is the transpose.
            for a in 0..2 {
                for b in 0..2 {
                    assert_eq!(
                        fwd.node_bytes[a * 2 + b] / fwd.row_bytes as i64,
                        back.node_bytes[b * 2 + a] / back.row_bytes as i64
                    );
                }
            }
            let total: i64 = fwd.node_bytes.iter().sum();
            assert_eq!(total, fwd.intra_bytes + fwd.inter_bytes);
            assert!(fwd.seconds > 0.0);
        }
        // Flat and 2dh move the same rows between nodes; dedup at most as many.
        let inter = |s| {
            Plan::new(s, &topo, &counts)
                .unwrap()
                .traffic(&fmt, Pass::Combine, &links)
                .inter_rows
        };
        assert_eq!(inter(Strategy::Flat), inter(Strategy::TwoLevel));
        assert!(inter(Strategy::Dedup) <= inter(Strategy::Flat));
        assert!(inter(Strategy::Dedup) <= inter(Strategy::AllGather));
    }

    #[test]
    fn gathered_vectors_parse_and_check() {
        let topo = EpGroup::new(4, 2, 2).unwrap();
        let (slots, counts) = counts_for(&topo, 30, 3, 9);
        let v = Counts::vector_len(&topo);
        let mut buf = vec![0i64; 4 * v];
        for (r, s) in slots.iter().enumerate() {
            let l = layout(s, s.len() / 3, 3, &topo, None, true).unwrap();
            Counts::write_vector(&l, s.len() / 3, 0, 77, &mut buf[r * v..(r + 1) * v]).unwrap();
        }
        assert_eq!(Counts::from_gathered(&buf, &topo).unwrap(), counts);
        // A rank that claims more tokens on a rank than copies there is caught.
        let mut bad = buf.clone();
        bad[HEADER + topo.slots()] += 1000;
        assert!(Counts::from_gathered(&bad, &topo).is_err());
        assert!(Counts::from_gathered(&buf[1..], &topo).is_err());
    }

    #[test]
    fn estimates_are_consistent() {
        let topo = EpGroup::new(8, 4, 4).unwrap();
        let (_, counts) = counts_for(&topo, 400, 6, 3);
        let est = estimate_token_counts(&counts.slot_counts, &counts.tokens, &topo).unwrap();
        est.check(&topo).unwrap();
        for (a, b) in est.node_tokens.iter().zip(&counts.node_tokens) {
            assert!((a - b).abs() as f64 <= 0.1 * *b as f64 + 5.0, "{a} vs {b}");
        }
    }
}
