//! The launch sequences of each op: argument checks, launch shapes, workspace layout. Every
//! function takes device pointers (`u64`, 0 for an absent optional) of memory the caller
//! allocated — outputs and workspaces — and enqueues kernels on the caller's stream; none waits
//! for the device.
//!
//! # Safety
//! Every `unsafe fn` here requires: the pointers are valid device memory (host memory for the
//! emulator) of the sizes the shapes imply, outputs do not overlap inputs, the workspace has at
//! least the bytes its `*_workspace_bytes` function returns, and everything stays alive until
//! the stream reaches the launches (torch's caching allocator guarantees it for tensors freed
//! after the call on the same stream).

// The contract above is every function's `# Safety` section.
#![allow(clippy::missing_safety_doc)]

use moerail_core::ops::router::{RouterConfig, ScoreFunction};

use super::backend::{Args, Backend, LaunchCfg};
use super::{DType, DeviceProps};
use crate::error::{invalid, Result};

/// Where launches go: a backend, a device and a stream.
pub struct Stream<'a> {
    pub backend: &'a dyn Backend,
    pub device: i32,
    pub stream: u64,
}

impl Stream<'_> {
    unsafe fn launch(
        &self,
        kernel: &str,
        grid: u64,
        block: u32,
        smem: u32,
        args: &mut Args,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        let cfg = LaunchCfg {
            grid: grid.min(i32::MAX as u64) as u32,
            block,
            smem,
        };
        // SAFETY: forwarded (see the module docs).
        unsafe {
            self.backend
                .launch(self.device, self.stream, kernel, cfg, args)
        }
    }

    fn props(&self) -> Result<DeviceProps> {
        self.backend.props(self.device)
    }
}

fn round16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

