//! The loop of train_text_to_image.py / train_text_to_image_lora.py around
//! [`TextToImageTrainer`]: shuffled micro-batches of an imagefolder dataset, captions through
//! the frozen CLIP text encoder, images through the frozen VAE, a progress bar, a JSON-lines
//! log, resumable checkpoints and the result (a pipeline folder, or
//! `pytorch_lora_weights.safetensors`).
//!
//! All randomness is derived from the run's seed (see [`crate::run`] for the scheme): epoch `e`'s
//! order from `(seed, e)`; micro-batch `m` (counted over the run) draws, from a generator seeded
//! with `(seed, m)`, the crop positions (`rand([B, 2])`), flips (`rand([B]) < 0.5`), caption
//! picks (`rand([B])`), the VAE posterior noise (`randn` of the latents' shape, unless latents
//! are cached), the noise, the offset noise and perturbation when enabled, and the timesteps
//! (`floor(rand([B]) * num_train_timesteps)`), in that order. Cached latents draw their crop,
//! flip and posterior noise once per image from `(seed, image)`.
//!
//! A checkpoint `checkpoint-{step}/` holds `unet/` (full fine-tuning) or
//! `pytorch_lora_weights.safetensors` (LoRA), `unet_ema/` with an EMA, `optimizer/`, and
//! `training_state.json`; resuming from it continues exactly as the uninterrupted run.

use std::fs::OpenOptions;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::config::ConfigFile;
use diffusion_core::weights::SafetensorsFile;
use diffusion_core::{Device, Error, NoiseSource, Result, TorchGenerator};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{
    AutoencoderKL, CLIPTextModel, CLIPTokenizer, ModelMixin, UNet2DConditionModel,
    UNet2DConditionModelConfig,
};
use diffusion_schedulers::{AnyScheduler, Scheduler};

use crate::caption_data::{CaptionDataset, CaptionDatasetOptions, ImageDraws, tokenize_captions};
use crate::checkpoint::{
    RNG_SCHEME, check_resumable, due_checkpoint, list_checkpoints, read_state_file,
    write_checkpoint_dir, write_state_file,
};
use crate::ema::EmaModel;
use crate::lora::{LORA_WEIGHT_NAME, UNetLora};
use crate::mixed_precision::MixedPrecisionState;
use crate::objective::NoiseDraws;
use crate::optimizer::AdamW;
use crate::run::{EpochBatches, LOG_FILE, TrainReport, derived_seed, record_step, truncate_log};
use crate::text_to_image::{TextToImageConfig, TextToImageTrainer, load_noise_scheduler};
use crate::validation::{
    FrozenParts, ValidationPoint, save_prompt_validation, write_validation_strip,
};

const STATE_FILE: &str = "training_state.json";
/// Seed domain of cached latents (0: steps, 1: epochs in [`crate::run`]).
const CACHE_DOMAIN: u64 = 2;

/// `training_state.json` of a text-to-image checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextToImageState {
    /// Optimizer steps taken.
    pub global_step: usize,
    /// The planned total.
    pub num_training_steps: usize,
    /// The run's seed.
    pub seed: u64,
    /// [`RNG_SCHEME`] at the time of saving.
    pub rng_scheme: String,
    /// The settings of the run that wrote the checkpoint.
    pub config: TextToImageConfig,
}

impl TextToImageState {
    /// Where `trainer` stands now.
    pub fn of(trainer: &TextToImageTrainer) -> Self {
        Self {
            global_step: trainer.global_step(),
            num_training_steps: trainer.num_training_steps(),
            seed: trainer.config().seed,
            rng_scheme: RNG_SCHEME.into(),
            config: trainer.config().clone(),
        }
    }
}

/// The frozen parts of the pipeline: tokenizer, text encoder, VAE (without autodiff).
#[derive(Debug)]
pub struct FrozenComponents {
    /// The CLIP tokenizer.
    pub tokenizer: CLIPTokenizer,
    /// The CLIP text encoder.
    pub text_encoder: CLIPTextModel,
    /// The VAE.
    pub vae: AutoencoderKL,
}

