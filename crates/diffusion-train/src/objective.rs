//! The denoising objective of diffusers' latent-diffusion training scripts
//! (train_text_to_image.py, its LoRA variant, and the DreamBooth / textual-inversion /
//! ControlNet scripts that share it): noise with an optional offset and input perturbation,
//! `add_noise` at the drawn timesteps, a target by prediction type, MSE with optional Min-SNR
//! weighting (`compute_snr` and the epsilon / v formulas of the scripts).
//!
//! Draws are inputs ([`NoiseDraws`]) so that a parity test can pass PyTorch's and a run can pass
//! seeded ones.

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Error, Result};
use diffusion_models::{UNet2DConditionModel, UNet2DConditionOptions};
use diffusion_schedulers::{DDPMScheduler, PredictionType, Scheduler};

/// What the loss asks of the model. `Default` is the scripts' defaults (epsilon, no SNR
/// weighting, no offset or perturbation).
#[derive(Clone, Debug, PartialEq)]
pub struct Objective {
    /// The target: `epsilon` (the noise), `v_prediction` (`get_velocity`) or `sample` (the
    /// clean latents).
    pub prediction_type: PredictionType,
    /// Min-SNR weighting with this gamma (`--snr_gamma`; 5 is the paper's recommendation).
    pub snr_gamma: Option<f64>,
    /// `noise += noise_offset * randn([B, C, 1, 1])` (`--noise_offset`).
    pub noise_offset: f64,
    /// Noise the latents with `noise + input_perturbation * randn_like(noise)` while the target
    /// keeps `noise` (`--input_perturbation`).
    pub input_perturbation: f64,
}

impl Default for Objective {
    fn default() -> Self {
        Self {
            prediction_type: PredictionType::Epsilon,
            snr_gamma: None,
            noise_offset: 0.0,
            input_perturbation: 0.0,
        }
    }
}

impl Objective {
    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field: a prediction type without a training
    /// target, a non-positive `snr_gamma`, a negative or non-finite offset or perturbation.
    pub fn validate(&self) -> Result<()> {
        match self.prediction_type {
            PredictionType::Epsilon | PredictionType::VPrediction | PredictionType::Sample => {}
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!(
                        "`{}` has no training target (epsilon, v_prediction, sample)",
                        other.as_str()
                    ),
                ));
            }
        }
        if let Some(gamma) = self.snr_gamma
            && !(gamma > 0.0 && gamma.is_finite())
        {
            return Err(Error::invalid_argument(
                "snr_gamma",
                format!("{gamma} is not positive"),
            ));
        }
        for (name, v) in [
            ("noise_offset", self.noise_offset),
            ("input_perturbation", self.input_perturbation),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::invalid_argument(
                    name,
                    format!("{v} is not a non-negative number"),
                ));
            }
        }
        Ok(())
    }
}

/// The random inputs of one loss evaluation.
#[derive(Clone, Debug)]
pub struct NoiseDraws {
    /// `randn_like(latents)`, `[B, C, H, W]`.
    pub noise: Tensor<4>,
    /// `randn([B, C, 1, 1])` for the noise offset (needed when `noise_offset > 0`).
    pub offset_noise: Option<Tensor<4>>,
    /// `randn_like(noise)` for the input perturbation (needed when `input_perturbation > 0`).
    pub perturbation: Option<Tensor<4>>,
    /// One timestep per sample, below `num_train_timesteps`.
    pub timesteps: Vec<usize>,
}

/// diffusers' `training_utils.compute_snr`: `(sqrt(alpha_bar) / sqrt(1 - alpha_bar))^2` per
/// timestep, in float32 from the float32 `alphas_cumprod` as torch computes it.
///
/// # Panics
/// When a timestep is outside the schedule (callers check first).
pub fn compute_snr(scheduler: &DDPMScheduler, timesteps: &[usize]) -> Vec<f32> {
    let alphas = scheduler.alphas_cumprod();
    timesteps
        .iter()
        .map(|&t| {
            let a = alphas[t] as f32;
            let ratio = a.sqrt() / (1.0 - a).sqrt();
            ratio * ratio
        })
        .collect()
}

