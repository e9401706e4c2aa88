//! UniPC, the unified predictor-corrector multistep sampler of Zhao et al. (2023)
//! (diffusers' `schedulers/scheduling_unipc_multistep.py`; A1111's "UniPC").
//!
//! Every step first corrects the sample the previous step predicted (UniC, using the model
//! output just computed at it), then predicts the next sample (UniP). Both are B(h) updates on
//! the log-SNR axis whose coefficients solve a small Vandermonde-like system; the maths is
//! float32 throughout, as diffusers evaluates it on 0-d tensors.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ops::{self, Stored};
use crate::schedule::{
    self, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, numpy_linspace,
};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_dpmsolver_multistep::{SolverType, TimeShiftType};
use crate::sigmas::{self, FinalSigmasType, MissingTimestep, StepCursor, check_step_in_range};

/// The config of [`UniPCMultistepScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UniPCMultistepSchedulerConfig {
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
    /// Order of the predictor (the corrector adds one); 2 for guided sampling, 3 otherwise.
    pub solver_order: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of the predicted `x_0` (pixel-space models only).
    pub thresholding: bool,
    /// Quantile used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// Run the updates on the data prediction `x_0` (UniPC's default) instead of the noise.
    pub predict_x0: bool,
    /// `bh1` (`B(h) = h`, for few-step unconditional sampling) or `bh2` (`B(h) = e^h - 1`).
    /// DPM-Solver's names are accepted as diffusers accepts them, and read as `bh2`.
    pub solver_type: SolverType,
    /// Lower the order over the last steps.
    pub lower_order_final: bool,
    /// Step indices whose corrector is skipped (the corrector of step `i` runs at step
    /// `i + 1`).
    pub disable_corrector: Vec<usize>,
    /// Another scheduler as predictor (not supported by this port: it must be `null`).
    pub solver_p: Option<Value>,
    /// Use the Karras et al. noise levels.
    pub use_karras_sigmas: bool,
    /// Use noise levels evenly spaced in log-sigma.
    pub use_exponential_sigmas: bool,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: bool,
    /// Use flow-matching sigmas.
    pub use_flow_sigmas: bool,
    /// The shift of flow-matching sigmas.
    pub flow_shift: f64,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
    /// The last sigma of the schedule.
    pub final_sigmas_type: FinalSigmasType,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// Shift flow sigmas by `mu` given at `set_timesteps`.
    pub use_dynamic_shifting: bool,
    /// How `mu` shifts flow sigmas.
    pub time_shift_type: TimeShiftType,
    /// Lower end of Karras/exponential/beta sigmas (the schedule's smallest sigma when `None`).
    pub sigma_min: Option<f64>,
    /// Upper end of Karras/exponential/beta sigmas (the schedule's largest sigma when `None`).
    pub sigma_max: Option<f64>,
    /// Stretch flow sigmas so that the last one equals this.
    pub shift_terminal: Option<f64>,
}

impl Default for UniPCMultistepSchedulerConfig {
    /// The `__init__` defaults of diffusers' `UniPCMultistepScheduler`
    /// (schedulers/scheduling_unipc_multistep.py).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            predict_x0: true,
            solver_type: SolverType::Bh2,
            lower_order_final: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
            sigma_min: None,
            sigma_max: None,
            shift_terminal: None,
        }
    }
}

