//! Image-caption datasets in the `datasets` imagefolder layout that diffusers' text-to-image
//! scripts read with `--train_data_dir`: a folder of images and a `metadata.jsonl` whose lines
//! name an image (`file_name`, relative to the folder) and its caption (a column, `text` by
//! default, holding a string or a list of strings).
//!
//! Images are read when a batch asks for them and go through train_text_to_image.py's
//! transforms: `Resize(resolution)` (Lanczos by default), `CenterCrop` or `RandomCrop`,
//! `RandomHorizontalFlip` when enabled, `ToTensor`, `Normalize([0.5], [0.5])`. The random crop
//! offsets and flips are drawn by the caller (see [`ImageDraws`]) so that they are seeded.

use std::path::{Path, PathBuf};

use serde_json::Value;

use diffusion_core::{Error, Result};
use diffusion_models::{CLIPTokenizer, Padding, TokenizerOutput};

use crate::resize::{Interpolation, center_crop_offsets, resize, resized_size};

/// The metadata file of an imagefolder dataset.
pub const METADATA_FILE: &str = "metadata.jsonl";

/// How [`CaptionDataset`] reads and transforms its examples. `Default` is train_text_to_image.py's
/// defaults (`--resolution 512`, random crop, no flip, Lanczos, `--caption_column text`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptionDatasetOptions {
    /// Side of the square training images.
    pub resolution: usize,
    /// Crop the center (`--center_crop`) instead of a random window.
    pub center_crop: bool,
    /// Mirror images left-right at random (`--random_flip`).
    pub random_flip: bool,
    /// The resize filter (`--image_interpolation_mode`).
    pub interpolation: Interpolation,
    /// The metadata column holding captions (`--caption_column`).
    pub caption_column: String,
}

impl Default for CaptionDatasetOptions {
    fn default() -> Self {
        Self {
            resolution: 512,
            center_crop: false,
            random_flip: false,
            interpolation: Interpolation::Lanczos,
            caption_column: "text".into(),
        }
    }
}

/// One example: its image file and its captions (one, or several to pick from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptionExample {
    /// The image.
    pub image: PathBuf,
    /// Its captions; training picks one at random when there are several.
    pub captions: Vec<String>,
}

/// The random choices of one image's transform.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ImageDraws {
    /// Uniform `[0, 1)` numbers that place a random crop (`left`, `top`); ignored with
    /// `center_crop`.
    pub crop: [f32; 2],
    /// Mirror the image (only honoured with `random_flip`).
    pub flip: bool,
}

/// An imagefolder dataset with captions.
#[derive(Clone, Debug)]
pub struct CaptionDataset {
    examples: Vec<CaptionExample>,
    options: CaptionDatasetOptions,
}

fn caption_error(path: &Path, line: usize, message: impl Into<String>) -> Error {
    Error::ConfigField {
        path: path.to_path_buf(),
        field: format!("line {line}"),
        message: message.into(),
    }
}

