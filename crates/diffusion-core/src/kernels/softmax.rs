//! Softmax over the last dimension in f32 precision.

use burn::tensor::{DType, FloatDType, Tensor, activation};

/// Softmax over the last dimension, computed in f32 for every input dtype and returned in the
/// input dtype (diffusers' `upcast_softmax`: `scores.float().softmax(-1).to(dtype)`), through the
/// fused kernel where [`super::uses_kernel`] says so for [`super::Kernel::Softmax`], else through
/// [`softmax_reference`].
///
/// The kernel reads each row of `x` and writes the result without an f32 copy of the tensor
/// in memory: one cube per row computes the maximum and the sum of exponentials in f32 and writes
/// the normalised exponentials rounded to the input dtype.
///
/// # Shapes
/// - `x`: `[.., N]` (any rank ≥ 1)
/// - output: the shape of `x`
pub fn softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "cubecl-kernels")]
    if super::uses_kernel(super::Kernel::Softmax, &x.device())
        && x.shape().num_elements() > 0
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
    {
        return super::extension::softmax(x);
    }
    softmax_reference(x)
}

/// [`softmax`] in burn tensor ops: the input cast to f32 (when it is f16 or bf16),
/// `activation::softmax` over the last dimension, the result cast back.
///
/// # Shapes
/// As [`softmax`].
pub fn softmax_reference<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    if matches!(dtype, DType::F16 | DType::BF16) {
        activation::softmax(x.cast(FloatDType::F32), D - 1).cast(FloatDType::from(dtype))
    } else {
        activation::softmax(x, D - 1)
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    /// Off kernel devices `softmax` is the upcast softmax exactly, in every float dtype.
    #[test]
    fn softmax_is_the_upcast_softmax_off_kernel_devices() {
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 3, 37], Distribution::Normal(0.0, 4.0), &device);
        let want = activation::softmax(x.clone(), 2);
        softmax(x.clone())
            .into_data()
            .assert_eq(&want.into_data(), true);
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            let half = x.clone().cast(dtype);
            let want = activation::softmax(half.clone().cast(FloatDType::F32), 2).cast(dtype);
            let got = softmax(half);
            assert_eq!(got.dtype(), DType::from(dtype));
            got.into_data().assert_eq(&want.into_data(), true);
        }
    }
}
