//! RePaint inpainting with a DDPM model (Lugmayr et al. 2022; diffusers'
//! `schedulers/scheduling_repaint.py`): DDIM-style steps that paste the re-noised known image
//! outside the mask, with "resampling" jumps back up the chain ([`RePaintScheduler::undo_step`]).
//!
//! The step needs the known image and its mask, which the generic [`Scheduler::step`] cannot
//! carry: use [`RePaintScheduler::step_inpaint`]. The loop of diffusers' RePaintPipeline: for
//! each timestep, step when it is below the previous one, undo (re-noise) otherwise.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, NoiseSource, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::{self, BetaSchedule, NoiseSchedule};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};

/// The config of [`RePaintScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RePaintSchedulerConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the schedule.
    pub beta_start: f64,
    /// Last beta of the schedule.
    pub beta_end: f64,
    /// Shape of the beta schedule.
    pub beta_schedule: BetaSchedule,
    /// The DDIM noise weight of the unknown region (0 deterministic, 1 DDPM-like).
    pub eta: f64,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Clamp the predicted `x_0` to `[-1, 1]`.
    pub clip_sample: bool,
}

impl Default for RePaintSchedulerConfig {
    /// The `__init__` defaults of diffusers' `RePaintScheduler`
    /// (schedulers/scheduling_repaint.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            eta: 0.0,
            trained_betas: None,
            clip_sample: true,
        }
    }
}

