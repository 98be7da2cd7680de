//! Router top-k: score functions, (group-limited) top-k selection, expert bias, scaling —
//! forward and backward — with Megatron-Core's `topk_routing_with_score_function` semantics.
//!
//! For one token with logits `x[0..E]` (all math in f32, f64 for f64 logits):
//!
//! * softmax, post (default): `sel = topk(x)`, `p = softmax(x[sel])`
//! * softmax, pre:            `s = softmax(x)`, `sel = topk(s)`, `p = s[sel]`
//! * sigmoid / sqrtsoftplus:  `s = sigmoid(x)` or `sqrt(softplus(x))`,
//!   `sel = topk(s + bias)`, `p = s[sel] / (sum(s[sel]) + 1e-20)` when `k > 1`, else `s[sel]`
//! * group-limited: experts form `num_groups` equal groups; a group's score is the sum of its
//!   top `k / group_topk` selection scores; only the best `group_topk` groups are eligible.
//! * finally `p *= scaling_factor`, rounded once to the logits' dtype.
//!
//! Ties go to the lower expert index; the k choices come in descending score order.

use rayon::prelude::*;

use crate::error::{ensure, invalid, Result};
use crate::util::elem::prelude::*;
use crate::util::pool;

/// Tokens per parallel task: small enough to balance, large enough to amortise scratch buffers.
const TOKENS_PER_TASK: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFunction {
    Softmax,
    Sigmoid,
    SqrtSoftplus,
}

impl ScoreFunction {
    /// Megatron-Core's name: `softmax`, `sigmoid` or `sqrtsoftplus`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Softmax => "softmax",
            Self::Sigmoid => "sigmoid",
            Self::SqrtSoftplus => "sqrtsoftplus",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "softmax" => Ok(Self::Softmax),
            "sigmoid" => Ok(Self::Sigmoid),
            "sqrtsoftplus" => Ok(Self::SqrtSoftplus),
            other => Err(invalid(
                "score_function",
                format!("expected 'softmax', 'sigmoid' or 'sqrtsoftplus', got '{other}'"),
            )),
        }
    }

    /// `out[i] = score(x[i])` for a row (sigmoid / sqrtsoftplus), with the vectorised `exp`.
    #[inline]
    fn scores_into<A: Real>(self, x: &[A], out: &mut [A]) {
        match self {
            Self::Sigmoid => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = -v;
                }
                A::exp_in_place(out);
                for o in out.iter_mut() {
                    *o = A::one() / (A::one() + *o);
                }
            }
            Self::SqrtSoftplus => {
                out.copy_from_slice(x);
                A::exp_in_place(out);
                let th = A::of_f64(SOFTPLUS_THRESHOLD);
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = if v > th { v } else { o.ln_1p() }.sqrt();
                }
            }
            Self::Softmax => unreachable!("softmax is not elementwise"),
        }
    }

    /// d score / d x at `x`, given the score `y` there (sigmoid / sqrtsoftplus only).
    #[inline]
    fn elementwise_grad<A: Real>(self, x: A, y: A) -> A {
        match self {
            Self::Sigmoid => (A::one() - y) * y,
            // torch: sqrt' = 1 / (2 sqrt), softplus' = sigmoid below the threshold, 1 above.
            Self::SqrtSoftplus => {
                let inner = if x > A::of_f64(SOFTPLUS_THRESHOLD) {
                    A::one()
                } else {
                    let z = x.exp();
                    z / (z + A::one())
                };
                A::one() / (y + y) * inner
            }
            Self::Softmax => unreachable!("softmax is not elementwise"),
        }
    }
}

const SOFTPLUS_THRESHOLD: f64 = 20.0;
/// Megatron adds this to the sum of the selected sigmoid scores before normalising.
const NORM_EPS: f64 = 1e-20;

/// `out = softmax(x)` (`out.len() == x.len()`).
#[inline]
pub(crate) fn softmax_into<A: Real>(x: &[A], out: &mut [A]) {
    if x.is_empty() {
        return;
    }
    let m = A::max_of(x);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v - m;
    }
    A::exp_in_place(out);
    let sum = A::sum_lanes(out);
    for o in out.iter_mut() {
        *o = *o / sum;
    }
}

/// The router's settings, as Megatron's `topk_routing_with_score_function` takes them.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterConfig {
    pub topk: usize,
    pub score_function: ScoreFunction,
    pub use_pre_softmax: bool,
    pub num_groups: Option<usize>,
    pub group_topk: Option<usize>,
    pub scaling_factor: Option<f64>,
}

