//! The memory planner's costs ([`crate::memory::MemoryCosts`]) from the simulator's model, for
//! one pipeline stage of a configuration.
//!
//! Every module's saved bytes and rebuild time come from the engine itself where Megatron has a
//! recompute flag for it: the engine is run with that one flag and the difference in kept
//! activations and the recompute pass it adds are the module's (`layernorm`; `mla_up_proj` for
//! `mla_up_proj` (Multi-Latent Attention's up-projections, a module of their own as in Megatron:
//! large outputs, cheap GEMMs to rebuild); `moe_act` for `expert_act`; `shared_experts` for
//! `shared_expert`). moerail's `attention` is the whole attention module: its recompute replays
//! the module (the engine's forward of it) and frees, as its swap moves, everything it saved:
//! core attention's output and statistics (what Megatron's `core_attn` drops), what the QKV
//! projections save inside and, without MLA, the queries, keys and values; Megatron's `core_attn`
//! recompute, core attention alone, is reported apart ([`StageMemoryCosts::core_attn_recompute`]).
//! The router's probabilities and the expert inputs (dispatched rows, fc1's
//! output), which Megatron can only drop with the whole `moe` block, use the engine's own
//! formulas: their GEMM, its memory-bound kernels, and the dispatch exchange's exposed time.
//! Dense layers' MLP activations stay with the layer (`other_saved_bytes`).

use crate::error::{invalid, Result};
use crate::memory::{
    solve_uniform, Evaluation, LayerCosts, MemoryCosts, ModuleCost, Options, Schedule,
    EXCHANGE_MODULE,
};

use super::config::{Recompute, RecomputeModules, SimConfig};
use super::engine::{Engine, LayerCost, EP, ETP};
use super::GIB;

/// Module indices in [`crate::memory::MODULES`].
const LAYERNORM: usize = 0;
const ATTENTION: usize = 1;
const ROUTER: usize = 2;
const EXPERT_ACT: usize = 5;
const SHARED: usize = 8;
const MLA_UP_PROJ: usize = 9;
const BF16: f64 = 2.0;

/// The costs of one stage plus what a report needs around them.
#[derive(Clone, Debug)]
pub struct StageMemoryCosts {
    pub costs: MemoryCosts,
    /// Predicted step time with every activation kept.
    pub step_seconds: f64,
    /// The stage the costs are for.
    pub stage: usize,
    /// Activations (kept, per micro-batch) of the embedding and output head, counted in
    /// `static_bytes` times the micro-batches in flight.
    pub head_bytes: f64,
    /// Per layer and micro-batch, the attention's bytes saved inside the QKV projections besides
    /// the input norm's output, and the queries, keys and values core attention saves
    /// ([`LayerCost::qkv_internal_bytes`], [`LayerCost::qkv_output_bytes`]): what Megatron's
    /// `qkv_linear` and `core_attn` offloads move.
    pub qkv_internal_bytes: f64,
    pub qkv_output_bytes: f64,
    /// Megatron's `core_attn` recompute per layer and micro-batch: (bytes it frees, seconds it
    /// adds), core attention alone, where moerail's attention recompute replays the module.
    pub core_attn_recompute: (f64, f64),
}

fn kept(lc: &LayerCost) -> f64 {
    lc.act_attn + lc.act_mlp
}

fn with_modules(base: &SimConfig, f: impl Fn(&mut RecomputeModules)) -> SimConfig {
    let mut c = base.clone();
    c.training.recompute_granularity = Recompute::Selective;
    let mut rm = RecomputeModules {
        core_attn: false,
        moe_act: false,
        layernorm: false,
        mla_up_proj: false,
        mlp: false,
        moe: false,
        shared_experts: false,
    };
    f(&mut rm);
    c.training.recompute_modules = rm;
    c
}

/// The difference one Megatron recompute flag makes to a layer: (bytes freed, seconds added).
fn flag_cost(
    eng: &Engine,
    keep: &LayerCost,
    moe: bool,
    f: impl Fn(&mut RecomputeModules),
) -> Result<ModuleCost> {
    let c = with_modules(eng.cfg, f);
    let with = eng.with_recompute(&c).layer(moe);
    // The engine models Megatron's recompute flags, whose saving already counts the copies
    // of the module's outputs its consumers saved: a swap of the module is charged the same.
    let freed = (kept(keep) - kept(&with)).max(0.0);
    Ok(ModuleCost {
        saved_bytes: freed,
        recompute_seconds: with.recompute.time(),
        recompute_saved_bytes: Some(freed),
        ..Default::default()
    })
}

