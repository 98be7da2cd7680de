//! Model arithmetic: Megatron-LM's model-FLOPs formula, parameter counts by how each
//! parameter is sharded, per pipeline stage. Reads `sim::config` (the pipeline split itself is
//! `config::stage_layers`); config never reads this module.

use crate::sim::config::{Model, Normalization, Stage};

/// Megatron-LM's `num_floating_point_operations` (training.py) for a batch of `batch_size`
/// sequences of `seq_length` tokens, with `padded_vocab` the padded vocabulary.
///
/// `causal = true` is the current formula (core attention halved for the causal mask, since
/// 2025-03); `causal = false` is the earlier one that counted the full `s x s` score matrix
/// (the convention of the MoE Parallel Folding paper's MFU).
pub fn megatron_flops(
    m: &Model,
    batch_size: f64,
    seq_length: f64,
    padded_vocab: f64,
    causal: bool,
) -> f64 {
    let h = m.hidden_size as f64;
    let heads = m.num_attention_heads as f64;
    let pattern = m.moe_pattern();
    let (mut num_moe, mut num_dense) = if m.is_moe() {
        let moe = pattern.iter().filter(|&&x| x).count() as f64;
        (moe, m.num_layers as f64 - moe)
    } else {
        (0.0, m.num_layers as f64)
    };
    let last_is_moe = if m.is_moe() && *pattern.last().unwrap_or(&false) {
        1.0
    } else {
        0.0
    };
    let topk = if m.is_moe() {
        m.moe_router_topk as f64
    } else {
        0.0
    };
    let mtp = m.mtp_num_layers as f64;
    num_moe += last_is_moe * mtp;
    num_dense += (1.0 - last_is_moe) * mtp;
    let num_layers = m.num_layers as f64 + mtp;
    let moe_ffn = m.moe_ffn() as f64;
    let shared = m.shared_ffn() as f64;
    let fb = 3.0; // forward + two backward GEMMs
    let fma = 2.0;
    let ffn_exp = if m.swiglu { 3.0 } else { 2.0 };
    let (attn_term, core_term) = if m.multi_latent_attention {
        let qk = m.qk_head_dim as f64;
        let rope = m.qk_pos_emb_head_dim as f64;
        let v = m.v_head_dim as f64;
        let kvl = m.kv_lora_rank as f64;
        let q_term = match m.q_lora_rank {
            None => h * heads * (qk + rope),
            Some(r) => r as f64 * (h + heads * (qk + rope) + 1.0),
        };
        let lin =
            fb * fma * (q_term + kvl * (h + heads * (qk + v) + 1.0) + h * rope + heads * v * h);
        let core = fb * fma * (heads * (qk + rope) / 2.0 + heads * v / 2.0);
        (lin, core)
    } else {
        let kv = m.kv_channels() as f64;
        let g = m.query_groups() as f64;
        let q = kv * heads;
        let k = kv * g;
        let lin = fb * fma * (h * (q + k + k) + q * h);
        let core = fb * fma * q / 2.0 * 2.0;
        (lin, core)
    };
    let core_term = if causal { core_term } else { 2.0 * core_term };
    let tokens = batch_size * seq_length;
    let per_token = fb
        * fma
        * h
        * (m.ffn() as f64 * ffn_exp * num_dense
            + moe_ffn * topk * ffn_exp * num_moe
            + shared * ffn_exp * num_moe)
        + attn_term * num_layers
        + fb * fma * mtp * (3.0 * h + 2.0 * h * h)
        + fb * fma * h * padded_vocab * (mtp + 1.0);
    tokens * per_token + batch_size * seq_length * seq_length * core_term * num_layers
}

/// Parameters of one piece of the model, by how they are sharded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Params {
    /// Split over tensor parallelism (attention, dense MLP, shared experts, embeddings).
    pub tp_sharded: f64,
    /// Replicated over tensor parallelism (norms, router, MLA down projections, row biases).
    pub replicated: f64,
    /// Routed experts: split over `etp * ep`.
    pub expert: f64,
}

impl std::ops::Add for Params {
    type Output = Params;
    fn add(self, o: Params) -> Params {
        Params {
            tp_sharded: self.tp_sharded + o.tp_sharded,
            replicated: self.replicated + o.replicated,
            expert: self.expert + o.expert,
        }
    }
}

impl std::ops::Mul<f64> for Params {
    type Output = Params;
    fn mul(self, k: f64) -> Params {
        Params {
            tp_sharded: self.tp_sharded * k,
            replicated: self.replicated * k,
            expert: self.expert * k,
        }
    }
}

impl Params {
    pub fn total(&self) -> f64 {
        self.tp_sharded + self.replicated + self.expert
    }