impl Config for UniPCMultistepSchedulerConfig {
    const CLASS_NAME: &'static str = "UniPCMultistepScheduler";

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
        let mut predictions = vec![
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ];
        if self.predict_x0 {
            predictions.push(PredictionType::FlowPrediction);
        }
        schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &predictions,
            PredictionType::as_str,
        )?;
        let field = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if self.solver_order == 0 {
            return field("solver_order", "must be at least 1");
        }
        if self.solver_p.as_ref().is_some_and(|v| !v.is_null()) {
            return field(
                "solver_p",
                "an external predictor scheduler is not supported by this port",
            );
        }
        sigmas::check_one_respacing(
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        )?;
        if self.shift_terminal.is_some() && !self.use_flow_sigmas {
            return field(
                "shift_terminal",
                "shift_terminal needs use_flow_sigmas = true",
            );
        }
        if self.thresholding && !self.predict_x0 {
            return field(
                "thresholding",
                "thresholding acts on x_0 and needs predict_x0 = true (diffusers ignores it)",
            );
        }
        // A final sigma of 0 makes the log-SNR infinite; only the bh2 data-prediction update
        // has a finite limit there. diffusers returns NaN at the last step otherwise.
        if self.final_sigmas_type == FinalSigmasType::Zero
            && (!self.predict_x0 || self.solver_type == SolverType::Bh1)
        {
            return field(
                "final_sigmas_type",
                "`zero` gives NaN at the last step with solver_type bh1 or predict_x0 = false \
                 (as in diffusers); use `sigma_min`",
            );
        }
        if self.final_sigmas_type == FinalSigmasType::Zero
            && !self.lower_order_final
            && self.solver_order >= 2
        {
            return field(
                "lower_order_final",
                "a multistep last step onto sigma 0 divides by an infinite log-SNR step (diffusers \
                 returns -inf, or fails on a singular system from order 3); keep \
                 lower_order_final = true or use final_sigmas_type `sigma_min`",
            );
        }
        schedule::check_common(
            self.num_train_timesteps,
            self.thresholding,
            self.dynamic_thresholding_ratio,
            self.sample_max_value,
            false,
            0.0,
        )
    }
}

/// The UniPC multistep sampler.
///
/// Stateful: it keeps the last `solver_order` converted model outputs, the sample before the
/// last prediction (for the corrector) and the step index; the first `step` after
/// `set_timesteps` finds its place from the timestep (the last step when the timestep is not
/// in the schedule, as in diffusers) or the begin index. Deterministic: `step` takes no
/// options. [`StepOutput::pred_original_sample`] is `None`, as in diffusers.
#[derive(Clone, Debug)]
pub struct UniPCMultistepScheduler {
    file: ConfigFile<UniPCMultistepSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Stored>>,
    last_sample: Option<Stored>,
    this_order: usize,
    lower_order_nums: usize,
    cursor: StepCursor,
}

