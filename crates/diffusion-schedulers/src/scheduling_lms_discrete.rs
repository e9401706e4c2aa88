//! LMS: the linear multistep sampler of Karras et al. (2022) / k-diffusion's `sample_lms`
//! (diffusers' `schedulers/scheduling_lms_discrete.py`).

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
use crate::sigmas::{self, MissingTimestep, StepCursor, check_step_in_range, float_timesteps};

/// The config of [`LMSDiscreteScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LMSDiscreteSchedulerConfig {
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
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Use the Karras et al. noise levels.
    pub use_karras_sigmas: bool,
    /// Use noise levels evenly spaced in log-sigma.
    pub use_exponential_sigmas: bool,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: bool,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
}

impl Default for LMSDiscreteSchedulerConfig {
    /// The `__init__` defaults of diffusers' `LMSDiscreteScheduler`
    /// (schedulers/scheduling_lms_discrete.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl Config for LMSDiscreteSchedulerConfig {
    const CLASS_NAME: &'static str = "LMSDiscreteScheduler";

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
            &[
                PredictionType::Epsilon,
                PredictionType::VPrediction,
                PredictionType::Sample,
            ],
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

/// The order of the multistep update (diffusers' `step(..., order=4)` default).
pub const LMS_ORDER: usize = 4;

/// Nodes of the 21-point Gauss-Kronrod rule on `[-1, 1]` (QUADPACK's `xgk`; the odd
/// entries, counting from 1, are the 10-point Gauss nodes), largest first, the centre last.
#[allow(clippy::excessive_precision)] // QUADPACK's published digits, rounded by the compiler.
const XGK: [f64; 11] = [
    0.995_657_163_025_808_080_735_527_280_689_003,
    0.973_906_528_517_171_720_077_964_012_084_452,
    0.930_157_491_355_708_226_001_207_180_059_508,
    0.865_063_366_688_984_510_732_096_688_423_493,
    0.780_817_726_586_416_897_063_717_578_345_042,
    0.679_409_568_299_024_406_234_327_365_114_874,
    0.562_757_134_668_604_683_339_000_099_272_694,
    0.433_395_394_129_247_190_799_265_943_165_784,
    0.294_392_862_701_460_198_131_126_603_103_866,
    0.148_874_338_981_631_210_884_826_001_129_720,
    0.0,
];

/// Weights of the 21-point Kronrod rule (QUADPACK's `wgk`), matching [`XGK`].
#[allow(clippy::excessive_precision)] // As XGK.
const WGK: [f64; 11] = [
    0.011_694_638_867_371_874_278_064_396_062_192,
    0.032_558_162_307_964_727_478_818_972_459_390,
    0.054_755_896_574_351_996_031_381_300_244_580,
    0.075_039_674_810_919_952_767_043_140_916_190,
    0.093_125_454_583_697_605_535_065_465_083_366,
    0.109_387_158_802_297_641_899_210_590_325_805,
    0.123_491_976_262_065_851_077_958_109_831_074,
    0.134_709_217_311_473_325_928_054_001_771_707,
    0.142_775_938_577_060_080_797_094_273_138_717,
    0.147_739_104_901_338_491_374_841_515_972_068,
    0.149_445_554_002_916_905_664_936_468_389_821,
];

/// QUADPACK's `dqk21`: the 21-point Kronrod estimate of `integral_a^b f`, summed in
/// QUADPACK's order (centre, then the Gauss nodes, then the Kronrod-only nodes).
///
/// `scipy.integrate.quad` (`dqagse`) returns this first estimate whenever its error estimate
/// meets the tolerance, which it does for the low-degree polynomials integrated here (the
/// estimate only sees the float32 rounding of the integrand, orders of magnitude below
/// diffusers' `epsrel = 1e-4`).
fn kronrod21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let centre = 0.5 * (a + b);
    let half = 0.5 * (b - a);
    let mut sum = WGK[10] * f(centre);
    for jtw in [1, 3, 5, 7, 9] {
        let x = half * XGK[jtw];
        sum += WGK[jtw] * (f(centre - x) + f(centre + x));
    }
    for jtwm1 in [0, 2, 4, 6, 8] {
        let x = half * XGK[jtwm1];
        sum += WGK[jtwm1] * (f(centre - x) + f(centre + x));
    }
    sum * half
}

