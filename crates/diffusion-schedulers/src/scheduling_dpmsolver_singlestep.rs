//! Singlestep DPM-Solver and DPM-Solver++ (Lu et al. 2022), diffusers'
//! `schedulers/scheduling_dpmsolver_singlestep.py` (A1111's "DPM++ SDE" per diffusers' table).
//!
//! A singlestep solver of order `k` spends `k` model evaluations on one solver step: each
//! group of steps restarts from the sample at its first step, with the outputs collected since.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ops::{self, Stored};
use crate::schedule::{self, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_dpmsolver_multistep::{
    AlgorithmType, DpmCoefficients, DpmOutput, DpmVarianceType, SolverType, TimeShiftType,
    clipped_count, is_neg_infinity,
};
use crate::sigmas::{self, FinalSigmasType, MissingTimestep, StepCursor, check_step_in_range};

/// The config of [`DPMSolverSinglestepScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DPMSolverSinglestepSchedulerConfig {
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
    /// Order of the solver (1 to 3; 2 for guided sampling).
    pub solver_order: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of the predicted `x_0` (pixel-space models only).
    pub thresholding: bool,
    /// Quantile used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// Which solver (`dpmsolver`, `dpmsolver++`, `sde-dpmsolver++`; `deis` is read as
    /// `dpmsolver++`, as diffusers does).
    pub algorithm_type: AlgorithmType,
    /// The second- and third-order update (`midpoint` or `heun`; UniPC's and DEIS's names are
    /// read as `midpoint`).
    pub solver_type: SolverType,
    /// Lower the order of the last steps. diffusers turns this on (in the config) at
    /// `set_timesteps` when the step count is not a multiple of the order or the schedule
    /// ends at sigma 0.
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
    /// The last sigma of the schedule.
    pub final_sigmas_type: FinalSigmasType,
    /// Skip timesteps whose log-SNR is below this (cosine schedules); the default
    /// `-Infinity` is read but left out when saving.
    #[serde(
        deserialize_with = "diffusion_core::python_json::f64_or_nonfinite",
        skip_serializing_if = "is_neg_infinity"
    )]
    pub lambda_min_clipped: f64,
    /// Learned-variance model outputs.
    pub variance_type: Option<DpmVarianceType>,
    /// Take the flow shift from `mu` at `set_timesteps`.
    pub use_dynamic_shifting: bool,
    /// How `mu` becomes the flow shift.
    pub time_shift_type: TimeShiftType,
}

impl Default for DPMSolverSinglestepSchedulerConfig {
    /// The `__init__` defaults of diffusers' `DPMSolverSinglestepScheduler`
    /// (schedulers/scheduling_dpmsolver_singlestep.py).
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
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

impl Config for DPMSolverSinglestepSchedulerConfig {
    const CLASS_NAME: &'static str = "DPMSolverSinglestepScheduler";

