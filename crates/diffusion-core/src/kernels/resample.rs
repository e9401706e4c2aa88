//! Nearest-neighbour upsampling by an integer factor.

use burn::tensor::Tensor;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

/// Nearest-neighbour upsampling by an integer `factor` (what `F.interpolate(scale_factor=f,
/// mode="nearest")` does for integer factors): every pixel becomes a `factor × factor` block.
///
/// Where feature maps are channels-last ([`super::activations_channels_last`]) this is burn's
/// nearest interpolation, one kernel that reads and writes channels-last memory (its source
/// index is the exact rational `floor(i * in / out)`, which is `i / factor`). Elsewhere it is
/// [`upsample_nearest_reference`]. Both give the same values, bit for bit.
///
/// # Shapes
/// - `x`: `[B, C, H, W]`
/// - output: `[B, C, H * factor, W * factor]`
///
/// # Panics
/// When `factor` is 0.
pub fn upsample_nearest(x: Tensor<4>, factor: usize) -> Tensor<4> {
    assert!(factor > 0, "upsample_nearest: the factor must be positive");
    if factor > 1 && super::activations_channels_last(&x.device()) && x.shape().num_elements() > 0 {
        let [_, _, h, w] = x.dims();
        let options = InterpolateOptions::new(InterpolateMode::Nearest)
            .with_output_size([h * factor, w * factor]);
        return interpolate(x, options);
    }
    upsample_nearest_reference(x, factor)
}

/// [`upsample_nearest`] in reshapes and repeats: `[B, C, H, 1, W, 1]` repeated along the unit
/// dimensions. In channels-last memory each of its three steps is a copy.
pub fn upsample_nearest_reference(x: Tensor<4>, factor: usize) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .repeat_dim(3, factor)
        .repeat_dim(5, factor)
        .reshape([b, c, h * factor, w * factor])
}
