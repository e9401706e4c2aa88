//! transformers' `CLIPImageProcessor` (`models/clip/image_processing_clip.py`), the
//! `feature_extractor` diffusers' pipelines feed IP-Adapter's image encoder with.
//!
//! For each image: resize so the shortest edge is `size.shortest_edge` (Pillow's bicubic, see
//! [`super::pil`]), center-crop to `crop_size` (padding with zeros when the image is smaller),
//! rescale by `rescale_factor` (1/255), and normalise with CLIP's mean and std, in the dtypes
//! transformers' PIL backend uses (`u8` until the rescale, which is done in `f64` and stored as
//! `f32`; the normalisation in `f32`). transformers 5 switches to a torchvision backend when
//! torchvision is installed, whose antialiased bicubic differs from Pillow's; this port follows
//! the PIL backend, which transformers 4 always used.

use std::path::Path;

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::config::read_json;
use diffusion_core::image::RgbImage;
use diffusion_core::{Device, Error, Result};
use serde_json::{Map, Value};

use super::pil::{self, PILResampling};

/// The image processor config file name.
pub const PREPROCESSOR_CONFIG_NAME: &str = "preprocessor_config.json";

/// OpenAI CLIP's per-channel mean (`OPENAI_CLIP_MEAN`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel std (`OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The `size` of an image processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageSize {
    /// `{"shortest_edge": n}` (or a bare integer): keep the aspect ratio.
    ShortestEdge(usize),
    /// `{"height": h, "width": w}`.
    Exact {
        /// Target height.
        height: usize,
        /// Target width.
        width: usize,
    },
}

/// transformers' `CLIPImageProcessor`; `Default` is its class defaults (224 pixels, bicubic,
/// OpenAI CLIP mean and std).
#[derive(Clone, Debug, PartialEq)]
pub struct CLIPImageProcessor {
    /// Resize first.
    pub do_resize: bool,
    /// The resize target.
    pub size: ImageSize,
    /// The resampling filter (`resample`, Pillow's numbering).
    pub resample: PILResampling,
    /// Center-crop after resizing.
    pub do_center_crop: bool,
    /// Crop `(height, width)`.
    pub crop_size: (usize, usize),
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// 1/255.
    pub rescale_factor: f64,
    /// Subtract `image_mean` and divide by `image_std`.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f64; 3],
    /// Per-channel std.
    pub image_std: [f64; 3],
    /// Convert to RGB first (the images given here are RGB already).
    pub do_convert_rgb: bool,
}

impl Default for CLIPImageProcessor {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ImageSize::ShortestEdge(224),
            resample: PILResampling::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
        }
    }
}

/// Keys of `preprocessor_config.json` that describe the class rather than the maths.
const DESCRIPTIVE_KEYS: [&str; 3] = [
    "image_processor_type",
    "feature_extractor_type",
    "processor_class",
];

