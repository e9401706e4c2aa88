//! The VAE's encoder, decoder and posterior (`diffusers.models.autoencoders.vae`).

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::GroupNorm;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::tensor::{Distribution, FloatDType, Tensor};
use diffusion_core::tensor::randn_tensor;
use diffusion_core::{Device, Error, NoiseSource, Result};

use crate::activations::Activation;
use crate::layers;
use crate::unets::unet_2d_blocks::{
    CoderBlockArgs, DownEncoderBlock2D, MidBlockArgs, UNetMidBlock2D, UpDecoderBlock2D,
    get_down_encoder_block, get_up_decoder_block,
};

/// GroupNorm epsilon of every norm in the VAE (fixed in diffusers, not a config key).
const VAE_EPS: f64 = 1e-6;

/// The lower and upper bound of a posterior's log-variance.
pub const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

/// `Encoder.__init__` / `Decoder.__init__` arguments as `AutoencoderKL` passes them.
#[derive(Clone, Debug, PartialEq)]
pub struct CoderConfig {
    /// Channels of the input (image channels for the encoder, latent channels for the decoder).
    pub in_channels: usize,
    /// Channels of the output (latent channels for the encoder, before `double_z`).
    pub out_channels: usize,
    /// Block class names (`down_block_types` or `up_block_types`).
    pub block_types: Vec<String>,
    /// Output channels of each level, shallowest first.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// GroupNorm groups everywhere.
    pub norm_num_groups: usize,
    /// Activation of the resnets (the output activation is always SiLU, as in diffusers).
    pub act_fn: Activation,
    /// Encoder only: output mean and log-variance (twice `out_channels`).
    pub double_z: bool,
    /// Attention in the mid block.
    pub mid_block_add_attention: bool,
}

impl CoderConfig {
    fn mid_block(&self, device: &Device) -> Result<UNetMidBlock2D> {
        let last = *self.block_out_channels.last().ok_or_else(|| {
            layers::config_error("block_out_channels", "at least one level is needed")
        })?;
        UNetMidBlock2D::new(
            &MidBlockArgs {
                in_channels: last,
                temb_channels: None,
                dropout: 0.0,
                resnet_eps: VAE_EPS,
                resnet_act_fn: self.act_fn,
                output_scale_factor: 1.0,
                resnet_time_scale_shift: crate::resnet::TimeEmbeddingNorm::Default,
                attention_head_dim: last,
                resnet_groups: Some(self.norm_num_groups),
                attn_groups: None,
                add_attention: self.mid_block_add_attention,
            },
            device,
        )
    }

    fn block_args(&self, i: usize, in_channels: usize, out_channels: usize) -> CoderBlockArgs {
        CoderBlockArgs {
            num_layers: self.layers_per_block,
            in_channels,
            out_channels,
            add_resample: i + 1 < self.block_out_channels.len(),
            resnet_eps: VAE_EPS,
            resnet_act_fn: self.act_fn,
            resnet_groups: self.norm_num_groups,
            attention_head_dim: out_channels,
            downsample_padding: 0,
            dropout: 0.0,
        }
    }
}

/// diffusers' VAE `Encoder`: `conv_in`, down blocks, mid block, `conv_norm_out`, SiLU,
/// `conv_out`.
#[derive(Module, Debug)]
pub struct Encoder {
    /// Input convolution to `block_out_channels[0]`.
    pub conv_in: Conv2d,
    /// Down path; every block but the last halves the resolution.
    pub down_blocks: Vec<DownEncoderBlock2D>,
    /// Resnet, attention, resnet at the deepest level.
    pub mid_block: UNetMidBlock2D,
    /// Output norm.
    pub conv_norm_out: GroupNorm,
    /// Output convolution (to `2 * out_channels` with `double_z`).
    pub conv_out: Conv2d,
}

