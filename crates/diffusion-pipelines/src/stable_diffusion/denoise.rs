//! What the Stable Diffusion pipelines share: schedule set-up, the guided denoising loop, VAE
//! encoding with generators, and decoding.

use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Error, NoiseSource, Result, TorchGenerator};
use diffusion_models::{
    AddedCondKwargs, AutoencoderKL, ModelMixin, UNet2DConditionModel, UNet2DConditionOptions,
};
use diffusion_schedulers::{AnyScheduler, Scheduler, SetTimesteps, StepOptions};

use crate::pipeline_utils::{
    ImagePipelineOutput, StepCallback, after_step, noise_source, progress_bar,
};

/// diffusers' `retrieve_timesteps`: a step count, or custom `timesteps` / `sigmas` (then the
/// step count is their length). Returns the number of inference steps.
pub(crate) fn retrieve_timesteps(
    scheduler: &mut AnyScheduler,
    num_inference_steps: usize,
    timesteps: Option<&[f64]>,
    sigmas: Option<&[f64]>,
) -> Result<usize> {
    let request = match (timesteps, sigmas) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid_argument(
                "timesteps",
                "give either custom timesteps or custom sigmas, not both",
            ));
        }
        (Some(t), None) => SetTimesteps::custom_timesteps(t.to_vec()),
        (None, Some(s)) => SetTimesteps::custom_sigmas(s.to_vec()),
        (None, None) => {
            if num_inference_steps == 0 {
                return Err(Error::invalid_argument(
                    "num_inference_steps",
                    "must be at least 1",
                ));
            }
            SetTimesteps::steps(num_inference_steps)
        }
    };
    let custom = timesteps.is_some() || sigmas.is_some();
    scheduler.set_timesteps_with(request)?;
    Ok(if custom {
        scheduler.timesteps().len()
    } else {
        num_inference_steps
    })
}

/// diffusers' `get_timesteps` for image-to-image: keep the last `strength` part of the schedule
/// and start the scheduler there. Returns the timesteps left.
pub(crate) fn timesteps_for_strength(
    scheduler: &mut AnyScheduler,
    num_inference_steps: usize,
    strength: f64,
) -> Result<Vec<f64>> {
    check_strength(strength)?;
    let init = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    let t_start = num_inference_steps - init;
    if num_inference_steps - t_start < 1 {
        return Err(Error::invalid_argument(
            "strength",
            format!(
                "strength {strength} with {num_inference_steps} steps leaves no denoising step"
            ),
        ));
    }
    let begin = t_start * scheduler.order();
    let timesteps = scheduler.timesteps().get(begin..).unwrap_or(&[]).to_vec();
    scheduler.set_begin_index(begin)?;
    Ok(timesteps)
}

pub(crate) fn check_strength(strength: f64) -> Result<()> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::invalid_argument(
            "strength",
            format!("{strength} is outside (0, 1]"),
        ));
    }
    Ok(())
}

/// diffusers checks `height % 8` and `width % 8` whatever the VAE.
pub(crate) fn check_size(height: usize, width: usize) -> Result<()> {
    for (name, v) in [("height", height), ("width", width)] {
        if v == 0 || !v.is_multiple_of(8) {
            return Err(Error::invalid_argument(
                name,
                format!("{v} is not a positive multiple of 8"),
            ));
        }
    }
    Ok(())
}

/// diffusers' `get_guidance_scale_embedding` for guidance-distilled UNets (`time_cond_proj_dim`):
/// sinusoidal features of `(guidance_scale - 1) * 1000`, in float32 as torch computes them.
pub(crate) fn guidance_scale_embedding(
    guidance_scale: f64,
    batch: usize,
    dim: usize,
    device: &diffusion_core::Device,
) -> Tensor<2> {
    let w = (guidance_scale - 1.0) as f32 * 1000.0;
    let half = dim / 2;
    let scale = 10000f32.ln() / (half as f32 - 1.0);
    let mut row: Vec<f32> = Vec::with_capacity(dim);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -scale).exp()).collect();
    row.extend(freqs.iter().map(|f| (w * f).sin()));
    row.extend(freqs.iter().map(|f| (w * f).cos()));
    if dim % 2 == 1 {
        row.push(0.0);
    }
    let data: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
    Tensor::from_data(TensorData::new(data, [batch, dim]), device)
}

/// Per-sample standard deviation over all but the batch dimension (torch's unbiased `std`).
fn std_per_sample(x: &Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let n = c * h * w;
    let flat = x.clone().reshape([b, n]);
    let mean = flat.clone().mean_dim(1);
    let var = flat
        .sub(mean)
        .powi_scalar(2)
        .sum_dim(1)
        .div_scalar((n.max(2) - 1) as f64);
    var.sqrt().reshape([b, 1, 1, 1])
}

