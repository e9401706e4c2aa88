//! Downsampling layers (`diffusers.models.downsampling`).

use diffusion_core::Device;
use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::burn::tensor::module::avg_pool2d;
use diffusion_core::burn::tensor::ops::{AvgPoolOptions, PadMode};

use crate::layers;
use crate::upsampling::{DEFAULT_FIR_KERNEL, separable_kernel, upfirdn2d};

/// 2×2 average pooling with stride 2 (`nn.AvgPool2d(2, 2)`; odd trailing rows are dropped).
///
/// # Shapes
/// - `x`: `[B, C, H, W]`
/// - output: `[B, C, H / 2, W / 2]`
pub fn avg_pool_2x2(x: Tensor<4>) -> Tensor<4> {
    avg_pool2d(
        x,
        AvgPoolOptions {
            kernel_size: [2, 2],
            stride: [2, 2],
            padding: [(0, 0), (0, 0)],
            count_include_pad: true,
            ceil_mode: false,
        },
    )
}

/// FIR downsampling (`downsample_2d`): filter with the separable `kernel` normalised to `gain`,
/// then keep every `factor`-th pixel.
///
/// # Shapes
/// - `x`: `[B, C, H, W]`
/// - output: `[B, C, H / factor, W / factor]` (for even sizes and the default kernel)
pub fn downsample_2d(x: Tensor<4>, kernel: &[f32], factor: usize, gain: f32) -> Tensor<4> {
    let k = kernel.len();
    let weights = separable_kernel(kernel, gain);
    let p = k - factor;
    upfirdn2d(x, &weights, [k, k], 1, factor, (p.div_ceil(2), p / 2))
}

/// `FirDownsample2D` without its optional convolution (as the skip blocks use it): FIR
/// downsampling by 2 with the default kernel.
#[derive(Module, Debug)]
pub struct FirDownsample2D {
    /// Channels in and out.
    pub channels: usize,
}

impl FirDownsample2D {
    /// # Shapes
    /// - `x`: `[B, C, H, W]`
    /// - output: `[B, C, H/2, W/2]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        downsample_2d(x, &DEFAULT_FIR_KERNEL, 2, 1.0)
    }
}

/// `Downsample2D(channels, use_conv, out_channels, padding, name="op")`: a stride-2 3×3
/// convolution (`conv` in state dicts), or 2×2 average pooling without `use_conv`.
#[derive(Module, Debug)]
pub struct Downsample2D {
    /// The stride-2 convolution, when `use_conv`.
    pub conv: Option<Conv2d>,
    /// Convolution padding; with 0, diffusers pads one zero row and column at the end first.
    pub padding: usize,
}

impl Downsample2D {
    /// A downsampler; without `use_conv`, `out_channels` must equal `channels`.
    pub fn new(
        channels: usize,
        use_conv: bool,
        out_channels: usize,
        padding: usize,
        device: &Device,
    ) -> Self {
        Self {
            conv: use_conv.then(|| layers::conv2d(channels, out_channels, 3, 2, padding, device)),
            padding,
        }
    }

    /// # Shapes
    /// - `x`: `[B, channels, H, W]`
    /// - output: `[B, out_channels, ceil(H / 2), ceil(W / 2)]` with the convolution (padding
    ///   1), `[B, channels, H / 2, W / 2]` with pooling
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.conv {
            Some(conv) if self.padding == 0 => {
                layers::conv(conv, x.pad((0, 1, 0, 1), PadMode::Constant(0.0)))
            }
            Some(conv) => layers::conv(conv, x),
            None => avg_pool_2x2(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::tensor::{from_vec, to_vec};

    #[test]
    fn avg_pool_averages_blocks() {
        let device = Device::flex();
        let x = from_vec((0..16).map(|v| v as f32).collect(), [1, 1, 4, 4], &device);
        assert_eq!(to_vec(avg_pool_2x2(x)), [2.5, 4.5, 10.5, 12.5]);
    }

    #[test]
    fn fir_downsampling_keeps_constants_inside() {
        let device = Device::flex();
        let x = Tensor::<4>::ones([1, 1, 8, 8], &device);
        let out = downsample_2d(x, &DEFAULT_FIR_KERNEL, 2, 1.0);
        assert_eq!(out.dims(), [1, 1, 4, 4]);
        let v = to_vec(out);
        assert!((v[5] - 1.0).abs() < 1e-6, "{v:?}");
        // The corner's window has one zero-padded row and column: (7/8)² of the constant.
        assert!((v[0] - 49.0 / 64.0).abs() < 1e-6, "{v:?}");
    }
}
