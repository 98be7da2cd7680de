//! The simulator's reports as plain typed values (the schema of `moerail plan --json`).
//!
//! Every type derives `serde::Serialize`; the bindings turn them into the JSON text Python's
//! `json.loads` reads (non-finite numbers become `null`). Field order is the key order.

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::config::{Recompute, RecomputeMethod, SimConfig};
use super::engine::{StageCost, COMMS, PARTS};
use super::search::{Candidate, SearchStats};
use super::{model, Evaluation, GIB};

/// A JSON object whose keys are known only at run time (the engine's part names), in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Named<T>(pub Vec<(&'static str, T)>);

impl<T> Named<T> {
    pub fn get(&self, key: &str) -> Option<&T> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

impl<T: Serialize> Serialize for Named<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The report of one simulation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub model: ModelReport,
    pub layout: LayoutReport,
    pub time: TimeReport,
    pub breakdown_s: Breakdown,
    pub memory_gib: MemoryReport,
    pub fits: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelReport {
    pub name: String,
    pub parameters: f64,
    pub active_parameters: f64,
    pub flops_per_token: f64,
    pub flops_per_token_noncausal: f64,
    pub flops_per_step: f64,
    pub flops_per_step_noncausal: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LayoutReport {
    pub world_size: usize,
    pub tp: usize,
    pub cp: usize,
    pub pp: usize,
    pub vpp: usize,
    pub ep: usize,
    pub etp: usize,
    pub dp: usize,
    pub edp: usize,
    /// Anything but the coupled layout (ETP = TP, EP inside DP).
    pub folded: bool,
    pub micro_batch_size: usize,
    pub num_microbatches: usize,
    /// `"full/<method>/<layers>"`, `"selective/<modules>"` or none: [`Self::recompute_config`]
    /// as a label.
    pub recompute: Option<String>,
    /// The recomputation as Megatron-Core's TransformerConfig fields, or none.
    pub recompute_config: Option<RecomputeConfig>,
    /// Transformer layers per pipeline stage.
    pub stage_layers: Vec<usize>,
    /// Megatron's `pipeline_model_parallel_layout` when one places the layers.
    pub pipeline_model_parallel_layout: Option<String>,
}

/// Megatron-Core's recomputation as its TransformerConfig fields (`recompute_granularity` and
/// the fields that go with it).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "recompute_granularity", rename_all = "lowercase")]
pub enum RecomputeConfig {
    Full {
        recompute_method: &'static str,
        recompute_num_layers: usize,
    },
    Selective {
        recompute_modules: Vec<&'static str>,
    },
}

impl RecomputeConfig {
    /// The report's short label: `"full/<method>/<layers>"` or `"selective/<modules>"`.
    pub fn label(&self) -> String {
        match self {
            Self::Full {
                recompute_method,
                recompute_num_layers,
            } => format!("full/{recompute_method}/{recompute_num_layers}"),
            Self::Selective { recompute_modules } => {
                format!("selective/{}", recompute_modules.join(","))
            }
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TimeReport {
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub tokens_per_s_per_device: f64,
    pub tflops_per_device: f64,
    pub tflops_per_device_noncausal: f64,
    pub mfu: f64,
    pub mfu_noncausal: f64,
}

/// Seconds per step of the critical stage, by part.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Breakdown {
    pub critical_stage: usize,
    /// The engine's compute parts, then `recompute`.
    pub compute: Named<f64>,
    /// One entry per communication kind of the engine.
    pub communication: Named<CommTime>,
    pub pipeline_bubble: f64,
    pub optimizer: f64,
    pub offload: f64,
    pub per_stage: Vec<StageReport>,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CommTime {
    pub total: f64,
    pub exposed: f64,
    pub overlapped: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct StageReport {
    pub dense_layers: usize,
    pub moe_layers: usize,
    pub time_per_microbatch_s: f64,
    pub memory_gib: f64,
    pub weights_gib: f64,
    pub gradients_gib: f64,
    pub optimizer_gib: f64,
    pub activations_gib: f64,
    pub parameters: f64,
}

/// Memory of the stage with the largest footprint, GiB.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryReport {
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub optimizer_without_distributed_optimizer: f64,
    pub activations: ActivationReport,
    pub moe_dispatch_and_transient: f64,
    pub inflight_microbatches: f64,
    pub recompute_savings: f64,
    pub offload_savings: f64,
    pub reserved: f64,
    pub total: f64,
    pub capacity: f64,
    pub fits: bool,
    pub parameters: f64,
    pub stage: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ActivationReport {
    pub attention: f64,
    pub mlp: f64,
    pub embedding_and_logits: f64,
    pub total: f64,
}

/// A layout the search chose, under Megatron's argument names.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CandidateReport {
    pub tp: usize,
    pub cp: usize,
    pub pp: usize,
    pub vpp: usize,
    pub ep: usize,
    pub etp: usize,
    pub micro_batch_size: usize,
    pub recompute: &'static str,
    pub decoder_first_pipeline_num_layers: Option<usize>,
    pub decoder_last_pipeline_num_layers: Option<usize>,
    pub account_for_embedding_and_loss_in_pipeline_split: bool,
    /// The layers sit on equal chunks padded with no-op layers (the report's
    /// `layout.pipeline_model_parallel_layout` says where).
    pub padded_with_noop_layers: bool,
}

impl From<&Candidate> for CandidateReport {
    fn from(c: &Candidate) -> Self {
        Self {
            tp: c.tp,
            cp: c.cp,
            pp: c.pp,
            vpp: c.vpp,
            ep: c.ep,
            etp: c.etp,
            micro_batch_size: c.mbs,
            recompute: c.recompute.name(),
            decoder_first_pipeline_num_layers: (c.first > 0).then_some(c.first),
            decoder_last_pipeline_num_layers: (c.last > 0).then_some(c.last),
            account_for_embedding_and_loss_in_pipeline_split: c.account,
            padded_with_noop_layers: c.padded,
        }
    }
}

/// One result of a search: the layout and its report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SearchResult {
    pub layout: CandidateReport,
    pub report: Report,
}

/// The answer of a search: the best layouts, fastest first, and the counts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SearchReport {
    pub results: Vec<SearchResult>,
    pub stats: SearchStats,
}

fn gib(b: f64) -> f64 {
    b / GIB
}

fn memory(
    s: &StageCost,
    reserved: f64,
    capacity: f64,
    parameters: f64,
    stage: usize,
) -> MemoryReport {
    let total = s.total_memory(reserved);
    MemoryReport {
        weights: gib(s.weights),
        gradients: gib(s.grads),
        optimizer: gib(s.optimizer),
        optimizer_without_distributed_optimizer: gib(s.optimizer_no_distopt),
        activations: ActivationReport {
            attention: gib(s.act_attn),
            mlp: gib(s.act_mlp),
            embedding_and_logits: gib(s.act_embed),
            total: gib(s.activations()),
        },
        moe_dispatch_and_transient: gib(s.transient),
        inflight_microbatches: s.inflight,
        recompute_savings: gib(
            (s.act_no_recompute - s.act_attn - s.act_mlp - s.offload_saved).max(0.0),
        ),
        offload_savings: gib(s.offload_saved),
        reserved: gib(reserved),
        total: gib(total),
        capacity: gib(capacity),
        fits: total <= capacity,
        parameters,
        stage,
    }
}

impl Evaluation {
    /// The report of this evaluation of `cfg`.
    pub fn report(&self, cfg: &SimConfig) -> Report {
        let m = &cfg.model;
        let p = &cfg.parallel;
        let t = &cfg.training;
        let tokens = t.global_batch_size as f64 * t.seq_length as f64;
        let (total, active) = model::param_totals(m);
        let nmb = self.num_microbatches as f64;
        let crit = &self.stages[self.critical_stage];
        let mut compute: Vec<(&'static str, f64)> = PARTS
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, nmb * crit.per_mb.compute[i]))
            .collect();
        compute.push((
            "recompute",
            nmb * crit.recompute.compute.iter().sum::<f64>(),
        ));
        let communication = COMMS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let (total, exposed) = match *name {
                    "pp" => (self.pp_total, self.pp_exposed),
                    "dp" => (self.dp_total, self.dp_exposed),
                    _ => (nmb * crit.per_mb.comm[i], nmb * crit.per_mb.exposed[i]),
                };
                let overlapped = (total - exposed).max(0.0);
                (
                    *name,
                    CommTime {
                        total,
                        exposed,
                        overlapped,
                    },
                )
            })
            .collect();
        let reserved = cfg.cluster.memory_reserved_gib * GIB;
        let mem_stage = self
            .stages
            .iter()
            .enumerate()
            .fold((0, f64::MIN), |a, (i, s)| {
                let v = s.total_memory(reserved);
                if v > a.1 {
                    (i, v)
                } else {
                    a
                }
            })
            .0;
        let per_stage = self
            .stages
            .iter()
            .zip(&self.stage_layers)
            .map(|(s, &(d, mo))| StageReport {
                dense_layers: d,
                moe_layers: mo,
                time_per_microbatch_s: s.per_mb.time() + s.offload_time,
                memory_gib: gib(s.total_memory(reserved)),
                weights_gib: gib(s.weights),
                gradients_gib: gib(s.grads),
                optimizer_gib: gib(s.optimizer),
                activations_gib: gib(s.activations()),
                parameters: s.params.per_device(p.tp, self.etp, p.ep),
            })
            .collect();
        // Coupled layouts take ETP = TP and EP inside DP; anything else folds the experts
        // over other dimensions.
        let folded = self.etp != p.tp || (p.ep > 1 && p.cp > 1);
        let recompute_config = match t.recompute_granularity {
            Recompute::None => None,
            Recompute::Full => Some(RecomputeConfig::Full {
                recompute_method: match t.recompute_method {
                    RecomputeMethod::Uniform => "uniform",
                    RecomputeMethod::Block => "block",
                },
                recompute_num_layers: t.recompute_num_layers.unwrap_or(1),
            }),
            Recompute::Selective => Some(RecomputeConfig::Selective {
                recompute_modules: t.recompute_modules.names(),
            }),
        };
        let recompute = recompute_config.as_ref().map(RecomputeConfig::label);
        let world = self.world as f64;
        let ms = &self.stages[mem_stage];
        Report {
            model: ModelReport {
                name: m.name.clone(),
                parameters: total,
                active_parameters: active,
                flops_per_token: self.flops_per_step / tokens,
                flops_per_token_noncausal: self.flops_per_step_noncausal / tokens,
                flops_per_step: self.flops_per_step,
                flops_per_step_noncausal: self.flops_per_step_noncausal,
            },
            layout: LayoutReport {
                world_size: self.world,
                tp: p.tp,
                cp: p.cp,
                pp: p.pp,
                vpp: self.vpp,
                ep: p.ep,
                etp: self.etp,
                dp: self.dp,
                edp: self.edp,
                folded,
                micro_batch_size: t.micro_batch_size,
                num_microbatches: self.num_microbatches,
                recompute,
                recompute_config,
                stage_layers: self.stage_layers.iter().map(|&(d, m)| d + m).collect(),
                pipeline_model_parallel_layout: p.pipeline_model_parallel_layout.clone(),
            },
            time: TimeReport {
                step_s: self.step_time,
                tokens_per_s: self.tokens_per_s,
                tokens_per_s_per_device: self.tokens_per_s / world,
                tflops_per_device: self.flops_per_step / self.step_time / world / 1e12,
                tflops_per_device_noncausal: self.flops_per_step_noncausal
                    / self.step_time
                    / world
                    / 1e12,
                mfu: self.mfu,
                mfu_noncausal: self.mfu_noncausal,
            },
            breakdown_s: Breakdown {
                critical_stage: self.critical_stage,
                compute: Named(compute),
                communication: Named(communication),
                pipeline_bubble: self.bubble,
                optimizer: self.optimizer_time,
                offload: self.offload_time,
                per_stage,
            },
            memory_gib: memory(
                ms,
                reserved,
                self.memory_capacity,
                ms.params.per_device(p.tp, self.etp, p.ep),
                mem_stage,
            ),
            fits: self.fits,
        }
    }
}
