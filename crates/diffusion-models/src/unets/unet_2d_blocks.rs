//! The down, mid and up blocks of `UNet2DModel` and `AutoencoderKL`
//! (`diffusers.models.unets.unet_2d_blocks`).
//!
//! Blocks that differ only by their attention share a struct: [`DownBlock2D`] serves
//! `DownBlock2D` and `AttnDownBlock2D`, [`SkipDownBlock2D`] serves `SkipDownBlock2D` and
//! `AttnSkipDownBlock2D`, and likewise for up blocks. The [`DownBlock`] and [`UpBlock`] enums
//! carry the diffusers class name; [`get_down_block`] and [`get_up_block`] build them from it.
//! The VAE's [`DownEncoderBlock2D`] and [`UpDecoderBlock2D`] likewise serve their `Attn`
//! variants; [`get_down_encoder_block`] and [`get_up_decoder_block`] build them.
//! `UNet2DConditionModel`'s cross-attention blocks ([`CrossAttnDownBlock2D`],
//! [`CrossAttnUpBlock2D`], [`UNetMidBlock2DCrossAttn`]) live in a submodule and are re-exported
//! here.

mod cross_attention;

pub use cross_attention::{
    CrossAttnArgs, CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn,
};

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::GroupNorm;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Result};

use crate::activations::Activation;
use crate::attention_processor::{Attention, AttentionConfig};
use crate::downsampling::{Downsample2D, FirDownsample2D};
use crate::layers;
use crate::resnet::{Resample, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm};
use crate::upsampling::{FirUpsample2D, Upsample2D};

/// Output scale factor the skip blocks use (`np.sqrt(2.0)`).
const SKIP_OUTPUT_SCALE: f64 = std::f64::consts::SQRT_2;

/// The block classes [`get_down_block`] builds.
pub const DOWN_BLOCK_TYPES: [&str; 4] = [
    "DownBlock2D",
    "AttnDownBlock2D",
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
];
/// The block classes [`get_up_block`] builds.
pub const UP_BLOCK_TYPES: [&str; 4] = [
    "UpBlock2D",
    "AttnUpBlock2D",
    "SkipUpBlock2D",
    "AttnSkipUpBlock2D",
];

/// How `AttnDownBlock2D` / `AttnUpBlock2D` resample (`downsample_type` / `upsample_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResampleType {
    /// A (strided) convolution: `Downsample2D` / `Upsample2D` with `use_conv`.
    #[default]
    Conv,
    /// A `ResnetBlock2D` with `down=True` / `up=True`.
    Resnet,
}

impl ResampleType {
    /// Parse `"conv"` or `"resnet"`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "conv" => Some(Self::Conv),
            "resnet" => Some(Self::Resnet),
            _ => None,
        }
    }
}

/// The arguments `get_down_block` / `get_up_block` receive from `UNet2DModel`.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockArgs {
    /// Resnets in the block.
    pub num_layers: usize,
    /// Input channels (for up blocks: channels of the deepest skip connection).
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Up blocks: channels coming from the previous (deeper) block.
    pub prev_output_channel: usize,
    /// Width of the time embedding.
    pub temb_channels: usize,
    /// Whether the block ends with a down/upsampler.
    pub add_resample: bool,
    /// GroupNorm epsilon.
    pub resnet_eps: f64,
    /// Resnet activation.
    pub resnet_act_fn: Activation,
    /// GroupNorm groups (`norm_num_groups`; skip blocks ignore it).
    pub resnet_groups: Option<usize>,
    /// Width of attention heads.
    pub attention_head_dim: usize,
    /// Padding of `Downsample2D`'s convolution.
    pub downsample_padding: usize,
    /// Time conditioning of the resnets.
    pub resnet_time_scale_shift: TimeEmbeddingNorm,
    /// `downsample_type` / `upsample_type` (attention blocks only).
    pub resample_type: ResampleType,
    /// Resnet dropout.
    pub dropout: f64,
}

impl BlockArgs {
    pub(crate) fn groups(&self) -> Result<usize> {
        self.resnet_groups.ok_or_else(|| {
            layers::config_error(
                "norm_num_groups",
                "null is only supported by the skip blocks; this block needs a group count",
            )
        })
    }

