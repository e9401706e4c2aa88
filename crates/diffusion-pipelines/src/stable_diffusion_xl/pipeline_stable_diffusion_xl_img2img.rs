//! `StableDiffusionXLImg2ImgPipeline`: image-to-image with SDXL, and the second half of the
//! base + refiner flow (`denoising_end` on the base, `denoising_start` here).

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Device, Error, NoiseSource, Result};
use diffusion_loaders::HubOptions;
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{AddedCondKwargs, ModelMixin};
use diffusion_schedulers::{AnyScheduler, Scheduler};

use super::StableDiffusionXLComponents;
use super::pipeline_stable_diffusion_xl::decode_xl;
use super::prompt::{XLEmbeddings, XLPromptInputs, encode_prompt};
use crate::pipeline_utils::{Generators, ImagePipelineOutput, StepCallback};
use crate::stable_diffusion::PipelineImageInput;
use crate::stable_diffusion::denoise::{
    DenoiseLoop, InpaintCondition, cast_like_model, check_strength, randn_latents,
    retrieve_timesteps, tile_to_batch, timesteps_for_strength, unet_dtype, vae_dtype,
};
use crate::stable_diffusion::image_input::preprocess;

/// Arguments of [`StableDiffusionXLImg2ImgPipeline::call`], diffusers'
/// `StableDiffusionXLImg2ImgPipeline.__call__` keyword arguments with their defaults.
pub struct StableDiffusionXLImg2ImgArgs<'a> {
    /// The prompts for the first text encoder; empty when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// The prompts for the second text encoder (`None`: the same as `prompt`).
    pub prompt_2: Option<Vec<String>>,
    /// The starting image(s), or latents (a tensor with the VAE's latent channels, e.g. the
    /// base pipeline's `output_type: Latent` output for the refiner).
    pub image: Option<PipelineImageInput>,
    /// How much to change the image, in (0, 1] (default 0.3); ignored with `denoising_start`.
    pub strength: f64,
    /// Denoising steps of the full schedule (default 50).
    pub num_inference_steps: usize,
    /// Custom timesteps, for schedulers that take them.
    pub timesteps: Option<Vec<f64>>,
    /// Custom sigmas, for schedulers that take them.
    pub sigmas: Option<Vec<f64>>,
    /// Start at this fraction of the schedule, in (0, 1), without adding noise: the image is
    /// the base pipeline's partly denoised latents (refiner flow).
    pub denoising_start: Option<f64>,
    /// Stop at this fraction of the schedule, in (0, 1).
    pub denoising_end: Option<f64>,
    /// Classifier-free guidance weight (default 5.0).
    pub guidance_scale: f64,
    /// Negative prompts for the first encoder, one per prompt.
    pub negative_prompt: Option<Vec<String>>,
    /// Negative prompts for the second encoder (`None`: the same as `negative_prompt`).
    pub negative_prompt_2: Option<Vec<String>>,
    /// Images per prompt (default 1).
    pub num_images_per_prompt: usize,
    /// DDIM's `eta` (default 0).
    pub eta: f64,
    /// Randomness: one seed, one per image, or random.
    pub generator: Generators,
    /// Starting latents used as they are instead of encoding and noising `image`.
    pub latents: Option<Tensor<4>>,
    /// Precomputed prompt embeddings (with `pooled_prompt_embeds`).
    pub prompt_embeds: Option<Tensor<3>>,
    /// Precomputed negative embeddings.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// Precomputed pooled embeddings.
    pub pooled_prompt_embeds: Option<Tensor<2>>,
    /// Precomputed negative pooled embeddings.
    pub negative_pooled_prompt_embeds: Option<Tensor<2>>,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// Rescale of the guided prediction (default 0: off).
    pub guidance_rescale: f64,
    /// Size micro-conditioning, and the aesthetic scores of refiners (diffusers'
    /// `original_size`, `crops_coords_top_left`, `target_size`, their `negative_*` forms,
    /// `aesthetic_score`, `negative_aesthetic_score`).
    pub micro_conditioning: MicroConditioning,
    /// Skip this many more final layers of the encoders.
    pub clip_skip: Option<usize>,
    /// IP-Adapter images, embeddings and masks (`ip_adapter_image`, `ip_adapter_image_embeds`,
    /// `ip_adapter_masks`); none by default.
    pub ip_adapter: crate::IPAdapterArgs,
    /// `callback_on_step_end`.
    pub callback: Option<StepCallback<'a>>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for StableDiffusionXLImg2ImgArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            prompt_2: None,
            image: None,
            strength: 0.3,
            num_inference_steps: 50,
            timesteps: None,
            sigmas: None,
            denoising_start: None,
            denoising_end: None,
            guidance_scale: 5.0,
            negative_prompt: None,
            negative_prompt_2: None,
            num_images_per_prompt: 1,
            eta: 0.0,
            generator: Generators::Random,
            latents: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            pooled_prompt_embeds: None,
            negative_pooled_prompt_embeds: None,
            output_type: OutputType::Pil,
            guidance_rescale: 0.0,
            micro_conditioning: MicroConditioning::default(),
            clip_skip: None,
            ip_adapter: crate::IPAdapterArgs::default(),
            callback: None,
            progress: true,
        }
    }
}

