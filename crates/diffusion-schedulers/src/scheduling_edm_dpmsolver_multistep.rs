//! DPM-Solver++ multistep in the EDM formulation of Karras et al. (2022), with its SDE variant
//! (diffusers' `schedulers/scheduling_edm_dpmsolver_multistep.py`; Playground v2.5, CosXL).
//!
//! The maths is [`DPMSolverMultistepScheduler`](crate::DPMSolverMultistepScheduler)'s with
//! `alpha_t = 1` (the model input is preconditioned instead), EDM noise levels and EDM's
//! `c_skip`/`c_out` denoiser as the data prediction.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::ops::{self, Stored};
use crate::schedule::{PredictionType, torch_linspace_f32};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_dpmsolver_multistep::{AlgorithmType, DpmCoefficients, SolverType};
use crate::scheduling_edm_euler::EdmSigmaSchedule;
use crate::sigmas::{self, FinalSigmasType, MissingTimestep, StepCursor, check_step_in_range};

/// The config of [`EDMDPMSolverMultistepScheduler`], key for key as in
/// `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EDMDPMSolverMultistepSchedulerConfig {
    /// The smallest noise level.
    pub sigma_min: f64,
    /// The largest noise level.
    pub sigma_max: f64,
    /// The standard deviation of the data distribution.
    pub sigma_data: f64,
    /// How the noise levels are spaced.
    pub sigma_schedule: EdmSigmaSchedule,
    /// The number of noise levels of the schedule before `set_timesteps`.
    pub num_train_timesteps: usize,
    /// What the model predicts (`epsilon` or `v_prediction`).
    pub prediction_type: PredictionType,
    /// The exponent of the Karras schedule.
    pub rho: f64,
    /// Order of the multistep solver (1 to 3).
    pub solver_order: usize,
    /// Dynamic thresholding of the predicted `x_0` (pixel-space models only).
    pub thresholding: bool,
    /// Quantile used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// `dpmsolver++` or `sde-dpmsolver++` (`deis` is read as `dpmsolver++`, as diffusers does).
    pub algorithm_type: AlgorithmType,
    /// The second-order update (`midpoint` or `heun`; UniPC's and DEIS's names read as
    /// `midpoint`).
    pub solver_type: SolverType,
    /// Lower the order on the last steps of schedules shorter than 15 steps.
    pub lower_order_final: bool,
    /// Take a first-order step at the end.
    pub euler_at_final: bool,
    /// The last sigma of the schedule (`zero`, or `sigma_min` of the config).
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EDMDPMSolverMultistepSchedulerConfig {
    /// The `__init__` defaults of diffusers' `EDMDPMSolverMultistepScheduler`
    /// (schedulers/scheduling_edm_dpmsolver_multistep.py).
    fn default() -> Self {
        Self {
            sigma_min: 0.002,
            sigma_max: 80.0,
            sigma_data: 0.5,
            sigma_schedule: EdmSigmaSchedule::Karras,
            num_train_timesteps: 1000,
            prediction_type: PredictionType::Epsilon,
            rho: 7.0,
            solver_order: 2,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl Config for EDMDPMSolverMultistepSchedulerConfig {
    const CLASS_NAME: &'static str = "EDMDPMSolverMultistepScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        // diffusers accepts other prediction types in the config and fails at the first step.
        crate::schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            PredictionType::as_str,
        )?;
        crate::schedule::check_allowed(
            Self::CLASS_NAME,
            "algorithm_type",
            self.algorithm_type,
            &[
                AlgorithmType::DpmSolverPlusPlus,
                AlgorithmType::SdeDpmSolverPlusPlus,
                AlgorithmType::Deis,
            ],
            AlgorithmType::as_str,
        )?;
        let field = |f: &str, m: String| Err((f.to_string(), m));
        if !(1..=3).contains(&self.solver_order) {
            return field(
                "solver_order",
                format!("{} is not 1, 2 or 3", self.solver_order),
            );
        }
        if self.solver_order == 3 && self.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus {
            return field(
                "solver_order",
                "sde-dpmsolver++ has no third-order update here (diffusers fails at the third \
                 step)"
                    .into(),
            );
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        for (name, v) in [
            ("sigma_min", self.sigma_min),
            ("sigma_max", self.sigma_max),
            ("sigma_data", self.sigma_data),
            ("rho", self.rho),
        ] {
            if !positive(v) {
                return field(name, format!("{v} must be positive"));
            }
        }
        if self.sigma_min >= self.sigma_max {
            return field("sigma_min", "must be below sigma_max".into());
        }
        crate::schedule::check_common(
            self.num_train_timesteps,
            self.thresholding,
            self.dynamic_thresholding_ratio,
            self.sample_max_value,
            false,
            0.0,
        )
    }
}

/// The EDM DPM-Solver++ multistep sampler.
///
/// Stateful like [`DPMSolverMultistepScheduler`](crate::DPMSolverMultistepScheduler): it keeps
/// the last `solver_order` data predictions and the step index; a timestep not in the schedule
/// means the last step, as in diffusers. Timesteps are EDM's noise conditioning
/// `ln(sigma) / 4`; `scale_model_input` applies EDM's `c_in`. `sde-dpmsolver++` draws noise at
/// every step from the generator (or `variance_noise`) in [`StepOptions`].
/// [`StepOutput::pred_original_sample`] is `None`, as in diffusers.
#[derive(Clone, Debug)]
pub struct EDMDPMSolverMultistepScheduler {
    file: ConfigFile<EDMDPMSolverMultistepSchedulerConfig>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Stored>>,
    lower_order_nums: usize,
    cursor: StepCursor,
}

impl EDMDPMSolverMultistepScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: EDMDPMSolverMultistepSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// diffusers' float32 noise levels for `k` steps.
    fn ramp_sigmas(&self, k: usize) -> Vec<f32> {
        let c = self.config();
        edm_ramp_sigmas(c.sigma_schedule, c.sigma_min, c.sigma_max, c.rho, k)
    }

    /// Install noise levels `s` with the final sigma `last`, their timesteps, and forget the
    /// history.
    fn install(&mut self, s: Vec<f32>, last: f32) {
        self.timesteps = s.iter().map(|&v| f64::from(0.25 * v.ln())).collect();
        self.sigmas = s
            .into_iter()
            .chain(std::iter::once(last))
            .map(f64::from)
            .collect();
        self.model_outputs = vec![None; self.config().solver_order];
        self.lower_order_nums = 0;
        self.cursor.reset();
    }

    /// EDM's input scaling `1 / sqrt(sigma^2 + sigma_data^2)` (float32).
    fn c_in(&self, sigma: f32) -> f32 {
        let sd = self.config().sigma_data;
        1.0 / (sigma * sigma + (sd * sd) as f32).sqrt()
    }

    /// EDM's denoiser `c_skip * x + c_out * F(x)` at noise level `sigma` (diffusers'
    /// `precondition_outputs`, float32 scalars), thresholded where configured.
    fn data_prediction<const D: usize>(
        &self,
        model_output: Tensor<D>,
        sample: &Tensor<D>,
        sigma: f32,
    ) -> Result<Tensor<D>> {
        let c = self.config();
        let x0 = edm_denoise(model_output, sample, sigma, c.sigma_data, c.prediction_type);
        if c.thresholding {
            return ops::threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value);
        }
        Ok(x0)
    }
}

