//! DPM-Solver++ (SDE), k-diffusion's `sample_dpmpp_sde` (diffusers'
//! `schedulers/scheduling_dpmsolver_sde.py`; A1111's "DPM++ SDE"), with its noise drawn from
//! torchsde's Brownian tree.

use diffusion_core::burn::tensor::{DType, FloatDType, Tensor, TensorData};
use diffusion_core::{Config, ConfigFile, Error, NoiseSource, Result};
use serde::{Deserialize, Serialize};

use crate::brownian_tree::BrownianTreeNoiseSampler as NoiseSampler;
use crate::ops::{self, Stored};
use crate::schedule::{self, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{self, MissingTimestep, StepCursor, check_step_in_range, float_timesteps};

/// The config of [`DPMSolverSDEScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DPMSolverSDESchedulerConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta of the schedule.
    pub beta_start: f64,
    /// Last beta of the schedule.
    pub beta_end: f64,
    /// Shape of the beta schedule (`linear`, `scaled_linear` or `squaredcos_cap_v2`).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts (`epsilon` or `v_prediction`).
    pub prediction_type: PredictionType,
    /// Use the Karras et al. noise levels.
    pub use_karras_sigmas: bool,
    /// Use noise levels evenly spaced in log-sigma.
    pub use_exponential_sigmas: bool,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: bool,
    /// The entropy of the Brownian tree the noise comes from; `None` draws one per schedule
    /// from the step's generator (see [`DPMSolverSDEScheduler`]).
    pub noise_sampler_seed: Option<u64>,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
}

impl Default for DPMSolverSDESchedulerConfig {
    /// The `__init__` defaults of diffusers' `DPMSolverSDEScheduler`
    /// (schedulers/scheduling_dpmsolver_sde.py); note the Stable Diffusion betas on a linear
    /// schedule.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            noise_sampler_seed: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl Config for DPMSolverSDESchedulerConfig {
    const CLASS_NAME: &'static str = "DPMSolverSDEScheduler";

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
        // diffusers raises NotImplementedError for `sample` at the first step.
        schedule::check_allowed(
            Self::CLASS_NAME,
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
}

/// Float32 `log`, `exp` and `expm1` of 0-d tensors, correctly rounded. (torch evaluates these
/// with MKL's vector maths, which is within an ulp of this but not always equal; see the
/// precision notes on [`DPMSolverSDEScheduler`].)
fn ln32(x: f32) -> f32 {
    f64::from(x).ln() as f32
}

fn exp32(x: f32) -> f32 {
    f64::from(x).exp() as f32
}

fn expm1_32(x: f32) -> f32 {
    f64::from(x).exp_m1() as f32
}

/// The first evaluation of a step, kept for the second.
#[derive(Clone, Debug)]
struct FirstHalf {
    sample: Stored,
    mid_point_sigma: f32,
}

/// DPM-Solver++ (SDE), the stochastic second-order sampler A1111 calls "DPM++ SDE": every step
/// but the last evaluates the model at the step's sigma and at its log-midpoint, each followed
/// by an ancestral-style update whose noise comes from a Brownian tree (so the schedule
/// interleaves each step's timestep with its midpoint's; `order` is 2).
///
/// # Noise
/// The noise is the increment of one Brownian motion over `[sigma_next, sigma]`, sampled from
/// a port of torchsde's `BrownianInterval` ([`crate::brownian_tree`]) built, at the first step
/// after `set_timesteps`, over the schedule's smallest positive and largest sigma and shaped
/// like the sample. Its entropy is `noise_sampler_seed`; when that is `None`, diffusers draws
/// `torch.randint(0, 2**63 - 1, [])` from torch's global generator, and this port draws the
/// same integer from the step's generator instead (the first one of a per-image list), so a
/// run equals diffusers' after `torch.manual_seed(s)` when the generator is in the state the
/// global one is in then. Without a seed and without a generator that step is refused. With a
/// seed the generator is accepted and not used.
///
/// # Precision
/// Step scalars are float32 like diffusers' 0-d tensors, with correctly rounded `log`, `exp`
/// and `expm1`. torch evaluates those with MKL, whose float32 results differ from correctly
/// rounded ones in the last bit for a few percent of inputs. The Brownian tree rounds its
/// query times to 1e-6, and a float32 sigma above 4 has an ulp near that size, so where such a
/// last-bit difference reaches a query time the queried interval moves by 1e-6 and the noise
/// of that step differs from diffusers' by about `1e-3 * sigma_up / sqrt(sigma - sigma_next)`.
///
/// Stateful like Heun: the first `scale_model_input` or `step` after `set_timesteps` finds its
/// place from the timestep (or [`Scheduler::set_begin_index`]).
#[derive(Clone, Debug)]
pub struct DPMSolverSDEScheduler {
    file: ConfigFile<DPMSolverSDESchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
    first_half: Option<Box<FirstHalf>>,
    noise_sampler: Option<Box<NoiseSampler>>,
}

impl DPMSolverSDEScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DPMSolverSDESchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Whether the next `step` is the first evaluation of a step.
    pub fn state_in_first_order(&self) -> bool {
        self.first_half.is_none()
    }