    pub(crate) fn resnet(
        &self,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
    ) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            groups,
            eps: self.resnet_eps,
            dropout: self.dropout,
            non_linearity: self.resnet_act_fn,
            time_embedding_norm: self.resnet_time_scale_shift,
            ..ResnetBlock2DConfig::new(in_channels, out_channels, Some(self.temb_channels))
        }
    }

    fn attention(&self, norm_groups: usize, rescale: f64) -> AttentionConfig {
        AttentionConfig::spatial(
            self.out_channels,
            self.out_channels / self.attention_head_dim,
            self.attention_head_dim,
            Some(norm_groups),
            self.resnet_eps,
            rescale,
        )
    }

    /// Skip blocks size their norms from the channels: `min(channels / 4, 32)`.
    pub(crate) fn skip_groups(channels: usize) -> usize {
        (channels / 4).min(32)
    }
}

/// The downsampler of [`DownBlock2D`] (`downsamplers.0`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum Downsampler {
    /// `Downsample2D` with a strided convolution.
    Conv(Downsample2D),
    /// `ResnetBlock2D(down=True)`.
    Resnet(ResnetBlock2D),
}

/// `DownBlock2D` (no attentions) and `AttnDownBlock2D` (one attention after each resnet).
#[derive(Module, Debug)]
pub struct DownBlock2D {
    /// Residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// Attentions (empty for `DownBlock2D`).
    pub attentions: Vec<Attention>,
    /// Zero or one downsampler.
    pub downsamplers: Vec<Downsampler>,
}

impl DownBlock2D {
    pub(crate) fn new(args: &BlockArgs, with_attention: bool, device: &Device) -> Result<Self> {
        let groups = args.groups()?;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..args.num_layers {
            let in_ch = if i == 0 {
                args.in_channels
            } else {
                args.out_channels
            };
            resnets.push(args.resnet(in_ch, args.out_channels, groups).init(device)?);
            if with_attention {
                attentions.push(args.attention(groups, 1.0).init(device)?);
            }
        }
        // DownBlock2D ignores `downsample_type`: it always downsamples with a convolution.
        let resample = if with_attention {
            args.resample_type
        } else {
            ResampleType::Conv
        };
        let mut downsamplers = Vec::new();
        if args.add_resample {
            downsamplers.push(match resample {
                ResampleType::Conv => Downsampler::Conv(Downsample2D::new(
                    args.out_channels,
                    true,
                    args.out_channels,
                    args.downsample_padding,
                    device,
                )),
                ResampleType::Resnet => Downsampler::Resnet(
                    ResnetBlock2DConfig {
                        resample: Resample::DownAvgPool,
                        ..args.resnet(args.out_channels, args.out_channels, groups)
                    }
                    .init(device)?,
                ),
            });
        }
        Ok(Self {
            resnets,
            attentions,
            downsamplers,
        })
    }

    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]`
    /// - output: the hidden states `[B, out_channels, H', W']` (`H' = H/2` with a
    ///   downsampler) and every intermediate state for the skip connections
    pub fn forward(&self, mut x: Tensor<4>, temb: &Tensor<2>) -> (Tensor<4>, Vec<Tensor<4>>) {
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
            states.push(x.clone());
        }
        if !self.downsamplers.is_empty() {
            for down in &self.downsamplers {
                x = match down {
                    Downsampler::Conv(d) => d.forward(x),
                    Downsampler::Resnet(r) => r.forward(x, Some(temb.clone())),
                };
            }
            states.push(x.clone());
        }
        (x, states)
    }
}

/// `SkipDownBlock2D` and `AttnSkipDownBlock2D` (score-SDE): FIR-downsampling resnet, and a
/// side path that FIR-downsamples the input image and adds it through a 1×1 convolution.
#[derive(Module, Debug)]
pub struct SkipDownBlock2D {
    /// Residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// Attentions (empty for `SkipDownBlock2D`).
    pub attentions: Vec<Attention>,
    /// `ResnetBlock2D(down=True, kernel="fir")`, when downsampling.
    pub resnet_down: Option<ResnetBlock2D>,
    /// FIR downsampler of the image path (no parameters).
    pub downsamplers: Vec<FirDownsample2D>,
    /// 1×1 convolution from the 3-channel image path, when downsampling.
    pub skip_conv: Option<Conv2d>,
}

