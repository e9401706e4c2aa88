//! DreamBooth: diffusers' examples/dreambooth/train_dreambooth.py (the whole UNet) and
//! train_dreambooth_lora.py (a LoRA of it). A few instance images with one instance prompt
//! ("a photo of sks dog") teach the model a subject; with prior preservation, class images with
//! the class prompt ("a photo of dog") ride along in every batch, after the instance examples,
//! and the loss is `MSE(instance half) + prior_loss_weight * MSE(class half)`, as the scripts
//! compute it.
//!
//! The optimisation (AdamW, schedule, accumulation, clipping, checkpoints) is
//! [`TextToImageTrainer`]'s; only the loss differs. Class images come from a folder
//! (generating missing ones with the pipeline is not implemented). The text encoder is not
//! trained (`--train_text_encoder` is refused).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_models::{ModelMixin, UNet2DConditionModel};
use diffusion_schedulers::{DDPMScheduler, Scheduler};

use crate::caption_data::{CaptionDataset, CaptionDatasetOptions};
use crate::checkpoint::{CHECKPOINT_PREFIX, prune_checkpoints};
use crate::lora::{LORA_WEIGHT_NAME, LoraTrainConfig, UNetLora};
use crate::lr_schedule::LrScheduleKind;
use crate::objective::{NoiseDraws, conditional_prediction};
use crate::resize::Interpolation;
use crate::run::{LOG_FILE, LogEntry, TrainReport, derived_seed, epoch_order, truncate_log};
use crate::text_to_image::{TextToImageConfig, TextToImageTrainer, load_noise_scheduler};
use crate::text_to_image_run::{
    FrozenComponents, image_draws, load_text_to_image_checkpoint, progress_bar, resolve_resume,
    save_pipeline, save_text_to_image_checkpoint,
};
use crate::trainer::StepStats;

/// Settings of a DreamBooth run: the scripts' data and prior-preservation options, and the
/// optimisation settings they share with text-to-image training in `train`
/// (`train.train_data_dir` and `train.caption_column` are unused).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DreamBoothConfig {
    /// The images of the subject (`--instance_data_dir`).
    pub instance_data_dir: PathBuf,
    /// Their prompt, with the identifier (`--instance_prompt`, e.g. "a photo of sks dog").
    pub instance_prompt: String,
    /// Images of the class (`--class_data_dir`), needed with prior preservation.
    pub class_data_dir: Option<PathBuf>,
    /// Their prompt (`--class_prompt`, e.g. "a photo of dog").
    pub class_prompt: Option<String>,
    /// Add the prior-preservation loss.
    pub with_prior_preservation: bool,
    /// Its weight.
    pub prior_loss_weight: f64,
    /// Use at most this many class images (`--num_class_images`).
    pub num_class_images: usize,
    /// Optimisation, model, output and checkpoint settings.
    pub train: TextToImageConfig,
}

impl Default for DreamBoothConfig {
    /// train_dreambooth.py's defaults.
    fn default() -> Self {
        Self {
            instance_data_dir: PathBuf::new(),
            instance_prompt: String::new(),
            class_data_dir: None,
            class_prompt: None,
            with_prior_preservation: false,
            prior_loss_weight: 1.0,
            num_class_images: 100,
            train: TextToImageConfig {
                output_dir: PathBuf::from("text-inversion-model"),
                resolution: 512,
                center_crop: false,
                random_flip: false,
                image_interpolation_mode: Interpolation::Bilinear,
                train_batch_size: 4,
                num_train_epochs: 1,
                learning_rate: 5e-6,
                lr_scheduler: LrScheduleKind::Constant,
                lr_warmup_steps: 500,
                max_grad_norm: Some(1.0),
                ..TextToImageConfig::default()
            },
        }
    }
}

impl DreamBoothConfig {
    /// train_dreambooth_lora.py's defaults: a rank-4 LoRA, learning rate 5e-4.
    pub fn lora_defaults() -> Self {
        let mut c = Self::default();
        c.train.output_dir = PathBuf::from("lora-dreambooth-model");
        c.train.learning_rate = 5e-4;
        c.train.lora = Some(LoraTrainConfig::default());
        c
    }

    /// The prior-preservation weight when enabled.
    pub fn prior(&self) -> Option<f64> {
        self.with_prior_preservation
            .then_some(self.prior_loss_weight)
    }

