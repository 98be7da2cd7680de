//! Load-balancing losses and the aux-loss-free expert-bias update.
//!
//! * Switch load-balancing loss (Megatron `switch_load_balancing_loss_func`):
//!   `loss = E * coeff / (topk * N^2) * sum_e (sum_t probs[t, e]) * tokens_per_expert[e]`.
//! * Sequence-level loss (DeepSeek-V2/V3; Megatron `_apply_seq_aux_loss`): the same per
//!   sequence — token `t` of a `[seq, batch]` layout belongs to sequence `t % batch` — summed
//!   over sequences and divided by the batch size.
//! * z-loss (ST-MoE): `coeff * mean_t logsumexp(logits[t])^2`.
//! * Expert bias (aux-loss-free balancing): `bias += rate * sign(mean(counts) - counts)`.
//!
//! Sums over tokens run in fixed blocks combined in order, so results do not depend on the
//! thread count.

use rayon::prelude::*;

use crate::error::{ensure, invalid, Result};
use crate::util::elem::prelude::*;
use crate::util::pool;

/// Tokens per block of a deterministic sum.
const BLOCK: usize = 256;

/// `scale * sum_{b, e} (sum_{t : t % num_seqs == b} probs[t, e]) * tokens_per_expert[b, e]`.
/// The switch loss is `num_seqs = 1`, `scale = E * coeff / (topk * N^2)`.
pub fn load_balancing_loss<T: Element>(
    probs: &[T],
    num_tokens: usize,
    num_experts: usize,
    tokens_per_expert: &[f64],
    num_seqs: usize,
    scale: f64,
) -> Result<T::Acc> {
    let (t_n, e_n) = (num_tokens, num_experts);
    check_loss_args(probs.len(), t_n, e_n, tokens_per_expert, num_seqs, scale)?;
    let width = num_seqs * e_n;
    let partials: Vec<Vec<T::Acc>> = pool::install(|| {
        probs
            .par_chunks(BLOCK * e_n.max(1))
            .enumerate()
            .map(|(c, block)| {
                let mut acc = vec![T::Acc::zero(); width];
                for (i, row) in block.chunks(e_n).enumerate() {
                    let b = (c * BLOCK + i) % num_seqs;
                    for (a, &p) in acc[b * e_n..(b + 1) * e_n].iter_mut().zip(row) {
                        *a = *a + p.to_acc();
                    }
                }
                acc
            })
            .collect()
    });
    let mut sums = vec![T::Acc::zero(); width];
    for part in &partials {
        for (s, &p) in sums.iter_mut().zip(part) {
            *s = *s + p;
        }
    }
    let total = sums
        .iter()
        .zip(tokens_per_expert)
        .fold(T::Acc::zero(), |a, (&s, &n)| a + s * T::Acc::of_f64(n));
    Ok(total * T::Acc::of_f64(scale))
}

/// Gradient of [`load_balancing_loss`] with respect to `probs`, for an upstream gradient `grad`.
pub fn load_balancing_loss_backward<T: Element>(
    grad: f64,
    num_tokens: usize,
    num_experts: usize,
    tokens_per_expert: &[f64],
    num_seqs: usize,
    scale: f64,
    grad_probs: &mut [T],
) -> Result<()> {
    let (t_n, e_n) = (num_tokens, num_experts);
    check_loss_args(
        grad_probs.len(),
        t_n,
        e_n,
        tokens_per_expert,
        num_seqs,
        scale,
    )?;
    let g = T::Acc::of_f64(grad) * T::Acc::of_f64(scale);
    let rows: Vec<Vec<T>> = (0..num_seqs)
        .map(|b| {
            tokens_per_expert[b * e_n..(b + 1) * e_n]
                .iter()
                .map(|&n| T::from_acc(g * T::Acc::of_f64(n)))
                .collect()
        })
        .collect();
    pool::install(|| {
        grad_probs
            .par_chunks_mut(e_n.max(1))
            .enumerate()
            .for_each(|(t, row)| row.copy_from_slice(&rows[t % num_seqs]))
    });
    Ok(())
}

