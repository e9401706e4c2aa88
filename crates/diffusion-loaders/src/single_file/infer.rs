//! Model type detection and diffusers configs inferred from a single-file checkpoint's keys and
//! shapes.
//!
//! diffusers detects the type from marker keys (`infer_diffusers_model_type`) and then reads
//! configs from the matching Hub repository or the original YAML. Without network or YAML, the
//! shape-derived parts (channels, levels, resnets per level, which levels attend, transformer
//! depth, cross-attention width, linear projections, added-embedding width, text-encoder widths
//! and depths) come from the tensors; the rest comes from [`InferenceHints`], whose defaults are
//! what every official checkpoint uses (8 heads for SD 1 UNets and 64 channels per head
//! elsewhere, 32 norm groups, SDXL's 256-wide time-id features, 64 channels per CLIP head), and
//! from the facts of the detected type (training image size, VAE scaling factor, SD 2.1's
//! attention upcast, the token ids and activations of OpenAI CLIP and OpenCLIP).

use std::collections::BTreeMap;
use std::path::Path;

use diffusion_core::{Error, Result};
use diffusion_models::unets::unet_2d::SampleSize;
use diffusion_models::unets::unet_2d_condition::{PerBlock, TransformerLayers};
use diffusion_models::{AutoencoderKLConfig, CLIPTextConfig, UNet2DConditionModelConfig};
use serde_json::{Value, json};

use super::convert::{self, UNET_PREFIX, UNetLayout};

/// The model types diffusers' single-file loader names (`infer_diffusers_model_type`) that this
/// port loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelType {
    /// Stable Diffusion 1.x (`"v1"`).
    V1,
    /// Stable Diffusion 2.x (`"v2"`), OpenCLIP text encoder, linear projections.
    V2,
    /// SDXL base (`"xl_base"`): two text encoders, `text_time` conditioning.
    XlBase,
    /// SDXL refiner (`"xl_refiner"`): OpenCLIP-bigG only, aesthetic-score conditioning.
    XlRefiner,
    /// Stable Diffusion 1.x inpainting (`"inpainting"`): a 9-channel UNet.
    Inpainting,
    /// Stable Diffusion 2.x inpainting (`"inpainting_v2"`).
    InpaintingV2,
    /// SDXL inpainting (`"xl_inpaint"`).
    XlInpaint,
}

impl ModelType {
    /// diffusers' name of the type (`"v1"`, `"xl_base"`, ...).
    pub fn diffusers_name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
            Self::XlBase => "xl_base",
            Self::XlRefiner => "xl_refiner",
            Self::Inpainting => "inpainting",
            Self::InpaintingV2 => "inpainting_v2",
            Self::XlInpaint => "xl_inpaint",
        }
    }

    /// The Hub repository whose configs and tokenizers diffusers uses for a checkpoint of this
    /// type when no `config` is given (`DIFFUSERS_DEFAULT_PIPELINE_PATHS`).
    pub fn default_pipeline_repo(self) -> &'static str {
        match self {
            Self::V1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Self::V2 => "stabilityai/stable-diffusion-2-1",
            Self::XlBase => "stabilityai/stable-diffusion-xl-base-1.0",
            Self::XlRefiner => "stabilityai/stable-diffusion-xl-refiner-1.0",
            Self::Inpainting => "stable-diffusion-v1-5/stable-diffusion-inpainting",
            Self::InpaintingV2 => "stabilityai/stable-diffusion-2-inpainting",
            Self::XlInpaint => "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        }
    }

    /// Whether the UNet takes the masked image and mask too (9 input channels).
    pub fn is_inpainting(self) -> bool {
        matches!(
            self,
            Self::Inpainting | Self::InpaintingV2 | Self::XlInpaint
        )
    }

    /// Whether this is an SDXL model (base, refiner or inpainting).
    pub fn is_xl(self) -> bool {
        matches!(self, Self::XlBase | Self::XlRefiner | Self::XlInpaint)
    }

    /// Whether this is a Stable Diffusion 2.x model.
    pub fn is_v2(self) -> bool {
        matches!(self, Self::V2 | Self::InpaintingV2)
    }

    /// The image size the type was trained at (`DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP`).
    pub fn image_size(self) -> usize {
        match self {
            Self::V1 | Self::Inpainting | Self::InpaintingV2 => 512,
            Self::V2 => 768,
            Self::XlBase | Self::XlRefiner | Self::XlInpaint => 1024,
        }
    }

    /// The diffusers repository whose configs diffusers uses for this type
    /// (`DIFFUSERS_DEFAULT_PIPELINE_PATHS`).
    pub fn default_repo(self) -> &'static str {
        match self {
            Self::V1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Self::V2 => "stabilityai/stable-diffusion-2-1",
            Self::XlBase => "stabilityai/stable-diffusion-xl-base-1.0",
            Self::XlRefiner => "stabilityai/stable-diffusion-xl-refiner-1.0",
            Self::Inpainting => "stable-diffusion-v1-5/stable-diffusion-inpainting",
            Self::InpaintingV2 => "stabilityai/stable-diffusion-2-inpainting",
            Self::XlInpaint => "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        }
    }
}

