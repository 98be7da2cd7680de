//! The layout section: Megatron's parallel-size arguments, and the split of the model's
//! layers over the pipeline stages it implies.

use super::model::Model;
use super::value::{unknown, Value};
use crate::error::{ensure, Result};

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

    pub(super) fn set(&mut self, key: &str, arg: &str, v: &Value) -> Result<()> {
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

/// The layers of one pipeline stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// Index of the first transformer layer.
    pub first_layer: usize,
    pub dense_layers: usize,
    pub moe_layers: usize,
    pub has_embedding: bool,
    pub has_output: bool,
}

impl Stage {
    pub fn layers(&self) -> usize {
        self.dense_layers + self.moe_layers
    }
}

/// Megatron's split of the decoder layers over pipeline stages: even, or with
/// `decoder_first/last_pipeline_num_layers` and the rest even over the middle stages; with
/// `account_for_embedding/loss_in_pipeline_split` the embedding / loss count as one layer of
/// the first / last stage.
pub fn stage_layers(m: &Model, p: &Parallel) -> Result<Vec<Stage>> {
    let pp = p.pp;
    let layers = m.num_layers;
    let mut counts = vec![0usize; pp];
    let extra_first = usize::from(p.account_for_embedding_in_pipeline_split);
    let extra_last = usize::from(p.account_for_loss_in_pipeline_split);
    let first = p.decoder_first_pipeline_num_layers;
    let last = p.decoder_last_pipeline_num_layers;
    if pp == 1 {
        counts[0] = layers;
    } else if first.is_none() && last.is_none() {
        let total = layers + extra_first + extra_last;
        ensure(total % pp == 0, "pipeline_model_parallel_size", || {
            format!(
                "{pp} does not divide num_layers ({layers}{}); set decoder_first_pipeline_num_layers / decoder_last_pipeline_num_layers",
                if extra_first + extra_last > 0 { " plus the embedding/loss stages" } else { "" }
            )
        })?;
        let per = total / pp;
        counts.iter_mut().for_each(|c| *c = per);
        ensure(
            per > extra_first && per > extra_last || pp == 1,
            "pipeline_model_parallel_size",
            || format!("{pp} stages leave no transformer layer on the first or last stage"),
        )?;
        counts[0] -= extra_first;
        counts[pp - 1] -= extra_last;
    } else {
        let f = first.unwrap_or(0);
        let l = last.unwrap_or(0);
        let middle_stages = pp - usize::from(first.is_some()) - usize::from(last.is_some());
        ensure(f + l <= layers, "decoder_first_pipeline_num_layers", || {
            format!("{f} + {l} exceeds num_layers ({layers})")
        })?;
        let rest = layers - f - l;
        if middle_stages == 0 {
            ensure(rest == 0, "decoder_last_pipeline_num_layers", || {
                format!("first + last must equal num_layers ({layers}) with pp = {pp}")
            })?;
        } else {
            ensure(
                rest % middle_stages == 0,
                "pipeline_model_parallel_size",
                || {
                    format!(
                    "the {rest} layers left by decoder_first/last_pipeline_num_layers are not divisible by the {middle_stages} other stages"
                )
                },
            )?;
        }
        let per = rest.checked_div(middle_stages).unwrap_or(0);
        counts.iter_mut().for_each(|c| *c = per);
        if let Some(f) = first {
            counts[0] = f;
        }
        if let Some(l) = last {
            counts[pp - 1] = l;
        }
    }
    let pattern = m.moe_pattern();
    let mut out = Vec::with_capacity(pp);
    let mut at = 0usize;
    for (s, &c) in counts.iter().enumerate() {
        let moe = pattern[at..at + c].iter().filter(|&&x| x).count();
        out.push(Stage {
            first_layer: at,
            dense_layers: c - moe,
            moe_layers: moe,
            has_embedding: s == 0,
            has_output: s == pp - 1,
        });
        at += c;
    }
    Ok(out)
}
