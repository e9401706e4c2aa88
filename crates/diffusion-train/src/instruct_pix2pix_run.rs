//! The loop of train_instruct_pix2pix.py around [`InstructPix2PixTrainer`]: shuffled
//! micro-batches of (original, edited, instruction) rows, the frozen CLIP text encoder and VAE,
//! a progress bar, a JSON-lines log, resumable checkpoints (text-to-image's layout: `unet/`,
//! `optimizer/`, `unet_ema/`, `training_state.json`) and a pipeline folder at the end whose
//! `unet/` has 8 input channels (the layout `StableDiffusionInstructPix2PixPipeline` loads).
//!
//! Randomness comes from the run's seed as in [`crate::text_to_image_run`]: micro-batch `m`
//! draws, from a generator seeded with `(seed, m)`, the flips (`rand([B]) < 0.5`), the VAE
//! posterior noise, the noise, the timesteps (`floor(rand([B]) * num_train_timesteps)`) and,
//! with conditioning dropout, `random_p` (`rand([B])`), in that order. (The script draws
//! `random_p` from one generator seeded with `--seed` for the whole run; drawing it per
//! micro-batch keeps resumption exact.) The widened `conv_in`'s bias is PyTorch's default
//! initialisation drawn from `(seed, 3)`, as the script's fresh `nn.Conv2d` has.
//!
//! Validation (`val_image_url` + `validation_prompt`) is the script's `log_validation`:
//! `StableDiffusionInstructPix2PixPipeline` around the weights being trained (EMA applied) and
//! the folder's scheduler edits the image `num_validation_images` times (20 steps, guidance 7,
//! image guidance 1.5) after every `validation_epochs`-th epoch and after the last step; the
//! port also validates the starting weights of a fresh run (step 0), as its other trainers do.
//! The grid (the original, then the edits) is saved as `validation/step-{step:06}.png` with the
//! generation parameters in its PNG text. Generation draws from its own generator seeded with
//! the run's seed (the script shares one generator with the dropout draws) and only reads the
//! weights, so training is the same with or without validation, and across a resume.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::image::{ImageOutput, OutputType, RgbImage, load_image};
use diffusion_core::metadata::GenerationParameters;
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{ModelMixin, UNet2DConditionModel};
use diffusion_pipelines::{
    Generators, StableDiffusionComponents, StableDiffusionInstructPix2PixArgs,
    StableDiffusionInstructPix2PixPipeline,
};
use diffusion_schedulers::{AnyScheduler, Scheduler};

use crate::checkpoint::due_checkpoint;
use crate::instruct_pix2pix::{
    EditBatch, EditDataset, InstructPix2PixConfig, InstructPix2PixTrainer, default_conv_bias,
    widen_conv_in,
};
use crate::mixed_precision::{cast_input, to_f32};
use crate::objective::NoiseDraws;
use crate::run::{EpochBatches, LOG_FILE, TrainReport, derived_seed, record_step, truncate_log};
use crate::text_to_image::load_noise_scheduler;
use crate::text_to_image_run::{
    FrozenComponents, load_text_to_image_checkpoint, progress_bar, resolve_resume, save_pipeline,
    save_text_to_image_checkpoint,
};
use crate::validation::{FrozenParts, ValidationPoint, framed_grid, save, write_validation_strip};

/// Seed domain of the widened `conv_in` bias (0: steps, 1: epochs, 2: cached latents).
const CONV_IN_DOMAIN: u64 = 3;
/// The UNet input channels of InstructPix2Pix (noisy latents and original-image latents).
pub const INSTRUCT_PIX2PIX_IN_CHANNELS: usize = 8;

/// Denoising steps of the script's validation edits.
pub const VALIDATION_INFERENCE_STEPS: usize = 20;
/// Guidance scale of the script's validation edits.
pub const VALIDATION_GUIDANCE_SCALE: f64 = 7.0;
/// Image guidance scale of the script's validation edits.
pub const VALIDATION_IMAGE_GUIDANCE_SCALE: f64 = 1.5;

