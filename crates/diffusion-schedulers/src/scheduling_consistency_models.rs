//! The multistep (stochastic iterative) sampler of consistency models (Song et al. 2023;
//! diffusers' `schedulers/scheduling_consistency_models.py`, `CMStochasticIterativeScheduler`).
//!
//! Each step maps the sample to the model's estimate of the clean data (the consistency
//! function with its boundary-condition scalings), then re-noises it to the next noise level.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{self, MissingTimestep, StepCursor};

/// The config of [`CMStochasticIterativeScheduler`], key for key as in
/// `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CMStochasticIterativeSchedulerConfig {
    /// The number of noise levels the model was distilled or trained with.
    pub num_train_timesteps: usize,
    /// The smallest noise level.
    pub sigma_min: f64,
    /// The largest noise level.
    pub sigma_max: f64,
    /// The standard deviation of the data distribution.
    pub sigma_data: f64,
    /// Scale of the fresh noise added at every step.
    pub s_noise: f64,
    /// The exponent of the Karras schedule.
    pub rho: f64,
    /// Clamp the denoised estimate to `[-1, 1]`.
    pub clip_denoised: bool,
}

impl Default for CMStochasticIterativeSchedulerConfig {
    /// The `__init__` defaults of diffusers' `CMStochasticIterativeScheduler`
    /// (schedulers/scheduling_consistency_models.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 40,
            sigma_min: 0.002,
            sigma_max: 80.0,
            sigma_data: 0.5,
            s_noise: 1.0,
            rho: 7.0,
            clip_denoised: true,
        }
    }
}