/// The Min-SNR loss weights of the scripts: `min(snr, gamma)`, divided by `snr` for epsilon
/// and by `snr + 1` for v-prediction; for `sample` (x0 prediction, which the scripts do not
/// train) `min(snr, gamma)` itself, as in the Min-SNR paper.
pub fn min_snr_weights(
    scheduler: &DDPMScheduler,
    timesteps: &[usize],
    gamma: f64,
    prediction_type: PredictionType,
) -> Vec<f32> {
    let gamma = gamma as f32;
    compute_snr(scheduler, timesteps)
        .into_iter()
        .map(|snr| {
            let w = snr.min(gamma);
            match prediction_type {
                PredictionType::Epsilon => w / snr,
                PredictionType::VPrediction => w / (snr + 1.0),
                _ => w,
            }
        })
        .collect()
}

fn check_draws(draws: &NoiseDraws, latents: &Tensor<4>, num_train: usize) -> Result<()> {
    let dims = latents.dims();
    if draws.noise.dims() != dims {
        return Err(Error::invalid_argument(
            "noise",
            format!("shape {:?} for latents {dims:?}", draws.noise.dims()),
        ));
    }
    if draws.timesteps.len() != dims[0] {
        return Err(Error::invalid_argument(
            "timesteps",
            format!(
                "{} timesteps for a batch of {}",
                draws.timesteps.len(),
                dims[0]
            ),
        ));
    }
    if let Some(t) = draws.timesteps.iter().find(|&&t| t >= num_train) {
        return Err(Error::invalid_argument(
            "timesteps",
            format!("{t} is not below num_train_timesteps ({num_train})"),
        ));
    }
    Ok(())
}

/// The training loss of a conditional UNet on clean `latents` with the text states
/// `encoder_hidden_states`, as train_text_to_image.py computes it.
///
/// # Shapes
/// - `latents`: `[B, C, H, W]`, already multiplied by the VAE's `scaling_factor`
/// - `encoder_hidden_states`: `[B, S, D]`
/// - output: `[1]`
///
/// # Errors
/// [`Error::InvalidArgument`] for draws that do not fit the latents or miss the offset /
/// perturbation noise the objective needs, a prediction type without a target; model errors.
pub fn conditional_loss(
    unet: &UNet2DConditionModel,
    scheduler: &DDPMScheduler,
    objective: &Objective,
    latents: Tensor<4>,
    encoder_hidden_states: Tensor<3>,
    draws: &NoiseDraws,
) -> Result<Tensor<1>> {
    let b = latents.dims()[0];
    let device = latents.device();
    let (pred, target) = conditional_prediction(
        unet,
        scheduler,
        objective,
        latents,
        encoder_hidden_states,
        draws,
    )?;
    Ok(mse_loss(
        pred,
        target,
        scheduler,
        objective,
        &draws.timesteps,
        b,
        &device,
    ))
}

/// The scripts' reduction: the mean squared error, or with Min-SNR weighting the per-sample
/// means weighted by [`min_snr_weights`] and averaged.
pub(crate) fn mse_loss(
    pred: Tensor<4>,
    target: Tensor<4>,
    scheduler: &DDPMScheduler,
    objective: &Objective,
    timesteps: &[usize],
    b: usize,
    device: &diffusion_core::Device,
) -> Tensor<1> {
    let error = pred.sub(target).square();
    match objective.snr_gamma {
        None => error.mean(),
        Some(gamma) => {
            let w = min_snr_weights(scheduler, timesteps, gamma, objective.prediction_type);
            let w = Tensor::<2>::from_data(TensorData::new(w, [b, 1]), device);
            let per_sample: Tensor<2> = error.reshape([b as i32, -1]).mean_dim(1);
            per_sample.mul(w).mean()
        }
    }
}

