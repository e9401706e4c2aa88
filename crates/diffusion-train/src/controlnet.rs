//! ControlNet training: diffusers' examples/controlnet/train_controlnet.py. The UNet, the VAE
//! and the text encoder stay frozen; a [`ControlNetModel`] (usually
//! [`ControlNetModel::from_unet`]) learns, through the frozen UNet, to make its residuals help
//! the UNet predict the noise: the loss is the MSE between the UNet's prediction with the
//! ControlNet's residuals and the target of the scheduler's prediction type. AdamW on the
//! ControlNet's parameters, a learning-rate schedule and global-norm clipping, as in the script.
//!
//! [`ControlNetTrainer`] takes steps on caller-supplied latents, text states, conditioning
//! images and noise, which is how the parity test drives it.
//!
//! Mixed precision (`--mixed_precision fp16|bf16`, see [`crate::mixed_precision`]): the frozen
//! UNet is cast to the half dtype (the script's `weight_dtype`); the ControlNet keeps `f32`
//! master weights and runs a half copy made inside the autodiff graph; its residuals enter the
//! UNet in the half dtype and the prediction is widened to `f32` before the loss. With `fp16`
//! the loss is scaled ([`GradScaler`]) and a step with non-finite gradients is skipped. Conditioning images are in
//! `[0, 1]` (the script's `Resize`, `CenterCrop`, `ToTensor`, no normalisation):
//! [`conditioning_pixel_values`].

use std::path::Path;

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::{Device, Error, Result};
use diffusion_models::{ControlNetModel, ControlNetOptions, UNet2DConditionModel};
use diffusion_schedulers::{ConfiguredScheduler, DDPMScheduler, PredictionType, Scheduler};

use crate::data_parallel::DataParallel;
use crate::lr_schedule::{LrSchedule, LrScheduleKind};
use crate::mixed_precision::{
    GradScaler, MixedPrecision, MixedPrecisionState, backward_scale, cast_input, half_copy, to_f32,
};
use crate::objective::NoiseDraws;
use crate::optimizer::{
    Accumulator, AdamW, AdamWConfig, FlatGradients, accumulation_share, scaled_step,
};
use crate::params;
use crate::resize::{Interpolation, center_crop_offsets, resize, resized_size};
use crate::trainer::StepStats;

/// The optimisation settings of train_controlnet.py; `Default` is the script's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlNetTrainConfig {
    /// Peak learning rate (`--learning_rate`, 5e-6).
    pub learning_rate: f64,
    /// Learning-rate schedule (`--lr_scheduler`, constant).
    pub lr_scheduler: LrScheduleKind,
    /// Warmup steps of the schedule (`--lr_warmup_steps`, 500).
    pub lr_warmup_steps: usize,
    /// AdamW `betas[0]`.
    pub adam_beta1: f64,
    /// AdamW `betas[1]`.
    pub adam_beta2: f64,
    /// AdamW decoupled weight decay.
    pub adam_weight_decay: f64,
    /// AdamW `eps`.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm of the ControlNet's parameters; `None` disables it.
    pub max_grad_norm: Option<f64>,
    /// `--mixed_precision` (`no`).
    pub mixed_precision: MixedPrecision,
    /// Micro-batches per optimizer step (`--gradient_accumulation_steps`, 1).
    pub gradient_accumulation_steps: usize,
    /// `--gradient_checkpointing`: recompute memory-bound activations in the backward pass
    /// (see [`crate::autodiff`]).
    pub gradient_checkpointing: bool,
}

impl Default for ControlNetTrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 5e-6,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 500,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-2,
            adam_epsilon: 1e-8,
            max_grad_norm: Some(1.0),
            mixed_precision: MixedPrecision::No,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
        }
    }
}

