//! IP-Adapter's image projections (diffusers `models/embeddings.py`): the modules that turn
//! image-encoder outputs into the extra tokens IP-Adapter's attention layers attend to, and
//! [`IPAdapterImageProjection::from_ip_adapter_weights`], which builds the right one from an
//! IP-Adapter checkpoint's `image_proj` tensors as diffusers'
//! `UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers` does.
//!
//! | checkpoint key | projection | input per image | tokens |
//! |---|---|---|---|
//! | `proj.weight` | [`ImageProjection`] (IP-Adapter) | pooled `image_embeds` | 4 |
//! | `proj.3.weight` | [`IPAdapterFullImageProjection`] (full-face) | `hidden_states[-2]` | one per hidden state |
//! | `perceiver_resampler.proj_in.weight` | [`IPAdapterFaceIDPlusImageProjection`] | face ID embeds + `hidden_states[-2]` | 4 |
//! | `norm.weight` | [`IPAdapterFaceIDImageProjection`] | face ID embeds | `proj.2` rows / `norm` width |
//! | otherwise (`latents`) | [`IPAdapterPlusImageProjection`] (Plus, Resampler) | `hidden_states[-2]` | `latents` rows |
//!
//! The keys are tested in that order, as diffusers tests them. Like diffusers, the conversion
//! fixes what the checkpoints do not say: 4 tokens for the plain projection, heads of 64
//! channels (`heads = to_q rows / 64`), resamplers of depth 4 with feed-forward ratio 4, FaceID
//! Plus with 4 tokens and an ID projection of ratio 2; a checkpoint that disagrees fails to load
//! with an error naming the tensor.
//!
//! # Shapes
//! Every projection maps `[N, S, D]` to `[N, tokens, cross_attention_dim]`, where `N` counts
//! images (`batch * num_images`). Pooled embeddings (the plain and FaceID projections) are given
//! with `S = 1`. [`MultiIPAdapterImageProjection`] takes one `[batch, num_images, S, D]` tensor
//! per adapter (diffusers' 3-D `[batch, num_images, D]` is `S = 1`) and returns
//! `[batch, num_images, tokens, cross_attention_dim]`, which IP-Adapter's attention flattens to
//! `[batch, num_images * tokens, cross_attention_dim]`.

use std::collections::BTreeSet;

use diffusion_core::burn;
use diffusion_core::burn::module::{Module, Param};
use diffusion_core::burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear};
use diffusion_core::burn::tensor::{Distribution, FloatDType, Tensor, activation};
use diffusion_core::weights::{NamedTensor, WeightSource};
use diffusion_core::{Device, Error, Result};

use crate::attention_processor::scaled_dot_product_attention;
use crate::layers;
use crate::state_dict::{LoadMode, load_weights, param_shapes};

/// Width of every attention head of the resamplers diffusers converts.
const DIM_HEAD: usize = 64;
/// Depth of the resamplers diffusers converts.
const RESAMPLER_DEPTH: usize = 4;
/// Feed-forward ratio of the resampler blocks.
const FFN_RATIO: usize = 4;
/// Tokens of the plain IP-Adapter projection.
const PLAIN_TOKENS: usize = 4;
/// Tokens of FaceID Plus.
const FACEID_PLUS_TOKENS: usize = 4;
/// Ratio of FaceID Plus's ID-embedding projection.
const FFPROJ_RATIO: usize = 2;

fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    let mut l = layers::linear(d_in, d_out, device);
    if !bias {
        l.bias = None;
    }
    l
}

fn layer_norm(dim: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(dim).with_epsilon(1e-5).init(device)
}

/// Cast `x` to the dtype of `weight` (diffusers casts the embeddings to the projection's dtype).
fn cast_to<const D: usize>(x: Tensor<D>, weight: &Linear) -> Tensor<D> {
    let dtype = weight.weight.val().dtype();
    if x.dtype() == dtype {
        x
    } else {
        x.cast(FloatDType::from(dtype))
    }
}

/// diffusers' `GELU` activation module: a projection followed by the exact (erf) GELU.
#[derive(Module, Debug)]
#[allow(clippy::upper_case_acronyms)] // diffusers' class name
pub struct GELU {
    /// `dim_in -> dim_out`.
    pub proj: Linear,
}

/// One entry of [`GELUFeedForward::net`], numbered as diffusers' `nn.ModuleList`.
#[derive(Module, Debug)]
pub enum GELUFeedForwardLayer {
    /// `net.0`: projection and GELU.
    GELU(GELU),
    /// `net.1`: dropout (inert).
    Dropout(Dropout),
    /// `net.2`: the output projection.
    Linear(Linear),
}

/// diffusers' `FeedForward(dim, dim_out, mult, activation_fn="gelu", bias)`:
/// `Linear(dim, dim * mult)`, GELU, `Linear(dim * mult, dim_out)`.
#[derive(Module, Debug)]
pub struct GELUFeedForward {
    /// `[GELU, Dropout, Linear]` (`net.0.proj`, `net.2`).
    pub net: Vec<GELUFeedForwardLayer>,
}

impl GELUFeedForward {
    /// A feed-forward with inner width `dim * mult`.
    pub fn new(dim: usize, dim_out: usize, mult: usize, bias: bool, device: &Device) -> Self {
        let inner = dim * mult;
        Self {
            net: vec![
                GELUFeedForwardLayer::GELU(GELU {
                    proj: linear(dim, inner, bias, device),
                }),
                GELUFeedForwardLayer::Dropout(DropoutConfig::new(0.0).init()),
                GELUFeedForwardLayer::Linear(linear(inner, dim_out, bias, device)),
            ],
        }
    }

