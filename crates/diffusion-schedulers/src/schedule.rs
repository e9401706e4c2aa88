//! Schedule maths shared by the schedulers: beta schedules, zero-terminal-SNR rescaling and
//! timestep spacing, all on the host.
//!
//! diffusers builds `betas` and `alphas_cumprod` as float32 tensors, so its schedules carry
//! float32 rounding. The functions here round at the same points (torch's `linspace` is
//! `fma`-based on CPU, its `cumprod` accumulates in double and rounds every output) and then
//! widen to `f64`, so that our schedules equal diffusers' to the last bit rather than being
//! "more exact" and drifting from the reference by ~1e-5 over a long chain. (Zero-SNR rescaling
//! and the sigmoid schedule go through torch's CPU `sqrt`/`exp`, which are not correctly
//! rounded; there we are within a few ulps.)

use diffusion_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// How `betas` are laid out over the training timesteps (`beta_schedule` in configs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BetaSchedule {
    /// Evenly spaced betas from `beta_start` to `beta_end`.
    #[serde(rename = "linear")]
    Linear,
    /// Evenly spaced square roots of the betas (Stable Diffusion's schedule).
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// Nichol & Dhariwal's cosine schedule, betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// A sigmoid ramp from `beta_start` to `beta_end` (DDPM, RePaint).
    #[serde(rename = "sigmoid")]
    Sigmoid,
    /// The Laplace alpha-bar schedule (DDPM).
    #[serde(rename = "laplace")]
    Laplace,
    /// `alpha_bar(t) = exp(-12 t)` (Heun).
    #[serde(rename = "exp")]
    Exp,
}

impl BetaSchedule {
    /// The string used in `scheduler_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::ScaledLinear => "scaled_linear",
            Self::SquaredcosCapV2 => "squaredcos_cap_v2",
            Self::Sigmoid => "sigmoid",
            Self::Laplace => "laplace",
            Self::Exp => "exp",
        }
    }
}

/// What the model predicts (`prediction_type` in configs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PredictionType {
    /// The noise that was added.
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The clean sample itself.
    #[serde(rename = "sample")]
    Sample,
    /// The velocity `sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * sample` (Imagen Video).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The flow-matching velocity (DPM-Solver with flow models).
    #[serde(rename = "flow_prediction")]
    FlowPrediction,
    /// Euler's older spelling of `sample`.
    #[serde(rename = "original_sample")]
    OriginalSample,
}

impl PredictionType {
    /// The string used in `scheduler_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::Sample => "sample",
            Self::VPrediction => "v_prediction",
            Self::FlowPrediction => "flow_prediction",
            Self::OriginalSample => "original_sample",
        }
    }
}

/// How inference timesteps are picked among the training ones (`timestep_spacing`), see table 2
/// of "Common Diffusion Noise Schedules and Sample Steps are Flawed".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimestepSpacing {
    /// Evenly spaced from `num_train_timesteps - 1` down to 0, rounded.
    #[serde(rename = "linspace")]
    Linspace,
    /// Multiples of `num_train_timesteps / steps` starting at 0, plus `steps_offset`.
    #[serde(rename = "leading")]
    Leading,
    /// Evenly spaced down from `num_train_timesteps - 1`, so the first step is the noisiest.
    #[serde(rename = "trailing")]
    Trailing,
}

impl TimestepSpacing {
    /// The string used in `scheduler_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linspace => "linspace",
            Self::Leading => "leading",
            Self::Trailing => "trailing",
        }
    }
}

/// `alpha_bar(t)` of the continuous schedules discretised by [`betas_for_alpha_bar`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlphaTransform {
    /// `cos((t + 0.008) / 1.008 * pi / 2)^2`.
    Cosine,
    /// `exp(-12 t)`.
    Exp,
    /// The Laplace schedule of "Improved Noise Schedule for Diffusion Training".
    Laplace,
}

/// The training noise schedule: betas and their cumulative products, float32-exact as in
/// diffusers, widened to `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    /// `beta_t` for every training timestep.
    pub betas: Vec<f64>,
    /// `1 - beta_t`.
    pub alphas: Vec<f64>,
    /// `prod_{s <= t} alpha_s`.
    pub alphas_cumprod: Vec<f64>,
}

/// The fields of a scheduler config that define its training noise schedule.
#[derive(Clone, Copy, Debug)]
pub struct BetaConfig<'a> {
    /// `num_train_timesteps`.
    pub num_train_timesteps: usize,
    /// `beta_start`.
    pub beta_start: f64,
    /// `beta_end`.
    pub beta_end: f64,
    /// `beta_schedule`.
    pub beta_schedule: BetaSchedule,
    /// `trained_betas`, which override the schedule when present.
    pub trained_betas: Option<&'a [f64]>,
    /// `rescale_betas_zero_snr`.
    pub rescale_betas_zero_snr: bool,
}

