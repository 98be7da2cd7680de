//! Expert capacity and token dropping (Megatron-Core's `get_capacity` and
//! `apply_router_token_dropping`).
//!
//! `capacity = ceil(num_tokens * topk / num_experts * capacity_factor)`. Each expert keeps at
//! most `capacity` of its tokens: the highest-probability ones (`DropPolicy::Probs`) or the
//! earliest ones (`DropPolicy::Position`). With `pad_to_capacity`, every expert gets exactly
//! `capacity` rows: its kept tokens, then the best remaining candidates by the same order
//! (they carry probability 0). Ties always go to the lower token index — Megatron leaves that
//! to `torch.topk`, whose choice among equal values is unspecified.

use rayon::prelude::*;

use crate::error::{ensure, invalid, Result};
use crate::util::elem::prelude::*;
use crate::util::pool;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropPolicy {
    Probs,
    Position,
}

impl DropPolicy {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "probs" => Ok(Self::Probs),
            "position" => Ok(Self::Position),
            other => Err(invalid(
                "drop_policy",
                format!("expected 'probs' or 'position', got '{other}'"),
            )),
        }
    }
}

/// `ceil((num_tokens / num_experts) * capacity_factor)`, at least `min_capacity`.
pub fn get_capacity(
    num_tokens: usize,
    num_experts: usize,
    capacity_factor: f64,
    min_capacity: Option<usize>,
) -> Result<usize> {
    ensure(num_experts >= 1, "num_experts", || "must be >= 1".into())?;
    ensure(
        capacity_factor.is_finite() && capacity_factor > 0.0,
        "capacity_factor",
        || format!("must be a positive finite number, got {capacity_factor}"),
    )?;
    // Same float expression as Megatron (Python floats are f64).
    let cap = ((num_tokens as f64 / num_experts as f64) * capacity_factor).ceil();
    ensure(cap < 9.0e15, "capacity_factor", || {
        format!("capacity {cap} is too large")
    })?;
    let cap = cap as usize;
    Ok(match min_capacity {
        Some(m) if cap < m => m,
        _ => cap,
    })
}

/// Applies the capacity of `get_capacity(num_tokens * topk, num_experts, capacity_factor)` to
/// `probs [T, E]` / `routing_map [T, E]`, writing `out_probs` / `out_map`. Returns the capacity.
#[allow(clippy::too_many_arguments)]
pub fn apply_token_dropping<T: Element>(
    probs: &[T],
    routing_map: &[bool],
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    capacity_factor: f64,
    policy: DropPolicy,
    pad_to_capacity: bool,
    out_probs: &mut [T],
    out_map: &mut [bool],
) -> Result<usize> {
    let (t_n, e_n) = (num_tokens, num_experts);
    ensure(e_n >= 1, "probs", || {
        "must have at least one expert column".into()
    })?;
    ensure(topk >= 1 && topk <= e_n, "topk", || {
        format!("must be in [1, num_experts={e_n}], got {topk}")
    })?;
    ensure(probs.len() == t_n * e_n, "probs", || {
        "size does not match [num_tokens, num_experts]".into()
    })?;
    ensure(routing_map.len() == t_n * e_n, "routing_map", || {
        "must have the shape of probs [num_tokens, num_experts]".into()
    })?;
    ensure(
        out_probs.len() == t_n * e_n && out_map.len() == t_n * e_n,
        "out",
        || "outputs must be [num_tokens, num_experts]".into(),
    )?;
    if let Some(i) = probs.iter().position(|p| p.to_acc().is_nan()) {
        return Err(invalid(
            "probs",
            format!(
                "must not contain NaN (token {}, expert {})",
                i / e_n,
                i % e_n
            ),
        ));
    }
    let capacity = get_capacity(t_n * topk, e_n, capacity_factor, None)?;

    if capacity > t_n {
        // Nothing to drop (Megatron's all-ones capacity mask).
        pool::install(|| {
            out_probs
                .par_iter_mut()
                .zip(probs.par_iter())
                .for_each(|(o, &p)| *o = p);
            out_map
                .par_iter_mut()
                .zip(routing_map.par_iter())
                .for_each(|(o, &m)| *o = m || pad_to_capacity);
        });
        return Ok(capacity);
    }

    // The kept set of each expert, as a dense [T, E] mask.
    let keep = match policy {
        DropPolicy::Probs => keep_by_probs(probs, routing_map, t_n, e_n, capacity, pad_to_capacity),
        DropPolicy::Position => keep_by_position(routing_map, t_n, e_n, capacity, pad_to_capacity),
    };

    pool::install(|| {
        out_probs
            .par_chunks_mut(e_n)
            .zip(out_map.par_chunks_mut(e_n))
            .enumerate()
            .for_each(|(t, (op, om))| {
                for e in 0..e_n {
                    let i = t * e_n + e;
                    let m = if pad_to_capacity {
                        keep[i]
                    } else {
                        keep[i] && routing_map[i]
                    };
                    om[e] = m;
                    let p = probs[i];
                    // probs * mask, as Megatron multiplies (keeps the sign of zero).
                    op[e] = if m {
                        p
                    } else {
                        T::from_acc(p.to_acc() * T::Acc::zero())
                    };
                }
            })
    });
    Ok(capacity)
}