impl std::fmt::Debug for StableDiffusionXLImg2ImgArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionXLImg2ImgArgs")
            .field("prompt", &self.prompt)
            .field("strength", &self.strength)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("denoising_start", &self.denoising_start)
            .field("denoising_end", &self.denoising_end)
            .field("guidance_scale", &self.guidance_scale)
            .field("generator", &self.generator)
            .field("micro_conditioning", &self.micro_conditioning)
            .field("output_type", &self.output_type)
            .finish_non_exhaustive()
    }
}

/// diffusers' `StableDiffusionXLImg2ImgPipeline`: SDXL image-to-image, and the refiner stage of
/// the ensemble-of-experts flow.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::{ImageOutput, OutputType};
/// use diffusion_pipelines::{
///     Generators, StableDiffusionXLArgs, StableDiffusionXLImg2ImgArgs,
///     StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
/// };
///
/// # fn main() -> diffusion_core::Result<()> {
/// let device = Device::default();
/// let mut base =
///     StableDiffusionXLPipeline::from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", &device)?;
/// let mut refiner = StableDiffusionXLImg2ImgPipeline::from_pretrained(
///     "stabilityai/stable-diffusion-xl-refiner-1.0",
///     &device,
/// )?;
/// let prompt = vec!["a majestic lion jumping from a big stone at night".to_string()];
/// let latents = base.call(StableDiffusionXLArgs {
///     prompt: prompt.clone(),
///     num_inference_steps: 40,
///     denoising_end: Some(0.8),
///     output_type: OutputType::Latent,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// let ImageOutput::Tensor(latents) = latents.images else { unreachable!() };
/// let image = refiner.call(StableDiffusionXLImg2ImgArgs {
///     prompt,
///     image: Some(latents.into()),
///     num_inference_steps: 40,
///     denoising_start: Some(0.8),
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StableDiffusionXLImg2ImgPipeline {
    /// `vae`, `text_encoder` (none in refiners), `text_encoder_2`, `tokenizer`, `tokenizer_2`,
    /// `unet`, `scheduler`.
    pub components: StableDiffusionXLComponents,
}

impl AsRef<StableDiffusionXLComponents> for StableDiffusionXLImg2ImgPipeline {
    fn as_ref(&self) -> &StableDiffusionXLComponents {
        &self.components
    }
}

/// diffusers' `get_timesteps` with `denoising_start`: the timesteps below the cutoff (one more
/// for second-order schedulers so a step is not split), no noise added.
pub(crate) fn timesteps_from_start(
    scheduler: &mut AnyScheduler,
    denoising_start: f64,
) -> Result<Vec<f64>> {
    let train = scheduler.num_train_timesteps() as f64;
    let cutoff = (train - denoising_start * train).round_ties_even();
    let all = scheduler.timesteps().to_vec();
    let mut steps = all.iter().filter(|&&t| t < cutoff).count();
    if scheduler.order() == 2 && steps % 2 == 0 {
        steps += 1;
    }
    let steps = steps.min(all.len());
    if steps == 0 {
        return Err(Error::invalid_argument(
            "denoising_start",
            format!("{denoising_start} leaves no denoising step"),
        ));
    }
    let start = all.len() - steps;
    scheduler.set_begin_index(start)?;
    Ok(all[start..].to_vec())
}