impl FrozenComponents {
    /// Load them from a Stable Diffusion folder onto `device`.
    ///
    /// # Errors
    /// Model loading errors.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let device = device.clone().without_autodiff();
        Ok(Self {
            tokenizer: CLIPTokenizer::from_pretrained(dir.join("tokenizer"))?,
            text_encoder: CLIPTextModel::from_pretrained(dir.join("text_encoder"), &device)?,
            vae: AutoencoderKL::from_pretrained(dir.join("vae"), &device)?,
        })
    }

    /// `text_encoder(tokenizer(captions, padding="max_length", truncation=True))[0]`.
    ///
    /// # Shapes
    /// - output: `[B, model_max_length, hidden]`
    ///
    /// # Errors
    /// Tokenizer and encoder errors.
    pub fn encode_captions<S: AsRef<str>>(&self, captions: &[S]) -> Result<Tensor<3>> {
        let device = crate::optimizer::module_device(&self.text_encoder);
        let ids = tokenize_captions(&self.tokenizer, captions)?.input_ids_tensor(&device)?;
        let states = self.text_encoder.forward(ids)?.last_hidden_state;
        Ok(crate::mixed_precision::to_f32(states))
    }

    /// The text encoder and VAE cast to `dtype` (the scripts' `weight_dtype` under mixed
    /// precision); [`Self::encode_captions`] and [`Self::encode_images`] still return f32.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`dtype`) when the device does not support `dtype`.
    pub fn to_dtype(self, dtype: FloatDType) -> Result<Self> {
        Ok(Self {
            tokenizer: self.tokenizer,
            text_encoder: to_dtype(self.text_encoder, dtype)?,
            vae: to_dtype(self.vae, dtype)?,
        })
    }

    /// `vae.encode(pixels).latent_dist.sample(generator) * scaling_factor`.
    ///
    /// # Shapes
    /// - `pixels`: `[B, 3, H, W]` in `[-1, 1]`; output `[B, latent_channels, H / f, W / f]`
    ///
    /// # Errors
    /// VAE errors.
    pub fn encode_images(&self, pixels: Tensor<4>, g: &mut TorchGenerator) -> Result<Tensor<4>> {
        let pixels = crate::mixed_precision::cast_input(&self.vae, pixels);
        let dist = self.vae.encode(pixels)?;
        let latents = dist.sample(Some(NoiseSource::Single(g)))?;
        let latents = crate::mixed_precision::to_f32(latents);
        Ok(latents.mul_scalar(self.vae.config().scaling_factor))
    }
}

/// Write `trainer`'s state into checkpoint folder `dir` (through a temporary sibling renamed at
/// the end).
///
/// # Errors
/// [`Error::Io`] and model saving errors.
pub fn save_text_to_image_checkpoint(trainer: &TextToImageTrainer, dir: &Path) -> Result<()> {
    write_checkpoint_dir(dir, |tmp| {
        match trainer.lora() {
            Some(lora) => {
                lora.save(tmp.join(LORA_WEIGHT_NAME))?;
                trainer
                    .optimizer()
                    .save(lora.factors(), &tmp.join("optimizer"))?;
            }
            None => {
                trainer.unet().save_pretrained(tmp.join("unet"))?;
                trainer
                    .optimizer()
                    .save(trainer.unet(), &tmp.join("optimizer"))?;
            }
        }
        if let Some(ema) = trainer.ema() {
            let ema_dir = tmp.join("unet_ema");
            ema.copy_to(trainer.unet()).save_pretrained(&ema_dir)?;
            let config_path = ema_dir.join("config.json");
            let mut file = ConfigFile::<UNet2DConditionModelConfig>::load(&config_path)?;
            file.unknown.extend(ema.config_entries());
            file.save(&config_path)?;
        }
        write_state_file(tmp, STATE_FILE, &TextToImageState::of(trainer))?;
        trainer.mixed_precision_state().save_if_used(tmp)
    })
}

/// Write the checkpoint of a run whose one AdamW (`trainer`'s) steps `factors`, a set of LoRAs
/// (DreamBooth's and SDXL's with the text encoders): `save_lora` writes the LoRA file at the
/// path it is given, then the AdamW state of `factors` (`optimizer/`), `training_state.json`
/// and the mixed-precision state; through a temporary folder renamed at the end.
///
/// # Errors
/// [`Error::Io`] and saving errors.
pub(crate) fn save_lora_set_checkpoint<M: Module>(
    trainer: &TextToImageTrainer,
    factors: &M,
    save_lora: impl FnOnce(&Path) -> Result<()>,
    dir: &Path,
) -> Result<()> {
    write_checkpoint_dir(dir, |tmp| {
        save_lora(&tmp.join(LORA_WEIGHT_NAME))?;
        trainer.optimizer().save(factors, &tmp.join("optimizer"))?;
        write_state_file(tmp, STATE_FILE, &TextToImageState::of(trainer))?;
        trainer.mixed_precision_state().save_if_used(tmp)
    })
}

