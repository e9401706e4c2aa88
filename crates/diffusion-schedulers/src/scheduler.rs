//! The [`Scheduler`] trait every scheduler implements, and the arguments and results of its
//! methods.
//!
//! The trait is shaped after diffusers' `SchedulerMixin` as pipelines use it: `set_timesteps`,
//! `timesteps`, `scale_model_input`, `step`, `add_noise`. Schedule maths lives on the host
//! (see the crate docs on precision); only the methods that take tensors touch the device. Timesteps are `f64` for every
//! scheduler: DDPM/DDIM use integral values, Karras-style schedulers use fractional ones, and a
//! pipeline passes whatever [`Scheduler::timesteps`] gave it straight back to `step`.
//!
//! Tensor methods are generic over the rank `D` (images `[B, C, H, W]`, video
//! `[B, C, F, H, W]`, packed sequences `[B, L, C]`), so the trait is not object safe; runtime
//! choice goes through [`crate::AnyScheduler`].

use std::path::{Path, PathBuf};

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Config, ConfigFile, Error, NoiseSource, Result};
use serde_json::Value;

/// What `set_timesteps` should build, mirroring the keyword arguments of diffusers'
/// `set_timesteps(num_inference_steps, timesteps=, sigmas=, mu=)`.
///
/// A scheduler rejects fields it does not support with an error naming the field, never
/// ignoring them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SetTimesteps {
    /// The number of denoising steps.
    pub num_inference_steps: Option<usize>,
    /// Explicit timesteps, noisiest first (DDPM, Euler, ...).
    pub timesteps: Option<Vec<f64>>,
    /// Explicit sigmas, noisiest first (Euler, DPM-Solver, flow matching).
    pub sigmas: Option<Vec<f64>>,
    /// The shift of flow-matching schedules with dynamic shifting (Flux, SD3).
    pub mu: Option<f64>,
}

impl SetTimesteps {
    /// `num_inference_steps` evenly chosen steps.
    pub fn steps(num_inference_steps: usize) -> Self {
        Self {
            num_inference_steps: Some(num_inference_steps),
            ..Self::default()
        }
    }

    /// Custom timesteps, noisiest first.
    pub fn custom_timesteps(timesteps: Vec<f64>) -> Self {
        Self {
            timesteps: Some(timesteps),
            ..Self::default()
        }
    }

    /// Custom sigmas, noisiest first.
    pub fn custom_sigmas(sigmas: Vec<f64>) -> Self {
        Self {
            sigmas: Some(sigmas),
            ..Self::default()
        }
    }

    /// Add the flow-matching shift `mu`.
    pub fn with_mu(mut self, mu: f64) -> Self {
        self.mu = Some(mu);
        self
    }