/// `integral_{sigmas[t]}^{sigmas[t+1]} prod_{k != j} (tau - sigmas[t-k]) / (sigmas[t-j] -
/// sigmas[t-k]) dtau`, the weight of the derivative `j` steps back in an `order`-step linear
/// multistep update (diffusers' `get_lms_coefficient`).
///
/// As diffusers computes it: `scipy.integrate.quad` of an integrand evaluated in float32 (the
/// sigmas are float32 tensors there, so `tau - sigma` rounds `tau` to float32 and every factor
/// is a float32 operation). The integrand is a polynomial of degree `order - 1 <= 3`, which
/// the rule integrates exactly, so the result is the closed-form integral up to that float32
/// rounding, and equal to diffusers' value up to `f64` rounding.
///
/// # Panics
/// When `t + 1 >= sigmas.len()` or `order > t + 1`, which [`LMSDiscreteScheduler`] never
/// passes.
pub fn lms_coefficient(sigmas: &[f64], order: usize, t: usize, current_order: usize) -> f64 {
    let s = |i: usize| sigmas[i] as f32;
    let basis = |tau: f64| -> f64 {
        let mut prod: Option<f32> = None;
        for k in (0..order).filter(|&k| k != current_order) {
            let factor = (tau as f32 - s(t - k)) / (s(t - current_order) - s(t - k));
            prod = Some(prod.map_or(factor, |p| p * factor));
        }
        // Python's `prod = 1.0` stays a float when no factor multiplies it.
        prod.map_or(1.0, f64::from)
    };
    kronrod21(basis, f64::from(s(t)), f64::from(s(t + 1)))
}

/// The LMS sampler, the scheduler A1111 calls "LMS" ("LMS Karras" with Karras sigmas).
///
/// Stateful like Euler: the first `scale_model_input` or `step` after `set_timesteps` finds
/// its place from the timestep (or [`Scheduler::set_begin_index`]), every `step` moves on by
/// one and keeps the last [`LMS_ORDER`] derivatives. Before `set_timesteps` the schedule is
/// every training timestep, as in diffusers. diffusers' `step(order=)` argument is fixed at its
/// default of 4 here.
#[derive(Clone, Debug)]
pub struct LMSDiscreteScheduler {
    file: ConfigFile<LMSDiscreteSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    cursor: StepCursor,
    derivatives: Vec<Stored>,
}

impl LMSDiscreteScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: LMSDiscreteSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Build the schedule from float32 timesteps (noisiest first).
    fn build(&mut self, timesteps: Vec<f64>, k: usize) {
        let c = self.config();
        let read: Vec<f64> = timesteps
            .iter()
            .map(|&t| sigmas::interp_on_grid(t, &self.sigma_table))
            .collect();
        let first = read.first().copied().unwrap_or(0.0);
        let last = read.last().copied().unwrap_or(0.0);
        let respaced = if c.use_karras_sigmas {
            Some(sigmas::karras_sigmas(last, first, k))
        } else if c.use_exponential_sigmas {
            Some(sigmas::exponential_sigmas(last, first, k))
        } else if c.use_beta_sigmas {
            Some(sigmas::beta_sigmas(last, first, k))
        } else {
            None
        };
        let (timesteps, mut base) = match respaced {
            Some(s) => {
                let ts = s
                    .iter()
                    .map(|&s| f64::from(sigmas::sigma_to_t(s, &self.log_sigmas) as f32))
                    .collect();
                (ts, s)
            }
            None => (timesteps, read),
        };
        base.push(0.0);
        let sigmas: Vec<f64> = base.into_iter().map(|s| f64::from(s as f32)).collect();
        let ts = timesteps;
        self.timesteps = ts;
        self.sigmas = sigmas;
        self.cursor.reset();
        self.derivatives.clear();
    }
}

