//! The residual block of UNets (`diffusers.models.resnet.ResnetBlock2D`).

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::nn::{Dropout, GroupNorm, Linear};
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Result};

use crate::activations::Activation;
use crate::downsampling::{avg_pool_2x2, downsample_2d};
use crate::layers;
use crate::upsampling::{DEFAULT_FIR_KERNEL, upsample_2d, upsample_nearest};

/// How the time embedding conditions a [`ResnetBlock2D`] (`time_embedding_norm`, named
/// `resnet_time_scale_shift` in UNet configs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// Add the projected embedding before the second norm (`"default"`).
    #[default]
    Default,
    /// Project to `2 * out_channels` and apply `norm(h) * (1 + scale) + shift`
    /// (`"scale_shift"`).
    ScaleShift,
}

impl TimeEmbeddingNorm {
    /// Parse a config value; `None` for values `ResnetBlock2D` does not handle (`"spatial"`,
    /// `"ada_group"` need `ResnetBlockCondNorm2D`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "default" => Some(Self::Default),
            "scale_shift" => Some(Self::ScaleShift),
            _ => None,
        }
    }
}

/// The resampling a [`ResnetBlock2D`] applies to both its input and its hidden states (`up` /
/// `down` with `kernel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resample {
    /// No resampling.
    #[default]
    None,
    /// `up=True` without kernel: nearest ×2.
    UpNearest,
    /// `down=True` without kernel: 2×2 average pooling.
    DownAvgPool,
    /// `up=True, kernel="fir"`: FIR upsampling with `(1, 3, 3, 1)`.
    UpFir,
    /// `down=True, kernel="fir"`: FIR downsampling with `(1, 3, 3, 1)`.
    DownFir,
}

impl Resample {
    fn apply(self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::None => x,
            Self::UpNearest => upsample_nearest(x, 2),
            Self::DownAvgPool => avg_pool_2x2(x),
            Self::UpFir => upsample_2d(x, &DEFAULT_FIR_KERNEL, 2, 1.0),
            Self::DownFir => downsample_2d(x, &DEFAULT_FIR_KERNEL, 2, 1.0),
        }
    }
}

/// `ResnetBlock2D.__init__` arguments (the subset UNets use; `pre_norm` is always true).
#[derive(Clone, Debug, PartialEq)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels of `conv1` (defaults to `in_channels` in diffusers).
    pub out_channels: usize,
    /// Width of the time embedding; `None` builds no `time_emb_proj`.
    pub temb_channels: Option<usize>,
    /// Groups of `norm1`.
    pub groups: usize,
    /// Groups of `norm2` (`None`: same as `groups`).
    pub groups_out: Option<usize>,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// Dropout before `conv2`.
    pub dropout: f64,
    /// Activation (`non_linearity`).
    pub non_linearity: Activation,
    /// Time conditioning.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// Skip the activation on the time embedding before projecting it.
    pub skip_time_act: bool,
    /// The output is divided by this.
    pub output_scale_factor: f64,
    /// Force (`Some(true)`) or forbid a 1×1 shortcut; `None`: when channels change.
    pub use_in_shortcut: Option<bool>,
    /// Resampling of input and hidden states.
    pub resample: Resample,
    /// Bias of the 1×1 shortcut.
    pub conv_shortcut_bias: bool,
    /// Output channels of `conv2` (`None`: `out_channels`).
    pub conv_2d_out_channels: Option<usize>,
}