impl RouterConfig {
    /// Checks the settings against `num_experts`; errors name the offending argument.
    pub fn validate(&self, num_experts: usize, has_expert_bias: bool) -> Result<()> {
        let e = num_experts;
        ensure(e >= 1, "logits", || {
            "must have at least one expert column".into()
        })?;
        ensure(self.topk >= 1 && self.topk <= e, "topk", || {
            format!("must be in [1, num_experts={e}], got {}", self.topk)
        })?;
        if let Some(g) = self.num_groups {
            ensure(g >= 1 && e % g == 0, "num_groups", || {
                format!("must be a positive divisor of num_experts={e}, got {g}")
            })?;
        }
        if let Some(gk) = self.group_topk {
            let g = self
                .num_groups
                .ok_or_else(|| invalid("num_groups", "is required when group_topk is set"))?;
            ensure(gk >= 1 && gk <= g, "group_topk", || {
                format!("must be in [1, num_groups={g}], got {gk}")
            })?;
            let per_group = e / g;
            ensure(self.topk >= gk, "topk", || {
                format!("must be >= group_topk={gk} (each selected group scores its top topk // group_topk experts), got {}", self.topk)
            })?;
            ensure(self.topk / gk <= per_group, "topk", || {
                format!(
                    "topk // group_topk = {} exceeds the {per_group} experts of a group",
                    self.topk / gk
                )
            })?;
            ensure(self.topk <= gk * per_group, "topk", || {
                format!(
                    "must be <= group_topk * experts per group = {}, got {}",
                    gk * per_group,
                    self.topk
                )
            })?;
        }
        if let Some(sf) = self.scaling_factor {
            ensure(sf.is_finite(), "scaling_factor", || {
                format!("must be finite, got {sf}")
            })?;
        }
        if has_expert_bias && self.score_function == ScoreFunction::Softmax {
            return Err(invalid(
                "expert_bias",
                "is only used with score_function 'sigmoid' or 'sqrtsoftplus' (as in Megatron-Core)",
            ));
        }
        Ok(())
    }

    fn grouping(&self) -> Option<(usize, usize)> {
        match (self.group_topk, self.num_groups) {
            (Some(gk), Some(g)) => Some((g, gk)),
            _ => None,
        }
    }
}

/// The best `k` of a stream of scores, in descending order; equal scores keep the earlier
/// (lower-index) entry first. Scores are finite (checked on load).
pub(crate) struct TopK<A> {
    vals: Vec<A>,
    idx: Vec<usize>,
    len: usize,
    k: usize,
}

impl<A: Real> TopK<A> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            vals: vec![A::zero(); capacity.max(1)],
            idx: vec![0; capacity.max(1)],
            len: 0,
            k: 0,
        }
    }

    #[inline(always)]
    pub(crate) fn reset(&mut self, k: usize) {
        debug_assert!(k <= self.vals.len());
        self.len = 0;
        self.k = k;
    }

    #[inline(always)]
    pub(crate) fn push(&mut self, v: A, i: usize) {
        let k = self.k;
        if self.len == k {
            // Most candidates stop here: one well-predicted comparison.
            if k == 0 || v <= self.vals[k - 1] {
                return;
            }
            self.len -= 1;
        }
        let mut j = self.len;
        while j > 0 && self.vals[j - 1] < v {
            self.vals[j] = self.vals[j - 1];
            self.idx[j] = self.idx[j - 1];
            j -= 1;
        }
        self.vals[j] = v;
        self.idx[j] = i;
        self.len += 1;
    }

    #[inline(always)]
    pub(crate) fn indices(&self) -> &[usize] {
        &self.idx[..self.len]
    }

    #[inline(always)]
    pub(crate) fn map_indices(&mut self, f: impl Fn(usize) -> usize) {
        for i in &mut self.idx[..self.len] {
            *i = f(*i);
        }
    }

    #[inline(always)]
    pub(crate) fn values(&self) -> &[A] {
        &self.vals[..self.len]
    }
}

/// Scratch space reused across the tokens of one task.
struct Scratch<A> {
    x: Vec<A>,
    s: Vec<A>,
    r: Vec<A>,
    p: Vec<A>,
    sel: Selection<A>,
}

impl<A: Real> Scratch<A> {
    fn new(e: usize, k: usize) -> Self {
        Self {
            x: vec![A::zero(); e],
            s: vec![A::zero(); e],
            r: vec![A::zero(); e],
            p: vec![A::zero(); k],
            sel: Selection::new(e, k),
        }
    }
}

/// Beyond this many picks, selection inserts into a sorted list instead.
const ROUNDS_MAX: usize = 32;

/// Top-k selection with reusable scratch.
///
/// Why this shape: on random scores a sorted-insertion top-k mispredicts about `k ln(E/k)`
/// times per token. Here the scores are cut into blocks of 4 and each block's maximum kept;
/// each of the k rounds takes the first block holding the largest maximum, the first
/// element equal to it inside the block (so ties go to the lower index), masks it and
/// recomputes that one block's maximum (`Real::topk_blocks`, SSE2 for f32). Picks come out
/// in descending order.
struct Selector<A> {
    work: Vec<A>,
    block_max: Vec<A>,
}

