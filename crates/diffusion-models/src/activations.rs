//! Activation functions chosen by name in configs (`diffusers.models.activations.get_activation`).

use diffusion_core::burn::tensor::{Tensor, activation};

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
}