    /// Check the settings on their own, before anything is loaded.
    ///
    /// # Errors
    /// As [`TextToImageConfig::validate`]; [`Error::InvalidArgument`] naming the field for an
    /// empty prompt, prior preservation without class data or prompt, a negative weight, and
    /// options the scripts do not have (`use_ema`, `input_perturbation`) or cannot combine
    /// (`snr_gamma` with prior preservation: the script's weights would not fit the halves).
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        if self.instance_prompt.trim().is_empty() {
            return Err(Error::invalid_argument("instance_prompt", "is empty"));
        }
        if self.train.use_ema {
            return Err(Error::invalid_argument(
                "use_ema",
                "the DreamBooth scripts keep no EMA",
            ));
        }
        if self.train.input_perturbation != 0.0 {
            return Err(Error::invalid_argument(
                "input_perturbation",
                "the DreamBooth scripts have no input perturbation",
            ));
        }
        if self.with_prior_preservation {
            if self.class_data_dir.is_none() {
                return Err(Error::invalid_argument(
                    "class_data_dir",
                    "prior preservation needs class images",
                ));
            }
            if self
                .class_prompt
                .as_deref()
                .is_none_or(|p| p.trim().is_empty())
            {
                return Err(Error::invalid_argument(
                    "class_prompt",
                    "prior preservation needs a class prompt",
                ));
            }
            if !(self.prior_loss_weight >= 0.0 && self.prior_loss_weight.is_finite()) {
                return Err(Error::invalid_argument(
                    "prior_loss_weight",
                    format!("{} is not a non-negative number", self.prior_loss_weight),
                ));
            }
            if self.num_class_images == 0 {
                return Err(Error::invalid_argument(
                    "num_class_images",
                    "must be positive",
                ));
            }
            if self.train.snr_gamma.is_some() {
                return Err(Error::invalid_argument(
                    "snr_gamma",
                    "Min-SNR weighting with prior preservation is not supported",
                ));
            }
        }
        Ok(())
    }

    /// Check that the model folder and the image folders exist.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the missing folder.
    pub fn check_paths(&self) -> Result<()> {
        for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            let dir = self.train.pretrained_model.join(sub);
            if !dir.is_dir() {
                return Err(Error::NotFound {
                    path: dir,
                    message: "the pretrained model must be a diffusers Stable Diffusion folder"
                        .into(),
                });
            }
        }
        let mut dirs = vec![&self.instance_data_dir];
        if self.with_prior_preservation {
            dirs.extend(self.class_data_dir.as_ref());
        }
        for dir in dirs {
            if !dir.is_dir() {
                return Err(Error::NotFound {
                    path: dir.clone(),
                    message: "the images must be a folder".into(),
                });
            }
        }
        Ok(())
    }
}

/// The DreamBooth loss on a batch of instance examples followed (with `prior_loss_weight`) by
/// as many class examples: `MSE(instance) + prior_loss_weight * MSE(class)`, else the
/// text-to-image loss.
///
/// # Shapes
/// - `latents`: `[B, C, H, W]`, `encoder_hidden_states`: `[B, S, D]`, `B` even with a prior
///
/// # Errors
/// As [`conditional_prediction`]; [`Error::InvalidArgument`] (`latents`) for an odd batch with
/// prior preservation.
pub fn dreambooth_loss(
    trainer: &TextToImageTrainer,
    latents: Tensor<4>,
    encoder_hidden_states: Tensor<3>,
    draws: &NoiseDraws,
    prior_loss_weight: Option<f64>,
) -> Result<Tensor<1>> {
    let Some(weight) = prior_loss_weight else {
        return trainer.loss(latents, encoder_hidden_states, draws);
    };
    let b = latents.dims()[0];
    if !b.is_multiple_of(2) {
        return Err(Error::invalid_argument(
            "latents",
            format!("a batch of {b} cannot be split into instance and class halves"),
        ));
    }
    let device = crate::optimizer::module_device(trainer.unet());
    let draws = NoiseDraws {
        noise: draws.noise.clone().to_device(&device),
        offset_noise: draws.offset_noise.clone().map(|t| t.to_device(&device)),
        perturbation: None,
        timesteps: draws.timesteps.clone(),
    };
    let (pred, target) = conditional_prediction(
        &trainer.effective_unet(),
        trainer.scheduler(),
        trainer.objective(),
        latents.to_device(&device),
        encoder_hidden_states.to_device(&device),
        &draws,
    )?;
    let h = b / 2;
    let instance = pred
        .clone()
        .narrow(0, 0, h)
        .sub(target.clone().narrow(0, 0, h))
        .square()
        .mean();
    let prior = pred
        .narrow(0, h, h)
        .sub(target.narrow(0, h, h))
        .square()
        .mean();
    Ok(instance.add(prior.mul_scalar(weight)))
}

