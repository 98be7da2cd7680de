//! The training section: batch sizes, precision, recomputation, the dispatcher, the
//! optimizer and the overlap flags.

use super::value::{dtype_bytes, unknown, Value};
use crate::error::{ensure, invalid, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    Fp16,
    Fp8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recompute {
    None,
    Selective,
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecomputeMethod {
    Uniform,
    Block,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatcher {
    AllToAll,
    AllGather,
    /// DeepEP / HybridEP: a token crosses the slow network once per destination node.
    Flex,
}

/// Megatron's `--cuda-graph-scope` (with `--cuda-graph-impl transformer_engine`): the parts
/// of each layer captured as CUDA graphs, launched as one graph instead of kernel by kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaGraphScope {
    pub attn: bool,
    pub moe_router: bool,
    pub moe_preprocess: bool,
}

impl CudaGraphScope {
    pub const NAMES: &'static [&'static str] = &["attn", "moe_router", "moe_preprocess"];

    pub fn parse(names: &[String], key: &str) -> Result<Self> {
        let mut g = Self::default();
        for n in names {
            match n.as_str() {
                "attn" => g.attn = true,
                "moe_router" => g.moe_router = true,
                "moe_preprocess" => g.moe_preprocess = true,
                other => {
                    return Err(invalid(
                        key,
                        format!(
                            "unknown scope '{other}' (expected some of {})",
                            Self::NAMES.join(", ")
                        ),
                    ))
                }
            }
        }
        Ok(g)
    }
}

/// Megatron's `--recompute-modules`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecomputeModules {
    pub core_attn: bool,
    pub moe_act: bool,
    pub layernorm: bool,
    pub mla_up_proj: bool,
    pub mlp: bool,
    pub moe: bool,
    pub shared_experts: bool,
}

impl RecomputeModules {
    pub const NAMES: &'static [&'static str] = &[
        "core_attn",
        "moe_act",
        "layernorm",
        "mla_up_proj",
        "mlp",
        "moe",
        "shared_experts",
    ];

    pub fn parse(names: &[String], key: &str) -> Result<Self> {
        let mut m = Self::default();
        for n in names {
            match n.as_str() {
                "core_attn" => m.core_attn = true,
                "moe_act" => m.moe_act = true,
                "layernorm" => m.layernorm = true,
                "mla_up_proj" => m.mla_up_proj = true,
                "mlp" => m.mlp = true,
                "moe" => m.moe = true,
                "shared_experts" => m.shared_experts = true,
                other => {
                    return Err(invalid(
                        key,
                        format!(
                            "unknown module '{other}' (expected some of {})",
                            Self::NAMES.join(", ")
                        ),
                    ))
                }
            }
        }
        Ok(m)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let flags = [
            self.core_attn,
            self.moe_act,
            self.layernorm,
            self.mla_up_proj,
            self.mlp,
            self.moe,
            self.shared_experts,
        ];
        Self::NAMES
            .iter()
            .zip(flags)
            .filter(|(_, f)| *f)
            .map(|(n, _)| *n)
            .collect()
    }
}

/// Training arguments.
#[derive(Clone, Debug)]
pub struct Training {
    pub seq_length: usize,
    pub global_batch_size: usize,
    pub micro_batch_size: usize,
    pub precision: Precision,
    pub recompute_granularity: Recompute,
    pub recompute_method: RecomputeMethod,
    pub recompute_num_layers: Option<usize>,
    pub recompute_modules: RecomputeModules,
    /// `None` = dropless.
    pub moe_expert_capacity_factor: Option<f64>,
    pub moe_pad_expert_input_to_capacity: bool,
    /// moerail: the busiest expert-parallel rank's load over the mean in dropless training
    /// (1.0 = perfectly balanced, e.g. with forced balancing).
    pub moe_expert_load_imbalance: f64,
    /// moerail: the dispatch (forward) and the scatter of output gradients to the experts
    /// (backward) send FP8 rows with a 32-bit scale per 128 elements; the combine and its
    /// backward stay BF16 (DeepSeek-V3, arXiv 2412.19437, Section 3.3.2). Default false.
    pub moe_dispatch_fp8: bool,
    /// Parts of each layer launched as CUDA graphs (`cuda_graph_scope`).
    pub cuda_graph_scope: CudaGraphScope,
    /// Default all-to-all (Megatron's own default is allgather).
    pub moe_token_dispatcher_type: Dispatcher,
    /// Default true (Megatron: false).
    pub moe_grouped_gemm: bool,
    /// Default true (Megatron: false).
    pub use_distributed_optimizer: bool,
    pub num_distributed_optimizer_instances: usize,
    /// Default true (Megatron: false).
    pub overlap_grad_reduce: bool,
    /// Default: on with the distributed optimizer and overlapped gradient reduce (Megatron:
    /// off; it needs both).
    pub overlap_param_gather: Option<bool>,
    pub tp_comm_overlap: bool,
    pub moe_shared_expert_overlap: bool,
    pub overlap_moe_expert_parallel_comm: bool,
    pub overlap_p2p_comm: bool,
    /// Default true (required by Megatron for MoE with TP > 1); ignored at TP = 1.
    pub sequence_parallel: bool,
    pub grad_reduce_in_bf16: bool,
    pub main_grads_bytes: f64,
    pub main_params_bytes: f64,
    pub exp_avg_bytes: f64,
    pub exp_avg_sq_bytes: f64,
    pub use_precision_aware_optimizer: bool,
    pub cpu_offloading_num_layers: usize,
    pub optimizer_cpu_offload: bool,
    pub optimizer_offload_fraction: f64,
    pub ddp_bucket_size: Option<usize>,
}