fn threads_for(work: u64) -> u32 {
    (work.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// Blocks for `n` items of `per_block`, at most `cap`.
fn blocks(n: u64, per_block: u64, cap: u64) -> u64 {
    n.div_ceil(per_block.max(1)).min(cap)
}

const MAX_GRID: u64 = 1 << 20;
const SCAN_THREADS: u32 = 1024;

fn score_code(f: ScoreFunction) -> i32 {
    match f {
        ScoreFunction::Softmax => 0,
        ScoreFunction::Sigmoid => 1,
        ScoreFunction::SqrtSoftplus => 2,
    }
}

/// Warps per block and dynamic shared memory for the one-warp-per-token kernels.
fn warp_layout(p: &DeviceProps, warp_bytes: usize, num_experts: usize) -> Result<(u32, u32)> {
    let default = p.smem_per_block.max(0) as usize;
    let wpb = (default / warp_bytes.max(1)).min(8);
    if wpb >= 1 {
        return Ok((wpb as u32, (wpb * warp_bytes) as u32));
    }
    if warp_bytes <= p.smem_per_block_optin.max(0) as usize {
        return Ok((1, warp_bytes as u32));
    }
    Err(invalid(
        "logits",
        format!(
            "num_experts={num_experts} needs {warp_bytes} bytes of shared memory per token, more \
             than this GPU's {} per block",
            p.smem_per_block_optin
        ),
    ))
}

fn token_grid(p: &DeviceProps, tokens: usize, wpb: u32) -> u64 {
    blocks(tokens as u64, wpb as u64, (p.sm_count.max(1) as u64) * 32)
}

/// Router forward outputs (`tpe` must be zeroed; `dense`/`rmap`/`status` optional).
pub struct RouterFwd {
    pub logits: u64,
    pub bias: u64,
    pub probs_k: u64,
    pub indices: u64,
    pub tpe: u64,
    pub dense: u64,
    pub rmap: u64,
    pub status: u64,
}

/// Top-k routing of `logits [t, e]`: probs/indices `[t, k]`, tokens per expert, and optionally
/// the dense probs and routing map `[t, e]`.
pub unsafe fn router_forward(
    s: &Stream,
    dt: DType,
    t: usize,
    e: usize,
    cfg: &RouterConfig,
    a: &RouterFwd,
) -> Result<()> {
    cfg.validate(e, a.bias != 0)?;
    if t == 0 {
        return Ok(());
    }
    let k = cfg.topk;
    let (g, gk) = match (cfg.num_groups, cfg.group_topk) {
        (Some(g), Some(gk)) => (g, gk),
        _ => (0, 0),
    };
    let acc = dt.acc_size();
    let wb = round16(acc * (3 * e + g + 2 * k) + 4 * k + e + g);
    let p = s.props()?;
    let (wpb, smem) = warp_layout(&p, wb, e)?;
    let scale = cfg
        .scaling_factor
        .filter(|&v| v != 0.0)
        .map_or(0.0, |v| v as f32);
    let mut args = Args::new();
    args.ptr(a.logits)
        .ptr(a.bias)
        .i64(t as i64)
        .i32(e as i32)
        .i32(k as i32)
        .i32(score_code(cfg.score_function))
        .i32(cfg.use_pre_softmax as i32)
        .i32(g as i32)
        .i32(gk as i32)
        .f32(scale)
        .ptr(a.probs_k)
        .ptr(a.indices)
        .ptr(a.tpe)
        .ptr(a.dense)
        .ptr(a.rmap)
        .ptr(a.status)
        .i32(wb as i32);
    let name = format!("moerail_router_fwd_{}", dt.suffix());
    unsafe { s.launch(&name, token_grid(&p, t, wpb), wpb * 32, smem, &mut args) }
}

/// Router backward: `grad_logits [t, e]` from the probs' gradient (`[t, e]` if `grad_dense`,
/// else `[t, k]`) and the selection `indices [t, k]`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn router_backward(
    s: &Stream,
    dt: DType,
    t: usize,
    e: usize,
    cfg: &RouterConfig,
    grad: u64,
    grad_dense: bool,
    logits: u64,
    indices: u64,
    grad_logits: u64,
    status: u64,
) -> Result<()> {
    let k = cfg.topk;
    if k < 1 || k > e {
        return Err(invalid("topk", format!("must be in [1, {e}], got {k}")));
    }
    if t == 0 {
        return Ok(());
    }
    let full = cfg.use_pre_softmax && cfg.score_function == ScoreFunction::Softmax;
    let wb = round16(dt.acc_size() * (4 * k + if full { 2 * e } else { 0 }) + 4 * k);
    let p = s.props()?;
    let (wpb, smem) = warp_layout(&p, wb, e)?;
    let scale = cfg
        .scaling_factor
        .filter(|&v| v != 0.0)
        .map_or(0.0, |v| v as f32);
    let mut args = Args::new();
    args.ptr(grad)
        .i32(grad_dense as i32)
        .ptr(logits)
        .ptr(indices)
        .i64(t as i64)
        .i32(e as i32)
        .i32(k as i32)
        .i32(score_code(cfg.score_function))
        .i32(cfg.use_pre_softmax as i32)
        .f32(scale)
        .ptr(grad_logits)
        .ptr(status)
        .i32(wb as i32);
    let name = format!("moerail_router_bwd_{}", dt.suffix());
    unsafe { s.launch(&name, token_grid(&p, t, wpb), wpb * 32, smem, &mut args) }
}

/// Megatron's routing scores for the aux loss: `scores [t, e]` (accumulation type), the top-k
/// map and tokens per expert (zeroed).
#[allow(clippy::too_many_arguments)]
pub unsafe fn aux_scores_forward(
    s: &Stream,
    dt: DType,
    t: usize,
    e: usize,
    topk: usize,
    f: ScoreFunction,
    logits: u64,
    scores: u64,
    rmap: u64,
    tpe: u64,
    status: u64,
) -> Result<()> {
    if e == 0 || topk < 1 || topk > e {
        return Err(invalid(
            "topk",
            format!("must be in [1, num_experts={e}], got {topk}"),
        ));
    }
    if t == 0 {
        return Ok(());
    }
    let wb = round16(dt.acc_size() * 2 * e + 4 * topk + e);
    let p = s.props()?;
    let (wpb, smem) = warp_layout(&p, wb, e)?;
    let mut args = Args::new();
    args.ptr(logits)
        .i64(t as i64)
        .i32(e as i32)
        .i32(topk as i32)
        .i32(score_code(f))
        .ptr(scores)
        .ptr(rmap)
        .ptr(tpe)
        .ptr(status)
        .i32(wb as i32);
    let name = format!("moerail_aux_scores_fwd_{}", dt.suffix());
    unsafe { s.launch(&name, token_grid(&p, t, wpb), wpb * 32, smem, &mut args) }
}

/// Backward of [`aux_scores_forward`]: `grad_logits` from `grad_scores` (accumulation type).
#[allow(clippy::too_many_arguments)]
pub unsafe fn aux_scores_backward(
    s: &Stream,
    dt: DType,
    t: usize,
    e: usize,
    f: ScoreFunction,
    grad_scores: u64,
    logits: u64,
    grad_logits: u64,
) -> Result<()> {
    if t == 0 || e == 0 {
        return Ok(());
    }
    let wb = round16(dt.acc_size() * 2 * e);
    let p = s.props()?;
    let (wpb, smem) = warp_layout(&p, wb, e)?;
    let mut args = Args::new();
    args.ptr(grad_scores)
        .ptr(logits)
        .i64(t as i64)
        .i32(e as i32)
        .i32(score_code(f))
        .ptr(grad_logits)
        .i32(wb as i32);
    let name = format!("moerail_aux_scores_bwd_{}", dt.suffix());
    unsafe { s.launch(&name, token_grid(&p, t, wpb), wpb * 32, smem, &mut args) }
}

// ------------------------------------------------------------------------------------------
// Permutation layout
// ------------------------------------------------------------------------------------------

/// Token assignments: a routing map `bool [t, e]` or top-k indices `int64 [t, k]`.
#[derive(Clone, Copy, Debug)]
pub enum Assign {
    Map { map: u64 },
    Indices { idx: u64, k: usize },
}

/// Tokens per layout block: at most 1024 blocks, so the scan's per-expert loop stays short.
pub fn layout_tokens_per_block(t: usize) -> usize {
    t.div_ceil(1024).max(64)
}

fn layout_blocks(t: usize) -> usize {
    t.div_ceil(layout_tokens_per_block(t))
}

/// Workspace of a layout: block cursors `[nb, e]`, totals `[e]`, expert starts `[e + 1]` (i64).
pub fn layout_workspace_bytes(t: usize, e: usize) -> usize {
    8 * (layout_blocks(t) * e + e + e + 1)
}

struct LayoutWs {
    bc: u64,
    totals: u64,
    start: u64,
}

fn layout_ws(ws: u64, t: usize, e: usize) -> LayoutWs {
    let nb = layout_blocks(t) as u64;
    let e = e as u64;
    LayoutWs {
        bc: ws,
        totals: ws + 8 * nb * e,
        start: ws + 8 * (nb * e + e),
    }
}

/// First phase of a (dropless) permutation: counts, `row_counts [e]` (padded to `align`) and
/// `meta[0]` = the number of rows, on the device. `status` (int32, zeroed) collects bad ids of
/// the index form.
#[allow(clippy::too_many_arguments)]
pub unsafe fn layout_count(
    s: &Stream,
    a: Assign,
    t: usize,
    e: usize,
    align: usize,
    ws: u64,
    row_counts: u64,
    meta: u64,
    status: u64,
) -> Result<()> {
    if e == 0 {
        return Err(invalid(
            "routing_map",
            "expected at least one expert column",
        ));
    }
    let tb = layout_tokens_per_block(t);
    let nb = layout_blocks(t) as u64;
    let w = layout_ws(ws, t, e);
    let threads = threads_for(e as u64);
    let mut args = Args::new();
    let kernel = match a {
        Assign::Map { map } => {
            args.ptr(map)
                .i64(t as i64)
                .i32(e as i32)
                .i64(tb as i64)
                .ptr(w.bc);
            "moerail_layout_count_map"
        }
        Assign::Indices { idx, k } => {
            args.ptr(idx)
                .i64(t as i64)
                .i32(k as i32)
                .i32(e as i32)
                .i64(tb as i64)
                .ptr(w.bc)
                .ptr(status);
            "moerail_layout_count_idx"
        }
    };
    unsafe { s.launch(kernel, nb, threads, 0, &mut args)? };
    let mut args = Args::new();
    args.ptr(w.bc)
        .i64(nb as i64)
        .i32(e as i32)
        .i64(align.max(1) as i64)
        .ptr(w.totals)
        .ptr(row_counts)
        .ptr(w.start)
        .ptr(meta);
    unsafe { s.launch("moerail_layout_scan", 1, 256, 256 * 8, &mut args) }
}

/// Second phase: `sorted_indices [n_rows]` and, if `probs != 0`, the permuted probs (`pbytes`
/// wide elements; probs are `[t, e]` for a map, `[t, k]` for indices).
#[allow(clippy::too_many_arguments)]
pub unsafe fn layout_fill(
    s: &Stream,
    a: Assign,
    t: usize,
    e: usize,
    ws: u64,
    probs: u64,
    pbytes: usize,
    n_rows: usize,
    sorted_indices: u64,
    permuted_probs: u64,
) -> Result<()> {
    let tb = layout_tokens_per_block(t);
    let nb = layout_blocks(t) as u64;
    let w = layout_ws(ws, t, e);
    let (probs, pp, pbytes) = if probs != 0 && permuted_probs != 0 {
        (probs, permuted_probs, pbytes as i32)
    } else {
        (0, 0, 0)
    };
    let mut args = Args::new();
    let kernel = match a {
        Assign::Map { map } => {
            args.ptr(map)
                .ptr(probs)
                .i32(pbytes)
                .i64(t as i64)
                .i32(e as i32);
            "moerail_layout_fill_map"
        }
        Assign::Indices { idx, k } => {
            args.ptr(idx)
                .ptr(probs)
                .i32(pbytes)
                .i64(t as i64)
                .i32(k as i32)
                .i32(e as i32);
            "moerail_layout_fill_idx"
        }
    };
    args.i64(tb as i64)
        .ptr(w.bc)
        .ptr(w.totals)
        .ptr(w.start)
        .i64(n_rows as i64)
        .ptr(sorted_indices)
        .ptr(pp);
    // With no token blocks there is nothing to place (and no rows: n_rows <= t * e = 0).
    unsafe { s.launch(kernel, nb, threads_for(e as u64), 0, &mut args) }
}

/// Megatron's drop-and-pad layout from a routing map: `capacity` rows per expert.
#[allow(clippy::too_many_arguments)]
pub unsafe fn layout_drop_and_pad(
    s: &Stream,
    map: u64,
    t: usize,
    e: usize,
    capacity: usize,
    probs: u64,
    pbytes: usize,
    sorted_indices: u64,
    permuted_probs: u64,
) -> Result<()> {
    if capacity > t {
        return Err(invalid(
            "num_out_tokens",
            format!("capacity = num_out_tokens // num_experts = {capacity} exceeds num_tokens={t}"),
        ));
    }
    let (probs, pp, pbytes) = if probs != 0 && permuted_probs != 0 {
        (probs, permuted_probs, pbytes as i32)
    } else {
        (0, 0, 0)
    };
    let mut args = Args::new();
    args.ptr(map)
        .ptr(probs)
        .i32(pbytes)
        .i64(t as i64)
        .i32(e as i32)
        .i64(capacity as i64)
        .ptr(sorted_indices)
        .ptr(pp);
    let grid = if capacity == 0 {
        0
    } else {
        (e as u64).min(65535)
    };
    unsafe { s.launch("moerail_layout_drop_pad", grid, 256, 0, &mut args) }
}

/// The widest word (16, 8, 4, 2, 1 bytes) dividing the row size and every pointer.
fn word(row_bytes: usize, ptrs: &[u64]) -> usize {
    for w in [16usize, 8, 4, 2] {
        if row_bytes % w == 0 && ptrs.iter().all(|p| *p % w as u64 == 0) {
            return w;
        }
    }
    1
}

/// `out[r] = src[sorted_indices[r]]` for rows of `row_bytes` (zeros for -1): bit-exact.
pub unsafe fn gather_rows(
    s: &Stream,
    src: u64,
    n_src: usize,
    row_bytes: usize,
    sorted_indices: u64,
    n_rows: usize,
    out: u64,
) -> Result<()> {
    if row_bytes == 0 || n_rows == 0 {
        return Ok(());
    }
    let w = word(row_bytes, &[src, out]);
    let vecs = (row_bytes / w) as u64;
    let mut args = Args::new();
    args.ptr(src)
        .ptr(sorted_indices)
        .i64(n_rows as i64)
        .i64(vecs as i64)
        .i64(n_src as i64)
        .ptr(out);
    let name = format!("moerail_gather_rows_{w}");
    unsafe {
        s.launch(
            &name,
            (n_rows as u64).min(MAX_GRID),
            threads_for(vecs),
            0,
            &mut args,
        )
    }
}

// ------------------------------------------------------------------------------------------
// Unpermute
// ------------------------------------------------------------------------------------------

/// Workspace of an unpermute: CSR starts `[t + 1]` (i64), counts and cursors `[t]` (i32 each),
/// rows `[n_rows]` (i32).
pub fn unpermute_workspace_bytes(t: usize, n_rows: usize) -> usize {
    8 * (t + 1) + 4 * (2 * t + n_rows)
}

/// The rows of each token in ascending order (a CSR in the workspace), built on the device.
unsafe fn token_rows(s: &Stream, si: u64, n_rows: usize, t: usize, ws: u64) -> Result<(u64, u64)> {
    if n_rows > i32::MAX as usize {
        return Err(invalid(
            "sorted_indices",
            format!("{n_rows} rows exceed the 2^31 rows a CUDA unpermute can address"),
        ));
    }
    let start = ws;
    let cnt = ws + 8 * (t as u64 + 1);
    let cur = cnt + 4 * t as u64;
    let rows = cur + 4 * t as u64;
    let n2 = 2 * t as u64;
    let mut a = Args::new();
    a.ptr(cnt).i64(n2 as i64).u32(0);
    unsafe { s.launch("moerail_fill_u32", blocks(n2, 256, 4096), 256, 0, &mut a)? };
    let rgrid = blocks(n_rows as u64, 256, 65535);
    let mut a = Args::new();
    a.ptr(si).i64(n_rows as i64).i64(t as i64).ptr(cnt);
    unsafe { s.launch("moerail_csr_count", rgrid, 256, 0, &mut a)? };
    let mut a = Args::new();
    a.ptr(cnt).i64(t as i64).ptr(start);
    unsafe {
        s.launch(
            "moerail_csr_scan",
            1,
            SCAN_THREADS,
            SCAN_THREADS * 8,
            &mut a,
        )?
    };
    let mut a = Args::new();
    a.ptr(si)
        .i64(n_rows as i64)
        .i64(t as i64)
        .ptr(start)
        .ptr(cur)
        .ptr(rows);
    unsafe { s.launch("moerail_csr_fill", rgrid, 256, 0, &mut a)? };
    let mut a = Args::new();
    a.ptr(start).i64(t as i64).ptr(rows);
    unsafe {
        s.launch(
            "moerail_csr_sort",
            blocks(t as u64, 256, 65535),
            256,
            0,
            &mut a,
        )?
    };
    Ok((start, rows))
}

/// `out [t, h]`: each token's rows of `x [n_rows, h]` summed in ascending row order, times the
/// row weights `w [n_rows]` (accumulation type) if given, in f32/f64, rounded once.
#[allow(clippy::too_many_arguments)]
pub unsafe fn unpermute(
    s: &Stream,
    dt: DType,
    x: u64,
    h: usize,
    sorted_indices: u64,
    n_rows: usize,
    weights: u64,
    t: usize,
    out: u64,
    ws: u64,
) -> Result<()> {
    if t == 0 || h == 0 {
        return Ok(());
    }
    let (start, rows) = unsafe { token_rows(s, sorted_indices, n_rows, t, ws)? };
    let vw = 16 / dt.size();
    let wide = h % vw == 0 && x % 16 == 0 && out % 16 == 0;
    let (v, form) = if wide { (vw, "vw") } else { (1, "v1") };
    let chunks = (h / v) as u64;
    let mut a = Args::new();
    a.ptr(x)
        .i64(h as i64)
        .ptr(start)
        .ptr(rows)
        .ptr(weights)
        .i64(t as i64)
        .ptr(out);
    let name = format!("moerail_unpermute_{}_{form}", dt.suffix());
    unsafe {
        s.launch(
            &name,
            (t as u64).min(MAX_GRID),
            threads_for(chunks),
            0,
            &mut a,
        )
    }
}

/// Backward of [`unpermute`]: `grad_x [n_rows, h]` and, when `x != 0`, `grad_w [n_rows]`
/// (accumulation type) in the CPU's dot-product order.
#[allow(clippy::too_many_arguments)]
pub unsafe fn unpermute_backward(
    s: &Stream,
    dt: DType,
    grad_out: u64,
    t: usize,
    x: u64,
    h: usize,
    sorted_indices: u64,
    n_rows: usize,
    weights: u64,
    grad_x: u64,
    grad_w: u64,
) -> Result<()> {
    if n_rows == 0 {
        return Ok(());
    }
    if x != 0 && grad_w != 0 {
        let mut a = Args::new();
        a.ptr(grad_out)
            .ptr(x)
            .i64(h as i64)
            .ptr(sorted_indices)
            .i64(n_rows as i64)
            .i64(t as i64)
            .ptr(weights)
            .ptr(grad_x)
            .ptr(grad_w);
        // Eight warps of four rows per block.
        let name = format!("moerail_unpermute_bwd_gw_{}", dt.suffix());
        return unsafe { s.launch(&name, blocks(n_rows as u64, 32, MAX_GRID), 256, 0, &mut a) };
    }
    if h == 0 {
        return Ok(());
    }
    let vw = 16 / dt.size();
    let wide = h % vw == 0 && grad_out % 16 == 0 && grad_x % 16 == 0;
    let (v, form) = if wide { (vw, "vw") } else { (1, "v1") };
    let chunks = (h / v) as u64;
    let mut a = Args::new();
    a.ptr(grad_out)
        .i64(h as i64)
        .ptr(sorted_indices)
        .i64(n_rows as i64)
        .i64(t as i64)
        .ptr(weights)
        .ptr(grad_x);
    let name = format!("moerail_unpermute_bwd_gx_{}_{form}", dt.suffix());
    unsafe {
        s.launch(
            &name,
            (n_rows as u64).min(MAX_GRID),
            threads_for(chunks),
            0,
            &mut a,
        )
    }
}

// ------------------------------------------------------------------------------------------
// Row weights, scatter, sort_chunks, dispatch layout
// ------------------------------------------------------------------------------------------

/// Workspace of [`row_weights`] / [`scatter_rows`]: the row offsets of each expert.
pub fn offsets_workspace_bytes(e: usize) -> usize {
    8 * (e + 1)
}

unsafe fn expert_offsets(s: &Stream, counts: u64, e: usize, ws: u64) -> Result<u64> {
    let mut a = Args::new();
    a.ptr(counts).i32(e as i32).ptr(ws);
    unsafe { s.launch("moerail_counts_offsets", 1, 256, 256 * 8, &mut a)? };
    Ok(ws)
}

/// `w[r] = probs[sorted_indices[r], expert(r)]` as `w_dt` (F32 or F64), 0 for padding rows;
/// expert(r) from the rows per expert `counts [e]`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn row_weights(
    s: &Stream,
    probs_dt: DType,
    probs: u64,
    t: usize,
    e: usize,
    sorted_indices: u64,
    n_rows: usize,
    counts: u64,
    w_dt: DType,
    w: u64,
    ws: u64,
) -> Result<()> {
    if !matches!(w_dt, DType::F32 | DType::F64) {
        return Err(invalid("weights", "must be float32 or float64"));
    }
    if n_rows == 0 {
        return Ok(());
    }
    let off = unsafe { expert_offsets(s, counts, e, ws)? };
    let mut a = Args::new();
    a.ptr(probs)
        .i64(t as i64)
        .i32(e as i32)
        .ptr(sorted_indices)
        .i64(n_rows as i64)
        .ptr(off)
        .ptr(w);
    let name = format!(
        "moerail_row_weights_{}_{}",
        probs_dt.suffix(),
        w_dt.suffix()
    );
    unsafe { s.launch(&name, blocks(n_rows as u64, 256, 65535), 256, 0, &mut a) }
}