    /// Fail on the first field that is set but not in `accepted` (`"num_inference_steps"`,
    /// `"timesteps"`, `"sigmas"`, `"mu"`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field and the scheduler.
    pub fn accept_only(&self, class: &str, accepted: &[&str]) -> Result<()> {
        let set = [
            ("num_inference_steps", self.num_inference_steps.is_some()),
            ("timesteps", self.timesteps.is_some()),
            ("sigmas", self.sigmas.is_some()),
            ("mu", self.mu.is_some()),
        ];
        for (name, is_set) in set {
            if is_set && !accepted.contains(&name) {
                return Err(Error::invalid_argument(
                    name,
                    format!(
                        "{class}.set_timesteps does not take `{name}`; it takes {}",
                        accepted.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The step count of a scheduler that takes nothing else (`set_timesteps(k)` only).
    ///
    /// # Errors
    /// As [`Self::accept_only`]; [`Error::InvalidArgument`] naming `num_inference_steps` when it
    /// is missing or 0.
    pub fn step_count_only(&self, class: &str) -> Result<usize> {
        self.accept_only(class, &["num_inference_steps"])?;
        match self.num_inference_steps {
            Some(k) if k > 0 => Ok(k),
            _ => Err(Error::invalid_argument(
                "num_inference_steps",
                "pass a step count of at least 1",
            )),
        }
    }
}

/// Optional arguments of [`Scheduler::step`], mirroring diffusers' keyword arguments.
///
/// Every scheduler names the options it understands; setting any other one is an
/// [`Error::InvalidArgument`] (for instance `eta` on DDPM), so a caller never believes an option
/// took effect when it did not.
#[derive(Debug)]
pub struct StepOptions<'a, const D: usize> {
    /// Where noise is drawn from, as diffusers' `generator=`; draws follow torch's CPU generator
    /// bit for bit (`randn_tensor(model_output.shape, generator=...)`).
    pub generator: Option<NoiseSource<'a>>,
    /// Noise supplied by the caller instead of a generator (DDIM `variance_noise`, used by
    /// CycleDiffusion); shaped like the sample.
    pub variance_noise: Option<Tensor<D>>,
    /// DDIM's `eta`: the weight of the stochastic part (0 is deterministic DDIM, 1 is DDPM-like).
    pub eta: Option<f64>,
    /// DDIM's `use_clipped_model_output`: recompute the noise from the clipped `x_0`.
    pub use_clipped_model_output: Option<bool>,
    /// Euler's `s_churn`.
    pub s_churn: Option<f64>,
    /// Euler's `s_tmin`.
    pub s_tmin: Option<f64>,
    /// Euler's `s_tmax`.
    pub s_tmax: Option<f64>,
    /// Euler's `s_noise`.
    pub s_noise: Option<f64>,
}

impl<const D: usize> Default for StepOptions<'_, D> {
    fn default() -> Self {
        Self {
            generator: None,
            variance_noise: None,
            eta: None,
            use_clipped_model_output: None,
            s_churn: None,
            s_tmin: None,
            s_tmax: None,
            s_noise: None,
        }
    }
}

impl<'a, const D: usize> StepOptions<'a, D> {
    /// Draw noise from `generator`.
    pub fn with_generator(mut self, generator: &'a mut diffusion_core::TorchGenerator) -> Self {
        self.generator = Some(NoiseSource::Single(generator));
        self
    }

    /// Draw noise from one generator per batch element.
    pub fn with_generators(mut self, generators: &'a mut [diffusion_core::TorchGenerator]) -> Self {
        self.generator = Some(NoiseSource::PerImage(generators));
        self
    }

    /// Use this noise instead of drawing it.
    pub fn with_variance_noise(mut self, noise: Tensor<D>) -> Self {
        self.variance_noise = Some(noise);
        self
    }

    /// Set DDIM's `eta`.
    pub fn with_eta(mut self, eta: f64) -> Self {
        self.eta = Some(eta);
        self
    }

    /// Set DDIM's `use_clipped_model_output`.
    pub fn with_clipped_model_output(mut self, on: bool) -> Self {
        self.use_clipped_model_output = Some(on);
        self
    }

    /// Fail on the first option that is set but not in `accepted` (field names of this struct).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the option and the scheduler.
    pub fn accept_only(&self, class: &str, accepted: &[&str]) -> Result<()> {
        let set = [
            ("generator", self.generator.is_some()),
            ("variance_noise", self.variance_noise.is_some()),
            ("eta", self.eta.is_some()),
            (
                "use_clipped_model_output",
                self.use_clipped_model_output.is_some(),
            ),
            ("s_churn", self.s_churn.is_some()),
            ("s_tmin", self.s_tmin.is_some()),
            ("s_tmax", self.s_tmax.is_some()),
            ("s_noise", self.s_noise.is_some()),
        ];
        for (name, is_set) in set {
            if is_set && !accepted.contains(&name) {
                let takes = if accepted.is_empty() {
                    "no options".to_string()
                } else {
                    accepted.join(", ")
                };
                return Err(Error::invalid_argument(
                    name,
                    format!("{class}.step does not take `{name}`; it takes {takes}"),
                ));
            }
        }
        Ok(())
    }
}

/// What [`Scheduler::step`] returns.
#[derive(Clone, Debug)]
pub struct StepOutput<const D: usize> {
    /// The sample at the previous (less noisy) timestep: the next model input.
    pub prev_sample: Tensor<D>,
    /// The scheduler's estimate of the clean sample, for previews and guidance; `None` for
    /// schedulers that do not form one.
    pub pred_original_sample: Option<Tensor<D>>,
}

/// A diffusion noise scheduler.
pub trait Scheduler {
    /// The diffusers class name (`"DDIMScheduler"`).
    fn class_name(&self) -> &'static str;

    /// The whole config file as JSON (`scheduler_config.json`), with `_class_name`.
    fn config_value(&self) -> Value;

    /// Write `scheduler_config.json`; `path` may be the file or its folder.
    ///
    /// # Errors
    /// [`Error::Io`] when writing fails.
    fn save_config(&self, path: &Path) -> Result<()> {
        let path = config_path(path);
        let mut text = serde_json::to_string_pretty(&self.config_value()).unwrap_or_default();
        text.push('\n');
        diffusion_core::config::write_atomically(&path, text.as_bytes())
    }

    /// How many model evaluations one step of the underlying solver takes (diffusers' `order`;
    /// Heun is 2, most others 1).
    fn order(&self) -> usize;

    /// The standard deviation of the initial noise (`init_noise_sigma`): 1 for variance
    /// preserving schedulers, `sigma_max`-like for Karras-style ones.
    fn init_noise_sigma(&self) -> f64;

    /// `num_train_timesteps` (diffusers' `len(scheduler)`).
    fn num_train_timesteps(&self) -> usize;

    /// The number of inference steps last set, `None` before `set_timesteps`.
    fn num_inference_steps(&self) -> Option<usize>;

    /// Build the inference schedule with `num_inference_steps` steps.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the count is 0 or larger than the training schedule.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.set_timesteps_with(SetTimesteps::steps(num_inference_steps))
    }

    /// Build the inference schedule from a step count or custom timesteps/sigmas.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field for unsupported or inconsistent arguments.
    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()>;

    /// The timesteps of the inference schedule, noisiest first, to be passed to the model and
    /// back to [`Self::step`].
    fn timesteps(&self) -> &[f64];

    /// The noise levels of Karras-style schedulers (`None` for DDPM-style ones).
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// The index of the next step of stateful schedulers, `None` for stateless ones or before
    /// the first step.
    fn step_index(&self) -> Option<usize> {
        None
    }

    /// Start a stateful scheduler at step `begin_index` (image-to-image pipelines skip the
    /// noisiest steps). Stateless schedulers find their position from the timestep alone, so
    /// for them this only checks the index.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the index is past the schedule.
    fn set_begin_index(&mut self, begin_index: usize) -> Result<()> {
        let len = self.timesteps().len();
        if begin_index >= len {
            return Err(Error::invalid_argument(
                "begin_index",
                format!("{begin_index} is past the {len}-step schedule"),
            ));
        }
        Ok(())
    }

    /// Scale the model input for this timestep (identity for DDPM-style schedulers, division by
    /// `sqrt(sigma^2 + 1)` for Karras-style ones).
    ///
    /// # Shapes
    /// `sample`: any shape; the result has the same shape.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `timestep` is not in the schedule (schedulers that need
    /// to look it up).
    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>>;

    /// Go one step back along the diffusion chain from `sample` at `timestep`, given the model's
    /// prediction.
    ///
    /// # Shapes
    /// `model_output` and `sample`: `[B, C, ...]` (`model_output` may have `2C` channels for
    /// learned-variance models); `prev_sample` and `pred_original_sample` are shaped like
    /// `sample`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when called before `set_timesteps` (schedulers that need it),
    /// for a timestep outside the schedule, mismatched shapes, an option this scheduler does not
    /// take, or missing noise where the step is stochastic.
    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>>;

    /// The forward process: noise `original` to the level of `timesteps` (one per batch element,
    /// or one for the whole batch).
    ///
    /// # Shapes
    /// `original` and `noise`: `[B, ...]`; `timesteps`: `B` or 1 values.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for mismatched shapes or timesteps outside the schedule.
    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>>;

    /// The v-prediction target `sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * sample`.
    ///
    /// # Shapes
    /// As [`Self::add_noise`].
    ///
    /// # Errors
    /// As [`Self::add_noise`]; schedulers without a velocity target return
    /// [`Error::InvalidArgument`] naming `get_velocity`.
    fn get_velocity<const D: usize>(
        &self,
        sample: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        let _ = (sample, noise, timesteps);
        Err(Error::invalid_argument(
            "get_velocity",
            format!("{} has no velocity target", self.class_name()),
        ))
    }
}

/// A scheduler built from a typed config, loadable and savable as `scheduler_config.json`.
pub trait ConfiguredScheduler: Scheduler + Sized {
    /// The config struct, a serde mirror of the diffusers class's `__init__` arguments.
    type Config: Config;

    /// Build from a parsed config file (unknown keys are kept for saving).
    ///
    /// # Errors
    /// [`Error::ConfigField`] or [`Error::InvalidArgument`] when the config is inconsistent or
    /// uses a value this scheduler does not support.
    fn from_config_file(file: ConfigFile<Self::Config>) -> Result<Self>;

    /// The config file this scheduler was built from.
    fn config_file(&self) -> &ConfigFile<Self::Config>;

    /// The typed config.
    fn config(&self) -> &Self::Config {
        &self.config_file().config
    }

    /// Build from a config made in code.
    ///
    /// # Errors
    /// As [`Self::from_config_file`].
    fn from_config(config: Self::Config) -> Result<Self> {
        Self::from_config_file(ConfigFile::new(config))
    }

    /// Read `scheduler_config.json` (`path` may be the file or its folder), accepting Python's
    /// `-Infinity` tokens.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`], [`Error::ConfigField`] naming the bad field.
    fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = config_path(path.as_ref());
        let value = diffusion_core::config::read_json(&path)?;
        Self::from_config_file(ConfigFile::from_value(value, &path)?)
    }
}

/// `dir/scheduler_config.json` for a folder, the path itself otherwise.
pub(crate) fn config_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("scheduler_config.json")
    } else {
        path.to_path_buf()
    }
}

