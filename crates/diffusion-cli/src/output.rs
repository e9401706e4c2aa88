//! Writing what a command generated: a PNG (a grid for several images) with the generation
//! parameters in its text chunks, and optionally the float array as `.npy`.

use std::path::Path;

use anyhow::{Result, bail};
use diffusion_core::image::{RgbImage, padded_image_grid, save_png};
use diffusion_core::npy::NpyArray;

use crate::metadata::GenerationParameters;

/// Fail early, before any model is loaded, when `--output` cannot be written as a PNG.
pub fn check_png_path(path: &Path) -> Result<()> {
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!("--output {}: only .png output is supported", path.display());
    }
    check_parent(path, "--output")
}

/// Fail early when the folder of an output file does not exist.
pub fn check_parent(path: &Path, flag: &str) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            bail!(
                "{flag} {}: the folder {} does not exist",
                path.display(),
                dir.display()
            )
        }
        _ => Ok(()),
    }
}

/// The images in a grid of `cols` columns (near-square by default); the last row is padded
/// with black tiles.
pub fn grid(images: &[RgbImage], cols: Option<usize>) -> Result<RgbImage> {
    if images.is_empty() {
        bail!("no images were generated");
    }
    Ok(padded_image_grid(images, cols)?)
}

/// Write the `.npy` (when asked) and the PNG, each atomically (a failed run leaves no partial
/// file), and report what was written.
pub fn write(
    png: &Path,
    image: &RgbImage,
    npy: Option<(&Path, &NpyArray)>,
    params: &GenerationParameters,
    count: usize,
) -> Result<()> {
    if let Some((path, array)) = npy {
        array.write(path)?;
    }
    save_png(png, image, &params.png_chunks())?;
    eprintln!(
        "wrote {} ({count} image(s))\n{}",
        png.display(),
        params.a1111_text()
    );
    Ok(())
}
