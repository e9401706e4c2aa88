//! `padding_mask_crop`: inpaint only a padded box around the mask, at the model's resolution,
//! and paste the result back into the full image (diffusers' `VaeImageProcessor.get_crop_region`
//! and `apply_overlay`).

use diffusion_core::image::{ImageOutput, OutputType, RgbImage};
use diffusion_core::{Error, Result};
use image::imageops::FilterType;

use super::image_input::PipelineImageInput;

/// PIL's `convert("L")`: ITU-R 601-2 luma in 16-bit fixed point, as PIL rounds it.
fn luma(p: &[u8]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// A crop box `(x1, y1, x2, y2)`, right and bottom exclusive.
pub(crate) type CropBox = (usize, usize, usize, usize);

/// diffusers' `get_crop_region`: the smallest box holding every non-black mask pixel, grown by
/// `pad` on each side (clamped to the image), then widened or heightened to the aspect ratio of
/// `width x height` and shifted back inside the image.
///
/// # Errors
/// [`Error::InvalidArgument`] (`mask_image`) for an all-black mask (nothing to inpaint).
pub(crate) fn get_crop_region(
    mask: &RgbImage,
    width: usize,
    height: usize,
    pad: usize,
) -> Result<CropBox> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let raw = mask.as_raw();
    let set = |x: usize, y: usize| luma(&raw[3 * (y * w + x)..]) != 0;
    let cols: Vec<bool> = (0..w).map(|x| (0..h).any(|y| set(x, y))).collect();
    let rows: Vec<bool> = (0..h).map(|y| (0..w).any(|x| set(x, y))).collect();
    let (Some(left), Some(top)) = (cols.iter().position(|&c| c), rows.iter().position(|&r| r))
    else {
        return Err(Error::invalid_argument(
            "mask_image",
            "the mask is black everywhere: there is nothing to crop around",
        ));
    };
    let right = cols.iter().rposition(|&c| c).map_or(w, |i| i + 1);
    let bottom = rows.iter().rposition(|&r| r).map_or(h, |i| i + 1);
    let (pad, w_i, h_i) = (pad as i64, w as i64, h as i64);
    let mut x1 = (left as i64 - pad).max(0);
    let mut y1 = (top as i64 - pad).max(0);
    let mut x2 = (right as i64 + pad).min(w_i);
    let mut y2 = (bottom as i64 + pad).min(h_i);

    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = width as f64 / height as f64;
    // Grow the short side symmetrically (odd extra pixel at the end), then slide back inside.
    let fit = |lo: &mut i64, hi: &mut i64, desired: f64, limit: i64| {
        let diff = (desired - (*hi - *lo) as f64) as i64;
        *lo -= diff.div_euclid(2);
        *hi += diff - diff.div_euclid(2);
        if *hi >= limit {
            let over = *hi - limit;
            *hi -= over;
            *lo -= over;
        }
        if *lo < 0 {
            *hi -= *lo;
            *lo = 0;
        }
        if *hi >= limit {
            *hi = limit;
        }
    };
    if ratio_crop > ratio_processing {
        fit(&mut y1, &mut y2, (x2 - x1) as f64 / ratio_processing, h_i);
    } else {
        fit(&mut x1, &mut x2, (y2 - y1) as f64 * ratio_processing, w_i);
    }
    Ok((x1 as usize, y1 as usize, x2 as usize, y2 as usize))
}

/// What `padding_mask_crop` needs after decoding: the original image and mask, and the box.
pub(crate) struct MaskCrop {
    image: RgbImage,
    mask: RgbImage,
    region: CropBox,
}

impl MaskCrop {
    /// Check the inputs of `padding_mask_crop = pad` (one image and one mask as images, `Pil`
    /// output), find the box, and return the cropped inputs to inpaint instead.
    pub(crate) fn new(
        pad: usize,
        image: &PipelineImageInput,
        mask: &PipelineImageInput,
        (height, width): (usize, usize),
        output_type: OutputType,
    ) -> Result<(Self, PipelineImageInput, PipelineImageInput)> {
        let (PipelineImageInput::Images(images), PipelineImageInput::Images(masks)) = (image, mask)
        else {
            return Err(Error::invalid_argument(
                "padding_mask_crop",
                "needs the image and the mask as images, not tensors",
            ));
        };
        let ([image], [mask]) = (images.as_slice(), masks.as_slice()) else {
            return Err(Error::invalid_argument(
                "padding_mask_crop",
                "needs exactly one image and one mask",
            ));
        };
        if output_type != OutputType::Pil {
            return Err(Error::invalid_argument(
                "output_type",
                "padding_mask_crop pastes into the original image: use Pil",
            ));
        }
        let region = get_crop_region(mask, width, height, pad)?;
        let cropped = (
            PipelineImageInput::Images(vec![crop(image, region)]),
            PipelineImageInput::Images(vec![crop(mask, region)]),
        );
        let this = Self {
            image: image.clone(),
            mask: mask.clone(),
            region,
        };
        Ok((this, cropped.0, cropped.1))
    }

