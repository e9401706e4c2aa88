//! Euler ancestral: Euler steps to a lower noise level, then fresh noise back up to the target
//! (diffusers' `schedulers/scheduling_euler_ancestral_discrete.py`, A1111's "Euler a").

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::{
    self, BetaConfig, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing,
};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{self, MissingTimestep, StepCursor, check_step_in_range, float_timesteps};

/// The config of [`EulerAncestralDiscreteScheduler`], key for key as in
/// `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EulerAncestralDiscreteSchedulerConfig {
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
    /// What the model predicts (`epsilon` or `v_prediction`).
    pub prediction_type: PredictionType,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for EulerAncestralDiscreteSchedulerConfig {
    /// The `__init__` defaults of diffusers' `EulerAncestralDiscreteScheduler`
    /// (schedulers/scheduling_euler_ancestral_discrete.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl Config for EulerAncestralDiscreteSchedulerConfig {
    const CLASS_NAME: &'static str = "EulerAncestralDiscreteScheduler";

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
        // diffusers raises NotImplementedError for `sample` at the first step.
        schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            PredictionType::as_str,
        )?;
        schedule::check_common(self.num_train_timesteps, false, 0.0, 1.0, false, 0.0)
    }
}

/// The Euler ancestral sampler. Every step draws noise, from the generator (or
/// `variance_noise`) in [`StepOptions`], exactly as diffusers draws it.
///
/// Stateful like [`crate::EulerDiscreteScheduler`]: the first call finds the step from the
/// timestep (or the begin index) and each `step` moves on by one.
#[derive(Clone, Debug)]
pub struct EulerAncestralDiscreteScheduler {
    file: ConfigFile<EulerAncestralDiscreteSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
}

impl EulerAncestralDiscreteScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: EulerAncestralDiscreteSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
}

impl ConfiguredScheduler for EulerAncestralDiscreteScheduler {
    type Config = EulerAncestralDiscreteSchedulerConfig;

    fn from_config_file(file: ConfigFile<EulerAncestralDiscreteSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(EulerAncestralDiscreteSchedulerConfig::CLASS_NAME, e))?;
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: c.num_train_timesteps,
            beta_start: c.beta_start,
            beta_end: c.beta_end,
            beta_schedule: c.beta_schedule,
            trained_betas: c.trained_betas.as_deref(),
            rescale_betas_zero_snr: c.rescale_betas_zero_snr,
        })?;
        let sigma_table = sigmas::sigma_table(&schedule, c.rescale_betas_zero_snr);
        let mut sigmas: Vec<f64> = sigma_table.iter().rev().map(|&s| f64::from(s)).collect();
        sigmas.push(0.0);
        let timesteps = (0..c.num_train_timesteps).rev().map(|t| t as f64).collect();
        Ok(Self {
            file,
            schedule,
            sigma_table,
            timesteps,
            sigmas,
            num_inference_steps: None,
            cursor: StepCursor::default(),
        })
    }

    fn config_file(&self) -> &ConfigFile<EulerAncestralDiscreteSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    crate::scheduler::stateful_scheduler_accessors!(sigma_scaled_input);

    fn order(&self) -> usize {
        1
    }

    fn init_noise_sigma(&self) -> f64 {
        sigmas::euler_init_noise_sigma(&self.sigmas, self.config().timestep_spacing)
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().num_train_timesteps
    }

    /// A step count only, as in diffusers.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let k = request.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                "EulerAncestralDiscreteScheduler needs a step count",
            )
        })?;
        let c = self.config();
        let timesteps =
            float_timesteps(c.timestep_spacing, c.num_train_timesteps, k, c.steps_offset)?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| f64::from(sigmas::interp_on_grid(t, &self.sigma_table) as f32))
            .collect();
        sigmas.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.num_inference_steps = Some(k);
        self.cursor.reset();
        Ok(())
    }

    /// One ancestral Euler step; takes `generator` or `variance_noise` (an extension over
    /// diffusers), needed at every step.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &["generator", "variance_noise"])?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        check_step_in_range(i, &self.sigmas, class)?;
        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);

        // Scalars in float32, as diffusers holds sigmas in a float32 tensor.
        let sigma = self.sigmas[i] as f32;
        let pred_original = match self.config().prediction_type {
            PredictionType::Epsilon => sample.clone().sub(model_output.clone().mul_scalar(sigma)),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                model_output
                    .clone()
                    .mul_scalar(-sigma / s2.sqrt())
                    .add(sample.clone().div_scalar(s2))
            }
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("{class} does not support {}", other.as_str()),
                ));
            }
        };
        let sigma_to = self.sigmas[i + 1] as f32;
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        // Draw before changing any state, so a refused step leaves the scheduler where it was.
        let noise = ops::noise_like(
            &model_output,
            options.generator,
            options.variance_noise,
            class,
        )?;
        let derivative = sample.clone().sub(pred_original.clone()).div_scalar(sigma);
        let prev_sample = sample
            .add(derivative.mul_scalar(sigma_down - sigma))
            .add(noise.mul_scalar(sigma_up));
        self.cursor.advance();

        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: Some(pred_original),
        })
    }

    /// `original + sigma * noise` at the sigma of each timestep (or of the begin index).
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        ops::check_same_shape(&noise, &original, "noise", "original_samples")?;
        let indices =
            self.cursor
                .noise_indices(&self.timesteps, timesteps, MissingTimestep::Error)?;
        let sigma: Vec<f64> = indices.iter().map(|&i| self.sigmas[i]).collect();
        let sigma = ops::batch_coefficients(&sigma, &original)?;
        Ok(original.add(noise.mul(sigma)))
    }
}
