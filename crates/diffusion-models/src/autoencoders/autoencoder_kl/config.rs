//! `AutoencoderKL`'s config: every `__init__` argument with its default.

use serde::{Deserialize, Serialize};

use diffusion_core::Config;

use crate::unets::unet_2d::SampleSize;

/// `AutoencoderKL.__init__` arguments (diffusers/models/autoencoders/autoencoder_kl.py);
/// `Default` is the Python default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Channels of input images.
    pub in_channels: usize,
    /// Channels of decoded images.
    pub out_channels: usize,
    /// Encoder block class names (`DownEncoderBlock2D`, `AttnDownEncoderBlock2D`).
    pub down_block_types: Vec<String>,
    /// Decoder block class names (`UpDecoderBlock2D`, `AttnUpDecoderBlock2D`).
    pub up_block_types: Vec<String>,
    /// Output channels of each level, shallowest first.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Activation of the resnets.
    pub act_fn: String,
    /// Channels of the latent space.
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Image size the model was trained on; sets the default tile sizes.
    pub sample_size: SampleSize,
    /// Latents are multiplied by this before the diffusion model sees them (pipelines apply it).
    pub scaling_factor: f64,
    /// Latents are shifted by this before scaling (SD3, Flux).
    pub shift_factor: Option<f64>,
    /// Per-channel latent mean (some SDXL derivatives), one entry per latent channel.
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviation, one entry per latent channel.
    pub latents_std: Option<Vec<f64>>,
    /// Pipelines run this VAE in f32 even when the rest runs in half precision.
    pub force_upcast: bool,
    /// A 1×1 convolution after the encoder.
    pub use_quant_conv: bool,
    /// A 1×1 convolution before the decoder.
    pub use_post_quant_conv: bool,
    /// Attention in the encoder's and decoder's mid blocks.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Square(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// How many times the encoder halves the resolution (`len(block_out_channels) - 1`).
    pub fn num_downsamplings(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }

    /// The first side of `sample_size` (diffusers takes `sample_size[0]` for lists).
    pub fn sample_side(&self) -> usize {
        match self.sample_size {
            SampleSize::Square(s) => s,
            SampleSize::Rect([h, _]) => h,
        }
    }
}

impl Config for AutoencoderKLConfig {
    const CLASS_NAME: &'static str = "AutoencoderKL";

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, message: String| Err((field.to_string(), message));
        if self.up_block_types.len() != self.down_block_types.len() {
            return err(
                "up_block_types",
                format!(
                    "{} up blocks for {} down blocks; there must be as many",
                    self.up_block_types.len(),
                    self.down_block_types.len()
                ),
            );
        }
        if self.block_out_channels.len() != self.down_block_types.len() {
            return err(
                "block_out_channels",
                format!(
                    "{} entries for {} down blocks; there must be one per block",
                    self.block_out_channels.len(),
                    self.down_block_types.len()
                ),
            );
        }
        if self.block_out_channels.is_empty() {
            return err("block_out_channels", "at least one level is needed".into());
        }
        if self.block_out_channels.contains(&0) {
            return err(
                "block_out_channels",
                "channel counts must be positive".into(),
            );
        }
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value == 0 {
                return err(field, "must be positive".into());
            }
        }
        if self.layers_per_block == 0 {
            // diffusers builds encoder blocks without resnets, whose downsamplers then receive
            // the previous level's channels; no released VAE does this.
            return err(
                "layers_per_block",
                "encoder blocks need at least one resnet".into(),
            );
        }
        for (field, values) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(values) = values
                && values.len() != self.latent_channels
            {
                return err(
                    field,
                    format!(
                        "{} entries for {} latent channels; there must be one per channel",
                        values.len(),
                        self.latent_channels
                    ),
                );
            }
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return err(
                "scaling_factor",
                format!("{} is not a usable scale", self.scaling_factor),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_init_defaults() {
        let c: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, AutoencoderKLConfig::default());
        assert_eq!(c.scaling_factor, 0.18215);
        assert_eq!(c.shift_factor, None);
        assert!(c.force_upcast && c.use_quant_conv && c.use_post_quant_conv);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn mismatched_lists_name_the_field() {
        let mut c = AutoencoderKLConfig::default();
        c.up_block_types.push("UpDecoderBlock2D".into());
        assert_eq!(c.validate().unwrap_err().0, "up_block_types");
        let mut c = AutoencoderKLConfig::default();
        c.block_out_channels.push(128);
        assert_eq!(c.validate().unwrap_err().0, "block_out_channels");
        let c = AutoencoderKLConfig {
            latents_mean: Some(vec![0.0; 3]),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "latents_mean");
    }

    #[test]
    fn list_sample_size_uses_the_first_side() {
        let c: AutoencoderKLConfig =
            serde_json::from_str(r#"{"sample_size": [64, 32], "shift_factor": 0.1159}"#).unwrap();
        assert_eq!(c.sample_side(), 64);
        assert_eq!(c.shift_factor, Some(0.1159));
    }
}
