//! The cost model: device primitives (GEMM, attention, memory-bound kernels, collectives),
//! per-layer forward/backward costs, the pipeline schedule and per-device memory.

use crate::error::Result;
use crate::parallel::{RankGenerator, Span};
use crate::sim::config::Stage;
use crate::sim::config::{Dispatcher, Precision, Recompute, RecomputeMethod, SimConfig};
use crate::sim::model::{self, Params};

/// Compute parts of the breakdown.
pub const PARTS: [&str; 8] = [
    "attention",
    "core_attention",
    "dense_mlp",
    "experts",
    "shared_experts",
    "routing",
    "embedding_and_loss",
    "kernel_overhead",
];
pub const ATTN: usize = 0;
pub const CORE: usize = 1;
pub const MLP: usize = 2;
pub const EXPERTS: usize = 3;
pub const SHARED: usize = 4;
pub const ROUTING: usize = 5;
pub const EMBED: usize = 6;
pub const OVERHEAD: usize = 7;

/// Communication kinds of the breakdown.
pub const COMMS: [&str; 6] = ["tp", "cp", "ep", "etp", "pp", "dp"];
pub const TP: usize = 0;
pub const CP: usize = 1;
pub const EP: usize = 2;
pub const ETP: usize = 3;
pub const PP: usize = 4;
pub const DP: usize = 5;

/// Time of one pass (forward, backward or recompute) of some layers for one micro-batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pass {
    pub compute: [f64; PARTS.len()],
    pub comm: [f64; COMMS.len()],
    pub exposed: [f64; COMMS.len()],
}

impl Pass {
    pub fn time(&self) -> f64 {
        self.compute.iter().sum::<f64>() + self.exposed.iter().sum::<f64>()
    }

    fn add(&mut self, o: &Pass, k: f64) {
        for i in 0..PARTS.len() {
            self.compute[i] += k * o.compute[i];
        }
        for i in 0..COMMS.len() {
            self.comm[i] += k * o.comm[i];
            self.exposed[i] += k * o.exposed[i];
        }
    }

    fn c(&mut self, part: usize, t: f64) {
        self.compute[part] += t;
    }

    /// Communication `t` of `kind` of which `exposed` is on the critical path.
    fn x(&mut self, kind: usize, t: f64, exposed: f64) {
        self.comm[kind] += t;
        self.exposed[kind] += exposed.clamp(0.0, t);
    }
}

/// Cost of one layer (or head) for one micro-batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerCost {
    pub fwd: Pass,
    pub bwd: Pass,
    /// Extra forward work done again in the backward pass by activation recomputation.
    pub recompute: Pass,
    /// Activation bytes kept from forward to backward per micro-batch, by part
    /// (attention, mlp) with and without the configured recomputation.
    pub act_attn: f64,
    pub act_mlp: f64,
    pub act_attn_no_recompute: f64,
    pub act_mlp_no_recompute: f64,
    /// Transient bytes alive while the layer runs (dispatch buffers, gradients).
    pub transient: f64,
    /// Extra forward of the whole layer (for full recomputation).
    pub full_fwd: Pass,
    /// Of the attention's kept bytes: those saved inside the QKV projections besides the input
    /// norm's output (MLA's compressed latents and their norms' outputs, GQA's q / k norms),
    /// and the queries, keys and values core attention saves (with MLA, what `mla_up_proj`
    /// drops). What Megatron's `qkv_linear` and `core_attn` offloads move.
    pub qkv_internal_bytes: f64,
    pub qkv_output_bytes: f64,
    /// Forward seconds of the attention module alone (QKV projections, core attention, output
    /// projection and their tensor-parallel communication; not the norm or the residual add): what
    /// replaying the module takes.
    pub attention_forward: f64,
}

/// Everything derived once per configuration.
pub struct Engine<'a> {
    pub cfg: &'a SimConfig,
    pub world: usize,
    pub dp: usize,
    pub edp: usize,
    pub etp: usize,
    pub vpp: usize,
    pub nmb: usize,
    pub sp: bool,
    pub b: f64,
    pub s: f64,
    pub n_full: f64,
    pub n_loc: f64,
    peak_gemm: f64,
    peak16: f64,
    hbm: f64,
    pub spans: Spans,
    pub stages: Vec<Stage>,
}

/// Node spans of the groups the step communicates in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spans {
    pub tp: Span,
    pub cp: Span,
    pub dp_cp: Span,
    pub pp: Span,
    pub ep: Span,
    pub etp: Span,
    pub edp: Span,
}

impl Spans {
    /// The spans of the attention grid `(tp, cp, dp, pp)` and the expert grid `(etp, ep, edp,
    /// pp)` in `order` on nodes of `dpn` devices.
    pub fn compute(dims: [usize; 8], order: &str) -> Result<Self> {
        let [tp, cp, dp, pp, etp, ep, edp, dpn] = dims;
        let attn = RankGenerator::new(tp, 1, dp, pp, cp, order)?;
        let expert = RankGenerator::new(etp, ep, edp, pp, 1, order)?;
        Ok(Spans {
            tp: attn.span("tp", dpn)?,
            cp: attn.span("cp", dpn)?,
            dp_cp: attn.span("dp-cp", dpn)?,
            pp: attn.span("pp", dpn)?,
            ep: expert.span("ep", dpn)?,
            etp: expert.span("tp", dpn)?,
            edp: expert.span("dp", dpn)?,
        })
    }

    /// [`Spans::compute`], remembered per thread: a layout search simulates the same rank grids
    /// under many pipeline splits, micro-batch sizes and recomputations, and on thousands of
    /// devices walking the groups' ranks was most of a simulation's time.
    pub fn cached(dims: [usize; 8], order: &str) -> Result<Self> {
        thread_local! {
            static CACHE: std::cell::RefCell<std::collections::HashMap<([usize; 8], String), Spans>> =
                std::cell::RefCell::new(std::collections::HashMap::new());
        }
        if let Some(s) = CACHE.with(|c| c.borrow().get(&(dims, order.to_string())).copied()) {
            return Ok(s);
        }
        let s = Self::compute(dims, order)?;
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= 4096 {
                c.clear();
            }
            c.insert((dims, order.to_string()), s);
        });
        Ok(s)
    }
}

const BF16: f64 = 2.0;

