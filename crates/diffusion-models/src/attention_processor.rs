//! The spatial self-attention of UNet blocks (`diffusers.models.attention_processor.Attention`
//! as built with `_from_deprecated_attn_block=True`, run by `AttnProcessor2_0`).

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::{GroupNorm, Linear};
use diffusion_core::burn::tensor::module::attention;
use diffusion_core::burn::tensor::ops::AttentionModuleOptions;
use diffusion_core::burn::tensor::{DType, FloatDType, Tensor};
use diffusion_core::{Device, Result};

use crate::layers;

/// `Attention.__init__` arguments for self-attention over the pixels of a feature map.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Channels of the feature map (`query_dim`).
    pub query_dim: usize,
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
}

impl AttentionConfig {
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
        let projection = |bias: bool| {
            let mut l = layers::linear(self.query_dim, inner, device);
            if !bias {
                l.bias = None;
            }
            l
        };
        Ok(Attention {
            group_norm,
            to_q: projection(self.bias),
            to_k: projection(self.bias),
            to_v: projection(self.bias),
            to_out: vec![layers::linear(inner, self.query_dim, device)],
            heads: self.heads,
            dim_head: self.dim_head,
            residual_connection: self.residual_connection,
            rescale_output_factor: self.rescale_output_factor,
        })
    }
}

/// Multi-head self-attention over the `H × W` positions of a feature map.
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
}

impl Attention {
    /// Softmax attention with scale `1/sqrt(dim_head)` through burn's fused attention op.
    ///
    /// # Shapes
    /// - `x`: `[B, query_dim, H, W]`
    /// - output: `[B, query_dim, H, W]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        // GroupNorm over [B, C, H*W] equals GroupNorm over [B, C, H, W].
        let x = match &self.group_norm {
            Some(norm) => norm.forward(x),
            None => x,
        };
        let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2);
        let split = |t: Tensor<3>| {
            t.reshape([b, h * w, self.heads, self.dim_head])
                .swap_dims(1, 2)
        };
        let q = split(self.to_q.forward(tokens.clone()));
        let k = split(self.to_k.forward(tokens.clone()));
        let v = split(self.to_v.forward(tokens));
        let attended = attend(q, k, v);
        let merged = attended
            .swap_dims(1, 2)
            .reshape([b, h * w, self.heads * self.dim_head]);
        let mut out = merged;
        for layer in &self.to_out {
            out = layer.forward(out);
        }
        let mut out = out.swap_dims(1, 2).reshape([b, c, h, w]);
        if self.residual_connection {
            out = out.add(residual);
        }
        if self.rescale_output_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.rescale_output_factor)
        }
    }
}

/// Softmax attention on `[B, heads, S, dim_head]`, computed in f32 for half-precision inputs:
/// diffusers builds these attentions with `upcast_softmax=True`, and the scores of large
/// activations overflow f16. (Some backends upcast internally; doing it here holds for all.)
fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let dtype = q.dtype();
    if matches!(dtype, DType::F16 | DType::BF16) {
        let f32 = |t: Tensor<4>| t.cast(FloatDType::F32);
        attention(
            f32(q),
            f32(k),
            f32(v),
            None,
            None,
            AttentionModuleOptions::default(),
        )
        .cast(FloatDType::from(dtype))
    } else {
        attention(q, k, v, None, None, AttentionModuleOptions::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::burn::tensor::activation::softmax;
    use diffusion_core::tensor::to_vec;

    /// The fused op against plain matmul + softmax with the diffusers scale.
    #[test]
    fn fused_attention_equals_softmax_reference() {
        let device = Device::flex();
        let config = AttentionConfig {
            query_dim: 8,
            heads: 2,
            dim_head: 4,
            rescale_output_factor: 1.5,
            eps: 1e-6,
            norm_num_groups: Some(2),
            residual_connection: true,
            bias: true,
        };
        let attn = config.init(&device).unwrap();
        let x = Tensor::<4>::random(
            [2, 8, 3, 5],
            diffusion_core::burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
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

    /// With scores beyond f16's range, attention computed in f16 (burn's reference fallback)
    /// overflows; the layer's attention computes them in f32 and matches the f32 result.
    #[test]
    fn half_precision_scores_are_computed_in_f32() {
        use diffusion_core::burn::tensor::module::attention_fallback;
        let device = Device::flex();
        let normal = diffusion_core::burn::tensor::Distribution::Normal(0.0, 1.0);
        // Scores of about 300 * 300 * 4 = 360000: f16 tops out at 65504.
        let q = Tensor::<4>::random([1, 2, 6, 4], normal, &device).add_scalar(300.0);
        let k = Tensor::<4>::random([1, 2, 6, 4], normal, &device).add_scalar(300.0);
        let v = Tensor::<4>::random([1, 2, 6, 4], normal, &device);
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

        let got = attend(half(q.clone()), half(k.clone()), half(v.clone()));
        assert_eq!(got.dtype(), DType::F16);
        let want = to_vec(attend(q, k, v));
        for (g, w) in to_vec(got).iter().zip(&want) {
            assert!((g - w).abs() < 1e-2, "{g} vs {w}");
        }
    }
}
