//! `UNet2DConditionModel`'s config: every `__init__` argument with its default, and the
//! per-block resolution of the arguments that take a scalar or a list.

use serde::{Deserialize, Serialize};

use diffusion_core::Config;

use crate::unets::unet_2d::SampleSize;
use crate::unets::unet_2d::config::{check_block_layout, number, whole_as_int};

/// A config value given once for all blocks or once per block (`attention_head_dim`,
/// `cross_attention_dim`, `layers_per_block`, `num_attention_heads`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value per down block (up blocks read them reversed). Tried first, so a list of
    /// lists of transformer counts reads as one entry per block.
    List(Vec<T>),
    /// The same value for every block.
    One(T),
}

impl<T: Clone> PerBlock<T> {
    /// The value of each of `n` blocks; `None` when a list does not have `n` entries.
    pub fn resolve(&self, n: usize) -> Option<Vec<T>> {
        match self {
            Self::One(v) => Some(vec![v.clone(); n]),
            Self::List(values) if values.len() == n => Some(values.clone()),
            Self::List(_) => None,
        }
    }

    fn list_len(&self) -> Option<usize> {
        match self {
            Self::One(_) => None,
            Self::List(values) => Some(values.len()),
        }
    }
}

/// `transformer_layers_per_block` of one block: one count for each of its transformers, or a
/// count per transformer (asymmetric UNets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    /// Every transformer of the block has this many transformer blocks.
    One(usize),
    /// Transformer `i` of the block has entry `i`.
    PerLayer(Vec<usize>),
}

impl TransformerLayers {
    /// Counts for a block of `num_layers` transformers; `None` when a list is too short.
    pub fn resolve(&self, num_layers: usize) -> Option<Vec<usize>> {
        match self {
            Self::One(n) => Some(vec![*n; num_layers]),
            Self::PerLayer(counts) if counts.len() >= num_layers => {
                Some(counts[..num_layers].to_vec())
            }
            Self::PerLayer(_) => None,
        }
    }
}

