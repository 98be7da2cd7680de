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

use crate::error::{ensure, invalid, Result};

/// A configuration value as it arrives from a file or a command line.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    IntList(Vec<i64>),
    StrList(Vec<String>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::IntList(_) => "a list of integers",
            Value::StrList(_) => "a list of strings",
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            Value::Float(f) if f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15 => Ok(*f as usize),
            Value::Int(i) => Err(invalid(key, format!("must be >= 0, got {i}"))),
            other => Err(invalid(
                key,
                format!("expected a non-negative integer, got {}", other.kind()),
            )),
        }
    }

    fn positive(&self, key: &str) -> Result<usize> {
        let v = self.usize(key)?;
        ensure(v >= 1, key, || format!("must be >= 1, got {v}"))?;
        Ok(v)
    }

    fn opt_positive(&self, key: &str) -> Result<Option<usize>> {
        match self {
            Value::None => Ok(None),
            v => v.positive(key).map(Some),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = match self {
            Value::Int(i) => *i as f64,
            Value::Float(f) => *f,
            other => {
                return Err(invalid(
                    key,
                    format!("expected a number, got {}", other.kind()),
                ))
            }
        };
        ensure(v.is_finite(), key, || format!("must be finite, got {v}"))?;
        Ok(v)
    }

    fn pos_f64(&self, key: &str) -> Result<f64> {
        let v = self.f64(key)?;
        ensure(v > 0.0, key, || format!("must be > 0, got {v}"))?;
        Ok(v)
    }

    fn nonneg_f64(&self, key: &str) -> Result<f64> {
        let v = self.f64(key)?;
        ensure(v >= 0.0, key, || format!("must be >= 0, got {v}"))?;
        Ok(v)
    }

    fn fraction(&self, key: &str) -> Result<f64> {
        let v = self.f64(key)?;
        ensure((0.0..=1.0).contains(&v), key, || {
            format!("must be in [0, 1], got {v}")
        })?;
        Ok(v)
    }

    fn bool(&self, key: &str) -> Result<bool> {
        match self {
            Value::Bool(b) => Ok(*b),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            other => Err(invalid(
                key,
                format!("expected true or false, got {}", other.kind()),
            )),
        }
    }

    fn str(&self, key: &str) -> Result<String> {
        match self {
            Value::Str(s) => Ok(s.clone()),
            other => Err(invalid(
                key,
                format!("expected a string, got {}", other.kind()),
            )),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self {
            Value::None => Ok(None),
            Value::Str(s) if s.eq_ignore_ascii_case("none") || s.is_empty() => Ok(None),
            v => v.str(key).map(Some),
        }
    }

    fn strs(&self, key: &str) -> Result<Vec<String>> {
        match self {
            Value::None => Ok(Vec::new()),
            Value::Str(s) => Ok(s
                .split([',', ' '])
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()),
            Value::StrList(v) => Ok(v.clone()),
            Value::IntList(v) if v.is_empty() => Ok(Vec::new()),
            other => Err(invalid(
                key,
                format!("expected a list of strings, got {}", other.kind()),
            )),
        }
    }
}

/// Parses a dtype name of the optimizer options.
fn dtype_bytes(s: &str, key: &str) -> Result<f64> {
    match s.to_ascii_lowercase().as_str() {
        "fp32" | "float32" | "torch.float32" => Ok(4.0),
        "bf16" | "bfloat16" | "torch.bfloat16" | "fp16" | "float16" | "torch.float16" => Ok(2.0),
        "fp8" | "uint8" | "torch.uint8" => Ok(1.0),
        other => Err(invalid(
            key,
            format!("unknown dtype '{other}' (expected fp32, bf16, fp16 or fp8)"),
        )),
    }
}

/// Megatron's `moe_layer_freq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerFreq {
    Every(usize),
    Pattern(Vec<bool>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    LayerNorm,
    RmsNorm,
}

/// The model, as Megatron's model arguments describe it.
#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    /// `num_query_groups`; used only with `group_query_attention` (as in Megatron). Setting
    /// `num_query_groups` in a file turns `group_query_attention` on unless it is set false.
    pub num_query_groups: Option<usize>,
    pub group_query_attention: Option<bool>,
    pub kv_channels: Option<usize>,
    pub ffn_hidden_size: Option<usize>,
    pub swiglu: bool,
    pub vocab_size: usize,
    pub make_vocab_size_divisible_by: usize,
    pub padded_vocab_size: Option<usize>,
    pub num_moe_experts: Option<usize>,
    pub moe_router_topk: usize,
    pub moe_ffn_hidden_size: Option<usize>,
    pub moe_shared_expert_intermediate_size: Option<usize>,
    pub moe_shared_expert_gate: bool,
    /// `moe_layer_freq`: an integer `k` (every k-th layer is MoE, from layer 0) or a
    /// per-layer 0/1 list.
    pub moe_layer_freq: LayerFreq,
    pub moe_router_num_groups: Option<usize>,
    pub moe_router_group_topk: Option<usize>,
    pub multi_latent_attention: bool,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_head_dim: usize,
    pub qk_pos_emb_head_dim: usize,
    pub v_head_dim: usize,
    pub mtp_num_layers: usize,
    pub untie_embeddings_and_output_weights: bool,
    pub normalization: Normalization,
    /// Megatron's default is true; every MoE recipe passes `--disable-bias-linear`.
    pub add_bias_linear: bool,
    pub add_qkv_bias: bool,
    pub qk_layernorm: bool,
    /// Megatron's default is 0.1; MoE recipes set 0. A non-zero value stores dropout masks.
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            name: String::new(),
            num_layers: 0,
            hidden_size: 0,
            num_attention_heads: 0,
            num_query_groups: None,
            group_query_attention: None,
            kv_channels: None,
            ffn_hidden_size: None,
            swiglu: false,
            vocab_size: 0,
            make_vocab_size_divisible_by: 128,
            padded_vocab_size: None,
            num_moe_experts: None,
            moe_router_topk: 2,
            moe_ffn_hidden_size: None,
            moe_shared_expert_intermediate_size: None,
            moe_shared_expert_gate: false,
            moe_layer_freq: LayerFreq::Every(1),
            moe_router_num_groups: None,
            moe_router_group_topk: None,
            multi_latent_attention: false,
            q_lora_rank: None,
            kv_lora_rank: 32,
            qk_head_dim: 128,
            qk_pos_emb_head_dim: 64,
            v_head_dim: 128,
            mtp_num_layers: 0,
            untie_embeddings_and_output_weights: false,
            normalization: Normalization::LayerNorm,
            add_bias_linear: true,
            add_qkv_bias: false,
            qk_layernorm: false,
            hidden_dropout: 0.0,
            attention_dropout: 0.0,
        }
    }
}

