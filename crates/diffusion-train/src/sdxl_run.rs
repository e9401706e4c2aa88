//! The loop of train_text_to_image_sdxl.py / train_text_to_image_lora_sdxl.py around
//! [`SdxlTrainer`]: shuffled micro-batches of an imagefolder dataset, captions through both
//! frozen text encoders, images through the frozen VAE with their `add_time_ids`, a progress
//! bar, a JSON-lines log, resumable checkpoints (the text-to-image layout of
//! [`crate::text_to_image_run`]) and the result: an SDXL pipeline folder, or
//! `pytorch_lora_weights.safetensors` in the layout `StableDiffusionXLPipeline.save_lora_weights`
//! writes.
//!
//! Like the full script, which maps the dataset through the text encoders and the VAE once
//! before training, full fine-tuning (and a LoRA run with `cache_latents`) encodes every image
//! once: image `i` draws, from a generator seeded with `(seed, 3, i)`, its crop (`rand([1, 2])`),
//! flip (`rand([1])`), caption pick (`rand([1])`), empty-prompt draw (`rand([1])`, compared with
//! `proportion_empty_prompts`) and VAE posterior noise. A LoRA run otherwise draws the same for
//! the whole micro-batch `m` from `(seed, 0, m)`, as the LoRA script encodes every step. Each
//! micro-batch then draws its noise, offset noise when enabled, and timesteps (`rand([B])`,
//! through [`crate::TimestepBias`] when a bias is set), in that order. With `train_text_encoder`
//! the draws are the LoRA run's; only the captions go through the trained encoders inside the
//! step ([`SdxlTrainer::step_with_ids`]).

use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::{Device, Error, NoiseSource, Result, TorchGenerator};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{AutoencoderKL, ModelMixin, UNet2DConditionModel};
use diffusion_schedulers::{AnyScheduler, Scheduler};

use crate::caption_data::{CaptionDataset, CaptionDatasetOptions, ImageDraws};
use crate::checkpoint::due_checkpoint;
use crate::lora::{LORA_WEIGHT_NAME, UNetLora};
use crate::objective::NoiseDraws;
use crate::run::{EpochBatches, LOG_FILE, TrainReport, derived_seed, record_step, truncate_log};
use crate::sdxl::{
    SdxlConditioning, SdxlTextEncoders, SdxlTrainConfig, SdxlTrainer, TimestepBiasStrategy,
    time_ids_for,
};
use crate::sdxl_text_lora::{
    load_sdxl_text_checkpoint, new_sdxl_text_trainer, save_sdxl_text_checkpoint,
};
use crate::text_to_image::load_noise_scheduler;
use crate::text_to_image_run::{
    image_draws, load_text_to_image_checkpoint, progress_bar, resolve_resume, save_pipeline,
    save_text_to_image_checkpoint,
};
use crate::validation::{
    SdxlFrozenParts, ValidationPoint, save_sdxl_prompt_validation, write_validation_strip,
};

/// `force_zeros_for_empty_prompt` of the folder's `model_index.json` (true when absent, as
/// `StableDiffusionXLPipeline`).
///
/// # Errors
/// [`Error::Io`] / [`Error::ConfigField`] naming `model_index.json` when it cannot be read or the
/// flag is not a boolean.
fn force_zeros_for_empty_prompt(dir: &std::path::Path) -> Result<bool> {
    let path = dir.join("model_index.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::ConfigField {
        path: path.clone(),
        field: "model_index.json".into(),
        message: e.to_string(),
    })?;
    match index.get("force_zeros_for_empty_prompt") {
        None => Ok(true),
        Some(v) => v.as_bool().ok_or_else(|| Error::ConfigField {
            path,
            field: "force_zeros_for_empty_prompt".into(),
            message: "expected true or false".into(),
        }),
    }
}

/// Seed domain of the once-per-image encodings (0: steps, 1: epochs, 2: SD1 cached latents).
const ENCODE_DOMAIN: u64 = 3;

/// The frozen encoders of an SDXL run.
struct Encoders {
    text: SdxlTextEncoders,
    vae: AutoencoderKL,
}

