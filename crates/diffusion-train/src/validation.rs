//! Validation images during training, as diffusers' training scripts make them: every so many
//! epochs or optimizer steps the weights being trained generate a grid at a fixed seed, saved as
//! `<output_dir>/validation/step-{step:06}.png` with the generation parameters in its PNG text
//! chunks (the command line's A1111-style [`GenerationParameters`]).
//!
//! - [`ImageValidationConfig`] is train_unconditional.py's `--save_images_epochs`,
//!   `--eval_batch_size` and `--ddpm_num_inference_steps` (plus a step interval and DDIM);
//! - [`PromptValidationConfig`] is train_text_to_image(_lora).py's `--validation_prompt(s)`,
//!   `--num_validation_images` and `--validation_epochs` (plus a step interval).
//!
//! Generation draws only from its own generator, seeded from the validation seed, and reads the
//! weights without changing them, so a run with validation takes exactly the steps of a run
//! without, and a resumed run writes the same later images as the uninterrupted one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use diffusion_core::image::{
    ImageOutput, OutputType, RgbImage, load_image, nhwc_to_images, padded_image_grid, save_png,
};
use diffusion_core::metadata::GenerationParameters;
use diffusion_core::{Error, Result};
use diffusion_models::state_dict::with_loaded_layout;
use diffusion_models::{
    AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, UNet2DConditionModel,
    UNet2DModel,
};
use diffusion_pipelines::{
    DDIMPipeline, DDPMPipeline, Generators, StableDiffusionArgs, StableDiffusionComponents,
    StableDiffusionPipeline, StableDiffusionXLArgs, StableDiffusionXLComponents,
    StableDiffusionXLPipeline, UnconditionalArgs,
};
use diffusion_schedulers::{AnyScheduler, DDPMScheduler};

/// The folder of validation images inside `output_dir`.
pub const VALIDATION_DIR: &str = "validation";
/// The strip of all grids of a run, side by side in step order (see [`write_validation_strip`]).
pub const STRIP_FILE: &str = "progress.png";

/// The sampler of unconditional validation images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidationSampler {
    /// The training scheduler itself (`DDPMPipeline(unet, noise_scheduler)`, as the script).
    #[default]
    Ddpm,
    /// `DDIMScheduler.from_config` of the training scheduler: far fewer steps give clean samples.
    Ddim,
}

/// When and how [`crate::train_unconditional`] generates validation grids. Off unless
/// `save_images_epochs` or `save_images_steps` is set (train_unconditional.py always generates,
/// every 10 epochs; on a CPU that is opt-in here).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageValidationConfig {
    /// Generate after every epoch `e` (0-based) with `e % save_images_epochs == 0`, as the script.
    pub save_images_epochs: Option<usize>,
    /// Generate after every this many optimizer steps.
    pub save_images_steps: Option<usize>,
    /// Images per grid (`--eval_batch_size`, 16).
    pub eval_batch_size: usize,
    /// Denoising steps (`--ddpm_num_inference_steps`, 1000).
    pub num_inference_steps: usize,
    /// DDPM (the script's) or DDIM.
    pub sampler: ValidationSampler,
    /// Seed of the grid's generator (the script uses `manual_seed(0)`).
    pub seed: u64,
    /// Enlarge each image this many times (nearest neighbour) in the PNG; by default the
    /// smallest factor that makes images at least 64 pixels wide.
    pub upscale: Option<u32>,
}

impl Default for ImageValidationConfig {
    fn default() -> Self {
        Self {
            save_images_epochs: None,
            save_images_steps: None,
            eval_batch_size: 16,
            num_inference_steps: 1000,
            sampler: ValidationSampler::Ddpm,
            seed: 0,
            upscale: None,
        }
    }
}

impl ImageValidationConfig {
    /// Whether any grid is generated.
    pub fn is_enabled(&self) -> bool {
        self.save_images_epochs.is_some() || self.save_images_steps.is_some()
    }

