//! Ancestral DPM-Solver-2, k-diffusion's `sample_dpm_2_ancestral` (diffusers'
//! `schedulers/scheduling_k_dpm_2_ancestral_discrete.py`; A1111's "DPM2 a" and
//! "DPM2 a Karras").

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops::{self, Stored};
use crate::schedule::NoiseSchedule;
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_k_dpm_2_discrete::{
    FirstEvaluation, KDPM2DiscreteSchedulerConfig, interleave, kdpm2_x0, log_midpoint,
    sigma_to_t_f32,
};
use crate::sigmas::{self, MissingTimestep, StepCursor, check_step_in_range, float_timesteps};

/// The config of [`KDPM2AncestralDiscreteScheduler`]: the same keys and defaults as
/// [`KDPM2DiscreteSchedulerConfig`], under its own class name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KDPM2AncestralDiscreteSchedulerConfig(pub KDPM2DiscreteSchedulerConfig);

impl Config for KDPM2AncestralDiscreteSchedulerConfig {
    const CLASS_NAME: &'static str = "KDPM2AncestralDiscreteScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        self.0.check(Self::CLASS_NAME)
    }
}

/// Ancestral DPM-Solver-2: like [`crate::KDPM2DiscreteScheduler`] it evaluates the model at
/// the current noise level and at a midpoint, but it steps towards a lower level
/// (`sigma_down`) and adds fresh noise of `sigma_up` after every full step, so the second
/// evaluation of each step needs a generator (or `variance_noise`) in [`StepOptions`].
/// Before `set_timesteps` the schedule is every training timestep, as in diffusers.
#[derive(Clone, Debug)]
pub struct KDPM2AncestralDiscreteScheduler {
    file: ConfigFile<KDPM2AncestralDiscreteSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    sigmas_up: Vec<f64>,
    sigmas_down: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
    first: Option<FirstEvaluation>,
}

impl KDPM2AncestralDiscreteScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: KDPM2AncestralDiscreteSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The interpolated (midpoint) noise levels, one per evaluation like
    /// [`Scheduler::sigmas`].
    pub fn sigmas_interpol(&self) -> &[f64] {
        &self.sigmas_interpol
    }

    /// The noise added after each full step, one per evaluation.
    pub fn sigmas_up(&self) -> &[f64] {
        &self.sigmas_up
    }

    /// The noise level each full step steps to before noise is added, one per evaluation.
    pub fn sigmas_down(&self) -> &[f64] {
        &self.sigmas_down
    }

    /// Whether the next `step` is the first evaluation of a step.
    pub fn state_in_first_order(&self) -> bool {
        self.first.is_none()
    }

    fn build(&mut self, timesteps: Vec<f64>) -> Result<()> {
        let c = self.config().0.clone();
        let k = timesteps.len();
        let (timesteps, base) = c.base_schedule(timesteps, &self.sigma_table, &self.log_sigmas);
        let mut s: Vec<f32> = base.iter().map(|&s| s as f32).collect();
        s.push(0.0);
        let n = s.len();
        // Float32 as torch computes them; the last entries are diffusers' fixed zeros (its
        // `sigmas_up` ends in 0/0, never read).
        let mut up = vec![0f32; n];
        let mut down = vec![0f32; n];
        for i in 0..n - 1 {
            let (sigma, next) = (s[i], s[i + 1]);
            up[i] = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            down[i] = (next * next - up[i] * up[i]).sqrt();
        }
        let mut interpol: Vec<f32> = (0..n).map(|i| log_midpoint(s[i], down[i])).collect();
        interpol[n - 2] = 0.0;
        interpol[n - 1] = 0.0;
        // When consecutive sigmas differ by orders of magnitude (the cosine schedule with few
        // steps) `next^2 - up^2` cancels to zero or, rounded, below it: the midpoint is then
        // not finite, and diffusers hands the model a NaN timestep.
        if let Some(i) = interpol.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                format!(
                    "{k} steps give sigma {} followed by {}: float32 cannot split that step \
                     into down and up noise (diffusers produces a NaN timestep); use more steps \
                     or another beta_schedule",
                    s[i],
                    s[i + 1]
                ),
            ));
        }
        let mut ts = vec![timesteps[0]];
        for i in 1..k {
            ts.extend([
                sigma_to_t_f32(interpol[i - 1], &self.log_sigmas),
                timesteps[i],
            ]);
        }
        self.timesteps = ts;
        self.sigmas = interleave(&s);
        self.sigmas_interpol = interleave(&interpol);
        self.sigmas_up = interleave(&up);
        self.sigmas_down = interleave(&down);
        self.cursor.reset();
        self.first = None;
        Ok(())
    }
}