impl ResnetBlock2DConfig {
    /// diffusers' defaults for the given channels (`groups = 32`, `eps = 1e-6`, SiLU, ...).
    pub fn new(in_channels: usize, out_channels: usize, temb_channels: Option<usize>) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels,
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            dropout: 0.0,
            non_linearity: Activation::Silu,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            skip_time_act: false,
            output_scale_factor: 1.0,
            use_in_shortcut: None,
            resample: Resample::None,
            conv_shortcut_bias: true,
            conv_2d_out_channels: None,
        }
    }

    /// Build the block.
    ///
    /// # Errors
    /// [`diffusion_core::Error::ConfigField`] (`norm_num_groups`) when a channel count is not
    /// divisible by its group count; (`dropout`) for an invalid probability.
    pub fn init(&self, device: &Device) -> Result<ResnetBlock2D> {
        let out = self.out_channels;
        let conv2_out = self.conv_2d_out_channels.unwrap_or(out);
        let groups_out = self.groups_out.unwrap_or(self.groups);
        let proj_width = match self.time_embedding_norm {
            TimeEmbeddingNorm::Default => out,
            TimeEmbeddingNorm::ScaleShift => 2 * out,
        };
        let use_shortcut = self
            .use_in_shortcut
            .unwrap_or(self.in_channels != conv2_out);
        let conv_shortcut = use_shortcut.then(|| {
            let mut conv = layers::conv2d(self.in_channels, conv2_out, 1, 1, 0, device);
            if !self.conv_shortcut_bias {
                conv.bias = None;
            }
            conv
        });
        Ok(ResnetBlock2D {
            norm1: layers::group_norm(
                self.groups,
                self.in_channels,
                self.eps,
                "norm_num_groups",
                device,
            )?,
            conv1: layers::conv2d(self.in_channels, out, 3, 1, 1, device),
            time_emb_proj: self
                .temb_channels
                .map(|t| layers::linear(t, proj_width, device)),
            norm2: layers::group_norm(groups_out, out, self.eps, "norm_num_groups", device)?,
            dropout: layers::dropout(self.dropout)?,
            conv2: layers::conv2d(out, conv2_out, 3, 1, 1, device),
            conv_shortcut,
            act: self.non_linearity,
            time_embedding_norm: self.time_embedding_norm,
            resample: self.resample,
            skip_time_act: self.skip_time_act,
            output_scale_factor: self.output_scale_factor,
        })
    }
}

/// Two 3×3 convolutions with group norms, time conditioning and a residual connection.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    /// Norm before `conv1`.
    pub norm1: GroupNorm,
    /// First 3×3 convolution.
    pub conv1: Conv2d,
    /// Time embedding projection.
    pub time_emb_proj: Option<Linear>,
    /// Norm before `conv2`.
    pub norm2: GroupNorm,
    /// Dropout before `conv2` (inert at inference).
    pub dropout: Dropout,
    /// Second 3×3 convolution.
    pub conv2: Conv2d,
    /// 1×1 convolution on the residual path when channels change (or when forced).
    pub conv_shortcut: Option<Conv2d>,
    #[module(skip)]
    act: Activation,
    #[module(skip)]
    time_embedding_norm: TimeEmbeddingNorm,
    #[module(skip)]
    resample: Resample,
    skip_time_act: bool,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// # Shapes
    /// - `input`: `[B, in_channels, H, W]`
    /// - `temb`: `[B, temb_channels]`
    /// - output: `[B, out_channels, H', W']` (`H' = 2H` when upsampling, `H/2` when
    ///   downsampling)
    ///
    /// # Panics
    /// With scale-shift conditioning and no `temb` (diffusers raises there too).
    pub fn forward(&self, input: Tensor<4>, temb: Option<Tensor<2>>) -> Tensor<4> {
        let hidden = layers::group_norm_act(&self.norm1, input.clone(), Some(self.act));
        let input = self.resample.apply(input);
        let hidden = self.resample.apply(hidden);
        let mut hidden = layers::conv(&self.conv1, hidden);

        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let temb = if self.skip_time_act {
                    temb
                } else {
                    self.act.forward(temb)
                };
                let projected = proj.forward(temb);
                let [b, c] = projected.dims();
                Some(projected.reshape([b, c, 1, 1]))
            }
            _ => None,
        };
        hidden = match (self.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::Default, Some(temb)) => {
                layers::group_norm_act(&self.norm2, hidden.add(temb), Some(self.act))
            }
            (TimeEmbeddingNorm::Default, None) => {
                layers::group_norm_act(&self.norm2, hidden, Some(self.act))
            }
            (TimeEmbeddingNorm::ScaleShift, Some(temb)) => {
                let [_, width, _, _] = temb.dims();
                let half = width / 2;
                let scale = temb.clone().narrow(1, 0, half);
                let shift = temb.narrow(1, half, half);
                let hidden = layers::group_norm_act(&self.norm2, hidden, None)
                    .mul(scale.add_scalar(1.0))
                    .add(shift);
                self.act.forward(hidden)
            }
            (TimeEmbeddingNorm::ScaleShift, None) => {
                panic!("ResnetBlock2D with scale_shift conditioning needs a time embedding")
            }
        };
        let hidden = layers::conv(&self.conv2, self.dropout.forward(hidden));
        let residual = match &self.conv_shortcut {
            Some(conv) => layers::conv(conv, input),
            None => input,
        };
        let out = residual.add(hidden);
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.output_scale_factor)
        }
    }
}