    /// Check the settings before training starts.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the zero field (`validation.eval_batch_size`, ...).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("validation.save_images_epochs", self.save_images_epochs),
            ("validation.save_images_steps", self.save_images_steps),
            ("validation.eval_batch_size", Some(self.eval_batch_size)),
            (
                "validation.num_inference_steps",
                Some(self.num_inference_steps),
            ),
            ("validation.upscale", self.upscale.map(|u| u as usize)),
        ];
        check_positive(&positive)
    }

    /// Whether a grid is due after global step `step` (1-based) that ended epoch `epoch` when
    /// `end_of_epoch`; the last step of a run always gets one.
    pub fn is_due(&self, step: usize, epoch: usize, end_of_epoch: bool, last: bool) -> bool {
        self.is_enabled()
            && (last
                || self
                    .save_images_steps
                    .is_some_and(|n| step.is_multiple_of(n))
                || (end_of_epoch
                    && self
                        .save_images_epochs
                        .is_some_and(|n| epoch.is_multiple_of(n))))
    }
}

/// When and how [`crate::train_text_to_image`], [`crate::train_dreambooth`],
/// [`crate::train_textual_inversion`] and [`crate::train_text_to_image_sdxl`] generate validation
/// images with the Stable Diffusion (XL) pipeline. Off while `validation_prompts` is empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptValidationConfig {
    /// The prompts (`--validation_prompts`; the LoRA script's single `--validation_prompt`).
    pub validation_prompts: Vec<String>,
    /// Images per prompt (`--num_validation_images`, 4).
    pub num_validation_images: usize,
    /// Generate after every epoch `e` (0-based) with `e % validation_epochs == 0`.
    pub validation_epochs: Option<usize>,
    /// Generate after every this many optimizer steps (`--validation_steps` of the newer
    /// scripts). With neither interval, only at the end of the run.
    pub validation_steps: Option<usize>,
    /// Denoising steps (the LoRA script's 30).
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale (the pipeline's default, 7.5).
    pub guidance_scale: f64,
    /// Seed of the generator; the run's seed when unset, as the scripts.
    pub seed: Option<u64>,
}

impl Default for PromptValidationConfig {
    fn default() -> Self {
        Self {
            validation_prompts: Vec::new(),
            num_validation_images: 4,
            validation_epochs: None,
            validation_steps: None,
            num_inference_steps: 30,
            guidance_scale: 7.5,
            seed: None,
        }
    }
}

impl PromptValidationConfig {
    /// Whether any image is generated.
    pub fn is_enabled(&self) -> bool {
        !self.validation_prompts.is_empty()
    }

    /// Check the settings before training starts.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field (`validation.num_validation_images`, ...) for
    /// a zero count or interval, an empty prompt or a non-finite guidance scale.
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("validation.validation_epochs", self.validation_epochs),
            ("validation.validation_steps", self.validation_steps),
            (
                "validation.num_validation_images",
                Some(self.num_validation_images),
            ),
            (
                "validation.num_inference_steps",
                Some(self.num_inference_steps),
            ),
        ])?;
        if self.validation_prompts.iter().any(|p| p.trim().is_empty()) {
            return Err(Error::invalid_argument(
                "validation.validation_prompts",
                "a validation prompt is empty",
            ));
        }
        if !self.guidance_scale.is_finite() {
            return Err(Error::invalid_argument(
                "validation.guidance_scale",
                format!("{} is not finite", self.guidance_scale),
            ));
        }
        Ok(())
    }

    /// As [`ImageValidationConfig::is_due`].
    pub fn is_due(&self, step: usize, epoch: usize, end_of_epoch: bool, last: bool) -> bool {
        self.is_enabled()
            && (last
                || self
                    .validation_steps
                    .is_some_and(|n| step.is_multiple_of(n))
                || (end_of_epoch
                    && self
                        .validation_epochs
                        .is_some_and(|n| epoch.is_multiple_of(n))))
    }
}

fn check_positive(fields: &[(&str, Option<usize>)]) -> Result<()> {
    for (name, value) in fields {
        if *value == Some(0) {
            return Err(Error::invalid_argument(*name, "must be positive"));
        }
    }
    Ok(())
}

/// Where a run's validation images go.
pub fn validation_dir(output_dir: &Path) -> PathBuf {
    output_dir.join(VALIDATION_DIR)
}