/// Kernels one forward pass of a block launches in Megatron-Core's eager modules (Transformer
/// Engine layers), approximate counts of their code paths; each costs `kernel_overhead_us`
/// beyond its own work, and the backward pass launches twice as many. With few tokens a
/// micro-batch these gaps are a large share of a fine-grained MoE layer (the host-boundedness
/// the Megatron-Core MoE report, arXiv 2603.07685, names among the costs CUDA graphs remove).
/// Attention with GQA: norm, QKV projection, split, RoPE, flash attention and its layout
/// copies, output projection, bias-dropout-add.
const KERNELS_GQA: f64 = 25.0;
/// Multi-latent attention: the down and up projections, their norms, the split and concat of
/// the RoPE part besides the GQA kernels.
const KERNELS_MLA: f64 = 40.0;
/// Dense MLP (and shared experts): fc1, activation, fc2 and their casts and views.
const KERNELS_MLP: f64 = 10.0;
/// MoE router: logits, score function, (group-limited) top-k, normalisation, the auxiliary
/// and z losses, the routing map.
const KERNELS_ROUTER: f64 = 25.0;
/// Token dispatch preprocessing: per-expert counts and split sizes from the routing map.
const KERNELS_PREPROCESS: f64 = 10.0;
/// Token dispatch and combine: permute, exchange, sort by expert, and back.
const KERNELS_DISPATCH: f64 = 15.0;
/// Grouped expert GEMMs with the activation and probability scaling between them.
const KERNELS_EXPERTS: f64 = 10.0;

impl<'a> Engine<'a> {
    pub fn new(cfg: &'a SimConfig) -> Result<Self> {
        cfg.validate()?;
        let p = &cfg.parallel;
        let t = &cfg.training;
        let world = cfg.world_size()?;
        let etp = p.etp();
        let dp = world / (p.tp * p.cp * p.pp);
        let edp = world / (etp * p.ep * p.pp);
        let vpp = cfg.vpp()?.unwrap_or(1);
        let nmb = t.global_batch_size / (t.micro_batch_size * dp);
        let dpn = cfg.cluster.devices_per_node;
        let spans = Spans::cached([p.tp, p.cp, dp, p.pp, etp, p.ep, edp, dpn], &p.order)?;
        let sp = p.tp > 1 && t.sequence_parallel;
        let b = t.micro_batch_size as f64;
        let s = t.seq_length as f64;
        let n_full = b * s / p.cp as f64;
        let n_loc = if sp { n_full / p.tp as f64 } else { n_full };
        let stages = crate::sim::config::stage_layers(&cfg.model, p)?;
        if vpp > 1 && p.pipeline_model_parallel_layout.is_none() {
            for (i, st) in stages.iter().enumerate() {
                // An embedding / loss counted in the split is a layer of its first / last chunk.
                let extra =
                    usize::from(st.has_embedding && p.account_for_embedding_in_pipeline_split)
                        + usize::from(st.has_output && p.account_for_loss_in_pipeline_split);
                crate::error::ensure(
                    (st.layers() + extra) % vpp == 0,
                    "virtual_pipeline_model_parallel_size",
                    || {
                        format!(
                            "{vpp} does not divide the {} layers of pipeline stage {i}",
                            st.layers() + extra
                        )
                    },
                )?;
            }
        }
        Ok(Self {
            cfg,
            world,
            dp,
            edp,
            etp,
            vpp,
            nmb,
            sp,
            b,
            s,
            n_full,
            n_loc,
            peak_gemm: cfg.cluster.gemm_peak(t.precision),
            peak16: cfg.cluster.peak16(),
            hbm: cfg.cluster.memory_bandwidth_gb_s * 1e9 * cfg.cluster.efficiency.memory_efficiency,
            spans,
            stages,
        })
    }