impl<A: Real> Selector<A> {
    fn new(capacity: usize) -> Self {
        Self {
            work: Vec::with_capacity(capacity + 4),
            block_max: Vec::with_capacity(capacity / 4 + 8),
        }
    }

    /// The `k` best of `scores` (finite) into `top`, descending, ties to the lower index.
    fn topk(&mut self, scores: &[A], k: usize, top: &mut TopK<A>) {
        top.reset(k);
        let e = scores.len();
        if k == 0 || e == 0 {
            return;
        }
        if k > ROUNDS_MAX {
            for (i, &v) in scores.iter().enumerate() {
                top.push(v, i);
            }
            return;
        }
        A::topk_blocks(
            scores,
            k,
            &mut self.work,
            &mut self.block_max,
            &mut top.vals,
            &mut top.idx,
        );
        top.len = k;
    }
}

/// `a + b` for the two largest values of `v` (`len >= 2`), with four lanes each keeping a
/// largest and a second largest (vectorisable).
#[inline]
fn top2_sum<A: Real>(v: &[A]) -> A {
    let mut m1 = [A::neg_infinity(); 4];
    let mut m2 = [A::neg_infinity(); 4];
    let mut chunks = v.chunks_exact(4);
    for c in &mut chunks {
        for l in 0..4 {
            let x = c[l];
            let lo = if x < m1[l] { x } else { m1[l] };
            m1[l] = if x > m1[l] { x } else { m1[l] };
            m2[l] = if lo > m2[l] { lo } else { m2[l] };
        }
    }
    let (mut a, mut b) = (A::neg_infinity(), A::neg_infinity());
    for &x in m1.iter().chain(m2.iter()).chain(chunks.remainder()) {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a + b
}

/// (Group-limited) top-k selection of one token's scores, with its scratch.
struct Selection<A> {
    /// The picks: experts in descending score order.
    top: TopK<A>,
    inner: TopK<A>,
    groups: TopK<A>,
    group_scores: Vec<A>,
    chosen: Vec<usize>,
    gathered: Vec<A>,
    selector: Selector<A>,
}

impl<A: Real> Selection<A> {
    fn new(e: usize, k: usize) -> Self {
        Self {
            top: TopK::new(k),
            inner: TopK::new(e),
            groups: TopK::new(e),
            group_scores: Vec::with_capacity(e),
            chosen: Vec::with_capacity(e),
            gathered: vec![A::zero(); e],
            selector: Selector::new(e),
        }
    }

    /// Selects the top `k` of `scores`, restricted to the best groups if grouped.
    fn select(&mut self, scores: &[A], k: usize, grouping: Option<(usize, usize)>) -> &[usize] {
        let Self {
            top,
            inner,
            groups,
            group_scores,
            chosen,
            gathered,
            selector,
        } = self;
        match grouping {
            None => selector.topk(scores, k, top),
            Some((g, gk)) => {
                let per = scores.len() / g;
                let m = k / gk;
                group_scores.clear();
                for gi in 0..g {
                    let v = &scores[gi * per..(gi + 1) * per];
                    // Summed in descending order, as torch sums the sorted top-m values.
                    let score = match m {
                        1 => A::max_of(v),
                        2 => top2_sum(v),
                        _ => {
                            selector.topk(v, m, inner);
                            inner.values().iter().fold(A::zero(), |a, &x| a + x)
                        }
                    };
                    group_scores.push(score);
                }
                selector.topk(group_scores, gk, groups);
                // Gather the chosen groups' experts in ascending order (ties to the lower
                // expert), as Megatron's masked_fill(-inf) of the others, then pick among them.
                chosen.clear();
                chosen.extend_from_slice(groups.indices());
                chosen.sort_unstable();
                let gathered = &mut gathered[..chosen.len() * per];
                for (c, &gi) in chosen.iter().enumerate() {
                    gathered[c * per..(c + 1) * per]
                        .copy_from_slice(&scores[gi * per..(gi + 1) * per]);
                }
                selector.topk(gathered, k, top);
                // Positions among the chosen groups back to expert ids (the order is kept).
                top.map_indices(|c| chosen[c / per] * per + c % per);
            }
        }
        top.indices()
    }
}

/// Loads one token's logits, widened, rejecting non-finite values.
#[inline]
fn load_logits<T: Element>(row: &[T], x: &mut [T::Acc], token: usize) -> Result<()> {
    T::load_row(row, x);
    // A branch-free scan first (vectorises); locate the culprit only on failure.
    if x.iter().fold(false, |bad, v| bad | !v.is_finite()) {
        let e = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(invalid(
            "logits",
            format!(
                "must be finite; found {:?} at token {token}, expert {e}",
                x[e]
            ),
        ));
    }
    Ok(())
}

/// Where the router writes. `probs_k`/`indices` are `[T, k]`; `dense` is
/// `(probs [T, E], routing_map [T, E])`; `tokens_per_expert` is `[E]`.
pub struct RouteOutputs<'a, T> {
    pub probs_k: &'a mut [T],
    pub indices: &'a mut [i64],
    pub dense: Option<(&'a mut [T], &'a mut [bool])>,
    pub tokens_per_expert: &'a mut [i64],
}

