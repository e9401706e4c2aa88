//! Inverse DDIM: deterministic DDIM run backwards, from a clean sample towards noise, for
//! inversion-based editing (diffusers' `schedulers/scheduling_ddim_inverse.py`).

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::{
    self, BetaConfig, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing,
};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};

/// The config of [`DDIMInverseScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DDIMInverseSchedulerConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the schedule.
    pub beta_start: f64,
    /// Last beta of the schedule.
    pub beta_end: f64,
    /// Shape of the beta schedule.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Clamp the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// Whether the first step starts from `alpha_bar = 1` (true) or from `alphas_cumprod[0]`.
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Bound of `clip_sample`.
    pub clip_sample_range: f64,
    /// How inference timesteps are spaced (`leading` or `trailing`).
    pub timestep_spacing: TimestepSpacing,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DDIMInverseSchedulerConfig {
    /// The `__init__` defaults of diffusers' `DDIMInverseScheduler`
    /// (schedulers/scheduling_ddim_inverse.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl Config for DDIMInverseSchedulerConfig {
    const CLASS_NAME: &'static str = "DDIMInverseScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        use BetaSchedule::*;
        if self.trained_betas.is_none() {
            schedule::check_allowed(
                Self::CLASS_NAME,
                "beta_schedule",
                self.beta_schedule,
                &[Linear, ScaledLinear, SquaredcosCapV2],
                BetaSchedule::as_str,
            )?;
        }
        schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &[
                PredictionType::Epsilon,
                PredictionType::Sample,
                PredictionType::VPrediction,
            ],
            PredictionType::as_str,
        )?;
        schedule::check_allowed(
            Self::CLASS_NAME,
            "timestep_spacing",
            self.timestep_spacing,
            &[TimestepSpacing::Leading, TimestepSpacing::Trailing],
            TimestepSpacing::as_str,
        )?;
        schedule::check_common(
            self.num_train_timesteps,
            false,
            0.0,
            1.0,
            self.clip_sample,
            self.clip_sample_range,
        )
    }
}

/// Inverse DDIM: each `step` goes from `t - num_train_timesteps / num_inference_steps` up to
/// `t`, so running the ascending schedule maps a clean latent to the noise that deterministic
/// DDIM would denoise back to it. Takes no step options; it has no forward process
/// (`add_noise` is refused, as diffusers has none).
#[derive(Clone, Debug)]
pub struct DDIMInverseScheduler {
    file: ConfigFile<DDIMInverseSchedulerConfig>,
    schedule: NoiseSchedule,
    initial_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
}

impl DDIMInverseScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DDIMInverseSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// `alpha_bar` the first step starts from when its source lies before timestep 0.
    pub fn initial_alpha_cumprod(&self) -> f64 {
        self.initial_alpha_cumprod
    }
}

impl ConfiguredScheduler for DDIMInverseScheduler {
    type Config = DDIMInverseSchedulerConfig;

    fn from_config_file(file: ConfigFile<DDIMInverseSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(DDIMInverseSchedulerConfig::CLASS_NAME, e))?;
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: c.num_train_timesteps,
            beta_start: c.beta_start,
            beta_end: c.beta_end,
            beta_schedule: c.beta_schedule,
            trained_betas: c.trained_betas.as_deref(),
            rescale_betas_zero_snr: c.rescale_betas_zero_snr,
        })?;
        let initial_alpha_cumprod = if c.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let timesteps = (0..c.num_train_timesteps).map(|t| t as f64).collect();
        Ok(Self {
            file,
            schedule,
            initial_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
        })
    }

    fn config_file(&self) -> &ConfigFile<DDIMInverseSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for DDIMInverseScheduler {
    crate::scheduler::unit_noise_basics!(with_state);

    fn class_name(&self) -> &'static str {
        DDIMInverseSchedulerConfig::CLASS_NAME
    }

    /// Evenly spaced steps, least noisy first; no custom timesteps.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let k = request.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                "DDIMInverseScheduler needs a step count",
            )
        })?;
        let c = self.config();
        let ts = schedule::spaced_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            k,
            c.steps_offset,
        )?;
        self.timesteps = ts.into_iter().rev().map(|t| t as f64).collect();
        self.num_inference_steps = Some(k);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        _timestep: f64,
    ) -> Result<Tensor<D>> {
        Ok(sample)
    }

    /// One inverse DDIM step from `timestep - num_train_timesteps / num_inference_steps` to
    /// `timestep`. Takes no options.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        options.accept_only(self.class_name(), &[])?;
        let c = &self.file.config;
        let k = self.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                "DDIMInverseScheduler.step was called before set_timesteps",
            )
        })?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let n = c.num_train_timesteps;
        let target = self.schedule.index_of(timestep, "timestep")? as i64;
        let source = (target - (n / k) as i64).min(n as i64 - 1);
        // Step scalars in float32, as diffusers computes them on 0-d float32 tensors.
        let alpha_t = if source >= 0 {
            self.schedule.alphas_cumprod[source as usize] as f32
        } else {
            self.initial_alpha_cumprod as f32
        };
        let alpha_target = self.schedule.alphas_cumprod[target as usize] as f32;
        let beta_t = 1.0 - alpha_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_t.sqrt(), beta_t.sqrt());
        let (mut pred_original, pred_epsilon) = match c.prediction_type {
            PredictionType::Epsilon => (
                sample
                    .clone()
                    .sub(model_output.clone().mul_scalar(sqrt_beta))
                    .div_scalar(sqrt_alpha),
                model_output,
            ),
            PredictionType::Sample => (
                model_output.clone(),
                sample
                    .clone()
                    .sub(model_output.mul_scalar(sqrt_alpha))
                    .div_scalar(sqrt_beta),
            ),
            PredictionType::VPrediction => (
                sample
                    .clone()
                    .mul_scalar(sqrt_alpha)
                    .sub(model_output.clone().mul_scalar(sqrt_beta)),
                model_output
                    .mul_scalar(sqrt_alpha)
                    .add(sample.mul_scalar(sqrt_beta)),
            ),
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("DDIMInverseScheduler does not support {}", other.as_str()),
                ));
            }
        };
        if c.clip_sample {
            pred_original = ops::clip_sample(pred_original, c.clip_sample_range);
        }
        let direction = pred_epsilon.mul_scalar((1.0 - alpha_target).sqrt());
        let prev_sample = pred_original
            .clone()
            .mul_scalar(alpha_target.sqrt())
            .add(direction);
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }

    /// Refused: diffusers' `DDIMInverseScheduler` has no forward process.
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        let _ = (original, noise, timesteps);
        Err(Error::invalid_argument(
            "add_noise",
            "DDIMInverseScheduler has no forward process; use DDIMScheduler.add_noise",
        ))
    }
}
