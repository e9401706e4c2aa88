//! Textual inversion: diffusers' examples/textual_inversion/textual_inversion.py. New
//! placeholder tokens (`<tok>`, `<tok>_1`, ... for `num_vectors > 1`) are added to the CLIP
//! tokenizer, their token-embedding rows start as a copy of `initializer_token`'s, and only
//! those rows learn: AdamW runs over the whole token-embedding table, as the script's optimizer
//! does, and every other row is then restored from the original (`index_no_updates`), so they
//! stay equal bit for bit. The UNet and the VAE are frozen; the loss is the plain MSE of the
//! scripts ([`crate::objective`] without SNR weighting, offset or perturbation).
//!
//! The result is `learned_embeds.safetensors`, one tensor `{placeholder_token: [n, dim]}` (the
//! script's `save_progress`), which diffusers' `load_textual_inversion` and
//! diffusion-loaders' `textual_inversion` read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::Embedding;
use diffusion_core::burn::tensor::{Int, Tensor};
use diffusion_core::{Device, Error, Result};
use diffusion_models::{CLIPTextModel, CLIPTokenizer, UNet2DConditionModel};
use diffusion_schedulers::{ConfiguredScheduler, DDPMScheduler, PredictionType};

use crate::checkpoint::{check_resumable, read_state_file, write_checkpoint_dir, write_state_file};
use crate::data_parallel::DataParallel;
use crate::lr_schedule::{LrSchedule, LrScheduleKind};
use crate::mixed_precision::{
    GradScaler, MixedPrecision, MixedPrecisionState, backward_scale, half_copy,
};
use crate::objective::{NoiseDraws, Objective, conditional_loss};
use crate::optimizer::{
    Accumulator, AdamW, AdamWConfig, FlatGradients, accumulation_share, scaled_step,
};
use crate::params;
use crate::resize::Interpolation;
use crate::trainer::StepStats;
use crate::validation::PromptValidationConfig;

/// The file the script writes at the end (`learned_embeds.safetensors`).
pub const LEARNED_EMBEDS_NAME: &str = "learned_embeds.safetensors";

/// The state file of a checkpoint folder.
const STATE_FILE: &str = "training_state.json";

/// `training_state.json` of a textual-inversion checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextualInversionState {
    /// Optimizer steps taken.
    pub global_step: usize,
    /// The planned total.
    pub num_training_steps: usize,
    /// The run's seed.
    pub seed: u64,
    /// [`crate::checkpoint::RNG_SCHEME`] at the time of saving.
    pub rng_scheme: String,
    /// The settings of the run that wrote the checkpoint.
    pub config: TextualInversionConfig,
}

/// textual_inversion.py's `imagenet_templates_small` (`--learnable_property object`).
pub const OBJECT_TEMPLATES: &[&str] = &[
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// textual_inversion.py's `imagenet_style_templates_small` (`--learnable_property style`).
pub const STYLE_TEMPLATES: &[&str] = &[
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
];

/// What the new token stands for (`--learnable_property`): it picks the prompt templates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LearnableProperty {
    /// An object: "a photo of a {}", ...
    #[default]
    Object,
    /// A style: "a painting in the style of {}", ...
    Style,
}

impl LearnableProperty {
    /// The script's template list for this property.
    pub fn templates(self) -> &'static [&'static str] {
        match self {
            Self::Object => OBJECT_TEMPLATES,
            Self::Style => STYLE_TEMPLATES,
        }
    }

    /// Parse `object` / `style`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "object" => Some(Self::Object),
            "style" => Some(Self::Style),
            _ => None,
        }
    }
}

