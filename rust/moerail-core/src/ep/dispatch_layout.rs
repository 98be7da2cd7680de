//! What one rank sends: the dispatch layout of its tokens (DeepEP's `get_dispatch_layout`).
//!
//! Tokens come as slot ids `slots [T, width]` (physical expert slots, `-1` for an empty entry,
//! no slot twice in a row). The layout counts the copies per slot (what `flat` sends), the
//! tokens with at least one slot on each rank and on each node (what `dedup` sends), and can
//! write the token-in-rank map and the node-grouped send order.
//!
//! Tokens are processed in fixed blocks in moerail's pool; counts are sums, so the results do
//! not depend on the number of threads.

use rayon::prelude::*;

use super::EpGroup;
use crate::error::{ensure, invalid, Result};
use crate::util::pool;

/// Tokens per parallel block (fixed).
const BLOCK: usize = 1024;
/// Below this many entries one thread does it all (a pool round trip costs more).
/// A layout is called once a layer a step, so the pool's workers are asleep and waking them
/// costs more than they save below ~64k entries (measured: 4096 x 8 entries take 50-62 us on one
/// thread, 65-77 us on two cold workers, 39-44 us on two warm ones).
const SERIAL_ENTRIES: usize = 1 << 16;

/// The layout of one rank's tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DispatchLayout {
    /// Copies per slot `[R]`.
    pub slot_counts: Vec<i64>,
    /// Tokens with at least one slot on each rank `[W]`.
    pub rank_tokens: Vec<i64>,
    /// Tokens with at least one slot on each node `[N]`.
    pub node_tokens: Vec<i64>,
    /// The most slots any one token has (0 when nothing is routed).
    pub max_entries: usize,
}

impl DispatchLayout {
    fn zeros(topo: &EpGroup) -> Self {
        Self {
            slot_counts: vec![0; topo.slots()],
            rank_tokens: vec![0; topo.ranks],
            node_tokens: vec![0; topo.nodes()],
            max_entries: 0,
        }
    }

    fn add(&mut self, o: &DispatchLayout) {
        for (a, b) in self.slot_counts.iter_mut().zip(&o.slot_counts) {
            *a += b;
        }
        for (a, b) in self.rank_tokens.iter_mut().zip(&o.rank_tokens) {
            *a += b;
        }
        for (a, b) in self.node_tokens.iter_mut().zip(&o.node_tokens) {
            *a += b;
        }
        self.max_entries = self.max_entries.max(o.max_entries);
    }

    /// The counts as one vector `[R + W + N]` (slot counts, rank tokens, node tokens).
    pub fn write_counts(&self, out: &mut [i64]) -> Result<()> {
        let (r, w, n) = (
            self.slot_counts.len(),
            self.rank_tokens.len(),
            self.node_tokens.len(),
        );
        ensure(out.len() == r + w + n, "counts", || {
            format!(
                "expected {} entries (slots + ranks + nodes), got {}",
                r + w + n,
                out.len()
            )
        })?;
        out[..r].copy_from_slice(&self.slot_counts);
        out[r..r + w].copy_from_slice(&self.rank_tokens);
        out[r + w..].copy_from_slice(&self.node_tokens);
        Ok(())
    }
}

fn check_shape(slots: &[i64], num_tokens: usize, width: usize) -> Result<()> {
    ensure(
        num_tokens.checked_mul(width) == Some(slots.len()),
        "slots",
        || {
            format!(
                "expected [{num_tokens}, {width}] (num_tokens x entries), got {} values",
                slots.len()
            )
        },
    )?;
    ensure(num_tokens < u32::MAX as usize, "slots", || {
        format!("{num_tokens} tokens exceed 2^32 - 1")
    })
}