/// diffusers' float32 EDM noise levels for `k` points of the float32 ramp
/// `torch.linspace(0, 1, k)`, from `sigma_max` down to `sigma_min` (float32 tensor maths, the
/// Python scalars entering the kernels as float32).
pub(crate) fn edm_ramp_sigmas(
    schedule: EdmSigmaSchedule,
    sigma_min: f64,
    sigma_max: f64,
    rho: f64,
    k: usize,
) -> Vec<f32> {
    match schedule {
        EdmSigmaSchedule::Karras => {
            let min_inv_rho = sigma_min.powf(1.0 / rho);
            let max_inv_rho = sigma_max.powf(1.0 / rho);
            let span = (min_inv_rho - max_inv_rho) as f32;
            let start = max_inv_rho as f32;
            torch_linspace_f32(0.0, 1.0, k)
                .into_iter()
                .map(|r| (f64::from(start + r * span).powf(rho)) as f32)
                .collect()
        }
        EdmSigmaSchedule::Exponential => torch_linspace_f32(sigma_min.ln(), sigma_max.ln(), k)
            .into_iter()
            .rev()
            .map(f32::exp)
            .collect(),
    }
}

/// EDM's denoiser `c_skip * x + c_out * F(x)` at noise level `sigma` (diffusers'
/// `precondition_outputs`, float32 scalars); `prediction` is `epsilon` or `v_prediction`.
pub(crate) fn edm_denoise<const D: usize>(
    model_output: Tensor<D>,
    sample: &Tensor<D>,
    sigma: f32,
    sigma_data: f64,
    prediction: PredictionType,
) -> Tensor<D> {
    let sd2 = (sigma_data * sigma_data) as f32;
    let c_skip = sd2 / (sigma * sigma + sd2);
    let c_out = sigma * sigma_data as f32 / (sigma * sigma + sd2).sqrt();
    let c_out = match prediction {
        PredictionType::VPrediction => -c_out,
        _ => c_out,
    };
    sample
        .clone()
        .mul_scalar(c_skip)
        .add(model_output.mul_scalar(c_out))
}