/// The image of global step `step` (0: before the first step).
pub fn validation_path(output_dir: &Path, step: usize) -> PathBuf {
    validation_dir(output_dir).join(format!("step-{step:06}.png"))
}

/// Where in training a validation image was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidationPoint {
    /// Optimizer steps taken (0 before the first).
    pub step: usize,
    /// The epoch of the last step (0-based).
    pub epoch: usize,
}

/// Width of the grey frame around each tile of a grid: it keeps small images, such as digits on
/// black, apart.
pub const TILE_FRAME: u32 = 2;

fn framed(tile: &RgbImage) -> RgbImage {
    let (w, h) = tile.dimensions();
    let mut out = RgbImage::from_pixel(
        w + 2 * TILE_FRAME,
        h + 2 * TILE_FRAME,
        image::Rgb([96, 96, 96]),
    );
    image::imageops::replace(&mut out, tile, TILE_FRAME as i64, TILE_FRAME as i64);
    out
}

/// The tiles in a near-square grid (`cols` columns when given), each framed.
pub(crate) fn framed_grid(tiles: &[RgbImage], cols: Option<usize>) -> Result<RgbImage> {
    let tiles: Vec<RgbImage> = tiles.iter().map(framed).collect();
    padded_image_grid(&tiles, cols)
}

pub(crate) fn save(
    output_dir: &Path,
    at: ValidationPoint,
    grid: &RgbImage,
    params: &GenerationParameters,
) -> Result<PathBuf> {
    let dir = validation_dir(output_dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = validation_path(output_dir, at.step);
    // Written through a temporary sibling and a rename: a failure leaves no partial PNG.
    save_png(&path, grid, &params.png_chunks())?;
    Ok(path)
}

/// Generate `config.eval_batch_size` images with `unet` (inference weights, no autodiff) and the
/// training `scheduler` (or DDIM from its config), and save them as one grid at
/// [`validation_path`]. `unet`'s parameters are laid out as loaded ones first
/// ([`with_loaded_layout`]), as in [`save_prompt_validation`].
///
/// # Errors
/// Pipeline errors (a UNet without `sample_size`); [`Error::Io`] naming the folder or file when
/// the image cannot be written (no partial file is left).
pub fn save_unconditional_validation(
    unet: UNet2DModel,
    scheduler: &DDPMScheduler,
    config: &ImageValidationConfig,
    output_dir: &Path,
    at: ValidationPoint,
) -> Result<PathBuf> {
    let args = UnconditionalArgs {
        batch_size: config.eval_batch_size,
        generator: Generators::Seed(config.seed),
        num_inference_steps: Some(config.num_inference_steps),
        output_type: OutputType::Np,
        progress: false,
        ..UnconditionalArgs::default()
    };
    let unet = with_loaded_layout(unet);
    let scheduler = AnyScheduler::from(scheduler.clone());
    let (output, sampler) = match config.sampler {
        ValidationSampler::Ddpm => {
            let mut pipe = DDPMPipeline { unet, scheduler };
            let kind = pipe.scheduler.kind();
            (pipe.call(args)?, kind)
        }
        ValidationSampler::Ddim => {
            let mut pipe = DDIMPipeline::from_parts(unet, scheduler)?;
            let kind = pipe.scheduler.kind();
            (pipe.call(args)?, kind)
        }
    };
    let ImageOutput::Array(array) = output.images else {
        return Err(Error::invalid_argument(
            "output_type",
            "the pipeline did not return an array",
        ));
    };
    let side = array.shape.get(2).copied().unwrap_or(1).max(1) as u32;
    let upscale = config
        .upscale
        .unwrap_or_else(|| 64u32.div_ceil(side))
        .max(1);
    let images: Vec<RgbImage> = nhwc_to_images(&array)
        .into_iter()
        .map(|img| {
            let (w, h) = img.dimensions();
            image::imageops::resize(
                &img,
                w * upscale,
                h * upscale,
                image::imageops::FilterType::Nearest,
            )
        })
        .collect();
    let grid = framed_grid(&images, None)?;
    let mut params = GenerationParameters::default();
    params.push("Steps", config.num_inference_steps);
    params.push("Sampler", sampler.class_name());
    params.push("Seed", config.seed);
    params.push("Size", format!("{}x{}", array.shape[2], array.shape[1]));
    params.push("Batch size", config.eval_batch_size);
    if upscale > 1 {
        params.push("Upscale", upscale);
    }
    params.push("Training step", at.step);
    params.push("Epoch", at.epoch);
    save(output_dir, at, &grid, &params)
}

/// The frozen parts of a Stable Diffusion pipeline that validation generates with, beside the
/// UNet being trained.
#[derive(Clone, Copy, Debug)]
pub struct FrozenParts<'a> {
    /// The CLIP tokenizer.
    pub tokenizer: &'a CLIPTokenizer,
    /// The CLIP text encoder.
    pub text_encoder: &'a CLIPTextModel,
    /// The VAE.
    pub vae: &'a AutoencoderKL,
    /// The pipeline folder's own scheduler (`scheduler/`), which the scripts' pipeline samples
    /// with.
    pub scheduler: &'a AnyScheduler,
}

