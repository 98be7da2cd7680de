//! Simulator inputs, under Megatron-LM's argument names (`--hidden-size` is `hidden_size`).
//!
//! A configuration is four sections — model, training, layout, cluster — set key by key with
//! [`SimConfig::set`]; every key is checked for type and range there, and the cross-field
//! rules (divisibility, folding) in [`SimConfig::validate`]. Errors name the key.
//!
//! Defaults follow Megatron-LM, except where a MoE training recipe always sets the flag
//! (documented on the field): the all-to-all dispatcher, grouped GEMM, the distributed
//! optimizer with overlapped gradient reduce and parameter gather, and sequence parallelism
//! when TP > 1 (Megatron requires it for MoE with TP). A Megatron command line read by the
//! Python front sets all of these explicitly, so its absent flags keep Megatron's meaning.
//!
//! One file per section, plus the values they are read from:
//!
//! * [`value`]: [`Value`] and its typed reading; the unknown-key error.
//! * [`model`]: [`Model`] (Megatron's model arguments).
//! * [`training`]: [`Training`] (batch, precision, recomputation, dispatcher, optimizer).
//! * [`parallel`]: [`Parallel`] (the layout) and [`stage_layers`], the split of the model's
//!   layers over the pipeline stages.
//! * [`cluster`]: [`Cluster`] and [`Efficiency`] (device speeds and the cost model's
//!   efficiencies).
//!
//! Dependencies run one way: `sim::model` (parameter counts, FLOPs) and `sim::engine` read
//! these types; nothing here reads `sim::model`.

mod cluster;
mod model;
mod parallel;
mod training;
mod value;

pub use cluster::{Cluster, Efficiency};
pub use model::{LayerFreq, Model, Normalization};
pub use parallel::{parse_layout, stage_layers, Parallel, Stage};
pub use training::{
    CudaGraphScope, Dispatcher, Precision, Recompute, RecomputeMethod, RecomputeModules, Training,
};
pub use value::Value;

use crate::error::{ensure, invalid, Result};
use value::unknown;

/// A complete simulator input.
#[derive(Clone, Debug, Default)]
pub struct SimConfig {
    pub model: Model,
    pub training: Training,
    pub parallel: Parallel,
    pub cluster: Cluster,
}

/// The sections and their keys (for documentation and the Python front).
pub fn sections() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut cluster = Cluster::KEYS.to_vec();
    cluster.extend_from_slice(Efficiency::KEYS);
    vec![
        ("model", Model::KEYS.to_vec()),
        ("training", Training::KEYS.to_vec()),
        ("layout", Parallel::KEYS.to_vec()),
        ("cluster", cluster),
    ]
}

