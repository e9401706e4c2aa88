//! Euler: the first-order sampler of Karras et al. (2022), algorithm 2 (diffusers'
//! `schedulers/scheduling_euler_discrete.py`).

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
use crate::sigmas::{
    self, Churn, FinalSigmasType, MissingTimestep, StepCursor, check_step_in_range, float_timesteps,
};

/// How sigmas are read off the training table at fractional timesteps (`interpolation_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InterpolationType {
    /// Linear in sigma between neighbouring training timesteps.
    #[serde(rename = "linear")]
    Linear,
    /// Evenly spaced in log-sigma between the smallest and largest training sigma.
    #[serde(rename = "log_linear")]
    LogLinear,
}

/// What is passed to the model as the timestep (`timestep_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimestepType {
    /// The (fractional) training timestep.
    #[serde(rename = "discrete")]
    Discrete,
    /// `0.25 * ln(sigma)`, for continuous-time v-prediction models (with `v_prediction` only).
    #[serde(rename = "continuous")]
    Continuous,
}

/// The config of [`EulerDiscreteScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteSchedulerConfig {
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
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// How sigmas are interpolated at the inference timesteps.
    pub interpolation_type: InterpolationType,
    /// Use the Karras et al. noise levels (diffusers allows `null`, meaning false).
    pub use_karras_sigmas: Option<bool>,
    /// Use noise levels evenly spaced in log-sigma.
    pub use_exponential_sigmas: Option<bool>,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: Option<bool>,
    /// Smallest sigma of the Karras/exponential/beta spacings (default: the schedule's).
    pub sigma_min: Option<f64>,
    /// Largest sigma of the Karras/exponential/beta spacings (default: the schedule's).
    pub sigma_max: Option<f64>,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// What the model receives as its timestep.
    pub timestep_type: TimestepType,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// The last sigma of the schedule.
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerDiscreteSchedulerConfig {
    /// The `__init__` defaults of diffusers' `EulerDiscreteScheduler`
    /// (schedulers/scheduling_euler_discrete.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl EulerDiscreteSchedulerConfig {
    fn karras(&self) -> bool {
        self.use_karras_sigmas.unwrap_or(false)
    }

    fn exponential(&self) -> bool {
        self.use_exponential_sigmas.unwrap_or(false)
    }

    fn beta(&self) -> bool {
        self.use_beta_sigmas.unwrap_or(false)
    }

    fn continuous_v(&self) -> bool {
        self.timestep_type == TimestepType::Continuous
            && self.prediction_type == PredictionType::VPrediction
    }
}

impl Config for EulerDiscreteSchedulerConfig {
    const CLASS_NAME: &'static str = "EulerDiscreteScheduler";

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
                PredictionType::VPrediction,
                PredictionType::Sample,
                PredictionType::OriginalSample,
            ],
            PredictionType::as_str,
        )?;
        sigmas::check_one_respacing(self.karras(), self.exponential(), self.beta())?;
        schedule::check_common(self.num_train_timesteps, false, 0.0, 1.0, false, 0.0)
    }
}

/// The Euler sampler, optionally with Karras et al.'s churn (`s_churn` and friends in
/// [`StepOptions`]), the scheduler A1111 calls "Euler".
///
/// It is stateful: the first `scale_model_input` or `step` after `set_timesteps` finds its
/// place from the timestep (or [`Scheduler::set_begin_index`]), and every `step` moves on by
/// one. Before `set_timesteps` the schedule is every training timestep, as in diffusers.
#[derive(Clone, Debug)]
pub struct EulerDiscreteScheduler {
    file: ConfigFile<EulerDiscreteSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
}

impl EulerDiscreteScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: EulerDiscreteSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    fn final_sigma(&self) -> f64 {
        match self.config().final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => f64::from(self.sigma_table[0]),
        }
    }

    /// The model timesteps of `continuous` v-prediction: `0.25 * ln(sigma)` in float32.
    fn continuous_timesteps(sigmas: &[f64]) -> Vec<f64> {
        sigmas
            .iter()
            .map(|&s| f64::from(0.25 * (s as f32).ln()))
            .collect()
    }
}