    /// # Shapes
    /// - `x`: `[..., dim]`; output: `[..., dim_out]`
    pub fn forward<const D: usize>(&self, mut x: Tensor<D>) -> Tensor<D> {
        for layer in &self.net {
            x = match layer {
                GELUFeedForwardLayer::GELU(g) => activation::gelu(g.proj.forward(x)),
                GELUFeedForwardLayer::Dropout(d) => d.forward(x),
                GELUFeedForwardLayer::Linear(l) => l.forward(x),
            };
        }
        x
    }
}

/// `ImageProjection` (IP-Adapter): a linear map of the pooled image embeds to
/// `num_image_text_embeds` tokens, and a LayerNorm.
#[derive(Module, Debug)]
pub struct ImageProjection {
    /// `image_embed_dim -> num_image_text_embeds * cross_attention_dim`.
    pub image_embeds: Linear,
    /// LayerNorm over `cross_attention_dim`.
    pub norm: LayerNorm,
    #[module(skip)]
    num_image_text_embeds: usize,
}

impl ImageProjection {
    /// `ImageProjection(image_embed_dim, cross_attention_dim, num_image_text_embeds)`.
    pub fn new(
        image_embed_dim: usize,
        cross_attention_dim: usize,
        num_image_text_embeds: usize,
        device: &Device,
    ) -> Self {
        Self {
            image_embeds: layers::linear(
                image_embed_dim,
                num_image_text_embeds * cross_attention_dim,
                device,
            ),
            norm: layer_norm(cross_attention_dim, device),
            num_image_text_embeds,
        }
    }

    /// Output tokens per image.
    pub fn num_tokens(&self) -> usize {
        self.num_image_text_embeds
    }

    /// # Shapes
    /// - `image_embeds`: `[N, image_embed_dim]`
    /// - output: `[N, num_image_text_embeds, cross_attention_dim]`
    pub fn forward(&self, image_embeds: Tensor<2>) -> Tensor<3> {
        let [n, _] = image_embeds.dims();
        let x = self
            .image_embeds
            .forward(cast_to(image_embeds, &self.image_embeds));
        let [_, width] = x.dims();
        let tokens = self.num_image_text_embeds;
        self.norm.forward(x.reshape([n, tokens, width / tokens]))
    }
}

/// `IPAdapterFullImageProjection` (ip-adapter-full-face): a feed-forward (ratio 1) and a
/// LayerNorm applied to every hidden state.
#[derive(Module, Debug)]
pub struct IPAdapterFullImageProjection {
    /// `image_embed_dim -> image_embed_dim -> cross_attention_dim`.
    pub ff: GELUFeedForward,
    /// LayerNorm over `cross_attention_dim`.
    pub norm: LayerNorm,
}

impl IPAdapterFullImageProjection {
    /// `IPAdapterFullImageProjection(image_embed_dim, cross_attention_dim)`.
    pub fn new(image_embed_dim: usize, cross_attention_dim: usize, device: &Device) -> Self {
        Self {
            ff: GELUFeedForward::new(image_embed_dim, cross_attention_dim, 1, true, device),
            norm: layer_norm(cross_attention_dim, device),
        }
    }

    /// # Shapes
    /// - `image_embeds`: `[N, S, image_embed_dim]`
    /// - output: `[N, S, cross_attention_dim]`
    pub fn forward(&self, image_embeds: Tensor<3>) -> Tensor<3> {
        self.norm.forward(self.ff.forward(image_embeds))
    }
}

/// `IPAdapterFaceIDImageProjection`: a feed-forward of the face ID embeds to `num_tokens`
/// tokens and a LayerNorm.
#[derive(Module, Debug)]
pub struct IPAdapterFaceIDImageProjection {
    /// `image_embed_dim -> image_embed_dim * mult -> cross_attention_dim * num_tokens`.
    pub ff: GELUFeedForward,
    /// LayerNorm over `cross_attention_dim`.
    pub norm: LayerNorm,
    #[module(skip)]
    num_tokens: usize,
    #[module(skip)]
    cross_attention_dim: usize,
}

impl IPAdapterFaceIDImageProjection {
    /// `IPAdapterFaceIDImageProjection(image_embed_dim, cross_attention_dim, mult, num_tokens)`.
    pub fn new(
        image_embed_dim: usize,
        cross_attention_dim: usize,
        mult: usize,
        num_tokens: usize,
        device: &Device,
    ) -> Self {
        Self {
            ff: GELUFeedForward::new(
                image_embed_dim,
                cross_attention_dim * num_tokens,
                mult,
                true,
                device,
            ),
            norm: layer_norm(cross_attention_dim, device),
            num_tokens,
            cross_attention_dim,
        }
    }

    /// Output tokens per image.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// # Shapes
    /// - `id_embeds`: `[N, image_embed_dim]`
    /// - output: `[N, num_tokens, cross_attention_dim]`
    pub fn forward(&self, id_embeds: Tensor<2>) -> Tensor<3> {
        let [n, _] = id_embeds.dims();
        let x = self.ff.forward(id_embeds);
        self.norm
            .forward(x.reshape([n, self.num_tokens, self.cross_attention_dim]))
    }
}

/// The `Attention(query_dim, dim_head, heads, out_bias=False)` of a resampler block, as
/// `AttnProcessor2_0` runs it: unbiased q/k/v projections, softmax attention with scale
/// `1/sqrt(dim_head)`, and an unbiased output projection. The checkpoint's fused `to_kv` is
/// split into `to_k` and `to_v` when loading.
#[derive(Module, Debug)]
pub struct ResamplerAttention {
    /// `query_dim -> heads * dim_head`.
    pub to_q: Linear,
    /// `query_dim -> heads * dim_head`.
    pub to_k: Linear,
    /// `query_dim -> heads * dim_head`.
    pub to_v: Linear,
    /// `to_out.0`: `heads * dim_head -> query_dim`.
    pub to_out: Vec<Linear>,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    dim_head: usize,
}

