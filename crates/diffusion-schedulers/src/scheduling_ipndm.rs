//! The improved pseudo-numerical (fourth-order Adams–Bashforth) sampler of Zhang & Chen's
//! DEIS paper, on its own trigonometric schedule (diffusers' `schedulers/scheduling_ipndm.py`).
//!
//! The schedule is not a DDPM one: `sigma_i = sin(s_i pi / 2)^2` for `s` from 1 down to 0,
//! `alpha_i = sqrt(1 - sigma_i^2)`, and the timesteps are `atan2(sigma, alpha) 2 / pi` in
//! `[0, 1]`. diffusers keeps the sigmas in an attribute named `betas`.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops::{self, Stored};
use crate::schedule::torch_linspace_f32;
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{MissingTimestep, StepCursor, check_step_in_range};

/// The config of [`IPNDMScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IPNDMSchedulerConfig {
    /// Number of diffusion steps the model was trained with (and the schedule before
    /// `set_timesteps`).
    pub num_train_timesteps: usize,
    /// Explicit noise levels, one per step plus the final one (0 ends fully denoised). As in
    /// diffusers they replace the schedule whatever step count `set_timesteps` asks for: the
    /// schedule then has one step fewer than there are values.
    pub trained_betas: Option<Vec<f64>>,
}

impl Default for IPNDMSchedulerConfig {
    /// The `__init__` defaults of diffusers' `IPNDMScheduler` (schedulers/scheduling_ipndm.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            trained_betas: None,
        }
    }
}

impl Config for IPNDMSchedulerConfig {
    const CLASS_NAME: &'static str = "IPNDMScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        if self.num_train_timesteps == 0 {
            return Err(("num_train_timesteps".into(), "must be at least 1".into()));
        }
        if let Some(betas) = &self.trained_betas
            && (betas.len() < 2 || betas.iter().any(|b| !(0.0..=1.0).contains(b)))
        {
            // Past 1 diffusers' alphas are sqrt of a negative number (NaN).
            return Err((
                "trained_betas".into(),
                format!(
                    "need at least two noise levels (one step and the end), each in [0, 1]; \
                     got {betas:?}"
                ),
            ));
        }
        Ok(())
    }
}

/// The iPNDM sampler: a linear multistep method of up to fourth order on the noise
/// prediction, starting with lower orders while the history fills.
///
/// Stateful: the first `step` after `set_timesteps` finds its place from the timestep (or
/// [`Scheduler::set_begin_index`]); a timestep not in the schedule is refused. Like diffusers,
/// the scheduler starts with a schedule of `num_train_timesteps` steps. Deterministic: `step`
/// takes no options. [`Scheduler::sigmas`] is `None`: the noise levels are [`Self::betas`].
#[derive(Clone, Debug)]
pub struct IPNDMScheduler {
    file: ConfigFile<IPNDMSchedulerConfig>,
    betas: Vec<f64>,
    alphas: Vec<f64>,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    ets: Vec<Stored>,
    cursor: StepCursor,
}

impl IPNDMScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: IPNDMSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The noise level `sin(s pi / 2)^2` (or the config's `trained_betas`) of every step and
    /// of the end (diffusers' `betas`).
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// The signal level `sqrt(1 - beta^2)` of every step and of the end (diffusers'
    /// `alphas`).
    pub fn alphas(&self) -> &[f64] {
        &self.alphas
    }

    /// Build the schedule of `k` steps (or of the trained betas, whatever `k`), in float32 as
    /// torch does.
    fn build(&mut self, k: usize) {
        let half_pi = (std::f64::consts::PI / 2.0) as f32;
        let pi = std::f64::consts::PI as f32;
        let betas: Vec<f32> = match &self.file.config.trained_betas {
            Some(trained) => trained.iter().map(|&b| b as f32).collect(),
            None => {
                let mut steps = torch_linspace_f32(1.0, 0.0, k + 1);
                steps[k] = 0.0;
                steps
                    .iter()
                    .map(|&s| {
                        let b = (s * half_pi).sin();
                        b * b
                    })
                    .collect()
            }
        };
        let alphas: Vec<f32> = betas.iter().map(|&b| (1.0 - b * b).sqrt()).collect();
        self.timesteps = betas[..betas.len() - 1]
            .iter()
            .zip(&alphas)
            .map(|(&b, &a)| f64::from(b.atan2(a) / pi * 2.0))
            .collect();
        self.betas = betas.into_iter().map(f64::from).collect();
        self.alphas = alphas.into_iter().map(f64::from).collect();
        self.num_inference_steps = Some(k);
        self.ets.clear();
        self.cursor.reset();
    }
}