/// Sort key for "higher probability first, then lower token": ascending keys.
#[inline]
fn prob_key(p: f64, t: usize) -> (u64, u32) {
    let u = p.to_bits();
    // Order-preserving map of f64 to u64, then reversed for descending probability.
    let ordered = if u >> 63 == 1 { !u } else { u | (1 << 63) };
    (!ordered, t as u32)
}

/// Probs policy: each expert keeps its `capacity` best tokens by (probability desc, token asc)
/// over all tokens (Megatron's top-k over the column, with a defined tie order).
///
/// Why not a selection over every token: tokens with probability > 0 outrank all others, and
/// are only a few per expert (about T*k/E), so they are gathered in one row-major pass and
/// selected among; the rest of the column is looked at only when an expert has fewer such
/// tokens than its capacity and padding (or a routed token of probability <= 0) needs them.
fn keep_by_probs<T: Element>(
    probs: &[T],
    routing_map: &[bool],
    t_n: usize,
    e_n: usize,
    capacity: usize,
    pad_to_capacity: bool,
) -> Vec<bool> {
    // Candidates with p > 0, per expert, in token order (blocks gathered in parallel, then
    // concatenated in order: the result does not depend on the thread count).
    const BLOCK: usize = 1024;
    // Also counted: routed tokens of probability <= 0, which need the fill below.
    type Block = (Vec<Vec<(u64, u32)>>, Vec<u32>);
    let blocks: Vec<Block> = pool::install(|| {
        (0..t_n.div_ceil(BLOCK))
            .into_par_iter()
            .map(|b| {
                let mut per: Vec<Vec<(u64, u32)>> = vec![Vec::new(); e_n];
                let mut routed_nonpositive = vec![0u32; e_n];
                for t in b * BLOCK..((b + 1) * BLOCK).min(t_n) {
                    for (e, list) in per.iter_mut().enumerate() {
                        let p = probs[t * e_n + e].to_acc().into_f64();
                        if p > 0.0 {
                            list.push(prob_key(p, t));
                        } else if routing_map[t * e_n + e] {
                            routed_nonpositive[e] += 1;
                        }
                    }
                }
                (per, routed_nonpositive)
            })
            .collect()
    });
    let columns: Vec<(usize, Vec<u32>)> = pool::install(|| {
        (0..e_n)
            .into_par_iter()
            .map(|e| {
                let mut cand: Vec<(u64, u32)> =
                    blocks.iter().flat_map(|b| b.0[e].iter().copied()).collect();
                let mut kept: Vec<u32> = Vec::with_capacity(capacity);
                if cand.len() > capacity {
                    if capacity > 0 {
                        cand.select_nth_unstable(capacity - 1);
                    }
                    kept.extend(cand[..capacity].iter().map(|c| c.1));
                    return (e, kept);
                }
                kept.extend(cand.iter().map(|c| c.1));
                let rest = capacity - kept.len();
                let routed_nonpositive = blocks.iter().any(|b| b.1[e] > 0);
                if rest == 0 || !(pad_to_capacity || routed_nonpositive) {
                    return (e, kept);
                }
                // Fill from the tokens with p <= 0, best first (ties to the lower token).
                let mut others: Vec<(u64, u32)> = (0..t_n)
                    .filter_map(|t| {
                        let p = probs[t * e_n + e].to_acc().into_f64();
                        (p <= 0.0).then(|| prob_key(p, t))
                    })
                    .collect();
                if others.len() > rest {
                    others.select_nth_unstable(rest - 1);
                }
                kept.extend(others[..rest.min(others.len())].iter().map(|c| c.1));
                (e, kept)
            })
            .collect()
    });
    let mut keep = vec![false; t_n * e_n];
    for (e, kept) in columns {
        for t in kept {
            keep[t as usize * e_n + e] = true;
        }
    }
    keep
}

