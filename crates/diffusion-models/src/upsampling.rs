//! Upsampling layers and the FIR resampling primitive (`diffusers.models.upsampling`).

use diffusion_core::Device;
use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::tensor::module::conv2d;
use diffusion_core::burn::tensor::ops::{ConvOptions, PadMode};
use diffusion_core::burn::tensor::{Int, Tensor, TensorData};

use crate::layers;

/// The FIR kernel of score-SDE models' resampling (`(1, 3, 3, 1)`).
pub const DEFAULT_FIR_KERNEL: [f32; 4] = [1.0, 3.0, 3.0, 1.0];

/// Nearest-neighbour upsampling by an integer factor (what `F.interpolate(scale_factor=f,
/// mode="nearest")` does for integer factors): every pixel becomes an `f × f` block.
///
/// # Shapes
/// - `x`: `[B, C, H, W]`
/// - output: `[B, C, H * factor, W * factor]`
///
/// On CubeCL devices, where feature maps are channels-last, this is one interpolation kernel
/// ([`diffusion_core::kernels::upsample_nearest`]).
pub fn upsample_nearest(x: Tensor<4>, factor: usize) -> Tensor<4> {
    diffusion_core::kernels::upsample_nearest(x, factor)
}

/// Nearest-neighbour resizing to `size` as PyTorch's legacy `"nearest"` mode computes it:
/// output index `i` reads input index `min(floor(i * (in / out)), in - 1)`, with the ratio in
/// `f32`.
///
/// # Shapes
/// - `x`: `[B, C, H, W]`
/// - output: `[B, C, size[0], size[1]]`
pub fn upsample_nearest_to(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let device = x.device();
    let indices = |input: usize, output: usize| {
        let scale = input as f32 / output as f32;
        let idx: Vec<i64> = (0..output)
            .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as i64)
            .collect();
        Tensor::<1, Int>::from_data(TensorData::new(idx, [output]), &device)
    };
    x.select(2, indices(h, size[0]))
        .select(3, indices(w, size[1]))
}

/// Upsample, pad, filter and downsample each channel with a 2-D FIR kernel (diffusers'
/// `upfirdn2d_native` with non-negative padding). `kernel` is row-major `[kh, kw]`; like the
/// reference it is flipped before the (cross-correlating) convolution.
///
/// # Shapes
/// - `x`: `[B, C, H, W]`
/// - output: `[B, C, (H * up + pad.0 + pad.1 - kh) / down + 1, (W * up + ... - kw) / down + 1]`
pub fn upfirdn2d(
    x: Tensor<4>,
    kernel: &[f32],
    kernel_size: [usize; 2],
    up: usize,
    down: usize,
    pad: (usize, usize),
) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let [kh, kw] = kernel_size;
    let device = x.device();
    let mut out = x.reshape([b * c, 1, h, 1, w, 1]);
    if up > 1 {
        out = out.pad([(0, up - 1), (0, 0), (0, up - 1)], PadMode::Constant(0.0));
    }
    let mut out = out.reshape([b * c, 1, h * up, w * up]);
    out = out.pad([(pad.0, pad.1), (pad.0, pad.1)], PadMode::Constant(0.0));
    let flipped: Vec<f32> = kernel.iter().rev().copied().collect();
    let weight = Tensor::<4>::from_data(TensorData::new(flipped, [1, 1, kh, kw]), &device);
    let out = conv2d(
        out,
        weight,
        None,
        ConvOptions::new([down, down], [0, 0], [1, 1], 1),
    );
    let [_, _, oh, ow] = out.dims();
    out.reshape([b, c, oh, ow])
}

/// The normalised 2-D kernel `outer(k, k) / sum * gain`, row-major.
pub(crate) fn separable_kernel(kernel: &[f32], gain: f32) -> Vec<f32> {
    let total: f32 = kernel.iter().sum::<f32>() * kernel.iter().sum::<f32>();
    kernel
        .iter()
        .flat_map(|a| kernel.iter().map(move |b| a * b / total * gain))
        .collect()
}

/// FIR upsampling (`upsample_2d`): zero-stuff by `factor` and filter with the separable
/// `kernel` scaled so a constant image keeps its value times `gain`.
///
/// # Shapes
/// - `x`: `[B, C, H, W]`
/// - output: `[B, C, H * factor, W * factor]`
pub fn upsample_2d(x: Tensor<4>, kernel: &[f32], factor: usize, gain: f32) -> Tensor<4> {
    let k = kernel.len();
    let weights = separable_kernel(kernel, gain * (factor * factor) as f32);
    let p = k - factor;
    upfirdn2d(
        x,
        &weights,
        [k, k],
        factor,
        1,
        (p.div_ceil(2) + factor - 1, p / 2),
    )
}

/// `FirUpsample2D` without its optional convolution (as the skip blocks use it): FIR
/// upsampling by 2 with the default kernel.
#[derive(Module, Debug)]
pub struct FirUpsample2D {
    /// Channels in and out.
    pub channels: usize,
}

impl FirUpsample2D {
    /// # Shapes
    /// - `x`: `[B, C, H, W]`
    /// - output: `[B, C, 2H, 2W]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        upsample_2d(x, &DEFAULT_FIR_KERNEL, 2, 1.0)
    }
}

