//! DPM-Solver-2 in the form of Karras et al. (2022) and k-diffusion's `sample_dpm_2`
//! (diffusers' `schedulers/scheduling_k_dpm_2_discrete.py`; A1111's "DPM2" and
//! "DPM2 Karras"), and the interleaved schedule it shares with the ancestral variant.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops::{self, Stored};
use crate::schedule::{self, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{self, MissingTimestep, StepCursor, check_step_in_range, float_timesteps};

/// The config of [`KDPM2DiscreteScheduler`] (and, wrapped, of
/// [`crate::KDPM2AncestralDiscreteScheduler`]), key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KDPM2DiscreteSchedulerConfig {
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
    /// Use the Karras et al. noise levels.
    pub use_karras_sigmas: bool,
    /// Use noise levels evenly spaced in log-sigma.
    pub use_exponential_sigmas: bool,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: bool,
    /// What the model predicts (`epsilon` or `v_prediction`).
    pub prediction_type: PredictionType,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
}

impl Default for KDPM2DiscreteSchedulerConfig {
    /// The `__init__` defaults of diffusers' `KDPM2DiscreteScheduler` and
    /// `KDPM2AncestralDiscreteScheduler` (schedulers/scheduling_k_dpm_2_discrete.py,
    /// scheduling_k_dpm_2_ancestral_discrete.py); note the Stable Diffusion betas on a linear
    /// schedule.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl KDPM2DiscreteSchedulerConfig {
    /// The checks both KDPM2 classes share, with `class` in messages.
    pub(crate) fn check(&self, class: &str) -> std::result::Result<(), (String, String)> {
        use BetaSchedule::*;
        if self.trained_betas.is_none() {
            schedule::check_allowed(
                class,
                "beta_schedule",
                self.beta_schedule,
                &[Linear, ScaledLinear, SquaredcosCapV2],
                BetaSchedule::as_str,
            )?;
        }
        // diffusers raises NotImplementedError for `sample` at the first step.
        schedule::check_allowed(
            class,
            "prediction_type",
            self.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            PredictionType::as_str,
        )?;
        sigmas::check_one_respacing(
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        )?;
        schedule::check_common(self.num_train_timesteps, false, 0.0, 1.0, false, 0.0)
    }

    /// The training schedule with its sigma table and log-sigmas.
    pub(crate) fn tables(&self) -> Result<(NoiseSchedule, Vec<f32>, Vec<f32>)> {
        let schedule = crate::scheduler::noise_schedule_of!(self, false)?;
        let sigma_table = sigmas::sigma_table(&schedule, false);
        let log_sigmas = sigma_table.iter().map(|s| s.ln()).collect();
        Ok((schedule, sigma_table, log_sigmas))
    }

    /// The inference sigmas `s_0 > ... > s_{k-1}` and their timesteps, as diffusers'
    /// `set_timesteps` builds them before interleaving from its float32 `timesteps`: sigmas read
    /// off the table, or Karras (timesteps rounded) / exponential / beta sigmas between the
    /// first and last of them, mapped back to fractional timesteps.
    pub(crate) fn base_schedule(
        &self,
        timesteps: Vec<f64>,
        sigma_table: &[f32],
        log_sigmas: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let k = timesteps.len();
        let read: Vec<f64> = timesteps
            .iter()
            .map(|&t| sigmas::interp_on_grid(t, sigma_table))
            .collect();
        let (lo, hi) = (read[k - 1], read[0]);
        let to_t = |s: &f64| sigmas::sigma_to_t(*s, log_sigmas);
        if self.use_karras_sigmas {
            let s = sigmas::karras_sigmas(lo, hi, k);
            (s.iter().map(to_t).map(f64::round_ties_even).collect(), s)
        } else if self.use_exponential_sigmas {
            let s = sigmas::exponential_sigmas(lo, hi, k);
            (s.iter().map(to_t).collect(), s)
        } else if self.use_beta_sigmas {
            let s = sigmas::beta_sigmas(lo, hi, k);
            (s.iter().map(to_t).collect(), s)
        } else {
            (timesteps, read)
        }
    }
}

impl Config for KDPM2DiscreteSchedulerConfig {
    const CLASS_NAME: &'static str = "KDPM2DiscreteScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        self.check(Self::CLASS_NAME)
    }
}

/// `[x_0, x_1, x_1, ..., x_{n-1}, x_{n-1}, x_{n-1}]`: diffusers' layout of per-evaluation
/// values (`cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`).
pub(crate) fn interleave(x: &[f32]) -> Vec<f64> {
    let mut out = Vec::with_capacity(2 * x.len());
    out.push(f64::from(x[0]));
    for &v in &x[1..] {
        out.extend([f64::from(v), f64::from(v)]);
    }
    out.push(f64::from(x[x.len() - 1]));
    out
}

/// `exp(lerp(ln a, ln b, 0.5))` in float32 as torch's `lerp` computes it at weight 0.5
/// (`end - (end - start) * 0.5`): the geometric mean of two noise levels.
pub(crate) fn log_midpoint(a: f32, b: f32) -> f32 {
    let (start, end) = (a.ln(), b.ln());
    (end - (end - start) * 0.5).exp()
}

/// diffusers' `_sigma_to_t` for a float32 sigma out of a torch tensor: the arithmetic then
/// runs on float32 tensors throughout, the result too (checked against diffusers in
/// gen_schedulers_more.py's fixtures).
pub(crate) fn sigma_to_t_f32(sigma: f32, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    let log_sigma = sigma.max(1e-10).ln();
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    f64::from((1.0 - w) * low_idx as f32 + w * (low_idx + 1) as f32)
}

