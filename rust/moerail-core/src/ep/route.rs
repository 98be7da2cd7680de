//! The route of one exchange on one rank: every index and row count that the dispatch, the
//! combine and their backwards move rows by, built in one call from the rank's slots and the
//! plan of the gathered counts.
//!
//! A route is a list of [`Hop`]s (one all-to-all-v each): before hop `i` the rank gathers the
//! rows `index` of the previous buffer (of its tokens for hop 0), sends `send[dst]` rows to
//! each rank and receives `recv[src]`. After the last hop, `out_rows` orders the received rows
//! by local slot, then source rank, then token (Megatron's order). The reverse passes run the
//! hops backwards with `send` and `recv` swapped and sum the rows that came from one row.
//!
//! The copy strategies (`flat`, `2dh`) know every index from the counts. The token strategies
//! (`dedup`, `allgather`) learn the forwarding index and the output order from the slot ids
//! that travel with the rows: [`Route::arrive`] reads them after hops 0 and 1 of the dispatch.

use super::dispatch_layout::node_send_index;
use super::exec::{block_order, copy_layout, expand_index, forward_index};
use super::plan::{Counts, Plan};
use super::{EpGroup, Strategy};
use crate::error::{ensure, invalid, Result};

/// One all-to-all-v of an exchange, as the dispatch runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The plan's name of the stage (`all_to_all`, `intra_node`, `inter_node`, ...).
    pub stage: &'static str,
    /// Rows of the previous buffer (hop 0: tokens) in send order; empty until known.
    pub index: Vec<i64>,
    /// Rows sent to each rank `[W]`.
    pub send: Vec<i64>,
    /// Rows received from each rank `[W]`.
    pub recv: Vec<i64>,
}

/// Everything one dispatch decided on one rank, for its combine and both backwards.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub plan: Plan,
    pub rank: usize,
    pub num_tokens: usize,
    /// Slots a token row lists (the width of `slots`).
    pub topk: usize,
    /// Weights a token row of the token strategies carries (the most slots of any token).
    pub entries: usize,
    pub hops: Vec<Hop>,
    /// Rows of the last receive buffer in output order; empty until known.
    pub out_rows: Vec<i64>,
    /// Token strategies: the entry of each output row holding its slot.
    pub out_entries: Vec<i64>,
    /// Copy strategies: `t * topk + j` of each row of hop 0.
    pub rows_entry: Vec<i64>,
    /// Output rows of each local slot `[L]`.
    pub tokens_per_local_expert: Vec<i64>,
    /// `[L, W]`: rows each local slot gets from each source rank.
    expected: Vec<i64>,
    /// Tokens each rank sends to this one `[W]`.
    tokens_from: Vec<i64>,
    /// Hops whose arrival [`Route::arrive`] has read.
    arrived: usize,
}

fn column(m: &[i64], w_n: usize, c: usize) -> Vec<i64> {
    (0..w_n).map(|r| m[r * w_n + c]).collect()
}

fn sum(v: &[i64]) -> Result<usize> {
    let s = v
        .iter()
        .try_fold(0i64, |a, &x| if x < 0 { None } else { a.checked_add(x) });
    s.and_then(|s| usize::try_from(s).ok())
        .ok_or_else(|| invalid("counts", "row counts are negative or overflow"))
}

