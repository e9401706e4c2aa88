//! Euler steps along a rectified-flow (flow-matching) trajectory, `x_t = (1 - t) x_0 + t e`
//! (diffusers' `schedulers/scheduling_flow_match_euler_discrete.py`; Stable Diffusion 3, Flux).
//!
//! The model predicts the velocity `e - x_0`; a step moves the sample by `dt` times it. Sigmas
//! are the flow times themselves, shifted towards noise (`shift`, or `mu` with dynamic
//! shifting), and timesteps are `sigma * num_train_timesteps`.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::numpy_linspace;
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{self, MissingTimestep, StepCursor, check_step_in_range};

/// How `mu` shifts the flow times with dynamic shifting (`time_shift_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlowTimeShiftType {
    /// `e^mu / (e^mu + 1/t - 1)`.
    #[serde(rename = "exponential")]
    Exponential,
    /// `mu / (mu + 1/t - 1)`.
    #[serde(rename = "linear")]
    Linear,
}

/// The config of [`FlowMatchEulerDiscreteScheduler`], key for key as in
/// `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerDiscreteSchedulerConfig {
    /// Number of flow times the model was trained with.
    pub num_train_timesteps: usize,
    /// The static shift of the flow times (3 for Stable Diffusion 3).
    pub shift: f64,
    /// Shift by `mu` given at `set_timesteps` instead (Flux).
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` (read by pipelines to compute `mu`).
    pub base_shift: Option<f64>,
    /// `mu` at `max_image_seq_len` (read by pipelines to compute `mu`).
    pub max_shift: Option<f64>,
    /// The sequence length of `base_shift`.
    pub base_image_seq_len: usize,
    /// The sequence length of `max_shift`.
    pub max_image_seq_len: usize,
    /// Run from data to noise: sigmas become `1 - sigma`, ending at 1.
    pub invert_sigmas: bool,
    /// Stretch the shifted flow times so that the last one equals this.
    pub shift_terminal: Option<f64>,
    /// Use the Karras et al. spacing between the first and last shifted flow time.
    pub use_karras_sigmas: bool,
    /// Space the flow times evenly in log between the first and last.
    pub use_exponential_sigmas: bool,
    /// Place the flow times at the quantiles of a Beta(0.6, 0.6) distribution between the
    /// first and last shifted flow time.
    pub use_beta_sigmas: bool,
    /// How `mu` shifts the flow times.
    pub time_shift_type: FlowTimeShiftType,
    /// Re-noise at every step from the predicted `x_0` instead of an Euler step (needs a
    /// generator).
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerDiscreteSchedulerConfig {
    /// The `__init__` defaults of diffusers' `FlowMatchEulerDiscreteScheduler`
    /// (schedulers/scheduling_flow_match_euler_discrete.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: FlowTimeShiftType::Exponential,
            stochastic_sampling: false,
        }
    }
}

impl Config for FlowMatchEulerDiscreteSchedulerConfig {
    const CLASS_NAME: &'static str = "FlowMatchEulerDiscreteScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let field = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if self.num_train_timesteps == 0 {
            return field("num_train_timesteps", "must be at least 1");
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return field("shift", "must be positive");
        }
        sigmas::check_one_respacing(
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        )?;
        if self
            .shift_terminal
            .is_some_and(|t| t.partial_cmp(&1.0) != Some(std::cmp::Ordering::Less))
        {
            return field("shift_terminal", "must be below 1");
        }
        Ok(())
    }
}

/// Round to float32 when `f32` is set: numpy evaluates the shifts in float32 for custom
/// (float32) sigmas and in float64 otherwise, one rounding per operation.
fn rounded(f32: bool) -> impl Fn(f64) -> f64 {
    move |v| if f32 { f64::from(v as f32) } else { v }
}

/// `shift * s / (1 + (shift - 1) * s)`, the static shift of a flow time.
pub(crate) fn shift_flow_time(s: f64, shift: f64, f32: bool) -> f64 {
    let r = rounded(f32);
    r(r(shift * s) / r(1.0 + r((shift - 1.0) * s)))
}

/// The training flow times `n/n, ..., 1/n` as diffusers' `__init__` builds them: float32,
/// shifted (in float32) when `shift` is given.
pub(crate) fn train_flow_sigmas(n: usize, shift: Option<f64>) -> Vec<f64> {
    (1..=n)
        .rev()
        .map(|t| {
            let s = (t as f32) / n as f32;
            let s = match shift {
                // torch rounds the Python scalars `shift` and `shift - 1` to float32.
                Some(shift) => (shift as f32) * s / (1.0 + ((shift - 1.0) as f32) * s),
                None => s,
            };
            f64::from(s)
        })
        .collect()
}

/// The flow-matching Euler sampler of Stable Diffusion 3 and Flux.
///
/// Stateful like Euler: the first `step` after `set_timesteps` finds its place from the
/// timestep (or [`Scheduler::set_begin_index`]); a timestep not in the schedule is refused.
/// [`Scheduler::add_noise`] is diffusers' `scale_noise` (`sigma * noise + (1 - sigma) *
/// sample`). With `stochastic_sampling` every step draws noise from the generator (or
/// `variance_noise`) in [`StepOptions`].
#[derive(Clone, Debug)]
pub struct FlowMatchEulerDiscreteScheduler {
    file: ConfigFile<FlowMatchEulerDiscreteSchedulerConfig>,
    shift: f64,
    sigma_min: f64,
    sigma_max: f64,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
}

impl FlowMatchEulerDiscreteScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: FlowMatchEulerDiscreteSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The static shift in use (the config's `shift` unless [`Self::set_shift`] changed it).
    pub fn shift(&self) -> f64 {
        self.shift
    }

    /// Change the static shift for the next `set_timesteps` (diffusers' `set_shift`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `shift` when it is not positive.
    pub fn set_shift(&mut self, shift: f64) -> Result<()> {
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::invalid_argument(
                "shift",
                format!("{shift} must be positive"),
            ));
        }
        self.shift = shift;
        Ok(())
    }

    /// The flow-matching forward process `sigma * noise + (1 - sigma) * sample` at the sigma
    /// of each timestep (or of the current or begin index once one is set), diffusers'
    /// `scale_noise`.
    ///
    /// # Shapes
    /// `sample` and `noise`: `[B, ...]`; `timesteps`: `B` or 1 values.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for mismatched shapes or a timestep not in the schedule.
    pub fn scale_noise<const D: usize>(
        &self,
        sample: Tensor<D>,
        timesteps: &[f64],
        noise: Tensor<D>,
    ) -> Result<Tensor<D>> {
        flow_scale_noise(
            &self.cursor,
            &self.timesteps,
            &self.sigmas,
            sample,
            timesteps,
            noise,
        )
    }

    /// diffusers' `time_shift(mu, 1, t)` of a flow time, with one rounding per operation in
    /// float32 when `f32`.
    fn time_shift(&self, mu: f64, t: f64, f32: bool) -> f64 {
        let r = rounded(f32);
        let tail = r(r(1.0 / t) - 1.0);
        match self.config().time_shift_type {
            FlowTimeShiftType::Exponential => r(mu.exp() / r(mu.exp() + tail)),
            FlowTimeShiftType::Linear => r(mu / r(mu + tail)),
        }
    }
}

/// `sigma * noise + (1 - sigma) * sample` at the schedule sigmas of `timesteps`, shared by
/// the flow-matching schedulers.
pub(crate) fn flow_scale_noise<const D: usize>(
    cursor: &StepCursor,
    schedule_timesteps: &[f64],
    sigmas: &[f64],
    sample: Tensor<D>,
    timesteps: &[f64],
    noise: Tensor<D>,
) -> Result<Tensor<D>> {
    ops::check_same_shape(&noise, &sample, "noise", "sample")?;
    let indices = cursor.noise_indices(schedule_timesteps, timesteps, MissingTimestep::Error)?;
    let sigma: Vec<f64> = indices.iter().map(|&i| sigmas[i]).collect();
    let keep: Vec<f64> = sigma.iter().map(|&s| f64::from(1.0 - s as f32)).collect();
    let sigma = ops::batch_coefficients(&sigma, &sample)?;
    let keep = ops::batch_coefficients(&keep, &sample)?;
    Ok(sigma.mul(noise).add(keep.mul(sample)))
}

impl ConfiguredScheduler for FlowMatchEulerDiscreteScheduler {
    type Config = FlowMatchEulerDiscreteSchedulerConfig;

