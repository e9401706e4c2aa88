//! diffusers' `Attention` layer (`diffusers.models.attention_processor`) as run by
//! `AttnProcessor2_0`, and [`AttentionHook`], this port's counterpart of diffusers' attention
//! processors.
//!
//! One [`Attention`] type serves the spatial self-attention of UNet and VAE blocks (built with
//! `_from_deprecated_attn_block=True`: group norm, residual connection, biased projections) and
//! the self- and cross-attentions (`attn1`, `attn2`) of transformer blocks.
//!
//! # Hooks
//! diffusers lets callers swap the processor of every attention layer (LoRA, IP-Adapter,
//! prompt-to-prompt, Pix2Pix Zero). Here a model holds at most one [`AttentionHook`]; every
//! transformer attention calls it with itself, so the hook reads the layer's state-dict path
//! ([`Attention::path`], e.g. `down_blocks.0.attentions.1.transformer_blocks.0.attn2`) and its
//! projections, and may observe or replace queries/keys/values, attention probabilities and the
//! output, or the whole computation. The weights are shared, never copied.

use std::fmt;
use std::sync::Arc;

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::{GroupNorm, Linear};
use diffusion_core::burn::tensor::activation::softmax;
use diffusion_core::burn::tensor::{DType, FloatDType, Tensor};
use diffusion_core::{Device, Result, kernels};

use crate::layers;

mod ip_adapter;

pub use ip_adapter::{IPAdapterAttnInputs, IPAdapterAttnProcessor, IPAdapterMask};

/// `Attention.__init__` arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Channels of the queries (`query_dim`).
    pub query_dim: usize,
    /// Channels of the keys and values' source (`cross_attention_dim`); `None` for
    /// self-attention, whose keys and values come from the queries' input.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head (`dim_head`); the projections have `heads * dim_head` outputs.
    pub dim_head: usize,
    /// The output is divided by this.
    pub rescale_output_factor: f64,
    /// Epsilon of the group norm.
    pub eps: f64,
    /// Groups of the input group norm; `None` builds no norm.
    pub norm_num_groups: Option<usize>,
    /// Add the input to the output.
    pub residual_connection: bool,
    /// Biases on `to_q`, `to_k`, `to_v`.
    pub bias: bool,
    /// Bias on `to_out.0`.
    pub out_bias: bool,
    /// Compute the attention in f32 for half-precision inputs. Recorded for fidelity: this
    /// port always does, see [`scaled_dot_product_attention`].
    pub upcast_attention: bool,
}

impl AttentionConfig {
    /// The spatial self-attention of UNet and VAE blocks (`_from_deprecated_attn_block=True`):
    /// biased projections, a group norm and a residual connection.
    pub fn spatial(
        channels: usize,
        heads: usize,
        dim_head: usize,
        norm_num_groups: Option<usize>,
        eps: f64,
        rescale_output_factor: f64,
    ) -> Self {
        Self {
            query_dim: channels,
            cross_attention_dim: None,
            heads,
            dim_head,
            rescale_output_factor,
            eps,
            norm_num_groups,
            residual_connection: true,
            bias: true,
            out_bias: true,
            upcast_attention: false,
        }
    }

