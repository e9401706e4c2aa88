//! PNDM: the pseudo numerical methods of "Pseudo Numerical Methods for Diffusion Models on
//! Manifolds" (Liu et al., 2022): four Runge-Kutta steps (PRK) to warm up, then the linear
//! multistep method (PLMS). diffusers' `schedulers/scheduling_pndm.py`.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops::{self, Stored};
use crate::schedule::{
    self, BetaConfig, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing,
};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};

/// The config of [`PNDMScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PNDMSchedulerConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the schedule.
    pub beta_start: f64,
    /// Last beta of the schedule.
    pub beta_end: f64,
    /// Shape of the beta schedule.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Skip the Runge-Kutta warm-up and start with PLMS (Stable Diffusion's setting).
    pub skip_prk_steps: bool,
    /// Whether the step past the last timestep goes to `alpha_bar = 1` (true) or to
    /// `alphas_cumprod[0]` (false).
    pub set_alpha_to_one: bool,
    /// What the model predicts (`epsilon` or `v_prediction`).
    pub prediction_type: PredictionType,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
}

impl Default for PNDMSchedulerConfig {
    /// The `__init__` defaults of diffusers' `PNDMScheduler` (schedulers/scheduling_pndm.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

impl Config for PNDMSchedulerConfig {
    const CLASS_NAME: &'static str = "PNDMScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        use BetaSchedule::*;
        if self.trained_betas.is_none() {
            schedule::check_allowed(
                Self::CLASS_NAME,
                "beta_schedule",
                self.beta_schedule,
                &[Linear, ScaledLinear, SquaredcosCapV2],
                BetaSchedule::as_str,
            )?;
        }
        schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            PredictionType::as_str,
        )?;
        schedule::check_common(self.num_train_timesteps, false, 0.0, 1.0, false, 0.0)
    }
}

/// The PNDM sampler, the scheduler A1111 calls "PLMS" (with `skip_prk_steps`).
///
/// Stateful, like diffusers': `step` counts its calls since `set_timesteps` and picks the
/// Runge-Kutta or multistep update from that count, not from the timestep. Without
/// `skip_prk_steps` the schedule starts with 12 Runge-Kutta evaluations over the noisiest three
/// intervals (each timestep appears more than once); with it, the second timestep is repeated
/// for the two-evaluation Heun-like start of PLMS.
///
/// diffusers' `trailing` spacing makes one timestep too many (a `-1`) for some step counts
/// (`np.arange` overshoot, as in DDPM); here the schedule keeps the requested count.
#[derive(Clone, Debug)]
pub struct PNDMScheduler {
    file: ConfigFile<PNDMSchedulerConfig>,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    prk_timesteps: Vec<i64>,
    num_inference_steps: Option<usize>,
    counter: usize,
    ets: Vec<Stored>,
    // Boxed: a stored tensor is large next to the other schedulers in `AnyScheduler`.
    cur_model_output: Option<Box<Stored>>,
    cur_sample: Option<Box<Stored>>,
}