/// A config-validation failure as the `(field, message)` pair [`Config::validate`] returns.
pub(crate) fn config_error(file: &str, (field, message): (String, String)) -> Error {
    Error::ConfigField {
        path: PathBuf::from(file),
        field,
        message,
    }
}

/// The [`Scheduler`] methods that every stateful sigma scheduler of this crate implements the
/// same way from its `file`, `timesteps`, `sigmas`, `num_inference_steps` and `cursor`
/// fields; `identity_input` adds a `scale_model_input` that leaves the sample as it is, and
/// `unit_noise` also `order` 1, `init_noise_sigma` 1 and `num_train_timesteps` from the config
/// (the multistep solvers and flow matching); `sigma_scaled_input` adds the Karras-style
/// `scale_model_input` that divides by `sqrt(sigma^2 + 1)` at the current step (Euler, Heun,
/// LMS).
macro_rules! stateful_scheduler_accessors {
    () => {
        fn class_name(&self) -> &'static str {
            <<Self as $crate::scheduler::ConfiguredScheduler>::Config as diffusion_core::Config>::CLASS_NAME
        }

        fn config_value(&self) -> serde_json::Value {
            self.file.to_value()
        }

        fn num_inference_steps(&self) -> Option<usize> {
            self.num_inference_steps
        }

        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }

        fn sigmas(&self) -> Option<&[f64]> {
            Some(&self.sigmas)
        }

        fn step_index(&self) -> Option<usize> {
            self.cursor.step_index
        }

        fn set_begin_index(&mut self, begin_index: usize) -> diffusion_core::Result<()> {
            self.cursor
                .set_begin_index(begin_index, self.timesteps.len())
        }
    };
    (unit_noise) => {
        $crate::scheduler::stateful_scheduler_accessors!(identity_input);
        $crate::scheduler::unit_noise_basics!();
    };
    (sigma_scaled_input) => {
        $crate::scheduler::stateful_scheduler_accessors!();

        fn scale_model_input<const D: usize>(
            &mut self,
            sample: diffusion_core::burn::tensor::Tensor<D>,
            timestep: f64,
        ) -> diffusion_core::Result<diffusion_core::burn::tensor::Tensor<D>> {
            self.cursor
                .scale_by_current_sigma(&self.timesteps, &self.sigmas, sample, timestep)
        }
    };
    (identity_input) => {
        $crate::scheduler::stateful_scheduler_accessors!();

        /// The model sees the sample as it is.
        fn scale_model_input<const D: usize>(
            &mut self,
            sample: diffusion_core::burn::tensor::Tensor<D>,
            _timestep: f64,
        ) -> diffusion_core::Result<diffusion_core::burn::tensor::Tensor<D>> {
            Ok(sample)
        }
    };
}
pub(crate) use stateful_scheduler_accessors;

