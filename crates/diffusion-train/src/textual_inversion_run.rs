//! The loop of textual_inversion.py around [`TextualInversionTrainer`]: the images of a folder
//! repeated `repeats` times per epoch, a template prompt per example, images through the
//! frozen VAE, `learned_embeds-steps-{step}.safetensors` every `save_steps`, and
//! `learned_embeds.safetensors` at the end.
//!
//! Micro-batch `m` draws, from a generator seeded with `(seed, m)` (see [`crate::run`]), the
//! crops and flips, the template picks (`rand([B])`), the VAE posterior noise, the noise and
//! the timesteps, in that order. Because every draw derives from the seed and the step,
//! a run resumed from `checkpoint-{step}/` (every `checkpointing_steps`, see
//! [`TextualInversionTrainer::save_checkpoint`]) continues exactly as the uninterrupted run:
//! the same log lines and the same learned embeddings.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_models::{CLIPTextModel, CLIPTokenizer, ModelMixin, UNet2DConditionModel};
use diffusion_schedulers::{AnyScheduler, Scheduler};

use crate::caption_data::{CaptionDataset, CaptionDatasetOptions, tokenize_captions};
use crate::checkpoint::{due_checkpoint, list_checkpoints};
use crate::objective::NoiseDraws;
use crate::run::{EpochBatches, LOG_FILE, LogEntry, TrainReport, derived_seed, truncate_log};
use crate::text_to_image::load_noise_scheduler;
use crate::text_to_image_run::{FrozenComponents, image_draws, progress_bar};
use crate::textual_inversion::{
    LEARNED_EMBEDS_NAME, TextualInversionConfig, TextualInversionTrainer, add_placeholder_tokens,
    placeholder_string,
};
use crate::validation::{
    FrozenParts, ValidationPoint, save_prompt_validation, write_validation_strip,
};

