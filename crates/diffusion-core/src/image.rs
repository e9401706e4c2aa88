//! Image I/O and diffusers' `VaeImageProcessor`.
//!
//! Images are loaded with the `image` crate (format sniffed from the content, not the file
//! name), saved as PNG with text metadata through the `png` crate, and converted to and from
//! NCHW tensors in `[-1, 1]` exactly as diffusers' `VaeImageProcessor` does.

use std::io::BufWriter;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
pub use image::RgbImage;

use crate::error::{Error, Result};

/// Read an image file (PNG, JPEG) as 8-bit RGB.
///
/// # Errors
/// [`Error::Io`] if the file cannot be opened, [`Error::Image`] naming the file when its content
/// is not a decodable image.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: "the content is not a PNG or JPEG image".into(),
        });
    }
    let img = reader.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(img.to_rgb8())
}

/// Save an RGB image as PNG with `tEXt`/`iTXt` metadata chunks (key, value), atomically: a
/// failure leaves no partial file behind.
///
/// # Errors
/// [`Error::Io`] naming the path.
pub fn save_png(path: impl AsRef<Path>, image: &RgbImage, text: &[(String, String)]) -> Result<()> {
    let path = path.as_ref();
    let mut bytes = Vec::new();
    {
        let to_io = |e: png::EncodingError| Error::io(path, std::io::Error::other(e.to_string()));
        let mut encoder =
            png::Encoder::new(BufWriter::new(&mut bytes), image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            if value.chars().all(|c| (c as u32) < 256) {
                encoder
                    .add_text_chunk(key.clone(), value.clone())
                    .map_err(to_io)?;
            } else {
                encoder
                    .add_itxt_chunk(key.clone(), value.clone())
                    .map_err(to_io)?;
            }
        }
        let mut writer = encoder.write_header().map_err(to_io)?;
        writer.write_image_data(image.as_raw()).map_err(to_io)?;
        writer.finish().map_err(to_io)?;
    }
    crate::config::write_atomically(path, &bytes)
}

/// Read the text chunks of a PNG file (`tEXt`, `zTXt` and `iTXt`).
///
/// # Errors
/// [`Error::Io`] or [`Error::Image`] naming the file.
pub fn read_png_text(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.compressed_latin1_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}

/// Tile equally sized images into a `rows` x `cols` grid (diffusers' `make_image_grid`).
///
/// # Errors
/// [`Error::InvalidArgument`] when the counts disagree or the sizes differ.
pub fn make_image_grid(images: &[RgbImage], rows: usize, cols: usize) -> Result<RgbImage> {
    if images.is_empty() || rows * cols != images.len() {
        return Err(Error::invalid_argument(
            "images",
            format!("{} images do not fill a {rows}x{cols} grid", images.len()),
        ));
    }
    let (w, h) = images[0].dimensions();
    if images.iter().any(|i| i.dimensions() != (w, h)) {
        return Err(Error::invalid_argument(
            "images",
            "all images of a grid must have the same size",
        ));
    }
    let mut grid = RgbImage::new(w * cols as u32, h * rows as u32);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % cols) as i64 * w as i64, (i / cols) as i64 * h as i64);
        image::imageops::replace(&mut grid, img, x, y);
    }
    Ok(grid)
}

/// Tile equally sized images into a grid of `cols` columns (near-square when `None`), padding
/// the last row with black tiles; a single image is returned as it is.
///
/// # Errors
/// [`Error::InvalidArgument`] for no images or images of different sizes.
pub fn padded_image_grid(images: &[RgbImage], cols: Option<usize>) -> Result<RgbImage> {
    let Some(first) = images.first() else {
        return Err(Error::invalid_argument(
            "images",
            "no images to put in a grid",
        ));
    };
    if images.len() == 1 {
        return Ok(first.clone());
    }
    let cols = cols
        .unwrap_or_else(|| (images.len() as f64).sqrt().ceil() as usize)
        .clamp(1, images.len());
    let rows = images.len().div_ceil(cols);
    let mut tiles = images.to_vec();
    tiles.resize(rows * cols, RgbImage::new(first.width(), first.height()));
    make_image_grid(&tiles, rows, cols)
}