/// The [`Scheduler`] methods of a first-order scheduler on unit-variance noise: `order` 1,
/// `init_noise_sigma` 1 and `num_train_timesteps` from the config; `with_state` adds
/// `config_value` from the `file` field and `num_inference_steps` from the field of that name
/// (the alpha-bar schedulers: DDIM, DDPM, LCM, PNDM).
macro_rules! unit_noise_basics {
    () => {
        fn order(&self) -> usize {
            1
        }

        fn init_noise_sigma(&self) -> f64 {
            1.0
        }

        fn num_train_timesteps(&self) -> usize {
            self.config().num_train_timesteps
        }
    };
    (with_state) => {
        $crate::scheduler::unit_noise_basics!();

        fn config_value(&self) -> serde_json::Value {
            self.file.to_value()
        }

        fn num_inference_steps(&self) -> Option<usize> {
            self.num_inference_steps
        }
    };
}
pub(crate) use unit_noise_basics;

/// The [`ConfiguredScheduler`] and [`Scheduler`] impls of a scheduler that wraps another one
/// (`inner`, built from the wrapped config `file.config.0` under the wrapper's class name) and
/// keeps its own `file`: every step and schedule call is the inner scheduler's (the parallel
/// DDIM / DDPM variants). The docs of `set_timesteps_with` and `step` are given.
macro_rules! wrapped_scheduler_impls {
    (
        $scheduler:ident($config:ident) wraps $inner:ident,
        set_timesteps: $set_timesteps_doc:literal,
        step: $step_doc:literal $(,)?
    ) => {
        impl $crate::scheduler::ConfiguredScheduler for $scheduler {
            type Config = $config;

            fn from_config_file(
                file: diffusion_core::ConfigFile<$config>,
            ) -> diffusion_core::Result<Self> {
                diffusion_core::Config::validate(&file.config).map_err(|e| {
                    $crate::scheduler::config_error(
                        <$config as diffusion_core::Config>::CLASS_NAME,
                        e,
                    )
                })?;
                let inner = $inner::new(file.config.0.clone())?
                    .with_class_name(<$config as diffusion_core::Config>::CLASS_NAME);
                Ok(Self { file, inner })
            }

            fn config_file(&self) -> &diffusion_core::ConfigFile<$config> {
                &self.file
            }
        }

        impl $crate::scheduler::Scheduler for $scheduler {
            fn class_name(&self) -> &'static str {
                <$config as diffusion_core::Config>::CLASS_NAME
            }

            fn config_value(&self) -> serde_json::Value {
                self.file.to_value()
            }

            fn order(&self) -> usize {
                self.inner.order()
            }

            fn init_noise_sigma(&self) -> f64 {
                self.inner.init_noise_sigma()
            }

            fn num_train_timesteps(&self) -> usize {
                self.inner.num_train_timesteps()
            }

            fn num_inference_steps(&self) -> Option<usize> {
                self.inner.num_inference_steps()
            }

            #[doc = $set_timesteps_doc]
            fn set_timesteps_with(
                &mut self,
                request: $crate::scheduler::SetTimesteps,
            ) -> diffusion_core::Result<()> {
                self.inner.set_timesteps_with(request)
            }

            fn timesteps(&self) -> &[f64] {
                self.inner.timesteps()
            }

            fn scale_model_input<const D: usize>(
                &mut self,
                sample: diffusion_core::burn::tensor::Tensor<D>,
                timestep: f64,
            ) -> diffusion_core::Result<diffusion_core::burn::tensor::Tensor<D>> {
                self.inner.scale_model_input(sample, timestep)
            }

            #[doc = $step_doc]
            fn step<const D: usize>(
                &mut self,
                model_output: diffusion_core::burn::tensor::Tensor<D>,
                timestep: f64,
                sample: diffusion_core::burn::tensor::Tensor<D>,
                options: $crate::scheduler::StepOptions<'_, D>,
            ) -> diffusion_core::Result<$crate::scheduler::StepOutput<D>> {
                self.inner.step(model_output, timestep, sample, options)
            }

            fn add_noise<const D: usize>(
                &self,
                original: diffusion_core::burn::tensor::Tensor<D>,
                noise: diffusion_core::burn::tensor::Tensor<D>,
                timesteps: &[f64],
            ) -> diffusion_core::Result<diffusion_core::burn::tensor::Tensor<D>> {
                self.inner.add_noise(original, noise, timesteps)
            }

            fn get_velocity<const D: usize>(
                &self,
                sample: diffusion_core::burn::tensor::Tensor<D>,
                noise: diffusion_core::burn::tensor::Tensor<D>,
                timesteps: &[f64],
            ) -> diffusion_core::Result<diffusion_core::burn::tensor::Tensor<D>> {
                self.inner.get_velocity(sample, noise, timesteps)
            }
        }
    };
}
pub(crate) use wrapped_scheduler_impls;