impl SkipDownBlock2D {
    fn new(args: &BlockArgs, with_attention: bool, device: &Device) -> Result<Self> {
        let out = args.out_channels;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..args.num_layers {
            let in_ch = if i == 0 { args.in_channels } else { out };
            let config = ResnetBlock2DConfig {
                groups_out: Some(BlockArgs::skip_groups(out)),
                output_scale_factor: SKIP_OUTPUT_SCALE,
                ..args.resnet(in_ch, out, BlockArgs::skip_groups(in_ch))
            };
            resnets.push(config.init(device)?);
            if with_attention {
                attentions.push(args.attention(32, SKIP_OUTPUT_SCALE).init(device)?);
            }
        }
        let (resnet_down, downsamplers, skip_conv) = if args.add_resample {
            let config = ResnetBlock2DConfig {
                output_scale_factor: SKIP_OUTPUT_SCALE,
                use_in_shortcut: Some(true),
                resample: Resample::DownFir,
                ..args.resnet(out, out, BlockArgs::skip_groups(out))
            };
            (
                Some(config.init(device)?),
                vec![FirDownsample2D { channels: out }],
                Some(layers::conv2d(3, out, 1, 1, 0, device)),
            )
        } else {
            (None, Vec::new(), None)
        };
        Ok(Self {
            resnets,
            attentions,
            resnet_down,
            downsamplers,
            skip_conv,
        })
    }

    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]`, `skip`: `[B, 3, H, W]`
    /// - output: hidden states, skip-connection states, and the image path (`[B, 3, H/2, W/2]`
    ///   after downsampling, unchanged otherwise)
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: &Tensor<2>,
        mut skip: Tensor<4>,
    ) -> (Tensor<4>, Vec<Tensor<4>>, Tensor<4>) {
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
            states.push(x.clone());
        }
        if let (Some(resnet_down), Some(skip_conv)) = (&self.resnet_down, &self.skip_conv) {
            x = resnet_down.forward(x, Some(temb.clone()));
            for down in &self.downsamplers {
                skip = down.forward(skip);
            }
            x = layers::conv(skip_conv, skip.clone()).add(x);
            states.push(x.clone());
        }
        (x, states, skip)
    }
}

/// The upsampler of [`UpBlock2D`] (`upsamplers.0`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum Upsampler {
    /// `Upsample2D` with a convolution.
    Conv(Upsample2D),
    /// `ResnetBlock2D(up=True)`.
    Resnet(ResnetBlock2D),
}

/// `UpBlock2D` (no attentions) and `AttnUpBlock2D` (one attention after each resnet).
#[derive(Module, Debug)]
pub struct UpBlock2D {
    /// Residual blocks, each fed the previous output concatenated with a skip connection.
    pub resnets: Vec<ResnetBlock2D>,
    /// Attentions (empty for `UpBlock2D`).
    pub attentions: Vec<Attention>,
    /// Zero or one upsampler.
    pub upsamplers: Vec<Upsampler>,
}

/// Input channels of an up block's `i`-th resnet: previous output plus the skip connection.
pub(crate) fn up_resnet_channels(args: &BlockArgs, i: usize) -> (usize, usize) {
    let res_skip = if i + 1 == args.num_layers {
        args.in_channels
    } else {
        args.out_channels
    };
    let resnet_in = if i == 0 {
        args.prev_output_channel
    } else {
        args.out_channels
    };
    (resnet_in, res_skip)
}

impl UpBlock2D {
    pub(crate) fn new(args: &BlockArgs, with_attention: bool, device: &Device) -> Result<Self> {
        let groups = args.groups()?;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..args.num_layers {
            let (resnet_in, res_skip) = up_resnet_channels(args, i);
            resnets.push(
                args.resnet(resnet_in + res_skip, args.out_channels, groups)
                    .init(device)?,
            );
            if with_attention {
                attentions.push(args.attention(groups, 1.0).init(device)?);
            }
        }
        let resample = if with_attention {
            args.resample_type
        } else {
            ResampleType::Conv
        };
        let mut upsamplers = Vec::new();
        if args.add_resample {
            upsamplers.push(match resample {
                ResampleType::Conv => Upsampler::Conv(Upsample2D::new(
                    args.out_channels,
                    true,
                    args.out_channels,
                    device,
                )),
                ResampleType::Resnet => Upsampler::Resnet(
                    ResnetBlock2DConfig {
                        resample: Resample::UpNearest,
                        ..args.resnet(args.out_channels, args.out_channels, groups)
                    }
                    .init(device)?,
                ),
            });
        }
        Ok(Self {
            resnets,
            attentions,
            upsamplers,
        })
    }

    /// `res_samples` holds this block's skip connections in the order the down path produced
    /// them; the deepest (last) is consumed first.
    ///
    /// # Shapes
    /// - `x`: `[B, prev_output_channel, H, W]`, `temb`: `[B, temb_channels]`
    /// - output: `[B, out_channels, H', W']` (`H' = 2H` with an upsampler)
    pub fn forward(
        &self,
        x: Tensor<4>,
        res_samples: Vec<Tensor<4>>,
        temb: &Tensor<2>,
    ) -> Tensor<4> {
        self.forward_to_size(x, res_samples, temb, None)
    }

    /// As [`Self::forward`]; a convolution upsampler resizes to `upsample_size` (`[H', W']`)
    /// instead of doubling, as diffusers does for samples whose size is not a multiple of the
    /// total downsampling.
    ///
    /// # Shapes
    /// - output: `[B, out_channels, H', W']`
    pub fn forward_to_size(
        &self,
        mut x: Tensor<4>,
        mut res_samples: Vec<Tensor<4>>,
        temb: &Tensor<2>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(res) = res_samples.pop() {
                x = layers::cat_channels(x, res);
            }
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
        }
        for up in &self.upsamplers {
            x = match up {
                Upsampler::Conv(u) => u.forward_to(x, upsample_size),
                Upsampler::Resnet(r) => r.forward(x, Some(temb.clone())),
            };
        }
        x
    }
}