    /// diffusers' `index_for_timestep`: where `timestep` is in the schedule (the second match
    /// when it occurs twice).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `timestep` when it is not in the schedule.
    pub fn index_for_timestep(&self, timestep: f64) -> Result<usize> {
        StepCursor::index_for_timestep(&self.timesteps, timestep, MissingTimestep::Error)
    }

    /// The timesteps diffusers' `set_timesteps` spaces, as `float64` values (this class uses
    /// `np.linspace(..., dtype=float)`, not float32, for `linspace`).
    fn spaced(c: &DPMSolverSDESchedulerConfig, k: usize, train: bool) -> Result<Vec<f64>> {
        let n = c.num_train_timesteps;
        let ts = if train {
            sigmas::train_float_timesteps(c.timestep_spacing, n, c.steps_offset)
        } else {
            float_timesteps(c.timestep_spacing, n, k, c.steps_offset)?
        };
        Ok(match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut ts = schedule::numpy_linspace(0.0, (n - 1) as f64, k);
                ts.reverse();
                ts
            }
            _ => ts,
        })
    }

    /// Build the interleaved schedule from `k` spaced timesteps (noisiest first): the step
    /// sigmas (read off the table or respaced), the midpoint timesteps between them, float32
    /// sigmas with a final 0.
    fn build(&mut self, timesteps: Vec<f64>) {
        let c = self.config();
        let k = timesteps.len();
        let read: Vec<f64> = timesteps
            .iter()
            .map(|&t| sigmas::interp_on_grid(t, &self.sigma_table))
            .collect();
        let (lo, hi) = (
            read.last().copied().unwrap_or(0.0),
            read.first().copied().unwrap_or(0.0),
        );
        let respaced = if c.use_karras_sigmas {
            Some(sigmas::karras_sigmas(lo, hi, k))
        } else if c.use_exponential_sigmas {
            Some(sigmas::exponential_sigmas(lo, hi, k))
        } else if c.use_beta_sigmas {
            Some(sigmas::beta_sigmas(lo, hi, k))
        } else {
            None
        };
        let to_t = |s: &f64| sigmas::sigma_to_t(*s, &self.log_sigmas);
        let (timesteps, base) = match respaced {
            Some(s) => (s.iter().map(to_t).collect::<Vec<_>>(), s),
            None => (timesteps, read),
        };
        // Midpoints in log-sigma, in float64 as numpy computes them.
        let midpoints: Vec<f64> = base
            .windows(2)
            .map(|w| {
                let (t, t_next) = (-w[0].ln(), -w[1].ln());
                let proposed = t + (t_next - t) * 0.5;
                to_t(&(-proposed).exp())
            })
            .collect();
        let mut step_sigmas: Vec<f64> = base.iter().map(|&s| f64::from(s as f32)).collect();
        step_sigmas.push(0.0);
        let n = step_sigmas.len();
        let mut interleaved = vec![step_sigmas[0]];
        for &s in &step_sigmas[1..n - 1] {
            interleaved.extend([s, s]);
        }
        interleaved.push(step_sigmas[n - 1]);
        let mut ts = vec![timesteps[0]];
        for (&t, &mid) in timesteps[1..].iter().zip(&midpoints) {
            ts.extend([mid, t]);
        }
        self.timesteps = ts;
        self.sigmas = interleaved;
        self.cursor.reset();
        self.first_half = None;
        self.noise_sampler = None;
    }

    /// The Brownian tree of this schedule, built on first use (diffusers builds it in the
    /// first `step`), shaped like `dims`.
    fn noise_sampler(
        &mut self,
        dims: &[usize],
        generator: Option<NoiseSource<'_>>,
    ) -> Result<&mut NoiseSampler> {
        let class = self.class_name();
        if self.noise_sampler.is_none() {
            let positive = self
                .sigmas
                .iter()
                .map(|&s| s as f32)
                .filter(|&s| s > 0.0)
                .fold(f32::INFINITY, f32::min);
            let max = self.sigmas.iter().map(|&s| s as f32).fold(0f32, f32::max);
            if !positive.is_finite() {
                return Err(Error::invalid_argument(
                    "sigmas",
                    format!("{class} needs a positive sigma to build its noise sampler"),
                ));
            }
            let seed = match (self.config().noise_sampler_seed, generator) {
                (Some(seed), _) => seed,
                (None, Some(source)) => {
                    let g = match source {
                        NoiseSource::Single(g) => g,
                        NoiseSource::PerImage(gens) => gens.first_mut().ok_or_else(|| {
                            Error::invalid_argument("generator", "the generator list is empty")
                        })?,
                    };
                    g.randint(0, i64::MAX)? as u64
                }
                (None, None) => {
                    return Err(Error::invalid_argument(
                        "generator",
                        format!(
                            "{class} without noise_sampler_seed draws its Brownian tree's seed \
                             from a generator; pass one (or set noise_sampler_seed)"
                        ),
                    ));
                }
            };
            self.noise_sampler = Some(Box::new(NoiseSampler::new(positive, max, dims, &[seed])?));
        }
        let sampler = self
            .noise_sampler
            .as_deref_mut()
            .ok_or_else(|| Error::invalid_argument("sample", "no noise sampler"))?;
        if sampler.dims() != dims {
            return Err(Error::invalid_argument(
                "sample",
                format!(
                    "has shape {dims:?} but the noise sampler was built for {:?}; call \
                     set_timesteps to start again",
                    sampler.dims()
                ),
            ));
        }
        Ok(sampler)
    }
}