fn check_loss_args(
    len: usize,
    t_n: usize,
    e_n: usize,
    tokens_per_expert: &[f64],
    num_seqs: usize,
    scale: f64,
) -> Result<()> {
    ensure(e_n >= 1, "probs", || {
        "must have at least one expert column".into()
    })?;
    ensure(len == t_n * e_n, "probs", || {
        "size does not match [num_tokens, num_experts]".into()
    })?;
    ensure(num_seqs >= 1, "num_seqs", || "must be >= 1".into())?;
    ensure(t_n % num_seqs == 0, "probs", || {
        format!("num_tokens={t_n} is not a multiple of the batch size {num_seqs}")
    })?;
    ensure(
        tokens_per_expert.len() == num_seqs * e_n,
        "tokens_per_expert",
        || {
            format!(
                "must have {} entries ([batch, num_experts]), got {}",
                num_seqs * e_n,
                tokens_per_expert.len()
            )
        },
    )?;
    if let Some(i) = tokens_per_expert.iter().position(|v| !v.is_finite()) {
        return Err(invalid(
            "tokens_per_expert",
            format!("entry {i} is not finite"),
        ));
    }
    ensure(scale.is_finite(), "coeff", || {
        "the loss scale must be finite (check coeff, topk and the token count)".into()
    })?;
    Ok(())
}

/// `logsumexp` of one row; `tmp` is scratch of the row's length (vectorised `exp`).
#[inline]
fn logsumexp<A: Real>(x: &[A], tmp: &mut [A]) -> A {
    let m = A::max_of(x);
    for (t, &v) in tmp.iter_mut().zip(x) {
        *t = v - m;
    }
    A::exp_in_place(tmp);
    m + A::sum_lanes(tmp).ln()
}

/// `mean_t logsumexp(logits[t])^2` (multiply by the coefficient outside); writes each token's
/// logsumexp to `lse` for the backward.
pub fn z_loss<T: Element>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    lse: &mut [T::Acc],
) -> Result<T::Acc> {
    let (t_n, e_n) = (num_tokens, num_experts);
    ensure(e_n >= 1 && logits.len() == t_n * e_n, "logits", || {
        "must be [num_tokens, num_experts] with num_experts >= 1".into()
    })?;
    ensure(lse.len() == t_n, "lse", || {
        format!("must have num_tokens={t_n} entries")
    })?;
    let partials: Vec<Result<T::Acc>> = pool::install(|| {
        logits
            .par_chunks(BLOCK * e_n)
            .zip(lse.par_chunks_mut(BLOCK))
            .enumerate()
            .map(|(c, (block, lse))| {
                let mut x = vec![T::Acc::zero(); e_n];
                let mut tmp = vec![T::Acc::zero(); e_n];
                let mut acc = T::Acc::zero();
                for (i, (row, l_out)) in block.chunks(e_n).zip(lse.iter_mut()).enumerate() {
                    T::load_row(row, &mut x);
                    if x.iter().fold(false, |bad, v| bad | !v.is_finite()) {
                        let e = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
                        return Err(invalid(
                            "logits",
                            format!(
                                "must be finite; found {:?} at token {}, expert {e}",
                                x[e],
                                c * BLOCK + i
                            ),
                        ));
                    }
                    let l = logsumexp(&x, &mut tmp);
                    *l_out = l;
                    acc = acc + l * l;
                }
                Ok(acc)
            })
            .collect()
    });
    let mut total = T::Acc::zero();
    for p in partials {
        total = total + p?;
    }
    Ok(if t_n == 0 {
        T::Acc::nan()
    } else {
        total / T::Acc::of_f64(t_n as f64)
    })
}