/// `out[sorted_indices[r], expert(r)] = values[r]` (`vbytes` wide) into a zeroed `[t, e]`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn scatter_rows(
    s: &Stream,
    values: u64,
    vbytes: usize,
    sorted_indices: u64,
    n_rows: usize,
    counts: u64,
    t: usize,
    e: usize,
    out: u64,
    ws: u64,
) -> Result<()> {
    if n_rows == 0 {
        return Ok(());
    }
    let off = unsafe { expert_offsets(s, counts, e, ws)? };
    let mut a = Args::new();
    a.ptr(values)
        .i32(vbytes as i32)
        .ptr(sorted_indices)
        .i64(n_rows as i64)
        .ptr(off)
        .i32(e as i32)
        .i64(t as i64)
        .ptr(out);
    unsafe {
        s.launch(
            "moerail_scatter_rows",
            blocks(n_rows as u64, 256, 65535),
            256,
            0,
            &mut a,
        )
    }
}

/// Workspace of [`sort_chunks`]: chunk starts in the input and in the output.
pub fn sort_chunks_workspace_bytes(n_chunks: usize) -> usize {
    16 * (n_chunks + 1)
}

/// Megatron's sort_chunks_by_idxs on rows of `row_bytes`, with `split_sizes` and `sorted_idxs`
/// (int64 `[n_chunks]`) on the device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sort_chunks(
    s: &Stream,
    input: u64,
    n_rows: usize,
    row_bytes: usize,
    split_sizes: u64,
    sorted_idxs: u64,
    n_chunks: usize,
    out: u64,
    ws: u64,
) -> Result<()> {
    if n_rows == 0 || row_bytes == 0 {
        return Ok(());
    }
    if n_chunks > i32::MAX as usize {
        return Err(invalid("split_sizes", "too many chunks"));
    }
    let src_start = ws;
    let dst_start = ws + 8 * (n_chunks as u64 + 1);
    let mut a = Args::new();
    a.ptr(split_sizes)
        .ptr(sorted_idxs)
        .i32(n_chunks as i32)
        .ptr(src_start)
        .ptr(dst_start);
    unsafe {
        s.launch(
            "moerail_chunk_offsets",
            1,
            SCAN_THREADS,
            SCAN_THREADS * 8,
            &mut a,
        )?
    };
    let w = word(row_bytes, &[input, out]);
    let vecs = (row_bytes / w) as u64;
    let mut a = Args::new();
    a.ptr(input)
        .i64(vecs as i64)
        .i64(n_rows as i64)
        .ptr(sorted_idxs)
        .i32(n_chunks as i32)
        .ptr(src_start)
        .ptr(dst_start)
        .ptr(out);
    let name = format!("moerail_sort_chunks_{w}");
    unsafe {
        s.launch(
            &name,
            (n_rows as u64).min(MAX_GRID),
            threads_for(vecs),
            0,
            &mut a,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(smem: i32, optin: i32) -> DeviceProps {
        DeviceProps {
            ordinal: 0,
            name: "x".into(),
            cc: (9, 0),
            sm_count: 132,
            smem_per_block: smem,
            smem_per_block_optin: optin,
            total_mem: 0,
        }
    }

    #[test]
    fn warp_layouts() {
        let p = props(49152, 232448);
        assert_eq!(warp_layout(&p, 3072, 256).unwrap(), (8, 8 * 3072));
        assert_eq!(warp_layout(&p, 20000, 2000).unwrap(), (2, 40000));
        assert_eq!(warp_layout(&p, 100_000, 9000).unwrap(), (1, 100_000));
        let err = warp_layout(&p, 300_000, 30000).unwrap_err().to_string();
        assert!(err.starts_with("logits:"), "{err}");
    }

    #[test]
    fn words_and_layout_blocks() {
        assert_eq!(word(14336, &[0, 256]), 16);
        assert_eq!(word(12, &[0, 8]), 4);
        assert_eq!(word(6, &[2, 4]), 2);
        assert_eq!(word(3, &[0, 0]), 1);
        assert_eq!(layout_tokens_per_block(100), 64);
        assert_eq!(layout_blocks(100), 2);
        assert_eq!(layout_tokens_per_block(1 << 20), 1024);
        assert_eq!(layout_blocks((1 << 20) + 1), 1024);
        assert_eq!(layout_workspace_bytes(100, 4), 8 * (8 + 4 + 5));
    }
}