impl ResamplerAttention {
    fn new(query_dim: usize, heads: usize, dim_head: usize, device: &Device) -> Self {
        let inner = heads * dim_head;
        Self {
            to_q: linear(query_dim, inner, false, device),
            to_k: linear(query_dim, inner, false, device),
            to_v: linear(query_dim, inner, false, device),
            to_out: vec![linear(inner, query_dim, false, device)],
            heads,
            dim_head,
        }
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// # Shapes
    /// - `latents`: `[N, Q, query_dim]`, `context`: `[N, S, query_dim]`
    /// - output: `[N, Q, query_dim]`
    pub fn forward(&self, latents: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let split = |t: Tensor<3>| {
            let [n, s, _] = t.dims();
            t.reshape([n, s, self.heads, self.dim_head]).swap_dims(1, 2)
        };
        let q = split(self.to_q.forward(latents));
        let k = split(self.to_k.forward(context.clone()));
        let v = split(self.to_v.forward(context));
        let out = scaled_dot_product_attention(q, k, v, None);
        let [n, heads, s, d] = out.dims();
        let mut out = out.swap_dims(1, 2).reshape([n, s, heads * d]);
        for layer in &self.to_out {
            out = layer.forward(out);
        }
        out
    }
}

/// One entry of a resampler block's `ff` (`nn.Sequential(LayerNorm, FeedForward)`).
#[derive(Module, Debug)]
pub enum ResamplerFeedForwardLayer {
    /// `ff.0`.
    LayerNorm(LayerNorm),
    /// `ff.1`: `FeedForward(dim, dim, mult=ffn_ratio, activation_fn="gelu", bias=False)`.
    FeedForward(GELUFeedForward),
}

/// `IPAdapterPlusImageProjectionBlock`: the latents attend to the image features and
/// themselves, then a feed-forward; both with residuals.
#[derive(Module, Debug)]
pub struct IPAdapterPlusImageProjectionBlock {
    /// Norm of the image features.
    pub ln0: LayerNorm,
    /// Norm of the latents.
    pub ln1: LayerNorm,
    /// Attention of the latents to `[features; latents]`.
    pub attn: ResamplerAttention,
    /// `[LayerNorm, FeedForward]`.
    pub ff: Vec<ResamplerFeedForwardLayer>,
}

impl IPAdapterPlusImageProjectionBlock {
    /// `IPAdapterPlusImageProjectionBlock(embed_dims, dim_head, heads, ffn_ratio)`.
    pub fn new(
        embed_dims: usize,
        dim_head: usize,
        heads: usize,
        ffn_ratio: usize,
        device: &Device,
    ) -> Self {
        Self {
            ln0: layer_norm(embed_dims, device),
            ln1: layer_norm(embed_dims, device),
            attn: ResamplerAttention::new(embed_dims, heads, dim_head, device),
            ff: vec![
                ResamplerFeedForwardLayer::LayerNorm(layer_norm(embed_dims, device)),
                ResamplerFeedForwardLayer::FeedForward(GELUFeedForward::new(
                    embed_dims, embed_dims, ffn_ratio, false, device,
                )),
            ],
        }
    }

    /// # Shapes
    /// - `x`: `[N, S, embed_dims]`, `latents`: `[N, Q, embed_dims]`
    /// - output: `[N, Q, embed_dims]`
    pub fn forward(&self, x: Tensor<3>, latents: Tensor<3>) -> Tensor<3> {
        let residual = latents.clone();
        let features = self.ln0.forward(x);
        let latents = self.ln1.forward(latents);
        let context = Tensor::cat(vec![features, latents.clone()], 1);
        let latents = self.attn.forward(latents, context) + residual;
        let mut ff = latents.clone();
        for layer in &self.ff {
            ff = match layer {
                ResamplerFeedForwardLayer::LayerNorm(norm) => norm.forward(ff),
                ResamplerFeedForwardLayer::FeedForward(f) => f.forward(ff),
            };
        }
        ff + latents
    }
}

/// `IPAdapterPlusImageProjection` (IP-Adapter Plus's Resampler): learned latent queries attend
/// to the projected image features through `depth` blocks.
#[derive(Module, Debug)]
pub struct IPAdapterPlusImageProjection {
    /// `[1, num_queries, hidden_dims]`.
    pub latents: Param<Tensor<3>>,
    /// `embed_dims -> hidden_dims`.
    pub proj_in: Linear,
    /// `hidden_dims -> output_dims`.
    pub proj_out: Linear,
    /// LayerNorm over `output_dims`.
    pub norm_out: LayerNorm,
    /// The blocks.
    pub layers: Vec<IPAdapterPlusImageProjectionBlock>,
}

/// `IPAdapterPlusImageProjection.__init__` arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct IPAdapterPlusImageProjectionConfig {
    /// Width of the image features (the image encoder's hidden size).
    pub embed_dims: usize,
    /// Width of the output tokens (the UNet's `cross_attention_dim`).
    pub output_dims: usize,
    /// Width of the latents.
    pub hidden_dims: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Width of each head.
    pub dim_head: usize,
    /// Heads.
    pub heads: usize,
    /// Number of latent queries (output tokens).
    pub num_queries: usize,
    /// Feed-forward ratio.
    pub ffn_ratio: usize,
}

impl Default for IPAdapterPlusImageProjectionConfig {
    /// diffusers' defaults.
    fn default() -> Self {
        Self {
            embed_dims: 768,
            output_dims: 1024,
            hidden_dims: 1280,
            depth: 4,
            dim_head: 64,
            heads: 16,
            num_queries: 8,
            ffn_ratio: 4,
        }
    }
}

