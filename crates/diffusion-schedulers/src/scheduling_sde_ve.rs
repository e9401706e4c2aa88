//! The variance-exploding SDE sampler of score-based generative models (Song et al. 2021;
//! diffusers' `schedulers/scheduling_sde_ve.py`, `ScoreSdeVeScheduler`): a reverse-diffusion
//! predictor ([`ScoreSdeVeScheduler::step_pred`], also [`Scheduler::step`]) and a Langevin
//! corrector ([`ScoreSdeVeScheduler::step_correct`]), both on a score model.
//!
//! As in diffusers, `set_timesteps` only sets the continuous timesteps in `[sampling_eps, 1]`;
//! [`ScoreSdeVeScheduler::set_sigmas`] sets the noise levels (diffusers' pipeline calls both,
//! in that order).

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops;
use crate::schedule::torch_linspace_f32;
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};

/// The config of [`ScoreSdeVeScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScoreSdeVeSchedulerConfig {
    /// The number of noise levels before `set_timesteps` / `set_sigmas`.
    pub num_train_timesteps: usize,
    /// The signal-to-noise ratio that sizes the corrector's Langevin steps.
    pub snr: f64,
    /// The smallest noise level.
    pub sigma_min: f64,
    /// The largest noise level.
    pub sigma_max: f64,
    /// The last continuous timestep (the first is 1).
    pub sampling_eps: f64,
    /// How many corrector steps a pipeline takes per predictor step.
    pub correct_steps: usize,
}

impl Default for ScoreSdeVeSchedulerConfig {
    /// The `__init__` defaults of diffusers' `ScoreSdeVeScheduler`
    /// (schedulers/scheduling_sde_ve.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 2000,
            snr: 0.15,
            sigma_min: 0.01,
            sigma_max: 1348.0,
            sampling_eps: 1e-5,
            correct_steps: 1,
        }
    }
}

