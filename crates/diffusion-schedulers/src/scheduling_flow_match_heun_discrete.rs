//! Heun's method along a rectified-flow trajectory (diffusers'
//! `schedulers/scheduling_flow_match_heun_discrete.py`).

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops::{self, Stored};
use crate::schedule::numpy_linspace;
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_flow_match_euler_discrete::{
    flow_scale_noise, shift_flow_time, train_flow_sigmas,
};
use crate::sigmas::{Churn, MissingTimestep, StepCursor, check_step_in_range};

/// The config of [`FlowMatchHeunDiscreteScheduler`], key for key as in
/// `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowMatchHeunDiscreteSchedulerConfig {
    /// Number of flow times the model was trained with.
    pub num_train_timesteps: usize,
    /// The static shift of the flow times.
    pub shift: f64,
}

impl Default for FlowMatchHeunDiscreteSchedulerConfig {
    /// The `__init__` defaults of diffusers' `FlowMatchHeunDiscreteScheduler`
    /// (schedulers/scheduling_flow_match_heun_discrete.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
        }
    }
}

impl Config for FlowMatchHeunDiscreteSchedulerConfig {
    const CLASS_NAME: &'static str = "FlowMatchHeunDiscreteScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        if self.num_train_timesteps == 0 {
            return Err(("num_train_timesteps".into(), "must be at least 1".into()));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(("shift".into(), "must be positive".into()));
        }
        Ok(())
    }
}

/// The first evaluation of a Heun step, kept for the second.
#[derive(Clone, Debug)]
struct FirstHalf {
    derivative: Stored,
    sample: Stored,
    dt: f32,
}

/// Heun's method on flow-matching sigmas: every step but the last evaluates the model twice,
/// so the schedule lists each inner timestep twice (`order` is 2). Stateful like
/// [`crate::HeunDiscreteScheduler`]; takes Karras et al.'s churn options (`s_churn` > 0 draws
/// noise from the generator or `variance_noise`).
#[derive(Clone, Debug)]
pub struct FlowMatchHeunDiscreteScheduler {
    file: ConfigFile<FlowMatchHeunDiscreteSchedulerConfig>,
    sigma_min: f64,
    sigma_max: f64,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
    first_half: Option<Box<FirstHalf>>,
}

impl FlowMatchHeunDiscreteScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: FlowMatchHeunDiscreteSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// Whether the next `step` is the first (Euler) half of a Heun step.
    pub fn state_in_first_order(&self) -> bool {
        self.first_half.is_none()
    }
}

impl ConfiguredScheduler for FlowMatchHeunDiscreteScheduler {
    type Config = FlowMatchHeunDiscreteSchedulerConfig;

    fn from_config_file(file: ConfigFile<FlowMatchHeunDiscreteSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(FlowMatchHeunDiscreteSchedulerConfig::CLASS_NAME, e))?;
        let n = c.num_train_timesteps;
        let sigmas = train_flow_sigmas(n, Some(c.shift));
        let timesteps = sigmas
            .iter()
            .map(|&s| f64::from(s as f32 * n as f32))
            .collect();
        Ok(Self {
            sigma_max: sigmas[0],
            sigma_min: sigmas[n - 1],
            file,
            timesteps,
            sigmas,
            num_inference_steps: None,
            cursor: StepCursor::default(),
            first_half: None,
        })
    }

    fn config_file(&self) -> &ConfigFile<FlowMatchHeunDiscreteSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for FlowMatchHeunDiscreteScheduler {
    crate::scheduler::stateful_scheduler_accessors!(identity_input);

    fn order(&self) -> usize {
        2
    }

    /// Flow matching starts from unit Gaussian noise.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().num_train_timesteps
    }

    /// A step count.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let k = request
            .num_inference_steps
            .ok_or_else(|| Error::invalid_argument("num_inference_steps", "pass a step count"))?;
        if k == 0 {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let n = self.config().num_train_timesteps as f64;
        let shift = self.config().shift;
        // As diffusers: the (already shifted) training extremes, spaced and shifted again.
        let base: Vec<f32> = numpy_linspace(self.sigma_max * n, self.sigma_min * n, k)
            .into_iter()
            .map(|t| shift_flow_time(t / n, shift, false) as f32)
            .collect();
        let nf = n as f32;
        let mut timesteps = vec![f64::from(base[0] * nf)];
        let mut sigmas = vec![f64::from(base[0])];
        for &s in &base[1..] {
            timesteps.extend([f64::from(s * nf); 2]);
            sigmas.extend([f64::from(s); 2]);
        }
        sigmas.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.num_inference_steps = Some(k);
        self.cursor.reset();
        self.first_half = None;
        Ok(())
    }

    /// One half of a Heun step: the Euler prediction, or the correction averaging both
    /// derivatives. Takes `s_churn`, `s_tmin`, `s_tmax`, `s_noise` and, for churn, a
    /// `generator` or `variance_noise`.
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
        let first_order = self.first_half.is_none();
        if !first_order && i == 0 {
            return Err(Error::invalid_argument(
                "timestep",
                "the second half of a Heun step cannot be the first step",
            ));
        }
        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[i] as f32, self.sigmas[i + 1] as f32)
        } else {
            (self.sigmas[i - 1] as f32, self.sigmas[i] as f32)
        };
        let (sample, sigma_hat) = churn.apply(
            sample,
            sigma,
            self.sigmas.len() - 1,
            options.generator,
            options.variance_noise,
            class,
        )?;
        let prev_sample = match self.first_half.take() {
            None => {
                let denoised = sample.clone().sub(model_output.mul_scalar(sigma));
                let derivative = sample.clone().sub(denoised).div_scalar(sigma_hat);
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
                let denoised = sample.clone().sub(model_output.mul_scalar(sigma_next));
                let derivative = sample.sub(denoised).div_scalar(sigma_next);
                let derivative = first_derivative.add(derivative).mul_scalar(0.5);
                first_sample.add(derivative.mul_scalar(first.dt))
            }
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
        flow_scale_noise(
            &self.cursor,
            &self.timesteps,
            &self.sigmas,
            original,
            timesteps,
            noise,
        )
    }
}
