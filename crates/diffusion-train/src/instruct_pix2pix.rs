//! InstructPix2Pix fine-tuning: diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py.
//!
//! A Stable Diffusion `UNet2DConditionModel` gets an 8-channel `conv_in` ([`widen_conv_in`]:
//! the pretrained weights for the first four channels, zeros for the new four) and learns to
//! denoise the latents of the *edited* image given the noisy latents concatenated with the
//! latents of the *original* image (`latent_dist.mode()`, unscaled, as the script takes them)
//! and the CLIP states of the edit prompt. Conditioning dropout ([`conditioning_masks`], the
//! script's `--conditioning_dropout_prob`) replaces the prompt by the encoded `""` and zeroes
//! the original-image latents, so that the model also learns the unconditional predictions
//! classifier-free guidance needs.
//!
//! The optimisation (AdamW, learning-rate schedule, accumulation, clipping, EMA, checkpoints)
//! is [`TextToImageTrainer`]'s; [`InstructPix2PixTrainer`] adds the loss.
//! [`crate::instruct_pix2pix_run`] is the loop around it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use diffusion_core::burn::module::Param;
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Device, Error, Result};
use diffusion_models::{ModelMixin, UNet2DConditionModel};
use diffusion_schedulers::{ConfiguredScheduler, DDPMScheduler, PredictionType, Scheduler};

use crate::caption_data::METADATA_FILE;
use crate::data_parallel::TextToImageParallel;
use crate::lr_schedule::LrScheduleKind;
use crate::mixed_precision::{cast_input, to_f32};
use crate::objective::NoiseDraws;
use crate::text_to_image::{TextToImageConfig, TextToImageTrainer};
use crate::trainer::StepStats;

/// Settings of an InstructPix2Pix run. Field names are the script's command-line options and
/// `Default` its defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstructPix2PixConfig {
    /// A diffusers Stable Diffusion folder (`--pretrained_model_name_or_path`) whose UNet has 4
    /// input channels (it is widened to 8), or 8 already (then it is trained as it is).
    pub pretrained_model: PathBuf,
    /// The dataset folder (`--train_data_dir`): images and `metadata.jsonl`.
    pub train_data_dir: PathBuf,
    /// Where checkpoints, logs and the result go.
    pub output_dir: PathBuf,
    /// The column naming the original image (`--original_image_column`).
    pub original_image_column: String,
    /// The column naming the edited image (`--edited_image_column`).
    pub edited_image_column: String,
    /// The column holding the edit instruction (`--edit_prompt_column`).
    pub edit_prompt_column: String,
    /// Side of the square training images (both images are resized to it).
    pub resolution: usize,
    /// Random horizontal flips (one per example, shared by its two images).
    pub random_flip: bool,
    /// Examples per micro-batch.
    pub train_batch_size: usize,
    /// Passes over the data, when `max_train_steps` is unset.
    pub num_train_epochs: usize,
    /// Optimizer steps to take (overrides `num_train_epochs`).
    pub max_train_steps: Option<usize>,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning-rate schedule.
    pub lr_scheduler: LrScheduleKind,
    /// Warmup steps of the schedule.
    pub lr_warmup_steps: usize,
    /// Probability scale of the conditioning dropout: with `u ~ U[0, 1)` per example, the
    /// prompt is dropped when `u < 2p`, the image when `p <= u < 3p` (so `p` each alone and
    /// both together). `None`: no dropout (the script's default).
    pub conditioning_dropout_prob: Option<f64>,
    /// AdamW `betas[0]`.
    pub adam_beta1: f64,
    /// AdamW `betas[1]`.
    pub adam_beta2: f64,
    /// AdamW decoupled weight decay.
    pub adam_weight_decay: f64,
    /// AdamW `eps`.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Keep an EMA of the UNet and export it.
    pub use_ema: bool,
    /// `no` (float32 everywhere), `fp16` or `bf16` (`--mixed_precision`; see
    /// [`crate::mixed_precision`]): f32 master weights, the UNet's forward and backward on a
    /// half copy, the frozen VAE and text encoder in the half dtype, a loss scale for `fp16`.
    pub mixed_precision: String,
    /// Data-parallel training over these devices, the main one first (`["cuda:0", "cuda:1"]`);
    /// `train_batch_size` is then the batch of each device, as with accelerate. Empty (the
    /// default): the device given to the run. See [`crate::data_parallel`].
    pub devices: Vec<String>,
    /// `--gradient_checkpointing`: recompute memory-bound activations in the backward pass
    /// (see [`crate::autodiff`]).
    pub gradient_checkpointing: bool,
    /// Seed of everything random.
    pub seed: u64,
    /// Save a resumable checkpoint every this many optimizer steps.
    pub checkpointing_steps: usize,
    /// Keep at most this many checkpoints.
    pub checkpoints_total_limit: Option<usize>,
    /// A checkpoint to resume from, or `latest`.
    pub resume_from_checkpoint: Option<String>,
    /// Show a progress bar.
    pub show_progress: bool,
    /// The original image that validation edits (`--val_image_url`; a local PNG or JPEG file
    /// here). Validation runs when it and `validation_prompt` are both set.
    pub val_image_url: Option<PathBuf>,
    /// The edit instruction of the validation images (`--validation_prompt`).
    pub validation_prompt: Option<String>,
    /// Edits per validation (`--num_validation_images`).
    pub num_validation_images: usize,
    /// Validate after every epoch `e` (0-based) with `e % validation_epochs == 0`
    /// (`--validation_epochs`), and after the last step.
    pub validation_epochs: usize,
}