/// Settings of a textual-inversion run. Field names are textual_inversion.py's options and
/// `Default` its defaults (`scale_lr` included, which multiplies the learning rate by
/// `gradient_accumulation_steps * train_batch_size`), except `interpolation` (the script's
/// default is bicubic, which [`Interpolation`] lacks; bilinear here).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextualInversionConfig {
    /// A diffusers Stable Diffusion folder.
    pub pretrained_model: PathBuf,
    /// A folder of training images (every `.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`).
    pub train_data_dir: PathBuf,
    /// Where `learned_embeds.safetensors` and the log go.
    pub output_dir: PathBuf,
    /// The new token, e.g. `<cat-toy>`.
    pub placeholder_token: String,
    /// A word of the vocabulary (one token) whose embedding the new rows start from.
    pub initializer_token: String,
    /// Vectors learned for the concept (tokens added).
    pub num_vectors: usize,
    /// Object or style templates.
    pub learnable_property: LearnableProperty,
    /// How many times the images are repeated per epoch.
    pub repeats: usize,
    /// Side of the square training images.
    pub resolution: usize,
    /// Center crop instead of random crop.
    pub center_crop: bool,
    /// Random horizontal flips (`flip_p` 0.5).
    pub random_flip: bool,
    /// Resize filter.
    pub interpolation: Interpolation,
    /// Images per micro-batch.
    pub train_batch_size: usize,
    /// Passes over the (repeated) data, when `max_train_steps` is unset.
    pub num_train_epochs: usize,
    /// Optimizer steps to take.
    pub max_train_steps: Option<usize>,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Learning rate (before `scale_lr`).
    pub learning_rate: f64,
    /// Multiply the learning rate by `gradient_accumulation_steps * train_batch_size`.
    pub scale_lr: bool,
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
    /// Write `learned_embeds-steps-{step}.safetensors` every this many steps.
    pub save_steps: usize,
    /// Write a resumable `checkpoint-{step}/` every this many steps.
    pub checkpointing_steps: usize,
    /// Keep at most this many checkpoints (the oldest are deleted).
    pub checkpoints_total_limit: Option<usize>,
    /// Resume from this checkpoint folder (a name inside `output_dir` or a path), or the
    /// newest one with `"latest"` (a new run when there is none).
    pub resume_from_checkpoint: Option<String>,
    /// Seed of everything random.
    pub seed: u64,
    /// Show a progress bar.
    pub show_progress: bool,
    /// accelerate's `--mixed_precision` (`no`, `fp16`, `bf16`): the frozen UNet and VAE in
    /// that dtype (the script's `weight_dtype`), the text encoder run on a half copy of its f32
    /// weights inside the graph so the token-embedding table stays the f32 master; `fp16` adds
    /// a dynamic loss scale (see [`crate::mixed_precision`]).
    pub mixed_precision: MixedPrecision,
    /// Data-parallel training over these devices, the main one first (`["cuda:0", "cuda:1"]`);
    /// `train_batch_size` is then the batch of each device, as with accelerate. Empty (the
    /// default): the device given to the run. See [`crate::data_parallel`].
    pub devices: Vec<String>,
    /// `--gradient_checkpointing`: recompute memory-bound activations in the backward pass
    /// (see [`crate::autodiff`]).
    pub gradient_checkpointing: bool,
    /// Validation images (textual_inversion.py's `--validation_prompt`,
    /// `--num_validation_images`, `--validation_steps`), made with the learned embeddings in
    /// the tokenizer and text encoder; off without prompts.
    pub validation: PromptValidationConfig,
}

impl Default for TextualInversionConfig {
    fn default() -> Self {
        Self {
            pretrained_model: PathBuf::new(),
            train_data_dir: PathBuf::new(),
            output_dir: PathBuf::from("text-inversion-model"),
            placeholder_token: String::new(),
            initializer_token: String::new(),
            num_vectors: 1,
            learnable_property: LearnableProperty::Object,
            repeats: 100,
            resolution: 512,
            center_crop: false,
            random_flip: true,
            interpolation: Interpolation::Bilinear,
            train_batch_size: 16,
            num_train_epochs: 100,
            max_train_steps: Some(5000),
            gradient_accumulation_steps: 1,
            learning_rate: 1e-4,
            scale_lr: true,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 500,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-2,
            adam_epsilon: 1e-8,
            save_steps: 500,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            seed: 0,
            show_progress: true,
            mixed_precision: MixedPrecision::No,
            devices: Vec::new(),
            gradient_checkpointing: false,
            validation: PromptValidationConfig::default(),
        }
    }
}