impl Encoder {
    /// Build the encoder.
    ///
    /// # Errors
    /// [`Error::Unsupported`] (`down_block_types`) for block classes other than
    /// `DownEncoderBlock2D` / `AttnDownEncoderBlock2D`; [`Error::ConfigField`] for group counts
    /// that do not divide the channels or an empty `block_out_channels`.
    pub fn new(config: &CoderConfig, device: &Device) -> Result<Self> {
        let channels = &config.block_out_channels;
        let first = *channels.first().ok_or_else(|| {
            layers::config_error("block_out_channels", "at least one level is needed")
        })?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut output_channel = first;
        for (i, name) in config.block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = channels[i];
            let args = config.block_args(i, input_channel, output_channel);
            down_blocks.push(get_down_encoder_block(name, &args, device)?);
        }
        let last = channels[channels.len() - 1];
        let conv_out_channels = if config.double_z {
            2 * config.out_channels
        } else {
            config.out_channels
        };
        Ok(Self {
            conv_in: layers::conv2d(config.in_channels, first, 3, 1, 1, device),
            down_blocks,
            mid_block: config.mid_block(device)?,
            conv_norm_out: layers::group_norm(
                config.norm_num_groups,
                last,
                VAE_EPS,
                "norm_num_groups",
                device,
            )?,
            conv_out: layers::conv2d(last, conv_out_channels, 3, 1, 1, device),
        })
    }

    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]` with `H, W >= 2` before every downsampling
    /// - output: `[B, 2 * out_channels, h, w]` (`double_z`), where each downsampling maps a
    ///   side `s` to `floor((s - 2) / 2) + 1`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = layers::conv(&self.conv_in, x);
        for block in &self.down_blocks {
            x = block.forward(x);
        }
        let x = self.mid_block.forward(x, None);
        layers::conv(
            &self.conv_out,
            layers::group_norm_act(&self.conv_norm_out, x, Some(Activation::Silu)),
        )
    }
}

/// diffusers' VAE `Decoder` (with `norm_type = "group"`): `conv_in`, mid block, up blocks,
/// `conv_norm_out`, SiLU, `conv_out`.
#[derive(Module, Debug)]
pub struct Decoder {
    /// Input convolution to `block_out_channels[-1]`.
    pub conv_in: Conv2d,
    /// Up path; every block but the last doubles the resolution.
    pub up_blocks: Vec<UpDecoderBlock2D>,
    /// Resnet, attention, resnet at the deepest level.
    pub mid_block: UNetMidBlock2D,
    /// Output norm.
    pub conv_norm_out: GroupNorm,
    /// Output convolution.
    pub conv_out: Conv2d,
}

impl Decoder {
    /// Build the decoder (`double_z` is ignored).
    ///
    /// # Errors
    /// [`Error::Unsupported`] (`up_block_types`) for block classes other than
    /// `UpDecoderBlock2D` / `AttnUpDecoderBlock2D`; [`Error::ConfigField`] for group counts that
    /// do not divide the channels or an empty `block_out_channels`.
    pub fn new(config: &CoderConfig, device: &Device) -> Result<Self> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let (&last, &first) = match (reversed.first(), reversed.last()) {
            (Some(last), Some(first)) => (last, first),
            _ => {
                return Err(layers::config_error(
                    "block_out_channels",
                    "at least one level is needed",
                ));
            }
        };
        let mid_block = config.mid_block(device)?;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut output_channel = last;
        for (i, name) in config.block_types.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = reversed[i];
            let args = CoderBlockArgs {
                num_layers: config.layers_per_block + 1,
                ..config.block_args(i, prev_output_channel, output_channel)
            };
            up_blocks.push(get_up_decoder_block(name, &args, device)?);
        }
        Ok(Self {
            conv_in: layers::conv2d(config.in_channels, last, 3, 1, 1, device),
            up_blocks,
            mid_block,
            conv_norm_out: layers::group_norm(
                config.norm_num_groups,
                first,
                VAE_EPS,
                "norm_num_groups",
                device,
            )?,
            conv_out: layers::conv2d(first, config.out_channels, 3, 1, 1, device),
        })
    }

    /// # Shapes
    /// - `z`: `[B, in_channels, h, w]`
    /// - output: `[B, out_channels, h * 2^(n-1), w * 2^(n-1)]` for `n` levels
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let x = layers::conv(&self.conv_in, z);
        let mut x = self.mid_block.forward(x, None);
        for block in &self.up_blocks {
            x = block.forward(x);
        }
        layers::conv(
            &self.conv_out,
            layers::group_norm_act(&self.conv_norm_out, x, Some(Activation::Silu)),
        )
    }
}

/// A diagonal Gaussian over latents, parameterised by the encoder's moments: the first half of
/// the channels is the mean, the second the log-variance (clamped to [`LOGVAR_RANGE`]).
#[derive(Clone, Debug)]
pub struct DiagonalGaussianDistribution {
    /// The moments it was built from, `[B, 2C, H, W]`.
    pub parameters: Tensor<4>,
    /// Mean, `[B, C, H, W]`.
    pub mean: Tensor<4>,
    /// Clamped log-variance, `[B, C, H, W]`.
    pub logvar: Tensor<4>,
    /// `exp(logvar / 2)` (zeros when deterministic).
    pub std: Tensor<4>,
    /// `exp(logvar)` (zeros when deterministic).
    pub var: Tensor<4>,
    /// Whether sampling returns the mean (`std = var = 0`).
    pub deterministic: bool,
}

impl DiagonalGaussianDistribution {
    /// Split `parameters` into mean and log-variance along the channels.
    ///
    /// # Shapes
    /// - `parameters`: `[B, 2C, H, W]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`parameters`) for an odd or zero channel count.
    pub fn new(parameters: Tensor<4>, deterministic: bool) -> Result<Self> {
        let [_, c2, _, _] = parameters.dims();
        if c2 == 0 || !c2.is_multiple_of(2) {
            return Err(Error::invalid_argument(
                "parameters",
                format!("{c2} channels cannot be split into a mean and a log-variance"),
            ));
        }
        let c = c2 / 2;
        let mean = parameters.clone().narrow(1, 0, c);
        let logvar = parameters
            .clone()
            .narrow(1, c, c)
            .clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1);
        let (std, var) = if deterministic {
            (mean.zeros_like(), mean.zeros_like())
        } else {
            (logvar.clone().mul_scalar(0.5).exp(), logvar.clone().exp())
        };
        Ok(Self {
            parameters,
            mean,
            logvar,
            std,
            var,
            deterministic,
        })
    }

    /// `mean + std * noise`. With a generator the noise is drawn exactly as diffusers'
    /// `randn_tensor(mean.shape, generator=...)` with CPU generators (one generator for the
    /// batch, or one per image), so a seeded sample matches diffusers; with `None` it comes from
    /// the device's random source (like diffusers' unseeded global generator). The noise is
    /// drawn even when deterministic, as diffusers does.
    ///
    /// # Shapes
    /// - output: `[B, C, H, W]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`generator`) when a per-image generator list does not match
    /// the batch.
    pub fn sample(&self, generator: Option<NoiseSource<'_>>) -> Result<Tensor<4>> {
        let noise = match generator {
            Some(source) => {
                let noise = randn_tensor(self.mean.dims(), source, &self.mean.device())?;
                let dtype: FloatDType = self.mean.dtype().into();
                if noise.dtype() == self.mean.dtype() {
                    noise
                } else {
                    noise.cast(dtype)
                }
            }
            None => self.mean.random_like(Distribution::Normal(0.0, 1.0)),
        };
        Ok(self.mean.clone().add(self.std.clone().mul(noise)))
    }

    /// The mean.
    ///
    /// # Shapes
    /// - output: `[B, C, H, W]`
    pub fn mode(&self) -> Tensor<4> {
        self.mean.clone()
    }

    /// KL divergence to the standard normal, summed over `C, H, W`:
    /// `0.5 * sum(mean² + var - 1 - logvar)`; `[0.0]` when deterministic.
    ///
    /// # Shapes
    /// - output: `[B]` (`[1]` when deterministic)
    pub fn kl(&self) -> Tensor<1> {
        if self.deterministic {
            return self.zero();
        }
        let terms = self
            .mean
            .clone()
            .square()
            .add(self.var.clone())
            .sub_scalar(1.0)
            .sub(self.logvar.clone());
        sum_per_sample(terms).mul_scalar(0.5)
    }

    /// KL divergence to another diagonal Gaussian, summed over `C, H, W`.
    ///
    /// # Shapes
    /// - output: `[B]` (`[1]` when deterministic)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`other`) when the two distributions differ in shape.
    pub fn kl_to(&self, other: &Self) -> Result<Tensor<1>> {
        if self.mean.dims() != other.mean.dims() {
            return Err(Error::invalid_argument(
                "other",
                format!(
                    "shape {:?} differs from this distribution's {:?}",
                    other.mean.dims(),
                    self.mean.dims()
                ),
            ));
        }
        if self.deterministic {
            return Ok(self.zero());
        }
        let terms = self
            .mean
            .clone()
            .sub(other.mean.clone())
            .square()
            .div(other.var.clone())
            .add(self.var.clone().div(other.var.clone()))
            .sub_scalar(1.0)
            .sub(self.logvar.clone())
            .add(other.logvar.clone());
        Ok(sum_per_sample(terms).mul_scalar(0.5))
    }

    /// Negative log-likelihood of `sample`, summed over `C, H, W`:
    /// `0.5 * sum(ln 2π + logvar + (sample - mean)² / var)`; `[0.0]` when deterministic.
    ///
    /// # Shapes
    /// - `sample`: `[B, C, H, W]`
    /// - output: `[B]` (`[1]` when deterministic)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`sample`) when `sample` differs in shape from the mean.
    pub fn nll(&self, sample: Tensor<4>) -> Result<Tensor<1>> {
        if sample.dims() != self.mean.dims() {
            return Err(Error::invalid_argument(
                "sample",
                format!(
                    "shape {:?} differs from the distribution's {:?}",
                    sample.dims(),
                    self.mean.dims()
                ),
            ));
        }
        if self.deterministic {
            return Ok(self.zero());
        }
        let log_two_pi = (2.0 * std::f64::consts::PI).ln();
        let terms = sample
            .sub(self.mean.clone())
            .square()
            .div(self.var.clone())
            .add(self.logvar.clone())
            .add_scalar(log_two_pi);
        Ok(sum_per_sample(terms).mul_scalar(0.5))
    }

    /// diffusers' `torch.Tensor([0.0])` for deterministic distributions, in the mean's dtype.
    fn zero(&self) -> Tensor<1> {
        self.mean.zeros_like().flatten::<1>(0, 3).narrow(0, 0, 1)
    }
}

