//! DEIS, the diffusion exponential integrator sampler of Zhang & Chen (2022) in its multistep
//! log-rho form (diffusers' `schedulers/scheduling_deis_multistep.py`).
//!
//! The noise prediction is integrated exactly in `rho = sigma_t / alpha_t` against the
//! Lagrange polynomial through the last one to three outputs.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops::{self, Stored};
use crate::schedule::{self, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_dpmsolver_multistep::{
    AlgorithmType, DpmCoefficients, DpmOutput, SolverType, TimeShiftType,
};
use crate::sigmas::{self, MissingTimestep, StepCursor, check_step_in_range};

/// The config of [`DEISMultistepScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DEISMultistepSchedulerConfig {
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
    /// Order of the multistep solver (1 to 3; 2 for guided sampling).
    pub solver_order: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of the predicted `x_0` (pixel-space models only).
    pub thresholding: bool,
    /// Quantile used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// Always `deis`; DPM-Solver's names are read as `deis`, as diffusers does.
    pub algorithm_type: AlgorithmType,
    /// Always `logrho`; the other solvers' names are read as `logrho`, as diffusers does.
    pub solver_type: SolverType,
    /// Use lower-order steps at the end of short schedules (below 15 steps).
    pub lower_order_final: bool,
    /// Use the Karras et al. noise levels.
    pub use_karras_sigmas: bool,
    /// Use noise levels evenly spaced in log-sigma.
    pub use_exponential_sigmas: bool,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: bool,
    /// Use flow-matching sigmas.
    pub use_flow_sigmas: bool,
    /// The shift of flow-matching sigmas (set to `exp(mu)` by `set_timesteps` with `mu`).
    pub flow_shift: f64,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
    /// Take the flow shift from `mu` at `set_timesteps`.
    pub use_dynamic_shifting: bool,
    /// How `mu` becomes the flow shift.
    pub time_shift_type: TimeShiftType,
}

impl Default for DEISMultistepSchedulerConfig {
    /// The `__init__` defaults of diffusers' `DEISMultistepScheduler`
    /// (schedulers/scheduling_deis_multistep.py).
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
            algorithm_type: AlgorithmType::Deis,
            solver_type: SolverType::Logrho,
            lower_order_final: true,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

impl Config for DEISMultistepSchedulerConfig {
    const CLASS_NAME: &'static str = "DEISMultistepScheduler";

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
            "algorithm_type",
            self.algorithm_type,
            &[AlgorithmType::Deis],
            AlgorithmType::as_str,
        )?;
        schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &[
                PredictionType::Epsilon,
                PredictionType::Sample,
                PredictionType::VPrediction,
                PredictionType::FlowPrediction,
            ],
            PredictionType::as_str,
        )?;
        let field = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if !(1..=3).contains(&self.solver_order) {
            return field("solver_order", "must be 1, 2 or 3");
        }
        sigmas::check_one_respacing(
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        )?;
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

/// The antiderivative of the Lagrange basis polynomial of node `b` (other nodes `c`, `d`)
/// in `ln(rho)`, evaluated at `t` (diffusers' `ind_fn`, float32 in its operation order);
/// `d = None` is the second-order (two-node) form.
///
/// A coefficient is the difference of two such values that nearly cancel, so a last-bit
/// difference in `ln` moves it by up to 1e-4 relative: diffusers takes the logs with numpy's
/// float32 `log`, which (vectorised, on AVX2) is not correctly rounded, while `f32::ln` is.
/// Third-order trajectories therefore match diffusers to ~1e-5 rather than ~1e-6; evaluating
/// in `f64` would move further from diffusers, not closer (measured).
fn ind_fn(t: f32, b: f32, c: f32, d: Option<f32>) -> f32 {
    let (lt, lb, lc) = (t.ln(), b.ln(), c.ln());
    match d {
        None => t * (-lc + lt - 1.0) / (lb - lc),
        Some(d) => {
            let ld = d.ln();
            let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
            numerator / ((lb - lc) * (lb - ld))
        }
    }
}

/// The DEIS multistep sampler (log-rho form).
///
/// Stateful: it keeps the last `solver_order` noise predictions and the step index; the
/// first `step` after `set_timesteps` finds its place from the timestep (the last step when
/// the timestep is not in the schedule, as in diffusers) or the begin index. Deterministic:
/// `step` takes no options. [`StepOutput::pred_original_sample`] is `None`, as in diffusers.
/// With Karras, exponential, beta or flow sigmas diffusers repeats the last sigma as the final one,
/// so the last step returns its input.
#[derive(Clone, Debug)]
pub struct DEISMultistepScheduler {
    file: ConfigFile<DEISMultistepSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Stored>>,
    lower_order_nums: usize,
    cursor: StepCursor,
}