impl TextualInversionConfig {
    /// The AdamW hyperparameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            weight_decay: self.adam_weight_decay,
            epsilon: self.adam_epsilon,
        }
    }

    /// The learning rate after `scale_lr`.
    pub fn effective_learning_rate(&self) -> f64 {
        if self.scale_lr {
            self.learning_rate * (self.gradient_accumulation_steps * self.train_batch_size) as f64
        } else {
            self.learning_rate
        }
    }

    /// Micro-batches per epoch of `num_images` images repeated `repeats` times.
    pub fn batches_per_epoch(&self, num_images: usize) -> usize {
        (num_images * self.repeats).div_ceil(self.global_batch_size().max(1))
    }

    /// Images per micro-batch: `train_batch_size` on each of the `devices` (at least one).
    pub fn global_batch_size(&self) -> usize {
        self.train_batch_size * self.devices.len().max(1)
    }

    /// Total optimizer steps.
    pub fn num_training_steps(&self, num_images: usize) -> usize {
        self.max_train_steps.unwrap_or(
            self.num_train_epochs
                * self
                    .batches_per_epoch(num_images)
                    .div_ceil(self.gradient_accumulation_steps.max(1)),
        )
    }

    /// Check the settings on their own, before anything is loaded.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first offending field.
    pub fn validate(&self) -> Result<()> {
        self.validation.validate()?;
        if !self.devices.is_empty() {
            crate::data_parallel::parse_devices(&self.devices)?;
        }
        let positive = [
            ("num_vectors", self.num_vectors),
            ("repeats", self.repeats),
            ("resolution", self.resolution),
            ("train_batch_size", self.train_batch_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("save_steps", self.save_steps),
            ("checkpointing_steps", self.checkpointing_steps),
            (
                "checkpoints_total_limit",
                self.checkpoints_total_limit.unwrap_or(1),
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::invalid_argument(name, "must be positive"));
            }
        }
        if self.max_train_steps == Some(0)
            || (self.max_train_steps.is_none() && self.num_train_epochs == 0)
        {
            return Err(Error::invalid_argument(
                "max_train_steps",
                "no steps to take",
            ));
        }
        if self.placeholder_token.trim().is_empty() {
            return Err(Error::invalid_argument("placeholder_token", "is empty"));
        }
        if self.initializer_token.trim().is_empty() {
            return Err(Error::invalid_argument("initializer_token", "is empty"));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(Error::invalid_argument(
                "learning_rate",
                format!("{} is not positive", self.learning_rate),
            ));
        }
        self.adamw().validate()
    }

    /// Check that the model folder and the image folder exist (before loading them).
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the missing folder.
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
        if !self.train_data_dir.is_dir() {
            return Err(Error::NotFound {
                path: self.train_data_dir.clone(),
                message: "the training images must be a folder".into(),
            });
        }
        Ok(())
    }
}

/// Add `placeholder_token` (and `_1` ... up to `num_vectors`) to the tokenizer, grow the token
/// embedding and copy `initializer_token`'s row into the new rows, as textual_inversion.py does.
/// Returns the new ids (consecutive).
///
/// # Errors
/// [`Error::InvalidArgument`] (`initializer_token`) when it is not exactly one token,
/// (`placeholder_token`) when a token already exists.
pub fn add_placeholder_tokens(
    tokenizer: &mut CLIPTokenizer,
    text_encoder: &mut CLIPTextModel,
    placeholder_token: &str,
    num_vectors: usize,
    initializer_token: &str,
) -> Result<Vec<u32>> {
    let init = tokenizer.encode(initializer_token, false)?;
    let [init] = init[..] else {
        return Err(Error::invalid_argument(
            "initializer_token",
            format!(
                "`{initializer_token}` is {} tokens; it must be a single token",
                init.len()
            ),
        ));
    };
    let tokens: Vec<String> = (0..num_vectors.max(1))
        .map(|i| match i {
            0 => placeholder_token.to_string(),
            i => format!("{placeholder_token}_{i}"),
        })
        .collect();
    for t in &tokens {
        if tokenizer.token_to_id(t).is_some() {
            return Err(Error::invalid_argument(
                "placeholder_token",
                format!("the tokenizer already contains `{t}`; pick another placeholder"),
            ));
        }
    }
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let ids = tokenizer.add_tokens(&refs)?;
    let model = &mut text_encoder.text_model;
    let new_size =
        (ids.iter().copied().max().unwrap_or(0) as usize + 1).max(model.config().vocab_size);
    model.resize_token_embeddings(new_size)?;
    let weight = model.embeddings.token_embedding.weight.val();
    let row = diffusion_core::tensor::to_vec(weight.narrow(0, init as usize, 1));
    for &id in &ids {
        model.set_token_embeddings(id as usize, &row)?;
    }
    Ok(ids)
}

