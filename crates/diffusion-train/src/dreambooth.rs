//! DreamBooth: diffusers' examples/dreambooth/train_dreambooth.py (the whole UNet) and
//! train_dreambooth_lora.py (a LoRA of it). A few instance images with one instance prompt
//! ("a photo of sks dog") teach the model a subject; with prior preservation, class images with
//! the class prompt ("a photo of dog") ride along in every batch, after the instance examples,
//! and the loss is `MSE(instance half) + prior_loss_weight * MSE(class half)`, as the scripts
//! compute it.
//!
//! The optimisation (AdamW, schedule, accumulation, clipping, checkpoints) is
//! [`TextToImageTrainer`]'s; only the loss differs. Class images come from a folder; when it
//! holds fewer than `num_class_images`, the missing ones are generated with the pretrained
//! pipeline first ([`crate::class_images`]).
//!
//! With `train_text_encoder` (LoRA runs only, train_dreambooth_lora.py's
//! `--train_text_encoder`), a LoRA of the CLIP text encoder's `q_proj`, `k_proj`, `v_proj` and
//! `out_proj` ([`LoraTrainConfig::text_encoder`], same rank) trains with the UNet's: every
//! micro-batch runs the adapted text encoder on the prompt ids, gradients are clipped by their
//! global norm over both LoRAs, and one AdamW (the script's single parameter group, one learning
//! rate) steps the UNet factors then the text-encoder factors ([`DreamBoothLoraFactors`]). Both
//! are saved into one `pytorch_lora_weights.safetensors`, as `save_lora_weights` writes them.

use std::fs::OpenOptions;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{FloatDType, Int, Tensor, TensorData};
use diffusion_core::weights::{NamedTensor, SafetensorsFile};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{CLIPTextModel, ModelMixin, UNet2DConditionModel};
use diffusion_schedulers::{AnyScheduler, DDPMScheduler, Scheduler};