    /// Paste each generated crop back into the original image.
    pub(crate) fn apply(&self, output: &mut ImageOutput) -> Result<()> {
        if let ImageOutput::Images(images) = output {
            for img in images.iter_mut() {
                *img = apply_overlay(&self.mask, &self.image, img, self.region)?;
            }
        }
        Ok(())
    }
}

/// `image.crop(box)`.
pub(crate) fn crop(image: &RgbImage, (x1, y1, x2, y2): CropBox) -> RgbImage {
    RgbImage::from_fn((x2 - x1) as u32, (y2 - y1) as u32, |x, y| {
        *image.get_pixel(x + x1 as u32, y + y1 as u32)
    })
}

/// diffusers' `apply_overlay`: the generated crop resized back to the box and placed on black,
/// under the original image made transparent where the mask is white. Exact for black-and-white
/// masks; grey mask values blend linearly (PIL's premultiplied rounding may differ by one level).
pub(crate) fn apply_overlay(
    mask: &RgbImage,
    init_image: &RgbImage,
    generated: &RgbImage,
    (x1, y1, x2, y2): CropBox,
) -> Result<RgbImage> {
    let (w, h) = init_image.dimensions();
    if mask.dimensions() != (w, h) {
        return Err(Error::invalid_argument(
            "mask_image",
            "padding_mask_crop needs the mask and the image at the same size",
        ));
    }
    let (cw, ch) = ((x2 - x1) as u32, (y2 - y1) as u32);
    let resized;
    let generated = if generated.dimensions() == (cw, ch) {
        generated
    } else {
        resized = image::imageops::resize(generated, cw, ch, FilterType::Lanczos3);
        &resized
    };
    let mut out = RgbImage::new(w, h);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let inside = (x1 as u32..x2 as u32).contains(&x) && (y1 as u32..y2 as u32).contains(&y);
        let base = if inside {
            generated.get_pixel(x - x1 as u32, y - y1 as u32).0
        } else {
            [0; 3]
        };
        let keep = 255 - luma(&mask.get_pixel(x, y).0) as u32;
        let init = init_image.get_pixel(x, y).0;
        for c in 0..3 {
            let v = init[c] as u32 * keep + base[c] as u32 * (255 - keep);
            px.0[c] = ((v + 127) / 255) as u8;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(w: u32, h: u32, on: impl Fn(u32, u32) -> bool) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb(if on(x, y) { [255; 3] } else { [0; 3] })
        })
    }

    #[test]
    fn crop_region_pads_and_matches_the_aspect_ratio() {
        // Mask box x 12..30, y 10..26 in a 48x48 image; pad 7 gives x 5..37, y 3..33 (32x30),
        // widened in height by 2 to the square processing ratio.
        let m = mask(48, 48, |x, y| {
            (12..30).contains(&x) && (10..26).contains(&y)
        });
        assert_eq!(get_crop_region(&m, 32, 32, 7).unwrap(), (5, 2, 37, 34));
        // A box at the border slides back inside.
        let m = mask(48, 48, |x, y| x < 4 && y < 20);
        let (x1, y1, x2, y2) = get_crop_region(&m, 32, 32, 0).unwrap();
        assert_eq!((x1, y1, x2, y2), (0, 0, 20, 20));
        let black = mask(8, 8, |_, _| false);
        assert!(get_crop_region(&black, 8, 8, 0).is_err());
    }

    #[test]
    fn overlay_keeps_the_unmasked_image() {
        let init = RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let generated = RgbImage::from_fn(4, 4, |_, _| image::Rgb([200; 3]));
        let m = mask(8, 8, |x, y| (3..5).contains(&x) && (3..5).contains(&y));
        let out = apply_overlay(&m, &init, &generated, (2, 2, 6, 6)).unwrap();
        assert_eq!(out.get_pixel(3, 4).0, [200; 3]);
        assert_eq!(out.get_pixel(2, 2).0, [2, 2, 7]);
        assert_eq!(out.get_pixel(7, 0).0, [7, 0, 7]);
    }
}
