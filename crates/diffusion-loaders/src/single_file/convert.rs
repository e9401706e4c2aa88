//! Original (LDM / A1111) key names to diffusers names, for the UNet, the VAE, OpenAI CLIP and
//! OpenCLIP text encoders: the mapping of diffusers' `convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and
//! `convert_open_clip_checkpoint`, with block indices parsed instead of matched as substrings.
//!
//! Keys that do not fit the layout are passed through under their original name, so a strict
//! load names them as unexpected instead of silently dropping them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use diffusion_core::{Error, Result};

use super::checkpoint::{Planned, Transform};

/// Where the UNet lives in a checkpoint.
pub(crate) const UNET_PREFIX: &str = "model.diffusion_model.";
/// The VAE prefixes diffusers accepts, most common first.
/// The last, empty prefix is a standalone VAE file (`vae-ft-mse-840000-ema-pruned.safetensors`).
pub(crate) const VAE_PREFIXES: [&str; 3] = ["first_stage_model.", "vae.", ""];

/// `index.rest` → `(index, rest)`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (head, rest) = s.split_once('.')?;
    Some((head.parse().ok()?, rest))
}

/// The shape-derived layout of an LDM UNet (keys without [`UNET_PREFIX`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UNetLayout {
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers_per_block: usize,
    pub block_out_channels: Vec<usize>,
    /// Per down level: whether it has transformers.
    pub down_attention: Vec<bool>,
    /// Per diffusers up block (deepest first): whether it has transformers.
    pub up_attention: Vec<bool>,
    /// Per down level: transformer blocks per transformer (0 without attention).
    pub transformer_depth: Vec<usize>,
    pub cross_attention_dim: Option<usize>,
    pub linear_projection: bool,
    /// Input width of `label_emb.0.0` (SDXL's added embedding).
    pub label_emb_in: Option<usize>,
}