/// `UNet2DConditionModel.__init__` arguments (diffusers/models/unets/unet_2d_condition.py);
/// `Default` is the Python default (Stable Diffusion 1.x's layout).
///
/// Keys that only affect blocks this port does not build (`resnet_skip_time_act`,
/// `resnet_out_scale_factor`, `mid_block_only_cross_attention`, `cross_attention_norm`,
/// `addition_embed_type_num_heads`) are kept for round trips and, as in diffusers, change
/// nothing for the blocks built here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionModelConfig {
    /// Height and width of latents (informational).
    pub sample_size: Option<SampleSize>,
    /// Channels of the input sample (9 for inpainting UNets).
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
    /// Map the input from `[0, 1]` to `[-1, 1]` first.
    pub center_input_sample: bool,
    /// Cosines first in the sinusoidal embeddings.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal embeddings.
    #[serde(serialize_with = "whole_as_int", deserialize_with = "number")]
    pub freq_shift: f64,
    /// Down block class names.
    pub down_block_types: Vec<String>,
    /// `"UNetMidBlock2DCrossAttn"`, `"UNetMidBlock2D"`, or `None` for no mid block.
    pub mid_block_type: Option<String>,
    /// Up block class names.
    pub up_block_types: Vec<String>,
    /// `attn1` of every transformer attends to the encoder hidden states too.
    pub only_cross_attention: PerBlock<bool>,
    /// Output channels of each level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// Output scale factor of the mid block's resnets.
    #[serde(serialize_with = "whole_as_int", deserialize_with = "number")]
    pub mid_block_scale_factor: f64,
    /// Dropout probability.
    pub dropout: f64,
    /// Activation of resnets and time embedding.
    pub act_fn: String,
    /// Groups of the group norms (`None`: no output norm; the blocks built here then fail).
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the group norms.
    pub norm_eps: f64,
    /// Width of the encoder hidden states, per block or for all.
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per transformer: one count, one per block, or one per transformer
    /// of each block.
    pub transformer_layers_per_block: PerBlock<TransformerLayers>,
    /// Transformer counts of the up blocks' transformers (needed when
    /// `transformer_layers_per_block` lists counts per transformer).
    pub reverse_transformer_layers_per_block: Option<Vec<TransformerLayers>>,
    /// Width of the encoder hidden states before `encoder_hid_proj`.
    pub encoder_hid_dim: Option<usize>,
    /// `"text_proj"` (a linear layer to `cross_attention_dim`), or `None`.
    pub encoder_hid_dim_type: Option<String>,
    /// **Number of heads** of the cross-attention blocks (diffusers' historical misnomer; see
    /// [`Self::num_attention_heads`]).
    pub attention_head_dim: PerBlock<usize>,
    /// Must stay `None`: diffusers rejects it and uses `attention_head_dim` as the head count.
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Not supported (`DualTransformer2DModel`).
    pub dual_cross_attention: bool,
    /// Linear instead of 1×1 convolution projections in the transformers (SD 2).
    pub use_linear_projection: bool,
    /// `None`, `"timestep"`, `"identity"`, `"projection"` or `"simple_projection"`.
    pub class_embed_type: Option<String>,
    /// `None` or `"text_time"` (SDXL's pooled text embedding and size/crop conditioning).
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal features of each SDXL `time_ids` entry.
    pub addition_time_embed_dim: Option<usize>,
    /// Size of the class embedding table (with `class_embed_type = None`).
    pub num_class_embeds: Option<usize>,
    /// Attention in f32.
    pub upcast_attention: bool,
    /// `"default"` or `"scale_shift"`.
    pub resnet_time_scale_shift: String,
    /// Only used by `ResnetDownsampleBlock2D`-style blocks (not built here).
    pub resnet_skip_time_act: bool,
    /// Only used by `ResnetDownsampleBlock2D`-style blocks (not built here).
    pub resnet_out_scale_factor: f64,
    /// `"positional"` or `"fourier"`.
    pub time_embedding_type: String,
    /// Width of the time embedding (`None`: `4 * block_out_channels[0]`, or twice it for
    /// `"fourier"`).
    pub time_embedding_dim: Option<usize>,
    /// Activation applied once to the summed embedding before the blocks.
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time embedding MLP.
    pub timestep_post_act: Option<String>,
    /// Width of `timestep_cond` (LCM's guidance embedding).
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: usize,
    /// Input width of `"projection"` class embeddings and of SDXL's `add_embedding`.
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// `"default"` (GLIGEN's `"gated"` is not supported).
    pub attention_type: String,
    /// Concatenate the class embedding to the time embedding instead of adding it.
    pub class_embeddings_concat: bool,
    /// Only used by `UNetMidBlock2DSimpleCrossAttn` (not built here).
    pub mid_block_only_cross_attention: Option<bool>,
    /// Only used by `SimpleCrossAttn` blocks (not built here).
    pub cross_attention_norm: Option<String>,
    /// Only used by `addition_embed_type = "text"` (not built here).
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNet2DConditionModelConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(TransformerLayers::One(1)),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

/// The per-block values, resolved from scalars and lists (down-block order).
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedBlocks {
    /// Heads of each block's transformers (`attention_head_dim`).
    pub num_attention_heads: Vec<usize>,
    /// Encoder width of each block.
    pub cross_attention_dim: Vec<usize>,
    /// Resnets of each down block.
    pub layers_per_block: Vec<usize>,
    /// `only_cross_attention` of each block.
    pub only_cross_attention: Vec<bool>,
    /// Transformer counts of each down block's transformers.
    pub down_transformer_layers: Vec<TransformerLayers>,
    /// Transformer counts of each up block's transformers (up-block order).
    pub up_transformer_layers: Vec<TransformerLayers>,
}

