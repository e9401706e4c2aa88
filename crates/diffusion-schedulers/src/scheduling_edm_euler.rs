//! The Euler sampler in the EDM formulation of Karras et al. (2022), with its input, output
//! and noise preconditioning (diffusers' `schedulers/scheduling_edm_euler.py`; Playground v2.5,
//! Stable Video Diffusion's EDM models).

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::{PredictionType, torch_linspace_f32};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{
    self, Churn, FinalSigmasType, MissingTimestep, StepCursor, check_step_in_range,
};

/// How the noise levels are spaced (`sigma_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EdmSigmaSchedule {
    /// Evenly spaced in `sigma^(1/rho)` (EDM's schedule).
    #[serde(rename = "karras")]
    Karras,
    /// Evenly spaced in `log(sigma)`.
    #[serde(rename = "exponential")]
    Exponential,
}

/// The config of [`EDMEulerScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EDMEulerSchedulerConfig {
    /// The smallest noise level.
    pub sigma_min: f64,
    /// The largest noise level.
    pub sigma_max: f64,
    /// The standard deviation of the data distribution.
    pub sigma_data: f64,
    /// How the noise levels are spaced.
    pub sigma_schedule: EdmSigmaSchedule,
    /// The number of noise levels of the schedule before `set_timesteps`.
    pub num_train_timesteps: usize,
    /// What the model predicts (`epsilon` or `v_prediction`).
    pub prediction_type: PredictionType,
    /// The exponent of the Karras schedule.
    pub rho: f64,
    /// The last sigma of the schedule.
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EDMEulerSchedulerConfig {
    /// The `__init__` defaults of diffusers' `EDMEulerScheduler`
    /// (schedulers/scheduling_edm_euler.py).
    fn default() -> Self {
        Self {
            sigma_min: 0.002,
            sigma_max: 80.0,
            sigma_data: 0.5,
            sigma_schedule: EdmSigmaSchedule::Karras,
            num_train_timesteps: 1000,
            prediction_type: PredictionType::Epsilon,
            rho: 7.0,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl Config for EDMEulerSchedulerConfig {
    const CLASS_NAME: &'static str = "EDMEulerScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        crate::schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            PredictionType::as_str,
        )?;
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
        if self.num_train_timesteps == 0 {
            return Err(("num_train_timesteps".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// `torch.linspace(start, end, n, dtype=float64)` on CPU (the `f64` twin of
/// [`torch_linspace_f32`]).
fn torch_linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i < n / 2 {
                        step.mul_add(i as f64, start)
                    } else {
                        (-step).mul_add((n - 1 - i) as f64, end)
                    }
                })
                .collect()
        }
    }
}

/// The EDM Euler sampler.
///
/// Stateful like Euler: the first `scale_model_input` or `step` after `set_timesteps` finds
/// its place from the timestep (or [`Scheduler::set_begin_index`]); a timestep not in the
/// schedule is refused. Timesteps are EDM's noise conditioning `ln(sigma) / 4`. Takes Karras
/// et al.'s churn options (`s_churn` > 0 draws noise from the generator or
/// `variance_noise`).
#[derive(Clone, Debug)]
pub struct EDMEulerScheduler {
    file: ConfigFile<EDMEulerSchedulerConfig>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
}

impl EDMEulerScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: EDMEulerSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// Noise levels for the `ramp` values in `[0, 1]` (0 is `sigma_max`), float32, with the
    /// final sigma appended; and their timesteps.
    fn build(&mut self, ramp: &[f64]) {
        let c = self.config();
        let k = ramp.len();
        let s: Vec<f32> = match c.sigma_schedule {
            EdmSigmaSchedule::Karras => {
                let min_inv_rho = c.sigma_min.powf(1.0 / c.rho);
                let max_inv_rho = c.sigma_max.powf(1.0 / c.rho);
                ramp.iter()
                    .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(c.rho) as f32)
                    .collect()
            }
            // torch.linspace without a dtype: float32.
            EdmSigmaSchedule::Exponential => {
                torch_linspace_f32(c.sigma_min.ln(), c.sigma_max.ln(), k)
                    .into_iter()
                    .rev()
                    .map(f32::exp)
                    .collect()
            }
        };
        let last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => s[k - 1],
        };
        self.timesteps = s.iter().map(|&v| f64::from(0.25 * v.ln())).collect();
        self.sigmas = s
            .into_iter()
            .chain(std::iter::once(last))
            .map(f64::from)
            .collect();
        self.cursor.reset();
    }

    /// EDM's input scaling `1 / sqrt(sigma^2 + sigma_data^2)` (float32).
    fn c_in(&self, sigma: f32) -> f32 {
        let sd = self.config().sigma_data;
        1.0 / (sigma * sigma + (sd * sd) as f32).sqrt()
    }
}