impl Route {
    /// The route of `rank` for `plan` (made from `counts`), whose tokens address `slots
    /// [num_tokens, topk]` (-1: empty).
    pub fn new(
        plan: Plan,
        counts: &Counts,
        rank: usize,
        slots: &[i64],
        topk: usize,
    ) -> Result<Self> {
        let topo: EpGroup = plan.topo;
        let (w_n, l_n, g_n, n_n, r_n) = (
            topo.ranks,
            topo.slots_per_rank,
            topo.ranks_per_node,
            topo.nodes(),
            topo.slots(),
        );
        ensure(rank < w_n, "rank", || {
            format!("{rank} is not a rank of the group of {w_n}")
        })?;
        ensure(
            topk.checked_mul(counts.tokens[rank].max(0) as usize) == Some(slots.len()),
            "slots",
            || {
                format!(
                    "expected [{}, {topk}] (this rank's tokens in the gathered counts), got {} values",
                    counts.tokens[rank],
                    slots.len()
                )
            },
        )?;
        let num_tokens = counts.tokens[rank] as usize;
        // What this rank's slots get: [W, L] by source rank; [L, W] transposed.
        let sc = &counts.slot_counts;
        let mine: Vec<i64> = (0..w_n)
            .flat_map(|src| sc[src * r_n + rank * l_n..src * r_n + (rank + 1) * l_n].to_vec())
            .collect();
        let expected: Vec<i64> = (0..l_n)
            .flat_map(|l| (0..w_n).map(|src| mine[src * l_n + l]).collect::<Vec<_>>())
            .collect();
        let tokens_per_local_expert: Vec<i64> =
            expected.chunks_exact(w_n).map(|c| c.iter().sum()).collect();
        let tokens_from = column(&counts.rank_tokens, w_n, rank);
        let stages = &plan.stages;
        let hop = |i: usize, index: Vec<i64>| Hop {
            stage: stages[i].name,
            index,
            send: stages[i].rows[rank * w_n..(rank + 1) * w_n].to_vec(),
            recv: column(&stages[i].rows, w_n, rank),
        };
        let mut route = Route {
            rank,
            num_tokens,
            topk,
            entries: counts.entries,
            hops: Vec::with_capacity(2),
            out_rows: Vec::new(),
            out_entries: Vec::new(),
            rows_entry: Vec::new(),
            tokens_per_local_expert,
            expected,
            tokens_from,
            arrived: 0,
            plan: plan.clone(),
        };
        let node = topo.node(rank);
        match plan.strategy {
            Strategy::Flat | Strategy::TwoLevel => {
                // 2dh sends by the destination's local rank, then its node, then slot.
                let order = (plan.strategy == Strategy::TwoLevel).then(|| {
                    let mut by: Vec<usize> = (0..r_n).collect();
                    by.sort_by_key(|&s| {
                        let d = topo.rank_of_slot(s);
                        (topo.local(d), topo.node(d), s)
                    });
                    let mut order = vec![0i64; r_n];
                    for (pos, &s) in by.iter().enumerate() {
                        order[s] = pos as i64;
                    }
                    order
                });
                let n = sum(&sc[rank * r_n..(rank + 1) * r_n])?;
                let mut rows_token = vec![0i64; n];
                route.rows_entry = vec![0i64; n];
                let mut per_slot = vec![0i64; r_n];
                copy_layout(
                    slots,
                    num_tokens,
                    topk,
                    r_n,
                    order.as_deref(),
                    &mut rows_token,
                    &mut route.rows_entry,
                    &mut per_slot,
                )?;
                ensure(
                    per_slot == sc[rank * r_n..(rank + 1) * r_n],
                    "slots",
                    || "do not match this rank's gathered counts".into(),
                )?;
                route.hops.push(hop(0, rows_token));
                if plan.strategy == Strategy::TwoLevel {
                    // On (n, g'): from each source (n, g), blocks by destination node n';
                    // regrouped by n'.
                    let g2 = topo.local(rank);
                    let mut sizes = Vec::with_capacity(g_n * n_n);
                    for g in 0..g_n {
                        let src = topo.rank(node, g);
                        for n2 in 0..n_n {
                            let dst = topo.rank(n2, g2);
                            sizes.push(
                                sc[src * r_n + dst * l_n..src * r_n + (dst + 1) * l_n]
                                    .iter()
                                    .sum(),
                            );
                        }
                    }
                    let mut mid = vec![0i64; sum(&sizes)?];
                    block_order(&sizes, g_n, n_n, &mut mid)?;
                    route.hops.push(hop(1, mid));
                }
                // Received by source rank, then slot, then token; the output is by slot, then
                // source.
                route.out_rows = vec![0i64; sum(&mine)?];
                block_order(&mine, w_n, l_n, &mut route.out_rows)?;
                route.arrived = route.hops.len();
            }
            Strategy::Dedup | Strategy::AllGather => {
                let send0 = if plan.strategy == Strategy::Dedup {
                    let node_tokens = &counts.node_tokens[rank * n_n..(rank + 1) * n_n];
                    let mut s = vec![0i64; sum(node_tokens)?];
                    node_send_index(slots, num_tokens, topk, &topo, node_tokens, &mut s)?;
                    s
                } else {
                    (0..n_n).flat_map(|_| 0..num_tokens as i64).collect()
                };
                route.hops.push(hop(0, send0));
                // The forwarding index and the output order are read off the slot ids on
                // arrival.
                route.hops.push(hop(1, Vec::new()));
            }
        }
        Ok(route)
    }