    /// Parameters held by one device.
    pub fn per_device(&self, tp: usize, etp: usize, ep: usize) -> f64 {
        self.tp_sharded / tp as f64 + self.replicated + self.expert / (etp * ep) as f64
    }

    /// Non-expert parameters held by one device.
    pub fn dense_per_device(&self, tp: usize) -> f64 {
        self.tp_sharded / tp as f64 + self.replicated
    }

    pub fn expert_per_device(&self, etp: usize, ep: usize) -> f64 {
        self.expert / (etp * ep) as f64
    }
}

fn norm_size(m: &Model) -> f64 {
    match m.normalization {
        Normalization::RmsNorm => 1.0,
        Normalization::LayerNorm => 2.0,
    }
}

/// Self-attention parameters of one layer (with its input norm).
pub fn attention_params(m: &Model) -> Params {
    let h = m.hidden_size as f64;
    let heads = m.num_attention_heads as f64;
    let ns = norm_size(m);
    let bias = if m.add_bias_linear { 1.0 } else { 0.0 };
    let mut p = Params {
        replicated: ns * h + bias * h,
        ..Default::default()
    };
    if m.multi_latent_attention {
        let qk = m.qk_head_dim as f64;
        let rope = m.qk_pos_emb_head_dim as f64;
        let v = m.v_head_dim as f64;
        let kvl = m.kv_lora_rank as f64;
        match m.q_lora_rank {
            Some(r) => {
                let r = r as f64;
                p.replicated += h * r + ns * r;
                p.tp_sharded += r * heads * (qk + rope);
            }
            None => p.tp_sharded += h * heads * (qk + rope),
        }
        p.replicated += h * (kvl + rope) + ns * kvl;
        p.tp_sharded += kvl * heads * (qk + v) + heads * v * h;
    } else {
        let d = m.kv_channels() as f64;
        let g = m.query_groups() as f64;
        let qkv = (heads + 2.0 * g) * d;
        p.tp_sharded += h * qkv + heads * d * h;
        if m.add_qkv_bias || m.add_bias_linear {
            p.tp_sharded += qkv;
        }
        if m.qk_layernorm {
            p.replicated += 2.0 * ns * d;
        }
    }
    p
}

/// Dense MLP parameters of one layer (with its pre-MLP norm).
pub fn dense_mlp_params(m: &Model) -> Params {
    let h = m.hidden_size as f64;
    let f = m.ffn() as f64;
    let gate = if m.swiglu { 2.0 } else { 1.0 };
    let bias = if m.add_bias_linear { 1.0 } else { 0.0 };
    Params {
        tp_sharded: h * f * gate + f * h + bias * f * gate,
        replicated: norm_size(m) * h + bias * h,
        expert: 0.0,
    }
}

/// MoE MLP parameters of one layer (router, routed and shared experts, pre-MLP norm).
pub fn moe_mlp_params(m: &Model) -> Params {
    let h = m.hidden_size as f64;
    let e = m.experts() as f64;
    let f = m.moe_ffn() as f64;
    let fs = m.shared_ffn() as f64;
    let gate = if m.swiglu { 2.0 } else { 1.0 };
    let bias = if m.add_bias_linear { 1.0 } else { 0.0 };
    let mut replicated = norm_size(m) * h + h * e + bias * e;
    if fs > 0.0 && m.moe_shared_expert_gate {
        replicated += h;
    }
    if fs > 0.0 {
        replicated += bias * h;
    }
    Params {
        tp_sharded: fs * h * (gate + 1.0) + bias * fs * gate,
        replicated,
        expert: e * (h * f * gate + f * h + bias * (f * gate + h)),
    }
}

/// Word embedding (one copy), vocabulary-parallel.
pub fn embedding_params(m: &Model, tp: usize) -> Params {
    Params {
        tp_sharded: (m.padded_vocab(tp) * m.hidden_size) as f64,
        ..Default::default()
    }
}

/// Extra parameters of one MTP module besides its transformer layer: two input norms, the
/// `2h -> h` projection and its final norm.
pub fn mtp_extra_params(m: &Model) -> Params {
    let h = m.hidden_size as f64;
    Params {
        tp_sharded: 2.0 * h * h,
        replicated: 3.0 * norm_size(m) * h,
        expert: 0.0,
    }
}

