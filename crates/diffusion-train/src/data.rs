//! In-memory image datasets, already preprocessed the way diffusers' training scripts
//! preprocess them: `Resize(resolution, BILINEAR)`, `CenterCrop(resolution)`, `ToTensor()` and
//! `Normalize([0.5], [0.5])`, so pixels lie in `[-1, 1]`. Random horizontal flips are drawn per
//! training step (see [`ImageDataset::batch`]).
//!
//! Two sources: scikit-learn's handwritten digits (`digits.csv.gz`, 1,797 images of 8x8 pixels
//! with values 0..16 and a label) and a folder of PNG/JPEG files.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use diffusion_core::{Error, Result};

use crate::resize::{center_crop_offsets, resize_bilinear, resized_size};

/// Images stored as one `[N, C, H, W]` row-major `f32` buffer in `[-1, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageDataset {
    data: Vec<f32>,
    dims: [usize; 4],
    labels: Option<Vec<u32>>,
}

/// Pixel columns of a digits row (8x8).
const DIGIT_SIDE: usize = 8;
/// Largest pixel value of the digits (4x4 blocks of a 32x32 bitmap, counted).
const DIGIT_MAX: f32 = 16.0;

fn to_unit_range(v: f32) -> f32 {
    // Normalize([0.5], [0.5]) after ToTensor.
    (v - 0.5) / 0.5
}

impl ImageDataset {
    /// Wrap `[N, C, H, W]` row-major images.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `images` when the buffer does not hold `dims` or a
    /// dimension is 0.
    pub fn new(data: Vec<f32>, dims: [usize; 4]) -> Result<Self> {
        if dims.contains(&0) {
            return Err(Error::invalid_argument(
                "images",
                format!("dimensions {dims:?} must all be positive"),
            ));
        }
        if data.len() != dims.iter().product::<usize>() {
            return Err(Error::invalid_argument(
                "images",
                format!("{} values do not form {dims:?}", data.len()),
            ));
        }
        Ok(Self {
            data,
            dims,
            labels: None,
        })
    }

    /// Attach one class label per image.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `labels` when their count differs from the images'.
    pub fn with_labels(mut self, labels: Vec<u32>) -> Result<Self> {
        if labels.len() != self.len() {
            return Err(Error::invalid_argument(
                "labels",
                format!("{} labels for {} images", labels.len(), self.len()),
            ));
        }
        self.labels = Some(labels);
        Ok(self)
    }

    /// Keep only the images whose label is in `classes` (in their original order): fine-tuning
    /// on one digit, for instance.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `labels` when the dataset has no labels or no image has
    /// one of `classes`.
    pub fn only_labels(&self, classes: &[u32]) -> Result<Self> {
        let Some(labels) = &self.labels else {
            return Err(Error::invalid_argument(
                "labels",
                "this dataset has no class labels to select by",
            ));
        };
        let keep: Vec<usize> = (0..self.len())
            .filter(|&i| classes.contains(&labels[i]))
            .collect();
        if keep.is_empty() {
            return Err(Error::invalid_argument(
                "labels",
                format!("no image has a label in {classes:?}"),
            ));
        }
        let data = keep
            .iter()
            .flat_map(|&i| self.image(i).iter().copied())
            .collect();
        let [_, c, h, w] = self.dims;
        Self::new(data, [keep.len(), c, h, w])?
            .with_labels(keep.iter().map(|&i| labels[i]).collect())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.dims[0]
    }

    /// Whether there are no images (never true for a constructed dataset).
    pub fn is_empty(&self) -> bool {
        self.dims[0] == 0
    }

    /// `[N, C, H, W]`.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Channels per image.
    pub fn channels(&self) -> usize {
        self.dims[1]
    }

    /// Image height.
    pub fn height(&self) -> usize {
        self.dims[2]
    }

    /// Image width.
    pub fn width(&self) -> usize {
        self.dims[3]
    }

