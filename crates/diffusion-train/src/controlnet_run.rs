//! The loop of train_controlnet.py around [`ControlNetTrainer`]: shuffled micro-batches of
//! (image, conditioning image, caption) rows, the frozen CLIP text encoder, VAE and UNet, a
//! progress bar, a JSON-lines log, resumable checkpoints and the trained ControlNet saved with
//! `save_pretrained` into the output folder (the folder `ControlNetModel.from_pretrained`
//! loads).
//!
//! Randomness comes from the run's seed as in [`crate::text_to_image_run`]: epoch `e`'s order
//! from `(seed, e)`; micro-batch `m` draws, from a generator seeded with `(seed, m)`, the VAE
//! posterior noise (`randn` of the latents' shape), the noise and the timesteps
//! (`floor(rand([B]) * num_train_timesteps)`), in that order, then with
//! `proportion_empty_prompts > 0` one `rand([B])` that empties the captions it falls under (the
//! script uses Python's `random` there). The images are resized and center-cropped as the script
//! does (no random crop or flip), so nothing else is drawn. An optimizer step takes
//! `gradient_accumulation_steps` micro-batches, `m = step * k + j`.
//!
//! A checkpoint `checkpoint-{step}/` holds `controlnet/`, `optimizer/` and
//! `training_state.json`; resuming from it continues exactly as the uninterrupted run.
//!
//! With validation prompts and control images ([`ControlNetValidationConfig`], the script's
//! `log_validation`), every `validation_steps` optimizer steps and after the last one the
//! ControlNet being trained generates images with `StableDiffusionControlNetPipeline` and a
//! `UniPCMultistepScheduler` made from the folder's scheduler config, saved as one grid per
//! step in `output_dir/validation/` (a row per prompt: the control image, then the images).
//! Generation draws only from its own generator and reads the weights without changing them,
//! so a run with validation takes exactly the steps of a run without.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::image::{ImageOutput, OutputType, RgbImage, VaeImageProcessor, load_image};
use diffusion_core::metadata::GenerationParameters;
use diffusion_core::{Device, Error, NoiseSource, Result, TorchGenerator};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{ControlNetModel, FromUNetOptions, ModelMixin, UNet2DConditionModel};
use diffusion_pipelines::{
    StableDiffusionComponents, StableDiffusionControlNetArgs, StableDiffusionControlNetPipeline,
};
use diffusion_schedulers::{AnyScheduler, Scheduler};

use crate::checkpoint::{
    RNG_SCHEME, check_resumable, due_checkpoint, list_checkpoints, read_state_file,
    write_checkpoint_dir, write_state_file,
};
use crate::controlnet::{ControlNetTrainConfig, ControlNetTrainer, conditioning_pixel_values};
use crate::objective::NoiseDraws;
use crate::optimizer::AdamW;
use crate::run::{EpochBatches, LOG_FILE, TrainReport, derived_seed, record_step, truncate_log};
use crate::text_to_image::load_noise_scheduler;
use crate::text_to_image_run::{FrozenComponents, progress_bar};
use crate::validation::{ValidationPoint, framed_grid, write_validation_strip};

const STATE_FILE: &str = "training_state.json";
const METADATA_FILE: &str = "metadata.jsonl";

/// The settings of a train_controlnet.py run (its option names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct ControlNetRunConfig {
    /// The Stable Diffusion folder (`--pretrained_model_name_or_path`).
    pub pretrained_model: PathBuf,
    /// A ControlNet folder to start from (`--controlnet_model_name_or_path`); `None`:
    /// `ControlNetModel.from_unet`.
    pub controlnet_model: Option<PathBuf>,
    /// The dataset folder with `metadata.jsonl`.
    pub train_data_dir: PathBuf,
    /// The target-image column.
    pub image_column: String,
    /// The conditioning-image column.
    pub conditioning_image_column: String,
    /// The caption column.
    pub caption_column: String,
    /// Output folder.
    pub output_dir: PathBuf,
    /// Side of the square training images (512).
    pub resolution: usize,
    /// The share of captions replaced by the empty prompt (`--proportion_empty_prompts`, 0).
    pub proportion_empty_prompts: f64,
    /// Data-parallel training over these devices, the main one first (`["cuda:0", "cuda:1"]`);
    /// `train_batch_size` is then the batch of each device, as with accelerate. Empty (the
    /// default): the device given to the run. See [`crate::data_parallel`].
    pub devices: Vec<String>,
    /// Rows per batch (4).
    pub train_batch_size: usize,
    /// Passes over the data when `max_train_steps` is `None` (1).
    pub num_train_epochs: usize,
    /// Optimizer steps.
    pub max_train_steps: Option<usize>,
    /// Seed of everything random.
    pub seed: u64,
    /// Save a checkpoint every N steps (500).
    pub checkpointing_steps: usize,
    /// Keep at most this many checkpoints.
    pub checkpoints_total_limit: Option<usize>,
    /// A checkpoint folder or `"latest"`.
    pub resume_from_checkpoint: Option<String>,
    /// Optimisation settings.
    pub train: ControlNetTrainConfig,
    /// Validation images (off without prompts).
    pub validation: ControlNetValidationConfig,
    /// Show a progress bar.
    pub show_progress: bool,
}