/// Generate `num_validation_images` images per prompt with the Stable Diffusion pipeline made of
/// `frozen` and `unet` (the weights being trained, LoRA merged / EMA applied, no autodiff), and
/// save them as one grid, a row per prompt, at [`validation_path`]. The models' parameters are
/// laid out as loaded ones first ([`with_loaded_layout`]), so the grid is byte for byte the one
/// a pipeline loaded from the saved weights makes.
///
/// # Errors
/// Pipeline errors; [`Error::Io`] naming the folder or file when the image cannot be written
/// (no partial file is left).
pub fn save_prompt_validation(
    unet: UNet2DConditionModel,
    frozen: FrozenParts<'_>,
    config: &PromptValidationConfig,
    run_seed: u64,
    output_dir: &Path,
    at: ValidationPoint,
) -> Result<PathBuf> {
    let seed = config.seed.unwrap_or(run_seed);
    let mut pipe = StableDiffusionPipeline::from_parts(StableDiffusionComponents {
        vae: with_loaded_layout(frozen.vae.clone()),
        text_encoder: with_loaded_layout(frozen.text_encoder.clone()),
        tokenizer: frozen.tokenizer.clone(),
        unet: with_loaded_layout(unet),
        scheduler: frozen.scheduler.clone(),
        image_encoder: None,
        feature_extractor: None,
        lora: diffusion_loaders::LoraState::new(),
    });
    let sampler = pipe.components.scheduler.kind();
    let n = config.num_validation_images;
    let mut images = Vec::with_capacity(n * config.validation_prompts.len());
    for prompt in &config.validation_prompts {
        let out = pipe.call(StableDiffusionArgs {
            prompt: vec![prompt.clone()],
            num_inference_steps: config.num_inference_steps,
            guidance_scale: config.guidance_scale,
            generator: Generators::Seed(seed),
            num_images_per_prompt: n,
            output_type: OutputType::Pil,
            progress: false,
            ..StableDiffusionArgs::default()
        })?;
        let ImageOutput::Images(batch) = out.images else {
            return Err(Error::invalid_argument(
                "output_type",
                "the pipeline did not return images",
            ));
        };
        images.extend(batch);
    }
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((0, 0));
    let grid = framed_grid(&images, Some(n))?;
    let params = prompt_parameters(config, sampler.class_name(), seed, (w, h), at);
    save(output_dir, at, &grid, &params)
}

/// The frozen parts of an SDXL pipeline that validation generates with, beside the UNet being
/// trained.
#[derive(Clone, Copy, Debug)]
pub struct SdxlFrozenParts<'a> {
    /// `tokenizer/`.
    pub tokenizer: &'a CLIPTokenizer,
    /// `tokenizer_2/`.
    pub tokenizer_2: &'a CLIPTokenizer,
    /// `text_encoder/`.
    pub text_encoder: &'a CLIPTextModel,
    /// `text_encoder_2/`.
    pub text_encoder_2: &'a CLIPTextModelWithProjection,
    /// The VAE.
    pub vae: &'a AutoencoderKL,
    /// The pipeline folder's own scheduler (`scheduler/`).
    pub scheduler: &'a AnyScheduler,
    /// `force_zeros_for_empty_prompt` of the folder's `model_index.json`.
    pub force_zeros_for_empty_prompt: bool,
}