impl Default for InstructPix2PixConfig {
    fn default() -> Self {
        Self {
            pretrained_model: PathBuf::new(),
            train_data_dir: PathBuf::new(),
            output_dir: PathBuf::from("instruct-pix2pix-model"),
            original_image_column: "input_image".into(),
            edited_image_column: "edited_image".into(),
            edit_prompt_column: "edit_prompt".into(),
            resolution: 256,
            random_flip: false,
            train_batch_size: 16,
            num_train_epochs: 100,
            max_train_steps: None,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-4,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 500,
            conditioning_dropout_prob: None,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-2,
            adam_epsilon: 1e-8,
            max_grad_norm: Some(1.0),
            use_ema: false,
            mixed_precision: "no".into(),
            devices: Vec::new(),
            gradient_checkpointing: false,
            seed: 0,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            show_progress: true,
            val_image_url: None,
            validation_prompt: None,
            num_validation_images: 4,
            validation_epochs: 1,
        }
    }
}

impl InstructPix2PixConfig {
    /// The settings of the shared optimisation ([`TextToImageTrainer`]): full fine-tuning, the
    /// scheduler's prediction type, no offset, perturbation or Min-SNR (the script has none).
    pub fn text_to_image(&self) -> TextToImageConfig {
        TextToImageConfig {
            pretrained_model: self.pretrained_model.clone(),
            train_data_dir: self.train_data_dir.clone(),
            output_dir: self.output_dir.clone(),
            caption_column: self.edit_prompt_column.clone(),
            resolution: self.resolution,
            center_crop: false,
            random_flip: self.random_flip,
            train_batch_size: self.train_batch_size,
            num_train_epochs: self.num_train_epochs,
            max_train_steps: self.max_train_steps,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            learning_rate: self.learning_rate,
            lr_scheduler: self.lr_scheduler,
            lr_warmup_steps: self.lr_warmup_steps,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_weight_decay: self.adam_weight_decay,
            adam_epsilon: self.adam_epsilon,
            max_grad_norm: self.max_grad_norm,
            use_ema: self.use_ema,
            prediction_type: None,
            lora: None,
            mixed_precision: self.mixed_precision.clone(),
            devices: self.devices.clone(),
            gradient_checkpointing: self.gradient_checkpointing,
            seed: self.seed,
            checkpointing_steps: self.checkpointing_steps,
            checkpoints_total_limit: self.checkpoints_total_limit,
            resume_from_checkpoint: self.resume_from_checkpoint.clone(),
            show_progress: self.show_progress,
            ..TextToImageConfig::default()
        }
    }

