//! DPM-Solver and DPM-Solver++ multistep samplers (Lu et al. 2022), with their SDE variants
//! (diffusers' `schedulers/scheduling_dpmsolver_multistep.py`; A1111's "DPM++ 2M",
//! "DPM++ 2M Karras", "DPM++ 2M SDE").

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ops::{self, Stored};
use crate::schedule::{self, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_error,
};
use crate::sigmas::{self, FinalSigmasType, MissingTimestep, StepCursor, check_step_in_range};

/// Which solver (`algorithm_type`). `deis` is accepted as diffusers accepts it, and read as
/// `dpmsolver++`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlgorithmType {
    /// DPM-Solver on the noise prediction (deprecated in diffusers).
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// DPM-Solver++ on the data prediction (the default, best for guided sampling).
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    /// The SDE variant of DPM-Solver (deprecated in diffusers).
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    /// The SDE variant of DPM-Solver++.
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// A config written for DEIS; diffusers runs it as `dpmsolver++`.
    #[serde(rename = "deis")]
    Deis,
}

impl AlgorithmType {
    /// The string used in `scheduler_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DpmSolver => "dpmsolver",
            Self::DpmSolverPlusPlus => "dpmsolver++",
            Self::SdeDpmSolver => "sde-dpmsolver",
            Self::SdeDpmSolverPlusPlus => "sde-dpmsolver++",
            Self::Deis => "deis",
        }
    }

    fn is_data_prediction(self) -> bool {
        matches!(
            self,
            Self::DpmSolverPlusPlus | Self::SdeDpmSolverPlusPlus | Self::Deis
        )
    }

    pub(crate) fn is_sde(self) -> bool {
        matches!(self, Self::SdeDpmSolver | Self::SdeDpmSolverPlusPlus)
    }
}

/// The second-order update (`solver_type`). UniPC's and DEIS's names are accepted as diffusers
/// accepts them, and read as `midpoint`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SolverType {
    /// The midpoint form.
    #[serde(rename = "midpoint")]
    Midpoint,
    /// Heun's form.
    #[serde(rename = "heun")]
    Heun,
    /// From a DEIS config; read as `midpoint`.
    #[serde(rename = "logrho")]
    Logrho,
    /// From a UniPC config; read as `midpoint`.
    #[serde(rename = "bh1")]
    Bh1,
    /// From a UniPC config; read as `midpoint`.
    #[serde(rename = "bh2")]
    Bh2,
}

/// Learned-variance model outputs (`variance_type`): the extra channels are dropped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DpmVarianceType {
    /// The model also predicts its variance.
    #[serde(rename = "learned")]
    Learned,
    /// The model also predicts a variance interpolation value.
    #[serde(rename = "learned_range")]
    LearnedRange,
    /// Any other value, kept for the round trip and without effect, as in diffusers (a DDPM
    /// config's `fixed_small` arrives here when the scheduler is built with `from_config`).
    #[serde(untagged)]
    Other(String),
}

impl DpmVarianceType {
    /// Whether the model output carries learned-variance channels to drop.
    pub fn is_learned(&self) -> bool {
        matches!(self, Self::Learned | Self::LearnedRange)
    }
}

/// How `mu` shifts flow sigmas (`time_shift_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimeShiftType {
    /// `flow_shift = exp(mu)`.
    #[serde(rename = "exponential")]
    Exponential,
}