impl IPAdapterPlusImageProjection {
    /// Build with fresh weights (latents drawn as `N(0, 1) / sqrt(hidden_dims)`).
    pub fn new(config: &IPAdapterPlusImageProjectionConfig, device: &Device) -> Self {
        let c = config;
        let latents = Tensor::<3>::random(
            [1, c.num_queries, c.hidden_dims],
            Distribution::Normal(0.0, 1.0 / (c.hidden_dims as f64).sqrt()),
            device,
        );
        Self {
            latents: Param::from_tensor(latents),
            proj_in: layers::linear(c.embed_dims, c.hidden_dims, device),
            proj_out: layers::linear(c.hidden_dims, c.output_dims, device),
            norm_out: layer_norm(c.output_dims, device),
            layers: (0..c.depth)
                .map(|_| {
                    IPAdapterPlusImageProjectionBlock::new(
                        c.hidden_dims,
                        c.dim_head,
                        c.heads,
                        c.ffn_ratio,
                        device,
                    )
                })
                .collect(),
        }
    }

    /// Output tokens per image (`num_queries`).
    pub fn num_tokens(&self) -> usize {
        self.latents.val().dims()[1]
    }

    /// # Shapes
    /// - `x`: `[N, S, embed_dims]` (`hidden_states[-2]` of the image encoder)
    /// - output: `[N, num_queries, output_dims]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, _, _] = x.dims();
        let [_, q, h] = self.latents.val().dims();
        let mut latents = self.latents.val().expand([n, q, h]);
        let x = self.proj_in.forward(cast_to(x, &self.proj_in));
        for block in &self.layers {
            latents = block.forward(x.clone(), latents);
        }
        self.norm_out.forward(self.proj_out.forward(latents))
    }
}

/// `IPAdapterFaceIDPlusImageProjection` (FaceID Plus's FacePerceiverResampler): the face ID
/// embeds become `num_tokens` latents that attend to the CLIP image features.
#[derive(Module, Debug)]
pub struct IPAdapterFaceIDPlusImageProjection {
    /// `id_embeddings_dim -> id_embeddings_dim * ffproj_ratio -> embed_dims * num_tokens`.
    pub proj: GELUFeedForward,
    /// LayerNorm of the ID tokens.
    pub norm: LayerNorm,
    /// `hidden_dims -> embed_dims` (of the CLIP features).
    pub proj_in: Linear,
    /// `embed_dims -> output_dims`.
    pub proj_out: Linear,
    /// LayerNorm over `output_dims`.
    pub norm_out: LayerNorm,
    /// The blocks.
    pub layers: Vec<IPAdapterPlusImageProjectionBlock>,
    /// FaceID Plus v2: add the ID tokens back, scaled by [`Self::shortcut_scale`] (diffusers
    /// leaves both for the caller to set).
    #[module(skip)]
    pub shortcut: bool,
    /// Scale of the shortcut.
    #[module(skip)]
    pub shortcut_scale: f64,
    #[module(skip)]
    num_tokens: usize,
    #[module(skip)]
    embed_dims: usize,
}

/// `IPAdapterFaceIDPlusImageProjection.__init__` arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct IPAdapterFaceIDPlusImageProjectionConfig {
    /// Width of the latents.
    pub embed_dims: usize,
    /// Width of the output tokens.
    pub output_dims: usize,
    /// Width of the CLIP features.
    pub hidden_dims: usize,
    /// Width of the face ID embeds.
    pub id_embeddings_dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Width of each head.
    pub dim_head: usize,
    /// Heads.
    pub heads: usize,
    /// Output tokens.
    pub num_tokens: usize,
    /// Feed-forward ratio of the blocks.
    pub ffn_ratio: usize,
    /// Feed-forward ratio of the ID projection.
    pub ffproj_ratio: usize,
}

impl Default for IPAdapterFaceIDPlusImageProjectionConfig {
    /// diffusers' defaults.
    fn default() -> Self {
        Self {
            embed_dims: 768,
            output_dims: 768,
            hidden_dims: 1280,
            id_embeddings_dim: 512,
            depth: 4,
            dim_head: 64,
            heads: 16,
            num_tokens: 4,
            ffn_ratio: 4,
            ffproj_ratio: 2,
        }
    }
}

impl IPAdapterFaceIDPlusImageProjection {
    /// Build with fresh weights, shortcut off.
    pub fn new(config: &IPAdapterFaceIDPlusImageProjectionConfig, device: &Device) -> Self {
        let c = config;
        Self {
            proj: GELUFeedForward::new(
                c.id_embeddings_dim,
                c.embed_dims * c.num_tokens,
                c.ffproj_ratio,
                true,
                device,
            ),
            norm: layer_norm(c.embed_dims, device),
            proj_in: layers::linear(c.hidden_dims, c.embed_dims, device),
            proj_out: layers::linear(c.embed_dims, c.output_dims, device),
            norm_out: layer_norm(c.output_dims, device),
            layers: (0..c.depth)
                .map(|_| {
                    IPAdapterPlusImageProjectionBlock::new(
                        c.embed_dims,
                        c.dim_head,
                        c.heads,
                        c.ffn_ratio,
                        device,
                    )
                })
                .collect(),
            shortcut: false,
            shortcut_scale: 1.0,
            num_tokens: c.num_tokens,
            embed_dims: c.embed_dims,
        }
    }