/// The script's `log_validation`: edit `image` (read from `config.val_image_url`) with
/// `config.validation_prompt` `num_validation_images` times with the InstructPix2Pix pipeline
/// made of `frozen` and `unet` (the weights being trained, EMA applied, no autodiff), and save
/// the original and the edits as one grid row at [`crate::validation::validation_path`].
///
/// # Errors
/// [`Error::InvalidArgument`] (`validation_prompt`) when validation is not configured; pipeline
/// errors; [`Error::Io`] naming the folder or file when the image cannot be written (no
/// partial file is left).
pub fn save_instruct_pix2pix_validation(
    unet: UNet2DConditionModel,
    frozen: FrozenParts<'_>,
    image: &RgbImage,
    config: &InstructPix2PixConfig,
    at: ValidationPoint,
) -> Result<PathBuf> {
    let (Some(prompt), Some(image_path)) = (&config.validation_prompt, &config.val_image_url)
    else {
        return Err(Error::invalid_argument(
            "validation_prompt",
            "validation needs val_image_url and validation_prompt",
        ));
    };
    let mut pipe = StableDiffusionInstructPix2PixPipeline::from_parts(StableDiffusionComponents {
        vae: frozen.vae.clone(),
        text_encoder: frozen.text_encoder.clone(),
        tokenizer: frozen.tokenizer.clone(),
        unet,
        scheduler: frozen.scheduler.clone(),
        image_encoder: None,
        feature_extractor: None,
        lora: diffusion_loaders::LoraState::new(),
    });
    let sampler = pipe.components.scheduler.kind();
    let n = config.num_validation_images;
    let out = pipe.call(StableDiffusionInstructPix2PixArgs {
        prompt: vec![prompt.clone()],
        image: Some(image.clone().into()),
        num_inference_steps: VALIDATION_INFERENCE_STEPS,
        guidance_scale: VALIDATION_GUIDANCE_SCALE,
        image_guidance_scale: VALIDATION_IMAGE_GUIDANCE_SCALE,
        num_images_per_prompt: n,
        generator: Generators::Seed(config.seed),
        output_type: OutputType::Pil,
        progress: false,
        ..StableDiffusionInstructPix2PixArgs::default()
    })?;
    let ImageOutput::Images(edits) = out.images else {
        return Err(Error::invalid_argument(
            "output_type",
            "the pipeline did not return images",
        ));
    };
    let (w, h) = edits.first().map(|i| i.dimensions()).unwrap_or((0, 0));
    // The pipeline edits the image at its size rounded down to the VAE factor: show the
    // original at the edits' size beside them.
    let original = if image.dimensions() == (w, h) {
        image.clone()
    } else {
        image::imageops::resize(image, w, h, image::imageops::FilterType::Lanczos3)
    };
    let mut tiles = Vec::with_capacity(n + 1);
    tiles.push(original);
    tiles.extend(edits);
    let grid = framed_grid(&tiles, Some(n + 1))?;
    let mut params = GenerationParameters {
        prompt: Some(prompt.clone()),
        ..GenerationParameters::default()
    };
    params.push("Steps", VALIDATION_INFERENCE_STEPS);
    params.push("Sampler", sampler.class_name());
    params.push("CFG scale", VALIDATION_GUIDANCE_SCALE);
    params.push("Image CFG scale", VALIDATION_IMAGE_GUIDANCE_SCALE);
    params.push("Seed", config.seed);
    params.push("Size", format!("{w}x{h}"));
    params.push("Batch size", n);
    params.push("Init image", image_path.display());
    params.push("Training step", at.step);
    params.push("Epoch", at.epoch);
    save(&config.output_dir, at, &grid, &params)
}

/// The validation image and the folder's scheduler, read before training starts so that a bad
/// file fails the run before anything is written.
fn load_validation_inputs(
    config: &InstructPix2PixConfig,
    model: &Path,
) -> Result<Option<(RgbImage, AnyScheduler)>> {
    if !config.validation_enabled() {
        return Ok(None);
    }
    let Some(path) = &config.val_image_url else {
        return Ok(None);
    };
    let image = load_image(path)?;
    let scheduler = AnyScheduler::from_config_file(model.join("scheduler"))?;
    Ok(Some((image, scheduler)))
}

