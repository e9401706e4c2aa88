//! DPM-Solver(++) run backwards, from a clean sample towards noise (diffusers'
//! `schedulers/scheduling_dpmsolver_multistep_inverse.py`; image inversion, DiffEdit).
//!
//! The solver steps are [`DPMSolverMultistepScheduler`]'s; only the schedule is reversed:
//! timesteps ascend from 0 to the noisiest one and the sigmas grow.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::schedule::{self, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::scheduling_dpmsolver_multistep::{
    AlgorithmType, DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig, DpmVarianceType,
    SolverType, clipped_count, is_neg_infinity,
};
use crate::sigmas::{self, FinalSigmasType};

/// The config of [`DPMSolverMultistepInverseScheduler`], key for key as in
/// `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DPMSolverMultistepInverseSchedulerConfig {
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
    /// Order of the multistep solver (1 to 3).
    pub solver_order: usize,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of the predicted `x_0` (pixel-space models only).
    pub thresholding: bool,
    /// Quantile used by dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
    /// Which solver.
    pub algorithm_type: AlgorithmType,
    /// The second-order update.
    pub solver_type: SolverType,
    /// Use lower-order steps at the end of short schedules (below 15 steps).
    pub lower_order_final: bool,
    /// Use a first-order last step.
    pub euler_at_final: bool,
    /// Use the Karras et al. noise levels (ascending).
    pub use_karras_sigmas: bool,
    /// Use noise levels evenly spaced in log-sigma (ascending).
    pub use_exponential_sigmas: bool,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: bool,
    /// Use flow-matching sigmas.
    pub use_flow_sigmas: bool,
    /// The shift of flow-matching sigmas.
    pub flow_shift: f64,
    /// Stop below the timesteps whose log-SNR is under this; the default `-Infinity` is read
    /// but left out when saving.
    #[serde(
        deserialize_with = "diffusion_core::python_json::f64_or_nonfinite",
        skip_serializing_if = "is_neg_infinity"
    )]
    pub lambda_min_clipped: f64,
    /// Learned-variance model outputs.
    pub variance_type: Option<DpmVarianceType>,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
}

impl Default for DPMSolverMultistepInverseSchedulerConfig {
    /// The `__init__` defaults of diffusers' `DPMSolverMultistepInverseScheduler`
    /// (schedulers/scheduling_dpmsolver_multistep_inverse.py).
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
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

impl DPMSolverMultistepInverseSchedulerConfig {
    /// The forward solver's config with the same solver settings. Its final sigma is
    /// `sigma_min`, so that the last step is first order only as the inverse's rules say.
    fn forward(&self) -> DPMSolverMultistepSchedulerConfig {
        DPMSolverMultistepSchedulerConfig {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
            trained_betas: self.trained_betas.clone(),
            solver_order: self.solver_order,
            prediction_type: self.prediction_type,
            thresholding: self.thresholding,
            dynamic_thresholding_ratio: self.dynamic_thresholding_ratio,
            sample_max_value: self.sample_max_value,
            algorithm_type: self.algorithm_type,
            solver_type: self.solver_type,
            lower_order_final: self.lower_order_final,
            euler_at_final: self.euler_at_final,
            use_karras_sigmas: self.use_karras_sigmas,
            use_exponential_sigmas: self.use_exponential_sigmas,
            use_beta_sigmas: self.use_beta_sigmas,
            use_flow_sigmas: self.use_flow_sigmas,
            flow_shift: self.flow_shift,
            final_sigmas_type: FinalSigmasType::SigmaMin,
            lambda_min_clipped: self.lambda_min_clipped,
            variance_type: self.variance_type.clone(),
            timestep_spacing: self.timestep_spacing,
            steps_offset: self.steps_offset,
            ..Default::default()
        }
    }
}

impl Config for DPMSolverMultistepInverseSchedulerConfig {
    const CLASS_NAME: &'static str = "DPMSolverMultistepInverseScheduler";

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
        // Towards noise the log-SNR step is negative and the SDE noise scale is the square
        // root of a negative number: diffusers returns NaN.
        if self.algorithm_type.is_sde() {
            return Err((
                "algorithm_type".into(),
                format!(
                    "{} runs backwards, where the SDE variants give NaN (as in diffusers)",
                    self.algorithm_type.as_str()
                ),
            ));
        }
        if matches!(self.algorithm_type, AlgorithmType::Deis)
            || matches!(
                self.solver_type,
                SolverType::Logrho | SolverType::Bh1 | SolverType::Bh2
            )
        {
            return Err((
                "algorithm_type".into(),
                "diffusers' inverse DPM-Solver does not read DEIS or UniPC names".into(),
            ));
        }
        self.forward().validate()
    }
}

