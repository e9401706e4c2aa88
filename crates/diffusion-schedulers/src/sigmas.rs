//! Host maths shared by the sigma-parameterised (Karras-style) schedulers: the training sigma
//! table, numpy's `interp`, sigma-to-timestep inversion, Karras/exponential/beta/Lu spacings,
//! and the step cursor of stateful schedulers.
//!
//! diffusers mixes precisions here and we follow it: the sigma table is float32 (torch ops on
//! `alphas_cumprod`), `np.interp` and the Karras ramp are float64 numpy maths, and the final
//! sigmas and timesteps are stored as float32.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::schedule::{NoiseSchedule, TimestepSpacing, numpy_arange, numpy_linspace};

/// How the last sigma of the schedule is chosen (`final_sigmas_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FinalSigmasType {
    /// End at sigma 0, a fully denoised sample.
    #[serde(rename = "zero")]
    Zero,
    /// End at the smallest training sigma.
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)` for every training timestep, computed in
/// float32 as diffusers computes it from its float32 `alphas_cumprod`.
///
/// With zero-SNR rescaling diffusers first replaces the last `alpha_bar` (exactly 0) by
/// `2^-24`, so that the largest sigma is finite; `zero_snr` does the same.
pub fn sigma_table(schedule: &NoiseSchedule, zero_snr: bool) -> Vec<f32> {
    let n = schedule.len();
    schedule
        .alphas_cumprod
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            let a = if zero_snr && i == n - 1 {
                2f32.powi(-24)
            } else {
                a as f32
            };
            ((1.0 - a) / a).sqrt()
        })
        .collect()
}

/// `alphas_cumprod` with diffusers' zero-SNR patch (last value `2^-24`), for schedulers that
/// keep it.
pub fn patched_alphas_cumprod(schedule: &NoiseSchedule, zero_snr: bool) -> Vec<f64> {
    let mut out = schedule.alphas_cumprod.clone();
    if zero_snr && let Some(last) = out.last_mut() {
        *last = 2f64.powi(-24);
    }
    out
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation on the integer grid, in `f64`,
/// with numpy's exact-hit and end-clamping rules.
pub fn interp_on_grid(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= (n - 1) as f64 {
        return f64::from(fp[n - 1]);
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return f64::from(fp[j]);
    }
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    // numpy divides the rise by the grid step, which is exactly 1 here.
    (y1 - y0) * (x - j as f64) + y0
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches `sigma`,
/// interpolating linearly in log-sigma between table entries (`log_sigmas` ascending).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log-sigma is <= log_sigma (0 when none is), at most n - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The noise levels of Karras et al. (2022), eq. 5, with `rho = 7`: evenly spaced in
/// `sigma^(1/rho)` from `sigma_max` down to `sigma_min` (`f64`, as numpy computes them).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    numpy_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in `log(sigma)` from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    numpy_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Log-SNR values evenly spaced from `lambda_max` down to `lambda_min` (Lu et al., DPM-Solver++;
/// diffusers' `_convert_to_lu` with `rho = 1`).
pub fn lu_lambdas(lambda_min: f64, lambda_max: f64, n: usize) -> Vec<f64> {
    numpy_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| lambda_max + ramp * (lambda_min - lambda_max))
        .collect()
}

/// The shape parameters diffusers' `_convert_to_beta` uses, `alpha = beta = 0.6` (the paper's
/// recommended values; diffusers does not expose them in any config).
const BETA_SIGMAS_SHAPE: (f64, f64) = (0.6, 0.6);

/// Noise levels placed at the quantiles of a Beta(0.6, 0.6) distribution ("Beta Sampling is
/// All You Need", Lee et al. 2024; diffusers' `_convert_to_beta`): `n` values from
/// `sigma_max` down to `sigma_min`, denser at both ends of the schedule than in the middle.
///
/// Quantile `i` is the inverse regularised incomplete beta function at `1 - i / (n - 1)`
/// (numpy's `linspace`), as `scipy.stats.beta.ppf` computes it; `statrs` agrees with scipy to
/// about 1e-15 absolute on these points.
pub fn beta_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let (a, b) = BETA_SIGMAS_SHAPE;
    numpy_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| {
            let q = statrs::function::beta::inv_beta_reg(a, b, (1.0 - ramp).clamp(0.0, 1.0));
            sigma_min + q * (sigma_max - sigma_min)
        })
        .collect()
}

/// diffusers' check that at most one respacing of the noise levels is chosen among
/// `use_karras_sigmas`, `use_exponential_sigmas` and `use_beta_sigmas`, as a config
/// validation error.
pub(crate) fn check_one_respacing(
    karras: bool,
    exponential: bool,
    beta: bool,
) -> std::result::Result<(), (String, String)> {
    if [karras, exponential, beta].iter().filter(|&&on| on).count() > 1 {
        let key = if beta {
            "use_beta_sigmas"
        } else {
            "use_exponential_sigmas"
        };
        return Err((
            key.into(),
            "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be set"
                .into(),
        ));
    }
    Ok(())
}

/// diffusers' `init_noise_sigma` of the Euler family: the largest sigma for `linspace` and
/// `trailing` spacing, `sqrt(sigma_max^2 + 1)` otherwise (float32).
pub fn euler_init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().fold(0f32, |m, &s| m.max(s as f32));
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
        TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
    }
}

/// `sample / sqrt(sigma^2 + 1)`, the Euler family's model-input scaling (float32 scalar).
pub fn scale_by_sigma<const D: usize>(sample: Tensor<D>, sigma: f64) -> Tensor<D> {
    let sigma = sigma as f32;
    sample.div_scalar((sigma * sigma + 1.0).sqrt())
}

/// Spaced timesteps as the Euler schedulers build them: float32 values, fractional for
/// `linspace` (diffusers' `np.linspace(..., dtype=np.float32)` and friends).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `num_inference_steps` for 0 or more steps than training
/// timesteps, and `steps_offset` when it pushes a timestep past the schedule.
pub fn float_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    crate::schedule::check_num_inference_steps(num_inference_steps, num_train_timesteps)?;
    let n = num_train_timesteps;
    let k = num_inference_steps;
    let f32_round = |v: f64| f64::from(v as f32);
    let ts: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, (n - 1) as f64, k)
            .into_iter()
            .rev()
            .map(f32_round)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (n / k) as f64;
            (0..k)
                .rev()
                .map(|i| f32_round(i as f64 * ratio) + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => numpy_arange(n as f64, 0.0, -(n as f64 / k as f64))
            .into_iter()
            .take(k)
            .map(|v| f32_round(v.round_ties_even()) - 1.0)
            .collect(),
    };
    if let Some(&first) = ts.first()
        && first > (n - 1) as f64
    {
        return Err(Error::invalid_argument(
            "steps_offset",
            format!(
                "steps_offset {steps_offset} makes the first timestep {first}, past the last \
                 training timestep {}",
                n - 1
            ),
        ));
    }
    Ok(ts)
}

/// Integral timesteps as the multistep solvers (DPM-Solver, UniPC, DEIS) space them: `k + 1`
/// points over `[0, last)` with the last one dropped, so that the final step lands on the
/// final sigma rather than on timestep 0. `last` is below `num_train_timesteps` when a
/// log-SNR clip cuts the schedule short.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `num_inference_steps` when `leading` spacing leaves no
/// room between timesteps, and `steps_offset` when a timestep leaves `[0, n)`.
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    n: usize,
    last: usize,
    k: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    crate::schedule::check_num_inference_steps(k, n)?;
    let ts: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = numpy_linspace(0.0, (last as f64) - 1.0, k + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .collect();
            v.reverse();
            v.truncate(k);
            v
        }
        TimestepSpacing::Leading => {
            let ratio = last / (k + 1);
            if ratio == 0 {
                return Err(Error::invalid_argument(
                    "num_inference_steps",
                    format!("{k} steps leave no room between leading timesteps below {last}"),
                ));
            }
            (1..=k)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => numpy_arange(last as f64, 0.0, -(n as f64 / k as f64))
            .into_iter()
            .take(k)
            .map(|v| v.round_ties_even() - 1.0)
            .collect(),
    };
    if ts.iter().any(|&t| t < 0.0 || t >= n as f64) {
        return Err(Error::invalid_argument(
            "steps_offset",
            format!("the timesteps {ts:?} leave the training range [0, {n})"),
        ));
    }
    Ok(ts)
}

/// `(alpha_t, sigma_t)` of a noise level in float32 as diffusers computes them: variance
/// preserving `alpha = 1 / sqrt(sigma^2 + 1)`, `sigma_t = sigma * alpha`, or the flow-matching
/// pair `(1 - sigma, sigma)`.
pub(crate) fn alpha_sigma(sigma: f64, flow: bool) -> (f32, f32) {
    let sigma = sigma as f32;
    if flow {
        (1.0 - sigma, sigma)
    } else {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }
}

/// The schedule diffusers' Karras-style `__init__` builds with
/// `set_timesteps(num_train_timesteps)`: [`float_timesteps`] over every training timestep.
/// With `leading` spacing and a `steps_offset` the first timestep lies past the table, which
/// diffusers accepts there (`np.interp` clamps), so it is kept rather than refused.
pub(crate) fn train_float_timesteps(
    spacing: TimestepSpacing,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    float_timesteps(spacing, n, n, steps_offset)
        .unwrap_or_else(|_| (0..n).rev().map(|i| (i + steps_offset) as f64).collect())
}

/// Flow-matching sigmas of the multistep/singlestep solvers: `k` values of
/// `shift * s / (1 + (shift - 1) * s)` for `s` evenly spaced from 1 down to `1/n` (`f64`, as
/// numpy computes them).
pub(crate) fn shifted_flow_sigmas(n: usize, k: usize, shift: f64) -> Vec<f64> {
    let mut s: Vec<f64> = numpy_linspace(1.0, 1.0 / n as f64, k + 1)
        .into_iter()
        .map(|a| {
            let s = 1.0 - a;
            shift * s / (1.0 + (shift - 1.0) * s)
        })
        .collect();
    s.reverse();
    s.truncate(k);
    s
}

/// Inference timesteps and sigmas from the training sigma table (ascending, float32) of the
/// solvers that take Karras, exponential or beta sigmas over the whole table: Karras sigmas
/// with rounded timesteps, exponential or beta sigmas with fractional ones, or the table read
/// at the `spaced` timesteps.
pub(crate) fn table_sigmas(
    karras: bool,
    exponential: bool,
    beta: bool,
    sigma_table: &[f32],
    log_sigmas: &[f32],
    spaced: Vec<f64>,
) -> (Vec<f64>, Vec<f64>) {
    let k = spaced.len();
    let (lo, hi) = (
        f64::from(sigma_table[0]),
        f64::from(sigma_table[sigma_table.len() - 1]),
    );
    let to_t = |s: &f64| sigma_to_t(*s, log_sigmas);
    if karras {
        let s = karras_sigmas(lo, hi, k);
        (s.iter().map(to_t).map(f64::round_ties_even).collect(), s)
    } else if exponential {
        let s = exponential_sigmas(lo, hi, k);
        (s.iter().map(to_t).collect(), s)
    } else if beta {
        let s = beta_sigmas(lo, hi, k);
        (s.iter().map(to_t).collect(), s)
    } else {
        let s = spaced
            .iter()
            .map(|&t| interp_on_grid(t, sigma_table))
            .collect();
        (spaced, s)
    }
}

/// What [`StepCursor`] does with a timestep that is not in the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MissingTimestep {
    /// Refuse it (Euler: diffusers raises an index error).
    Error,
    /// Use the last step (DPM-Solver).
    LastStep,
}

/// The position of a stateful scheduler in its schedule (diffusers' `_step_index` and
/// `_begin_index`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct StepCursor {
    pub step_index: Option<usize>,
    pub begin_index: Option<usize>,
}

impl StepCursor {
    /// Forget the position (a new schedule was set).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// `set_begin_index` for a schedule of `len` steps (image-to-image starts mid-schedule).
    pub fn set_begin_index(&mut self, begin_index: usize, len: usize) -> Result<()> {
        if begin_index >= len {
            return Err(Error::invalid_argument(
                "begin_index",
                format!("{begin_index} is past the {len}-step schedule"),
            ));
        }
        self.begin_index = Some(begin_index);
        Ok(())
    }

    /// `scale_model_input` of the sigma (Karras-style) schedulers: divide by
    /// `sqrt(sigma^2 + 1)` for the sigma at the current step.
    pub fn scale_by_current_sigma<const D: usize>(
        &mut self,
        timesteps: &[f64],
        sigmas: &[f64],
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>> {
        let i = self.current(timesteps, timestep, MissingTimestep::Error)?;
        let sigma = *sigmas
            .get(i)
            .ok_or_else(|| Error::invalid_argument("timestep", "the schedule has no sigma left"))?;
        Ok(scale_by_sigma(sample, sigma))
    }

    /// diffusers' `index_for_timestep`: the position of `timestep` in `timesteps`, the second
    /// match when it occurs twice (so that an image-to-image run starting mid-schedule does not
    /// skip a sigma).
    pub fn index_for_timestep(
        timesteps: &[f64],
        timestep: f64,
        missing: MissingTimestep,
    ) -> Result<usize> {
        let mut matches = timesteps
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == timestep)
            .map(|(i, _)| i);
        let first = matches.next();
        match (first, matches.next()) {
            (Some(_), Some(second)) => Ok(second),
            (Some(first), None) => Ok(first),
            (None, _) => match missing {
                MissingTimestep::LastStep if !timesteps.is_empty() => Ok(timesteps.len() - 1),
                _ => Err(Error::invalid_argument(
                    "timestep",
                    format!("{timestep} is not one of the scheduler's timesteps"),
                )),
            },
        }
    }

    /// The current step index, found from `timestep` (or the begin index) on first use.
    pub fn current(
        &mut self,
        timesteps: &[f64],
        timestep: f64,
        missing: MissingTimestep,
    ) -> Result<usize> {
        if let Some(i) = self.step_index {
            return Ok(i);
        }
        let i = match self.begin_index {
            Some(b) => b,
            None => Self::index_for_timestep(timesteps, timestep, missing)?,
        };
        self.step_index = Some(i);
        Ok(i)
    }

    /// Move to the next step.
    pub fn advance(&mut self) {
        if let Some(i) = self.step_index.as_mut() {
            *i += 1;
        }
    }

    /// The sigma indices `add_noise` uses for `timesteps` (diffusers: looked up when no begin
    /// index is set, else the current or begin index for the whole batch).
    pub fn noise_indices(
        &self,
        schedule_timesteps: &[f64],
        timesteps: &[f64],
        missing: MissingTimestep,
    ) -> Result<Vec<usize>> {
        match (self.begin_index, self.step_index) {
            (None, _) => timesteps
                .iter()
                .map(|&t| Self::index_for_timestep(schedule_timesteps, t, missing))
                .collect(),
            (Some(_), Some(i)) => Ok(vec![i; timesteps.len()]),
            (Some(b), None) => Ok(vec![b; timesteps.len()]),
        }
    }
}

/// The forward process of the multistep solvers: `alpha_t * original + sigma_t * noise` at the
/// schedule sigma of each timestep (or at the current or begin index once one is set, as
/// diffusers does for image-to-image and inpainting); a timestep not in the schedule uses the
/// last step.
///
/// # Errors
/// [`Error::InvalidArgument`] for mismatched shapes or a timestep count that is neither 1 nor
/// the batch size.
pub(crate) fn add_noise_at_sigmas<const D: usize>(
    cursor: &StepCursor,
    schedule_timesteps: &[f64],
    sigmas: &[f64],
    flow: bool,
    original: Tensor<D>,
    noise: Tensor<D>,
    timesteps: &[f64],
) -> Result<Tensor<D>> {
    crate::ops::check_same_shape(&noise, &original, "noise", "original_samples")?;
    let indices = cursor.noise_indices(schedule_timesteps, timesteps, MissingTimestep::LastStep)?;
    let (alpha, sigma): (Vec<f64>, Vec<f64>) = indices
        .iter()
        .map(|&i| {
            let (a, s) = alpha_sigma(sigmas[i], flow);
            (f64::from(a), f64::from(s))
        })
        .unzip();
    let alpha = crate::ops::batch_coefficients(&alpha, &original)?;
    let sigma = crate::ops::batch_coefficients(&sigma, &original)?;
    Ok(alpha.mul(original).add(sigma.mul(noise)))
}

/// The forward process of the variance-exploding (Karras-style) schedulers:
/// `original + sigma * noise` at the schedule sigma of each timestep (or at the current or
/// begin index once one is set); a timestep not in the schedule is refused.
///
/// # Errors
/// [`Error::InvalidArgument`] for mismatched shapes, a timestep not in the schedule, or a
/// timestep count that is neither 1 nor the batch size.
pub(crate) fn add_noise_ve<const D: usize>(
    cursor: &StepCursor,
    schedule_timesteps: &[f64],
    sigmas: &[f64],
    original: Tensor<D>,
    noise: Tensor<D>,
    timesteps: &[f64],
) -> Result<Tensor<D>> {
    add_noise_ve_with(
        cursor,
        schedule_timesteps,
        sigmas,
        original,
        noise,
        timesteps,
        MissingTimestep::Error,
    )
}

/// [`add_noise_ve`] with a choice of what a timestep not in the schedule means.
///
/// # Errors
/// As [`add_noise_ve`]; a missing timestep only with [`MissingTimestep::Error`].
pub(crate) fn add_noise_ve_with<const D: usize>(
    cursor: &StepCursor,
    schedule_timesteps: &[f64],
    sigmas: &[f64],
    original: Tensor<D>,
    noise: Tensor<D>,
    timesteps: &[f64],
    missing: MissingTimestep,
) -> Result<Tensor<D>> {
    crate::ops::check_same_shape(&noise, &original, "noise", "original_samples")?;
    let indices = cursor.noise_indices(schedule_timesteps, timesteps, missing)?;
    let sigma: Vec<f64> = indices.iter().map(|&i| sigmas[i]).collect();
    let sigma = crate::ops::batch_coefficients(&sigma, &original)?;
    Ok(original.add(noise.mul(sigma)))
}

/// Karras et al.'s churn (algorithm 2, the `s_churn`, `s_tmin`, `s_tmax`, `s_noise` step
/// options of the Euler and Heun samplers): raise the noise level of the current sample from
/// `sigma` to `sigma_hat = sigma * (1 + gamma)` by adding fresh noise.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Churn {
    s_churn: f64,
    s_tmin: f64,
    s_tmax: f64,
    s_noise: f64,
}

impl Churn {
    /// The churn options, with diffusers' defaults (no churn).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `s_churn` when it is negative or NaN.
    pub(crate) fn from_options<const D: usize>(
        options: &crate::StepOptions<'_, D>,
    ) -> Result<Self> {
        let s_churn = options.s_churn.unwrap_or(0.0);
        if s_churn.is_nan() || s_churn < 0.0 {
            return Err(Error::invalid_argument(
                "s_churn",
                format!("{s_churn} must be non-negative"),
            ));
        }
        Ok(Self {
            s_churn,
            s_tmin: options.s_tmin.unwrap_or(0.0),
            s_tmax: options.s_tmax.unwrap_or(f64::INFINITY),
            s_noise: options.s_noise.unwrap_or(1.0),
        })
    }

    /// The churned sample and `sigma_hat` (float32 scalars as diffusers computes them), for a
    /// schedule of `steps` steps; noise is drawn only when `gamma > 0`.
    ///
    /// # Errors
    /// As [`crate::ops::noise_like`] when noise is needed but not given.
    pub(crate) fn apply<const D: usize>(
        &self,
        sample: Tensor<D>,
        sigma: f32,
        steps: usize,
        generator: Option<diffusion_core::NoiseSource<'_>>,
        variance_noise: Option<Tensor<D>>,
        class: &str,
    ) -> Result<(Tensor<D>, f32)> {
        let gamma = if self.s_tmin <= f64::from(sigma) && f64::from(sigma) <= self.s_tmax {
            (self.s_churn / steps as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let sigma_hat = sigma * (gamma + 1.0) as f32;
        if gamma <= 0.0 {
            return Ok((sample, sigma_hat));
        }
        let noise = crate::ops::noise_like(&sample, generator, variance_noise, class)?;
        let eps = noise.mul_scalar(self.s_noise as f32);
        let sample = sample.add(eps.mul_scalar((sigma_hat * sigma_hat - sigma * sigma).sqrt()));
        Ok((sample, sigma_hat))
    }
}

/// Check that a step index leaves a next sigma to step to.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `timestep` when the schedule is exhausted.
pub(crate) fn check_step_in_range(index: usize, sigmas: &[f64], class: &str) -> Result<()> {
    if index + 1 >= sigmas.len() {
        return Err(Error::invalid_argument(
            "timestep",
            format!(
                "{class} has already taken all {} steps of its schedule; call set_timesteps to \
                 start again",
                sigmas.len().saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_hits_grid_points_exactly_and_clamps() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(interp_on_grid(1.0, &fp), 3.0);
        assert_eq!(interp_on_grid(0.5, &fp), 2.0);
        assert_eq!(interp_on_grid(-1.0, &fp), 1.0);
        assert_eq!(interp_on_grid(9.0, &fp), 7.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sigmas = [0.1f32, 0.2, 0.4, 0.8];
        let logs: Vec<f32> = sigmas.iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(0.4, &logs) - 2.0).abs() < 1e-6);
        // Halfway in log space between 0.2 and 0.4.
        assert!((sigma_to_t((0.08f64).sqrt(), &logs) - 1.5).abs() < 1e-6);
        // Beyond the table it clamps.
        assert_eq!(sigma_to_t(10.0, &logs), 3.0);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
    }

    #[test]
    fn karras_ends_at_the_extremes() {
        let s = karras_sigmas(0.03, 14.6, 10);
        assert!((s[0] - 14.6).abs() < 1e-12);
        assert!((s[9] - 0.03).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn beta_sigmas_match_scipy_quantiles() {
        // scipy.stats.beta.ppf(x, 0.6, 0.6) (scipy 1.17.1) at x = 1 - linspace(0, 1, 5).
        let ppf = [
            1.0,
            0.824_319_621_347_305,
            0.5,
            0.175_680_378_652_694_98,
            0.0,
        ];
        let s = beta_sigmas(0.5, 2.5, 5);
        for (got, q) in s.iter().zip(ppf) {
            assert!((got - (0.5 + 2.0 * q)).abs() < 1e-14, "{got} vs {q}");
        }
        assert!(check_one_respacing(true, false, false).is_ok());
        assert_eq!(
            check_one_respacing(true, false, true).unwrap_err().0,
            "use_beta_sigmas"
        );
        assert!(check_one_respacing(true, true, false).is_err());
    }

    #[test]
    fn repeated_timesteps_resolve_to_the_second_match() {
        let ts = [999.0, 500.0, 500.0, 0.0];
        let i = StepCursor::index_for_timestep(&ts, 500.0, MissingTimestep::Error).unwrap();
        assert_eq!(i, 2);
        assert!(StepCursor::index_for_timestep(&ts, 3.0, MissingTimestep::Error).is_err());
        let i = StepCursor::index_for_timestep(&ts, 3.0, MissingTimestep::LastStep).unwrap();
        assert_eq!(i, 3);
    }
}
