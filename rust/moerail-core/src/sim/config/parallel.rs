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
    /// Megatron's `pipeline_model_parallel_layout`: the layers of every virtual stage, e.g.
    /// `"Et|(tt|)*30mL"` (see [`parse_layout`]).
    pub pipeline_model_parallel_layout: Option<String>,
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
            pipeline_model_parallel_layout: None,
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
        "pipeline_model_parallel_layout",
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
            "pipeline_model_parallel_layout" => {
                let text = v.str(arg)?;
                self.pipeline_model_parallel_layout = if text.trim().is_empty() {
                    None
                } else {
                    parse_layout(&text).map_err(|e| crate::error::invalid(arg, e))?;
                    Some(text)
                };
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

/// Parses Megatron's `pipeline_model_parallel_layout` into its virtual stages (chunks), each
/// the list of what it holds: `E` the embedding, `t` a transformer layer, `m` an MTP layer,
/// `L` the output layer and loss; `|` ends a chunk, `X*n` and `(...)*n` repeat. A chunk may
/// hold fewer layers than the others, or none: that is how a run pads its layers to the
/// pipeline's slots with no-op layers (Pangu Ultra MoE's 61 layers and MTP on 64 slots).
pub fn parse_layout(text: &str) -> std::result::Result<Vec<Vec<char>>, String> {
    fn seq(s: &[char], i: &mut usize, depth: usize) -> std::result::Result<String, String> {
        let mut out = String::new();
        while *i < s.len() {
            let c = s[*i];
            let item = match c {
                '(' => {
                    *i += 1;
                    let inner = seq(s, i, depth + 1)?;
                    if *i >= s.len() || s[*i] != ')' {
                        return Err("unbalanced '('".into());
                    }
                    *i += 1;
                    inner
                }
                ')' if depth > 0 => return Ok(out),
                'E' | 't' | 'm' | 'L' | '|' => {
                    *i += 1;
                    c.to_string()
                }
                c if c.is_whitespace() || c == ',' => {
                    *i += 1;
                    continue;
                }
                other => {
                    return Err(format!(
                        "unexpected '{other}' (expected E, t, m, L, |, ( ) or *n)"
                    ))
                }
            };
            let mut times = 1usize;
            if *i < s.len() && s[*i] == '*' {
                *i += 1;
                let start = *i;
                while *i < s.len() && s[*i].is_ascii_digit() {
                    *i += 1;
                }
                let digits: String = s[start..*i].iter().collect();
                times = digits
                    .parse()
                    .map_err(|_| "'*' must be followed by a count".to_string())?;
                if times > 100_000 {
                    return Err(format!("repeat count {times} is too large"));
                }
            }
            out.push_str(&item.repeat(times));
        }
        if depth > 0 {
            return Err("unbalanced '('".into());
        }
        Ok(out)
    }
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let flat = seq(&chars, &mut i, 0)?;
    if i < chars.len() {
        return Err("unbalanced ')'".into());
    }
    let chunks: Vec<Vec<char>> = flat.split('|').map(|c| c.chars().collect()).collect();
    let count = |ch: char| chunks.iter().flatten().filter(|&&c| c == ch).count();
    if count('E') != 1 || !chunks[0].contains(&'E') {
        return Err("the embedding 'E' must appear once, in the first chunk".into());
    }
    if count('L') != 1 || !chunks[chunks.len() - 1].contains(&'L') {
        return Err("the loss 'L' must appear once, in the last chunk".into());
    }
    Ok(chunks)
}

/// The stages of an explicit layout: chunk `c` runs on pipeline stage `c % pp`.
fn layout_stages(m: &Model, p: &Parallel, text: &str) -> Result<Vec<Stage>> {
    let arg = "pipeline_model_parallel_layout";
    let chunks = parse_layout(text).map_err(|e| crate::error::invalid(arg, e))?;
    let pp = p.pp;
    ensure(chunks.len() % pp == 0, arg, || {
        format!(
            "has {} chunks, not a multiple of pipeline_model_parallel_size ({pp})",
            chunks.len()
        )
    })?;
    if let Some(v) = p.vpp {
        ensure(chunks.len() == pp * v, arg, || {
            format!(
                "has {} chunks; pp * virtual_pipeline_model_parallel_size = {}",
                chunks.len(),
                pp * v
            )
        })?;
    }
    let count = |ch: char| chunks.iter().flatten().filter(|&&c| c == ch).count();
    ensure(count('t') == m.num_layers, arg, || {
        format!(
            "places {} transformer layers 't'; num_layers is {}",
            count('t'),
            m.num_layers
        )
    })?;
    ensure(count('m') == m.mtp_num_layers, arg, || {
        format!(
            "places {} MTP layers 'm'; mtp_num_layers is {}",
            count('m'),
            m.mtp_num_layers
        )
    })?;
    let last = chunks.len() - 1;
    ensure(
        chunks
            .iter()
            .enumerate()
            .all(|(c, ch)| !ch.contains(&'m') || c % pp == last % pp),
        arg,
        || "MTP layers 'm' must sit on the stage of the loss 'L'".into(),
    )?;
    let pattern = m.moe_pattern();
    let mut out: Vec<Stage> = (0..pp)
        .map(|s| Stage {
            first_layer: usize::MAX,
            dense_layers: 0,
            moe_layers: 0,
            has_embedding: s == 0,
            has_output: s == last % pp,
        })
        .collect();
    let mut at = 0usize;
    for (c, chunk) in chunks.iter().enumerate() {
        let st = &mut out[c % pp];
        for _ in chunk.iter().filter(|&&x| x == 't') {
            st.first_layer = st.first_layer.min(at);
            if pattern[at] {
                st.moe_layers += 1;
            } else {
                st.dense_layers += 1;
            }
            at += 1;
        }
    }
    for st in &mut out {
        if st.first_layer == usize::MAX {
            st.first_layer = at;
        }
    }
    Ok(out)
}

/// Megatron's split of the decoder layers over pipeline stages: an explicit
/// `pipeline_model_parallel_layout`, even, or with
/// `decoder_first/last_pipeline_num_layers` and the rest even over the middle stages; with
/// `account_for_embedding/loss_in_pipeline_split` the embedding / loss count as one layer of
/// the first / last stage.
pub fn stage_layers(m: &Model, p: &Parallel) -> Result<Vec<Stage>> {
    if let Some(text) = &p.pipeline_model_parallel_layout {
        return layout_stages(m, p, text);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::config::LayerFreq;

    fn model(layers: usize, dense: usize, mtp: usize) -> Model {
        let mut pattern = vec![false; dense];
        pattern.extend(vec![true; layers - dense]);
        Model {
            num_layers: layers,
            num_moe_experts: Some(256),
            moe_layer_freq: LayerFreq::Pattern(pattern),
            mtp_num_layers: mtp,
            ..Default::default()
        }
    }

    #[test]
    fn layout_strings_expand_like_megatron() {
        // Megatron-MoE-ModelZoo's DeepSeek-V3 layout: 32 chunks.
        let c = parse_layout("Et|(tt|)*30mL").unwrap();
        assert_eq!(c.len(), 32);
        assert_eq!(c[0], vec!['E', 't']);
        assert_eq!(c[5], vec!['t', 't']);
        assert_eq!(c[31], vec!['m', 'L']);
        assert_eq!(parse_layout("Et*3|t*4|tL").unwrap()[1].len(), 4);
        for bad in ["tt|L", "Et|tt", "Et|(tt|*3L", "Et|x|L", "Et|t*|L", "Et|L|E"] {
            assert!(parse_layout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layout_places_chunks_round_robin_with_noop_padding() {
        // Pangu Ultra MoE: 61 layers (3 dense) + 1 MTP on PP16 x VPP2 chunks of 2 slots, the
        // two spare slots no-op layers (here: a chunk of 1 layer and one holding the MTP only).
        let m = model(61, 3, 1);
        let p = Parallel {
            pp: 16,
            vpp: Some(2),
            pipeline_model_parallel_layout: Some("Ett|(tt|)*29t|mL".into()),
            ..Default::default()
        };
        let st = stage_layers(&m, &p).unwrap();
        assert_eq!(st.len(), 16);
        assert_eq!(st.iter().map(Stage::layers).sum::<usize>(), 61);
        // Stage 0 holds chunk 0 (layers 0-1) and chunk 16 (layers 32-33).
        assert_eq!((st[0].dense_layers, st[0].moe_layers), (2, 2));
        assert_eq!(st[0].first_layer, 0);
        assert!(st[0].has_embedding && !st[0].has_output);
        // Stage 14 holds chunk 14 (2 layers) and chunk 30 (1 layer); stage 15 chunk 15 and the MTP.
        assert_eq!(st[14].layers(), 3);
        assert_eq!(st[15].layers(), 2);
        assert!(st[15].has_output);
        let wrong = |layout: &str, vpp: Option<usize>| {
            let p = Parallel {
                pp: 16,
                vpp,
                pipeline_model_parallel_layout: Some(layout.into()),
                ..Default::default()
            };
            stage_layers(&m, &p).unwrap_err().to_string()
        };
        let e = wrong("Ett|(tt|)*29t|mL", Some(4));
        assert!(e.starts_with("pipeline_model_parallel_layout:"), "{e}");
        assert!(wrong("Ett|(tt|)*29|mL", None).contains("num_layers"));
        assert!(wrong("Ett|(tt|)*29t|L", None).contains("mtp_num_layers"));
        assert!(wrong("Ett|(tt|)*29tmL", None).contains("multiple"));
    }
}