impl Default for Training {
    fn default() -> Self {
        Self {
            seq_length: 0,
            global_batch_size: 0,
            micro_batch_size: 1,
            precision: Precision::Bf16,
            recompute_granularity: Recompute::None,
            recompute_method: RecomputeMethod::Uniform,
            recompute_num_layers: None,
            recompute_modules: RecomputeModules {
                core_attn: true,
                ..Default::default()
            },
            moe_expert_capacity_factor: None,
            moe_pad_expert_input_to_capacity: false,
            moe_expert_load_imbalance: 1.0,
            moe_dispatch_fp8: false,
            cuda_graph_scope: CudaGraphScope::default(),
            moe_token_dispatcher_type: Dispatcher::AllToAll,
            moe_grouped_gemm: true,
            use_distributed_optimizer: true,
            num_distributed_optimizer_instances: 1,
            overlap_grad_reduce: true,
            overlap_param_gather: None,
            tp_comm_overlap: false,
            moe_shared_expert_overlap: false,
            overlap_moe_expert_parallel_comm: false,
            overlap_p2p_comm: true,
            sequence_parallel: true,
            grad_reduce_in_bf16: false,
            main_grads_bytes: 4.0,
            main_params_bytes: 4.0,
            exp_avg_bytes: 4.0,
            exp_avg_sq_bytes: 4.0,
            use_precision_aware_optimizer: false,
            cpu_offloading_num_layers: 0,
            optimizer_cpu_offload: false,
            optimizer_offload_fraction: 1.0,
            ddp_bucket_size: None,
        }
    }
}