impl StableDiffusionXLImg2ImgPipeline {
    /// Load a diffusers SDXL base or refiner folder, or Hub id.
    ///
    /// # Errors
    /// As [`StableDiffusionXLComponents::from_pretrained_with`].
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        StableDiffusionXLComponents::from_pretrained(name_or_path, device).map(Self::from_parts)
    }

    /// Load with Hub options (revision, offline, cache, `variant`).
    ///
    /// # Errors
    /// As [`StableDiffusionXLComponents::from_pretrained_with`].
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        StableDiffusionXLComponents::from_pretrained_with(name_or_path, options, device)
            .map(Self::from_parts)
    }

    /// Build from loaded components.
    pub fn from_parts(components: StableDiffusionXLComponents) -> Self {
        Self { components }
    }

    /// Share another pipeline's components without copying weights.
    pub fn from_pipe(other: &impl AsRef<StableDiffusionXLComponents>) -> Self {
        Self::from_parts(other.as_ref().clone())
    }

    /// Transform an image (or refine latents) guided by text.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument: as
    /// [`crate::StableDiffusionXLPipeline::call`], and for a missing `image`, `strength` outside
    /// (0, 1] or leaving no step, `denoising_start` / `denoising_end` outside (0, 1) or not in
    /// order, a seed list that does not match the batch (`generator`), an image batch that
    /// cannot be repeated to the batch.
    pub fn call(
        &mut self,
        mut args: StableDiffusionXLImg2ImgArgs<'_>,
    ) -> Result<ImagePipelineOutput> {
        let c = &mut self.components;
        let device = c
            .unet
            .devices()
            .into_iter()
            .next()
            .ok_or_else(|| Error::invalid_argument("unet", "the model has no parameters"))?;
        let image = args
            .image
            .take()
            .ok_or_else(|| Error::invalid_argument("image", "image-to-image needs an image"))?;
        for (name, value) in [
            ("denoising_start", args.denoising_start),
            ("denoising_end", args.denoising_end),
        ] {
            if let Some(v) = value
                && !(v > 0.0 && v < 1.0)
            {
                return Err(Error::invalid_argument(
                    name,
                    format!("{v} is outside (0, 1)"),
                ));
            }
        }
        if let (Some(start), Some(end)) = (args.denoising_start, args.denoising_end)
            && start >= end
        {
            return Err(Error::invalid_argument(
                "denoising_start",
                format!("{start} is not below denoising_end {end}"),
            ));
        }
        if args.denoising_start.is_none() {
            check_strength(args.strength)?;
        }
        if args.num_images_per_prompt == 0 {
            return Err(Error::invalid_argument(
                "num_images_per_prompt",
                "must be at least 1",
            ));
        }
        let inputs = XLPromptInputs {
            prompt: &args.prompt,
            prompt_2: args.prompt_2.as_deref(),
            negative_prompt: args.negative_prompt.as_deref(),
            negative_prompt_2: args.negative_prompt_2.as_deref(),
            prompt_embeds: args.prompt_embeds.take(),
            negative_prompt_embeds: args.negative_prompt_embeds.take(),
            pooled_prompt_embeds: args.pooled_prompt_embeds.take(),
            negative_pooled_prompt_embeds: args.negative_pooled_prompt_embeds.take(),
            clip_skip: args.clip_skip,
        };
        let batch = inputs.batch_size()? * args.num_images_per_prompt;
        let mut generators = args.generator.instantiate(batch)?;
        let do_cfg = args.guidance_scale > 1.0 && c.unet.config().time_cond_proj_dim.is_none();
        let embeddings = encode_prompt(c, inputs, args.num_images_per_prompt, do_cfg, &device)?;

        let f = c.vae_scale_factor();
        let latent_channels = c.vae.config().latent_channels;
        let image = preprocess(
            &VaeImageProcessor::new(f),
            &image,
            None,
            Some(latent_channels),
            "image",
            &device,
        )?;

        let steps = retrieve_timesteps(
            &mut c.scheduler,
            args.num_inference_steps,
            args.timesteps.as_deref(),
            args.sigmas.as_deref(),
        )?;
        let mut timesteps = match args.denoising_start {
            Some(start) => timesteps_from_start(&mut c.scheduler, start)?,
            None => timesteps_for_strength(&mut c.scheduler, steps, args.strength)?,
        };

        let dtype = unet_dtype(&c.unet);
        let latents = match args.latents.take() {
            Some(l) => cast_like_model(l, dtype),
            None => {
                let init = if image.dims()[1] == latent_channels {
                    image
                } else {
                    encode_xl(c, image, batch, &mut generators)?
                };
                let init = tile_to_batch(cast_like_model(init, dtype), batch, "image")?;
                if args.denoising_start.is_none() {
                    let noise = randn_latents(init.dims(), &mut generators, &device, dtype)?;
                    c.scheduler
                        .add_noise(init, noise, &vec![timesteps[0]; batch])?
                } else {
                    init
                }
            }
        };
        let [_, _, lh, lw] = latents.dims();
        let (height, width) = (lh * f, lw * f);

        let conditioning = &args.micro_conditioning;
        let (prompt_embeds, added_cond) =
            conditioning.build(c, (height, width), embeddings, batch, dtype, &device)?;

        if let Some(end) = args.denoising_end {
            let train = c.scheduler.num_train_timesteps() as f64;
            let cutoff = (train - end * train).round_ties_even();
            let keep = timesteps.iter().filter(|&&t| t >= cutoff).count();
            timesteps.truncate(keep);
        }

        let ip_adapter_image_embeds = crate::ip_adapter::prepare_ip_adapter_image_embeds(
            &c.unet,
            c.image_encoder.as_ref(),
            c.feature_extractor.as_ref(),
            &args.ip_adapter,
            batch,
            do_cfg,
            &device,
        )?;
        let (latents, interrupted) = DenoiseLoop {
            unet: &c.unet,
            scheduler: &mut c.scheduler,
            timesteps,
            prompt_embeds: cast_like_model(prompt_embeds, dtype),
            do_classifier_free_guidance: do_cfg,
            guidance_scale: args.guidance_scale,
            guidance_rescale: args.guidance_rescale,
            eta: args.eta,
            condition: InpaintCondition::None,
            added_cond: Some(added_cond),
            image_embeds: ip_adapter_image_embeds,
            ip_adapter_masks: std::mem::take(&mut args.ip_adapter.masks),
            generators: &mut generators,
            callback: args.callback.as_mut(),
            progress: args.progress,
        }
        .run(latents)?;
        decode_xl(&c.vae, f, latents, args.output_type, interrupted)
    }
}