impl Config for RePaintSchedulerConfig {
    const CLASS_NAME: &'static str = "RePaintScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        use BetaSchedule::*;
        if self.trained_betas.is_none() {
            schedule::check_allowed(
                Self::CLASS_NAME,
                "beta_schedule",
                self.beta_schedule,
                &[Linear, ScaledLinear, SquaredcosCapV2, Sigmoid],
                BetaSchedule::as_str,
            )?;
        }
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return Err(("eta".into(), format!("{} must be non-negative", self.eta)));
        }
        if self.num_train_timesteps == 0 {
            return Err(("num_train_timesteps".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The RePaint scheduler.
///
/// Stateless between steps: a step is found from its integer timestep. The schedule visits
/// timesteps more than once (the jumps); see the module documentation for the loop.
#[derive(Clone, Debug)]
pub struct RePaintScheduler {
    file: ConfigFile<RePaintSchedulerConfig>,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
}

impl RePaintScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: RePaintSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// diffusers' `set_timesteps(num_inference_steps, jump_length, jump_n_sample)`: the
    /// descending schedule (the step count is capped at `num_train_timesteps`) with, every
    /// `jump_length` steps, `jump_n_sample - 1` climbs of `jump_length` steps back up.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `num_inference_steps` for 0, `jump_length` for 0.
    pub fn set_timesteps_jumps(
        &mut self,
        num_inference_steps: usize,
        jump_length: usize,
        jump_n_sample: usize,
    ) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                "pass a step count of at least 1",
            ));
        }
        if jump_length == 0 {
            return Err(Error::invalid_argument("jump_length", "must be at least 1"));
        }
        let n = self.config().num_train_timesteps;
        let k = num_inference_steps.min(n);
        // Jumps start at every multiple of jump_length below k - jump_length.
        let mut jumps = std::collections::BTreeMap::new();
        let mut j = 0;
        while j + jump_length < k {
            jumps.insert(j, jump_n_sample.saturating_sub(1));
            j += jump_length;
        }
        let mut steps = Vec::new();
        let mut t = k;
        while t >= 1 {
            t -= 1;
            steps.push(t);
            if let Some(left) = jumps.get_mut(&t).filter(|left| **left > 0) {
                *left -= 1;
                for _ in 0..jump_length {
                    t += 1;
                    steps.push(t);
                }
            }
        }
        let ratio = n / k;
        self.timesteps = steps.into_iter().map(|t| (t * ratio) as f64).collect();
        self.num_inference_steps = Some(k);
        Ok(())
    }

    /// `num_train_timesteps / num_inference_steps`, the timestep distance of one step.
    fn stride(&self, class: &str) -> Result<usize> {
        let k = self.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                format!("{class}.step was called before set_timesteps"),
            )
        })?;
        Ok(self.config().num_train_timesteps / k)
    }

    /// The training timestep `t` as an index.
    fn train_index(&self, t: f64) -> Result<usize> {
        let n = self.schedule.len();
        if t.fract() != 0.0 || t < 0.0 || t >= n as f64 {
            return Err(Error::invalid_argument(
                "timestep",
                format!("{t} is not an integral timestep in [0, {n})"),
            ));
        }
        Ok(t as usize)
    }

    /// One RePaint step from integer timestep `timestep`: a DDIM step (noise weight `eta`) in
    /// the unknown region (`mask` 0), the known image re-noised to the next timestep where
    /// `mask` is 1. Takes `generator` or `variance_noise` (always drawn: the known part needs
    /// it). Returns the predicted `x_0` too.
    ///
    /// # Shapes
    /// `model_output`, `sample`, `original_image`: `[B, C, ...]`; `mask` has the same rank,
    /// each dimension equal to the sample's or 1.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] before `set_timesteps`, for a timestep outside the training
    /// schedule, mismatched shapes, another option, or no noise source.
    pub fn step_inpaint<const D: usize>(
        &self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        original_image: Tensor<D>,
        mask: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &["generator", "variance_noise"])?;
        let stride = self.stride(class)?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        ops::check_same_shape(&original_image, &sample, "original_image", "sample")?;
        let (mask_dims, dims) = (mask.dims(), sample.dims());
        if mask_dims
            .iter()
            .zip(dims.iter())
            .any(|(m, s)| *m != *s && *m != 1)
        {
            return Err(Error::invalid_argument(
                "mask",
                format!("shape {mask_dims:?} does not broadcast to the sample's {dims:?}"),
            ));
        }
        let t = self.train_index(timestep)?;
        let a = &self.schedule.alphas_cumprod;
        // Float32 scalars in diffusers' operation order.
        let alpha_prod_t = a[t] as f32;
        let alpha_prod_t_prev = t.checked_sub(stride).map_or(1.0, |p| a[p] as f32);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let c = self.config();

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        let mut x0 = sample
            .sub(model_output.clone().mul_scalar(beta_prod_t.sqrt()))
            .div_scalar(alpha_prod_t.sqrt());
        if c.clip_sample {
            x0 = x0.clamp(-1.0, 1.0);
        }
        let noise = ops::noise_like(
            &model_output,
            options.generator,
            options.variance_noise,
            class,
        )?
        .cast(FloatDType::F32);
        // diffusers' _get_variance at this timestep.
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = c.eta as f32 * variance.sqrt();
        let direction =
            model_output.mul_scalar((1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt());
        let mut unknown = x0
            .clone()
            .mul_scalar(alpha_prod_t_prev.sqrt())
            .add(direction);
        if t > 0 && c.eta > 0.0 {
            unknown = unknown.add(noise.clone().mul_scalar(std_dev_t));
        }
        let known = original_image
            .cast(FloatDType::F32)
            .mul_scalar(alpha_prod_t_prev.sqrt())
            .add(noise.mul_scalar((1.0 - alpha_prod_t_prev).sqrt()));
        let mask = mask.cast(FloatDType::F32);
        let prev_sample = mask
            .clone()
            .mul(known)
            .add(mask.neg().add_scalar(1.0).mul(unknown));
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: Some(x0.cast(out_dtype)),
        })
    }

    /// Re-noise `sample` from `timestep` up by one step (`num_train_timesteps /
    /// num_inference_steps` forward-process steps, one fresh noise draw each). Takes
    /// `generator` (or, for a one-draw undo, `variance_noise`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] before `set_timesteps`, for a timestep whose forward steps
    /// leave the training schedule, another option, or no noise source.
    pub fn undo_step<const D: usize>(
        &self,
        sample: Tensor<D>,
        timestep: f64,
        options: StepOptions<'_, D>,
    ) -> Result<Tensor<D>> {
        let class = self.class_name();
        options.accept_only(class, &["generator", "variance_noise"])?;
        let stride = self.stride(class)?;
        let t = self.train_index(timestep)?;
        if t + stride > self.schedule.len() {
            return Err(Error::invalid_argument(
                "timestep",
                format!("undoing {stride} steps from {t} leaves the training schedule"),
            ));
        }
        if options.variance_noise.is_some() && stride > 1 {
            return Err(Error::invalid_argument(
                "variance_noise",
                format!("this undo draws {stride} noises; pass a generator"),
            ));
        }
        let out_dtype = ops::float_dtype(&sample, "sample")?;
        let mut sample = sample.cast(FloatDType::F32);
        let mut generator = options.generator;
        let mut variance_noise = options.variance_noise;
        for i in 0..stride {
            let beta = self.schedule.betas[t + i] as f32;
            let noise = ops::noise_like(
                &sample,
                reborrow(&mut generator),
                variance_noise.take(),
                class,
            )?
            .cast(FloatDType::F32);
            sample = sample
                .mul_scalar((1.0 - beta).sqrt())
                .add(noise.mul_scalar(beta.sqrt()));
        }
        Ok(sample.cast(out_dtype))
    }
}