impl CaptionDataset {
    /// Every image of `dir` (`.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`, sorted by name), each
    /// captioned `caption`: DreamBooth's instance / class folders and textual inversion's
    /// training folder, which have no metadata.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `resolution` when it is 0; [`Error::NotFound`] when
    /// the folder holds no image; [`Error::Io`].
    pub fn from_image_folder(
        dir: impl AsRef<Path>,
        caption: &str,
        options: CaptionDatasetOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        if options.resolution == 0 {
            return Err(Error::invalid_argument("resolution", "must be positive"));
        }
        let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        ["png", "jpg", "jpeg", "webp", "bmp"]
                            .contains(&e.to_ascii_lowercase().as_str())
                    })
            })
            .collect();
        images.sort();
        if images.is_empty() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                message: "no image (.png, .jpg, .jpeg, .webp, .bmp) in the folder".into(),
            });
        }
        let examples = images
            .into_iter()
            .map(|image| CaptionExample {
                image,
                captions: vec![caption.to_string()],
            })
            .collect();
        Ok(Self { examples, options })
    }

    /// Read `dir/metadata.jsonl`. Every line must name an existing image in `file_name` and
    /// hold a string or a non-empty list of strings in the caption column.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `resolution` when it is 0; [`Error::NotFound`] when
    /// the metadata file or an image is missing or no example is listed; [`Error::Io`];
    /// [`Error::ConfigField`] naming the line for malformed JSON or a missing column.
    pub fn from_folder(dir: impl AsRef<Path>, options: CaptionDatasetOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if options.resolution == 0 {
            return Err(Error::invalid_argument("resolution", "must be positive"));
        }
        let path = dir.join(METADATA_FILE);
        if !path.is_file() {
            return Err(Error::NotFound {
                path: path.clone(),
                message: "an imagefolder dataset needs metadata.jsonl with `file_name` and a \
                          caption column"
                    .into(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let row: Value = serde_json::from_str(line)
                .map_err(|e| caption_error(&path, line_no, e.to_string()))?;
            let file = row
                .get("file_name")
                .and_then(Value::as_str)
                .ok_or_else(|| caption_error(&path, line_no, "no `file_name` string"))?;
            let column = &options.caption_column;
            let captions = match row.get(column) {
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(list)) if !list.is_empty() => list
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        caption_error(&path, line_no, format!("`{column}` holds a non-string"))
                    })?,
                _ => {
                    return Err(caption_error(
                        &path,
                        line_no,
                        format!("no caption column `{column}` (a string or a list of strings)"),
                    ));
                }
            };
            let image = dir.join(file);
            if !image.is_file() {
                return Err(Error::NotFound {
                    path: image,
                    message: format!("listed on line {line_no} of {}", path.display()),
                });
            }
            examples.push(CaptionExample { image, captions });
        }
        if examples.is_empty() {
            return Err(Error::NotFound {
                path,
                message: "no example listed".into(),
            });
        }
        Ok(Self { examples, options })
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is no example (never true for a loaded dataset).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Example `i`.
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn example(&self, i: usize) -> &CaptionExample {
        &self.examples[i]
    }

    /// The options.
    pub fn options(&self) -> &CaptionDatasetOptions {
        &self.options
    }

    /// The caption of example `i`: the only one, or the one `u` (uniform in `[0, 1)`) picks.
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn caption(&self, i: usize, u: f32) -> &str {
        let captions = &self.examples[i].captions;
        let k = ((u as f64 * captions.len() as f64) as usize).min(captions.len() - 1);
        &captions[k]
    }

    /// The transformed images `indices` as `[B, 3, resolution, resolution]` values in `[-1, 1]`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`draws`) when `draws` is not one per index or an index is out
    /// of range; [`Error::Image`] naming a file that cannot be decoded.
    pub fn pixel_values(&self, indices: &[usize], draws: &[ImageDraws]) -> Result<Vec<f32>> {
        if draws.len() != indices.len() {
            return Err(Error::invalid_argument(
                "draws",
                format!("{} draws for {} images", draws.len(), indices.len()),
            ));
        }
        let r = self.options.resolution;
        let mut out = Vec::with_capacity(indices.len() * 3 * r * r);
        for (&i, d) in indices.iter().zip(draws) {
            let example = self.examples.get(i).ok_or_else(|| {
                Error::invalid_argument("draws", format!("index {i} of {}", self.len()))
            })?;
            out.extend(self.transform(&example.image, d)?);
        }
        Ok(out)
    }

    fn transform(&self, path: &Path, draws: &ImageDraws) -> Result<Vec<f32>> {
        let o = &self.options;
        let img = image::open(path).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let rgb = img.to_rgb8();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        let raw = rgb.as_raw();
        let (new_w, new_h) = resized_size(width, height, o.resolution);
        let r = o.resolution;
        let (left, top) = crop_origin(o, new_w, new_h, draws);
        let flip = o.random_flip && draws.flip;
        let mut out = Vec::with_capacity(3 * r * r);
        for c in 0..3 {
            // ToTensor divides the bytes by 255 in float32.
            let plane: Vec<f32> = raw
                .chunks_exact(3)
                .map(|p| f32::from(p[c]) / 255.0)
                .collect();
            let resized = if (new_w, new_h) == (width, height) {
                plane
            } else {
                resize(&plane, [width, height], [new_w, new_h], o.interpolation)
            };
            for y in top..top + r {
                let row = &resized[y * new_w + left..y * new_w + left + r];
                if flip {
                    out.extend(row.iter().rev().map(|&v| (v - 0.5) / 0.5));
                } else {
                    out.extend(row.iter().map(|&v| (v - 0.5) / 0.5));
                }
            }
        }
        Ok(out)
    }
}

/// Where an image's transform cuts its window: the sizes before and after the resize and the
/// crop's top-left corner, in the resized image before any flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropGeometry {
    /// The image file's `(width, height)`.
    pub original_size: (usize, usize),
    /// `(width, height)` after `Resize(resolution)`.
    pub resized_size: (usize, usize),
    /// `(left, top)` of the `resolution`-sided window.
    pub crop_origin: (usize, usize),
}

impl CaptionDataset {
    /// The [`CropGeometry`] that [`Self::pixel_values`] applies to example `i` with `draws`
    /// (SDXL's `original_sizes` and `crop_top_lefts`); reads only the image header.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`draws`) for an index out of range; [`Error::Image`] naming
    /// a file whose size cannot be read.
    pub fn crop_geometry(&self, i: usize, draws: &ImageDraws) -> Result<CropGeometry> {
        let example = self.examples.get(i).ok_or_else(|| {
            Error::invalid_argument("draws", format!("index {i} of {}", self.len()))
        })?;
        let (w, h) = image::image_dimensions(&example.image).map_err(|e| Error::Image {
            path: example.image.clone(),
            message: e.to_string(),
        })?;
        let (width, height) = (w as usize, h as usize);
        let (new_w, new_h) = resized_size(width, height, self.options.resolution);
        Ok(CropGeometry {
            original_size: (width, height),
            resized_size: (new_w, new_h),
            crop_origin: crop_origin(&self.options, new_w, new_h, draws),
        })
    }
}

/// `(left, top)` of the crop: `CenterCrop`'s, or `RandomCrop`'s with offsets uniform over
/// `0..=dim - size`.
fn crop_origin(
    o: &CaptionDatasetOptions,
    new_w: usize,
    new_h: usize,
    draws: &ImageDraws,
) -> (usize, usize) {
    let r = o.resolution;
    if o.center_crop {
        center_crop_offsets(new_w, new_h, r)
    } else {
        let pick = |u: f32, dim: usize| ((u as f64 * (dim - r + 1) as f64) as usize).min(dim - r);
        (pick(draws.crop[0], new_w), pick(draws.crop[1], new_h))
    }
}

/// Tokenise captions as train_text_to_image.py does: `max_length=tokenizer.model_max_length`,
/// `padding="max_length"`, `truncation=True`.
///
/// # Errors
/// As [`CLIPTokenizer::tokenize`].
pub fn tokenize_captions<S: AsRef<str>>(
    tokenizer: &CLIPTokenizer,
    captions: &[S],
) -> Result<TokenizerOutput> {
    tokenizer.tokenize(
        captions,
        Padding::MaxLength,
        Some(tokenizer.model_max_length()),
        true,
    )
}