impl ConfiguredScheduler for IPNDMScheduler {
    type Config = IPNDMSchedulerConfig;

    fn from_config_file(file: ConfigFile<IPNDMSchedulerConfig>) -> Result<Self> {
        file.config
            .validate()
            .map_err(|e| config_error(IPNDMSchedulerConfig::CLASS_NAME, e))?;
        let n = file.config.num_train_timesteps;
        let mut scheduler = Self {
            file,
            betas: Vec::new(),
            alphas: Vec::new(),
            timesteps: Vec::new(),
            num_inference_steps: None,
            ets: Vec::new(),
            cursor: StepCursor::default(),
        };
        // diffusers' __init__ calls set_timesteps(num_train_timesteps).
        scheduler.build(n);
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<IPNDMSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for IPNDMScheduler {
    fn class_name(&self) -> &'static str {
        IPNDMSchedulerConfig::CLASS_NAME
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

    /// A step count (any positive number: the schedule does not depend on the training one).
    /// With `trained_betas` the schedule is those noise levels whatever the count, as in
    /// diffusers.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let k = request.step_count_only(self.class_name())?;
        self.build(k);
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

    /// One Adams–Bashforth step of order `min(step + 1, 4)`. Takes no options.
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
        let mut cursor = self.cursor.clone();
        let i = cursor.current(&self.timesteps, timestep, MissingTimestep::Error)?;
        check_step_in_range(i, &self.betas, class)?;
        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        // Float32 scalars, as diffusers holds them in float32 tensors.
        let (sigma, alpha) = (self.betas[i] as f32, self.alphas[i] as f32);
        let (next_sigma, next_alpha) = (self.betas[i + 1] as f32, self.alphas[i + 1] as f32);
        let newest = sample
            .clone()
            .mul_scalar(sigma)
            .add(model_output.mul_scalar(alpha));
        let mut history: Vec<Tensor<D>> = self
            .ets
            .iter()
            .map(Stored::get::<D>)
            .collect::<Result<_>>()?;
        if let Some(previous) = history.last() {
            ops::check_same_shape(previous, &newest, "sample", "the previous sample")?;
        }
        history.push(newest.clone());
        let e = |back: usize| history[history.len() - 1 - back].clone();
        let ets = match history.len() {
            1 => e(0),
            2 => e(0).mul_scalar(3.0).sub(e(1)).div_scalar(2.0),
            3 => e(0)
                .mul_scalar(23.0)
                .sub(e(1).mul_scalar(16.0))
                .add(e(2).mul_scalar(5.0))
                .div_scalar(12.0),
            _ => e(0)
                .mul_scalar(55.0)
                .sub(e(1).mul_scalar(59.0))
                .add(e(2).mul_scalar(37.0))
                .sub(e(3).mul_scalar(9.0))
                .mul_scalar((1.0f64 / 24.0) as f32),
        };
        let pred = sample
            .sub(ets.clone().mul_scalar(sigma))
            .div_scalar(alpha.max(1e-8));
        let prev_sample = pred.mul_scalar(next_alpha).add(ets.mul_scalar(next_sigma));
        // Only the last four outputs are ever used.
        self.ets.push(Stored::new(&newest));
        if self.ets.len() > 4 {
            self.ets.remove(0);
        }
        cursor.advance();
        self.cursor = cursor;
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: None,
        })
    }

    /// diffusers' IPNDM has no forward process; this refuses.
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        let _ = (original, noise, timesteps);
        Err(Error::invalid_argument(
            "add_noise",
            "IPNDMScheduler has no forward process (diffusers defines no add_noise for it)",
        ))
    }
}