impl NoiseSchedule {
    /// Build the schedule as diffusers' `__init__` does.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for zero timesteps, `trained_betas` of the wrong length, or
    /// betas outside `[0, 1]`.
    pub fn new(config: &BetaConfig<'_>) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n == 0 {
            return Err(Error::invalid_argument(
                "num_train_timesteps",
                "must be at least 1",
            ));
        }
        let mut betas: Vec<f32> = match config.trained_betas {
            Some(trained) => {
                if trained.len() != n {
                    return Err(Error::invalid_argument(
                        "trained_betas",
                        format!(
                            "has {} values but num_train_timesteps is {n}",
                            trained.len()
                        ),
                    ));
                }
                trained.iter().map(|&b| b as f32).collect()
            }
            None => beta_schedule_f32(config.beta_schedule, config.beta_start, config.beta_end, n),
        };
        if let Some(bad) = betas.iter().find(|b| !(0.0..=1.0).contains(*b)) {
            return Err(Error::invalid_argument(
                "betas",
                format!(
                    "every beta must lie in [0, 1], got {bad} (beta_schedule {}, beta_start {}, \
                     beta_end {})",
                    config.beta_schedule.as_str(),
                    config.beta_start,
                    config.beta_end
                ),
            ));
        }
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr_f32(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod_f32(&alphas);
        // When alpha_bar underflows float32 before the last step, the rescaling divides zero
        // by zero; diffusers would go on with NaN.
        if config.rescale_betas_zero_snr
            && let Some(t) = betas.iter().position(|b| !b.is_finite())
        {
            return Err(Error::invalid_argument(
                "rescale_betas_zero_snr",
                format!(
                    "alpha_bar underflows float32 before the last timestep (beta_{t} becomes \
                     NaN); this beta schedule cannot be rescaled to zero terminal SNR"
                ),
            ));
        }
        Ok(Self {
            betas: betas.iter().map(|&b| f64::from(b)).collect(),
            alphas: alphas.iter().map(|&a| f64::from(a)).collect(),
            alphas_cumprod: alphas_cumprod.iter().map(|&a| f64::from(a)).collect(),
        })
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Whether the schedule is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// `alphas_cumprod[t]` for an integral training timestep.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `timestep` when `t` is not an integer in range.
    pub fn alpha_cumprod_at(&self, t: f64) -> Result<f64> {
        Ok(self.alphas_cumprod[self.index_of(t, "timestep")?])
    }

    /// The training index of an integral timestep given as `f64`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `name` when `t` is not an integer in `[0, len)`.
    pub fn index_of(&self, t: f64, name: &str) -> Result<usize> {
        if t.fract() != 0.0 || t < 0.0 || t >= self.len() as f64 {
            return Err(Error::invalid_argument(
                name,
                format!(
                    "{t} is not a training timestep; expected an integer in [0, {})",
                    self.len()
                ),
            ));
        }
        Ok(t as usize)
    }
}

/// Betas for the named schedule in float32, as torch computes them.
fn beta_schedule_f32(schedule: BetaSchedule, start: f64, end: f64, n: usize) -> Vec<f32> {
    match schedule {
        BetaSchedule::Linear => torch_linspace_f32(start, end, n),
        BetaSchedule::ScaledLinear => torch_linspace_f32(start.sqrt(), end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n, 0.999, AlphaTransform::Cosine),
        BetaSchedule::Exp => betas_for_alpha_bar(n, 0.999, AlphaTransform::Exp),
        BetaSchedule::Laplace => betas_for_alpha_bar(n, 0.999, AlphaTransform::Laplace),
        BetaSchedule::Sigmoid => {
            // torch multiplies by the float32-rounded python scalars.
            let scale = (end - start) as f32;
            let offset = start as f32;
            torch_linspace_f32(-6.0, 6.0, n)
                .into_iter()
                .map(|x| (1.0 / (1.0 + (-x).exp())) * scale + offset)
                .collect()
        }
    }
}

/// Discretise a continuous `alpha_bar(t)` on `[0, 1]` into `n` betas, each capped at `max_beta`
/// (diffusers' `betas_for_alpha_bar`: computed in `f64`, stored as float32).
pub fn betas_for_alpha_bar(n: usize, max_beta: f64, transform: AlphaTransform) -> Vec<f32> {
    let alpha_bar = |t: f64| -> f64 {
        match transform {
            AlphaTransform::Cosine => ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                .cos()
                .powi(2),
            AlphaTransform::Exp => (t * -12.0).exp(),
            AlphaTransform::Laplace => {
                let lmb = -0.5 * 1f64.copysign(0.5 - t) * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
                let snr = lmb.exp();
                (snr / (1.0 + snr)).sqrt()
            }
        }
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)` on CPU: the endpoints are rounded to float32,
/// the first half counts up from `start` and the second half down from `end`, each value one
/// fused multiply-add (which is what torch's CPU kernel compiles to).
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f32;
            let halfway = n / 2;
            (0..n)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod` of a float32 vector on CPU: accumulated in `f64`, every output rounded.
fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// Rescale betas so that the last timestep has zero signal-to-noise ratio (algorithm 1 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed"), in `f64`.
///
/// Returns `betas` unchanged when it has fewer than two entries (the rescaling divides by the
/// gap between the first and last `sqrt(alpha_bar)`).
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    if betas.len() < 2 {
        return betas.to_vec();
    }
    let mut acc = 1.0;
    let mut sqrt_bar: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            f64::sqrt(acc)
        })
        .collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for v in &mut sqrt_bar {
        *v = (*v - last) * scale;
    }
    alphas_bar_to_betas(sqrt_bar.iter().map(|s| s * s).collect())
}

