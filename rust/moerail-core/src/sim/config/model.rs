//! The model section: Megatron's model arguments (sizes, attention, MoE, MTP).

use super::value::{unknown, Value};
use crate::error::{ensure, invalid, Result};

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

    pub(super) fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
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

    pub(super) fn validate(&self) -> Result<()> {
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