struct RouteTask<'a, T> {
    t0: usize,
    logits: &'a [T],
    probs_k: &'a mut [T],
    indices: &'a mut [i64],
    dense: Option<(&'a mut [T], &'a mut [bool])>,
}

/// Router forward for `logits [num_tokens, num_experts]`.
pub fn topk_route_forward<T: Element>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    expert_bias: Option<&[f32]>,
    cfg: &RouterConfig,
    out: RouteOutputs<'_, T>,
) -> Result<()> {
    let (t_n, e_n, k) = (num_tokens, num_experts, cfg.topk);
    cfg.validate(e_n, expert_bias.is_some())?;
    ensure(logits.len() == t_n * e_n, "logits", || {
        "size does not match its shape".into()
    })?;
    ensure(
        out.probs_k.len() == t_n * k && out.indices.len() == t_n * k,
        "probs",
        || "output buffers must be [num_tokens, topk]".into(),
    )?;
    ensure(
        out.tokens_per_expert.len() == e_n,
        "tokens_per_expert",
        || format!("must have num_experts={e_n} entries"),
    )?;
    if let Some((p, m)) = &out.dense {
        ensure(
            p.len() == t_n * e_n && m.len() == t_n * e_n,
            "probs",
            || "dense outputs must be [num_tokens, num_experts]".into(),
        )?;
    }
    if let Some(b) = expert_bias {
        ensure(b.len() == e_n, "expert_bias", || {
            format!("must have num_experts={e_n} entries, got {}", b.len())
        })?;
        if let Some(i) = b.iter().position(|v| !v.is_finite()) {
            return Err(invalid(
                "expert_bias",
                format!("must be finite; entry {i} is {}", b[i]),
            ));
        }
    }
    let bias: Option<Vec<T::Acc>> =
        expert_bias.map(|b| b.iter().map(|&v| T::Acc::of_f64(v as f64)).collect());

    let RouteOutputs {
        probs_k,
        indices,
        dense,
        tokens_per_expert,
    } = out;
    let per = TOKENS_PER_TASK;
    let mut tasks: Vec<RouteTask<'_, T>> = Vec::with_capacity(t_n.div_ceil(per));
    let mut dense_chunks: Vec<Option<(&mut [T], &mut [bool])>> = match dense {
        Some((p, m)) => p
            .chunks_mut(per * e_n)
            .zip(m.chunks_mut(per * e_n))
            .map(Some)
            .collect(),
        None => Vec::new(),
    };
    dense_chunks.reverse();
    for (i, ((lg, pk), ix)) in logits
        .chunks(per * e_n)
        .zip(probs_k.chunks_mut(per * k))
        .zip(indices.chunks_mut(per * k))
        .enumerate()
    {
        tasks.push(RouteTask {
            t0: i * per,
            logits: lg,
            probs_k: pk,
            indices: ix,
            dense: dense_chunks.pop().flatten(),
        });
    }

    let results: Vec<Result<Vec<i64>>> = pool::install(|| {
        tasks
            .into_par_iter()
            .map(|task| route_task(task, e_n, bias.as_deref(), cfg))
            .collect()
    });
    tokens_per_expert.fill(0);
    // Report the error of the first failing token, whatever the thread count.
    let mut totals = vec![0i64; e_n];
    for r in results {
        for (t, c) in totals.iter_mut().zip(r?) {
            *t += c;
        }
    }
    tokens_per_expert.copy_from_slice(&totals);
    Ok(())
}

