//! `UNet2DModel`'s config: every `__init__` argument with its default.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use diffusion_core::Config;

/// `sample_size`: one side, or `[height, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// Square samples.
    Square(usize),
    /// `[height, width]`.
    Rect([usize; 2]),
}

/// `UNet2DModel.__init__` arguments (diffusers/models/unets/unet_2d.py); `Default` is the
/// Python default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DModelConfig {
    /// Height and width of samples (informational; any multiple of the downsampling works).
    pub sample_size: Option<SampleSize>,
    /// Channels of the input sample.
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
    /// Map the input from `[0, 1]` to `[-1, 1]` first.
    pub center_input_sample: bool,
    /// `"positional"`, `"fourier"` or `"learned"`.
    pub time_embedding_type: String,
    /// Width of the time embedding (`None`: `4 * block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// Frequency shift of positional embeddings.
    #[serde(serialize_with = "whole_as_int", deserialize_with = "number")]
    pub freq_shift: f64,
    /// Cosines first in positional embeddings.
    pub flip_sin_to_cos: bool,
    /// Down block class names.
    pub down_block_types: Vec<String>,
    /// `"UNetMidBlock2D"`, or `None` for no mid block.
    pub mid_block_type: Option<String>,
    /// Up block class names.
    pub up_block_types: Vec<String>,
    /// Output channels of each level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Output scale factor of the mid block.
    #[serde(serialize_with = "whole_as_int", deserialize_with = "number")]
    pub mid_block_scale_factor: f64,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// `"conv"` or `"resnet"` (used by `AttnDownBlock2D`).
    pub downsample_type: String,
    /// `"conv"` or `"resnet"` (used by `AttnUpBlock2D`).
    pub upsample_type: String,
    /// Dropout probability in resnets.
    pub dropout: f64,
    /// Activation of the resnets.
    pub act_fn: String,
    /// Width of attention heads (`None`: one head over all channels).
    pub attention_head_dim: Option<usize>,
    /// Groups of the group norms (`None`: `min(channels / 4, 32)` where diffusers allows it).
    pub norm_num_groups: Option<usize>,
    /// Groups of the mid block attention's norm (`None`: `norm_num_groups` with default time
    /// conditioning, no norm with scale-shift).
    pub attn_norm_num_groups: Option<usize>,
    /// Epsilon of the group norms.
    pub norm_eps: f64,
    /// `"default"` or `"scale_shift"`.
    pub resnet_time_scale_shift: String,
    /// Attention in the mid block.
    pub add_attention: bool,
    /// `None`, `"timestep"` or `"identity"`.
    pub class_embed_type: Option<String>,
    /// Size of the class embedding table (with `class_embed_type = None`).
    pub num_class_embeds: Option<usize>,
    /// Size of the learned time embedding table.
    pub num_train_timesteps: Option<usize>,
}

impl Default for UNet2DModelConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: s(&[
                "DownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: s(&[
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
            ]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

/// diffusers writes whole floats of int-annotated or int-defaulted keys as ints (`1`, not `1.0`).
pub(crate) fn whole_as_int<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

pub(crate) fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    f64::deserialize(d)
}

impl UNet2DModelConfig {
    /// Width of the time embedding: `time_embedding_dim` or `4 * block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or_else(|| 4 * self.block_out_channels.first().copied().unwrap_or(0))
    }
}

