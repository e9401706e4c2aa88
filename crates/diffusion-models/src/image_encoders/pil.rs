//! Pillow's `Image.resize` for 8-bit RGB images, bit for bit.
//!
//! transformers' image processors resize through Pillow, so matching their pixel values means
//! matching Pillow's resampling, not just its filter: Pillow builds one set of coefficients per
//! output column and row (the filter's support widened by the scale when shrinking, each set
//! normalised to sum 1), rounds them to 22-bit fixed point, and runs a horizontal pass then a
//! vertical pass, each rounding to `u8`. The `image` crate's `CatmullRom` uses the same cubic
//! (a = -0.5) but samples in `f32` with its own support and rounding: on this port's fixtures
//! 17–24 % of its levels differ from Pillow's, by up to 11 on noise images. After CLIP's
//! normalisation one level is 1/(255 · std) ≈ 0.015, far above a 1e-4 parity budget.

use diffusion_core::image::RgbImage;
use diffusion_core::{Error, Result};

/// Pillow's resampling filters (`PIL.Image.Resampling`), with their config values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PILResampling {
    /// `LANCZOS` (1): windowed sinc with support 3.
    Lanczos,
    /// `BILINEAR` (2): the triangle filter.
    Bilinear,
    /// `BICUBIC` (3): the cubic convolution with a = -0.5 (CLIP's choice).
    Bicubic,
    /// `BOX` (4).
    Box,
    /// `HAMMING` (5).
    Hamming,
}

impl PILResampling {
    /// The filter of a `resample` config value.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`resample`) for `NEAREST` (0, which Pillow runs through
    /// another code path, not ported) and unknown values.
    pub fn from_pil(value: i64) -> Result<Self> {
        match value {
            1 => Ok(Self::Lanczos),
            2 => Ok(Self::Bilinear),
            3 => Ok(Self::Bicubic),
            4 => Ok(Self::Box),
            5 => Ok(Self::Hamming),
            other => Err(Error::invalid_argument(
                "resample",
                format!(
                    "{other} is not a supported Pillow filter (1 LANCZOS, 2 BILINEAR, 3 BICUBIC, \
                     4 BOX, 5 HAMMING)"
                ),
            )),
        }
    }

    /// The config value (`PIL.Image.Resampling`).
    pub fn to_pil(self) -> i64 {
        match self {
            Self::Lanczos => 1,
            Self::Bilinear => 2,
            Self::Bicubic => 3,
            Self::Box => 4,
            Self::Hamming => 5,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point precision of Pillow's 8-bit coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output sample's source window and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i64>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for resizing `in_size` samples to
/// `out_size`.
fn coefficients(in_size: usize, out_size: usize, filter: PILResampling) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; clamping makes the sign irrelevant.
            let min = ((center - support + 0.5) as i64).max(0) as usize;
            let max = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (min..max.max(min))
                .map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .into_iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let fixed = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (fixed - 0.5) as i64
                    } else {
                        (fixed + 0.5) as i64
                    }
                })
                .collect();
            Taps {
                start: min,
                weights,
            }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resample one axis of an interleaved RGB buffer. `stride` is the distance between samples
/// along the axis and `lines` enumerates the start of every line across it.
fn pass(
    src: &[u8],
    dst: &mut [u8],
    taps: &[Taps],
    src_line: impl Fn(usize) -> (usize, usize),
    dst_index: impl Fn(usize, usize) -> usize,
    lines: usize,
) {
    let half = 1i64 << (PRECISION_BITS - 1);
    for line in 0..lines {
        let (base, stride) = src_line(line);
        for (i, t) in taps.iter().enumerate() {
            let out = dst_index(line, i);
            for c in 0..3 {
                let mut acc = half;
                for (j, w) in t.weights.iter().enumerate() {
                    acc += i64::from(src[base + (t.start + j) * stride + c]) * w;
                }
                dst[out + c] = clip8(acc);
            }
        }
    }
}

/// `image.resize((width, height), resample=filter)` for an RGB image.
///
/// # Errors
/// [`Error::InvalidArgument`] (`size`) for an empty source or target.
pub fn resize(
    image: &RgbImage,
    width: usize,
    height: usize,
    filter: PILResampling,
) -> Result<RgbImage> {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    if in_w == 0 || in_h == 0 || width == 0 || height == 0 {
        return Err(Error::invalid_argument(
            "size",
            format!("cannot resize {in_w}x{in_h} to {width}x{height}"),
        ));
    }
    let mut data = image.as_raw().clone();
    let mut cur_w = in_w;
    if width != in_w {
        let taps = coefficients(in_w, width, filter);
        let mut out = vec![0u8; width * in_h * 3];
        pass(
            &data,
            &mut out,
            &taps,
            |y| (y * in_w * 3, 3),
            |y, x| (y * width + x) * 3,
            in_h,
        );
        data = out;
        cur_w = width;
    }
    if height != in_h {
        let taps = coefficients(in_h, height, filter);
        let mut out = vec![0u8; cur_w * height * 3];
        pass(
            &data,
            &mut out,
            &taps,
            |x| (x * 3, cur_w * 3),
            |x, y| (y * cur_w + x) * 3,
            cur_w,
        );
        data = out;
    }
    RgbImage::from_raw(width as u32, height as u32, data).ok_or_else(|| {
        Error::invalid_argument("size", format!("{width}x{height} does not fit in memory"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy() {
        let raw = (0..5 * 3 * 3).map(|i| (i * 17 % 256) as u8).collect();
        let img = RgbImage::from_raw(5, 3, raw).unwrap();
        let out = resize(&img, 5, 3, PILResampling::Bicubic).unwrap();
        assert_eq!(out, img);
    }

    #[test]
    fn constant_images_stay_constant() {
        let raw = [200u8, 3, 128].repeat(7 * 9);
        let img = RgbImage::from_raw(7, 9, raw).unwrap();
        for filter in [
            PILResampling::Bicubic,
            PILResampling::Bilinear,
            PILResampling::Lanczos,
            PILResampling::Box,
            PILResampling::Hamming,
        ] {
            for (w, h) in [(3, 4), (13, 17), (7, 2)] {
                let out = resize(&img, w, h, filter).unwrap();
                assert!(
                    out.as_raw().chunks(3).all(|p| p == [200, 3, 128]),
                    "{filter:?} {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn filters_parse_from_config_values() {
        assert_eq!(PILResampling::from_pil(3).unwrap(), PILResampling::Bicubic);
        assert!(PILResampling::from_pil(0).is_err());
        assert_eq!(PILResampling::Lanczos.to_pil(), 1);
    }
}