/// Load the pretrained UNet and widen its `conv_in` to 8 channels as the script does (a
/// UNet that already has 8 is used as it is).
///
/// # Errors
/// Model loading errors; [`Error::InvalidArgument`] (`in_channels`) for a UNet with more than
/// 8 or an odd number of inputs.
pub fn load_instruct_pix2pix_unet(
    config: &InstructPix2PixConfig,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    let unet = UNet2DConditionModel::from_pretrained(config.pretrained_model.join("unet"), device)?;
    let c = unet.config().in_channels;
    if c == INSTRUCT_PIX2PIX_IN_CHANNELS {
        return Ok(unet);
    }
    if 2 * c != INSTRUCT_PIX2PIX_IN_CHANNELS {
        return Err(Error::invalid_argument(
            "in_channels",
            format!("the pretrained UNet has {c} input channels (4 or 8 expected)"),
        ));
    }
    let [out, _, kh, kw] = unet.conv_in.weight.val().dims();
    let mut g = TorchGenerator::new(derived_seed(config.seed, CONV_IN_DOMAIN, 0));
    let bias = default_conv_bias(&g.rand(&[out]), INSTRUCT_PIX2PIX_IN_CHANNELS * kh * kw);
    let bias = Tensor::<1>::from_data(TensorData::new(bias, [out]), device);
    widen_conv_in(unet, INSTRUCT_PIX2PIX_IN_CHANNELS, Some(bias))
}