    /// `Attention(query_dim, cross_attention_dim, heads, dim_head)` with diffusers' defaults
    /// otherwise (no bias on `to_q`/`to_k`/`to_v`, no norm, no residual), as transformer blocks
    /// build `attn1` and `attn2`.
    pub fn new(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Self {
        Self {
            query_dim,
            cross_attention_dim,
            heads,
            dim_head,
            rescale_output_factor: 1.0,
            eps: 1e-5,
            norm_num_groups: None,
            residual_connection: false,
            bias: false,
            out_bias: true,
            upcast_attention: false,
        }
    }

    /// Build the layer.
    ///
    /// # Errors
    /// [`diffusion_core::Error::ConfigField`] (`attention_head_dim`) when there would be no head,
    /// (`norm_num_groups`) when `query_dim` is not divisible by the group count.
    pub fn init(&self, device: &Device) -> Result<Attention> {
        if self.heads == 0 || self.dim_head == 0 {
            return Err(layers::config_error(
                "attention_head_dim",
                format!(
                    "{} channels with head width {} give {} heads",
                    self.query_dim, self.dim_head, self.heads
                ),
            ));
        }
        let inner = self.heads * self.dim_head;
        let group_norm = match self.norm_num_groups {
            Some(groups) => Some(layers::group_norm(
                groups,
                self.query_dim,
                self.eps,
                "norm_num_groups",
                device,
            )?),
            None => None,
        };
        let projection = |d_in: usize, d_out: usize, bias: bool| {
            let mut l = layers::linear(d_in, d_out, device);
            if !bias {
                l.bias = None;
            }
            l
        };
        let kv_dim = self.cross_attention_dim.unwrap_or(self.query_dim);
        Ok(Attention {
            group_norm,
            to_q: projection(self.query_dim, inner, self.bias),
            to_k: projection(kv_dim, inner, self.bias),
            to_v: projection(kv_dim, inner, self.bias),
            to_out: vec![projection(inner, self.query_dim, self.out_bias)],
            heads: self.heads,
            dim_head: self.dim_head,
            residual_connection: self.residual_connection,
            rescale_output_factor: self.rescale_output_factor,
            is_cross_attention: self.cross_attention_dim.is_some(),
            upcast_attention: self.upcast_attention,
            path: String::new(),
            processor: None,
        })
    }
}

/// Multi-head attention: self-attention over the pixels of a feature map or over tokens, or
/// cross-attention from tokens to encoder hidden states.
#[derive(Module, Debug)]
pub struct Attention {
    /// Group norm applied to the input (before the projections).
    pub group_norm: Option<GroupNorm>,
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection (`to_out.0`; diffusers' `to_out.1` is a parameterless dropout).
    pub to_out: Vec<Linear>,
    heads: usize,
    dim_head: usize,
    residual_connection: bool,
    rescale_output_factor: f64,
    is_cross_attention: bool,
    upcast_attention: bool,
    path: String,
    /// IP-Adapter's image key/value projections on a cross-attention layer (diffusers'
    /// `IPAdapterAttnProcessor2_0`, state-dict path `<layer>.processor.to_k_ip.<i>.weight`);
    /// `None` without IP-Adapter.
    pub processor: Option<IPAdapterAttnProcessor>,
}

impl Attention {
    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Width of each head.
    pub fn dim_head(&self) -> usize {
        self.dim_head
    }

    /// Whether keys and values come from encoder hidden states (`attn2`, or `attn1` with
    /// `only_cross_attention`).
    pub fn is_cross_attention(&self) -> bool {
        self.is_cross_attention
    }

    /// Whether the config asked for f32 attention (`upcast_attention`).
    pub fn upcast_attention(&self) -> bool {
        self.upcast_attention
    }

    /// The layer's state-dict path in the model that built it
    /// (`mid_block.attentions.0.transformer_blocks.0.attn1`); empty for layers built alone.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Set the path [`Self::path`] reports (models set it while building).
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Softmax attention with scale `1/sqrt(dim_head)` over the pixels of a feature map (the
    /// spatial attention of UNet and VAE blocks; no hook is called).
    ///
    /// # Shapes
    /// - `x`: `[B, query_dim, H, W]`
    /// - output: `[B, query_dim, H, W]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        // GroupNorm over [B, C, H*W] equals GroupNorm over [B, C, H, W].
        let x = match &self.group_norm {
            Some(norm) => layers::group_norm_act(norm, x, None),
            None => x,
        };
        // Both forms give the same tokens; which one is a view depends on the memory order of
        // the feature map (burn only merges the dimensions of a reshape where they are
        // contiguous in the tensor's own order).
        if kernels::activations_channels_last(&x.device()) {
            let tokens = x.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
            let out = self.attend_tokens(tokens, None, None, None, None);
            let out = out.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
            self.finish(out, residual)
        } else {
            let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2);
            let out = self.attend_tokens(tokens, None, None, None, None);
            let out = out.swap_dims(1, 2).reshape([b, c, h, w]);
            self.finish(out, residual)
        }
    }

    /// Attention over tokens: self-attention when `encoder_hidden_states` is `None`, else
    /// cross-attention to them. `encoder_attention_bias` is added to the scores (diffusers
    /// turns a keep-mask `m` into `(1 - m) * -10000`). The hook, if any, is called as
    /// [`AttentionHook`] describes; [`AttentionHook::replace`] receives the input as given here.
    ///
    /// # Shapes
    /// - `hidden_states`: `[B, S, query_dim]`
    /// - `encoder_hidden_states`: `[B, S_kv, cross_attention_dim]`
    /// - `encoder_attention_bias`: broadcastable to `[B, heads, S, S_kv]` (typically
    ///   `[B, 1, 1, S_kv]`)
    /// - output: `[B, S, query_dim]`
    pub fn forward_tokens(
        &self,
        hidden_states: Tensor<3>,
        encoder_hidden_states: Option<Tensor<3>>,
        encoder_attention_bias: Option<&Tensor<4>>,
        hook: Option<&dyn AttentionHook>,
    ) -> Tensor<3> {
        self.forward_tokens_with_ip(
            hidden_states,
            encoder_hidden_states,
            encoder_attention_bias,
            hook,
            None,
        )
    }