    /// The hop whose received rows [`Route::arrive`] must read next, if any.
    pub fn pending(&self) -> Option<usize> {
        (self.arrived < self.hops.len()).then_some(self.arrived)
    }

    /// Token strategies: reads the slot ids (`num_ids` int32 at `ids_off` of each row of
    /// `stride` bytes in `buf`) that arrived with hop `hop` of the dispatch. After hop 0 it
    /// fills the forwarding index of hop 1; after hop 1 the output order.
    pub fn arrive(
        &mut self,
        hop: usize,
        buf: &[u8],
        stride: usize,
        ids_off: usize,
        num_ids: usize,
    ) -> Result<()> {
        ensure(self.pending() == Some(hop), "hop", || {
            match self.pending() {
                Some(p) => format!("expected the arrival of hop {p}, got {hop}"),
                None => "the route is complete: nothing more arrives".into(),
            }
        })?;
        let topo = self.plan.topo;
        let (w_n, g_n) = (topo.ranks, topo.ranks_per_node);
        let node = topo.node(self.rank);
        if hop == 0 {
            let next = &self.hops[1];
            let expected: Vec<i64> = (0..g_n).map(|g| next.send[topo.rank(node, g)]).collect();
            let mut fwd = vec![0i64; sum(&next.send)?];
            forward_index(
                buf, stride, ids_off, num_ids, &topo, node, &expected, &mut fwd,
            )?;
            self.hops[1].index = fwd;
        } else {
            // From proxies (node, g) in rank order; each proxy's rows by source node, then token.
            let mut blocks = Vec::with_capacity(2 * w_n);
            for g in 0..g_n {
                for n in 0..topo.nodes() {
                    let src = topo.rank(n, g);
                    blocks.extend([src as i64, self.tokens_from[src]]);
                }
            }
            let n = sum(&self.expected)?;
            let (mut rows, mut entries) = (vec![0i64; n], vec![0i64; n]);
            expand_index(
                buf,
                stride,
                ids_off,
                num_ids,
                &blocks,
                &topo,
                self.rank,
                &self.expected,
                &mut rows,
                &mut entries,
            )?;
            self.out_rows = rows;
            self.out_entries = entries;
        }
        self.arrived += 1;
        Ok(())
    }

