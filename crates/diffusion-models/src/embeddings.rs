//! Timestep features and embeddings (`diffusers.models.embeddings`); IP-Adapter's image
//! projections are in [`ip_adapter`].

use diffusion_core::Device;
use diffusion_core::burn;
use diffusion_core::burn::module::{Module, Param};
use diffusion_core::burn::nn::Linear;
use diffusion_core::burn::tensor::{Distribution, Tensor, TensorData};

use crate::activations::Activation;
use crate::layers::linear;

pub mod ip_adapter;

pub use ip_adapter::{
    IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection,
    IPAdapterFullImageProjection, IPAdapterImageProjection, IPAdapterPlusImageProjection,
    ImageProjection, MultiIPAdapterImageProjection,
};

/// The default `max_period` of sinusoidal embeddings.
pub const MAX_PERIOD: f64 = 10_000.0;

/// The frequencies `exp(-ln(max_period) * i / (half_dim - shift))`, rounded at every step to
/// `f32` in the order diffusers computes them, so the features match to the last bit that
/// `exp` allows.
fn sinusoidal_frequencies(half_dim: usize, downscale_freq_shift: f64, max_period: f64) -> Vec<f32> {
    let log_period = -(max_period.ln()) as f32;
    let denominator = (half_dim as f64 - downscale_freq_shift) as f32;
    (0..half_dim)
        .map(|i| {
            let exponent = log_period * i as f32 / denominator;
            (exponent as f64).exp() as f32
        })
        .collect()
}

/// Sinusoidal timestep features (`get_timestep_embedding`): `[sin(t f), cos(t f)]`, or
/// `[cos, sin]` with `flip_sin_to_cos`, zero-padded by one column when `embedding_dim` is odd.
///
/// # Shapes
/// - `timesteps`: `[N]` (any real values; fractional timesteps are used as given)
/// - output: `[N, embedding_dim]`
pub fn timestep_embedding(
    timesteps: Tensor<1>,
    embedding_dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Tensor<2> {
    let device = timesteps.device();
    let [n] = timesteps.dims();
    let half_dim = embedding_dim / 2;
    let freqs = sinusoidal_frequencies(half_dim, downscale_freq_shift, max_period);
    let freqs = Tensor::<2>::from_data(TensorData::new(freqs, [1, half_dim]), &device);
    let mut args = timesteps.reshape([n, 1]).mul(freqs);
    if scale != 1.0 {
        args = args.mul_scalar(scale);
    }
    let (first, second) = if flip_sin_to_cos {
        (args.clone().cos(), args.sin())
    } else {
        (args.clone().sin(), args.cos())
    };
    let mut parts = vec![first, second];
    if embedding_dim % 2 == 1 {
        parts.push(Tensor::zeros([n, 1], &device));
    }
    Tensor::cat(parts, 1)
}

/// Sinusoidal timestep features as a module (`Timesteps`); it has no parameters.
#[derive(Module, Debug)]
pub struct Timesteps {
    /// Feature width.
    pub num_channels: usize,
    /// Put cosines first.
    pub flip_sin_to_cos: bool,
    /// Subtracted from `half_dim` in the frequency denominator (`freq_shift` in UNet configs).
    pub downscale_freq_shift: f64,
    /// Multiplies the arguments of sin and cos.
    pub scale: f64,
}

impl Timesteps {
    /// `Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift)` with `scale = 1`.
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
            scale: 1.0,
        }
    }

    /// # Shapes
    /// - `timesteps`: `[N]`
    /// - output: `[N, num_channels]`
    pub fn forward(&self, timesteps: Tensor<1>) -> Tensor<2> {
        timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            self.scale,
            MAX_PERIOD,
        )
    }
}

/// Random Fourier features of (log) noise levels (`GaussianFourierProjection`), as used by
/// score-SDE models. `weight` is a fixed random projection, stored in checkpoints.
#[derive(Module, Debug)]
pub struct GaussianFourierProjection {
    /// Projection frequencies `[embedding_size]`, drawn as `N(0, scale²)`.
    pub weight: Param<Tensor<1>>,
    /// Take `ln` of the input first.
    pub log: bool,
    /// Put cosines first.
    pub flip_sin_to_cos: bool,
}

impl GaussianFourierProjection {
    /// A projection with `embedding_size` frequencies drawn as `N(0, scale²)`.
    pub fn new(
        embedding_size: usize,
        scale: f64,
        log: bool,
        flip_sin_to_cos: bool,
        device: &Device,
    ) -> Self {
        let weight =
            Tensor::<1>::random([embedding_size], Distribution::Normal(0.0, scale), device);
        Self {
            weight: Param::from_tensor(weight).set_require_grad(false),
            log,
            flip_sin_to_cos,
        }
    }

    /// # Shapes
    /// - `x`: `[N]` (positive when `log` is set)
    /// - output: `[N, 2 * embedding_size]`
    pub fn forward(&self, x: Tensor<1>) -> Tensor<2> {
        let x = if self.log { x.log() } else { x };
        let [n] = x.dims();
        // As torch promotes: f32 timesteps times an f16 weight compute in f32.
        let weight = self.weight.val();
        let weight = if weight.dtype() == x.dtype() {
            weight
        } else {
            weight.cast(diffusion_core::burn::tensor::FloatDType::from(x.dtype()))
        };
        let [size] = weight.dims();
        let proj = x
            .reshape([n, 1])
            .mul(weight.reshape([1, size]))
            .mul_scalar(2.0)
            .mul_scalar(std::f64::consts::PI);
        let (first, second) = if self.flip_sin_to_cos {
            (proj.clone().cos(), proj.sin())
        } else {
            (proj.clone().sin(), proj.cos())
        };
        Tensor::cat(vec![first, second], 1)
    }
}