impl ConfiguredScheduler for DPMSolverSDEScheduler {
    type Config = DPMSolverSDESchedulerConfig;

    fn from_config_file(file: ConfigFile<DPMSolverSDESchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(DPMSolverSDESchedulerConfig::CLASS_NAME, e))?;
        let schedule = crate::scheduler::noise_schedule_of!(c, false)?;
        let sigma_table = sigmas::sigma_table(&schedule, false);
        let log_sigmas = sigma_table.iter().map(|s| s.ln()).collect();
        let ts = Self::spaced(c, c.num_train_timesteps, true)?;
        let mut scheduler = Self {
            file,
            schedule,
            sigma_table,
            log_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: None,
            cursor: StepCursor::default(),
            first_half: None,
            noise_sampler: None,
        };
        scheduler.build(ts);
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<DPMSolverSDESchedulerConfig> {
        &self.file
    }
}

impl Scheduler for DPMSolverSDEScheduler {
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

    /// A step count (diffusers' `set_timesteps` takes nothing else). Forgets the noise
    /// sampler: the next schedule gets a new Brownian tree.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let k = request
            .num_inference_steps
            .ok_or_else(|| Error::invalid_argument("num_inference_steps", "pass a step count"))?;
        let ts = Self::spaced(self.config(), k, false)?;
        self.build(ts);
        self.num_inference_steps = Some(k);
        Ok(())
    }

    /// Divide by `sqrt(sigma^2 + 1)` at the step's sigma, or at the midpoint's sigma for the
    /// second evaluation.
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>> {
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        let sigma = match &self.first_half {
            Some(first) => first.mid_point_sigma,
            None => *self.sigmas.get(i).ok_or_else(|| {
                Error::invalid_argument("timestep", "the schedule has no sigma left")
            })? as f32,
        };
        Ok(sample.div_scalar((sigma * sigma + 1.0).sqrt()))
    }

    /// One evaluation: the step from `sigma` to the log-midpoint, or from `sigma` to
    /// `sigma_next` with the midpoint's `x_0`, each an ancestral-style update plus Brownian
    /// noise of `sigma_up * s_noise`; an Euler step onto sigma 0 at the end. Takes `s_noise`
    /// and `generator` (see the type's docs on noise).
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &["generator", "s_noise"])?;
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let s_noise = options.s_noise.unwrap_or(1.0) as f32;
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        check_step_in_range(i, &self.sigmas, class)?;
        let first_order = self.first_half.is_none();
        if !first_order && i == 0 {
            return Err(Error::invalid_argument(
                "timestep",
                "the second evaluation of a DPM++ SDE step cannot be the first step",
            ));
        }
        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let model_output = model_output.cast(FloatDType::F32);
        let sample = sample.cast(FloatDType::F32);
        let dims = sample.dims().to_vec();

        // Float32 scalars, as diffusers' 0-d tensors.
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[i] as f32, self.sigmas[i + 1] as f32)
        } else {
            (self.sigmas[i - 1] as f32, self.sigmas[i] as f32)
        };
        let t = -ln32(sigma);
        let t_next = -ln32(sigma_next);
        let t_proposed = t + (t_next - t) * 0.5;
        let sigma_input = if first_order {
            sigma
        } else {
            exp32(-t_proposed)
        };
        let pred_original = match self.config().prediction_type {
            PredictionType::VPrediction => {
                let s2 = sigma_input * sigma_input + 1.0;
                model_output
                    .mul_scalar(-sigma_input / s2.sqrt())
                    .add(sample.clone().div_scalar(s2))
            }
            _ => sample.clone().sub(model_output.mul_scalar(sigma_input)),
        };

        let prev_sample = if sigma_next == 0.0 {
            let derivative = sample.clone().sub(pred_original.clone()).div_scalar(sigma);
            sample.add(derivative.mul_scalar(sigma_next - sigma))
        } else {
            let (t_next, base) = match &self.first_half {
                None => (t_proposed, sample.clone()),
                Some(first) => {
                    let base = first.sample.get::<D>()?;
                    ops::check_same_shape(&base, &sample, "sample", "the first sample")?;
                    (t_next, base.cast(FloatDType::F32))
                }
            };
            let sigma_from = exp32(-t);
            let sigma_to = exp32(-t_next);
            let up = ((sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to))
                / (sigma_from * sigma_from))
                .sqrt();
            // Python's min(a, b) keeps `a` unless `b < a` (a NaN `up` keeps `sigma_to`).
            let sigma_up = if up < sigma_to { up } else { sigma_to };
            let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
            let ancestral_t = -ln32(sigma_down);
            let ratio = exp32(-ancestral_t) / exp32(-t);
            let em1 = expm1_32(t - ancestral_t);
            // Draw before changing any state, so a refused step leaves the scheduler as it was.
            let noise = self
                .noise_sampler(&dims, options.generator)?
                .sample(sigma_from, sigma_to)?;
            let noise: Vec<f32> = noise.into_iter().map(|v| v * s_noise * sigma_up).collect();
            let noise = Tensor::<D>::from_data(
                TensorData::new(noise, dims.clone()),
                (&base.device(), DType::F32),
            );
            let prev = base
                .clone()
                .mul_scalar(ratio)
                .sub(pred_original.clone().mul_scalar(em1))
                .add(noise);
            self.first_half = if first_order {
                Some(Box::new(FirstHalf {
                    sample: Stored::new(&base),
                    mid_point_sigma: sigma_to,
                }))
            } else {
                None
            };
            prev
        };
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: Some(pred_original.cast(out_dtype)),
        })
    }

    /// `original + sigma * noise` at the sigma of each timestep (or of the current or begin
    /// index).
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        ops::check_same_shape(&noise, &original, "noise", "original_samples")?;
        let indices =
            self.cursor
                .noise_indices(&self.timesteps, timesteps, MissingTimestep::Error)?;
        let sigma: Vec<f64> = indices.iter().map(|&i| self.sigmas[i]).collect();
        let sigma = ops::batch_coefficients(&sigma, &original)?;
        Ok(original.add(noise.mul(sigma)))
    }
}