fn route_task<T: Element>(
    task: RouteTask<'_, T>,
    e_n: usize,
    bias: Option<&[T::Acc]>,
    cfg: &RouterConfig,
) -> Result<Vec<i64>> {
    type A<T> = <T as Element>::Acc;
    let k = cfg.topk;
    let grouping = cfg.grouping();
    let scale = cfg
        .scaling_factor
        .filter(|&s| s != 0.0)
        .map(|s| A::<T>::of_f64(s as f32 as f64));
    let eps = A::<T>::of_f64(NORM_EPS);
    let mut sc = Scratch::<A<T>>::new(e_n, k);
    let mut counts = vec![0i64; e_n];
    let RouteTask {
        t0,
        logits,
        probs_k,
        indices,
        mut dense,
    } = task;
    let n = logits.len() / e_n.max(1);
    if let Some((dp, dm)) = dense.as_mut() {
        // Zeroed once per task rather than row by row.
        dp.fill(T::default());
        dm.fill(false);
    }
    for i in 0..n {
        let t = t0 + i;
        let Scratch { x, s, r, p, sel } = &mut sc;
        load_logits(&logits[i * e_n..(i + 1) * e_n], x, t)?;
        match cfg.score_function {
            ScoreFunction::Softmax if cfg.use_pre_softmax => {
                softmax_into(x, s);
                for (pj, &e) in p.iter_mut().zip(sel.select(s, k, grouping)) {
                    *pj = s[e];
                }
            }
            ScoreFunction::Softmax => {
                for (rj, &e) in r.iter_mut().zip(sel.select(x, k, grouping)) {
                    *rj = x[e];
                }
                softmax_into(&r[..k], p);
            }
            f => {
                f.scores_into(x, s);
                let picks = match bias {
                    Some(b) => {
                        for ((rv, &sv), &bv) in r.iter_mut().zip(s.iter()).zip(b) {
                            *rv = sv + bv;
                        }
                        sel.select(r, k, grouping)
                    }
                    None => sel.select(s, k, grouping),
                };
                for (pj, &e) in p.iter_mut().zip(picks) {
                    *pj = s[e];
                }
                if k > 1 {
                    let denom = p.iter().fold(A::<T>::zero(), |a, &v| a + v) + eps;
                    p.iter_mut().for_each(|v| *v = *v / denom);
                }
            }
        }
        if let Some(sf) = scale {
            p.iter_mut().for_each(|v| *v = *v * sf);
        }
        let sel = sel.top.indices();
        for j in 0..k {
            let e = sel[j];
            probs_k[i * k + j] = T::from_acc(p[j]);
            indices[i * k + j] = e as i64;
            counts[e] += 1;
        }
        if let Some((dp, dm)) = dense.as_mut() {
            let prow = &mut dp[i * e_n..(i + 1) * e_n];
            let mrow = &mut dm[i * e_n..(i + 1) * e_n];
            for j in 0..k {
                prow[sel[j]] = probs_k[i * k + j];
                mrow[sel[j]] = true;
            }
        }
    }
    Ok(counts)
}