fn alphas_bar_to_betas(alphas_bar: Vec<f64>) -> Vec<f64> {
    let mut betas = Vec::with_capacity(alphas_bar.len());
    betas.push(1.0 - alphas_bar[0]);
    for w in alphas_bar.windows(2) {
        betas.push(1.0 - w[1] / w[0]);
    }
    betas
}

/// [`rescale_zero_terminal_snr`] with diffusers' float32 rounding at every tensor operation.
fn rescale_zero_terminal_snr_f32(betas: &[f32]) -> Vec<f32> {
    if betas.len() < 2 {
        return betas.to_vec();
    }
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    // torch subtracts in place first, then multiplies by a 0-d float32 ratio.
    let scale = first / (first - last);
    for v in &mut sqrt_bar {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// Check a requested number of inference steps against the training schedule.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `num_inference_steps` when it is 0 or larger than
/// `num_train_timesteps`.
pub fn check_num_inference_steps(
    num_inference_steps: usize,
    num_train_timesteps: usize,
) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::invalid_argument(
            "num_inference_steps",
            "must be at least 1",
        ));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::invalid_argument(
            "num_inference_steps",
            format!(
                "{num_inference_steps} is larger than num_train_timesteps \
                 ({num_train_timesteps}): the model was trained on at most that many timesteps"
            ),
        ));
    }
    Ok(())
}

/// The integer timesteps of DDPM/DDIM-style schedulers, noisiest first.
///
/// `steps_offset` only applies to `leading` spacing, as in diffusers.
///
/// diffusers builds `trailing` timesteps with `np.arange(n, 0, -n / steps)`, whose length is
/// computed in floating point and comes out one too long for some step counts (61 of 1000
/// gives 62 timesteps ending in -1). The values are reproduced exactly, but only the requested
/// count is kept.
///
/// # Errors
/// As [`check_num_inference_steps`]; [`Error::InvalidArgument`] naming `steps_offset` when it
/// pushes a `leading` timestep past the training range.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<i64>> {
    check_num_inference_steps(num_inference_steps, num_train_timesteps)?;
    let n = num_train_timesteps;
    let k = num_inference_steps;
    let timesteps: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, (n - 1) as f64, k)
            .into_iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (n / k) as i64;
            (0..k as i64)
                .rev()
                .map(|i| i * ratio + steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / k as f64;
            numpy_arange(n as f64, 0.0, -ratio)
                .into_iter()
                .take(k)
                .map(|v| v.round_ties_even() as i64 - 1)
                .collect()
        }
    };
    if let Some(&first) = timesteps.first()
        && first >= n as i64
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
    Ok(timesteps)
}

/// `np.linspace(start, stop, num)` with its exact arithmetic: `i * step + start`, the last value
/// set to `stop`.
pub fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            out[num - 1] = stop;
            out
        }
    }
}

/// `np.arange(start, stop, step)` for floats with its exact arithmetic: the length is
/// `ceil((stop - start) / step)` and element `i` is `start + i * ((start + step) - start)`.
pub fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 || step == 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// A config value outside the subset one scheduler class supports, as the `(field, message)`
/// pair of [`diffusion_core::Config::validate`].
pub(crate) fn check_allowed<T: Copy + PartialEq>(
    class: &str,
    field: &str,
    value: T,
    allowed: &[T],
    name: fn(T) -> &'static str,
) -> std::result::Result<(), (String, String)> {
    if allowed.contains(&value) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(|&v| name(v)).collect();
    Err((
        field.to_string(),
        format!(
            "`{}` is not supported by {class}; expected one of {}",
            name(value),
            names.join(", ")
        ),
    ))
}