/// A [`TextToImageTrainer`] whose loss is [`dreambooth_loss`].
#[derive(Debug)]
pub struct DreamBoothTrainer {
    inner: TextToImageTrainer,
    prior_loss_weight: Option<f64>,
}

impl DreamBoothTrainer {
    /// Start training `unet` (or `lora`, as [`TextToImageTrainer::new`]).
    ///
    /// # Errors
    /// As [`DreamBoothConfig::validate`] and [`TextToImageTrainer::new`].
    pub fn new(
        config: &DreamBoothConfig,
        unet: UNet2DConditionModel,
        lora: Option<UNetLora>,
        scheduler: DDPMScheduler,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            inner: TextToImageTrainer::new(
                &config.train,
                unet,
                lora,
                scheduler,
                num_training_steps,
                device,
            )?,
            prior_loss_weight: config.prior(),
        })
    }

    /// The loss of the current weights (see [`dreambooth_loss`]).
    ///
    /// # Errors
    /// As [`dreambooth_loss`].
    pub fn loss(
        &self,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        draws: &NoiseDraws,
    ) -> Result<Tensor<1>> {
        dreambooth_loss(
            &self.inner,
            latents,
            encoder_hidden_states,
            draws,
            self.prior_loss_weight,
        )
    }

    /// One micro-batch (see [`TextToImageTrainer::step_loss`]).
    ///
    /// # Errors
    /// As [`Self::loss`].
    pub fn step(
        &mut self,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let loss = self.loss(latents, encoder_hidden_states, draws)?;
        self.inner.step_loss(loss)
    }

    /// The optimisation underneath (weights, LoRA, optimizer, gradients).
    pub fn inner(&self) -> &TextToImageTrainer {
        &self.inner
    }

    /// Mutable access to it (to finish a step at the end of an epoch).
    pub fn inner_mut(&mut self) -> &mut TextToImageTrainer {
        &mut self.inner
    }
}