    /// Output tokens per image.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// diffusers' `forward(id_embeds)` with `self.clip_embeds = clip_embeds`.
    ///
    /// # Shapes
    /// - `id_embeds`: `[N, id_embeddings_dim]`
    /// - `clip_embeds`: `[B, n, S, hidden_dims]` with `B * n = N` (`hidden_states[-2]` of each
    ///   image)
    /// - output: `[N, num_tokens, output_dims]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`clip_embeds`) when `B * n` differs from `N`, or the
    /// shortcut is on and `output_dims` differs from `embed_dims`.
    pub fn forward(&self, id_embeds: Tensor<2>, clip_embeds: Tensor<4>) -> Result<Tensor<3>> {
        let [n, _] = id_embeds.dims();
        let [b, m, s, _] = clip_embeds.dims();
        if b * m != n {
            return Err(Error::invalid_argument(
                "clip_embeds",
                format!("{b} x {m} images of CLIP features for {n} ID embeds"),
            ));
        }
        let id_embeds = self.proj.forward(cast_to(id_embeds, &self.proj_in));
        let id_tokens = self
            .norm
            .forward(id_embeds.reshape([n, self.num_tokens, self.embed_dims]));
        let x = self
            .proj_in
            .forward(cast_to(clip_embeds, &self.proj_in))
            .reshape([n, s, self.embed_dims]);
        let mut latents = id_tokens.clone();
        for block in &self.layers {
            latents = block.forward(x.clone(), latents);
        }
        let out = self.norm_out.forward(self.proj_out.forward(latents));
        if !self.shortcut {
            return Ok(out);
        }
        if out.dims() != id_tokens.dims() {
            return Err(Error::invalid_argument(
                "clip_embeds",
                format!(
                    "the shortcut adds ID tokens of width {} to outputs of width {}",
                    self.embed_dims,
                    out.dims()[2]
                ),
            ));
        }
        Ok(id_tokens + out.mul_scalar(self.shortcut_scale))
    }
}

/// Any image projection an IP-Adapter checkpoint can hold (see the module docs).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per adapter
pub enum IPAdapterImageProjection {
    /// IP-Adapter: [`ImageProjection`].
    Plain(ImageProjection),
    /// IP-Adapter full-face: [`IPAdapterFullImageProjection`].
    Full(IPAdapterFullImageProjection),
    /// IP-Adapter Plus: [`IPAdapterPlusImageProjection`].
    Plus(IPAdapterPlusImageProjection),
    /// IP-Adapter FaceID: [`IPAdapterFaceIDImageProjection`].
    FaceID(IPAdapterFaceIDImageProjection),
    /// IP-Adapter FaceID Plus: [`IPAdapterFaceIDPlusImageProjection`].
    FaceIDPlus(IPAdapterFaceIDPlusImageProjection),
}

