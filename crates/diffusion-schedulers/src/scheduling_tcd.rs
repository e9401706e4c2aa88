//! Trajectory consistency distillation's strategic stochastic sampler (Zheng et al. 2024;
//! diffusers' `schedulers/scheduling_tcd.py`), for TCD-distilled models.
//!
//! Each step predicts the clean sample, re-noises it to an intermediate timestep
//! `s = floor((1 - eta) t_prev)`, then (for `eta > 0`) moves to `t_prev` adding fresh noise.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::{self, BetaSchedule, NoiseSchedule, PredictionType};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_lcm::LCMSchedulerConfig;
use crate::sigmas::{MissingTimestep, StepCursor};

/// The config of [`TCDScheduler`]: the same keys and `__init__` defaults as
/// [`LCMSchedulerConfig`] (schedulers/scheduling_tcd.py), under its own class name. TCD's
/// step applies neither `clip_sample` nor `thresholding`, and does not read `steps_offset`,
/// `timestep_spacing` or `timestep_scaling`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TCDSchedulerConfig(pub LCMSchedulerConfig);

impl Config for TCDSchedulerConfig {
    const CLASS_NAME: &'static str = "TCDScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        use BetaSchedule::*;
        let c = &self.0;
        if c.trained_betas.is_none() {
            schedule::check_allowed(
                Self::CLASS_NAME,
                "beta_schedule",
                c.beta_schedule,
                &[Linear, ScaledLinear, SquaredcosCapV2],
                BetaSchedule::as_str,
            )?;
        }
        schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            c.prediction_type,
            &[
                PredictionType::Epsilon,
                PredictionType::Sample,
                PredictionType::VPrediction,
            ],
            PredictionType::as_str,
        )?;
        // diffusers' TCD step applies neither. They are not refused: a DDPM config
        // (`clip_sample = true` by default) must convert to TCD as in diffusers' `from_config`,
        // so say that they have no effect instead.
        for (name, on) in [
            ("clip_sample", c.clip_sample),
            ("thresholding", c.thresholding),
        ] {
            if on {
                log::warn!(
                    "{}: `{name}` is set but has no effect (diffusers' TCD step does not apply it)",
                    Self::CLASS_NAME
                );
            }
        }
        if c.original_inference_steps == 0 || c.original_inference_steps > c.num_train_timesteps {
            return Err((
                "original_inference_steps".into(),
                format!(
                    "{} must be in [1, num_train_timesteps = {}]",
                    c.original_inference_steps, c.num_train_timesteps
                ),
            ));
        }
        schedule::check_common(c.num_train_timesteps, false, 0.0, 1.0, false, 0.0)
    }
}

/// The TCD sampler.
///
/// Stateful: the first `step` after `set_timesteps` finds its place from the timestep (or
/// [`Scheduler::set_begin_index`]); a timestep not in the schedule is refused. `step` takes
/// `eta` (diffusers' default 0.3; 0 is deterministic) and, for `eta > 0`, a generator (or
/// `variance_noise`) at every step but the last. diffusers returns the re-noised prediction
/// as `pred_noised_sample`, not a clean-sample estimate, so
/// [`StepOutput::pred_original_sample`] is `None`.
#[derive(Clone, Debug)]
pub struct TCDScheduler {
    file: ConfigFile<TCDSchedulerConfig>,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
}

impl TCDScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: TCDSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The distillation schedule `k - 1, 2k - 1, ..., original * k - 1`, noisiest first.
    fn origin_timesteps(&self) -> Vec<usize> {
        let c = &self.config().0;
        let k = c.num_train_timesteps / c.original_inference_steps;
        (1..=c.original_inference_steps)
            .rev()
            .map(|i| i * k - 1)
            .collect()
    }

    fn alphas_at(&self, timesteps: &[f64]) -> Result<Vec<f64>> {
        timesteps
            .iter()
            .map(|&t| self.schedule.alpha_cumprod_at(t))
            .collect()
    }
}

impl ConfiguredScheduler for TCDScheduler {
    type Config = TCDSchedulerConfig;

    fn from_config_file(file: ConfigFile<TCDSchedulerConfig>) -> Result<Self> {
        file.config
            .validate()
            .map_err(|e| config_error(TCDSchedulerConfig::CLASS_NAME, e))?;
        let c = &file.config.0;
        let schedule = crate::scheduler::noise_schedule_of!(c, c.rescale_betas_zero_snr)?;
        let final_alpha_cumprod = if c.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let n = c.num_train_timesteps;
        Ok(Self {
            file,
            schedule,
            final_alpha_cumprod,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            num_inference_steps: None,
            cursor: StepCursor::default(),
        })
    }

