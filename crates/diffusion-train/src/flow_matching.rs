//! The flow-matching objective of diffusers' rectified-flow training scripts
//! (train_dreambooth_lora_sd3.py, the Flux and Sana scripts): flow times drawn from a density
//! (`compute_density_for_timestep_sampling`), looked up in FlowMatchEulerDiscreteScheduler's
//! training schedule (the SD3 script's `get_sigmas`), the noisy input `(1 - sigma) x + sigma
//! noise`, the velocity target `noise - x` (or, with `precondition_outputs`, the prediction
//! mapped back to `x`), and the per-sample mean of the weighted squared error
//! (`compute_loss_weighting_for_sd3`), averaged over the batch.
//!
//! Random draws are inputs here as in [`crate::objective`]: a parity test passes PyTorch's, a
//! run passes ones from its seeded [`TorchGenerator`].

use std::f32::consts::PI;
use std::path::Path;

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{ConfigFile, Device, Error, Result, TorchGenerator};
use diffusion_models::{UNet2DConditionModel, UNet2DConditionOptions};
use diffusion_schedulers::{
    ConfiguredScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteSchedulerConfig,
    Scheduler,
};
use serde::{Deserialize, Serialize};

use crate::objective::Objective;

/// `--weighting_scheme` of the scripts: how flow times are drawn (`logit_normal`, `mode`,
/// otherwise uniformly) and how the loss is weighted (`sigma_sqrt`, `cosmap`, otherwise not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightingScheme {
    /// Uniform flow times, loss weighted by `sigma^-2`.
    SigmaSqrt,
    /// Flow times `sigmoid(n)`, `n ~ N(logit_mean, logit_std)`, no weighting (the SD3 default).
    #[default]
    LogitNormal,
    /// Flow times by the SD3 paper's mode sampling with `mode_scale`, no weighting.
    Mode,
    /// Uniform flow times, the cosine-map weighting `2 / (pi (1 - 2 sigma + 2 sigma^2))`.
    Cosmap,
    /// Uniform flow times, no weighting.
    None,
}

impl WeightingScheme {
    /// The scripts' spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SigmaSqrt => "sigma_sqrt",
            Self::LogitNormal => "logit_normal",
            Self::Mode => "mode",
            Self::Cosmap => "cosmap",
            Self::None => "none",
        }
    }

    /// Parse the scripts' spelling.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`weighting_scheme`) for any other name.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "sigma_sqrt" => Self::SigmaSqrt,
            "logit_normal" => Self::LogitNormal,
            "mode" => Self::Mode,
            "cosmap" => Self::Cosmap,
            "none" => Self::None,
            other => {
                return Err(Error::invalid_argument(
                    "weighting_scheme",
                    format!("`{other}` is not one of sigma_sqrt, logit_normal, mode, cosmap, none"),
                ));
            }
        })
    }
}

/// The flow-matching settings of the scripts. `Default` is train_dreambooth_lora_sd3.py's
/// (logit_normal with mean 0 and std 1, mode_scale 1.29, preconditioned outputs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowMatchingConfig {
    /// `--weighting_scheme`.
    pub weighting_scheme: WeightingScheme,
    /// `--logit_mean`, the mean of the logit-normal density.
    pub logit_mean: f64,
    /// `--logit_std`, its standard deviation.
    pub logit_std: f64,
    /// `--mode_scale`, the scale of the mode density.
    pub mode_scale: f64,
    /// `--precondition_outputs`: train `pred * (-sigma) + noisy` towards the clean latents
    /// instead of `pred` towards the velocity `noise - latents`.
    pub precondition_outputs: bool,
}

impl Default for FlowMatchingConfig {
    fn default() -> Self {
        Self {
            weighting_scheme: WeightingScheme::LogitNormal,
            logit_mean: 0.0,
            logit_std: 1.0,
            mode_scale: 1.29,
            precondition_outputs: true,
        }
    }
}