impl IPAdapterImageProjection {
    /// The diffusers class name of the projection.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Plain(_) => "ImageProjection",
            Self::Full(_) => "IPAdapterFullImageProjection",
            Self::Plus(_) => "IPAdapterPlusImageProjection",
            Self::FaceID(_) => "IPAdapterFaceIDImageProjection",
            Self::FaceIDPlus(_) => "IPAdapterFaceIDPlusImageProjection",
        }
    }

    /// Output tokens per image; `None` for the full projection, which keeps one token per
    /// input hidden state.
    pub fn num_tokens(&self) -> Option<usize> {
        match self {
            Self::Plain(p) => Some(p.num_tokens()),
            Self::Full(_) => None,
            Self::Plus(p) => Some(p.num_tokens()),
            Self::FaceID(p) => Some(p.num_tokens()),
            Self::FaceIDPlus(p) => Some(p.num_tokens()),
        }
    }

    /// Whether the pipeline should feed the image encoder's `hidden_states[-2]` rather than its
    /// pooled `image_embeds` (diffusers: `not isinstance(layer, ImageProjection)`; the FaceID
    /// projections take face ID embeds from the caller instead).
    pub fn uses_hidden_states(&self) -> bool {
        !matches!(self, Self::Plain(_))
    }

    /// Project one adapter's image embeds.
    ///
    /// # Shapes
    /// - `image_embeds`: `[N, S, D]`, `S = 1` for pooled (plain) and face ID (FaceID) embeds
    /// - output: `[N, tokens, cross_attention_dim]` (`tokens = S` for the full projection)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`image_embeds`) for `S != 1` where pooled embeds are
    /// expected or a width the projection does not take, and for FaceID Plus, which needs
    /// [`Self::forward_with_clip_embeds`].
    pub fn forward(&self, image_embeds: Tensor<3>) -> Result<Tensor<3>> {
        self.forward_with_clip_embeds(image_embeds, None)
    }

    /// [`Self::forward`], with FaceID Plus's CLIP features (diffusers sets them as
    /// `clip_embeds` on the layer); ignored by the other projections.
    ///
    /// # Shapes
    /// - `clip_embeds`: `[B, n, S_clip, hidden]` with `B * n = N`
    ///
    /// # Errors
    /// As [`Self::forward`]; [`Error::InvalidArgument`] (`clip_embeds`) when FaceID Plus gets
    /// none or a mismatched batch.
    pub fn forward_with_clip_embeds(
        &self,
        image_embeds: Tensor<3>,
        clip_embeds: Option<Tensor<4>>,
    ) -> Result<Tensor<3>> {
        let [n, s, d] = image_embeds.dims();
        let expect_width = |want: usize| {
            if d == want {
                Ok(())
            } else {
                Err(Error::invalid_argument(
                    "image_embeds",
                    format!("width {d}, but the {} takes {want}", self.class_name()),
                ))
            }
        };
        let pooled = || {
            if s == 1 {
                Ok(image_embeds.clone().reshape([n, d]))
            } else {
                Err(Error::invalid_argument(
                    "image_embeds",
                    format!(
                        "shape [{n}, {s}, {d}]: the {} takes one pooled embedding per image \
                         (S = 1)",
                        self.class_name()
                    ),
                ))
            }
        };
        match self {
            Self::Plain(p) => {
                expect_width(in_width(&p.image_embeds))?;
                Ok(p.forward(pooled()?))
            }
            Self::Full(p) => {
                expect_width(ff_in_width(&p.ff))?;
                Ok(p.forward(image_embeds))
            }
            Self::Plus(p) => {
                expect_width(in_width(&p.proj_in))?;
                Ok(p.forward(image_embeds))
            }
            Self::FaceID(p) => {
                expect_width(ff_in_width(&p.ff))?;
                Ok(p.forward(pooled()?))
            }
            Self::FaceIDPlus(p) => {
                expect_width(ff_in_width(&p.proj))?;
                let clip = clip_embeds.ok_or_else(|| {
                    Error::invalid_argument(
                        "clip_embeds",
                        "IP-Adapter FaceID Plus needs the CLIP image features",
                    )
                })?;
                let hidden = in_width(&p.proj_in);
                if clip.dims()[3] != hidden {
                    return Err(Error::invalid_argument(
                        "clip_embeds",
                        format!(
                            "width {}, but the projection takes {hidden}",
                            clip.dims()[3]
                        ),
                    ));
                }
                p.forward(pooled()?, clip)
            }
        }
    }

    /// Build the projection an IP-Adapter checkpoint's `image_proj` tensors describe, as
    /// diffusers' `_convert_ip_adapter_image_proj_to_diffusers` does: detect the type from the
    /// keys, infer the widths from the shapes, rename the keys (splitting the resamplers'
    /// fused `to_kv`), and load strictly. `prefix` selects the tensors: `"image_proj."` for a
    /// whole IP-Adapter file, `""` for one holding only the image projection; keys outside it
    /// are ignored.
    ///
    /// ```no_run
    /// # fn main() -> diffusion_core::Result<()> {
    /// use diffusion_core::weights::WeightSource;
    /// use diffusion_models::embeddings::IPAdapterImageProjection;
    /// let source = WeightSource::open("ip-adapter_sd15.safetensors")?;
    /// let proj = IPAdapterImageProjection::from_ip_adapter_weights(
    ///     &source, "image_proj.", &diffusion_core::Device::default())?;
    /// assert_eq!(proj.num_tokens(), Some(4));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownModelType`] naming the source and the keys looked for when no tensor
    /// has the prefix or the layout is none of the known ones; [`Error::MissingTensor`],
    /// [`Error::UnexpectedTensors`] and [`Error::TensorShape`] naming checkpoint keys (with the
    /// prefix) when a tensor is absent, left over or of another shape than the conversion
    /// implies; read errors from the source.
    pub fn from_ip_adapter_weights(
        source: &WeightSource,
        prefix: &str,
        device: &Device,
    ) -> Result<Self> {
        let keys: BTreeSet<String> = source
            .keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
            .collect();
        let ckpt = Checkpoint {
            source,
            prefix,
            keys: &keys,
        };
        let unknown = |message: String| Error::UnknownModelType {
            path: source.origin().to_path_buf(),
            key: format!(
                "{prefix}proj.weight, {prefix}proj.3.weight, \
                 {prefix}perceiver_resampler.proj_in.weight, {prefix}norm.weight, {prefix}latents"
            ),
            message,
        };
        if keys.is_empty() {
            return Err(unknown(format!(
                "no IP-Adapter image projection: no tensor starts with `{prefix}`"
            )));
        }
        let (kind, module) = if keys.contains("proj.weight") {
            let [rows, embed] = ckpt.shape::<2>("proj.weight")?;
            let cross = ckpt.divide("proj.weight", rows, PLAIN_TOKENS)?;
            (
                Kind::Plain,
                Self::Plain(ImageProjection::new(embed, cross, PLAIN_TOKENS, device)),
            )
        } else if keys.contains("proj.3.weight") {
            let [embed, _] = ckpt.shape::<2>("proj.0.weight")?;
            let [cross] = ckpt.shape::<1>("proj.3.weight")?;
            (
                Kind::Full,
                Self::Full(IPAdapterFullImageProjection::new(embed, cross, device)),
            )
        } else if keys.contains("perceiver_resampler.proj_in.weight") {
            let [_, id_dim] = ckpt.shape::<2>("proj.0.weight")?;
            let [embed_dims, hidden_dims] =
                ckpt.shape::<2>("perceiver_resampler.proj_in.weight")?;
            let [output_dims, _] = ckpt.shape::<2>("perceiver_resampler.proj_out.weight")?;
            let [q_rows, _] = ckpt.shape::<2>("perceiver_resampler.layers.0.0.to_q.weight")?;
            let heads = ckpt.divide(
                "perceiver_resampler.layers.0.0.to_q.weight",
                q_rows,
                DIM_HEAD,
            )?;
            let config = IPAdapterFaceIDPlusImageProjectionConfig {
                embed_dims,
                output_dims,
                hidden_dims,
                id_embeddings_dim: id_dim,
                depth: RESAMPLER_DEPTH,
                dim_head: DIM_HEAD,
                heads,
                num_tokens: FACEID_PLUS_TOKENS,
                ffn_ratio: FFN_RATIO,
                ffproj_ratio: FFPROJ_RATIO,
            };
            (
                Kind::FaceIDPlus,
                Self::FaceIDPlus(IPAdapterFaceIDPlusImageProjection::new(&config, device)),
            )
        } else if keys.contains("norm.weight") {
            let [out0, in0] = ckpt.shape::<2>("proj.0.weight")?;
            let [cross] = ckpt.shape::<1>("norm.weight")?;
            let [out2, _] = ckpt.shape::<2>("proj.2.weight")?;
            let mult = ckpt.divide("proj.0.weight", out0, in0)?;
            let tokens = ckpt.divide("proj.2.weight", out2, cross)?;
            (
                Kind::FaceID,
                Self::FaceID(IPAdapterFaceIDImageProjection::new(
                    in0, cross, mult, tokens, device,
                )),
            )
        } else if keys.contains("latents") {
            let [_, num_queries, hidden_dims] = ckpt.shape::<3>("latents")?;
            let [_, embed_dims] = ckpt.shape::<2>("proj_in.weight")?;
            let [output_dims, _] = ckpt.shape::<2>("proj_out.weight")?;
            let q_key = "layers.0.0.to_q.weight";
            let [q_rows, _] = ckpt.shape::<2>(q_key)?;
            let heads = ckpt.divide(q_key, q_rows, DIM_HEAD)?;
            let config = IPAdapterPlusImageProjectionConfig {
                embed_dims,
                output_dims,
                hidden_dims,
                depth: RESAMPLER_DEPTH,
                dim_head: DIM_HEAD,
                heads,
                num_queries,
                ffn_ratio: FFN_RATIO,
            };
            (
                Kind::Plus,
                Self::Plus(IPAdapterPlusImageProjection::new(&config, device)),
            )
        } else {
            let listed: Vec<&str> = keys.iter().map(String::as_str).take(8).collect();
            return Err(unknown(format!(
                "unknown IP-Adapter image projection layout (tensors: {}{})",
                listed.join(", "),
                if keys.len() > 8 { ", ..." } else { "" }
            )));
        };
        ckpt.load(module, kind)
    }
}

