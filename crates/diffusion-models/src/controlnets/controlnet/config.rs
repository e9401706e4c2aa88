//! `ControlNetModel`'s config: every `__init__` argument with its default
//! (diffusers/models/controlnets/controlnet.py).

use serde::{Deserialize, Serialize};

use diffusion_core::Config;

use crate::unets::unet_2d::config::{number, whole_as_int};
use crate::unets::unet_2d_condition::{PerBlock, TransformerLayers, UNet2DConditionModelConfig};

/// `ControlNetModel.__init__` arguments; `Default` is the Python default (Stable Diffusion
/// 1.x's layout with conditioning embedding channels `(16, 32, 96, 256)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlNetModelConfig {
    /// Channels of the input sample (the UNet's latents).
    pub in_channels: usize,
    /// Channels of the conditioning image.
    pub conditioning_channels: usize,
    /// Cosines first in the sinusoidal time features.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal time features.
    #[serde(serialize_with = "whole_as_int", deserialize_with = "number")]
    pub freq_shift: f64,
    /// Down block class names.
    pub down_block_types: Vec<String>,
    /// `"UNetMidBlock2DCrossAttn"` or `"UNetMidBlock2D"` (diffusers rejects `None`).
    pub mid_block_type: Option<String>,
    /// `attn1` of every transformer attends to the encoder hidden states too.
    pub only_cross_attention: PerBlock<bool>,
    /// Output channels of each level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block.
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// Output scale factor of the mid block's resnets.
    #[serde(serialize_with = "whole_as_int", deserialize_with = "number")]
    pub mid_block_scale_factor: f64,
    /// Activation of resnets and time embedding.
    pub act_fn: String,
    /// Groups of the group norms.
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the group norms.
    pub norm_eps: f64,
    /// Width of the encoder hidden states.
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per transformer, for all blocks or per block.
    pub transformer_layers_per_block: PerBlock<TransformerLayers>,
    /// Not supported (must stay `None`).
    pub encoder_hid_dim: Option<usize>,
    /// Not supported (must stay `None`).
    pub encoder_hid_dim_type: Option<String>,
    /// **Number of heads** of the cross-attention blocks (diffusers' historical misnomer).
    pub attention_head_dim: PerBlock<usize>,
    /// Heads of the cross-attention blocks (`None`: `attention_head_dim`).
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Linear instead of 1×1 convolution projections in the transformers (SD 2).
    pub use_linear_projection: bool,
    /// Not supported (must stay `None`).
    pub class_embed_type: Option<String>,
    /// `None` or `"text_time"` (SDXL).
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal features of each SDXL `time_ids` entry.
    pub addition_time_embed_dim: Option<usize>,
    /// Not supported (must stay `None`).
    pub num_class_embeds: Option<usize>,
    /// Attention in f32.
    pub upcast_attention: bool,
    /// `"default"` or `"scale_shift"`.
    pub resnet_time_scale_shift: String,
    /// Input width of SDXL's `add_embedding`.
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// `"rgb"`, or `"bgr"` (the conditioning image's channels are flipped first).
    pub controlnet_conditioning_channel_order: String,
    /// Channels of the conditioning embedding's convolutions.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Average the residuals over height and width (shuffle ControlNets).
    pub global_pool_conditions: bool,
    /// Only used by `addition_embed_type = "text"` (not built here).
    pub addition_embed_type_num_heads: usize,
}

impl Default for ControlNetModelConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            in_channels: 4,
            conditioning_channels: 3,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(TransformerLayers::One(1)),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            projection_class_embeddings_input_dim: None,
            controlnet_conditioning_channel_order: "rgb".into(),
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            global_pool_conditions: false,
            addition_embed_type_num_heads: 64,
        }
    }
}