impl ConfiguredScheduler for EulerDiscreteScheduler {
    type Config = EulerDiscreteSchedulerConfig;

    fn from_config_file(file: ConfigFile<EulerDiscreteSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(EulerDiscreteSchedulerConfig::CLASS_NAME, e))?;
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: c.num_train_timesteps,
            beta_start: c.beta_start,
            beta_end: c.beta_end,
            beta_schedule: c.beta_schedule,
            trained_betas: c.trained_betas.as_deref(),
            rescale_betas_zero_snr: c.rescale_betas_zero_snr,
        })?;
        let sigma_table = sigmas::sigma_table(&schedule, c.rescale_betas_zero_snr);
        let log_sigmas = sigma_table.iter().map(|s| s.ln()).collect();
        let mut sigmas: Vec<f64> = sigma_table.iter().rev().map(|&s| f64::from(s)).collect();
        sigmas.push(0.0);
        let n = c.num_train_timesteps;
        let timesteps = if c.continuous_v() {
            Self::continuous_timesteps(&sigmas[..n])
        } else {
            (0..n).rev().map(|t| f64::from(t as f32)).collect()
        };
        Ok(Self {
            file,
            schedule,
            sigma_table,
            log_sigmas,
            timesteps,
            sigmas,
            num_inference_steps: None,
            cursor: StepCursor::default(),
        })
    }

    fn config_file(&self) -> &ConfigFile<EulerDiscreteSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for EulerDiscreteScheduler {
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

    /// A step count, custom timesteps (not with Karras, exponential or beta sigmas, nor continuous
    /// v-prediction) or custom sigmas (noisiest first, ending with the final sigma).
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let class = self.class_name();
        request.accept_only(class, &["num_inference_steps", "timesteps", "sigmas"])?;
        let c = self.config().clone();
        let n = c.num_train_timesteps;
        let (k, timesteps, sigmas) = match (
            request.num_inference_steps,
            request.timesteps,
            request.sigmas,
        ) {
            (Some(k), None, None) => {
                let ts = float_timesteps(c.timestep_spacing, n, k, c.steps_offset)?;
                let (ts, sigmas) = self.sigmas_at(ts, k);
                (k, ts, sigmas)
            }
            (None, Some(ts), None) => {
                if c.karras() || c.exponential() || c.beta() || c.continuous_v() {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        "custom timesteps cannot be combined with Karras, exponential or beta \
                         sigmas or continuous v-prediction timesteps",
                    ));
                }
                if ts.is_empty()
                    || ts
                        .iter()
                        .any(|t| !t.is_finite() || *t < 0.0 || *t > (n - 1) as f64)
                {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        format!("need at least one timestep, each in [0, {}]", n - 1),
                    ));
                }
                let k = ts.len();
                let ts: Vec<f64> = ts.iter().map(|&t| f64::from(t as f32)).collect();
                let (ts, sigmas) = self.sigmas_at(ts, k);
                (k, ts, sigmas)
            }
            (None, None, Some(custom)) => {
                if custom.len() < 2 || custom.iter().any(|s| !s.is_finite() || *s < 0.0) {
                    return Err(Error::invalid_argument(
                        "sigmas",
                        "need at least two non-negative sigmas, the last one being the final \
                         noise level",
                    ));
                }
                let sigmas: Vec<f64> = custom.iter().map(|&s| f64::from(s as f32)).collect();
                let ts = sigmas[..sigmas.len() - 1]
                    .iter()
                    .map(|&s| f64::from(sigmas::sigma_to_t(s, &self.log_sigmas) as f32))
                    .collect();
                (sigmas.len() - 1, ts, sigmas)
            }
            (None, None, None) => {
                return Err(Error::invalid_argument(
                    "num_inference_steps",
                    "pass a step count, custom timesteps or custom sigmas",
                ));
            }
            _ => {
                return Err(Error::invalid_argument(
                    "timesteps",
                    "pass only one of num_inference_steps, timesteps and sigmas",
                ));
            }
        };
        self.timesteps = if c.continuous_v() {
            Self::continuous_timesteps(&sigmas[..sigmas.len() - 1])
        } else {
            timesteps
        };
        self.sigmas = sigmas;
        self.num_inference_steps = Some(k);
        self.cursor.reset();
        Ok(())
    }

    /// One Euler step (with churn when `s_churn > 0`, which draws noise). Takes `s_churn`
    /// (default 0), `s_tmin` (0), `s_tmax` (infinity), `s_noise` (1), and `generator` or
    /// `variance_noise` (an extension over diffusers) for the churn noise.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(
            class,
            &[
                "generator",
                "variance_noise",
                "s_churn",
                "s_tmin",
                "s_tmax",
                "s_noise",
            ],
        )?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let churn = Churn::from_options(&options)?;
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        check_step_in_range(i, &self.sigmas, class)?;

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);

        // Scalars in float32, as diffusers holds sigmas in a float32 tensor.
        let sigma = self.sigmas[i] as f32;
        let (sample, sigma_hat) = churn.apply(
            sample,
            sigma,
            self.sigmas.len() - 1,
            options.generator,
            options.variance_noise,
            class,
        )?;

        let pred_original = match self.config().prediction_type {
            PredictionType::Sample | PredictionType::OriginalSample => model_output.clone(),
            PredictionType::Epsilon => sample.clone().sub(model_output.mul_scalar(sigma_hat)),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                model_output
                    .mul_scalar(-sigma / s2.sqrt())
                    .add(sample.clone().div_scalar(s2))
            }
            other @ PredictionType::FlowPrediction => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("{class} does not support {}", other.as_str()),
                ));
            }
        };
        let derivative = sample
            .clone()
            .sub(pred_original.clone())
            .div_scalar(sigma_hat);
        let dt = self.sigmas[i + 1] as f32 - sigma_hat;
        let prev_sample = sample.add(derivative.mul_scalar(dt));
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