/// `" ".join(placeholder tokens)`: what `{}` becomes in the templates.
pub fn placeholder_string(placeholder_token: &str, num_vectors: usize) -> String {
    (0..num_vectors.max(1))
        .map(|i| match i {
            0 => placeholder_token.to_string(),
            i => format!("{placeholder_token}_{i}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The replicas of a textual-inversion run, one per device (see
/// [`TextualInversionTrainer::data_parallel`]): the token-embedding table, and the frozen text
/// encoder and UNet on every device (the main device's first).
#[derive(Debug)]
pub struct TextualInversionParallel {
    tables: DataParallel<Embedding>,
    encoders: Vec<CLIPTextModel>,
    unets: Vec<UNet2DConditionModel>,
}

impl TextualInversionParallel {
    /// The devices, the main one first.
    pub fn devices(&self) -> &[Device] {
        self.tables.devices()
    }

    /// Copy `trainer`'s current table into every other replica (after an optimizer step;
    /// [`TextualInversionTrainer::step_data_parallel`] does it itself).
    pub fn sync(&mut self, trainer: &TextualInversionTrainer) {
        self.tables
            .sync(&trainer.text_encoder.text_model.embeddings.token_embedding);
    }
}

/// Text encoder (only the token embedding trainable), frozen UNet, optimizer and schedule of
/// one textual-inversion run.
#[derive(Debug)]
pub struct TextualInversionTrainer {
    config: TextualInversionConfig,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    objective: Objective,
    optimizer: AdamW,
    lr_schedule: LrSchedule,
    /// `orig_embeds_params`, without autodiff.
    original: Tensor<2>,
    /// The placeholder rows `[first, last]`.
    rows: (usize, usize),
    global_step: usize,
    num_training_steps: usize,
    pending: Accumulator,
    grad_scaler: Option<GradScaler>,
    skipped_steps: usize,
    last_step_skipped: bool,
}

impl TextualInversionTrainer {
    /// Start training the rows `placeholder_ids` (from [`add_placeholder_tokens`]) of
    /// `text_encoder`'s token embedding; everything is moved onto `device` with autodiff.
    ///
    /// # Errors
    /// As [`TextualInversionConfig::validate`]; [`Error::InvalidArgument`] (`placeholder_ids`)
    /// for an empty or non-consecutive list, or rows outside the table.
    pub fn new(
        config: &TextualInversionConfig,
        text_encoder: CLIPTextModel,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        placeholder_ids: &[u32],
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let (Some(&first), Some(&last)) =
            (placeholder_ids.iter().min(), placeholder_ids.iter().max())
        else {
            return Err(Error::invalid_argument("placeholder_ids", "is empty"));
        };
        let (first, last) = (first as usize, last as usize);
        let vocab = text_encoder.config().vocab_size;
        if last - first + 1 != placeholder_ids.len() || last >= vocab {
            return Err(Error::invalid_argument(
                "placeholder_ids",
                format!("{placeholder_ids:?} are not consecutive rows of a {vocab}-row table"),
            ));
        }
        let ad = crate::autodiff::autodiff_device(device, config.gradient_checkpointing);
        let mut text_encoder = text_encoder.fork(&ad).no_grad();
        let embedding = text_encoder.text_model.embeddings.token_embedding.clone();
        let embedding = embedding.set_require_grad(true).train();
        // Row-major weights, as the other trainers keep them.
        let embedding = params::replace(
            embedding.clone(),
            params::values(&embedding).into_iter().map(Some).collect(),
        );
        let original = embedding.weight.val().inner();
        text_encoder.text_model.embeddings.token_embedding = embedding;
        let text_encoder = crate::autodiff::checkpointed(text_encoder, &ad);
        let unet = unet.fork(&ad).no_grad();
        // Mixed precision: the frozen UNet runs in the half dtype (the script's `weight_dtype`).
        let unet = match config.mixed_precision.dtype() {
            Some(dtype) => diffusion_models::modeling_utils::to_dtype(unet, dtype)?,
            None => unet,
        };
        let unet = crate::autodiff::checkpointed(unet, &ad);
        let objective = Objective {
            prediction_type: scheduler.config().prediction_type,
            ..Objective::default()
        };
        objective.validate()?;
        Ok(Self {
            config: config.clone(),
            text_encoder,
            unet,
            scheduler,
            objective,
            optimizer: AdamW::new(config.adamw())?,
            lr_schedule: LrSchedule::new(
                config.lr_scheduler,
                config.effective_learning_rate(),
                config.lr_warmup_steps,
                num_training_steps,
            )?,
            original,
            rows: (first, last),
            global_step: 0,
            num_training_steps,
            pending: Accumulator::default(),
            grad_scaler: config.mixed_precision.grad_scaler(),
            skipped_steps: 0,
            last_step_skipped: false,
        })
    }

    /// The loss on one micro-batch: `text_encoder(input_ids)` through the trained embedding,
    /// then the frozen UNet's MSE ([`conditional_loss`]). Under mixed precision the text
    /// encoder runs on a half copy of its weights made inside the graph, so the gradient
    /// reaches the f32 table; the loss is f32 either way.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]` (scaled), `input_ids`: `[B, S]`
    ///
    /// # Errors
    /// As [`conditional_loss`] and the text encoder.
    pub fn loss(
        &self,
        latents: Tensor<4>,
        input_ids: Tensor<2, Int>,
        draws: &NoiseDraws,
    ) -> Result<Tensor<1>> {
        let device = crate::optimizer::module_device(&self.unet);
        let input_ids = input_ids.to_device(&device);
        let states = match self.config.mixed_precision.dtype() {
            Some(dtype) => {
                half_copy(&self.text_encoder, dtype)?
                    .forward(input_ids)?
                    .last_hidden_state
            }
            None => self.text_encoder.forward(input_ids)?.last_hidden_state,
        };
        let draws = NoiseDraws {
            noise: draws.noise.clone().to_device(&device),
            offset_noise: None,
            perturbation: None,
            timesteps: draws.timesteps.clone(),
        };
        conditional_loss(
            &self.unet,
            &self.scheduler,
            &self.objective,
            latents.to_device(&device),
            states,
            &draws,
        )
    }

    /// The gradient of `loss` with respect to the whole token-embedding table.
    pub fn gradients(&self, loss: Tensor<1>) -> FlatGradients {
        FlatGradients::from_backward(
            &self.text_encoder.text_model.embeddings.token_embedding,
            loss.backward(),
        )
    }

    /// One micro-batch: forward, backward of `loss / gradient_accumulation_steps`, accumulate;
    /// after the last micro-batch of a step, AdamW on the table at the scheduled rate, then
    /// every row but the placeholders' restored (the script clips no gradients).
    ///
    /// # Errors
    /// As [`Self::loss`].
    pub fn step(
        &mut self,
        latents: Tensor<4>,
        input_ids: Tensor<2, Int>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let k = self.config.gradient_accumulation_steps;
        let loss = self.loss(latents, input_ids, draws)?;
        let loss = accumulation_share(loss, k);
        let value = loss.clone().inner().into_scalar::<f32>();
        // fp16: the backward runs on the scaled loss; `finish_step` unscales.
        let loss = match &self.grad_scaler {
            Some(scaler) => loss.mul_scalar(scaler.scale()),
            None => loss,
        };
        let grads = self.gradients(loss);
        if !self.pending.add(grads, value, k)? {
            return Ok(None);
        }
        self.finish_step().map(Some)
    }

    /// Replicate the token-embedding table onto `devices` (the first must be the trainer's
    /// own device), with copies of the frozen text encoder and UNet on every device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `devices` when the list is empty.
    pub fn data_parallel(&self, devices: Vec<Device>) -> Result<TextualInversionParallel> {
        let tables = DataParallel::new(
            devices,
            &self.text_encoder.text_model.embeddings.token_embedding,
        )?;
        let encoders = tables.frozen_copies(&self.text_encoder);
        let unets = tables.frozen_copies(&self.unet);
        Ok(TextualInversionParallel {
            tables,
            encoders,
            unets,
        })
    }

    /// [`Self::step`] over the devices of `parallel` (from [`Self::data_parallel`]): the
    /// micro-batch is sharded (latents, prompt ids, noise, timesteps); each device runs the text
    /// encoder with its replica of the table (on a half copy under mixed precision) and the
    /// frozen UNet on its rows; the gradients of the table are gathered, accumulated and
    /// stepped once on the main device (the placeholder rows only), and the replicas synced.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `draws` when the draws do not fit the batch; as
    /// [`Self::loss`] and [`Self::finish_step`].
    pub fn step_data_parallel(
        &mut self,
        parallel: &mut TextualInversionParallel,
        latents: Tensor<4>,
        input_ids: Tensor<2, Int>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let b = latents.dims()[0];
        if draws.timesteps.len() != b || input_ids.dims()[0] != b {
            return Err(Error::invalid_argument(
                "draws",
                format!(
                    "{} timesteps and {} prompts for a batch of {b}",
                    draws.timesteps.len(),
                    input_ids.dims()[0]
                ),
            ));
        }
        let k = self.config.gradient_accumulation_steps.max(1);
        let dtype = self.config.mixed_precision.dtype();
        let scale = backward_scale(self.grad_scaler.as_ref());
        let (scheduler, objective) = (&self.scheduler, &self.objective);
        let contexts = parallel
            .encoders
            .iter()
            .cloned()
            .zip(parallel.unets.iter().cloned())
            .collect();
        let (value, grads) = parallel.tables.loss_and_gradients_with(
            &self.text_encoder.text_model.embeddings.token_embedding,
            b,
            contexts,
            scale,
            |table, (mut encoder, unet), rows, device| {
                let n = rows.len();
                let shard = |t: &Tensor<4>| t.clone().narrow(0, rows.start, n).to_device(device);
                encoder.text_model.embeddings.token_embedding = table.clone();
                let ids = input_ids.clone().narrow(0, rows.start, n).to_device(device);
                let states = match dtype {
                    Some(dtype) => half_copy(&encoder, dtype)?.forward(ids)?.last_hidden_state,
                    None => encoder.forward(ids)?.last_hidden_state,
                };
                let part = NoiseDraws {
                    noise: shard(&draws.noise),
                    offset_noise: None,
                    perturbation: None,
                    timesteps: draws.timesteps[rows.clone()].to_vec(),
                };
                let loss =
                    conditional_loss(&unet, scheduler, objective, shard(&latents), states, &part)?;
                Ok(accumulation_share(loss, k))
            },
        )?;
        if !self.pending.add(grads, value, k)? {
            return Ok(None);
        }
        let stats = self.finish_step()?;
        parallel.sync(self);
        Ok(Some(stats))
    }

    /// Take the optimizer step on the accumulated gradients (under fp16: unscaled first, and
    /// skipped, with the loss scale backing off, when they are not finite).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`step`) when nothing was accumulated.
    pub fn finish_step(&mut self) -> Result<StepStats> {
        let (grads, loss) = self.pending.take()?;
        // Skipped fp16 steps do not advance the schedule (accelerate skips the scheduler's step
        // with the optimizer's). The script clips no gradients.
        let lr = self.lr_schedule.lr(self.global_step - self.skipped_steps);
        let embedding = self
            .text_encoder
            .text_model
            .embeddings
            .token_embedding
            .clone();
        let (grad_norm, updated) = scaled_step(
            &mut self.optimizer,
            &mut self.grad_scaler,
            None,
            lr,
            embedding,
            grads,
        )?;
        self.last_step_skipped = updated.is_none();
        self.skipped_steps += usize::from(self.last_step_skipped);
        if let Some(embedding) = updated {
            // index_no_updates: every row outside the placeholders gets its original value back.
            let (first, last) = self.rows;
            let rows = embedding
                .weight
                .val()
                .inner()
                .narrow(0, first, last + 1 - first);
            self.set_learned_rows(embedding, rows);
        }
        self.global_step += 1;
        Ok(StepStats {
            step: self.global_step,
            loss,
            grad_norm,
            lr,
            ema_decay: None,
        })
    }

    /// Put `embedding` back into the text encoder with the original table everywhere but the
    /// placeholder rows, which become `rows` (`[num_vectors, hidden]`, without autodiff).
    fn set_learned_rows(
        &mut self,
        embedding: diffusion_core::burn::nn::Embedding,
        rows: Tensor<2>,
    ) {
        let [vocab, _] = self.original.dims();
        let (first, last) = self.rows;
        let mut parts = Vec::with_capacity(3);
        if first > 0 {
            parts.push(self.original.clone().narrow(0, 0, first));
        }
        parts.push(rows);
        if last + 1 < vocab {
            parts.push(self.original.clone().narrow(0, last + 1, vocab - last - 1));
        }
        let restored: Tensor<2> = Tensor::cat(parts, 0);
        let n = restored.dims().iter().product::<usize>();
        let embedding = params::replace(embedding, vec![Some(restored.reshape([n]))]);
        self.text_encoder.text_model.embeddings.token_embedding = embedding;
    }

    /// Write a resumable checkpoint into folder `dir` (through a temporary sibling renamed at
    /// the end): `learned_embeds.safetensors` (the placeholder rows), `optimizer/` (AdamW's
    /// moments of the token-embedding table and its step count) and `training_state.json`
    /// (global step, plan, seed, RNG scheme, settings). The other rows need no saving: they
    /// are the pretrained table's, restored after every step. The random draws of a step
    /// derive from the seed and the step, so no generator state is kept.
    ///
    /// # Errors
    /// [`Error::Io`] and serialisation errors.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        write_checkpoint_dir(dir, |tmp| {
            self.save_learned_embeds(tmp.join(LEARNED_EMBEDS_NAME))?;
            let embedding = &self.text_encoder.text_model.embeddings.token_embedding;
            self.optimizer.save(embedding, &tmp.join("optimizer"))?;
            self.mixed_precision_state().save_if_used(tmp)?;
            let state = TextualInversionState {
                global_step: self.global_step,
                num_training_steps: self.num_training_steps,
                seed: self.config.seed,
                rng_scheme: crate::checkpoint::RNG_SCHEME.into(),
                config: self.config.clone(),
            };
            write_state_file(tmp, STATE_FILE, &state)
        })
    }

    /// Continue from a checkpoint [`Self::save_checkpoint`] wrote: its placeholder rows, AdamW
    /// state and step replace this (freshly built) trainer's.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`], [`Error::ConfigField`] for unreadable files;
    /// [`Error::InvalidArgument`] (`resume_from_checkpoint`) for another RNG scheme, a step past
    /// the plan, or rows that do not fit the placeholders; the optimizer loader's errors naming
    /// the key.
    pub fn restore_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state: TextualInversionState = read_state_file(dir, STATE_FILE)?;
        check_resumable(
            dir,
            &state.rng_scheme,
            state.global_step,
            self.num_training_steps,
        )?;
        let refuse = |m: String| Error::invalid_argument("resume_from_checkpoint", m);
        let file = diffusion_core::weights::SafetensorsFile::open(dir.join(LEARNED_EMBEDS_NAME))?;
        let (values, shape) = file.read_f32(&self.config.placeholder_token)?;
        let want = self.learned_embeds().dims().to_vec();
        if shape != want {
            return Err(refuse(format!(
                "{}: `{}` has shape {shape:?}, the placeholders need {want:?}",
                file.path().display(),
                self.config.placeholder_token
            )));
        }
        let device = self.original.device();
        let rows = Tensor::<2>::from_data(
            diffusion_core::burn::tensor::TensorData::new(values, [want[0], want[1]]),
            &device,
        );
        let embedding = self
            .text_encoder
            .text_model
            .embeddings
            .token_embedding
            .clone();
        self.optimizer = AdamW::load(self.config.adamw(), &embedding, &dir.join("optimizer"))?;
        self.set_learned_rows(embedding, rows);
        self.global_step = state.global_step;
        MixedPrecisionState::restore(
            dir,
            self.config.mixed_precision,
            &mut self.skipped_steps,
            &mut self.grad_scaler,
        )?;
        Ok(())
    }

    /// The loss scaler under fp16.
    pub fn grad_scaler(&self) -> Option<&GradScaler> {
        self.grad_scaler.as_ref()
    }

    /// Replace the fp16 loss scaler (another initial scale or growth schedule).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`mixed_precision`) when the run is not fp16.
    pub fn set_grad_scaler(&mut self, scaler: GradScaler) -> Result<()> {
        if self.config.mixed_precision != MixedPrecision::Fp16 {
            return Err(Error::invalid_argument(
                "mixed_precision",
                format!(
                    "a loss scaler needs fp16, the run is `{}`",
                    self.config.mixed_precision.as_str()
                ),
            ));
        }
        self.grad_scaler = Some(scaler);
        Ok(())
    }

    /// Whether the last optimizer step was skipped for non-finite fp16 gradients.
    pub fn last_step_skipped(&self) -> bool {
        self.last_step_skipped
    }

    /// What a checkpoint keeps of the mixed-precision state.
    pub fn mixed_precision_state(&self) -> MixedPrecisionState {
        MixedPrecisionState {
            mixed_precision: self.config.mixed_precision,
            grad_scaler: self.grad_scaler.as_ref().map(|s| s.state().clone()),
            skipped_steps: self.skipped_steps,
        }
    }

    /// The whole token-embedding table, without autodiff.
    pub fn token_embedding(&self) -> Tensor<2> {
        self.text_encoder
            .text_model
            .embeddings
            .token_embedding
            .weight
            .val()
            .inner()
    }

    /// The learned rows, `[num_vectors, hidden]`, without autodiff.
    pub fn learned_embeds(&self) -> Tensor<2> {
        let (first, last) = self.rows;
        self.token_embedding().narrow(0, first, last + 1 - first)
    }

    /// Write the learned rows as the script's `save_progress` does:
    /// `{placeholder_token: [num_vectors, hidden]}` with metadata `format: pt`.
    ///
    /// # Errors
    /// [`Error::Io`] and serialisation errors.
    pub fn save_learned_embeds(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let rows = self.learned_embeds();
        let shape = rows.dims().to_vec();
        let values = diffusion_core::tensor::to_vec(rows);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
            .map_err(|e| Error::invalid_argument("learned_embeds", e.to_string()))?;
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        let data = safetensors::tensor::serialize(
            [(self.config.placeholder_token.as_str(), view)],
            metadata,
        )
        .map_err(|e| Error::invalid_argument("learned_embeds", e.to_string()))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        diffusion_core::config::write_atomically(path, &data)
    }

    /// The placeholder rows `(first, last)` of the table.
    pub fn placeholder_rows(&self) -> (usize, usize) {
        self.rows
    }

    /// The text encoder on the autodiff device.
    pub fn text_encoder(&self) -> &CLIPTextModel {
        &self.text_encoder
    }

    /// The prediction type of the loss.
    pub fn prediction_type(&self) -> PredictionType {
        self.objective.prediction_type
    }

    /// The noise scheduler.
    pub fn scheduler(&self) -> &DDPMScheduler {
        &self.scheduler
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
    pub fn config(&self) -> &TextualInversionConfig {
        &self.config
    }
}
