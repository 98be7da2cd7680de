//! Token permutation: permute tokens into expert-major order, unpermute (combine) them back,
//! and sort chunks of rows — Megatron-Core's `permute`, `unpermute` and `sort_chunks_by_idxs`.
//!
//! Layout contract (identical rows to Megatron's `moe_utils.permute`): expert `e` owns the rows
//! `[offset[e], offset[e + 1])`; its tokens come in ascending token order; with an alignment,
//! each expert's rows are padded up to a multiple of it with empty rows (source `-1`, zeros).
//! `sorted_indices[r]` is the source token of row `r`.
//!
//! Unpermute sums the copies of a token in ascending row order (= ascending expert order), in
//! f32 (f64 for f64 data), and rounds once: the result does not depend on the thread count.
//! With fp32 weights this is bit-identical to Megatron's fp32 `scatter_add_` path.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{checked_mul, ensure, invalid, try_zeroed, Result};
use crate::util::elem::prelude::*;
use crate::util::pool;

/// Tokens per block when building layouts in parallel (fixed: results never depend on it).
const TOKEN_BLOCK: usize = 512;
/// Rows per parallel task when moving data.
const ROW_BLOCK: usize = 16;

/// A set of token -> expert assignments: a boolean routing map or top-k expert indices.
pub trait Assignments: Sync {
    fn num_tokens(&self) -> usize;
    fn num_experts(&self) -> usize;
    /// Entries of the matching probability tensor.
    fn num_slots(&self) -> usize;
    /// Calls `f(token, expert, slot)` for each assignment of the tokens in `tokens`, in
    /// ascending token order; `slot` indexes the matching probability (`t * E + e` for a map,
    /// `t * k + j` for indices).
    fn visit<F: FnMut(usize, usize, usize)>(&self, tokens: Range<usize>, f: F);
    /// Checks the assignments of `tokens` (ids in range, no repeats).
    fn check(&self, _tokens: Range<usize>) -> Result<()> {
        Ok(())
    }
}

/// Megatron's `routing_map`: `bool [num_tokens, num_experts]`.
pub struct RoutingMap<'a> {
    pub map: &'a [bool],
    pub num_tokens: usize,
    pub num_experts: usize,
}

impl Assignments for RoutingMap<'_> {
    fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    fn num_experts(&self) -> usize {
        self.num_experts
    }
    fn num_slots(&self) -> usize {
        self.num_tokens * self.num_experts
    }
    #[inline]
    fn visit<F: FnMut(usize, usize, usize)>(&self, tokens: Range<usize>, mut f: F) {
        let e_n = self.num_experts;
        for t in tokens {
            let row = &self.map[t * e_n..(t + 1) * e_n];
            for (e, &m) in row.iter().enumerate() {
                if m {
                    f(t, e, t * e_n + e);
                }
            }
        }
    }
}

/// The compact form: `indices [num_tokens, topk]` of expert ids; `-1` marks a dropped slot.
pub struct ExpertIndices<'a> {
    pub indices: &'a [i64],
    pub num_tokens: usize,
    pub topk: usize,
    pub num_experts: usize,
}