    /// This engine reading `cfg`, a configuration that differs from its own only in the
    /// recomputation settings: no validation, no rank groups again (the memory planner asks
    /// for a layer under each recompute flag).
    pub fn with_recompute<'b>(&self, cfg: &'b SimConfig) -> Engine<'b> {
        Engine {
            cfg,
            world: self.world,
            dp: self.dp,
            edp: self.edp,
            etp: self.etp,
            vpp: self.vpp,
            nmb: self.nmb,
            sp: self.sp,
            b: self.b,
            s: self.s,
            n_full: self.n_full,
            n_loc: self.n_loc,
            peak_gemm: self.peak_gemm,
            peak16: self.peak16,
            hbm: self.hbm,
            spans: self.spans,
            stages: self.stages.clone(),
        }
    }

    // ---------------------------------------------------------------- device primitives

    /// One `m x k` by `k x n` GEMM in the training precision.
    pub fn gemm(&self, m: f64, n: f64, k: f64) -> f64 {
        if m <= 0.0 || n <= 0.0 || k <= 0.0 {
            return 0.0;
        }
        let e = &self.cfg.cluster.efficiency;
        let f = |d: f64| d / (d + e.gemm_dim_knee);
        let fp8 = self.cfg.training.precision == Precision::Fp8;
        let top = if fp8 {
            e.fp8_gemm_efficiency
        } else {
            e.gemm_efficiency
        };
        let eff = top * f(m) * f(n) * f(k);
        let flops = 2.0 * m * n * k;
        let bytes = BF16 * (m * k + k * n + m * n);
        let t = (flops / (self.peak_gemm * eff)).max(bytes / self.hbm);
        if fp8 {
            // The activation operand is quantized first: read in 16 bits, written as FP8
            // row-wise and column-wise (the transpose the backward pass needs).
            t + self.mem(m * k * (BF16 + 2.0))
        } else {
            t
        }
    }

    /// Time the weight-gradient GEMM of the `m x k` by `k x n` GEMM [`Engine::gemm`] takes
    /// beyond that GEMM's own time (the backward pass is charged twice the forward): Megatron
    /// accumulates each micro-batch's weight gradient into the main gradient inside the GEMM
    /// (`gradient_accumulation_fusion`), reading and writing all `k x n` of it in its dtype
    /// (fp32) besides the two 16-bit activation operands (the same memory roofline as
    /// [`Engine::gemm`]). Zero where the GEMM stays compute-bound;
    /// it binds on expert GEMMs with few tokens an expert (fine-grained experts).
    pub fn wgrad_accumulation(&self, m: f64, n: f64, k: f64) -> f64 {
        if m <= 0.0 || n <= 0.0 || k <= 0.0 {
            return 0.0;
        }
        let e = &self.cfg.cluster.efficiency;
        let f = |d: f64| d / (d + e.gemm_dim_knee);
        let top = if self.cfg.training.precision == Precision::Fp8 {
            e.fp8_gemm_efficiency
        } else {
            e.gemm_efficiency
        };
        let compute = 2.0 * m * n * k / (self.peak_gemm * top * f(m) * f(n) * f(k));
        let fwd_bytes = BF16 * (m * k + k * n + m * n);
        let charged = compute.max(fwd_bytes / self.hbm);
        let wgrad_bytes = BF16 * (m * k + m * n) + 2.0 * self.cfg.training.grad_bytes() * k * n;
        (compute.max(wgrad_bytes / self.hbm) - charged).max(0.0)
    }

    /// Flash attention forward with `flops` FLOPs (16-bit peak).
    fn attention(&self, flops: f64) -> f64 {
        flops / (self.peak16 * self.cfg.cluster.efficiency.attention_efficiency)
    }

    /// A memory-bound kernel moving `bytes` (read + write).
    fn mem(&self, bytes: f64) -> f64 {
        bytes / self.hbm
    }

    fn links(&self) -> (f64, f64, f64, f64) {
        let c = &self.cfg.cluster;
        let e = &c.efficiency;
        (
            c.intra_node_bandwidth_gb_s * 1e9 * e.intra_node_comm_efficiency,
            c.inter_node_bandwidth_gb_s * 1e9 * e.inter_node_comm_efficiency,
            c.intra_node_latency_us * 1e-6,
            c.inter_node_latency_us * 1e-6,
        )
    }

    /// Reduce-scatter or all-gather of a buffer of `bytes` (the full, unsharded size) over a
    /// group: hierarchical, inside the nodes first, then across them over the NICs.
    pub fn gather(&self, bytes: f64, span: Span) -> f64 {
        let n = span.size as f64;
        if span.size <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let (bi, bx, li, lx) = self.links();
        let k = span.nodes as f64;
        let g = (span.size / span.nodes).max(1) as f64;
        let g_min = span.min_per_node as f64;
        let intra = (g - 1.0) / g * bytes / bi;
        let inter = if k > 1.0 {
            (k - 1.0) / k * bytes / (g_min * bx)
        } else {
            0.0
        };
        let lat = if k > 1.0 { lx } else { li } * (1.0 + n.log2());
        intra + inter + lat
    }

    /// All-reduce of `bytes`.
    pub fn allreduce(&self, bytes: f64, span: Span) -> f64 {
        2.0 * self.gather(bytes, span)
    }

    /// All-to-all where every rank sends `bytes` in total, spread evenly over the group.
    pub fn alltoall(&self, bytes: f64, span: Span) -> f64 {
        if span.size <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let (bi, bx, li, lx) = self.links();
        let n = span.size as f64;
        let g = span.min_per_node.min(span.size) as f64;
        let intra = bytes * (g - 1.0) / n / bi;
        let inter = bytes * (n - g) / n / bx;
        intra.max(inter) + if span.nodes > 1 { lx } else { li }
    }

    /// Dispatch (or combine) of the token-choice exchange: `tokens` local tokens of `row`
    /// bytes, each going to `topk` experts spread over the EP group.
    fn dispatch(&self, tokens: f64, row: f64, topk: f64, span: Span, imbalance: f64) -> f64 {
        let t = &self.cfg.training;
        match t.moe_token_dispatcher_type {
            Dispatcher::AllToAll => self.alltoall(tokens * topk * row * imbalance, span),
            Dispatcher::AllGather => {
                // All-gather the tokens over the EP group, keep the local experts' rows.
                self.gather(tokens * row * span.size as f64, span)
            }
            Dispatcher::Flex => {
                if span.size <= 1 {
                    return 0.0;
                }
                let (bi, bx, li, lx) = self.links();
                let n = span.size as f64;
                let k = span.nodes as f64;
                let g = span.min_per_node.min(span.size) as f64;
                // A token crosses the network once per distinct remote node among its experts.
                let m = &self.cfg.model;
                let nodes_hit = match (m.moe_router_num_groups, m.moe_router_group_topk) {
                    (Some(ng), Some(gk)) if ng as f64 >= k => (gk as f64).min(k),
                    _ => k * (1.0 - (1.0 - 1.0 / k).powf(topk)),
                };
                let remote = nodes_hit * (k - 1.0) / k;
                let inter = tokens * row * remote * imbalance / bx;
                let intra = tokens * topk * row * imbalance * (g - 1.0) / n / bi;
                intra.max(inter) + if k > 1.0 { lx } else { li }
            }
        }
    }

    fn p2p(&self, bytes: f64) -> f64 {
        if self.cfg.parallel.pp <= 1 {
            return 0.0;
        }
        let (bi, bx, li, lx) = self.links();
        if self.spans.pp.nodes > 1 {
            bytes / bx + lx
        } else {
            bytes / bi + li
        }
    }

    /// Exposed part of communication `t` that may overlap with `window` of compute.
    fn overlap(&self, t: f64, window: f64, eff: f64) -> f64 {
        (t - window * eff).max(0.0)
    }

    /// TP communication with or without userbuffer overlap (`window` = the GEMM beside it).
    fn tp_exposed(&self, t: f64, window: f64) -> f64 {
        let tr = &self.cfg.training;
        if tr.tp_comm_overlap {
            let e = self.cfg.cluster.efficiency.tp_overlap_efficiency;
            let hidden = e * t.min(window);
            t - hidden
        } else {
            t
        }
    }

    // ---------------------------------------------------------------- layers

    /// Column-parallel entry: all-gather (SP) of `n_full x h` before GEMMs taking `gemm`.
    fn tp_enter(&self, f: &mut Pass, bw: &mut Pass, width: f64, gemm_fwd: f64) {
        let p = &self.cfg.parallel;
        if p.tp <= 1 {
            return;
        }
        let bytes = self.n_full * width * BF16;
        if self.sp {
            let ag = self.gather(bytes, self.spans.tp);
            f.x(TP, ag, self.tp_exposed(ag, gemm_fwd));
            // Backward: reduce-scatter of the input gradient, and the all-gather again of
            // the saved (sharded) input for the weight gradient, overlapped with dgrad.
            bw.x(TP, ag, self.tp_exposed(ag, gemm_fwd));
            bw.x(TP, ag, self.overlap(ag, gemm_fwd, 1.0));
        } else {
            // Without SP the entry is an identity forward, an all-reduce backward.
            let ar = self.allreduce(bytes, self.spans.tp);
            bw.x(TP, ar, self.tp_exposed(ar, gemm_fwd));
        }
    }

    /// Row-parallel exit: reduce-scatter (SP) or all-reduce of `n_full x h`.
    fn tp_exit(&self, f: &mut Pass, bw: &mut Pass, width: f64, gemm_fwd: f64) {
        let p = &self.cfg.parallel;
        if p.tp <= 1 {
            return;
        }
        let bytes = self.n_full * width * BF16;
        if self.sp {
            let rs = self.gather(bytes, self.spans.tp);
            f.x(TP, rs, self.tp_exposed(rs, gemm_fwd));
            bw.x(TP, rs, self.tp_exposed(rs, gemm_fwd));
        } else {
            let ar = self.allreduce(bytes, self.spans.tp);
            f.x(TP, ar, self.tp_exposed(ar, gemm_fwd));
        }
    }

    /// Self-attention block (input norm, projections, core attention, residual).
    fn attention_layer(&self, lc: &mut LayerCost) {
        let m = &self.cfg.model;
        let p = &self.cfg.parallel;
        let t = &self.cfg.training;
        let rm = &t.recompute_modules;
        let selective = t.recompute_granularity == Recompute::Selective;
        let tp = p.tp as f64;
        let h = m.hidden_size as f64;
        let heads = m.num_attention_heads as f64;
        let (nf, nl) = (self.n_full, self.n_loc);
        let (mut f, mut bw, mut rc) = (Pass::default(), Pass::default(), Pass::default());
        let ln = self.mem(2.0 * nl * h * BF16);
        f.c(ATTN, ln);
        bw.c(ATTN, 2.0 * ln);
        if selective && rm.layernorm {
            rc.c(ATTN, ln);
        }
        let (d_qk, d_v, kv_heads, up_gemms, entry_width);
        let mut act = nl * h * BF16; // layer input (residual stream)
        let mut act_dropped = 0.0;
        // Norm output (input of the projections), sharded under SP.
        let ln_out = nl * h * BF16;
        if selective && rm.layernorm {
            act_dropped += ln_out;
        } else {
            act += ln_out;
        }
        if m.multi_latent_attention {
            let qk = m.qk_head_dim as f64;
            let rope = m.qk_pos_emb_head_dim as f64;
            let v = m.v_head_dim as f64;
            let kvl = m.kv_lora_rank as f64;
            d_qk = qk + rope;
            d_v = v;
            kv_heads = heads;
            // Down projections run on the local (sequence-parallel) tokens, replicated over TP.
            let (q_down, q_up, q_width) = match m.q_lora_rank {
                Some(r) => {
                    let r = r as f64;
                    (self.gemm(nl, r, h), self.gemm(nf, heads * d_qk / tp, r), r)
                }
                None => (0.0, self.gemm(nf, heads * d_qk / tp, h), 0.0),
            };
            let kv_down = self.gemm(nl, kvl + rope, h);
            let kv_up = self.gemm(nf, heads * (qk + v) / tp, kvl);
            let norms = self.mem(2.0 * nl * (q_width + kvl) * BF16);
            f.c(ATTN, q_down + kv_down + norms);
            bw.c(ATTN, 2.0 * (q_down + kv_down + norms));
            up_gemms = q_up + kv_up;
            entry_width = q_width.max(if m.q_lora_rank.is_none() { h } else { 0.0 }) + kvl + rope;
            lc.qkv_internal_bytes = nl * (2.0 * q_width + 2.0 * kvl + rope) * BF16;
            act += lc.qkv_internal_bytes;
            let qkv = nf * heads * (d_qk + d_qk + d_v) / tp * BF16;
            lc.qkv_output_bytes = qkv;
            if selective && rm.mla_up_proj {
                act_dropped += qkv;
                rc.c(ATTN, up_gemms);
            } else {
                act += qkv;
            }
            f.c(ATTN, up_gemms);
            bw.c(ATTN, 2.0 * up_gemms);
        } else {
            let d = m.kv_channels() as f64;
            let g = m.query_groups() as f64;
            d_qk = d;
            d_v = d;
            kv_heads = g;
            let qkv = self.gemm(nf, (heads + 2.0 * g) * d / tp, h);
            f.c(ATTN, qkv);
            bw.c(ATTN, 2.0 * qkv);
            up_gemms = qkv;
            entry_width = h;
            let qkv_bytes = nf * (heads + 2.0 * g) * d / tp * BF16;
            act += qkv_bytes;
            lc.qkv_output_bytes = qkv_bytes;
            // RoPE (fused) and q/k norms.
            let rope = self.mem(2.0 * nf * (heads + g) * d / tp * BF16);
            f.c(ATTN, rope);
            bw.c(ATTN, 2.0 * rope);
            if m.qk_layernorm {
                lc.qkv_internal_bytes = nf * (heads + g) * d / tp * BF16;
                act += lc.qkv_internal_bytes;
            }
        }
        self.tp_enter(&mut f, &mut bw, entry_width, up_gemms);
        // Core attention: flash attention, causal (half the score matrix), over the whole
        // sequence for this rank's s/cp queries (load-balanced CP).
        let causal = 0.5;
        let core_flops =
            2.0 * self.b * (self.s / p.cp as f64) * self.s * (heads / tp) * (d_qk + d_v) * causal;
        let core = self.attention(core_flops);
        f.c(CORE, core);
        bw.c(CORE, 2.5 * core);
        let out = nf * heads * d_v / tp * BF16;
        let lse = 4.0 * nf * heads / tp;
        if selective && rm.core_attn {
            rc.c(CORE, core);
            act_dropped += out + lse;
        } else {
            act += out + lse;
        }
        // Attention dropout inside flash attention keeps only its RNG state: nothing to store.
        if p.cp > 1 {
            // Ring exchange of K and V chunks, overlapped with the attention chunks.
            let kv = self.b * (self.s / p.cp as f64) * kv_heads / tp * (d_qk + d_v) * BF16;
            let (bi, bx, li, lx) = self.links();
            let hop = if self.spans.cp.nodes > 1 {
                kv / bx + lx
            } else {
                kv / bi + li
            };
            let ring = (p.cp as f64 - 1.0) * hop;
            let eff = self.cfg.cluster.efficiency.overlap_efficiency;
            let exposed = self.overlap(ring, core, eff).max(hop);
            f.x(CP, ring, exposed);
            let exposed_b = self.overlap(2.0 * ring, 2.5 * core, eff).max(2.0 * hop);
            bw.x(CP, 2.0 * ring, exposed_b);
            if selective && rm.core_attn {
                rc.x(CP, ring, exposed);
            }
        }
        let proj = self.gemm(nf, h, heads * d_v / tp);
        f.c(ATTN, proj);
        bw.c(ATTN, 2.0 * proj);
        self.tp_exit(&mut f, &mut bw, h, proj);
        // Residual add (and dropout mask when hidden_dropout > 0).
        let resid = self.mem(3.0 * nl * h * BF16);
        f.c(ATTN, resid);
        bw.c(ATTN, resid);
        if m.hidden_dropout > 0.0 {
            act += nl * h;
        }
        let fp8 = if t.precision == Precision::Fp8 {
            1.0
        } else {
            0.0
        };
        // FP8: one quantization kernel per linear layer; a CUDA graph launches once.
        let kernels = if t.cuda_graph_scope.attn {
            1.0
        } else if m.multi_latent_attention {
            KERNELS_MLA + 5.0 * fp8
        } else {
            KERNELS_GQA + 2.0 * fp8 + if m.qk_layernorm { 4.0 } else { 0.0 }
        };
        let ko = self.cfg.cluster.efficiency.kernel_overhead_us * 1e-6;
        f.c(OVERHEAD, kernels * ko);
        bw.c(OVERHEAD, 2.0 * kernels * ko);
        lc.attention_forward = f.time() - ln - resid;
        lc.fwd.add(&f, 1.0);
        lc.bwd.add(&bw, 1.0);
        lc.recompute.add(&rc, 1.0);
        lc.full_fwd.add(&f, 1.0);
        lc.act_attn += act;
        lc.act_attn_no_recompute += act + act_dropped;
    }

    /// Dense MLP block (pre-MLP norm, fc1, activation, fc2).
    fn dense_mlp(
        &self,
        lc: &mut LayerCost,
        ffn: f64,
        part: usize,
        with_norm: bool,
    ) -> (Pass, f64, f64) {
        let m = &self.cfg.model;
        let p = &self.cfg.parallel;
        let tp = p.tp as f64;
        let h = m.hidden_size as f64;
        let gate = if m.swiglu { 2.0 } else { 1.0 };
        let (nf, nl) = (self.n_full, self.n_loc);
        let (mut f, mut bw) = (Pass::default(), Pass::default());
        let mut act = 0.0;
        if with_norm {
            let ln = self.mem(2.0 * nl * h * BF16);
            f.c(part, ln);
            bw.c(part, 2.0 * ln);
        }
        let fc1 = self.gemm(nf, ffn * gate / tp, h);
        let fc2 = self.gemm(nf, h, ffn / tp);
        self.tp_enter(&mut f, &mut bw, h, fc1);
        let actk = self.mem(nf * ffn / tp * (gate + 1.0) * BF16);
        f.c(part, fc1 + actk + fc2);
        bw.c(part, 2.0 * (fc1 + fc2) + 2.0 * actk);
        self.tp_exit(&mut f, &mut bw, h, fc2);
        act += nf * ffn * gate / tp * BF16 + nf * ffn / tp * BF16;
        let ko = self.cfg.cluster.efficiency.kernel_overhead_us * 1e-6;
        let q = if self.cfg.training.precision == Precision::Fp8 {
            2.0
        } else {
            0.0
        };
        f.c(OVERHEAD, (KERNELS_MLP + q) * ko);
        bw.c(OVERHEAD, 2.0 * (KERNELS_MLP + q) * ko);
        lc.fwd.add(&f, 1.0);
        lc.bwd.add(&bw, 1.0);
        lc.full_fwd.add(&f, 1.0);
        (f, act, fc1 + fc2)
    }

    /// The routed-expert MoE block with its shared experts.
    fn moe_mlp(&self, lc: &mut LayerCost) {
        let m = &self.cfg.model;
        let p = &self.cfg.parallel;
        let t = &self.cfg.training;
        let e = &self.cfg.cluster.efficiency;
        let rm = &t.recompute_modules;
        let selective = t.recompute_granularity == Recompute::Selective;
        let h = m.hidden_size as f64;
        let experts = m.experts() as f64;
        let topk = m.moe_router_topk as f64;
        let local = experts / p.ep as f64;
        let etp = self.etp as f64;
        let fe = m.moe_ffn() as f64;
        let gate = if m.swiglu { 2.0 } else { 1.0 };
        let nl = self.n_loc;
        let ko = e.kernel_overhead_us * 1e-6;
        let (mut f, mut bw, mut rc) = (Pass::default(), Pass::default(), Pass::default());
        let mut act = 0.0;
        let mut act_dropped = 0.0;
        // Pre-MLP norm.
        let ln = self.mem(2.0 * nl * h * BF16);
        f.c(ROUTING, ln);
        bw.c(ROUTING, 2.0 * ln);
        act += 2.0 * nl * h * BF16; // norm input and output
        if selective && rm.layernorm {
            rc.c(ROUTING, ln);
            act -= nl * h * BF16;
            act_dropped += nl * h * BF16;
        }
        // Tokens leaving this rank (capacity: padded to capacity, or dropped above it).
        let (send, imbalance) = match t.moe_expert_capacity_factor {
            Some(cf) if t.moe_pad_expert_input_to_capacity => (nl * topk * cf, 1.0),
            Some(cf) => (
                nl * topk * cf.min(1.0),
                t.moe_expert_load_imbalance.min(cf.max(1.0)),
            ),
            None => (nl * topk, t.moe_expert_load_imbalance),
        };
        // Tokens at this rank's experts (after the expert-TP all-gather), busiest rank.
        let tokens_here = send * etp * imbalance;
        // Router and routing.
        let router = self.gemm(nl, experts, h) + self.mem(nl * experts * 4.0 * 6.0);
        f.c(ROUTING, router);
        bw.c(ROUTING, 2.0 * router);
        act += nl * experts * 4.0 * 2.0;
        let permute = self.mem(nl * h * BF16 + send * h * BF16);
        f.c(ROUTING, 2.0 * permute); // permute + unpermute
        bw.c(ROUTING, 2.0 * permute);
        let a2a = self.dispatch(nl, h * BF16, send / nl.max(1.0), self.spans.ep, imbalance);
        // Expert tensor parallel: all-gather after dispatch, reduce-scatter before combine.
        let etp_ag = if self.etp > 1 {
            self.gather(tokens_here * h * BF16, self.spans.etp)
        } else {
            0.0
        };
        let sort = if p.ep > 1 && local > 1.0 {
            self.mem(2.0 * tokens_here * h * BF16)
        } else {
            0.0
        };
        f.c(ROUTING, 2.0 * sort);
        bw.c(ROUTING, 2.0 * sort);
        // Grouped GEMMs.
        let per_expert = tokens_here / local;
        let fc1 = local * self.gemm(per_expert, fe * gate / etp, h);
        let fc2 = local * self.gemm(per_expert, h, fe / etp);
        let actk = self.mem(tokens_here * fe / etp * (gate + 1.0) * BF16 + tokens_here * 4.0);
        let wgrad = local
            * (self.wgrad_accumulation(per_expert, fe * gate / etp, h)
                + self.wgrad_accumulation(per_expert, h, fe / etp));
        f.c(EXPERTS, fc1 + fc2 + actk);
        bw.c(EXPERTS, 2.0 * (fc1 + fc2) + 2.0 * actk + wgrad);
        let fc1_out = tokens_here * fe * gate / etp * BF16;
        let act_out = tokens_here * fe / etp * BF16;
        act += tokens_here * h * BF16 + fc1_out + tokens_here * 4.0;
        if selective && rm.moe_act {
            rc.c(EXPERTS, actk);
            act_dropped += act_out;
        } else {
            act += act_out;
        }
        let q = if t.precision == Precision::Fp8 {
            2.0
        } else {
            0.0
        };
        let expert_kernels = if t.moe_grouped_gemm {
            KERNELS_EXPERTS + q
        } else {
            KERNELS_EXPERTS + (2.0 + q) * (local - 1.0)
        };
        let g = &t.cuda_graph_scope;
        let graphed = |on: bool, n: f64| if on { 1.0 } else { n };
        let kernels = graphed(g.moe_router, KERNELS_ROUTER)
            + graphed(g.moe_preprocess, KERNELS_PREPROCESS)
            + KERNELS_DISPATCH
            + expert_kernels;
        f.c(OVERHEAD, kernels * ko);
        bw.c(OVERHEAD, 2.0 * kernels * ko);
        // Shared experts: a TP-sharded dense MLP beside the routed experts.
        let mut shared = Pass::default();
        if m.shared_ffn() > 0 {
            let mut tmp = LayerCost::default();
            let (sf, sa, _) = self.dense_mlp(&mut tmp, m.shared_ffn() as f64, SHARED, false);
            shared = sf;
            f.add(&tmp.fwd, 1.0);
            bw.add(&tmp.bwd, 1.0);
            if selective && rm.shared_experts {
                rc.add(&tmp.fwd, 1.0);
                act_dropped += sa;
            } else {
                act += sa;
            }
        }
        // The exchange: dispatch and combine, forward; the same backward.
        let mut window_f = 0.0;
        let mut window_b = 0.0;
        if t.moe_shared_expert_overlap {
            window_f += shared.time();
            window_b += 2.0 * shared.time();
        }
        // One direction of each pass may send FP8 rows (1 byte, plus a 4-byte scale per 128
        // elements) instead of BF16: the dispatch forward, the gradients' scatter backward.
        let a2a_in = if t.moe_dispatch_fp8 {
            self.dispatch(
                nl,
                h * (1.0 + 4.0 / 128.0),
                send / nl.max(1.0),
                self.spans.ep,
                imbalance,
            )
        } else {
            a2a
        };
        let exch = a2a + a2a_in;
        let etp_comm = 2.0 * etp_ag;
        if t.overlap_moe_expert_parallel_comm {
            // 1F1B all-to-all overlap: another micro-batch's computation hides the exchange.
            let compute_f = f.compute.iter().sum::<f64>();
            window_f += compute_f;
            window_b += compute_f;
        }
        let oe = e.overlap_efficiency;
        // The hidden part still costs: the exchange's kernels hold a share of the SMs, and the
        // compute beside them runs that much slower for as long as they run.
        let sm = e.comm_sm_fraction;
        let contended = |exposed: f64| exposed + (exch - exposed) * sm / (1.0 - sm);
        let exp_f = contended(self.overlap(exch, window_f, oe));
        let exp_b = contended(self.overlap(exch, window_b, oe));
        f.x(EP, exch, exp_f);
        bw.x(EP, exch, exp_b);
        f.x(ETP, etp_comm, etp_comm);
        bw.x(ETP, etp_comm, etp_comm);
        let full = f;
        if selective && rm.moe {
            // Recompute the whole MoE block (with its exchange) in the backward pass.
            rc = full;
            act_dropped += act - 2.0 * nl * h * BF16;
            act = 2.0 * nl * h * BF16;
        }
        // Transient: dispatch buffers (permuted, received, gathered rows) and fc1 gradients.
        lc.transient = lc
            .transient
            .max((send + 2.0 * tokens_here) * h * BF16 + fc1_out + act_out);
        lc.fwd.add(&f, 1.0);
        lc.bwd.add(&bw, 1.0);
        lc.recompute.add(&rc, 1.0);
        lc.full_fwd.add(&full, 1.0);
        lc.act_mlp += act;
        lc.act_mlp_no_recompute += act + act_dropped;
    }

    /// One transformer layer (dense or MoE MLP) for one micro-batch.
    pub fn layer(&self, moe: bool) -> LayerCost {
        let m = &self.cfg.model;
        let t = &self.cfg.training;
        let mut lc = LayerCost::default();
        self.attention_layer(&mut lc);
        if moe {
            self.moe_mlp(&mut lc);
        } else {
            let mut tmp = LayerCost::default();
            let (_, act, _) = self.dense_mlp(&mut tmp, m.ffn() as f64, MLP, true);
            let nl = self.n_loc;
            let h = m.hidden_size as f64;
            let rm = &t.recompute_modules;
            let selective = t.recompute_granularity == Recompute::Selective;
            let norm_act = 2.0 * nl * h * BF16;
            lc.fwd.add(&tmp.fwd, 1.0);
            lc.bwd.add(&tmp.bwd, 1.0);
            lc.full_fwd.add(&tmp.fwd, 1.0);
            let mut kept = act + norm_act;
            let all = kept;
            if selective && rm.mlp {
                lc.recompute.add(&tmp.fwd, 1.0);
                kept = norm_act;
            } else if selective && rm.layernorm {
                lc.recompute.c(MLP, self.mem(2.0 * nl * h * BF16));
                kept -= nl * h * BF16;
            }
            lc.act_mlp += kept;
            lc.act_mlp_no_recompute += all;
            lc.transient = lc.transient.max(act);
        }
        lc
    }

    /// Embedding (first stage) for one micro-batch.
    fn embedding(&self) -> LayerCost {
        let m = &self.cfg.model;
        let h = m.hidden_size as f64;
        let mut lc = LayerCost::default();
        let t = self.mem(2.0 * self.n_loc * h * BF16);
        lc.fwd.c(EMBED, t);
        lc.bwd.c(EMBED, 2.0 * t);
        lc.act_attn += self.n_loc * 8.0; // token ids and positions
        lc
    }

    /// Final norm, output layer, loss and MTP modules (last stage) for one micro-batch.
    fn output(&self) -> LayerCost {
        let m = &self.cfg.model;
        let p = &self.cfg.parallel;
        let tp = p.tp as f64;
        let h = m.hidden_size as f64;
        let v = m.padded_vocab(p.tp) as f64;
        let ko = self.cfg.cluster.efficiency.kernel_overhead_us * 1e-6;
        let mut lc = LayerCost::default();
        let head = |lc: &mut LayerCost| {
            let (mut f, mut bw) = (Pass::default(), Pass::default());
            let ln = self.mem(2.0 * self.n_loc * h * BF16);
            let out = self.gemm(self.n_full, v / tp, h);
            self.tp_enter(&mut f, &mut bw, h, out);
            // Vocab-parallel cross entropy in fp32: logits, max, exp-sum, gradient.
            let ce = self.mem(self.n_full * v / tp * (BF16 + 4.0 * 3.0));
            f.c(EMBED, ln + out + ce);
            bw.c(EMBED, 2.0 * ln + 2.0 * out + ce);
            f.c(OVERHEAD, 6.0 * ko);
            bw.c(OVERHEAD, 12.0 * ko);
            lc.fwd.add(&f, 1.0);
            lc.bwd.add(&bw, 1.0);
            lc.transient = lc.transient.max(self.n_full * v / tp * (BF16 + 4.0 + 4.0));
            lc.act_mlp += 2.0 * self.n_loc * h * BF16;
        };
        head(&mut lc);
        if m.mtp_num_layers > 0 {
            let last_moe = m.is_moe() && *m.moe_pattern().last().unwrap_or(&false);
            for _ in 0..m.mtp_num_layers {
                let layer = self.layer(last_moe);
                lc.fwd.add(&layer.fwd, 1.0);
                lc.bwd.add(&layer.bwd, 1.0);
                lc.recompute.add(&layer.recompute, 1.0);
                lc.act_attn += layer.act_attn;
                lc.act_mlp += layer.act_mlp;
                lc.act_attn_no_recompute += layer.act_attn_no_recompute;
                lc.act_mlp_no_recompute += layer.act_mlp_no_recompute;
                lc.transient = lc.transient.max(layer.transient);
                // Embedding of the shifted tokens, two norms, the 2h -> h projection.
                let (mut f, mut bw) = (Pass::default(), Pass::default());
                let proj = self.gemm(self.n_full, h / tp, 2.0 * h);
                let norms = self.mem(6.0 * self.n_loc * h * BF16);
                self.tp_enter(&mut f, &mut bw, 2.0 * h, proj);
                f.c(EMBED, proj + norms);
                bw.c(EMBED, 2.0 * proj + 2.0 * norms);
                lc.fwd.add(&f, 1.0);
                lc.bwd.add(&bw, 1.0);
                lc.act_mlp += 4.0 * self.n_loc * h * BF16;
                head(&mut lc);
            }
        }
        lc
    }
}