/// What a stage's costs report of the attention apart from its module (the same in dense and
/// MoE layers): [`StageMemoryCosts::qkv_internal_bytes`], `qkv_output_bytes` and
/// `core_attn_recompute`.
struct AttentionParts {
    qkv_internal_bytes: f64,
    qkv_output_bytes: f64,
    core_attn: ModuleCost,
}

/// Per-layer costs of one layer kind (dense or MoE) for one micro-batch, and its attention's parts.
fn layer_costs(eng: &Engine, moe: bool) -> Result<(LayerCosts, AttentionParts)> {
    let base = eng.cfg;
    let lc = eng.layer(moe);
    let m = &base.model;
    let mut out = LayerCosts {
        forward_seconds: lc.fwd.time(),
        backward_seconds: lc.bwd.time(),
        transient_bytes: lc.transient,
        // The residual stream entering the layer, what Megatron's full recompute keeps.
        input_bytes: Some(eng.n_loc * m.hidden_size as f64 * BF16),
        ..Default::default()
    };
    out.modules[LAYERNORM] = flag_cost(eng, &lc, moe, |r| r.layernorm = true)?;
    // moerail's attention is the whole module (QKV projections, core attention, output
    // projection): its swap moves, and its recompute (a replay of the module) frees, every tensor
    // it saved: core attention's output and statistics (what Megatron's core_attn recompute
    // drops), what the QKV projections save inside (MLA's compressed latents, q / k norms) and,
    // without MLA, the queries, keys and values (with MLA they are mla_up_proj's).
    let core_attn = flag_cost(eng, &lc, moe, |r| r.core_attn = true)?;
    let attention = core_attn.saved_bytes
        + lc.qkv_internal_bytes
        + if m.multi_latent_attention {
            0.0
        } else {
            lc.qkv_output_bytes
        };
    out.modules[ATTENTION] = ModuleCost {
        saved_bytes: attention,
        recompute_seconds: lc.attention_forward,
        recompute_saved_bytes: Some(attention),
        ..Default::default()
    };
    let parts = AttentionParts {
        qkv_internal_bytes: lc.qkv_internal_bytes,
        qkv_output_bytes: lc.qkv_output_bytes,
        core_attn,
    };
    if m.multi_latent_attention {
        // Megatron's `mla_up_proj`: the up-projected queries, keys and values (after RoPE) are
        // dropped once core attention has saved them and rebuilt by the up-projection GEMMs.
        out.modules[MLA_UP_PROJ] = flag_cost(eng, &lc, moe, |r| r.mla_up_proj = true)?;
    }
    if moe {
        out.modules[EXPERT_ACT] = flag_cost(eng, &lc, moe, |r| r.moe_act = true)?;
        if m.shared_ffn() > 0 {
            out.modules[SHARED] = flag_cost(eng, &lc, moe, |r| r.shared_experts = true)?;
        }
        let p = &base.parallel;
        let t = &base.training;
        let cl = &base.cluster;
        let hbm = cl.memory_bandwidth_gb_s * 1e9 * cl.efficiency.memory_efficiency;
        let h = m.hidden_size as f64;
        let experts = m.experts() as f64;
        let topk = m.moe_router_topk as f64;
        let local = experts / p.ep as f64;
        let etp = eng.etp as f64;
        let gate = if m.swiglu { 2.0 } else { 1.0 };
        let fe = m.moe_ffn() as f64;
        let nl = eng.n_loc;
        // As the engine counts them (`moe_mlp`): the rows each rank sends and the busiest
        // rank's share after the expert-TP gather.
        let (send, imbalance) = match t.moe_expert_capacity_factor {
            Some(cf) if t.moe_pad_expert_input_to_capacity => (nl * topk * cf, 1.0),
            Some(cf) => (
                nl * topk * cf.min(1.0),
                t.moe_expert_load_imbalance.min(cf.max(1.0)),
            ),
            None => (nl * topk, t.moe_expert_load_imbalance),
        };
        let tokens_here = send * etp * imbalance;
        out.modules[ROUTER] = ModuleCost {
            saved_bytes: nl * experts * 4.0 * 2.0,
            recompute_seconds: eng.gemm(nl, experts, h) + nl * experts * 4.0 * 6.0 / hbm,
            ..Default::default()
        };
        let rows = tokens_here * h * BF16 + tokens_here * 4.0;
        let fc1_out = tokens_here * fe * gate / etp * BF16;
        let per_expert = tokens_here / local.max(1.0);
        // Dispatch is half of the exchange (dispatch + combine) the engine charges, and half
        // of the expert-TP gather / scatter; plus the permute and the chunk sort.
        let exchange = 0.5 * (lc.fwd.exposed[EP] + lc.fwd.exposed[ETP])
            + (nl * h * BF16 + send * h * BF16) / hbm
            + if p.ep > 1 && local > 1.0 {
                2.0 * tokens_here * h * BF16 / hbm
            } else {
                0.0
            };
        out.modules[EXCHANGE_MODULE] = ModuleCost {
            saved_bytes: rows + fc1_out,
            recompute_seconds: local * eng.gemm(per_expert, fe * gate / etp, h),
            exchange_seconds: exchange,
            exchange_bytes: rows,
            ..Default::default()
        };
    }
    let all = lc.act_attn_no_recompute + lc.act_mlp_no_recompute;
    let modules: f64 = out.modules.iter().map(|c| c.saved_bytes).sum();
    out.other_saved_bytes = (all - modules).max(0.0);
    Ok((out, parts))
}