    /// Class labels, if the source had them.
    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }

    /// Image `i` as `[C, H, W]` row-major values.
    ///
    /// # Panics
    /// When `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[f32] {
        let size = self.dims[1] * self.dims[2] * self.dims[3];
        &self.data[i * size..(i + 1) * size]
    }

    /// The images at `indices`, stacked as `[indices.len(), C, H, W]`, each mirrored left-right
    /// where `flips` says so (`flips` may be empty for no flips).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an index out of range or a flip list of another length.
    pub fn batch(&self, indices: &[usize], flips: &[bool]) -> Result<Vec<f32>> {
        if !flips.is_empty() && flips.len() != indices.len() {
            return Err(Error::invalid_argument(
                "flips",
                format!("{} flips for {} images", flips.len(), indices.len()),
            ));
        }
        let w = self.width();
        let mut out = Vec::with_capacity(indices.len() * self.image(0).len());
        for (k, &i) in indices.iter().enumerate() {
            if i >= self.len() {
                return Err(Error::invalid_argument(
                    "indices",
                    format!("image {i} of a dataset of {}", self.len()),
                ));
            }
            let image = self.image(i);
            if flips.get(k).copied().unwrap_or(false) {
                for row in image.chunks_exact(w) {
                    out.extend(row.iter().rev());
                }
            } else {
                out.extend_from_slice(image);
            }
        }
        Ok(out)
    }

    /// scikit-learn's digits from `digits.csv.gz` (as shipped in the scikit-learn wheel at
    /// `sklearn/datasets/data/digits.csv.gz`), one channel, upscaled to `resolution` with
    /// PIL's bilinear filter and normalised to `[-1, 1]`; labels are kept.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read or is not gzip; as
    /// [`Self::from_digits_reader`] for its content.
    pub fn from_digits_csv_gz(path: impl AsRef<Path>, resolution: usize) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Self::from_digits_reader(flate2::read::GzDecoder::new(file), path, resolution)
    }

    /// Digits from decompressed CSV text: rows of 64 pixel values (0..16, row-major 8x8) and a
    /// label. `origin` names the source in errors.
    ///
    /// # Errors
    /// [`Error::Io`] naming `origin` when reading fails (including corrupt gzip data);
    /// [`Error::InvalidArgument`] naming `digits` with the line for a malformed row, and
    /// `resolution` when it is 0; [`Error::NotFound`] for a file without rows.
    pub fn from_digits_reader<R: Read>(
        reader: R,
        origin: &Path,
        resolution: usize,
    ) -> Result<Self> {
        if resolution == 0 {
            return Err(Error::invalid_argument("resolution", "must be positive"));
        }
        let pixels = DIGIT_SIDE * DIGIT_SIDE;
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for (n, line) in BufReader::new(reader).lines().enumerate() {
            let line = line.map_err(|e| Error::io(origin, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| {
                Error::invalid_argument(
                    "digits",
                    format!("{}:{}: {message}", origin.display(), n + 1),
                )
            };
            let values = line
                .split(',')
                .map(|v| v.trim().parse::<f32>())
                .collect::<std::result::Result<Vec<f32>, _>>()
                .map_err(|e| bad(format!("not a number: {e}")))?;
            if values.len() != pixels + 1 {
                return Err(bad(format!(
                    "expected {} comma-separated values (64 pixels and a label), got {}",
                    pixels + 1,
                    values.len()
                )));
            }
            if let Some(v) = values[..pixels]
                .iter()
                .find(|v| !(0.0..=DIGIT_MAX).contains(*v))
            {
                return Err(bad(format!("pixel value {v} is outside 0..=16")));
            }
            let label = values[pixels];
            if label.fract() != 0.0 || !(0.0..=9.0).contains(&label) {
                return Err(bad(format!("label {label} is not a digit")));
            }
            let unit: Vec<f32> = values[..pixels].iter().map(|v| v / DIGIT_MAX).collect();
            let plane = resize_bilinear(&unit, DIGIT_SIDE, DIGIT_SIDE, resolution, resolution);
            data.extend(plane.into_iter().map(to_unit_range));
            labels.push(label as u32);
        }
        if labels.is_empty() {
            return Err(Error::NotFound {
                path: origin.to_path_buf(),
                message: "no digit rows".into(),
            });
        }
        Self::new(data, [labels.len(), 1, resolution, resolution])?.with_labels(labels)
    }

    /// Every PNG/JPEG image under `dir` (recursively, in sorted path order), converted to RGB (or
    /// grayscale), resized so the shorter side is `resolution` (PIL-style antialiased bilinear,
    /// computed in `f32` rather than PIL's 8-bit fixed point, so values can differ from
    /// torchvision's by about 1/255), center-cropped to a square and normalised to `[-1, 1]`.
    ///
    /// # Errors
    /// [`Error::Io`] for unreadable folders or files, [`Error::Image`] naming the file for one
    /// that cannot be decoded, [`Error::NotFound`] when the folder holds no image,
    /// [`Error::InvalidArgument`] naming `resolution` when it is 0.
    pub fn from_image_folder(dir: impl AsRef<Path>, options: &FolderOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let resolution = options.resolution;
        if resolution == 0 {
            return Err(Error::invalid_argument("resolution", "must be positive"));
        }
        let mut files = Vec::new();
        collect_images(dir, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                message: "no .png, .jpg or .jpeg image in the folder".into(),
            });
        }
        let channels = if options.grayscale { 1 } else { 3 };
        let mut data = Vec::with_capacity(files.len() * channels * resolution * resolution);
        for file in &files {
            data.extend(load_image(file, resolution, options.grayscale)?);
        }
        Self::new(data, [files.len(), channels, resolution, resolution])
    }
}

