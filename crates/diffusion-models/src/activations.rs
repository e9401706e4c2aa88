//! Activation functions chosen by name in configs (`diffusers.models.activations.get_activation`)
//! and the gated projections of transformer feed-forwards (`GEGLU`).

use diffusion_core::Device;
use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::Linear;
use diffusion_core::burn::tensor::{Tensor, activation};

use crate::layers;

/// An activation named in a config (`act_fn`, `resnet_act_fn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`; config names `"silu"` and `"swish"`.
    Silu,
    /// `x * tanh(softplus(x))`; config name `"mish"`.
    Mish,
    /// Exact (erf) GELU; config name `"gelu"`.
    Gelu,
    /// `max(x, 0)`; config name `"relu"`.
    Relu,
}

impl Activation {
    /// The config names diffusers accepts.
    pub const NAMES: [&'static str; 5] = ["silu", "swish", "mish", "gelu", "relu"];

    /// Parse a config name (case-insensitive, as diffusers lowercases it).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "silu" | "swish" => Some(Self::Silu),
            "mish" => Some(Self::Mish),
            "gelu" => Some(Self::Gelu),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    /// Apply the activation element-wise.
    ///
    /// # Shapes
    /// - input and output: any shape
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Silu => activation::silu(x),
            Self::Mish => activation::mish(x),
            Self::Gelu => activation::gelu(x),
            Self::Relu => activation::relu(x),
        }
    }
}

/// `GEGLU(dim_in, dim_out)`: a projection to `2 * dim_out` whose first half is gated by the
/// exact GELU of the second half.
#[derive(Module, Debug)]
pub struct GEGLU {
    /// `dim_in → 2 * dim_out`.
    pub proj: Linear,
}

impl GEGLU {
    /// A gated projection with a bias, as diffusers' `FeedForward` builds it.
    pub fn new(dim_in: usize, dim_out: usize, device: &Device) -> Self {
        Self {
            proj: layers::linear(dim_in, 2 * dim_out, device),
        }
    }

    /// # Shapes
    /// - `x`: `[B, S, dim_in]`
    /// - output: `[B, S, dim_out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let projected = self.proj.forward(x);
        let [_, _, width] = projected.dims();
        let half = width / 2;
        let hidden = projected.clone().narrow(2, 0, half);
        let gate = projected.narrow(2, half, half);
        hidden.mul(activation::gelu(gate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_like_diffusers() {
        assert_eq!(Activation::from_name("swish"), Some(Activation::Silu));
        assert_eq!(Activation::from_name("SiLU"), Some(Activation::Silu));
        assert_eq!(Activation::from_name("mish"), Some(Activation::Mish));
        assert_eq!(Activation::from_name("tanh"), None);
        for name in Activation::NAMES {
            assert!(Activation::from_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn geglu_gates_the_first_half_with_gelu_of_the_second() {
        use diffusion_core::tensor::{from_vec, to_vec};
        let device = Device::flex();
        let mut geglu = GEGLU::new(1, 2, &device);
        // Identity-like projection: outputs [x, 2x, -x, 3x].
        geglu.proj.weight =
            burn::module::Param::from_tensor(from_vec(vec![1.0, 2.0, -1.0, 3.0], [1, 4], &device));
        geglu.proj.bias = None;
        let out = to_vec(geglu.forward(from_vec(vec![0.5, -2.0], [1, 2, 1], &device)));
        let gelu = |v: f64| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2));
        for (i, x) in [0.5f64, -2.0].into_iter().enumerate() {
            let want = [x * gelu(-x), 2.0 * x * gelu(3.0 * x)];
            for j in 0..2 {
                assert!((out[i * 2 + j] as f64 - want[j]).abs() < 1e-5, "{out:?}");
            }
        }
    }

    /// Abramowitz-Stegun 7.1.26 is too coarse; use the series, accurate for |x| < 7.
    fn erf(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
