//! DDIM for parallel sampling (ParaDiGMS): DDIM's step plus a batched, noise-free step with
//! one timestep per sample (diffusers' `schedulers/scheduling_ddim_parallel.py`).

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::NoiseSchedule;
use crate::scheduler::{ConfiguredScheduler, Scheduler};
use crate::scheduling_ddim::{DDIMScheduler, DDIMSchedulerConfig, DdimCoefficients};

/// The config of [`DDIMParallelScheduler`]: the same keys and `__init__` defaults as
/// [`DDIMSchedulerConfig`] (diffusers' schedulers/scheduling_ddim_parallel.py), under its own
/// class name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DDIMParallelSchedulerConfig(pub DDIMSchedulerConfig);

impl Config for DDIMParallelSchedulerConfig {
    const CLASS_NAME: &'static str = "DDIMParallelScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        self.0.validate()
    }
}

/// DDIM for parallel sampling: [`Scheduler::step`] is [`DDIMScheduler`]'s (same options, same
/// numbers), and [`Self::batch_step_no_noise`] steps a batch whose samples sit at different
/// timesteps, adding no noise (a parallel sampler draws it up front).
#[derive(Clone, Debug)]
pub struct DDIMParallelScheduler {
    file: ConfigFile<DDIMParallelSchedulerConfig>,
    inner: DDIMScheduler,
}

impl DDIMParallelScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DDIMParallelSchedulerConfig) -> Result<Self> {
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

    /// `alpha_bar` used past the last timestep by [`Scheduler::step`] (not by
    /// [`Self::batch_step_no_noise`], which always goes to 1 there, as in diffusers).
    pub fn final_alpha_cumprod(&self) -> f64 {
        self.inner.final_alpha_cumprod()
    }

    /// DDIM's step variance from `timestep` to `prev_timestep` (see
    /// [`DDIMScheduler::variance`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a timestep is outside the training schedule.
    pub fn variance(&self, timestep: f64, prev_timestep: f64) -> Result<f64> {
        self.inner.variance(timestep, prev_timestep)
    }

    /// One deterministic DDIM step (`eta = 0`) for every sample of a batch, each from its own
    /// timestep to `timestep - num_train_timesteps / num_inference_steps` (diffusers'
    /// `batch_step_no_noise`). Past the start of the schedule the target is `alpha_bar = 1`
    /// whatever `set_alpha_to_one` says, as in diffusers. `use_clipped_model_output`
    /// re-derives the noise from the clipped `x_0`, as in [`Scheduler::step`].
    ///
    /// diffusers takes an `eta` here but asserts that it is 0; this port takes none.
    ///
    /// # Shapes
    /// `model_output` and `sample`: `[N, ...]`; `timesteps`: `N` values (or one for the whole
    /// batch); the result is shaped like `sample`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `num_inference_steps` before `set_timesteps`,
    /// `timesteps` for a count that is neither 1 nor `N` or a value that is not a training
    /// timestep, and `model_output` for mismatched shapes.
    pub fn batch_step_no_noise<const D: usize>(
        &self,
        model_output: Tensor<D>,
        timesteps: &[f64],
        sample: Tensor<D>,
        use_clipped_model_output: bool,
    ) -> Result<Tensor<D>> {
        let k = self.inner.num_inference_steps().ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                format!(
                    "{}.batch_step_no_noise was called before set_timesteps",
                    self.class_name()
                ),
            )
        })?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let n = self.config().0.num_train_timesteps;
        let schedule = self.inner.noise_schedule();
        // alpha_bar as the float32 diffusers holds, naming the argument in errors.
        let alpha_bar = |t: f64| -> Result<f32> {
            Ok(schedule.alphas_cumprod[schedule.index_of(t, "timesteps")?] as f32)
        };
        let mut columns: [Vec<f64>; 4] = Default::default();
        for &t in timesteps {
            let prev_t = t - (n / k) as f64;
            // Float32 as diffusers computes them, on [N, 1, ...] float32 tensors.
            let alpha_prod_t = alpha_bar(t)?;
            let alpha_prod_prev = if prev_t >= 0.0 {
                alpha_bar(prev_t)?
            } else {
                1.0
            };
            let beta_prod_t = 1.0 - alpha_prod_t;
            let beta_prod_prev = 1.0 - alpha_prod_prev;
            // eta is 0, but diffusers still forms 0 * sqrt(variance) (NaN stays NaN).
            let variance = (beta_prod_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_prev);
            let std_dev = 0.0 * variance.sqrt();
            let direction = (1.0 - alpha_prod_prev - std_dev * std_dev).sqrt();
            for (column, value) in columns.iter_mut().zip([
                alpha_prod_t.sqrt(),
                beta_prod_t.sqrt(),
                alpha_prod_prev.sqrt(),
                direction,
            ]) {
                column.push(f64::from(value));
            }
        }
        let [sqrt_alpha, sqrt_beta, sqrt_alpha_prev, direction] =
            columns.map(|values| ops::batch_coefficients(&values, &sample));
        let coefficients = DdimCoefficients {
            sqrt_alpha: sqrt_alpha?,
            sqrt_beta: sqrt_beta?,
            sqrt_alpha_prev: sqrt_alpha_prev?,
            direction: direction?,
        };
        let (prev_sample, _) = self.inner.denoise(
            model_output,
            sample,
            &coefficients,
            use_clipped_model_output,
        )?;
        Ok(prev_sample)
    }
}

crate::scheduler::wrapped_scheduler_impls!(
    DDIMParallelScheduler(DDIMParallelSchedulerConfig) wraps DDIMScheduler,
    set_timesteps: " As [`DDIMScheduler`]: evenly spaced steps per `timestep_spacing`.",
    step: " DDIM's step: takes `eta`, `use_clipped_model_output`, and for `eta > 0` a `generator` or `variance_noise`.",
);
