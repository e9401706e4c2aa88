//! `Transformer2DModel` for continuous inputs (`diffusers.models.transformers.transformer_2d`):
//! the spatial transformer of Stable Diffusion UNets' cross-attention blocks.

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::nn::{GroupNorm, Linear};
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Result};

use crate::attention::{
    BasicTransformerBlock, BasicTransformerBlockConfig, CrossAttentionInputs, join,
};
use crate::layers;

/// Epsilon of the input group norm (fixed in diffusers).
const NORM_EPS: f64 = 1e-6;

/// `Transformer2DModel.__init__` arguments for continuous inputs with `norm_type =
/// "layer_norm"` and `activation_fn = "geglu"` (the only form UNets build).
#[derive(Clone, Debug, PartialEq)]
pub struct Transformer2DModelConfig {
    /// Heads of every attention.
    pub num_attention_heads: usize,
    /// Width of each head; `num_attention_heads * attention_head_dim` is the inner width.
    pub attention_head_dim: usize,
    /// Channels of the feature map (in and out).
    pub in_channels: usize,
    /// Number of [`BasicTransformerBlock`]s.
    pub num_layers: usize,
    /// Dropout of attentions and feed-forwards.
    pub dropout: f64,
    /// Groups of the input group norm.
    pub norm_num_groups: usize,
    /// Width of the encoder hidden states (`None`: no cross-attention).
    pub cross_attention_dim: Option<usize>,
    /// Biases on the attentions' `to_q`, `to_k`, `to_v`.
    pub attention_bias: bool,
    /// `proj_in` / `proj_out` are linear layers on tokens (SD 2) instead of 1×1 convolutions.
    pub use_linear_projection: bool,
    /// The blocks' `attn1` attends to the encoder hidden states too.
    pub only_cross_attention: bool,
    /// Attention in f32.
    pub upcast_attention: bool,
    /// Epsilon of the blocks' layer norms.
    pub norm_eps: f64,
}

impl Transformer2DModelConfig {
    /// The config cross-attention UNet blocks use: `heads` heads of width
    /// `channels / heads`, group norm with `groups` groups.
    pub fn for_unet_block(
        channels: usize,
        heads: usize,
        num_layers: usize,
        groups: usize,
        cross_attention_dim: usize,
    ) -> Self {
        Self {
            num_attention_heads: heads,
            attention_head_dim: channels.checked_div(heads).unwrap_or(0),
            in_channels: channels,
            num_layers,
            dropout: 0.0,
            norm_num_groups: groups,
            cross_attention_dim: Some(cross_attention_dim),
            attention_bias: false,
            use_linear_projection: false,
            only_cross_attention: false,
            upcast_attention: false,
            norm_eps: 1e-5,
        }
    }

    /// Build the model; `path` is its state-dict path in the enclosing model (attention paths
    /// read `{path}.transformer_blocks.{i}.attn1`).
    ///
    /// # Errors
    /// [`diffusion_core::Error::ConfigField`]: (`attention_head_dim`) for zero heads or head
    /// width, or linear projections whose inner width differs from `in_channels` (diffusers
    /// fails there too); (`norm_num_groups`) when the channels are not divisible by the groups.
    pub fn init(&self, path: &str, device: &Device) -> Result<Transformer2DModel> {
        let inner = self.num_attention_heads * self.attention_head_dim;
        if inner == 0 {
            return Err(layers::config_error(
                "attention_head_dim",
                format!(
                    "{} channels split into {} heads leave no head width",
                    self.in_channels, self.num_attention_heads
                ),
            ));
        }
        if self.use_linear_projection && inner != self.in_channels {
            return Err(layers::config_error(
                "attention_head_dim",
                format!(
                    "{} heads of width {} make {inner} channels, not {}: linear projections \
                     need the heads to divide the channels",
                    self.num_attention_heads, self.attention_head_dim, self.in_channels
                ),
            ));
        }
        let c = self.in_channels;
        let (proj_in, proj_out) = if self.use_linear_projection {
            (
                Projection::Linear(layers::linear(c, inner, device)),
                Projection::Linear(layers::linear(inner, c, device)),
            )
        } else {
            (
                Projection::Conv(layers::conv2d(c, inner, 1, 1, 0, device)),
                Projection::Conv(layers::conv2d(inner, c, 1, 1, 0, device)),
            )
        };
        let block = BasicTransformerBlockConfig {
            dropout: self.dropout,
            cross_attention_dim: self.cross_attention_dim,
            attention_bias: self.attention_bias,
            only_cross_attention: self.only_cross_attention,
            upcast_attention: self.upcast_attention,
            norm_eps: self.norm_eps,
            ..BasicTransformerBlockConfig::new(
                inner,
                self.num_attention_heads,
                self.attention_head_dim,
            )
        };
        let transformer_blocks = (0..self.num_layers)
            .map(|i| block.init(&join(path, &format!("transformer_blocks.{i}")), device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm: layers::group_norm(self.norm_num_groups, c, NORM_EPS, "norm_num_groups", device)?,
            proj_in,
            transformer_blocks,
            proj_out,
        })
    }
}

/// `proj_in` / `proj_out`: a 1×1 convolution on the feature map, or a linear layer on tokens.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per block; boxing buys nothing
pub enum Projection {
    /// `nn.Conv2d(kernel_size=1)`.
    Conv(Conv2d),
    /// `nn.Linear` (`use_linear_projection`).
    Linear(Linear),
}

/// Group norm, input projection, transformer blocks over the `H × W` tokens, output projection
/// and a residual connection.
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    /// Input group norm.
    pub norm: GroupNorm,
    /// Input projection to the inner width.
    pub proj_in: Projection,
    /// The blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// Output projection back to the channels.
    pub proj_out: Projection,
}

impl Transformer2DModel {
    /// # Shapes
    /// - `x`: `[B, C, H, W]`
    /// - `inputs.encoder_hidden_states`: `[B, S, cross_attention_dim]`
    /// - output: `[B, C, H, W]`
    pub fn forward(&self, x: Tensor<4>, inputs: &CrossAttentionInputs<'_>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = layers::group_norm_act(&self.norm, x, None);
        let to_tokens = |t: Tensor<4>| {
            let [_, inner, _, _] = t.dims();
            t.permute([0, 2, 3, 1]).reshape([b, h * w, inner])
        };
        let to_map = |t: Tensor<3>| {
            let [_, _, inner] = t.dims();
            t.reshape([b, h, w, inner]).permute([0, 3, 1, 2])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(layers::conv(conv, x)),
            Projection::Linear(linear) => linear.forward(to_tokens(x)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, inputs);
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => layers::conv(conv, to_map(tokens)),
            Projection::Linear(linear) => to_map(linear.forward(tokens)),
        };
        debug_assert_eq!(out.dims()[1], c);
        out.add(residual)
    }
}