impl Model {
    pub const KEYS: &'static [&'static str] = &[
        "name",
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "group_query_attention",
        "kv_channels",
        "ffn_hidden_size",
        "swiglu",
        "vocab_size",
        "make_vocab_size_divisible_by",
        "padded_vocab_size",
        "num_moe_experts",
        "num_experts",
        "moe_router_topk",
        "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size",
        "moe_shared_expert_gate",
        "moe_layer_freq",
        "moe_router_num_groups",
        "moe_router_group_topk",
        "multi_latent_attention",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_head_dim",
        "qk_pos_emb_head_dim",
        "v_head_dim",
        "mtp_num_layers",
        "untie_embeddings_and_output_weights",
        "normalization",
        "add_bias_linear",
        "disable_bias_linear",
        "add_qkv_bias",
        "qk_layernorm",
        "hidden_dropout",
        "attention_dropout",
    ];

    fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
        match key {
            "name" => self.name = v.str(arg)?,
            "num_layers" => self.num_layers = v.positive(arg)?,
            "hidden_size" => self.hidden_size = v.positive(arg)?,
            "num_attention_heads" => self.num_attention_heads = v.positive(arg)?,
            "num_query_groups" => self.num_query_groups = v.opt_positive(arg)?,
            "group_query_attention" => self.group_query_attention = Some(v.bool(arg)?),
            "kv_channels" => self.kv_channels = v.opt_positive(arg)?,
            "ffn_hidden_size" => self.ffn_hidden_size = v.opt_positive(arg)?,
            "swiglu" => self.swiglu = v.bool(arg)?,
            "vocab_size" => self.vocab_size = v.positive(arg)?,
            "make_vocab_size_divisible_by" => {
                self.make_vocab_size_divisible_by = v.positive(arg)?
            }
            "padded_vocab_size" => self.padded_vocab_size = v.opt_positive(arg)?,
            "num_moe_experts" | "num_experts" => self.num_moe_experts = v.opt_positive(arg)?,
            "moe_router_topk" => self.moe_router_topk = v.positive(arg)?,
            "moe_ffn_hidden_size" => self.moe_ffn_hidden_size = v.opt_positive(arg)?,
            "moe_shared_expert_intermediate_size" => {
                self.moe_shared_expert_intermediate_size = v.opt_positive(arg)?
            }
            "moe_shared_expert_gate" => self.moe_shared_expert_gate = v.bool(arg)?,
            "moe_layer_freq" => {
                self.moe_layer_freq = match v {
                    Value::Int(i) if *i >= 1 => LayerFreq::Every(*i as usize),
                    Value::IntList(l) if !l.is_empty() && l.iter().all(|&x| x == 0 || x == 1) => {
                        LayerFreq::Pattern(l.iter().map(|&x| x == 1).collect())
                    }
                    Value::Int(i) => return Err(invalid(arg, format!("must be >= 1, got {i}"))),
                    other => {
                        return Err(invalid(
                            arg,
                            format!(
                                "expected a positive integer or a list of 0/1 per layer, got {}",
                                other.kind()
                            ),
                        ))
                    }
                }
            }
            "moe_router_num_groups" => self.moe_router_num_groups = v.opt_positive(arg)?,
            "moe_router_group_topk" => self.moe_router_group_topk = v.opt_positive(arg)?,
            "multi_latent_attention" => self.multi_latent_attention = v.bool(arg)?,
            "q_lora_rank" => self.q_lora_rank = v.opt_positive(arg)?,
            "kv_lora_rank" => self.kv_lora_rank = v.positive(arg)?,
            "qk_head_dim" => self.qk_head_dim = v.positive(arg)?,
            "qk_pos_emb_head_dim" => self.qk_pos_emb_head_dim = v.usize(arg)?,
            "v_head_dim" => self.v_head_dim = v.positive(arg)?,
            "mtp_num_layers" => {
                self.mtp_num_layers = match v {
                    Value::None => 0,
                    v => v.usize(arg)?,
                }
            }
            "untie_embeddings_and_output_weights" => {
                self.untie_embeddings_and_output_weights = v.bool(arg)?
            }
            "normalization" => {
                self.normalization = match v.str(arg)?.to_ascii_lowercase().as_str() {
                    "layernorm" => Normalization::LayerNorm,
                    "rmsnorm" => Normalization::RmsNorm,
                    other => {
                        return Err(invalid(
                            arg,
                            format!("expected 'LayerNorm' or 'RMSNorm', got '{other}'"),
                        ))
                    }
                }
            }
            "add_bias_linear" => self.add_bias_linear = v.bool(arg)?,
            "disable_bias_linear" => self.add_bias_linear = !v.bool(arg)?,
            "add_qkv_bias" => self.add_qkv_bias = v.bool(arg)?,
            "qk_layernorm" => self.qk_layernorm = v.bool(arg)?,
            "hidden_dropout" => self.hidden_dropout = v.fraction(arg)?,
            "attention_dropout" => self.attention_dropout = v.fraction(arg)?,
            _ => return Err(unknown(arg, Self::KEYS)),
        }
        Ok(())
    }

    pub fn is_moe(&self) -> bool {
        self.num_moe_experts.is_some()
    }

    /// Query groups in effect (Megatron: all heads unless group query attention).
    pub fn query_groups(&self) -> usize {
        let gqa = self
            .group_query_attention
            .unwrap_or(self.num_query_groups.is_some());
        if gqa {
            self.num_query_groups.unwrap_or(self.num_attention_heads)
        } else {
            self.num_attention_heads
        }
    }

    pub fn kv_channels(&self) -> usize {
        self.kv_channels
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn ffn(&self) -> usize {
        self.ffn_hidden_size.unwrap_or(4 * self.hidden_size)
    }

    pub fn moe_ffn(&self) -> usize {
        self.moe_ffn_hidden_size.unwrap_or_else(|| self.ffn())
    }

    pub fn shared_ffn(&self) -> usize {
        self.moe_shared_expert_intermediate_size.unwrap_or(0)
    }

    pub fn experts(&self) -> usize {
        self.num_moe_experts.unwrap_or(0)
    }

    /// Per-layer MoE pattern (true = MoE MLP), Megatron's `moe_layer_freq` semantics.
    pub fn moe_pattern(&self) -> Vec<bool> {
        if !self.is_moe() {
            return vec![false; self.num_layers];
        }
        match &self.moe_layer_freq {
            LayerFreq::Every(k) => (0..self.num_layers).map(|i| i % k == 0).collect(),
            LayerFreq::Pattern(p) => p.clone(),
        }
    }

    /// Megatron's padded vocabulary: a multiple of `make_vocab_size_divisible_by * tp`.
    pub fn padded_vocab(&self, tp: usize) -> usize {
        if let Some(p) = self.padded_vocab_size {
            return p;
        }
        let m = self.make_vocab_size_divisible_by * tp.max(1);
        self.vocab_size.div_ceil(m) * m
    }

    fn validate(&self) -> Result<()> {
        ensure(self.num_layers >= 1, "num_layers", || "is required".into())?;
        ensure(self.hidden_size >= 1, "hidden_size", || {
            "is required".into()
        })?;
        ensure(self.num_attention_heads >= 1, "num_attention_heads", || {
            "is required".into()
        })?;
        ensure(self.vocab_size >= 1, "vocab_size", || "is required".into())?;
        let g = self.query_groups();
        ensure(
            g <= self.num_attention_heads && self.num_attention_heads % g == 0,
            "num_query_groups",
            || {
                format!(
                    "{g} must divide num_attention_heads ({})",
                    self.num_attention_heads
                )
            },
        )?;
        if self.kv_channels.is_none() && !self.multi_latent_attention {
            ensure(
                self.hidden_size % self.num_attention_heads == 0,
                "kv_channels",
                || {
                    format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({}): set kv_channels",
                    self.hidden_size, self.num_attention_heads
                )
                },
            )?;
        }
        if let Some(e) = self.num_moe_experts {
            ensure(self.moe_router_topk <= e, "moe_router_topk", || {
                format!("{} exceeds num_moe_experts ({e})", self.moe_router_topk)
            })?;
            if let LayerFreq::Pattern(p) = &self.moe_layer_freq {
                ensure(p.len() == self.num_layers, "moe_layer_freq", || {
                    format!(
                        "has {} entries, expected num_layers = {}",
                        p.len(),
                        self.num_layers
                    )
                })?;
            }
            if let (Some(ng), Some(gk)) = (self.moe_router_num_groups, self.moe_router_group_topk) {
                ensure(e % ng == 0, "moe_router_num_groups", || {
                    format!("{ng} must divide num_moe_experts ({e})")
                })?;
                ensure(gk <= ng, "moe_router_group_topk", || {
                    format!("{gk} exceeds moe_router_num_groups ({ng})")
                })?;
            }
        }
        if let Some(pv) = self.padded_vocab_size {
            ensure(pv >= self.vocab_size, "padded_vocab_size", || {
                format!("{pv} is smaller than vocab_size ({})", self.vocab_size)
            })?;
        }
        Ok(())
    }
}

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

    fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
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

