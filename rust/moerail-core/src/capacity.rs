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

use crate::elem::prelude::*;
use crate::error::{ensure, invalid, Result};
use crate::pool;

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

    // The kept set of each expert, as a column of flags.
    let keep_columns: Vec<Vec<bool>> = pool::install(|| {
        (0..e_n)
            .into_par_iter()
            .map(|e| {
                let routed = |t: usize| routing_map[t * e_n + e];
                let mut keep = vec![false; t_n];
                let n_routed = (0..t_n).filter(|&t| routed(t)).count();
                if n_routed <= capacity && !pad_to_capacity {
                    (0..t_n).filter(|&t| routed(t)).for_each(|t| keep[t] = true);
                    return keep;
                }
                let mut order: Vec<usize> = (0..t_n).collect();
                // Total order: best first, ties to the lower token index.
                let better = |a: &usize, b: &usize| match policy {
                    DropPolicy::Probs => {
                        let (pa, pb) = (probs[a * e_n + e].to_acc(), probs[b * e_n + e].to_acc());
                        pb.partial_cmp(&pa).unwrap().then(a.cmp(b))
                    }
                    DropPolicy::Position => routed(*b).cmp(&routed(*a)).then(a.cmp(b)),
                };
                if capacity < t_n {
                    order.select_nth_unstable_by(capacity, better);
                }
                for &t in &order[..capacity] {
                    keep[t] = true;
                }
                keep
            })
            .collect()
    });

    pool::install(|| {
        out_probs
            .par_chunks_mut(e_n)
            .zip(out_map.par_chunks_mut(e_n))
            .enumerate()
            .for_each(|(t, (op, om))| {
                for e in 0..e_n {
                    let kept = keep_columns[e][t];
                    let m = if pad_to_capacity {
                        kept
                    } else {
                        kept && routing_map[t * e_n + e]
                    };
                    om[e] = m;
                    let p = probs[t * e_n + e];
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
