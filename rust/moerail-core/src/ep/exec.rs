//! The indices that order rows between the stages of an exchange, for [`super::route`]: the
//! copy rows of the first hop ([`copy_layout`]), block reorders ([`block_order`]) and, from the
//! slot ids that travel with token rows, the forwarding and output orders of `dedup` /
//! `allgather` ([`forward_index`], [`expand_index`]). Packing rows and summing them are
//! torch's `index_select` and moerail's unpermute kernel on the rows' device.
//!
//! An exchange buffer is `[rows, stride]` bytes ([`super::plan::RowLayout`]).

use super::EpGroup;
use crate::error::{ensure, invalid, Result};
use crate::ops::permute::{permute_layout, ExpertIndices};
use crate::util::pool;

fn rows_of(buf: &[u8], stride: usize, name: &str) -> Result<usize> {
    ensure(stride > 0 && buf.len() % stride == 0, name, || {
        format!("{} bytes are not whole rows of {stride} bytes", buf.len())
    })?;
    Ok(buf.len() / stride)
}

fn check_cols(off: usize, len: usize, stride: usize, name: &str) -> Result<()> {
    ensure(
        off.checked_add(len).is_some_and(|e| e <= stride),
        name,
        || format!("columns [{off}, {off} + {len}) do not fit rows of {stride} bytes"),
    )
}

/// Reorders blocks: the input is `a x b` blocks of rows, `a`-major, block `(i, j)` holding
/// `sizes[i * b + j]` rows; `out` lists the input row of each output row for the `b`-major
/// order (block `(i, j)` goes to position `j * a + i`). Megatron's `sort_chunks_by_idxs` with
/// the transposing order, as a row index.
pub fn block_order(sizes: &[i64], a: usize, b: usize, out: &mut [i64]) -> Result<()> {
    ensure(sizes.len() == a * b, "sizes", || {
        format!("expected {a} x {b} block sizes, got {}", sizes.len())
    })?;
    ensure(sizes.iter().all(|&s| s >= 0), "sizes", || {
        "negative size".into()
    })?;
    let total: i64 = sizes.iter().sum();
    ensure(out.len() as i64 == total, "out", || {
        format!("expected {total} rows, got {}", out.len())
    })?;
    let mut start = vec![0i64; a * b];
    let mut acc = 0;
    for (s, &n) in start.iter_mut().zip(sizes) {
        *s = acc;
        acc += n;
    }
    let mut w = 0;
    for j in 0..b {
        for i in 0..a {
            let (s, n) = (start[i * b + j], sizes[i * b + j]);
            for r in s..s + n {
                out[w] = r;
                w += 1;
            }
        }
    }
    Ok(())
}