impl EulerDiscreteScheduler {
    /// The sigmas of the given inference timesteps (read off the table, respaced when Karras
    /// or exponential sigmas are configured, plus the final sigma) and the timesteps that go
    /// with them, all as float32 values.
    fn sigmas_at(&self, timesteps: Vec<f64>, k: usize) -> (Vec<f64>, Vec<f64>) {
        let c = self.config();
        let read: Vec<f64> = match c.interpolation_type {
            InterpolationType::Linear => timesteps
                .iter()
                .map(|&t| sigmas::interp_on_grid(t, &self.sigma_table))
                .collect(),
            InterpolationType::LogLinear => {
                // diffusers builds k + 1 sigmas here, so with the final sigma there is one more
                // than steps; kept for parity.
                let lo = self.sigma_table[0].ln();
                let hi = self.sigma_table[self.sigma_table.len() - 1].ln();
                schedule::torch_linspace_f32(f64::from(hi), f64::from(lo), k + 1)
                    .into_iter()
                    .map(|l| f64::from(l.exp()))
                    .collect()
            }
        };
        let first = read.first().copied().unwrap_or(0.0);
        let last = read.last().copied().unwrap_or(0.0);
        let sigma_min = c.sigma_min.unwrap_or(last);
        let sigma_max = c.sigma_max.unwrap_or(first);
        let respaced = if c.karras() {
            Some(sigmas::karras_sigmas(sigma_min, sigma_max, k))
        } else if c.exponential() {
            Some(sigmas::exponential_sigmas(sigma_min, sigma_max, k))
        } else if c.beta() {
            Some(sigmas::beta_sigmas(sigma_min, sigma_max, k))
        } else {
            None
        };
        let (timesteps, mut sigmas) = match respaced {
            Some(sigmas) => {
                let ts = sigmas
                    .iter()
                    .map(|&s| f64::from(sigmas::sigma_to_t(s, &self.log_sigmas) as f32))
                    .collect();
                (ts, sigmas)
            }
            None => (timesteps, read),
        };
        sigmas.push(self.final_sigma());
        let sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        (timesteps, sigmas)
    }
}