/// Gradient of `grad * mean_t logsumexp(logits[t])^2`: `2 grad lse_t softmax(logits[t]) / T`,
/// with `lse` from [`z_loss`].
pub fn z_loss_backward<T: Element>(
    grad: f64,
    logits: &[T],
    lse: &[T::Acc],
    num_tokens: usize,
    num_experts: usize,
    grad_logits: &mut [T],
) -> Result<()> {
    let (t_n, e_n) = (num_tokens, num_experts);
    ensure(
        e_n >= 1 && logits.len() == t_n * e_n && grad_logits.len() == t_n * e_n,
        "logits",
        || "logits and grad_logits must be [num_tokens, num_experts]".into(),
    )?;
    ensure(lse.len() == t_n, "lse", || {
        format!("must have num_tokens={t_n} entries")
    })?;
    let g = T::Acc::of_f64(grad) / T::Acc::of_f64(t_n.max(1) as f64);
    let two = T::Acc::of_f64(2.0);
    pool::install(|| {
        grad_logits
            .par_chunks_mut(e_n)
            .zip(logits.par_chunks(e_n))
            .zip(lse.par_iter())
            .for_each_init(
                || (vec![T::Acc::zero(); e_n], vec![T::Acc::zero(); e_n]),
                |(x, d), ((out, row), &l)| {
                    T::load_row(row, x);
                    // d/dx lse^2 = 2 lse softmax(x), softmax = exp(x - lse).
                    for (dv, &xv) in d.iter_mut().zip(x.iter()) {
                        *dv = xv - l;
                    }
                    T::Acc::exp_in_place(d);
                    let c = g * two * l;
                    for dv in d.iter_mut() {
                        *dv = c * *dv;
                    }
                    T::store_row(d, out);
                },
            )
    });
    Ok(())
}

/// `out = bias + rate * sign(mean(tokens_per_expert) - tokens_per_expert)`, row by row for
/// `[num_layers, num_experts]` stacks (`bias` and `out` have the same shape).
pub fn expert_bias_update(
    tokens_per_expert: &[f64],
    expert_bias: &[f32],
    num_experts: usize,
    rate: f64,
    out: &mut [f32],
) -> Result<()> {
    let e_n = num_experts;
    ensure(e_n >= 1, "expert_bias", || {
        "must have at least one expert".into()
    })?;
    ensure(
        tokens_per_expert.len() == expert_bias.len() && expert_bias.len() % e_n == 0,
        "tokens_per_expert",
        || {
            format!(
                "must have the shape of expert_bias ({} entries), got {}",
                expert_bias.len(),
                tokens_per_expert.len()
            )
        },
    )?;
    ensure(out.len() == expert_bias.len(), "out", || {
        "must have the shape of expert_bias".into()
    })?;
    ensure(rate.is_finite(), "expert_bias_update_rate", || {
        format!("must be finite, got {rate}")
    })?;
    if let Some(i) = tokens_per_expert
        .iter()
        .position(|v| !v.is_finite() || *v < 0.0)
    {
        return Err(invalid(
            "tokens_per_expert",
            format!(
                "entry {i} = {} is not a finite count >= 0",
                tokens_per_expert[i]
            ),
        ));
    }
    let rate = rate as f32;
    for ((counts, bias), o) in tokens_per_expert
        .chunks(e_n)
        .zip(expert_bias.chunks(e_n))
        .zip(out.chunks_mut(e_n))
    {
        let mean = counts.iter().sum::<f64>() / e_n as f64;
        for ((&c, &b), ov) in counts.iter().zip(bias).zip(o.iter_mut()) {
            let d = mean - c;
            let sign = if d > 0.0 {
                1.0f32
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            };
            *ov = b + sign * rate;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_loss_formula() {
        // 2 tokens, 2 experts.
        let probs = [0.75f32, 0.25, 0.5, 0.5];
        let tpe = [1.0, 1.0];
        let scale = 2.0 * 0.1 / (1.0 * 2.0 * 2.0);
        let l = load_balancing_loss(&probs, 2, 2, &tpe, 1, scale).unwrap();
        assert!((l - (1.25 + 0.75) * scale as f32).abs() < 1e-7);
    }

    #[test]
    fn sequence_loss_groups_tokens_by_batch_column() {
        // seq 2, batch 2: tokens 0, 2 are sequence 0; tokens 1, 3 are sequence 1.
        let probs = [1.0f64, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let tpe = [2.0, 0.0, 0.0, 2.0];
        let l = load_balancing_loss(&probs, 4, 2, &tpe, 2, 1.0).unwrap();
        assert_eq!(l, 8.0);
    }

    #[test]
    fn z_loss_and_bias_update() {
        let mut lse = [0.0f64];
        let z = z_loss(&[0.0f64, 0.0], 1, 2, &mut lse).unwrap();
        assert!((z - 2f64.ln().powi(2)).abs() < 1e-12);
        let mut out = [0f32; 3];
        expert_bias_update(&[1.0, 2.0, 3.0], &[0.0, 0.0, 0.5], 3, 0.01, &mut out).unwrap();
        assert_eq!(out, [0.01, 0.0, 0.49]);
    }
}