impl ControlNetModelConfig {
    /// The UNet config whose down path and mid block are this ControlNet's (the up path is
    /// plain `UpBlock2D`s the ControlNet never builds into its own module tree).
    pub fn to_unet_config(&self) -> UNet2DConditionModelConfig {
        UNet2DConditionModelConfig {
            in_channels: self.in_channels,
            out_channels: self.in_channels,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            down_block_types: self.down_block_types.clone(),
            mid_block_type: self.mid_block_type.clone(),
            up_block_types: vec!["UpBlock2D".into(); self.down_block_types.len()],
            only_cross_attention: self.only_cross_attention.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block.clone(),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            act_fn: self.act_fn.clone(),
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: self.cross_attention_dim.clone(),
            transformer_layers_per_block: self.transformer_layers_per_block.clone(),
            encoder_hid_dim: self.encoder_hid_dim,
            encoder_hid_dim_type: self.encoder_hid_dim_type.clone(),
            attention_head_dim: self.attention_head_dim.clone(),
            num_attention_heads: self.num_attention_heads.clone(),
            use_linear_projection: self.use_linear_projection,
            class_embed_type: self.class_embed_type.clone(),
            addition_embed_type: self.addition_embed_type.clone(),
            addition_time_embed_dim: self.addition_time_embed_dim,
            num_class_embeds: self.num_class_embeds,
            upcast_attention: self.upcast_attention,
            resnet_time_scale_shift: self.resnet_time_scale_shift.clone(),
            projection_class_embeddings_input_dim: self.projection_class_embeddings_input_dim,
            addition_embed_type_num_heads: self.addition_embed_type_num_heads,
            ..UNet2DConditionModelConfig::default()
        }
    }

    /// The ControlNet diffusers' `ControlNetModel.from_unet` builds for `unet`.
    pub fn from_unet(
        unet: &UNet2DConditionModelConfig,
        conditioning_channels: usize,
        conditioning_embedding_out_channels: Vec<usize>,
        controlnet_conditioning_channel_order: &str,
    ) -> Self {
        Self {
            in_channels: unet.in_channels,
            conditioning_channels,
            flip_sin_to_cos: unet.flip_sin_to_cos,
            freq_shift: unet.freq_shift,
            down_block_types: unet.down_block_types.clone(),
            mid_block_type: unet.mid_block_type.clone(),
            only_cross_attention: unet.only_cross_attention.clone(),
            block_out_channels: unet.block_out_channels.clone(),
            layers_per_block: unet.layers_per_block.clone(),
            downsample_padding: unet.downsample_padding,
            mid_block_scale_factor: unet.mid_block_scale_factor,
            act_fn: unet.act_fn.clone(),
            norm_num_groups: unet.norm_num_groups,
            norm_eps: unet.norm_eps,
            cross_attention_dim: unet.cross_attention_dim.clone(),
            transformer_layers_per_block: unet.transformer_layers_per_block.clone(),
            encoder_hid_dim: unet.encoder_hid_dim,
            encoder_hid_dim_type: unet.encoder_hid_dim_type.clone(),
            attention_head_dim: unet.attention_head_dim.clone(),
            num_attention_heads: unet.num_attention_heads.clone(),
            use_linear_projection: unet.use_linear_projection,
            class_embed_type: unet.class_embed_type.clone(),
            addition_embed_type: unet.addition_embed_type.clone(),
            addition_time_embed_dim: unet.addition_time_embed_dim,
            num_class_embeds: unet.num_class_embeds,
            upcast_attention: unet.upcast_attention,
            resnet_time_scale_shift: unet.resnet_time_scale_shift.clone(),
            projection_class_embeddings_input_dim: unet.projection_class_embeddings_input_dim,
            controlnet_conditioning_channel_order: controlnet_conditioning_channel_order.into(),
            conditioning_embedding_out_channels,
            // diffusers' from_unet leaves these at their defaults.
            global_pool_conditions: false,
            addition_embed_type_num_heads: 64,
        }
    }
}

impl Config for ControlNetModelConfig {
    const CLASS_NAME: &'static str = "ControlNetModel";

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, message: String| Err((field.to_string(), message));
        if self.mid_block_type.is_none() {
            return err(
                "mid_block_type",
                "a ControlNet needs a mid block (diffusers rejects null)".into(),
            );
        }
        if self.conditioning_embedding_out_channels.is_empty() {
            return err(
                "conditioning_embedding_out_channels",
                "needs at least one entry".into(),
            );
        }
        if !matches!(
            self.controlnet_conditioning_channel_order.as_str(),
            "rgb" | "bgr"
        ) {
            return err(
                "controlnet_conditioning_channel_order",
                format!(
                    "unknown order `{}`; use \"rgb\" or \"bgr\"",
                    self.controlnet_conditioning_channel_order
                ),
            );
        }
        self.to_unet_config().validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_orders_are_checked() {
        let config = ControlNetModelConfig::default();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["freq_shift"], serde_json::json!(0));
        let back: ControlNetModelConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);
        assert!(config.validate().is_ok());
        let bad = ControlNetModelConfig {
            controlnet_conditioning_channel_order: "rbg".into(),
            ..config
        };
        assert_eq!(
            bad.validate().unwrap_err().0,
            "controlnet_conditioning_channel_order"
        );
    }
}