    /// [`Self::forward_tokens`] with IP-Adapter image tokens: when the layer has an
    /// [`IPAdapterAttnProcessor`] and `ip` is given, the queries also attend to each adapter's
    /// image tokens through its own key/value projections, and the results, weighted by the
    /// adapter's scale (and mask), are added before `to_out` (decoupled cross-attention).
    pub fn forward_tokens_with_ip(
        &self,
        hidden_states: Tensor<3>,
        encoder_hidden_states: Option<Tensor<3>>,
        encoder_attention_bias: Option<&Tensor<4>>,
        hook: Option<&dyn AttentionHook>,
        ip: Option<&IPAdapterAttnInputs<'_>>,
    ) -> Tensor<3> {
        if let Some(out) =
            hook.and_then(|h| h.replace(self, &hidden_states, encoder_hidden_states.as_ref()))
        {
            return out;
        }
        let residual = hidden_states.clone();
        let normed = match &self.group_norm {
            Some(norm) => {
                layers::group_norm_act(norm, hidden_states.swap_dims(1, 2), None).swap_dims(1, 2)
            }
            None => hidden_states,
        };
        let out = self.attend_tokens(
            normed,
            encoder_hidden_states,
            encoder_attention_bias,
            hook,
            ip,
        );
        self.finish(out, residual)
    }

    /// `[B, S, heads * dim_head]` to `[B, heads, S, dim_head]`.
    pub fn split_heads(&self, t: Tensor<3>) -> Tensor<4> {
        let [b, s, _] = t.dims();
        t.reshape([b, s, self.heads, self.dim_head]).swap_dims(1, 2)
    }

    /// `[B, heads, S, dim_head]` to `[B, S, heads * dim_head]`.
    pub fn merge_heads(&self, t: Tensor<4>) -> Tensor<3> {
        let [b, heads, s, d] = t.dims();
        t.swap_dims(1, 2).reshape([b, s, heads * d])
    }

    /// Projections, attention and `to_out`, with the hook's callbacks; no norm or residual.
    fn attend_tokens(
        &self,
        tokens: Tensor<3>,
        encoder_hidden_states: Option<Tensor<3>>,
        bias: Option<&Tensor<4>>,
        hook: Option<&dyn AttentionHook>,
        ip: Option<&IPAdapterAttnInputs<'_>>,
    ) -> Tensor<3> {
        let context = encoder_hidden_states.unwrap_or_else(|| tokens.clone());
        let mut q = self.split_heads(self.to_q.forward(tokens));
        let mut k = self.split_heads(self.to_k.forward(context.clone()));
        let mut v = self.split_heads(self.to_v.forward(context));
        if let Some(hook) = hook {
            (q, k, v) = hook.qkv(self, q, k, v);
        }
        let [b, heads, s_q, _] = q.dims();
        let s_kv = k.dims()[2];
        let bias = bias.map(|t| t.clone().expand([b, heads, s_q, s_kv]));
        let ip_query = match (&self.processor, ip) {
            (Some(_), Some(_)) => Some(q.clone()),
            _ => None,
        };
        let attended = match hook {
            Some(hook) if hook.wants_probabilities(self) => {
                let dtype = q.dtype();
                let probs = attention_probabilities(q, k, bias);
                let probs = hook.probabilities(self, probs);
                let out = probs.matmul(upcast(v));
                cast_back(out, dtype)
            }
            _ => scaled_dot_product_attention(q, k, v, bias),
        };
        let mut out = self.merge_heads(attended);
        if let (Some(processor), Some(ip), Some(q)) = (&self.processor, ip, ip_query) {
            out = processor.add_image_attention(self, out, q, ip);
        }
        for layer in &self.to_out {
            out = layer.forward(out);
        }
        match hook {
            Some(hook) => hook.output(self, out),
            None => out,
        }
    }

    fn finish<const D: usize>(&self, out: Tensor<D>, residual: Tensor<D>) -> Tensor<D> {
        let out = if self.residual_connection {
            out.add(residual)
        } else {
            out
        };
        if self.rescale_output_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.rescale_output_factor)
        }
    }
}

fn upcast<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if matches!(t.dtype(), DType::F16 | DType::BF16) {
        t.cast(FloatDType::F32)
    } else {
        t
    }
}

