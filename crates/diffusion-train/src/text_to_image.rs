//! Text-to-image fine-tuning of a Stable Diffusion `UNet2DConditionModel`, whole or through a
//! LoRA: diffusers' examples/text_to_image/train_text_to_image.py and
//! train_text_to_image_lora.py. The text encoder and the VAE stay frozen (they only turn
//! captions into `encoder_hidden_states` and images into latents); the UNet, or only the LoRA
//! factors, learn the [`crate::objective`] with AdamW, a learning-rate schedule, gradient
//! accumulation and global-norm clipping, and an optional EMA (full fine-tuning only, as in the
//! scripts).
//!
//! [`TextToImageTrainer`] takes steps on caller-supplied latents, text states and noise, which
//! is how the parity tests drive it; [`crate::text_to_image_run`] is the loop around it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Device, Error, Result};
use diffusion_models::UNet2DConditionModel;
use diffusion_schedulers::{
    ConfiguredScheduler, DDPMScheduler, DDPMSchedulerConfig, FlowMatchEulerDiscreteSchedulerConfig,
    PredictionType,
};

use crate::ema::{EmaConfig, EmaModel};
use crate::flow_matching::{FlowMatching, FlowMatchingConfig, FlowMatchingSchedule};
use crate::lora::{LoraTrainConfig, UNetLora};
use crate::lr_schedule::{LrSchedule, LrScheduleKind};
use crate::mixed_precision::{GradScaler, MixedPrecision, MixedPrecisionState, half_copy};
use crate::objective::{NoiseDraws, Objective, conditional_loss};
use crate::optimizer::{
    Accumulator, AdamW, AdamWConfig, FlatGradients, accumulation_share, scaled_step,
};
use crate::params;
use crate::resize::Interpolation;
use crate::trainer::StepStats;
use crate::validation::PromptValidationConfig;