impl Assignments for ExpertIndices<'_> {
    fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    fn num_experts(&self) -> usize {
        self.num_experts
    }
    fn num_slots(&self) -> usize {
        self.num_tokens * self.topk
    }
    #[inline]
    fn visit<F: FnMut(usize, usize, usize)>(&self, tokens: Range<usize>, mut f: F) {
        let k = self.topk;
        for t in tokens {
            for j in 0..k {
                let e = self.indices[t * k + j];
                if e >= 0 {
                    f(t, e as usize, t * k + j);
                }
            }
        }
    }
    fn check(&self, tokens: Range<usize>) -> Result<()> {
        let (k, e_n) = (self.topk, self.num_experts);
        for t in tokens {
            let row = &self.indices[t * k..(t + 1) * k];
            for (j, &e) in row.iter().enumerate() {
                if e < -1 || e >= e_n as i64 {
                    return Err(invalid(
                        "indices",
                        format!("token {t}, slot {j}: expert id {e} is outside [0, num_experts={e_n}) (-1 marks a dropped slot)"),
                    ));
                }
                if e >= 0 && row[..j].contains(&e) {
                    return Err(invalid(
                        "indices",
                        format!("token {t} lists expert {e} twice"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn token_blocks(num_tokens: usize) -> Vec<Range<usize>> {
    (0..num_tokens.div_ceil(TOKEN_BLOCK))
        .map(|b| b * TOKEN_BLOCK..((b + 1) * TOKEN_BLOCK).min(num_tokens))
        .collect()
}

/// Per-block expert counts, after checking each block.
fn block_counts<A: Assignments>(a: &A, blocks: &[Range<usize>]) -> Result<Vec<Vec<i64>>> {
    let e_n = a.num_experts();
    let per_block: Vec<Result<Vec<i64>>> = pool::install(|| {
        blocks
            .par_iter()
            .map(|r| {
                a.check(r.clone())?;
                let mut c = try_zeroed::<i64>(e_n, "num_experts")?;
                a.visit(r.clone(), |_, e, _| c[e] += 1);
                Ok(c)
            })
            .collect()
    });
    per_block.into_iter().collect()
}

/// Tokens routed to each expert (`tokens_per_expert`), checking the assignments.
pub fn count_tokens_per_expert<A: Assignments>(a: &A, counts: &mut [i64]) -> Result<()> {
    ensure(counts.len() == a.num_experts(), "tokens_per_expert", || {
        format!("must have num_experts={} entries", a.num_experts())
    })?;
    let blocks = token_blocks(a.num_tokens());
    counts.fill(0);
    for c in block_counts(a, &blocks)? {
        for (t, v) in counts.iter_mut().zip(c) {
            *t += v;
        }
    }
    Ok(())
}

/// `count` rounded up to a multiple of `align` (`align <= 1`: unchanged); `None` when the
/// result does not fit an `i64` (a `count` is never negative).
pub fn align_up(count: i64, align: usize) -> Option<i64> {
    if align <= 1 {
        Some(count)
    } else {
        let a = i64::try_from(align).ok()?;
        count.checked_add(a - 1).map(|c| c / a)?.checked_mul(a)
    }
}

/// A raw pointer that may cross threads: every user writes disjoint indices.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    #[inline(always)]
    fn ptr(self) -> *mut T {
        self.0
    }

    /// # Safety
    /// `i` is in bounds and no other thread touches index `i` concurrently.
    #[inline(always)]
    unsafe fn write(self, i: usize, v: T) {
        *self.0.add(i) = v;
    }
}

/// Builds the permutation layout of `a`: `sorted_indices [num_rows]` (source token of each
/// row, -1 for alignment padding), `padded_counts [E]` (rows per expert) and, if given, the
/// permuted probabilities (`probs` is indexed by the assignment slot; padding rows get zero).
pub fn permute_layout<A: Assignments, P: Copy + Default + Send + Sync>(
    a: &A,
    align: usize,
    probs: Option<&[P]>,
    sorted_indices: &mut [i64],
    permuted_probs: Option<&mut [P]>,
    padded_counts: &mut [i64],
) -> Result<()> {
    let e_n = a.num_experts();
    ensure(padded_counts.len() == e_n, "tokens_per_expert", || {
        format!("must have num_experts={e_n} entries")
    })?;
    let blocks = token_blocks(a.num_tokens());
    let counts = block_counts(a, &blocks)?;
    // Per-expert tables sized by the caller's `num_experts`: fallible allocations.
    let mut totals = try_zeroed::<i64>(e_n, "num_experts")?;
    for c in &counts {
        for (t, v) in totals.iter_mut().zip(c) {
            *t += v;
        }
    }
    // Padded row counts and offsets in checked arithmetic: a huge `align` must not wrap them
    // (the writes below are bounded by `expert_start[e_n] == sorted_indices.len()`).
    let mut expert_start = try_zeroed::<i64>(e_n + 1, "num_experts")?;
    let mut padded = try_zeroed::<i64>(e_n, "num_experts")?;
    for e in 0..e_n {
        padded[e] = align_up(totals[e], align)
            .filter(|&p| p <= isize::MAX as i64)
            .ok_or_else(|| {
                invalid(
                    "align_size",
                    format!(
                        "{align} is too large: expert {e}'s {} rows padded to a multiple of it overflow int64",
                        totals[e]
                    ),
                )
            })?;
        expert_start[e + 1] = expert_start[e].checked_add(padded[e]).ok_or_else(|| {
            invalid(
                "align_size",
                format!("{align} is too large: the padded row count overflows int64"),
            )
        })?;
    }
    let num_rows = expert_start[e_n] as usize;
    ensure(sorted_indices.len() == num_rows, "num_out_tokens", || {
        format!(
            "the routing selects {num_rows} rows (after alignment), but {} were requested",
            sorted_indices.len()
        )
    })?;
    padded_counts.copy_from_slice(&padded);
    if let Some(pp) = &permuted_probs {
        ensure(pp.len() == num_rows, "permuted_probs", || {
            format!("must have {num_rows} rows")
        })?;
    }
    if let Some(p) = probs {
        ensure(p.len() == a.num_slots(), "probs", || {
            format!(
                "must have {} entries (one per routing slot), got {}",
                a.num_slots(),
                p.len()
            )
        })?;
    }
    // Row where each block starts writing for each expert.
    let mut cursor: Vec<Vec<i64>> = Vec::with_capacity(counts.len());
    let mut next = try_zeroed::<i64>(e_n, "num_experts")?;
    next.copy_from_slice(&expert_start[..e_n]);
    for c in &counts {
        let mut cur = try_zeroed::<i64>(e_n, "num_experts")?;
        cur.copy_from_slice(&next);
        cursor.push(cur);
        for (n, v) in next.iter_mut().zip(c) {
            *n += v;
        }
    }
    let si = SharedMut(sorted_indices.as_mut_ptr());
    let pp = permuted_probs.map(|p| SharedMut(p.as_mut_ptr()));
    pool::install(|| {
        blocks
            .par_iter()
            .zip(cursor.into_par_iter())
            .for_each(|(r, mut cur)| {
                a.visit(r.clone(), |t, e, slot| {
                    let row = cur[e] as usize;
                    cur[e] += 1;
                    // SAFETY: rows [cursor_b[e], cursor_b[e] + count_b[e]) belong to this block
                    // alone, and `row < num_rows`.
                    unsafe {
                        si.write(row, t as i64);
                        if let (Some(pp), Some(p)) = (pp, probs) {
                            pp.write(row, p[slot]);
                        }
                    }
                });
            });
    });
    // Alignment padding rows.
    for e in 0..e_n {
        let first_pad = (expert_start[e] + totals[e]) as usize;
        let end = expert_start[e + 1] as usize;
        sorted_indices[first_pad..end].fill(-1);
        if let Some(pp) = pp {
            for row in first_pad..end {
                // SAFETY: in bounds; the parallel section has ended.
                unsafe { pp.write(row, P::default()) };
            }
        }
    }
    Ok(())
}

/// Megatron's drop-and-pad layout: each expert takes exactly `capacity` rows — its routed
/// tokens in ascending order, then (if it has fewer) the earliest tokens not routed to it.
pub fn permute_layout_drop_and_pad<P: Copy + Default + Send + Sync>(
    map: &RoutingMap<'_>,
    capacity: usize,
    probs: Option<&[P]>,
    sorted_indices: &mut [i64],
    permuted_probs: Option<&mut [P]>,
) -> Result<()> {
    let (t_n, e_n) = (map.num_tokens, map.num_experts);
    ensure(capacity <= t_n, "num_out_tokens", || {
        format!("capacity = num_out_tokens // num_experts = {capacity} exceeds num_tokens={t_n}")
    })?;
    let rows = checked_mul(capacity, e_n, "num_out_tokens")?;
    ensure(sorted_indices.len() == rows, "sorted_indices", || {
        format!("must have {rows} rows")
    })?;
    let fill = |e: usize, out: &mut [i64]| {
        let mut n = 0;
        for want in [true, false] {
            for t in 0..t_n {
                if n == capacity {
                    return;
                }
                if map.map[t * e_n + e] == want {
                    out[n] = t as i64;
                    n += 1;
                }
            }
        }
    };
    pool::install(|| {
        if capacity > 0 {
            sorted_indices
                .par_chunks_mut(capacity)
                .enumerate()
                .for_each(|(e, out)| fill(e, out));
        }
    });
    if let (Some(pp), Some(p)) = (permuted_probs, probs) {
        ensure(pp.len() == rows, "permuted_probs", || {
            format!("must have {rows} rows")
        })?;
        for (r, o) in pp.iter_mut().enumerate() {
            let e = r / capacity.max(1);
            *o = p[sorted_indices[r] as usize * e_n + e];
        }
    }
    Ok(())
}

fn check_sorted_indices(sorted_indices: &[i64], num_tokens: usize) -> Result<()> {
    if let Some(r) = sorted_indices
        .iter()
        .position(|&t| t < -1 || t >= num_tokens as i64)
    {
        return Err(invalid(
            "sorted_indices",
            format!(
                "row {r} names token {} outside [0, {num_tokens}) (-1 marks padding)",
                sorted_indices[r]
            ),
        ));
    }
    Ok(())
}

/// `out[r] = tokens[sorted_indices[r]]` for rows of `hidden` elements; `-1` rows become zeros.
/// Pure data movement: bit-exact for any element type.
pub fn gather_rows<T: Copy + Default + Send + Sync>(
    tokens: &[T],
    hidden: usize,
    sorted_indices: &[i64],
    out: &mut [T],
) -> Result<()> {
    let num_tokens = tokens.len().checked_div(hidden).unwrap_or(0);
    ensure(out.len() == sorted_indices.len() * hidden, "out", || {
        "must be [num_rows, hidden]".into()
    })?;
    if hidden == 0 {
        return Ok(());
    }
    check_sorted_indices(sorted_indices, num_tokens)?;
    crate::util::mem::prefer_huge_pages(out);
    pool::install(|| {
        out.par_chunks_mut(ROW_BLOCK * hidden)
            .zip(sorted_indices.par_chunks(ROW_BLOCK))
            .for_each(|(dst, idx)| {
                for (d, &t) in dst.chunks_exact_mut(hidden).zip(idx) {
                    if t < 0 {
                        d.fill(T::default());
                    } else {
                        let t = t as usize;
                        d.copy_from_slice(&tokens[t * hidden..(t + 1) * hidden]);
                    }
                }
            })
    });
    Ok(())
}

/// Rows of each token, ascending (a CSR inverse of `sorted_indices`).
struct TokenRows {
    start: Vec<usize>,
    rows: Vec<u32>,
}

fn token_rows(sorted_indices: &[i64], num_tokens: usize) -> Result<TokenRows> {
    check_sorted_indices(sorted_indices, num_tokens)?;
    ensure(
        sorted_indices.len() <= u32::MAX as usize,
        "sorted_indices",
        || {
            format!(
                "{} rows exceed the 2^32 rows an unpermute can address",
                sorted_indices.len()
            )
        },
    )?;
    let mut start = try_zeroed::<usize>(num_tokens + 1, "restore_shape")?;
    for &t in sorted_indices {
        if t >= 0 {
            start[t as usize + 1] += 1;
        }
    }
    for i in 0..num_tokens {
        start[i + 1] += start[i];
    }
    let mut fill = try_zeroed::<usize>(num_tokens, "restore_shape")?;
    fill.copy_from_slice(&start[..num_tokens]);
    let mut rows = vec![0u32; start[num_tokens]];
    for (r, &t) in sorted_indices.iter().enumerate() {
        if t >= 0 {
            let f = &mut fill[t as usize];
            rows[*f] = r as u32;
            *f += 1;
        }
    }
    Ok(TokenRows { start, rows })
}

/// Unpermute (combine): `out[t] = sum over rows r with sorted_indices[r] == t, in ascending r,
/// of x[r] * weights[r]` (no weights: plain sum), accumulated in `T::Acc`, rounded once.
pub fn unpermute<T: Element>(
    x: &[T],
    hidden: usize,
    sorted_indices: &[i64],
    weights: Option<&[T::Acc]>,
    num_tokens: usize,
    out: &mut [T],
) -> Result<()> {
    let n_rows = sorted_indices.len();
    ensure(x.len() == n_rows * hidden, "permuted_tokens", || {
        format!("must have sorted_indices.numel()={n_rows} rows of hidden={hidden}")
    })?;
    ensure(out.len() == num_tokens * hidden, "restore_shape", || {
        "output must be [num_tokens, hidden]".into()
    })?;
    if let Some(w) = weights {
        ensure(w.len() == n_rows, "probs", || {
            format!("must give one weight per permuted row ({n_rows})")
        })?;
    }
    if hidden == 0 {
        return Ok(());
    }
    let tr = token_rows(sorted_indices, num_tokens)?;
    crate::util::mem::prefer_huge_pages(out);
    pool::install(|| {
        out.par_chunks_mut(ROW_BLOCK * hidden)
            .enumerate()
            .for_each_init(
                || vec![T::Acc::zero(); hidden],
                |acc, (b, dst)| {
                    for (i, d) in dst.chunks_exact_mut(hidden).enumerate() {
                        let t = b * ROW_BLOCK + i;
                        let rows = &tr.rows[tr.start[t]..tr.start[t + 1]];
                        let Some((&first, rest)) = rows.split_first() else {
                            d.fill(T::default());
                            continue;
                        };
                        let row = |r: u32| &x[r as usize * hidden..(r as usize + 1) * hidden];
                        T::start_sum(acc, row(first), weights.map(|w| w[first as usize]));
                        for &r in rest {
                            match weights {
                                Some(w) => T::accumulate_scaled(acc, row(r), w[r as usize]),
                                None => T::accumulate(acc, row(r)),
                            }
                        }
                        T::store_row(acc, d);
                    }
                },
            )
    });
    Ok(())
}

/// Backward of [`unpermute`]: `grad_x[r] = grad_out[src(r)] * w[r]` (rounded once) and, if
/// asked, `grad_w[r] = <grad_out[src(r)], x[r]>`; rows with source -1 get zeros.
#[allow(clippy::too_many_arguments)]
pub fn unpermute_backward<T: Element>(
    grad_out: &[T],
    x: Option<&[T]>,
    hidden: usize,
    sorted_indices: &[i64],
    weights: Option<&[T::Acc]>,
    grad_x: &mut [T],
    grad_w: Option<&mut [T::Acc]>,
) -> Result<()> {
    let n_rows = sorted_indices.len();
    let num_tokens = grad_out.len().checked_div(hidden).unwrap_or(0);
    ensure(grad_x.len() == n_rows * hidden, "grad_x", || {
        "must be [num_rows, hidden]".into()
    })?;
    if let Some(w) = weights {
        ensure(w.len() == n_rows, "probs", || {
            "must give one weight per permuted row".into()
        })?;
    }
    if let Some(gw) = &grad_w {
        ensure(gw.len() == n_rows, "grad_w", || {
            "must have one entry per permuted row".into()
        })?;
        let xs =
            x.ok_or_else(|| invalid("permuted_tokens", "is required for the gradient of probs"))?;
        ensure(xs.len() == n_rows * hidden, "permuted_tokens", || {
            "must be [num_rows, hidden]".into()
        })?;
    }
    check_sorted_indices(sorted_indices, num_tokens)?;
    let gw_ptr = grad_w.map(|g| SharedMut(g.as_mut_ptr()));
    if hidden == 0 {
        if let Some(p) = gw_ptr {
            for r in 0..n_rows {
                // SAFETY: in bounds, single thread.
                unsafe { p.write(r, T::Acc::zero()) };
            }
        }
        return Ok(());
    }
    crate::util::mem::prefer_huge_pages(grad_x);
    pool::install(|| {
        grad_x
            .par_chunks_mut(ROW_BLOCK * hidden)
            .enumerate()
            .for_each_init(
                || (vec![T::Acc::zero(); hidden], vec![T::Acc::zero(); hidden]),
                |(g, xv), (b, dst)| {
                    for (i, d) in dst.chunks_exact_mut(hidden).enumerate() {
                        let r = b * ROW_BLOCK + i;
                        let t = sorted_indices[r];
                        if t < 0 {
                            d.fill(T::default());
                            if let Some(p) = gw_ptr {
                                // SAFETY: row r belongs to this task alone.
                                unsafe { p.write(r, T::Acc::zero()) };
                            }
                            continue;
                        }
                        let t = t as usize;
                        let grow = &grad_out[t * hidden..(t + 1) * hidden];
                        match weights {
                            None => d.copy_from_slice(grow),
                            Some(w) => {
                                T::load_row(grow, g);
                                let wr = w[r];
                                g.iter_mut().for_each(|v| *v = *v * wr);
                                T::store_row(g, d);
                            }
                        }
                        if let (Some(p), Some(xs)) = (gw_ptr, x) {
                            T::load_row(grow, g);
                            T::load_row(&xs[r * hidden..(r + 1) * hidden], xv);
                            // SAFETY: row r belongs to this task alone.
                            unsafe { p.write(r, T::Acc::dot_lanes(g, xv)) };
                        }
                    }
                },
            )
    });
    Ok(())
}

/// The expert of each row, from the rows each expert owns (`row_counts [E]`).
fn row_experts(row_counts: &[i64], num_rows: usize) -> Result<Vec<u32>> {
    ensure(
        row_counts.iter().all(|&c| c >= 0),
        "tokens_per_expert",
        || "counts must be >= 0".into(),
    )?;
    let total: i64 = row_counts.iter().sum();
    ensure(total as usize == num_rows, "routing_map", || {
        format!("implies {total} permuted rows, but sorted_indices has {num_rows}")
    })?;
    let mut out = Vec::with_capacity(num_rows);
    for (e, &c) in row_counts.iter().enumerate() {
        out.extend(std::iter::repeat_n(e as u32, c as usize));
    }
    Ok(out)
}

/// Per-row weights `w[r] = probs[sorted_indices[r], expert(r)]` from a dense `probs [T, E]`;
/// rows with source -1 get 0.
pub fn gather_row_weights<P: Element, W: Real>(
    probs: &[P],
    num_tokens: usize,
    num_experts: usize,
    sorted_indices: &[i64],
    row_counts: &[i64],
    out: &mut [W],
) -> Result<()> {
    ensure(probs.len() == num_tokens * num_experts, "probs", || {
        "must be [num_tokens, num_experts]".into()
    })?;
    ensure(row_counts.len() == num_experts, "routing_map", || {
        format!("must have num_experts={num_experts} columns")
    })?;
    ensure(out.len() == sorted_indices.len(), "weights", || {
        "must have one entry per row".into()
    })?;
    check_sorted_indices(sorted_indices, num_tokens)?;
    let experts = row_experts(row_counts, sorted_indices.len())?;
    for ((o, &t), &e) in out.iter_mut().zip(sorted_indices).zip(&experts) {
        *o = if t < 0 {
            W::zero()
        } else {
            W::of_f64(
                probs[t as usize * num_experts + e as usize]
                    .to_acc()
                    .into_f64(),
            )
        };
    }
    Ok(())
}

/// `out[sorted_indices[r], expert(r)] = values[r]` into a dense `[T, E]` that starts at zero
/// (the gradient of a permuted-probs gather).
pub fn scatter_rows_to_dense<V: Copy + Default>(
    values: &[V],
    num_tokens: usize,
    num_experts: usize,
    sorted_indices: &[i64],
    row_counts: &[i64],
    out: &mut [V],
) -> Result<()> {
    ensure(
        values.len() == sorted_indices.len(),
        "grad_permuted_probs",
        || "must have one entry per row".into(),
    )?;
    ensure(out.len() == num_tokens * num_experts, "out", || {
        "must be [num_tokens, num_experts]".into()
    })?;
    ensure(row_counts.len() == num_experts, "tokens_per_expert", || {
        format!("must have {num_experts} entries")
    })?;
    check_sorted_indices(sorted_indices, num_tokens)?;
    let experts = row_experts(row_counts, sorted_indices.len())?;
    out.fill(V::default());
    for ((&v, &t), &e) in values.iter().zip(sorted_indices).zip(&experts) {
        if t >= 0 {
            out[t as usize * num_experts + e as usize] = v;
        }
    }
    Ok(())
}

/// Checks `split_sizes` / `sorted_idxs` and returns `(source row, destination row, rows)` per
/// chunk, in output order.
fn chunk_moves(
    split_sizes: &[i64],
    sorted_idxs: &[i64],
    num_rows: usize,
) -> Result<Vec<(usize, usize, usize)>> {
    let n = split_sizes.len();
    if let Some(i) = split_sizes.iter().position(|&s| s < 0) {
        return Err(invalid(
            "split_sizes",
            format!("entry {i} = {} is negative", split_sizes[i]),
        ));
    }
    // Checked: sizes whose sum wraps to the row count must not pass (the copies below are
    // bounded by this sum).
    let total = split_sizes
        .iter()
        .try_fold(0i64, |acc, &s| acc.checked_add(s))
        .ok_or_else(|| invalid("split_sizes", "the sizes' sum overflows int64"))?;
    ensure(
        usize::try_from(total).is_ok_and(|t| t == num_rows),
        "split_sizes",
        || format!("sum to {total}, but input has {num_rows} rows"),
    )?;
    ensure(sorted_idxs.len() == n, "sorted_idxs", || {
        format!(
            "must list each of the {n} chunks once, got {} entries",
            sorted_idxs.len()
        )
    })?;
    let mut seen = vec![false; n];
    for (i, &c) in sorted_idxs.iter().enumerate() {
        ensure(
            c >= 0 && (c as usize) < n && !seen[c as usize],
            "sorted_idxs",
            || {
                format!(
                    "must be a permutation of 0..{n}; entry {i} = {c} is out of range or repeated"
                )
            },
        )?;
        seen[c as usize] = true;
    }
    let mut start = vec![0usize; n + 1];
    for i in 0..n {
        start[i + 1] = start[i] + split_sizes[i] as usize;
    }
    let mut dst = 0;
    Ok(sorted_idxs
        .iter()
        .map(|&c| {
            let c = c as usize;
            let len = split_sizes[c] as usize;
            let m = (start[c], dst, len);
            dst += len;
            m
        })
        .collect())
}

/// Megatron's `sort_chunks_by_idxs`: split the rows into chunks of `split_sizes` and write
/// them in the order `sorted_idxs` (a permutation of the chunks).
pub fn sort_chunks<T: Copy + Send + Sync>(
    input: &[T],
    row_len: usize,
    split_sizes: &[i64],
    sorted_idxs: &[i64],
    out: &mut [T],
) -> Result<()> {
    ensure(out.len() == input.len(), "out", || {
        "must have the shape of input".into()
    })?;
    let num_rows = input.len().checked_div(row_len).unwrap_or_else(|| {
        split_sizes
            .iter()
            .try_fold(0i64, |acc, &s| acc.checked_add(s.max(0)))
            .map_or(usize::MAX, |t| t as usize)
    });
    let moves = chunk_moves(split_sizes, sorted_idxs, num_rows)?;
    if row_len == 0 {
        return Ok(());
    }
    // Cut moves into pieces of at most ~64 KiB so that threads share big chunks.
    let piece = (65536 / (row_len * std::mem::size_of::<T>()).max(1)).max(1);
    let mut pieces = Vec::new();
    for (src, dst, len) in moves {
        let mut o = 0;
        while o < len {
            let l = piece.min(len - o);
            pieces.push((src + o, dst + o, l));
            o += l;
        }
    }
    crate::util::mem::prefer_huge_pages(out);
    let out_ptr = SharedMut(out.as_mut_ptr());
    pool::install(|| {
        pieces.par_iter().for_each(|&(src, dst, len)| {
            let s = &input[src * row_len..(src + len) * row_len];
            // SAFETY: destination ranges of distinct pieces are disjoint and in bounds
            // (a permutation of chunks covering exactly `num_rows` rows).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    s.as_ptr(),
                    out_ptr.ptr().add(dst * row_len),
                    len * row_len,
                );
            }
        })
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_layout(map: &[bool], t: usize, e: usize, align: usize) -> (Vec<i64>, Vec<i64>) {
        let a = RoutingMap {
            map,
            num_tokens: t,
            num_experts: e,
        };
        let mut counts = vec![0i64; e];
        count_tokens_per_expert(&a, &mut counts).unwrap();
        let rows: i64 = counts.iter().map(|&c| align_up(c, align).unwrap()).sum();
        let mut si = vec![0i64; rows as usize];
        let mut padded = vec![0i64; e];
        permute_layout::<_, f32>(&a, align, None, &mut si, None, &mut padded).unwrap();
        (si, padded)
    }

    #[test]
    fn layout_is_expert_major_ascending_tokens() {
        // tokens x experts
        let map = [true, false, true, true, true, false, false, true, true];
        let (si, padded) = map_layout(&map, 3, 3, 1);
        assert_eq!(si, vec![0, 1, 1, 2, 0, 2]);
        assert_eq!(padded, vec![2, 2, 2]);
        let (si, padded) = map_layout(&map, 3, 3, 4);
        assert_eq!(si, vec![0, 1, -1, -1, 1, 2, -1, -1, 0, 2, -1, -1]);
        assert_eq!(padded, vec![4, 4, 4]);
    }

    #[test]
    fn layout_matches_across_blocks() {
        // More tokens than one block, so several blocks write into each expert.
        let (t, e) = (2000usize, 5usize);
        let map: Vec<bool> = (0..t * e).map(|i| (i * 7919) % 11 < 4).collect();
        let (si, _) = map_layout(&map, t, e, 1);
        let mut expect = Vec::new();
        for ex in 0..e {
            for tok in 0..t {
                if map[tok * e + ex] {
                    expect.push(tok as i64);
                }
            }
        }
        assert_eq!(si, expect);
    }

    #[test]
    fn unpermute_sums_copies_in_row_order() {
        let x = [1.0f32, 2.0, 10.0, 20.0, 100.0, 200.0];
        let si = [1i64, 0, 1];
        let w = [0.5f32, 1.0, 2.0];
        let mut out = vec![0f32; 4];
        unpermute(&x, 2, &si, Some(&w), 2, &mut out).unwrap();
        assert_eq!(out, vec![10.0, 20.0, 200.5, 401.0]);
        let mut gx = vec![0f32; 6];
        let mut gw = vec![0f32; 3];
        unpermute_backward(
            &[1.0f32, 1.0, 2.0, 3.0],
            Some(&x),
            2,
            &si,
            Some(&w),
            &mut gx,
            Some(&mut gw),
        )
        .unwrap();
        assert_eq!(gx, vec![1.0, 1.5, 1.0, 1.0, 4.0, 6.0]);
        assert_eq!(gw, vec![8.0, 30.0, 800.0]);
    }

    #[test]
    fn index_form_checks_ids() {
        let idx = [0i64, 3, 1, 1];
        let a = ExpertIndices {
            indices: &idx,
            num_tokens: 2,
            topk: 2,
            num_experts: 4,
        };
        let mut c = vec![0i64; 4];
        let err = count_tokens_per_expert(&a, &mut c).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let idx = [0i64, 4];
        let a = ExpertIndices {
            indices: &idx,
            num_tokens: 1,
            topk: 2,
            num_experts: 4,
        };
        assert!(count_tokens_per_expert(&a, &mut c)
            .unwrap_err()
            .to_string()
            .starts_with("indices:"));
    }

    #[test]
    fn huge_align_is_an_error_naming_align_size_and_writes_nothing() {
        // 4 tokens, 4 experts, one each: padding to 2**62 or 2**63 - 1 overflows the rows.
        let map: Vec<bool> = (0..16).map(|i| i % 5 == 0).collect();
        let a = RoutingMap {
            map: &map,
            num_tokens: 4,
            num_experts: 4,
        };
        for align in [1usize << 62, (1usize << 63) - 1, usize::MAX] {
            let mut si = vec![7i64; 4];
            let mut padded = vec![7i64; 4];
            let e =
                permute_layout::<_, f32>(&a, align, None, &mut si, None, &mut padded).unwrap_err();
            assert!(e.to_string().starts_with("align_size: "), "{e}");
            assert_eq!((si, padded), (vec![7; 4], vec![7; 4]));
        }
        assert_eq!(align_up(5, 1 << 62), Some(1 << 62));
        assert_eq!(align_up(1, usize::MAX), None);
        assert_eq!(align_up(i64::MAX, 2), None);
    }

    #[test]
    fn split_sizes_whose_sum_wraps_are_rejected() {
        let x = vec![0f32; 30];
        let mut out = vec![1f32; 30];
        let m = i64::MAX;
        let e = sort_chunks(&x, 3, &[m, m, 12], &[2, 0, 1], &mut out).unwrap_err();
        assert!(e.to_string().starts_with("split_sizes: "), "{e}");
        assert!(out.iter().all(|&v| v == 1.0));
        // Zero-width rows: the row count comes from the sizes, which must not wrap either.
        let e = sort_chunks::<f32>(&[], 0, &[m, m, 12], &[2, 0, 1], &mut []).unwrap_err();
        assert!(e.to_string().starts_with("split_sizes: "), "{e}");
    }

    #[test]
    fn sort_chunks_round_trip() {
        let input: Vec<u16> = (0..12).collect();
        let (sizes, order) = ([1i64, 2, 3], [2i64, 0, 1]);
        let mut out = vec![0u16; 12];
        sort_chunks(&input, 2, &sizes, &order, &mut out).unwrap();
        assert_eq!(out, vec![6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]);
        // The inverse order: output chunk `pos` is input chunk `order[pos]`.
        let s2: Vec<i64> = order.iter().map(|&c| sizes[c as usize]).collect();
        let mut inv = [0i64; 3];
        for (pos, &c) in order.iter().enumerate() {
            inv[c as usize] = pos as i64;
        }
        let mut back = vec![0u16; 12];
        sort_chunks(&out, 2, &s2, &inv, &mut back).unwrap();
        assert_eq!(back, input);
        assert!(sort_chunks(&input, 2, &sizes, &[0, 0, 1], &mut out).is_err());
    }
}