    /// Check the settings on their own, before anything is loaded.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first offending field (as
    /// [`TextToImageConfig::validate`], plus the columns, `conditioning_dropout_prob`
    /// outside `[0, 1]`, only one of `val_image_url` and `validation_prompt`, an empty
    /// validation prompt, zero `num_validation_images` or `validation_epochs`).
    pub fn validate(&self) -> Result<()> {
        for (name, column) in [
            ("original_image_column", &self.original_image_column),
            ("edited_image_column", &self.edited_image_column),
            ("edit_prompt_column", &self.edit_prompt_column),
        ] {
            if column.is_empty() {
                return Err(Error::invalid_argument(name, "is empty"));
            }
        }
        if let Some(p) = self.conditioning_dropout_prob
            && !(0.0..=1.0).contains(&p)
        {
            return Err(Error::invalid_argument(
                "conditioning_dropout_prob",
                format!("{p} is not in [0, 1]"),
            ));
        }
        self.validate_validation()?;
        self.text_to_image().validate()
    }

    /// Whether validation images are made (`val_image_url` and `validation_prompt` set).
    pub fn validation_enabled(&self) -> bool {
        self.val_image_url.is_some() && self.validation_prompt.is_some()
    }

    /// Whether validation images are due after a step of epoch `epoch` (0-based) that ended
    /// it when `end_of_epoch`, as the script (`epoch % validation_epochs == 0` at the end
    /// of an epoch) plus after the last step, when the script validates the saved pipeline.
    pub fn validation_due(&self, epoch: usize, end_of_epoch: bool, last: bool) -> bool {
        self.validation_enabled()
            && (last || (end_of_epoch && epoch.is_multiple_of(self.validation_epochs.max(1))))
    }