impl PNDMScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: PNDMSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// `alpha_bar` used past the last timestep.
    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
    }

    /// The number of `step` calls since `set_timesteps` (diffusers' `counter`).
    pub fn counter(&self) -> usize {
        self.counter
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        if t >= 0 {
            Ok(self.schedule.alpha_cumprod_at(t as f64)? as f32)
        } else {
            Ok(self.final_alpha_cumprod as f32)
        }
    }

    /// Formula (9) of the PNDM paper (diffusers' `_get_prev_sample`), with float32 scalars as
    /// diffusers computes them on 0-d tensors.
    fn prev_sample<const D: usize>(
        &self,
        sample: Tensor<D>,
        timestep: i64,
        prev_timestep: i64,
        model_output: Tensor<D>,
    ) -> Result<Tensor<D>> {
        if timestep < 0 {
            return Err(Error::invalid_argument(
                "timestep",
                format!("{timestep} is not a training timestep"),
            ));
        }
        let alpha_t = self.alpha_at(timestep)?;
        let alpha_prev = self.alpha_at(prev_timestep)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let model_output = match self.config().prediction_type {
            PredictionType::Epsilon => model_output,
            PredictionType::VPrediction => model_output
                .mul_scalar(alpha_t.sqrt())
                .add(sample.clone().mul_scalar(beta_t.sqrt())),
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("PNDMScheduler does not support {}", other.as_str()),
                ));
            }
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        Ok(sample.mul_scalar(sample_coeff).sub(
            model_output
                .mul_scalar(alpha_prev - alpha_t)
                .div_scalar(denom),
        ))
    }

    fn step_ratio(&self) -> Result<i64> {
        let k = self.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                "PNDMScheduler.step was called before set_timesteps",
            )
        })?;
        Ok((self.config().num_train_timesteps / k) as i64)
    }

    /// One of the four evaluations of a Runge-Kutta step (diffusers' `step_prk`).
    fn step_prk<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: i64,
        sample: Tensor<D>,
    ) -> Result<Tensor<D>> {
        let half = self.step_ratio()? / 2;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_timestep = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let sixth = (1.0f64 / 6.0) as f32;
        let third = (1.0f64 / 3.0) as f32;
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(Box::new(Stored::new(
                    &model_output.clone().mul_scalar(sixth),
                )));
                self.ets.push(Stored::new(&model_output));
                self.cur_sample = Some(Box::new(Stored::new(&sample)));
                model_output
            }
            1 | 2 => {
                let acc = self.accumulated::<D>()?;
                self.cur_model_output = Some(Box::new(Stored::new(
                    &acc.add(model_output.clone().mul_scalar(third)),
                )));
                model_output
            }
            _ => {
                let acc = self.accumulated::<D>()?;
                self.cur_model_output = None;
                acc.add(model_output.mul_scalar(sixth))
            }
        };
        let cur_sample = match &self.cur_sample {
            Some(s) => s.get::<D>()?,
            None => sample,
        };
        self.prev_sample(cur_sample, t, prev_timestep, model_output)
    }

    fn accumulated<const D: usize>(&self) -> Result<Tensor<D>> {
        self.cur_model_output
            .as_ref()
            .ok_or_else(|| {
                Error::invalid_argument("timestep", "the Runge-Kutta step lost its accumulator")
            })?
            .get::<D>()
    }

    /// One linear multistep update (diffusers' `step_plms`).
    fn step_plms<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: i64,
        sample: Tensor<D>,
    ) -> Result<Tensor<D>> {
        let ratio = self.step_ratio()?;
        if !self.config().skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::invalid_argument(
                "timestep",
                "PNDMScheduler runs PLMS only after 12 Runge-Kutta evaluations",
            ));
        }
        let (mut timestep, mut prev_timestep) = (timestep, timestep - ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(Stored::new(&model_output));
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }
        let e = |i: usize| -> Result<Tensor<D>> { self.ets[self.ets.len() - i].get::<D>() };
        let mut sample = sample;
        let model_output = match (self.ets.len(), self.counter) {
            (1, 0) => {
                self.cur_sample = Some(Box::new(Stored::new(&sample)));
                model_output
            }
            (1, 1) => {
                let averaged = model_output.add(e(1)?).div_scalar(2.0);
                sample = self
                    .cur_sample
                    .take()
                    .ok_or_else(|| {
                        Error::invalid_argument("timestep", "PLMS lost its first sample")
                    })?
                    .get::<D>()?;
                averaged
            }
            (2, _) => e(1)?.mul_scalar(3.0).sub(e(2)?).div_scalar(2.0),
            (3, _) => e(1)?
                .mul_scalar(23.0)
                .sub(e(2)?.mul_scalar(16.0))
                .add(e(3)?.mul_scalar(5.0))
                .div_scalar(12.0),
            (1, _) => {
                return Err(Error::invalid_argument(
                    "timestep",
                    "PLMS has a single model output past its first two evaluations",
                ));
            }
            _ => e(1)?
                .mul_scalar(55.0)
                .sub(e(2)?.mul_scalar(59.0))
                .add(e(3)?.mul_scalar(37.0))
                .sub(e(4)?.mul_scalar(9.0))
                .mul_scalar((1.0f64 / 24.0) as f32),
        };
        self.prev_sample(sample, timestep, prev_timestep, model_output)
    }
}