/// Refuse a multistep `step` before `set_timesteps` or on a tensor without a channel axis.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `num_inference_steps` or `sample`.
pub(crate) fn check_step_call(
    class: &str,
    num_inference_steps: Option<usize>,
    rank: usize,
) -> Result<()> {
    if num_inference_steps.is_none() {
        return Err(Error::invalid_argument(
            "num_inference_steps",
            format!("{class}.step was called before set_timesteps"),
        ));
    }
    if rank < 2 {
        return Err(Error::invalid_argument(
            "sample",
            format!("{class} steps [batch, channels, ...] tensors"),
        ));
    }
    Ok(())
}

/// The training noise schedule of a config with diffusers' usual beta fields
/// (`num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`), with
/// or without zero-terminal-SNR rescaling.
macro_rules! noise_schedule_of {
    ($c:expr, $zero_snr:expr) => {
        $crate::schedule::NoiseSchedule::new(&$crate::schedule::BetaConfig {
            num_train_timesteps: $c.num_train_timesteps,
            beta_start: $c.beta_start,
            beta_end: $c.beta_end,
            beta_schedule: $c.beta_schedule,
            trained_betas: $c.trained_betas.as_deref(),
            rescale_betas_zero_snr: $zero_snr,
        })
    };
}
pub(crate) use noise_schedule_of;

/// The `add_noise` of the variance-preserving sigma schedulers (DPM-Solver, UniPC, DEIS):
/// `alpha_t * original + sigma_t * noise` at the schedule sigma of each timestep (or of the
/// current or begin index), from the `cursor`, `timesteps` and `sigmas` fields and the
/// config's `use_flow_sigmas`.
macro_rules! alpha_sigma_add_noise {
    () => {
        /// `alpha_t * original + sigma_t * noise` at the noise level of each timestep (or of
        /// the begin index).
        fn add_noise<const D: usize>(
            &self,
            original: diffusion_core::burn::tensor::Tensor<D>,
            noise: diffusion_core::burn::tensor::Tensor<D>,
            timesteps: &[f64],
        ) -> diffusion_core::Result<diffusion_core::burn::tensor::Tensor<D>> {
            $crate::sigmas::add_noise_at_sigmas(
                &self.cursor,
                &self.timesteps,
                &self.sigmas,
                self.config().use_flow_sigmas,
                original,
                noise,
                timesteps,
            )
        }
    };
}
pub(crate) use alpha_sigma_add_noise;