/// Settings of a text-to-image run. Field names are the scripts' command-line options;
/// `Default` is train_text_to_image.py's defaults (LoRA off; `lora: Some(..)` is
/// train_text_to_image_lora.py, whose defaults differ only in `output_dir`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextToImageConfig {
    /// A diffusers Stable Diffusion folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
    /// `scheduler/`), `--pretrained_model_name_or_path`.
    pub pretrained_model: PathBuf,
    /// The imagefolder dataset (`--train_data_dir`): images and `metadata.jsonl`.
    pub train_data_dir: PathBuf,
    /// Where checkpoints, logs and the result go.
    pub output_dir: PathBuf,
    /// The caption column of `metadata.jsonl`.
    pub caption_column: String,
    /// Side of the square training images.
    pub resolution: usize,
    /// Center crop instead of random crop.
    pub center_crop: bool,
    /// Random horizontal flips.
    pub random_flip: bool,
    /// Resize filter (`--image_interpolation_mode`).
    pub image_interpolation_mode: Interpolation,
    /// Images per micro-batch.
    pub train_batch_size: usize,
    /// Passes over the data, when `max_train_steps` is unset.
    pub num_train_epochs: usize,
    /// Optimizer steps to take (overrides `num_train_epochs`).
    pub max_train_steps: Option<usize>,
    /// Micro-batches per optimizer step; the loss of each is divided by this (as accelerate does).
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning-rate schedule.
    pub lr_scheduler: LrScheduleKind,
    /// Warmup steps of the schedule.
    pub lr_warmup_steps: usize,
    /// AdamW `betas[0]`.
    pub adam_beta1: f64,
    /// AdamW `betas[1]`.
    pub adam_beta2: f64,
    /// AdamW decoupled weight decay.
    pub adam_weight_decay: f64,
    /// AdamW `eps`.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm of the trained parameters; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Keep an EMA of the UNet (`EMAModel` with its defaults: decay 0.9999, no warmup) and
    /// export it; full fine-tuning only.
    pub use_ema: bool,
    /// Override the scheduler's `prediction_type` (`--prediction_type`).
    pub prediction_type: Option<PredictionType>,
    /// Min-SNR weighting gamma.
    pub snr_gamma: Option<f64>,
    /// Noise offset scale.
    pub noise_offset: f64,
    /// Input perturbation scale.
    pub input_perturbation: f64,
    /// Train a LoRA of the UNet instead of the whole UNet.
    pub lora: Option<LoraTrainConfig>,
    /// Encode every image through the VAE once, before training (one seeded posterior sample
    /// per image, with that image's crop and flip fixed for the run).
    pub cache_latents: bool,
    /// `no` (float32 everywhere), `fp16` or `bf16` (see [`crate::mixed_precision`]).
    pub mixed_precision: String,
    /// Data-parallel training (full fine-tuning or LoRA, any precision) over these devices, the
    /// main one first (`["cuda:0", "cuda:1"]`); empty (the default) trains on the device given
    /// to the run. As with accelerate, `train_batch_size` is then per device and a micro-batch
    /// holds `devices.len() x train_batch_size` images. See [`crate::data_parallel`].
    pub devices: Vec<String>,
    /// Seed of everything random (data order, crops, flips, caption choice, posterior samples,
    /// noise, timesteps, LoRA initialisation).
    pub seed: u64,
    /// Save a resumable checkpoint every this many optimizer steps.
    pub checkpointing_steps: usize,
    /// Keep at most this many checkpoints.
    pub checkpoints_total_limit: Option<usize>,
    /// A checkpoint to resume from, or `latest`.
    pub resume_from_checkpoint: Option<String>,
    /// Show a progress bar.
    pub show_progress: bool,
    /// Validation images with the Stable Diffusion pipeline during training (off by default;
    /// [`crate::train_text_to_image`] generates them, the other loops sharing this config do
    /// not).
    pub validation: PromptValidationConfig,
    /// `--gradient_checkpointing`: recompute memory-bound activations of the trained graph in
    /// the backward pass instead of keeping them (burn's balanced checkpointing, see
    /// [`crate::autodiff`]).
    pub gradient_checkpointing: bool,
    /// Train with the flow-matching objective and these settings (see
    /// [`crate::flow_matching`]). A model folder whose scheduler is
    /// `FlowMatchEulerDiscreteScheduler` uses it with the default settings when this is unset.
    pub flow_matching: Option<FlowMatchingConfig>,
}

impl Default for TextToImageConfig {
    fn default() -> Self {
        Self {
            pretrained_model: PathBuf::new(),
            train_data_dir: PathBuf::new(),
            output_dir: PathBuf::from("sd-model-finetuned"),
            caption_column: "text".into(),
            resolution: 512,
            center_crop: false,
            random_flip: false,
            image_interpolation_mode: Interpolation::Lanczos,
            train_batch_size: 16,
            num_train_epochs: 100,
            max_train_steps: None,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-4,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 500,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-2,
            adam_epsilon: 1e-8,
            max_grad_norm: Some(1.0),
            use_ema: false,
            prediction_type: None,
            snr_gamma: None,
            noise_offset: 0.0,
            input_perturbation: 0.0,
            lora: None,
            cache_latents: false,
            mixed_precision: "no".into(),
            devices: Vec::new(),
            seed: 0,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            show_progress: true,
            validation: PromptValidationConfig::default(),
            gradient_checkpointing: false,
            flow_matching: None,
        }
    }
}

impl TextToImageConfig {
    /// train_text_to_image_lora.py's defaults: [`Self::default`] with a rank-4 LoRA and its
    /// output folder.
    pub fn lora_defaults() -> Self {
        Self {
            output_dir: PathBuf::from("sd-model-finetuned-lora"),
            lora: Some(LoraTrainConfig::default()),
            ..Self::default()
        }
    }