/// The images of a micro-batch through the VAE, their captions and `add_time_ids` rows.
type Prepared<'a> = (Tensor<4>, Vec<&'a str>, Vec<[f32; 6]>);

impl Encoders {
    /// Latents and conditioning of `indices`, drawing crops, flips, caption picks, empty
    /// prompts and posterior noise from `g`.
    fn encode(
        &self,
        config: &SdxlTrainConfig,
        data: &CaptionDataset,
        indices: &[usize],
        g: &mut TorchGenerator,
        device: &Device,
    ) -> Result<(Tensor<4>, SdxlConditioning)> {
        let (latents, captions, time_ids) = self.prepare(config, data, indices, g, device)?;
        let (embeds, pooled) = self.text.encode_prompt(&captions)?;
        Ok((latents, SdxlConditioning::new(embeds, pooled, &time_ids)?))
    }

    /// What [`Self::encode`] draws and computes before the text encoders: the latents, the
    /// captions and the `add_time_ids` rows of `indices`.
    fn prepare<'a>(
        &self,
        config: &SdxlTrainConfig,
        data: &'a CaptionDataset,
        indices: &[usize],
        g: &mut TorchGenerator,
        device: &Device,
    ) -> Result<Prepared<'a>> {
        let b = indices.len();
        let r = config.text_to_image.resolution;
        let draws: Vec<ImageDraws> = image_draws(g, b);
        let picks = g.rand(&[b]);
        let empties = g.rand(&[b]);
        let captions: Vec<&str> = indices
            .iter()
            .zip(picks.iter().zip(&empties))
            .map(|(&i, (&u, &e))| {
                if f64::from(e) < config.proportion_empty_prompts {
                    ""
                } else {
                    data.caption(i, u)
                }
            })
            .collect();
        let time_ids = indices
            .iter()
            .zip(&draws)
            .map(|(&i, d)| {
                let geometry = data.crop_geometry(i, d)?;
                Ok(time_ids_for(
                    &geometry,
                    data.options().random_flip && d.flip,
                    r,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let pixels = data.pixel_values(indices, &draws)?;
        let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [b, 3, r, r]), device);
        let dist = self.vae.encode(pixels)?;
        let latents = dist
            .sample(Some(NoiseSource::Single(g)))?
            .mul_scalar(self.vae.config().scaling_factor);
        Ok((latents, captions, time_ids))
    }
}

/// A micro-batch's noise, offset noise when enabled, and timesteps (uniform, or through the
/// timestep bias), drawn from `g` in that order for latents of shape `dims`.
///
/// # Errors
/// As [`crate::TimestepBias::sample`].
fn micro_batch_draws(
    config: &SdxlTrainConfig,
    g: &mut TorchGenerator,
    dims: [usize; 4],
    num_train: usize,
    device: &Device,
) -> Result<NoiseDraws> {
    let randn = |g: &mut TorchGenerator, shape: [usize; 4]| {
        Tensor::<4>::from_data(TensorData::new(g.randn(&shape), shape), device)
    };
    let noise = randn(g, dims);
    let offset_noise =
        (config.text_to_image.noise_offset > 0.0).then(|| randn(g, [dims[0], dims[1], 1, 1]));
    let uniforms = g.rand(&[dims[0]]);
    let timesteps = if config.timestep_bias.strategy == TimestepBiasStrategy::None {
        uniforms
            .into_iter()
            .map(|u| ((u as f64 * num_train as f64) as usize).min(num_train - 1))
            .collect()
    } else {
        config.timestep_bias.sample(num_train, &uniforms)?
    };
    Ok(NoiseDraws {
        noise,
        offset_noise,
        perturbation: None,
        timesteps,
    })
}

