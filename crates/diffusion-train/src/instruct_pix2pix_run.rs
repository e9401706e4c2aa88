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

use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Device, Error, NoiseSource, Result, TorchGenerator};
use diffusion_models::{ModelMixin, UNet2DConditionModel};
use diffusion_schedulers::Scheduler;

use crate::checkpoint::due_checkpoint;
use crate::instruct_pix2pix::{
    EditBatch, EditDataset, InstructPix2PixConfig, InstructPix2PixTrainer, default_conv_bias,
    widen_conv_in,
};
use crate::objective::NoiseDraws;
use crate::run::{LOG_FILE, TrainReport, derived_seed, epoch_order, record_step, truncate_log};
use crate::text_to_image::load_noise_scheduler;
use crate::text_to_image_run::{
    FrozenComponents, load_text_to_image_checkpoint, progress_bar, resolve_resume, save_pipeline,
    save_text_to_image_checkpoint,
};

/// Seed domain of the widened `conv_in` bias (0: steps, 1: epochs, 2: cached latents).
const CONV_IN_DOMAIN: u64 = 3;
/// The UNet input channels of InstructPix2Pix (noisy latents and original-image latents).
pub const INSTRUCT_PIX2PIX_IN_CHANNELS: usize = 8;

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
/// checkpoints, `logs/train_log.jsonl` and the pipeline into `config.output_dir`.
///
/// # Errors
/// As [`InstructPix2PixConfig::validate`] and [`InstructPix2PixConfig::check_paths`]; dataset,
/// model, checkpoint and I/O errors; [`Error::InvalidArgument`] naming `learning_rate` when the
/// loss becomes non-finite.
pub fn train_instruct_pix2pix(
    config: &InstructPix2PixConfig,
    device: &Device,
) -> Result<TrainReport> {
    config.validate()?;
    config.check_paths()?;
    let t2i = config.text_to_image();
    let inner = device.clone().without_autodiff();
    let data = EditDataset::from_folder(&config.train_data_dir, config)?;
    let frozen = FrozenComponents::load(&config.pretrained_model, &inner)?;
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
    let sf = frozen.vae.config().scaling_factor;
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
    let mut order: Option<(usize, Vec<usize>)> = None;
    let began = Instant::now();
    for step in start..total {
        let mut stats = None;
        let mut epoch = 0;
        for j in 0..k {
            let m = step * k + j;
            epoch = m / batches_per_epoch;
            let position = m % batches_per_epoch;
            if order.as_ref().is_some_and(|(e, _)| *e != epoch) {
                order = None;
            }
            let (_, indices) =
                order.get_or_insert_with(|| (epoch, epoch_order(config.seed, epoch, data.len())));
            let begin = position * config.train_batch_size;
            let batch = &indices[begin..(begin + config.train_batch_size).min(indices.len())];
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
            let latents = frozen
                .vae
                .encode(pixels(edited))?
                .sample(Some(NoiseSource::Single(&mut g)))?
                .mul_scalar(sf);
            let original_image_embeds = frozen.vae.encode(pixels(original))?.mode();
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
            stats = trainer.step(&edit, &draws)?;
        }
        let stats = match stats {
            Some(s) => s,
            None => trainer.inner_mut().finish_step()?,
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
    }
    report.elapsed = began.elapsed();
    bar.finish_and_clear();
    save_pipeline(
        &config.pretrained_model,
        &trainer.inner().inference_unet(),
        out,
    )?;
    Ok(report)
}
