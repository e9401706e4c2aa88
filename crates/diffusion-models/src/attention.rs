//! Transformer building blocks (`diffusers.models.attention`): [`BasicTransformerBlock`] and
//! its [`FeedForward`].

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::{Dropout, LayerNorm, LayerNormConfig, Linear};
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Result};

use crate::activations::GEGLU;
use crate::attention_processor::{Attention, AttentionConfig, AttentionHook, IPAdapterAttnInputs};
use crate::layers;

/// One entry of [`FeedForward::net`]; the entries are numbered as in diffusers' `nn.ModuleList`
/// (`net.0` the gated projection, `net.1` a dropout, `net.2` the output projection).
#[derive(Module, Debug)]
#[allow(clippy::upper_case_acronyms)] // diffusers' class name
pub enum FeedForwardLayer {
    /// `GEGLU` (`activation_fn = "geglu"`).
    GEGLU(GEGLU),
    /// A parameterless dropout.
    Dropout(Dropout),
    /// The output projection.
    Linear(Linear),
}

/// `FeedForward(dim, mult=4, activation_fn="geglu")`: GEGLU to `4 * dim`, dropout, projection
/// back to `dim`.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// `[GEGLU, Dropout, Linear]`.
    pub net: Vec<FeedForwardLayer>,
}

impl FeedForward {
    /// The feed-forward of transformer blocks: inner width `4 * dim`, biases everywhere.
    ///
    /// # Errors
    /// [`diffusion_core::Error::ConfigField`] (`dropout`) for an invalid probability.
    pub fn new(dim: usize, dropout: f64, device: &Device) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            net: vec![
                FeedForwardLayer::GEGLU(GEGLU::new(dim, inner, device)),
                FeedForwardLayer::Dropout(layers::dropout(dropout)?),
                FeedForwardLayer::Linear(layers::linear(inner, dim, device)),
            ],
        })
    }

    /// # Shapes
    /// - `x`: `[B, S, dim]`
    /// - output: `[B, S, dim]`
    pub fn forward(&self, mut x: Tensor<3>) -> Tensor<3> {
        for layer in &self.net {
            x = match layer {
                FeedForwardLayer::GEGLU(g) => g.forward(x),
                FeedForwardLayer::Dropout(d) => d.forward(x),
                FeedForwardLayer::Linear(l) => l.forward(x),
            };
        }
        x
    }
}

/// `BasicTransformerBlock.__init__` arguments with `norm_type = "layer_norm"`,
/// `activation_fn = "geglu"`, `attention_type = "default"` and affine norms (what
/// `Transformer2DModel` builds inside UNets).
#[derive(Clone, Debug, PartialEq)]
pub struct BasicTransformerBlockConfig {
    /// Channels in and out (`dim`).
    pub dim: usize,
    /// Heads of both attentions.
    pub num_attention_heads: usize,
    /// Width of each head.
    pub attention_head_dim: usize,
    /// Dropout of attentions and feed-forward.
    pub dropout: f64,
    /// Width of the encoder hidden states; `None` builds no cross-attention (`attn2`, `norm2`).
    pub cross_attention_dim: Option<usize>,
    /// Biases on the attentions' `to_q`, `to_k`, `to_v`.
    pub attention_bias: bool,
    /// `attn1` attends to the encoder hidden states too.
    pub only_cross_attention: bool,
    /// Attention in f32 (see [`AttentionConfig::upcast_attention`]).
    pub upcast_attention: bool,
    /// Epsilon of the layer norms.
    pub norm_eps: f64,
}