/// The state of a checkpoint [`save_lora_set_checkpoint`] wrote, checked for resuming (RNG
/// scheme, step within `num_training_steps`), and its LoRA file, to build the trainer from.
///
/// # Errors
/// As [`read_state_file`] and [`check_resumable`]; [`Error::Io`] / safetensors errors naming
/// the LoRA file.
pub(crate) fn open_lora_set_checkpoint(
    dir: &Path,
    num_training_steps: usize,
) -> Result<(TextToImageState, SafetensorsFile)> {
    let state = read_state(dir)?;
    check_resumable(
        dir,
        &state.rng_scheme,
        state.global_step,
        num_training_steps,
    )?;
    Ok((state, SafetensorsFile::open(dir.join(LORA_WEIGHT_NAME))?))
}

/// Put a rebuilt trainer where the checkpoint left it: the AdamW state of `factors`, the step
/// count and the mixed-precision state.
///
/// # Errors
/// As [`AdamW::load`] and [`MixedPrecisionState::restore`].
pub(crate) fn restore_lora_set_progress<M: Module>(
    trainer: &mut TextToImageTrainer,
    factors: &M,
    state: &TextToImageState,
    dir: &Path,
) -> Result<()> {
    trainer.optimizer = AdamW::load(trainer.config.adamw(), factors, &dir.join("optimizer"))?;
    trainer.global_step = state.global_step;
    let setting = trainer.config.mixed_precision();
    MixedPrecisionState::restore(
        dir,
        setting,
        &mut trainer.skipped_steps,
        &mut trainer.grad_scaler,
    )
}

fn read_state(dir: &Path) -> Result<TextToImageState> {
    read_state_file(dir, STATE_FILE)
}

/// Rebuild a trainer from checkpoint `dir` with `config`'s settings.
///
/// # Errors
/// As the loaders; [`Error::InvalidArgument`] naming `resume_from_checkpoint` for a checkpoint
/// of another RNG scheme, past `num_training_steps`, or of the other kind (LoRA / full).
pub fn load_text_to_image_checkpoint(
    config: &TextToImageConfig,
    dir: &Path,
    num_training_steps: usize,
    device: &Device,
) -> Result<TextToImageTrainer> {
    let state = read_state(dir)?;
    check_resumable(
        dir,
        &state.rng_scheme,
        state.global_step,
        num_training_steps,
    )?;
    let refuse = |m: String| Error::invalid_argument("resume_from_checkpoint", m);
    if state.config.lora.is_some() != config.lora.is_some() {
        return Err(refuse(format!(
            "{} is a {} checkpoint",
            dir.display(),
            if state.config.lora.is_some() {
                "LoRA"
            } else {
                "full fine-tuning"
            }
        )));
    }
    let inner = device.clone().without_autodiff();
    let scheduler = load_noise_scheduler(&config.pretrained_model)?;
    let mut trainer = match &config.lora {
        Some(lora_config) => {
            let unet = UNet2DConditionModel::from_pretrained(
                config.pretrained_model.join("unet"),
                &inner,
            )?;
            let mut lora = UNetLora::new(&unet, lora_config, config.seed, &inner)?;
            lora.load_factors(&SafetensorsFile::open(dir.join(LORA_WEIGHT_NAME))?, "unet.")?;
            let mut t = TextToImageTrainer::new(
                config,
                unet,
                Some(lora),
                scheduler,
                num_training_steps,
                device,
            )?;
            let factors = t.lora().map(|l| l.factors().clone());
            if let Some(factors) = factors {
                t.optimizer = AdamW::load(config.adamw(), &factors, &dir.join("optimizer"))?;
            }
            t
        }
        None => {
            let unet = UNet2DConditionModel::from_pretrained(dir.join("unet"), &inner)?;
            let mut t =
                TextToImageTrainer::new(config, unet, None, scheduler, num_training_steps, device)?;
            t.optimizer = AdamW::load(config.adamw(), t.unet(), &dir.join("optimizer"))?;
            t
        }
    };
    if config.use_ema {
        let ema_dir = dir.join("unet_ema");
        let file = ConfigFile::<UNet2DConditionModelConfig>::load(ema_dir.join("config.json"))?;
        let step =
            EmaModel::optimization_step_from(&file.unknown).ok_or_else(|| Error::ConfigField {
                path: ema_dir.join("config.json"),
                field: "optimization_step".into(),
                message: "missing: not an EMA folder".into(),
            })?;
        let shadow = UNet2DConditionModel::from_pretrained(&ema_dir, &inner)?;
        trainer.ema = Some(EmaModel::from_weights(
            config.ema().with_saved(&file.unknown),
            trainer.unet(),
            &shadow,
            step,
        )?);
    }
    trainer.global_step = state.global_step;
    MixedPrecisionState::restore(
        dir,
        config.mixed_precision(),
        &mut trainer.skipped_steps,
        &mut trainer.grad_scaler,
    )?;
    Ok(trainer)
}