/// Train as textual_inversion.py does, on `device`; writes `logs/train_log.jsonl` and the
/// learned embeddings into `config.output_dir`.
///
/// # Errors
/// As [`TextualInversionConfig::validate`] and [`TextualInversionConfig::check_paths`];
/// [`add_placeholder_tokens`]'s errors; dataset, model and I/O errors;
/// [`Error::InvalidArgument`] (`learning_rate`) for a non-finite loss.
pub fn train_textual_inversion(
    config: &TextualInversionConfig,
    device: &Device,
) -> Result<TrainReport> {
    config.validate()?;
    config.check_paths()?;
    // With `devices`, the first of them is the main device (see `crate::data_parallel`).
    let parallel_devices = match config.devices.as_slice() {
        [] => None,
        names => Some(crate::data_parallel::parse_devices(names)?),
    };
    let device = parallel_devices.as_ref().map_or(device, |d| &d[0]);
    let inner = device.clone().without_autodiff();
    let model = &config.pretrained_model;
    let data = CaptionDataset::from_image_folder(
        &config.train_data_dir,
        "",
        CaptionDatasetOptions {
            resolution: config.resolution,
            center_crop: config.center_crop,
            random_flip: config.random_flip,
            interpolation: config.interpolation,
            caption_column: "text".into(),
        },
    )?;
    let frozen = FrozenComponents::load(model, &inner)?;
    // Mixed precision: the frozen VAE encodes in the half dtype (the script's `weight_dtype`);
    // the validation pipeline keeps an f32 copy.
    let validation_vae = config.validation.is_enabled().then(|| frozen.vae.clone());
    let frozen = match config.mixed_precision.dtype() {
        Some(dtype) => frozen.to_dtype(dtype)?,
        None => frozen,
    };
    let mut tokenizer = CLIPTokenizer::from_pretrained(model.join("tokenizer"))?;
    let mut text_encoder = CLIPTextModel::from_pretrained(model.join("text_encoder"), &inner)?;
    let ids = add_placeholder_tokens(
        &mut tokenizer,
        &mut text_encoder,
        &config.placeholder_token,
        config.num_vectors,
        &config.initializer_token,
    )?;
    let unet = UNet2DConditionModel::from_pretrained(model.join("unet"), &inner)?;
    // The frozen UNet of the validation pipeline (a cheap handle on the same weights).
    let validation_unet = config.validation.is_enabled().then(|| unet.clone());
    let scheduler = load_noise_scheduler(model)?;
    let n = data.len();
    let len = n * config.repeats;
    let total = config.num_training_steps(n);
    let batches_per_epoch = config.batches_per_epoch(n);
    let k = config.gradient_accumulation_steps;
    let mut trainer =
        TextualInversionTrainer::new(config, text_encoder, unet, scheduler, &ids, total, device)?;
    if let Some(dir) = resolve_resume(config)? {
        trainer.restore_checkpoint(&dir)?;
    }
    let start = trainer.global_step();
    let out = &config.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;
    let text = serde_json::to_string_pretty(config).unwrap_or_default();
    diffusion_core::config::write_atomically(&out.join("train_config.json"), text.as_bytes())?;
    let log_path = out.join(LOG_FILE);
    truncate_log(&log_path, start)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let num_train = trainer.scheduler().num_train_timesteps();
    let templates = config.learnable_property.templates();
    let placeholder = placeholder_string(&config.placeholder_token, config.num_vectors);
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
    let validation_scheduler = match &validation_unet {
        Some(_) => Some(AnyScheduler::from_config_file(model.join("scheduler"))?),
        None => None,
    };
    let validate = |trainer: &TextualInversionTrainer, at: ValidationPoint| -> Result<()> {
        let (Some(unet), Some(vae), Some(scheduler)) =
            (&validation_unet, &validation_vae, &validation_scheduler)
        else {
            return Ok(());
        };
        // The tokenizer knows the placeholder tokens; the text encoder holds the learned rows.
        let text_encoder = trainer.text_encoder().valid();
        let parts = FrozenParts {
            tokenizer: &tokenizer,
            text_encoder: &text_encoder,
            vae,
            scheduler,
        };
        let path = save_prompt_validation(unet.clone(), parts, validation, config.seed, out, at)?;
        bar.println(format!("validation images: {}", path.display()));
        Ok(())
    };
    if start == 0 {
        // The starting embeddings (the initializer token's), for comparison.
        validate(&trainer, ValidationPoint { step: 0, epoch: 0 })?;
    }
    let mut batches = EpochBatches::new(
        config.seed,
        len,
        config.global_batch_size(),
        batches_per_epoch,
    );
    let mut parallel = match parallel_devices {
        Some(devices) => Some(trainer.data_parallel(devices)?),
        None => None,
    };
    let began = Instant::now();
    for step in start..total {
        let mut stats = None;
        let mut epoch = 0;
        for j in 0..k {
            let m = step * k + j;
            let (e, indices) = batches.batch(m);
            epoch = e;
            // Positions in the repeated data; image `i % n`.
            let batch: Vec<usize> = indices.iter().map(|&i| i % n).collect();
            let b = batch.len();
            let mut g = TorchGenerator::new(derived_seed(config.seed, 0, m as u64));
            let draws = image_draws(&mut g, b);
            let prompts: Vec<String> = g
                .rand(&[b])
                .into_iter()
                .map(|u| {
                    let t = ((u as f64 * templates.len() as f64) as usize).min(templates.len() - 1);
                    templates[t].replace("{}", &placeholder)
                })
                .collect();
            let input_ids = tokenize_captions(&tokenizer, &prompts)?.input_ids_tensor(&inner)?;
            let pixels = data.pixel_values(&batch, &draws)?;
            let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [b, 3, r, r]), &inner);
            let latents = frozen.encode_images(pixels, &mut g)?;
            let dims = latents.dims();
            let noise = Tensor::<4>::from_data(TensorData::new(g.randn(&dims), dims), &inner);
            let timesteps = g
                .rand(&[b])
                .into_iter()
                .map(|u| ((u as f64 * num_train as f64) as usize).min(num_train - 1))
                .collect();
            let noise_draws = NoiseDraws {
                noise,
                offset_noise: None,
                perturbation: None,
                timesteps,
            };
            stats = match &mut parallel {
                Some(p) => trainer.step_data_parallel(p, latents, input_ids, &noise_draws)?,
                None => trainer.step(latents, input_ids, &noise_draws)?,
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
        if !stats.loss.is_finite() {
            return Err(Error::invalid_argument(
                "learning_rate",
                format!("the loss became {} at step {}", stats.loss, stats.step),
            ));
        }
        let entry = LogEntry {
            step: stats.step,
            epoch,
            loss: stats.loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            ema_decay: None,
        };
        let line = serde_json::to_string(&entry).unwrap_or_default();
        writeln!(log, "{line}")
            .and_then(|_| log.flush())
            .map_err(|e| Error::io(&log_path, e))?;
        bar.inc(1);
        report.steps.push(stats);
        report.global_step = step + 1;
        if (step + 1).is_multiple_of(config.save_steps) {
            let path = out.join(format!("learned_embeds-steps-{}.safetensors", step + 1));
            trainer.save_learned_embeds(&path)?;
        }
        if let Some(dir) = due_checkpoint(
            out,
            step + 1,
            config.checkpointing_steps,
            config.checkpoints_total_limit,
        )? {
            trainer.save_checkpoint(&dir)?;
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
    trainer.save_learned_embeds(out.join(LEARNED_EMBEDS_NAME))?;
    if validation.is_enabled() {
        write_validation_strip(out, total)?;
    }
    Ok(report)
}

/// The checkpoint to resume from: the named folder (looked up in `output_dir` first), the
/// newest one for `"latest"`, or none.
///
/// # Errors
/// [`Error::NotFound`] for a named checkpoint that does not exist.
fn resolve_resume(config: &TextualInversionConfig) -> Result<Option<PathBuf>> {
    let Some(name) = config.resume_from_checkpoint.as_deref() else {
        return Ok(None);
    };
    if name == "latest" {
        let latest = list_checkpoints(&config.output_dir)?.pop().map(|(_, p)| p);
        if latest.is_none() {
            log::info!(
                "no checkpoint in {}; starting a new run",
                config.output_dir.display()
            );
        }
        return Ok(latest);
    }
    for candidate in [config.output_dir.join(name), PathBuf::from(name)] {
        if candidate.join("training_state.json").is_file() {
            return Ok(Some(candidate));
        }
    }
    Err(Error::NotFound {
        path: PathBuf::from(name),
        message: "not a checkpoint folder (no training_state.json)".into(),
    })
}