impl Default for ControlNetRunConfig {
    fn default() -> Self {
        Self {
            pretrained_model: PathBuf::new(),
            controlnet_model: None,
            train_data_dir: PathBuf::new(),
            image_column: "image".into(),
            conditioning_image_column: "conditioning_image".into(),
            caption_column: "text".into(),
            output_dir: "controlnet-model".into(),
            resolution: 512,
            proportion_empty_prompts: 0.0,
            devices: Vec::new(),
            train_batch_size: 4,
            num_train_epochs: 1,
            max_train_steps: None,
            seed: 0,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            train: ControlNetTrainConfig::default(),
            validation: ControlNetValidationConfig::default(),
            show_progress: true,
        }
    }
}

/// train_controlnet.py's validation options: `--validation_prompt`, `--validation_image`,
/// `--num_validation_images`, `--validation_steps`, with its fixed 20 UniPC steps and the
/// pipeline's guidance 7.5 as settings. Off while `validation_prompts` is empty.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlNetValidationConfig {
    /// The prompts (`--validation_prompt`).
    pub validation_prompts: Vec<String>,
    /// The control images (`--validation_image`): one per prompt, one for every prompt, or
    /// any number for a single prompt.
    pub validation_images: Vec<PathBuf>,
    /// Images per (prompt, control image) pair (`--num_validation_images`, 4).
    pub num_validation_images: usize,
    /// Generate after every this many optimizer steps (`--validation_steps`, 100), and after
    /// the last step.
    pub validation_steps: usize,
    /// Denoising steps (the script's 20).
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale (the pipeline's default, 7.5).
    pub guidance_scale: f64,
    /// Seed of the validation generator; the run's seed when unset, as the script.
    pub seed: Option<u64>,
}

impl Default for ControlNetValidationConfig {
    fn default() -> Self {
        Self {
            validation_prompts: Vec::new(),
            validation_images: Vec::new(),
            num_validation_images: 4,
            validation_steps: 100,
            num_inference_steps: 20,
            guidance_scale: 7.5,
            seed: None,
        }
    }
}

impl ControlNetValidationConfig {
    /// Whether any image is generated.
    pub fn is_enabled(&self) -> bool {
        !self.validation_prompts.is_empty()
    }

    /// Check the settings (nothing is read), as the script's `parse_args` does.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field (`validation.validation_image`, ...) for
    /// prompts without images or images without prompts, counts that cannot be paired, an empty
    /// prompt, a zero count or interval, or a non-finite guidance scale.
    pub fn validate(&self) -> Result<()> {
        let (p, i) = (self.validation_prompts.len(), self.validation_images.len());
        if p > 0 && i == 0 {
            return Err(Error::invalid_argument(
                "validation.validation_image",
                "validation prompts need control images (--validation_image)",
            ));
        }
        if p == 0 && i > 0 {
            return Err(Error::invalid_argument(
                "validation.validation_prompt",
                "validation control images need prompts (--validation_prompt)",
            ));
        }
        if p != i && p != 1 && i != 1 {
            return Err(Error::invalid_argument(
                "validation.validation_image",
                format!(
                    "{i} control images for {p} prompts: give one image, one prompt, or as many \
                     images as prompts"
                ),
            ));
        }
        if self.validation_prompts.iter().any(|p| p.trim().is_empty()) {
            return Err(Error::invalid_argument(
                "validation.validation_prompt",
                "a validation prompt is empty",
            ));
        }
        for (name, v) in [
            (
                "validation.num_validation_images",
                self.num_validation_images,
            ),
            ("validation.validation_steps", self.validation_steps),
            ("validation.num_inference_steps", self.num_inference_steps),
        ] {
            if v == 0 {
                return Err(Error::invalid_argument(name, "must be positive"));
            }
        }
        if !self.guidance_scale.is_finite() {
            return Err(Error::invalid_argument(
                "validation.guidance_scale",
                format!("{} is not finite", self.guidance_scale),
            ));
        }
        Ok(())
    }

