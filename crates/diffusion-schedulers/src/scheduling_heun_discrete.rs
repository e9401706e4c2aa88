//! Heun: the second-order sampler of Karras et al. (2022), algorithm 1 without churn (diffusers'
//! `schedulers/scheduling_heun_discrete.py`).

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops::{self, Stored};
use crate::schedule::{
    self, BetaConfig, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing,
};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{self, MissingTimestep, StepCursor, check_step_in_range, float_timesteps};

/// The config of [`HeunDiscreteScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeunDiscreteSchedulerConfig {
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
    /// Use the Karras et al. noise levels.
    pub use_karras_sigmas: bool,
    /// Use noise levels evenly spaced in log-sigma.
    pub use_exponential_sigmas: bool,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: bool,
    /// Clamp the predicted `x_0` to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// Bound of `clip_sample`.
    pub clip_sample_range: f64,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
}

impl Default for HeunDiscreteSchedulerConfig {
    /// The `__init__` defaults of diffusers' `HeunDiscreteScheduler`
    /// (schedulers/scheduling_heun_discrete.py); note the Stable Diffusion betas.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl Config for HeunDiscreteSchedulerConfig {
    const CLASS_NAME: &'static str = "HeunDiscreteScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        use BetaSchedule::*;
        if self.trained_betas.is_none() {
            schedule::check_allowed(
                Self::CLASS_NAME,
                "beta_schedule",
                self.beta_schedule,
                &[Linear, ScaledLinear, SquaredcosCapV2, Exp],
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
            ],
            PredictionType::as_str,
        )?;
        sigmas::check_one_respacing(
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
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

/// The first half of a Heun step, kept for the second evaluation.
#[derive(Clone, Debug)]
struct FirstHalf {
    derivative: Stored,
    sample: Stored,
    dt: f32,
}

/// Heun's method, the scheduler A1111 calls "Heun": every step but the last evaluates the
/// model twice, so the schedule lists each inner timestep twice (`order` is 2).
///
/// Stateful like Euler: the first `scale_model_input` or `step` after `set_timesteps` finds
/// its place from the timestep (or [`Scheduler::set_begin_index`]); odd calls are Euler
/// predictions, even calls the trapezoidal corrections. Before `set_timesteps` the schedule is
/// every training timestep, as in diffusers.
#[derive(Clone, Debug)]
pub struct HeunDiscreteScheduler {
    file: ConfigFile<HeunDiscreteSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
    first_half: Option<Box<FirstHalf>>,
}

impl HeunDiscreteScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: HeunDiscreteSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Whether the next `step` is the first (Euler) half of a Heun step.
    pub fn state_in_first_order(&self) -> bool {
        self.first_half.is_none()
    }

    /// Build the interleaved schedule from float32 timesteps (noisiest first).
    fn build(&mut self, timesteps: Vec<f64>, k: usize) {
        let c = self.config();
        let read: Vec<f64> = timesteps
            .iter()
            .map(|&t| sigmas::interp_on_grid(t, &self.sigma_table))
            .collect();
        let first = read.first().copied().unwrap_or(0.0);
        let last = read.last().copied().unwrap_or(0.0);
        let respaced = if c.use_karras_sigmas {
            Some(sigmas::karras_sigmas(last, first, k))
        } else if c.use_exponential_sigmas {
            Some(sigmas::exponential_sigmas(last, first, k))
        } else if c.use_beta_sigmas {
            Some(sigmas::beta_sigmas(last, first, k))
        } else {
            None
        };
        let (timesteps, mut base) = match respaced {
            Some(s) => {
                let ts = s
                    .iter()
                    .map(|&s| f64::from(sigmas::sigma_to_t(s, &self.log_sigmas) as f32))
                    .collect();
                (ts, s)
            }
            None => (timesteps, read),
        };
        base.push(0.0);
        let base: Vec<f64> = base.into_iter().map(|s| f64::from(s as f32)).collect();
        let n = base.len();
        let mut sigmas = vec![base[0]];
        for &s in &base[1..n - 1] {
            sigmas.extend([s, s]);
        }
        sigmas.push(base[n - 1]);
        let mut ts = vec![timesteps[0]];
        for &t in &timesteps[1..] {
            ts.extend([t, t]);
        }
        self.timesteps = ts;
        self.sigmas = sigmas;
        self.cursor.reset();
        self.first_half = None;
    }
}

impl ConfiguredScheduler for HeunDiscreteScheduler {
    type Config = HeunDiscreteSchedulerConfig;