impl UniPCMultistepScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: UniPCMultistepSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// `alpha_t`, `sigma_t` and the log-SNR `lambda_t` at schedule position `i` (float32).
    fn point(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = sigmas::alpha_sigma(self.sigmas[i], self.config().use_flow_sigmas);
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// diffusers' `convert_model_output`: `x_0` when `predict_x0`, else the noise.
    fn convert_model_output<const D: usize>(
        &self,
        model_output: Tensor<D>,
        sample: &Tensor<D>,
        i: usize,
    ) -> Result<Tensor<D>> {
        let c = self.config();
        ops::check_same_shape(&model_output, sample, "model_output", "sample")?;
        let (alpha_t, sigma_t, _) = self.point(i);
        let converted = match (c.predict_x0, c.prediction_type) {
            (true, PredictionType::Epsilon) => sample
                .clone()
                .sub(model_output.mul_scalar(sigma_t))
                .div_scalar(alpha_t),
            (true, PredictionType::Sample) | (false, PredictionType::Epsilon) => model_output,
            (true, PredictionType::VPrediction) => sample
                .clone()
                .mul_scalar(alpha_t)
                .sub(model_output.mul_scalar(sigma_t)),
            (true, PredictionType::FlowPrediction) => sample
                .clone()
                .sub(model_output.mul_scalar(self.sigmas[i] as f32)),
            (false, PredictionType::Sample) => sample
                .clone()
                .sub(model_output.mul_scalar(alpha_t))
                .div_scalar(sigma_t),
            (false, PredictionType::VPrediction) => model_output
                .mul_scalar(alpha_t)
                .add(sample.clone().mul_scalar(sigma_t)),
            (_, other) => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!(
                        "{} does not support {}",
                        UniPCMultistepSchedulerConfig::CLASS_NAME,
                        other.as_str()
                    ),
                ));
            }
        };
        if c.thresholding {
            return ops::threshold_sample(
                converted,
                c.dynamic_thresholding_ratio,
                c.sample_max_value,
            );
        }
        Ok(converted)
    }

    /// The B(h) update from schedule position `s0` to `t` of `order`, given the converted
    /// outputs (newest last) at positions `s0, s0 - 1, ...`. With `this_output` (the model
    /// output at `t`) it is the corrector UniC, else the predictor UniP.
    fn bh_update<const D: usize>(
        &self,
        s0: usize,
        t: usize,
        order: usize,
        outputs: &[Tensor<D>],
        x: Tensor<D>,
        this_output: Option<Tensor<D>>,
    ) -> Tensor<D> {
        let c = self.config();
        let (alpha_t, sigma_t, lambda_t) = self.point(t);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(s0);
        let h = lambda_t - lambda_s0;
        let m0 = outputs[outputs.len() - 1].clone();
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let (_, _, lambda_sk) = self.point(s0 - k);
            let rk = (lambda_sk - lambda_s0) / h;
            rks.push(rk);
            d1s.push(
                outputs[outputs.len() - 1 - k]
                    .clone()
                    .sub(m0.clone())
                    .div_scalar(rk),
            );
        }
        rks.push(1.0);

        let hh = if c.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = match c.solver_type {
            SolverType::Bh1 => hh,
            _ => hh.exp_m1(),
        };
        // R[i][k] = rks[k]^i and b[i] = i! * phi_{i+1}(hh) / B(h), float32 as diffusers.
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1u64;
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(
                rks.iter()
                    .map(|&rk| pow_f32(rk, i - 1))
                    .collect::<Vec<f32>>(),
            );
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= (i + 1) as u64;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }

        let (signal, output_coeff) = if c.predict_x0 {
            (sigma_t / sigma_s0, alpha_t)
        } else {
            (alpha_t / alpha_s0, sigma_t)
        };
        let x_t = x
            .mul_scalar(signal)
            .sub(m0.clone().mul_scalar(output_coeff * h_phi_1));
        let weighted = |rhos: &[f32]| -> Option<Tensor<D>> {
            rhos.iter()
                .zip(&d1s)
                .map(|(&rho, d)| d.clone().mul_scalar(rho))
                .reduce(|acc, term| acc.add(term))
        };
        let correction = match this_output {
            None => {
                // The predictor of order 2 uses rho = 1/2 rather than solving.
                let rhos = match order {
                    1 => Vec::new(),
                    2 => vec![0.5],
                    _ => solve_f32(&leading_minor(&r, order - 1), &b[..order - 1]),
                };
                weighted(&rhos)
            }
            Some(model_t) => {
                let rhos = if order == 1 {
                    vec![0.5]
                } else {
                    solve_f32(&r, &b)
                };
                let d1_t = model_t.sub(m0).mul_scalar(rhos[order - 1]);
                Some(match weighted(&rhos[..order - 1]) {
                    Some(res) => res.add(d1_t),
                    None => d1_t,
                })
            }
        };
        match correction {
            Some(res) => x_t.sub(res.mul_scalar(output_coeff * b_h)),
            None => x_t,
        }
    }
}

/// `torch.pow(x, e)` for a small integral exponent, by repeated multiplication as torch does.
fn pow_f32(x: f32, e: usize) -> f32 {
    match e {
        0 => 1.0,
        1 => x,
        2 => x * x,
        3 => x * x * x,
        _ => x.powi(e as i32),
    }
}

/// The top-left `n x n` block of `m`.
fn leading_minor(m: &[Vec<f32>], n: usize) -> Vec<Vec<f32>> {
    m[..n].iter().map(|row| row[..n].to_vec()).collect()
}

/// Solve `a x = b` in float32 by LU with partial pivoting, as LAPACK's `sgesv` (what
/// `torch.linalg.solve` calls on CPU) does for these small systems.
fn solve_f32(a: &[Vec<f32>], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let mut a: Vec<Vec<f32>> = a.to_vec();
    let mut x = b.to_vec();
    for col in 0..n {
        let pivot = (col..n).fold(col, |best, row| {
            if a[row][col].abs() > a[best][col].abs() {
                row
            } else {
                best
            }
        });
        a.swap(col, pivot);
        x.swap(col, pivot);
        let inv = 1.0 / a[col][col];
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let l = row[col] * inv;
            for (v, p) in row[col + 1..].iter_mut().zip(&pivot_row[col + 1..]) {
                *v -= l * p;
            }
            x[col + 1 + offset] -= l * x[col];
        }
    }
    for row in (0..n).rev() {
        let mut v = x[row];
        for (coeff, known) in a[row][row + 1..].iter().zip(&x[row + 1..]) {
            v -= coeff * known;
        }
        x[row] = v / a[row][row];
    }
    x
}

