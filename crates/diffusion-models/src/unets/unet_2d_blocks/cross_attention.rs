//! The cross-attention blocks of `UNet2DConditionModel` (`CrossAttnDownBlock2D`,
//! `CrossAttnUpBlock2D`, `UNetMidBlock2DCrossAttn`): resnets interleaved with
//! [`Transformer2DModel`]s that attend to the encoder hidden states.

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Result};

use super::{BlockArgs, up_resnet_channels};
use crate::attention::{CrossAttentionInputs, join};
use crate::downsampling::Downsample2D;
use crate::layers;
use crate::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use crate::transformers::transformer_2d::{Transformer2DModel, Transformer2DModelConfig};
use crate::upsampling::Upsample2D;

/// The transformer arguments `get_down_block` / `get_up_block` / `get_mid_block` pass to
/// cross-attention blocks, on top of [`BlockArgs`].
#[derive(Clone, Debug, PartialEq)]
pub struct CrossAttnArgs {
    /// Transformer blocks in each of the block's transformers (one entry per resnet).
    pub transformer_layers: Vec<usize>,
    /// Heads of each transformer (`num_attention_heads`; the head width is
    /// `out_channels / heads`).
    pub num_attention_heads: usize,
    /// Width of the encoder hidden states.
    pub cross_attention_dim: usize,
    /// Linear `proj_in` / `proj_out`.
    pub use_linear_projection: bool,
    /// `attn1` attends to the encoder hidden states too.
    pub only_cross_attention: bool,
    /// Attention in f32.
    pub upcast_attention: bool,
}

impl CrossAttnArgs {
    fn transformer(
        &self,
        channels: usize,
        layer: usize,
        groups: usize,
        dropout: f64,
    ) -> Transformer2DModelConfig {
        Transformer2DModelConfig {
            dropout,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention: self.only_cross_attention,
            upcast_attention: self.upcast_attention,
            ..Transformer2DModelConfig::for_unet_block(
                channels,
                self.num_attention_heads,
                self.transformer_layers.get(layer).copied().unwrap_or(1),
                groups,
                self.cross_attention_dim,
            )
        }
    }
}

/// `CrossAttnDownBlock2D`: (resnet, transformer) pairs, then a strided-convolution downsampler.
#[derive(Module, Debug)]
pub struct CrossAttnDownBlock2D {
    /// Transformers, one after each resnet.
    pub attentions: Vec<Transformer2DModel>,
    /// Residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one `Downsample2D` with a convolution.
    pub downsamplers: Vec<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    /// Build the block at state-dict path `path` (`down_blocks.1`).
    ///
    /// # Errors
    /// Config errors from the layers (group counts, head counts, dropout).
    pub fn new(
        args: &BlockArgs,
        cross: &CrossAttnArgs,
        path: &str,
        device: &Device,
    ) -> Result<Self> {
        let groups = args.groups()?;
        let mut resnets = Vec::with_capacity(args.num_layers);
        let mut attentions = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let in_ch = if i == 0 {
                args.in_channels
            } else {
                args.out_channels
            };
            resnets.push(args.resnet(in_ch, args.out_channels, groups).init(device)?);
            attentions.push(
                cross
                    .transformer(args.out_channels, i, groups, args.dropout)
                    .init(&join(path, &format!("attentions.{i}")), device)?,
            );
        }
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
        Ok(Self {
            attentions,
            resnets,
            downsamplers,
        })
    }

    /// `additional_residual` (a T2I-Adapter feature) is added to the output of the last
    /// (resnet, transformer) pair.
    ///
    /// # Shapes
    /// - `x`: `[B, in_channels, H, W]`, `temb`: `[B, temb_channels]`
    /// - `additional_residual`: `[B, out_channels, H, W]`
    /// - output: the hidden states `[B, out_channels, H', W']` (`H' = ceil(H/2)` with a
    ///   downsampler) and every intermediate state for the skip connections
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: &Tensor<2>,
        inputs: &CrossAttentionInputs<'_>,
        mut additional_residual: Option<Tensor<4>>,
    ) -> (Tensor<4>, Vec<Tensor<4>>) {
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        let last = self.resnets.len().saturating_sub(1);
        for (i, (resnet, attn)) in self.resnets.iter().zip(&self.attentions).enumerate() {
            x = resnet.forward(x, Some(temb.clone()));
            x = attn.forward(x, inputs);
            if i == last
                && let Some(residual) = additional_residual.take()
            {
                x = x.add(residual);
            }
            states.push(x.clone());
        }
        if !self.downsamplers.is_empty() {
            for down in &self.downsamplers {
                x = down.forward(x);
            }
            states.push(x.clone());
        }
        (x, states)
    }
}

