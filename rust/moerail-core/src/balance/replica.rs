//! The choice of a replica for each routed token: deterministic and even.
//!
//! The `j`-th assignment to logical expert `e` in token order (token-major over the top-k
//! entries; the same as ascending token order, since a token picks an expert at most once) goes
//! to replica `(j + offset) mod logcnt[e]`, i.e. to slot `log2phy[e, (j + offset) mod logcnt[e]]`.
//! Each replica of an expert gets `floor(n / c)` or `ceil(n / c)` of its `n` tokens; an `offset`
//! per source rank (its EP rank, say) spreads the remainders over the replicas across ranks.
//!
//! Tokens are processed in fixed chunks with per-chunk counts and a prefix over chunks, so the
//! choice does not depend on the number of threads.

use rayon::prelude::*;

use crate::error::{ensure, invalid, Result};
use crate::util::pool;

const CHUNK: usize = 4096;

/// `log2phy [E, X]` and `logcnt [E]` of one layer.
pub struct ReplicaTable<'a> {
    pub log2phy: &'a [i64],
    pub max_replicas: usize,
    pub logcnt: &'a [i64],
    /// Physical slots (R): every slot id must be below it.
    pub num_replicas: usize,
}

impl ReplicaTable<'_> {
    pub fn num_experts(&self) -> usize {
        self.logcnt.len()
    }

    fn check(&self) -> Result<()> {
        let (e_n, x) = (self.logcnt.len(), self.max_replicas);
        ensure(self.log2phy.len() == e_n * x, "log2phy", || {
            format!(
                "expected [{e_n}, {x}] (num_experts x max_replicas), got {} values",
                self.log2phy.len()
            )
        })?;
        for e in 0..e_n {
            let c = self.logcnt[e];
            if c < 1 || c as usize > x {
                return Err(invalid(
                    "logcnt",
                    format!("expert {e} has {c} replicas; expected 1..={x}"),
                ));
            }
            for r in 0..c as usize {
                let s = self.log2phy[e * x + r];
                if s < 0 || s as usize >= self.num_replicas {
                    return Err(invalid(
                        "log2phy",
                        format!(
                            "replica {r} of expert {e} is slot {s}, outside [0, {})",
                            self.num_replicas
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    #[inline]
    fn slot(&self, e: usize, occurrence: u64, offset: u64) -> i64 {
        let c = self.logcnt[e] as u64;
        self.log2phy[e * self.max_replicas + ((occurrence + offset) % c) as usize]
    }
}

/// Exclusive prefix over chunks of per-expert counts: `start[chunk][e]`.
fn chunk_starts(counts: Vec<Vec<u64>>, e_n: usize) -> Vec<Vec<u64>> {
    let mut run = vec![0u64; e_n];
    counts
        .into_iter()
        .map(|c| {
            let start = run.clone();
            for e in 0..e_n {
                run[e] += c[e];
            }
            start
        })
        .collect()
}

/// Compact form: `indices [T, k]` (logical expert ids; a negative id means no expert and gives
/// -1) to physical slots `out [T, k]`.
pub fn select_replicas(
    indices: &[i64],
    table: &ReplicaTable<'_>,
    offset: u64,
    out: &mut [i64],
) -> Result<()> {
    table.check()?;
    let e_n = table.num_experts();
    ensure(out.len() == indices.len(), "out", || {
        format!("expected {} values, got {}", indices.len(), out.len())
    })?;
    if let Some(&bad) = indices.iter().find(|&&i| i >= e_n as i64) {
        return Err(invalid(
            "indices",
            format!("expert id {bad} is outside [0, {e_n})"),
        ));
    }
    pool::install(|| {
        let counts: Vec<Vec<u64>> = indices
            .par_chunks(CHUNK)
            .map(|c| {
                let mut n = vec![0u64; e_n];
                for &i in c {
                    if i >= 0 {
                        n[i as usize] += 1;
                    }
                }
                n
            })
            .collect();
        let starts = chunk_starts(counts, e_n);
        out.par_chunks_mut(CHUNK)
            .zip(indices.par_chunks(CHUNK))
            .zip(starts.into_par_iter())
            .for_each(|((o, c), mut occ)| {
                for (dst, &i) in o.iter_mut().zip(c) {
                    *dst = if i >= 0 {
                        let e = i as usize;
                        let s = table.slot(e, occ[e], offset);
                        occ[e] += 1;
                        s
                    } else {
                        -1
                    };
                }
            });
    });
    Ok(())
}

/// Dense form: `routing_map [T, E]` to the physical map `out_map [T, R]`, and, if given,
/// `probs [T, E]` to `out_probs [T, R]` (zeros outside the map).
pub fn select_replicas_map<P: Copy + Default + Send + Sync>(
    routing_map: &[bool],
    num_tokens: usize,
    table: &ReplicaTable<'_>,
    offset: u64,
    out_map: &mut [bool],
    probs: Option<(&[P], &mut [P])>,
) -> Result<()> {
    table.check()?;
    let (e_n, r_n) = (table.num_experts(), table.num_replicas);
    ensure(routing_map.len() == num_tokens * e_n, "routing_map", || {
        format!(
            "expected [{num_tokens}, {e_n}], got {} values",
            routing_map.len()
        )
    })?;
    ensure(out_map.len() == num_tokens * r_n, "out_map", || {
        format!(
            "expected [{num_tokens}, {r_n}], got {} values",
            out_map.len()
        )
    })?;
    if let Some((p, op)) = &probs {
        ensure(p.len() == routing_map.len(), "probs", || {
            format!("expected [{num_tokens}, {e_n}], got {} values", p.len())
        })?;
        ensure(op.len() == out_map.len(), "out_probs", || {
            format!("expected [{num_tokens}, {r_n}], got {} values", op.len())
        })?;
    }
    if num_tokens == 0 || e_n == 0 {
        return Ok(());
    }
    let rows = (CHUNK / e_n).max(1);
    pool::install(|| {
        let counts: Vec<Vec<u64>> = routing_map
            .par_chunks(rows * e_n)
            .map(|c| {
                let mut n = vec![0u64; e_n];
                for row in c.chunks(e_n) {
                    for (e, &m) in row.iter().enumerate() {
                        n[e] += m as u64;
                    }
                }
                n
            })
            .collect();
        let starts = chunk_starts(counts, e_n);
        let fill = |map_in: &[bool],
                    occ: &mut Vec<u64>,
                    m_out: &mut [bool],
                    mut pr: Option<(&[P], &mut [P])>| {
            m_out.fill(false);
            if let Some((_, po)) = pr.as_mut() {
                po.fill(P::default());
            }
            for (t, row) in map_in.chunks(e_n).enumerate() {
                for (e, &m) in row.iter().enumerate() {
                    if m {
                        let s = table.slot(e, occ[e], offset) as usize;
                        occ[e] += 1;
                        m_out[t * r_n + s] = true;
                        if let Some((pi, po)) = pr.as_mut() {
                            po[t * r_n + s] = pi[t * e_n + e];
                        }
                    }
                }
            }
        };
        match probs {
            Some((p, op)) => routing_map
                .par_chunks(rows * e_n)
                .zip(p.par_chunks(rows * e_n))
                .zip(out_map.par_chunks_mut(rows * r_n))
                .zip(op.par_chunks_mut(rows * r_n))
                .zip(starts.into_par_iter())
                .for_each(|((((mi, pi), mo), po), mut occ)| fill(mi, &mut occ, mo, Some((pi, po)))),
            None => routing_map
                .par_chunks(rows * e_n)
                .zip(out_map.par_chunks_mut(rows * r_n))
                .zip(starts.into_par_iter())
                .for_each(|((mi, mo), mut occ)| fill(mi, &mut occ, mo, None)),
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_and_deterministic() {
        // 3 experts: e0 on slots [0, 3], e1 on [1], e2 on [2, 4, 5].
        let log2phy = [0, 3, -1, 1, -1, -1, 2, 4, 5];
        let logcnt = [2, 1, 3];
        let table = ReplicaTable {
            log2phy: &log2phy,
            max_replicas: 3,
            logcnt: &logcnt,
            num_replicas: 6,
        };
        let t = 10_001;
        let indices: Vec<i64> = (0..t)
            .flat_map(|i| [(i % 3) as i64, ((i + 1) % 3) as i64])
            .collect();
        let mut out = vec![0; indices.len()];
        select_replicas(&indices, &table, 1, &mut out).unwrap();
        let mut per_slot = [0usize; 6];
        for &s in &out {
            per_slot[s as usize] += 1;
        }
        // e0 gets 6667 tokens: 3334 / 3333 split; e2 6667 over 3.
        assert!((per_slot[0] as i64 - per_slot[3] as i64).abs() <= 1);
        assert!(per_slot[2].abs_diff(per_slot[4]) <= 1 && per_slot[4].abs_diff(per_slot[5]) <= 1);
        // Same as a sequential count.
        let mut occ = [0u64; 3];
        for (k, &i) in indices.iter().enumerate() {
            let e = i as usize;
            assert_eq!(
                out[k],
                log2phy[e * 3 + ((occ[e] + 1) % logcnt[e] as u64) as usize]
            );
            occ[e] += 1;
        }
        // The dense form agrees.
        let mut map = vec![false; t * 3];
        for (k, &i) in indices.iter().enumerate() {
            map[(k / 2) * 3 + i as usize] = true;
        }
        let probs: Vec<f32> = (0..t * 3).map(|x| x as f32).collect();
        let mut out_map = vec![true; t * 6];
        let mut out_probs = vec![1.0f32; t * 6];
        select_replicas_map(
            &map,
            t,
            &table,
            1,
            &mut out_map,
            Some((&probs, &mut out_probs)),
        )
        .unwrap();
        for tok in 0..t {
            let mut expect: Vec<usize> = out[2 * tok..2 * tok + 2]
                .iter()
                .map(|&s| s as usize)
                .collect();
            expect.sort();
            let got: Vec<usize> = (0..6).filter(|&s| out_map[tok * 6 + s]).collect();
            assert_eq!(got, expect);
        }
        assert!(select_replicas(&[3], &table, 0, &mut [0]).is_err());
    }
}
