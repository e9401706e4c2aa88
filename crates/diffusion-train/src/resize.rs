//! PIL's antialiased bilinear and Lanczos resizes (`Image.resize(size, Image.BILINEAR)`,
//! `Image.LANCZOS`), on float planes.
//!
//! torchvision's `transforms.Resize` on a PIL image, which diffusers' training scripts use, calls
//! this (train_text_to_image.py's default `--image_interpolation_mode` is `lanczos`). PIL resamples in two separable passes (horizontal, then vertical), each a weighted sum
//! with a triangle filter whose support grows with the downscaling factor (the antialiasing), with
//! weights normalised over the taps that fall inside the image. On `"F"` images the sums are taken
//! in `f64` and each pass is stored as `f32`; this is the same arithmetic.

/// PIL's bilinear (triangle) filter.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// PIL's `sinc`.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// PIL's Lanczos filter: a sinc truncated by a 3-lobed sinc window.
fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// The resampling filter of a resize (torchvision's `InterpolationMode` for PIL images).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Triangle filter, support 1 (`BILINEAR`).
    Bilinear,
    /// Lanczos-3 (`LANCZOS`), train_text_to_image.py's default.
    #[default]
    Lanczos,
}

impl Interpolation {
    /// The name diffusers' `--image_interpolation_mode` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bilinear => "bilinear",
            Self::Lanczos => "lanczos",
        }
    }

    /// Parse `bilinear` or `lanczos` (case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "bilinear" => Some(Self::Bilinear),
            "lanczos" => Some(Self::Lanczos),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Bilinear => triangle(x),
            Self::Lanczos => lanczos(x),
        }
    }
}

/// For every output position, the first input tap and the normalised weights.
fn coefficients(in_size: usize, out_size: usize, filter: Interpolation) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale * filter.support();
    let inverse = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates towards zero; negative starts are clamped to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * inverse))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                for w in &mut weights {
                    *w /= total;
                }
            }
            (xmin, weights)
        })
        .collect()
}

/// Resize a row-major `height x width` plane to `new_height x new_width`.
///
/// # Panics
/// When `plane.len() != width * height` or a size is 0 (callers check user input first).
pub fn resize_bilinear(
    plane: &[f32],
    width: usize,
    height: usize,
    new_width: usize,
    new_height: usize,
) -> Vec<f32> {
    resize(
        plane,
        [width, height],
        [new_width, new_height],
        Interpolation::Bilinear,
    )
}

/// Resize a row-major `height x width` plane to `new_height x new_width` with `filter`
/// (sizes as `[width, height]`).
///
/// # Panics
/// When `plane.len() != width * height` or a size is 0 (callers check user input first).
pub fn resize(
    plane: &[f32],
    [width, height]: [usize; 2],
    [new_width, new_height]: [usize; 2],
    filter: Interpolation,
) -> Vec<f32> {
    assert_eq!(plane.len(), width * height, "plane size");
    assert!(
        width > 0 && height > 0 && new_width > 0 && new_height > 0,
        "empty image"
    );
    let horizontal = if new_width != width {
        let coeffs = coefficients(width, new_width, filter);
        let mut out = Vec::with_capacity(new_width * height);
        for row in plane.chunks_exact(width) {
            for (start, weights) in &coeffs {
                let sum: f64 = weights
                    .iter()
                    .zip(&row[*start..])
                    .map(|(w, &v)| w * f64::from(v))
                    .sum();
                out.push(sum as f32);
            }
        }
        out
    } else {
        plane.to_vec()
    };
    if new_height == height {
        return horizontal;
    }
    let coeffs = coefficients(height, new_height, filter);
    let mut out = Vec::with_capacity(new_width * new_height);
    for (start, weights) in &coeffs {
        for x in 0..new_width {
            let sum: f64 = weights
                .iter()
                .enumerate()
                .map(|(k, w)| w * f64::from(horizontal[(start + k) * new_width + x]))
                .sum();
            out.push(sum as f32);
        }
    }
    out
}

/// torchvision's `Resize(size)` output size for a `width x height` image: the shorter side
/// becomes `size`, the longer one keeps the aspect ratio, truncated.
pub fn resized_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    if width <= height {
        (size, (size as f64 * height as f64 / width as f64) as usize)
    } else {
        ((size as f64 * width as f64 / height as f64) as usize, size)
    }
}

/// torchvision's `CenterCrop(size)` offsets `(left, top)` for a `width x height` image at
/// least `size` on each side: `round((dim - size) / 2)` with Python's round-half-to-even.
pub fn center_crop_offsets(width: usize, height: usize, size: usize) -> (usize, usize) {
    let offset = |dim: usize| ((dim - size) as f64 / 2.0).round_ties_even() as usize;
    (offset(width), offset(height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant_planes() {
        let plane: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(resize_bilinear(&plane, 4, 3, 4, 3), plane);
        let ones = vec![1.0f32; 35];
        for (w, h) in [(2, 3), (11, 13), (7, 1)] {
            let out = resize_bilinear(&ones, 7, 5, w, h);
            assert_eq!(out.len(), w * h);
            assert!(out.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{out:?}");
        }
    }

    #[test]
    fn torchvision_sizes_and_crops() {
        assert_eq!(resized_size(640, 480, 64), (85, 64));
        assert_eq!(resized_size(480, 640, 64), (64, 85));
        assert_eq!(resized_size(8, 8, 32), (32, 32));
        // (85 - 64) / 2 = 10.5 rounds to 10 (half to even); 11.5 to 12.
        assert_eq!(center_crop_offsets(85, 64, 64), (10, 0));
        assert_eq!(center_crop_offsets(64, 87, 64), (0, 12));
    }
}
