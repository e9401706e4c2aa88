//! Host maths shared by the sigma-parameterised (Karras-style) schedulers: the training sigma
//! table, numpy's `interp`, sigma-to-timestep inversion, Karras/exponential/Lu spacings, and the
//! step cursor of stateful schedulers.
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
    fn repeated_timesteps_resolve_to_the_second_match() {
        let ts = [999.0, 500.0, 500.0, 0.0];
        let i = StepCursor::index_for_timestep(&ts, 500.0, MissingTimestep::Error).unwrap();
        assert_eq!(i, 2);
        assert!(StepCursor::index_for_timestep(&ts, 3.0, MissingTimestep::Error).is_err());
        let i = StepCursor::index_for_timestep(&ts, 3.0, MissingTimestep::LastStep).unwrap();
        assert_eq!(i, 3);
    }
}