    /// The AdamW hyperparameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            weight_decay: self.adam_weight_decay,
            epsilon: self.adam_epsilon,
        }
    }

    /// `EMAModel(unet.parameters(), model_cls=..., model_config=...)`: diffusers' defaults.
    pub fn ema(&self) -> EmaConfig {
        EmaConfig {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_ema_warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }

    /// The objective, with the scheduler's prediction type unless overridden.
    pub fn objective(&self, scheduler_prediction: PredictionType) -> Objective {
        Objective {
            prediction_type: self.prediction_type.unwrap_or(scheduler_prediction),
            snr_gamma: self.snr_gamma,
            noise_offset: self.noise_offset,
            input_perturbation: self.input_perturbation,
        }
    }

    /// The parsed `mixed_precision` (`no` for a value [`Self::validate`] refuses).
    pub fn mixed_precision(&self) -> MixedPrecision {
        MixedPrecision::parse("mixed_precision", &self.mixed_precision).unwrap_or_default()
    }

    /// Refuse `fp16`/`bf16` for the scripts built on this config that do not run mixed
    /// precision yet (`script` names them in the error).
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming `mixed_precision`.
    pub fn refuse_mixed_precision(&self, script: &str) -> Result<()> {
        if self.mixed_precision() == MixedPrecision::No {
            return Ok(());
        }
        Err(Error::Unsupported {
            path: PathBuf::new(),
            field: "mixed_precision".into(),
            value: self.mixed_precision.clone(),
            reason: format!("half-precision training is not implemented for {script}; use `no`"),
        })
    }

    /// Images per micro-batch: `train_batch_size` on each of the `devices` (at least one).
    pub fn global_batch_size(&self) -> usize {
        self.train_batch_size * self.devices.len().max(1)
    }

    /// Micro-batches per epoch (`len(train_dataloader)`, of the global batch).
    pub fn batches_per_epoch(&self, dataset_len: usize) -> usize {
        dataset_len.div_ceil(self.global_batch_size().max(1))
    }

    /// Optimizer steps per epoch (`ceil(len(train_dataloader) / gradient_accumulation_steps)`).
    pub fn steps_per_epoch(&self, dataset_len: usize) -> usize {
        self.batches_per_epoch(dataset_len)
            .div_ceil(self.gradient_accumulation_steps.max(1))
    }

    /// Total optimizer steps.
    pub fn num_training_steps(&self, dataset_len: usize) -> usize {
        self.max_train_steps
            .unwrap_or(self.num_train_epochs * self.steps_per_epoch(dataset_len))
    }

    /// Check the settings on their own, before anything is loaded.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first offending field (a `mixed_precision` other
    /// than `no`, `fp16` or `bf16` included).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("resolution", self.resolution),
            ("train_batch_size", self.train_batch_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("checkpointing_steps", self.checkpointing_steps),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::invalid_argument(name, "must be positive"));
            }
        }
        if self.max_train_steps.is_none() && self.num_train_epochs == 0 {
            return Err(Error::invalid_argument(
                "num_train_epochs",
                "must be positive",
            ));
        }
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
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(Error::invalid_argument(
                "learning_rate",
                format!("{} is not positive", self.learning_rate),
            ));
        }
        if let Some(norm) = self.max_grad_norm
            && !(norm > 0.0 && norm.is_finite())
        {
            return Err(Error::invalid_argument(
                "max_grad_norm",
                format!("{norm} is not positive"),
            ));
        }
        if self.caption_column.is_empty() {
            return Err(Error::invalid_argument("caption_column", "is empty"));
        }
        MixedPrecision::parse("mixed_precision", &self.mixed_precision)?;
        if !self.devices.is_empty() {
            crate::data_parallel::parse_devices(&self.devices)?;
        }
        if let Some(lora) = &self.lora {
            lora.validate()?;
            if self.use_ema {
                return Err(Error::invalid_argument(
                    "use_ema",
                    "EMA is for full fine-tuning (train_text_to_image_lora.py has none)",
                ));
            }
        }
        self.objective(PredictionType::Epsilon).validate()?;
        self.adamw().validate()?;
        self.validation.validate()
    }

    /// Check that the model folder and the dataset folder look right (before loading them).
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the missing folder or file.
    pub fn check_paths(&self) -> Result<()> {
        for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            let dir = self.pretrained_model.join(sub);
            if !dir.is_dir() {
                return Err(Error::NotFound {
                    path: dir,
                    message: "the pretrained model must be a diffusers Stable Diffusion folder"
                        .into(),
                });
            }
        }
        let metadata = self.train_data_dir.join(crate::caption_data::METADATA_FILE);
        if !metadata.is_file() {
            return Err(Error::NotFound {
                path: metadata,
                message: "the dataset must be an imagefolder with metadata.jsonl".into(),
            });
        }
        Ok(())
    }

    /// Read a JSON config (missing keys take their defaults, unknown keys are an error).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`], [`Error::ConfigField`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value = diffusion_core::config::parse_json(&text, path)?;
        serde_json::from_value(value).map_err(|e| Error::ConfigField {
            path: path.to_path_buf(),
            field: "<root>".into(),
            message: e.to_string(),
        })
    }

    /// Write the config as pretty JSON.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        diffusion_core::config::write_atomically(path.as_ref(), text.as_bytes())
    }
}