impl Training {
    pub const KEYS: &'static [&'static str] = &[
        "seq_length",
        "global_batch_size",
        "micro_batch_size",
        "precision",
        "bf16",
        "fp16",
        "fp8",
        "fp8_format",
        "recompute_granularity",
        "recompute_method",
        "recompute_num_layers",
        "recompute_modules",
        "moe_expert_capacity_factor",
        "moe_pad_expert_input_to_capacity",
        "moe_expert_load_imbalance",
        "moe_dispatch_fp8",
        "cuda_graph_scope",
        "moe_token_dispatcher_type",
        "moe_grouped_gemm",
        "use_distributed_optimizer",
        "num_distributed_optimizer_instances",
        "overlap_grad_reduce",
        "overlap_param_gather",
        "tp_comm_overlap",
        "moe_shared_expert_overlap",
        "overlap_moe_expert_parallel_comm",
        "overlap_p2p_comm",
        "sequence_parallel",
        "grad_reduce_in_bf16",
        "main_grads_dtype",
        "main_params_dtype",
        "exp_avg_dtype",
        "exp_avg_sq_dtype",
        "use_precision_aware_optimizer",
        "cpu_offloading_num_layers",
        "optimizer_cpu_offload",
        "optimizer_offload_fraction",
        "ddp_bucket_size",
    ];

    pub(super) fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
        match key {
            "seq_length" => self.seq_length = v.positive(arg)?,
            "global_batch_size" => self.global_batch_size = v.positive(arg)?,
            "micro_batch_size" => self.micro_batch_size = v.positive(arg)?,
            "precision" => {
                self.precision = match v.str(arg)?.to_ascii_lowercase().as_str() {
                    "bf16" | "bfloat16" => Precision::Bf16,
                    "fp16" | "float16" => Precision::Fp16,
                    "fp8" | "e4m3" | "hybrid" | "mxfp8" => Precision::Fp8,
                    other => {
                        return Err(invalid(
                            arg,
                            format!("expected 'bf16', 'fp16' or 'fp8', got '{other}'"),
                        ))
                    }
                }
            }
            "bf16" => {
                if v.bool(arg)? {
                    self.precision = Precision::Bf16
                }
            }
            "fp16" => {
                if v.bool(arg)? {
                    self.precision = Precision::Fp16
                }
            }
            "fp8" => {
                if v.bool(arg)? {
                    self.precision = Precision::Fp8
                }
            }
            "fp8_format" => {
                if v.opt_str(arg)?.is_some() {
                    self.precision = Precision::Fp8
                }
            }
            "recompute_granularity" => {
                self.recompute_granularity = match v.opt_str(arg)?.as_deref() {
                    None => Recompute::None,
                    Some("full") => Recompute::Full,
                    Some("selective") => Recompute::Selective,
                    Some(other) => {
                        return Err(invalid(
                            arg,
                            format!("expected 'full', 'selective' or none, got '{other}'"),
                        ))
                    }
                }
            }
            "recompute_method" => {
                self.recompute_method = match v.opt_str(arg)?.as_deref() {
                    None | Some("uniform") => RecomputeMethod::Uniform,
                    Some("block") => RecomputeMethod::Block,
                    Some(other) => {
                        return Err(invalid(
                            arg,
                            format!("expected 'uniform' or 'block', got '{other}'"),
                        ))
                    }
                }
            }
            "recompute_num_layers" => self.recompute_num_layers = v.opt_positive(arg)?,
            "recompute_modules" => {
                self.recompute_modules = RecomputeModules::parse(&v.strs(arg)?, arg)?
            }
            "moe_expert_capacity_factor" => {
                self.moe_expert_capacity_factor = match v {
                    Value::None => None,
                    v => Some(v.pos_f64(arg)?),
                }
            }
            "moe_pad_expert_input_to_capacity" => {
                self.moe_pad_expert_input_to_capacity = v.bool(arg)?
            }
            "moe_expert_load_imbalance" => {
                let x = v.f64(arg)?;
                ensure(x >= 1.0, arg, || {
                    format!("must be >= 1 (max over mean), got {x}")
                })?;
                self.moe_expert_load_imbalance = x;
            }
            "moe_dispatch_fp8" => self.moe_dispatch_fp8 = v.bool(arg)?,
            "cuda_graph_scope" => {
                self.cuda_graph_scope = CudaGraphScope::parse(&v.strs(arg)?, arg)?
            }
            "moe_token_dispatcher_type" => {
                self.moe_token_dispatcher_type = match v.str(arg)?.as_str() {
                    "alltoall" | "alltoall_seq" => Dispatcher::AllToAll,
                    "allgather" => Dispatcher::AllGather,
                    "flex" => Dispatcher::Flex,
                    other => {
                        return Err(invalid(
                            arg,
                            format!("expected 'alltoall', 'allgather' or 'flex', got '{other}'"),
                        ))
                    }
                }
            }
            "moe_grouped_gemm" => self.moe_grouped_gemm = v.bool(arg)?,
            "use_distributed_optimizer" => self.use_distributed_optimizer = v.bool(arg)?,
            "num_distributed_optimizer_instances" => {
                self.num_distributed_optimizer_instances = v.positive(arg)?
            }
            "overlap_grad_reduce" => self.overlap_grad_reduce = v.bool(arg)?,
            "overlap_param_gather" => self.overlap_param_gather = Some(v.bool(arg)?),
            "tp_comm_overlap" => self.tp_comm_overlap = v.bool(arg)?,
            "moe_shared_expert_overlap" => self.moe_shared_expert_overlap = v.bool(arg)?,
            "overlap_moe_expert_parallel_comm" => {
                self.overlap_moe_expert_parallel_comm = v.bool(arg)?
            }
            "overlap_p2p_comm" => self.overlap_p2p_comm = v.bool(arg)?,
            "sequence_parallel" => self.sequence_parallel = v.bool(arg)?,
            "grad_reduce_in_bf16" => self.grad_reduce_in_bf16 = v.bool(arg)?,
            "main_grads_dtype" => self.main_grads_bytes = dtype_bytes(&v.str(arg)?, arg)?,
            "main_params_dtype" => self.main_params_bytes = dtype_bytes(&v.str(arg)?, arg)?,
            "exp_avg_dtype" => self.exp_avg_bytes = dtype_bytes(&v.str(arg)?, arg)?,
            "exp_avg_sq_dtype" => self.exp_avg_sq_bytes = dtype_bytes(&v.str(arg)?, arg)?,
            "use_precision_aware_optimizer" => self.use_precision_aware_optimizer = v.bool(arg)?,
            "cpu_offloading_num_layers" => self.cpu_offloading_num_layers = v.usize(arg)?,
            "optimizer_cpu_offload" => self.optimizer_cpu_offload = v.bool(arg)?,
            "optimizer_offload_fraction" => self.optimizer_offload_fraction = v.fraction(arg)?,
            "ddp_bucket_size" => self.ddp_bucket_size = v.opt_positive(arg)?,
            _ => return Err(unknown(arg, Self::KEYS)),
        }
        Ok(())
    }

    /// Bytes of optimizer state per parameter (master copy + Adam moments).
    pub fn optimizer_state_bytes(&self) -> f64 {
        if self.use_precision_aware_optimizer {
            self.main_params_bytes + self.exp_avg_bytes + self.exp_avg_sq_bytes
        } else {
            12.0
        }
    }

    /// Whether the parameter all-gather overlaps the forward pass.
    pub fn param_gather_overlapped(&self) -> bool {
        self.overlap_param_gather
            .unwrap_or(self.use_distributed_optimizer && self.overlap_grad_reduce)
    }

    pub fn grad_bytes(&self) -> f64 {
        if self.use_precision_aware_optimizer {
            self.main_grads_bytes
        } else {
            4.0
        }
    }
}
