//! One optimisation step of a `UNet2DModel`, as train_unconditional.py takes it:
//! noise the batch at the given timesteps, predict, take the MSE against the target, backward,
//! clip the global gradient norm, AdamW step at the scheduled learning rate, EMA update.

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Device, Error, Result};
use diffusion_models::UNet2DModel;
use diffusion_schedulers::{ConfiguredScheduler, DDPMScheduler, PredictionType, Scheduler};

use crate::config::TrainConfig;
use crate::ema::EmaModel;
use crate::lr_schedule::LrSchedule;
use crate::mixed_precision::{GradScaler, MixedPrecision, MixedPrecisionState, half_copy};
use crate::optimizer::{AdamW, FlatGradients, scaled_step};
use crate::params;

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// The global step count after this step (1 after the first).
    pub step: usize,
    /// The loss before the update.
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
    /// The learning rate this step used.
    pub lr: f64,
    /// The EMA decay this step used, when an EMA is kept.
    pub ema_decay: Option<f64>,
}

/// The training loss of `model` on clean images `x0` with the given noise and timesteps:
/// `mse(model(add_noise(x0, noise, t), t), target)` where the target is the noise
/// (`epsilon`), `scheduler.get_velocity(x0, noise, t)` (`v_prediction`), or `x0` with per-sample
/// SNR weights `alpha_bar / (1 - alpha_bar)` (`sample`, as train_unconditional.py weights it).
///
/// # Shapes
/// - `x0`, `noise`: `[B, C, H, W]`
/// - `timesteps`: `B` integer timesteps below `num_train_timesteps`
/// - output: `[1]`
///
/// # Errors
/// [`Error::InvalidArgument`] for mismatched shapes, a wrong timestep count or timesteps
/// outside the schedule, and for a prediction type without a training target; model errors
/// from `forward`.
pub fn training_loss(
    model: &UNet2DModel,
    scheduler: &DDPMScheduler,
    x0: Tensor<4>,
    noise: Tensor<4>,
    timesteps: &[usize],
) -> Result<Tensor<1>> {
    let [b, ..] = x0.dims();
    if timesteps.len() != b {
        return Err(Error::invalid_argument(
            "timesteps",
            format!("{} timesteps for a batch of {b}", timesteps.len()),
        ));
    }
    let num_train = scheduler.num_train_timesteps();
    if let Some(t) = timesteps.iter().find(|&&t| t >= num_train) {
        return Err(Error::invalid_argument(
            "timesteps",
            format!("{t} is not below num_train_timesteps ({num_train})"),
        ));
    }
    let ts: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
    let device = x0.device();
    let noisy = scheduler.add_noise(x0.clone(), noise.clone(), &ts)?;
    let t_tensor = Tensor::<1>::from_data(
        TensorData::new(
            timesteps.iter().map(|&t| t as f32).collect::<Vec<f32>>(),
            [b],
        ),
        &device,
    );
    // Under mixed precision `model` is the half copy: its input is cast to its dtype and its
    // prediction back to f32, so the loss is computed in f32.
    let noisy = crate::mixed_precision::cast_input(model, noisy);
    let pred = crate::mixed_precision::to_f32(model.forward(noisy, t_tensor, None)?);
    let loss = match scheduler.config().prediction_type {
        PredictionType::Epsilon => pred.sub(noise).square().mean(),
        PredictionType::VPrediction => {
            let target = scheduler.get_velocity(x0, noise, &ts)?;
            pred.sub(target).square().mean()
        }
        PredictionType::Sample => {
            // Computed in f32 from the f32 alphas_cumprod, as torch does.
            let alphas = scheduler.alphas_cumprod();
            let snr: Vec<f32> = timesteps
                .iter()
                .map(|&t| {
                    let a = alphas[t] as f32;
                    a / (1.0 - a)
                })
                .collect();
            let snr = Tensor::<4>::from_data(TensorData::new(snr, [b, 1, 1, 1]), &device);
            pred.sub(x0).square().mul(snr).mean()
        }
        other => {
            return Err(Error::invalid_argument(
                "prediction_type",
                format!("`{}` has no DDPM training target", other.as_str()),
            ));
        }
    };
    Ok(loss)
}

/// Model, optimizer, learning-rate schedule and EMA of one training run.
#[derive(Debug)]
pub struct Trainer {
    pub(crate) config: TrainConfig,
    pub(crate) model: UNet2DModel,
    pub(crate) scheduler: DDPMScheduler,
    pub(crate) optimizer: AdamW,
    pub(crate) lr_schedule: LrSchedule,
    pub(crate) ema: Option<EmaModel>,
    pub(crate) global_step: usize,
    pub(crate) num_training_steps: usize,
    pub(crate) grad_scaler: Option<GradScaler>,
    pub(crate) skipped_steps: usize,
    pub(crate) last_step_skipped: bool,
}

