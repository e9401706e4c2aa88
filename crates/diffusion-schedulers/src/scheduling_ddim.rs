//! DDIM: the non-Markovian sampler of "Denoising Diffusion Implicit Models" (diffusers'
//! `schedulers/scheduling_ddim.py`).

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

/// The config of [`DDIMScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DDIMSchedulerConfig {
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
    /// Whether the step past the last timestep goes to `alpha_bar = 1` (true) or to
    /// `alphas_cumprod[0]` (false).
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of the predicted `x_0` (pixel-space models only).
    pub thresholding: bool,
    /// Quantile used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Bound of `clip_sample`.
    pub clip_sample_range: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DDIMSchedulerConfig {
    /// The `__init__` defaults of diffusers' `DDIMScheduler` (schedulers/scheduling_ddim.py).
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
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl Config for DDIMSchedulerConfig {
    const CLASS_NAME: &'static str = "DDIMScheduler";

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

/// The DDIM sampler: deterministic with `eta = 0`, increasingly stochastic up to `eta = 1`.
///
/// [`Scheduler::step`] takes `eta`, `use_clipped_model_output`, and for `eta > 0` either a
/// `generator` or caller-supplied `variance_noise`.
///
/// As in diffusers, the step goes from `t` to `t - num_train_timesteps / num_inference_steps`
/// whatever the spacing, so with `linspace` or `trailing` spacing the step's target is not
/// always the next listed timestep; this is kept for parity.
#[derive(Clone, Debug)]
pub struct DDIMScheduler {
    /// The class named in errors (DDIMParallelScheduler reuses this one).
    class: &'static str,
    file: ConfigFile<DDIMSchedulerConfig>,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
}

impl DDIMScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DDIMSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// `alphas_cumprod` of the training schedule.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.schedule.alphas_cumprod
    }

    /// `alpha_bar` used past the last timestep.
    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
    }

    /// `alpha_bar` at the target of a step, `final_alpha_cumprod` past the end, as the float32
    /// diffusers holds.
    fn alpha_prod_prev(&self, prev_t: f64) -> Result<f32> {
        if prev_t >= 0.0 {
            Ok(self.schedule.alpha_cumprod_at(prev_t)? as f32)
        } else {
            Ok(self.final_alpha_cumprod as f32)
        }
    }

    /// The variance `sigma_t^2 / eta^2` of the step from `timestep` to `prev_timestep`
    /// (eq. 16 of the DDIM paper; diffusers' `_get_variance`), in float32 as diffusers
    /// computes it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a timestep is outside the training schedule.
    pub fn variance(&self, timestep: f64, prev_timestep: f64) -> Result<f64> {
        Ok(f64::from(self.variance_f32(timestep, prev_timestep)?))
    }

    fn variance_f32(&self, timestep: f64, prev_timestep: f64) -> Result<f32> {
        let alpha_prod_t = self.schedule.alpha_cumprod_at(timestep)? as f32;
        let alpha_prod_prev = self.alpha_prod_prev(prev_timestep)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        Ok((beta_prod_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_prev))
    }

    fn alphas_cumprod_at(&self, timesteps: &[f64]) -> Result<Vec<f64>> {
        timesteps
            .iter()
            .map(|&t| self.schedule.alpha_cumprod_at(t))
            .collect()
    }
}

/// The float32 quantities of one DDIM update (eq. 12 of the paper): one value for the whole
/// batch in `step`, one per sample in DDIMParallelScheduler's `batch_step_no_noise`.
pub(crate) struct DdimCoefficients<C> {
    /// `sqrt(alpha_bar_t)`.
    pub sqrt_alpha: C,
    /// `sqrt(1 - alpha_bar_t)`.
    pub sqrt_beta: C,
    /// `sqrt(alpha_bar_prev)`.
    pub sqrt_alpha_prev: C,
    /// `sqrt(1 - alpha_bar_prev - sigma_t^2)`: the weight of the direction pointing to `x_t`.
    pub direction: C,
}

impl DDIMScheduler {
    /// The same scheduler reporting itself (in errors) as `class`.
    pub(crate) fn with_class_name(mut self, class: &'static str) -> Self {
        self.class = class;
        self
    }