impl ConfiguredScheduler for LMSDiscreteScheduler {
    type Config = LMSDiscreteSchedulerConfig;

    fn from_config_file(file: ConfigFile<LMSDiscreteSchedulerConfig>) -> Result<Self> {
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(LMSDiscreteSchedulerConfig::CLASS_NAME, e))?;
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: c.num_train_timesteps,
            beta_start: c.beta_start,
            beta_end: c.beta_end,
            beta_schedule: c.beta_schedule,
            trained_betas: c.trained_betas.as_deref(),
            rescale_betas_zero_snr: false,
        })?;
        let sigma_table = sigmas::sigma_table(&schedule, false);
        let log_sigmas = sigma_table.iter().map(|s| s.ln()).collect();
        let n = c.num_train_timesteps;
        let spacing = c.timestep_spacing;
        let offset = c.steps_offset;
        let mut scheduler = Self {
            file,
            schedule,
            sigma_table,
            log_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: None,
            cursor: StepCursor::default(),
            derivatives: Vec::new(),
        };
        // diffusers' __init__ calls set_timesteps(num_train_timesteps); with `leading` spacing
        // and a steps_offset its first timestep lies past the table, where np.interp clamps.
        let ts = float_timesteps(spacing, n, n, offset)
            .unwrap_or_else(|_| (0..n).rev().map(|i| (i + offset) as f64).collect());
        scheduler.build(ts, n);
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<LMSDiscreteSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for LMSDiscreteScheduler {
    crate::scheduler::stateful_scheduler_accessors!(sigma_scaled_input);

    fn order(&self) -> usize {
        1
    }

    fn init_noise_sigma(&self) -> f64 {
        sigmas::euler_init_noise_sigma(&self.sigmas, self.config().timestep_spacing)
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().num_train_timesteps
    }

    /// Evenly spaced steps per `timestep_spacing`; LMS takes no custom timesteps or sigmas.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let class = self.class_name();
        request.accept_only(class, &["num_inference_steps"])?;
        let k = request.num_inference_steps.ok_or_else(|| {
            Error::invalid_argument(
                "num_inference_steps",
                "LMSDiscreteScheduler needs a step count",
            )
        })?;
        let c = self.config();
        let ts = float_timesteps(c.timestep_spacing, c.num_train_timesteps, k, c.steps_offset)?;
        self.build(ts, k);
        self.num_inference_steps = Some(k);
        Ok(())
    }

    /// One linear multistep step of order up to [`LMS_ORDER`] (lower for the first steps).
    /// Takes no options.
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
        if let Some(stored) = self.derivatives.first()
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
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::Error)?;
        check_step_in_range(i, &self.sigmas, class)?;
        // Float32 scalars, as diffusers holds sigmas in a float32 tensor.
        let sigma = self.sigmas[i] as f32;
        let pred_original = match self.config().prediction_type {
            PredictionType::Epsilon => sample.clone().sub(model_output.mul_scalar(sigma)),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                model_output
                    .mul_scalar(-sigma / s2.sqrt())
                    .add(sample.clone().div_scalar(s2))
            }
            PredictionType::Sample => model_output,
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("{class} does not support {}", other.as_str()),
                ));
            }
        };
        let derivative = sample.clone().sub(pred_original.clone()).div_scalar(sigma);
        self.derivatives.push(Stored::new(&derivative));
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(LMS_ORDER);
        // diffusers: sample + sum(coeff * derivative for the newest derivative first), the
        // sum starting from Python's 0.
        let mut total: Option<Tensor<D>> = None;
        for (j, stored) in self.derivatives.iter().rev().take(order).enumerate() {
            let coeff = lms_coefficient(&self.sigmas, order, i, j) as f32;
            let term = stored.get::<D>()?.mul_scalar(coeff);
            total = Some(match total {
                None => term,
                Some(acc) => acc.add(term),
            });
        }
        let prev_sample = match total {
            Some(total) => sample.add(total),
            None => sample,
        };
        self.cursor.advance();
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }

    /// `original + sigma * noise` at the sigma of each timestep (or of the begin index).
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