/// `SkipUpBlock2D` and `AttnSkipUpBlock2D` (score-SDE): resnets, an optional single attention,
/// and an image path that is FIR-upsampled and accumulates `skip_conv(silu(skip_norm(h)))`.
#[derive(Module, Debug)]
pub struct SkipUpBlock2D {
    /// Residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// One attention after the resnets (`AttnSkipUpBlock2D`), else empty.
    pub attentions: Vec<Attention>,
    /// FIR upsampler of the image path (no parameters).
    pub upsampler: FirUpsample2D,
    /// `ResnetBlock2D(up=True, kernel="fir")`, when upsampling.
    pub resnet_up: Option<ResnetBlock2D>,
    /// 3×3 convolution to the 3-channel image path, when upsampling.
    pub skip_conv: Option<Conv2d>,
    /// Norm before `skip_conv`, when upsampling.
    pub skip_norm: Option<GroupNorm>,
}

impl SkipUpBlock2D {
    fn new(args: &BlockArgs, with_attention: bool, device: &Device) -> Result<Self> {
        let out = args.out_channels;
        let mut resnets = Vec::new();
        for i in 0..args.num_layers {
            let (resnet_in, res_skip) = up_resnet_channels(args, i);
            // AttnSkipUpBlock2D computes `min(resnet_in + res_skip // 4, 32)` (precedence as
            // written in diffusers), SkipUpBlock2D `min((resnet_in + res_skip) // 4, 32)`.
            let groups = if with_attention {
                (resnet_in + res_skip / 4).min(32)
            } else {
                BlockArgs::skip_groups(resnet_in + res_skip)
            };
            let config = ResnetBlock2DConfig {
                groups_out: Some(BlockArgs::skip_groups(out)),
                output_scale_factor: SKIP_OUTPUT_SCALE,
                ..args.resnet(resnet_in + res_skip, out, groups)
            };
            resnets.push(config.init(device)?);
        }
        let attentions = if with_attention {
            vec![args.attention(32, SKIP_OUTPUT_SCALE).init(device)?]
        } else {
            Vec::new()
        };
        let (resnet_up, skip_conv, skip_norm) = if args.add_resample {
            let groups = BlockArgs::skip_groups(out);
            let config = ResnetBlock2DConfig {
                groups_out: Some(groups),
                output_scale_factor: SKIP_OUTPUT_SCALE,
                use_in_shortcut: Some(true),
                resample: Resample::UpFir,
                ..args.resnet(out, out, groups)
            };
            (
                Some(config.init(device)?),
                Some(layers::conv2d(out, 3, 3, 1, 1, device)),
                Some(layers::group_norm(
                    groups,
                    out,
                    args.resnet_eps,
                    "block_out_channels",
                    device,
                )?),
            )
        } else {
            (None, None, None)
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler: FirUpsample2D {
                channels: args.in_channels,
            },
            resnet_up,
            skip_conv,
            skip_norm,
        })
    }

    /// As [`UpBlock2D::forward`], plus the image path: `skip` (from the previous skip block, or
    /// `None`) is FIR-upsampled and this block's contribution added.
    ///
    /// # Shapes
    /// - `skip`: `[B, 3, H, W]`
    /// - output: hidden states, and the image path at this block's output resolution
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        mut res_samples: Vec<Tensor<4>>,
        temb: &Tensor<2>,
        skip: Option<Tensor<4>>,
    ) -> (Tensor<4>, Option<Tensor<4>>) {
        for resnet in &self.resnets {
            if let Some(res) = res_samples.pop() {
                x = layers::cat_channels(x, res);
            }
            x = resnet.forward(x, Some(temb.clone()));
        }
        if let Some(attn) = self.attentions.first() {
            x = attn.forward(x);
        }
        let mut skip = skip.map(|s| self.upsampler.forward(s));
        if let (Some(resnet_up), Some(skip_conv), Some(skip_norm)) =
            (&self.resnet_up, &self.skip_conv, &self.skip_norm)
        {
            let states = layers::conv(
                skip_conv,
                layers::group_norm_act(skip_norm, x.clone(), Some(Activation::Silu)),
            );
            skip = Some(match skip {
                Some(previous) => previous.add(states),
                None => states,
            });
            x = resnet_up.forward(x, Some(temb.clone()));
        }
        (x, skip)
    }
}