    fn from_config_file(file: ConfigFile<HeunDiscreteSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(HeunDiscreteSchedulerConfig::CLASS_NAME, e))?;
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: c.num_train_timesteps,
            beta_start: c.beta_start,
            beta_end: c.beta_end,
            beta_schedule: c.beta_schedule,
            trained_betas: c.trained_betas.as_deref(),
            rescale_betas_zero_snr: false,
        })?;
        let sigma_table = sigmas::sigma_table(&schedule, false);
        let log_sigmas = sigma_table.iter().map(|s| s.ln()).collect();
        let n = c.num_train_timesteps;
        let ts = sigmas::train_float_timesteps(c.timestep_spacing, n, c.steps_offset);
        let mut scheduler = Self {
            file,
            schedule,
            sigma_table,
            log_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: None,
            cursor: StepCursor::default(),
            first_half: None,
        };
        scheduler.build(ts, n);
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<HeunDiscreteSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for HeunDiscreteScheduler {
    crate::scheduler::stateful_scheduler_accessors!(sigma_scaled_input);

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        sigmas::euler_init_noise_sigma(&self.sigmas, self.config().timestep_spacing)
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().num_train_timesteps
    }

    /// A step count or custom timesteps (not with Karras, exponential or beta sigmas).
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let class = self.class_name();
        request.accept_only(class, &["num_inference_steps", "timesteps"])?;
        let c = self.config().clone();
        let n = c.num_train_timesteps;
        let (k, ts) = match (request.num_inference_steps, request.timesteps) {
            (Some(k), None) => (
                k,
                float_timesteps(c.timestep_spacing, n, k, c.steps_offset)?,
            ),
            (None, Some(ts)) => {
                if c.use_karras_sigmas || c.use_exponential_sigmas || c.use_beta_sigmas {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        "custom timesteps cannot be combined with Karras, exponential or beta \
                         sigmas",
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
                (ts.len(), ts.iter().map(|&t| f64::from(t as f32)).collect())
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
        self.build(ts, k);
        self.num_inference_steps = Some(k);
        Ok(())
    }

    /// One half of a Heun step: the Euler prediction, or the trapezoidal correction that
    /// averages both derivatives. Takes no options.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &[])?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        check_step_in_range(i, &self.sigmas, class)?;
        let first_order = self.first_half.is_none();
        if !first_order && i == 0 {
            return Err(Error::invalid_argument(
                "timestep",
                "the second half of a Heun step cannot be the first step",
            ));
        }
        // Float32 scalars, as diffusers holds sigmas in a float32 tensor.
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[i] as f32, self.sigmas[i + 1] as f32)
        } else {
            (self.sigmas[i - 1] as f32, self.sigmas[i] as f32)
        };
        let sigma_hat = sigma;
        let sigma_input = if first_order { sigma_hat } else { sigma_next };
        let c = self.config();
        let mut pred_original = match c.prediction_type {
            PredictionType::Epsilon => sample.clone().sub(model_output.mul_scalar(sigma_input)),
            PredictionType::VPrediction => {
                let s2 = sigma_input * sigma_input + 1.0;
                model_output
                    .mul_scalar(-sigma_input / s2.sqrt())
                    .add(sample.clone().div_scalar(s2))
            }
            PredictionType::Sample => model_output,
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("{class} does not support {}", other.as_str()),
                ));
            }
        };
        if c.clip_sample {
            pred_original = ops::clip_sample(pred_original, c.clip_sample_range);
        }
        let prev_sample = match self.first_half.take() {
            None => {
                let derivative = sample
                    .clone()
                    .sub(pred_original.clone())
                    .div_scalar(sigma_hat);
                let dt = sigma_next - sigma_hat;
                self.first_half = Some(Box::new(FirstHalf {
                    derivative: Stored::new(&derivative),
                    sample: Stored::new(&sample),
                    dt,
                }));
                sample.add(derivative.mul_scalar(dt))
            }
            Some(first) => {
                let first_derivative = first.derivative.get::<D>()?;
                let first_sample = first.sample.get::<D>()?;
                ops::check_same_shape(&first_sample, &sample, "sample", "the first half's sample")?;
                let derivative = sample.sub(pred_original.clone()).div_scalar(sigma_next);
                let derivative = first_derivative.add(derivative).div_scalar(2.0);
                first_sample.add(derivative.mul_scalar(first.dt))
            }
        };
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample,
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