/// Load the noise scheduler of a model folder as a `DDPMScheduler` (the scripts'
/// `DDPMScheduler.from_pretrained(model, subfolder="scheduler")`, whatever class the folder
/// names).
///
/// # Errors
/// Config reading errors.
pub fn load_noise_scheduler(pretrained_model: &Path) -> Result<DDPMScheduler> {
    let file = diffusion_core::ConfigFile::<DDPMSchedulerConfig>::load(
        pretrained_model
            .join("scheduler")
            .join("scheduler_config.json"),
    )?;
    DDPMScheduler::new(file.config)
}

/// The flow-matching objective of a run: when the config asks for it or the model folder's
/// scheduler is `FlowMatchEulerDiscreteScheduler` (its `scheduler_config.json` gives the
/// schedule; otherwise a flow schedule of the noise scheduler's `num_train_timesteps`).
fn flow_matching_for(
    config: &TextToImageConfig,
    scheduler: &DDPMScheduler,
    objective: &Objective,
) -> Result<Option<FlowMatching>> {
    let is_flow_folder = crate::flow_matching::is_flow_match_folder(&config.pretrained_model);
    if !is_flow_folder && config.flow_matching.is_none() {
        return Ok(None);
    }
    if !config.devices.is_empty() {
        return Err(Error::invalid_argument(
            "devices",
            "data-parallel training has no flow-matching objective",
        ));
    }
    let settings = config.flow_matching.clone().unwrap_or_default();
    settings.check_objective(objective)?;
    if let Some(p) = config.prediction_type {
        return Err(Error::invalid_argument(
            "prediction_type",
            format!(
                "`{}`: the flow-matching objective predicts the flow velocity",
                p.as_str()
            ),
        ));
    }
    let schedule = if is_flow_folder {
        FlowMatchingSchedule::load(&config.pretrained_model)?
    } else {
        FlowMatchingSchedule::new(FlowMatchEulerDiscreteSchedulerConfig {
            num_train_timesteps: scheduler.config().num_train_timesteps,
            ..FlowMatchEulerDiscreteSchedulerConfig::default()
        })?
    };
    Ok(Some(FlowMatching::new(settings, schedule)?))
}

/// Model, LoRA, optimizer, schedule and EMA of one text-to-image run.
#[derive(Debug)]
pub struct TextToImageTrainer {
    pub(crate) config: TextToImageConfig,
    /// On the autodiff device; frozen when a LoRA is trained.
    pub(crate) unet: UNet2DConditionModel,
    pub(crate) lora: Option<UNetLora>,
    pub(crate) scheduler: DDPMScheduler,
    pub(crate) objective: Objective,
    pub(crate) flow_matching: Option<FlowMatching>,
    pub(crate) optimizer: AdamW,
    pub(crate) lr_schedule: LrSchedule,
    pub(crate) ema: Option<EmaModel>,
    pub(crate) global_step: usize,
    pub(crate) num_training_steps: usize,
    /// Gradients and loss sum of the micro-batches of the optimizer step in progress.
    pending: Accumulator,
    pub(crate) grad_scaler: Option<GradScaler>,
    pub(crate) skipped_steps: usize,
    pub(crate) last_step_skipped: bool,
}

