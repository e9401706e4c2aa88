//! DDPM: the ancestral sampler of "Denoising Diffusion Probabilistic Models" (diffusers'
//! `schedulers/scheduling_ddpm.py`).

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

/// How DDPM picks the variance of the noise it adds back at each step (`variance_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VarianceType {
    /// The posterior variance `beta~_t` (the paper's lower bound).
    #[serde(rename = "fixed_small")]
    FixedSmall,
    /// `beta~_t`, computed through its logarithm.
    #[serde(rename = "fixed_small_log")]
    FixedSmallLog,
    /// `beta_t` (the paper's upper bound).
    #[serde(rename = "fixed_large")]
    FixedLarge,
    /// `log beta_t`. diffusers then takes the square root of this negative number, so its
    /// steps are NaN; stepping with it is refused here.
    #[serde(rename = "fixed_large_log")]
    FixedLargeLog,
    /// The model predicts the variance in its extra output channels.
    #[serde(rename = "learned")]
    Learned,
    /// The model predicts an interpolation between the log variances of `fixed_small` and
    /// `fixed_large` (improved DDPM).
    #[serde(rename = "learned_range")]
    LearnedRange,
}

impl VarianceType {
    /// The string used in `scheduler_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FixedSmall => "fixed_small",
            Self::FixedSmallLog => "fixed_small_log",
            Self::FixedLarge => "fixed_large",
            Self::FixedLargeLog => "fixed_large_log",
            Self::Learned => "learned",
            Self::LearnedRange => "learned_range",
        }
    }

    pub(crate) fn is_learned(self) -> bool {
        matches!(self, Self::Learned | Self::LearnedRange)
    }
}