/// Sum over every dimension but the batch.
fn sum_per_sample(x: Tensor<4>) -> Tensor<1> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c * h * w]).sum_dim(1).reshape([b])
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::TorchGenerator;
    use diffusion_core::tensor::{from_vec, to_vec};

    fn moments(device: &Device) -> Tensor<4> {
        // Mean channel then log-variance channel, two pixels; the log-variances straddle both
        // clamp bounds.
        from_vec(vec![0.5, -1.0, 25.0, -45.0], [1, 2, 1, 2], device)
    }

    #[test]
    fn logvar_is_clamped_and_std_follows() {
        let device = Device::flex();
        let dist = DiagonalGaussianDistribution::new(moments(&device), false).unwrap();
        assert_eq!(to_vec(dist.mean.clone()), [0.5, -1.0]);
        assert_eq!(to_vec(dist.logvar.clone()), [20.0, -30.0]);
        let var = to_vec(dist.var.clone());
        assert!(
            (var[0] - 20f32.exp()).abs() <= 20f32.exp() * 1e-6,
            "{var:?}"
        );
        let std = to_vec(dist.std.clone());
        assert!((std[1] - (-15f32).exp()).abs() <= 1e-12, "{std:?}");
    }

    #[test]
    fn seeded_sample_is_mean_plus_std_times_torch_noise() {
        let device = Device::flex();
        let dist = DiagonalGaussianDistribution::new(moments(&device), false).unwrap();
        let mut g = TorchGenerator::new(5);
        let got = to_vec(dist.sample(Some(NoiseSource::Single(&mut g))).unwrap());
        let noise = TorchGenerator::new(5).randn(&[1, 1, 1, 2]);
        let want = [
            0.5 + 10f32.exp() * noise[0],
            -1.0 + (-15f32).exp() * noise[1],
        ];
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= w.abs() * 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn deterministic_samples_the_mean_and_has_no_divergence() {
        let device = Device::flex();
        let dist = DiagonalGaussianDistribution::new(moments(&device), true).unwrap();
        let mut g = TorchGenerator::new(0);
        let sample = dist.sample(Some(NoiseSource::Single(&mut g))).unwrap();
        assert_eq!(to_vec(sample), [0.5, -1.0]);
        assert_eq!(to_vec(dist.kl()), [0.0]);
    }

    #[test]
    fn odd_channel_counts_are_rejected() {
        let device = Device::flex();
        let odd = Tensor::<4>::zeros([1, 3, 2, 2], &device);
        assert!(matches!(
            DiagonalGaussianDistribution::new(odd, false),
            Err(Error::InvalidArgument { name, .. }) if name == "parameters"
        ));
    }

    #[test]
    fn kl_to_itself_is_zero() {
        let device = Device::flex();
        let params = from_vec(
            vec![0.3, -0.7, 1.1, 0.2, -0.4, 0.9, 0.0, -1.3],
            [2, 2, 1, 2],
            &device,
        );
        let dist = DiagonalGaussianDistribution::new(params, false).unwrap();
        for v in to_vec(dist.kl_to(&dist).unwrap()) {
            assert!(v.abs() < 1e-6, "{v}");
        }
    }
}