use crate::caption_data::{CaptionDataset, CaptionDatasetOptions, tokenize_captions};
use crate::checkpoint::due_checkpoint;
use crate::class_images::generate_class_images;
use crate::data_parallel::{DataParallel, TextToImageParallel};
use crate::lora::{LORA_WEIGHT_NAME, LoraFactors, LoraTrainConfig, UNetLora, save_lora_weights};
use crate::lr_schedule::LrScheduleKind;
use crate::mixed_precision::{backward_scale, half_copy};
use crate::objective::{NoiseDraws, conditional_prediction};
use crate::optimizer::{FlatGradients, accumulation_share};
use crate::resize::Interpolation;
use crate::run::{EpochBatches, LOG_FILE, TrainReport, derived_seed, record_step, truncate_log};
use crate::text_to_image::{
    TextToImageConfig, TextToImageTrainer, forward_unet_of, load_noise_scheduler, micro_batch_loss,
};
use crate::text_to_image_run::{
    FrozenComponents, image_draws, load_text_to_image_checkpoint, open_lora_set_checkpoint,
    progress_bar, resolve_resume, restore_lora_set_progress, save_lora_set_checkpoint,
    save_pipeline, save_text_to_image_checkpoint,
};
use crate::trainer::StepStats;
use crate::validation::{
    FrozenParts, ValidationPoint, save_prompt_validation, write_validation_strip,
};

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
    /// Use at most this many class images, generating the missing ones
    /// (`--num_class_images`).
    pub num_class_images: usize,
    /// Prompts per pipeline call when generating class images (`--sample_batch_size`).
    pub sample_batch_size: usize,
    /// Denoising steps of that generation (the pipeline's default, 50, in the scripts).
    pub class_num_inference_steps: usize,
    /// Also train a LoRA of the text encoder (`--train_text_encoder`; LoRA runs only).
    pub train_text_encoder: bool,
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
            sample_batch_size: 4,
            class_num_inference_steps: 50,
            train_text_encoder: false,
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
        if self.train_text_encoder && self.train.lora.is_none() {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "is supported with a LoRA (train_dreambooth_lora.py), not full fine-tuning",
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
            for (name, value) in [
                ("num_class_images", self.num_class_images),
                ("sample_batch_size", self.sample_batch_size),
                ("class_num_inference_steps", self.class_num_inference_steps),
            ] {
                if value == 0 {
                    return Err(Error::invalid_argument(name, "must be positive"));
                }
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

    /// Check that the model folder and the instance folder exist, and that the class folder is
    /// a folder when it exists (a missing one is created and filled by generation).
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
            dirs.extend(self.class_data_dir.as_ref().filter(|d| d.exists()));
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
    trainer.refuse_flow_matching("prior preservation")?;
    let device = crate::optimizer::module_device(trainer.unet());
    let draws = NoiseDraws {
        noise: draws.noise.clone().to_device(&device),
        offset_noise: draws.offset_noise.clone().map(|t| t.to_device(&device)),
        perturbation: None,
        timesteps: draws.timesteps.clone(),
    };
    prior_preservation_loss(
        &trainer.forward_unet()?,
        trainer.scheduler(),
        trainer.objective(),
        latents.to_device(&device),
        encoder_hidden_states.to_device(&device),
        &draws,
        weight,
    )
}

/// `MSE(instance half) + weight * MSE(class half)` of `unet`'s prediction on a batch of
/// instance rows followed by as many class rows (inputs on `unet`'s device).
///
/// # Errors
/// As [`conditional_prediction`]; [`Error::InvalidArgument`] (`latents`) for an odd batch.
fn prior_preservation_loss(
    unet: &UNet2DConditionModel,
    scheduler: &DDPMScheduler,
    objective: &crate::objective::Objective,
    latents: Tensor<4>,
    encoder_hidden_states: Tensor<3>,
    draws: &NoiseDraws,
    weight: f64,
) -> Result<Tensor<1>> {
    let b = latents.dims()[0];
    if !b.is_multiple_of(2) {
        return Err(Error::invalid_argument(
            "latents",
            format!("a batch of {b} cannot be split into instance and class halves"),
        ));
    }
    let (pred, target) = conditional_prediction(
        unet,
        scheduler,
        objective,
        latents,
        encoder_hidden_states,
        draws,
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

/// Row indices as an index tensor on `device` (for `select` along the batch).
fn row_index(rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let values: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(values, [rows.len()]), device)
}

/// The last hidden state of `encoder` with `lora` applied for `input_ids` (on the encoder's
/// device). Under mixed precision the frozen encoder and the factors are cast to `dtype` inside
/// the autodiff graph (the f32 factors stay the masters), as for the UNet.
///
/// # Errors
/// [`Error::InvalidArgument`] (`dtype`) when the device does not support `dtype`; the text
/// encoder's errors.
fn adapted_text_states(
    encoder: &CLIPTextModel,
    lora: &UNetLora,
    dtype: Option<FloatDType>,
    input_ids: Tensor<2, Int>,
) -> Result<Tensor<3>> {
    let encoder = match dtype {
        Some(dtype) => {
            let mut half = lora.clone();
            half.set_factors(half_copy(lora.factors(), dtype)?);
            half.apply_to(&half_copy(encoder, dtype)?)
        }
        None => lora.apply_to(encoder),
    };
    Ok(encoder.forward(input_ids)?.last_hidden_state)
}

/// The replicas of what a DreamBooth run trains, one per device (see
/// [`DreamBoothTrainer::data_parallel`]).
#[derive(Debug)]
pub enum DreamBoothParallel {
    /// The UNet or its LoRA, as text-to-image training replicates them.
    Unet(TextToImageParallel),
    /// Both LoRAs of a `train_text_encoder` run: one replica of the factors per device, and the
    /// frozen UNet and text encoder on every device (the main device's first).
    TextEncoder {
        /// The factors' replicas.
        factors: DataParallel<DreamBoothLoraFactors>,
        /// The frozen UNet per device.
        unets: Vec<UNet2DConditionModel>,
        /// The frozen text encoder per device.
        encoders: Vec<CLIPTextModel>,
    },
}

impl DreamBoothParallel {
    /// The devices, the main one first.
    pub fn devices(&self) -> &[Device] {
        match self {
            Self::Unet(p) => p.devices(),
            Self::TextEncoder { factors, .. } => factors.devices(),
        }
    }

    /// Copy `trainer`'s current trained parameters into every other replica.
    pub fn sync(&mut self, trainer: &DreamBoothTrainer) {
        match self {
            Self::Unet(p) => p.sync(&trainer.inner),
            Self::TextEncoder { factors, .. } => {
                if let Some(main) = trainer.lora_factors() {
                    factors.sync(&main);
                }
            }
        }
    }
}

/// The factors one AdamW trains with `train_text_encoder`: the UNet LoRA's, then the text
/// encoder LoRA's (the script's `params_to_optimize` order).
#[derive(Module, Debug)]
pub struct DreamBoothLoraFactors {
    /// The UNet LoRA.
    pub unet: LoraFactors,
    /// The text-encoder LoRA.
    pub text_encoder: LoraFactors,
}

/// The text-encoder side of a `train_text_encoder` run.
#[derive(Debug)]
struct TextEncoderTraining {
    /// The frozen base encoder on the autodiff device.
    encoder: CLIPTextModel,
    lora: UNetLora,
}

/// A [`TextToImageTrainer`] whose loss is [`dreambooth_loss`], optionally with a trained
/// text-encoder LoRA.
#[derive(Debug)]
pub struct DreamBoothTrainer {
    inner: TextToImageTrainer,
    prior_loss_weight: Option<f64>,
    text: Option<TextEncoderTraining>,
}

impl DreamBoothTrainer {
    /// Start training `unet` (or `lora`, as [`TextToImageTrainer::new`]).
    ///
    /// # Errors
    /// As [`DreamBoothConfig::validate`] and [`TextToImageTrainer::new`];
    /// [`Error::InvalidArgument`] (`train_text_encoder`) when the config trains the text
    /// encoder (use [`Self::with_text_encoder`]).
    pub fn new(
        config: &DreamBoothConfig,
        unet: UNet2DConditionModel,
        lora: Option<UNetLora>,
        scheduler: DDPMScheduler,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if config.train_text_encoder {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "is set: build the trainer with DreamBoothTrainer::with_text_encoder",
            ));
        }
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
            text: None,
        })
    }

    /// Start training `unet_lora` on the frozen `unet` and `text_lora` (from
    /// [`UNetLora::new_text_encoder`]) on the frozen `text_encoder`, as train_dreambooth_lora.py
    /// does with `--train_text_encoder`; everything is moved onto `device` with autodiff.
    ///
    /// # Errors
    /// As [`Self::new`]; [`Error::InvalidArgument`] (`train_text_encoder`) when the config does
    /// not train the text encoder, (`lora`) when `text_lora` is not a text-encoder LoRA.
    #[allow(clippy::too_many_arguments)]
    pub fn with_text_encoder(
        config: &DreamBoothConfig,
        unet: UNet2DConditionModel,
        unet_lora: UNetLora,
        text_encoder: CLIPTextModel,
        text_lora: UNetLora,
        scheduler: DDPMScheduler,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if !config.train_text_encoder {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "is not set in the config",
            ));
        }
        if text_lora.component() != crate::lora::LoraComponent::TextEncoder {
            return Err(Error::invalid_argument(
                "lora",
                "the text-encoder LoRA must be built with UNetLora::new_text_encoder",
            ));
        }
        let inner = TextToImageTrainer::new(
            &config.train,
            unet,
            Some(unet_lora),
            scheduler,
            num_training_steps,
            device,
        )?;
        let ad = crate::autodiff::autodiff_device(device, config.train.gradient_checkpointing);
        Ok(Self {
            inner,
            prior_loss_weight: config.prior(),
            text: Some(TextEncoderTraining {
                encoder: crate::autodiff::checkpointed(text_encoder.fork(&ad).no_grad(), &ad),
                lora: text_lora.fork(&ad),
            }),
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

    /// The loss with the text encoder in the graph: the adapted encoder's last hidden state of
    /// `input_ids` (no attention mask, the script's default) as the UNet's conditioning.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]`, `input_ids`: `[B, S]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`train_text_encoder`) when the text encoder is not trained;
    /// as [`dreambooth_loss`] and the text encoder.
    pub fn loss_with_ids(
        &self,
        latents: Tensor<4>,
        input_ids: Tensor<2, Int>,
        draws: &NoiseDraws,
    ) -> Result<Tensor<1>> {
        let text = self.text_training()?;
        let device = crate::optimizer::module_device(self.inner.unet());
        let states = adapted_text_states(
            &text.encoder,
            &text.lora,
            self.inner.config().mixed_precision().dtype(),
            input_ids.to_device(&device),
        )?;
        self.loss(latents, states, draws)
    }

    fn text_training(&self) -> Result<&TextEncoderTraining> {
        self.text.as_ref().ok_or_else(|| {
            Error::invalid_argument("train_text_encoder", "the text encoder is not trained")
        })
    }

    /// Both LoRAs' factors (with `train_text_encoder`), on the autodiff device.
    pub fn lora_factors(&self) -> Option<DreamBoothLoraFactors> {
        let text = self.text.as_ref()?;
        Some(DreamBoothLoraFactors {
            unet: self.inner.lora()?.factors().clone(),
            text_encoder: text.lora.factors().clone(),
        })
    }

    /// The gradients of `loss` with respect to what is trained: [`DreamBoothLoraFactors`] with
    /// `train_text_encoder`, else as [`TextToImageTrainer::gradients`].
    pub fn gradients(&self, loss: Tensor<1>) -> FlatGradients {
        match self.lora_factors() {
            Some(factors) => FlatGradients::from_backward(&factors, loss.backward()),
            None => self.inner.gradients(loss),
        }
    }

    /// Gradients from [`Self::gradients`] of a `train_text_encoder` run under peft's names:
    /// `(UNet LoRA, text-encoder LoRA)`, each as [`UNetLora::state_dict`] names the factors.
    pub fn lora_gradient_state_dicts(
        &self,
        grads: &FlatGradients,
    ) -> Option<(Vec<NamedTensor>, Vec<NamedTensor>)> {
        let factors = self.lora_factors()?;
        let (mut unet, mut text) = (Vec::new(), Vec::new());
        for mut t in grads.state_dict(&factors) {
            let (side, rest) = t.key.split_once('.')?;
            let (is_unet, rest) = (side == "unet", rest.to_string());
            t.key = rest;
            if is_unet {
                unet.push(t);
            } else {
                text.push(t);
            }
        }
        let text_lora = &self.text.as_ref()?.lora;
        Some((
            self.inner.lora()?.name_factor_tensors(unet),
            text_lora.name_factor_tensors(text),
        ))
    }

    /// One micro-batch (see [`TextToImageTrainer::step_loss`]).
    ///
    /// # Errors
    /// As [`Self::loss`]; [`Error::InvalidArgument`] (`train_text_encoder`) when the text
    /// encoder is trained (its micro-batches go through [`Self::step_with_ids`]).
    pub fn step(
        &mut self,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        if self.text.is_some() {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the text encoder is trained: pass prompt ids to step_with_ids",
            ));
        }
        let loss = self.loss(latents, encoder_hidden_states, draws)?;
        self.inner.step_loss(loss)
    }

    /// One micro-batch of a `train_text_encoder` run: [`Self::loss_with_ids`], backward of
    /// `loss / gradient_accumulation_steps`, accumulate, and after the last micro-batch of a
    /// step the optimizer step ([`Self::finish_step`]).
    ///
    /// # Errors
    /// As [`Self::loss_with_ids`].
    pub fn step_with_ids(
        &mut self,
        latents: Tensor<4>,
        input_ids: Tensor<2, Int>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let loss = self.loss_with_ids(latents, input_ids, draws)?;
        let (scaled, value) = self.inner.backward_loss(loss);
        let grads = self.gradients(scaled);
        self.accumulate_text_micro_batch(grads, value)
    }

    /// Add one micro-batch's gradients (of `loss / gradient_accumulation_steps`, both LoRAs)
    /// and loss value of a `train_text_encoder` run; after the last micro-batch of a step, the
    /// optimizer step.
    fn accumulate_text_micro_batch(
        &mut self,
        grads: FlatGradients,
        value: f32,
    ) -> Result<Option<StepStats>> {
        if !self.inner.accumulate(grads, value)? {
            return Ok(None);
        }
        self.finish_step().map(Some)
    }

    /// Replicate what this run trains onto `devices` (the first must be the trainer's own
    /// device): the UNet or its LoRA, or with `train_text_encoder` both LoRAs' factors with the
    /// frozen UNet and text encoder copied onto every device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `devices` when the list is empty.
    pub fn data_parallel(&self, devices: Vec<Device>) -> Result<DreamBoothParallel> {
        let (Some(text), Some(factors)) = (&self.text, self.lora_factors()) else {
            return Ok(DreamBoothParallel::Unet(self.inner.data_parallel(devices)?));
        };
        let factors = DataParallel::new(devices, &factors)?;
        let unets = factors.frozen_copies(self.inner.unet());
        let encoders = factors.frozen_copies(&text.encoder);
        Ok(DreamBoothParallel::TextEncoder {
            factors,
            unets,
            encoders,
        })
    }

    /// [`Self::step`] over the devices of `parallel` (from [`Self::data_parallel`]), as DDP
    /// runs the scripts: with prior preservation `latents` hold the global batch's instance
    /// rows followed by as many class rows, and each device takes its shard of the instance
    /// rows together with the class rows paired with them, so its loss is
    /// `MSE(its instance rows) + prior_loss_weight * MSE(its class rows)`; the shards' losses
    /// are weighted by their share of the batch, which makes the step the single-device step
    /// on the global batch.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]` (`2b` rows with a prior), `encoder_hidden_states`: `[B, S, D]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `train_text_encoder` when the text encoder is trained
    /// (use [`Self::step_data_parallel_with_ids`]), `latents` when the batch does not split
    /// into halves; as [`TextToImageTrainer::step_data_parallel_by`].
    pub fn step_data_parallel(
        &mut self,
        parallel: &mut DreamBoothParallel,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let DreamBoothParallel::Unet(parallel) = parallel else {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the text encoder is trained: pass prompt ids to step_data_parallel_with_ids",
            ));
        };
        if self.text.is_some() {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the replicas were built without the text encoder; use \
                 DreamBoothTrainer::data_parallel",
            ));
        }
        let Some(weight) = self.prior_loss_weight else {
            return self
                .inner
                .step_data_parallel(parallel, latents, encoder_hidden_states, draws);
        };
        self.inner.refuse_flow_matching("prior preservation")?;
        let (batch, shard_rows) = self.shard_layout(&latents, draws)?;
        // Owned copies: the step below borrows the trainer mutably.
        let scheduler = self.inner.scheduler().clone();
        let objective = self.inner.objective().clone();
        self.inner
            .step_data_parallel_by(parallel, batch, |unet, rows, device| {
                let index = row_index(&shard_rows(&rows), device);
                let pick = |t: &Tensor<4>| t.clone().to_device(device).select(0, index.clone());
                let shard_draws = NoiseDraws {
                    noise: pick(&draws.noise),
                    offset_noise: draws.offset_noise.as_ref().map(pick),
                    perturbation: None,
                    timesteps: shard_rows(&rows)
                        .into_iter()
                        .map(|i| draws.timesteps[i])
                        .collect(),
                };
                prior_preservation_loss(
                    unet,
                    &scheduler,
                    &objective,
                    pick(&latents),
                    encoder_hidden_states
                        .clone()
                        .to_device(device)
                        .select(0, index.clone()),
                    &shard_draws,
                    weight,
                )
            })
    }

    /// [`Self::step_with_ids`] over the devices of `parallel` (from [`Self::data_parallel`]
    /// on a `train_text_encoder` trainer): every device runs its replica of both LoRAs, the
    /// adapted text encoder on its rows' prompt ids and the adapted UNet, with the rows split
    /// as [`Self::step_data_parallel`] splits them; the gradients of both LoRAs are gathered,
    /// accumulated, clipped together and stepped by the one AdamW, and the replicas synced.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]`, `input_ids`: `[B, S]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `train_text_encoder` when the text encoder is not
    /// trained or `parallel` was built without it; as [`Self::step_data_parallel`].
    pub fn step_data_parallel_with_ids(
        &mut self,
        parallel: &mut DreamBoothParallel,
        latents: Tensor<4>,
        input_ids: Tensor<2, Int>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let DreamBoothParallel::TextEncoder {
            factors: replicas,
            unets,
            encoders,
        } = &*parallel
        else {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the replicas were built without the text encoder; use \
                 DreamBoothTrainer::data_parallel",
            ));
        };
        let (Some(text), Some(unet_lora), Some(main)) =
            (&self.text, self.inner.lora(), self.lora_factors())
        else {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the text encoder is not trained",
            ));
        };
        if self.prior_loss_weight.is_some() {
            self.inner.refuse_flow_matching("prior preservation")?;
        }
        let (batch, shard_rows) = self.shard_layout(&latents, draws)?;
        let weight = self.prior_loss_weight;
        let k = self.inner.config().gradient_accumulation_steps.max(1);
        let dtype = self.inner.config().mixed_precision().dtype();
        let scale = backward_scale(self.inner.grad_scaler.as_ref());
        let scheduler = self.inner.scheduler().clone();
        let objective = self.inner.objective().clone();
        let flow = self.inner.flow_matching().cloned();
        // Each device gets both LoRAs' layouts (to carry its replica's factors) and its copies
        // of the frozen models.
        let contexts = unets
            .iter()
            .zip(encoders)
            .map(|(u, e)| (unet_lora.clone(), text.lora.clone(), u.clone(), e.clone()))
            .collect();
        let (value, grads) = replicas.loss_and_gradients_with(
            &main,
            batch,
            contexts,
            scale,
            |replica, (mut unet_layout, mut text_layout, unet, encoder), rows, device| {
                let index = row_index(&shard_rows(&rows), device);
                let pick = |t: &Tensor<4>| t.clone().to_device(device).select(0, index.clone());
                unet_layout.set_factors(replica.unet.clone());
                text_layout.set_factors(replica.text_encoder.clone());
                let ids = input_ids.clone().to_device(device).select(0, index.clone());
                let states = adapted_text_states(&encoder, &text_layout, dtype, ids)?;
                let unet = forward_unet_of(&unet, Some(&unet_layout), dtype)?;
                let shard_draws = NoiseDraws {
                    noise: pick(&draws.noise),
                    offset_noise: draws.offset_noise.as_ref().map(pick),
                    perturbation: draws.perturbation.as_ref().map(pick),
                    timesteps: shard_rows(&rows)
                        .into_iter()
                        .map(|i| draws.timesteps[i])
                        .collect(),
                };
                let latents = pick(&latents);
                let loss = match weight {
                    Some(w) => prior_preservation_loss(
                        &unet,
                        &scheduler,
                        &objective,
                        latents,
                        states,
                        &shard_draws,
                        w,
                    )?,
                    None => micro_batch_loss(
                        &unet,
                        &scheduler,
                        &objective,
                        flow.as_ref(),
                        latents,
                        states,
                        &shard_draws,
                    )?,
                };
                Ok(accumulation_share(loss, k))
            },
        )?;
        let stats = self.accumulate_text_micro_batch(grads, value)?;
        if stats.is_some() {
            parallel.sync(self);
        }
        Ok(stats)
    }

    /// How a data-parallel step splits a batch: the number of rows the shards divide (the
    /// instance half with prior preservation, else every row) and the batch rows of a shard
    /// (with a prior, its instance rows followed by their class rows).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `latents` for an odd batch with a prior, or draws that
    /// do not fit the batch.
    #[allow(clippy::type_complexity)]
    fn shard_layout(
        &self,
        latents: &Tensor<4>,
        draws: &NoiseDraws,
    ) -> Result<(usize, impl Fn(&Range<usize>) -> Vec<usize> + Sync + use<>)> {
        let b = latents.dims()[0];
        let paired = self.prior_loss_weight.is_some();
        if draws.timesteps.len() != b || (paired && !b.is_multiple_of(2)) {
            return Err(Error::invalid_argument(
                "latents",
                format!(
                    "a batch of {b} rows with {} timesteps{}",
                    draws.timesteps.len(),
                    if paired {
                        " cannot be split into instance and class halves"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let h = b / 2;
        let rows = move |rows: &Range<usize>| -> Vec<usize> {
            if paired {
                rows.clone().chain(h + rows.start..h + rows.end).collect()
            } else {
                rows.clone().collect()
            }
        };
        Ok((if paired { h } else { b }, rows))
    }

    /// Take the optimizer step on what was accumulated: clip over both LoRAs, one AdamW (the
    /// inner trainer's) at the scheduled rate (or [`TextToImageTrainer::finish_step`] without a
    /// trained text encoder).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`step`) when nothing was accumulated.
    pub fn finish_step(&mut self) -> Result<StepStats> {
        let Some(factors) = self.lora_factors() else {
            return self.inner.finish_step();
        };
        let (grads, loss) = self.inner.take_pending()?;
        let (stats, factors) = self.inner.step_module(factors, grads, loss)?;
        if let (Some(factors), Some(text)) = (factors, self.text.as_mut()) {
            if let Some(lora) = self.inner.lora.as_mut() {
                lora.set_factors(factors.unet);
            }
            text.lora.set_factors(factors.text_encoder);
        }
        Ok(stats)
    }

    /// Whether micro-batches of an unfinished optimizer step are pending.
    pub fn has_pending(&self) -> bool {
        self.inner.has_pending()
    }

    /// The text-encoder LoRA, with `train_text_encoder`.
    pub fn text_encoder_lora(&self) -> Option<&UNetLora> {
        self.text.as_ref().map(|t| &t.lora)
    }

    /// Write the LoRA file of the run (UNet, and text encoder when trained), as
    /// train_dreambooth_lora.py's `save_lora_weights` call does.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`lora`) for a full fine-tuning run; as
    /// [`save_lora_weights`].
    pub fn save_lora_weights(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let unet = self
            .inner
            .lora()
            .ok_or_else(|| Error::invalid_argument("lora", "this run trains no LoRA"))?;
        match self.text_encoder_lora() {
            Some(text) => save_lora_weights(path, &[unet, text]),
            None => save_lora_weights(path, &[unet]),
        }
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

/// Write a `train_text_encoder` checkpoint: both LoRAs in `pytorch_lora_weights.safetensors`,
/// the AdamW state of [`DreamBoothLoraFactors`] in `optimizer/`, `training_state.json`; through
/// a temporary sibling renamed at the end.
fn save_text_encoder_checkpoint(trainer: &DreamBoothTrainer, dir: &std::path::Path) -> Result<()> {
    match trainer.lora_factors() {
        Some(factors) => save_lora_set_checkpoint(
            &trainer.inner,
            &factors,
            |path| trainer.save_lora_weights(path),
            dir,
        ),
        None => save_text_to_image_checkpoint(&trainer.inner, dir),
    }
}

/// Rebuild a `train_text_encoder` trainer from a checkpoint [`save_text_encoder_checkpoint`]
/// wrote.
fn load_text_encoder_checkpoint(
    config: &DreamBoothConfig,
    dir: &std::path::Path,
    num_training_steps: usize,
    device: &Device,
) -> Result<DreamBoothTrainer> {
    let (state, file) = open_lora_set_checkpoint(dir, num_training_steps)?;
    let mut trainer = new_text_encoder_trainer(config, num_training_steps, device, Some(&file))?;
    let factors = trainer.lora_factors().ok_or_else(|| {
        Error::invalid_argument("resume_from_checkpoint", "no text-encoder LoRA to restore")
    })?;
    restore_lora_set_progress(&mut trainer.inner, &factors, &state, dir)?;
    Ok(trainer)
}

/// A `train_text_encoder` trainer from the pretrained folder, its LoRAs initialised from the
/// run's seed (the text encoder's from the seed + 1) or read from a checkpoint's LoRA file.
fn new_text_encoder_trainer(
    config: &DreamBoothConfig,
    num_training_steps: usize,
    device: &Device,
    from: Option<&SafetensorsFile>,
) -> Result<DreamBoothTrainer> {
    let t = &config.train;
    let inner = device.clone().without_autodiff();
    let lora_config = t
        .lora
        .as_ref()
        .ok_or_else(|| Error::invalid_argument("train_text_encoder", "needs a LoRA run"))?;
    let unet = UNet2DConditionModel::from_pretrained(t.pretrained_model.join("unet"), &inner)?;
    let mut unet_lora = UNetLora::new(&unet, lora_config, t.seed, &inner)?;
    let text_encoder =
        CLIPTextModel::from_pretrained(t.pretrained_model.join("text_encoder"), &inner)?;
    let text_config = LoraTrainConfig {
        alpha: lora_config.alpha,
        ..LoraTrainConfig::text_encoder(lora_config.rank)
    };
    let mut text_lora =
        UNetLora::new_text_encoder(&text_encoder, &text_config, t.seed.wrapping_add(1), &inner)?;
    if let Some(file) = from {
        unet_lora.load_factors(file, "unet.")?;
        text_lora.load_factors(file, "text_encoder.")?;
    }
    let scheduler = load_noise_scheduler(&t.pretrained_model)?;
    DreamBoothTrainer::with_text_encoder(
        config,
        unet,
        unet_lora,
        text_encoder,
        text_lora,
        scheduler,
        num_training_steps,
        device,
    )
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
    // With `devices`, the first of them is the main device (see `crate::data_parallel`).
    let parallel_devices = match t.devices.as_slice() {
        [] => None,
        names => Some(crate::data_parallel::parse_devices(names)?),
    };
    let device = parallel_devices.as_ref().map_or(device, |d| &d[0]);
    let inner = device.clone().without_autodiff();
    let generated = generate_class_images(config, &inner)?;
    if !generated.is_empty() {
        log::info!("generated {} class images", generated.len());
    }
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
    // Mixed precision: the frozen VAE and text encoder run in the half dtype (the scripts'
    // `weight_dtype`).
    let frozen = match t.mixed_precision().dtype() {
        Some(dtype) => frozen.to_dtype(dtype)?,
        None => frozen,
    };
    let total = t.num_training_steps(len);
    let batches_per_epoch = t.batches_per_epoch(len);
    let k = t.gradient_accumulation_steps;
    let out = &t.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;
    let mut trainer = match resolve_resume(t)? {
        Some(dir) if config.train_text_encoder => {
            load_text_encoder_checkpoint(config, &dir, total, device)?
        }
        Some(dir) => DreamBoothTrainer {
            inner: load_text_to_image_checkpoint(t, &dir, total, device)?,
            prior_loss_weight: config.prior(),
            text: None,
        },
        None if config.train_text_encoder => new_text_encoder_trainer(config, total, device, None)?,
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
    let mut parallel = match parallel_devices {
        Some(devices) => Some(trainer.data_parallel(devices)?),
        None => None,
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
    // The instance and class prompts never change: tokenize them once, and encode them once
    // when the text encoder is frozen.
    let ids = |p: &str| tokenize_captions(&frozen.tokenizer, &[p])?.input_ids_tensor(&inner);
    let instance_ids = ids(&config.instance_prompt)?;
    let class_ids = match &config.class_prompt {
        Some(p) if classes.is_some() => Some(ids(p)?),
        _ => None,
    };
    let instance_state = frozen.encode_captions(&[config.instance_prompt.as_str()])?;
    let class_state = match &config.class_prompt {
        Some(p) if classes.is_some() => Some(frozen.encode_captions(&[p.as_str()])?),
        _ => None,
    };
    let validation = &t.validation;
    let validation_scheduler = if validation.is_enabled() {
        Some(AnyScheduler::from_config_file(
            t.pretrained_model.join("scheduler"),
        )?)
    } else {
        None
    };
    let validate = |trainer: &DreamBoothTrainer, at: ValidationPoint| -> Result<()> {
        let Some(scheduler) = &validation_scheduler else {
            return Ok(());
        };
        let path = dreambooth_validation(trainer, &frozen, scheduler, t, at)?;
        bar.println(format!("validation images: {}", path.display()));
        Ok(())
    };
    if start == 0 {
        // The starting weights, for comparison with the images that follow.
        validate(&trainer, ValidationPoint { step: 0, epoch: 0 })?;
    }
    let mut batches = EpochBatches::new(t.seed, len, t.global_batch_size(), batches_per_epoch);
    let began = Instant::now();
    for step in start..total {
        let mut stats = None;
        let mut epoch = 0;
        for j in 0..k {
            let m = step * k + j;
            let (e, batch) = batches.batch(m);
            epoch = e;
            let b = batch.len();
            let mut g = TorchGenerator::new(derived_seed(t.seed, 0, m as u64));
            let total_b = if classes.is_some() { 2 * b } else { b };
            let draws = image_draws(&mut g, total_b);
            let inst: Vec<usize> = batch.iter().map(|&i| i % n_instance).collect();
            let mut pixels = instances.pixel_values(&inst, &draws[..b])?;
            let mut states = vec![instance_state.clone(); b];
            let mut prompt_ids = vec![instance_ids.clone(); b];
            if let (Some(classes), Some(n), Some(cs), Some(ci)) =
                (&classes, n_class, &class_state, &class_ids)
            {
                let cls: Vec<usize> = batch.iter().map(|&i| i % n).collect();
                pixels.extend(classes.pixel_values(&cls, &draws[b..])?);
                states.extend(std::iter::repeat_n(cs.clone(), b));
                prompt_ids.extend(std::iter::repeat_n(ci.clone(), b));
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
            stats = match &mut parallel {
                Some(p) if config.train_text_encoder => trainer.step_data_parallel_with_ids(
                    p,
                    latents,
                    Tensor::cat(prompt_ids, 0),
                    &noise_draws,
                )?,
                Some(p) => trainer.step_data_parallel(p, latents, states, &noise_draws)?,
                None if config.train_text_encoder => {
                    trainer.step_with_ids(latents, Tensor::cat(prompt_ids, 0), &noise_draws)?
                }
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
        record_step(&stats, epoch, None, &mut log, &log_path, &bar)?;
        report.steps.push(stats);
        report.global_step = step + 1;
        if let Some(dir) = due_checkpoint(
            out,
            step + 1,
            t.checkpointing_steps,
            t.checkpoints_total_limit,
        )? {
            save_text_encoder_checkpoint(&trainer, &dir)?;
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
    match trainer.inner.lora() {
        Some(_) => trainer.save_lora_weights(out.join(LORA_WEIGHT_NAME))?,
        None => save_pipeline(&t.pretrained_model, &trainer.inner.inference_unet(), out)?,
    }
    if validation.is_enabled() {
        write_validation_strip(out, total)?;
    }
    Ok(report)
}

/// One validation grid of a DreamBooth run: the pipeline of the UNet being trained (LoRA
/// merged) and, with `train_text_encoder`, the text encoder with its LoRA merged; the frozen
/// parts in f32. Reads the weights only.
fn dreambooth_validation(
    trainer: &DreamBoothTrainer,
    frozen: &FrozenComponents,
    scheduler: &AnyScheduler,
    t: &TextToImageConfig,
    at: ValidationPoint,
) -> Result<std::path::PathBuf> {
    let widen = |m: CLIPTextModel| -> Result<CLIPTextModel> {
        match t.mixed_precision().dtype() {
            Some(_) => to_dtype(m, FloatDType::F32),
            None => Ok(m),
        }
    };
    let text_encoder = match &trainer.text {
        Some(text) => widen(text.lora.apply_to(&text.encoder).valid())?,
        None => widen(frozen.text_encoder.clone())?,
    };
    let vae = match t.mixed_precision().dtype() {
        Some(_) => to_dtype(frozen.vae.clone(), FloatDType::F32)?,
        None => frozen.vae.clone(),
    };
    let parts = FrozenParts {
        tokenizer: &frozen.tokenizer,
        text_encoder: &text_encoder,
        vae: &vae,
        scheduler,
    };
    save_prompt_validation(
        trainer.inner.inference_unet(),
        parts,
        &t.validation,
        t.seed,
        &t.output_dir,
        at,
    )
}