    fn known_keys() -> std::collections::BTreeSet<String> {
        let mut keys: std::collections::BTreeSet<String> =
            match serde_json::to_value(Self::default()) {
                Ok(Value::Object(map)) => map.into_iter().map(|(k, _)| k).collect(),
                _ => Default::default(),
            };
        keys.insert("lambda_min_clipped".into());
        keys
    }

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
        use AlgorithmType::*;
        schedule::check_allowed(
            Self::CLASS_NAME,
            "algorithm_type",
            self.algorithm_type,
            &[DpmSolver, DpmSolverPlusPlus, SdeDpmSolverPlusPlus, Deis],
            AlgorithmType::as_str,
        )?;
        let data = self.algorithm_type != DpmSolver;
        let mut predictions = vec![
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ];
        if data {
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
        if !(1..=3).contains(&self.solver_order) {
            return field("solver_order", "must be 1, 2 or 3");
        }
        if !data && self.final_sigmas_type == FinalSigmasType::Zero {
            return field(
                "final_sigmas_type",
                "`zero` is not supported with algorithm_type dpmsolver; use `sigma_min`",
            );
        }
        if !data && self.thresholding {
            return field(
                "thresholding",
                "thresholding with algorithm_type dpmsolver fails in diffusers (it indexes the \
                 schedule with no timestep); use dpmsolver++",
            );
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

/// The order of each step (diffusers' `get_order_list`): repeated `1, 2, 3` groups, shortened
/// at the end when `lower_order_final`, with a first-order last step onto sigma 0.
fn order_list(k: usize, order: usize, lower_order_final: bool, final_zero: bool) -> Vec<usize> {
    let cycle = |groups: usize| -> Vec<usize> { (0..groups).flat_map(|_| 1..=order).collect() };
    let mut orders = match (lower_order_final, order) {
        (_, 1) => vec![1; k],
        (true, 3) => match k % 3 {
            0 => [cycle(k / 3 - 1), vec![1, 2, 1]].concat(),
            1 => [cycle(k / 3), vec![1]].concat(),
            _ => [cycle(k / 3), vec![1, 2]].concat(),
        },
        (true, _) => match k % 2 {
            0 => [cycle(k / 2 - 1), vec![1, 1]].concat(),
            _ => [cycle(k / 2), vec![1]].concat(),
        },
        (false, _) => cycle(k / order),
    };
    if final_zero && let Some(last) = orders.last_mut() {
        *last = 1;
    }
    orders
}

/// The singlestep DPM-Solver(++) sampler.
///
/// Stateful: it keeps the converted outputs of the current group of steps, the sample the
/// group started from, and the step index; the first `step` after `set_timesteps` finds its
/// place from the timestep (the last step when the timestep is not in the schedule, as in
/// diffusers) or the begin index. `sde-dpmsolver++` draws noise at every step from the
/// generator (or `variance_noise`) in [`StepOptions`]. [`StepOutput::pred_original_sample`]
/// is `None`, as in diffusers.
#[derive(Clone, Debug)]
pub struct DPMSolverSinglestepScheduler {
    file: ConfigFile<DPMSolverSinglestepSchedulerConfig>,
    schedule: NoiseSchedule,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    order_list: Vec<usize>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Stored>>,
    group_sample: Option<Stored>,
    cursor: StepCursor,
}

impl DPMSolverSinglestepScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DPMSolverSinglestepSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The solver order of each step of the current schedule.
    pub fn order_list(&self) -> &[usize] {
        &self.order_list
    }

    /// `alpha_t`, `sigma_t` and the log-SNR `lambda_t` at schedule position `i` (float32).
    fn point(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = sigmas::alpha_sigma(self.sigmas[i], self.config().use_flow_sigmas);
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// The singlestep update of `order` ending at position `i + 1`, from the group's first
    /// sample, with the group's converted outputs (newest last).
    fn update<const D: usize>(
        &self,
        order: usize,
        i: usize,
        outputs: &[Tensor<D>],
        sample: Tensor<D>,
        noise: Option<Tensor<D>>,
    ) -> Tensor<D> {
        let c = self.config();
        let heun = c.solver_type == SolverType::Heun;
        let (alpha_t, sigma_t, lambda_t) = self.point(i + 1);
        // The group starts at position i + 1 - order.
        let (alpha_s, sigma_s, lambda_s) = self.point(i + 1 - order);
        let h = lambda_t - lambda_s;
        let k = DpmCoefficients::new(
            c.algorithm_type,
            order,
            heun,
            (alpha_t, sigma_t),
            (alpha_s, sigma_s),
            h,
        );
        let m = |back: usize| outputs[outputs.len() - 1 - back].clone();
        let terms = match order {
            1 => vec![(k.c[0], m(0))],
            2 => {
                let (_, _, lambda_s0) = self.point(i);
                let r0 = (lambda_s0 - lambda_s) / h;
                let d1 = m(0).sub(m(1)).mul_scalar(1.0 / r0);
                vec![(k.c[0], m(1)), (k.c[1], d1)]
            }
            _ => {
                let (_, _, lambda_s0) = self.point(i);
                let (_, _, lambda_s1) = self.point(i - 1);
                let (r0, r1) = ((lambda_s0 - lambda_s) / h, (lambda_s1 - lambda_s) / h);
                let d1_0 = m(1).sub(m(2)).mul_scalar(1.0 / r1);
                let d1_1 = m(0).sub(m(2)).mul_scalar(1.0 / r0);
                if heun {
                    let d1 = d1_0
                        .clone()
                        .mul_scalar(r0)
                        .sub(d1_1.clone().mul_scalar(r1))
                        .div_scalar(r0 - r1);
                    let d2 = d1_1.sub(d1_0).mul_scalar(2.0).div_scalar(r0 - r1);
                    vec![(k.c[0], m(2)), (k.c[1], d1), (k.c[2], d2)]
                } else {
                    vec![(k.c[0], m(2)), (k.c[1], d1_1)]
                }
            }
        };
        k.apply(sample, terms, noise)
    }
}

impl ConfiguredScheduler for DPMSolverSinglestepScheduler {
    type Config = DPMSolverSinglestepSchedulerConfig;

    fn from_config_file(mut file: ConfigFile<DPMSolverSinglestepSchedulerConfig>) -> Result<Self> {
        // diffusers rewrites these names of the other solvers in its config.
        let c = &mut file.config;
        if c.algorithm_type == AlgorithmType::Deis {
            c.algorithm_type = AlgorithmType::DpmSolverPlusPlus;
        }
        if matches!(
            c.solver_type,
            SolverType::Logrho | SolverType::Bh1 | SolverType::Bh2
        ) {
            c.solver_type = SolverType::Midpoint;
        }
        let c = &file.config;
        c.validate()
            .map_err(|e| config_error(DPMSolverSinglestepSchedulerConfig::CLASS_NAME, e))?;
        let schedule = crate::scheduler::noise_schedule_of!(c, false)?;
        let sigma_table = sigmas::sigma_table(&schedule, false);
        let log_sigmas = sigma_table.iter().map(|s| s.ln()).collect();
        let n = c.num_train_timesteps;
        let order_list = order_list(
            n,
            c.solver_order,
            c.lower_order_final,
            c.final_sigmas_type == FinalSigmasType::Zero,
        );
        Ok(Self {
            file,
            schedule,
            sigmas: sigma_table.iter().map(|&s| f64::from(s)).collect(),
            sigma_table,
            log_sigmas,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            order_list,
            num_inference_steps: None,
            model_outputs: Vec::new(),
            group_sample: None,
            cursor: StepCursor::default(),
        })
    }

    fn config_file(&self) -> &ConfigFile<DPMSolverSinglestepSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for DPMSolverSinglestepScheduler {
    crate::scheduler::stateful_scheduler_accessors!(unit_noise);

    /// A step count or custom integral timesteps (not with Karras, exponential, beta or flow
    /// sigmas); `mu` sets `flow_shift` to `exp(mu)` in the config when `use_dynamic_shifting`
    /// is on. Like diffusers, this turns `lower_order_final` on in the config when the step
    /// count is not a multiple of `solver_order` or the schedule ends at sigma 0.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let class = self.class_name();
        request.accept_only(class, &["num_inference_steps", "timesteps", "mu"])?;
        let c = self.config().clone();
        let n = c.num_train_timesteps;
        if request.mu.is_some() && !c.use_dynamic_shifting {
            return Err(Error::invalid_argument(
                "mu",
                "mu needs use_dynamic_shifting = true in the config",
            ));
        }
        let (k, spaced) = match (request.num_inference_steps, request.timesteps) {
            (Some(k), None) => {
                let last = n - clipped_count(&self.schedule.alphas_cumprod, c.lambda_min_clipped);
                let ts = sigmas::multistep_timesteps(TimestepSpacing::Linspace, n, last, k, 0)?;
                (k, ts)
            }
            (None, Some(custom)) => {
                if c.use_karras_sigmas
                    || c.use_exponential_sigmas
                    || c.use_beta_sigmas
                    || c.use_flow_sigmas
                {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        "custom timesteps cannot be combined with Karras, exponential, beta or \
                         flow sigmas",
                    ));
                }
                if custom.is_empty()
                    || custom
                        .iter()
                        .any(|t| t.fract() != 0.0 || *t < 0.0 || *t >= n as f64)
                {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        format!("need at least one integral timestep, each in [0, {n})"),
                    ));
                }
                (custom.len(), custom)
            }
            (None, None) => {
                return Err(Error::invalid_argument(
                    "num_inference_steps",
                    "pass a step count or custom timesteps",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(Error::invalid_argument(
                    "timesteps",
                    "pass either num_inference_steps or custom timesteps, not both",
                ));
            }
        };
        if let Some(mu) = request.mu {
            self.file.config.flow_shift = mu.exp();
        }
        // diffusers tries the Karras, exponential and beta spacings before flow sigmas.
        let table_respaced = c.use_karras_sigmas || c.use_exponential_sigmas || c.use_beta_sigmas;
        let (timesteps, sigmas) = if c.use_flow_sigmas && !table_respaced {
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
        let final_zero = c.final_sigmas_type == FinalSigmasType::Zero;
        let sigma_last = if final_zero {
            0.0
        } else {
            f64::from(self.sigma_table[0])
        };
        self.timesteps = timesteps.iter().map(|t| t.trunc()).collect();
        self.sigmas = sigmas
            .iter()
            .chain(std::iter::once(&sigma_last))
            .map(|&s| f64::from(s as f32))
            .collect();
        if !c.lower_order_final && (k % c.solver_order != 0 || final_zero) {
            self.file.config.lower_order_final = true;
        }
        self.order_list = order_list(
            k,
            c.solver_order,
            self.config().lower_order_final,
            final_zero,
        );
        self.num_inference_steps = Some(k);
        self.model_outputs = vec![None; c.solver_order];
        self.group_sample = None;
        self.cursor.reset();
        Ok(())
    }

    /// One step of the current group. `sde-dpmsolver++` takes `generator` or
    /// `variance_noise`.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        let class = self.class_name();
        options.accept_only(class, &["generator", "variance_noise"])?;
        crate::scheduler::check_step_call(class, self.num_inference_steps, D)?;
        let c = self.config().clone();
        let mut cursor = self.cursor.clone();
        let i = cursor.current(&self.timesteps, timestep, MissingTimestep::LastStep)?;
        check_step_in_range(i, &self.sigmas, class)?;

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let sample = sample.cast(FloatDType::F32);
        let converted = DpmOutput {
            algorithm: c.algorithm_type,
            prediction: c.prediction_type,
            learned_variance: c
                .variance_type
                .as_ref()
                .is_some_and(DpmVarianceType::is_learned),
            thresholding: c
                .thresholding
                .then_some((c.dynamic_thresholding_ratio, c.sample_max_value)),
            flow: c.use_flow_sigmas,
        }
        .convert(model_output.cast(FloatDType::F32), &sample, self.sigmas[i])?;
        let noise = if c.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus {
            Some(ops::noise_like(
                &converted,
                options.generator,
                options.variance_noise,
                class,
            )?)
        } else {
            None
        };

        let mut history = self.model_outputs.clone();
        ops::push_history(&mut history, c.solver_order, Stored::new(&converted));
        // Starting mid-schedule (image-to-image) the group may lack its earlier outputs.
        let mut order = self.order_list[i].min(c.solver_order);
        while order > 1 && history[c.solver_order - order].is_none() {
            order -= 1;
        }
        let group_sample = if order == 1 {
            Stored::new(&sample)
        } else {
            match &self.group_sample {
                Some(s) => s.clone(),
                None => {
                    return Err(Error::invalid_argument(
                        "timestep",
                        "the singlestep group is missing its first sample",
                    ));
                }
            }
        };
        let start = group_sample.get::<D>()?;
        ops::check_same_shape(&start, &sample, "sample", "the group's first sample")?;
        let outputs: Vec<Tensor<D>> = ops::history_tail(&history, order)?;
        let prev_sample = self.update(order, i, &outputs, start, noise);
        self.model_outputs = history;
        self.group_sample = Some(group_sample);
        cursor.advance();
        self.cursor = cursor;
        Ok(StepOutput {
            prev_sample: prev_sample.cast(out_dtype),
            pred_original_sample: None,
        })
    }

    crate::scheduler::alpha_sigma_add_noise!();
}