/// The planner's costs for `stage` (default: the stage with the most memory) of `cfg`, with
/// `host_bytes` of pinned host memory per device and the cluster's host link. The
/// configuration's own recomputation and offloading are ignored: the plan replaces them.
pub fn memory_costs(
    cfg: &SimConfig,
    stage: Option<usize>,
    host_bytes: f64,
) -> Result<StageMemoryCosts> {
    costs_with(cfg, stage, host_bytes, None)
}

/// [`memory_costs`], reusing `keep_all` when the caller already simulated `cfg` without
/// recomputation or offloading.
fn costs_with(
    cfg: &SimConfig,
    stage: Option<usize>,
    host_bytes: f64,
    keep_all: Option<(&Engine, super::Evaluation)>,
) -> Result<StageMemoryCosts> {
    if !host_bytes.is_finite() || host_bytes < 0.0 {
        return Err(invalid(
            "host_bytes",
            format!("expected a finite number >= 0, got {host_bytes}"),
        ));
    }
    let mut base = cfg.clone();
    base.training.recompute_granularity = Recompute::None;
    base.training.cpu_offloading_num_layers = 0;
    let own;
    let (eng, ev) = match keep_all {
        Some((eng, e)) => (eng.with_recompute(&base), e),
        None => {
            own = Engine::new(&base)?;
            let e = super::simulate_engine(&own)?;
            (own.with_recompute(&base), e)
        }
    };
    let reserved = base.cluster.memory_reserved_gib * GIB;
    let pp = base.parallel.pp;
    let stage = match stage {
        Some(s) if s >= pp => {
            return Err(invalid(
                "pipeline_rank",
                format!("expected 0..{}, got {s}", pp - 1),
            ))
        }
        Some(s) => s,
        None => {
            ev.stages
                .iter()
                .enumerate()
                .fold((0, f64::MIN), |a, (i, s)| {
                    let x = s.total_memory(reserved);
                    if x > a.1 {
                        (i, x)
                    } else {
                        a
                    }
                })
                .0
        }
    };
    let sc = &ev.stages[stage];
    let (dense, moe) = ev.stage_layers[stage];
    let (dense_c, attn) = layer_costs(&eng, false)?;
    let moe_c = if moe > 0 {
        Some(layer_costs(&eng, true)?.0)
    } else {
        None
    };
    let v = eng.vpp.max(1);
    let n = dense + moe;
    let per_chunk = n.div_ceil(v).max(1);
    // Megatron's global layer numbers: chunk c of stage r holds the (c p + r)-th block of
    // layers (even split assumed; uneven first / last stages only shift the numbers).
    let first = |c: usize| (c * pp + stage) * per_chunk;
    let mut layers = Vec::with_capacity(n);
    for i in 0..n {
        let mut lc = if i < dense {
            dense_c.clone()
        } else {
            moe_c.clone().unwrap_or_else(|| dense_c.clone())
        };
        let c = (i / per_chunk).min(v - 1);
        lc.vpp_stage = c;
        lc.layer = first(c) + i - c * per_chunk;
        layers.push(lc);
    }
    let head_bytes = if sc.inflight > 0.0 {
        sc.act_embed / sc.inflight
    } else {
        0.0
    };
    let costs = MemoryCosts {
        layers,
        static_bytes: sc.weights + sc.grads + sc.optimizer + reserved + sc.act_embed,
        device_bytes: base.cluster.memory_gib * GIB,
        host_bytes,
        host_link_bytes_per_second: base.cluster.host_bandwidth_gb_s * 1e9,
        schedule: Schedule {
            pipeline_size: pp,
            pipeline_rank: stage,
            virtual_pipeline_size: v,
            num_microbatches: eng.nmb,
        },
        executor: None,
    };
    costs.validate()?;
    Ok(StageMemoryCosts {
        costs,
        step_seconds: ev.step_time,
        stage,
        head_bytes,
        qkv_internal_bytes: attn.qkv_internal_bytes,
        qkv_output_bytes: attn.qkv_output_bytes,
        core_attn_recompute: (attn.core_attn.saved_bytes, attn.core_attn.recompute_seconds),
    })
}