impl std::fmt::Display for ModelType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.diffusers_name())
    }
}

/// The numbers config inference needs that tensor shapes do not hold. `Default` is what every
/// official Stable Diffusion checkpoint uses; a model with other values needs other hints (or
/// its diffusers configs, [`super::SingleFileOptions::config_dir`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferenceHints {
    /// Heads of SD 1 UNet transformers (`num_heads: 8` of the original config).
    pub unet_heads: usize,
    /// Channels per head of SD 2 / SDXL UNet transformers (`num_head_channels: 64`).
    pub unet_head_channels: usize,
    /// Channels per attention head of the text encoders (64 for CLIP ViT-L, OpenCLIP-H/bigG).
    pub text_head_channels: usize,
    /// Groups of every group norm of the UNet and the VAE (32).
    pub norm_num_groups: usize,
    /// Width of SDXL's sinusoidal features per time id (256).
    pub addition_time_embed_dim: usize,
}

impl Default for InferenceHints {
    fn default() -> Self {
        Self {
            unet_heads: 8,
            unet_head_channels: 64,
            text_head_channels: 64,
            norm_num_groups: 32,
            addition_time_embed_dim: 256,
        }
    }
}

/// OpenAI CLIP prefix of SD 1.x.
pub(crate) const SD1_CLIP: &str = "cond_stage_model.transformer.";
/// OpenCLIP prefix of SD 2.x.
pub(crate) const SD2_OPEN_CLIP: &str = "cond_stage_model.model.";
/// OpenAI CLIP prefix of SDXL base.
pub(crate) const XL_CLIP: &str = "conditioner.embedders.0.transformer.";
/// OpenCLIP-bigG prefix of SDXL base.
pub(crate) const XL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";
/// OpenCLIP-bigG prefix of the SDXL refiner.
pub(crate) const XL_REFINER_OPEN_CLIP: &str = "conditioner.embedders.0.model.";

fn has_prefix(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> bool {
    shapes
        .range(prefix.to_string()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(prefix))
}

/// Detect the model type. The text-encoder layout decides the family when the checkpoint has
/// one (so small and pruned models are recognised too); otherwise diffusers' width markers do
/// (cross-attention width 1024 for SD 2, 2048 / 1280 with an added embedding for SDXL base /
/// refiner). 9 input channels make it an inpainting model. A file with only a VAE is `V1`, as
/// in diffusers.
pub(crate) fn detect(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<ModelType> {
    let conv_in = format!("{UNET_PREFIX}input_blocks.0.0.weight");
    let in_channels = match shapes.get(&conv_in) {
        Some(s) if s.len() == 4 => s[1],
        // A VAE without a UNet (a standalone VAE file): diffusers falls back to "v1" too.
        _ if convert::vae_prefix(shapes).is_some() => return Ok(ModelType::V1),
        _ => {
            return Err(Error::UnknownModelType {
                path: path.to_path_buf(),
                key: conv_in,
                message: "neither a Stable Diffusion UNet (`model.diffusion_model.*`) nor a VAE \
                          in the file"
                    .into(),
            });
        }
    };
    let cross = shapes
        .iter()
        .find(|(k, s)| {
            k.starts_with(UNET_PREFIX) && k.ends_with("attn2.to_k.weight") && s.len() == 2
        })
        .map(|(_, s)| s[1]);
    let label = shapes.contains_key(&format!("{UNET_PREFIX}label_emb.0.0.weight"));
    let xl_base = has_prefix(shapes, XL_OPEN_CLIP) || (label && cross == Some(2048));
    let xl_refiner = has_prefix(shapes, XL_REFINER_OPEN_CLIP) || (label && cross == Some(1280));
    let v2 = has_prefix(shapes, SD2_OPEN_CLIP) || cross == Some(1024);
    let inpaint = in_channels == 9;
    Ok(match (xl_base, xl_refiner, v2, inpaint) {
        (true, _, _, true) => ModelType::XlInpaint,
        (true, _, _, false) => ModelType::XlBase,
        (false, true, _, _) => ModelType::XlRefiner,
        (false, false, true, true) => ModelType::InpaintingV2,
        (false, false, true, false) => ModelType::V2,
        (false, false, false, true) => ModelType::Inpainting,
        (false, false, false, false) => ModelType::V1,
    })
}

fn unsupported(path: &Path, field: &str, value: impl ToString, reason: &str) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        field: field.to_string(),
        value: value.to_string(),
        reason: format!(
            "{reason}; give InferenceHints or the diffusers configs (SingleFileOptions)"
        ),
    }
}