fn unknown(path: &Path, key: &str, message: impl Into<String>) -> Error {
    Error::UnknownModelType {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

/// Read the UNet's layout from its key shapes (diffusers reads the same numbers from the
/// original YAML config: `model_channels`, `channel_mult`, `num_res_blocks`,
/// `attention_resolutions`, `transformer_depth`, `context_dim`, `use_linear_in_transformer`).
pub(crate) fn unet_layout(path: &Path, unet: &BTreeMap<String, Vec<usize>>) -> Result<UNetLayout> {
    let conv_in = "input_blocks.0.0.weight";
    let in_shape = unet.get(conv_in).filter(|s| s.len() == 4).ok_or_else(|| {
        unknown(
            path,
            &format!("{UNET_PREFIX}{conv_in}"),
            "no UNet input convolution",
        )
    })?;
    let out_key = "out.2.weight";
    let out_shape = unet.get(out_key).filter(|s| !s.is_empty()).ok_or_else(|| {
        unknown(
            path,
            &format!("{UNET_PREFIX}{out_key}"),
            "no UNet output convolution",
        )
    })?;
    let mut input_ids = BTreeSet::new();
    let mut downsamplers = 0;
    for key in unet.keys() {
        if let Some((i, rest)) = key.strip_prefix("input_blocks.").and_then(split_index) {
            input_ids.insert(i);
            if rest == "0.op.weight" {
                downsamplers += 1;
            }
        }
    }
    let num_input = input_ids.last().map_or(0, |i| i + 1);
    let levels = downsamplers + 1;
    let per_level = num_input.saturating_sub(1 + downsamplers);
    if num_input < 2 || per_level == 0 || !per_level.is_multiple_of(levels) {
        return Err(unknown(
            path,
            &format!("{UNET_PREFIX}input_blocks.1.0.out_layers.3.weight"),
            format!(
                "{num_input} input blocks and {downsamplers} downsamplers do not form a Stable \
                 Diffusion UNet"
            ),
        ));
    }
    let lpb = per_level / levels;
    let mut block_out_channels = Vec::with_capacity(levels);
    let mut down_attention = Vec::with_capacity(levels);
    let mut transformer_depth = Vec::with_capacity(levels);
    for b in 0..levels {
        let first = 1 + b * (lpb + 1);
        let key = format!("input_blocks.{first}.0.out_layers.3.weight");
        let shape = unet
            .get(&key)
            .ok_or_else(|| unknown(path, &format!("{UNET_PREFIX}{key}"), "missing resnet"))?;
        block_out_channels.push(shape[0]);
        let attn = format!("input_blocks.{first}.1.");
        let depth = unet
            .keys()
            .filter_map(|k| k.strip_prefix(&attn)?.strip_prefix("transformer_blocks."))
            .filter_map(|r| split_index(r).map(|(i, _)| i + 1))
            .max()
            .unwrap_or(0);
        down_attention.push(unet.keys().any(|k| k.starts_with(&attn)));
        transformer_depth.push(depth);
    }
    let up_attention = (0..levels)
        .map(|u| {
            let attn = format!("output_blocks.{}.1.", u * (lpb + 1));
            unet.keys()
                .any(|k| k.starts_with(&attn) && !k[attn.len()..].starts_with("conv."))
        })
        .collect();
    let cross_attention_dim = unet
        .iter()
        .find(|(k, s)| k.ends_with("attn2.to_k.weight") && s.len() == 2)
        .map(|(_, s)| s[1]);
    let linear_projection = unet
        .iter()
        .find(|(k, _)| k.ends_with(".proj_in.weight"))
        .is_some_and(|(_, s)| s.len() == 2);
    let label_emb_in = unet
        .get("label_emb.0.0.weight")
        .and_then(|s| s.get(1).copied());
    Ok(UNetLayout {
        in_channels: in_shape[1],
        out_channels: out_shape[0],
        layers_per_block: lpb,
        block_out_channels,
        down_attention,
        up_attention,
        transformer_depth,
        cross_attention_dim,
        linear_projection,
        label_emb_in,
    })
}

/// `ResBlock` names to diffusers' `ResnetBlock2D` names.
fn resnet(rest: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (old, new) in MAP {
        if let Some(param) = rest.strip_prefix(old) {
            return format!("{new}{param}");
        }
    }
    rest.to_string()
}

/// The diffusers name of one UNet key (without prefix); `None` when it fits no known slot.
fn unet_key(key: &str, lpb: usize, text_time: bool) -> Option<String> {
    const TOP: [(&str, &str); 5] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (old, new) in TOP {
        if let Some(param) = key.strip_prefix(old) {
            return Some(format!("{new}{param}"));
        }
    }
    let embedding = if text_time {
        "add_embedding"
    } else {
        "class_embedding"
    };
    if let Some(param) = key.strip_prefix("label_emb.0.0.") {
        return Some(format!("{embedding}.linear_1.{param}"));
    }
    if let Some(param) = key.strip_prefix("label_emb.0.2.") {
        return Some(format!("{embedding}.linear_2.{param}"));
    }
    if let Some((i, rest)) = key.strip_prefix("input_blocks.").and_then(split_index) {
        if i == 0 {
            return None;
        }
        let (b, l) = ((i - 1) / (lpb + 1), (i - 1) % (lpb + 1));
        let (j, rest) = split_index(rest)?;
        return match j {
            0 => Some(match rest.strip_prefix("op.") {
                Some(param) => format!("down_blocks.{b}.downsamplers.0.conv.{param}"),
                None => format!("down_blocks.{b}.resnets.{l}.{}", resnet(rest)),
            }),
            1 => Some(format!("down_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    if let Some((j, rest)) = key.strip_prefix("middle_block.").and_then(split_index) {
        return match j {
            0 => Some(format!("mid_block.resnets.0.{}", resnet(rest))),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            2 => Some(format!("mid_block.resnets.1.{}", resnet(rest))),
            _ => None,
        };
    }
    if let Some((i, rest)) = key.strip_prefix("output_blocks.").and_then(split_index) {
        let (b, l) = (i / (lpb + 1), i % (lpb + 1));
        let (j, rest) = split_index(rest)?;
        return match (j, rest.strip_prefix("conv.")) {
            (0, _) => Some(format!("up_blocks.{b}.resnets.{l}.{}", resnet(rest))),
            (1 | 2, Some(param)) => Some(format!("up_blocks.{b}.upsamplers.0.conv.{param}")),
            (1, None) => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    None
}

/// Plan the UNet's diffusers state dict.
pub(crate) fn plan_unet(
    shapes: &BTreeMap<String, Vec<usize>>,
    layout: &UNetLayout,
    text_time: bool,
) -> Vec<Planned> {
    shapes
        .keys()
        .filter_map(|k| k.strip_prefix(UNET_PREFIX).map(|rest| (k, rest)))
        .map(|(full, rest)| {
            let key =
                unet_key(rest, layout.layers_per_block, text_time).unwrap_or_else(|| full.clone());
            Planned::new(key, full.clone(), Transform::Identity)
        })
        .collect()
}

/// The VAE prefix a checkpoint uses, `None` without a VAE.
pub(crate) fn vae_prefix(shapes: &BTreeMap<String, Vec<usize>>) -> Option<&'static str> {
    VAE_PREFIXES
        .into_iter()
        .find(|p| shapes.contains_key(&format!("{p}encoder.conv_in.weight")))
}

/// Number of decoder up levels (`decoder.up.<b>`).
pub(crate) fn vae_levels(vae: &BTreeMap<String, Vec<usize>>) -> usize {
    vae.keys()
        .filter_map(|k| k.strip_prefix("decoder.up.").and_then(split_index))
        .map(|(b, _)| b + 1)
        .max()
        .unwrap_or(0)
}

fn vae_key(key: &str, levels: usize) -> Option<(String, Transform)> {
    let (side, rest) = key.split_once('.')?;
    let id = |s: String| Some((s, Transform::Identity));
    match (side, rest) {
        ("quant_conv" | "post_quant_conv", _) => return id(key.to_string()),
        ("encoder" | "decoder", _) => {}
        _ => return None,
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return id(key.to_string());
    }
    if let Some(param) = rest.strip_prefix("norm_out.") {
        return id(format!("{side}.conv_norm_out.{param}"));
    }
    let level_name = if side == "encoder" { "down." } else { "up." };
    if let Some((b, rest)) = rest.strip_prefix(level_name).and_then(split_index) {
        let (blocks, block) = if side == "encoder" {
            ("down_blocks", b)
        } else {
            ("up_blocks", levels.checked_sub(b + 1)?)
        };
        if let Some((j, param)) = rest.strip_prefix("block.").and_then(split_index) {
            let param = param.replace("nin_shortcut", "conv_shortcut");
            return id(format!("{side}.{blocks}.{block}.resnets.{j}.{param}"));
        }
        let sampler = rest
            .strip_prefix("downsample.conv.")
            .map(|p| ("downsamplers", p))
            .or_else(|| {
                rest.strip_prefix("upsample.conv.")
                    .map(|p| ("upsamplers", p))
            });
        return sampler.and_then(|(s, p)| id(format!("{side}.{blocks}.{block}.{s}.0.conv.{p}")));
    }
    let mid = rest.strip_prefix("mid.")?;
    if let Some(r) = mid.strip_prefix("block_1.") {
        return id(format!(
            "{side}.mid_block.resnets.0.{}",
            r.replace("nin_shortcut", "conv_shortcut")
        ));
    }
    if let Some(r) = mid.strip_prefix("block_2.") {
        return id(format!(
            "{side}.mid_block.resnets.1.{}",
            r.replace("nin_shortcut", "conv_shortcut")
        ));
    }
    let attn = mid.strip_prefix("attn_1.")?;
    let (module, param) = attn.rsplit_once('.')?;
    let (new, transform) = match module {
        "norm" => ("group_norm", Transform::Identity),
        "q" => ("to_q", Transform::ToLinear),
        "k" => ("to_k", Transform::ToLinear),
        "v" => ("to_v", Transform::ToLinear),
        "proj_out" => ("to_out.0", Transform::ToLinear),
        _ => return None,
    };
    let transform = if param == "weight" {
        transform
    } else {
        Transform::Identity
    };
    Some((
        format!("{side}.mid_block.attentions.0.{new}.{param}"),
        transform,
    ))
}

/// Plan the VAE's diffusers state dict from the keys under `prefix`.
pub(crate) fn plan_vae(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> Vec<Planned> {
    let vae: BTreeMap<String, Vec<usize>> = strip(shapes, prefix);
    let levels = vae_levels(&vae);
    vae.keys()
        .map(|rest| {
            let full = format!("{prefix}{rest}");
            match vae_key(rest, levels) {
                Some((key, t)) => Planned::new(key, full, t),
                None => Planned::new(full.clone(), full, Transform::Identity),
            }
        })
        .collect()
}

/// The keys under `prefix`, without it.
pub(crate) fn strip(
    shapes: &BTreeMap<String, Vec<usize>>,
    prefix: &str,
) -> BTreeMap<String, Vec<usize>> {
    shapes
        .iter()
        .filter_map(|(k, s)| k.strip_prefix(prefix).map(|r| (r.to_string(), s.clone())))
        .collect()
}

/// Plan an OpenAI CLIP text encoder stored under `prefix` (`cond_stage_model.transformer.`,
/// `conditioner.embedders.0.transformer.`): the transformers names behind a prefix, with the
/// `position_ids` buffer dropped.
pub(crate) fn plan_clip(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> Vec<Planned> {
    shapes
        .keys()
        .filter_map(|k| k.strip_prefix(prefix).map(|rest| (k, rest)))
        .filter(|(_, rest)| !rest.ends_with("embeddings.position_ids"))
        .map(|(full, rest)| {
            let key = if rest.starts_with("text_model.") || rest.starts_with("text_projection.") {
                rest.to_string()
            } else {
                format!("text_model.{rest}")
            };
            Planned::new(key, full.clone(), Transform::Identity)
        })
        .collect()
}

/// Plan an OpenCLIP text encoder stored under `prefix` (`cond_stage_model.model.`,
/// `conditioner.embedders.<i>.model.`) as transformers' CLIP: fused `in_proj` split into
/// q/k/v, `text_projection` transposed (kept only `with_projection`), blocks from
/// `num_layers` on dropped (SD 2 uses the penultimate block and diffusers drops the last).
pub(crate) fn plan_open_clip(
    shapes: &BTreeMap<String, Vec<usize>>,
    prefix: &str,
    num_layers: usize,
    with_projection: bool,
) -> Vec<Planned> {
    let mut plan = Vec::new();
    for full in shapes.keys() {
        let Some(rest) = full.strip_prefix(prefix) else {
            continue;
        };
        let id = |key: &str| Planned::new(key, full.clone(), Transform::Identity);
        match rest {
            "token_embedding.weight" => {
                plan.push(id("text_model.embeddings.token_embedding.weight"))
            }
            "positional_embedding" => {
                plan.push(id("text_model.embeddings.position_embedding.weight"))
            }
            "ln_final.weight" => plan.push(id("text_model.final_layer_norm.weight")),
            "ln_final.bias" => plan.push(id("text_model.final_layer_norm.bias")),
            "text_projection" => {
                if with_projection {
                    plan.push(Planned::new(
                        "text_projection.weight",
                        full.clone(),
                        Transform::Transpose,
                    ));
                }
            }
            "logit_scale" | "attn_mask" => {}
            _ => {
                let Some((i, block)) = rest
                    .strip_prefix("transformer.resblocks.")
                    .and_then(split_index)
                else {
                    plan.push(id(full));
                    continue;
                };
                if i >= num_layers {
                    continue;
                }
                let layer = format!("text_model.encoder.layers.{i}");
                let fused = match block {
                    "attn.in_proj_weight" => Some("weight"),
                    "attn.in_proj_bias" => Some("bias"),
                    _ => None,
                };
                if let Some(param) = fused {
                    for (part, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        plan.push(Planned::new(
                            format!("{layer}.self_attn.{name}.{param}"),
                            full.clone(),
                            Transform::Third(part),
                        ));
                    }
                    continue;
                }
                const MAP: [(&str, &str); 5] = [
                    ("ln_1.", "layer_norm1."),
                    ("ln_2.", "layer_norm2."),
                    ("mlp.c_fc.", "mlp.fc1."),
                    ("mlp.c_proj.", "mlp.fc2."),
                    ("attn.out_proj.", "self_attn.out_proj."),
                ];
                match MAP
                    .iter()
                    .find_map(|(old, new)| block.strip_prefix(old).map(|p| format!("{new}{p}")))
                {
                    Some(name) => plan.push(id(&format!("{layer}.{name}"))),
                    None => plan.push(id(full)),
                }
            }
        }
    }
    plan
}

/// Number of `transformer.resblocks.<i>` under an OpenCLIP prefix.
pub(crate) fn open_clip_blocks(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> usize {
    let p = format!("{prefix}transformer.resblocks.");
    shapes
        .keys()
        .filter_map(|k| k.strip_prefix(&p).and_then(split_index))
        .map(|(i, _)| i + 1)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names() {
        let k = |s| unet_key(s, 2, true);
        assert_eq!(
            k("input_blocks.4.0.in_layers.2.weight").unwrap(),
            "down_blocks.1.resnets.0.conv1.weight"
        );
        assert_eq!(
            k("input_blocks.3.0.op.bias").unwrap(),
            "down_blocks.0.downsamplers.0.conv.bias"
        );
        assert_eq!(
            k("input_blocks.11.1.transformer_blocks.0.attn2.to_k.weight").unwrap(),
            "down_blocks.3.attentions.1.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(
            k("middle_block.2.skip_connection.bias").unwrap(),
            "mid_block.resnets.1.conv_shortcut.bias"
        );
        assert_eq!(
            k("output_blocks.5.2.conv.weight").unwrap(),
            "up_blocks.1.upsamplers.0.conv.weight"
        );
        assert_eq!(
            k("output_blocks.2.1.conv.weight").unwrap(),
            "up_blocks.0.upsamplers.0.conv.weight"
        );
        assert_eq!(
            k("output_blocks.10.1.proj_in.weight").unwrap(),
            "up_blocks.3.attentions.1.proj_in.weight"
        );
        assert_eq!(
            k("label_emb.0.2.bias").unwrap(),
            "add_embedding.linear_2.bias"
        );
        assert_eq!(
            unet_key("label_emb.0.0.weight", 2, false).unwrap(),
            "class_embedding.linear_1.weight"
        );
        assert!(k("something.else").is_none());
    }

    #[test]
    fn vae_names() {
        let k = |s| vae_key(s, 4).unwrap();
        assert_eq!(
            k("decoder.up.3.block.0.nin_shortcut.weight").0,
            "decoder.up_blocks.0.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            k("decoder.up.1.upsample.conv.bias").0,
            "decoder.up_blocks.2.upsamplers.0.conv.bias"
        );
        assert_eq!(
            k("encoder.down.0.downsample.conv.weight").0,
            "encoder.down_blocks.0.downsamplers.0.conv.weight"
        );
        assert_eq!(
            k("encoder.mid.attn_1.q.weight"),
            (
                "encoder.mid_block.attentions.0.to_q.weight".into(),
                Transform::ToLinear
            )
        );
        assert_eq!(
            k("encoder.mid.attn_1.proj_out.bias"),
            (
                "encoder.mid_block.attentions.0.to_out.0.bias".into(),
                Transform::Identity
            )
        );
        assert_eq!(
            k("encoder.norm_out.weight").0,
            "encoder.conv_norm_out.weight"
        );
    }
}