/// Copy the pretrained pipeline folder into `out` without its `unet/`, then save `unet` there:
/// the folder `StableDiffusionPipeline.save_pretrained` writes at the end of
/// train_text_to_image.py.
pub(crate) fn save_pipeline(
    pretrained: &Path,
    unet: &UNet2DConditionModel,
    out: &Path,
) -> Result<()> {
    fn copy_dir(from: &Path, to: &Path) -> Result<()> {
        std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
        for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
            let entry = entry.map_err(|e| Error::io(from, e))?;
            let path = entry.path();
            let target = to.join(entry.file_name());
            if path.is_dir() {
                copy_dir(&path, &target)?;
            } else {
                std::fs::copy(&path, &target).map_err(|e| Error::io(&target, e))?;
            }
        }
        Ok(())
    }
    for entry in std::fs::read_dir(pretrained).map_err(|e| Error::io(pretrained, e))? {
        let entry = entry.map_err(|e| Error::io(pretrained, e))?;
        let name = entry.file_name();
        let path = entry.path();
        if name == "unet" {
            continue;
        }
        if path.is_dir() {
            copy_dir(&path, &out.join(&name))?;
        } else if path.extension().is_some_and(|e| e == "json") {
            let target = out.join(&name);
            std::fs::copy(&path, &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    unet.save_pretrained(out.join("unet"))
}

pub(crate) fn progress_bar(show: bool, total: usize, start: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} {per_sec} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(start as u64);
    bar
}

pub(crate) fn image_draws(g: &mut TorchGenerator, b: usize) -> Vec<ImageDraws> {
    let crops = g.rand(&[b, 2]);
    let flips = g.rand(&[b]);
    (0..b)
        .map(|i| ImageDraws {
            crop: [crops[2 * i], crops[2 * i + 1]],
            flip: flips[i] < 0.5,
        })
        .collect()
}

/// Encode every image once (cache_latents).
fn cache_latents(
    config: &TextToImageConfig,
    data: &CaptionDataset,
    frozen: &FrozenComponents,
    device: &Device,
) -> Result<Vec<Tensor<4>>> {
    let r = config.resolution;
    (0..data.len())
        .map(|i| {
            let mut g = TorchGenerator::new(derived_seed(config.seed, CACHE_DOMAIN, i as u64));
            let draws = image_draws(&mut g, 1);
            let pixels = data.pixel_values(&[i], &draws)?;
            let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [1, 3, r, r]), device);
            frozen.encode_images(pixels, &mut g)
        })
        .collect()
}