/// How [`ImageDataset::from_image_folder`] prepares images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FolderOptions {
    /// Side of the square training images.
    pub resolution: usize,
    /// Convert to one luma channel (PIL's `convert("L")` weights) instead of RGB.
    pub grayscale: bool,
}

impl FolderOptions {
    /// RGB images of `resolution x resolution`.
    pub fn new(resolution: usize) -> Self {
        Self {
            resolution,
            grayscale: false,
        }
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            collect_images(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// One image as `[C, resolution, resolution]` values in `[-1, 1]`.
fn load_image(path: &Path, resolution: usize, grayscale: bool) -> Result<Vec<f32>> {
    let img = image::open(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let rgb = img.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    let raw = rgb.as_raw();
    let planes: Vec<Vec<f32>> = if grayscale {
        // PIL's "L" conversion: L = R * 299/1000 + G * 587/1000 + B * 114/1000.
        vec![
            raw.chunks_exact(3)
                .map(|p| {
                    (f32::from(p[0]) * 0.299 + f32::from(p[1]) * 0.587 + f32::from(p[2]) * 0.114)
                        / 255.0
                })
                .collect(),
        ]
    } else {
        (0..3)
            .map(|c| {
                raw.chunks_exact(3)
                    .map(|p| f32::from(p[c]) / 255.0)
                    .collect()
            })
            .collect()
    };
    let (new_w, new_h) = resized_size(width, height, resolution);
    let (left, top) = center_crop_offsets(new_w, new_h, resolution);
    let mut out = Vec::with_capacity(planes.len() * resolution * resolution);
    for plane in planes {
        let resized = resize_bilinear(&plane, width, height, new_w, new_h);
        for y in top..top + resolution {
            let row = &resized[y * new_w + left..y * new_w + left + resolution];
            out.extend(row.iter().map(|&v| to_unit_range(v)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_flips_rows_and_checks_indices() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let ds = ImageDataset::new(data, [2, 1, 2, 3]).unwrap();
        assert_eq!(
            ds.batch(&[1, 0], &[true, false]).unwrap(),
            [8., 7., 6., 11., 10., 9., 0., 1., 2., 3., 4., 5.]
        );
        assert!(ds.batch(&[2], &[]).is_err());
        assert!(ds.batch(&[0], &[true, true]).is_err());
        assert!(ImageDataset::new(vec![0.0; 5], [1, 1, 2, 3]).is_err());
    }

    #[test]
    fn label_selection_keeps_order_and_checks_labels() {
        let data: Vec<f32> = (0..4).map(|v| v as f32).collect();
        let ds = ImageDataset::new(data.clone(), [4, 1, 1, 1]).unwrap();
        assert!(
            ds.only_labels(&[3])
                .unwrap_err()
                .to_string()
                .contains("labels")
        );
        let ds = ds.with_labels(vec![3, 1, 3, 2]).unwrap();
        let threes = ds.only_labels(&[3]).unwrap();
        assert_eq!(threes.dims(), [2, 1, 1, 1]);
        assert_eq!((threes.image(0), threes.image(1)), (&[0.0][..], &[2.0][..]));
        assert_eq!(threes.labels(), Some(&[3u32, 3][..]));
        assert_eq!(ds.only_labels(&[1, 2]).unwrap().len(), 2);
        assert!(
            ds.only_labels(&[7])
                .unwrap_err()
                .to_string()
                .contains("labels")
        );
    }

    #[test]
    fn digits_rows_are_checked() {
        let origin = Path::new("digits.csv");
        let row = |n: usize| vec!["1"; n].join(",");
        let ok = ImageDataset::from_digits_reader(format!("{}\n", row(65)).as_bytes(), origin, 8)
            .unwrap();
        assert_eq!(ok.dims(), [1, 1, 8, 8]);
        assert_eq!(ok.labels(), Some(&[1u32][..]));
        assert!(ok.image(0).iter().all(|&v| v == 1.0 / 16.0 * 2.0 - 1.0));
        let err = ImageDataset::from_digits_reader(row(64).as_bytes(), origin, 8).unwrap_err();
        assert!(err.to_string().contains("digits.csv:1"), "{err}");
        let err =
            ImageDataset::from_digits_reader(format!("{},17,3", row(63)).as_bytes(), origin, 8);
        assert!(err.unwrap_err().to_string().contains("17"));
        assert!(ImageDataset::from_digits_reader(&b""[..], origin, 8).is_err());
        assert!(ImageDataset::from_digits_reader(row(65).as_bytes(), origin, 0).is_err());
    }
}