/// Parameters held by one stage (embedding on the first, output layer, final norm and MTP on
/// the last; with tied embeddings and pp > 1 the last stage keeps a copy of the embedding,
/// as Megatron does).
pub fn stage_params(m: &Model, stage: &Stage, tp: usize, pp: usize) -> Params {
    let attn = attention_params(m);
    let mut p = (attn + dense_mlp_params(m)) * stage.dense_layers as f64;
    if m.is_moe() {
        p = p + (attn + moe_mlp_params(m)) * stage.moe_layers as f64;
    }
    let emb = embedding_params(m, tp);
    if stage.has_embedding {
        p = p + emb;
    }
    if stage.has_output {
        let untied = m.untie_embeddings_and_output_weights;
        if untied || pp > 1 {
            p = p + emb;
        }
        p.replicated += norm_size(m) * m.hidden_size as f64;
        if m.mtp_num_layers > 0 {
            let last_moe = m.is_moe() && *m.moe_pattern().last().unwrap_or(&false);
            let layer = if last_moe {
                attn + moe_mlp_params(m)
            } else {
                attn + dense_mlp_params(m)
            };
            p = p + (layer + mtp_extra_params(m)) * m.mtp_num_layers as f64;
        }
    }
    p
}

/// Total and active (per token) parameters of the model.
pub fn param_totals(m: &Model) -> (f64, f64) {
    let pattern = m.moe_pattern();
    let moe = pattern.iter().filter(|&&x| x).count() as f64;
    let dense = m.num_layers as f64 - moe;
    let attn = attention_params(m).total();
    let dense_mlp = dense_mlp_params(m).total();
    let moe_mlp = moe_mlp_params(m);
    let emb = embedding_params(m, 1).total();
    let embeddings = if m.untie_embeddings_and_output_weights {
        2.0 * emb
    } else {
        emb
    };
    let e = m.experts().max(1) as f64;
    let active_moe =
        moe_mlp.tp_sharded + moe_mlp.replicated + moe_mlp.expert * m.moe_router_topk as f64 / e;
    let last_moe = m.is_moe() && *pattern.last().unwrap_or(&false);
    let mtp_layer_total =
        attn + mtp_extra_params(m).total() + if last_moe { moe_mlp.total() } else { dense_mlp };
    let mtp_layer_active =
        attn + mtp_extra_params(m).total() + if last_moe { active_moe } else { dense_mlp };
    let mtp = m.mtp_num_layers as f64;
    let norm = norm_size(m) * m.hidden_size as f64;
    let total = (attn + dense_mlp) * dense
        + (attn + moe_mlp.total()) * moe
        + embeddings
        + norm
        + mtp * mtp_layer_total;
    let active = (attn + dense_mlp) * dense
        + (attn + active_moe) * moe
        + embeddings
        + norm
        + mtp * mtp_layer_active;
    (total, active)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::config::{stage_layers, LayerFreq, Parallel};

    fn deepseek_v3() -> Model {
        let mut pattern = vec![false; 3];
        pattern.extend(vec![true; 58]);
        Model {
            num_layers: 61,
            hidden_size: 7168,
            num_attention_heads: 128,
            ffn_hidden_size: Some(18432),
            swiglu: true,
            vocab_size: 129280,
            num_moe_experts: Some(256),
            moe_router_topk: 8,
            moe_ffn_hidden_size: Some(2048),
            moe_shared_expert_intermediate_size: Some(2048),
            moe_layer_freq: LayerFreq::Pattern(pattern),
            multi_latent_attention: true,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_head_dim: 128,
            qk_pos_emb_head_dim: 64,
            v_head_dim: 128,
            mtp_num_layers: 1,
            untie_embeddings_and_output_weights: true,
            normalization: Normalization::RmsNorm,
            add_bias_linear: false,
            ..Default::default()
        }
    }

    #[test]
    fn deepseek_v3_flops_and_params() {
        let m = deepseek_v3();
        let f = megatron_flops(&m, 1.0, 4096.0, m.padded_vocab(1) as f64, true) / 4096.0;
        // Published: 260 GFLOPs per token at seq 4096 with one MTP layer.
        assert!((f / 1e9 - 260.0).abs() < 0.5, "{}", f / 1e9);
        let (total, active) = param_totals(&m);
        // DeepSeek-V3: 671B total (+14B MTP module), 37B active.
        assert!((total / 1e9 - 685.0).abs() < 3.0, "{}", total / 1e9);
        assert!((active / 1e9 - 37.5).abs() < 1.5, "{}", active / 1e9);
    }

    #[test]
    fn pipeline_split() {
        let m = deepseek_v3();
        let p = Parallel {
            pp: 16,
            decoder_first_pipeline_num_layers: Some(4),
            decoder_last_pipeline_num_layers: Some(1),
            ..Default::default()
        };
        let st = stage_layers(&m, &p).unwrap();
        assert_eq!(st.iter().map(Stage::layers).sum::<usize>(), 61);
        assert_eq!((st[0].dense_layers, st[0].moe_layers), (3, 1));
        assert_eq!(st[15].layers(), 1);
        let bad = Parallel {
            pp: 8,
            ..Default::default()
        };
        let e = stage_layers(&m, &bad).unwrap_err().to_string();
        assert!(e.starts_with("pipeline_model_parallel_size:"), "{e}");
    }
}