impl CLIPImageProcessor {
    /// Read `dir/preprocessor_config.json`.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the folder when the file is absent; else as
    /// [`Self::from_json_file`].
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(PREPROCESSOR_CONFIG_NAME);
        if !path.is_file() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                message: format!("no `{PREPROCESSOR_CONFIG_NAME}` in the folder"),
            });
        }
        Self::from_json_file(path)
    }

    /// Read a `preprocessor_config.json`. Missing keys take the class defaults; `size` and
    /// `crop_size` may be integers (legacy feature-extractor configs) or dicts; unknown keys
    /// are reported with a warning.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for an unreadable file; [`Error::ConfigField`] naming the
    /// file and key for a value of the wrong type or out of range (a zero size, a mean of
    /// another length than 3, a non-positive std, an unsupported `resample`).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        let field_error = |field: &str, message: String| Error::ConfigField {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let Value::Object(map) = value else {
            return Err(field_error(
                "<root>",
                "a config must be a JSON object".into(),
            ));
        };
        let mut out = Self::default();
        let mut unknown = Vec::new();
        for (key, v) in &map {
            let bool_value = || {
                v.as_bool()
                    .ok_or_else(|| field_error(key, format!("expected a boolean, got {v}")))
            };
            match key.as_str() {
                "do_resize" => out.do_resize = bool_value()?,
                "do_center_crop" => out.do_center_crop = bool_value()?,
                "do_rescale" => out.do_rescale = bool_value()?,
                "do_normalize" => out.do_normalize = bool_value()?,
                "do_convert_rgb" => out.do_convert_rgb = bool_value()?,
                "size" => out.size = parse_size(v, false).map_err(|m| field_error(key, m))?,
                "crop_size" => {
                    out.crop_size = match parse_size(v, true).map_err(|m| field_error(key, m))? {
                        ImageSize::Exact { height, width } => (height, width),
                        ImageSize::ShortestEdge(_) => {
                            return Err(field_error(key, "needs a height and a width".into()));
                        }
                    }
                }
                "resample" => {
                    let n = v
                        .as_i64()
                        .ok_or_else(|| field_error(key, format!("expected an integer, got {v}")))?;
                    out.resample = PILResampling::from_pil(n).map_err(|e| match e {
                        Error::InvalidArgument { message, .. } => field_error(key, message),
                        other => other,
                    })?;
                }
                "rescale_factor" => {
                    out.rescale_factor = v
                        .as_f64()
                        .ok_or_else(|| field_error(key, format!("expected a number, got {v}")))?;
                }
                "image_mean" => {
                    out.image_mean = parse_triple(v).map_err(|m| field_error(key, m))?
                }
                "image_std" => {
                    out.image_std = parse_triple(v).map_err(|m| field_error(key, m))?;
                    if out.image_std.iter().any(|s| *s <= 0.0) {
                        return Err(field_error(key, "every std must be positive".into()));
                    }
                }
                k if DESCRIPTIVE_KEYS.contains(&k) || k.starts_with('_') => {}
                _ => unknown.push(key.as_str()),
            }
        }
        if !unknown.is_empty() {
            log::warn!(
                "{}: keys not used by CLIPImageProcessor: {}",
                path.display(),
                unknown.join(", ")
            );
        }
        Ok(out)
    }

    /// The config as transformers writes it (`preprocessor_config.json`).
    pub fn to_json(&self) -> Value {
        let size = match self.size {
            ImageSize::ShortestEdge(n) => serde_json::json!({ "shortest_edge": n }),
            ImageSize::Exact { height, width } => {
                serde_json::json!({ "height": height, "width": width })
            }
        };
        serde_json::json!({
            "crop_size": { "height": self.crop_size.0, "width": self.crop_size.1 },
            "do_center_crop": self.do_center_crop,
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": self.image_mean,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": self.image_std,
            "resample": self.resample.to_pil(),
            "rescale_factor": self.rescale_factor,
            "size": size,
        })
    }

    /// The `(height, width)` an image of `(height, width)` is resized to
    /// (`get_resize_output_image_size` with `default_to_square=False`).
    pub fn resize_output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.size {
            ImageSize::Exact { height, width } => (height, width),
            ImageSize::ShortestEdge(size) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python's `int(size * long / short)`: an exact product, a float division,
                // truncation.
                let new_long = ((size * long) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, size)
                } else {
                    (size, new_long)
                }
            }
        }
    }

    /// Preprocess one image to `[3, H, W]` values, row-major (what [`Self::preprocess`] stacks).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`image`) for an empty image or a size that resizes to zero.
    pub fn preprocess_image(&self, image: &RgbImage) -> Result<(Vec<f32>, [usize; 3])> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        if w == 0 || h == 0 {
            return Err(Error::invalid_argument("image", "the image is empty"));
        }
        let resized;
        let image = if self.do_resize {
            let (new_h, new_w) = self.resize_output_size(h, w);
            if new_h == 0 || new_w == 0 {
                return Err(Error::invalid_argument(
                    "image",
                    format!("{w}x{h} resizes to {new_w}x{new_h}"),
                ));
            }
            resized = if (new_w, new_h) == (w, h) {
                image.clone()
            } else {
                pil::resize(image, new_w, new_h, self.resample)?
            };
            &resized
        } else {
            image
        };
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (out_h, out_w) = if self.do_center_crop {
            self.crop_size
        } else {
            (h, w)
        };
        if out_h == 0 || out_w == 0 {
            return Err(Error::invalid_argument("crop_size", "must be positive"));
        }
        // transformers' `center_crop`: the window starts at floor((size - crop) / 2), which is
        // negative when the crop is larger; those pixels are zero padding.
        let top = (h as i64 - out_h as i64).div_euclid(2);
        let left = (w as i64 - out_w as i64).div_euclid(2);
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let px = image.as_raw();
        let mut data = Vec::with_capacity(3 * out_h * out_w);
        for c in 0..3 {
            for i in 0..out_h {
                let y = top + i as i64;
                for j in 0..out_w {
                    let x = left + j as i64;
                    let inside = (0..h as i64).contains(&y) && (0..w as i64).contains(&x);
                    let level = if inside {
                        px[(y as usize * w + x as usize) * 3 + c]
                    } else {
                        0
                    };
                    let mut v = if self.do_rescale {
                        (f64::from(level) * self.rescale_factor) as f32
                    } else {
                        f32::from(level)
                    };
                    if self.do_normalize {
                        v = (v - mean[c]) / std[c];
                    }
                    data.push(v);
                }
            }
        }
        Ok((data, [3, out_h, out_w]))
    }

    /// `processor(images=images, return_tensors="pt").pixel_values`.
    ///
    /// # Shapes
    /// - output: `[B, 3, crop_height, crop_width]` (with center cropping)
    ///
    /// # Errors
    /// As [`Self::preprocess_image`]; [`Error::InvalidArgument`] (`images`) for an empty list,
    /// or images of different sizes after processing (possible only without center cropping).
    pub fn preprocess(&self, images: &[RgbImage], device: &Device) -> Result<Tensor<4>> {
        if images.is_empty() {
            return Err(Error::invalid_argument("images", "no image given"));
        }
        let mut data = Vec::new();
        let mut shape = None;
        for image in images {
            let (values, s) = self.preprocess_image(image)?;
            if *shape.get_or_insert(s) != s {
                return Err(Error::invalid_argument(
                    "images",
                    "images of a batch must have one size after processing",
                ));
            }
            data.extend(values);
        }
        let [c, h, w] = shape.unwrap_or([3, 0, 0]);
        Ok(Tensor::from_data(
            TensorData::new(data, [images.len(), c, h, w]),
            device,
        ))
    }
}