impl FlowMatchingConfig {
    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field: a non-finite mean or scale, a standard
    /// deviation that is not positive.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("logit_mean", self.logit_mean),
            ("mode_scale", self.mode_scale),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid_argument(name, format!("{v} is not finite")));
            }
        }
        if !(self.logit_std > 0.0 && self.logit_std.is_finite()) {
            return Err(Error::invalid_argument(
                "logit_std",
                format!("{} is not positive", self.logit_std),
            ));
        }
        Ok(())
    }

    /// Refuse settings of the epsilon / v objective that the flow-matching scripts do not have.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `snr_gamma` (Min-SNR weighting is defined through the
    /// DDPM signal-to-noise ratio; the flow scripts weight by `weighting_scheme`),
    /// `noise_offset` or `input_perturbation`.
    pub fn check_objective(&self, objective: &Objective) -> Result<()> {
        if let Some(gamma) = objective.snr_gamma {
            return Err(Error::invalid_argument(
                "snr_gamma",
                format!(
                    "Min-SNR weighting (gamma {gamma}) does not apply to the flow-matching \
                     objective; choose a weighting_scheme instead"
                ),
            ));
        }
        for (name, v) in [
            ("noise_offset", objective.noise_offset),
            ("input_perturbation", objective.input_perturbation),
        ] {
            if v != 0.0 {
                return Err(Error::invalid_argument(
                    name,
                    format!("{v}: the flow-matching objective has no {name}"),
                ));
            }
        }
        Ok(())
    }
}

/// The flow times of `compute_density_for_timestep_sampling` from the raw draws it makes:
/// `sigmoid(draw)` of the `N(logit_mean, logit_std)` draws for `logit_normal`,
/// `1 - u - mode_scale (cos(pi u / 2)^2 - 1 + u)` of uniform draws for `mode`, the uniform draws
/// themselves otherwise. Float32 as torch evaluates it.
pub fn density_from_draws(config: &FlowMatchingConfig, draws: &[f32]) -> Vec<f32> {
    match config.weighting_scheme {
        WeightingScheme::LogitNormal => draws.iter().map(|&n| 1.0 / (1.0 + (-n).exp())).collect(),
        WeightingScheme::Mode => {
            let scale = config.mode_scale as f32;
            draws
                .iter()
                .map(|&u| {
                    let c = (PI * u / 2.0).cos();
                    1.0 - u - scale * (c * c - 1.0 + u)
                })
                .collect()
        }
        _ => draws.to_vec(),
    }
}

/// `compute_density_for_timestep_sampling` with our generator: `batch` normal draws
/// (`logit_mean + logit_std * randn`, as `torch.normal` makes them) or uniform ones, then
/// [`density_from_draws`].
pub fn compute_density_for_timestep_sampling(
    config: &FlowMatchingConfig,
    batch: usize,
    generator: &mut TorchGenerator,
) -> Vec<f32> {
    let draws = match config.weighting_scheme {
        WeightingScheme::LogitNormal => {
            let (mean, std) = (config.logit_mean as f32, config.logit_std as f32);
            generator
                .randn(&[batch])
                .into_iter()
                .map(|z| z * std + mean)
                .collect()
        }
        _ => generator.rand(&[batch]),
    };
    density_from_draws(config, &draws)
}

/// `compute_loss_weighting_for_sd3`: `sigma^-2` for `sigma_sqrt`, `2 / (pi (1 - 2 sigma + 2
/// sigma^2))` for `cosmap`, ones otherwise. Float32 as torch evaluates it.
pub fn compute_loss_weighting_for_sd3(scheme: WeightingScheme, sigmas: &[f32]) -> Vec<f32> {
    match scheme {
        WeightingScheme::SigmaSqrt => sigmas.iter().map(|&s| s.powf(-2.0)).collect(),
        WeightingScheme::Cosmap => sigmas
            .iter()
            .map(|&s| {
                let bot = 1.0 - 2.0 * s + 2.0 * s * s;
                2.0 / (PI * bot)
            })
            .collect(),
        _ => vec![1.0; sigmas.len()],
    }
}

/// FlowMatchEulerDiscreteScheduler's training schedule, what `.timesteps` and `.sigmas` hold
/// right after construction (shifted by the config's `shift`; unshifted with dynamic
/// shifting), in float32.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchingSchedule {
    /// `sigma * num_train_timesteps`, from noise to data.
    pub timesteps: Vec<f32>,
    /// The flow times, from 1 towards `1 / num_train_timesteps`.
    pub sigmas: Vec<f32>,
}

impl FlowMatchingSchedule {
    /// The schedule of a freshly built scheduler with this config.
    ///
    /// # Errors
    /// As [`FlowMatchEulerDiscreteScheduler::new`].
    pub fn new(config: FlowMatchEulerDiscreteSchedulerConfig) -> Result<Self> {
        let s = FlowMatchEulerDiscreteScheduler::new(config)?;
        Ok(Self::of(&s))
    }

