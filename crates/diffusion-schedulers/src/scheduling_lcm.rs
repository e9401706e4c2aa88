//! LCM: the multistep sampler of Latent Consistency Models (Luo et al., 2023), diffusers'
//! `schedulers/scheduling_lcm.py`.

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
use crate::sigmas::{MissingTimestep, StepCursor};

/// The config of [`LCMScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LCMSchedulerConfig {
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
    /// The length of the distillation schedule the inference timesteps are drawn from.
    pub original_inference_steps: usize,
    /// Clamp the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// Bound of `clip_sample`.
    pub clip_sample_range: f64,
    /// Whether the step past the last timestep goes to `alpha_bar = 1` (true) or to
    /// `alphas_cumprod[0]` (false).
    pub set_alpha_to_one: bool,
    /// Kept for config compatibility; diffusers' LCM does not use it.
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of the predicted `x_0` (pixel-space models only).
    pub thresholding: bool,
    /// Quantile used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// Kept for config compatibility; diffusers' LCM does not use it.
    pub timestep_spacing: TimestepSpacing,
    /// Multiplies the timestep in the consistency boundary condition (`c_skip`, `c_out`).
    pub timestep_scaling: f64,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for LCMSchedulerConfig {
    /// The `__init__` defaults of diffusers' `LCMScheduler` (schedulers/scheduling_lcm.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl Config for LCMSchedulerConfig {
    const CLASS_NAME: &'static str = "LCMScheduler";

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
        if self.original_inference_steps == 0
            || self.original_inference_steps > self.num_train_timesteps
        {
            return Err((
                "original_inference_steps".into(),
                format!(
                    "{} must lie in [1, num_train_timesteps = {}]",
                    self.original_inference_steps, self.num_train_timesteps
                ),
            ));
        }
        if !self.timestep_scaling.is_finite() {
            return Err(("timestep_scaling".into(), "must be finite".into()));
        }
        schedule::check_common(
            self.num_train_timesteps,
            self.thresholding,
            self.dynamic_thresholding_ratio,
            self.sample_max_value,
            self.clip_sample,
            self.clip_sample_range,
        )
    }
}

/// The LCM sampler, the scheduler A1111 calls "LCM": each step predicts the clean sample
/// through the consistency boundary condition and, except at the last step, re-noises it to
/// the next timestep with fresh noise from the `generator` (or `variance_noise`) in
/// [`StepOptions`].
///
/// Stateful like Euler: the first `step` after `set_timesteps` finds its place from the
/// timestep (or [`Scheduler::set_begin_index`]). The returned `pred_original_sample` is
/// diffusers' `denoised`.
#[derive(Clone, Debug)]
pub struct LCMScheduler {
    file: ConfigFile<LCMSchedulerConfig>,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    custom_timesteps: bool,
    cursor: StepCursor,
}

impl LCMScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: LCMSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Whether the schedule was given as custom timesteps.
    pub fn custom_timesteps(&self) -> bool {
        self.custom_timesteps
    }

    /// The distillation schedule `k, 2k, ..., original_steps * k`, minus one (ascending).
    fn origin_timesteps(&self) -> Vec<i64> {
        let c = self.config();
        let k = (c.num_train_timesteps / c.original_inference_steps) as i64;
        (1..=c.original_inference_steps as i64)
            .map(|i| i * k - 1)
            .collect()
    }

    /// `c_skip` and `c_out` of the consistency boundary condition at `timestep`, in float32 as
    /// diffusers computes them from the int64 timestep tensor.
    fn boundary_scalings(&self, timestep: f64) -> (f32, f32) {
        let scaled = timestep as f32 * self.config().timestep_scaling as f32;
        let sigma_data_sq = 0.25f32;
        let denom = scaled * scaled + sigma_data_sq;
        (sigma_data_sq / denom, scaled / denom.sqrt())
    }

    fn alphas_at(&self, timesteps: &[f64]) -> Result<Vec<f64>> {
        timesteps
            .iter()
            .map(|&t| self.schedule.alpha_cumprod_at(t))
            .collect()
    }
}

impl ConfiguredScheduler for LCMScheduler {
    type Config = LCMSchedulerConfig;

