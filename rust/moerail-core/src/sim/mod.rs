//! Training-step simulator: step time, MFU and per-device memory of a MoE model on a cluster
//! under a parallel layout, and a search over layouts.
//!
//! # Model
//!
//! * **FLOPs** are Megatron-LM's `num_floating_point_operations` ([`model::megatron_flops`]),
//!   reported with causal attention (the current formula) and without (the earlier one).
//! * **Compute** of every layer is a list of kernels on one device, per micro-batch: GEMMs at
//!   `gemm_efficiency * prod_d d / (d + gemm_dim_knee)` of the precision's dense peak (and
//!   never faster than their memory traffic), flash attention at `attention_efficiency` of the
//!   16-bit peak on the causal half of the scores (backward 2.5x forward), memory-bound
//!   kernels (norms, RoPE, activations, router, permutation, cross entropy) at
//!   `memory_efficiency` of the memory bandwidth, plus `kernel_overhead_us` per kernel
//!   launched (Megatron-Core's approximate kernel counts per block, twice as many backward; a
//!   scope captured as a CUDA graph with `cuda_graph_scope` launches once).
//!   Backward GEMMs cost twice the forward ones (data and weight gradients); an expert's weight
//!   gradient also reads and writes the fp32 main gradient it accumulates into, every
//!   micro-batch ([`engine::Engine::wgrad_accumulation`]: it binds with few tokens an expert).
//!   With `moe_dispatch_fp8` the dispatch sends FP8 rows (DeepSeek-V3's recipe).
//! * **Communication** uses the rank groups of [`crate::parallel`] and where they sit on the
//!   nodes: all-gather / reduce-scatter are hierarchical (inside the node over NVLink/HCCS,
//!   then across nodes over the NICs), all-reduce is twice that, all-to-all sends each peer's
//!   share over the link it sits behind (intra- and inter-node in parallel), DeepEP-style
//!   `flex` dispatch crosses the network once per destination node. Bandwidths are the
//!   cluster's times `intra/inter_node_comm_efficiency`, plus a latency per collective.
//!   Sequence-parallel TP all-gathers / reduce-scatters surround every column / row parallel
//!   block (hidden behind GEMMs at `tp_overlap_efficiency` with `tp_comm_overlap`); CP ring
//!   exchanges hide behind attention; the EP exchange (dispatch + combine, each direction)
//!   is exposed unless shared-expert or 1F1B overlap is on; expert-TP adds an all-gather and
//!   a reduce-scatter of the expert rows; DP reduce-scatter / all-gather (or all-reduce)
//!   hide behind the last / first micro-batch at `overlap_efficiency`, except the last
//!   bucket, and later pipeline stages have slack.
//! * **Pipeline**: 1F1B takes `(m - 1) * max_s t_s + sum_s t_s`; interleaved with `v`
//!   chunks `m * max_s t_s + (p - 1) / v * mean_s t_s`; p2p transfers are exposed in the
//!   fill/drain (and per micro-batch without `overlap_p2p_comm`).
//! * **Memory** per stage: bf16 weights (plus an fp8 copy in fp8), fp32 gradients, fp32
//!   master weights and Adam moments (sharded over DP x CP, experts over EDP, with the
//!   distributed optimizer) — Megatron's `theoretical_memory_usage` accounting; activations
//!   tensor by tensor (what each kernel saves for backward, minus what recomputation drops),
//!   times the micro-batches in flight (1F1B: `p - stage`; interleaved: Megatron's warm-up
//!   count), the MoE dispatch buffers and gradients of one layer as transient, and a reserve.
//!
//! # Calibration
//!
//! The efficiency parameters are per device family, never per case. Their priors come from
//! public microbenchmarks (H100 BF16 GEMMs reach ~0.75 of peak, flash attention ~0.55,
//! element-wise kernels ~0.7 of HBM bandwidth, NCCL ~0.75-0.8 of link bandwidth, FP8 GEMMs ~1.5x
//! BF16). The values in `python/moerail/presets/clusters/*.json` are the maximum a posteriori
//! fit per family (Hopper, Blackwell; Ascend keeps its priors) on the public table of
//! published MoE runs `benches/sim_validation.csv` (`moerail.sim.validation`), whose
//! leave-one-out and leave-one-source-out errors `benches/BENCHMARKS.md` reports.
//!
//! # Layouts it expresses
//!
//! Megatron's folded layouts (attention TP x CP x DP x PP, experts ETP x EP x EDP x PP),
//! uneven first / last stages, `pipeline_model_parallel_layout` (virtual stages of any size;
//! empty slots are no-op layers, as Pangu Ultra MoE pads 61 layers + MTP to 64 slots), MindSpeed's
//! `--moe-tp-extend-ep` (experts over TP x EP ranks = EP tp*ep with ETP 1), the all-to-all,
//! all-gather and DeepEP / HybridEP (`flex`) dispatchers, 1F1B EP overlap (its kernels holding
//! `comm_sm_fraction` of the SMs), FP8 GEMMs (`fp8_gemm_efficiency`, operand quantization).