/// diffusers' `rescale_noise_cfg` (Lin et al. 2023, section 3.4): pull the guided prediction's
/// spread back to the text prediction's, mixed by `guidance_rescale`.
pub(crate) fn rescale_noise_cfg(
    noise_cfg: Tensor<4>,
    noise_pred_text: &Tensor<4>,
    guidance_rescale: f64,
) -> Tensor<4> {
    let std_text = std_per_sample(noise_pred_text);
    let std_cfg = std_per_sample(&noise_cfg);
    let rescaled = noise_cfg.clone().mul(std_text.div(std_cfg));
    rescaled
        .mul_scalar(guidance_rescale)
        .add(noise_cfg.mul_scalar(1.0 - guidance_rescale))
}

/// Extra UNet inputs of the inpainting pipeline.
// One value per call: boxing the tensors would only add allocations.
#[allow(clippy::large_enum_variant)]
pub(crate) enum InpaintCondition {
    /// Plain text-to-image / image-to-image.
    None,
    /// 9-channel UNets: `[latents, mask, masked_image_latents]` along channels (both already
    /// doubled for guidance).
    Channels {
        mask: Tensor<4>,
        masked_image_latents: Tensor<4>,
    },
    /// 4-channel UNets: after each step, keep the known region from the image latents noised to
    /// the next timestep (`mask` is not doubled).
    Blend {
        image_latents: Tensor<4>,
        noise: Tensor<4>,
        mask: Tensor<4>,
    },
}

/// Everything the denoising loop needs.
pub(crate) struct DenoiseLoop<'a, 'cb> {
    pub unet: &'a UNet2DConditionModel,
    pub scheduler: &'a mut AnyScheduler,
    pub timesteps: Vec<f64>,
    /// `[negative, positive]` embeddings with guidance, else the positive ones.
    pub prompt_embeds: Tensor<3>,
    pub do_classifier_free_guidance: bool,
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    pub eta: f64,
    pub condition: InpaintCondition,
    /// SDXL's pooled text embeddings and size conditioning, batched like `prompt_embeds`.
    pub added_cond: Option<AddedCondKwargs>,
    /// IP-Adapter image embeddings per adapter, batched like `prompt_embeds`.
    pub image_embeds: Option<Vec<diffusion_models::unets::unet_2d_condition::ImageEmbeds>>,
    /// IP-Adapter masks per adapter (empty: none).
    pub ip_adapter_masks: Vec<Option<diffusion_models::attention_processor::IPAdapterMask>>,
    pub generators: &'a mut [TorchGenerator],
    pub callback: Option<&'a mut StepCallback<'cb>>,
    pub progress: bool,
}

