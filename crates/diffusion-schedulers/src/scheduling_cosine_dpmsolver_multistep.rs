//! SDE DPM-Solver++ multistep for cosine-schedule EDM models (diffusers'
//! `schedulers/scheduling_cosine_dpmsolver_multistep.py`; Stable Audio Open).
//!
//! The maths is [`EDMDPMSolverMultistepScheduler`](crate::EDMDPMSolverMultistepScheduler)'s
//! `sde-dpmsolver++` with `atan`-based timesteps. As in diffusers, the noise of every step comes
//! from torchsde's Brownian tree (`BrownianTreeNoiseSampler` over `[sigma_min, sigma_max]`,
//! [`crate::brownian_tree`]), built at the first step from the generator's `initial_seed()`
//! (one tree, or one per image for a list of generators): the normalised Brownian increment
//! `W(sigma_next) - W(sigma)` over `sqrt(|sigma_next - sigma|)`. A seeded run equals diffusers'.
//! `step` also takes the increments directly as `variance_noise`.

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};

use crate::brownian_tree::BrownianTreeNoiseSampler;
use crate::ops::{self, Stored};
use crate::schedule::PredictionType;
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_dpmsolver_multistep::{AlgorithmType, SolverType};
use crate::scheduling_edm_dpmsolver_multistep::{
    EdmSolver, edm_denoise, edm_multistep_update, edm_ramp_sigmas,
};
use crate::scheduling_edm_euler::EdmSigmaSchedule;
use crate::sigmas::{self, FinalSigmasType, MissingTimestep, StepCursor, check_step_in_range};

/// The config of [`CosineDPMSolverMultistepScheduler`], key for key as in
/// `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CosineDPMSolverMultistepSchedulerConfig {
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
    /// Order of the multistep solver (1 or 2).
    pub solver_order: usize,
    /// What the model predicts (`epsilon` or `v_prediction`).
    pub prediction_type: PredictionType,
    /// The exponent of the Karras schedule.
    pub rho: f64,
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