/// The image-to-image and inpainting pipelines' size micro-conditioning (`_get_add_time_ids` of
/// StableDiffusionXLImg2ImgPipeline / -InpaintPipeline): sizes and crop, with the aesthetic
/// score instead of the target size for refiners (`requires_aesthetics_score`).
#[derive(Clone, Debug, PartialEq)]
pub struct MicroConditioning {
    /// The original size; `None` is the output size.
    pub original_size: Option<(usize, usize)>,
    /// The crop's top-left corner (default `(0, 0)`).
    pub crops_coords_top_left: (usize, usize),
    /// The target size; `None` is the output size.
    pub target_size: Option<(usize, usize)>,
    /// Negative original size (`None`: `original_size`).
    pub negative_original_size: Option<(usize, usize)>,
    /// Negative crop corner (default `(0, 0)`; used with aesthetic scores only, as in
    /// diffusers).
    pub negative_crops_coords_top_left: (usize, usize),
    /// Negative target size (`None`: `target_size`).
    pub negative_target_size: Option<(usize, usize)>,
    /// Aesthetic score of refiners (default 6.0).
    pub aesthetic_score: f64,
    /// Negative aesthetic score (default 2.5).
    pub negative_aesthetic_score: f64,
}

impl Default for MicroConditioning {
    fn default() -> Self {
        Self {
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

impl MicroConditioning {
    /// The UNet's text embeddings (`[negative, positive]` with guidance) and its
    /// `added_cond_kwargs` for an output of `(height, width)` pixels.
    pub(crate) fn build(
        &self,
        c: &StableDiffusionXLComponents,
        (height, width): (usize, usize),
        embeddings: XLEmbeddings,
        batch: usize,
        dtype: FloatDType,
        device: &Device,
    ) -> Result<(Tensor<3>, AddedCondKwargs)> {
        let original = self.original_size.unwrap_or((height, width));
        let target = self.target_size.unwrap_or((height, width));
        let negative_original = self.negative_original_size.unwrap_or(original);
        let negative_target = self.negative_target_size.unwrap_or(target);
        let crop = self.crops_coords_top_left;
        let (positive, negative): (Vec<f32>, Vec<f32>) = if c.requires_aesthetics_score {
            let neg_crop = self.negative_crops_coords_top_left;
            (
                [original.0, original.1, crop.0, crop.1]
                    .iter()
                    .map(|&v| v as f32)
                    .chain([self.aesthetic_score as f32])
                    .collect(),
                [
                    negative_original.0,
                    negative_original.1,
                    neg_crop.0,
                    neg_crop.1,
                ]
                .iter()
                .map(|&v| v as f32)
                .chain([self.negative_aesthetic_score as f32])
                .collect(),
            )
        } else {
            // diffusers pairs the negative sizes with the positive crop here.
            (
                [original.0, original.1, crop.0, crop.1, target.0, target.1]
                    .map(|v| v as f32)
                    .to_vec(),
                [
                    negative_original.0,
                    negative_original.1,
                    crop.0,
                    crop.1,
                    negative_target.0,
                    negative_target.1,
                ]
                .map(|v| v as f32)
                .to_vec(),
            )
        };
        let config = c.unet.config();
        let projection_dim = c.text_encoder_2.config().projection_dim;
        let passed = config.addition_time_embed_dim.unwrap_or(0) * positive.len() + projection_dim;
        if config.projection_class_embeddings_input_dim != Some(passed) {
            let hint = if c.requires_aesthetics_score {
                "set requires_aesthetics_score to false for a base UNet"
            } else {
                "a refiner UNet needs requires_aesthetics_score = true"
            };
            return Err(Error::invalid_argument(
                "unet",
                format!(
                    "the UNet expects an added embedding of {:?} values, the conditioning gives \
                     {passed} ({hint})",
                    config.projection_class_embeddings_input_dim
                ),
            ));
        }
        let width_ids = positive.len();
        let (prompt_embeds, text_embeds, rows) = match embeddings.negative {
            Some((neg, neg_pooled)) => (
                Tensor::cat(vec![neg, embeddings.prompt_embeds], 0),
                Tensor::cat(vec![neg_pooled, embeddings.pooled], 0),
                vec![negative, positive],
            ),
            None => (embeddings.prompt_embeds, embeddings.pooled, vec![positive]),
        };
        // [negative x batch, positive x batch], like the embeddings.
        let ids: Vec<f32> = rows
            .iter()
            .flat_map(|row| std::iter::repeat_n(row.iter().copied(), batch).flatten())
            .collect();
        let time_ids = Tensor::<2>::from_data(
            TensorData::new(ids, [batch * rows.len(), width_ids]),
            device,
        );
        let added_cond = AddedCondKwargs {
            text_embeds: Some(cast_like_model(text_embeds, dtype)),
            time_ids: Some(cast_like_model(time_ids, dtype)),
            image_embeds: None,
        };
        Ok((prompt_embeds, added_cond))
    }
}

/// SDXL's image encoding: with a half-precision VAE that asks for it (`force_upcast`) in f32;
/// one generator per image when there are several (the image batch repeated first); then
/// normalised by `latents_mean` / `latents_std` when the VAE has them, else `scaling_factor`.
fn encode_xl(
    c: &StableDiffusionXLComponents,
    image: Tensor<4>,
    batch: usize,
    generators: &mut [diffusion_core::TorchGenerator],
) -> Result<Tensor<4>> {
    let config = c.vae.config();
    let upcast;
    let vae = if config.force_upcast && vae_dtype(&c.vae) != FloatDType::F32 {
        upcast = to_dtype(c.vae.clone(), FloatDType::F32)?;
        &upcast
    } else {
        &c.vae
    };
    let image = cast_like_model(image, vae_dtype(vae));
    let latents = if generators.len() > 1 {
        let image = tile_to_batch(image, batch, "image")?;
        let mut parts = Vec::with_capacity(batch);
        for (i, generator) in generators.iter_mut().enumerate() {
            let dist = vae.encode(image.clone().narrow(0, i, 1))?;
            parts.push(dist.sample(Some(NoiseSource::Single(generator)))?);
        }
        Tensor::cat(parts, 0)
    } else {
        vae.encode(image)?
            .sample(Some(NoiseSource::Single(&mut generators[0])))?
    };
    let latents = cast_like_model(latents, vae_dtype(&c.vae));
    match (&config.latents_mean, &config.latents_std) {
        (Some(mean), Some(std)) => {
            let channels = latents.dims()[1];
            if mean.len() != channels || std.len() != channels {
                return Err(Error::invalid_argument(
                    "vae",
                    format!("latents_mean / latents_std do not have {channels} values"),
                ));
            }
            let device = latents.device();
            let column = |v: &[f64]| {
                let data: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                cast_like_model(
                    Tensor::<4>::from_data(TensorData::new(data, [1, channels, 1, 1]), &device),
                    vae_dtype(&c.vae),
                )
            };
            Ok(latents
                .sub(column(mean))
                .mul_scalar(config.scaling_factor)
                .div(column(std)))
        }
        _ => Ok(latents.mul_scalar(config.scaling_factor)),
    }
}