    fn validate_validation(&self) -> Result<()> {
        match (&self.val_image_url, &self.validation_prompt) {
            (Some(_), None) => {
                return Err(Error::invalid_argument(
                    "validation_prompt",
                    "val_image_url is set: give the edit instruction to validate with too",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::invalid_argument(
                    "val_image_url",
                    "validation_prompt is set: give the image to edit too",
                ));
            }
            _ => {}
        }
        if self
            .validation_prompt
            .as_ref()
            .is_some_and(|p| p.trim().is_empty())
        {
            return Err(Error::invalid_argument(
                "validation_prompt",
                "the validation prompt is empty",
            ));
        }
        for (name, value) in [
            ("num_validation_images", self.num_validation_images),
            ("validation_epochs", self.validation_epochs),
        ] {
            if value == 0 {
                return Err(Error::invalid_argument(name, "must be positive"));
            }
        }
        Ok(())
    }

    /// Check that the model folder and the dataset folder look right (before loading them).
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the missing folder or file (`val_image_url` included).
    pub fn check_paths(&self) -> Result<()> {
        self.text_to_image().check_paths()?;
        if let Some(path) = &self.val_image_url
            && !path.is_file()
        {
            return Err(Error::NotFound {
                path: path.clone(),
                message: "val_image_url: no such image file".into(),
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

/// The script's surgery on `conv_in`: a UNet with `in_channels` inputs whose first
/// `config.in_channels` take the pretrained kernels and the others zeros; every other weight is
/// `unet`'s. `bias`: the new convolution's bias. The script builds a fresh `nn.Conv2d`, so its
/// bias is PyTorch's default initialisation (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`), not the
/// pretrained bias; `None` keeps the pretrained bias instead.
///
/// # Errors
/// [`Error::InvalidArgument`] (`in_channels`) when it is not larger than the UNet's, or `bias`
/// does not have `conv_in`'s output channels; model building errors.
pub fn widen_conv_in(
    unet: UNet2DConditionModel,
    in_channels: usize,
    bias: Option<Tensor<1>>,
) -> Result<UNet2DConditionModel> {
    let mut config = unet.config().clone();
    let old = config.in_channels;
    if in_channels <= old {
        return Err(Error::invalid_argument(
            "in_channels",
            format!("{in_channels} does not widen a conv_in of {old} channels"),
        ));
    }
    config.in_channels = in_channels;
    let weight = unet.conv_in.weight.val();
    let [out, _, kh, kw] = weight.dims();
    let device = weight.device();
    let bias = match bias {
        Some(b) if b.dims() != [out] => {
            return Err(Error::invalid_argument(
                "bias",
                format!("shape {:?} for {out} output channels", b.dims()),
            ));
        }
        Some(b) => Some(b.to_device(&device)),
        None => unet.conv_in.bias.as_ref().map(|b| b.val()),
    };
    let zeros = Tensor::<4>::zeros([out, in_channels - old, kh, kw], &device);
    let mut widened = UNet2DConditionModel::new(&config, &device)?;
    widened.conv_in.weight = Param::from_tensor(Tensor::cat(vec![weight, zeros], 1));
    widened.conv_in.bias = bias.map(Param::from_tensor);
    let UNet2DConditionModel {
        time_proj,
        time_embedding,
        encoder_hid_proj,
        class_embedding,
        add_time_proj,
        add_embedding,
        down_blocks,
        mid_block,
        up_blocks,
        ip_image_proj,
        conv_norm_out,
        conv_out,
        ..
    } = unet;
    widened.time_proj = time_proj;
    widened.time_embedding = time_embedding;
    widened.encoder_hid_proj = encoder_hid_proj;
    widened.class_embedding = class_embedding;
    widened.add_time_proj = add_time_proj;
    widened.add_embedding = add_embedding;
    widened.down_blocks = down_blocks;
    widened.mid_block = mid_block;
    widened.up_blocks = up_blocks;
    widened.ip_image_proj = ip_image_proj;
    widened.conv_norm_out = conv_norm_out;
    widened.conv_out = conv_out;
    Ok(widened)
}

/// PyTorch's default `nn.Conv2d` bias initialisation, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`
/// with `fan_in = in_channels * kh * kw`, from `u` (uniform in `[0, 1)`, one per channel).
pub fn default_conv_bias(u: &[f32], fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    u.iter().map(|&u| (2.0 * u - 1.0) * bound).collect()
}

/// The script's conditioning-dropout masks for draws `random_p` (`torch.rand(bsz)`): per
/// example, whether the prompt is replaced by the null conditioning (`u < 2p`), and the factor
/// of the original-image latents (`1 - [p <= u] * [u < 3p]`, in float32).
pub fn conditioning_masks(prob: f64, random_p: &[f32]) -> Vec<(bool, f32)> {
    // torch compares the float32 draws with the Python floats cast to float32.
    let p = prob as f32;
    let (two, three) = ((2.0 * prob) as f32, (3.0 * prob) as f32);
    random_p
        .iter()
        .map(|&u| {
            let keep = f32::from(u8::from(u >= p)) * f32::from(u8::from(u < three));
            (u < two, 1.0 - keep)
        })
        .collect()
}

/// Apply [`conditioning_masks`]: rows of `encoder_hidden_states` become `null_conditioning`
/// (`[1, S, D]`) where the prompt is dropped, and `original_image_embeds` is multiplied by the
/// image factor.
///
/// # Errors
/// [`Error::InvalidArgument`] (`random_p`) when it is not one draw per example.
pub fn apply_conditioning_dropout(
    prob: f64,
    random_p: &[f32],
    encoder_hidden_states: Tensor<3>,
    null_conditioning: Tensor<3>,
    original_image_embeds: Tensor<4>,
) -> Result<(Tensor<3>, Tensor<4>)> {
    let b = encoder_hidden_states.dims()[0];
    if random_p.len() != b || original_image_embeds.dims()[0] != b {
        return Err(Error::invalid_argument(
            "random_p",
            format!("{} draws for a batch of {b}", random_p.len()),
        ));
    }
    let device = encoder_hidden_states.device();
    let masks = conditioning_masks(prob, random_p);
    let null = null_conditioning.to_device(&device);
    let rows = masks
        .iter()
        .enumerate()
        .map(|(i, &(drop, _))| {
            if drop {
                null.clone()
            } else {
                encoder_hidden_states.clone().narrow(0, i, 1)
            }
        })
        .collect();
    let factors: Vec<f32> = masks.iter().map(|m| m.1).collect();
    let factors = Tensor::<4>::from_data(TensorData::new(factors, [b, 1, 1, 1]), &device);
    let dims = original_image_embeds.dims();
    Ok((
        Tensor::cat(rows, 0),
        original_image_embeds.mul(factors.expand(dims)),
    ))
}

/// One micro-batch of InstructPix2Pix training, after the frozen encoders.
#[derive(Clone, Debug)]
pub struct EditBatch {
    /// `vae.encode(edited).latent_dist.sample() * scaling_factor`, `[B, 4, h, w]`.
    pub latents: Tensor<4>,
    /// `vae.encode(original).latent_dist.mode()` (unscaled), `[B, 4, h, w]`.
    pub original_image_embeds: Tensor<4>,
    /// The encoded edit prompts, `[B, S, D]`.
    pub encoder_hidden_states: Tensor<3>,
    /// With conditioning dropout: the encoded `""` (`[1, S, D]`) and one `U[0, 1)` draw per
    /// example.
    pub dropout: Option<(Tensor<3>, Vec<f32>)>,
}

/// The script's loss: noise the latents, apply the conditioning dropout, concatenate the
/// original-image latents on the channels, MSE of the prediction against the noise (or `v`).
///
/// # Shapes
/// - output: `[1]`
///
/// # Errors
/// [`Error::InvalidArgument`] for draws that do not fit the batch, dropout draws without a
/// probability or the reverse, a prediction type other than epsilon / v_prediction (the script
/// raises); model errors.
pub fn instruct_pix2pix_loss(
    unet: &UNet2DConditionModel,
    scheduler: &DDPMScheduler,
    conditioning_dropout_prob: Option<f64>,
    batch: &EditBatch,
    draws: &NoiseDraws,
) -> Result<Tensor<1>> {
    let latents = batch.latents.clone();
    let dims = latents.dims();
    let b = dims[0];
    let device = latents.device();
    if draws.noise.dims() != dims || draws.timesteps.len() != b {
        return Err(Error::invalid_argument(
            "noise",
            format!(
                "noise {:?} and {} timesteps for latents {dims:?}",
                draws.noise.dims(),
                draws.timesteps.len()
            ),
        ));
    }
    let num_train = scheduler.num_train_timesteps();
    if let Some(t) = draws.timesteps.iter().find(|&&t| t >= num_train) {
        return Err(Error::invalid_argument(
            "timesteps",
            format!("{t} is not below num_train_timesteps ({num_train})"),
        ));
    }
    let ts: Vec<f64> = draws.timesteps.iter().map(|&t| t as f64).collect();
    let noise = draws.noise.clone().to_device(&device);
    let noisy = scheduler.add_noise(latents.clone(), noise.clone(), &ts)?;
    let states = batch.encoder_hidden_states.clone().to_device(&device);
    let embeds = batch.original_image_embeds.clone().to_device(&device);
    let (states, embeds) = match (conditioning_dropout_prob, &batch.dropout) {
        (Some(p), Some((null, random_p))) => {
            apply_conditioning_dropout(p, random_p, states, null.clone(), embeds)?
        }
        (None, None) => (states, embeds),
        _ => {
            return Err(Error::invalid_argument(
                "dropout",
                "pass dropout draws exactly when conditioning_dropout_prob is set",
            ));
        }
    };
    let target = match scheduler.config().prediction_type {
        PredictionType::Epsilon => noise,
        PredictionType::VPrediction => scheduler.get_velocity(latents, noise, &ts)?,
        other => {
            return Err(Error::invalid_argument(
                "prediction_type",
                format!("unknown prediction type `{}`", other.as_str()),
            ));
        }
    };
    let t = Tensor::<1>::from_data(
        TensorData::new(ts.iter().map(|&t| t as f32).collect::<Vec<f32>>(), [b]),
        &device,
    );
    let input = Tensor::cat(vec![noisy, embeds], 1);
    // Under mixed precision `unet` is the half copy: its inputs are cast to its dtype and the
    // prediction back to f32 before the loss (the script's `model_pred.float()`).
    let input = cast_input(unet, input);
    let states = cast_input(unet, states);
    let pred = to_f32(unet.forward(input, t, states)?);
    Ok(pred.sub(target).square().mean())
}

/// The model, optimizer, schedule and EMA of an InstructPix2Pix run.
#[derive(Debug)]
pub struct InstructPix2PixTrainer {
    inner: TextToImageTrainer,
    conditioning_dropout_prob: Option<f64>,
}

impl InstructPix2PixTrainer {
    /// Start training `unet` (already widened, see [`widen_conv_in`]) on `device` (autodiff is
    /// turned on here).
    ///
    /// # Errors
    /// As [`InstructPix2PixConfig::validate`].
    pub fn new(
        config: &InstructPix2PixConfig,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let inner = TextToImageTrainer::new(
            &config.text_to_image(),
            unet,
            None,
            scheduler,
            num_training_steps,
            device,
        )?;
        Ok(Self::from_inner(inner, config.conditioning_dropout_prob))
    }

    /// Wrap a trainer rebuilt from a checkpoint.
    pub fn from_inner(inner: TextToImageTrainer, conditioning_dropout_prob: Option<f64>) -> Self {
        Self {
            inner,
            conditioning_dropout_prob,
        }
    }

    /// The loss of the current weights on one micro-batch (on the half copy of the UNet under
    /// mixed precision, see [`TextToImageTrainer::forward_unet`]).
    ///
    /// # Errors
    /// As [`instruct_pix2pix_loss`] and [`TextToImageTrainer::forward_unet`].
    pub fn loss(&self, batch: &EditBatch, draws: &NoiseDraws) -> Result<Tensor<1>> {
        let device = crate::optimizer::module_device(self.inner.unet());
        let batch = EditBatch {
            latents: batch.latents.clone().to_device(&device),
            ..batch.clone()
        };
        instruct_pix2pix_loss(
            &self.inner.forward_unet()?,
            self.inner.scheduler(),
            self.conditioning_dropout_prob,
            &batch,
            draws,
        )
    }

    /// One micro-batch: forward, backward, accumulate, and the optimizer step after the last
    /// micro-batch of a step (see [`TextToImageTrainer::step_loss`]).
    ///
    /// # Errors
    /// As [`Self::loss`].
    pub fn step(&mut self, batch: &EditBatch, draws: &NoiseDraws) -> Result<Option<StepStats>> {
        let loss = self.loss(batch, draws)?;
        self.inner.step_loss(loss)
    }

    /// [`Self::step`] over the devices of `parallel` (from [`TextToImageTrainer::data_parallel`]
    /// on [`Self::inner`]): the micro-batch is sharded (both images' latents, the prompts, the
    /// dropout draws, the noise and timesteps), each device computes its part of the loss and
    /// of the gradients with its replica, and the optimizer steps once on the main device (see
    /// [`TextToImageTrainer::step_data_parallel_by`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `timesteps` when the draws do not fit the batch; as
    /// [`instruct_pix2pix_loss`] and [`TextToImageTrainer::step_data_parallel_by`].
    pub fn step_data_parallel(
        &mut self,
        parallel: &mut TextToImageParallel,
        batch: &EditBatch,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let b = batch.latents.dims()[0];
        if draws.timesteps.len() != b {
            return Err(Error::invalid_argument(
                "timesteps",
                format!("{} timesteps for a batch of {b}", draws.timesteps.len()),
            ));
        }
        // Owned copies: the step below borrows the trainer mutably.
        let scheduler = self.inner.scheduler().clone();
        let prob = self.conditioning_dropout_prob;
        self.inner
            .step_data_parallel_by(parallel, b, |unet, rows, device| {
                let n = rows.len();
                let shard = |t: &Tensor<4>| t.clone().narrow(0, rows.start, n).to_device(device);
                let part = EditBatch {
                    latents: shard(&batch.latents),
                    original_image_embeds: shard(&batch.original_image_embeds),
                    encoder_hidden_states: batch
                        .encoder_hidden_states
                        .clone()
                        .narrow(0, rows.start, n)
                        .to_device(device),
                    dropout: batch.dropout.as_ref().map(|(null, random_p)| {
                        (
                            null.clone().to_device(device),
                            random_p[rows.clone()].to_vec(),
                        )
                    }),
                };
                let part_draws = NoiseDraws {
                    noise: shard(&draws.noise),
                    offset_noise: None,
                    perturbation: None,
                    timesteps: draws.timesteps[rows.clone()].to_vec(),
                };
                instruct_pix2pix_loss(unet, &scheduler, prob, &part, &part_draws)
            })
    }

    /// The shared optimisation state (UNet, optimizer, EMA, step count).
    pub fn inner(&self) -> &TextToImageTrainer {
        &self.inner
    }

    /// Mutable access to it (finishing a partial accumulation).
    pub fn inner_mut(&mut self) -> &mut TextToImageTrainer {
        &mut self.inner
    }
}

/// One row of an InstructPix2Pix dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditExample {
    /// The original image.
    pub original: PathBuf,
    /// The edited image.
    pub edited: PathBuf,
    /// The edit instruction.
    pub prompt: String,
}

/// (original, edited, instruction) rows of a folder with `metadata.jsonl`: each line names the
/// two images (relative paths) in the image columns, or in `<column>_file_name` (the
/// `datasets` imagefolder convention for several image columns), and holds the instruction.
#[derive(Clone, Debug)]
pub struct EditDataset {
    examples: Vec<EditExample>,
    resolution: usize,
}

impl EditDataset {
    /// Read `dir/metadata.jsonl` with `config`'s columns and resolution.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a missing metadata file or image, or an empty listing;
    /// [`Error::ConfigField`] naming the line for malformed JSON or a missing column;
    /// [`Error::Io`].
    pub fn from_folder(dir: impl AsRef<Path>, config: &InstructPix2PixConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(METADATA_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let bad = |line: usize, message: String| Error::ConfigField {
            path: path.clone(),
            field: format!("line {line}"),
            message,
        };
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: Value = serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
            let string = |column: &str| -> Result<String> {
                row.get(column)
                    .or_else(|| row.get(format!("{column}_file_name").as_str()))
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
            examples.push(EditExample {
                original: image(&config.original_image_column)?,
                edited: image(&config.edited_image_column)?,
                prompt: string(&config.edit_prompt_column)?,
            });
        }
        if examples.is_empty() {
            return Err(Error::NotFound {
                path,
                message: "no example listed".into(),
            });
        }
        Ok(Self {
            examples,
            resolution: config.resolution,
        })
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is none (never true for a loaded dataset).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Example `i`.
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn example(&self, i: usize) -> &EditExample {
        &self.examples[i]
    }

    /// The original and the edited images of `indices`, each `[B, 3, r, r]` in `[-1, 1]`
    /// (`2 * (x / 255) - 1`), example `k` flipped horizontally when `flips[k]`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`flips`) for a length mismatch or an index out of range;
    /// [`Error::Image`] for an unreadable file; [`Error::Unsupported`] for an image that is
    /// not already `resolution` square (the script's bicubic resize is not ported yet).
    pub fn pixel_values(&self, indices: &[usize], flips: &[bool]) -> Result<(Vec<f32>, Vec<f32>)> {
        if flips.len() != indices.len() {
            return Err(Error::invalid_argument(
                "flips",
                format!("{} flips for {} examples", flips.len(), indices.len()),
            ));
        }
        let (mut original, mut edited) = (Vec::new(), Vec::new());
        for (&i, &flip) in indices.iter().zip(flips) {
            let e = self.examples.get(i).ok_or_else(|| {
                Error::invalid_argument("flips", format!("index {i} of {}", self.len()))
            })?;
            original.extend(self.read(&e.original, flip)?);
            edited.extend(self.read(&e.edited, flip)?);
        }
        Ok((original, edited))
    }

    fn read(&self, path: &Path, flip: bool) -> Result<Vec<f32>> {
        let img = image::open(path)
            .map_err(|e| Error::Image {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
            .to_rgb8();
        let r = self.resolution;
        if (img.width() as usize, img.height() as usize) != (r, r) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                field: "resolution".into(),
                value: format!("{}x{}", img.width(), img.height()),
                reason: format!(
                    "images must already be {r}x{r} (resizing with PIL's bicubic filter is not \
                     ported yet)"
                ),
            });
        }
        let raw = img.as_raw();
        let mut out = Vec::with_capacity(3 * r * r);
        for c in 0..3 {
            for y in 0..r {
                for x in 0..r {
                    let xx = if flip { r - 1 - x } else { x };
                    let v = f32::from(raw[(y * r + xx) * 3 + c]);
                    out.push(2.0 * (v / 255.0) - 1.0);
                }
            }
        }
        Ok(out)
    }
}