/// Train as train_dreambooth.py (or, with `config.train.lora`, train_dreambooth_lora.py) does.
/// The dataset has `max(instance images, class images)` examples with prior preservation
/// (example `i` pairs instance `i % n_instance` with class `i % n_class`), else one per
/// instance image; batches are shuffled per epoch and draw as in
/// [`crate::text_to_image_run`] (one crop draw per image, instance images first). Writes
/// checkpoints (resumable with `train.resume_from_checkpoint`), `logs/train_log.jsonl` and the
/// pipeline folder or `pytorch_lora_weights.safetensors`.
///
/// # Errors
/// As [`DreamBoothConfig::validate`] and [`DreamBoothConfig::check_paths`]; dataset, model,
/// checkpoint and I/O errors; [`Error::InvalidArgument`] (`learning_rate`) for a non-finite loss.
pub fn train_dreambooth(config: &DreamBoothConfig, device: &Device) -> Result<TrainReport> {
    config.validate()?;
    config.check_paths()?;
    let t = &config.train;
    let inner = device.clone().without_autodiff();
    let options = CaptionDatasetOptions {
        resolution: t.resolution,
        center_crop: t.center_crop,
        random_flip: t.random_flip,
        interpolation: t.image_interpolation_mode,
        caption_column: t.caption_column.clone(),
    };
    let instances =
        CaptionDataset::from_image_folder(&config.instance_data_dir, "", options.clone())?;
    let classes = match (config.with_prior_preservation, &config.class_data_dir) {
        (true, Some(dir)) => Some(CaptionDataset::from_image_folder(dir, "", options)?),
        _ => None,
    };
    let n_instance = instances.len();
    let n_class = classes
        .as_ref()
        .map(|c| c.len().min(config.num_class_images));
    let len = n_class.map_or(n_instance, |n| n.max(n_instance));
    let frozen = FrozenComponents::load(&t.pretrained_model, &inner)?;
    let total = t.num_training_steps(len);
    let batches_per_epoch = t.batches_per_epoch(len);
    let k = t.gradient_accumulation_steps;
    let out = &t.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;
    let mut trainer = match resolve_resume(t)? {
        Some(dir) => DreamBoothTrainer {
            inner: load_text_to_image_checkpoint(t, &dir, total, device)?,
            prior_loss_weight: config.prior(),
        },
        None => {
            let unet =
                UNet2DConditionModel::from_pretrained(t.pretrained_model.join("unet"), &inner)?;
            let lora = match &t.lora {
                Some(l) => Some(UNetLora::new(&unet, l, t.seed, &inner)?),
                None => None,
            };
            let scheduler = load_noise_scheduler(&t.pretrained_model)?;
            DreamBoothTrainer::new(config, unet, lora, scheduler, total, device)?
        }
    };
    let text = serde_json::to_string_pretty(config).unwrap_or_default();
    diffusion_core::config::write_atomically(&out.join("train_config.json"), text.as_bytes())?;
    let start = trainer.inner.global_step();
    let log_path = out.join(LOG_FILE);
    truncate_log(&log_path, start)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let num_train = trainer.inner.scheduler().num_train_timesteps();
    let offset = trainer.inner.objective().noise_offset;
    let r = t.resolution;
    let bar = progress_bar(t.show_progress, total, start);
    let mut report = TrainReport {
        start_step: start,
        global_step: start,
        num_training_steps: total,
        steps: Vec::new(),
        checkpoints: Vec::new(),
        pipeline_dir: out.clone(),
        elapsed: Duration::ZERO,
    };
    // The instance and class prompts never change: encode them once.
    let instance_state = frozen.encode_captions(&[config.instance_prompt.as_str()])?;
    let class_state = match &config.class_prompt {
        Some(p) if classes.is_some() => Some(frozen.encode_captions(&[p.as_str()])?),
        _ => None,
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
                order.get_or_insert_with(|| (epoch, epoch_order(t.seed, epoch, len)));
            let begin = position * t.train_batch_size;
            let batch = &indices[begin..(begin + t.train_batch_size).min(indices.len())];
            let b = batch.len();
            let mut g = TorchGenerator::new(derived_seed(t.seed, 0, m as u64));
            let total_b = if classes.is_some() { 2 * b } else { b };
            let draws = image_draws(&mut g, total_b);
            let inst: Vec<usize> = batch.iter().map(|&i| i % n_instance).collect();
            let mut pixels = instances.pixel_values(&inst, &draws[..b])?;
            let mut states = vec![instance_state.clone(); b];
            if let (Some(classes), Some(n), Some(cs)) = (&classes, n_class, &class_state) {
                let cls: Vec<usize> = batch.iter().map(|&i| i % n).collect();
                pixels.extend(classes.pixel_values(&cls, &draws[b..])?);
                states.extend(std::iter::repeat_n(cs.clone(), b));
            }
            let pixels =
                Tensor::<4>::from_data(TensorData::new(pixels, [total_b, 3, r, r]), &inner);
            let latents = frozen.encode_images(pixels, &mut g)?;
            let states = Tensor::cat(states, 0);
            let dims = latents.dims();
            let randn = |g: &mut TorchGenerator, shape: [usize; 4]| {
                Tensor::<4>::from_data(TensorData::new(g.randn(&shape), shape), &inner)
            };
            let noise = randn(&mut g, dims);
            let offset_noise = (offset > 0.0).then(|| randn(&mut g, [dims[0], dims[1], 1, 1]));
            let timesteps = g
                .rand(&[total_b])
                .into_iter()
                .map(|u| ((u as f64 * num_train as f64) as usize).min(num_train - 1))
                .collect();
            let noise_draws = NoiseDraws {
                noise,
                offset_noise,
                perturbation: None,
                timesteps,
            };
            stats = trainer.step(latents, states, &noise_draws)?;
        }
        let stats = match stats {
            Some(s) => s,
            None => trainer.inner.finish_step()?,
        };
        if !stats.loss.is_finite() {
            return Err(Error::invalid_argument(
                "learning_rate",
                format!(
                    "the loss became {} at step {}; lower the learning rate",
                    stats.loss, stats.step
                ),
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
        bar.set_message(format!("loss {:.4} lr {:.2e}", stats.loss, stats.lr));
        bar.inc(1);
        report.steps.push(stats);
        report.global_step = step + 1;
        if (step + 1).is_multiple_of(t.checkpointing_steps) {
            if let Some(limit) = t.checkpoints_total_limit {
                prune_checkpoints(out, limit - 1)?;
            }
            let dir = out.join(format!("{CHECKPOINT_PREFIX}{}", step + 1));
            save_text_to_image_checkpoint(&trainer.inner, &dir)?;
            report.checkpoints.push(dir);
        }
    }
    report.elapsed = began.elapsed();
    bar.finish_and_clear();
    match trainer.inner.lora() {
        Some(lora) => lora.save(out.join(LORA_WEIGHT_NAME))?,
        None => save_pipeline(&t.pretrained_model, &trainer.inner.inference_unet(), out)?,
    }
    Ok(report)
}