impl Trainer {
    /// Start training `model` for `num_training_steps` optimizer steps (which shapes the
    /// learning-rate schedule). The model is moved onto `device` with autodiff; its parameters'
    /// trainability is kept.
    ///
    /// # Errors
    /// As [`TrainConfig::validate`]; scheduler config errors.
    pub fn new(
        config: &TrainConfig,
        model: UNet2DModel,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        // `train` applies the parameters' configured trainability on the autodiff device.
        let ad = crate::autodiff::autodiff_device(device, config.gradient_checkpointing);
        let model = crate::autodiff::checkpointed(model.fork(&ad).train(), &ad);
        // Weights loaded from PyTorch layout can be strided views (a Linear's weight is a
        // transposed one). Kernels may sum in another order on those, so a run resumed from a
        // checkpoint would drift from the uninterrupted run, whose weights are always the
        // row-major results of the optimizer. Flattening and reshaping stores them row-major.
        let model = params::replace(
            model.clone(),
            params::values(&model).into_iter().map(Some).collect(),
        );
        let ema = if config.use_ema {
            Some(EmaModel::new(config.ema(), &model)?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            scheduler: DDPMScheduler::new(config.scheduler.clone())?,
            optimizer: AdamW::new(config.adamw())?,
            lr_schedule: LrSchedule::new(
                config.lr_scheduler,
                config.learning_rate,
                config.lr_warmup_steps,
                num_training_steps,
            )?,
            model,
            ema,
            global_step: 0,
            num_training_steps,
            grad_scaler: config.mixed_precision.grad_scaler(),
            skipped_steps: 0,
            last_step_skipped: false,
        })
    }

    /// One optimizer step on `x0` with the given noise and timesteps (see [`training_loss`]).
    /// The inputs are moved to the model's device.
    ///
    /// # Shapes
    /// - `x0`, `noise`: `[B, C, H, W]`
    /// - `timesteps`: `B` values
    ///
    /// # Errors
    /// As [`training_loss`].
    pub fn step(
        &mut self,
        x0: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[usize],
    ) -> Result<StepStats> {
        let device = crate::optimizer::module_device(&self.model);
        let x0 = x0.to_device(&device);
        let noise = noise.to_device(&device);
        // Skipped fp16 steps do not advance the schedule (accelerate skips the scheduler's step
        // with the optimizer's).
        let lr = self.lr_schedule.lr(self.global_step - self.skipped_steps);
        let (loss_value, grads) = match self.config.mixed_precision.dtype() {
            None => {
                let loss = training_loss(&self.model, &self.scheduler, x0, noise, timesteps)?;
                let grads = FlatGradients::from_backward(&self.model, loss.backward());
                (loss.inner().into_scalar::<f32>(), grads)
            }
            Some(dtype) => {
                let half = half_copy(&self.model, dtype)?;
                let loss = training_loss(&half, &self.scheduler, x0, noise, timesteps)?;
                let value = loss.clone().inner().into_scalar::<f32>();
                let scaled = match &self.grad_scaler {
                    Some(scaler) => loss.mul_scalar(scaler.scale()),
                    None => loss,
                };
                // The gradients reach the f32 master leaves through the casts' backward.
                (
                    value,
                    FlatGradients::from_backward(&self.model, scaled.backward()),
                )
            }
        };
        self.apply_gradients(lr, loss_value, grads)
    }

    /// The rest of a step once the gradients are known (`step` and the data-parallel step):
    /// unscale and check them under fp16, clip, one AdamW step at `lr` (skipped on overflow),
    /// the scale update, EMA.
    pub(crate) fn apply_gradients(
        &mut self,
        lr: f64,
        loss_value: f32,
        grads: FlatGradients,
    ) -> Result<StepStats> {
        let (grad_norm, updated) = scaled_step(
            &mut self.optimizer,
            &mut self.grad_scaler,
            self.config.max_grad_norm,
            lr,
            self.model.clone(),
            grads,
        )?;
        self.last_step_skipped = updated.is_none();
        self.skipped_steps += usize::from(self.last_step_skipped);
        if let Some(model) = updated {
            self.model = model;
        }
        let ema_decay = match &mut self.ema {
            Some(ema) => Some(ema.step(&self.model)?),
            None => None,
        };
        self.global_step += 1;
        Ok(StepStats {
            step: self.global_step,
            loss: loss_value,
            grad_norm,
            lr,
            ema_decay,
        })
    }

    /// The model being trained (on the autodiff device).
    pub fn model(&self) -> &UNet2DModel {
        &self.model
    }

    /// The EMA, when kept.
    pub fn ema(&self) -> Option<&EmaModel> {
        self.ema.as_ref()
    }

    /// The weights to sample with, without autodiff: the EMA weights when an EMA is kept (as
    /// train_unconditional.py exports them), else the trained ones.
    pub fn inference_model(&self) -> UNet2DModel {
        match &self.ema {
            Some(ema) => ema.copy_to(&self.model),
            None => self.model.valid(),
        }
    }

    /// The noise scheduler.
    pub fn scheduler(&self) -> &DDPMScheduler {
        &self.scheduler
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The learning-rate schedule.
    pub fn lr_schedule(&self) -> &LrSchedule {
        &self.lr_schedule
    }

    /// Optimizer steps taken so far (including those before a resume).
    pub fn global_step(&self) -> usize {
        self.global_step
    }

    /// The planned number of optimizer steps.
    pub fn num_training_steps(&self) -> usize {
        self.num_training_steps
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
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

    /// Whether the last step's optimizer update was skipped (non-finite fp16 gradients).
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
}