/// The layout search's evaluation with the memory plan: the step as simulated with every
/// activation kept when that fits, otherwise with the cheapest uniform recompute plan (no host
/// memory assumed) of the stage with the most memory under the device memory, its added time
/// on the step and its peak as the memory; unchanged (not fitting) when no plan fits.
pub fn plan_evaluation(cfg: &SimConfig) -> Result<(super::Evaluation, Option<Evaluation>)> {
    plan_evaluation_engine(&Engine::new(cfg)?)
}

/// [`plan_evaluation`] with the engine already built.
pub fn plan_evaluation_engine(eng: &Engine) -> Result<(super::Evaluation, Option<Evaluation>)> {
    let e = super::simulate_engine(eng)?;
    if e.fits {
        return Ok((e, None));
    }
    plan_evaluation_from(eng, e)
}

/// `plan_evaluation_engine` for a layout whose keep-all evaluation `e` (from `eng`) is known.
pub fn plan_evaluation_from(
    eng: &Engine,
    e: super::Evaluation,
) -> Result<(super::Evaluation, Option<Evaluation>)> {
    let cfg = eng.cfg;
    if e.fits {
        return Ok((e, None));
    }
    let plain = cfg.training.recompute_granularity == Recompute::None
        && cfg.training.cpu_offloading_num_layers == 0;
    let smc = costs_with(cfg, None, 0.0, plain.then(|| (eng, e.clone())))?;
    let mut opts = Options::new(e.memory_capacity);
    opts.allow_swap = false;
    let Some(plan) = solve_uniform(&smc.costs, &opts)? else {
        return Ok((e, None));
    };
    let pe = plan.evaluation;
    let mut out = e;
    let step = out.step_time + pe.added_seconds;
    let scale = out.step_time / step;
    out.tokens_per_s *= scale;
    out.mfu *= scale;
    out.mfu_noncausal *= scale;
    out.step_time = step;
    out.memory_peak = pe.peak_bytes;
    out.fits = pe.peak_bytes <= out.memory_capacity;
    Ok((out, Some(pe)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{evaluate, Action, N_MODULES};

    #[test]
    fn keep_all_matches_the_engine_activations() {
        // Mixtral 8x22B on the calibration layout: the planner's keep-all activations in flight
        // equal the simulator's (per stage, no recompute), and Megatron's moe_act + layernorm
        // recompute frees what the engine says it frees.
        let cfg = crate::sim::tests::mixtral_8x22b(2, 8, 8, 1);
        let smc = memory_costs(&cfg, None, 0.0).unwrap();
        let c = &smc.costs;
        let keep = evaluate(c, &vec![[Action::Keep; N_MODULES]; c.layers.len()]).unwrap();
        let mut base = cfg.clone();
        base.training.recompute_granularity = Recompute::None;
        let ev = crate::sim::simulate(&base).unwrap();
        let sc = &ev.stages[smc.stage];
        let engine_act = sc.act_attn + sc.act_mlp;
        assert!(
            (keep.activation_bytes - engine_act).abs() <= 1e-6 * engine_act,
            "{} vs {}",
            keep.activation_bytes,
            engine_act
        );
        let light = with_modules(&base, |r| {
            r.moe_act = true;
            r.layernorm = true;
        });
        let ev2 = crate::sim::simulate(&light).unwrap();
        let sc2 = &ev2.stages[smc.stage];
        let mut acts = vec![[Action::Keep; N_MODULES]; c.layers.len()];
        for a in &mut acts {
            a[LAYERNORM] = Action::Recompute;
            a[EXPERT_ACT] = Action::Recompute;
        }
        let e = evaluate(c, &acts).unwrap();
        let engine2 = sc2.act_attn + sc2.act_mlp;
        assert!(
            (e.activation_bytes - engine2).abs() <= 1e-6 * engine2,
            "{} vs {}",
            e.activation_bytes,
            engine2
        );
    }
}