impl Config for ScoreSdeVeSchedulerConfig {
    const CLASS_NAME: &'static str = "ScoreSdeVeScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        for (name, v) in [
            ("sigma_min", self.sigma_min),
            ("sigma_max", self.sigma_max),
            ("sampling_eps", self.sampling_eps),
        ] {
            if !positive(v) {
                return Err((name.into(), format!("{v} must be positive")));
            }
        }
        if self.sigma_min >= self.sigma_max {
            return Err(("sigma_min".into(), "must be below sigma_max".into()));
        }
        if !self.snr.is_finite() {
            return Err(("snr".into(), format!("{} is not finite", self.snr)));
        }
        if self.num_train_timesteps == 0 {
            return Err(("num_train_timesteps".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// What [`ScoreSdeVeScheduler::step_pred`] returns.
#[derive(Clone, Debug)]
pub struct SdeVeOutput<const D: usize> {
    /// The sample at the next (less noisy) timestep, with the step's fresh noise.
    pub prev_sample: Tensor<D>,
    /// The same without the noise (diffusers' pipeline returns the last one as the image).
    pub prev_sample_mean: Tensor<D>,
}

/// The score-SDE (VE) predictor-corrector sampler.
///
/// Stateless between steps: the noise level of a step comes from its continuous timestep `t`
/// in `[0, 1]` (`discrete_sigmas[trunc(t * (k - 1))]`, `k` the number of timesteps). Both
/// steps draw noise from the generator (or `variance_noise`). The model takes the per-step
/// noise level [`Scheduler::sigmas`]`[i]` as its conditioning, not the timestep.
#[derive(Clone, Debug)]
pub struct ScoreSdeVeScheduler {
    file: ConfigFile<ScoreSdeVeSchedulerConfig>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    discrete_sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
}

impl ScoreSdeVeScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: ScoreSdeVeSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// diffusers' `set_sigmas`: the noise level `sigma_min * (sigma_max / sigma_min)^t` of each
    /// current timestep, and `num_inference_steps` log-spaced discrete noise levels for the
    /// predictor (float32).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `num_inference_steps` for 0.
    pub fn set_sigmas(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                "pass a step count of at least 1",
            ));
        }
        let c = self.config();
        let (sigma_min, sigma_max) = (c.sigma_min, c.sigma_max);
        let ratio = (sigma_max / sigma_min) as f32;
        self.sigmas = self
            .timesteps
            .iter()
            .map(|&t| f64::from(sigma_min as f32 * ratio.powf(t as f32)))
            .collect();
        self.discrete_sigmas =
            torch_linspace_f32(sigma_min.ln(), sigma_max.ln(), num_inference_steps)
                .into_iter()
                .map(f32::exp)
                .collect();
        Ok(())
    }

    /// The discrete noise levels the predictor steps between.
    pub fn discrete_sigmas(&self) -> &[f32] {
        &self.discrete_sigmas
    }

    /// The predictor: one reverse-diffusion step of the VE SDE from continuous timestep
    /// `timestep`, with the score `model_output`.
    ///
    /// # Shapes
    /// `model_output`, `sample`: `[B, ...]`; both outputs are shaped like `sample`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for mismatched shapes, a timestep whose index falls outside
    /// the discrete noise levels, an option other than `generator` / `variance_noise`, or no
    /// noise source.
    pub fn step_pred<const D: usize>(
        &self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<SdeVeOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &["generator", "variance_noise"])?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        // (timestep * (len - 1)).long() in float32: truncation towards zero.
        let scaled = timestep as f32 * (self.timesteps.len().saturating_sub(1)) as f32;
        let index = scaled.trunc();
        if !(index >= 0.0 && (index as usize) < self.discrete_sigmas.len()) {
            return Err(Error::invalid_argument(
                "timestep",
                format!(
                    "{timestep} maps to noise level {index}, outside the {} discrete levels",
                    self.discrete_sigmas.len()
                ),
            ));
        }
        let index = index as usize;
        let sigma = self.discrete_sigmas[index];
        let adjacent = if index == 0 {
            0.0
        } else {
            self.discrete_sigmas[index - 1]
        };
        let diffusion = (sigma * sigma - adjacent * adjacent).sqrt();
        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let sample = sample.cast(FloatDType::F32);
        let noise = ops::noise_like(&sample, options.generator, options.variance_noise, class)?
            .cast(FloatDType::F32);
        // drift = -g^2 * score; the mean subtracts it (dt is negative).
        let drift = model_output
            .cast(FloatDType::F32)
            .mul_scalar(diffusion * diffusion)
            .neg();
        let prev_sample_mean = sample.sub(drift);
        let prev_sample = prev_sample_mean.clone().add(noise.mul_scalar(diffusion));
        Ok(SdeVeOutput {
            prev_sample: prev_sample.cast(out_dtype),
            prev_sample_mean: prev_sample_mean.cast(out_dtype),
        })
    }

    /// The corrector: one Langevin step with the step size set by `snr` from the mean
    /// per-sample norms of the score and of the fresh noise.
    ///
    /// # Shapes
    /// `model_output`, `sample`: `[B, ...]`; the result is shaped like `sample`.
    ///
    /// # Errors
    /// As [`Self::step_pred`], without the timestep.
    pub fn step_correct<const D: usize>(
        &self,
        model_output: Tensor<D>,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<Tensor<D>> {
        let class = self.class_name();
        options.accept_only(class, &["generator", "variance_noise"])?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        if D < 1 || sample.dims()[0] == 0 {
            return Err(Error::invalid_argument(
                "sample",
                "the corrector needs a non-empty batch",
            ));
        }
        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        let noise = ops::noise_like(&sample, options.generator, options.variance_noise, class)?
            .cast(FloatDType::F32);
        let grad_norm = mean_row_norm(&model_output);
        let noise_norm = mean_row_norm(&noise);
        let ratio = noise_norm
            .mul_scalar(self.config().snr as f32)
            .div(grad_norm);
        let step_size: Tensor<D> = ratio
            .clone()
            .mul(ratio)
            .mul_scalar(2.0)
            .reshape([1usize; D]);
        let prev_sample_mean = sample.add(model_output.mul(step_size.clone()));
        let prev_sample = prev_sample_mean.add(noise.mul(step_size.mul_scalar(2.0).sqrt()));
        Ok(prev_sample.cast(out_dtype))
    }
}