fn cast_back<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// `softmax(q kᵀ / sqrt(dim_head) + bias)`, in f32 for half-precision inputs (so the result is
/// f32 then).
///
/// # Shapes
/// - `q`: `[B, heads, S_q, D]`, `k`: `[B, heads, S_kv, D]`, `bias`: `[B, heads, S_q, S_kv]`
/// - output: `[B, heads, S_q, S_kv]`
pub fn attention_probabilities(q: Tensor<4>, k: Tensor<4>, bias: Option<Tensor<4>>) -> Tensor<4> {
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    let scores = upcast(q)
        .matmul(upcast(k).swap_dims(2, 3))
        .mul_scalar(scale);
    let scores = match bias {
        Some(bias) => scores.add(upcast(bias)),
        None => scores,
    };
    softmax(scores, 3)
}

/// Softmax attention with scale `1/sqrt(dim_head)` ([`diffusion_core::kernels::attention`]):
/// this crate's flash-style kernel on CubeCL devices, elsewhere burn's fused attention op,
/// computed in f32 for half-precision inputs and cast back: the scores of large activations
/// overflow f16 (diffusers' `upcast_softmax` / `upcast_attention`; some backends upcast
/// internally, doing it here holds for all).
///
/// # Shapes
/// - `q`: `[B, heads, S_q, D]`, `k`, `v`: `[B, heads, S_kv, D]`, `bias`: `[B, heads, S_q, S_kv]`
/// - output: `[B, heads, S_q, D]`
pub fn scaled_dot_product_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Option<Tensor<4>>,
) -> Tensor<4> {
    diffusion_core::kernels::attention(q, k, v, bias)
}

/// Observe or change what transformer attention layers compute (diffusers' attention
/// processors). Every method has a default that changes nothing; implement the ones needed.
/// Methods take `&self`: hooks that record use interior mutability (`Mutex`).
///
/// Per layer call, in order:
/// 1. [`Self::replace`]: return `Some(output)` to skip everything below (a custom processor,
///    e.g. IP-Adapter's decoupled cross-attention, built from the layer's public projections,
///    [`Attention::split_heads`], [`scaled_dot_product_attention`] and
///    [`Attention::merge_heads`]);
/// 2. [`Self::qkv`] on the projected, head-split queries, keys and values;
/// 3. when [`Self::wants_probabilities`] is true, the attention is computed explicitly and
///    [`Self::probabilities`] sees (and may change) the softmax weights; otherwise the fused
///    kernel runs;
/// 4. [`Self::output`] on the result of `to_out`.
///
/// The `layer` argument identifies the call site: [`Attention::path`] is its state-dict path.
pub trait AttentionHook: Send + Sync {
    /// Replace the layer's whole computation. `encoder_hidden_states` is `None` for
    /// self-attention. Return `[B, S, query_dim]`.
    fn replace(
        &self,
        layer: &Attention,
        hidden_states: &Tensor<3>,
        encoder_hidden_states: Option<&Tensor<3>>,
    ) -> Option<Tensor<3>> {
        let _ = (layer, hidden_states, encoder_hidden_states);
        None
    }

    /// Observe or replace queries `[B, heads, S, D]` and keys, values `[B, heads, S_kv, D]`.
    fn qkv(
        &self,
        layer: &Attention,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let _ = layer;
        (q, k, v)
    }

    /// Whether [`Self::probabilities`] should be called for this layer (this forgoes the fused
    /// attention kernel for it).
    fn wants_probabilities(&self, layer: &Attention) -> bool {
        let _ = layer;
        false
    }

    /// Observe or replace the attention probabilities `[B, heads, S, S_kv]` (rows sum to 1;
    /// f32 even for half-precision models).
    fn probabilities(&self, layer: &Attention, probabilities: Tensor<4>) -> Tensor<4> {
        let _ = layer;
        probabilities
    }

    /// Observe or replace the layer's output `[B, S, query_dim]` (after `to_out`).
    fn output(&self, layer: &Attention, output: Tensor<3>) -> Tensor<3> {
        let _ = layer;
        output
    }
}

/// An optional shared [`AttentionHook`], as models store it (`Debug` without requiring it of
/// the hook).
#[derive(Clone, Default)]
pub struct AttentionHookSlot(pub Option<Arc<dyn AttentionHook>>);

impl AttentionHookSlot {
    /// The hook, borrowed for one forward pass.
    pub fn get(&self) -> Option<&dyn AttentionHook> {
        self.0.as_deref()
    }
}