/// The inverse DPM-Solver(++) multistep scheduler.
///
/// Stateful like [`DPMSolverMultistepScheduler`]: the first `step` after `set_timesteps`
/// finds its place from the timestep (the last step when it is not in the schedule); there is
/// no begin index. The SDE algorithm types are refused: run backwards their noise scale is
/// the square root of a negative number (diffusers returns NaN).
#[derive(Clone, Debug)]
pub struct DPMSolverMultistepInverseScheduler {
    file: ConfigFile<DPMSolverMultistepInverseSchedulerConfig>,
    inner: DPMSolverMultistepScheduler,
}

impl DPMSolverMultistepInverseScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DPMSolverMultistepInverseSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        self.inner.noise_schedule()
    }
}

impl ConfiguredScheduler for DPMSolverMultistepInverseScheduler {
    type Config = DPMSolverMultistepInverseSchedulerConfig;

    fn from_config_file(
        file: ConfigFile<DPMSolverMultistepInverseSchedulerConfig>,
    ) -> Result<Self> {
        file.config
            .validate()
            .map_err(|e| config_error(DPMSolverMultistepInverseSchedulerConfig::CLASS_NAME, e))?;
        let mut inner = DPMSolverMultistepScheduler::new(file.config.forward())?;
        // Before set_timesteps: every training timestep, ascending, with unset step count.
        let n = file.config.num_train_timesteps;
        let table: Vec<f64> = inner.sigma_table().iter().map(|&s| f64::from(s)).collect();
        inner.set_schedule((0..n).map(|t| t as f64).collect(), table);
        let mut scheduler = Self { file, inner };
        scheduler.inner.clear_step_count();
        Ok(scheduler)
    }

    fn config_file(&self) -> &ConfigFile<DPMSolverMultistepInverseSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for DPMSolverMultistepInverseScheduler {
    fn class_name(&self) -> &'static str {
        DPMSolverMultistepInverseSchedulerConfig::CLASS_NAME
    }

    fn config_value(&self) -> Value {
        self.file.to_value()
    }