/// What a pipeline returns, as diffusers' `output_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputType {
    /// 8-bit RGB images (`"pil"`).
    #[default]
    Pil,
    /// float32 NHWC array in `[0, 1]` (`"np"`).
    Np,
    /// float NCHW tensor in `[0, 1]` (`"pt"`).
    Pt,
    /// The latents, not decoded (`"latent"`).
    Latent,
}

impl std::str::FromStr for OutputType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pil" | "image" => Ok(Self::Pil),
            "np" | "array" => Ok(Self::Np),
            "pt" | "tensor" => Ok(Self::Pt),
            "latent" => Ok(Self::Latent),
            _ => Err(Error::UnknownName {
                kind: "output_type",
                name: s.into(),
                known: "pil, np, pt, latent".into(),
            }),
        }
    }
}

/// Images in the form asked for by [`OutputType`].
// One value per pipeline call: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum ImageOutput {
    /// `OutputType::Pil`.
    Images(Vec<RgbImage>),
    /// `OutputType::Np`: NHWC float32 in `[0, 1]`.
    Array(crate::npy::NpyArray),
    /// `OutputType::Pt` (`[0, 1]`, NCHW) or `OutputType::Latent` (raw latents).
    Tensor(Tensor<4>),
}

/// diffusers' `VaeImageProcessor`: between images and the `[-1, 1]` NCHW tensors a VAE takes.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeImageProcessor {
    /// Resize inputs to a multiple of `vae_scale_factor`.
    pub do_resize: bool,
    /// `2 ** (len(vae.block_out_channels) - 1)`, 8 for Stable Diffusion.
    pub vae_scale_factor: usize,
    /// Map `[0, 1]` to `[-1, 1]` on the way in and back on the way out.
    pub do_normalize: bool,
    /// Threshold at 0.5 (masks).
    pub do_binarize: bool,
    /// Convert to one channel (masks).
    pub do_convert_grayscale: bool,
}

impl Default for VaeImageProcessor {
    /// diffusers/image_processor.py `VaeImageProcessor.__init__`.
    fn default() -> Self {
        Self {
            do_resize: true,
            vae_scale_factor: 8,
            do_normalize: true,
            do_binarize: false,
            do_convert_grayscale: false,
        }
    }
}

impl VaeImageProcessor {
    /// A processor for a VAE with the given scale factor.
    pub fn new(vae_scale_factor: usize) -> Self {
        Self {
            vae_scale_factor,
            ..Self::default()
        }
    }

    /// diffusers' `get_default_height_width`: the requested size, else the image's, rounded down
    /// to a multiple of `vae_scale_factor`.
    pub fn default_height_width(
        &self,
        image: &RgbImage,
        height: Option<usize>,
        width: Option<usize>,
    ) -> (usize, usize) {
        let f = self.vae_scale_factor.max(1);
        let h = height.unwrap_or(image.height() as usize);
        let w = width.unwrap_or(image.width() as usize);
        (h - h % f, w - w % f)
    }