/// The model's prediction on the noised `latents` and the target it is trained towards, the
/// part of [`conditional_loss`] before the reduction (DreamBooth's prior preservation splits
/// them per half of the batch).
///
/// # Shapes
/// - `latents`: `[B, C, H, W]`, `encoder_hidden_states`: `[B, S, D]`; both outputs `[B, C, H, W]`
///
/// # Errors
/// As [`conditional_loss`].
pub fn conditional_prediction(
    unet: &UNet2DConditionModel,
    scheduler: &DDPMScheduler,
    objective: &Objective,
    latents: Tensor<4>,
    encoder_hidden_states: Tensor<3>,
    draws: &NoiseDraws,
) -> Result<(Tensor<4>, Tensor<4>)> {
    conditional_prediction_with(
        unet,
        scheduler,
        objective,
        latents,
        encoder_hidden_states,
        draws,
        UNet2DConditionOptions::default(),
    )
}

/// [`conditional_prediction`] with the UNet's rare inputs (SDXL's `added_cond_kwargs`).
///
/// # Shapes
/// As [`conditional_prediction`].
///
/// # Errors
/// As [`conditional_prediction`].
pub fn conditional_prediction_with(
    unet: &UNet2DConditionModel,
    scheduler: &DDPMScheduler,
    objective: &Objective,
    latents: Tensor<4>,
    encoder_hidden_states: Tensor<3>,
    draws: &NoiseDraws,
    options: UNet2DConditionOptions,
) -> Result<(Tensor<4>, Tensor<4>)> {
    objective.validate()?;
    check_draws(draws, &latents, scheduler.num_train_timesteps())?;
    let dims = latents.dims();
    let b = dims[0];
    let device = latents.device();
    let mut noise = draws.noise.clone();
    if objective.noise_offset > 0.0 {
        let offset = draws.offset_noise.clone().ok_or_else(|| {
            Error::invalid_argument("offset_noise", "noise_offset is set but no offset noise")
        })?;
        noise = noise.add(offset.mul_scalar(objective.noise_offset).expand(dims));
    }
    let ts: Vec<f64> = draws.timesteps.iter().map(|&t| t as f64).collect();
    let noisy = if objective.input_perturbation > 0.0 {
        let p = draws.perturbation.clone().ok_or_else(|| {
            Error::invalid_argument(
                "perturbation",
                "input_perturbation is set but no perturbation noise",
            )
        })?;
        let new_noise = noise
            .clone()
            .add(p.mul_scalar(objective.input_perturbation));
        scheduler.add_noise(latents.clone(), new_noise, &ts)?
    } else {
        scheduler.add_noise(latents.clone(), noise.clone(), &ts)?
    };
    let target = match objective.prediction_type {
        PredictionType::Epsilon => noise,
        PredictionType::VPrediction => scheduler.get_velocity(latents, noise, &ts)?,
        PredictionType::Sample => latents,
        other => {
            return Err(Error::invalid_argument(
                "prediction_type",
                format!("`{}` has no training target", other.as_str()),
            ));
        }
    };
    let t = Tensor::<1>::from_data(
        TensorData::new(
            draws
                .timesteps
                .iter()
                .map(|&t| t as f32)
                .collect::<Vec<f32>>(),
            [b],
        ),
        &device,
    );
    // A half-precision UNet (mixed precision) takes its inputs in its dtype; the prediction
    // comes back as f32 for the loss (the scripts' `model_pred.float()`).
    let noisy = crate::mixed_precision::cast_input(unet, noisy);
    let encoder_hidden_states = crate::mixed_precision::cast_input(unet, encoder_hidden_states);
    let pred = unet.forward_with(noisy, t, encoder_hidden_states, options)?;
    Ok((crate::mixed_precision::to_f32(pred), target))
}