    fn order(&self) -> usize {
        1
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn num_train_timesteps(&self) -> usize {
        self.config().num_train_timesteps
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.inner.num_inference_steps()
    }

    /// A step count. Like diffusers, repeated timesteps are dropped (so the schedule may be
    /// shorter than asked), and `trailing` spacing may give one step more.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        request.accept_only(self.class_name(), &["num_inference_steps"])?;
        let c = self.config().clone();
        let n = c.num_train_timesteps;
        let k = request
            .num_inference_steps
            .ok_or_else(|| Error::invalid_argument("num_inference_steps", "pass a step count"))?;
        schedule::check_num_inference_steps(k, n)?;
        let noisiest = n
            - 1
            - clipped_count(
                &self.inner.noise_schedule().alphas_cumprod,
                c.lambda_min_clipped,
            );
        let spaced: Vec<f64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = schedule::numpy_linspace(0.0, noisiest as f64, k + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                v.truncate(k);
                v
            }
            TimestepSpacing::Leading => {
                let ratio = (noisiest + 1) / (k + 1);
                (0..k)
                    .map(|i| (i * ratio + c.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let mut v: Vec<f64> =
                    schedule::numpy_arange((noisiest + 1) as f64, 0.0, -(n as f64 / k as f64))
                        .into_iter()
                        .map(|t| t.round_ties_even() - 1.0)
                        .collect();
                v.reverse();
                v
            }
        };
        if spaced.iter().any(|&t| t >= n as f64) {
            return Err(Error::invalid_argument(
                "steps_offset",
                format!("the timesteps {spaced:?} leave the training range [0, {n})"),
            ));
        }
        let table = self.inner.sigma_table();
        let log_sigmas = self.inner.log_sigmas();
        let (smallest, largest) = (f64::from(table[0]), f64::from(table[n - 1]));
        let to_t = |s: &f64| sigmas::sigma_to_t(*s, log_sigmas);
        // Respaced sigmas ascend (diffusers passes the ascending table where the forward
        // solver passes it flipped) and end by repeating the last one.
        let (timesteps, mut s): (Vec<f64>, Vec<f64>) = if c.use_karras_sigmas {
            let s = sigmas::karras_sigmas(largest, smallest, k);
            (s.iter().map(to_t).map(f64::round_ties_even).collect(), s)
        } else if c.use_exponential_sigmas {
            let s = sigmas::exponential_sigmas(largest, smallest, k);
            (s.iter().map(to_t).collect(), s)
        } else if c.use_beta_sigmas {
            let s = sigmas::beta_sigmas(largest, smallest, k);
            (s.iter().map(to_t).collect(), s)
        } else if c.use_flow_sigmas {
            let s = sigmas::shifted_flow_sigmas(n, k, c.flow_shift);
            (s.iter().map(|s| s * n as f64).collect(), s)
        } else {
            let s = spaced
                .iter()
                .map(|&t| sigmas::interp_on_grid(t, table))
                .collect();
            (spaced, s)
        };
        let respaced = c.use_karras_sigmas
            || c.use_exponential_sigmas
            || c.use_beta_sigmas
            || c.use_flow_sigmas;
        let last = if respaced {
            s[s.len() - 1]
        } else {
            f64::from(table[noisiest])
        };
        s.push(last);
        // Repeats are dropped (np.unique, first occurrences in order) before the timesteps
        // become int64, so fractional ones that truncate alike are all kept, as in diffusers.
        let mut unique: Vec<f64> = Vec::with_capacity(timesteps.len());
        for &t in &timesteps {
            if !unique.contains(&t) {
                unique.push(t);
            }
        }
        let unique: Vec<f64> = unique.iter().map(|t| t.trunc()).collect();
        let s = s.iter().map(|&v| f64::from(v as f32)).collect();
        self.inner.set_schedule(unique, s);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        self.inner.timesteps()
    }

    fn sigmas(&self) -> Option<&[f64]> {
        self.inner.sigmas()
    }

    fn step_index(&self) -> Option<usize> {
        self.inner.step_index()
    }

    /// The inverse scheduler has no begin index (diffusers finds the first step from the
    /// timestep).
    fn set_begin_index(&mut self, begin_index: usize) -> Result<()> {
        Err(Error::invalid_argument(
            "begin_index",
            format!(
                "{} has no begin index ({begin_index} given); the first step is found from \
                 its timestep",
                self.class_name()
            ),
        ))
    }

    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        _timestep: f64,
    ) -> Result<Tensor<D>> {
        Ok(sample)
    }

    /// One multistep update towards noise. Takes no options.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        self.inner
            .step(model_output, timestep, sample, options)
            .map_err(|e| match e {
                Error::InvalidArgument { name, message } => Error::InvalidArgument {
                    name,
                    message: message.replace(
                        DPMSolverMultistepSchedulerConfig::CLASS_NAME,
                        DPMSolverMultistepInverseSchedulerConfig::CLASS_NAME,
                    ),
                },
                other => other,
            })
    }

    /// `alpha_t * original + sigma_t * noise` at the noise level of each timestep.
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        self.inner.add_noise(original, noise, timesteps)
    }
}