impl Config for UNet2DModelConfig {
    const CLASS_NAME: &'static str = "UNet2DModel";

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, message: String| Err((field.to_string(), message));
        check_block_layout(
            self.down_block_types.len(),
            self.up_block_types.len(),
            &self.block_out_channels,
        )?;
        match self.time_embedding_type.as_str() {
            "positional" | "fourier" => {}
            "learned" if self.num_train_timesteps.is_none_or(|n| n == 0) => {
                return err(
                    "num_train_timesteps",
                    "a learned time embedding needs the number of timesteps".into(),
                );
            }
            "learned" => {}
            other => {
                return err(
                    "time_embedding_type",
                    format!("`{other}` is not one of positional, fourier, learned"),
                );
            }
        }
        if !self.dropout.is_finite() || !(0.0..1.0).contains(&self.dropout) {
            return err(
                "dropout",
                format!("{} is not a probability in [0, 1)", self.dropout),
            );
        }
        if self.norm_num_groups == Some(0) || self.attn_norm_num_groups == Some(0) {
            let field = if self.norm_num_groups == Some(0) {
                "norm_num_groups"
            } else {
                "attn_norm_num_groups"
            };
            return err(field, "the group count must be positive".into());
        }
        if self.attention_head_dim == Some(0) {
            return err(
                "attention_head_dim",
                "the head width must be positive".into(),
            );
        }
        Ok(())
    }
}

/// The checks every UNet config shares: as many up blocks as down blocks, one positive
/// `block_out_channels` entry per block, at least one block.
///
/// # Errors
/// `(field, message)` naming `up_block_types` or `block_out_channels`.
pub(crate) fn check_block_layout(
    down_blocks: usize,
    up_blocks: usize,
    block_out_channels: &[usize],
) -> Result<(), (String, String)> {
    let err = |field: &str, message: String| Err((field.to_string(), message));
    if down_blocks != up_blocks {
        return err(
            "up_block_types",
            format!("{up_blocks} up blocks for {down_blocks} down blocks; there must be as many"),
        );
    }
    if block_out_channels.len() != down_blocks {
        return err(
            "block_out_channels",
            format!(
                "{} entries for {down_blocks} down blocks; there must be one per block",
                block_out_channels.len()
            ),
        );
    }
    if block_out_channels.is_empty() {
        return err("block_out_channels", "at least one level is needed".into());
    }
    if block_out_channels.contains(&0) {
        return err(
            "block_out_channels",
            "channel counts must be positive".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::ConfigFile;
    use std::path::Path;

    #[test]
    fn default_matches_what_diffusers_writes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/configs/unet2d_default/config.json");
        let file = ConfigFile::<UNet2DModelConfig>::load(&path).unwrap();
        assert_eq!(file.config, UNet2DModelConfig::default());
        assert!(file.unknown_keys().is_empty(), "{:?}", file.unknown_keys());
        // Writing it back gives diffusers' JSON values (ints stay ints).
        let written = file.to_value();
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(written, original);
    }

    #[test]
    fn partial_file_resolves_like_diffusers() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/configs/unet2d_partial");
        let file = ConfigFile::<UNet2DModelConfig>::load(dir.join("config.json")).unwrap();
        let resolved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("resolved.json")).unwrap())
                .unwrap();
        let ours = serde_json::to_value(&file.config).unwrap();
        for (key, value) in ours.as_object().unwrap() {
            assert_eq!(Some(value), resolved.get(key), "key `{key}`");
        }
        assert_eq!(file.config.sample_size, Some(SampleSize::Square(32)));
    }

    #[test]
    fn mismatched_block_lists_name_the_field() {
        let mut c = UNet2DModelConfig::default();
        c.up_block_types.pop();
        assert_eq!(c.validate().unwrap_err().0, "up_block_types");
        let mut c = UNet2DModelConfig::default();
        c.block_out_channels.push(1024);
        assert_eq!(c.validate().unwrap_err().0, "block_out_channels");
        let c = UNet2DModelConfig {
            time_embedding_type: "learned".into(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "num_train_timesteps");
    }

    #[test]
    fn rectangular_sample_size_round_trips() {
        let c: UNet2DModelConfig = serde_json::from_str(r#"{"sample_size": [32, 48]}"#).unwrap();
        assert_eq!(c.sample_size, Some(SampleSize::Rect([32, 48])));
        assert_eq!(
            serde_json::to_value(&c).unwrap()["sample_size"],
            serde_json::json!([32, 48])
        );
    }
}