/// `(sigma, lambda = -ln sigma)` at position `i` of `sigmas`, float32 (`alpha = 1`: the model
/// input is preconditioned instead).
fn point(sigmas: &[f64], i: usize) -> (f32, f32) {
    let sigma = sigmas[i] as f32;
    (sigma, 0.0 - sigma.ln())
}

/// The solver of a DPM-Solver++ multistep update on EDM noise levels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EdmSolver<'a> {
    /// The schedule, with the final sigma.
    pub sigmas: &'a [f64],
    /// `dpmsolver++` or `sde-dpmsolver++`.
    pub algorithm: AlgorithmType,
    /// Heun's second-order form instead of the midpoint one.
    pub heun: bool,
}

/// The update of `order` from position `i` of the solver's sigmas to `i + 1`, with the newest
/// data prediction last in `outputs`, in diffusers' float32 operation order.
pub(crate) fn edm_multistep_update<const D: usize>(
    solver: EdmSolver<'_>,
    order: usize,
    i: usize,
    outputs: &[Tensor<D>],
    sample: Tensor<D>,
    noise: Option<Tensor<D>>,
) -> Tensor<D> {
    let EdmSolver {
        sigmas,
        algorithm,
        heun,
    } = solver;
    let (sigma_t, lambda_t) = point(sigmas, i + 1);
    let (sigma_s0, lambda_s0) = point(sigmas, i);
    let h = lambda_t - lambda_s0;
    let k = DpmCoefficients::new(algorithm, order, heun, (1.0, sigma_t), (1.0, sigma_s0), h);
    let m0 = outputs[outputs.len() - 1].clone();
    let terms = match order {
        1 => vec![(k.c[0], m0)],
        2 => {
            let (_, lambda_s1) = point(sigmas, i - 1);
            let m1 = outputs[outputs.len() - 2].clone();
            let r0 = (lambda_s0 - lambda_s1) / h;
            let d1 = m0.clone().sub(m1).mul_scalar(1.0 / r0);
            vec![(k.c[0], m0), (k.c[1], d1)]
        }
        _ => {
            let (_, lambda_s1) = point(sigmas, i - 1);
            let (_, lambda_s2) = point(sigmas, i - 2);
            let m1 = outputs[outputs.len() - 2].clone();
            let m2 = outputs[outputs.len() - 3].clone();
            let (r0, r1) = ((lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h);
            let d1_0 = m0.clone().sub(m1.clone()).mul_scalar(1.0 / r0);
            let d1_1 = m1.sub(m2).mul_scalar(1.0 / r1);
            let diff = d1_0.clone().sub(d1_1);
            let d1 = d1_0.add(diff.clone().mul_scalar(r0 / (r0 + r1)));
            let d2 = diff.mul_scalar(1.0 / (r0 + r1));
            vec![(k.c[0], m0), (k.c[1], d1), (k.c[2], d2)]
        }
    };
    k.apply(sample, terms, noise)
}

impl ConfiguredScheduler for EDMDPMSolverMultistepScheduler {
    type Config = EDMDPMSolverMultistepSchedulerConfig;

    fn from_config_file(
        mut file: ConfigFile<EDMDPMSolverMultistepSchedulerConfig>,
    ) -> Result<Self> {
        // diffusers rewrites these legacy names in its config (register_to_config), but
        // checks the final sigma against the name it was given: `deis` with a zero final
        // sigma is refused there.
        let c = &mut file.config;
        if c.algorithm_type == AlgorithmType::Deis && c.final_sigmas_type == FinalSigmasType::Zero {
            return Err(config_error(
                EDMDPMSolverMultistepSchedulerConfig::CLASS_NAME,
                (
                    "final_sigmas_type".into(),
                    "`zero` is not supported with algorithm_type deis; use `sigma_min`".into(),
                ),
            ));
        }
        if c.algorithm_type == AlgorithmType::Deis {
            c.algorithm_type = AlgorithmType::DpmSolverPlusPlus;
        }
        if matches!(
            c.solver_type,
            SolverType::Logrho | SolverType::Bh1 | SolverType::Bh2
        ) {
            c.solver_type = SolverType::Midpoint;
        }
        file.config
            .validate()
            .map_err(|e| config_error(EDMDPMSolverMultistepSchedulerConfig::CLASS_NAME, e))?;
        let n = file.config.num_train_timesteps;
        let mut scheduler = Self {
            file,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: None,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            cursor: StepCursor::default(),
        };
        // diffusers' __init__ always ends this schedule at zero.
        let s = scheduler.ramp_sigmas(n);
        scheduler.install(s, 0.0);
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<EDMDPMSolverMultistepSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for EDMDPMSolverMultistepScheduler {
    crate::scheduler::stateful_scheduler_accessors!();

    fn order(&self) -> usize {
        1
    }

    /// `sqrt(sigma_max^2 + 1)`.
    fn init_noise_sigma(&self) -> f64 {
        (self.config().sigma_max.powi(2) + 1.0).sqrt()
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().num_train_timesteps
    }

    /// A step count.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let k = request.step_count_only(self.class_name())?;
        let last = match self.config().final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.config().sigma_min as f32,
        };
        let s = self.ramp_sigmas(k);
        self.install(s, last);
        self.num_inference_steps = Some(k);
        Ok(())
    }

    /// Multiply by EDM's `c_in` for the current noise level.
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>> {
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::LastStep)?;
        let sigma = *self
            .sigmas
            .get(i)
            .ok_or_else(|| Error::invalid_argument("timestep", "the schedule has no sigma left"))?;
        Ok(sample.mul_scalar(self.c_in(sigma as f32)))
    }

    /// One multistep update. `sde-dpmsolver++` takes `generator` or `variance_noise`.
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
        ops::check_same_shape(&model_output, &sample, "model_output", "sample")?;
        let c = self.config().clone();
        let mut cursor = self.cursor.clone();
        let i = cursor.current(&self.timesteps, timestep, MissingTimestep::LastStep)?;
        check_step_in_range(i, &self.sigmas, class)?;
        let len = self.timesteps.len();
        let short = c.lower_order_final && len < 15;
        let lower_order_final = i == len - 1
            && (c.euler_at_final || short || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == len && short;

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let sample = sample.cast(FloatDType::F32);
        let converted = self.data_prediction(
            model_output.cast(FloatDType::F32),
            &sample,
            self.sigmas[i] as f32,
        )?;
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

        // Everything that can fail has; now update the state.
        let mut history = std::mem::take(&mut self.model_outputs);
        ops::push_history(&mut history, c.solver_order, Stored::new(&converted));
        let order = if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if c.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let outputs: Vec<Tensor<D>> = ops::history_tail(&history, order)?;
        // (`deis` was rewritten to `dpmsolver++` at construction.)
        let solver = EdmSolver {
            sigmas: &self.sigmas,
            algorithm: c.algorithm_type,
            heun: c.solver_type == SolverType::Heun,
        };
        let prev_sample = edm_multistep_update(solver, order, i, &outputs, sample, noise);
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

    /// `original + sigma * noise` at the sigma of each timestep (or of the begin index); a
    /// timestep not in the schedule uses the last step, as in diffusers.
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        sigmas::add_noise_ve_with(
            &self.cursor,
            &self.timesteps,
            &self.sigmas,
            original,
            noise,
            timesteps,
            MissingTimestep::LastStep,
        )
    }
}
