//! Image and mask inputs of the image-to-image and inpainting pipelines.

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::image::{RgbImage, VaeImageProcessor};
use diffusion_core::{Device, Error, Result};

/// An image argument (`image=`, `mask_image=`), as diffusers' `PipelineImageInput`.
// One value per call: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum PipelineImageInput {
    /// 8-bit images (PIL images in diffusers), resized to the target size when they differ.
    Images(Vec<RgbImage>),
    /// A `[B, C, H, W]` float tensor in `[0, 1]` at the target size (a tensor with negative
    /// values is taken as already in `[-1, 1]`, as diffusers does). For `image=`, a tensor with
    /// the VAE's latent channels is taken as latents and not encoded again; for `mask_image=`,
    /// a `[B, 1, H, W]` tensor, binarised at 0.5.
    Tensor(Tensor<4>),
}

impl From<RgbImage> for PipelineImageInput {
    fn from(image: RgbImage) -> Self {
        Self::Images(vec![image])
    }
}

impl From<Vec<RgbImage>> for PipelineImageInput {
    fn from(images: Vec<RgbImage>) -> Self {
        Self::Images(images)
    }
}

impl From<Tensor<4>> for PipelineImageInput {
    fn from(t: Tensor<4>) -> Self {
        Self::Tensor(t)
    }
}

/// diffusers' `mask_processor`: grayscale, binarised at 0.5, not normalised.
pub(crate) fn mask_processor(vae_scale_factor: usize) -> VaeImageProcessor {
    VaeImageProcessor {
        do_normalize: false,
        do_binarize: true,
        do_convert_grayscale: true,
        ..VaeImageProcessor::new(vae_scale_factor)
    }
}

/// `processor.preprocess(image, height, width)`; `latent_channels` lets latents through as
/// they are. `name` is the argument named in errors.
pub(crate) fn preprocess(
    processor: &VaeImageProcessor,
    input: &PipelineImageInput,
    size: Option<(usize, usize)>,
    latent_channels: Option<usize>,
    name: &str,
    device: &Device,
) -> Result<Tensor<4>> {
    match input {
        PipelineImageInput::Images(images) => {
            if images.is_empty() {
                return Err(Error::invalid_argument(name, "no image given"));
            }
            processor
                .preprocess(images, size.map(|s| s.0), size.map(|s| s.1), device)
                .map_err(|e| rename(e, name))
        }
        PipelineImageInput::Tensor(t) => {
            let [b, c, h, w] = t.dims();
            if b == 0 {
                return Err(Error::invalid_argument(name, "empty batch"));
            }
            if Some(c) == latent_channels {
                return Ok(t.clone());
            }
            let want_c = if processor.do_convert_grayscale { 1 } else { 3 };
            if c != want_c {
                return Err(Error::invalid_argument(
                    name,
                    format!("a tensor with {c} channels; expected {want_c}"),
                ));
            }
            if let Some((sh, sw)) = size
                && (sh, sw) != (h, w)
            {
                return Err(Error::invalid_argument(
                    name,
                    format!(
                        "a {h}x{w} tensor for a {sh}x{sw} image: resize tensors before passing them"
                    ),
                ));
            }
            let mut x = t.clone();
            let min = x.clone().min().into_scalar::<f32>();
            if processor.do_binarize {
                x = x.greater_equal_elem(0.5).float();
            }
            if processor.do_normalize && min >= 0.0 {
                x = x.mul_scalar(2.0).sub_scalar(1.0);
            }
            Ok(x)
        }
    }
}

fn rename(e: Error, name: &str) -> Error {
    match e {
        Error::InvalidArgument { message, .. } => Error::invalid_argument(name, message),
        other => other,
    }
}

/// `torch.nn.functional.interpolate(x, size=(h, w))` with its default `nearest` mode.
///
/// # Shapes
/// - `x`: `[B, C, H, W]`; output: `[B, C, h, w]`
pub(crate) fn interpolate_nearest(x: Tensor<4>, h: usize, w: usize) -> Tensor<4> {
    let [b, c, ih, iw] = x.dims();
    if (ih, iw) == (h, w) {
        return x;
    }
    let device = x.device();
    let data: Vec<f32> = x
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    // torch computes the source index as floor(dst * (in / out)) in float32.
    let index = |dst: usize, input: usize, output: usize| {
        let scale = input as f32 / output as f32;
        ((dst as f32 * scale).floor() as usize).min(input - 1)
    };
    let rows: Vec<usize> = (0..h).map(|y| index(y, ih, h)).collect();
    let cols: Vec<usize> = (0..w).map(|x| index(x, iw, w)).collect();
    let mut out = Vec::with_capacity(b * c * h * w);
    for plane in 0..b * c {
        let base = plane * ih * iw;
        for &r in &rows {
            for &col in &cols {
                out.push(data[base + r * iw + col]);
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [b, c, h, w]), &device)
}

/// `image * (mask < 0.5)`: the image with the region to repaint blacked out (grey, in `[-1, 1]`
/// terms: zero).
///
/// # Shapes
/// - `image`: `[B, C, H, W]`; `mask`: `[B or 1, 1, H, W]` (or `B` images and one mask, or
///   the reverse); output: `[max(B, Bm), C, H, W]`
///
/// # Errors
/// [`Error::InvalidArgument`] (`masked_image_latents`) when the image is not at the mask's
/// size (latents given as the image need precomputed masked latents), (`mask_image`) when the
/// batches cannot be broadcast.
pub(crate) fn mask_out(image: &Tensor<4>, mask: &Tensor<4>) -> Result<Tensor<4>> {
    let keep = mask.clone().lower_elem(0.5).float();
    let [bi, ci, hi, wi] = image.dims();
    let [bm, _, hm, wm] = keep.dims();
    if (hm, wm) != (hi, wi) {
        return Err(Error::invalid_argument(
            "masked_image_latents",
            format!(
                "the image is {hi}x{wi} (latents?) and the mask {hm}x{wm}: give \
                 masked_image_latents with latent images"
            ),
        ));
    }
    if bi != bm && bi != 1 && bm != 1 {
        return Err(Error::invalid_argument(
            "mask_image",
            format!("{bm} masks for {bi} images"),
        ));
    }
    let b = bi.max(bm);
    Ok(image
        .clone()
        .expand([b, ci, hi, wi])
        .mul(keep.expand([b, ci, hi, wi])))
}