/// The mean over the batch of the L2 norm of each sample (`torch.norm(x.reshape(B, -1),
/// dim=-1).mean()`), as a one-element tensor.
fn mean_row_norm<const D: usize>(t: &Tensor<D>) -> Tensor<1> {
    let dims = t.dims();
    let batch = dims[0];
    let per_sample: usize = dims[1..].iter().product();
    let flat: Tensor<2> = t.clone().reshape([batch, per_sample]);
    flat.clone()
        .mul(flat)
        .sum_dim(1)
        .sqrt()
        .mean()
        .reshape([1usize])
}

impl ConfiguredScheduler for ScoreSdeVeScheduler {
    type Config = ScoreSdeVeSchedulerConfig;

    fn from_config_file(file: ConfigFile<ScoreSdeVeSchedulerConfig>) -> Result<Self> {
        file.config
            .validate()
            .map_err(|e| config_error(ScoreSdeVeSchedulerConfig::CLASS_NAME, e))?;
        let n = file.config.num_train_timesteps;
        let mut scheduler = Self {
            file,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            discrete_sigmas: Vec::new(),
            num_inference_steps: None,
        };
        // diffusers' __init__: set_sigmas(num_train_timesteps), which sets the timesteps first.
        scheduler.set_timesteps(n)?;
        scheduler.num_inference_steps = None;
        scheduler.set_sigmas(n)?;
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<ScoreSdeVeSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for ScoreSdeVeScheduler {
    fn class_name(&self) -> &'static str {
        ScoreSdeVeSchedulerConfig::CLASS_NAME
    }

    fn config_value(&self) -> serde_json::Value {
        self.file.to_value()
    }

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

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// A step count: `k` continuous timesteps from 1 down to `sampling_eps` (float32). The
    /// noise levels are left as they were; call [`ScoreSdeVeScheduler::set_sigmas`] too.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let k = request.step_count_only(self.class_name())?;
        self.timesteps = torch_linspace_f32(1.0, self.config().sampling_eps, k)
            .into_iter()
            .map(f64::from)
            .collect();
        self.num_inference_steps = Some(k);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The noise level of each timestep as of the last `set_sigmas` (the model's
    /// conditioning).
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    /// The identity.
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        _timestep: f64,
    ) -> Result<Tensor<D>> {
        Ok(sample)
    }

    /// The predictor step ([`ScoreSdeVeScheduler::step_pred`]); `pred_original_sample` is
    /// `None`.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let out = self.step_pred(model_output, timestep, sample, options)?;
        Ok(StepOutput {
            prev_sample: out.prev_sample,
            pred_original_sample: None,
        })
    }

    /// `original + discrete_sigmas[t] * noise`, where the timesteps are integer indices into
    /// the discrete noise levels (as diffusers indexes them).
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        ops::check_same_shape(&noise, &original, "noise", "original_samples")?;
        let sigma = timesteps
            .iter()
            .map(|&t| {
                let valid =
                    t.fract() == 0.0 && t >= 0.0 && (t as usize) < self.discrete_sigmas.len();
                if valid {
                    Ok(f64::from(self.discrete_sigmas[t as usize]))
                } else {
                    Err(Error::invalid_argument(
                        "timesteps",
                        format!(
                            "{t} is not an index into the {} discrete noise levels",
                            self.discrete_sigmas.len()
                        ),
                    ))
                }
            })
            .collect::<Result<Vec<f64>>>()?;
        let sigma = ops::batch_coefficients(&sigma, &original)?;
        Ok(noise.mul(sigma).add(original))
    }
}
