//! DDPM for parallel sampling (ParaDiGMS): DDPM's step plus a batched, noise-free step with
//! one timestep per sample (diffusers' `schedulers/scheduling_ddpm_parallel.py`).

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::NoiseSchedule;
use crate::scheduler::{ConfiguredScheduler, Scheduler};
use crate::scheduling_ddpm::{DDPMScheduler, DDPMSchedulerConfig, DdpmCoefficients};

/// The config of [`DDPMParallelScheduler`]: the same keys and `__init__` defaults as
/// [`DDPMSchedulerConfig`] (diffusers' schedulers/scheduling_ddpm_parallel.py), under its own
/// class name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DDPMParallelSchedulerConfig(pub DDPMSchedulerConfig);

impl Config for DDPMParallelSchedulerConfig {
    const CLASS_NAME: &'static str = "DDPMParallelScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        self.0.validate()
    }
}

/// DDPM for parallel sampling: [`Scheduler::step`] is [`DDPMScheduler`]'s (same options, same
/// numbers, same generator draws), and [`Self::batch_step_no_noise`] steps a batch whose
/// samples sit at different timesteps to their posterior means, adding no noise (a parallel
/// sampler draws it up front).
#[derive(Clone, Debug)]
pub struct DDPMParallelScheduler {
    file: ConfigFile<DDPMParallelSchedulerConfig>,
    inner: DDPMScheduler,
}

impl DDPMParallelScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DDPMParallelSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        self.inner.noise_schedule()
    }

    /// `alphas_cumprod` of the training schedule.
    pub fn alphas_cumprod(&self) -> &[f64] {
        self.inner.alphas_cumprod()
    }

    /// The timestep that follows `timestep` in the current schedule (see
    /// [`DDPMScheduler::previous_timestep`]).
    ///
    /// # Errors
    /// As [`DDPMScheduler::previous_timestep`].
    pub fn previous_timestep(&self, timestep: f64) -> Result<f64> {
        self.inner.previous_timestep(timestep)
    }

    /// The variance of the step from `timestep` for the fixed variance types (see
    /// [`DDPMScheduler::fixed_variance`]).
    ///
    /// # Errors
    /// As [`DDPMScheduler::fixed_variance`].
    pub fn fixed_variance(&self, timestep: f64) -> Result<f64> {
        self.inner.fixed_variance(timestep)
    }

    /// The posterior mean of one DDPM step for every sample of a batch, each from its own
    /// timestep to `timestep - num_train_timesteps / num_inference_steps` (every training
    /// timestep before `set_timesteps`, or after custom timesteps), adding no noise
    /// (diffusers' `batch_step_no_noise`). The target is `alpha_bar = 1` past the start of
    /// the schedule. The step size ignores `timestep_spacing` and custom timesteps, as in
    /// diffusers. Learned-variance models' extra channels are dropped.
    ///
    /// # Shapes
    /// `model_output`: `[N, C, ...]` (or `[N, 2C, ...]` for the learned variance types);
    /// `sample`: `[N, C, ...]`; `timesteps`: `N` values (or one for the whole batch); the
    /// result is shaped like `sample`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `timesteps` for a count that is neither 1 nor `N` or
    /// a value that is not a training timestep, `sample` for a tensor without a channel axis,
    /// and `model_output` for mismatched shapes.
    pub fn batch_step_no_noise<const D: usize>(
        &self,
        model_output: Tensor<D>,
        timesteps: &[f64],
        sample: Tensor<D>,
    ) -> Result<Tensor<D>> {
        if D < 2 {
            return Err(Error::invalid_argument(
                "sample",
                format!("{} steps [batch, channels, ...] tensors", self.class_name()),
            ));
        }
        let c = &self.config().0;
        let n = c.num_train_timesteps;
        let k = self.inner.num_inference_steps().unwrap_or(n);
        let channels = sample.dims()[1];
        let model_output = if c.variance_type.is_learned() && model_output.dims()[1] == 2 * channels
        {
            model_output.narrow(1, 0, channels)
        } else {
            model_output
        };
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let schedule = self.inner.noise_schedule();
        // alpha_bar as the float32 diffusers holds, naming the argument in errors.
        let alpha_bar = |t: f64| -> Result<f32> {
            Ok(schedule.alphas_cumprod[schedule.index_of(t, "timesteps")?] as f32)
        };
        let mut columns: [Vec<f64>; 4] = Default::default();
        for &t in timesteps {
            let prev_t = t - (n / k) as f64;
            let alpha_prod_t = alpha_bar(t)?;
            let alpha_prod_prev = if prev_t >= 0.0 {
                alpha_bar(prev_t)?
            } else {
                1.0
            };
            let k = DdpmCoefficients::new(alpha_prod_t, alpha_prod_prev);
            for (column, value) in
                columns
                    .iter_mut()
                    .zip([k.sqrt_alpha, k.sqrt_beta, k.original, k.current])
            {
                column.push(f64::from(value));
            }
        }
        let [sqrt_alpha, sqrt_beta, original, current] =
            columns.map(|values| ops::batch_coefficients(&values, &sample));
        let coefficients = DdpmCoefficients {
            sqrt_alpha: sqrt_alpha?,
            sqrt_beta: sqrt_beta?,
            original: original?,
            current: current?,
        };
        let (mean, _) = self
            .inner
            .posterior_mean(model_output, sample, &coefficients)?;
        Ok(mean)
    }
}

crate::scheduler::wrapped_scheduler_impls!(
    DDPMParallelScheduler(DDPMParallelSchedulerConfig) wraps DDPMScheduler,
    set_timesteps: " As [`DDPMScheduler`]: evenly spaced steps per `timestep_spacing`, or custom integral timesteps in strictly decreasing order.",
    step: " DDPM's ancestral step: takes `generator` (or `variance_noise`); noise is needed, and drawn, only when `timestep > 0`.",
);