/// The gradient arriving at the router's probs: dense `[T, E]` or compact `[T, k]`.
#[derive(Clone, Copy)]
pub enum ProbsGrad<'a, T> {
    Dense(&'a [T]),
    Compact(&'a [T]),
}

/// Router backward: `grad_logits [T, E]` from the gradient of the probs and the saved
/// selection `indices [T, k]`. Scores are recomputed from `logits`; nothing else is saved.
pub fn topk_route_backward<T: Element>(
    grad: ProbsGrad<'_, T>,
    logits: &[T],
    indices: &[i64],
    num_tokens: usize,
    num_experts: usize,
    cfg: &RouterConfig,
    grad_logits: &mut [T],
) -> Result<()> {
    type A<T> = <T as Element>::Acc;
    let (t_n, e_n, k) = (num_tokens, num_experts, cfg.topk);
    ensure(k >= 1 && k <= e_n, "topk", || {
        format!("must be in [1, {e_n}], got {k}")
    })?;
    ensure(logits.len() == t_n * e_n, "logits", || {
        "size does not match its shape".into()
    })?;
    ensure(indices.len() == t_n * k, "indices", || {
        "must be [num_tokens, topk]".into()
    })?;
    ensure(grad_logits.len() == t_n * e_n, "grad_logits", || {
        "must be [num_tokens, num_experts]".into()
    })?;
    match grad {
        ProbsGrad::Dense(g) => ensure(g.len() == t_n * e_n, "grad_probs", || {
            "must be [num_tokens, num_experts]".into()
        })?,
        ProbsGrad::Compact(g) => ensure(g.len() == t_n * k, "grad_probs", || {
            "must be [num_tokens, topk]".into()
        })?,
    }
    if let Some(i) = indices.iter().position(|&v| v < 0 || v as usize >= e_n) {
        return Err(invalid(
            "indices",
            format!("entry {i} = {} is not an expert in [0, {e_n})", indices[i]),
        ));
    }
    let scale = cfg
        .scaling_factor
        .filter(|&s| s != 0.0)
        .map(|s| A::<T>::of_f64(s as f32 as f64))
        .unwrap_or(A::<T>::one());
    let eps = A::<T>::of_f64(NORM_EPS);
    let per = TOKENS_PER_TASK;
    pool::install(|| {
        grad_logits
            .par_chunks_mut(per * e_n)
            .enumerate()
            .for_each(|(c, out)| {
                let pre = cfg.use_pre_softmax && cfg.score_function == ScoreFunction::Softmax;
                let mut x = vec![A::<T>::zero(); if pre { e_n } else { 0 }];
                let mut s = vec![A::<T>::zero(); if pre { e_n } else { 0 }];
                let mut g = vec![A::<T>::zero(); k];
                let mut v = vec![A::<T>::zero(); k];
                let mut xs = vec![A::<T>::zero(); k];
                let mut dv = vec![A::<T>::zero(); k];
                if !pre {
                    // Only the k selected logits get a gradient: zero the rows once, then
                    // read and write just those entries.
                    out.fill(T::default());
                }
                let n = out.len() / e_n;
                for i in 0..n {
                    let t = c * per + i;
                    let sel = &indices[t * k..(t + 1) * k];
                    let lrow = &logits[t * e_n..(t + 1) * e_n];
                    for j in 0..k {
                        let raw = match grad {
                            ProbsGrad::Dense(d) => d[t * e_n + sel[j] as usize],
                            ProbsGrad::Compact(d) => d[t * k + j],
                        };
                        g[j] = raw.to_acc() * scale;
                        xs[j] = lrow[sel[j] as usize].to_acc();
                    }
                    let orow = &mut out[i * e_n..(i + 1) * e_n];
                    match cfg.score_function {
                        ScoreFunction::Softmax if pre => {
                            T::load_row(lrow, &mut x);
                            softmax_into(&x, &mut s);
                            let dot =
                                (0..k).fold(A::<T>::zero(), |a, j| a + s[sel[j] as usize] * g[j]);
                            for e in 0..e_n {
                                x[e] = -(s[e] * dot);
                            }
                            for j in 0..k {
                                let e = sel[j] as usize;
                                x[e] = s[e] * (g[j] - dot);
                            }
                            T::store_row(&x, orow);
                        }
                        ScoreFunction::Softmax => {
                            softmax_into(&xs, &mut v);
                            let dot = (0..k).fold(A::<T>::zero(), |a, j| a + v[j] * g[j]);
                            for j in 0..k {
                                orow[sel[j] as usize] = T::from_acc(v[j] * (g[j] - dot));
                            }
                        }
                        f => {
                            // The same score arithmetic as the forward pass.
                            f.scores_into(&xs, &mut v);
                            if k > 1 {
                                let denom = v.iter().fold(A::<T>::zero(), |a, &w| a + w) + eps;
                                let dot =
                                    (0..k).fold(A::<T>::zero(), |a, j| a + g[j] * (v[j] / denom));
                                for j in 0..k {
                                    dv[j] = (g[j] - dot) / denom;
                                }
                            } else {
                                dv.copy_from_slice(&g);
                            }
                            for j in 0..k {
                                let d = dv[j] * f.elementwise_grad(xs[j], v[j]);
                                orow[sel[j] as usize] = T::from_acc(d);
                            }
                        }
                    }
                }
            })
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
/// Megatron's `compute_routing_scores_for_aux_loss`: scores over all experts (softmax, or
/// sigmoid / sqrtsoftplus normalised to sum 1) and the top-k map they imply.
/// `scores` is `[T, E]` in the accumulation precision; `routing_map` is `[T, E]`.
pub fn aux_loss_scores_forward<T: Element>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    score_function: ScoreFunction,
    scores: &mut [T::Acc],
    routing_map: &mut [bool],
    tokens_per_expert: &mut [i64],
) -> Result<()> {
    let (t_n, e_n) = (num_tokens, num_experts);
    ensure(e_n >= 1, "logits", || {
        "must have at least one expert column".into()
    })?;
    ensure(topk >= 1 && topk <= e_n, "topk", || {
        format!("must be in [1, num_experts={e_n}], got {topk}")
    })?;
    ensure(
        logits.len() == t_n * e_n && scores.len() == t_n * e_n && routing_map.len() == t_n * e_n,
        "logits",
        || "logits, scores and routing_map must all be [num_tokens, num_experts]".into(),
    )?;
    ensure(tokens_per_expert.len() == e_n, "tokens_per_expert", || {
        format!("must have {e_n} entries")
    })?;
    let per = TOKENS_PER_TASK;
    let eps = T::Acc::of_f64(NORM_EPS);
    let results: Vec<Result<Vec<i64>>> = pool::install(|| {
        logits
            .par_chunks(per * e_n)
            .zip(scores.par_chunks_mut(per * e_n))
            .zip(routing_map.par_chunks_mut(per * e_n))
            .enumerate()
            .map(|(c, ((lg, sc), mp))| {
                let mut x = vec![T::Acc::zero(); e_n];
                let mut sel = TopK::<T::Acc>::new(topk);
                let mut selector = Selector::<T::Acc>::new(e_n);
                let mut counts = vec![0i64; e_n];
                for i in 0..lg.len() / e_n {
                    let row = i * e_n..(i + 1) * e_n;
                    load_logits(&lg[row.clone()], &mut x, c * per + i)?;
                    let s = &mut sc[row.clone()];
                    match score_function {
                        ScoreFunction::Softmax => softmax_into(&x, s),
                        f => {
                            f.scores_into(&x, s);
                            let denom = T::Acc::sum_lanes(s) + eps;
                            s.iter_mut().for_each(|v| *v = *v / denom);
                        }
                    }
                    selector.topk(s, topk, &mut sel);
                    let m = &mut mp[row];
                    m.fill(false);
                    for &e in sel.indices() {
                        m[e] = true;
                        counts[e] += 1;
                    }
                }
                Ok(counts)
            })
            .collect()
    });
    let mut totals = vec![0i64; e_n];
    for r in results {
        for (t, c) in totals.iter_mut().zip(r?) {
            *t += c;
        }
    }
    tokens_per_expert.copy_from_slice(&totals);
    Ok(())
}

/// Backward of [`aux_loss_scores_forward`]: `grad_logits` from `grad_scores` (both `[T, E]`).
pub fn aux_loss_scores_backward<T: Element>(
    grad_scores: &[T::Acc],
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    score_function: ScoreFunction,
    grad_logits: &mut [T],
) -> Result<()> {
    let (t_n, e_n) = (num_tokens, num_experts);
    ensure(
        grad_scores.len() == t_n * e_n
            && logits.len() == t_n * e_n
            && grad_logits.len() == t_n * e_n,
        "grad_scores",
        || "grad_scores, logits and grad_logits must all be [num_tokens, num_experts]".into(),
    )?;
    let eps = T::Acc::of_f64(NORM_EPS);
    let per = TOKENS_PER_TASK;
    pool::install(|| {
        grad_logits
            .par_chunks_mut(per * e_n.max(1))
            .enumerate()
            .for_each(|(c, out)| {
                let mut x = vec![T::Acc::zero(); e_n];
                let mut s = vec![T::Acc::zero(); e_n];
                let mut dx = vec![T::Acc::zero(); e_n];
                for i in 0..out.len() / e_n.max(1) {
                    let t = c * per + i;
                    let g = &grad_scores[t * e_n..(t + 1) * e_n];
                    T::load_row(&logits[t * e_n..(t + 1) * e_n], &mut x);
                    match score_function {
                        ScoreFunction::Softmax => {
                            softmax_into(&x, &mut s);
                            let dot = T::Acc::dot_lanes(&s, g);
                            for e in 0..e_n {
                                dx[e] = s[e] * (g[e] - dot);
                            }
                        }
                        f => {
                            f.scores_into(&x, &mut s);
                            let denom = T::Acc::sum_lanes(&s) + eps;
                            // sum_j g_j s_j / denom
                            let dot = T::Acc::dot_lanes(g, &s) / denom;
                            for e in 0..e_n {
                                dx[e] = (g[e] - dot) / denom * f.elementwise_grad(x[e], s[e]);
                            }
                        }
                    }
                    T::store_row(&dx, &mut out[i * e_n..(i + 1) * e_n]);
                }
            })
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(k: usize, f: ScoreFunction) -> RouterConfig {
        RouterConfig {
            topk: k,
            score_function: f,
            use_pre_softmax: false,
            num_groups: None,
            group_topk: None,
            scaling_factor: None,
        }
    }

    fn route(
        logits: &[f32],
        e: usize,
        c: &RouterConfig,
        bias: Option<&[f32]>,
    ) -> (Vec<f32>, Vec<i64>, Vec<i64>) {
        let t = logits.len() / e;
        let mut p = vec![0f32; t * c.topk];
        let mut ix = vec![0i64; t * c.topk];
        let mut tpe = vec![0i64; e];
        topk_route_forward(
            logits,
            t,
            e,
            bias,
            c,
            RouteOutputs {
                probs_k: &mut p,
                indices: &mut ix,
                dense: None,
                tokens_per_expert: &mut tpe,
            },
        )
        .unwrap();
        (p, ix, tpe)
    }

    #[test]
    fn ties_go_to_lower_index_in_descending_order() {
        let (_, ix, tpe) = route(
            &[1.0, 3.0, 3.0, 2.0, 3.0],
            5,
            &cfg(3, ScoreFunction::Softmax),
            None,
        );
        assert_eq!(ix, vec![1, 2, 4]);
        assert_eq!(tpe, vec![0, 1, 1, 0, 1]);
    }

    #[test]
    fn post_softmax_probs_sum_to_one() {
        let (p, ix, _) = route(
            &[0.1, -2.0, 0.7, 0.3],
            4,
            &cfg(2, ScoreFunction::Softmax),
            None,
        );
        assert_eq!(ix, vec![2, 3]);
        let (a, b) = (0.7f32.exp(), 0.3f32.exp());
        assert!((p[0] - a / (a + b)).abs() < 1e-6 && (p[0] + p[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bias_changes_selection_not_probs() {
        let logits = [0.0f32, 0.5, 1.0, 0.2];
        let bias = [2.0f32, 0.0, 0.0, 0.0];
        let (p, ix, _) = route(&logits, 4, &cfg(2, ScoreFunction::Sigmoid), Some(&bias));
        assert_eq!(ix, vec![0, 2]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (s0, s2) = (sig(0.0), sig(1.0));
        assert!((p[0] - s0 / (s0 + s2 + 1e-20)).abs() < 1e-6);
    }

    #[test]
    fn group_limited_selects_inside_best_groups() {
        // 2 groups of 3; group 1 holds the best pair-sum even though group 0 holds the max.
        let logits = [5.0f32, -9.0, -9.0, 4.0, 4.0, 0.0];
        let mut c = cfg(2, ScoreFunction::Sigmoid);
        c.num_groups = Some(2);
        c.group_topk = Some(1);
        let (_, ix, _) = route(&logits, 6, &c, None);
        assert_eq!(ix, vec![3, 4]);
    }

    #[test]
    fn top2_sum_matches_sorting() {
        for n in 2..40usize {
            let v: Vec<f32> = (0..n).map(|i| ((i * 29) % 13) as f32 * 0.5 - 2.0).collect();
            let mut s = v.clone();
            s.sort_by(|a, b| b.partial_cmp(a).unwrap());
            assert_eq!(top2_sum(&v), s[0] + s[1], "n={n}");
        }
    }

    #[test]
    fn validation_names_arguments() {
        let mut c = cfg(5, ScoreFunction::Softmax);
        let err = c.validate(4, false).unwrap_err();
        assert!(err.to_string().starts_with("topk:"), "{err}");
        c.topk = 2;
        c.num_groups = Some(3);
        assert!(c
            .validate(4, false)
            .unwrap_err()
            .to_string()
            .starts_with("num_groups:"));
        c.num_groups = Some(2);
        c.group_topk = Some(3);
        assert!(c
            .validate(4, false)
            .unwrap_err()
            .to_string()
            .starts_with("group_topk:"));
        let mut t = vec![0f32; 2];
        let mut i = vec![0i64; 2];
        let mut n = vec![0i64; 4];
        let err = topk_route_forward(
            &[0.0f32, f32::NAN, 0.0, 0.0],
            1,
            4,
            None,
            &cfg(2, ScoreFunction::Softmax),
            RouteOutputs {
                probs_k: &mut t,
                indices: &mut i,
                dense: None,
                tokens_per_expert: &mut n,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("logits: must be finite"), "{err}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let e = 6;
        let logits: Vec<f64> = vec![
            0.3, -1.2, 0.8, 0.1, 2.0, -0.4, 1.1, 0.0, -0.7, 0.9, 0.2, 0.5,
        ];
        let t = 2;
        for (f, pre) in [
            (ScoreFunction::Softmax, false),
            (ScoreFunction::Softmax, true),
            (ScoreFunction::Sigmoid, false),
            (ScoreFunction::SqrtSoftplus, false),
        ] {
            let mut c = cfg(3, f);
            c.use_pre_softmax = pre;
            c.scaling_factor = Some(2.5);
            let run = |lg: &[f64]| {
                let mut p = vec![0f64; t * 3];
                let mut ix = vec![0i64; t * 3];
                let mut n = vec![0i64; e];
                topk_route_forward(
                    lg,
                    t,
                    e,
                    None,
                    &c,
                    RouteOutputs {
                        probs_k: &mut p,
                        indices: &mut ix,
                        dense: None,
                        tokens_per_expert: &mut n,
                    },
                )
                .unwrap();
                (p, ix)
            };
            let (p0, ix) = run(&logits);
            let w: Vec<f64> = (0..p0.len()).map(|i| 0.3 + i as f64 * 0.1).collect();
            let mut gl = vec![0f64; t * e];
            topk_route_backward(ProbsGrad::Compact(&w), &logits, &ix, t, e, &c, &mut gl).unwrap();
            for q in 0..t * e {
                let h = 1e-6;
                let mut lp = logits.clone();
                lp[q] += h;
                let mut lm = logits.clone();
                lm[q] -= h;
                let (pp, _) = run(&lp);
                let (pm, _) = run(&lm);
                let fd: f64 = (0..pp.len())
                    .map(|i| w[i] * (pp[i] - pm[i]) / (2.0 * h))
                    .sum();
                assert!(
                    (fd - gl[q]).abs() < 1e-6,
                    "{f:?} pre={pre} q={q}: fd {fd} vs {}",
                    gl[q]
                );
            }
        }
    }
}