impl UNet2DConditionModelConfig {
    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        let c0 = self.block_out_channels.first().copied().unwrap_or(0);
        let default = if self.time_embedding_type == "fourier" {
            2 * c0
        } else {
            4 * c0
        };
        self.time_embedding_dim.unwrap_or(default)
    }

    /// Resolve the per-block values as diffusers does (`num_attention_heads =
    /// num_attention_heads or attention_head_dim`; scalars repeated for every block).
    ///
    /// # Errors
    /// `(field, message)` for a list whose length differs from `down_block_types`.
    pub fn resolve_blocks(&self) -> Result<ResolvedBlocks, (String, String)> {
        let n = self.down_block_types.len();
        let length_error = |field: &str, len: usize| {
            (
                field.to_string(),
                format!("{len} entries for {n} down blocks; give one per block or a single value"),
            )
        };
        fn resolve<T: Clone>(
            value: &PerBlock<T>,
            n: usize,
            field: &str,
            err: &dyn Fn(&str, usize) -> (String, String),
        ) -> Result<Vec<T>, (String, String)> {
            value
                .resolve(n)
                .ok_or_else(|| err(field, value.list_len().unwrap_or(0)))
        }
        let heads_source = self
            .num_attention_heads
            .as_ref()
            .map(|h| (h, "num_attention_heads"))
            .unwrap_or((&self.attention_head_dim, "attention_head_dim"));
        let num_attention_heads = resolve(heads_source.0, n, heads_source.1, &length_error)?;
        // diffusers checks attention_head_dim's length even when num_attention_heads is given.
        resolve(
            &self.attention_head_dim,
            n,
            "attention_head_dim",
            &length_error,
        )?;
        let cross_attention_dim = resolve(
            &self.cross_attention_dim,
            n,
            "cross_attention_dim",
            &length_error,
        )?;
        let layers_per_block =
            resolve(&self.layers_per_block, n, "layers_per_block", &length_error)?;
        let only_cross_attention = resolve(
            &self.only_cross_attention,
            n,
            "only_cross_attention",
            &length_error,
        )?;
        let down_transformer_layers = resolve(
            &self.transformer_layers_per_block,
            n,
            "transformer_layers_per_block",
            &length_error,
        )?;
        let up_transformer_layers = match &self.reverse_transformer_layers_per_block {
            Some(reverse) if reverse.len() == n => reverse.clone(),
            Some(reverse) => {
                return Err(length_error(
                    "reverse_transformer_layers_per_block",
                    reverse.len(),
                ));
            }
            None => {
                if down_transformer_layers
                    .iter()
                    .any(|l| matches!(l, TransformerLayers::PerLayer(_)))
                {
                    return Err((
                        "reverse_transformer_layers_per_block".into(),
                        "must be given when transformer_layers_per_block lists counts per \
                         transformer (asymmetric UNet)"
                            .into(),
                    ));
                }
                down_transformer_layers.iter().rev().cloned().collect()
            }
        };
        Ok(ResolvedBlocks {
            num_attention_heads,
            cross_attention_dim,
            layers_per_block,
            only_cross_attention,
            down_transformer_layers,
            up_transformer_layers,
        })
    }
}