/// The parallel layout: Megatron's parallel-size arguments.
#[derive(Clone, Debug)]
pub struct Parallel {
    pub world_size: Option<usize>,
    pub tp: usize,
    pub pp: usize,
    pub vpp: Option<usize>,
    pub num_layers_per_virtual_pipeline_stage: Option<usize>,
    pub cp: usize,
    pub ep: usize,
    pub etp: Option<usize>,
    pub decoder_first_pipeline_num_layers: Option<usize>,
    pub decoder_last_pipeline_num_layers: Option<usize>,
    pub account_for_embedding_in_pipeline_split: bool,
    pub account_for_loss_in_pipeline_split: bool,
    pub order: String,
}

impl Default for Parallel {
    fn default() -> Self {
        Self {
            world_size: None,
            tp: 1,
            pp: 1,
            vpp: None,
            num_layers_per_virtual_pipeline_stage: None,
            cp: 1,
            ep: 1,
            etp: None,
            decoder_first_pipeline_num_layers: None,
            decoder_last_pipeline_num_layers: None,
            account_for_embedding_in_pipeline_split: false,
            account_for_loss_in_pipeline_split: false,
            order: "tp-cp-ep-dp-pp".into(),
        }
    }
}

impl Parallel {
    pub const KEYS: &'static [&'static str] = &[
        "world_size",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size",
        "num_layers_per_virtual_pipeline_stage",
        "context_parallel_size",
        "expert_model_parallel_size",
        "expert_tensor_parallel_size",
        "decoder_first_pipeline_num_layers",
        "decoder_last_pipeline_num_layers",
        "account_for_embedding_in_pipeline_split",
        "account_for_loss_in_pipeline_split",
        "order",
    ];

    fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
        match key {
            "world_size" => self.world_size = v.opt_positive(arg)?,
            "tensor_model_parallel_size" => self.tp = v.positive(arg)?,
            "pipeline_model_parallel_size" => self.pp = v.positive(arg)?,
            "virtual_pipeline_model_parallel_size" => self.vpp = v.opt_positive(arg)?,
            "num_layers_per_virtual_pipeline_stage" => {
                self.num_layers_per_virtual_pipeline_stage = v.opt_positive(arg)?
            }
            "context_parallel_size" => self.cp = v.positive(arg)?,
            "expert_model_parallel_size" => self.ep = v.positive(arg)?,
            "expert_tensor_parallel_size" => self.etp = v.opt_positive(arg)?,
            "decoder_first_pipeline_num_layers" => {
                self.decoder_first_pipeline_num_layers = v.opt_positive(arg)?
            }
            "decoder_last_pipeline_num_layers" => {
                self.decoder_last_pipeline_num_layers = v.opt_positive(arg)?
            }
            "account_for_embedding_in_pipeline_split" => {
                self.account_for_embedding_in_pipeline_split = v.bool(arg)?
            }
            "account_for_loss_in_pipeline_split" => {
                self.account_for_loss_in_pipeline_split = v.bool(arg)?
            }
            "order" => self.order = v.str(arg)?,
            _ => return Err(unknown(arg, Self::KEYS)),
        }
        Ok(())
    }

    pub fn etp(&self) -> usize {
        self.etp.unwrap_or(self.tp)
    }
}