/// The layouts [`IPAdapterImageProjection::from_ip_adapter_weights`] converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Full,
    Plus,
    FaceID,
    FaceIDPlus,
}

/// Which rows of a checkpoint tensor a diffusers parameter takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rows {
    All,
    /// The first half (`to_k` of a fused `to_kv`).
    FirstHalf,
    /// The second half (`to_v`).
    SecondHalf,
}

/// The checkpoint key (without prefix) a diffusers parameter of `kind` comes from.
fn checkpoint_key(kind: Kind, key: &str) -> (String, Rows) {
    let rename = |from: &str, to: &str| key.strip_prefix(from).map(|rest| format!("{to}{rest}"));
    let whole = |k: String| (k, Rows::All);
    match kind {
        Kind::Plain => whole(rename("image_embeds.", "proj.").unwrap_or_else(|| key.into())),
        Kind::Full => whole(
            rename("ff.net.0.proj.", "proj.0.")
                .or_else(|| rename("ff.net.2.", "proj.2."))
                .or_else(|| rename("norm.", "proj.3."))
                .unwrap_or_else(|| key.into()),
        ),
        Kind::FaceID => whole(
            rename("ff.net.0.proj.", "proj.0.")
                .or_else(|| rename("ff.net.2.", "proj.2."))
                .unwrap_or_else(|| key.into()),
        ),
        Kind::Plus => resampler_key(key),
        Kind::FaceIDPlus => {
            if let Some(k) =
                rename("proj.net.0.proj.", "proj.0.").or_else(|| rename("proj.net.2.", "proj.2."))
            {
                whole(k)
            } else if key.starts_with("norm.") {
                whole(key.into())
            } else {
                let (k, rows) = resampler_key(key);
                (format!("perceiver_resampler.{k}"), rows)
            }
        }
    }
}

/// The original Resampler's key of a diffusers resampler parameter: block `i` is
/// `layers.i.0` (PerceiverAttention: `norm1`, `norm2`, `to_q`, fused `to_kv`, `to_out`) and
/// `layers.i.1` (`Sequential(LayerNorm, Linear, GELU, Linear)`).
fn resampler_key(key: &str) -> (String, Rows) {
    let Some(rest) = key.strip_prefix("layers.") else {
        return (key.into(), Rows::All);
    };
    let Some((i, param)) = rest.split_once('.') else {
        return (key.into(), Rows::All);
    };
    let block = |tail: &str| format!("layers.{i}.{tail}");
    let table: [(&str, &str, Rows); 8] = [
        ("ln0.", "0.norm1.", Rows::All),
        ("ln1.", "0.norm2.", Rows::All),
        ("attn.to_q.", "0.to_q.", Rows::All),
        ("attn.to_k.", "0.to_kv.", Rows::FirstHalf),
        ("attn.to_v.", "0.to_kv.", Rows::SecondHalf),
        ("attn.to_out.0.", "0.to_out.", Rows::All),
        ("ff.0.", "1.0.", Rows::All),
        ("ff.1.net.0.proj.", "1.1.", Rows::All),
    ];
    for (from, to, rows) in table {
        if let Some(tail) = param.strip_prefix(from) {
            return (block(&format!("{to}{tail}")), rows);
        }
    }
    if let Some(tail) = param.strip_prefix("ff.1.net.2.") {
        return (block(&format!("1.3.{tail}")), Rows::All);
    }
    (key.into(), Rows::All)
}

/// A checkpoint's `image_proj` tensors.
struct Checkpoint<'a> {
    source: &'a WeightSource,
    prefix: &'a str,
    keys: &'a BTreeSet<String>,
}