/// [`save_prompt_validation`] for SDXL: `num_validation_images` images per prompt with the
/// `StableDiffusionXLPipeline` of `frozen` around `unet` (the weights being trained, LoRA
/// merged / EMA applied, no autodiff), saved as one grid, a row per prompt, at
/// [`validation_path`]; parameters laid out as loaded ones first, as there.
///
/// # Errors
/// Pipeline errors; [`Error::Io`] naming the folder or file when the image cannot be written
/// (no partial file is left).
pub fn save_sdxl_prompt_validation(
    unet: UNet2DConditionModel,
    frozen: SdxlFrozenParts<'_>,
    config: &PromptValidationConfig,
    run_seed: u64,
    output_dir: &Path,
    at: ValidationPoint,
) -> Result<PathBuf> {
    let seed = config.seed.unwrap_or(run_seed);
    let mut pipe = StableDiffusionXLPipeline::from_parts(StableDiffusionXLComponents {
        vae: with_loaded_layout(frozen.vae.clone()),
        text_encoder: Some(with_loaded_layout(frozen.text_encoder.clone())),
        text_encoder_2: with_loaded_layout(frozen.text_encoder_2.clone()),
        tokenizer: Some(frozen.tokenizer.clone()),
        tokenizer_2: frozen.tokenizer_2.clone(),
        unet: with_loaded_layout(unet),
        scheduler: frozen.scheduler.clone(),
        image_encoder: None,
        feature_extractor: None,
        lora: diffusion_loaders::LoraState::new(),
        force_zeros_for_empty_prompt: frozen.force_zeros_for_empty_prompt,
        requires_aesthetics_score: false,
    });
    let sampler = pipe.components.scheduler.kind();
    let n = config.num_validation_images;
    let mut images = Vec::with_capacity(n * config.validation_prompts.len());
    for prompt in &config.validation_prompts {
        let out = pipe.call(StableDiffusionXLArgs {
            prompt: vec![prompt.clone()],
            num_inference_steps: config.num_inference_steps,
            guidance_scale: config.guidance_scale,
            generator: Generators::Seed(seed),
            num_images_per_prompt: n,
            output_type: OutputType::Pil,
            progress: false,
            ..StableDiffusionXLArgs::default()
        })?;
        let ImageOutput::Images(batch) = out.images else {
            return Err(Error::invalid_argument(
                "output_type",
                "the pipeline did not return images",
            ));
        };
        images.extend(batch);
    }
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((0, 0));
    let grid = framed_grid(&images, Some(n))?;
    let params = prompt_parameters(config, sampler.class_name(), seed, (w, h), at);
    save(output_dir, at, &grid, &params)
}

/// The PNG text of a prompt grid.
fn prompt_parameters(
    config: &PromptValidationConfig,
    sampler: &str,
    seed: u64,
    (w, h): (u32, u32),
    at: ValidationPoint,
) -> GenerationParameters {
    let n = config.num_validation_images;
    let mut params = GenerationParameters {
        prompt: config.validation_prompts.first().cloned(),
        ..GenerationParameters::default()
    };
    params.push("Steps", config.num_inference_steps);
    params.push("Sampler", sampler);
    params.push("CFG scale", config.guidance_scale);
    params.push("Seed", seed);
    params.push("Size", format!("{w}x{h}"));
    params.push("Batch size", n);
    if config.validation_prompts.len() > 1 {
        // One grid row per prompt; the A1111 prompt line holds the first.
        params.push(
            "Prompts",
            serde_json::to_string(&config.validation_prompts).unwrap_or_default(),
        );
    }
    params.push("Training step", at.step);
    params.push("Epoch", at.epoch);
    params
}