impl ConfiguredScheduler for PNDMScheduler {
    type Config = PNDMSchedulerConfig;

    fn from_config_file(file: ConfigFile<PNDMSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(PNDMSchedulerConfig::CLASS_NAME, e))?;
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: c.num_train_timesteps,
            beta_start: c.beta_start,
            beta_end: c.beta_end,
            beta_schedule: c.beta_schedule,
            trained_betas: c.trained_betas.as_deref(),
            rescale_betas_zero_snr: false,
        })?;
        let final_alpha_cumprod = if c.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            file,
            schedule,
            final_alpha_cumprod,
            // diffusers' `timesteps` is None before set_timesteps.
            timesteps: Vec::new(),
            prk_timesteps: Vec::new(),
            num_inference_steps: None,
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    fn config_file(&self) -> &ConfigFile<PNDMSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for PNDMScheduler {
    crate::scheduler::unit_noise_basics!(with_state);

    fn class_name(&self) -> &'static str {
        PNDMSchedulerConfig::CLASS_NAME
    }

    /// Evenly spaced steps per `timestep_spacing`; PNDM takes no custom timesteps. Without
    /// `skip_prk_steps` at least 4 steps are needed (diffusers fails on fewer).
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let k = request.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument("num_inference_steps", "PNDMScheduler needs a step count")
        })?;
        let c = self.config().clone();
        let n = c.num_train_timesteps;
        if !c.skip_prk_steps && k < 4 {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                format!(
                    "{k} is too few for the 4-step Runge-Kutta warm-up; use at least 4 or set \
                     skip_prk_steps"
                ),
            ));
        }
        let mut ascending = schedule::spaced_timesteps(c.timestep_spacing, n, k, c.steps_offset)?;
        ascending.reverse();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if c.skip_prk_steps {
            let mut plms: Vec<i64> = ascending[..k - 1].to_vec();
            if k >= 2 {
                plms.push(ascending[k - 2]);
            }
            plms.push(ascending[k - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            let half = (n / k / 2) as i64;
            let last: Vec<i64> = ascending[k - 4..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let mut prk: Vec<i64> = last[..last.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            prk = prk[1..prk.len() - 1].to_vec();
            prk.reverse();
            let mut plms = ascending[..k - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.timesteps = prk.iter().chain(&plms).map(|&t| t as f64).collect();
        self.prk_timesteps = prk;
        self.num_inference_steps = Some(k);
        self.counter = 0;
        self.ets.clear();
        self.cur_model_output = None;
        self.cur_sample = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step_index(&self) -> Option<usize> {
        (self.num_inference_steps.is_some() && self.counter > 0).then_some(self.counter)
    }

    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        _timestep: f64,
    ) -> Result<Tensor<D>> {
        Ok(sample)
    }

    /// One evaluation: Runge-Kutta for the first `len(prk_timesteps)` calls (unless
    /// `skip_prk_steps`), PLMS after. Takes no options and returns no `pred_original_sample`.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        options.accept_only(self.class_name(), &[])?;
        self.step_ratio()?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        if self.counter >= self.timesteps.len() {
            return Err(Error::invalid_argument(
                "timestep",
                format!(
                    "PNDMScheduler has already taken all {} steps of its schedule; call \
                     set_timesteps to start again",
                    self.timesteps.len()
                ),
            ));
        }
        let t = self.schedule.index_of(timestep, "timestep")? as i64;
        if let Some(stored) = self.ets.first()
            && stored.dims() != sample.dims().as_slice()
        {
            return Err(Error::invalid_argument(
                "sample",
                format!(
                    "has shape {:?} but earlier steps had {:?}",
                    sample.dims(),
                    stored.dims()
                ),
            ));
        }
        let prev_sample =
            if self.counter < self.prk_timesteps.len() && !self.config().skip_prk_steps {
                self.step_prk(model_output, t, sample)?
            } else {
                self.step_plms(model_output, t, sample)?
            };
        self.counter += 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: None,
        })
    }

    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        let alphas: Vec<f64> = timesteps
            .iter()
            .map(|&t| self.schedule.alpha_cumprod_at(t))
            .collect::<Result<_>>()?;
        ops::add_noise_with(&alphas, original, noise)
    }
}