/// Train as train_instruct_pix2pix.py does, on `device` (autodiff is turned on here). Writes
/// checkpoints, `logs/train_log.jsonl` and the pipeline into `config.output_dir`, and with
/// `val_image_url` and `validation_prompt` the validation edits and their strip into
/// `output_dir/validation/` (see the module documentation).
///
/// # Errors
/// As [`InstructPix2PixConfig::validate`] and [`InstructPix2PixConfig::check_paths`]; dataset,
/// model, checkpoint and I/O errors; [`Error::Image`] for a validation image that does not
/// decode (before anything is written); [`Error::InvalidArgument`] naming `learning_rate` when the
/// loss becomes non-finite.
pub fn train_instruct_pix2pix(
    config: &InstructPix2PixConfig,
    device: &Device,
) -> Result<TrainReport> {
    config.validate()?;
    config.check_paths()?;
    let t2i = config.text_to_image();
    // With `devices`, the first of them is the main device (see `crate::data_parallel`).
    let parallel_devices = match config.devices.as_slice() {
        [] => None,
        names => Some(crate::data_parallel::parse_devices(names)?),
    };
    let device = parallel_devices.as_ref().map_or(device, |d| &d[0]);
    let inner = device.clone().without_autodiff();
    let data = EditDataset::from_folder(&config.train_data_dir, config)?;
    let validation_inputs = load_validation_inputs(config, &config.pretrained_model)?;
    let frozen = FrozenComponents::load(&config.pretrained_model, &inner)?;
    // Mixed precision: the frozen models run in the half dtype, as the script's `weight_dtype`.
    let mixed = t2i.mixed_precision().dtype();
    let frozen = match mixed {
        Some(dtype) => frozen.to_dtype(dtype)?,
        None => frozen,
    };
    let total = t2i.num_training_steps(data.len());
    let batches_per_epoch = t2i.batches_per_epoch(data.len());
    let k = config.gradient_accumulation_steps;
    let out = &config.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;

    let mut trainer = match resolve_resume(&t2i)? {
        Some(dir) => {
            log::info!("resuming from {}", dir.display());
            InstructPix2PixTrainer::from_inner(
                load_text_to_image_checkpoint(&t2i, &dir, total, device)?,
                config.conditioning_dropout_prob,
            )
        }
        None => {
            let unet = load_instruct_pix2pix_unet(config, &inner)?;
            let scheduler = load_noise_scheduler(&config.pretrained_model)?;
            InstructPix2PixTrainer::new(config, unet, scheduler, total, device)?
        }
    };
    config.save(out.join("train_config.json"))?;
    let null_conditioning = match config.conditioning_dropout_prob {
        Some(_) => Some(frozen.encode_captions(&[""])?),
        None => None,
    };
    let start = trainer.inner().global_step();
    let log_path = out.join(LOG_FILE);
    truncate_log(&log_path, start)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let num_train = trainer.inner().scheduler().num_train_timesteps();
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
    let validate = |trainer: &InstructPix2PixTrainer, at: ValidationPoint| -> Result<()> {
        let Some((image, scheduler)) = &validation_inputs else {
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
        let parts = FrozenParts {
            tokenizer: &frozen.tokenizer,
            text_encoder,
            vae,
            scheduler,
        };
        let unet = trainer.inner().inference_unet();
        let path = save_instruct_pix2pix_validation(unet, parts, image, config, at)?;
        bar.println(format!("validation images: {}", path.display()));
        Ok(())
    };
    if start == 0 {
        // The starting weights, for comparison with the edits that follow.
        validate(&trainer, ValidationPoint { step: 0, epoch: 0 })?;
    }
    let mut parallel = match parallel_devices {
        Some(devices) => Some(trainer.inner().data_parallel(devices)?),
        None => None,
    };
    let mut batches = EpochBatches::new(
        config.seed,
        data.len(),
        t2i.global_batch_size(),
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
            let flips: Vec<bool> = g
                .rand(&[b])
                .into_iter()
                .map(|u| config.random_flip && u < 0.5)
                .collect();
            let (original, edited) = data.pixel_values(batch, &flips)?;
            let pixels =
                |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, 3, r, r]), &inner);
            let latents = frozen.encode_images(pixels(edited), &mut g)?;
            let original = cast_input(&frozen.vae, pixels(original));
            let original_image_embeds = to_f32(frozen.vae.encode(original)?.mode());
            let prompts: Vec<&str> = batch
                .iter()
                .map(|&i| data.example(i).prompt.as_str())
                .collect();
            let encoder_hidden_states = frozen.encode_captions(&prompts)?;
            let dims = latents.dims();
            let noise = Tensor::<4>::from_data(TensorData::new(g.randn(&dims), dims), &inner);
            let timesteps = g
                .rand(&[b])
                .into_iter()
                .map(|u| ((u as f64 * num_train as f64) as usize).min(num_train - 1))
                .collect();
            let dropout = null_conditioning
                .as_ref()
                .map(|null| (null.clone(), g.rand(&[b])));
            let edit = EditBatch {
                latents,
                original_image_embeds,
                encoder_hidden_states,
                dropout,
            };
            let draws = NoiseDraws {
                noise,
                offset_noise: None,
                perturbation: None,
                timesteps,
            };
            stats = match &mut parallel {
                Some(p) => trainer.step_data_parallel(p, &edit, &draws)?,
                None => trainer.step(&edit, &draws)?,
            };
        }
        let stats = match stats {
            Some(s) => s,
            None => {
                let stats = trainer.inner_mut().finish_step()?;
                if let Some(p) = &mut parallel {
                    p.sync(trainer.inner());
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
            save_text_to_image_checkpoint(trainer.inner(), &dir)?;
            bar.println(format!("saved {}", dir.display()));
            report.checkpoints.push(dir);
        }
        // The epoch ends with this step when the next step's first micro-batch is in a later one.
        let end_of_epoch = (step + 1) * k / batches_per_epoch > epoch;
        if config.validation_due(epoch, end_of_epoch, step + 1 == total) {
            let at = ValidationPoint {
                step: step + 1,
                epoch,
            };
            validate(&trainer, at)?;
        }
    }
    report.elapsed = began.elapsed();
    bar.finish_and_clear();
    save_pipeline(
        &config.pretrained_model,
        &trainer.inner().inference_unet(),
        out,
    )?;
    if validation_inputs.is_some() {
        write_validation_strip(out, total)?;
    }
    Ok(report)
}