/// The checks every DDPM-style config shares: a non-empty schedule, a quantile in `[0, 1]`, a
/// positive threshold and clip range where they are used.
pub(crate) fn check_common(
    num_train_timesteps: usize,
    thresholding: bool,
    dynamic_thresholding_ratio: f64,
    sample_max_value: f64,
    clip_sample: bool,
    clip_sample_range: f64,
) -> std::result::Result<(), (String, String)> {
    if num_train_timesteps == 0 {
        return Err(("num_train_timesteps".into(), "must be at least 1".into()));
    }
    if thresholding {
        if !(0.0..=1.0).contains(&dynamic_thresholding_ratio) {
            return Err((
                "dynamic_thresholding_ratio".into(),
                format!("{dynamic_thresholding_ratio} is not a quantile in [0, 1]"),
            ));
        }
        if sample_max_value.is_nan() || sample_max_value <= 0.0 {
            return Err((
                "sample_max_value".into(),
                format!("{sample_max_value} must be positive"),
            ));
        }
    } else if clip_sample && (clip_sample_range.is_nan() || clip_sample_range < 0.0) {
        return Err((
            "clip_sample_range".into(),
            format!("{clip_sample_range} must be non-negative"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_with_offset_matches_diffusers_docstring_example() {
        // diffusers' DDIM test: steps_offset=1 with 5 steps gives [801, 601, 401, 201, 1].
        let ts = spaced_timesteps(TimestepSpacing::Leading, 1000, 5, 1).unwrap();
        assert_eq!(ts, vec![801, 601, 401, 201, 1]);
    }

    #[test]
    fn trailing_keeps_the_requested_count_where_numpy_overshoots() {
        // np.arange(1000, 0, -1000/61) has 62 elements; the extra one would be timestep -1.
        assert_eq!(numpy_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        let ts = spaced_timesteps(TimestepSpacing::Trailing, 1000, 61, 0).unwrap();
        assert_eq!(ts.len(), 61);
        assert_eq!(ts[0], 999);
        assert!(ts.iter().all(|&t| t >= 0));
    }

    #[test]
    fn linspace_single_step_is_zero() {
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Linspace, 1000, 1, 0).unwrap(),
            vec![0]
        );
    }

    #[test]
    fn bad_step_counts_are_errors() {
        for k in [0, 1001] {
            let err = spaced_timesteps(TimestepSpacing::Leading, 1000, k, 0).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { ref name, .. } if name == "num_inference_steps")
            );
        }
        let err = spaced_timesteps(TimestepSpacing::Leading, 1000, 10, 100).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref name, .. } if name == "steps_offset"));
    }

    #[test]
    fn torch_linspace_endpoints_are_exact() {
        let v = torch_linspace_f32(1e-4, 0.02, 1000);
        assert_eq!(v[0], 1e-4f32);
        assert_eq!(v[999], 0.02f32);
        assert_eq!(torch_linspace_f32(3.0, 5.0, 1), vec![3.0]);
    }

    #[test]
    fn f32_and_f64_zero_snr_rescaling_agree() {
        // Compare sqrt(alpha_bar), the quantity the algorithm shifts and scales linearly: it is
        // well conditioned, whereas the small betas recovered from it carry float32
        // cancellation (1 - 0.99915 loses ~4 digits) in diffusers' own computation.
        let betas = torch_linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000)
            .into_iter()
            .map(|b| b * b)
            .collect::<Vec<_>>();
        let sqrt_bar = |betas: Vec<f64>| -> Vec<f64> {
            let mut acc = 1.0;
            betas
                .iter()
                .map(|b| {
                    acc *= 1.0 - b;
                    f64::sqrt(acc)
                })
                .collect()
        };
        let a = sqrt_bar(
            rescale_zero_terminal_snr_f32(&betas)
                .into_iter()
                .map(f64::from)
                .collect(),
        );
        let b = sqrt_bar(rescale_zero_terminal_snr(
            &betas.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
        ));
        assert_eq!(a[999], 0.0);
        assert!(b[999].abs() < 1e-7);
        // The first value is kept: only the tail is pulled down to zero.
        assert!((b[0] - (1.0 - f64::from(betas[0])).sqrt()).abs() < 1e-12);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 2e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn trained_betas_must_match_the_timestep_count() {
        let betas = [0.1, 0.2];
        let err = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: 3,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: Some(&betas),
            rescale_betas_zero_snr: false,
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref name, .. } if name == "trained_betas"));
    }

    #[test]
    fn betas_above_one_are_rejected() {
        // diffusers' own test grid has beta_end = 2 for the linear schedule; alphas go negative.
        let err = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: 1000,
            beta_start: 0.1,
            beta_end: 2.0,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref name, .. } if name == "betas"));
    }
}
