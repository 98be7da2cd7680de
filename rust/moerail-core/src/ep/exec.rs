//! The local work of an exchange: rows in and out of byte buffers, the combine's sums, and the
//! indices that order rows between stages.
//!
//! An exchange buffer is `[rows, stride]` bytes ([`super::plan::RowLayout`]). Between stages a
//! rank gathers the rows it forwards ([`gather_bytes`]); the reverse direction sums the rows
//! that came from one row ([`reduce_rows`]: in ascending row order, in `T::Acc`, rounded once,
//! like [`crate::ops::permute::unpermute`]). Everything here is data movement or a deterministic sum:
//! the same bits for any thread count.

use rayon::prelude::*;

use super::EpGroup;
use crate::error::{ensure, invalid, Result};
use crate::ops::permute::{permute_layout, ExpertIndices};
use crate::util::elem::Element;
use crate::util::pool;

/// Rows per parallel task.
const ROWS: usize = 32;

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

fn check_index(idx: &[i64], n: usize, name: &str) -> Result<()> {
    if let Some(&bad) = idx.iter().find(|&&i| i < -1 || i >= n as i64) {
        return Err(invalid(name, format!("row {bad} is outside [-1, {n})")));
    }
    Ok(())
}

/// `dst[r][dst_off..][..len] = src[idx[r]][src_off..][..len]` (`idx = None`: row `r`; `-1`:
/// zeros). Rows are `src_stride` / `dst_stride` bytes.
#[allow(clippy::too_many_arguments)]
pub fn gather_bytes(
    src: &[u8],
    src_stride: usize,
    src_off: usize,
    len: usize,
    idx: Option<&[i64]>,
    dst: &mut [u8],
    dst_stride: usize,
    dst_off: usize,
) -> Result<()> {
    let n_src = rows_of(src, src_stride, "src")?;
    let n_dst = rows_of(dst, dst_stride, "dst")?;
    check_cols(src_off, len, src_stride, "src")?;
    check_cols(dst_off, len, dst_stride, "dst")?;
    match idx {
        Some(i) => {
            ensure(i.len() == n_dst, "idx", || {
                format!(
                    "expected one row index per dst row ({n_dst}), got {}",
                    i.len()
                )
            })?;
            check_index(i, n_src, "idx")?;
        }
        None => ensure(n_src == n_dst, "dst", || {
            format!("expected {n_src} rows (the rows of src), got {n_dst}")
        })?,
    }
    if len == 0 || n_dst == 0 {
        return Ok(());
    }
    let copy = |(b, out): (usize, &mut [u8])| {
        for (i, row) in out.chunks_exact_mut(dst_stride).enumerate() {
            let r = b * ROWS + i;
            let s = idx.map_or(r as i64, |x| x[r]);
            let d = &mut row[dst_off..dst_off + len];
            if s < 0 {
                d.fill(0);
            } else {
                let s = s as usize * src_stride + src_off;
                d.copy_from_slice(&src[s..s + len]);
            }
        }
    };
    if n_dst * len < (1 << 16) {
        dst.chunks_mut(ROWS * dst_stride).enumerate().for_each(copy);
    } else {
        pool::install(|| {
            dst.par_chunks_mut(ROWS * dst_stride)
                .enumerate()
                .for_each(copy)
        });
    }
    Ok(())
}

/// `dst[idx[r]][dst_off..][..len] = src[r][src_off..][..len]` for every `r` with
/// `idx[r] >= 0`; the targets must be distinct. Other dst rows are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn scatter_bytes(
    src: &[u8],
    src_stride: usize,
    src_off: usize,
    len: usize,
    idx: &[i64],
    dst: &mut [u8],
    dst_stride: usize,
    dst_off: usize,
) -> Result<()> {
    let n_src = rows_of(src, src_stride, "src")?;
    let n_dst = rows_of(dst, dst_stride, "dst")?;
    check_cols(src_off, len, src_stride, "src")?;
    check_cols(dst_off, len, dst_stride, "dst")?;
    ensure(idx.len() == n_src, "idx", || {
        format!("expected one target a src row ({n_src}), got {}", idx.len())
    })?;
    check_index(idx, n_dst, "idx")?;
    let mut hit = vec![false; n_dst];
    for (r, &d) in idx.iter().enumerate() {
        if d < 0 {
            continue;
        }
        let d = d as usize;
        if std::mem::replace(&mut hit[d], true) {
            return Err(invalid("idx", format!("row {d} is written twice")));
        }
        let (s, t) = (r * src_stride + src_off, d * dst_stride + dst_off);
        dst[t..t + len].copy_from_slice(&src[s..s + len]);
    }
    Ok(())
}