/// A down block of `UNet2DModel`, named by its diffusers class.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum DownBlock {
    /// `DownBlock2D`.
    DownBlock2D(DownBlock2D),
    /// `AttnDownBlock2D`.
    AttnDownBlock2D(DownBlock2D),
    /// `SkipDownBlock2D`.
    SkipDownBlock2D(SkipDownBlock2D),
    /// `AttnSkipDownBlock2D`.
    AttnSkipDownBlock2D(SkipDownBlock2D),
}

/// An up block of `UNet2DModel`, named by its diffusers class.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum UpBlock {
    /// `UpBlock2D`.
    UpBlock2D(UpBlock2D),
    /// `AttnUpBlock2D`.
    AttnUpBlock2D(UpBlock2D),
    /// `SkipUpBlock2D`.
    SkipUpBlock2D(SkipUpBlock2D),
    /// `AttnSkipUpBlock2D`.
    AttnSkipUpBlock2D(SkipUpBlock2D),
}

impl UpBlock {
    /// Number of skip connections the block consumes (one per resnet).
    pub fn num_resnets(&self) -> usize {
        match self {
            Self::UpBlock2D(b) | Self::AttnUpBlock2D(b) => b.resnets.len(),
            Self::SkipUpBlock2D(b) | Self::AttnSkipUpBlock2D(b) => b.resnets.len(),
        }
    }
}