/// The first evaluation of a two-evaluation step, kept for the second.
#[derive(Clone, Debug)]
pub(crate) struct FirstEvaluation {
    pub sample: Stored,
}

/// DPM-Solver-2: every step but the last evaluates the model twice, first at the current
/// noise level, then at the geometric mean of it and the next one, so the schedule lists
/// `2k - 1` timesteps (`order` is 2).
///
/// Stateful like Heun: the first `scale_model_input` or `step` after `set_timesteps` finds
/// its place from the timestep (or [`Scheduler::set_begin_index`]). Before `set_timesteps`
/// the schedule is every training timestep, as in diffusers. `step` takes no options.
#[derive(Clone, Debug)]
pub struct KDPM2DiscreteScheduler {
    file: ConfigFile<KDPM2DiscreteSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
    first: Option<FirstEvaluation>,
}

impl KDPM2DiscreteScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: KDPM2DiscreteSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Whether the next `step` is the first evaluation of a DPM-Solver-2 step.
    pub fn state_in_first_order(&self) -> bool {
        self.first.is_none()
    }

    /// The interpolated noise levels, one per evaluation like [`Scheduler::sigmas`].
    pub fn sigmas_interpol(&self) -> &[f64] {
        &self.sigmas_interpol
    }

    fn build(&mut self, timesteps: Vec<f64>) -> Result<()> {
        let c = self.config().clone();
        let k = timesteps.len();
        let (timesteps, base) = c.base_schedule(timesteps, &self.sigma_table, &self.log_sigmas);
        let mut s: Vec<f32> = base.iter().map(|&s| s as f32).collect();
        s.push(0.0);
        // Geometric means with the previous level; entry 0 (with the final 0) is never read.
        let interpol: Vec<f32> = (0..s.len())
            .map(|i| {
                if i == 0 {
                    s[0]
                } else {
                    log_midpoint(s[i], s[i - 1])
                }
            })
            .collect();
        let mut ts = vec![timesteps[0]];
        for i in 1..k {
            ts.extend([sigma_to_t_f32(interpol[i], &self.log_sigmas), timesteps[i]]);
        }
        self.timesteps = ts;
        self.sigmas = interleave(&s);
        self.sigmas_interpol = interleave(&interpol);
        self.cursor.reset();
        self.first = None;
        Ok(())
    }
}

impl ConfiguredScheduler for KDPM2DiscreteScheduler {
    type Config = KDPM2DiscreteSchedulerConfig;

    fn from_config_file(file: ConfigFile<KDPM2DiscreteSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(KDPM2DiscreteSchedulerConfig::CLASS_NAME, e))?;
        let (schedule, sigma_table, log_sigmas) = c.tables()?;
        let init = sigmas::train_float_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            c.steps_offset,
        );
        let mut scheduler = Self {
            file,
            schedule,
            sigma_table,
            log_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            sigmas_interpol: Vec::new(),
            num_inference_steps: None,
            cursor: StepCursor::default(),
            first: None,
        };
        // diffusers' __init__ calls set_timesteps(num_train_timesteps).
        scheduler.build(init)?;
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<KDPM2DiscreteSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for KDPM2DiscreteScheduler {
    crate::scheduler::stateful_scheduler_accessors!();

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        sigmas::euler_init_noise_sigma(&self.sigmas, self.config().timestep_spacing)
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
        let c = &self.config();
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
        let sigma = if self.first.is_none() {
            self.sigmas.get(i)
        } else {
            self.sigmas_interpol.get(i)
        };
        let sigma = *sigma
            .ok_or_else(|| Error::invalid_argument("timestep", "the schedule has no sigma left"))?;
        Ok(sigmas::scale_by_sigma(sample, sigma))
    }

    /// One evaluation of a DPM-Solver-2 step: an Euler step to the midpoint noise level, or
    /// the full step with the midpoint's derivative. Takes no options.
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
        let (sigma, sigma_interpol, sigma_next) = if first_order {
            (
                self.sigmas[i],
                self.sigmas_interpol[i + 1],
                self.sigmas[i + 1],
            )
        } else {
            (self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i])
        };
        let (sigma, sigma_interpol, sigma_next) =
            (sigma as f32, sigma_interpol as f32, sigma_next as f32);
        let sigma_input = if first_order { sigma } else { sigma_interpol };
        let pred_original = kdpm2_x0(
            self.config().prediction_type,
            model_output,
            &sample,
            sigma_input,
        );
        let derivative = sample
            .clone()
            .sub(pred_original.clone())
            .div_scalar(sigma_input);
        let prev_sample = match self.first.take() {
            None => {
                self.first = Some(FirstEvaluation {
                    sample: Stored::new(&sample),
                });
                sample.add(derivative.mul_scalar(sigma_interpol - sigma))
            }
            Some(first) => {
                let first_sample = first.sample.get::<D>()?;
                ops::check_same_shape(&first_sample, &sample, "sample", "the first sample")?;
                first_sample.add(derivative.mul_scalar(sigma_next - sigma))
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

/// `x_0` from the model output at noise level `sigma` (float32 scalars, diffusers' order).
pub(crate) fn kdpm2_x0<const D: usize>(
    prediction: PredictionType,
    model_output: Tensor<D>,
    sample: &Tensor<D>,
    sigma: f32,
) -> Tensor<D> {
    match prediction {
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model_output
                .mul_scalar(-sigma / s2.sqrt())
                .add(sample.clone().div_scalar(s2))
        }
        // validate admits only epsilon and v_prediction.
        _ => sample.clone().sub(model_output.mul_scalar(sigma)),
    }
}