/// Per-device efficiency parameters of the cost model (see `sim` module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Efficiency {
    /// Fraction of peak a large GEMM reaches.
    pub gemm_efficiency: f64,
    /// GEMM dimension at which that fraction halves (per dimension: `d / (d + knee)`).
    pub gemm_dim_knee: f64,
    /// Fraction of the 16-bit peak flash attention reaches (forward; backward the same on
    /// 2.5x the FLOPs).
    pub attention_efficiency: f64,
    /// Fraction of memory bandwidth element-wise kernels reach.
    pub memory_efficiency: f64,
    /// Fraction of link bandwidth collectives reach inside a node / across nodes.
    pub intra_node_comm_efficiency: f64,
    pub inter_node_comm_efficiency: f64,
    /// Host-side cost per kernel (launch, Python/CPU overhead), microseconds.
    pub kernel_overhead_us: f64,
    /// Fraction of TP communication hidden behind GEMMs with `tp_comm_overlap`.
    pub tp_overlap_efficiency: f64,
    /// Fraction of the available compute that can hide overlapped communication (EP
    /// all-to-all with shared-expert or 1F1B overlap, DP reduce, CP ring exchange).
    pub overlap_efficiency: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        // Priors: published H100 microbenchmarks (see the `sim` module docs).
        Self {
            gemm_efficiency: 0.75,
            gemm_dim_knee: 64.0,
            attention_efficiency: 0.55,
            memory_efficiency: 0.7,
            intra_node_comm_efficiency: 0.75,
            inter_node_comm_efficiency: 0.8,
            kernel_overhead_us: 4.0,
            tp_overlap_efficiency: 0.8,
            overlap_efficiency: 0.8,
        }
    }
}