/// The config of [`DPMSolverMultistepScheduler`], key for key as in `scheduler_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DPMSolverMultistepSchedulerConfig {
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
    /// Which solver.
    pub algorithm_type: AlgorithmType,
    /// The second-order update.
    pub solver_type: SolverType,
    /// Use lower-order steps at the end of short schedules (stabler below 15 steps).
    pub lower_order_final: bool,
    /// Use a first-order (Euler) final step.
    pub euler_at_final: bool,
    /// Use the Karras et al. noise levels.
    pub use_karras_sigmas: bool,
    /// Use noise levels evenly spaced in log-sigma.
    pub use_exponential_sigmas: bool,
    /// Use noise levels at the quantiles of a Beta(0.6, 0.6) distribution.
    pub use_beta_sigmas: bool,
    /// Use log-SNR values evenly spaced between the schedule's extremes.
    pub use_lu_lambdas: bool,
    /// Use flow-matching sigmas.
    pub use_flow_sigmas: bool,
    /// The shift of flow-matching sigmas.
    pub flow_shift: f64,
    /// The last sigma of the schedule.
    pub final_sigmas_type: FinalSigmasType,
    /// Skip timesteps whose log-SNR is below this (cosine schedules). diffusers writes the
    /// default as `-Infinity`, which is read here but left out when saving (so that strict JSON
    /// results, and diffusers reads it back as its default).
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
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// Take the flow shift from `mu` at `set_timesteps`.
    pub use_dynamic_shifting: bool,
    /// How `mu` becomes the flow shift.
    pub time_shift_type: TimeShiftType,
}

impl Default for DPMSolverMultistepSchedulerConfig {
    /// The `__init__` defaults of diffusers' `DPMSolverMultistepScheduler`
    /// (schedulers/scheduling_dpmsolver_multistep.py).
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
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

/// Whether `lambda_min_clipped` holds its default, which is left out when saving.
pub(crate) fn is_neg_infinity(v: &f64) -> bool {
    *v == f64::NEG_INFINITY
}

impl Config for DPMSolverMultistepSchedulerConfig {
    const CLASS_NAME: &'static str = "DPMSolverMultistepScheduler";