    /// The (prompt, control image) pairs, as `log_validation` pairs them.
    pub fn pairs(&self) -> Vec<(String, PathBuf)> {
        let n = self
            .validation_prompts
            .len()
            .max(self.validation_images.len());
        (0..n)
            .map(|k| {
                let prompt = &self.validation_prompts[k.min(self.validation_prompts.len() - 1)];
                let image = &self.validation_images[k.min(self.validation_images.len() - 1)];
                (prompt.clone(), image.clone())
            })
            .collect()
    }

    /// Whether validation runs after global step `step` (1-based): every `validation_steps`
    /// and after the last step (the script's final validation).
    pub fn is_due(&self, step: usize, last: bool) -> bool {
        self.is_enabled() && (last || step.is_multiple_of(self.validation_steps))
    }
}

impl ControlNetRunConfig {
    /// Check the settings (nothing is read).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::invalid_argument(name, "must be positive"))
            } else {
                Ok(())
            }
        };
        positive("resolution", self.resolution)?;
        if !self.resolution.is_multiple_of(8) {
            return Err(Error::invalid_argument(
                "resolution",
                format!("{} is not a multiple of 8", self.resolution),
            ));
        }
        positive("train_batch_size", self.train_batch_size)?;
        if !self.devices.is_empty() {
            crate::data_parallel::parse_devices(&self.devices)?;
        }
        if !(0.0..=1.0).contains(&self.proportion_empty_prompts) {
            return Err(Error::invalid_argument(
                "proportion_empty_prompts",
                format!("{} is not in [0, 1]", self.proportion_empty_prompts),
            ));
        }
        positive("num_train_epochs", self.num_train_epochs)?;
        positive("checkpointing_steps", self.checkpointing_steps)?;
        if self.max_train_steps == Some(0) {
            return Err(Error::invalid_argument(
                "max_train_steps",
                "must be positive",
            ));
        }
        if self.checkpoints_total_limit == Some(0) {
            return Err(Error::invalid_argument(
                "checkpoints_total_limit",
                "must be positive",
            ));
        }
        self.validation.validate()?;
        self.train.validate()
    }

    /// Check that the folders exist (before anything is loaded).
    ///
    /// # Errors
    /// [`Error::NotFound`] for a missing folder or file.
    pub fn check_paths(&self) -> Result<()> {
        let need = |p: PathBuf, message: &str| {
            if p.exists() {
                Ok(())
            } else {
                Err(Error::NotFound {
                    path: p,
                    message: message.into(),
                })
            }
        };
        for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            need(
                self.pretrained_model.join(part),
                "not a Stable Diffusion folder",
            )?;
        }
        if let Some(c) = &self.controlnet_model {
            need(c.join("config.json"), "not a ControlNet folder")?;
        }
        for image in &self.validation.validation_images {
            need(image.clone(), "validation control image not found")?;
        }
        need(self.train_data_dir.join(METADATA_FILE), "no dataset here")
    }

    /// Rows per micro-batch: `train_batch_size` on each of the `devices` (at least one).
    fn global_batch_size(&self) -> usize {
        self.train_batch_size * self.devices.len().max(1)
    }

    fn batches_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.global_batch_size())
    }

    /// Optimizer steps per epoch (`ceil(len(train_dataloader) / gradient_accumulation_steps)`).
    fn steps_per_epoch(&self, n: usize) -> usize {
        self.batches_per_epoch(n)
            .div_ceil(self.train.gradient_accumulation_steps.max(1))
    }

    fn num_training_steps(&self, n: usize) -> usize {
        self.max_train_steps
            .unwrap_or(self.num_train_epochs * self.steps_per_epoch(n))
    }
}