impl ConfiguredScheduler for EDMEulerScheduler {
    type Config = EDMEulerSchedulerConfig;

    fn from_config_file(file: ConfigFile<EDMEulerSchedulerConfig>) -> Result<Self> {
        file.config
            .validate()
            .map_err(|e| config_error(EDMEulerSchedulerConfig::CLASS_NAME, e))?;
        let n = file.config.num_train_timesteps;
        let mut scheduler = Self {
            file,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: None,
            cursor: StepCursor::default(),
        };
        // diffusers' __init__: the ramp arange(n + 1) / n in float64.
        let ramp: Vec<f64> = (0..=n).map(|i| i as f64 / n as f64).collect();
        scheduler.build(&ramp);
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<EDMEulerSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for EDMEulerScheduler {
    crate::scheduler::stateful_scheduler_accessors!();

    fn order(&self) -> usize {
        1
    }

    /// `sqrt(sigma_max^2 + 1)`.
    fn init_noise_sigma(&self) -> f64 {
        (self.config().sigma_max.powi(2) + 1.0).sqrt()
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().num_train_timesteps
    }

    /// A step count.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let k = request.step_count_only(self.class_name())?;
        self.build(&torch_linspace_f64(0.0, 1.0, k));
        self.num_inference_steps = Some(k);
        Ok(())
    }

    /// Multiply by EDM's `c_in` for the current noise level.
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>> {
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| Error::invalid_argument("timestep", "the schedule has no sigma left"))?;
        Ok(sample.mul_scalar(self.c_in(sigma as f32)))
    }

    /// One Euler step on EDM's preconditioned denoiser `c_skip * x + c_out * F(x)` (with
    /// churn when `s_churn > 0`). Takes `s_churn`, `s_tmin`, `s_tmax`, `s_noise` and, for
    /// churn, a `generator` or `variance_noise`.
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
        let sigma = self.sigmas[i] as f32;
        let (sample, sigma_hat) = churn.apply(
            sample,
            sigma,
            self.sigmas.len() - 1,
            options.generator,
            options.variance_noise,
            class,
        )?;
        // Float32 scalars in diffusers' operation order.
        let sd = self.config().sigma_data;
        let sd2 = (sd * sd) as f32;
        let c_skip = sd2 / (sigma_hat * sigma_hat + sd2);
        let c_out = sigma_hat * sd as f32 / (sigma_hat * sigma_hat + sd2).sqrt();
        let c_out = match self.config().prediction_type {
            PredictionType::VPrediction => -c_out,
            _ => c_out,
        };
        let denoised = sample
            .clone()
            .mul_scalar(c_skip)
            .add(model_output.mul_scalar(c_out));
        let derivative = sample.clone().sub(denoised.clone()).div_scalar(sigma_hat);
        let dt = self.sigmas[i + 1] as f32 - sigma_hat;
        let prev_sample = sample.add(derivative.mul_scalar(dt));
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: Some(denoised.cast(out_dtype)),
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