impl Efficiency {
    pub const KEYS: &'static [&'static str] = &[
        "gemm_efficiency",
        "gemm_dim_knee",
        "attention_efficiency",
        "memory_efficiency",
        "intra_node_comm_efficiency",
        "inter_node_comm_efficiency",
        "kernel_overhead_us",
        "tp_overlap_efficiency",
        "overlap_efficiency",
    ];

    fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
        let frac = |v: &Value| -> Result<f64> {
            let x = v.f64(arg)?;
            ensure(x > 0.0 && x <= 1.0, arg, || {
                format!("must be in (0, 1], got {x}")
            })?;
            Ok(x)
        };
        match key {
            "gemm_efficiency" => self.gemm_efficiency = frac(v)?,
            "gemm_dim_knee" => self.gemm_dim_knee = v.nonneg_f64(arg)?,
            "attention_efficiency" => self.attention_efficiency = frac(v)?,
            "memory_efficiency" => self.memory_efficiency = frac(v)?,
            "intra_node_comm_efficiency" => self.intra_node_comm_efficiency = frac(v)?,
            "inter_node_comm_efficiency" => self.inter_node_comm_efficiency = frac(v)?,
            "kernel_overhead_us" => self.kernel_overhead_us = v.nonneg_f64(arg)?,
            "tp_overlap_efficiency" => self.tp_overlap_efficiency = v.fraction(arg)?,
            "overlap_efficiency" => self.overlap_efficiency = v.fraction(arg)?,
            _ => return Err(unknown(arg, Self::KEYS)),
        }
        Ok(())
    }
}

