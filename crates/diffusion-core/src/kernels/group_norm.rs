//! GroupNorm with an optional fused SiLU.

use burn::tensor::{DType, FloatDType, Tensor, activation};

/// `torch.nn.GroupNorm(groups, C, eps)(x) * gamma + beta`, followed by SiLU when `silu` is set,
/// through the fused kernel where [`super::uses_kernel`] says so, else through
/// [`group_norm_reference`].
///
/// The kernel computes the statistics in f32 for every input dtype and applies the affine and
/// the activation in f32 before rounding to the input dtype.
///
/// # Shapes
/// - `x`: `[B, C, *]` (rank ≥ 3)
/// - `gamma`, `beta`: `[C]`
/// - output: the shape of `x`
///
/// # Panics
/// When `C` is not a multiple of `groups` or `gamma`/`beta` do not have `C` elements.
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<D> {
    let channels = x.dims()[1];
    assert!(
        D >= 3 && groups > 0 && channels.is_multiple_of(groups),
        "group_norm: {channels} channels (rank {D}) cannot be split into {groups} groups"
    );
    assert_eq!(
        gamma.dims(),
        [channels],
        "group_norm: gamma must have C elements"
    );
    assert_eq!(
        beta.dims(),
        [channels],
        "group_norm: beta must have C elements"
    );
    #[cfg(feature = "cubecl-kernels")]
    if super::uses_kernel(super::Kernel::GroupNorm, &x.device()) && x.shape().num_elements() > 0 {
        return super::extension::group_norm(x, gamma, beta, groups, eps, silu);
    }
    group_norm_reference(x, gamma, beta, groups, eps, silu)
}

/// [`group_norm`] in burn tensor ops: the same op sequence as `burn::nn::GroupNorm::forward`
/// (statistics widened to f32 for f16 inputs, two passes: mean, then the mean of squared
/// deviations), then `activation::silu`, so on every backend it equals what the models computed
/// with `GroupNorm` bit for bit.
///
/// # Shapes
/// As [`group_norm`].
pub fn group_norm_reference<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<D> {
    let shape = x.shape();
    let batch = shape[0];
    let channels = shape[1];
    let hidden = shape[2..].iter().product::<usize>() * channels / groups;
    let x = x.reshape([batch, groups, hidden]);
    let original = x.dtype();
    let widen = matches!(original, DType::F16);
    let x = if widen { x.cast(FloatDType::F32) } else { x };
    let mean = x.clone().mean_dim(2);
    let x = x.sub(mean);
    let var = x.clone().square().mean_dim(2);
    let normalized = x.div(var.add_scalar(eps).sqrt());
    let normalized = if widen {
        normalized.cast(FloatDType::from(original))
    } else {
        normalized
    };
    let mut affine_shape = [1; D];
    affine_shape[1] = channels;
    let out = normalized
        .reshape(shape)
        .mul(gamma.reshape(affine_shape))
        .add(beta.reshape(affine_shape));
    if silu { activation::silu(out) } else { out }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{Device, Distribution};

    /// The reference is `burn::nn::GroupNorm` exactly, in every float dtype flex has.
    #[test]
    fn reference_is_burn_group_norm_bit_for_bit() {
        let device = Device::flex();
        for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
            let mut norm = GroupNormConfig::new(3, 6).with_epsilon(1e-6).init(&device);
            let gamma = Tensor::<1>::random([6], Distribution::Default, &device).cast(dtype);
            let beta = Tensor::<1>::random([6], Distribution::Default, &device).cast(dtype);
            norm.gamma = Some(Param::from_tensor(gamma.clone()));
            norm.beta = Some(Param::from_tensor(beta.clone()));
            let x = Tensor::<4>::random([2, 6, 5, 3], Distribution::Normal(0.5, 2.0), &device)
                .cast(dtype);
            let want = norm.forward(x.clone());
            let got = group_norm(x.clone(), gamma.clone(), beta.clone(), 3, 1e-6, false);
            got.into_data().assert_eq(&want.clone().into_data(), true);
            let got = group_norm(x, gamma, beta, 3, 1e-6, true);
            got.into_data()
                .assert_eq(&activation::silu(want).into_data(), true);
        }
    }
}