/// The UNet a loss runs on: `base` (trained, or frozen under `lora`) with `lora` applied, both
/// cast to `dtype` in the autodiff graph under mixed precision (see
/// [`crate::mixed_precision`]).
///
/// # Errors
/// [`Error::InvalidArgument`] (`dtype`) when the device does not support `dtype`.
pub(crate) fn forward_unet_of(
    base: &UNet2DConditionModel,
    lora: Option<&UNetLora>,
    dtype: Option<FloatDType>,
) -> Result<UNet2DConditionModel> {
    let Some(dtype) = dtype else {
        return Ok(match lora {
            Some(lora) => lora.apply(base),
            None => base.clone(),
        });
    };
    let unet = half_copy(base, dtype)?;
    Ok(match lora {
        Some(lora) => {
            let mut half = lora.clone();
            half.set_factors(half_copy(lora.factors(), dtype)?);
            half.apply(&unet)
        }
        None => unet,
    })
}

/// The loss of one micro-batch with `unet`: the flow-matching loss when `flow` is given (then
/// `draws.timesteps` index its training schedule), else [`conditional_loss`]. Every input must
/// already be on `unet`'s device.
///
/// # Errors
/// As [`conditional_loss`] and [`FlowMatching::loss`].
pub(crate) fn micro_batch_loss(
    unet: &UNet2DConditionModel,
    scheduler: &DDPMScheduler,
    objective: &Objective,
    flow: Option<&FlowMatching>,
    latents: Tensor<4>,
    encoder_hidden_states: Tensor<3>,
    draws: &NoiseDraws,
) -> Result<Tensor<1>> {
    match flow {
        Some(flow) => flow.loss(
            unet,
            latents,
            encoder_hidden_states,
            draws.noise.clone(),
            &draws.timesteps,
        ),
        None => conditional_loss(
            unet,
            scheduler,
            objective,
            latents,
            encoder_hidden_states,
            draws,
        ),
    }
}

impl TextToImageTrainer {
    /// Start training: `unet` fully, or only `lora`'s factors when given (then the UNet is
    /// frozen). Both are moved onto `device` with autodiff. `scheduler` is the noise scheduler
    /// (its prediction type unless the config overrides it).
    ///
    /// # Errors
    /// As [`TextToImageConfig::validate`]; [`Error::InvalidArgument`] (`lora`) when the config
    /// asks for a LoRA and none is given or the reverse.
    pub fn new(
        config: &TextToImageConfig,
        unet: UNet2DConditionModel,
        lora: Option<UNetLora>,
        scheduler: DDPMScheduler,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if config.lora.is_some() != lora.is_some() {
            return Err(Error::invalid_argument(
                "lora",
                "pass a UNetLora exactly when the config trains a LoRA",
            ));
        }
        let ad = crate::autodiff::autodiff_device(device, config.gradient_checkpointing);
        let unet = unet.fork(&ad);
        let unet = if lora.is_some() {
            unet.no_grad()
        } else {
            unet.train()
        };
        let unet = crate::autodiff::checkpointed(unet, &ad);
        // Row-major weights, as the unconditional trainer keeps them (see trainer.rs).
        let unet = params::replace(
            unet.clone(),
            params::values(&unet).into_iter().map(Some).collect(),
        );
        let lora = lora.map(|l| l.fork(&ad));
        let ema = if config.use_ema {
            Some(EmaModel::new(config.ema(), &unet)?)
        } else {
            None
        };
        let objective = config.objective(scheduler.config().prediction_type);
        objective.validate()?;
        let flow_matching = flow_matching_for(config, &scheduler, &objective)?;
        Ok(Self {
            config: config.clone(),
            unet,
            lora,
            scheduler,
            objective,
            flow_matching,
            optimizer: AdamW::new(config.adamw())?,
            lr_schedule: LrSchedule::new(
                config.lr_scheduler,
                config.learning_rate,
                config.lr_warmup_steps,
                num_training_steps,
            )?,
            ema,
            global_step: 0,
            num_training_steps,
            pending: Accumulator::default(),
            grad_scaler: config.mixed_precision().grad_scaler(),
            skipped_steps: 0,
            last_step_skipped: false,
        })
    }