impl Checkpoint<'_> {
    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn path(&self, key: &str) -> std::path::PathBuf {
        self.source
            .file_of(&self.full_key(key))
            .unwrap_or(self.source.origin())
            .to_path_buf()
    }

    /// The shape of `key`, which must have rank `D`.
    fn shape<const D: usize>(&self, key: &str) -> Result<[usize; D]> {
        let full = self.full_key(key);
        let entry = self
            .source
            .entry(&full)
            .ok_or_else(|| Error::MissingTensor {
                path: self.source.origin().to_path_buf(),
                key: full.clone(),
            })?;
        entry
            .shape
            .clone()
            .try_into()
            .map_err(|_| Error::TensorShape {
                path: self.path(key),
                key: full,
                expected: vec![0; D],
                got: entry.shape,
            })
    }

    /// `n / d`, which must be exact and positive.
    fn divide(&self, key: &str, n: usize, d: usize) -> Result<usize> {
        if d == 0 || n < d || !n.is_multiple_of(d) {
            let full = self.full_key(key);
            let got = self
                .source
                .entry(&full)
                .map(|e| e.shape)
                .unwrap_or_default();
            let mut expected = got.clone();
            if let Some(first) = expected.first_mut() {
                *first = (n / d.max(1)).max(1) * d;
            }
            return Err(Error::TensorShape {
                path: self.path(key),
                key: full,
                expected,
                got,
            });
        }
        Ok(n / d)
    }

    /// Read every parameter of `module` from its checkpoint tensor and load them strictly.
    fn load(
        &self,
        module: IPAdapterImageProjection,
        kind: Kind,
    ) -> Result<IPAdapterImageProjection> {
        let mut used = BTreeSet::new();
        let mut tensors = Vec::new();
        for (key, shape) in param_shapes(&module) {
            let (ckpt_key, rows) = checkpoint_key(kind, &key);
            let full = self.full_key(&ckpt_key);
            let entry = self
                .source
                .entry(&full)
                .ok_or_else(|| Error::MissingTensor {
                    path: self.source.origin().to_path_buf(),
                    key: full.clone(),
                })?;
            let mut expected = shape.clone();
            if rows != Rows::All
                && let Some(first) = expected.first_mut()
            {
                *first *= 2;
            }
            if entry.shape != expected {
                return Err(Error::TensorShape {
                    path: self.path(&ckpt_key),
                    key: full,
                    expected,
                    got: entry.shape,
                });
            }
            let (values, _) = self.source.read_f32(&full)?;
            let half = values.len() / 2;
            let values = match rows {
                Rows::All => values,
                Rows::FirstHalf => values[..half].to_vec(),
                Rows::SecondHalf => values[half..].to_vec(),
            };
            used.insert(ckpt_key);
            tensors.push(NamedTensor { key, shape, values });
        }
        let unexpected: Vec<String> = self
            .keys
            .iter()
            .filter(|k| !used.contains(*k))
            .map(|k| self.full_key(k))
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedTensors {
                path: self.source.origin().to_path_buf(),
                keys: unexpected,
            });
        }
        let converted = WeightSource::from_tensors(self.source.origin(), tensors)?;
        load_weights(module, &converted, LoadMode::Strict).map(|(m, _)| m)
    }
}

fn in_width(l: &Linear) -> usize {
    l.weight.dims()[0]
}

fn ff_in_width(ff: &GELUFeedForward) -> usize {
    match ff.net.first() {
        Some(GELUFeedForwardLayer::GELU(g)) => in_width(&g.proj),
        _ => 0,
    }
}

/// `MultiIPAdapterImageProjection`: one projection per loaded IP-Adapter (the UNet's
/// `encoder_hid_proj` once adapters are loaded).
#[derive(Module, Debug)]
pub struct MultiIPAdapterImageProjection {
    /// The projections, in adapter order.
    pub image_projection_layers: Vec<IPAdapterImageProjection>,
}

impl MultiIPAdapterImageProjection {
    /// Wrap projections.
    pub fn new(image_projection_layers: Vec<IPAdapterImageProjection>) -> Self {
        Self {
            image_projection_layers,
        }
    }

    /// Number of IP-Adapters.
    pub fn num_ip_adapters(&self) -> usize {
        self.image_projection_layers.len()
    }

    /// Project each adapter's image embeds.
    ///
    /// # Shapes
    /// - `image_embeds[i]`: `[B, n, S, D]` (`B` batch rows, `n` images each; pooled embeds with
    ///   `S = 1`)
    /// - output `[i]`: `[B, n, tokens, cross_attention_dim]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`image_embeds`) when the count differs from the number of
    /// adapters; else as [`IPAdapterImageProjection::forward`].
    pub fn forward(&self, image_embeds: &[Tensor<4>]) -> Result<Vec<Tensor<4>>> {
        let none = vec![None; image_embeds.len()];
        self.forward_with_clip_embeds(image_embeds, &none)
    }

    /// [`Self::forward`] with FaceID Plus's CLIP features per adapter (`None` for others).
    ///
    /// # Errors
    /// As [`Self::forward`]; [`Error::InvalidArgument`] (`clip_embeds`) when its count differs.
    pub fn forward_with_clip_embeds(
        &self,
        image_embeds: &[Tensor<4>],
        clip_embeds: &[Option<Tensor<4>>],
    ) -> Result<Vec<Tensor<4>>> {
        let n = self.image_projection_layers.len();
        if image_embeds.len() != n {
            return Err(Error::invalid_argument(
                "image_embeds",
                format!(
                    "{} tensors for {n} IP-Adapter image projections",
                    image_embeds.len()
                ),
            ));
        }
        if clip_embeds.len() != n {
            return Err(Error::invalid_argument(
                "clip_embeds",
                format!("{} entries for {n} IP-Adapters", clip_embeds.len()),
            ));
        }
        self.image_projection_layers
            .iter()
            .zip(image_embeds)
            .zip(clip_embeds)
            .map(|((layer, embeds), clip)| {
                let [b, m, s, d] = embeds.dims();
                let out = layer.forward_with_clip_embeds(
                    embeds.clone().reshape([b * m, s, d]),
                    clip.clone(),
                )?;
                let [_, tokens, width] = out.dims();
                Ok(out.reshape([b, m, tokens, width]))
            })
            .collect()
    }
}