/// Adds bit `p` of every mask to `out[p]` (a positional popcount): bit-sliced 8-bit counters
/// held in registers, 255 masks at a time — about 16 operations a mask, no branches.
fn count_bits(masks: &[u64], out: &mut [i64]) {
    for block in masks.chunks(255) {
        let mut c = [0u64; 8];
        for &m in block {
            let mut carry = m;
            for plane in c.iter_mut() {
                let t = *plane & carry;
                *plane ^= carry;
                carry = t;
            }
        }
        for (p, o) in out.iter_mut().enumerate() {
            let mut v = 0i64;
            for (b, plane) in c.iter().enumerate() {
                v += (((plane >> p) & 1) as i64) << b;
            }
            *o += v;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn block_layout(
    slots: &[i64],
    first_token: usize,
    width: usize,
    topo: &EpGroup,
    rank_node: &[u32],
    slot_rank: &[u32],
    token_in_rank: Option<&mut [bool]>,
    verify: bool,
) -> Result<DispatchLayout> {
    let r_n = topo.slots() as u64;
    if verify && has_repeats_or_range(slots, width, topo.slots()) {
        return Err(bad_slot(slots, first_token, width, r_n as usize));
    }
    if topo.ranks <= 64 {
        // Range-checked in its one pass over the slots.
        block_layout_masks(slots, width, topo, rank_node, slot_rank, token_in_rank)
            .ok_or_else(|| bad_slot(slots, first_token, width, r_n as usize))
    } else {
        // Slot ids index tables below without bounds checks: check the range first.
        if slots.iter().any(|&s| s < -1 || s >= r_n as i64) {
            return Err(bad_slot(slots, first_token, width, r_n as usize));
        }
        Ok(block_layout_stamps(
            slots,
            first_token,
            width,
            topo,
            rank_node,
            slot_rank,
            token_in_rank,
        ))
    }
}

/// Whether any slot id is outside [-1, R): one vectorised pass (AVX2 has the 64-bit compares
/// SSE2 lacks; detected at run time).
fn out_of_range(slots: &[i64], r_n: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            return unsafe { out_of_range_avx2(slots, r_n) };
        }
    }
    out_of_range_plain(slots, r_n)
}

#[inline(always)]
fn out_of_range_plain(slots: &[i64], r_n: usize) -> bool {
    // A fold over unsigned `s + 1 > R` (not `any`, which stops early and does not vectorise).
    let r = r_n as u64;
    slots
        .iter()
        .fold(false, |bad, &s| bad | ((s as u64).wrapping_add(1) > r))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn out_of_range_avx2(slots: &[i64], r_n: usize) -> bool {
    out_of_range_plain(slots, r_n)
}

/// Whether a row lists a slot twice, or a slot id is outside [-1, R).
fn has_repeats_or_range(slots: &[i64], width: usize, r_n: usize) -> bool {
    let mut seen = vec![u32::MAX; r_n];
    for (i, row) in slots.chunks_exact(width).enumerate() {
        for &s in row {
            if s < -1 || s >= r_n as i64 {
                return true;
            }
            if s >= 0 {
                if seen[s as usize] == i as u32 {
                    return true;
                }
                seen[s as usize] = i as u32;
            }
        }
    }
    false
}

/// Up to 64 ranks: each token's ranks and nodes are bit masks in registers, counted afterwards
/// by [`count_bits`]; nothing branches on the routing.
fn block_layout_masks(
    slots: &[i64],
    width: usize,
    topo: &EpGroup,
    rank_node: &[u32],
    slot_rank: &[u32],
    token_in_rank: Option<&mut [bool]>,
) -> Option<DispatchLayout> {
    let mut out = DispatchLayout::zeros(topo);
    let t_n = slots.len() / width;
    let r_n = topo.slots();
    let (mut rank_masks, mut node_masks) = (Vec::with_capacity(t_n), Vec::with_capacity(t_n));
    // Tables indexed by s + 1: 0 is the empty entry (-1), 1..=R the slots, R + 1 any id out of
    // range (flagged, no bits). One lookup per entry, no branch on the routing, and the range
    // check rides along instead of a separate pass.
    let mut rank_bit = vec![0u64; r_n + 2];
    let mut node_bit = vec![0u64; r_n + 2];
    for s in 0..r_n {
        let r = slot_rank[s] as usize;
        rank_bit[s + 1] = 1 << r;
        node_bit[s + 1] = 1 << rank_node[r];
    }
    let mut counts = vec![0i64; r_n + 2];
    if out_of_range(slots, r_n) {
        return None;
    }
    for row in slots.chunks_exact(width) {
        let (mut rm, mut nm, mut empty) = (0u64, 0u64, 0usize);
        for &s in row {
            let i = (s + 1) as usize;
            // SAFETY: -1 <= s < R (checked above), so i <= R indexes the [R + 2] tables.
            unsafe {
                *counts.get_unchecked_mut(i) += 1;
                rm |= *rank_bit.get_unchecked(i);
                nm |= *node_bit.get_unchecked(i);
            }
            empty += (i == 0) as usize;
        }
        rank_masks.push(rm);
        node_masks.push(nm);
        out.max_entries = out.max_entries.max(width - empty);
    }
    out.slot_counts.copy_from_slice(&counts[1..=r_n]);
    if topo.slots_per_rank > 1 {
        count_bits(&rank_masks, &mut out.rank_tokens);
    } else {
        // One slot a rank: a token's slots are its ranks.
        out.rank_tokens.copy_from_slice(&out.slot_counts);
    }
    if topo.nodes() <= 8 {
        // Few nodes: per-node byte counters, 8 nodes in one u64 a mask (a byte holds 255 counts).
        let mut spread = [0u64; 256];
        for (m, v) in spread.iter_mut().enumerate() {
            for b in 0..8 {
                *v |= (((m >> b) & 1) as u64) << (8 * b);
            }
        }
        for block in node_masks.chunks(255) {
            let acc: u64 = block.iter().map(|&m| spread[m as usize & 0xff]).sum();
            for (n, o) in out.node_tokens.iter_mut().enumerate() {
                *o += ((acc >> (8 * n)) & 0xff) as i64;
            }
        }
    } else {
        count_bits(&node_masks, &mut out.node_tokens);
    }
    if let Some(tir) = token_in_rank {
        let w_n = topo.ranks;
        for (row, &m) in tir.chunks_exact_mut(w_n).zip(&rank_masks) {
            let mut m = m;
            row.fill(false);
            while m != 0 {
                row[m.trailing_zeros() as usize] = true;
                m &= m - 1;
            }
        }
    }
    Some(out)
}

/// More than 64 ranks: stamps say which token last counted a rank or node.
fn block_layout_stamps(
    slots: &[i64],
    first_token: usize,
    width: usize,
    topo: &EpGroup,
    rank_node: &[u32],
    slot_rank: &[u32],
    mut token_in_rank: Option<&mut [bool]>,
) -> DispatchLayout {
    let mut out = DispatchLayout::zeros(topo);
    let w_n = topo.ranks;
    let mut rank_seen = vec![u32::MAX; w_n];
    let mut node_seen = vec![u32::MAX; topo.nodes()];
    if let Some(tir) = token_in_rank.as_deref_mut() {
        tir.fill(false);
    }
    for (i, row) in slots.chunks_exact(width).enumerate() {
        let stamp = (first_token + i) as u32;
        let mut n_entries = 0usize;
        for &s in row {
            if s < 0 {
                continue;
            }
            let s = s as usize;
            n_entries += 1;
            out.slot_counts[s] += 1;
            let r = slot_rank[s] as usize;
            out.rank_tokens[r] += (rank_seen[r] != stamp) as i64;
            rank_seen[r] = stamp;
            let n = rank_node[r] as usize;
            out.node_tokens[n] += (node_seen[n] != stamp) as i64;
            node_seen[n] = stamp;
            if let Some(tir) = token_in_rank.as_deref_mut() {
                tir[i * w_n + r] = true;
            }
        }
        out.max_entries = out.max_entries.max(n_entries);
    }
    out
}

/// The error for the first bad entry of a block (a slot out of range or listed twice).
fn bad_slot(slots: &[i64], first_token: usize, width: usize, r_n: usize) -> crate::error::Error {
    for (i, row) in slots.chunks_exact(width).enumerate() {
        let t = first_token + i;
        for (j, &s) in row.iter().enumerate() {
            if s < -1 {
                return invalid(
                    "slots",
                    format!("token {t}, entry {j}: slot id {s} (use -1 for an empty entry)"),
                );
            }
            if s >= r_n as i64 {
                return invalid(
                    "slots",
                    format!("token {t}, entry {j}: slot id {s} is outside [0, {r_n})"),
                );
            }
            if s >= 0 && row[..j].contains(&s) {
                return invalid("slots", format!("token {t} lists slot {s} twice"));
            }
        }
    }
    crate::error::Error::Internal("a bad slot was flagged but not found".into())
}

/// The layout of `slots [num_tokens, width]`; if given, `token_in_rank [num_tokens, W]` is
/// written (whether each token has a slot on each rank). Slot ids are always range-checked;
/// `verify` also rejects a row that lists a slot twice (slots chosen by
/// [`crate::balance::replica`] from distinct experts never do).
pub fn layout(
    slots: &[i64],
    num_tokens: usize,
    width: usize,
    topo: &EpGroup,
    token_in_rank: Option<&mut [bool]>,
    verify: bool,
) -> Result<DispatchLayout> {
    check_shape(slots, num_tokens, width)?;
    let w_n = topo.ranks;
    if let Some(tir) = &token_in_rank {
        ensure(tir.len() == num_tokens * w_n, "token_in_rank", || {
            format!("expected [{num_tokens}, {w_n}], got {} values", tir.len())
        })?;
    }
    let (rank_node, slot_rank) = topo.tables();
    if width == 0 || num_tokens == 0 {
        if let Some(tir) = token_in_rank {
            tir.fill(false);
        }
        return Ok(DispatchLayout::zeros(topo));
    }
    if slots.len() <= SERIAL_ENTRIES || pool::num_threads() == 1 {
        return block_layout(
            slots,
            0,
            width,
            topo,
            &rank_node,
            &slot_rank,
            token_in_rank,
            verify,
        );
    }
    let parts: Vec<Result<DispatchLayout>> = pool::install(|| match token_in_rank {
        Some(tir) => slots
            .par_chunks(BLOCK * width)
            .zip(tir.par_chunks_mut(BLOCK * w_n))
            .enumerate()
            .map(|(b, (s, t))| {
                block_layout(
                    s,
                    b * BLOCK,
                    width,
                    topo,
                    &rank_node,
                    &slot_rank,
                    Some(t),
                    verify,
                )
            })
            .collect(),
        None => slots
            .par_chunks(BLOCK * width)
            .enumerate()
            .map(|(b, s)| {
                block_layout(
                    s,
                    b * BLOCK,
                    width,
                    topo,
                    &rank_node,
                    &slot_rank,
                    None,
                    verify,
                )
            })
            .collect(),
    });
    let mut total = DispatchLayout::zeros(topo);
    for p in parts {
        total.add(&p?);
    }
    Ok(total)
}

/// The `dedup` send order: for each node (ascending), the tokens with a slot on it (ascending).
/// `out` has `sum(node_tokens)` entries (from [`dispatch_layout`] of the same slots).
pub fn node_send_index(
    slots: &[i64],
    num_tokens: usize,
    width: usize,
    topo: &EpGroup,
    node_tokens: &[i64],
    out: &mut [i64],
) -> Result<()> {
    check_shape(slots, num_tokens, width)?;
    let n_n = topo.nodes();
    ensure(node_tokens.len() == n_n, "node_tokens", || {
        format!("expected {n_n} entries, got {}", node_tokens.len())
    })?;
    let total: i64 = node_tokens.iter().sum();
    ensure(out.len() as i64 == total, "out", || {
        format!(
            "expected {total} entries (the sum of node_tokens), got {}",
            out.len()
        )
    })?;
    let (rank_node, slot_rank) = topo.tables();
    // One lookup an entry: each slot's node.
    let slot_node: Vec<usize> = slot_rank
        .iter()
        .map(|&r| rank_node[r as usize] as usize)
        .collect();
    let mut cursor = vec![0usize; n_n];
    let mut acc = 0usize;
    for n in 0..n_n {
        cursor[n] = acc;
        acc += node_tokens[n] as usize;
    }
    let ends: Vec<usize> = (0..n_n)
        .map(|n| cursor[n] + node_tokens[n] as usize)
        .collect();
    let mut seen = vec![u32::MAX; n_n];
    for t in 0..num_tokens {
        for &s in &slots[t * width..(t + 1) * width] {
            if s < 0 {
                continue;
            }
            let Some(&n) = slot_node.get(s as usize) else {
                return Err(invalid(
                    "slots",
                    format!("slot id {s} is outside [0, {})", slot_node.len()),
                ));
            };
            if seen[n] != t as u32 {
                seen[n] = t as u32;
                ensure(cursor[n] < ends[n], "node_tokens", || {
                    format!("node {n} has more tokens than node_tokens says")
                })?;
                out[cursor[n]] = t as i64;
                cursor[n] += 1;
            }
        }
    }
    ensure(cursor == ends, "node_tokens", || {
        "does not match the slots (count them with layout())".into()
    })
}

/// The most `true`s in any row of `map [num_tokens, num_experts]`.
pub fn max_row_count(map: &[bool], num_tokens: usize, num_experts: usize) -> Result<usize> {
    ensure(
        num_tokens.checked_mul(num_experts) == Some(map.len()),
        "routing_map",
        || {
            format!(
                "expected [{num_tokens}, {num_experts}], got {} values",
                map.len()
            )
        },
    )?;
    if num_experts == 0 {
        return Ok(0);
    }
    // Summing the bytes (0 or 1) vectorises; a filter-and-count does not.
    let count = |rows: &[bool]| {
        rows.chunks_exact(num_experts)
            .map(|r| r.iter().map(|&m| m as usize).sum::<usize>())
            .max()
            .unwrap_or(0)
    };
    if map.len() <= SERIAL_ENTRIES {
        return Ok(count(map));
    }
    Ok(pool::install(|| {
        map.par_chunks(BLOCK * num_experts)
            .map(count)
            .max()
            .unwrap_or(0)
    }))
}

/// The compact form of a routing map: `out [num_tokens, width]` lists each row's experts in
/// ascending order, then `-1`s. `width` must hold the fullest row ([`max_row_count`]).
pub fn compact_routing_map(
    map: &[bool],
    num_tokens: usize,
    num_experts: usize,
    width: usize,
    out: &mut [i64],
) -> Result<()> {
    ensure(
        num_tokens.checked_mul(num_experts) == Some(map.len()),
        "routing_map",
        || {
            format!(
                "expected [{num_tokens}, {num_experts}], got {} values",
                map.len()
            )
        },
    )?;
    ensure(out.len() == num_tokens * width, "out", || {
        format!("expected [{num_tokens}, {width}], got {} values", out.len())
    })?;
    if num_tokens == 0 {
        return Ok(());
    }
    if width == 0 || num_experts == 0 {
        return ensure(!map.contains(&true), "width", || {
            "0 entries cannot hold a routed token".into()
        });
    }
    let fill = |(b, (m, o)): (usize, (&[bool], &mut [i64]))| -> Result<()> {
        for (i, (row, dst)) in m
            .chunks_exact(num_experts)
            .zip(o.chunks_exact_mut(width))
            .enumerate()
        {
            let mut j = 0;
            let mut push = |e: usize| -> Result<()> {
                if j == width {
                    return Err(invalid(
                        "width",
                        format!(
                            "token {} routes to more than {width} experts",
                            b * BLOCK + i
                        ),
                    ));
                }
                dst[j] = e as i64;
                j += 1;
                Ok(())
            };
            // A row is mostly `false` (top-k of many experts): eight entries are read as one
            // little-endian word whose bytes are 0 or 1, and its set bytes found lowest first.
            let words = row.chunks_exact(8);
            let tail = words.remainder();
            for (g, w) in words.enumerate() {
                let mut bits = u64::from_le_bytes(std::array::from_fn(|k| w[k] as u8));
                while bits != 0 {
                    push(g * 8 + (bits.trailing_zeros() / 8) as usize)?;
                    bits &= bits - 1;
                }
            }
            let base = row.len() - tail.len();
            for (o, &v) in tail.iter().enumerate() {
                if v {
                    push(base + o)?;
                }
            }
            dst[j..].fill(-1);
        }
        Ok(())
    };
    if map.len() <= SERIAL_ENTRIES {
        return fill((0, (map, out)));
    }
    pool::install(|| {
        map.par_chunks(BLOCK * num_experts)
            .zip(out.par_chunks_mut(BLOCK * width))
            .enumerate()
            .try_for_each(fill)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator (no dependency).
    pub(crate) struct Lcg(pub u64);
    impl Lcg {
        pub fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// `k` distinct random slots a token, some entries dropped.
    pub(crate) fn random_slots(t: usize, k: usize, r: usize, seed: u64) -> Vec<i64> {
        let mut g = Lcg(seed);
        let mut out = Vec::with_capacity(t * k);
        for _ in 0..t {
            let mut row: Vec<i64> = Vec::new();
            while row.len() < k {
                let s = g.below(r) as i64;
                if !row.contains(&s) {
                    row.push(s);
                }
            }
            if g.below(5) == 0 {
                row[g.below(k)] = -1;
            }
            out.extend(row);
        }
        out
    }

    fn naive(slots: &[i64], t: usize, k: usize, topo: &EpGroup) -> (DispatchLayout, Vec<bool>) {
        let mut l = DispatchLayout::zeros(topo);
        let mut tir = vec![false; t * topo.ranks];
        for tok in 0..t {
            let row = &slots[tok * k..(tok + 1) * k];
            let mut ranks = std::collections::BTreeSet::new();
            let mut nodes = std::collections::BTreeSet::new();
            let mut n = 0;
            for &s in row {
                if s >= 0 {
                    n += 1;
                    l.slot_counts[s as usize] += 1;
                    let r = topo.rank_of_slot(s as usize);
                    ranks.insert(r);
                    nodes.insert(topo.node(r));
                }
            }
            for &r in &ranks {
                l.rank_tokens[r] += 1;
                tir[tok * topo.ranks + r] = true;
            }
            for &nd in &nodes {
                l.node_tokens[nd] += 1;
            }
            l.max_entries = l.max_entries.max(n);
        }
        (l, tir)
    }

    #[test]
    fn layout_matches_a_naive_count() {
        let topo = EpGroup::new(8, 4, 3).unwrap();
        for &t in &[0usize, 1, 37, 5000, 20_000] {
            let slots = random_slots(t, 5, topo.slots(), t as u64 + 1);
            let (want, want_tir) = naive(&slots, t, 5, &topo);
            let mut tir = vec![true; t * 8];
            let got = layout(&slots, t, 5, &topo, Some(&mut tir), true).unwrap();
            assert_eq!(got, want, "t={t}");
            assert_eq!(tir, want_tir);
            assert_eq!(layout(&slots, t, 5, &topo, None, false).unwrap(), want);
            let big = EpGroup::new(80, 4, 1).unwrap();
            let s80 = random_slots(t, 5, 80, t as u64 + 9);
            let (w80, tir80) = naive(&s80, t, 5, &big);
            let mut t80 = vec![true; t * 80];
            assert_eq!(layout(&s80, t, 5, &big, Some(&mut t80), true).unwrap(), w80);
            assert_eq!(t80, tir80);
            let mut idx = vec![0; want.node_tokens.iter().sum::<i64>() as usize];
            node_send_index(&slots, t, 5, &topo, &want.node_tokens, &mut idx).unwrap();
            let mut expect = Vec::new();
            for n in 0..topo.nodes() {
                for tok in 0..t {
                    if (0..4).any(|l| tir[tok * 8 + topo.rank(n, l)]) {
                        expect.push(tok as i64);
                    }
                }
            }
            assert_eq!(idx, expect);
        }
    }

    #[test]
    fn layout_rejects_bad_slots() {
        let topo = EpGroup::new(2, 1, 2).unwrap();
        assert!(layout(&[0, 4], 1, 2, &topo, None, false).is_err());
        assert!(layout(&[1, 1], 1, 2, &topo, None, true).is_err());
        assert!(layout(&[-2, 1], 1, 2, &topo, None, false).is_err());
        assert!(layout(&[0, 1, 2], 1, 2, &topo, None, false).is_err());
        let l = layout(&[-1, 3, 2, -1], 2, 2, &topo, None, true).unwrap();
        assert_eq!(l.slot_counts, vec![0, 0, 1, 1]);
        assert_eq!(l.rank_tokens, vec![0, 2]);
        assert_eq!(l.max_entries, 1);
    }

    #[test]
    fn compact_map_round_trip() {
        // Expert counts with and without a partial last word of eight; sparse and dense rows.
        for (e, one_in) in [(40, 9), (13, 3), (5, 2), (256, 32), (7, 1)] {
            compact_round_trip(3000, e, one_in);
        }
    }

    fn compact_round_trip(t: usize, e: usize, one_in: usize) {
        let mut g = Lcg(7 + e as u64);
        let map: Vec<bool> = (0..t * e).map(|_| g.below(one_in) == 0).collect();
        let w = max_row_count(&map, t, e).unwrap();
        let want = (0..t)
            .map(|r| map[r * e..(r + 1) * e].iter().filter(|&&m| m).count())
            .max()
            .unwrap();
        assert_eq!(w, want);
        let mut out = vec![0; t * w];
        compact_routing_map(&map, t, e, w, &mut out).unwrap();
        for r in 0..t {
            let listed: Vec<i64> = (0..e as i64).filter(|&x| map[r * e + x as usize]).collect();
            let mut row = out[r * w..(r + 1) * w].to_vec();
            let tail = row.split_off(listed.len());
            assert_eq!(row, listed);
            assert!(tail.iter().all(|&x| x == -1));
        }
        assert!(compact_routing_map(&map, t, e, w - 1, &mut vec![0; t * (w - 1)]).is_err());
    }
}