    fn from_config_file(file: ConfigFile<FlowMatchEulerDiscreteSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(FlowMatchEulerDiscreteSchedulerConfig::CLASS_NAME, e))?;
        let n = c.num_train_timesteps;
        let sigmas = train_flow_sigmas(n, (!c.use_dynamic_shifting).then_some(c.shift));
        let (sigma_max, sigma_min) = (sigmas[0], sigmas[n - 1]);
        let timesteps = sigmas
            .iter()
            .map(|&s| f64::from(s as f32 * n as f32))
            .collect();
        Ok(Self {
            shift: c.shift,
            file,
            sigma_min,
            sigma_max,
            timesteps,
            sigmas,
            num_inference_steps: None,
            cursor: StepCursor::default(),
        })
    }

    fn config_file(&self) -> &ConfigFile<FlowMatchEulerDiscreteSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    crate::scheduler::stateful_scheduler_accessors!(unit_noise);

    /// A step count, custom sigmas (flow times before shifting), custom timesteps, or both of
    /// the same length; `mu` is required exactly when `use_dynamic_shifting` is on.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let class = self.class_name();
        request.accept_only(class, &["num_inference_steps", "timesteps", "sigmas", "mu"])?;
        let c = self.config().clone();
        let n = c.num_train_timesteps as f64;
        let mu = match (c.use_dynamic_shifting, request.mu) {
            (true, None) => {
                return Err(Error::invalid_argument(
                    "mu",
                    "use_dynamic_shifting = true needs mu at set_timesteps",
                ));
            }
            (false, Some(_)) => {
                return Err(Error::invalid_argument(
                    "mu",
                    "mu needs use_dynamic_shifting = true in the config",
                ));
            }
            (_, mu) => mu,
        };
        let (custom_sigmas, custom_timesteps) = (request.sigmas, request.timesteps);
        let k = match (
            request.num_inference_steps,
            &custom_sigmas,
            &custom_timesteps,
        ) {
            (None, None, None) => {
                return Err(Error::invalid_argument(
                    "num_inference_steps",
                    "pass a step count, custom sigmas or custom timesteps",
                ));
            }
            (k, s, t) => {
                let lens: Vec<usize> = [s.as_ref().map(Vec::len), t.as_ref().map(Vec::len), k]
                    .into_iter()
                    .flatten()
                    .collect();
                if lens.iter().any(|&l| l != lens[0]) {
                    return Err(Error::invalid_argument(
                        if s.is_some() { "sigmas" } else { "timesteps" },
                        "num_inference_steps, sigmas and timesteps must have the same length",
                    ));
                }
                lens[0]
            }
        };
        if k == 0 {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let positive = |v: &Vec<f64>| v.iter().all(|x| x.is_finite() && *x > 0.0);
        if custom_sigmas.as_ref().is_some_and(|s| !positive(s)) {
            return Err(Error::invalid_argument(
                "sigmas",
                "must be positive flow times",
            ));
        }
        if custom_timesteps.as_ref().is_some_and(|t| !positive(t)) {
            return Err(Error::invalid_argument("timesteps", "must be positive"));
        }
        // Custom values are float32 arrays in diffusers, and the shifts are evaluated in their
        // precision; the default schedule is float64.
        let custom_timesteps: Option<Vec<f64>> =
            custom_timesteps.map(|t| t.iter().map(|&v| f64::from(v as f32)).collect());
        let (base, in_f32): (Vec<f64>, bool) = match (&custom_sigmas, &custom_timesteps) {
            (Some(s), _) => (s.iter().map(|&v| f64::from(v as f32)).collect(), true),
            (None, Some(t)) => (t.iter().map(|&v| f64::from((v / n) as f32)).collect(), true),
            (None, None) => (
                numpy_linspace(self.sigma_max * n, self.sigma_min * n, k)
                    .into_iter()
                    .map(|t| t / n)
                    .collect(),
                false,
            ),
        };
        let mut s: Vec<f64> = match mu {
            Some(mu) => base
                .iter()
                .map(|&t| self.time_shift(mu, t, in_f32))
                .collect(),
            None => base
                .iter()
                .map(|&t| shift_flow_time(t, self.shift, in_f32))
                .collect(),
        };
        if let Some(terminal) = c.shift_terminal {
            let r = rounded(in_f32);
            let scale = r(r(1.0 - s[k - 1]) / r(1.0 - terminal));
            for v in &mut s {
                *v = r(1.0 - r(r(1.0 - *v) / scale));
            }
        }
        if c.use_karras_sigmas {
            s = sigmas::karras_sigmas(s[k - 1], s[0], k);
        } else if c.use_exponential_sigmas {
            s = sigmas::exponential_sigmas(s[k - 1], s[0], k);
        } else if c.use_beta_sigmas {
            s = sigmas::beta_sigmas(s[k - 1], s[0], k);
        }
        let mut s: Vec<f32> = s.iter().map(|&v| v as f32).collect();
        let nf = n as f32;
        let mut timesteps: Vec<f64> = match custom_timesteps {
            Some(t) => t,
            None => s.iter().map(|&v| f64::from(v * nf)).collect(),
        };
        let last = if c.invert_sigmas {
            for v in &mut s {
                *v = 1.0 - *v;
            }
            timesteps = s.iter().map(|&v| f64::from(v * nf)).collect();
            1.0
        } else {
            0.0
        };
        s.push(last);
        self.timesteps = timesteps;
        self.sigmas = s.into_iter().map(f64::from).collect();
        self.num_inference_steps = Some(k);
        self.cursor.reset();
        Ok(())
    }

    /// `sample + (sigma_next - sigma) * model_output`, or with `stochastic_sampling` the
    /// predicted `x_0` re-noised to `sigma_next` (takes `generator` or `variance_noise`).
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        if self.config().stochastic_sampling {
            options.accept_only(class, &["generator", "variance_noise"])?;
        } else {
            options.accept_only(class, &[])?;
        }
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        check_step_in_range(i, &self.sigmas, class)?;
        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        let (sigma, sigma_next) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
        let prev_sample = if self.config().stochastic_sampling {
            let x0 = sample.sub(model_output.mul_scalar(sigma));
            let noise = ops::noise_like(&x0, options.generator, options.variance_noise, class)?;
            x0.mul_scalar(1.0 - sigma_next)
                .add(noise.mul_scalar(sigma_next))
        } else {
            sample.add(model_output.mul_scalar(sigma_next - sigma))
        };
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: None,
        })
    }

    /// diffusers' `scale_noise`: `sigma * noise + (1 - sigma) * original`.
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        self.scale_noise(original, timesteps, noise)
    }
}