/// One row of the dataset.
#[derive(Clone, Debug)]
struct Row {
    image: PathBuf,
    conditioning_image: PathBuf,
    caption: String,
}

fn load_rows(config: &ControlNetRunConfig) -> Result<Vec<Row>> {
    let dir = &config.train_data_dir;
    let path = dir.join(METADATA_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let bad = |line: usize, message: String| Error::ConfigField {
        path: path.clone(),
        field: format!("line {line}"),
        message,
    };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
        let string = |column: &str| -> Result<String> {
            row.get(column)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(i + 1, format!("no string column `{column}`")))
        };
        let image = |column: &str| -> Result<PathBuf> {
            let p = dir.join(string(column)?);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::NotFound {
                    path: p,
                    message: format!("listed on line {} of {}", i + 1, path.display()),
                })
            }
        };
        rows.push(Row {
            image: image(&config.image_column)?,
            conditioning_image: image(&config.conditioning_image_column)?,
            caption: string(&config.caption_column)?,
        });
    }
    if rows.is_empty() {
        return Err(Error::NotFound {
            path,
            message: "no example listed".into(),
        });
    }
    Ok(rows)
}

/// `training_state.json` of a ControlNet checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ControlNetState {
    global_step: usize,
    num_training_steps: usize,
    seed: u64,
    rng_scheme: String,
}

fn save_controlnet_checkpoint(
    trainer: &ControlNetTrainer,
    seed: u64,
    total: usize,
    dir: &Path,
) -> Result<()> {
    write_checkpoint_dir(dir, |tmp| {
        trainer
            .inference_controlnet()
            .save_pretrained(tmp.join("controlnet"))?;
        trainer
            .optimizer()
            .save(trainer.controlnet(), &tmp.join("optimizer"))?;
        let state = ControlNetState {
            global_step: trainer.global_step(),
            num_training_steps: total,
            seed,
            rng_scheme: RNG_SCHEME.into(),
        };
        write_state_file(tmp, STATE_FILE, &state)?;
        trainer.mixed_precision_state().save_if_used(tmp)
    })
}

fn resolve_resume(config: &ControlNetRunConfig) -> Result<Option<PathBuf>> {
    let Some(name) = config.resume_from_checkpoint.as_deref() else {
        return Ok(None);
    };
    if name == "latest" {
        return Ok(list_checkpoints(&config.output_dir)?.pop().map(|(_, p)| p));
    }
    for candidate in [config.output_dir.join(name), PathBuf::from(name)] {
        if candidate.join(STATE_FILE).is_file() {
            return Ok(Some(candidate));
        }
    }
    Err(Error::NotFound {
        path: name.into(),
        message: "not a checkpoint folder (no training_state.json)".into(),
    })
}

/// What validation generates with, read before the first step so that a bad control image
/// fails the run before anything is trained.
struct Validator {
    /// (prompt, control image path, control image) per pair.
    pairs: Vec<(String, PathBuf, RgbImage)>,
    /// `UniPCMultistepScheduler.from_config(pipeline.scheduler.config)`.
    scheduler: AnyScheduler,
    /// The generated images' `(height, width)`: the control images' size rounded down to the
    /// VAE's scale factor.
    size: (usize, usize),
}

impl Validator {
    /// Read the control images and build the scheduler; `None` without validation prompts.
    ///
    /// # Errors
    /// Image reading errors naming the file; [`Error::InvalidArgument`]
    /// (`validation.validation_image`, naming the file) for images whose sizes differ or are not
    /// a multiple of 8 once rounded to the VAE's scale factor; scheduler config errors.
    fn prepare(config: &ControlNetRunConfig, vae_scale_factor: usize) -> Result<Option<Self>> {
        let v = &config.validation;
        if !v.is_enabled() {
            return Ok(None);
        }
        let processor = VaeImageProcessor::new(vae_scale_factor);
        let mut pairs = Vec::new();
        let mut size = None;
        for (prompt, path) in v.pairs() {
            let image = load_image(&path)?;
            let (h, w) = processor.default_height_width(&image, None, None);
            let bad = |message: String| {
                Error::invalid_argument(
                    "validation.validation_image",
                    format!("{}: {message}", path.display()),
                )
            };
            if h == 0 || w == 0 || !h.is_multiple_of(8) || !w.is_multiple_of(8) {
                return Err(bad(format!(
                    "generates {w}x{h} images; the pipeline needs multiples of 8"
                )));
            }
            if let Some((sh, sw)) = size
                && (sh, sw) != (h, w)
            {
                return Err(bad(format!(
                    "{w}x{h} differs from the first control image's {sw}x{sh}; validation \
                     images share one grid"
                )));
            }
            size = Some((h, w));
            pairs.push((prompt, path, image));
        }
        let folder = AnyScheduler::from_config_file(config.pretrained_model.join("scheduler"))?;
        let scheduler = AnyScheduler::convert(
            &folder,
            &diffusion_schedulers::SchedulerSpec::parse("UniPCMultistepScheduler")?,
        )?;
        Ok(Some(Self {
            pairs,
            scheduler,
            size: size.unwrap_or((0, 0)),
        }))
    }

