//! Checked constructors for burn's layers: a config that would make burn panic (channels not
//! divisible by groups, ...) becomes a typed error naming the config field instead.

use std::path::{Path, PathBuf};

use diffusion_core::burn::nn::conv::{Conv2d, Conv2dConfig};
use diffusion_core::burn::nn::{
    Dropout, DropoutConfig, GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d,
};
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::burn::tensor::ops::ConvOptions;
use diffusion_core::{Device, Error, Result, kernels};

use crate::activations::Activation;

/// Placeholder path for errors raised while building from an in-memory config; loaders replace
/// it with the real `config.json` path through [`with_config_path`].
pub(crate) const IN_MEMORY_CONFIG: &str = "<in-memory config>";

/// A [`Error::ConfigField`] about an in-memory config.
pub(crate) fn config_error(field: &str, message: impl Into<String>) -> Error {
    Error::ConfigField {
        path: PathBuf::from(IN_MEMORY_CONFIG),
        field: field.to_string(),
        message: message.into(),
    }
}

/// `torch.cat([a, b], dim=1)` of two feature maps (`[B, C_a, H, W]`, `[B, C_b, H, W]`), the
/// UNets' skip connections. Where feature maps are channels-last
/// ([`kernels::activations_channels_last`]) the maps are concatenated as `[B, H, W, C]` views
/// and the result is a view of channels-last memory again; burn's `cat` along dimension 1
/// would write contiguous NCHW memory, which the next GroupNorm and convolution would each copy
/// back. The values are the same either way.
pub(crate) fn cat_channels(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    if kernels::activations_channels_last(&a.device()) {
        Tensor::cat(vec![a.permute([0, 2, 3, 1]), b.permute([0, 2, 3, 1])], 3).permute([0, 3, 1, 2])
    } else {
        Tensor::cat(vec![a, b], 1)
    }
}

/// The config checks every transformer encoder shares: each `(field, value)` of `positive` is
/// above zero, and `hidden_size` splits evenly into `num_attention_heads`.
///
/// # Errors
/// `(field, message)` naming the first zero field or `num_attention_heads`.
pub(crate) fn check_transformer_dims(
    positive: &[(&str, usize)],
    hidden_size: usize,
    num_attention_heads: usize,
) -> std::result::Result<(), (String, String)> {
    if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err((field.to_string(), "must be positive".into()));
    }
    if !hidden_size.is_multiple_of(num_attention_heads) {
        return Err((
            "num_attention_heads".into(),
            format!("hidden_size {hidden_size} is not divisible into {num_attention_heads} heads"),
        ));
    }
    Ok(())
}

/// A [`Error::Unsupported`] about an in-memory config.
pub(crate) fn unsupported(
    field: &str,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> Error {
    Error::Unsupported {
        path: PathBuf::from(IN_MEMORY_CONFIG),
        field: field.to_string(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// Point config errors raised while building at the file the config came from.
pub(crate) fn with_config_path(err: Error, config_path: &Path) -> Error {
    match err {
        Error::ConfigField {
            path,
            field,
            message,
        } if path == Path::new(IN_MEMORY_CONFIG) => Error::ConfigField {
            path: config_path.to_path_buf(),
            field,
            message,
        },
        Error::Unsupported {
            path,
            field,
            value,
            reason,
        } if path == Path::new(IN_MEMORY_CONFIG) => Error::Unsupported {
            path: config_path.to_path_buf(),
            field,
            value,
            reason,
        },
        other => other,
    }
}

/// `torch.nn.GroupNorm(num_groups, channels, eps, affine=True)`.
///
/// # Errors
/// [`Error::ConfigField`] naming `field` when `channels` is not a multiple of `num_groups`.
pub(crate) fn group_norm(
    num_groups: usize,
    channels: usize,
    eps: f64,
    field: &str,
    device: &Device,
) -> Result<GroupNorm> {
    if num_groups == 0 || !channels.is_multiple_of(num_groups) {
        return Err(config_error(
            field,
            format!("{channels} channels cannot be split into {num_groups} groups"),
        ));
    }
    Ok(GroupNormConfig::new(num_groups, channels)
        .with_epsilon(eps)
        .init(device))
}

/// `act(norm(x))`: without autodiff, for no activation or SiLU, [`kernels::group_norm`] (one
/// fused kernel on CubeCL devices, one fused host loop for f32 on flex, else its reference,
/// which is `GroupNorm::forward` and SiLU op for op); otherwise exactly `GroupNorm::forward`
/// followed by the activation.
///
/// # Shapes
/// - `x`: `[B, C, *]`; output: the same
pub(crate) fn group_norm_act<const D: usize>(
    norm: &GroupNorm,
    x: Tensor<D>,
    act: Option<Activation>,
) -> Tensor<D> {
    if matches!(act, None | Some(Activation::Silu))
        && !x.is_autodiff()
        && let (Some(gamma), Some(beta)) = (&norm.gamma, &norm.beta)
    {
        return kernels::group_norm(
            x,
            gamma.val(),
            beta.val(),
            norm.num_groups,
            norm.epsilon,
            act.is_some(),
        );
    }
    let y = norm.forward(x);
    match act {
        Some(act) => act.forward(y),
        None => y,
    }
}

/// `torch.nn.Conv2d(in, out, kernel, stride, padding)` with a bias.
pub(crate) fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new([in_channels, out_channels], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .init(device)
}

/// `conv.forward(x)` through [`kernels::conv2d`] (a host loop of matrix products on the CPU
/// backend, burn's convolution elsewhere). `Same` padding, which these models do not use, goes
/// through burn's own forward.
pub(crate) fn conv(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
        PaddingConfig2d::Same => return conv.forward(x),
    };
    let options = ConvOptions::new_with_padding(conv.stride, padding, conv.dilation, conv.groups);
    kernels::conv2d(
        x,
        conv.weight.val(),
        conv.bias.as_ref().map(|bias| bias.val()),
        options,
    )
}

/// `torch.nn.Linear(in, out)` with a bias (burn stores the weight as `[in, out]`).
pub(crate) fn linear(d_input: usize, d_output: usize, device: &Device) -> Linear {
    LinearConfig::new(d_input, d_output).init(device)
}

/// `torch.nn.Dropout(p)`: inert unless the device tracks gradients and the module trains.
///
/// # Errors
/// [`Error::ConfigField`] (`dropout`) for a probability outside `[0, 1)`.
pub(crate) fn dropout(prob: f64) -> Result<Dropout> {
    if !prob.is_finite() || !(0.0..1.0).contains(&prob) {
        return Err(config_error(
            "dropout",
            format!("{prob} is not a probability in [0, 1)"),
        ));
    }
    Ok(DropoutConfig::new(prob).init())
}