/// diffusers strips a `UNetRes` prefix from block names.
fn strip_prefix(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

/// Build a down block by diffusers class name (`get_down_block`).
///
/// # Errors
/// [`diffusion_core::Error::Unsupported`] (`down_block_types`) for a class this port does not
/// build; config errors from the layers.
pub fn get_down_block(name: &str, args: &BlockArgs, device: &Device) -> Result<DownBlock> {
    Ok(match strip_prefix(name) {
        "DownBlock2D" => DownBlock::DownBlock2D(DownBlock2D::new(args, false, device)?),
        "AttnDownBlock2D" => DownBlock::AttnDownBlock2D(DownBlock2D::new(args, true, device)?),
        "SkipDownBlock2D" => DownBlock::SkipDownBlock2D(SkipDownBlock2D::new(args, false, device)?),
        "AttnSkipDownBlock2D" => {
            DownBlock::AttnSkipDownBlock2D(SkipDownBlock2D::new(args, true, device)?)
        }
        _ => {
            return Err(layers::unsupported(
                "down_block_types",
                name,
                format!(
                    "UNet2DModel down blocks supported: {}",
                    DOWN_BLOCK_TYPES.join(", ")
                ),
            ));
        }
    })
}

/// Build an up block by diffusers class name (`get_up_block`).
///
/// # Errors
/// [`diffusion_core::Error::Unsupported`] (`up_block_types`) for a class this port does not
/// build; config errors from the layers.
pub fn get_up_block(name: &str, args: &BlockArgs, device: &Device) -> Result<UpBlock> {
    Ok(match strip_prefix(name) {
        "UpBlock2D" => UpBlock::UpBlock2D(UpBlock2D::new(args, false, device)?),
        "AttnUpBlock2D" => UpBlock::AttnUpBlock2D(UpBlock2D::new(args, true, device)?),
        "SkipUpBlock2D" => UpBlock::SkipUpBlock2D(SkipUpBlock2D::new(args, false, device)?),
        "AttnSkipUpBlock2D" => UpBlock::AttnSkipUpBlock2D(SkipUpBlock2D::new(args, true, device)?),
        _ => {
            return Err(layers::unsupported(
                "up_block_types",
                name,
                format!(
                    "UNet2DModel up blocks supported: {}",
                    UP_BLOCK_TYPES.join(", ")
                ),
            ));
        }
    })
}

/// The block classes [`get_down_encoder_block`] builds (the VAE encoder's down blocks).
pub const DOWN_ENCODER_BLOCK_TYPES: [&str; 2] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"];
/// The block classes [`get_up_decoder_block`] builds (the VAE decoder's up blocks).
pub const UP_DECODER_BLOCK_TYPES: [&str; 2] = ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"];

/// The arguments `get_down_block` / `get_up_block` receive from the VAE's `Encoder` and
/// `Decoder` (no time embedding, `norm_type = "group"`).
#[derive(Clone, Debug, PartialEq)]
pub struct CoderBlockArgs {
    /// Resnets in the block.
    pub num_layers: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Whether the block ends with a down/upsampler.
    pub add_resample: bool,
    /// GroupNorm epsilon.
    pub resnet_eps: f64,
    /// Resnet activation.
    pub resnet_act_fn: Activation,
    /// GroupNorm groups of resnets and attentions.
    pub resnet_groups: usize,
    /// Width of attention heads (attention blocks only).
    pub attention_head_dim: usize,
    /// Padding of `Downsample2D`'s convolution (down blocks only).
    pub downsample_padding: usize,
    /// Resnet dropout.
    pub dropout: f64,
}

impl CoderBlockArgs {
    /// The resnets and (when `with_attention`) attentions of a block, one attention per resnet.
    fn layers(
        &self,
        with_attention: bool,
        device: &Device,
    ) -> Result<(Vec<ResnetBlock2D>, Vec<Attention>)> {
        let mut resnets = Vec::with_capacity(self.num_layers);
        let mut attentions = Vec::new();
        for i in 0..self.num_layers {
            let in_ch = if i == 0 {
                self.in_channels
            } else {
                self.out_channels
            };
            let config = ResnetBlock2DConfig {
                groups: self.resnet_groups,
                eps: self.resnet_eps,
                dropout: self.dropout,
                non_linearity: self.resnet_act_fn,
                ..ResnetBlock2DConfig::new(in_ch, self.out_channels, None)
            };
            resnets.push(config.init(device)?);
            if with_attention {
                let config = AttentionConfig::spatial(
                    self.out_channels,
                    self.out_channels / self.attention_head_dim.max(1),
                    self.attention_head_dim,
                    Some(self.resnet_groups),
                    self.resnet_eps,
                    1.0,
                );
                attentions.push(config.init(device)?);
            }
        }
        Ok((resnets, attentions))
    }
}

/// `DownEncoderBlock2D` (resnets, then a strided-convolution downsampler) and
/// `AttnDownEncoderBlock2D` (an attention after each resnet): the VAE encoder's down blocks.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D {
    /// Residual blocks (no time embedding).
    pub resnets: Vec<ResnetBlock2D>,
    /// Attentions (empty for `DownEncoderBlock2D`).
    pub attentions: Vec<Attention>,
    /// Zero or one `Downsample2D` with a convolution.
    pub downsamplers: Vec<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]`
    /// - output: `[B, out_channels, H', W']`, with a downsampler of padding 0 (the VAE's)
    ///   `H' = floor((H - 2) / 2) + 1`, else `H' = H`
    pub fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, None);
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
        }
        for down in &self.downsamplers {
            x = down.forward(x);
        }
        x
    }
}

/// `UpDecoderBlock2D` (resnets, then a nearest ×2 + convolution upsampler) and
/// `AttnUpDecoderBlock2D` (an attention after each resnet): the VAE decoder's up blocks.
/// Unlike the UNet's up blocks they take no skip connections.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    /// Residual blocks (no time embedding).
    pub resnets: Vec<ResnetBlock2D>,
    /// Attentions (empty for `UpDecoderBlock2D`).
    pub attentions: Vec<Attention>,
    /// Zero or one `Upsample2D` with a convolution.
    pub upsamplers: Vec<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]`
    /// - output: `[B, out_channels, 2H, 2W]` with an upsampler, else `[B, out_channels, H, W]`
    pub fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, None);
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
        }
        for up in &self.upsamplers {
            x = up.forward(x);
        }
        x
    }
}