/// `CrossAttnUpBlock2D`: (resnet, transformer) pairs fed the skip connections, then a
/// nearest ×2 + convolution upsampler.
#[derive(Module, Debug)]
pub struct CrossAttnUpBlock2D {
    /// Transformers, one after each resnet.
    pub attentions: Vec<Transformer2DModel>,
    /// Residual blocks, each fed the previous output concatenated with a skip connection.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one `Upsample2D` with a convolution.
    pub upsamplers: Vec<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    /// Build the block at state-dict path `path` (`up_blocks.1`).
    ///
    /// # Errors
    /// Config errors from the layers (group counts, head counts, dropout).
    pub fn new(
        args: &BlockArgs,
        cross: &CrossAttnArgs,
        path: &str,
        device: &Device,
    ) -> Result<Self> {
        let groups = args.groups()?;
        let mut resnets = Vec::with_capacity(args.num_layers);
        let mut attentions = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let (resnet_in, res_skip) = up_resnet_channels(args, i);
            resnets.push(
                args.resnet(resnet_in + res_skip, args.out_channels, groups)
                    .init(device)?,
            );
            attentions.push(
                cross
                    .transformer(args.out_channels, i, groups, args.dropout)
                    .init(&join(path, &format!("attentions.{i}")), device)?,
            );
        }
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
        Ok(Self {
            attentions,
            resnets,
            upsamplers,
        })
    }

    /// `res_samples` holds this block's skip connections in the order the down path produced
    /// them; the deepest (last) is consumed first. The upsampler resizes to `upsample_size`
    /// when given, else doubles.
    ///
    /// # Shapes
    /// - `x`: `[B, prev_output_channel, H, W]`, `temb`: `[B, temb_channels]`
    /// - output: `[B, out_channels, H', W']`
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        mut res_samples: Vec<Tensor<4>>,
        temb: &Tensor<2>,
        inputs: &CrossAttentionInputs<'_>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<4> {
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            if let Some(res) = res_samples.pop() {
                x = layers::cat_channels(x, res);
            }
            x = resnet.forward(x, Some(temb.clone()));
            x = attn.forward(x, inputs);
        }
        for up in &self.upsamplers {
            x = up.forward_to(x, upsample_size);
        }
        x
    }
}

/// `UNetMidBlock2DCrossAttn` with one layer: resnet, transformer, resnet.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn {
    /// Transformers between the resnets.
    pub attentions: Vec<Transformer2DModel>,
    /// Residual blocks (one more than transformers).
    pub resnets: Vec<ResnetBlock2D>,
}

impl UNetMidBlock2DCrossAttn {
    /// Build the block at state-dict path `path` (`mid_block`) with `args.in_channels`
    /// channels; `args.resnet_groups = None` means `min(channels / 4, 32)` groups. The
    /// transformers ignore `only_cross_attention` (diffusers does not pass it to them).
    ///
    /// # Errors
    /// Config errors from the layers (group counts, head counts, dropout).
    pub fn new(
        args: &BlockArgs,
        output_scale_factor: f64,
        cross: &CrossAttnArgs,
        path: &str,
        device: &Device,
    ) -> Result<Self> {
        let c = args.in_channels;
        let groups = args
            .resnet_groups
            .unwrap_or_else(|| BlockArgs::skip_groups(c));
        let resnet = || {
            ResnetBlock2DConfig {
                output_scale_factor,
                ..args.resnet(c, c, groups)
            }
            .init(device)
        };
        let cross = CrossAttnArgs {
            only_cross_attention: false,
            ..cross.clone()
        };
        Ok(Self {
            attentions: vec![
                cross
                    .transformer(c, 0, groups, args.dropout)
                    .init(&join(path, "attentions.0"), device)?,
            ],
            resnets: vec![resnet()?, resnet()?],
        })
    }

    /// # Shapes
    /// - `x`: `[B, C, H, W]`, `temb`: `[B, temb_channels]`
    /// - output: `[B, C, H, W]`
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        inputs: &CrossAttentionInputs<'_>,
    ) -> Tensor<4> {
        let mut resnets = self.resnets.iter();
        let mut x = match resnets.next() {
            Some(first) => first.forward(x, Some(temb.clone())),
            None => x,
        };
        for (attn, resnet) in self.attentions.iter().zip(resnets) {
            x = attn.forward(x, inputs);
            x = resnet.forward(x, Some(temb.clone()));
        }
        x
    }
}