    /// The UNet the loss runs: the trained one, or the frozen one with the LoRA applied.
    pub fn effective_unet(&self) -> UNet2DConditionModel {
        match &self.lora {
            Some(lora) => lora.apply(&self.unet),
            None => self.unet.clone(),
        }
    }

    /// The loss of the current weights on one micro-batch (see [`conditional_loss`]); inputs
    /// are moved onto the training device.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]` (scaled), `encoder_hidden_states`: `[B, S, D]`
    ///
    /// # Errors
    /// As [`conditional_loss`].
    pub fn loss(
        &self,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        draws: &NoiseDraws,
    ) -> Result<Tensor<1>> {
        let device = self.device();
        let draws = NoiseDraws {
            noise: draws.noise.clone().to_device(&device),
            offset_noise: draws.offset_noise.clone().map(|t| t.to_device(&device)),
            perturbation: draws.perturbation.clone().map(|t| t.to_device(&device)),
            timesteps: draws.timesteps.clone(),
        };
        let unet = self.forward_unet()?;
        micro_batch_loss(
            &unet,
            &self.scheduler,
            &self.objective,
            self.flow_matching.as_ref(),
            latents.to_device(&device),
            encoder_hidden_states.to_device(&device),
            &draws,
        )
    }

    /// The UNet a loss runs: [`Self::half_unet`] under mixed precision, else
    /// [`Self::effective_unet`] (for the losses built on this trainer: DreamBooth's, SDXL's).
    ///
    /// # Errors
    /// As [`Self::half_unet`].
    pub fn forward_unet(&self) -> Result<UNet2DConditionModel> {
        forward_unet_of(
            &self.unet,
            self.lora.as_ref(),
            self.config.mixed_precision().dtype(),
        )
    }

    /// The UNet of a mixed-precision forward: the weights (and LoRA factors) cast to `dtype` in
    /// the autodiff graph, so the gradients reach the f32 masters (see
    /// [`crate::mixed_precision`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`dtype`) when the device does not support `dtype`.
    pub fn half_unet(&self, dtype: FloatDType) -> Result<UNet2DConditionModel> {
        forward_unet_of(&self.unet, self.lora.as_ref(), Some(dtype))
    }

    /// The gradients of `loss` with respect to what is trained (the UNet's parameters, or the
    /// LoRA factors), flattened in visit order.
    pub fn gradients(&self, loss: Tensor<1>) -> FlatGradients {
        let grads = loss.backward();
        match &self.lora {
            Some(lora) => FlatGradients::from_backward(lora.factors(), grads),
            None => FlatGradients::from_backward(&self.unet, grads),
        }
    }