    /// `log_validation`: `num_validation_images` images per pair from the ControlNet and UNet of
    /// `trainer` (read, not changed) and the frozen parts, one generator seeded once for all
    /// calls, saved as one grid (a row per pair: control image, then the images).
    ///
    /// # Errors
    /// Pipeline errors; [`Error::Io`] naming the file when the grid cannot be written (no
    /// partial file is left).
    fn run(
        &self,
        trainer: &ControlNetTrainer,
        frozen: &FrozenComponents,
        config: &ControlNetRunConfig,
        at: ValidationPoint,
        device: &Device,
    ) -> Result<PathBuf> {
        let v = &config.validation;
        // The pipeline runs in f32 on the (half-rounded, under mixed precision) frozen weights.
        let components = StableDiffusionComponents {
            vae: widen(frozen.vae.clone())?,
            text_encoder: widen(frozen.text_encoder.clone())?,
            tokenizer: frozen.tokenizer.clone(),
            unet: widen(trainer.inference_unet())?,
            scheduler: self.scheduler.clone(),
            image_encoder: None,
            feature_extractor: None,
            lora: diffusion_loaders::LoraState::new(),
        };
        let mut pipe = StableDiffusionControlNetPipeline::from_parts(
            components,
            trainer.inference_controlnet(),
        );
        let f = pipe.components.vae_scale_factor();
        let channels = pipe.components.unet.config().in_channels;
        let (h, w) = self.size;
        let seed = v.seed.unwrap_or(config.seed);
        // One generator for the whole round, as the script's: each call draws its latents from
        // it in turn (the pipeline draws nothing else with a deterministic scheduler).
        let mut generator = TorchGenerator::new(seed);
        let n = v.num_validation_images;
        let mut tiles = Vec::with_capacity(self.pairs.len() * (n + 1));
        for (prompt, _, image) in &self.pairs {
            let control = if (image.height() as usize, image.width() as usize) == (h, w) {
                image.clone()
            } else {
                image::imageops::resize(
                    image,
                    w as u32,
                    h as u32,
                    image::imageops::FilterType::Lanczos3,
                )
            };
            tiles.push(control);
            for _ in 0..n {
                let latents = diffusion_core::tensor::randn_tensor(
                    [1, channels, h / f, w / f],
                    NoiseSource::Single(&mut generator),
                    device,
                )?;
                let out = pipe.call(StableDiffusionControlNetArgs {
                    prompt: vec![prompt.clone()],
                    image: Some(image.clone().into()),
                    num_inference_steps: v.num_inference_steps,
                    guidance_scale: v.guidance_scale,
                    latents: Some(latents),
                    output_type: OutputType::Pil,
                    progress: false,
                    ..StableDiffusionControlNetArgs::default()
                })?;
                let ImageOutput::Images(images) = out.images else {
                    return Err(Error::invalid_argument(
                        "output_type",
                        "the pipeline did not return images",
                    ));
                };
                tiles.extend(images);
            }
        }
        let grid = framed_grid(&tiles, Some(n + 1))?;
        let mut params = GenerationParameters {
            prompt: self.pairs.first().map(|p| p.0.clone()),
            ..GenerationParameters::default()
        };
        params.push("Steps", v.num_inference_steps);
        params.push("Sampler", self.scheduler.kind().class_name());
        params.push("CFG scale", v.guidance_scale);
        params.push("Seed", seed);
        params.push("Size", format!("{w}x{h}"));
        params.push("Batch size", n);
        if self.pairs.len() > 1 {
            let prompts: Vec<&str> = self.pairs.iter().map(|p| p.0.as_str()).collect();
            params.push(
                "Prompts",
                serde_json::to_string(&prompts).unwrap_or_default(),
            );
        }
        let images: Vec<String> = self
            .pairs
            .iter()
            .map(|p| p.1.display().to_string())
            .collect();
        params.push(
            "Control images",
            serde_json::to_string(&images).unwrap_or_default(),
        );
        params.push("Training step", at.step);
        params.push("Epoch", at.epoch);
        crate::validation::save(&config.output_dir, at, &grid, &params)
    }
}