/// The cluster: device count and speeds.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub name: String,
    pub devices: Option<usize>,
    pub devices_per_node: usize,
    pub peak_tflops_bf16: f64,
    pub peak_tflops_fp16: Option<f64>,
    pub peak_tflops_fp8: Option<f64>,
    pub memory_gib: f64,
    pub memory_bandwidth_gb_s: f64,
    /// Per device, per direction.
    pub intra_node_bandwidth_gb_s: f64,
    pub intra_node_latency_us: f64,
    /// Per device (its NIC), per direction.
    pub inter_node_bandwidth_gb_s: f64,
    pub inter_node_latency_us: f64,
    /// Host link (PCIe) per device, for offloading.
    pub host_bandwidth_gb_s: f64,
    /// Memory the framework cannot use: runtime context, communicator buffers, fragmentation.
    pub memory_reserved_gib: f64,
    /// Host optimizer throughput, parameters per second per device (optimizer offload).
    pub host_adam_params_per_s: f64,
    pub efficiency: Efficiency,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            name: String::new(),
            devices: None,
            devices_per_node: 8,
            peak_tflops_bf16: 0.0,
            peak_tflops_fp16: None,
            peak_tflops_fp8: None,
            memory_gib: 0.0,
            memory_bandwidth_gb_s: 0.0,
            intra_node_bandwidth_gb_s: 0.0,
            intra_node_latency_us: 5.0,
            inter_node_bandwidth_gb_s: 0.0,
            inter_node_latency_us: 10.0,
            host_bandwidth_gb_s: 50.0,
            memory_reserved_gib: 4.0,
            host_adam_params_per_s: 2.0e9,
            efficiency: Efficiency::default(),
        }
    }
}