/// Build a VAE encoder down block by diffusers class name (`get_down_block`).
///
/// # Errors
/// [`diffusion_core::Error::Unsupported`] (`down_block_types`) for another class; config errors
/// from the layers (group counts, head width).
pub fn get_down_encoder_block(
    name: &str,
    args: &CoderBlockArgs,
    device: &Device,
) -> Result<DownEncoderBlock2D> {
    let with_attention = match strip_prefix(name) {
        "DownEncoderBlock2D" => false,
        "AttnDownEncoderBlock2D" => true,
        _ => {
            return Err(layers::unsupported(
                "down_block_types",
                name,
                format!(
                    "AutoencoderKL down blocks supported: {}",
                    DOWN_ENCODER_BLOCK_TYPES.join(", ")
                ),
            ));
        }
    };
    let (resnets, attentions) = args.layers(with_attention, device)?;
    let downsamplers = if args.add_resample {
        vec![Downsample2D::new(
            args.out_channels,
            true,
            args.out_channels,
            args.downsample_padding,
            device,
        )]
    } else {
        Vec::new()
    };
    Ok(DownEncoderBlock2D {
        resnets,
        attentions,
        downsamplers,
    })
}

/// Build a VAE decoder up block by diffusers class name (`get_up_block`).
///
/// # Errors
/// [`diffusion_core::Error::Unsupported`] (`up_block_types`) for another class; config errors
/// from the layers (group counts, head width).
pub fn get_up_decoder_block(
    name: &str,
    args: &CoderBlockArgs,
    device: &Device,
) -> Result<UpDecoderBlock2D> {
    let with_attention = match strip_prefix(name) {
        "UpDecoderBlock2D" => false,
        "AttnUpDecoderBlock2D" => true,
        _ => {
            return Err(layers::unsupported(
                "up_block_types",
                name,
                format!(
                    "AutoencoderKL up blocks supported: {}",
                    UP_DECODER_BLOCK_TYPES.join(", ")
                ),
            ));
        }
    };
    let (resnets, attentions) = args.layers(with_attention, device)?;
    let upsamplers = if args.add_resample {
        vec![Upsample2D::new(
            args.out_channels,
            true,
            args.out_channels,
            device,
        )]
    } else {
        Vec::new()
    };
    Ok(UpDecoderBlock2D {
        resnets,
        attentions,
        upsamplers,
    })
}