    /// The schedule of a model folder's `scheduler/scheduler_config.json`.
    ///
    /// # Errors
    /// Config reading errors naming the file.
    pub fn load(pretrained_model: &Path) -> Result<Self> {
        let file = ConfigFile::<FlowMatchEulerDiscreteSchedulerConfig>::load(
            pretrained_model
                .join("scheduler")
                .join("scheduler_config.json"),
        )?;
        let s = FlowMatchEulerDiscreteScheduler::from_config_file(file)?;
        Ok(Self::of(&s))
    }

    fn of(s: &FlowMatchEulerDiscreteScheduler) -> Self {
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        Self {
            timesteps: f(s.timesteps()),
            sigmas: f(s.sigmas().unwrap_or(&[])),
        }
    }

    /// `num_train_timesteps`.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Whether the schedule is empty (never for a valid config).
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// The schedule indices of flow times `u` in `[0, 1)`: `(u * num_train_timesteps).long()`
    /// in float32.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`u`) for a value whose index falls outside the schedule.
    pub fn indices(&self, u: &[f32]) -> Result<Vec<usize>> {
        let n = self.len();
        u.iter()
            .map(|&v| {
                let i = (v * n as f32).trunc();
                if i >= 0.0 && (i as usize) < n {
                    Ok(i as usize)
                } else {
                    Err(Error::invalid_argument(
                        "u",
                        format!("{v} maps outside the {n} training timesteps"),
                    ))
                }
            })
            .collect()
    }

    /// The timesteps at schedule `indices`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`timesteps`) for an index outside the schedule.
    pub fn timesteps_at(&self, indices: &[usize]) -> Result<Vec<f32>> {
        self.at(&self.timesteps, indices)
    }

    /// The sigmas of the SD3 script's `get_sigmas`: each timestep found in the schedule, the
    /// sigma at its place.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`timesteps`) for a timestep that is not in the schedule.
    pub fn sigmas_for_timesteps(&self, timesteps: &[f32]) -> Result<Vec<f32>> {
        timesteps
            .iter()
            .map(|&t| {
                self.timesteps
                    .iter()
                    .position(|&s| s == t)
                    .map(|i| self.sigmas[i])
                    .ok_or_else(|| {
                        Error::invalid_argument(
                            "timesteps",
                            format!("{t} is not in the training schedule"),
                        )
                    })
            })
            .collect()
    }

    fn at(&self, values: &[f32], indices: &[usize]) -> Result<Vec<f32>> {
        indices
            .iter()
            .map(|&i| {
                values.get(i).copied().ok_or_else(|| {
                    Error::invalid_argument(
                        "timesteps",
                        format!(
                            "index {i} is not below num_train_timesteps ({})",
                            self.len()
                        ),
                    )
                })
            })
            .collect()
    }
}

/// One value per sample as a `[B, C, H, W]` tensor like `like`.
fn per_sample(values: &[f32], like: &Tensor<4>) -> Tensor<4> {
    let dims = like.dims();
    Tensor::<4>::from_data(
        TensorData::new(values.to_vec(), [values.len(), 1, 1, 1]),
        &like.device(),
    )
    .expand(dims)
}

/// The noisy input `(1 - sigma) latents + sigma noise`, one sigma per sample.
///
/// # Shapes
/// - `latents`, `noise`, output: `[B, C, H, W]`; `sigmas`: `B` values
pub fn noisy_input(latents: Tensor<4>, noise: Tensor<4>, sigmas: &[f32]) -> Tensor<4> {
    let keep: Vec<f32> = sigmas.iter().map(|&s| 1.0 - s).collect();
    per_sample(&keep, &latents)
        .mul(latents)
        .add(per_sample(sigmas, &noise).mul(noise))
}

/// The velocity target `noise - latents`.
///
/// # Shapes
/// `[B, C, H, W]` in and out.
pub fn flow_target(latents: Tensor<4>, noise: Tensor<4>) -> Tensor<4> {
    noise.sub(latents)
}

/// `precondition_outputs`: the prediction mapped to clean latents, `pred * (-sigma) + noisy`.
///
/// # Shapes
/// `[B, C, H, W]` in and out; `sigmas`: `B` values.
pub fn precondition_output(pred: Tensor<4>, noisy: Tensor<4>, sigmas: &[f32]) -> Tensor<4> {
    let neg: Vec<f32> = sigmas.iter().map(|&s| -s).collect();
    pred.mul(per_sample(&neg, &noisy)).add(noisy)
}

