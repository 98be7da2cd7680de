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

use crate::elem::prelude::*;
use crate::error::{ensure, invalid, Result};
use crate::pool;

/// Tokens per parallel task: small enough to balance, large enough to amortise scratch buffers.
const TOKENS_PER_TASK: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFunction {
    Softmax,
    Sigmoid,
    SqrtSoftplus,
}

impl ScoreFunction {
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

    /// The elementwise score of a logit (sigmoid / sqrtsoftplus only).
    #[inline]
    fn elementwise<A: Real>(self, x: A) -> A {
        match self {
            Self::Sigmoid => sigmoid(x),
            Self::SqrtSoftplus => softplus(x).sqrt(),
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

#[inline]
pub(crate) fn sigmoid<A: Real>(x: A) -> A {
    A::one() / (A::one() + (-x).exp())
}

/// torch.nn.functional.softplus with beta=1, threshold=20.
#[inline]
pub(crate) fn softplus<A: Real>(x: A) -> A {
    if x > A::of_f64(SOFTPLUS_THRESHOLD) {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `out = softmax(x)`; returns nothing, `out.len() == x.len()`.
#[inline]
pub(crate) fn softmax_into<A: Real>(x: &[A], out: &mut [A]) {
    let m = x.iter().copied().fold(A::neg_infinity(), A::max);
    let mut sum = A::zero();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        sum = sum + *o;
    }
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

/// Inserts expert `e` with score `v` into `sel` (kept in descending score order, at most `k`
/// long). Equal scores stay behind earlier (lower-index) entries.
#[inline]
fn push_topk<A: Real>(scores: &[A], sel: &mut Vec<usize>, k: usize, e: usize) {
    let v = scores[e];
    if sel.len() == k {
        // Scores are finite (checked on load), so `<=` is the negation of `>`.
        if v <= scores[sel[k - 1]] {
            return;
        }
        sel.pop();
    }
    let pos = sel.iter().position(|&s| scores[s] < v).unwrap_or(sel.len());
    sel.insert(pos, e);
}

/// Scratch space reused across the tokens of one task.
struct Scratch<A> {
    x: Vec<A>,
    s: Vec<A>,
    r: Vec<A>,
    group_scores: Vec<A>,
    sel: Vec<usize>,
    tmp: Vec<usize>,
    groups: Vec<usize>,
    p: Vec<A>,
}

impl<A: Real> Scratch<A> {
    fn new(e: usize, k: usize) -> Self {
        Self {
            x: vec![A::zero(); e],
            s: vec![A::zero(); e],
            r: vec![A::zero(); e],
            group_scores: Vec::new(),
            sel: Vec::with_capacity(k + 1),
            tmp: Vec::with_capacity(e),
            groups: Vec::with_capacity(e),
            p: vec![A::zero(); k],
        }
    }
}

/// Selects the top `k` of `scores` into `sel`, restricted to the best groups if grouped.
fn select<A: Real>(
    scores: &[A],
    k: usize,
    grouping: Option<(usize, usize)>,
    sel: &mut Vec<usize>,
    tmp: &mut Vec<usize>,
    group_scores: &mut Vec<A>,
    groups: &mut Vec<usize>,
) {
    sel.clear();
    let e = scores.len();
    match grouping {
        None => (0..e).for_each(|i| push_topk(scores, sel, k, i)),
        Some((g, gk)) => {
            let per = e / g;
            let m = k / gk;
            group_scores.clear();
            for gi in 0..g {
                tmp.clear();
                (gi * per..(gi + 1) * per).for_each(|i| push_topk(scores, tmp, m, i));
                // Summed in descending order, as torch sums the sorted top-m values.
                let sum = tmp.iter().fold(A::zero(), |acc, &i| acc + scores[i]);
                group_scores.push(sum);
            }
            groups.clear();
            (0..g).for_each(|gi| push_topk(group_scores, groups, gk, gi));
            groups.sort_unstable();
            for &gi in groups.iter() {
                (gi * per..(gi + 1) * per).for_each(|i| push_topk(scores, sel, k, i));
            }
        }
    }
}

/// Loads one token's logits, widened, rejecting non-finite values.
#[inline]
fn load_logits<T: Element>(row: &[T], x: &mut [T::Acc], token: usize) -> Result<()> {
    T::load_row(row, x);
    if let Some(e) = x.iter().position(|v| !v.is_finite()) {
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
    for i in 0..n {
        let t = t0 + i;
        let Scratch {
            x,
            s,
            r,
            group_scores,
            sel,
            tmp,
            groups,
            p,
        } = &mut sc;
        load_logits(&logits[i * e_n..(i + 1) * e_n], x, t)?;
        match cfg.score_function {
            ScoreFunction::Softmax => {
                if cfg.use_pre_softmax {
                    softmax_into(x, s);
                    select(s, k, grouping, sel, tmp, group_scores, groups);
                    for (pj, &e) in p.iter_mut().zip(sel.iter()) {
                        *pj = s[e];
                    }
                } else {
                    select(x, k, grouping, sel, tmp, group_scores, groups);
                    for (rj, &e) in r.iter_mut().zip(sel.iter()) {
                        *rj = x[e];
                    }
                    softmax_into(&r[..k], p);
                }
            }
            f => {
                for (sv, &xv) in s.iter_mut().zip(x.iter()) {
                    *sv = f.elementwise(xv);
                }
                match bias {
                    Some(b) => {
                        for ((rv, &sv), &bv) in r.iter_mut().zip(s.iter()).zip(b) {
                            *rv = sv + bv;
                        }
                        select(r, k, grouping, sel, tmp, group_scores, groups);
                    }
                    None => select(s, k, grouping, sel, tmp, group_scores, groups),
                }
                for (pj, &e) in p.iter_mut().zip(sel.iter()) {
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
        for j in 0..k {
            let e = sel[j];
            probs_k[i * k + j] = T::from_acc(p[j]);
            indices[i * k + j] = e as i64;
            counts[e] += 1;
        }
        if let Some((dp, dm)) = dense.as_mut() {
            let prow = &mut dp[i * e_n..(i + 1) * e_n];
            let mrow = &mut dm[i * e_n..(i + 1) * e_n];
            prow.fill(T::default());
            mrow.fill(false);
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
                let mut x = vec![A::<T>::zero(); e_n];
                let mut s = vec![A::<T>::zero(); e_n];
                let mut g = vec![A::<T>::zero(); k];
                let mut v = vec![A::<T>::zero(); k];
                let mut xs = vec![A::<T>::zero(); k];
                let mut dx = vec![A::<T>::zero(); e_n];
                let n = out.len() / e_n;
                for i in 0..n {
                    let t = c * per + i;
                    let sel = &indices[t * k..(t + 1) * k];
                    T::load_row(&logits[t * e_n..(t + 1) * e_n], &mut x);
                    for j in 0..k {
                        let raw = match grad {
                            ProbsGrad::Dense(d) => d[t * e_n + sel[j] as usize],
                            ProbsGrad::Compact(d) => d[t * k + j],
                        };
                        g[j] = raw.to_acc() * scale;
                    }
                    dx.fill(A::<T>::zero());
                    match cfg.score_function {
                        ScoreFunction::Softmax if cfg.use_pre_softmax => {
                            softmax_into(&x, &mut s);
                            let dot =
                                (0..k).fold(A::<T>::zero(), |a, j| a + s[sel[j] as usize] * g[j]);
                            for e in 0..e_n {
                                dx[e] = -(s[e] * dot);
                            }
                            for j in 0..k {
                                let e = sel[j] as usize;
                                dx[e] = s[e] * (g[j] - dot);
                            }
                        }
                        ScoreFunction::Softmax => {
                            for j in 0..k {
                                xs[j] = x[sel[j] as usize];
                            }
                            softmax_into(&xs, &mut v);
                            let dot = (0..k).fold(A::<T>::zero(), |a, j| a + v[j] * g[j]);
                            for j in 0..k {
                                dx[sel[j] as usize] = v[j] * (g[j] - dot);
                            }
                        }
                        f => {
                            for j in 0..k {
                                v[j] = f.elementwise(x[sel[j] as usize]);
                            }
                            let dv: Vec<A<T>> = if k > 1 {
                                let denom = v.iter().fold(A::<T>::zero(), |a, &w| a + w) + eps;
                                let dot =
                                    (0..k).fold(A::<T>::zero(), |a, j| a + g[j] * (v[j] / denom));
                                (0..k).map(|j| (g[j] - dot) / denom).collect()
                            } else {
                                g.clone()
                            };
                            for j in 0..k {
                                let e = sel[j] as usize;
                                dx[e] = dv[j] * f.elementwise_grad(x[e], v[j]);
                            }
                        }
                    }
                    T::store_row(&dx, &mut out[i * e_n..(i + 1) * e_n]);
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
                let mut sel = Vec::with_capacity(topk + 1);
                let mut counts = vec![0i64; e_n];
                for i in 0..lg.len() / e_n {
                    let row = i * e_n..(i + 1) * e_n;
                    load_logits(&lg[row.clone()], &mut x, c * per + i)?;
                    let s = &mut sc[row.clone()];
                    match score_function {
                        ScoreFunction::Softmax => softmax_into(&x, s),
                        f => {
                            for (sv, &xv) in s.iter_mut().zip(x.iter()) {
                                *sv = f.elementwise(xv);
                            }
                            let denom = s.iter().fold(T::Acc::zero(), |a, &v| a + v) + eps;
                            s.iter_mut().for_each(|v| *v = *v / denom);
                        }
                    }
                    sel.clear();
                    (0..e_n).for_each(|e| push_topk(s, &mut sel, topk, e));
                    let m = &mut mp[row];
                    m.fill(false);
                    for &e in sel.iter() {
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
                            let dot = s
                                .iter()
                                .zip(g)
                                .fold(T::Acc::zero(), |a, (&sv, &gv)| a + sv * gv);
                            for e in 0..e_n {
                                dx[e] = s[e] * (g[e] - dot);
                            }
                        }
                        f => {
                            for (sv, &xv) in s.iter_mut().zip(x.iter()) {
                                *sv = f.elementwise(xv);
                            }
                            let denom = s.iter().fold(T::Acc::zero(), |a, &v| a + v) + eps;
                            let dot = s
                                .iter()
                                .zip(g)
                                .fold(T::Acc::zero(), |a, (&sv, &gv)| a + gv * (sv / denom));
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
        let (s0, s2) = (sigmoid(0.0f32), sigmoid(1.0f32));
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