/// The UNet config for `layout` (diffusers' `create_unet_diffusers_config_from_ldm` with the
/// original config's numbers read from the shapes).
pub(crate) fn unet_config(
    path: &Path,
    model_type: ModelType,
    layout: &UNetLayout,
    vae_scale_factor: usize,
    hints: &InferenceHints,
) -> Result<UNet2DConditionModelConfig> {
    let levels = layout.block_out_channels.len();
    let down_block_types = layout
        .down_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
            .to_string()
        })
        .collect();
    let up_block_types = layout
        .up_attention
        .iter()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
        .collect();
    let attention_head_dim = if layout.linear_projection || model_type.is_xl() {
        // `num_head_channels` in the SD 2 and SDXL configs.
        let per_head = hints.unet_head_channels.max(1);
        let heads = layout
            .block_out_channels
            .iter()
            .map(|&c| {
                if c.is_multiple_of(per_head) {
                    Ok(c / per_head)
                } else {
                    Err(unsupported(
                        path,
                        "attention_head_dim",
                        c,
                        &format!("block width is not a multiple of {per_head} channels per head"),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        PerBlock::List(heads)
    } else {
        // `num_heads` in the SD 1 configs.
        PerBlock::One(hints.unet_heads)
    };
    let attended: Vec<usize> = layout
        .transformer_depth
        .iter()
        .zip(&layout.down_attention)
        .filter(|(_, a)| **a)
        .map(|(d, _)| *d)
        .collect();
    let transformer_layers_per_block = match attended.first() {
        Some(&d) if attended.iter().all(|&x| x == d) => PerBlock::One(TransformerLayers::One(d)),
        None => PerBlock::One(TransformerLayers::One(1)),
        Some(_) => PerBlock::List(
            layout
                .transformer_depth
                .iter()
                .map(|&d| TransformerLayers::One(d.max(1)))
                .collect(),
        ),
    };
    let cross_attention_dim =
        layout
            .cross_attention_dim
            .ok_or_else(|| Error::UnknownModelType {
                path: path.to_path_buf(),
                key: format!("{UNET_PREFIX}…attn2.to_k.weight"),
                message: "the UNet has no cross-attention".into(),
            })?;
    let mut config = UNet2DConditionModelConfig {
        sample_size: Some(SampleSize::Square(
            model_type.image_size() / vae_scale_factor.max(1),
        )),
        in_channels: layout.in_channels,
        out_channels: layout.out_channels,
        down_block_types,
        up_block_types,
        block_out_channels: layout.block_out_channels.clone(),
        layers_per_block: PerBlock::One(layout.layers_per_block),
        cross_attention_dim: PerBlock::One(cross_attention_dim),
        attention_head_dim,
        use_linear_projection: layout.linear_projection,
        transformer_layers_per_block,
        // The SD 2.1 (768, v-prediction) UNet config upcasts attention.
        upcast_attention: model_type == ModelType::V2,
        norm_num_groups: Some(hints.norm_num_groups),
        ..UNet2DConditionModelConfig::default()
    };
    if let Some(width) = layout.label_emb_in {
        if model_type.is_xl() {
            config.addition_embed_type = Some("text_time".into());
            config.addition_time_embed_dim = Some(hints.addition_time_embed_dim);
        } else {
            config.class_embed_type = Some("projection".into());
        }
        config.projection_class_embeddings_input_dim = Some(width);
    }
    debug_assert_eq!(config.block_out_channels.len(), levels);
    Ok(config)
}

fn shape<'a>(
    path: &Path,
    shapes: &'a BTreeMap<String, Vec<usize>>,
    key: &str,
    rank: usize,
) -> Result<&'a [usize]> {
    match shapes.get(key) {
        Some(s) if s.len() == rank => Ok(s),
        Some(s) => Err(Error::TensorShape {
            path: path.to_path_buf(),
            key: key.to_string(),
            expected: vec![0; rank],
            got: s.clone(),
        }),
        None => Err(Error::MissingTensor {
            path: path.to_path_buf(),
            key: key.to_string(),
        }),
    }
}

/// The VAE config (diffusers' `create_vae_diffusers_config_from_ldm` with the `ddconfig`
/// numbers read from the shapes).
pub(crate) fn vae_config(
    path: &Path,
    model_type: ModelType,
    shapes: &BTreeMap<String, Vec<usize>>,
    prefix: &str,
    hints: &InferenceHints,
) -> Result<AutoencoderKLConfig> {
    let vae = convert::strip(shapes, prefix);
    let levels = convert::vae_levels(&vae);
    let key = |k: &str| format!("{prefix}{k}");
    let conv_in = shape(path, shapes, &key("encoder.conv_in.weight"), 4)?;
    let conv_out = shape(path, shapes, &key("decoder.conv_out.weight"), 4)?;
    let z = shape(path, shapes, &key("decoder.conv_in.weight"), 4)?;
    let mut block_out_channels = Vec::with_capacity(levels);
    for b in 0..levels {
        let s = shape(
            path,
            shapes,
            &key(&format!("encoder.down.{b}.block.0.conv1.weight")),
            4,
        )?;
        block_out_channels.push(s[0]);
    }
    let layers_per_block = vae
        .keys()
        .filter_map(|k| k.strip_prefix("encoder.down.0.block."))
        .filter_map(|r| r.split_once('.').and_then(|(i, _)| i.parse::<usize>().ok()))
        .max()
        .map_or(1, |i| i + 1);
    Ok(AutoencoderKLConfig {
        in_channels: conv_in[1],
        out_channels: conv_out[0],
        down_block_types: vec!["DownEncoderBlock2D".into(); levels],
        up_block_types: vec!["UpDecoderBlock2D".into(); levels],
        block_out_channels,
        layers_per_block,
        latent_channels: z[1],
        sample_size: SampleSize::Square(model_type.image_size()),
        // `scale_factor` of the original configs.
        scaling_factor: if model_type.is_xl() { 0.13025 } else { 0.18215 },
        use_quant_conv: vae.contains_key("quant_conv.weight"),
        use_post_quant_conv: vae.contains_key("post_quant_conv.weight"),
        mid_block_add_attention: vae.keys().any(|k| k.starts_with("encoder.mid.attn_1.")),
        norm_num_groups: hints.norm_num_groups,
        ..AutoencoderKLConfig::default()
    })
}

/// A text encoder's layout in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TextLayout {
    /// transformers' CLIP names behind a prefix (OpenAI CLIP ViT-L).
    Clip(&'static str),
    /// OpenCLIP names behind a prefix; `drop_last`: SD 2 uses the penultimate block.
    OpenClip {
        prefix: &'static str,
        drop_last: bool,
    },
}

impl TextLayout {
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Self::Clip(p) | Self::OpenClip { prefix: p, .. } => p,
        }
    }

    /// The key every layout has (for "missing" errors).
    pub(crate) fn token_embedding_key(self) -> String {
        match self {
            Self::Clip(p) => format!("{p}text_model.embeddings.token_embedding.weight"),
            Self::OpenClip { prefix, .. } => format!("{prefix}token_embedding.weight"),
        }
    }
}