impl ConfiguredScheduler for KDPM2AncestralDiscreteScheduler {
    type Config = KDPM2AncestralDiscreteSchedulerConfig;

    fn from_config_file(file: ConfigFile<KDPM2AncestralDiscreteSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(KDPM2AncestralDiscreteSchedulerConfig::CLASS_NAME, e))?;
        let (schedule, sigma_table, log_sigmas) = c.0.tables()?;
        let init = sigmas::train_float_timesteps(
            c.0.timestep_spacing,
            c.0.num_train_timesteps,
            c.0.steps_offset,
        );
        let mut scheduler = Self {
            file,
            schedule,
            sigma_table,
            log_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            sigmas_interpol: Vec::new(),
            sigmas_up: Vec::new(),
            sigmas_down: Vec::new(),
            num_inference_steps: None,
            cursor: StepCursor::default(),
            first: None,
        };
        // diffusers' __init__ calls set_timesteps(num_train_timesteps).
        scheduler.build(init)?;
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<KDPM2AncestralDiscreteSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for KDPM2AncestralDiscreteScheduler {
    crate::scheduler::stateful_scheduler_accessors!();

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        sigmas::euler_init_noise_sigma(&self.sigmas, self.config().0.timestep_spacing)
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().0.num_train_timesteps
    }

    /// A step count.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let k = request
            .num_inference_steps
            .ok_or_else(|| Error::invalid_argument("num_inference_steps", "pass a step count"))?;
        let c = &self.config().0;
        let ts = float_timesteps(c.timestep_spacing, c.num_train_timesteps, k, c.steps_offset)?;
        self.build(ts)?;
        self.num_inference_steps = Some(k);
        Ok(())
    }

    /// Divide by `sqrt(sigma^2 + 1)` for the current noise level (the interpolated one at a
    /// second evaluation).
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>> {
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        let sigma = match (self.first.is_none(), i) {
            (true, _) => self.sigmas.get(i),
            (false, 0) => None,
            (false, _) => self.sigmas_interpol.get(i - 1),
        };
        let sigma = *sigma
            .ok_or_else(|| Error::invalid_argument("timestep", "the schedule has no sigma left"))?;
        Ok(sigmas::scale_by_sigma(sample, sigma))
    }

    /// One evaluation: an Euler step to the midpoint, or the step to `sigma_down` with the
    /// midpoint's derivative plus noise of `sigma_up` (drawn from `generator`, or
    /// `variance_noise`, at second evaluations only).
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
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        check_step_in_range(i, &self.sigmas, class)?;
        let first_order = self.first.is_none();
        if !first_order && i == 0 {
            return Err(Error::invalid_argument(
                "timestep",
                "the second evaluation of a DPM-Solver-2 step cannot be the first step",
            ));
        }
        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        // Float32 scalars, as diffusers holds sigmas in float32 tensors.
        let j = if first_order { i } else { i - 1 };
        let sigma = self.sigmas[j] as f32;
        let sigma_interpol = self.sigmas_interpol[j] as f32;
        let sigma_input = if first_order { sigma } else { sigma_interpol };
        let pred_original = kdpm2_x0(
            self.config().0.prediction_type,
            model_output.clone(),
            &sample,
            sigma_input,
        );
        let derivative = sample
            .clone()
            .sub(pred_original.clone())
            .div_scalar(sigma_input);
        let prev_sample = match &self.first {
            None => {
                let prev = sample
                    .clone()
                    .add(derivative.mul_scalar(sigma_interpol - sigma));
                self.first = Some(FirstEvaluation {
                    sample: Stored::new(&sample),
                });
                prev
            }
            Some(first) => {
                let first_sample = first.sample.get::<D>()?;
                ops::check_same_shape(&first_sample, &sample, "sample", "the first sample")?;
                // Draw before changing any state, so a refused step leaves the scheduler
                // where it was.
                let noise = ops::noise_like(
                    &model_output,
                    options.generator,
                    options.variance_noise,
                    class,
                )?;
                let sigma_up = self.sigmas_up[j] as f32;
                let sigma_down = self.sigmas_down[j] as f32;
                self.first = None;
                first_sample
                    .add(derivative.mul_scalar(sigma_down - sigma))
                    .add(noise.mul_scalar(sigma_up))
            }
        };
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: Some(pred_original.cast(out_dtype)),
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