impl DEISMultistepScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DEISMultistepSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// `(alpha_t, sigma_t)` at schedule position `i` (float32).
    fn point(&self, i: usize) -> (f32, f32) {
        sigmas::alpha_sigma(self.sigmas[i], self.config().use_flow_sigmas)
    }

    /// The multistep update of `order` from position `i` to `i + 1`, with the newest noise
    /// prediction last in `outputs`.
    fn update<const D: usize>(
        &self,
        order: usize,
        i: usize,
        outputs: &[Tensor<D>],
        sample: Tensor<D>,
    ) -> Tensor<D> {
        let (alpha_t, sigma_t) = self.point(i + 1);
        let (alpha_s0, sigma_s0) = self.point(i);
        let m = |back: usize| outputs[outputs.len() - 1 - back].clone();
        if order == 1 {
            let lambda = |(a, s): (f32, f32)| a.ln() - s.ln();
            let h = lambda((alpha_t, sigma_t)) - lambda((alpha_s0, sigma_s0));
            let k = DpmCoefficients::new(
                AlgorithmType::DpmSolver,
                1,
                false,
                (alpha_t, sigma_t),
                (alpha_s0, sigma_s0),
                h,
            );
            return k.apply(sample, vec![(k.c[0], m(0))], None);
        }
        let rho = |(a, s): (f32, f32)| s / a;
        let rho_t = rho((alpha_t, sigma_t));
        let rho_s: Vec<f32> = (0..order).map(|back| rho(self.point(i - back))).collect();
        let coefficient = |node: usize| -> f32 {
            // The nodes other than `node`, in diffusers' argument order.
            let others: Vec<f32> = (1..order).map(|j| rho_s[(node + j) % order]).collect();
            let d = others.get(1).copied();
            ind_fn(rho_t, rho_s[node], others[0], d) - ind_fn(rho_s[0], rho_s[node], others[0], d)
        };
        let mut x = sample.div_scalar(alpha_s0);
        for node in 0..order {
            x = x.add(m(node).mul_scalar(coefficient(node)));
        }
        x.mul_scalar(alpha_t)
    }
}

impl ConfiguredScheduler for DEISMultistepScheduler {
    type Config = DEISMultistepSchedulerConfig;

    fn from_config_file(mut file: ConfigFile<DEISMultistepSchedulerConfig>) -> Result<Self> {
        // diffusers rewrites the other solvers' names in its config.
        let c = &mut file.config;
        if matches!(
            c.algorithm_type,
            AlgorithmType::DpmSolver | AlgorithmType::DpmSolverPlusPlus
        ) {
            c.algorithm_type = AlgorithmType::Deis;
        }
        c.solver_type = SolverType::Logrho;
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(DEISMultistepSchedulerConfig::CLASS_NAME, e))?;
        let schedule = crate::scheduler::noise_schedule_of!(c, false)?;
        let sigma_table = sigmas::sigma_table(&schedule, false);
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
            lower_order_nums: 0,
            cursor: StepCursor::default(),
        })
    }

    fn config_file(&self) -> &ConfigFile<DEISMultistepSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for DEISMultistepScheduler {
    crate::scheduler::stateful_scheduler_accessors!(unit_noise);

    /// A step count; `mu` sets `flow_shift` to `exp(mu)` in the config when
    /// `use_dynamic_shifting` is on.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let class = self.class_name();
        request.accept_only(class, &["num_inference_steps", "mu"])?;
        let c = self.config().clone();
        let n = c.num_train_timesteps;
        let k = request
            .num_inference_steps
            .ok_or_else(|| Error::invalid_argument("num_inference_steps", "pass a step count"))?;
        if request.mu.is_some() && !c.use_dynamic_shifting {
            return Err(Error::invalid_argument(
                "mu",
                "mu needs use_dynamic_shifting = true in the config",
            ));
        }
        let spaced = sigmas::multistep_timesteps(c.timestep_spacing, n, n, k, c.steps_offset)?;
        if let Some(mu) = request.mu {
            self.file.config.flow_shift = mu.exp();
        }
        // diffusers tries the Karras, exponential and beta spacings before flow sigmas.
        let table_respaced = c.use_karras_sigmas || c.use_exponential_sigmas || c.use_beta_sigmas;
        let (timesteps, mut sigmas) = if c.use_flow_sigmas && !table_respaced {
            let s = sigmas::shifted_flow_sigmas(n, k, self.config().flow_shift);
            (s.iter().map(|s| s * n as f64).collect(), s)
        } else {
            sigmas::table_sigmas(
                c.use_karras_sigmas,
                c.use_exponential_sigmas,
                c.use_beta_sigmas,
                &self.sigma_table,
                &self.log_sigmas,
                spaced,
            )
        };
        let respaced = table_respaced || c.use_flow_sigmas;
        let last = if respaced {
            sigmas[k - 1]
        } else {
            f64::from(self.sigma_table[0])
        };
        sigmas.push(last);
        self.timesteps = timesteps.iter().map(|t| t.trunc()).collect();
        self.sigmas = sigmas.iter().map(|&s| f64::from(s as f32)).collect();
        self.num_inference_steps = Some(k);
        self.model_outputs = vec![None; c.solver_order];
        self.lower_order_nums = 0;
        self.cursor.reset();
        Ok(())
    }

    /// One multistep update. Takes no options.
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
        let len = self.timesteps.len();
        let short = c.lower_order_final && len < 15;
        let lower_order_final = i == len - 1 && short;
        let lower_order_second = i + 2 == len && short;

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let sample = sample.cast(FloatDType::F32);
        // The data prediction (thresholded where configured), turned back into noise.
        let x0 = DpmOutput {
            algorithm: AlgorithmType::DpmSolverPlusPlus,
            prediction: c.prediction_type,
            learned_variance: false,
            thresholding: c
                .thresholding
                .then_some((c.dynamic_thresholding_ratio, c.sample_max_value)),
            flow: c.use_flow_sigmas,
        }
        .convert(model_output.cast(FloatDType::F32), &sample, self.sigmas[i])?;
        let (alpha_t, sigma_t) = self.point(i);
        let eps = sample
            .clone()
            .sub(x0.mul_scalar(alpha_t))
            .div_scalar(sigma_t);

        let mut history = std::mem::take(&mut self.model_outputs);
        ops::push_history(&mut history, c.solver_order, Stored::new(&eps));
        let order = if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if c.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let outputs: Vec<Tensor<D>> = ops::history_tail(&history, order)?;
        let prev_sample = self.update(order, i, &outputs, sample);
        self.model_outputs = history;
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