impl fmt::Debug for AttentionHookSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("AttentionHookSlot(Some(..))"),
            None => f.write_str("AttentionHookSlot(None)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::burn::tensor::Distribution;
    use diffusion_core::burn::tensor::ops::AttentionModuleOptions;
    use diffusion_core::tensor::to_vec;

    fn normal<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::<D>::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// The fused op against plain matmul + softmax with the diffusers scale.
    #[test]
    fn fused_attention_equals_softmax_reference() {
        let device = Device::flex();
        let config = AttentionConfig::spatial(8, 2, 4, Some(2), 1e-6, 1.5);
        let attn = config.init(&device).unwrap();
        let x = normal([2, 8, 3, 5], &device);
        let got = to_vec(attn.forward(x.clone()));

        let tokens = attn
            .group_norm
            .as_ref()
            .unwrap()
            .forward(x.clone())
            .reshape([2, 8, 15])
            .swap_dims(1, 2);
        let split = |t: Tensor<3>| t.reshape([2, 15, 2, 4]).swap_dims(1, 2);
        let q = split(attn.to_q.forward(tokens.clone()));
        let k = split(attn.to_k.forward(tokens.clone()));
        let v = split(attn.to_v.forward(tokens));
        let weights = softmax(q.matmul(k.swap_dims(2, 3)).div_scalar(2.0), 3);
        let out = weights.matmul(v).swap_dims(1, 2).reshape([2, 15, 8]);
        let out = attn.to_out[0]
            .forward(out)
            .swap_dims(1, 2)
            .reshape([2, 8, 3, 5]);
        let want = to_vec(out.add(x).div_scalar(1.5));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    /// Cross-attention with a bias that hides the last key: the output equals attention over
    /// the other keys only, and the explicit (hooked) path equals the fused one.
    #[test]
    fn cross_attention_bias_masks_keys_and_paths_agree() {
        struct SeeProbabilities;
        impl AttentionHook for SeeProbabilities {
            fn wants_probabilities(&self, _: &Attention) -> bool {
                true
            }
        }
        let device = Device::flex();
        let attn = AttentionConfig::new(8, Some(6), 2, 4)
            .init(&device)
            .unwrap();
        let x = normal([1, 5, 8], &device);
        let context = normal([1, 4, 6], &device);
        let bias =
            diffusion_core::tensor::from_vec(vec![0.0, 0.0, 0.0, -10000.0], [1, 1, 1, 4], &device);
        let masked = attn.forward_tokens(x.clone(), Some(context.clone()), Some(&bias), None);
        let explicit = attn.forward_tokens(
            x.clone(),
            Some(context.clone()),
            Some(&bias),
            Some(&SeeProbabilities),
        );
        let shorter = attn.forward_tokens(x, Some(context.narrow(1, 0, 3)), None, None);
        let (masked, explicit, shorter) = (to_vec(masked), to_vec(explicit), to_vec(shorter));
        for ((m, e), s) in masked.iter().zip(&explicit).zip(&shorter) {
            assert!((m - s).abs() < 1e-5, "{m} vs {s}");
            assert!((m - e).abs() < 1e-5, "{m} vs {e}");
        }
    }

    /// With scores beyond f16's range, attention computed in f16 (burn's reference fallback)
    /// overflows; the layer's attention computes them in f32 and matches the f32 result.
    #[test]
    fn half_precision_scores_are_computed_in_f32() {
        use diffusion_core::burn::tensor::module::attention_fallback;
        let device = Device::flex();
        // Scores of about 300 * 300 * 4 = 360000: f16 tops out at 65504.
        let q = normal([1, 2, 6, 4], &device).add_scalar(300.0);
        let k = normal([1, 2, 6, 4], &device).add_scalar(300.0);
        let v = normal([1, 2, 6, 4], &device);
        let half = |t: Tensor<4>| t.cast(FloatDType::F16);
        let naive = to_vec(attention_fallback(
            half(q.clone()),
            half(k.clone()),
            half(v.clone()),
            None,
            None,
            AttentionModuleOptions::default(),
        ));
        assert!(
            naive.iter().any(|x| !x.is_finite()),
            "f16 scores did not overflow"
        );

        let got =
            scaled_dot_product_attention(half(q.clone()), half(k.clone()), half(v.clone()), None);
        assert_eq!(got.dtype(), DType::F16);
        // The reference sees the same (f16-rounded) inputs: near 300, f16 rounds by up to 0.125,
        // which moves scores this large by more than the gaps between keys.
        let full = |t: Tensor<4>| half(t).cast(FloatDType::F32);
        let want = to_vec(scaled_dot_product_attention(
            full(q),
            full(k),
            full(v),
            None,
        ));
        for (g, w) in to_vec(got).iter().zip(&want) {
            assert!((g - w).abs() < 1e-2, "{g} vs {w}");
        }
    }
}