/// Reads the `count` int32 slot ids of row `r` (at `ids_off`).
#[inline]
fn ids_of(
    buf: &[u8],
    stride: usize,
    ids_off: usize,
    count: usize,
    r: usize,
) -> impl Iterator<Item = i32> + '_ {
    let base = r * stride + ids_off;
    buf[base..base + 4 * count]
        .chunks_exact(4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The forwarding step of `dedup` / `allgather` on rank `(node, g)`: for each rank of the node
/// (ascending local rank), the received rows (ascending) that have a slot on it. `expected[g']`
/// is what the plan says goes to local rank `g'`; a different count is an error.
#[allow(clippy::too_many_arguments)]
pub fn forward_index(
    buf: &[u8],
    stride: usize,
    ids_off: usize,
    count: usize,
    topo: &EpGroup,
    node: usize,
    expected: &[i64],
    out: &mut [i64],
) -> Result<()> {
    let n_rows = rows_of(buf, stride, "buf")?;
    check_cols(ids_off, 4 * count, stride, "buf")?;
    let g_n = topo.ranks_per_node;
    ensure(node < topo.nodes(), "node", || {
        format!("{node} is not a node of the group")
    })?;
    ensure(expected.len() == g_n, "expected", || {
        format!("expected {g_n} counts, got {}", expected.len())
    })?;
    let total: i64 = expected.iter().sum();
    ensure(out.len() as i64 == total, "out", || {
        format!("expected {total} rows, got {}", out.len())
    })?;
    let (lo, hi) = (
        (topo.rank(node, 0) * topo.slots_per_rank) as i32,
        (topo.rank(node, g_n - 1) * topo.slots_per_rank + topo.slots_per_rank) as i32,
    );
    let l_n = topo.slots_per_rank as i32;
    let mut cursor = vec![0usize; g_n];
    let mut acc = 0usize;
    for g in 0..g_n {
        cursor[g] = acc;
        acc += expected[g] as usize;
    }
    let ends: Vec<usize> = (0..g_n).map(|g| cursor[g] + expected[g] as usize).collect();
    let mut seen = vec![usize::MAX; g_n];
    for r in 0..n_rows {
        for id in ids_of(buf, stride, ids_off, count, r) {
            if id < lo || id >= hi {
                continue;
            }
            let g = ((id - lo) / l_n) as usize;
            if seen[g] != r {
                seen[g] = r;
                if cursor[g] == ends[g] {
                    return Err(invalid(
                        "counts",
                        format!(
                            "local rank {g} of node {node} gets more rows than planned ({})",
                            expected[g]
                        ),
                    ));
                }
                out[cursor[g]] = r as i64;
                cursor[g] += 1;
            }
        }
    }
    ensure(cursor == ends, "counts", || {
        format!("node {node} forwards other row counts than planned ({expected:?})")
    })
}

/// The final step of `dedup` / `allgather` on `rank`: the output rows, grouped by local slot,
/// then by source rank, then in arrival order (= token order): `out_rows[i]` is the received
/// row and `out_entries[i]` its entry holding the slot. The received rows come in `blocks`
/// (`[src, rows]` pairs, in buffer order); `expected [L, W]` is what the plan says each
/// (local slot, source rank) gets; a different count is an error.
#[allow(clippy::too_many_arguments)]
pub fn expand_index(
    buf: &[u8],
    stride: usize,
    ids_off: usize,
    count: usize,
    blocks: &[i64],
    topo: &EpGroup,
    rank: usize,
    expected: &[i64],
    out_rows: &mut [i64],
    out_entries: &mut [i64],
) -> Result<()> {
    let n_rows = rows_of(buf, stride, "buf")?;
    check_cols(ids_off, 4 * count, stride, "buf")?;
    let (w_n, l_n) = (topo.ranks, topo.slots_per_rank);
    ensure(rank < w_n, "rank", || format!("{rank} is not in the group"))?;
    ensure(expected.len() == l_n * w_n, "expected", || {
        format!("expected [{l_n}, {w_n}] counts, got {}", expected.len())
    })?;
    let total: i64 = expected.iter().sum();
    ensure(
        out_rows.len() as i64 == total && out_entries.len() as i64 == total,
        "out",
        || format!("expected {total} rows"),
    )?;
    ensure(blocks.len() % 2 == 0, "blocks", || {
        "expected (src, rows) pairs".into()
    })?;
    let block_rows: i64 = blocks.chunks_exact(2).map(|p| p[1]).sum();
    ensure(block_rows == n_rows as i64, "blocks", || {
        format!("blocks hold {block_rows} rows, the buffer {n_rows}")
    })?;
    let mut cursor = vec![0usize; l_n * w_n];
    let mut acc = 0usize;
    for (c, &e) in cursor.iter_mut().zip(expected) {
        *c = acc;
        acc += e as usize;
    }
    let ends: Vec<usize> = cursor
        .iter()
        .zip(expected)
        .map(|(c, &e)| c + e as usize)
        .collect();
    let base = (rank * l_n) as i32;
    let mut r = 0usize;
    for pair in blocks.chunks_exact(2) {
        let (src, n) = (pair[0], pair[1]);
        ensure(src >= 0 && (src as usize) < w_n && n >= 0, "blocks", || {
            format!("bad block ({src}, {n})")
        })?;
        for _ in 0..n {
            for (j, id) in ids_of(buf, stride, ids_off, count, r).enumerate() {
                if id < base || id >= base + l_n as i32 {
                    continue;
                }
                let c = (id - base) as usize * w_n + src as usize;
                if cursor[c] == ends[c] {
                    return Err(invalid(
                        "counts",
                        format!(
                            "slot {} of rank {rank} gets more rows from rank {src} than planned",
                            id - base
                        ),
                    ));
                }
                out_rows[cursor[c]] = r as i64;
                out_entries[cursor[c]] = j as i64;
                cursor[c] += 1;
            }
            r += 1;
        }
    }
    ensure(cursor == ends, "counts", || {
        format!("rank {rank} received other row counts than planned")
    })
}

/// The first step of the copy strategies (`flat`, `2dh`): one row per (token, slot), grouped
/// by slot in the send order and ascending by token inside a slot (Megatron's `permute`).
/// `order[s]` is slot `s`'s position in the send order (`None`: slot order). Writes the token
/// (`rows_token`) and the entry `t * width + j` (`rows_entry`) of each row and the rows per
/// slot in slot order (`counts [R]`).
///
/// Every dispatch builds it. With a small pool (fewer than `POOL_THREADS` threads) a counting
/// sort on the calling thread: there, handing one rank's tokens (tens of thousands of entries)
/// to the pool and materialising an entry-index array cost more than the sort (2x at T=4096,
/// top-8 on one thread; even on two). With more threads, Megatron's permute layout on the pool
/// (`permute_layout`, the entry index as its probabilities), as before. The tests check the two
/// against each other.
#[allow(clippy::too_many_arguments)]
pub fn copy_layout(
    slots: &[i64],
    num_tokens: usize,
    width: usize,
    num_slots: usize,
    order: Option<&[i64]>,
    rows_token: &mut [i64],
    rows_entry: &mut [i64],
    counts: &mut [i64],
) -> Result<()> {
    ensure(
        num_tokens.checked_mul(width) == Some(slots.len()),
        "slots",
        || {
            format!(
                "expected [{num_tokens}, {width}], got {} values",
                slots.len()
            )
        },
    )?;
    ensure(
        counts.len() == num_slots && rows_entry.len() == rows_token.len(),
        "counts",
        || format!("expected {num_slots} counts and one entry a row"),
    )?;
    if let Some(o) = order {
        ensure(o.len() == num_slots, "order", || {
            format!("expected a position for each of the {num_slots} slots")
        })?;
        let mut seen = vec![false; num_slots];
        for &p in o {
            ensure(
                p >= 0 && (p as usize) < num_slots && !seen[p as usize],
                "order",
                || "must be a permutation of the slots".into(),
            )?;
            seen[p as usize] = true;
        }
    }
    if pool::num_threads() >= POOL_THREADS && slots.len() >= POOL_ENTRIES {
        return permuted_copy_layout(
            slots, num_tokens, width, num_slots, order, rows_token, rows_entry, counts,
        );
    }
    // Each slot's position in the send order (one load instead of a branch per entry).
    let pos_of: Vec<usize> = match order {
        Some(o) => o.iter().map(|&p| p as usize).collect(),
        None => (0..num_slots).collect(),
    };
    // Rows per slot position in the send order, every id checked before anything is written.
    // (`width` 0 has no slots: `max(1)` only keeps `chunks_exact` valid.)
    let mut start = vec![0usize; num_slots + 1];
    // The last token that listed each slot (1-based; 0: none): a repeat within a row is found
    // in one comparison.
    let mut last = vec![0usize; num_slots];
    for (t, row) in slots.chunks_exact(width.max(1)).enumerate() {
        for (j, &s) in row.iter().enumerate() {
            if s == -1 {
                continue;
            }
            let Some(l) = usize::try_from(s).ok().and_then(|i| last.get_mut(i)) else {
                return Err(invalid(
                    "slots",
                    format!("token {t}, entry {j}: slot {s} is outside [0, {num_slots}) (-1 marks an empty entry)"),
                ));
            };
            if *l == t + 1 {
                return Err(invalid("slots", format!("token {t} lists slot {s} twice")));
            }
            *l = t + 1;
            start[pos_of[s as usize] + 1] += 1;
        }
    }
    for p in 0..num_slots {
        start[p + 1] += start[p];
    }
    ensure(start[num_slots] == rows_token.len(), "slots", || {
        format!(
            "select {} rows, but {} were planned for them",
            start[num_slots],
            rows_token.len()
        )
    })?;
    for (c, &p) in counts.iter_mut().zip(&pos_of) {
        *c = (start[p + 1] - start[p]) as i64;
    }
    // Tokens ascending, so each slot's rows come out ascending by token. Every row index is
    // below `start[p + 1] <= rows_token.len()`: the slots counted above are the ones placed.
    let mut next = start;
    for (t, row) in slots.chunks_exact(width.max(1)).enumerate() {
        for (j, &s) in row.iter().enumerate() {
            if s >= 0 {
                let c = &mut next[pos_of[s as usize]];
                rows_token[*c] = t as i64;
                rows_entry[*c] = (t * width + j) as i64;
                *c += 1;
            }
        }
    }
    Ok(())
}

/// From this many pool threads (and `POOL_ENTRIES` entries) `copy_layout` runs on the pool.
const POOL_THREADS: usize = 4;
const POOL_ENTRIES: usize = 1 << 14;

/// `copy_layout` on the pool: `permute_layout` of the slots at their send positions, each row's
/// entry index carried as its probability. Slot ids are checked by `permute_layout` (range,
/// repeats within a row) before it writes.
#[allow(clippy::too_many_arguments)]
fn permuted_copy_layout(
    slots: &[i64],
    num_tokens: usize,
    width: usize,
    num_slots: usize,
    order: Option<&[i64]>,
    rows_token: &mut [i64],
    rows_entry: &mut [i64],
    counts: &mut [i64],
) -> Result<()> {
    let remapped;
    let ids: &[i64] = match order {
        Some(o) => {
            remapped = slots
                .iter()
                .map(|&s| {
                    if s >= 0 && (s as usize) < num_slots {
                        o[s as usize]
                    } else {
                        s
                    }
                })
                .collect::<Vec<i64>>();
            &remapped
        }
        None => slots,
    };
    let entry: Vec<i64> = (0..slots.len() as i64).collect();
    let a = ExpertIndices {
        indices: ids,
        num_tokens,
        topk: width,
        num_experts: num_slots,
    };
    let mut by_pos = vec![0i64; num_slots];
    permute_layout(
        &a,
        1,
        Some(&entry),
        rows_token,
        Some(rows_entry),
        &mut by_pos,
    )?;
    for (s, c) in counts.iter_mut().enumerate() {
        *c = by_pos[order.map_or(s, |o| o[s] as usize)];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ep::dispatch_layout::tests::{random_slots, Lcg};

    #[test]
    fn block_order_transposes() {
        // 2 x 3 blocks of sizes [[1, 0, 2], [3, 1, 1]]: rows 0 | - | 1 2 | 3 4 5 | 6 | 7.
        let mut out = vec![0; 8];
        block_order(&[1, 0, 2, 3, 1, 1], 2, 3, &mut out).unwrap();
        assert_eq!(out, vec![0, 3, 4, 5, 6, 1, 2, 7]);
    }

    fn id_rows(rows: &[Vec<i32>], count: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for r in rows {
            let mut v = r.clone();
            v.resize(count, -1);
            b.extend_from_slice(&[0u8; 4]);
            b.extend(v.iter().flat_map(|x| x.to_ne_bytes()));
        }
        b
    }

    #[test]
    fn forward_and_expand() {
        // 2 nodes x 2 ranks x 2 slots: node 1 holds slots 4..8 (rank 2: 4, 5; rank 3: 6, 7).
        let topo = EpGroup::new(4, 2, 2).unwrap();
        let rows = vec![vec![5, 6], vec![0, 7], vec![4, 5], vec![1, 2]];
        let buf = id_rows(&rows, 3);
        let stride = 4 + 12;
        let mut out = vec![0; 4];
        forward_index(&buf, stride, 4, 3, &topo, 1, &[2, 2], &mut out).unwrap();
        assert_eq!(out, vec![0, 2, 0, 1]);
        assert!(forward_index(&buf, stride, 4, 3, &topo, 1, &[1, 3], &mut out).is_err());
        // Rank 2 receives rows 0, 2 (say from rank 0, then rank 1).
        let buf2 = id_rows(&[rows[0].clone(), rows[2].clone()], 3);
        // expected [L=2, W=4]: slot 4 gets 1 row from rank 1; slot 5 one from rank 0, one from 1.
        let expected = [0, 1, 0, 0, 1, 1, 0, 0];
        let (mut r, mut e) = (vec![0; 3], vec![0; 3]);
        expand_index(
            &buf2,
            stride,
            4,
            3,
            &[0, 1, 1, 1],
            &topo,
            2,
            &expected,
            &mut r,
            &mut e,
        )
        .unwrap();
        assert_eq!(r, vec![1, 0, 1]);
        assert_eq!(e, vec![0, 0, 1]);
    }

    /// The reference: Megatron's permute layout (`permute_layout`, checked against Megatron's
    /// own `permute` in the ops tests) of the slots at their send positions, each row's entry
    /// index carried as its "probability" (what `copy_layout` runs on a large pool).
    fn copy_layout_by_permute(
        slots: &[i64],
        width: usize,
        num_slots: usize,
        order: Option<&[i64]>,
    ) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let n = slots.iter().filter(|&&s| s >= 0).count();
        let (mut t, mut e, mut c) = (vec![0; n], vec![0; n], vec![0; num_slots]);
        let t_n = slots.len() / width;
        permuted_copy_layout(slots, t_n, width, num_slots, order, &mut t, &mut e, &mut c).unwrap();
        (t, e, c)
    }

    #[test]
    fn copy_layout_matches_megatrons_permute() {
        let mut g = Lcg(12345);
        for case in 0..40 {
            let (t_n, k, r_n) = (1 + g.below(300), 1 + g.below(8), 8 + g.below(60));
            let k = k.min(r_n);
            let slots = random_slots(t_n, k, r_n, case as u64);
            let perm: Vec<i64> = {
                let mut p: Vec<i64> = (0..r_n as i64).collect();
                for i in (1..r_n).rev() {
                    p.swap(i, g.below(i + 1));
                }
                p
            };
            for order in [None, Some(&perm[..])] {
                let (want_t, want_e, want_c) = copy_layout_by_permute(&slots, k, r_n, order);
                let n = want_t.len();
                let (mut t, mut e, mut c) = (vec![-7; n], vec![-7; n], vec![-7; r_n]);
                copy_layout(&slots, t_n, k, r_n, order, &mut t, &mut e, &mut c).unwrap();
                assert_eq!(
                    (t, e, c),
                    (want_t, want_e, want_c),
                    "case {case}, order {order:?}"
                );
            }
        }
    }

    #[test]
    fn copy_layout_on_a_large_pool_is_the_same() {
        // Above POOL_ENTRIES: 9000 tokens x 8, some entries empty, with and without a send order.
        let (t_n, k, r_n) = (9000usize, 8usize, 64usize);
        let mut slots = random_slots(t_n, k, r_n, 99);
        let order: Vec<i64> = (0..r_n as i64).map(|s| (s * 5) % r_n as i64).collect();
        let n = slots.iter().filter(|&&s| s >= 0).count();
        for o in [None, Some(&order[..])] {
            let mut got = Vec::new();
            for threads in [POOL_THREADS, 1] {
                crate::util::pool::set_num_threads(threads).unwrap();
                let (mut t, mut e, mut c) = (vec![-7; n], vec![-7; n], vec![-7; r_n]);
                copy_layout(&slots, t_n, k, r_n, o, &mut t, &mut e, &mut c).unwrap();
                got.push((t, e, c));
            }
            assert_eq!(got[0], got[1], "order {o:?}");
            assert_eq!(got[1], copy_layout_by_permute(&slots, k, r_n, o));
        }
        // The pool path refuses a bad id before writing, too.
        crate::util::pool::set_num_threads(POOL_THREADS).unwrap();
        slots[8000 * k + 2] = r_n as i64;
        let (mut t, mut e, mut c) = (vec![-7; n], vec![-7; n], vec![-7; r_n]);
        assert!(copy_layout(&slots, t_n, k, r_n, None, &mut t, &mut e, &mut c).is_err());
        assert!(t.iter().chain(&e).chain(&c).all(|&v| v == -7));
        crate::util::pool::set_num_threads(1).unwrap();
    }

    #[test]
    fn copy_layout_refuses_bad_slots_and_sizes() {
        let (mut t, mut e, mut c) = (vec![0; 3], vec![0; 3], vec![0; 4]);
        let err = |slots: &[i64], t: &mut [i64], e: &mut [i64], c: &mut [i64]| {
            copy_layout(slots, 2, 2, 4, None, t, e, c)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[0, 4, 1, 2], &mut t, &mut e, &mut c).contains("slot 4 is outside [0, 4)"));
        assert!(err(&[0, -2, 1, 2], &mut t, &mut e, &mut c).contains("slot -2"));
        assert!(err(&[1, 1, 0, 2], &mut t, &mut e, &mut c).contains("token 0 lists slot 1 twice"));
        // Four rows selected, three given: nothing written past the end.
        assert!(err(&[0, 1, 2, 3], &mut t, &mut e, &mut c)
            .contains("select 4 rows, but 3 were planned"));
        assert_eq!(t, vec![0; 3]);
        let bad_order = copy_layout(
            &[0, 1, 2, -1],
            2,
            2,
            4,
            Some(&[0, 0, 1, 2]),
            &mut t,
            &mut e,
            &mut c,
        );
        assert!(bad_order.unwrap_err().to_string().contains("permutation"));
    }

    #[test]
    fn copy_layout_is_permute() {
        // 3 tokens x 2 entries over 4 slots.
        let slots = [2, 0, -1, 2, 3, 0];
        let (mut t, mut e, mut c) = (vec![0; 5], vec![0; 5], vec![0; 4]);
        copy_layout(&slots, 3, 2, 4, None, &mut t, &mut e, &mut c).unwrap();
        assert_eq!(t, vec![0, 2, 0, 1, 2]);
        assert_eq!(e, vec![1, 5, 0, 3, 4]);
        assert_eq!(c, vec![2, 0, 2, 1]);
        // Send order 3, 2, 1, 0 (order[s] = position of slot s).
        copy_layout(&slots, 3, 2, 4, Some(&[3, 2, 1, 0]), &mut t, &mut e, &mut c).unwrap();
        assert_eq!(t, vec![2, 0, 1, 0, 2]);
        assert_eq!(c, vec![2, 0, 2, 1]);
    }
}