    fn from_config_file(file: ConfigFile<LCMSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(LCMSchedulerConfig::CLASS_NAME, e))?;
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: c.num_train_timesteps,
            beta_start: c.beta_start,
            beta_end: c.beta_end,
            beta_schedule: c.beta_schedule,
            trained_betas: c.trained_betas.as_deref(),
            rescale_betas_zero_snr: c.rescale_betas_zero_snr,
        })?;
        let final_alpha_cumprod = if c.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let timesteps = (0..c.num_train_timesteps).rev().map(|t| t as f64).collect();
        Ok(Self {
            file,
            schedule,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
            custom_timesteps: false,
            cursor: StepCursor::default(),
        })
    }

    fn config_file(&self) -> &ConfigFile<LCMSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for LCMScheduler {
    crate::scheduler::unit_noise_basics!(with_state);

    fn class_name(&self) -> &'static str {
        LCMSchedulerConfig::CLASS_NAME
    }

    /// A step count (evenly drawn from the `original_inference_steps` distillation schedule)
    /// or custom timesteps (descending integers below `num_train_timesteps`).
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps", "timesteps"])?;
        let n = self.config().num_train_timesteps;
        let original = self.config().original_inference_steps;
        let (k, timesteps, custom) = match (request.num_inference_steps, request.timesteps) {
            (Some(k), None) => {
                schedule::check_num_inference_steps(k, n)?;
                if k > original {
                    return Err(Error::invalid_argument(
                        "num_inference_steps",
                        format!(
                            "{k} is larger than original_inference_steps ({original}): the \
                             schedule is a subset of the distillation schedule"
                        ),
                    ));
                }
                let mut origin = self.origin_timesteps();
                origin.reverse();
                // np.floor(np.linspace(0, len, k, endpoint=False)).
                let step = origin.len() as f64 / k as f64;
                let ts = (0..k)
                    .map(|i| origin[(i as f64 * step).floor() as usize] as f64)
                    .collect();
                (k, ts, false)
            }
            (None, Some(ts)) => {
                if ts.is_empty()
                    || ts
                        .iter()
                        .any(|&t| t.fract() != 0.0 || t < 0.0 || t >= n as f64)
                {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        format!("need at least one timestep, each an integer in [0, {n})"),
                    ));
                }
                if ts.windows(2).any(|w| w[1] >= w[0]) {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        "custom timesteps must be in descending order",
                    ));
                }
                (ts.len(), ts, true)
            }
            (None, None) => {
                return Err(Error::invalid_argument(
                    "num_inference_steps",
                    "pass a step count or custom timesteps",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(Error::invalid_argument(
                    "timesteps",
                    "pass only one of num_inference_steps and timesteps",
                ));
            }
        };
        self.timesteps = timesteps;
        self.num_inference_steps = Some(k);
        self.custom_timesteps = custom;
        self.cursor.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step_index(&self) -> Option<usize> {
        self.cursor.step_index
    }

    fn set_begin_index(&mut self, begin_index: usize) -> Result<()> {
        self.cursor
            .set_begin_index(begin_index, self.timesteps.len())
    }

    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        _timestep: f64,
    ) -> Result<Tensor<D>> {
        Ok(sample)
    }

    /// One LCM step. Takes `generator` or `variance_noise`, needed at every step but the last.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &["generator", "variance_noise"])?;
        let k = self.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                "LCMScheduler.step was called before set_timesteps",
            )
        })?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        if i >= self.timesteps.len() {
            return Err(Error::invalid_argument(
                "timestep",
                format!(
                    "{class} has already taken all {} steps of its schedule; call set_timesteps \
                     to start again",
                    self.timesteps.len()
                ),
            ));
        }
        let prev_timestep = self.timesteps.get(i + 1).copied().unwrap_or(timestep);
        let c = self.config();
        // Step scalars in float32, as diffusers computes them on 0-d float32 tensors.
        let alpha_t = self.schedule.alpha_cumprod_at(timestep)? as f32;
        let alpha_prev = if prev_timestep >= 0.0 {
            self.schedule.alpha_cumprod_at(prev_timestep)? as f32
        } else {
            self.final_alpha_cumprod as f32
        };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        let mut pred_original = match c.prediction_type {
            PredictionType::Epsilon => sample
                .clone()
                .sub(model_output.clone().mul_scalar(beta_t.sqrt()))
                .div_scalar(alpha_t.sqrt()),
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => sample
                .clone()
                .mul_scalar(alpha_t.sqrt())
                .sub(model_output.clone().mul_scalar(beta_t.sqrt())),
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("{class} does not support {}", other.as_str()),
                ));
            }
        };
        if c.thresholding {
            pred_original = ops::threshold_sample(
                pred_original,
                c.dynamic_thresholding_ratio,
                c.sample_max_value,
            )?;
        } else if c.clip_sample {
            pred_original = ops::clip_sample(pred_original, c.clip_sample_range);
        }
        let denoised = pred_original
            .mul_scalar(c_out)
            .add(sample.mul_scalar(c_skip));
        let prev_sample = if i + 1 != k {
            let noise = ops::noise_like(
                &model_output,
                options.generator,
                options.variance_noise,
                class,
            )?;
            denoised
                .clone()
                .mul_scalar(alpha_prev.sqrt())
                .add(noise.mul_scalar(beta_prev.sqrt()))
        } else {
            denoised.clone()
        };
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(denoised),
        })
    }

    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        ops::add_noise_with(&self.alphas_at(timesteps)?, original, noise)
    }

    fn get_velocity<const D: usize>(
        &self,
        sample: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        ops::velocity_with(&self.alphas_at(timesteps)?, sample, noise)
    }
}