/// The CLIP text config (what the type's default repository holds: the hinted channels per head,
/// quick-GELU for OpenAI CLIP and GELU for OpenCLIP, the legacy token ids 0 / 1 / 2).
pub(crate) fn clip_config(
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    layout: TextLayout,
    hints: &InferenceHints,
) -> Result<CLIPTextConfig> {
    let prefix = layout.prefix();
    let (token, position, fc1, layers, act, projection) = match layout {
        TextLayout::Clip(p) => {
            // Keys may lack `text_model.` (transformers >= 5.6 writes bare encoders).
            let base = if has_prefix(shapes, &format!("{p}text_model.")) {
                format!("{p}text_model.")
            } else {
                p.to_string()
            };
            let layers_prefix = format!("{base}encoder.layers.");
            let layers = shapes
                .keys()
                .filter_map(|k| {
                    k.strip_prefix(&layers_prefix)?
                        .split_once('.')?
                        .0
                        .parse::<usize>()
                        .ok()
                })
                .max()
                .map_or(0, |i| i + 1);
            (
                format!("{base}embeddings.token_embedding.weight"),
                format!("{base}embeddings.position_embedding.weight"),
                format!("{base}encoder.layers.0.mlp.fc1.weight"),
                layers,
                "quick_gelu",
                shapes
                    .get(&format!("{p}text_projection.weight"))
                    .map(|s| s[0]),
            )
        }
        TextLayout::OpenClip { prefix, drop_last } => {
            let blocks = convert::open_clip_blocks(shapes, prefix);
            (
                format!("{prefix}token_embedding.weight"),
                format!("{prefix}positional_embedding"),
                format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"),
                if drop_last {
                    blocks.saturating_sub(1)
                } else {
                    blocks
                },
                "gelu",
                if drop_last {
                    // SD 2's `CLIPTextModel` has no projection; its repository's config says 512.
                    Some(512)
                } else {
                    shapes
                        .get(&format!("{prefix}text_projection"))
                        .and_then(|s| s.get(1).copied())
                },
            )
        }
    };
    let token = shape(path, shapes, &token, 2)?;
    let position = shape(path, shapes, &position, 2)?;
    let fc1 = shape(path, shapes, &fc1, 2)?;
    let hidden = token[1];
    let per_head = hints.text_head_channels.max(1);
    if !hidden.is_multiple_of(per_head) {
        return Err(unsupported(
            path,
            "num_attention_heads",
            hidden,
            &format!(
                "the text encoder under `{prefix}` is not a multiple of {per_head} channels per \
                 head"
            ),
        ));
    }
    Ok(CLIPTextConfig {
        vocab_size: token[0],
        hidden_size: hidden,
        intermediate_size: fc1[0],
        projection_dim: projection.unwrap_or(hidden),
        num_hidden_layers: layers,
        num_attention_heads: hidden / per_head,
        max_position_embeddings: position[0],
        hidden_act: act.into(),
        pad_token_id: Some(1),
        bos_token_id: Some(0),
        eos_token_id: Some(2),
        ..CLIPTextConfig::default()
    })
}

/// The scheduler config diffusers uses for the type (`scheduler_config.json` of its default
/// repository; SD 2 v-prediction guessed from `global_step` as diffusers' legacy loader does:
/// 875000 is SD 2 base, which predicts noise).
pub(crate) fn scheduler_config(model_type: ModelType, global_step: Option<i64>) -> Value {
    let prediction_type = if model_type == ModelType::V2 && global_step != Some(875_000) {
        "v_prediction"
    } else {
        "epsilon"
    };
    let common = json!({
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
    });
    let mut config = common.as_object().cloned().unwrap_or_default();
    let class = if model_type.is_xl() {
        config.insert("interpolation_type".into(), json!("linear"));
        config.insert("sample_max_value".into(), json!(1.0));
        config.insert("timestep_spacing".into(), json!("leading"));
        config.insert("use_karras_sigmas".into(), json!(false));
        "EulerDiscreteScheduler"
    } else if model_type.is_v2() {
        "DDIMScheduler"
    } else {
        "PNDMScheduler"
    };
    config.insert("_class_name".into(), json!(class));
    Value::Object(config)
}