/// `UNetMidBlock2D` arguments as `UNet2DModel` and the VAE's `Encoder` / `Decoder` pass them.
#[derive(Clone, Debug, PartialEq)]
pub struct MidBlockArgs {
    /// Channels in and out.
    pub in_channels: usize,
    /// Width of the time embedding; `None` (the VAE) builds resnets without `time_emb_proj`.
    pub temb_channels: Option<usize>,
    /// Resnet dropout.
    pub dropout: f64,
    /// GroupNorm epsilon.
    pub resnet_eps: f64,
    /// Resnet activation.
    pub resnet_act_fn: Activation,
    /// Output scale factor of resnets and attention.
    pub output_scale_factor: f64,
    /// Time conditioning.
    pub resnet_time_scale_shift: TimeEmbeddingNorm,
    /// Width of attention heads.
    pub attention_head_dim: usize,
    /// Resnet groups (`None`: `min(in_channels / 4, 32)`).
    pub resnet_groups: Option<usize>,
    /// Attention norm groups (`None`: the resnet groups with default conditioning, no norm
    /// with scale-shift).
    pub attn_groups: Option<usize>,
    /// Whether to add attention between the resnets.
    pub add_attention: bool,
}

/// `UNetMidBlock2D` with one layer: resnet, (attention), resnet.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D {
    /// Attentions (empty without `add_attention`).
    pub attentions: Vec<Attention>,
    /// Residual blocks (`num_layers + 1`).
    pub resnets: Vec<ResnetBlock2D>,
}

impl UNetMidBlock2D {
    /// Build the block (`num_layers = 1`, as `UNet2DModel` uses it).
    ///
    /// # Errors
    /// Config errors from the layers (group counts, head width).
    pub fn new(args: &MidBlockArgs, device: &Device) -> Result<Self> {
        Self::with_layers(args, 1, device)
    }

    /// Build the block with `num_layers` (attention, resnet) pairs after the first resnet;
    /// `UNet2DConditionModel` builds `UNetMidBlock2D` with `num_layers = 0` (one resnet).
    ///
    /// # Errors
    /// Config errors from the layers (group counts, head width).
    pub fn with_layers(args: &MidBlockArgs, num_layers: usize, device: &Device) -> Result<Self> {
        let groups = args
            .resnet_groups
            .unwrap_or_else(|| BlockArgs::skip_groups(args.in_channels));
        let attn_groups = args.attn_groups.or(match args.resnet_time_scale_shift {
            TimeEmbeddingNorm::Default => Some(groups),
            TimeEmbeddingNorm::ScaleShift => None,
        });
        let resnet = || ResnetBlock2DConfig {
            groups,
            eps: args.resnet_eps,
            dropout: args.dropout,
            non_linearity: args.resnet_act_fn,
            time_embedding_norm: args.resnet_time_scale_shift,
            output_scale_factor: args.output_scale_factor,
            ..ResnetBlock2DConfig::new(args.in_channels, args.in_channels, args.temb_channels)
        };
        let resnets = (0..=num_layers)
            .map(|_| resnet().init(device))
            .collect::<Result<Vec<_>>>()?;
        let mut attentions = Vec::new();
        let attention_layers = if args.add_attention { num_layers } else { 0 };
        for _ in 0..attention_layers {
            let config = AttentionConfig::spatial(
                args.in_channels,
                args.in_channels / args.attention_head_dim,
                args.attention_head_dim,
                attn_groups,
                args.resnet_eps,
                args.output_scale_factor,
            );
            let attention = config.init(device).map_err(|e| match args.attn_groups {
                Some(_) => rename_field(e, "attn_norm_num_groups"),
                None => e,
            })?;
            attentions.push(attention);
        }
        Ok(Self {
            attentions,
            resnets,
        })
    }

    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]` (`None` for a block built
    ///   without time embedding)
    /// - output: `[B, in_channels, H, W]`
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut resnets = self.resnets.iter();
        let mut x = match resnets.next() {
            Some(first) => first.forward(x, temb.cloned()),
            None => x,
        };
        for (i, resnet) in resnets.enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
            x = resnet.forward(x, temb.cloned());
        }
        x
    }
}

/// An explicit `attn_norm_num_groups` that does not divide the channels is that field's fault.
fn rename_field(err: diffusion_core::Error, field: &str) -> diffusion_core::Error {
    match err {
        diffusion_core::Error::ConfigField {
            path,
            message,
            field: f,
        } if f == "norm_num_groups" => diffusion_core::Error::ConfigField {
            path,
            field: field.to_string(),
            message,
        },
        other => other,
    }
}