/// Groups of rows: the rows of each group, ascending (a CSR inverse of `groups`).
struct GroupRows {
    start: Vec<usize>,
    rows: Vec<u32>,
}

fn group_rows(groups: &[i64], num_groups: usize) -> Result<GroupRows> {
    ensure(groups.len() <= u32::MAX as usize, "groups", || {
        "more than 2^32 rows".into()
    })?;
    check_index(groups, num_groups, "groups")?;
    let mut start = vec![0usize; num_groups + 1];
    for &g in groups {
        if g >= 0 {
            start[g as usize + 1] += 1;
        }
    }
    for i in 0..num_groups {
        start[i + 1] += start[i];
    }
    let mut fill = start[..num_groups].to_vec();
    let mut rows = vec![0u32; start[num_groups]];
    for (r, &g) in groups.iter().enumerate() {
        if g >= 0 {
            let f = &mut fill[g as usize];
            rows[*f] = r as u32;
            *f += 1;
        }
    }
    Ok(GroupRows { start, rows })
}

fn typed<T>(bytes: &[u8]) -> &[T] {
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    debug_assert_eq!(bytes.len() % std::mem::size_of::<T>(), 0);
    // SAFETY: callers check alignment and length (`check_typed`); every bit pattern is a valid
    // value of the element types used here (floats, half floats).
    unsafe {
        std::slice::from_raw_parts(
            bytes.as_ptr() as *const T,
            bytes.len() / std::mem::size_of::<T>(),
        )
    }
}

fn typed_mut<T>(bytes: &mut [u8]) -> &mut [T] {
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    // SAFETY: as `typed`.
    unsafe {
        std::slice::from_raw_parts_mut(
            bytes.as_mut_ptr() as *mut T,
            bytes.len() / std::mem::size_of::<T>(),
        )
    }
}

fn check_typed<T>(buf: &[u8], stride: usize, off: usize, name: &str) -> Result<()> {
    let (sz, al) = (std::mem::size_of::<T>(), std::mem::align_of::<T>());
    ensure(
        (buf.as_ptr() as usize + off) % al == 0 && stride % al == 0 && off % al == 0 && sz > 0,
        name,
        || format!("rows of {stride} bytes at offset {off} are not aligned to {al} bytes"),
    )
}

/// The combine's sum: `dst[g][dst_off..] = sum over the rows r of group g (ascending) of
/// src[r][src_off..]`, `width` elements of `T`, accumulated in `T::Acc` and rounded once;
/// `groups[r] = -1` skips a row; a group without rows gets zeros. With `copy_singletons`, a
/// group of one row is copied bit for bit (a reorder, not a sum: `-0.0` stays `-0.0`).
#[allow(clippy::too_many_arguments)]
pub fn reduce_rows<T: Element>(
    src: &[u8],
    src_stride: usize,
    src_off: usize,
    width: usize,
    groups: &[i64],
    dst: &mut [u8],
    dst_stride: usize,
    dst_off: usize,
    copy_singletons: bool,
) -> Result<()> {
    let sz = std::mem::size_of::<T>();
    let len = width * sz;
    let n_src = rows_of(src, src_stride, "src")?;
    let n_dst = rows_of(dst, dst_stride, "dst")?;
    check_cols(src_off, len, src_stride, "src")?;
    check_cols(dst_off, len, dst_stride, "dst")?;
    ensure(groups.len() == n_src, "groups", || {
        format!(
            "expected one group a src row ({n_src}), got {}",
            groups.len()
        )
    })?;
    check_typed::<T>(src, src_stride, src_off, "src")?;
    check_typed::<T>(dst, dst_stride, dst_off, "dst")?;
    if width == 0 || n_dst == 0 {
        return Ok(());
    }
    let gr = group_rows(groups, n_dst)?;
    let row = |r: u32| typed::<T>(&src[r as usize * src_stride + src_off..][..len]);
    let work = |acc: &mut Vec<T::Acc>, (b, out): (usize, &mut [u8])| {
        for (i, d) in out.chunks_exact_mut(dst_stride).enumerate() {
            let g = b * ROWS + i;
            let d = &mut d[dst_off..dst_off + len];
            let rows = &gr.rows[gr.start[g]..gr.start[g + 1]];
            match rows {
                [] => d.fill(0),
                [one] if copy_singletons => {
                    d.copy_from_slice(&src[*one as usize * src_stride + src_off..][..len])
                }
                [first, rest @ ..] => {
                    T::start_sum(acc, row(*first), None);
                    for &r in rest {
                        T::accumulate(acc, row(r));
                    }
                    T::store_row(acc, typed_mut::<T>(d));
                }
            }
        }
    };
    let zero = <T::Acc as num_traits::Zero>::zero();
    if gr.rows.len() * len < (1 << 16) {
        let mut acc = vec![zero; width];
        dst.chunks_mut(ROWS * dst_stride)
            .enumerate()
            .for_each(|x| work(&mut acc, x));
    } else {
        pool::install(|| {
            dst.par_chunks_mut(ROWS * dst_stride)
                .enumerate()
                .for_each_init(|| vec![zero; width], work)
        });
    }
    Ok(())
}