/// Train as train_text_to_image.py (or, with `config.lora`, train_text_to_image_lora.py) does,
/// on `device` (autodiff is turned on here), or data-parallel over `config.devices` when that is
/// not empty (full fine-tuning; then `device` is not used). Writes checkpoints,
/// `logs/train_log.jsonl` and the result into `config.output_dir`. With `config.validation` prompts, also writes
/// validation images (at step 0 of a fresh run, when due, and after the last step) and their
/// strip into `output_dir/validation/` (see [`crate::validation`]).
///
/// # Errors
/// As [`TextToImageConfig::validate`] and [`TextToImageConfig::check_paths`]; dataset, model,
/// checkpoint and I/O errors; [`Error::InvalidArgument`] naming `learning_rate` when the loss
/// becomes non-finite.
pub fn train_text_to_image(config: &TextToImageConfig, device: &Device) -> Result<TrainReport> {
    config.validate()?;
    config.check_paths()?;
    // With `devices`, the first of them is the main device (see `crate::data_parallel`).
    let parallel_devices = match config.devices.as_slice() {
        [] => None,
        names => Some(crate::data_parallel::parse_devices(names)?),
    };
    let device = parallel_devices.as_ref().map_or(device, |d| &d[0]);
    let inner = device.clone().without_autodiff();
    let data = CaptionDataset::from_folder(
        &config.train_data_dir,
        CaptionDatasetOptions {
            resolution: config.resolution,
            center_crop: config.center_crop,
            random_flip: config.random_flip,
            interpolation: config.image_interpolation_mode,
            caption_column: config.caption_column.clone(),
        },
    )?;
    let frozen = FrozenComponents::load(&config.pretrained_model, &inner)?;
    // Mixed precision: the frozen models run in the half dtype, as the scripts' `weight_dtype`.
    let mixed = config.mixed_precision().dtype();
    let frozen = match mixed {
        Some(dtype) => frozen.to_dtype(dtype)?,
        None => frozen,
    };
    let total = config.num_training_steps(data.len());
    let batches_per_epoch = config.batches_per_epoch(data.len());
    let k = config.gradient_accumulation_steps;
    let out = &config.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;

    let resume = resolve_resume(config)?;
    let mut trainer = match resume {
        Some(dir) => {
            log::info!("resuming from {}", dir.display());
            load_text_to_image_checkpoint(config, &dir, total, device)?
        }
        None => {
            let unet = UNet2DConditionModel::from_pretrained(
                config.pretrained_model.join("unet"),
                &inner,
            )?;
            let lora = match &config.lora {
                Some(l) => Some(UNetLora::new(&unet, l, config.seed, &inner)?),
                None => None,
            };
            let scheduler = load_noise_scheduler(&config.pretrained_model)?;
            TextToImageTrainer::new(config, unet, lora, scheduler, total, device)?
        }
    };
    let mut parallel = match parallel_devices {
        Some(devices) => Some(trainer.data_parallel(devices)?),
        None => None,
    };
    config.save(out.join("train_config.json"))?;
    let cached = if config.cache_latents {
        Some(cache_latents(config, &data, &frozen, &inner)?)
    } else {
        None
    };
    let start = trainer.global_step();
    let log_path = out.join(LOG_FILE);
    truncate_log(&log_path, start)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let num_train = trainer.scheduler().num_train_timesteps();
    let objective = trainer.objective().clone();
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
    let validation = &config.validation;
    let validation_scheduler = if validation.is_enabled() {
        Some(AnyScheduler::from_config_file(
            config.pretrained_model.join("scheduler"),
        )?)
    } else {
        None
    };
    let validate = |trainer: &TextToImageTrainer, at: ValidationPoint| -> Result<()> {
        let Some(scheduler) = &validation_scheduler else {
            return Ok(());
        };
        // The validation pipeline runs in f32 on the (half-rounded) frozen weights.
        let widened;
        let (text_encoder, vae) = match mixed {
            Some(_) => {
                widened = (
                    to_dtype(frozen.text_encoder.clone(), FloatDType::F32)?,
                    to_dtype(frozen.vae.clone(), FloatDType::F32)?,
                );
                (&widened.0, &widened.1)
            }
            None => (&frozen.text_encoder, &frozen.vae),
        };
        let frozen = FrozenParts {
            tokenizer: &frozen.tokenizer,
            text_encoder,
            vae,
            scheduler,
        };
        let path = save_prompt_validation(
            trainer.inference_unet(),
            frozen,
            validation,
            config.seed,
            out,
            at,
        )?;
        bar.println(format!("validation images: {}", path.display()));
        Ok(())
    };
    if start == 0 {
        // The starting weights, for comparison with the images that follow.
        validate(&trainer, ValidationPoint { step: 0, epoch: 0 })?;
    }
    let mut batches = EpochBatches::new(
        config.seed,
        data.len(),
        config.global_batch_size(),
        batches_per_epoch,
    );
    let began = Instant::now();
    for step in start..total {
        let mut stats = None;
        let mut epoch = 0;
        for j in 0..k {
            let m = step * k + j;
            let (e, batch) = batches.batch(m);
            epoch = e;
            let b = batch.len();
            let mut g = TorchGenerator::new(derived_seed(config.seed, 0, m as u64));
            let draws = image_draws(&mut g, b);
            let picks = g.rand(&[b]);
            let captions: Vec<&str> = batch
                .iter()
                .zip(&picks)
                .map(|(&i, &u)| data.caption(i, u))
                .collect();
            let latents = match &cached {
                Some(cache) => Tensor::cat(batch.iter().map(|&i| cache[i].clone()).collect(), 0),
                None => {
                    let pixels = data.pixel_values(batch, &draws)?;
                    let pixels =
                        Tensor::<4>::from_data(TensorData::new(pixels, [b, 3, r, r]), &inner);
                    frozen.encode_images(pixels, &mut g)?
                }
            };
            let states = frozen.encode_captions(&captions)?;
            let dims = latents.dims();
            let randn = |g: &mut TorchGenerator, shape: [usize; 4]| {
                Tensor::<4>::from_data(TensorData::new(g.randn(&shape), shape), &inner)
            };
            let noise = randn(&mut g, dims);
            let offset_noise =
                (objective.noise_offset > 0.0).then(|| randn(&mut g, [dims[0], dims[1], 1, 1]));
            let perturbation = (objective.input_perturbation > 0.0).then(|| randn(&mut g, dims));
            let timesteps = match trainer.flow_matching() {
                Some(flow) => flow.draw_indices(b, &mut g)?,
                None => g
                    .rand(&[b])
                    .into_iter()
                    .map(|u| ((u as f64 * num_train as f64) as usize).min(num_train - 1))
                    .collect(),
            };
            let noise_draws = NoiseDraws {
                noise,
                offset_noise,
                perturbation,
                timesteps,
            };
            stats = match &mut parallel {
                Some(p) => trainer.step_data_parallel(p, latents, states, &noise_draws)?,
                None => trainer.step(latents, states, &noise_draws)?,
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
        record_step(&stats, epoch, stats.ema_decay, &mut log, &log_path, &bar)?;
        report.steps.push(stats);
        report.global_step = step + 1;
        if let Some(dir) = due_checkpoint(
            out,
            step + 1,
            config.checkpointing_steps,
            config.checkpoints_total_limit,
        )? {
            save_text_to_image_checkpoint(&trainer, &dir)?;
            bar.println(format!("saved {}", dir.display()));
            report.checkpoints.push(dir);
        }
        // The epoch ends with this step when the next step's first micro-batch is in a later one.
        let end_of_epoch = (step + 1) * k / batches_per_epoch > epoch;
        if validation.is_due(step + 1, epoch, end_of_epoch, step + 1 == total) {
            let at = ValidationPoint {
                step: step + 1,
                epoch,
            };
            validate(&trainer, at)?;
        }
    }
    report.elapsed = began.elapsed();
    bar.finish_and_clear();
    match trainer.lora() {
        Some(lora) => lora.save(out.join(LORA_WEIGHT_NAME))?,
        None => save_pipeline(&config.pretrained_model, &trainer.inference_unet(), out)?,
    }
    if validation.is_enabled() {
        write_validation_strip(out, total)?;
    }
    Ok(report)
}

/// The checkpoint to resume from (as [`crate::run::resolve_resume`]).
pub(crate) fn resolve_resume(config: &TextToImageConfig) -> Result<Option<std::path::PathBuf>> {
    let Some(name) = config.resume_from_checkpoint.as_deref() else {
        return Ok(None);
    };
    if name == "latest" {
        return Ok(list_checkpoints(&config.output_dir)?.pop().map(|(_, p)| p));
    }
    for candidate in [config.output_dir.join(name), std::path::PathBuf::from(name)] {
        if candidate.join(STATE_FILE).is_file() {
            return Ok(Some(candidate));
        }
    }
    Err(Error::NotFound {
        path: name.into(),
        message: "not a checkpoint folder (no training_state.json)".into(),
    })
}