    /// The noise-free part of a DDIM update: the predicted `x_0` (clipped or thresholded as
    /// configured) and `sqrt(alpha_bar_prev) x_0 + direction * eps`, with `eps` re-derived
    /// from the clipped `x_0` when `use_clipped_model_output` (Glide). Returns `(x_prev, x_0)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a prediction type DDIM does not take; as
    /// [`ops::threshold_sample`].
    pub(crate) fn denoise<C: ops::Coefficient<D>, const D: usize>(
        &self,
        model_output: Tensor<D>,
        sample: Tensor<D>,
        k: &DdimCoefficients<C>,
        use_clipped_model_output: bool,
    ) -> Result<(Tensor<D>, Tensor<D>)> {
        let c = &self.file.config;
        let (mut pred_original, mut pred_epsilon) = match c.prediction_type {
            PredictionType::Epsilon => (
                k.sqrt_alpha
                    .divide(sample.clone().sub(k.sqrt_beta.times(model_output.clone()))),
                model_output,
            ),
            PredictionType::Sample => (
                model_output.clone(),
                k.sqrt_beta
                    .divide(sample.clone().sub(k.sqrt_alpha.times(model_output))),
            ),
            PredictionType::VPrediction => (
                k.sqrt_alpha
                    .times(sample.clone())
                    .sub(k.sqrt_beta.times(model_output.clone())),
                k.sqrt_alpha
                    .times(model_output)
                    .add(k.sqrt_beta.times(sample.clone())),
            ),
            other @ (PredictionType::FlowPrediction | PredictionType::OriginalSample) => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("{} does not support {}", self.class, other.as_str()),
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
        if use_clipped_model_output {
            // Re-derive the noise from the clipped x_0 (Glide).
            pred_epsilon = k
                .sqrt_beta
                .divide(sample.sub(k.sqrt_alpha.times(pred_original.clone())));
        }
        let direction = k.direction.times(pred_epsilon);
        let prev_sample = k
            .sqrt_alpha_prev
            .times(pred_original.clone())
            .add(direction);
        Ok((prev_sample, pred_original))
    }
}

impl ConfiguredScheduler for DDIMScheduler {
    type Config = DDIMSchedulerConfig;

    fn from_config_file(file: ConfigFile<DDIMSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(DDIMSchedulerConfig::CLASS_NAME, e))?;
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
            class: DDIMSchedulerConfig::CLASS_NAME,
            file,
            schedule,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
        })
    }

    fn config_file(&self) -> &ConfigFile<DDIMSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for DDIMScheduler {
    crate::scheduler::unit_noise_basics!(with_state);

    fn class_name(&self) -> &'static str {
        self.class
    }

    /// Evenly spaced steps per `timestep_spacing`; DDIM takes no custom timesteps.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let k = request.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                format!("{} needs a step count", self.class),
            )
        })?;
        let c = self.config();
        let ts = schedule::spaced_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            k,
            c.steps_offset,
        )?;
        self.timesteps = ts.into_iter().map(|t| t as f64).collect();
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

    /// One DDIM step (eq. 12 of the paper). Takes `eta` (default 0),
    /// `use_clipped_model_output` (default false), and `generator` or `variance_noise`, used
    /// only when `eta > 0`.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        options.accept_only(
            self.class_name(),
            &[
                "eta",
                "use_clipped_model_output",
                "generator",
                "variance_noise",
            ],
        )?;
        let c = &self.file.config;
        let k = self.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                format!("{}.step was called before set_timesteps", self.class),
            )
        })?;
        let eta = options.eta.unwrap_or(0.0);
        if eta.is_nan() || eta < 0.0 {
            return Err(Error::invalid_argument(
                "eta",
                format!("{eta} must be non-negative"),
            ));
        }
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let prev_t = timestep - (c.num_train_timesteps / k) as f64;
        // Step scalars in float32: diffusers computes them on 0-d float32 tensors (see
        // scheduling_ddpm for why that matters for parity).
        let alpha_prod_t = self.schedule.alpha_cumprod_at(timestep)? as f32;
        let alpha_prod_prev = self.alpha_prod_prev(prev_t)?;
        let beta_prod_t = 1.0 - alpha_prod_t;

        let variance = self.variance_f32(timestep, prev_t)?;
        let std_dev = eta as f32 * variance.sqrt();
        let direction_coeff_sq = 1.0 - alpha_prod_prev - std_dev * std_dev;
        if direction_coeff_sq < 0.0 {
            return Err(Error::invalid_argument(
                "eta",
                format!(
                    "{eta} is too large for the step from {timestep}: the noise would exceed \
                     the variance left at the target timestep"
                ),
            ));
        }
        let coefficients = DdimCoefficients {
            sqrt_alpha: alpha_prod_t.sqrt(),
            sqrt_beta: beta_prod_t.sqrt(),
            sqrt_alpha_prev: alpha_prod_prev.sqrt(),
            direction: direction_coeff_sq.sqrt(),
        };
        let (mut prev_sample, pred_original) = self.denoise(
            model_output.clone(),
            sample,
            &coefficients,
            options.use_clipped_model_output.unwrap_or(false),
        )?;

        if eta > 0.0 {
            let noise = ops::noise_like(
                &model_output,
                options.generator,
                options.variance_noise,
                self.class_name(),
            )?;
            prev_sample = prev_sample.add(noise.mul_scalar(std_dev));
        }

        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }

    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        ops::add_noise_with(&self.alphas_cumprod_at(timesteps)?, original, noise)
    }

    fn get_velocity<const D: usize>(
        &self,
        sample: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        ops::velocity_with(&self.alphas_cumprod_at(timesteps)?, sample, noise)
    }
}