/// Two-layer MLP on timestep features (`TimestepEmbedding`): an optional condition projection
/// added to the input (`cond_proj`, LCM's `timestep_cond`), `linear_1`, an activation,
/// `linear_2`, and an optional post activation.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    /// `in_channels → time_embed_dim`.
    pub linear_1: Linear,
    /// `cond_proj_dim → in_channels` without bias, when built with a condition width.
    pub cond_proj: Option<Linear>,
    /// `time_embed_dim → time_embed_dim`.
    pub linear_2: Linear,
    #[module(skip)]
    act: Activation,
    #[module(skip)]
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    /// `TimestepEmbedding(in_channels, time_embed_dim)` with SiLU.
    pub fn new(in_channels: usize, time_embed_dim: usize, device: &Device) -> Self {
        Self::with_options(
            in_channels,
            time_embed_dim,
            Activation::Silu,
            None,
            None,
            device,
        )
    }

    /// `TimestepEmbedding(in_channels, time_embed_dim, act_fn, post_act_fn=post_act,
    /// cond_proj_dim=cond_proj_dim)`.
    pub fn with_options(
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
        cond_proj_dim: Option<usize>,
        device: &Device,
    ) -> Self {
        Self {
            linear_1: linear(in_channels, time_embed_dim, device),
            cond_proj: cond_proj_dim.map(|d| {
                let mut l = linear(d, in_channels, device);
                l.bias = None;
                l
            }),
            linear_2: linear(time_embed_dim, time_embed_dim, device),
            act,
            post_act,
        }
    }

    /// Width of the condition `forward_with_condition` takes, if any.
    pub fn cond_proj_dim(&self) -> Option<usize> {
        self.cond_proj
            .as_ref()
            .map(|l| l.weight.lazy_shape().dims::<2>()[0])
    }

    /// # Shapes
    /// - `sample`: `[N, in_channels]`
    /// - output: `[N, time_embed_dim]`
    pub fn forward(&self, sample: Tensor<2>) -> Tensor<2> {
        self.forward_with_condition(sample, None)
    }

    /// As [`Self::forward`], adding `cond_proj(condition)` to the input first. A condition
    /// given to an embedding built without `cond_proj` is ignored, as in diffusers; callers
    /// that take user input check [`Self::cond_proj_dim`] first.
    ///
    /// # Shapes
    /// - `sample`: `[N, in_channels]`, `condition`: `[N, cond_proj_dim]`
    /// - output: `[N, time_embed_dim]`
    pub fn forward_with_condition(
        &self,
        sample: Tensor<2>,
        condition: Option<Tensor<2>>,
    ) -> Tensor<2> {
        let sample = match (&self.cond_proj, condition) {
            (Some(proj), Some(condition)) => sample.add(proj.forward(condition)),
            _ => sample,
        };
        let hidden = self.act.forward(self.linear_1.forward(sample));
        let out = self.linear_2.forward(hidden);
        match self.post_act {
            Some(act) => act.forward(out),
            None => out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::tensor::{from_vec, to_vec};

    /// The formula evaluated in f64, independently of the f32 rounding steps.
    fn reference(t: f64, dim: usize, flip: bool, shift: f64) -> Vec<f64> {
        let half = dim / 2;
        let args: Vec<f64> = (0..half)
            .map(|i| t * (-(MAX_PERIOD.ln()) * i as f64 / (half as f64 - shift)).exp())
            .collect();
        let sin: Vec<f64> = args.iter().map(|a| a.sin()).collect();
        let cos: Vec<f64> = args.iter().map(|a| a.cos()).collect();
        let mut out = if flip {
            [cos, sin].concat()
        } else {
            [sin, cos].concat()
        };
        if dim % 2 == 1 {
            out.push(0.0);
        }
        out
    }

    #[test]
    fn sinusoidal_features_match_the_formula() {
        let device = Device::flex();
        for (dim, flip, shift) in [(8, true, 0.0), (8, false, 1.0), (7, true, 0.0)] {
            let t = from_vec(vec![0.0, 3.0, 250.5], [3], &device);
            let out = to_vec(timestep_embedding(t, dim, flip, shift, 1.0, MAX_PERIOD));
            assert_eq!(out.len(), 3 * dim);
            for (row, t) in [0.0, 3.0, 250.5].into_iter().enumerate() {
                for (j, want) in reference(t, dim, flip, shift).into_iter().enumerate() {
                    let got = out[row * dim + j] as f64;
                    // f32 arguments near 250 carry ~1e-5 rounding; the formula must agree to that.
                    assert!(
                        (got - want).abs() < 5e-5,
                        "dim {dim} t {t} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn fourier_features_use_log_and_two_pi() {
        let device = Device::flex();
        let mut proj = GaussianFourierProjection::new(2, 16.0, true, false, &device);
        proj.weight = Param::from_tensor(from_vec(vec![0.5, -1.25], [2], &device));
        let out = to_vec(proj.forward(from_vec(vec![2.0], [1], &device)));
        let two_pi = 2.0 * std::f64::consts::PI;
        let args = [2f64.ln() * 0.5 * two_pi, 2f64.ln() * -1.25 * two_pi];
        let want = [args[0].sin(), args[1].sin(), args[0].cos(), args[1].cos()];
        for (g, w) in out.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{out:?} vs {want:?}");
        }
    }
}