/// Train as train_text_to_image_sdxl.py (or, with `config.text_to_image.lora`,
/// train_text_to_image_lora_sdxl.py) does, on `device` (autodiff is turned on here). Writes
/// checkpoints, `logs/train_log.jsonl`, `train_config.json` and the result into the output
/// folder.
///
/// # Errors
/// As [`SdxlTrainConfig::validate`] and [`SdxlTrainConfig::check_paths`]; dataset, model,
/// checkpoint and I/O errors; [`Error::InvalidArgument`] naming `learning_rate` when the loss
/// becomes non-finite.
pub fn train_text_to_image_sdxl(config: &SdxlTrainConfig, device: &Device) -> Result<TrainReport> {
    config.validate()?;
    config.check_paths()?;
    let base = &config.text_to_image;
    // With `devices`, the first of them is the main device (see `crate::data_parallel`).
    let parallel_devices = match base.devices.as_slice() {
        [] => None,
        names => Some(crate::data_parallel::parse_devices(names)?),
    };
    let device = parallel_devices.as_ref().map_or(device, |d| &d[0]);
    let inner = device.clone().without_autodiff();
    let data = CaptionDataset::from_folder(
        &base.train_data_dir,
        CaptionDatasetOptions {
            resolution: base.resolution,
            center_crop: base.center_crop,
            random_flip: base.random_flip,
            interpolation: base.image_interpolation_mode,
            caption_column: base.caption_column.clone(),
        },
    )?;
    // Mixed precision: both text encoders run in the half dtype (the scripts' `weight_dtype`);
    // the VAE stays f32, as both SDXL scripts keep it without `--pretrained_vae_model_name_or_path`
    // ("to avoid NaN losses").
    let text = SdxlTextEncoders::load(&base.pretrained_model, &inner)?;
    let text = match base.mixed_precision().dtype() {
        Some(dtype) => text.to_dtype(dtype)?,
        None => text,
    };
    let encoders = Encoders {
        text,
        vae: AutoencoderKL::from_pretrained(base.pretrained_model.join("vae"), &inner)?,
    };
    let total = base.num_training_steps(data.len());
    let batches_per_epoch = base.batches_per_epoch(data.len());
    let k = base.gradient_accumulation_steps;
    let out = &base.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;

    let mut trainer = match resolve_resume(base)? {
        Some(dir) if config.train_text_encoder => {
            log::info!("resuming from {}", dir.display());
            load_sdxl_text_checkpoint(config, &dir, total, device)?
        }
        None if config.train_text_encoder => new_sdxl_text_trainer(config, total, device, None)?,
        Some(dir) => {
            log::info!("resuming from {}", dir.display());
            let t = load_text_to_image_checkpoint(base, &dir, total, device)?;
            SdxlTrainer::from_trainer(config, t)?
        }
        None => {
            let unet =
                UNet2DConditionModel::from_pretrained(base.pretrained_model.join("unet"), &inner)?;
            let lora = match &base.lora {
                Some(l) => Some(UNetLora::new(&unet, l, base.seed, &inner)?),
                None => None,
            };
            let scheduler = load_noise_scheduler(&base.pretrained_model)?;
            SdxlTrainer::new(config, unet, lora, scheduler, total, device)?
        }
    };
    let mut parallel = match parallel_devices {
        Some(devices) => Some(trainer.data_parallel(devices)?),
        None => None,
    };
    config.save(out.join("train_config.json"))?;
    let cached = if base.lora.is_none() || base.cache_latents {
        let per_image = (0..data.len())
            .map(|i| {
                let mut g = TorchGenerator::new(derived_seed(base.seed, ENCODE_DOMAIN, i as u64));
                encoders.encode(config, &data, &[i], &mut g, &inner)
            })
            .collect::<Result<Vec<_>>>()?;
        Some(per_image)
    } else {
        None
    };
    let start = trainer.trainer().global_step();
    let log_path = out.join(LOG_FILE);
    truncate_log(&log_path, start)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let num_train = trainer.trainer().scheduler().num_train_timesteps();
    let bar = progress_bar(base.show_progress, total, start);
    let mut report = TrainReport {
        start_step: start,
        global_step: start,
        num_training_steps: total,
        steps: Vec::new(),
        checkpoints: Vec::new(),
        pipeline_dir: out.clone(),
        elapsed: Duration::ZERO,
    };
    // Validation generates with the run's frozen text encoders (in f32) and VAE and the
    // folder's scheduler around the UNet being trained.
    let validation = &base.validation;
    let validation_setup = if validation.is_enabled() {
        // (Not with `train_text_encoder`: validation then uses the trained f32 encoders.)
        let widened = match base.mixed_precision().dtype() {
            Some(_) if !config.train_text_encoder => Some((
                to_dtype(encoders.text.text_encoder.clone(), FloatDType::F32)?,
                to_dtype(encoders.text.text_encoder_2.clone(), FloatDType::F32)?,
            )),
            _ => None,
        };
        let scheduler = AnyScheduler::from_config_file(base.pretrained_model.join("scheduler"))?;
        Some((
            widened,
            scheduler,
            force_zeros_for_empty_prompt(&base.pretrained_model)?,
        ))
    } else {
        None
    };
    let validate = |trainer: &SdxlTrainer, at: ValidationPoint| -> Result<()> {
        let Some((widened, scheduler, force_zeros)) = &validation_setup else {
            return Ok(());
        };
        // With `train_text_encoder`, the encoders with their LoRAs merged.
        let merged = trainer.inference_text_encoders();
        let (text_encoder, text_encoder_2) = match (&merged, widened) {
            (Some((one, two)), _) | (None, Some((one, two))) => (one, two),
            (None, None) => (&encoders.text.text_encoder, &encoders.text.text_encoder_2),
        };
        let parts = SdxlFrozenParts {
            tokenizer: &encoders.text.tokenizer,
            tokenizer_2: &encoders.text.tokenizer_2,
            text_encoder,
            text_encoder_2,
            vae: &encoders.vae,
            scheduler,
            force_zeros_for_empty_prompt: *force_zeros,
        };
        let unet = trainer.trainer().inference_unet();
        let path = save_sdxl_prompt_validation(unet, parts, validation, base.seed, out, at)?;
        bar.println(format!("validation images: {}", path.display()));
        Ok(())
    };
    if start == 0 {
        // The starting weights, for comparison with the images that follow.
        validate(&trainer, ValidationPoint { step: 0, epoch: 0 })?;
    }
    let mut batches = EpochBatches::new(
        base.seed,
        data.len(),
        base.global_batch_size(),
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
            let mut g = TorchGenerator::new(derived_seed(base.seed, 0, m as u64));
            if config.train_text_encoder {
                // The captions go through the trained encoders inside the step.
                let (latents, captions, time_ids) =
                    encoders.prepare(config, &data, batch, &mut g, &inner)?;
                let (ids_one, ids_two) = encoders.text.input_ids(&captions, &inner)?;
                let draws = micro_batch_draws(config, &mut g, latents.dims(), num_train, &inner)?;
                stats = match &mut parallel {
                    Some(p) => trainer.step_data_parallel_with_ids(
                        p, latents, ids_one, ids_two, &time_ids, &draws,
                    )?,
                    None => trainer.step_with_ids(latents, ids_one, ids_two, &time_ids, &draws)?,
                };
                continue;
            }
            let (latents, cond) = match &cached {
                Some(cache) => {
                    let (latents, conds): (Vec<_>, Vec<_>) =
                        batch.iter().map(|&i| cache[i].clone()).unzip();
                    (Tensor::cat(latents, 0), SdxlConditioning::cat(conds))
                }
                None => encoders.encode(config, &data, batch, &mut g, &inner)?,
            };
            let draws = micro_batch_draws(config, &mut g, latents.dims(), num_train, &inner)?;
            stats = match &mut parallel {
                Some(p) => trainer.step_data_parallel(p, latents, &cond, &draws)?,
                None => trainer.step(latents, &cond, &draws)?,
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
            base.checkpointing_steps,
            base.checkpoints_total_limit,
        )? {
            if config.train_text_encoder {
                save_sdxl_text_checkpoint(&trainer, &dir)?;
            } else {
                save_text_to_image_checkpoint(trainer.trainer(), &dir)?;
            }
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
    match trainer.trainer().lora() {
        Some(_) => trainer.save_lora_weights(out.join(LORA_WEIGHT_NAME))?,
        None => save_pipeline(
            &base.pretrained_model,
            &trainer.trainer().inference_unet(),
            out,
        )?,
    }
    if validation.is_enabled() {
        write_validation_strip(out, total)?;
    }
    Ok(report)
}