    /// One micro-batch: forward, backward of `loss / gradient_accumulation_steps`, accumulate;
    /// after the last micro-batch of an optimizer step, clip, AdamW step at the scheduled rate
    /// and EMA update, and return what the step did (its loss is the mean over the
    /// micro-batches, as the scripts log `train_loss`).
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
        self.step_loss(loss)
    }

    /// [`Self::step`] on a loss the caller computed from [`Self::forward_unet`] (DreamBooth's
    /// prior-preservation loss): backward of `loss / gradient_accumulation_steps`, accumulate,
    /// and the optimizer step after the last micro-batch.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the gradients do not fit the accumulated ones.
    pub fn step_loss(&mut self, loss: Tensor<1>) -> Result<Option<StepStats>> {
        let (scaled, value) = self.backward_loss(loss);
        let grads = self.gradients(scaled);
        self.accumulate_micro_batch(grads, value)
    }

    /// What the backward of one micro-batch runs on: `loss / gradient_accumulation_steps`,
    /// times the fp16 loss scale (`finish_step` unscales), and the value to log (unscaled).
    pub(crate) fn backward_loss(&self, loss: Tensor<1>) -> (Tensor<1>, f32) {
        let loss = accumulation_share(loss, self.config.gradient_accumulation_steps);
        let value = loss.clone().inner().into_scalar::<f32>();
        let loss = match &self.grad_scaler {
            Some(scaler) => loss.mul_scalar(scaler.scale()),
            None => loss,
        };
        (loss, value)
    }

    /// Take the optimizer step on what the micro-batches so far accumulated (also used at the
    /// end of an epoch whose batch count `gradient_accumulation_steps` does not divide).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`step`) when nothing was accumulated.
    pub fn finish_step(&mut self) -> Result<StepStats> {
        let (grads, loss) = self.pending.take()?;
        let mut stats = match self.lora.clone() {
            Some(mut lora) => {
                let (stats, factors) = self.step_module(lora.factors().clone(), grads, loss)?;
                if let Some(factors) = factors {
                    lora.set_factors(factors);
                    self.lora = Some(lora);
                }
                stats
            }
            None => {
                let (stats, unet) = self.step_module(self.unet.clone(), grads, loss)?;
                if let Some(unet) = unet {
                    self.unet = unet;
                }
                stats
            }
        };
        stats.ema_decay = match &mut self.ema {
            Some(ema) => Some(ema.step(&self.unet)?),
            None => None,
        };
        Ok(stats)
    }

    /// The optimizer step on `module` (everything this trainer's AdamW trains: the UNet, the
    /// LoRA factors, or a set of LoRAs such as DreamBooth's and SDXL's with the text encoders)
    /// with the accumulated `grads` and loss sum: under fp16 unscale the gradients and skip the
    /// step when they are not finite (the schedule does not advance on a skipped step, as
    /// accelerate's does not), clip by the global norm, AdamW at the scheduled rate, update the
    /// loss scale, count the step. Returns the step's stats (no EMA) and the updated module,
    /// `None` when the step was skipped.
    ///
    /// # Errors
    /// As [`AdamW::step`].
    pub(crate) fn step_module<M: Module>(
        &mut self,
        module: M,
        grads: FlatGradients,
        loss: f32,
    ) -> Result<(StepStats, Option<M>)> {
        let lr = self.lr_schedule.lr(self.global_step - self.skipped_steps);
        let (grad_norm, updated) = scaled_step(
            &mut self.optimizer,
            &mut self.grad_scaler,
            self.config.max_grad_norm,
            lr,
            module,
            grads,
        )?;
        self.last_step_skipped = updated.is_none();
        self.skipped_steps += usize::from(self.last_step_skipped);
        self.global_step += 1;
        let stats = StepStats {
            step: self.global_step,
            loss,
            grad_norm,
            lr,
            ema_decay: None,
        };
        Ok((stats, updated))
    }

    /// Add one micro-batch's gradients (of `loss / gradient_accumulation_steps`, with respect to
    /// whatever this trainer's AdamW steps) and loss value; `true` when the optimizer step is
    /// due. The callers that train more than the UNet (DreamBooth's and SDXL's text-encoder
    /// LoRAs) then take the sums with [`Self::take_pending`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the gradients do not fit the accumulated ones.
    pub(crate) fn accumulate(&mut self, grads: FlatGradients, value: f32) -> Result<bool> {
        self.pending
            .add(grads, value, self.config.gradient_accumulation_steps.max(1))
    }

    /// The accumulated gradients and loss sum (see [`Self::accumulate`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`step`) when nothing was accumulated.
    pub(crate) fn take_pending(&mut self) -> Result<(FlatGradients, f32)> {
        self.pending.take()
    }

    /// The fp16 loss scaler (`None` without `fp16`).
    pub fn grad_scaler(&self) -> Option<&GradScaler> {
        self.grad_scaler.as_ref()
    }

    /// Replace the fp16 loss scaler (for example with another initial scale).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `mixed_precision` when the run is not `fp16`.
    pub fn set_grad_scaler(&mut self, scaler: GradScaler) -> Result<()> {
        if self.config.mixed_precision() != MixedPrecision::Fp16 {
            return Err(Error::invalid_argument(
                "mixed_precision",
                format!(
                    "a loss scaler needs fp16, the run is `{}`",
                    self.config.mixed_precision
                ),
            ));
        }
        self.grad_scaler = Some(scaler);
        Ok(())
    }

    /// Optimizer steps skipped so far for non-finite fp16 gradients.
    pub fn skipped_steps(&self) -> usize {
        self.skipped_steps
    }

    /// Whether the last optimizer step was skipped (non-finite fp16 gradients).
    pub fn last_step_skipped(&self) -> bool {
        self.last_step_skipped
    }

    /// The mixed-precision state a checkpoint keeps.
    pub fn mixed_precision_state(&self) -> MixedPrecisionState {
        MixedPrecisionState {
            mixed_precision: self.config.mixed_precision(),
            grad_scaler: self.grad_scaler.as_ref().map(|s| s.state().clone()),
            skipped_steps: self.skipped_steps,
        }
    }

    /// Add one micro-batch's gradients (of `loss / gradient_accumulation_steps`) and loss value
    /// to the step in progress; after the last micro-batch, take the optimizer step. The
    /// data-parallel path ([`crate::data_parallel`]) computes the gradients itself.
    ///
    /// # Errors
    /// As [`Self::step_loss`].
    pub(crate) fn accumulate_micro_batch(
        &mut self,
        grads: FlatGradients,
        value: f32,
    ) -> Result<Option<StepStats>> {
        if !self.accumulate(grads, value)? {
            return Ok(None);
        }
        self.finish_step().map(Some)
    }

    /// Whether micro-batches of an unfinished optimizer step are pending.
    pub fn has_pending(&self) -> bool {
        self.pending.is_pending()
    }

    fn device(&self) -> Device {
        crate::optimizer::module_device(&self.unet)
    }

    /// The UNet on the autodiff device (frozen base when a LoRA is trained).
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The LoRA being trained, if any.
    pub fn lora(&self) -> Option<&UNetLora> {
        self.lora.as_ref()
    }

    /// The EMA, when kept.
    pub fn ema(&self) -> Option<&EmaModel> {
        self.ema.as_ref()
    }

    /// The UNet to generate with, without autodiff: the EMA weights when kept, the LoRA merged
    /// into the base when one is trained, else the trained weights.
    pub fn inference_unet(&self) -> UNet2DConditionModel {
        match (&self.ema, &self.lora) {
            (Some(ema), _) => ema.copy_to(&self.unet),
            (None, Some(lora)) => lora.apply(&self.unet).valid(),
            (None, None) => self.unet.valid(),
        }
    }

    /// The noise scheduler.
    pub fn scheduler(&self) -> &DDPMScheduler {
        &self.scheduler
    }

    /// The objective.
    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// Refuse the flow-matching objective in a loss that does not implement it (`what`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`flow_matching`) when this trainer uses it.
    pub fn refuse_flow_matching(&self, what: &str) -> Result<()> {
        if self.flow_matching.is_some() {
            return Err(Error::invalid_argument(
                "flow_matching",
                format!("{what} has no flow-matching objective"),
            ));
        }
        Ok(())
    }

    /// The flow-matching objective when the run trains with it (then the `timesteps` of
    /// [`NoiseDraws`] are indices into its schedule).
    pub fn flow_matching(&self) -> Option<&FlowMatching> {
        self.flow_matching.as_ref()
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Optimizer steps taken so far.
    pub fn global_step(&self) -> usize {
        self.global_step
    }

    /// The planned number of optimizer steps.
    pub fn num_training_steps(&self) -> usize {
        self.num_training_steps
    }

    /// The run's settings.
    pub fn config(&self) -> &TextToImageConfig {
        &self.config
    }
}