/// `Upsample2D(channels, use_conv)`: nearest ×2, then a 3×3 convolution when `use_conv`.
#[derive(Module, Debug)]
pub struct Upsample2D {
    /// The 3×3 convolution (`conv` in state dicts), when `use_conv`.
    pub conv: Option<Conv2d>,
}

impl Upsample2D {
    /// `Upsample2D(channels, use_conv, out_channels)` with kernel 3 and padding 1.
    pub fn new(channels: usize, use_conv: bool, out_channels: usize, device: &Device) -> Self {
        Self {
            conv: use_conv.then(|| layers::conv2d(channels, out_channels, 3, 1, 1, device)),
        }
    }

    /// # Shapes
    /// - `x`: `[B, channels, H, W]`
    /// - output: `[B, out_channels, 2H, 2W]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_to(x, None)
    }

    /// As [`Self::forward`], resizing to `size` (`F.interpolate(size=size, mode="nearest")`)
    /// instead of doubling when it is given.
    ///
    /// # Shapes
    /// - `x`: `[B, channels, H, W]`
    /// - output: `[B, out_channels, size[0], size[1]]`, or `[B, out_channels, 2H, 2W]`
    pub fn forward_to(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let x = match size {
            Some(size) => upsample_nearest_to(x, size),
            None => upsample_nearest(x, 2),
        };
        match &self.conv {
            Some(conv) => layers::conv(conv, x),
            None => x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::tensor::{from_vec, to_vec};

    #[test]
    fn nearest_to_size_matches_torch_indices() {
        let device = Device::flex();
        let x = from_vec((0..8).map(|v| v as f32).collect(), [1, 1, 1, 8], &device);
        // torch: F.interpolate(x, size=(2, 15), mode="nearest")
        let out = to_vec(upsample_nearest_to(x.clone(), [2, 15]));
        let row = [0., 0., 1., 1., 2., 2., 3., 3., 4., 4., 5., 5., 6., 6., 7.];
        assert_eq!(out, [row, row].concat());
        // Doubling is the special case size = 2 * input.
        assert_eq!(
            to_vec(upsample_nearest_to(x.clone(), [2, 16])),
            to_vec(upsample_nearest(x, 2))
        );
    }

    #[test]
    fn nearest_repeats_blocks() {
        let device = Device::flex();
        let x = from_vec(vec![1.0, 2.0, 3.0, 4.0], [1, 1, 2, 2], &device);
        let out = to_vec(upsample_nearest(x, 2));
        #[rustfmt::skip]
        let want = [1.0, 1.0, 2.0, 2.0,
                    1.0, 1.0, 2.0, 2.0,
                    3.0, 3.0, 4.0, 4.0,
                    3.0, 3.0, 4.0, 4.0];
        assert_eq!(out, want);
    }

    /// A direct, loop-based upfirdn on one channel: zero-stuff, pad, correlate with the flipped
    /// kernel, keep every `down`-th sample.
    fn upfirdn_loops(
        x: &[f32],
        (h, w): (usize, usize),
        k: &[f32],
        kn: usize,
        up: usize,
        down: usize,
        pad: (usize, usize),
    ) -> Vec<f32> {
        let (uh, uw) = (h * up + pad.0 + pad.1, w * up + pad.0 + pad.1);
        let mut big = vec![0.0f32; uh * uw];
        for i in 0..h {
            for j in 0..w {
                big[(i * up + pad.0) * uw + j * up + pad.0] = x[i * w + j];
            }
        }
        let (oh, ow) = ((uh - kn) / down + 1, (uw - kn) / down + 1);
        let mut out = vec![0.0f32; oh * ow];
        for i in 0..oh {
            for j in 0..ow {
                let mut acc = 0.0;
                for a in 0..kn {
                    for b in 0..kn {
                        let flipped = k[(kn - 1 - a) * kn + (kn - 1 - b)];
                        acc += flipped * big[(i * down + a) * uw + j * down + b];
                    }
                }
                out[i * ow + j] = acc;
            }
        }
        out
    }

    #[test]
    fn upfirdn_matches_direct_loops_with_an_asymmetric_kernel() {
        let device = Device::flex();
        let x: Vec<f32> = (0..20).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let k: Vec<f32> = (0..9).map(|i| i as f32 * 0.1 + 0.05).collect();
        for (up, down, pad) in [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (0, 0))] {
            let got = to_vec(upfirdn2d(
                from_vec(x.clone(), [1, 1, 4, 5], &device),
                &k,
                [3, 3],
                up,
                down,
                pad,
            ));
            let want = upfirdn_loops(&x, (4, 5), &k, 3, up, down, pad);
            assert_eq!(got.len(), want.len(), "up {up} down {down}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-5,
                    "up {up} down {down}: {got:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn fir_upsampling_keeps_constants() {
        let device = Device::flex();
        let x = Tensor::<4>::ones([1, 2, 4, 4], &device).mul_scalar(3.0);
        let out = upsample_2d(x, &DEFAULT_FIR_KERNEL, 2, 1.0);
        assert_eq!(out.dims(), [1, 2, 8, 8]);
        // Interior pixels see the full kernel; borders see zero padding.
        let v = to_vec(out);
        assert!((v[3 * 8 + 3] - 3.0).abs() < 1e-6, "{v:?}");
    }
}