/// `module` in `f32` (unchanged when it already is).
fn widen<M: diffusion_core::burn::module::Module>(module: M) -> Result<M> {
    to_dtype(module, FloatDType::F32)
}

/// Train a ControlNet as train_controlnet.py does, on `device` (autodiff is turned on here).
/// Writes checkpoints, `logs/train_log.jsonl` and the trained ControlNet
/// (`config.json`, `diffusion_pytorch_model.safetensors`) into `config.output_dir`; with
/// validation prompts, also the validation grids and their strip into
/// `output_dir/validation/`.
///
/// # Errors
/// As [`ControlNetRunConfig::validate`] and [`ControlNetRunConfig::check_paths`]; dataset,
/// model, checkpoint and I/O errors; unreadable validation control images (naming the file,
/// before any step); [`Error::InvalidArgument`] naming
/// `resume_from_checkpoint` for a checkpoint of another RNG scheme or past the planned steps,
/// and `learning_rate` when the loss becomes non-finite.
pub fn train_controlnet(config: &ControlNetRunConfig, device: &Device) -> Result<TrainReport> {
    config.validate()?;
    config.check_paths()?;
    // With `devices`, the first of them is the main device (see `crate::data_parallel`).
    let parallel_devices = match config.devices.as_slice() {
        [] => None,
        names => Some(crate::data_parallel::parse_devices(names)?),
    };
    let device = parallel_devices.as_ref().map_or(device, |d| &d[0]);
    let inner = device.clone().without_autodiff();
    let rows = load_rows(config)?;
    let frozen = FrozenComponents::load(&config.pretrained_model, &inner)?;
    // Mixed precision: the frozen models run in the half dtype, as the script's `weight_dtype`.
    let frozen = match config.train.mixed_precision.dtype() {
        Some(dtype) => frozen.to_dtype(dtype)?,
        None => frozen,
    };
    let validator = Validator::prepare(
        config,
        1 << frozen
            .vae
            .config()
            .block_out_channels
            .len()
            .saturating_sub(1),
    )?;
    let total = config.num_training_steps(rows.len());
    let batches_per_epoch = config.batches_per_epoch(rows.len());
    let out = &config.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;

    let unet = UNet2DConditionModel::from_pretrained(config.pretrained_model.join("unet"), &inner)?;
    let scheduler = load_noise_scheduler(&config.pretrained_model)?;
    let mut trainer = match resolve_resume(config)? {
        Some(dir) => {
            log::info!("resuming from {}", dir.display());
            let state: ControlNetState = read_state_file(&dir, STATE_FILE)?;
            check_resumable(&dir, &state.rng_scheme, state.global_step, total)?;
            let controlnet = ControlNetModel::from_pretrained(dir.join("controlnet"), &inner)?;
            let mut t =
                ControlNetTrainer::new(&config.train, controlnet, unet, scheduler, total, device)?;
            let optimizer =
                AdamW::load(config.train.adamw(), t.controlnet(), &dir.join("optimizer"))?;
            t.resume(optimizer, state.global_step, &dir)?;
            t
        }
        None => {
            let controlnet = match &config.controlnet_model {
                Some(dir) => ControlNetModel::from_pretrained(dir, &inner)?,
                None => ControlNetModel::from_unet(&unet, &FromUNetOptions::default())?,
            };
            ControlNetTrainer::new(&config.train, controlnet, unet, scheduler, total, device)?
        }
    };
    let start = trainer.global_step();
    let log_path = out.join(LOG_FILE);
    truncate_log(&log_path, start)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let num_train = load_noise_scheduler(&config.pretrained_model)?.num_train_timesteps();
    let r = config.resolution;
    let bar = progress_bar(config.show_progress, total, start);
    let mut report = TrainReport {
        start_step: start,
        global_step: start,
        num_training_steps: total,
        steps: Vec::new(),
        checkpoints: Vec::new(),
        pipeline_dir: out.clone(),
        elapsed: Duration::ZERO,
    };
    let mut parallel = match parallel_devices {
        Some(devices) => Some(trainer.data_parallel(devices)?),
        None => None,
    };
    let mut batches = EpochBatches::new(
        config.seed,
        rows.len(),
        config.global_batch_size(),
        batches_per_epoch,
    );
    let began = Instant::now();
    let k = config.train.gradient_accumulation_steps.max(1);
    for step in start..total {
        let mut stats = None;
        let mut epoch = 0;
        for j in 0..k {
            let m = step * k + j;
            let (e, batch) = batches.batch(m);
            epoch = e;
            let b = batch.len();
            let mut g = TorchGenerator::new(derived_seed(config.seed, 0, m as u64));
            let mut pixels = Vec::with_capacity(b * 3 * r * r);
            let mut cond = Vec::with_capacity(b * 3 * r * r);
            for &i in batch {
                // Normalize([0.5], [0.5]) after ToTensor for the target image.
                pixels.extend(
                    conditioning_pixel_values(&rows[i].image, r)?
                        .into_iter()
                        .map(|v| 2.0 * v - 1.0),
                );
                cond.extend(conditioning_pixel_values(&rows[i].conditioning_image, r)?);
            }
            let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [b, 3, r, r]), &inner);
            let cond = Tensor::<4>::from_data(TensorData::new(cond, [b, 3, r, r]), &inner);
            let latents = frozen.encode_images(pixels, &mut g)?;
            let mut captions: Vec<&str> = batch.iter().map(|&i| rows[i].caption.as_str()).collect();
            let dims = latents.dims();
            let noise = Tensor::<4>::from_data(TensorData::new(g.randn(&dims), dims), &inner);
            let timesteps = g
                .rand(&[b])
                .into_iter()
                .map(|u| ((u as f64 * num_train as f64) as usize).min(num_train - 1))
                .collect();
            let draws = NoiseDraws {
                noise,
                offset_noise: None,
                perturbation: None,
                timesteps,
            };
            // `--proportion_empty_prompts`: drawn after everything else, only when set, so runs
            // without it draw what they always drew.
            if config.proportion_empty_prompts > 0.0 {
                for (caption, u) in captions.iter_mut().zip(g.rand(&[b])) {
                    if f64::from(u) < config.proportion_empty_prompts {
                        *caption = "";
                    }
                }
            }
            let states = frozen.encode_captions(&captions)?;
            stats = match &mut parallel {
                Some(p) => trainer.step_data_parallel(p, latents, states, cond, &draws)?,
                None => trainer.step(latents, states, cond, &draws)?,
            };
        }
        let stats = match stats {
            Some(s) => s,
            None => {
                let stats = trainer.finish_step()?;
                if let Some(p) = &mut parallel {
                    p.sync(&trainer);
                }
                stats
            }
        };
        record_step(&stats, epoch, None, &mut log, &log_path, &bar)?;
        report.steps.push(stats);
        report.global_step = step + 1;
        if let Some(dir) = due_checkpoint(
            out,
            step + 1,
            config.checkpointing_steps,
            config.checkpoints_total_limit,
        )? {
            save_controlnet_checkpoint(&trainer, config.seed, total, &dir)?;
            bar.println(format!("saved {}", dir.display()));
            report.checkpoints.push(dir);
        }
        if let Some(validator) = &validator
            && config.validation.is_due(step + 1, step + 1 == total)
        {
            let at = ValidationPoint {
                step: step + 1,
                epoch,
            };
            let path = validator.run(&trainer, &frozen, config, at, &inner)?;
            bar.println(format!("validation images: {}", path.display()));
        }
    }
    report.elapsed = began.elapsed();
    bar.finish_and_clear();
    trainer.inference_controlnet().save_pretrained(out)?;
    if validator.is_some() {
        write_validation_strip(out, total)?;
    }
    Ok(report)
}