pub mod config;
pub mod engine;
pub mod memory;
pub mod model;
pub mod report;
pub mod search;

use crate::error::Result;
use config::SimConfig;
use engine::{Engine, StageCost};

pub(crate) const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The result of one simulation.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub step_time: f64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    pub mfu_noncausal: f64,
    /// Peak per-device memory over the stages, bytes.
    pub memory_peak: f64,
    pub memory_capacity: f64,
    pub fits: bool,
    pub flops_per_step: f64,
    pub flops_per_step_noncausal: f64,
    pub world: usize,
    pub dp: usize,
    pub edp: usize,
    pub etp: usize,
    pub vpp: usize,
    pub num_microbatches: usize,
    pub critical_stage: usize,
    pub pipeline_total: f64,
    pub bubble: f64,
    pub pp_exposed: f64,
    pub pp_total: f64,
    pub dp_exposed: f64,
    pub dp_total: f64,
    pub optimizer_time: f64,
    pub offload_time: f64,
    pub stages: Vec<StageCost>,
    pub stage_layers: Vec<(usize, usize)>,
}

/// Simulates one training step.
pub fn simulate(cfg: &SimConfig) -> Result<Evaluation> {
    simulate_engine(&Engine::new(cfg)?)
}

/// [`simulate`] with the engine already built (the memory planner reuses one).
pub fn simulate_engine(eng: &Engine) -> Result<Evaluation> {
    let cfg = eng.cfg;
    let stages = eng.stages();
    let times: Vec<f64> = stages
        .iter()
        .map(|s| s.per_mb.time() + s.offload_time)
        .collect();
    let (pipeline_total, bubble, pp_exposed, pp_total) = eng.pipeline(&times);
    let critical_stage = times
        .iter()
        .enumerate()
        .fold((0, f64::MIN), |a, (i, &t)| if t > a.1 { (i, t) } else { a })
        .0;
    let dp_exposed = stages.iter().map(|s| s.dp_exposed).fold(0.0, f64::max);
    let dp_total = stages.iter().map(|s| s.dp_comm).fold(0.0, f64::max);
    let optimizer_time = stages.iter().map(|s| s.optimizer_time).fold(0.0, f64::max);
    let offload_time = stages[critical_stage].offload_time * eng.nmb as f64;
    let step_time = pipeline_total + pp_exposed + dp_exposed + optimizer_time;
    let m = &cfg.model;
    let t = &cfg.training;
    let pv = m.padded_vocab(cfg.parallel.tp) as f64;
    let gbs = t.global_batch_size as f64;
    let seq = t.seq_length as f64;
    let flops = model::megatron_flops(m, gbs, seq, pv, true);
    let flops_nc = model::megatron_flops(m, gbs, seq, pv, false);
    let world = eng.world;
    let peak = cfg.cluster.peak16() * world as f64;
    let reserved = cfg.cluster.memory_reserved_gib * GIB;
    let memory_peak = stages
        .iter()
        .map(|s| s.total_memory(reserved))
        .fold(0.0, f64::max);
    let memory_capacity = cfg.cluster.memory_gib * GIB;
    Ok(Evaluation {
        step_time,
        tokens_per_s: gbs * seq / step_time,
        mfu: flops / (step_time * peak),
        mfu_noncausal: flops_nc / (step_time * peak),
        memory_peak,
        memory_capacity,
        fits: memory_peak <= memory_capacity,
        flops_per_step: flops,
        flops_per_step_noncausal: flops_nc,
        world,
        dp: eng.dp,
        edp: eng.edp,
        etp: eng.etp,
        vpp: eng.vpp,
        num_microbatches: eng.nmb,
        critical_stage,
        pipeline_total,
        bubble,
        pp_exposed,
        pp_total,
        dp_exposed,
        dp_total,
        optimizer_time,
        offload_time,
        stage_layers: eng
            .stages
            .iter()
            .map(|s| (s.dense_layers, s.moe_layers))
            .collect(),
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::config::Value;
    use super::*;

    pub(crate) fn mixtral_8x22b(tp: usize, pp: usize, ep: usize, etp: usize) -> SimConfig {
        let mut c = SimConfig::default();
        let set = |c: &mut SimConfig, k: &str, v: Value| c.set(k, &v).unwrap();
        for (k, v) in [
            ("num_layers", 56),
            ("hidden_size", 6144),
            ("num_attention_heads", 48),
            ("num_query_groups", 8),
            ("ffn_hidden_size", 16384),
            ("vocab_size", 32768),
            ("num_moe_experts", 8),
            ("moe_router_topk", 2),
            ("seq_length", 4096),
            ("global_batch_size", 256),
            ("devices", 128),
            ("tensor_model_parallel_size", tp as i64),
            ("pipeline_model_parallel_size", pp as i64),
            ("expert_model_parallel_size", ep as i64),
            ("expert_tensor_parallel_size", etp as i64),
        ] {
            set(&mut c, k, Value::Int(v));
        }
        set(&mut c, "swiglu", Value::Bool(true));
        set(&mut c, "disable_bias_linear", Value::Bool(true));
        set(
            &mut c,
            "untie_embeddings_and_output_weights",
            Value::Bool(true),
        );
        set(&mut c, "normalization", Value::Str("RMSNorm".into()));
        set(&mut c, "moe_expert_capacity_factor", Value::Float(1.0));
        set(
            &mut c,
            "moe_pad_expert_input_to_capacity",
            Value::Bool(true),
        );
        for (k, v) in [
            ("peak_tflops_bf16", 989.5),
            ("memory_gib", 80.0),
            ("memory_bandwidth_gb_s", 3350.0),
            ("intra_node_bandwidth_gb_s", 450.0),
            ("inter_node_bandwidth_gb_s", 50.0),
        ] {
            set(&mut c, k, Value::Float(v));
        }
        c
    }

    #[test]
    fn folding_report_is_consistent() {
        let c = mixtral_8x22b(2, 8, 8, 1);
        let e = simulate(&c).unwrap();
        assert!(e.mfu > 0.2 && e.mfu < 0.8, "{}", e.mfu);
        let r = e.report(&c);
        // Breakdown adds up to the step time.
        let b = &r.breakdown_s;
        let mut sum: f64 = b
            .compute
            .0
            .iter()
            .filter(|(k, _)| *k != "recompute")
            .map(|(_, v)| v)
            .sum();
        sum += b
            .communication
            .0
            .iter()
            .map(|(_, c)| c.exposed)
            .sum::<f64>();
        sum += b.pipeline_bubble + b.optimizer;
        assert!(
            (sum - e.step_time).abs() < 1e-9 * e.step_time,
            "{sum} vs {}",
            e.step_time
        );
        assert!(r.layout.folded);
        // The JSON the bindings hand to Python: sections in order, non-finite numbers as null.
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with(r#"{"model":{"name":"#), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["layout"]["folded"], serde_json::Value::Bool(true));
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "breakdown_s",
                "fits",
                "layout",
                "memory_gib",
                "model",
                "time"
            ]
        );
        let nan = report::Named(vec![("x", f64::NAN)]);
        assert_eq!(serde_json::to_string(&nan).unwrap(), r#"{"x":null}"#);
    }

    #[test]
    fn fp8_and_overlap_costs() {
        let bf16 = simulate(&mixtral_8x22b(2, 8, 8, 1)).unwrap();
        let mut c = mixtral_8x22b(2, 8, 8, 1);
        c.set("precision", &Value::Str("fp8".into())).unwrap();
        c.set("peak_tflops_fp8", &Value::Float(1979.0)).unwrap();
        let fp8 = simulate(&c).unwrap();
        // FP8 GEMMs are faster, but far from twice: efficiency below the 16-bit one, and the
        // operand quantization is memory traffic.
        assert!(
            fp8.step_time < bf16.step_time,
            "{} {}",
            fp8.step_time,
            bf16.step_time
        );
        assert!(fp8.step_time > 0.6 * bf16.step_time);
        c.set("fp8_gemm_efficiency", &Value::Float(0.75)).unwrap();
        let eff = simulate(&c).unwrap();
        assert!(eff.step_time < fp8.step_time);
        // An overlapped EP exchange costs the SM share its kernels hold.
        let mut o = mixtral_8x22b(2, 8, 8, 1);
        o.set("overlap_moe_expert_parallel_comm", &Value::Bool(true))
            .unwrap();
        let with_sm = simulate(&o).unwrap();
        o.set("comm_sm_fraction", &Value::Float(0.0)).unwrap();
        let free = simulate(&o).unwrap();
        assert!(free.step_time < with_sm.step_time);
        assert!(with_sm.step_time < bf16.step_time);
        let e = o.set("comm_sm_fraction", &Value::Float(1.0)).unwrap_err();
        assert!(e.to_string().starts_with("comm_sm_fraction:"), "{e}");
    }

    #[test]
    fn wgrad_accumulation_binds_on_small_expert_gemms_only() {
        use crate::sim::engine::Engine;
        let c = mixtral_8x22b(2, 8, 8, 1);
        let eng = Engine::new(&c).unwrap();
        // Qwen3-235B-like expert: 256 tokens an expert, 4096 x 1536. The fp32 main gradient is
        // read and written (8 bytes an element): memory-bound on H100, slower than the forward.
        let small = eng.wgrad_accumulation(256.0, 1536.0, 4096.0);
        assert!(small > 0.2 * eng.gemm(256.0, 1536.0, 4096.0), "{small}");
        let hbm = 3350e9 * c.cluster.efficiency.memory_efficiency;
        let bytes = (8.0 * 1536.0 * 4096.0 + 2.0 * 256.0 * (1536.0 + 4096.0)) / hbm;
        assert!(small < bytes, "{small} {bytes}");
        // Mixtral's coarse experts (thousands of tokens each) stay compute-bound.
        assert_eq!(eng.wgrad_accumulation(8192.0, 16384.0, 6144.0), 0.0);
        assert_eq!(eng.wgrad_accumulation(0.0, 16384.0, 6144.0), 0.0);
    }

    #[test]
    fn fp8_dispatch_halves_one_direction_of_the_exchange() {
        use crate::sim::engine::Engine;
        let c = mixtral_8x22b(2, 8, 8, 1);
        let mut d = c.clone();
        d.set("moe_dispatch_fp8", &Value::Bool(true)).unwrap();
        let ep = |cfg: &SimConfig| Engine::new(cfg).unwrap().layer(true).fwd.comm[engine::EP];
        let (bf16, fp8) = (ep(&c), ep(&d));
        // Dispatch in FP8 (1 + 4/128 bytes an element), combine in BF16: just over 3/4.
        assert!(fp8 < bf16 && fp8 > 0.74 * bf16, "{fp8} {bf16}");
        assert!(simulate(&d).unwrap().step_time < simulate(&c).unwrap().step_time);
    }

    #[test]
    fn bad_layouts_name_the_argument() {
        let c = mixtral_8x22b(2, 7, 8, 1);
        let e = simulate(&c).unwrap_err().to_string();
        assert!(e.starts_with("world_size:"), "{e}");
        let c = mixtral_8x22b(2, 8, 3, 1);
        let e = simulate(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("world_size:") || e.starts_with("expert_model_parallel_size:"),
            "{e}"
        );
    }
}