impl ConfiguredScheduler for UniPCMultistepScheduler {
    type Config = UniPCMultistepSchedulerConfig;

    fn from_config_file(mut file: ConfigFile<UniPCMultistepSchedulerConfig>) -> Result<Self> {
        // diffusers rewrites DPM-Solver's and DEIS's solver names in its config.
        if !matches!(file.config.solver_type, SolverType::Bh1 | SolverType::Bh2) {
            file.config.solver_type = SolverType::Bh2;
        }
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(UniPCMultistepSchedulerConfig::CLASS_NAME, e))?;
        let schedule = crate::scheduler::noise_schedule_of!(c, c.rescale_betas_zero_snr)?;
        let sigma_table = sigmas::sigma_table(&schedule, c.rescale_betas_zero_snr);
        let log_sigmas = sigma_table.iter().map(|s| s.ln()).collect();
        let n = c.num_train_timesteps;
        Ok(Self {
            file,
            schedule,
            sigmas: sigma_table.iter().map(|&s| f64::from(s)).collect(),
            sigma_table,
            log_sigmas,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            num_inference_steps: None,
            model_outputs: Vec::new(),
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
            cursor: StepCursor::default(),
        })
    }

    fn config_file(&self) -> &ConfigFile<UniPCMultistepSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for UniPCMultistepScheduler {
    crate::scheduler::stateful_scheduler_accessors!(unit_noise);

    /// A step count, or custom sigmas (noisiest first, with flow sigmas only). `mu` is
    /// required exactly when `use_dynamic_shifting` is on; it shifts flow sigmas.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let class = self.class_name();
        request.accept_only(class, &["num_inference_steps", "sigmas", "mu"])?;
        let c = self.config().clone();
        let n = c.num_train_timesteps;
        match (c.use_dynamic_shifting, request.mu) {
            (true, None) => {
                return Err(Error::invalid_argument(
                    "mu",
                    "use_dynamic_shifting = true needs mu at set_timesteps",
                ));
            }
            (false, Some(_)) => {
                return Err(Error::invalid_argument(
                    "mu",
                    "mu needs use_dynamic_shifting = true in the config",
                ));
            }
            _ => {}
        }
        let (k, custom) = match (request.num_inference_steps, request.sigmas) {
            (Some(k), None) => (k, None),
            (None, Some(custom)) => {
                if !c.use_flow_sigmas
                    || c.use_karras_sigmas
                    || c.use_exponential_sigmas
                    || c.use_beta_sigmas
                {
                    return Err(Error::invalid_argument(
                        "sigmas",
                        "custom sigmas need use_flow_sigmas = true (without Karras, \
                         exponential or beta sigmas)",
                    ));
                }
                if custom.is_empty() || custom.iter().any(|s| !(*s > 0.0 && *s <= 1.0)) {
                    return Err(Error::invalid_argument(
                        "sigmas",
                        "need at least one flow sigma, each in (0, 1]",
                    ));
                }
                (custom.len(), Some(custom))
            }
            (None, None) => {
                return Err(Error::invalid_argument(
                    "num_inference_steps",
                    "pass a step count or custom sigmas",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(Error::invalid_argument(
                    "sigmas",
                    "pass either num_inference_steps or custom sigmas, not both",
                ));
            }
        };
        let spaced = sigmas::multistep_timesteps(c.timestep_spacing, n, n, k, c.steps_offset)?;

        let table_min = f64::from(self.sigma_table[0]);
        let table_max = f64::from(self.sigma_table[n - 1]);
        let sigma_min = c.sigma_min.unwrap_or(table_min);
        let sigma_max = c.sigma_max.unwrap_or(table_max);
        let to_t = |s: &f64| sigmas::sigma_to_t(*s, &self.log_sigmas);
        // (timesteps, sigmas, the sigma appended for `sigma_min`)
        let (timesteps, sigmas, last_min): (Vec<f64>, Vec<f64>, f64) = if c.use_karras_sigmas {
            let s = sigmas::karras_sigmas(sigma_min, sigma_max, k);
            if c.use_flow_sigmas {
                let s: Vec<f64> = s.iter().map(|s| s / (s + 1.0)).collect();
                let last = s[k - 1];
                (s.iter().map(|s| s * n as f64).collect(), s, last)
            } else {
                let last = s[k - 1];
                (
                    s.iter().map(to_t).map(f64::round_ties_even).collect(),
                    s,
                    last,
                )
            }
        } else if c.use_exponential_sigmas {
            let s = sigmas::exponential_sigmas(sigma_min, sigma_max, k);
            let last = s[k - 1];
            (s.iter().map(to_t).collect(), s, last)
        } else if c.use_beta_sigmas {
            let s = sigmas::beta_sigmas(sigma_min, sigma_max, k);
            let last = s[k - 1];
            (s.iter().map(to_t).collect(), s, last)
        } else if c.use_flow_sigmas {
            let base = custom.unwrap_or_else(|| {
                let mut v = numpy_linspace(1.0, 1.0 / n as f64, k + 1);
                v.truncate(k);
                v
            });
            let mut s: Vec<f64> = match request.mu {
                Some(mu) => base
                    .iter()
                    .map(|&t| mu.exp() / (mu.exp() + (1.0 / t - 1.0)))
                    .collect(),
                None => {
                    let shift = c.flow_shift;
                    base.iter()
                        .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
                        .collect()
                }
            };
            if let Some(terminal) = c.shift_terminal {
                let scale = (1.0 - s[k - 1]) / (1.0 - terminal);
                for v in &mut s {
                    *v = 1.0 - (1.0 - *v) / scale;
                }
            }
            // diffusers keeps the first flow sigma off 1, where log(alpha) is -inf.
            if (s[0] - 1.0).abs() < 1e-6 {
                s[0] -= 1e-6;
            }
            let last = s[k - 1];
            (s.iter().map(|s| s * n as f64).collect(), s, last)
        } else {
            let s = spaced
                .iter()
                .map(|&t| sigmas::interp_on_grid(t, &self.sigma_table))
                .collect();
            (spaced, s, table_min)
        };
        let sigma_last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => last_min,
        };
        // Timesteps become int64 (truncating); sigmas float32.
        self.timesteps = timesteps.iter().map(|t| t.trunc()).collect();
        self.sigmas = sigmas
            .iter()
            .chain(std::iter::once(&sigma_last))
            .map(|&s| f64::from(s as f32))
            .collect();
        self.num_inference_steps = Some(self.timesteps.len());
        self.model_outputs = vec![None; c.solver_order];
        self.last_sample = None;
        self.this_order = 1;
        self.lower_order_nums = 0;
        self.cursor.reset();
        Ok(())
    }

    /// Correct the previous prediction with this model output, then predict the next sample.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &[])?;
        crate::scheduler::check_step_call(class, self.num_inference_steps, D)?;
        let c = self.config().clone();
        let mut cursor = self.cursor.clone();
        let i = cursor.current(&self.timesteps, timestep, MissingTimestep::LastStep)?;
        check_step_in_range(i, &self.sigmas, class)?;

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let sample = sample.cast(FloatDType::F32);
        let converted =
            self.convert_model_output(model_output.cast(FloatDType::F32), &sample, i)?;

        let corrected = match &self.last_sample {
            Some(last) if i > 0 && !c.disable_corrector.contains(&(i - 1)) => {
                let last = last.get::<D>()?;
                ops::check_same_shape(&last, &sample, "sample", "the previous sample")?;
                let outputs = ops::history_tail(&self.model_outputs, self.this_order)?;
                self.bh_update(
                    i - 1,
                    i,
                    self.this_order,
                    &outputs,
                    last,
                    Some(converted.clone()),
                )
            }
            _ => sample,
        };

        // Everything that can fail has; now update the state.
        let mut outputs_store = std::mem::take(&mut self.model_outputs);
        ops::push_history(&mut outputs_store, c.solver_order, Stored::new(&converted));
        let len = self.timesteps.len();
        let order = if c.lower_order_final {
            c.solver_order.min(len - i)
        } else {
            c.solver_order
        };
        let order = order.min(self.lower_order_nums + 1);
        let outputs = ops::history_tail(&outputs_store, order)?;
        let prev_sample = self.bh_update(i, i + 1, order, &outputs, corrected.clone(), None);
        self.model_outputs = outputs_store;
        self.last_sample = Some(Stored::new(&corrected));
        self.this_order = order;
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
        cursor.advance();
        self.cursor = cursor;

        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: None,
        })
    }

    crate::scheduler::alpha_sigma_add_noise!();
}