impl ControlNetTrainConfig {
    /// The AdamW hyperparameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            weight_decay: self.adam_weight_decay,
            epsilon: self.adam_epsilon,
        }
    }

    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first offending field.
    pub fn validate(&self) -> Result<()> {
        if self.gradient_accumulation_steps == 0 {
            return Err(Error::invalid_argument(
                "gradient_accumulation_steps",
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
        self.adamw().validate()
    }
}

/// The ControlNet being trained, the frozen UNet, optimizer and schedule.
#[derive(Debug)]
pub struct ControlNetTrainer {
    config: ControlNetTrainConfig,
    /// On the autodiff device, trained.
    controlnet: ControlNetModel,
    /// On the autodiff device, frozen.
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    optimizer: AdamW,
    lr_schedule: LrSchedule,
    global_step: usize,
    /// The fp16 loss scaler.
    grad_scaler: Option<GradScaler>,
    /// Optimizer steps skipped for non-finite fp16 gradients.
    skipped_steps: usize,
    last_step_skipped: bool,
    /// The micro-batches of the step in progress.
    pending: Accumulator,
}

impl ControlNetTrainer {
    /// Start training `controlnet` through the frozen `unet`; both are moved onto `device` with
    /// autodiff (the UNet cast to the half dtype under mixed precision). `scheduler` is the
    /// noise scheduler (its prediction type is the target).
    ///
    /// # Errors
    /// As [`ControlNetTrainConfig::validate`]; [`Error::InvalidArgument`] (`prediction_type`)
    /// for a prediction type the script cannot train (only epsilon and v_prediction), (`dtype`)
    /// for a half dtype the device does not support.
    pub fn new(
        config: &ControlNetTrainConfig,
        controlnet: ControlNetModel,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        match scheduler.config().prediction_type {
            PredictionType::Epsilon | PredictionType::VPrediction => {}
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!(
                        "train_controlnet.py trains epsilon or v_prediction, not `{}`",
                        other.as_str()
                    ),
                ));
            }
        }
        let ad = crate::autodiff::autodiff_device(device, config.gradient_checkpointing);
        let controlnet = crate::autodiff::checkpointed(controlnet.fork(&ad).train(), &ad);
        // Row-major weights, as the other trainers keep them (see trainer.rs).
        let controlnet = params::replace(
            controlnet.clone(),
            params::values(&controlnet).into_iter().map(Some).collect(),
        );
        let unet = match config.mixed_precision.dtype() {
            Some(dtype) => diffusion_models::modeling_utils::to_dtype(unet, dtype)?,
            None => unet,
        };
        let unet = crate::autodiff::checkpointed(unet.fork(&ad).no_grad(), &ad);
        Ok(Self {
            config: config.clone(),
            controlnet,
            unet,
            scheduler,
            optimizer: AdamW::new(config.adamw())?,
            lr_schedule: LrSchedule::new(
                config.lr_scheduler,
                config.learning_rate,
                config.lr_warmup_steps,
                num_training_steps,
            )?,
            global_step: 0,
            grad_scaler: config.mixed_precision.grad_scaler(),
            skipped_steps: 0,
            last_step_skipped: false,
            pending: Accumulator::default(),
        })
    }

    /// The loss of the current ControlNet on one batch, as train_controlnet.py computes it:
    /// noise the latents at the drawn timesteps, run the ControlNet on them with the
    /// conditioning image, the UNet with its residuals, MSE against the target.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]` (scaled by the VAE's `scaling_factor`)
    /// - `encoder_hidden_states`: `[B, S, D]`
    /// - `controlnet_image`: `[B, 3, H * f, W * f]` in `[0, 1]` (`f` the VAE's downsampling)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for draws that do not fit the latents; model errors.
    pub fn loss(
        &self,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        controlnet_image: Tensor<4>,
        draws: &NoiseDraws,
    ) -> Result<Tensor<1>> {
        let device = crate::optimizer::module_device(&self.controlnet);
        controlnet_loss(
            &self.forward_controlnet()?,
            &self.unet,
            &self.scheduler,
            latents.to_device(&device),
            encoder_hidden_states.to_device(&device),
            controlnet_image.to_device(&device),
            draws,
        )
    }

    /// The ControlNet a loss runs: under mixed precision a copy cast to the half dtype inside the
    /// autodiff graph (the gradients reach the `f32` masters), else the ControlNet itself.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`dtype`) when the device does not support the half dtype.
    pub fn forward_controlnet(&self) -> Result<ControlNetModel> {
        match self.config.mixed_precision.dtype() {
            Some(dtype) => half_copy(&self.controlnet, dtype),
            None => Ok(self.controlnet.clone()),
        }
    }

    /// The gradients of `loss` with respect to the ControlNet's parameters, in visit order.
    pub fn gradients(&self, loss: Tensor<1>) -> FlatGradients {
        FlatGradients::from_backward(&self.controlnet, loss.backward())
    }

    /// One micro-batch: loss, backward of `loss / gradient_accumulation_steps`, accumulate;
    /// after the last micro-batch of an optimizer step, clipping and AdamW at the scheduled
    /// rate ([`Self::finish_step`]), whose stats are returned (the loss is the sum over the
    /// micro-batches of their share, the mean the script logs).
    ///
    /// # Errors
    /// As [`Self::loss`].
    pub fn step(
        &mut self,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        controlnet_image: Tensor<4>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let k = self.config.gradient_accumulation_steps.max(1);
        let loss = self.loss(latents, encoder_hidden_states, controlnet_image, draws)?;
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

    /// The optimizer step on what the micro-batches so far accumulated: unscale (fp16; a step
    /// with non-finite gradients is skipped), clip, AdamW at the scheduled rate.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`step`) when nothing was accumulated.
    pub fn finish_step(&mut self) -> Result<StepStats> {
        let (grads, loss) = self.pending.take()?;
        // Skipped fp16 steps do not advance the schedule (accelerate skips the scheduler's step
        // with the optimizer's).
        let lr = self.lr_schedule.lr(self.global_step - self.skipped_steps);
        let (grad_norm, updated) = scaled_step(
            &mut self.optimizer,
            &mut self.grad_scaler,
            self.config.max_grad_norm,
            lr,
            self.controlnet.clone(),
            grads,
        )?;
        self.last_step_skipped = updated.is_none();
        self.skipped_steps += usize::from(self.last_step_skipped);
        if let Some(controlnet) = updated {
            self.controlnet = controlnet;
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

    /// Whether micro-batches of an unfinished optimizer step are pending.
    pub fn has_pending(&self) -> bool {
        self.pending.is_pending()
    }

    /// Replicate the ControlNet onto `devices` (the first must be the trainer's own device),
    /// with a copy of the frozen UNet on every device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `devices` when the list is empty.
    pub fn data_parallel(&self, devices: Vec<Device>) -> Result<ControlNetParallel> {
        let controlnets = DataParallel::new(devices, &self.controlnet)?;
        let unets = controlnets.frozen_copies(&self.unet);
        Ok(ControlNetParallel { controlnets, unets })
    }

    /// [`Self::step`] over the devices of `parallel` (from [`Self::data_parallel`]): the
    /// micro-batch is sharded (latents, prompts, conditioning images, noise, timesteps), each
    /// device runs its ControlNet replica (its half copy under mixed precision) and UNet copy
    /// on its rows, the gradients are gathered on the main device and accumulated, and after
    /// the last micro-batch of a step the optimizer steps once and the replicas are synced.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `draws` when the draws do not fit the batch; as
    /// [`Self::loss`] and [`Self::finish_step`].
    pub fn step_data_parallel(
        &mut self,
        parallel: &mut ControlNetParallel,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        controlnet_image: Tensor<4>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let b = latents.dims()[0];
        if draws.timesteps.len() != b {
            return Err(Error::invalid_argument(
                "draws",
                format!("{} timesteps for a batch of {b}", draws.timesteps.len()),
            ));
        }
        let k = self.config.gradient_accumulation_steps.max(1);
        let dtype = self.config.mixed_precision.dtype();
        let scale = backward_scale(self.grad_scaler.as_ref());
        let scheduler = &self.scheduler;
        let contexts = parallel.unets.clone();
        let (value, grads) = parallel.controlnets.loss_and_gradients_with(
            &self.controlnet,
            b,
            contexts,
            scale,
            |controlnet, unet, rows, device| {
                let n = rows.len();
                let shard = |t: &Tensor<4>| t.clone().narrow(0, rows.start, n).to_device(device);
                let controlnet = match dtype {
                    Some(dtype) => half_copy(controlnet, dtype)?,
                    None => controlnet.clone(),
                };
                let part = NoiseDraws {
                    noise: shard(&draws.noise),
                    offset_noise: None,
                    perturbation: None,
                    timesteps: draws.timesteps[rows.clone()].to_vec(),
                };
                let loss = controlnet_loss(
                    &controlnet,
                    &unet,
                    scheduler,
                    shard(&latents),
                    encoder_hidden_states
                        .clone()
                        .narrow(0, rows.start, n)
                        .to_device(device),
                    shard(&controlnet_image),
                    &part,
                )?;
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

    /// The ControlNet on the autodiff device.
    pub fn controlnet(&self) -> &ControlNetModel {
        &self.controlnet
    }

    /// The trained ControlNet without autodiff (to save or run).
    pub fn inference_controlnet(&self) -> ControlNetModel {
        self.controlnet.valid()
    }

    /// The frozen UNet without autodiff (the validation pipeline's UNet).
    pub fn inference_unet(&self) -> UNet2DConditionModel {
        self.unet.valid()
    }

    /// Optimizer steps taken so far.
    pub fn global_step(&self) -> usize {
        self.global_step
    }
}

/// The replicas of a ControlNet run, one per device (see [`ControlNetTrainer::data_parallel`]).
#[derive(Debug)]
pub struct ControlNetParallel {
    controlnets: DataParallel<ControlNetModel>,
    /// The frozen UNet per device (the main device's first).
    unets: Vec<UNet2DConditionModel>,
}

impl ControlNetParallel {
    /// The devices, the main one first.
    pub fn devices(&self) -> &[Device] {
        self.controlnets.devices()
    }

    /// Copy `trainer`'s current ControlNet into every other replica (after an optimizer step;
    /// [`ControlNetTrainer::step_data_parallel`] does it itself).
    pub fn sync(&mut self, trainer: &ControlNetTrainer) {
        self.controlnets.sync(&trainer.controlnet);
    }
}

/// train_controlnet.py's loss with `controlnet` (the trained one, or its half copy) and the
/// frozen `unet` on one batch (inputs on their device): noise the latents at the drawn
/// timesteps, run the ControlNet on them with the conditioning image, the UNet with its
/// residuals, MSE against the target.
///
/// # Errors
/// [`Error::InvalidArgument`] for draws that do not fit the latents; model errors.
fn controlnet_loss(
    controlnet: &ControlNetModel,
    unet: &UNet2DConditionModel,
    scheduler: &DDPMScheduler,
    latents: Tensor<4>,
    states: Tensor<3>,
    image: Tensor<4>,
    draws: &NoiseDraws,
) -> Result<Tensor<1>> {
    let device = latents.device();
    let noise = draws.noise.clone().to_device(&device);
    let b = latents.dims()[0];
    let num_train = scheduler.num_train_timesteps();
    if draws.timesteps.len() != b || noise.dims() != latents.dims() {
        return Err(Error::invalid_argument(
            "draws",
            format!(
                "{} timesteps and noise {:?} for latents {:?}",
                draws.timesteps.len(),
                noise.dims(),
                latents.dims()
            ),
        ));
    }
    if let Some(t) = draws.timesteps.iter().find(|&&t| t >= num_train) {
        return Err(Error::invalid_argument(
            "timesteps",
            format!("{t} is not below num_train_timesteps ({num_train})"),
        ));
    }
    let ts: Vec<f64> = draws.timesteps.iter().map(|&t| t as f64).collect();
    let noisy = scheduler.add_noise(latents.clone(), noise.clone(), &ts)?;
    let target = match scheduler.config().prediction_type {
        PredictionType::VPrediction => scheduler.get_velocity(latents, noise, &ts)?,
        _ => noise,
    };
    let t = Tensor::<1>::from_data(
        TensorData::new(ts.iter().map(|&t| t as f32).collect::<Vec<f32>>(), [b]),
        &device,
    );
    let residuals = controlnet.forward_with(
        cast_input(controlnet, noisy.clone()),
        t.clone(),
        cast_input(controlnet, states.clone()),
        cast_input(controlnet, image),
        ControlNetOptions::default(),
    )?;
    // The residuals enter the UNet in its dtype (the script's `.to(dtype=weight_dtype)`).
    let residuals = diffusion_models::ControlNetOutput {
        down_block_res_samples: residuals
            .down_block_res_samples
            .into_iter()
            .map(|r| cast_input(unet, r))
            .collect(),
        mid_block_res_sample: cast_input(unet, residuals.mid_block_res_sample),
    };
    let pred = unet.forward_with(
        cast_input(unet, noisy),
        t,
        cast_input(unet, states),
        residuals.into_unet_options(),
    )?;
    Ok(to_f32(pred).sub(target).square().mean())
}

/// A conditioning image as train_controlnet.py prepares it: `Resize(resolution)` (bilinear,
/// shorter side), `CenterCrop(resolution)`, `ToTensor()` (values in `[0, 1]`, no
/// normalisation). Returns `[3, resolution, resolution]` values, channel-major.
///
/// # Errors
/// Image reading errors.
pub fn conditioning_pixel_values(path: &Path, resolution: usize) -> Result<Vec<f32>> {
    image_values(path, resolution, Interpolation::Bilinear)
}

fn image_values(path: &Path, resolution: usize, filter: Interpolation) -> Result<Vec<f32>> {
    let img = diffusion_core::image::load_image(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = resized_size(w, h, resolution);
    let (left, top) = center_crop_offsets(nw, nh, resolution);
    let mut out = Vec::with_capacity(3 * resolution * resolution);
    for c in 0..3 {
        // ToTensor divides the bytes by 255 in float32; resized as caption_data does.
        let plane: Vec<f32> = img.pixels().map(|p| f32::from(p.0[c]) / 255.0).collect();
        let plane = if (nw, nh) == (w, h) {
            plane
        } else {
            resize(&plane, [w, h], [nw, nh], filter)
        };
        for y in top..top + resolution {
            out.extend_from_slice(&plane[y * nw + left..y * nw + left + resolution]);
        }
    }
    Ok(out)
}

impl ControlNetTrainer {
    /// The optimizer (its moments are saved in checkpoints).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The settings.
    pub fn config(&self) -> &ControlNetTrainConfig {
        &self.config
    }

    /// Continue from checkpoint `dir`: its optimizer state, step count and mixed-precision
    /// state (see [`MixedPrecisionState::restore`]).
    ///
    /// # Errors
    /// As [`MixedPrecisionState::restore`].
    pub(crate) fn resume(
        &mut self,
        optimizer: AdamW,
        global_step: usize,
        dir: &Path,
    ) -> Result<()> {
        self.optimizer = optimizer;
        self.global_step = global_step;
        MixedPrecisionState::restore(
            dir,
            self.config.mixed_precision,
            &mut self.skipped_steps,
            &mut self.grad_scaler,
        )
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
            mixed_precision: self.config.mixed_precision,
            grad_scaler: self.grad_scaler.as_ref().map(|s| s.state().clone()),
            skipped_steps: self.skipped_steps,
        }
    }

    /// The frozen UNet's compute dtype (the half dtype under mixed precision).
    pub fn unet_dtype(&self) -> FloatDType {
        self.unet.conv_in.weight.val().dtype().into()
    }
}