impl Config for CMStochasticIterativeSchedulerConfig {
    const CLASS_NAME: &'static str = "CMStochasticIterativeScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        for (name, v) in [
            ("sigma_min", self.sigma_min),
            ("sigma_max", self.sigma_max),
            ("sigma_data", self.sigma_data),
            ("rho", self.rho),
        ] {
            if !positive(v) {
                return Err((name.into(), format!("{v} must be positive")));
            }
        }
        if self.sigma_min >= self.sigma_max {
            return Err(("sigma_min".into(), "must be below sigma_max".into()));
        }
        if !self.s_noise.is_finite() {
            return Err(("s_noise".into(), format!("{} is not finite", self.s_noise)));
        }
        if self.num_train_timesteps == 0 {
            return Err(("num_train_timesteps".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The consistency-model multistep sampler.
///
/// Stateful like Euler: the first `scale_model_input` or `step` after `set_timesteps` finds
/// its place from the timestep (or [`Scheduler::set_begin_index`]); a timestep not in the
/// schedule is refused. Timesteps are `250 ln(sigma)` (float64, as the consistency models of
/// openai/consistency_models expect). Every step but that of a one-step schedule draws noise
/// from the generator (or `variance_noise`). [`StepOutput::pred_original_sample`] is `None`, as
/// in diffusers.
#[derive(Clone, Debug)]
pub struct CMStochasticIterativeScheduler {
    file: ConfigFile<CMStochasticIterativeSchedulerConfig>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
}

impl CMStochasticIterativeScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: CMStochasticIterativeSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// Karras noise levels for `ramp` values in `[0, 1]` (0 is `sigma_max`), float64.
    fn karras(&self, ramp: &[f64]) -> Vec<f64> {
        let c = self.config();
        let min_inv_rho = c.sigma_min.powf(1.0 / c.rho);
        let max_inv_rho = c.sigma_max.powf(1.0 / c.rho);
        ramp.iter()
            .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(c.rho))
            .collect()
    }

    /// diffusers' `sigma_to_t`: `1000 * 0.25 * ln(sigma + 1e-44)` in float64.
    fn sigma_to_t(sigmas: &[f64]) -> Vec<f64> {
        sigmas
            .iter()
            .map(|s| 1000.0 * 0.25 * (s + 1e-44).ln())
            .collect()
    }
}

impl ConfiguredScheduler for CMStochasticIterativeScheduler {
    type Config = CMStochasticIterativeSchedulerConfig;

    fn from_config_file(file: ConfigFile<CMStochasticIterativeSchedulerConfig>) -> Result<Self> {
        file.config
            .validate()
            .map_err(|e| config_error(CMStochasticIterativeSchedulerConfig::CLASS_NAME, e))?;
        let n = file.config.num_train_timesteps;
        let mut scheduler = Self {
            file,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: None,
            cursor: StepCursor::default(),
        };
        // diffusers' __init__: np.linspace(0, 1, n), float64 sigmas without a final one.
        let ramp = crate::schedule::numpy_linspace(0.0, 1.0, n);
        scheduler.sigmas = scheduler.karras(&ramp);
        scheduler.timesteps = Self::sigma_to_t(&scheduler.sigmas);
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<CMStochasticIterativeSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for CMStochasticIterativeScheduler {
    crate::scheduler::stateful_scheduler_accessors!();

    fn order(&self) -> usize {
        1
    }

    /// `sigma_max`.
    fn init_noise_sigma(&self) -> f64 {
        self.config().sigma_max
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().num_train_timesteps
    }

    /// A step count (at most `num_train_timesteps`) or custom integral timesteps in strictly
    /// descending order, each below `num_train_timesteps`.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps", "timesteps"])?;
        let n = self.config().num_train_timesteps;
        if n < 2 {
            return Err(Error::invalid_argument(
                "num_train_timesteps",
                "set_timesteps divides by num_train_timesteps - 1: need at least 2",
            ));
        }
        let descending: Vec<f64> = match (request.num_inference_steps, request.timesteps) {
            (Some(k), None) => {
                if k == 0 || k > n {
                    return Err(Error::invalid_argument(
                        "num_inference_steps",
                        format!("{k} is not between 1 and num_train_timesteps ({n})"),
                    ));
                }
                let step_ratio = (n / k) as f64;
                (0..k)
                    .rev()
                    .map(|i| (i as f64 * step_ratio).round_ties_even())
                    .collect()
            }
            (None, Some(custom)) => {
                let integral = custom
                    .iter()
                    .all(|t| t.fract() == 0.0 && *t >= 0.0 && *t < n as f64);
                let strictly_descending = custom.windows(2).all(|w| w[1] < w[0]);
                if custom.is_empty() || !integral || !strictly_descending {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        format!("need integral timesteps in [0, {n}) in strictly descending order"),
                    ));
                }
                custom
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
                    "pass either num_inference_steps or custom timesteps, not both",
                ));
            }
        };
        let ramp: Vec<f64> = descending
            .iter()
            .rev()
            .map(|t| t / (n - 1) as f64)
            .collect();
        let sigmas = self.karras(&ramp);
        // Timesteps from the float64 sigmas; the sigmas themselves are stored as float32.
        self.timesteps = Self::sigma_to_t(&sigmas);
        self.sigmas = sigmas
            .into_iter()
            .chain(std::iter::once(self.config().sigma_min))
            .map(|s| f64::from(s as f32))
            .collect();
        self.num_inference_steps = Some(self.timesteps.len());
        self.cursor.reset();
        Ok(())
    }

    /// Divide by `sqrt(sigma^2 + sigma_data^2)` for the current noise level.
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>> {
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        let sigma =
            *self.sigmas.get(i).ok_or_else(|| {
                Error::invalid_argument("timestep", "the schedule has no sigma left")
            })? as f32;
        let sd = self.config().sigma_data;
        Ok(sample.div_scalar((sigma * sigma + (sd * sd) as f32).sqrt()))
    }

    /// One consistency step: the boundary-condition denoiser (clamped to `[-1, 1]` with
    /// `clip_denoised`), plus fresh noise at the next noise level. Takes `generator` or
    /// `variance_noise` (not needed by a one-step schedule).
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
        let mut cursor = self.cursor.clone();
        let i = cursor.current(&self.timesteps, timestep, MissingTimestep::Error)?;
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
        let c = self.config();
        // Float32 scalars in diffusers' operation order (before set_timesteps diffusers'
        // sigmas are float64 and these differ in the last float32 bit).
        let sigma = self.sigmas[i] as f32;
        let sigma_next = self.sigmas[(i + 1).min(self.sigmas.len() - 1)] as f32;
        let (sigma_min, sigma_max) = (c.sigma_min as f32, c.sigma_max as f32);
        let sd = c.sigma_data as f32;
        let sd2 = (c.sigma_data * c.sigma_data) as f32;
        let shifted = sigma - sigma_min;
        let c_skip = sd2 / (shifted * shifted + sd2);
        let c_out = shifted * sd / (sigma * sigma + sd2).sqrt();

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        let mut denoised = model_output
            .clone()
            .mul_scalar(c_out)
            .add(sample.mul_scalar(c_skip));
        if c.clip_denoised {
            denoised = denoised.clamp(-1.0, 1.0);
        }
        let prev_sample = if self.timesteps.len() > 1 {
            let noise = ops::noise_like(
                &model_output,
                options.generator,
                options.variance_noise,
                class,
            )?
            .cast(FloatDType::F32);
            let sigma_hat = sigma_next.clamp(sigma_min, sigma_max);
            let scale = (sigma_hat * sigma_hat - (c.sigma_min * c.sigma_min) as f32).sqrt();
            denoised.add(noise.mul_scalar(c.s_noise as f32).mul_scalar(scale))
        } else {
            // diffusers adds zeros here.
            denoised
        };
        cursor.advance();
        self.cursor = cursor;
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: None,
        })
    }

    /// `original + sigma * noise` at the sigma of each timestep (or of the begin index).
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        sigmas::add_noise_ve(
            &self.cursor,
            &self.timesteps,
            &self.sigmas,
            original,
            noise,
            timesteps,
        )
    }
}