impl Cluster {
    pub const KEYS: &'static [&'static str] = &[
        "name",
        "devices",
        "devices_per_node",
        "peak_tflops_bf16",
        "peak_tflops_fp16",
        "peak_tflops_fp8",
        "memory_gib",
        "memory_bandwidth_gb_s",
        "intra_node_bandwidth_gb_s",
        "intra_node_latency_us",
        "inter_node_bandwidth_gb_s",
        "inter_node_latency_us",
        "host_bandwidth_gb_s",
        "memory_reserved_gib",
        "host_adam_params_per_s",
    ];

    fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
        match key {
            "name" => self.name = v.str(arg)?,
            "devices" => self.devices = v.opt_positive(arg)?,
            "devices_per_node" => self.devices_per_node = v.positive(arg)?,
            "peak_tflops_bf16" => self.peak_tflops_bf16 = v.pos_f64(arg)?,
            "peak_tflops_fp16" => {
                self.peak_tflops_fp16 = match v {
                    Value::None => None,
                    v => Some(v.pos_f64(arg)?),
                }
            }
            "peak_tflops_fp8" => {
                self.peak_tflops_fp8 = match v {
                    Value::None => None,
                    v => Some(v.pos_f64(arg)?),
                }
            }
            "memory_gib" => self.memory_gib = v.pos_f64(arg)?,
            "memory_bandwidth_gb_s" => self.memory_bandwidth_gb_s = v.pos_f64(arg)?,
            "intra_node_bandwidth_gb_s" => self.intra_node_bandwidth_gb_s = v.pos_f64(arg)?,
            "intra_node_latency_us" => self.intra_node_latency_us = v.nonneg_f64(arg)?,
            "inter_node_bandwidth_gb_s" => self.inter_node_bandwidth_gb_s = v.pos_f64(arg)?,
            "inter_node_latency_us" => self.inter_node_latency_us = v.nonneg_f64(arg)?,
            "host_bandwidth_gb_s" => self.host_bandwidth_gb_s = v.pos_f64(arg)?,
            "memory_reserved_gib" => self.memory_reserved_gib = v.nonneg_f64(arg)?,
            "host_adam_params_per_s" => self.host_adam_params_per_s = v.pos_f64(arg)?,
            _ => {
                if Efficiency::KEYS.contains(&key) {
                    return self.efficiency.set(key, arg, v);
                }
                let mut all = Self::KEYS.to_vec();
                all.extend_from_slice(Efficiency::KEYS);
                return Err(unknown(arg, &all));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("peak_tflops_bf16", self.peak_tflops_bf16),
            ("memory_gib", self.memory_gib),
            ("memory_bandwidth_gb_s", self.memory_bandwidth_gb_s),
            ("intra_node_bandwidth_gb_s", self.intra_node_bandwidth_gb_s),
            ("inter_node_bandwidth_gb_s", self.inter_node_bandwidth_gb_s),
        ] {
            ensure(v > 0.0, k, || "is required (cluster section)".into())?;
        }
        Ok(())
    }

    /// Dense peak FLOP/s for GEMMs in `p`.
    pub fn gemm_peak(&self, p: Precision) -> f64 {
        1e12 * match p {
            Precision::Bf16 => self.peak_tflops_bf16,
            Precision::Fp16 => self.peak_tflops_fp16.unwrap_or(self.peak_tflops_bf16),
            Precision::Fp8 => self.peak_tflops_fp8.unwrap_or(2.0 * self.peak_tflops_bf16),
        }
    }

    /// Dense 16-bit peak FLOP/s (the MFU denominator).
    pub fn peak16(&self) -> f64 {
        1e12 * self.peak_tflops_bf16
    }
}

fn unknown(arg: &str, keys: &[&str]) -> crate::Error {
    let key = arg.rsplit('.').next().unwrap_or(arg);
    let close: Vec<&str> = keys.iter().copied().filter(|k| similar(k, key)).collect();
    if close.is_empty() {
        invalid(arg, "unknown key")
    } else {
        invalid(
            arg,
            format!("unknown key (did you mean {}?)", close.join(" or ")),
        )
    }
}

/// Cheap typo check: same words in another order, or an edit distance of at most 2.
fn similar(a: &str, b: &str) -> bool {
    if a.contains(b) || b.contains(a) {
        return b.len() >= 3;
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 2 {
        return false;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let c = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + c);
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}

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
        crate::sim::model::stage_layers(m, p)?;
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