impl SimConfig {
    /// Sets `key` (optionally `section.key`) to `v`. Keys without a section are looked up in
    /// every section (Megatron's argument names do not collide).
    pub fn set(&mut self, key: &str, v: &Value) -> Result<()> {
        let (section, name) = match key.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, key),
        };
        let in_cluster = |n: &str| Cluster::KEYS.contains(&n) || Efficiency::KEYS.contains(&n);
        let section = match section {
            Some(s) => s,
            None if Model::KEYS.contains(&name) => "model",
            None if Training::KEYS.contains(&name) => "training",
            None if Parallel::KEYS.contains(&name) => "layout",
            None if in_cluster(name) => "cluster",
            None => {
                let mut all: Vec<&str> = Vec::new();
                for (_, keys) in sections() {
                    all.extend(keys);
                }
                return Err(unknown(key, &all));
            }
        };
        match section {
            "model" => self.model.set(name, key, v),
            "training" => self.training.set(name, key, v),
            "layout" | "parallel" => self.parallel.set(name, key, v),
            "cluster" | "efficiency" => self.cluster.set(name, key, v),
            other => Err(invalid(
                key,
                format!("unknown section '{other}' (expected model, training, layout or cluster)"),
            )),
        }
    }

    /// The number of devices: `layout.world_size`, else `cluster.devices`.
    pub fn world_size(&self) -> Result<usize> {
        self.parallel
            .world_size
            .or(self.cluster.devices)
            .ok_or_else(|| {
                invalid(
                    "devices",
                    "is required (cluster.devices or layout.world_size)",
                )
            })
    }

    /// Checks the whole configuration; the simulator calls it first.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.cluster.validate()?;
        let (m, t, p) = (&self.model, &self.training, &self.parallel);
        ensure(t.seq_length >= 1, "seq_length", || "is required".into())?;
        ensure(t.global_batch_size >= 1, "global_batch_size", || {
            "is required".into()
        })?;
        let world = self.world_size()?;
        let etp = p.etp();
        let model_par = p.tp * p.cp * p.pp;
        ensure(world % model_par == 0, "world_size", || {
            format!(
                "{world} devices are not divisible by tp*cp*pp = {}*{}*{} = {model_par}",
                p.tp, p.cp, p.pp
            )
        })?;
        let expert_par = etp * p.ep * p.pp;
        ensure(world % expert_par == 0, "world_size", || {
            format!(
                "{world} devices are not divisible by etp*ep*pp = {etp}*{}*{} = {expert_par}",
                p.ep, p.pp
            )
        })?;
        let dp = world / model_par;
        ensure(
            m.num_attention_heads % p.tp == 0,
            "tensor_model_parallel_size",
            || {
                format!(
                    "{} does not divide num_attention_heads ({})",
                    p.tp, m.num_attention_heads
                )
            },
        )?;
        if !m.multi_latent_attention {
            ensure(
                m.query_groups() % p.tp == 0,
                "tensor_model_parallel_size",
                || {
                    format!(
                        "{} does not divide num_query_groups ({})",
                        p.tp,
                        m.query_groups()
                    )
                },
            )?;
        }
        if m.is_moe() {
            ensure(
                m.experts() % p.ep == 0,
                "expert_model_parallel_size",
                || format!("{} does not divide num_moe_experts ({})", p.ep, m.experts()),
            )?;
            ensure(
                m.moe_ffn() % etp == 0,
                "expert_tensor_parallel_size",
                || {
                    format!(
                        "{etp} does not divide moe_ffn_hidden_size ({})",
                        m.moe_ffn()
                    )
                },
            )?;
            if p.tp > 1 {
                ensure(t.sequence_parallel, "sequence_parallel", || {
                    "must be true for MoE with tensor parallelism (Megatron requires it)".into()
                })?;
            }
        } else {
            ensure(p.ep == 1, "expert_model_parallel_size", || {
                "must be 1 for a dense model (num_moe_experts is not set)".into()
            })?;
        }
        ensure(m.ffn() % p.tp == 0, "tensor_model_parallel_size", || {
            format!("{} does not divide ffn_hidden_size ({})", p.tp, m.ffn())
        })?;
        if p.cp > 1 {
            let unit = 2
                * p.cp
                * if p.tp > 1 && t.sequence_parallel {
                    p.tp
                } else {
                    1
                };
            ensure(t.seq_length % unit == 0, "context_parallel_size", || {
                format!(
                    "seq_length ({}) must be divisible by 2*cp{} = {unit} for load-balanced context parallelism",
                    t.seq_length,
                    if unit > 2 * p.cp { "*tp" } else { "" }
                )
            })?;
        } else if p.tp > 1 && t.sequence_parallel {
            ensure(t.seq_length % p.tp == 0, "seq_length", || {
                format!(
                    "{} must be divisible by tp ({}) with sequence parallelism",
                    t.seq_length, p.tp
                )
            })?;
        }
        let per_iter = t.micro_batch_size * dp;
        ensure(
            t.global_batch_size % per_iter == 0,
            "global_batch_size",
            || {
                format!(
                    "{} is not divisible by micro_batch_size * dp = {} * {dp} = {per_iter}",
                    t.global_batch_size, t.micro_batch_size
                )
            },
        )?;
        let nmb = t.global_batch_size / per_iter;
        // Pipeline split and interleaving.
        stage_layers(m, p)?;
        if self.vpp()?.is_some() {
            ensure(p.pp > 1, "virtual_pipeline_model_parallel_size", || {
                "needs pipeline_model_parallel_size > 1".into()
            })?;
            ensure(nmb % p.pp == 0, "global_batch_size", || {
                format!(
                    "the interleaved schedule needs the number of micro-batches ({nmb}) divisible by pp ({})",
                    p.pp
                )
            })?;
        }
        if let Some(cf) = t.moe_expert_capacity_factor {
            ensure(
                t.moe_token_dispatcher_type != Dispatcher::Flex,
                "moe_expert_capacity_factor",
                || format!("{cf}: token dropping is not supported by the flex dispatcher"),
            )?;
        }
        if t.recompute_granularity == Recompute::Full {
            ensure(
                t.recompute_num_layers.is_some(),
                "recompute_num_layers",
                || "is required with recompute_granularity 'full'".into(),
            )?;
        }
        if t.overlap_param_gather == Some(true) {
            ensure(
                t.use_distributed_optimizer && t.overlap_grad_reduce,
                "overlap_param_gather",
                || "needs use_distributed_optimizer and overlap_grad_reduce".into(),
            )?;
        }
        let inst = t.num_distributed_optimizer_instances;
        if inst > 1 {
            let edp = world / expert_par;
            ensure(
                (dp * p.cp) % inst == 0 && edp % inst == 0,
                "num_distributed_optimizer_instances",
                || {
                    format!(
                        "{inst} must divide dp*cp ({}) and the expert dp ({edp})",
                        dp * p.cp
                    )
                },
            )?;
        }
        // The rank grids themselves (order string, folding constraints). With pp last in the
        // order both grids have the same pipeline groups; otherwise build and compare them.
        let order = p.order.trim().to_ascii_lowercase();
        if order.ends_with("pp") {
            crate::parallel::RankGenerator::new(p.tp, 1, dp, p.pp, p.cp, &p.order)?;
            crate::parallel::RankGenerator::new(etp, p.ep, world / expert_par, p.pp, 1, &p.order)?;
            Ok(())
        } else {
            crate::parallel::ParallelLayout::new(world, p.tp, p.cp, p.pp, p.ep, Some(etp), &p.order)
                .map(|_| ())
        }
    }

    /// Virtual pipeline size in effect (`None` = no interleaving).
    pub fn vpp(&self) -> Result<Option<usize>> {
        let p = &self.parallel;
        if let Some(text) = &p.pipeline_model_parallel_layout {
            let chunks = parallel::parse_layout(text)
                .map_err(|e| invalid("pipeline_model_parallel_layout", e))?
                .len();
            return Ok(Some(chunks / p.pp.max(1)).filter(|&v| v > 1));
        }
        let v = match (p.vpp, p.num_layers_per_virtual_pipeline_stage) {
            (Some(v), _) => Some(v),
            (None, Some(n)) => {
                let layers = self.model.num_layers
                    + usize::from(p.account_for_embedding_in_pipeline_split)
                    + usize::from(p.account_for_loss_in_pipeline_split);
                let per_stage = layers / p.pp.max(1);
                ensure(
                    per_stage % n == 0 && layers % p.pp == 0,
                    "num_layers_per_virtual_pipeline_stage",
                    || format!("{n} does not divide the {per_stage} layers of a pipeline stage"),
                )?;
                Some(per_stage / n)
            }
            (None, None) => None,
        };
        Ok(v.filter(|&v| v > 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_route_to_sections_and_errors_name_them() {
        let mut c = SimConfig::default();
        c.set("hidden_size", &Value::Int(4096)).unwrap();
        assert_eq!(c.model.hidden_size, 4096);
        c.set("layout.tensor_model_parallel_size", &Value::Int(2))
            .unwrap();
        assert_eq!(c.parallel.tp, 2);
        let e = c.set("hiden_size", &Value::Int(1)).unwrap_err().to_string();
        assert!(
            e.starts_with("hiden_size: unknown key (did you mean hidden_size"),
            "{e}"
        );
        let e = c
            .set("model.num_layers", &Value::Int(-3))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("model.num_layers:"), "{e}");
        let e = c
            .set(
                "training.recompute_modules",
                &Value::StrList(vec!["attn".into()]),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown module 'attn'"), "{e}");
        let e = c
            .set("cluster.gemm_efficiency", &Value::Float(1.5))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cluster.gemm_efficiency: must be in (0, 1]"),
            "{e}"
        );
    }

    #[test]
    fn moe_pattern_semantics() {
        let mut m = Model {
            num_layers: 6,
            num_moe_experts: Some(8),
            ..Default::default()
        };
        assert_eq!(m.moe_pattern(), vec![true; 6]);
        m.moe_layer_freq = LayerFreq::Every(2);
        assert_eq!(m.moe_pattern(), vec![true, false, true, false, true, false]);
        m.set(
            "moe_layer_freq",
            "moe_layer_freq",
            &Value::IntList(vec![0, 0, 1, 1, 1, 1]),
        )
        .unwrap();
        assert_eq!(m.moe_pattern(), vec![false, false, true, true, true, true]);
    }
}