impl DenoiseLoop<'_, '_> {
    /// Run the loop from `latents`; returns the final latents and whether a callback
    /// interrupted it.
    pub fn run(mut self, mut latents: Tensor<4>) -> Result<(Tensor<4>, bool)> {
        let device = latents.device();
        let shape = latents.dims();
        let batch = shape[0];
        let cfg = self.do_classifier_free_guidance;
        let timestep_cond = self.unet.config().time_cond_proj_dim.map(|dim| {
            guidance_scale_embedding(self.guidance_scale, batch, dim, &device)
                .cast(FloatDType::from(latents.dtype()))
        });
        let kind = self.scheduler.kind();
        let (takes_eta, takes_generator) = (kind.step_takes_eta(), kind.step_takes_generator());
        let bar = progress_bar(self.timesteps.len(), self.progress);
        let mut interrupted = false;
        let n = self.timesteps.len();
        for (i, &t) in self.timesteps.iter().enumerate() {
            let model_input = if cfg {
                Tensor::cat(vec![latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            let mut model_input = self.scheduler.scale_model_input(model_input, t)?;
            if let InpaintCondition::Channels {
                mask,
                masked_image_latents,
            } = &self.condition
            {
                model_input = Tensor::cat(
                    vec![model_input, mask.clone(), masked_image_latents.clone()],
                    1,
                );
            }
            let timestep = Tensor::<1>::from_floats([t as f32], &device);
            let mut added_cond_kwargs = self.added_cond.clone();
            if let Some(embeds) = &self.image_embeds {
                added_cond_kwargs
                    .get_or_insert_with(Default::default)
                    .image_embeds = Some(embeds.clone());
            }
            let options = UNet2DConditionOptions {
                timestep_cond: timestep_cond.clone(),
                added_cond_kwargs,
                ip_adapter_masks: self.ip_adapter_masks.clone(),
                ..Default::default()
            };
            let noise_pred = self.unet.forward_with(
                model_input,
                timestep,
                self.prompt_embeds.clone(),
                options,
            )?;
            let noise_pred = if cfg {
                let uncond = noise_pred.clone().narrow(0, 0, batch);
                let text = noise_pred.narrow(0, batch, batch);
                let guided = uncond
                    .clone()
                    .add(text.clone().sub(uncond).mul_scalar(self.guidance_scale));
                if self.guidance_rescale > 0.0 {
                    rescale_noise_cfg(guided, &text, self.guidance_rescale)
                } else {
                    guided
                }
            } else {
                noise_pred
            };
            let options = StepOptions {
                generator: takes_generator.then(|| noise_source(self.generators)),
                eta: takes_eta.then_some(self.eta),
                ..StepOptions::default()
            };
            latents = self
                .scheduler
                .step(noise_pred, t, latents, options)?
                .prev_sample;
            if let InpaintCondition::Blend {
                image_latents,
                noise,
                mask,
            } = &self.condition
            {
                let known = match self.timesteps.get(i + 1) {
                    Some(&next) => {
                        self.scheduler
                            .add_noise(image_latents.clone(), noise.clone(), &[next])?
                    }
                    None => image_latents.clone(),
                };
                let keep = mask.clone().neg().add_scalar(1.0);
                latents = keep.mul(known).add(mask.clone().mul(latents));
            }
            bar.inc(1);
            let callback = self.callback.as_deref_mut();
            if after_step(callback, i, n, t, &mut latents)? {
                interrupted = true;
                break;
            }
        }
        bar.finish_and_clear();
        Ok((latents, interrupted))
    }
}

/// `vae.encode(image).latent_dist.sample(generator)`, per image with its own generator when
/// there is one per image (diffusers' `_encode_vae_image`), times `scaling_factor`.
pub(crate) fn encode_vae_image(
    vae: &AutoencoderKL,
    image: Tensor<4>,
    generators: &mut [TorchGenerator],
) -> Result<Tensor<4>> {
    let [b, ..] = image.dims();
    let image = cast_like_model(image, vae_dtype(vae));
    let latents = if generators.len() > 1 {
        if generators.len() < b {
            return Err(Error::invalid_argument(
                "generator",
                format!("{} generators for {b} images", generators.len()),
            ));
        }
        let mut parts = Vec::with_capacity(b);
        for (i, generator) in generators.iter_mut().enumerate().take(b) {
            let dist = vae.encode(image.clone().narrow(0, i, 1))?;
            parts.push(dist.sample(Some(NoiseSource::Single(generator)))?);
        }
        Tensor::cat(parts, 0)
    } else {
        vae.encode(image)?.sample(Some(noise_source(generators)))?
    };
    Ok(latents.mul_scalar(vae.config().scaling_factor))
}

pub(crate) fn vae_dtype(vae: &AutoencoderKL) -> FloatDType {
    vae.encoder.conv_in.weight.val().dtype().into()
}

pub(crate) fn unet_dtype(unet: &UNet2DConditionModel) -> FloatDType {
    unet.conv_in.weight.val().dtype().into()
}

pub(crate) fn cast_like_model<const D: usize>(x: Tensor<D>, dtype: FloatDType) -> Tensor<D> {
    if FloatDType::from(x.dtype()) == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// Tile a batch `k` times (`torch.cat([x] * k)` / `x.repeat(k, 1, 1, 1)`) up to `batch`.
pub(crate) fn tile_to_batch(x: Tensor<4>, batch: usize, name: &str) -> Result<Tensor<4>> {
    let b = x.dims()[0];
    if b == batch {
        return Ok(x);
    }
    if b == 0 || !batch.is_multiple_of(b) || b > batch {
        return Err(Error::invalid_argument(
            name,
            format!("a batch of {b} cannot be repeated to the {batch} images requested"),
        ));
    }
    Ok(Tensor::cat(vec![x; batch / b], 0))
}

/// Decode latents (`vae.decode(latents / scaling_factor)`) and convert to `output_type`.
pub(crate) fn decode_latents(
    vae: &AutoencoderKL,
    vae_scale_factor: usize,
    latents: Tensor<4>,
    output_type: OutputType,
    interrupted: bool,
) -> Result<ImagePipelineOutput> {
    let processor = VaeImageProcessor::new(vae_scale_factor);
    if output_type == OutputType::Latent {
        return Ok(ImagePipelineOutput {
            images: processor.postprocess(latents, output_type),
            interrupted,
        });
    }
    let z = cast_like_model(latents, vae_dtype(vae)).div_scalar(vae.config().scaling_factor);
    let image = vae.decode(z)?;
    let image = cast_like_model(image, FloatDType::F32);
    Ok(ImagePipelineOutput {
        images: processor.postprocess(image, output_type),
        interrupted,
    })
}

/// Fresh noise of `shape` from the generators, in `dtype`.
pub(crate) fn randn_latents(
    shape: [usize; 4],
    generators: &mut [TorchGenerator],
    device: &diffusion_core::Device,
    dtype: FloatDType,
) -> Result<Tensor<4>> {
    let noise: Tensor<4> =
        diffusion_core::tensor::randn_tensor(shape, noise_source(generators), device)?;
    Ok(cast_like_model(noise, dtype))
}