/// The scripts' reduction: `mean(weighting * (pred - target)^2)` over each sample, then over
/// the batch.
///
/// # Shapes
/// - `pred`, `target`: `[B, C, H, W]`; `weighting`: `B` values; output `[1]`
pub fn weighted_loss(pred: Tensor<4>, target: Tensor<4>, weighting: &[f32]) -> Tensor<1> {
    let b = pred.dims()[0];
    let error = per_sample(weighting, &pred).mul(pred.sub(target).square());
    let per: Tensor<2> = error.reshape([b as i32, -1]).mean_dim(1);
    per.mean()
}

/// Whether the `_class_name` of a model folder's `scheduler/scheduler_config.json` is
/// `FlowMatchEulerDiscreteScheduler` (false when the file cannot be read: the noise
/// scheduler's own loading reports that).
pub fn is_flow_match_folder(pretrained_model: &Path) -> bool {
    let path = pretrained_model
        .join("scheduler")
        .join("scheduler_config.json");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v.get("_class_name")?.as_str().map(str::to_string))
        .is_some_and(|c| {
            c == <FlowMatchEulerDiscreteSchedulerConfig as diffusion_core::Config>::CLASS_NAME
        })
}

/// The flow-matching objective of one run: its settings and the training schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatching {
    /// Density, weighting, preconditioning.
    pub config: FlowMatchingConfig,
    /// The scheduler's training schedule.
    pub schedule: FlowMatchingSchedule,
}

impl FlowMatching {
    /// Check `config` and pair it with `schedule`.
    ///
    /// # Errors
    /// As [`FlowMatchingConfig::validate`].
    pub fn new(config: FlowMatchingConfig, schedule: FlowMatchingSchedule) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, schedule })
    }

    /// Flow-time schedule indices for a micro-batch of `batch` from the run's generator
    /// ([`compute_density_for_timestep_sampling`], then [`FlowMatchingSchedule::indices`]).
    ///
    /// # Errors
    /// As [`FlowMatchingSchedule::indices`].
    pub fn draw_indices(&self, batch: usize, generator: &mut TorchGenerator) -> Result<Vec<usize>> {
        let u = compute_density_for_timestep_sampling(&self.config, batch, generator);
        self.schedule.indices(&u)
    }

    /// The loss of `unet` on clean `latents`, with `noise` and schedule `indices` drawn for
    /// them; the UNet's output is read as the flow velocity and it is called with the float
    /// timesteps of the schedule.
    ///
    /// # Shapes
    /// - `latents`, `noise`: `[B, C, H, W]`; `encoder_hidden_states`: `[B, S, D]`; output `[1]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `noise` of another shape than `latents`, or indices that
    /// are not one per sample inside the schedule; model errors.
    pub fn loss(
        &self,
        unet: &UNet2DConditionModel,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        noise: Tensor<4>,
        indices: &[usize],
    ) -> Result<Tensor<1>> {
        let dims = latents.dims();
        if noise.dims() != dims {
            return Err(Error::invalid_argument(
                "noise",
                format!("shape {:?} for latents {dims:?}", noise.dims()),
            ));
        }
        if indices.len() != dims[0] {
            return Err(Error::invalid_argument(
                "timesteps",
                format!("{} timesteps for a batch of {}", indices.len(), dims[0]),
            ));
        }
        let device: Device = latents.device();
        let timesteps = self.schedule.timesteps_at(indices)?;
        let sigmas = self.schedule.sigmas_for_timesteps(&timesteps)?;
        let noisy = noisy_input(latents.clone(), noise.clone(), &sigmas);
        let t = Tensor::<1>::from_data(TensorData::new(timesteps, [dims[0]]), &device);
        let pred = unet.forward_with(
            crate::mixed_precision::cast_input(unet, noisy.clone()),
            t,
            crate::mixed_precision::cast_input(unet, encoder_hidden_states),
            UNet2DConditionOptions::default(),
        )?;
        let pred = crate::mixed_precision::to_f32(pred);
        let (pred, target) = if self.config.precondition_outputs {
            (precondition_output(pred, noisy, &sigmas), latents)
        } else {
            (pred, flow_target(latents, noise))
        };
        let weighting = compute_loss_weighting_for_sd3(self.config.weighting_scheme, &sigmas);
        Ok(weighted_loss(pred, target, &weighting))
    }
}