    fn known_keys() -> std::collections::BTreeSet<String> {
        // The default of lambda_min_clipped is not serialised, but it is a known key.
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
        let mut predictions = vec![
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ];
        if self.algorithm_type.is_data_prediction() {
            predictions.push(PredictionType::FlowPrediction);
        }
        schedule::check_allowed(
            Self::CLASS_NAME,
            "prediction_type",
            self.prediction_type,
            &predictions,
            PredictionType::as_str,
        )?;
        let field = |f: &str, m: String| Err((f.to_string(), m));
        if !(1..=3).contains(&self.solver_order) {
            return field(
                "solver_order",
                format!("{} is not 1, 2 or 3", self.solver_order),
            );
        }
        if self.solver_order == 3 && self.algorithm_type == AlgorithmType::SdeDpmSolver {
            return field(
                "solver_order",
                "sde-dpmsolver has no third-order update (diffusers fails at the third step)"
                    .into(),
            );
        }
        if !self.algorithm_type.is_data_prediction()
            && self.final_sigmas_type == FinalSigmasType::Zero
        {
            return field(
                "final_sigmas_type",
                format!(
                    "`zero` is not supported with algorithm_type {}; use `sigma_min`",
                    self.algorithm_type.as_str()
                ),
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

/// The DPM-Solver(++) multistep sampler.
///
/// Stateful: it keeps the last `solver_order` converted model outputs and the step index; the
/// first `step` after `set_timesteps` finds its place from the timestep (the last step when the
/// timestep is not in the schedule, as in diffusers) or the begin index. The SDE variants draw
/// noise at every step from the generator (or `variance_noise`) in [`StepOptions`].
/// [`StepOutput::pred_original_sample`] is `None`, as in diffusers.
#[derive(Clone, Debug)]
pub struct DPMSolverMultistepScheduler {
    file: ConfigFile<DPMSolverMultistepSchedulerConfig>,
    schedule: NoiseSchedule,
    alphas_cumprod: Vec<f64>,
    sigma_table: Vec<f32>,
    log_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    flow_shift: f64,
    num_inference_steps: Option<usize>,
    model_outputs: Vec<Option<Stored>>,
    lower_order_nums: usize,
    cursor: StepCursor,
}

impl DPMSolverMultistepScheduler {
    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`ConfiguredScheduler::from_config_file`].
    pub fn new(config: DPMSolverMultistepSchedulerConfig) -> Result<Self> {
        Self::from_config(config)
    }

    /// The training noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The training sigma table (ascending, float32), for the inverse scheduler.
    pub(crate) fn sigma_table(&self) -> &[f32] {
        &self.sigma_table
    }

    /// The log of [`Self::sigma_table`].
    pub(crate) fn log_sigmas(&self) -> &[f32] {
        &self.log_sigmas
    }

    /// Forget the step count (the inverse scheduler's state before `set_timesteps`).
    pub(crate) fn clear_step_count(&mut self) {
        self.num_inference_steps = None;
    }

    /// Install a schedule built elsewhere (the inverse scheduler's) and forget the history.
    pub(crate) fn set_schedule(&mut self, timesteps: Vec<f64>, sigmas: Vec<f64>) {
        self.num_inference_steps = Some(timesteps.len());
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.model_outputs = vec![None; self.config().solver_order];
        self.lower_order_nums = 0;
        self.cursor.reset();
    }

    /// `(alpha_t, sigma_t)` of a noise level, in float32 as diffusers computes them.
    fn alpha_sigma(&self, sigma: f64) -> (f32, f32) {
        sigmas::alpha_sigma(sigma, self.config().use_flow_sigmas)
    }

    /// `alpha_t`, `sigma_t` and the log-SNR `lambda_t` at schedule position `i`.
    fn point(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = self.alpha_sigma(self.sigmas[i]);
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// Timesteps by spacing, up to the last timestep allowed by `lambda_min_clipped`.
    fn spaced_timesteps(&self, k: usize) -> Result<Vec<f64>> {
        let c = self.config();
        let n = c.num_train_timesteps;
        schedule::check_num_inference_steps(k, n)?;
        let clipped_idx = clipped_count(&self.alphas_cumprod, c.lambda_min_clipped);
        sigmas::multistep_timesteps(c.timestep_spacing, n, n - clipped_idx, k, c.steps_offset)
    }

    /// diffusers' `convert_model_output` at schedule position `i`.
    fn convert_model_output<const D: usize>(
        &self,
        model_output: Tensor<D>,
        sample: &Tensor<D>,
        i: usize,
    ) -> Result<Tensor<D>> {
        let c = self.config();
        DpmOutput {
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
        .convert(model_output, sample, self.sigmas[i])
    }

    /// The multistep update of `order` from position `i` to `i + 1`, with the newest converted
    /// output last in `outputs`.
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
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(i);
        let h = lambda_t - lambda_s0;
        let k = DpmCoefficients::new(
            c.algorithm_type,
            order,
            heun,
            (alpha_t, sigma_t),
            (alpha_s0, sigma_s0),
            h,
        );
        let m0 = outputs[outputs.len() - 1].clone();
        let terms = match order {
            1 => vec![(k.c[0], m0)],
            2 => {
                let (_, _, lambda_s1) = self.point(i - 1);
                let m1 = outputs[outputs.len() - 2].clone();
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = m0.clone().sub(m1).mul_scalar(1.0 / r0);
                vec![(k.c[0], m0), (k.c[1], d1)]
            }
            _ => {
                let (_, _, lambda_s1) = self.point(i - 1);
                let (_, _, lambda_s2) = self.point(i - 2);
                let m1 = outputs[outputs.len() - 2].clone();
                let m2 = outputs[outputs.len() - 3].clone();
                let (h0, h1) = (lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
                let (r0, r1) = (h0 / h, h1 / h);
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
}

/// The float32 coefficients of a DPM-Solver(++) update of order 1 to 3 from a noise level `s`
/// to `t` (`h = lambda_t - lambda_s`): `x_t = sample * sample + sum_k c[k] * D_k + noise *
/// noise`, where `D_0` is the model output and `D_1`, `D_2` its first and second divided
/// differences (the multistep and singlestep solvers differ only in how they form those).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DpmCoefficients {
    pub sample: f32,
    pub c: [f32; 3],
    pub noise: f32,
}

impl DpmCoefficients {
    /// diffusers' coefficients, in its operation order. `sde-dpmsolver` has no third order
    /// (configs refuse it); its second-order terms are used there.
    pub(crate) fn new(
        algorithm: AlgorithmType,
        order: usize,
        heun: bool,
        (alpha_t, sigma_t): (f32, f32),
        (alpha_s, sigma_s): (f32, f32),
        h: f32,
    ) -> Self {
        use AlgorithmType::*;
        let e_mh = (-h).exp() - 1.0; // exp(-h) - 1
        let e_h = h.exp() - 1.0; // exp(h) - 1
        let one_m_e2 = 1.0 - (-2.0 * h).exp(); // 1 - exp(-2h)
        let (sample, noise) = match algorithm {
            DpmSolverPlusPlus | Deis => (sigma_t / sigma_s, 0.0),
            DpmSolver => (alpha_t / alpha_s, 0.0),
            SdeDpmSolverPlusPlus => (sigma_t / sigma_s * (-h).exp(), sigma_t * one_m_e2.sqrt()),
            SdeDpmSolver => (alpha_t / alpha_s, sigma_t * ((2.0 * h).exp() - 1.0).sqrt()),
        };
        let c0 = match algorithm {
            DpmSolverPlusPlus | Deis => -(alpha_t * e_mh),
            DpmSolver => -(sigma_t * e_h),
            SdeDpmSolverPlusPlus => alpha_t * one_m_e2,
            SdeDpmSolver => -(2.0 * (sigma_t * e_h)),
        };
        let (c1, c2) = match (algorithm, order, heun) {
            (_, 1, _) => (0.0, 0.0),
            (DpmSolverPlusPlus | Deis, 2, false) => (-(0.5 * (alpha_t * e_mh)), 0.0),
            (DpmSolver, 2, false) => (-(0.5 * (sigma_t * e_h)), 0.0),
            (SdeDpmSolverPlusPlus, 2, false) => (0.5 * (alpha_t * one_m_e2), 0.0),
            (SdeDpmSolver, _, false) => (-(sigma_t * e_h), 0.0),
            (SdeDpmSolver, _, true) => (-(2.0 * (sigma_t * (e_h / h - 1.0))), 0.0),
            (DpmSolverPlusPlus | Deis, _, _) => (
                alpha_t * (e_mh / h + 1.0),
                -(alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5)),
            ),
            (DpmSolver, _, _) => (
                -(sigma_t * (e_h / h - 1.0)),
                -(sigma_t * ((h.exp() - 1.0 - h) / (h * h) - 0.5)),
            ),
            (SdeDpmSolverPlusPlus, _, _) => {
                let two_h = 2.0 * h;
                (
                    alpha_t * (one_m_e2 / (-2.0 * h) + 1.0),
                    alpha_t * ((1.0 - (-2.0 * h).exp() - 2.0 * h) / (two_h * two_h) - 0.5),
                )
            }
        };
        Self {
            sample,
            c: [c0, c1, c2],
            noise,
        }
    }

    /// `sample * self.sample`, plus each term times its coefficient, plus the noise term.
    pub(crate) fn apply<const D: usize>(
        &self,
        sample: Tensor<D>,
        terms: Vec<(f32, Tensor<D>)>,
        noise: Option<Tensor<D>>,
    ) -> Tensor<D> {
        let mut x = sample.mul_scalar(self.sample);
        for (coeff, t) in terms {
            x = x.add(t.mul_scalar(coeff));
        }
        match noise {
            Some(noise) => x.add(noise.mul_scalar(self.noise)),
            None => x,
        }
    }
}

/// How many of the noisiest training timesteps have a log-SNR below `lambda_min_clipped`
/// (`torch.searchsorted` over the ascending, flipped float32 log-SNR table).
pub(crate) fn clipped_count(alphas_cumprod: &[f64], lambda_min_clipped: f64) -> usize {
    alphas_cumprod
        .iter()
        .rev()
        .map(|&a| {
            let a = a as f32;
            a.sqrt().ln() - (1.0 - a).sqrt().ln()
        })
        .take_while(|&l| f64::from(l) < lambda_min_clipped)
        .count()
}

/// What a DPM-Solver(++) model output is converted with (`convert_model_output`), shared by
/// the multistep and singlestep solvers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DpmOutput {
    pub algorithm: AlgorithmType,
    pub prediction: PredictionType,
    /// Drop the variance channels of a learned-variance model output.
    pub learned_variance: bool,
    /// Dynamic thresholding `(ratio, max_value)`.
    pub thresholding: Option<(f64, f64)>,
    /// Flow-matching sigmas.
    pub flow: bool,
}

impl DpmOutput {
    /// diffusers' `convert_model_output` at noise level `sigma`: the data prediction for
    /// `dpmsolver++` variants, the noise prediction otherwise (after thresholding where
    /// configured).
    pub(crate) fn convert<const D: usize>(
        &self,
        model_output: Tensor<D>,
        sample: &Tensor<D>,
        sigma: f64,
    ) -> Result<Tensor<D>> {
        let channels = sample.dims()[1];
        // Learned-variance models: keep the prediction, drop the variance channels.
        let take_prediction = |m: Tensor<D>| {
            if self.learned_variance && m.dims()[1] == 2 * channels {
                m.narrow(1, 0, channels)
            } else {
                m
            }
        };
        let (alpha_t, sigma_t) = sigmas::alpha_sigma(sigma, self.flow);
        if self.algorithm.is_data_prediction() {
            let x0 = match self.prediction {
                PredictionType::Epsilon => {
                    let m = take_prediction(model_output);
                    ops::check_same_shape(&m, sample, "model_output", "sample")?;
                    sample
                        .clone()
                        .sub(m.mul_scalar(sigma_t))
                        .div_scalar(alpha_t)
                }
                PredictionType::Sample => model_output,
                PredictionType::VPrediction => sample
                    .clone()
                    .mul_scalar(alpha_t)
                    .sub(model_output.mul_scalar(sigma_t)),
                PredictionType::FlowPrediction => {
                    sample.clone().sub(model_output.mul_scalar(sigma as f32))
                }
                other @ PredictionType::OriginalSample => {
                    return Err(unsupported_prediction(other));
                }
            };
            ops::check_same_shape(&x0, sample, "model_output", "sample")?;
            if let Some((ratio, max_value)) = self.thresholding {
                return ops::threshold_sample(x0, ratio, max_value);
            }
            Ok(x0)
        } else {
            let eps = match self.prediction {
                PredictionType::Epsilon => take_prediction(model_output),
                PredictionType::Sample => sample
                    .clone()
                    .sub(model_output.mul_scalar(alpha_t))
                    .div_scalar(sigma_t),
                PredictionType::VPrediction => model_output
                    .mul_scalar(alpha_t)
                    .add(sample.clone().mul_scalar(sigma_t)),
                other => return Err(unsupported_prediction(other)),
            };
            ops::check_same_shape(&eps, sample, "model_output", "sample")?;
            if let Some((ratio, max_value)) = self.thresholding {
                let x0 = sample
                    .clone()
                    .sub(eps.mul_scalar(sigma_t))
                    .div_scalar(alpha_t);
                let x0 = ops::threshold_sample(x0, ratio, max_value)?;
                return Ok(sample
                    .clone()
                    .sub(x0.mul_scalar(alpha_t))
                    .div_scalar(sigma_t));
            }
            Ok(eps)
        }
    }
}

fn unsupported_prediction(p: PredictionType) -> Error {
    Error::invalid_argument(
        "prediction_type",
        format!(
            "{} does not support {} with this algorithm_type",
            DPMSolverMultistepSchedulerConfig::CLASS_NAME,
            p.as_str()
        ),
    )
}

impl ConfiguredScheduler for DPMSolverMultistepScheduler {
    type Config = DPMSolverMultistepSchedulerConfig;

    fn from_config_file(mut file: ConfigFile<DPMSolverMultistepSchedulerConfig>) -> Result<Self> {
        // diffusers rewrites these legacy names in its config (register_to_config).
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
            .map_err(|e| config_error(DPMSolverMultistepSchedulerConfig::CLASS_NAME, e))?;
        let schedule = crate::scheduler::noise_schedule_of!(c, c.rescale_betas_zero_snr)?;
        let alphas_cumprod = sigmas::patched_alphas_cumprod(&schedule, c.rescale_betas_zero_snr);
        let sigma_table = sigmas::sigma_table(&schedule, c.rescale_betas_zero_snr);
        let log_sigmas = sigma_table.iter().map(|s| s.ln()).collect();
        let n = c.num_train_timesteps;
        Ok(Self {
            flow_shift: c.flow_shift,
            file,
            schedule,
            alphas_cumprod,
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

    fn config_file(&self) -> &ConfigFile<DPMSolverMultistepSchedulerConfig> {
        &self.file
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    crate::scheduler::stateful_scheduler_accessors!(unit_noise);

    /// A step count or custom integral timesteps (not with Karras, exponential, beta, Lu or
    /// flow sigmas); `mu` sets the flow shift to `exp(mu)` when `use_dynamic_shifting` is on.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        let class = self.class_name();
        request.accept_only(class, &["num_inference_steps", "timesteps", "mu"])?;
        let c = self.config().clone();
        let n = c.num_train_timesteps;
        if let Some(mu) = request.mu {
            if !c.use_dynamic_shifting {
                return Err(Error::invalid_argument(
                    "mu",
                    "mu needs use_dynamic_shifting = true in the config",
                ));
            }
            self.flow_shift = mu.exp();
        }
        let respaced = c.use_karras_sigmas
            || c.use_exponential_sigmas
            || c.use_beta_sigmas
            || c.use_lu_lambdas
            || c.use_flow_sigmas;
        let (k, spaced) = match (request.num_inference_steps, request.timesteps) {
            (Some(k), None) => (k, self.spaced_timesteps(k)?),
            (None, Some(custom)) => {
                if respaced {
                    return Err(Error::invalid_argument(
                        "timesteps",
                        "custom timesteps cannot be combined with Karras, exponential, beta, Lu \
                         or flow sigmas",
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

        let table_desc: Vec<f64> = self
            .sigma_table
            .iter()
            .rev()
            .map(|&s| f64::from(s))
            .collect();
        let (sigma_min, sigma_max) = (table_desc[table_desc.len() - 1], table_desc[0]);
        let to_t = |s: &f64| sigmas::sigma_to_t(*s, &self.log_sigmas);
        // diffusers rounds timesteps found from sigmas, except for the cosine schedule.
        let round = |t: f64| {
            if c.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                t
            } else {
                t.round_ties_even()
            }
        };
        let (timesteps, sigmas): (Vec<f64>, Vec<f64>) = if c.use_karras_sigmas {
            let s = sigmas::karras_sigmas(sigma_min, sigma_max, k);
            (s.iter().map(to_t).map(round).collect(), s)
        } else if c.use_lu_lambdas {
            let lambdas = sigmas::lu_lambdas(
                f64::from(self.log_sigmas[0]),
                f64::from(self.log_sigmas[self.log_sigmas.len() - 1]),
                k,
            );
            let s: Vec<f64> = lambdas.into_iter().map(f64::exp).collect();
            (s.iter().map(to_t).map(round).collect(), s)
        } else if c.use_exponential_sigmas {
            let s = sigmas::exponential_sigmas(sigma_min, sigma_max, k);
            (s.iter().map(to_t).collect(), s)
        } else if c.use_beta_sigmas {
            let s = sigmas::beta_sigmas(sigma_min, sigma_max, k);
            (s.iter().map(to_t).collect(), s)
        } else if c.use_flow_sigmas {
            let s = sigmas::shifted_flow_sigmas(n, k, self.flow_shift);
            (s.iter().map(|s| s * n as f64).collect(), s)
        } else {
            let s = spaced
                .iter()
                .map(|&t| sigmas::interp_on_grid(t, &self.sigma_table))
                .collect();
            (spaced, s)
        };
        let sigma_last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => f64::from(self.sigma_table[0]),
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
        self.lower_order_nums = 0;
        self.cursor.reset();
        Ok(())
    }

    /// One multistep update. SDE variants take `generator` or `variance_noise`.
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
        let len = self.timesteps.len();
        let short = c.lower_order_final && len < 15;
        let lower_order_final = i == len - 1
            && (c.euler_at_final || short || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == len && short;

        let out_dtype = ops::float_dtype(&model_output, "model_output")?;
        let sample = sample.cast(FloatDType::F32);
        let converted =
            self.convert_model_output(model_output.cast(FloatDType::F32), &sample, i)?;
        let noise = if c.algorithm_type.is_sde() {
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
        let prev_sample = self.update(order, i, &outputs, sample, noise);
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