/// The validation images of a run, in step order, up to step `up_to`.
///
/// # Errors
/// [`Error::Io`] when the folder cannot be read.
pub fn list_validation_images(output_dir: &Path, up_to: usize) -> Result<Vec<(usize, PathBuf)>> {
    let dir = validation_dir(output_dir);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.strip_suffix(".png"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if step <= up_to {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Put the run's validation grids (up to step `up_to`) side by side in step order, separated by
/// white bars, and save the strip as `validation/progress.png` with the steps in its metadata.
/// Grids of another height than the last one (left by an earlier run with other settings) are
/// left out. Returns `None` when there are no grids.
///
/// # Errors
/// [`Error::Image`] for a grid that does not decode; [`Error::Io`] when the strip cannot be
/// written.
pub fn write_validation_strip(output_dir: &Path, up_to: usize) -> Result<Option<PathBuf>> {
    const GAP: u32 = 4;
    let mut grids = Vec::new();
    for (step, path) in list_validation_images(output_dir, up_to)? {
        grids.push((step, load_image(&path)?));
    }
    let Some(height) = grids.last().map(|(_, g)| g.height()) else {
        return Ok(None);
    };
    grids.retain(|(_, g)| g.height() == height);
    let width = grids.iter().map(|(_, g)| g.width()).sum::<u32>() + GAP * (grids.len() as u32 - 1);
    let mut strip = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut x = 0i64;
    for (_, grid) in &grids {
        image::imageops::replace(&mut strip, grid, x, 0);
        x += (grid.width() + GAP) as i64;
    }
    let mut params = GenerationParameters::default();
    let steps: Vec<String> = grids.iter().map(|(s, _)| s.to_string()).collect();
    params.push("Training steps", steps.join(" "));
    let path = validation_dir(output_dir).join(STRIP_FILE);
    save_png(&path, &strip, &params.png_chunks())?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let c = ImageValidationConfig {
            save_images_steps: Some(3),
            ..ImageValidationConfig::default()
        };
        let due: Vec<usize> = (1..=8).filter(|&s| c.is_due(s, 0, false, s == 8)).collect();
        assert_eq!(due, [3, 6, 8]);
        let e = ImageValidationConfig {
            save_images_epochs: Some(2),
            ..ImageValidationConfig::default()
        };
        assert!(e.is_due(5, 0, true, false));
        assert!(!e.is_due(5, 1, true, false));
        assert!(!e.is_due(5, 2, false, false));
        assert!(!ImageValidationConfig::default().is_due(8, 0, true, true));
        let p = PromptValidationConfig {
            validation_prompts: vec!["a cat".into()],
            ..PromptValidationConfig::default()
        };
        assert!(p.is_due(7, 0, false, true) && !p.is_due(7, 0, true, false));
    }

    #[test]
    fn strip_takes_the_grids_of_the_current_size_in_step_order() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write_validation_strip(dir.path(), 10).unwrap(), None);
        std::fs::create_dir_all(validation_dir(dir.path())).unwrap();
        let grey = |side: u32, v: u8| RgbImage::from_pixel(side, side, image::Rgb([v, v, v]));
        // An older run's smaller grid, two current ones, one past `up_to`, and an unrelated file.
        for (step, img) in [
            (0, grey(10, 1)),
            (5, grey(20, 3)),
            (2, grey(20, 2)),
            (9, grey(20, 4)),
        ] {
            save_png(validation_path(dir.path(), step), &img, &[]).unwrap();
        }
        save_png(
            validation_dir(dir.path()).join("notes.png"),
            &grey(20, 9),
            &[],
        )
        .unwrap();
        let path = write_validation_strip(dir.path(), 8).unwrap().unwrap();
        let strip = load_image(&path).unwrap();
        assert_eq!(strip.dimensions(), (44, 20));
        assert_eq!(
            [
                strip.get_pixel(0, 0).0[0],
                strip.get_pixel(22, 0).0[0],
                strip.get_pixel(24, 0).0[0]
            ],
            [2, 255, 3]
        );
        let text = diffusion_core::image::read_png_text(&path).unwrap();
        assert!(text[0].1.contains("Training steps: 2 5"), "{text:?}");
    }

    #[test]
    fn bad_settings_name_their_field() {
        let bad = ImageValidationConfig {
            eval_batch_size: 0,
            ..ImageValidationConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("validation.eval_batch_size"), "{err}");
        let bad = PromptValidationConfig {
            validation_prompts: vec!["  ".into()],
            ..PromptValidationConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("validation.validation_prompts"), "{err}");
        let bad = PromptValidationConfig {
            validation_steps: Some(0),
            ..PromptValidationConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("validation.validation_steps"), "{err}");
    }
}