impl BasicTransformerBlockConfig {
    /// diffusers' defaults for a block of `dim` channels split into `heads` heads.
    pub fn new(dim: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            dim,
            num_attention_heads: heads,
            attention_head_dim: head_dim,
            dropout: 0.0,
            cross_attention_dim: None,
            attention_bias: false,
            only_cross_attention: false,
            upcast_attention: false,
            norm_eps: 1e-5,
        }
    }

    /// Build the block; `path` is its state-dict path (its attentions report
    /// `{path}.attn1` and `{path}.attn2`).
    ///
    /// # Errors
    /// [`diffusion_core::Error::ConfigField`] (`attention_head_dim`) for zero heads or head
    /// width, (`dropout`) for an invalid probability.
    pub fn init(&self, path: &str, device: &Device) -> Result<BasicTransformerBlock> {
        let attention = |cross: Option<usize>| {
            AttentionConfig {
                bias: self.attention_bias,
                upcast_attention: self.upcast_attention,
                ..AttentionConfig::new(
                    self.dim,
                    cross,
                    self.num_attention_heads,
                    self.attention_head_dim,
                )
            }
            .init(device)
        };
        let norm = || {
            LayerNormConfig::new(self.dim)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let attn1_cross = self
            .cross_attention_dim
            .filter(|_| self.only_cross_attention);
        let attn1 = attention(attn1_cross)?.with_path(join(path, "attn1"));
        let (norm2, attn2) = match self.cross_attention_dim {
            Some(cross) => (
                Some(norm()),
                Some(attention(Some(cross))?.with_path(join(path, "attn2"))),
            ),
            None => (None, None),
        };
        Ok(BasicTransformerBlock {
            norm1: norm(),
            attn1,
            norm2,
            attn2,
            norm3: norm(),
            ff: FeedForward::new(self.dim, self.dropout, device)?,
            only_cross_attention: self.only_cross_attention,
        })
    }
}

/// `prefix.name`, or `name` for an empty prefix.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// What every cross-attention layer of one forward pass shares.
#[derive(Clone, Copy)]
pub struct CrossAttentionInputs<'a> {
    /// `[B, S_kv, cross_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor<3>,
    /// Additive bias on cross-attention scores, `[B, 1, 1, S_kv]`.
    pub encoder_attention_bias: Option<&'a Tensor<4>>,
    /// The hook every attention layer calls.
    pub hook: Option<&'a dyn AttentionHook>,
    /// IP-Adapter image tokens for the cross-attention layers that have image projections.
    pub ip_adapter: Option<IPAdapterAttnInputs<'a>>,
}

/// Self-attention, cross-attention and a GEGLU feed-forward, each pre-normed with a layer norm
/// and added to the residual stream.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    /// Norm before `attn1`.
    pub norm1: LayerNorm,
    /// Self-attention (cross-attention with `only_cross_attention`).
    pub attn1: Attention,
    /// Norm before `attn2`.
    pub norm2: Option<LayerNorm>,
    /// Cross-attention to the encoder hidden states.
    pub attn2: Option<Attention>,
    /// Norm before the feed-forward.
    pub norm3: LayerNorm,
    /// Feed-forward.
    pub ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    /// # Shapes
    /// - `x`: `[B, S, dim]`
    /// - output: `[B, S, dim]`
    pub fn forward(&self, x: Tensor<3>, inputs: &CrossAttentionInputs<'_>) -> Tensor<3> {
        let context = inputs.encoder_hidden_states;
        let attn1_context = self.only_cross_attention.then(|| context.clone());
        // diffusers gives attn1 the UNet's `attention_mask` (even when it attends to the
        // encoder), never `encoder_attention_mask`; this port takes no `attention_mask`.
        let h = self.attn1.forward_tokens(
            self.norm1.forward(x.clone()),
            attn1_context,
            None,
            inputs.hook,
        );
        let mut x = h.add(x);
        if let (Some(norm2), Some(attn2)) = (&self.norm2, &self.attn2) {
            let h = attn2.forward_tokens_with_ip(
                norm2.forward(x.clone()),
                Some(context.clone()),
                inputs.encoder_attention_bias,
                inputs.hook,
                inputs.ip_adapter.as_ref(),
            );
            x = h.add(x);
        }
        self.ff.forward(self.norm3.forward(x.clone())).add(x)
    }
}