impl Default for CosineDPMSolverMultistepSchedulerConfig {
    /// The `__init__` defaults of diffusers' `CosineDPMSolverMultistepScheduler`
    /// (schedulers/scheduling_cosine_dpmsolver_multistep.py).
    fn default() -> Self {
        Self {
            sigma_min: 0.3,
            sigma_max: 500.0,
            sigma_data: 1.0,
            sigma_schedule: EdmSigmaSchedule::Exponential,
            num_train_timesteps: 1000,
            solver_order: 2,
            prediction_type: PredictionType::VPrediction,
            rho: 7.0,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl Config for CosineDPMSolverMultistepSchedulerConfig {
    const CLASS_NAME: &'static str = "CosineDPMSolverMultistepScheduler";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        // diffusers accepts other prediction types in the config and fails at the first step.
        crate::schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            PredictionType::as_str,
        )?;
        // diffusers has no third-order update here and fails at the third step.
        if !(1..=2).contains(&self.solver_order) {
            return Err((
                "solver_order".into(),
                format!("{} is not 1 or 2", self.solver_order),
            ));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        for (name, v) in [
            ("sigma_min", self.sigma_min),
            ("sigma_max", self.sigma_max),
            ("sigma_data", self.sigma_data),
            ("rho", self.rho),
        ] {
            if !positive(v) {
                return Err((name.into(), format!("{v} must be positive")));
            }
        }
        if self.sigma_min >= self.sigma_max {
            return Err(("sigma_min".into(), "must be below sigma_max".into()));
        }
        if self.num_train_timesteps == 0 {
            return Err(("num_train_timesteps".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The cosine DPM-Solver++ (SDE) multistep sampler.
///
/// Stateful like [`EDMDPMSolverMultistepScheduler`](crate::EDMDPMSolverMultistepScheduler);
/// timesteps are `2 atan(sigma) / pi`, `scale_model_input` applies EDM's `c_in`. Every `step`
/// needs a `generator` (whose initial seed seeds the Brownian tree at the first step, see the
/// module documentation) or the step's normalised Brownian increment as `variance_noise`. [`StepOutput::pred_original_sample`] is
/// `None`, as in diffusers.
#[derive(Clone, Debug)]
pub struct CosineDPMSolverMultistepScheduler {
    file: ConfigFile<CosineDPMSolverMultistepSchedulerConfig>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Stored>>,
    lower_order_nums: usize,
    cursor: StepCursor,
    /// The Brownian tree, built at the first `step` of a schedule.
    noise_sampler: Option<Box<BrownianTreeNoiseSampler>>,
}

impl CosineDPMSolverMultistepScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: CosineDPMSolverMultistepSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// Install diffusers' noise levels for `k` steps with the final sigma `last`, their
    /// timesteps `2 atan(sigma) / pi` (float32), and forget the history.
    fn install(&mut self, k: usize, last: f32) {
        let c = self.config();
        let s = edm_ramp_sigmas(c.sigma_schedule, c.sigma_min, c.sigma_max, c.rho, k);
        let pi = std::f64::consts::PI as f32;
        self.timesteps = s.iter().map(|&v| f64::from(v.atan() / pi * 2.0)).collect();
        self.sigmas = s
            .into_iter()
            .chain(std::iter::once(last))
            .map(f64::from)
            .collect();
        self.model_outputs = vec![None; self.config().solver_order];
        self.lower_order_nums = 0;
        self.cursor.reset();
        self.noise_sampler = None;
    }

    /// The step's normalised Brownian increment from the schedule's tree, built on first use
    /// from the generator's initial seed(s) as diffusers does.
    fn brownian_noise<const D: usize>(
        &mut self,
        like: &Tensor<D>,
        generator: Option<diffusion_core::NoiseSource<'_>>,
        i: usize,
    ) -> Result<Tensor<D>> {
        let class = self.class_name();
        let dims = like.dims().to_vec();
        if self.noise_sampler.is_none() {
            let seeds: Vec<u64> = match generator {
                Some(diffusion_core::NoiseSource::Single(g)) => vec![g.initial_seed()],
                Some(diffusion_core::NoiseSource::PerImage(gens)) => {
                    gens.iter().map(|g| g.initial_seed()).collect()
                }
                None => {
                    return Err(Error::invalid_argument(
                        "generator",
                        format!(
                            "{class} draws its noise from a Brownian tree seeded by the \
                             generator: pass a generator (or the increments as variance_noise)"
                        ),
                    ));
                }
            };
            let c = self.config();
            self.noise_sampler = Some(Box::new(BrownianTreeNoiseSampler::new(
                c.sigma_min as f32,
                c.sigma_max as f32,
                &dims,
                &seeds,
            )?));
        }
        let sampler = self
            .noise_sampler
            .as_deref_mut()
            .ok_or_else(|| Error::invalid_argument("sample", "no noise sampler"))?;
        if sampler.dims() != dims.as_slice() {
            return Err(Error::invalid_argument(
                "sample",
                format!(
                    "has shape {dims:?} but the Brownian tree was built for {:?}; call \
                     set_timesteps to start again",
                    sampler.dims()
                ),
            ));
        }
        let values = sampler.sample(self.sigmas[i] as f32, self.sigmas[i + 1] as f32)?;
        let shape: [usize; D] = like.dims();
        Ok(Tensor::<D>::from_data(
            diffusion_core::burn::tensor::TensorData::new(values, shape),
            &like.device(),
        ))
    }
}

impl ConfiguredScheduler for CosineDPMSolverMultistepScheduler {
    type Config = CosineDPMSolverMultistepSchedulerConfig;

    fn from_config_file(
        mut file: ConfigFile<CosineDPMSolverMultistepSchedulerConfig>,
    ) -> Result<Self> {
        // diffusers rewrites these legacy names in its config (register_to_config).
        let c = &mut file.config;
        if matches!(
            c.solver_type,
            SolverType::Logrho | SolverType::Bh1 | SolverType::Bh2
        ) {
            c.solver_type = SolverType::Midpoint;
        }
        file.config
            .validate()
            .map_err(|e| config_error(CosineDPMSolverMultistepSchedulerConfig::CLASS_NAME, e))?;
        let n = file.config.num_train_timesteps;
        let mut scheduler = Self {
            file,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            num_inference_steps: None,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            cursor: StepCursor::default(),
            noise_sampler: None,
        };
        // diffusers' __init__ always ends this schedule at zero.
        scheduler.install(n, 0.0);
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<CosineDPMSolverMultistepSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for CosineDPMSolverMultistepScheduler {
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
        self.install(k, last);
        self.num_inference_steps = Some(k);
        Ok(())
    }

    /// Multiply by EDM's `c_in = 1 / sqrt(sigma^2 + sigma_data^2)` for the current noise
    /// level.
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>> {
        let i = self
            .cursor
            .current(&self.timesteps, timestep, MissingTimestep::LastStep)?;
        let sigma =
            *self.sigmas.get(i).ok_or_else(|| {
                Error::invalid_argument("timestep", "the schedule has no sigma left")
            })? as f32;
        let sd = self.config().sigma_data;
        Ok(sample.mul_scalar(1.0 / (sigma * sigma + (sd * sd) as f32).sqrt()))
    }

    /// One SDE multistep update with the step's normalised Brownian increment, given as
    /// `variance_noise` or drawn from `generator`.
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
        let noise = match options.variance_noise {
            Some(noise) => noise,
            None => self.brownian_noise(&sample, options.generator, i)?,
        };
        ops::check_same_shape(&noise, &sample, "variance_noise", "sample")?;
        let len = self.timesteps.len();
        let short = c.lower_order_final && len < 15;
        let lower_order_final = i == len - 1
            && (c.euler_at_final || short || c.final_sigmas_type == FinalSigmasType::Zero);

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let sample = sample.cast(FloatDType::F32);
        let converted = edm_denoise(
            model_output.cast(FloatDType::F32),
            &sample,
            self.sigmas[i] as f32,
            c.sigma_data,
            c.prediction_type,
        );

        let mut history = std::mem::take(&mut self.model_outputs);
        ops::push_history(&mut history, c.solver_order, Stored::new(&converted));
        // (With at most two orders, diffusers' lower_order_second changes nothing.)
        let order = if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else {
            2
        };
        let outputs: Vec<Tensor<D>> = ops::history_tail(&history, order)?;
        let solver = EdmSolver {
            sigmas: &self.sigmas,
            algorithm: AlgorithmType::SdeDpmSolverPlusPlus,
            heun: c.solver_type == SolverType::Heun,
        };
        let prev_sample = edm_multistep_update(
            solver,
            order,
            i,
            &outputs,
            sample,
            Some(noise.cast(FloatDType::F32)),
        );
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