    fn config_file(&self) -> &ConfigFile<TCDSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for TCDScheduler {
    fn class_name(&self) -> &'static str {
        TCDSchedulerConfig::CLASS_NAME
    }

    fn config_value(&self) -> serde_json::Value {
        self.file.to_value()
    }

    fn order(&self) -> usize {
        1
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().0.num_train_timesteps
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// A step count (taken evenly from the distillation schedule) or custom integral
    /// timesteps in descending order.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps", "timesteps"])?;
        let c = self.config().0.clone();
        let n = c.num_train_timesteps;
        let timesteps: Vec<f64> = match (request.num_inference_steps, request.timesteps) {
            (Some(k), None) => {
                schedule::check_num_inference_steps(k, n)?;
                if k > c.original_inference_steps {
                    return Err(Error::invalid_argument(
                        "num_inference_steps",
                        format!(
                            "{k} steps cannot be taken from the {}-step distillation schedule",
                            c.original_inference_steps
                        ),
                    ));
                }
                let origin = self.origin_timesteps();
                let step = origin.len() as f64 / k as f64;
                (0..k)
                    .map(|i| origin[(i as f64 * step).floor() as usize] as f64)
                    .collect()
            }
            (None, Some(custom)) => {
                if custom.is_empty()
                    || custom
                        .iter()
                        .any(|t| t.fract() != 0.0 || *t < 0.0 || *t >= n as f64)
                    || custom.windows(2).any(|w| w[1] >= w[0])
                {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        format!("need integral timesteps in [0, {n}), in descending order"),
                    ));
                }
                custom
            }
            _ => {
                return Err(Error::invalid_argument(
                    "num_inference_steps",
                    "pass exactly one of a step count and custom timesteps",
                ));
            }
        };
        self.num_inference_steps = Some(timesteps.len());
        self.timesteps = timesteps;
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

    /// One TCD step. Takes `eta` (default 0.3) and, when it is positive, `generator` or
    /// `variance_noise`.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &["eta", "generator", "variance_noise"])?;
        let k = self.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                format!("{class}.step was called before set_timesteps"),
            )
        })?;
        let eta = options.eta.unwrap_or(0.3);
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid_argument(
                "eta",
                format!("{eta} is not in [0, 1]"),
            ));
        }
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let mut cursor = self.cursor.clone();
        let i = cursor.current(&self.timesteps, timestep, MissingTimestep::Error)?;
        if i >= self.timesteps.len() {
            return Err(Error::invalid_argument(
                "timestep",
                format!(
                    "{class} has already taken all {k} steps; call set_timesteps to start again"
                ),
            ));
        }
        let t = self.schedule.index_of(timestep, "timestep")?;
        let prev = self.timesteps.get(i + 1).copied().unwrap_or(0.0);
        // torch: (1 - eta) * an int64 tensor is float32, floored back to int64.
        let s = ((1.0 - eta) as f32 * prev as f32).floor() as usize;
        let ac = |j: usize| self.schedule.alphas_cumprod[j] as f32;
        let alpha_t = ac(t);
        let beta_t = 1.0 - alpha_t;
        let alpha_prev = if prev >= 0.0 {
            ac(prev as usize)
        } else {
            self.final_alpha_cumprod as f32
        };
        let alpha_s = ac(s);
        let beta_s = 1.0 - alpha_s;

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        let (x0, eps) = match self.config().0.prediction_type {
            PredictionType::Epsilon => (
                sample
                    .clone()
                    .sub(model_output.clone().mul_scalar(beta_t.sqrt()))
                    .div_scalar(alpha_t.sqrt()),
                model_output,
            ),
            PredictionType::Sample => {
                let eps = sample
                    .sub(model_output.clone().mul_scalar(alpha_t.sqrt()))
                    .div_scalar(beta_t.sqrt());
                (model_output, eps)
            }
            // validate admits only the three.
            _ => (
                sample
                    .clone()
                    .mul_scalar(alpha_t.sqrt())
                    .sub(model_output.clone().mul_scalar(beta_t.sqrt())),
                model_output
                    .mul_scalar(alpha_t.sqrt())
                    .add(sample.mul_scalar(beta_t.sqrt())),
            ),
        };
        let noised = x0
            .mul_scalar(alpha_s.sqrt())
            .add(eps.mul_scalar(beta_s.sqrt()));
        let prev_sample = if eta > 0.0 && i + 1 != k {
            let noise = ops::noise_like(&noised, options.generator, options.variance_noise, class)?;
            let ratio = alpha_prev / alpha_s;
            noised
                .mul_scalar(ratio.sqrt())
                .add(noise.mul_scalar((1.0 - ratio).sqrt()))
        } else {
            noised
        };
        cursor.advance();
        self.cursor = cursor;
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: None,
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