/// The config of [`DDPMScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DDPMSchedulerConfig {
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
    /// Variance of the noise added back at each step.
    pub variance_type: VarianceType,
    /// Clamp the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
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
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DDPMSchedulerConfig {
    /// The `__init__` defaults of diffusers' `DDPMScheduler` (schedulers/scheduling_ddpm.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl Config for DDPMSchedulerConfig {
    const CLASS_NAME: &'static str = "DDPMScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        use BetaSchedule::*;
        if self.trained_betas.is_none() {
            schedule::check_allowed(
                Self::CLASS_NAME,
                "beta_schedule",
                self.beta_schedule,
                &[Linear, ScaledLinear, SquaredcosCapV2, Laplace, Sigmoid],
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

/// The DDPM ancestral sampler.
///
/// Before [`Scheduler::set_timesteps`] its schedule is every training timestep, as in diffusers
/// (its own tests step through all 1000 without setting timesteps). Steps at `t > 0` add noise,
/// drawn from the generator in [`StepOptions`] exactly as diffusers draws it, so a seeded loop
/// reproduces diffusers' noise bit for bit.
#[derive(Clone, Debug)]
pub struct DDPMScheduler {
    /// The class named in errors (DDPMParallelScheduler reuses this one).
    class: &'static str,
    file: ConfigFile<DDPMSchedulerConfig>,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    custom_timesteps: bool,
}

impl DDPMScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DDPMSchedulerConfig) -> Result<Self> {
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

    /// The timestep that follows `timestep` in the current schedule, -1 after the last one
    /// (diffusers' `previous_timestep`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `timestep` when it is not in the schedule.
    pub fn previous_timestep(&self, timestep: f64) -> Result<f64> {
        if self.custom_timesteps || self.num_inference_steps.is_some() {
            let index = self
                .timesteps
                .iter()
                .position(|&t| t == timestep)
                .ok_or_else(|| {
                    Error::invalid_argument(
                        "timestep",
                        format!("{timestep} is not one of the scheduler's timesteps"),
                    )
                })?;
            Ok(self.timesteps.get(index + 1).copied().unwrap_or(-1.0))
        } else {
            self.schedule.index_of(timestep, "timestep")?;
            Ok(timestep - 1.0)
        }
    }

    /// `alpha_bar` at the target of a step, 1 past the end, as the float32 diffusers holds.
    fn alpha_prod_prev(&self, prev_t: f64) -> Result<f32> {
        if prev_t >= 0.0 {
            Ok(self.schedule.alpha_cumprod_at(prev_t)? as f32)
        } else {
            Ok(1.0)
        }
    }

    fn alphas_cumprod_at(&self, timesteps: &[f64]) -> Result<Vec<f64>> {
        timesteps
            .iter()
            .map(|&t| self.schedule.alpha_cumprod_at(t))
            .collect()
    }

    /// The variance of the step from `timestep` for the fixed variance types (diffusers'
    /// `_get_variance` without a predicted variance), evaluated in float32 as diffusers does.
    ///
    /// # Errors
    /// As [`Self::previous_timestep`]; [`Error::InvalidArgument`] for learned variance types,
    /// which need the model's prediction.
    pub fn fixed_variance(&self, timestep: f64) -> Result<f64> {
        let (small, large) = self.variance_bounds(timestep)?;
        match self.config().variance_type {
            VarianceType::FixedSmall => Ok(f64::from(small)),
            VarianceType::FixedSmallLog => Ok(f64::from((0.5 * small.ln()).exp())),
            VarianceType::FixedLarge => Ok(f64::from(large)),
            VarianceType::FixedLargeLog => Ok(f64::from(large.ln())),
            v @ (VarianceType::Learned | VarianceType::LearnedRange) => {
                Err(Error::invalid_argument(
                    "variance_type",
                    format!("`{}` variance comes from the model output", v.as_str()),
                ))
            }
        }
    }

    /// The clamped posterior variance `beta~_t` and `beta_t` of the step from `timestep`.
    fn variance_bounds(&self, timestep: f64) -> Result<(f32, f32)> {
        let prev_t = self.previous_timestep(timestep)?;
        let alpha_prod_t = self.schedule.alpha_cumprod_at(timestep)? as f32;
        let alpha_prod_prev = self.alpha_prod_prev(prev_t)?;
        let current_beta = 1.0 - alpha_prod_t / alpha_prod_prev;
        let small = ((1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t) * current_beta).max(1e-20);
        Ok((small, current_beta))
    }
}

/// How the noise of one DDPM step is scaled.
enum NoiseScale<const D: usize> {
    /// A fixed standard deviation.
    Std(f32),
    /// The model's variance (`learned`).
    LearnedVariance(Tensor<D>),
    /// The model's interpolation value in `[-1, 1]` between two log variances
    /// (`learned_range`).
    LearnedRange {
        frac_source: Tensor<D>,
        min_log: f32,
        max_log: f32,
    },
}

impl DDPMScheduler {
    fn noise_scale<const D: usize>(
        &self,
        t: f64,
        variance_type: VarianceType,
        predicted_variance: Option<Tensor<D>>,
        channels: usize,
    ) -> Result<NoiseScale<D>> {
        let (small, large) = self.variance_bounds(t)?;
        let needs_prediction = || {
            Error::invalid_argument(
                "model_output",
                format!(
                    "variance_type `{}` needs the model's variance in {channels} extra channels \
                     (2 x {channels} in all)",
                    variance_type.as_str()
                ),
            )
        };
        match variance_type {
            VarianceType::FixedSmall => Ok(NoiseScale::Std(small.sqrt())),
            // diffusers goes through the log and back: exp(0.5 * log(v)).
            VarianceType::FixedSmallLog => Ok(NoiseScale::Std((0.5 * small.ln()).exp())),
            VarianceType::FixedLarge => Ok(NoiseScale::Std(large.sqrt())),
            VarianceType::FixedLargeLog => Err(Error::Unsupported {
                path: format!("<{}>", self.class).into(),
                field: "variance_type".into(),
                value: "fixed_large_log".into(),
                reason: "diffusers scales the noise by the square root of log(beta_t), which is \
                         negative, so every such step is NaN; there is no reference to match"
                    .into(),
            }),
            VarianceType::Learned => predicted_variance
                .map(NoiseScale::LearnedVariance)
                .ok_or_else(needs_prediction),
            VarianceType::LearnedRange => predicted_variance
                .map(|frac_source| NoiseScale::LearnedRange {
                    frac_source,
                    min_log: small.ln(),
                    max_log: large.ln(),
                })
                .ok_or_else(needs_prediction),
        }
    }
}

/// The float32 quantities of one DDPM posterior mean (eq. 7 of the paper): one value for the
/// whole batch in `step`, one per sample in DDPMParallelScheduler's `batch_step_no_noise`.
pub(crate) struct DdpmCoefficients<C> {
    /// `sqrt(alpha_bar_t)`.
    pub sqrt_alpha: C,
    /// `sqrt(1 - alpha_bar_t)`.
    pub sqrt_beta: C,
    /// The weight of the predicted `x_0`.
    pub original: C,
    /// The weight of the current sample.
    pub current: C,
}

impl DdpmCoefficients<f32> {
    /// The coefficients of the step from `alpha_bar_t` to `alpha_bar_prev`, in float32 in
    /// diffusers' order of operations.
    pub(crate) fn new(alpha_prod_t: f32, alpha_prod_prev: f32) -> Self {
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let current_alpha = alpha_prod_t / alpha_prod_prev;
        let current_beta = 1.0 - current_alpha;
        Self {
            sqrt_alpha: alpha_prod_t.sqrt(),
            sqrt_beta: beta_prod_t.sqrt(),
            original: alpha_prod_prev.sqrt() * current_beta / beta_prod_t,
            current: current_alpha.sqrt() * beta_prod_prev / beta_prod_t,
        }
    }
}

impl DDPMScheduler {
    /// The same scheduler reporting itself (in errors) as `class`.
    pub(crate) fn with_class_name(mut self, class: &'static str) -> Self {
        self.class = class;
        self
    }

    /// The noise-free part of a DDPM step: the predicted `x_0` (clipped or thresholded as
    /// configured) and the posterior mean `original * x_0 + current * x_t`. Returns
    /// `(mean, x_0)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a prediction type DDPM does not take; as
    /// [`ops::threshold_sample`].
    pub(crate) fn posterior_mean<C: ops::Coefficient<D>, const D: usize>(
        &self,
        model_output: Tensor<D>,
        sample: Tensor<D>,
        k: &DdpmCoefficients<C>,
    ) -> Result<(Tensor<D>, Tensor<D>)> {
        let c = &self.file.config;
        let mut pred_original = match c.prediction_type {
            PredictionType::Epsilon => k
                .sqrt_alpha
                .divide(sample.clone().sub(k.sqrt_beta.times(model_output))),
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => k
                .sqrt_alpha
                .times(sample.clone())
                .sub(k.sqrt_beta.times(model_output)),
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
        let mean = k
            .original
            .times(pred_original.clone())
            .add(k.current.times(sample));
        Ok((mean, pred_original))
    }
}

impl ConfiguredScheduler for DDPMScheduler {
    type Config = DDPMSchedulerConfig;

    fn from_config_file(file: ConfigFile<DDPMSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(DDPMSchedulerConfig::CLASS_NAME, e))?;
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: c.num_train_timesteps,
            beta_start: c.beta_start,
            beta_end: c.beta_end,
            beta_schedule: c.beta_schedule,
            trained_betas: c.trained_betas.as_deref(),
            rescale_betas_zero_snr: c.rescale_betas_zero_snr,
        })?;
        let timesteps = (0..c.num_train_timesteps).rev().map(|t| t as f64).collect();
        Ok(Self {
            class: DDPMSchedulerConfig::CLASS_NAME,
            file,
            schedule,
            timesteps,
            num_inference_steps: None,
            custom_timesteps: false,
        })
    }

    fn config_file(&self) -> &ConfigFile<DDPMSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for DDPMScheduler {
    crate::scheduler::unit_noise_basics!(with_state);

    fn class_name(&self) -> &'static str {
        self.class
    }

    /// Evenly spaced steps per `timestep_spacing`, or custom integral timesteps in strictly
    /// decreasing order below `num_train_timesteps`.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps", "timesteps"])?;
        let n = self.config().num_train_timesteps;
        match (request.num_inference_steps, request.timesteps) {
            (Some(_), Some(_)) => Err(Error::invalid_argument(
                "timesteps",
                "pass either num_inference_steps or custom timesteps, not both",
            )),
            (None, None) => Err(Error::invalid_argument(
                "num_inference_steps",
                "pass num_inference_steps or custom timesteps",
            )),
            (None, Some(custom)) => {
                check_custom_timesteps(&custom, n)?;
                self.timesteps = custom;
                self.custom_timesteps = true;
                self.num_inference_steps = None;
                Ok(())
            }
            (Some(k), None) => {
                let c = self.config();
                let ts = schedule::spaced_timesteps(c.timestep_spacing, n, k, c.steps_offset)?;
                self.timesteps = ts.into_iter().map(|t| t as f64).collect();
                self.custom_timesteps = false;
                self.num_inference_steps = Some(k);
                Ok(())
            }
        }
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

    /// One ancestral step. Takes `generator` (or `variance_noise`, an extension over
    /// diffusers); noise is needed, and drawn, only when `timestep > 0`.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        options.accept_only(self.class_name(), &["generator", "variance_noise"])?;
        let c = &self.file.config;
        let t = timestep;
        let prev_t = self.previous_timestep(t)?;
        if D < 2 {
            return Err(Error::invalid_argument(
                "sample",
                "DDPM steps [batch, channels, ...] tensors",
            ));
        }
        let channels = sample.dims()[1];
        // Learned-variance models return [prediction, variance] stacked along channels.
        let (model_output, predicted_variance) =
            if c.variance_type.is_learned() && model_output.dims()[1] == 2 * channels {
                let var = model_output.clone().narrow(1, channels, channels);
                (model_output.narrow(1, 0, channels), Some(var))
            } else {
                (model_output, None)
            };
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        // Decide how the noise is scaled before drawing it, so a refused step leaves the
        // generator untouched.
        let noise_scale = if t > 0.0 {
            Some(self.noise_scale(t, c.variance_type, predicted_variance, channels)?)
        } else {
            None
        };

        // Step scalars in float32: diffusers computes them on 0-d float32 tensors, and
        // `1 - alpha_t / alpha_prev` cancels near t = 0, where float32 moves diffusers' own
        // full-loop test sums by more than their tolerance relative to an f64 evaluation.
        let alpha_prod_t = self.schedule.alpha_cumprod_at(t)? as f32;
        let alpha_prod_prev = self.alpha_prod_prev(prev_t)?;
        let coefficients = DdpmCoefficients::new(alpha_prod_t, alpha_prod_prev);
        let (mut prev_sample, pred_original) =
            self.posterior_mean(model_output.clone(), sample, &coefficients)?;

        if let Some(scale) = noise_scale {
            let noise = ops::noise_like(
                &model_output,
                options.generator,
                options.variance_noise,
                self.class_name(),
            )?;
            let noise_term = match scale {
                NoiseScale::Std(std) => noise.mul_scalar(std),
                NoiseScale::LearnedVariance(var) => var.sqrt().mul(noise),
                NoiseScale::LearnedRange {
                    frac_source,
                    min_log,
                    max_log,
                } => {
                    let frac = frac_source.add_scalar(1.0).div_scalar(2.0);
                    let log_var = frac
                        .clone()
                        .mul_scalar(max_log)
                        .add(frac.neg().add_scalar(1.0).mul_scalar(min_log));
                    log_var.mul_scalar(0.5).exp().mul(noise)
                }
            };
            prev_sample = prev_sample.add(noise_term);
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

/// diffusers' checks on custom timesteps (strictly decreasing, below `num_train_timesteps`),
/// plus the ones it leaves to an index error later (non-empty, integral, non-negative).
fn check_custom_timesteps(timesteps: &[f64], num_train_timesteps: usize) -> Result<()> {
    let Some(&first) = timesteps.first() else {
        return Err(Error::invalid_argument("timesteps", "the list is empty"));
    };
    if first >= num_train_timesteps as f64 {
        return Err(Error::invalid_argument(
            "timesteps",
            format!("must start below num_train_timesteps ({num_train_timesteps}), got {first}"),
        ));
    }
    if let Some(w) = timesteps.windows(2).find(|w| w[1] >= w[0]) {
        return Err(Error::invalid_argument(
            "timesteps",
            format!("must be strictly decreasing, got {} then {}", w[0], w[1]),
        ));
    }
    if let Some(bad) = timesteps.iter().find(|t| t.fract() != 0.0 || **t < 0.0) {
        return Err(Error::invalid_argument(
            "timesteps",
            format!("{bad} is not a non-negative integer timestep"),
        ));
    }
    Ok(())
}