    /// Whether every index is known (the dispatch has run).
    pub fn complete(&self) -> bool {
        self.pending().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::super::dispatch_layout::layout;
    use super::super::plan::{Counts, Plan};
    use super::*;

    /// Deterministic slots: token t of rank r picks `k` distinct slots.
    fn slots_of(rank: usize, t_n: usize, k: usize, r_n: usize) -> Vec<i64> {
        let mut s = Vec::with_capacity(t_n * k);
        for t in 0..t_n {
            let mut row: Vec<i64> = Vec::new();
            let mut x = (rank * 7919 + t * 104_729) as u64;
            while row.len() < k {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let c = ((x >> 33) % r_n as u64) as i64;
                if !row.contains(&c) {
                    row.push(c);
                }
            }
            if t % 5 == 0 {
                row[k - 1] = -1; // a dropped entry
            }
            s.extend(row);
        }
        s
    }

    /// Runs the dispatch of every strategy between `W` simulated ranks, moving (token, entry)
    /// pairs as rows, and checks that every rank ends with exactly its slots' rows in
    /// Megatron's order (by local slot, then source rank, then token).
    #[test]
    fn every_strategy_delivers_megatron_order() {
        let topo = EpGroup::new(4, 2, 3).unwrap();
        let (w_n, l_n, r_n, k) = (4, 3, 12, 3);
        let t_of = |r: usize| 5 + 3 * r;
        let slots: Vec<Vec<i64>> = (0..w_n).map(|r| slots_of(r, t_of(r), k, r_n)).collect();
        let layouts: Vec<_> = (0..w_n)
            .map(|r| layout(&slots[r], t_of(r), k, &topo, None, true).unwrap())
            .collect();
        let tokens: Vec<i64> = (0..w_n).map(|r| t_of(r) as i64).collect();
        let counts = Counts::from_layouts(&layouts, &tokens);
        // The expected output of rank d: (src, token, entry) by local slot, source, token.
        let want = |d: usize| {
            let mut v = Vec::new();
            for l in 0..l_n {
                for (src, s) in slots.iter().enumerate() {
                    for t in 0..t_of(src) {
                        for j in 0..k {
                            if s[t * k + j] == (d * l_n + l) as i64 {
                                v.push((src, t, j));
                            }
                        }
                    }
                }
            }
            v
        };
        for strategy in Strategy::ALL {
            let plan = Plan::new(strategy, &topo, &counts).unwrap();
            let mut routes: Vec<Route> = (0..w_n)
                .map(|r| Route::new(plan.clone(), &counts, r, &slots[r], k).unwrap())
                .collect();
            // A buffer row: (src rank, token, entry or -1, slot ids of the token).
            type Row = (usize, usize, i64, Vec<i64>);
            let mut bufs: Vec<Vec<Row>> = (0..w_n)
                .map(|r| {
                    let rt = &routes[r];
                    rt.hops[0]
                        .index
                        .iter()
                        .enumerate()
                        .map(|(i, &t)| {
                            let t = t as usize;
                            let e = if strategy.copy_rows() {
                                rt.rows_entry[i] % k as i64
                            } else {
                                -1
                            };
                            (r, t, e, slots[r][t * k..(t + 1) * k].to_vec())
                        })
                        .collect()
                })
                .collect();
            for h in 0..routes[0].hops.len() {
                if h > 0 {
                    for r in 0..w_n {
                        bufs[r] = routes[r].hops[h]
                            .index
                            .iter()
                            .map(|&i| bufs[r][i as usize].clone())
                            .collect();
                    }
                }
                // The all-to-all-v: rank s's rows in send order, split by send[d].
                let mut recv: Vec<Vec<Row>> = vec![Vec::new(); w_n];
                let mut parts: Vec<Vec<Vec<Row>>> = Vec::new();
                for s in 0..w_n {
                    let mut it = bufs[s].iter().cloned();
                    parts.push(
                        routes[s].hops[h]
                            .send
                            .iter()
                            .map(|&n| it.by_ref().take(n as usize).collect())
                            .collect(),
                    );
                    assert!(
                        it.next().is_none(),
                        "{strategy:?}: rank {s} sends more rows than planned"
                    );
                }
                for d in 0..w_n {
                    for (s, p) in parts.iter().enumerate() {
                        assert_eq!(p[d].len() as i64, routes[d].hops[h].recv[s]);
                        recv[d].extend(p[d].iter().cloned());
                    }
                }
                bufs = recv;
                for d in 0..w_n {
                    if routes[d].pending() == Some(h) {
                        // Slot ids as the packed rows carry them: int32, one row of 4 * k bytes.
                        let ids: Vec<u8> = bufs[d]
                            .iter()
                            .flat_map(|r| r.3.iter().flat_map(|&s| (s as i32).to_ne_bytes()))
                            .collect();
                        routes[d].arrive(h, &ids, 4 * k, 0, k).unwrap();
                    }
                }
            }
            for d in 0..w_n {
                let rt = &routes[d];
                assert!(rt.complete());
                let got: Vec<(usize, usize, usize)> = rt
                    .out_rows
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| {
                        let row = &bufs[d][r as usize];
                        let j = if strategy.copy_rows() {
                            row.2 as usize
                        } else {
                            rt.out_entries[i] as usize
                        };
                        (row.0, row.1, j)
                    })
                    .collect();
                assert_eq!(got, want(d), "{strategy:?} on rank {d}");
                assert_eq!(
                    rt.tokens_per_local_expert.iter().sum::<i64>() as usize,
                    got.len()
                );
            }
        }
    }

    #[test]
    fn arrival_out_of_turn_is_an_error() {
        let topo = EpGroup::new(2, 1, 2).unwrap();
        let slots = vec![0i64, 3, 1, 2];
        let l = layout(&slots, 2, 2, &topo, None, true).unwrap();
        let counts = Counts::from_layouts(&[l.clone(), l], &[2, 2]);
        let plan = Plan::new(Strategy::Flat, &topo, &counts).unwrap();
        let mut r = Route::new(plan, &counts, 0, &slots, 2).unwrap();
        assert!(r.complete());
        assert!(r.arrive(0, &[], 8, 0, 2).is_err());
        let plan = Plan::new(Strategy::Dedup, &topo, &counts).unwrap();
        assert!(Route::new(plan.clone(), &counts, 2, &slots, 2).is_err());
        assert!(Route::new(plan, &counts, 0, &slots[..2], 2).is_err());
    }
}