impl Config for UNet2DConditionModelConfig {
    const CLASS_NAME: &'static str = "UNet2DConditionModel";

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, message: String| Err((field.to_string(), message));
        check_block_layout(
            self.down_block_types.len(),
            self.up_block_types.len(),
            &self.block_out_channels,
        )?;
        if self.num_attention_heads.is_some() {
            return err(
                "num_attention_heads",
                "diffusers does not accept it (its `attention_head_dim` holds the head count, \
                 see huggingface/diffusers#2011); set attention_head_dim instead"
                    .into(),
            );
        }
        let blocks = self.resolve_blocks()?;
        if blocks.num_attention_heads.contains(&0) {
            return err("attention_head_dim", "head counts must be positive".into());
        }
        if blocks.layers_per_block.contains(&0) {
            return err("layers_per_block", "every block needs a resnet".into());
        }
        for (i, layers) in blocks.down_transformer_layers.iter().enumerate() {
            if layers.resolve(blocks.layers_per_block[i]).is_none() {
                return err(
                    "transformer_layers_per_block",
                    format!(
                        "block {i} lists fewer transformer counts than its {} layers",
                        blocks.layers_per_block[i]
                    ),
                );
            }
        }
        let up_layers: Vec<usize> = blocks
            .layers_per_block
            .iter()
            .rev()
            .map(|l| l + 1)
            .collect();
        for (i, layers) in blocks.up_transformer_layers.iter().enumerate() {
            if layers.resolve(up_layers[i]).is_none() {
                return err(
                    "reverse_transformer_layers_per_block",
                    format!(
                        "up block {i} lists fewer transformer counts than its {} layers",
                        up_layers[i]
                    ),
                );
            }
        }
        if !self.dropout.is_finite() || !(0.0..1.0).contains(&self.dropout) {
            return err(
                "dropout",
                format!("{} is not a probability in [0, 1)", self.dropout),
            );
        }
        if self.norm_num_groups == Some(0) {
            return err("norm_num_groups", "the group count must be positive".into());
        }
        if self.conv_in_kernel == 0 || self.conv_out_kernel == 0 {
            let field = if self.conv_in_kernel == 0 {
                "conv_in_kernel"
            } else {
                "conv_out_kernel"
            };
            return err(field, "the kernel size must be positive".into());
        }
        match self.time_embedding_type.as_str() {
            "positional" => {}
            "fourier" if !self.time_embed_dim().is_multiple_of(2) => {
                return err(
                    "time_embedding_dim",
                    format!(
                        "fourier features need an even width, got {}",
                        self.time_embed_dim()
                    ),
                );
            }
            "fourier" => {}
            other => {
                return err(
                    "time_embedding_type",
                    format!("`{other}` is not one of positional, fourier"),
                );
            }
        }
        if self.encoder_hid_dim_type.is_some() && self.encoder_hid_dim.is_none() {
            return err(
                "encoder_hid_dim",
                "must be set when encoder_hid_dim_type is".into(),
            );
        }
        if matches!(
            self.class_embed_type.as_deref(),
            Some("projection" | "simple_projection")
        ) && self.projection_class_embeddings_input_dim.is_none()
        {
            return err(
                "projection_class_embeddings_input_dim",
                "required by class_embed_type \"projection\" / \"simple_projection\"".into(),
            );
        }
        if self.addition_embed_type.as_deref() == Some("text_time") {
            if self.addition_time_embed_dim.is_none() {
                return err(
                    "addition_time_embed_dim",
                    "required by addition_embed_type \"text_time\"".into(),
                );
            }
            if self.projection_class_embeddings_input_dim.is_none() {
                return err(
                    "projection_class_embeddings_input_dim",
                    "required by addition_embed_type \"text_time\"".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_and_lists_parse_and_write_back_as_given() {
        let c: UNet2DConditionModelConfig = serde_json::from_str(
            r#"{"attention_head_dim": [5, 10, 20, 20], "layers_per_block": 2,
                "transformer_layers_per_block": [1, [2, 3], 10, 10],
                "reverse_transformer_layers_per_block": [[1, 1, 1], 10, 10, 2],
                "only_cross_attention": [false, true, false, false]}"#,
        )
        .unwrap();
        assert_eq!(c.attention_head_dim, PerBlock::List(vec![5, 10, 20, 20]));
        assert_eq!(c.layers_per_block, PerBlock::One(2));
        let blocks = c.resolve_blocks().unwrap();
        assert_eq!(blocks.num_attention_heads, [5, 10, 20, 20]);
        assert_eq!(blocks.layers_per_block, [2, 2, 2, 2]);
        assert_eq!(blocks.only_cross_attention, [false, true, false, false]);
        assert_eq!(
            blocks.down_transformer_layers[1],
            TransformerLayers::PerLayer(vec![2, 3])
        );
        assert_eq!(blocks.up_transformer_layers[3], TransformerLayers::One(2));
        assert_eq!(c.validate(), Ok(()));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["attention_head_dim"], serde_json::json!([5, 10, 20, 20]));
        assert_eq!(v["layers_per_block"], serde_json::json!(2));
        assert_eq!(
            v["transformer_layers_per_block"],
            serde_json::json!([1, [2, 3], 10, 10])
        );
    }

    #[test]
    fn list_lengths_that_disagree_name_the_field() {
        for (json, field) in [
            (r#"{"attention_head_dim": [8, 8]}"#, "attention_head_dim"),
            (r#"{"cross_attention_dim": [768]}"#, "cross_attention_dim"),
            (r#"{"layers_per_block": [2, 2, 2]}"#, "layers_per_block"),
            (
                r#"{"only_cross_attention": [true]}"#,
                "only_cross_attention",
            ),
            (
                r#"{"transformer_layers_per_block": [1, 1]}"#,
                "transformer_layers_per_block",
            ),
            (
                r#"{"transformer_layers_per_block": [1, [1, 2], 1, 1]}"#,
                "reverse_transformer_layers_per_block",
            ),
            (r#"{"block_out_channels": [32, 64]}"#, "block_out_channels"),
            (r#"{"up_block_types": ["UpBlock2D"]}"#, "up_block_types"),
            (r#"{"num_attention_heads": 8}"#, "num_attention_heads"),
        ] {
            let c: UNet2DConditionModelConfig = serde_json::from_str(json).unwrap();
            assert_eq!(c.validate().unwrap_err().0, field, "{json}");
        }
    }

    #[test]
    fn sdxl_style_addition_embedding_needs_its_widths() {
        let c = UNet2DConditionModelConfig {
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            ..Default::default()
        };
        assert_eq!(
            c.validate().unwrap_err().0,
            "projection_class_embeddings_input_dim"
        );
    }
}