    /// Images to a `[B, C, H, W]` tensor (C = 3, or 1 for grayscale), normalised to `[-1, 1]`.
    ///
    /// Resizing uses a Lanczos3 filter; PIL's Lanczos differs in its last bits, so feed images
    /// of the target size when bit parity with diffusers matters.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty list or a size that rounds down to zero.
    pub fn preprocess(
        &self,
        images: &[RgbImage],
        height: Option<usize>,
        width: Option<usize>,
        device: &Device,
    ) -> Result<Tensor<4>> {
        let first = images
            .first()
            .ok_or_else(|| Error::invalid_argument("image", "no image given"))?;
        let (h, w) = self.default_height_width(first, height, width);
        if h == 0 || w == 0 {
            return Err(Error::invalid_argument(
                "image",
                format!(
                    "size {}x{} is smaller than the VAE scale factor {}",
                    first.width(),
                    first.height(),
                    self.vae_scale_factor
                ),
            ));
        }
        let channels = if self.do_convert_grayscale { 1 } else { 3 };
        let mut data = Vec::with_capacity(images.len() * channels * h * w);
        for img in images {
            let resized;
            let img = if self.do_resize && (img.width() as usize, img.height() as usize) != (w, h) {
                resized = image::imageops::resize(
                    img,
                    w as u32,
                    h as u32,
                    image::imageops::FilterType::Lanczos3,
                );
                &resized
            } else {
                img
            };
            if img.dimensions() != (w as u32, h as u32) {
                return Err(Error::invalid_argument(
                    "image",
                    "images of a batch must share one size when resizing is off",
                ));
            }
            let px = img.as_raw();
            for c in 0..channels {
                for i in 0..h * w {
                    let v = if channels == 1 {
                        // PIL's "L" conversion: ITU-R 601-2 luma.
                        let (r, g, b) =
                            (px[3 * i] as f32, px[3 * i + 1] as f32, px[3 * i + 2] as f32);
                        ((r * 299.0 + g * 587.0 + b * 114.0) / 1000.0).round()
                    } else {
                        px[3 * i + c] as f32
                    };
                    let mut v = v / 255.0;
                    if self.do_binarize {
                        v = if v < 0.5 { 0.0 } else { 1.0 };
                    }
                    if self.do_normalize {
                        v = 2.0 * v - 1.0;
                    }
                    data.push(v);
                }
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(data, [images.len(), channels, h, w]),
            device,
        ))
    }

    /// A decoded `[B, C, H, W]` tensor in `[-1, 1]` to the requested output form.
    pub fn postprocess(&self, image: Tensor<4>, output_type: OutputType) -> ImageOutput {
        if output_type == OutputType::Latent {
            return ImageOutput::Tensor(image);
        }
        let image = if self.do_normalize {
            (image / 2.0 + 0.5).clamp(0.0, 1.0)
        } else {
            image
        };
        if output_type == OutputType::Pt {
            return ImageOutput::Tensor(image);
        }
        let array = tensor_to_nhwc(image);
        match output_type {
            OutputType::Np => ImageOutput::Array(array),
            _ => ImageOutput::Images(nhwc_to_images(&array)),
        }
    }
}

/// `[B, C, H, W]` tensor to a float32 NHWC array (diffusers' `pt_to_numpy`).
pub fn tensor_to_nhwc(t: Tensor<4>) -> crate::npy::NpyArray {
    let [b, c, h, w] = t.dims();
    let data = t
        .permute([0, 2, 3, 1])
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    crate::npy::NpyArray {
        shape: vec![b, h, w, c],
        data,
    }
}

/// NHWC floats in `[0, 1]` to 8-bit images with NumPy's round-half-to-even, as diffusers'
/// `numpy_to_pil` does (`(images * 255).round().astype("uint8")`).
pub fn nhwc_to_images(array: &crate::npy::NpyArray) -> Vec<RgbImage> {
    let (b, h, w, c) = match array.shape[..] {
        [b, h, w, c] => (b, h, w, c),
        _ => return Vec::new(),
    };
    (0..b)
        .map(|i| {
            let base = i * h * w * c;
            let mut px = Vec::with_capacity(h * w * 3);
            for p in 0..h * w {
                for ch in 0..3 {
                    let v = array.data[base + p * c + ch.min(c - 1)];
                    px.push((v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8);
                }
            }
            RgbImage::from_raw(w as u32, h as u32, px).unwrap_or_else(|| RgbImage::new(1, 1))
        })
        .collect()
}