/// `size` / `crop_size`: an integer, or a dict with `shortest_edge` or `height` and `width`
/// (transformers' `get_size_dict`; an integer crop size is square).
fn parse_size(v: &Value, square: bool) -> std::result::Result<ImageSize, String> {
    let positive = |v: &Value| match v.as_u64() {
        Some(n) if n > 0 => Ok(n as usize),
        _ => Err(format!("expected a positive integer, got {v}")),
    };
    match v {
        Value::Number(_) => {
            let n = positive(v)?;
            Ok(if square {
                ImageSize::Exact {
                    height: n,
                    width: n,
                }
            } else {
                ImageSize::ShortestEdge(n)
            })
        }
        Value::Object(map) => parse_size_dict(map, &positive),
        other => Err(format!("expected an integer or a dict, got {other}")),
    }
}

fn parse_size_dict(
    map: &Map<String, Value>,
    positive: &dyn Fn(&Value) -> std::result::Result<usize, String>,
) -> std::result::Result<ImageSize, String> {
    let get = |k: &str| map.get(k).filter(|v| !v.is_null());
    match (get("shortest_edge"), get("height"), get("width")) {
        (Some(s), None, None) => {
            if get("longest_edge").is_some() {
                return Err("`longest_edge` is not supported".into());
            }
            Ok(ImageSize::ShortestEdge(positive(s)?))
        }
        (None, Some(h), Some(w)) => Ok(ImageSize::Exact {
            height: positive(h)?,
            width: positive(w)?,
        }),
        _ => Err(format!(
            "expected {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}, got {}",
            Value::Object(map.clone())
        )),
    }
}

fn parse_triple(v: &Value) -> std::result::Result<[f64; 3], String> {
    let values: Vec<f64> = match v {
        Value::Number(n) => vec![n.as_f64().unwrap_or(f64::NAN); 3],
        Value::Array(items) => items
            .iter()
            .map(|x| x.as_f64().ok_or_else(|| format!("{x} is not a number")))
            .collect::<std::result::Result<_, _>>()?,
        other => return Err(format!("expected three numbers, got {other}")),
    };
    match values.as_slice() {
        [a, b, c] if values.iter().all(|x| x.is_finite()) => Ok([*a, *b, *c]),
        _ => Err(format!("expected three finite numbers, got {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CLIPImageProcessor> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPROCESSOR_CONFIG_NAME);
        std::fs::write(&path, text).unwrap();
        CLIPImageProcessor::from_json_file(&path)
    }

    #[test]
    fn legacy_integer_sizes_parse_as_transformers_reads_them() {
        let p = parse(
            r#"{"size": 224, "crop_size": 224, "feature_extractor_type": "CLIPFeatureExtractor"}"#,
        )
        .unwrap();
        assert_eq!(p.size, ImageSize::ShortestEdge(224));
        assert_eq!(p.crop_size, (224, 224));
        assert_eq!(p, CLIPImageProcessor::default());
    }

    #[test]
    fn bad_values_are_config_errors_naming_the_key() {
        for (text, key) in [
            (r#"{"size": 0}"#, "size"),
            (r#"{"crop_size": {"shortest_edge": 3}}"#, "crop_size"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
            (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std"),
            (r#"{"resample": 0}"#, "resample"),
            (r#"{"do_resize": "yes"}"#, "do_resize"),
        ] {
            match parse(text) {
                Err(Error::ConfigField { field, .. }) => assert_eq!(field, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn shortest_edge_keeps_the_aspect_ratio_with_truncation() {
        let p = CLIPImageProcessor::default();
        assert_eq!(p.resize_output_size(480, 640), (224, 298));
        assert_eq!(p.resize_output_size(53, 37), (320, 224));
        assert_eq!(p.resize_output_size(224, 224), (224, 224));
    }

    #[test]
    fn config_round_trips() {
        let p = CLIPImageProcessor {
            size: ImageSize::Exact {
                height: 10,
                width: 12,
            },
            crop_size: (8, 6),
            ..CLIPImageProcessor::default()
        };
        let text = serde_json::to_string(&p.to_json()).unwrap();
        assert_eq!(parse(&text).unwrap(), p);
    }
}