/// What one stage costs and holds.
#[derive(Clone, Debug, Default)]
pub struct StageCost {
    /// Forward + backward (+ recompute) of one micro-batch.
    pub per_mb: Pass,
    pub fwd_time: f64,
    pub bwd_time: f64,
    pub recompute: Pass,
    pub params: Params,
    /// Bytes.
    pub weights: f64,
    pub grads: f64,
    pub optimizer: f64,
    pub optimizer_no_distopt: f64,
    pub act_attn: f64,
    pub act_mlp: f64,
    pub act_embed: f64,
    pub act_no_recompute: f64,
    pub offload_saved: f64,
    pub transient: f64,
    pub inflight: f64,
    pub dp_comm: f64,
    pub dp_exposed: f64,
    pub optimizer_time: f64,
    pub offload_time: f64,
}

impl StageCost {
    pub fn activations(&self) -> f64 {
        self.act_attn + self.act_mlp + self.act_embed
    }

    pub fn total_memory(&self, reserved: f64) -> f64 {
        self.weights + self.grads + self.optimizer + self.activations() + self.transient + reserved
    }
}

impl Engine<'_> {
    /// Costs and memory of every pipeline stage.
    pub fn stages(&self) -> Vec<StageCost> {
        let cfg = self.cfg;
        let m = &cfg.model;
        let p = &cfg.parallel;
        let t = &cfg.training;
        let e = &cfg.cluster.efficiency;
        let dense = self.layer(false);
        let moe = if m.is_moe() {
            Some(self.layer(true))
        } else {
            None
        };
        let emb = self.embedding();
        let out = self.output();
        let pp = p.pp;
        let v = self.vpp as f64;
        let m_mb = self.nmb as f64;
        let full = t.recompute_granularity == Recompute::Full;
        let mut out_stages = Vec::with_capacity(pp);
        for (r, st) in self.stages.iter().enumerate() {
            let mut sc = StageCost::default();
            let nd = st.dense_layers as f64;
            let nm = st.moe_layers as f64;
            let nlayers = nd + nm;
            let mut per = Pass::default();
            let mut rec = Pass::default();
            per.add(&dense.fwd, nd);
            per.add(&dense.bwd, nd);
            let mut act_attn = dense.act_attn * nd;
            let mut act_mlp = dense.act_mlp * nd;
            let mut act_no_rc = (dense.act_attn_no_recompute + dense.act_mlp_no_recompute) * nd;
            let mut layer_act = dense.act_attn_no_recompute + dense.act_mlp_no_recompute;
            let mut transient = dense.transient;
            if let Some(mo) = &moe {
                per.add(&mo.fwd, nm);
                per.add(&mo.bwd, nm);
                act_attn += mo.act_attn * nm;
                act_mlp += mo.act_mlp * nm;
                act_no_rc += (mo.act_attn_no_recompute + mo.act_mlp_no_recompute) * nm;
                if nm > 0.0 {
                    layer_act = layer_act.max(mo.act_attn_no_recompute + mo.act_mlp_no_recompute);
                    transient = transient.max(mo.transient);
                }
            }
            // Recomputation.
            if full {
                let n_rc = match t.recompute_method {
                    RecomputeMethod::Uniform => nlayers,
                    RecomputeMethod::Block => {
                        (t.recompute_num_layers.unwrap_or(0) as f64 * v).min(nlayers)
                    }
                };
                let frac = if nlayers > 0.0 { n_rc / nlayers } else { 0.0 };
                rec.add(&dense.full_fwd, nd * frac);
                if let Some(mo) = &moe {
                    rec.add(&mo.full_fwd, nm * frac);
                }
                // Recomputed layers keep only their inputs; uniform recomputation keeps one
                // input per chunk of `recompute_num_layers` layers.
                let input = self.n_loc * m.hidden_size as f64 * BF16;
                let per_input = match t.recompute_method {
                    RecomputeMethod::Uniform => input / t.recompute_num_layers.unwrap_or(1) as f64,
                    RecomputeMethod::Block => input,
                };
                let kept = n_rc * per_input;
                let scale = 1.0 - frac;
                act_attn = act_attn * scale + kept;
                act_mlp *= scale;
                // The layers of one chunk are rebuilt at once during the backward pass.
                let chunk = match t.recompute_method {
                    RecomputeMethod::Uniform => t.recompute_num_layers.unwrap_or(1) as f64,
                    RecomputeMethod::Block => 1.0,
                };
                transient = transient.max(layer_act * chunk.min(nlayers.max(1.0)));
            } else {
                rec.add(&dense.recompute, nd);
                if let Some(mo) = &moe {
                    rec.add(&mo.recompute, nm);
                }
            }
            let mut act_embed = 0.0;
            if st.has_embedding {
                per.add(&emb.fwd, 1.0);
                per.add(&emb.bwd, 1.0);
                act_embed += emb.act_attn;
            }
            if st.has_output {
                per.add(&out.fwd, 1.0);
                per.add(&out.bwd, 1.0);
                rec.add(&out.recompute, 1.0);
                act_embed += out.act_attn + out.act_mlp;
                act_no_rc += out.act_attn_no_recompute + out.act_mlp_no_recompute;
                transient = transient.max(out.transient);
            }
            per.add(&rec, 1.0);
            // Fine-grained timing for the DP overlap windows.
            let mut fwd = Pass::default();
            fwd.add(&dense.fwd, nd);
            if let Some(mo) = &moe {
                fwd.add(&mo.fwd, nm);
            }
            sc.fwd_time = fwd.time();
            sc.bwd_time = per.time() - sc.fwd_time;
            // In-flight micro-batches of this stage (1F1B; interleaved: Megatron's warm-up).
            let rr = r as f64;
            let pf = pp as f64;
            sc.inflight = if self.vpp > 1 {
                let chunks = ((pf - rr - 1.0) * 2.0 + (v - 1.0) * pf + 1.0).min(m_mb * v);
                chunks / v
            } else {
                (pf - rr).min(m_mb)
            };
            // CPU offloading of whole layers' activations.
            let off_layers = (t.cpu_offloading_num_layers as f64).min(nlayers);
            let per_layer_act = if nlayers > 0.0 {
                (act_attn + act_mlp) / nlayers
            } else {
                0.0
            };
            let offloaded = off_layers * per_layer_act;
            if off_layers > 0.0 {
                let host = cfg.cluster.host_bandwidth_gb_s * 1e9;
                let xfer = 2.0 * offloaded / host;
                let window = per.time() * off_layers / nlayers.max(1.0);
                sc.offload_time = self.overlap(xfer, window, e.overlap_efficiency);
            }
            sc.per_mb = per;
            sc.recompute = rec;
            sc.act_attn = act_attn * sc.inflight;
            sc.act_mlp = act_mlp * sc.inflight;
            sc.offload_saved = offloaded * sc.inflight;
            let ratio = if act_attn + act_mlp > 0.0 {
                1.0 - offloaded / (act_attn + act_mlp)
            } else {
                1.0
            };
            sc.act_attn *= ratio;
            sc.act_mlp *= ratio;
            sc.act_embed = act_embed * sc.inflight;
            sc.act_no_recompute = act_no_rc * sc.inflight;
            sc.transient = transient;
            // Parameters, gradients, optimizer.
            let params = model::stage_params(m, st, p.tp, pp);
            sc.params = params;
            let dense_p = params.dense_per_device(p.tp);
            let expert_p = params.expert_per_device(self.etp, p.ep);
            let total_p = dense_p + expert_p;
            let w_bytes = match t.precision {
                Precision::Fp8 => BF16 + 1.0,
                _ => BF16,
            };
            sc.weights = total_p * w_bytes;
            sc.grads = total_p * t.grad_bytes();
            let inst = t.num_distributed_optimizer_instances as f64;
            let dp_shard = (self.dp * p.cp) as f64 / inst;
            let edp_shard = self.edp as f64 / inst;
            let state = t.optimizer_state_bytes();
            let offload = if t.optimizer_cpu_offload {
                1.0 - t.optimizer_offload_fraction
            } else {
                1.0
            };
            sc.optimizer_no_distopt = total_p * state * offload;
            sc.optimizer = if t.use_distributed_optimizer {
                (dense_p / dp_shard + expert_p / edp_shard) * state * offload
            } else {
                sc.optimizer_no_distopt
            };
            // Data-parallel gradient reduction and parameter gather.
            let gbytes = if t.grad_reduce_in_bf16 {
                BF16
            } else {
                t.grad_bytes()
            };
            let (rs, ag) = if t.use_distributed_optimizer {
                (
                    self.gather(dense_p * gbytes, self.spans.dp_cp)
                        + self.gather(expert_p * gbytes, self.spans.edp),
                    self.gather(dense_p * BF16, self.spans.dp_cp)
                        + self.gather(expert_p * BF16, self.spans.edp),
                )
            } else {
                (
                    self.allreduce(dense_p * gbytes, self.spans.dp_cp)
                        + self.allreduce(expert_p * gbytes, self.spans.edp),
                    0.0,
                )
            };
            let bucket = t
                .ddp_bucket_size
                .map(|b| b as f64)
                .unwrap_or_else(|| (4.0e7f64).max(1.0e6 * self.dp as f64));
            let tail = (bucket / total_p.max(1.0)).min(1.0);
            let slack_b = rr * sc.bwd_time;
            let slack_f = rr * sc.fwd_time;
            let rs_exposed = if t.overlap_grad_reduce {
                (rs - sc.bwd_time * e.overlap_efficiency).max(rs * tail)
            } else {
                rs
            };
            let ag_exposed = if t.param_gather_overlapped() {
                (ag - sc.fwd_time * e.overlap_efficiency).max(ag * tail)
            } else {
                ag
            };
            sc.dp_comm = rs + ag;
            sc.dp_exposed = (rs_exposed - slack_b).max(0.0) + (ag_exposed - slack_f).max(0.0);
            // Optimizer step: Adam over the local shard (memory-bound), grad-norm, zeroing.
            let local = if t.use_distributed_optimizer {
                dense_p / dp_shard + expert_p / edp_shard
            } else {
                total_p
            };
            let adam_bytes = 2.0 * state + 2.0 * t.grad_bytes() + BF16;
            let dev_frac = offload;
            sc.optimizer_time =
                self.mem(local * adam_bytes * dev_frac) + self.mem(total_p * 2.0 * t.grad_bytes());
            if t.optimizer_cpu_offload {
                let f = t.optimizer_offload_fraction;
                let host = cfg.cluster.host_bandwidth_gb_s * 1e9;
                sc.optimizer_time += f * local / cfg.cluster.host_adam_params_per_s
                    + f * local * (t.grad_bytes() + BF16) / host;
            }
            out_stages.push(sc);
        }
        out_stages
    }

    /// Pipeline schedule: `(total time of the micro-batches, bubble, exposed p2p, p2p total)`
    /// for stages taking `times[s]` per micro-batch.
    pub fn pipeline(&self, times: &[f64]) -> (f64, f64, f64, f64) {
        let p = times.len() as f64;
        let m = self.nmb as f64;
        let v = self.vpp as f64;
        let t_max = times.iter().cloned().fold(0.0, f64::max);
        let t_sum: f64 = times.iter().sum();
        let busy = m * t_max;
        let total = if self.vpp > 1 {
            busy + (p - 1.0) / v * (t_sum / p)
        } else {
            (m - 1.0) * t_max + t_sum
        };
        let bubble = total - busy;
        let bytes = self.n_loc * self.cfg.model.hidden_size as f64 * BF16;
        let hop = self.p2p(bytes);
        let p2p_total = 2.0 * v * m * hop;
        let mut exposed = 2.0 * (p - 1.0) * hop;
        if !self.cfg.training.overlap_p2p_comm {
            exposed += p2p_total;
        }
        (
            total,
            bubble,
            exposed.min(p2p_total + 2.0 * (p - 1.0) * hop),
            p2p_total,
        )
    }
}