/// The noise source again, for one more draw.
fn reborrow<'b>(source: &'b mut Option<NoiseSource<'_>>) -> Option<NoiseSource<'b>> {
    match source {
        Some(NoiseSource::Single(g)) => Some(NoiseSource::Single(g)),
        Some(NoiseSource::PerImage(gs)) => Some(NoiseSource::PerImage(gs)),
        None => None,
    }
}

impl ConfiguredScheduler for RePaintScheduler {
    type Config = RePaintSchedulerConfig;

    fn from_config_file(file: ConfigFile<RePaintSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(RePaintSchedulerConfig::CLASS_NAME, e))?;
        let schedule = crate::scheduler::noise_schedule_of!(c, false)?;
        let n = c.num_train_timesteps;
        Ok(Self {
            file,
            schedule,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            num_inference_steps: None,
        })
    }

    fn config_file(&self) -> &ConfigFile<RePaintSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for RePaintScheduler {
    fn class_name(&self) -> &'static str {
        RePaintSchedulerConfig::CLASS_NAME
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
        self.config().num_train_timesteps
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// A step count, with diffusers' default jumps (`jump_length` 10, `jump_n_sample` 10);
    /// see [`RePaintScheduler::set_timesteps_jumps`].
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let k = request
            .num_inference_steps
            .ok_or_else(|| Error::invalid_argument("num_inference_steps", "pass a step count"))?;
        self.set_timesteps_jumps(k, 10, 10)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The identity.
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        _timestep: f64,
    ) -> Result<Tensor<D>> {
        Ok(sample)
    }

    /// Refused: a RePaint step needs the known image and its mask
    /// ([`RePaintScheduler::step_inpaint`]).
    fn step<const D: usize>(
        &mut self,
        _model_output: Tensor<D>,
        _timestep: f64,
        _sample: Tensor<D>,
        _options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        Err(Error::invalid_argument(
            "original_image",
            "RePaintScheduler steps need the known image and its mask: use \
             RePaintScheduler::step_inpaint",
        ))
    }

    /// Refused, as in diffusers (train with DDPMScheduler's `add_noise`).
    fn add_noise<const D: usize>(
        &self,
        _original: Tensor<D>,
        _noise: Tensor<D>,
        _timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        Err(Error::invalid_argument(
            "add_noise",
            "RePaintScheduler has no add_noise; use DDPMScheduler's to train for RePaint",
        ))
    }
}