/// Position policy: each expert keeps its first `capacity` routed tokens; with padding, then
/// its earliest unrouted tokens.
fn keep_by_position(
    routing_map: &[bool],
    t_n: usize,
    e_n: usize,
    capacity: usize,
    pad_to_capacity: bool,
) -> Vec<bool> {
    let columns: Vec<Vec<u32>> = pool::install(|| {
        (0..e_n)
            .into_par_iter()
            .map(|e| {
                let mut kept = Vec::with_capacity(capacity);
                for want in [true, false] {
                    if !want && !pad_to_capacity {
                        break;
                    }
                    for t in 0..t_n {
                        if kept.len() == capacity {
                            break;
                        }
                        if routing_map[t * e_n + e] == want {
                            kept.push(t as u32);
                        }
                    }
                }
                kept
            })
            .collect()
    });
    let mut keep = vec![false; t_n * e_n];
    for (e, kept) in columns.into_iter().enumerate() {
        for t in kept {
            keep[t as usize * e_n + e] = true;
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_formula() {
        assert_eq!(get_capacity(10, 4, 1.0, None).unwrap(), 3);
        assert_eq!(get_capacity(8, 4, 1.0, None).unwrap(), 2);
        assert_eq!(get_capacity(8, 4, 0.1, Some(2)).unwrap(), 2);
        assert!(get_capacity(8, 4, f64::NAN, None).is_err());
        assert!(get_capacity(8, 4, -1.0, None).is_err());
    }

    #[test]
    fn probs_policy_keeps_highest_and_pads() {
        // 4 tokens, 2 experts, top-1, capacity_factor 0.5 -> capacity 1.
        let probs = [0.9f32, 0.0, 0.0, 0.8, 0.95, 0.0, 0.0, 0.0];
        let map = [true, false, false, true, true, false, false, false];
        let (mut op, mut om) = (vec![0f32; 8], vec![false; 8]);
        let cap = apply_token_dropping(
            &probs,
            &map,
            4,
            2,
            1,
            0.5,
            DropPolicy::Probs,
            false,
            &mut op,
            &mut om,
        )
        .unwrap();
        assert_eq!(cap, 1);
        assert_eq!(
            om,
            vec![false, false, false, true, true, false, false, false]
        );
        apply_token_dropping(
            &probs,
            &map,
            4,
            2,
            1,
            0.5,
            DropPolicy::Position,
            true,
            &mut op,
            &mut om,
        )
        .unwrap();
        assert_eq!(
            om,
            vec![true, false, false, true, false, false, false, false]
        );
        assert_eq!(op, vec![0.9, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0, 0.0]);
    }
}