/// `dst[r] = entry entries[r] of row rows[r]` of `src`, where a row holds `count` entries of
/// `elem` bytes at `src_off`.
#[allow(clippy::too_many_arguments)]
pub fn gather_entries(
    src: &[u8],
    src_stride: usize,
    src_off: usize,
    elem: usize,
    count: usize,
    rows: &[i64],
    entries: &[i64],
    dst: &mut [u8],
) -> Result<()> {
    let n_src = rows_of(src, src_stride, "src")?;
    check_cols(src_off, count * elem, src_stride, "src")?;
    ensure(
        rows.len() == entries.len() && dst.len() == rows.len() * elem,
        "dst",
        || format!("expected {} entries of {elem} bytes", rows.len()),
    )?;
    check_index(rows, n_src, "rows")?;
    check_index(entries, count, "entries")?;
    for (i, d) in dst.chunks_exact_mut(elem).enumerate() {
        if rows[i] < 0 || entries[i] < 0 {
            d.fill(0);
            continue;
        }
        let s = rows[i] as usize * src_stride + src_off + entries[i] as usize * elem;
        d.copy_from_slice(&src[s..s + elem]);
    }
    Ok(())
}

/// The reverse of [`gather_entries`]: writes `src[i]` into entry `entries[i]` of row
/// `rows[i]` of `dst`; the targets must be distinct; other entries are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn scatter_entries(
    src: &[u8],
    elem: usize,
    rows: &[i64],
    entries: &[i64],
    count: usize,
    dst: &mut [u8],
    dst_stride: usize,
    dst_off: usize,
) -> Result<()> {
    let n_dst = rows_of(dst, dst_stride, "dst")?;
    check_cols(dst_off, count * elem, dst_stride, "dst")?;
    ensure(
        rows.len() == entries.len() && src.len() == rows.len() * elem,
        "src",
        || format!("expected {} entries of {elem} bytes", rows.len()),
    )?;
    check_index(rows, n_dst, "rows")?;
    check_index(entries, count, "entries")?;
    let mut hit = vec![false; n_dst * count];
    for (i, s) in src.chunks_exact(elem).enumerate() {
        if rows[i] < 0 || entries[i] < 0 {
            continue;
        }
        let (r, e) = (rows[i] as usize, entries[i] as usize);
        if std::mem::replace(&mut hit[r * count + e], true) {
            return Err(invalid(
                "entries",
                format!("row {r}, entry {e} is written twice"),
            ));
        }
        let t = r * dst_stride + dst_off + e * elem;
        dst[t..t + elem].copy_from_slice(s);
    }
    Ok(())
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
    ensure(num_tokens * width == slots.len(), "slots", || {
        format!(
            "expected [{num_tokens}, {width}], got {} values",
            slots.len()
        )
    })?;
    ensure(
        counts.len() == num_slots && rows_entry.len() == rows_token.len(),
        "counts",
        || format!("expected {num_slots} counts and one entry a row"),
    )?;
    let remapped;
    let ids: &[i64] = match order {
        Some(o) => {
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
    let mut in_order = vec![0i64; num_slots];
    permute_layout(
        &a,
        1,
        Some(&entry),
        rows_token,
        Some(rows_entry),
        &mut in_order,
    )?;
    match order {
        Some(o) => {
            for s in 0..num_slots {
                counts[s] = in_order[o[s] as usize];
            }
        }
        None => counts.copy_from_slice(&in_order),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
        // SAFETY: plain data.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
            .to_vec()
    }

    #[test]
    fn gather_and_scatter_bytes() {
        let src: Vec<u8> = (0..40).collect(); // 5 rows of 8
        let mut dst = vec![9u8; 3 * 6];
        gather_bytes(&src, 8, 2, 4, Some(&[4, -1, 0]), &mut dst, 6, 1).unwrap();
        assert_eq!(
            dst,
            vec![9, 34, 35, 36, 37, 9, 9, 0, 0, 0, 0, 9, 9, 2, 3, 4, 5, 9]
        );
        let mut back = vec![7u8; 40];
        scatter_bytes(&dst, 6, 1, 4, &[4, -1, 0], &mut back, 8, 2).unwrap();
        assert_eq!(&back[34..38], &[34, 35, 36, 37]);
        assert_eq!(&back[2..6], &[2, 3, 4, 5]);
        assert!(scatter_bytes(&dst, 6, 1, 4, &[1, 1, 0], &mut back, 8, 2).is_err());
        assert!(gather_bytes(&src, 8, 6, 4, None, &mut [0; 20], 4, 0).is_err());
        assert!(gather_bytes(&src, 8, 0, 4, Some(&[5]), &mut [0; 4], 4, 0).is_err());
        // Large enough for the parallel path.
        let big: Vec<u8> = (0..200_000u32).map(|x| x as u8).collect();
        let idx: Vec<i64> = (0..10_000).rev().collect();
        let mut out = vec![0u8; 10_000 * 20];
        gather_bytes(&big, 20, 0, 20, Some(&idx), &mut out, 20, 0).unwrap();
        assert_eq!(&out[..20], &big[199_980..]);
    }

    #[test]
    fn reduce_rows_sums_in_row_order() {
        // 4 rows of [f32; 2] after 4 bytes of something else (stride 12).
        let vals = [[1.0f32, 2.0], [10.0, 20.0], [100.0, 200.0], [-0.0, 5.0]];
        let mut src = vec![0u8; 48];
        for (r, v) in vals.iter().enumerate() {
            src[r * 12 + 4..r * 12 + 12].copy_from_slice(&bytes_of(v));
        }
        let mut dst = vec![0xffu8; 3 * 8];
        reduce_rows::<f32>(&src, 12, 4, 2, &[2, 0, 2, 1], &mut dst, 8, 0, true).unwrap();
        let got: &[f32] = typed(&dst);
        assert_eq!(got, &[10.0, 20.0, -0.0, 5.0, 101.0, 202.0]);
        assert!(got[2].is_sign_negative(), "a singleton is copied");
        reduce_rows::<f32>(&src, 12, 4, 2, &[2, 0, 2, 1], &mut dst, 8, 0, false).unwrap();
        let got: &[f32] = typed(&dst);
        assert!(got[2].is_sign_positive(), "a sum starts from +0.0");
        // bf16 accumulates in f32 and rounds once.
        use half::bf16;
        let x = [
            bf16::from_f32(1.0),
            bf16::from_f32(1.0 / 512.0),
            bf16::from_f32(1.0 / 512.0),
        ];
        let src = bytes_of(&x);
        let mut dst = vec![0u8; 2];
        reduce_rows::<bf16>(&src, 2, 0, 1, &[0, 0, 0], &mut dst, 2, 0, false).unwrap();
        assert_eq!(typed::<bf16>(&dst)[0], bf16::from_f32(1.0 + 1.0 / 256.0));
        assert!(reduce_rows::<f32>(&src, 2, 0, 1, &[0, 0, 0], &mut dst, 2, 0, false).is_err());
    }

    #[test]
    fn entries_round_trip() {
        let vals: Vec<f64> = (0..12).map(|x| x as f64).collect(); // 3 rows x 4 entries
        let src = bytes_of(&vals);
        let mut out = vec![0u8; 3 * 8];
        gather_entries(&src, 32, 0, 8, 4, &[2, 0, 1], &[3, 1, 0], &mut out).unwrap();
        assert_eq!(typed::<f64>(&out), &[11.0, 1.0, 4.0]);
        let mut back = vec![0u8; 96];
        scatter_entries(&out, 8, &[2, 0, 1], &[3, 1, 0], 4, &mut back, 32, 0).unwrap();
        let b: &[f64] = typed(&back);
        assert_eq!((b[11], b[1], b[4], b[0]), (11.0, 1.0, 4.0, 0.0));
        assert!(scatter_entries(&out, 8, &[2, 2, 1], &[3, 3, 0], 4, &mut back, 32, 0).is_err());
    }

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
            b.extend(bytes_of(&v));
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
