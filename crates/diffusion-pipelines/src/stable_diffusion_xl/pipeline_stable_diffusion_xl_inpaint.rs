//! `StableDiffusionXLInpaintPipeline`: SDXL inpainting with 9-channel inpainting UNets or any
//! 4-channel SDXL UNet (legacy blend), with the refiner's `denoising_start` / `denoising_end`.

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_loaders::HubOptions;
use diffusion_models::ModelMixin;
use diffusion_models::modeling_utils::to_dtype;
use diffusion_schedulers::Scheduler;

use super::StableDiffusionXLComponents;
use super::pipeline_stable_diffusion_xl::decode_xl;
use super::pipeline_stable_diffusion_xl_img2img::{MicroConditioning, timesteps_from_start};
use super::prompt::{XLPromptInputs, encode_prompt};
use crate::pipeline_utils::{Generators, ImagePipelineOutput, StepCallback};
use crate::stable_diffusion::PipelineImageInput;
use crate::stable_diffusion::denoise::{
    DenoiseLoop, InpaintCondition, cast_like_model, check_size, check_strength, encode_vae_image,
    randn_latents, retrieve_timesteps, tile_to_batch, timesteps_for_strength, unet_dtype,
    vae_dtype,
};
use crate::stable_diffusion::image_input::{
    interpolate_nearest, mask_out, mask_processor, preprocess,
};
use crate::stable_diffusion::mask_crop::MaskCrop;

/// Arguments of [`StableDiffusionXLInpaintPipeline::call`], diffusers'
/// `StableDiffusionXLInpaintPipeline.__call__` keyword arguments with their defaults.
pub struct StableDiffusionXLInpaintArgs<'a> {
    /// The prompts for the first text encoder; empty when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// The prompts for the second text encoder (`None`: the same as `prompt`).
    pub prompt_2: Option<Vec<String>>,
    /// The image to repaint (or its latents, a tensor with the VAE's latent channels).
    pub image: Option<PipelineImageInput>,
    /// White (>= 0.5) where to repaint, black where to keep.
    pub mask_image: Option<PipelineImageInput>,
    /// Precomputed latents of the masked image, instead of encoding `image * (mask < 0.5)`.
    pub masked_image_latents: Option<Tensor<4>>,
    /// Height in pixels (multiple of 8); `None` is `unet.sample_size * vae_scale_factor`.
    pub height: Option<usize>,
    /// Width in pixels (multiple of 8); `None` as for `height`.
    pub width: Option<usize>,
    /// Inpaint only the padded box around the mask (see
    /// [`crate::StableDiffusionInpaintArgs::padding_mask_crop`]).
    pub padding_mask_crop: Option<usize>,
    /// How much to change the masked region, in (0, 1] (default 0.9999, so the image latents
    /// are used); ignored with `denoising_start`.
    pub strength: f64,
    /// Denoising steps of the full schedule (default 50).
    pub num_inference_steps: usize,
    /// Custom timesteps, for schedulers that take them.
    pub timesteps: Option<Vec<f64>>,
    /// Custom sigmas, for schedulers that take them.
    pub sigmas: Option<Vec<f64>>,
    /// Start at this fraction of the schedule, in (0, 1), from the image latents without noise.
    pub denoising_start: Option<f64>,
    /// Stop at this fraction of the schedule, in (0, 1).
    pub denoising_end: Option<f64>,
    /// Classifier-free guidance weight (default 7.5).
    pub guidance_scale: f64,
    /// Negative prompts for the first encoder, one per prompt.
    pub negative_prompt: Option<Vec<String>>,
    /// Negative prompts for the second encoder.
    pub negative_prompt_2: Option<Vec<String>>,
    /// Precomputed prompt embeddings (with `pooled_prompt_embeds`).
    pub prompt_embeds: Option<Tensor<3>>,
    /// Precomputed negative embeddings.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// Precomputed pooled embeddings.
    pub pooled_prompt_embeds: Option<Tensor<2>>,
    /// Precomputed negative pooled embeddings.
    pub negative_pooled_prompt_embeds: Option<Tensor<2>>,
    /// Images per prompt (default 1).
    pub num_images_per_prompt: usize,
    /// DDIM's `eta` (default 0).
    pub eta: f64,
    /// Randomness: one seed, one per image, or random.
    pub generator: Generators,
    /// Initial noise `[B, latent_channels, H / f, W / f]` (used as the noise and, scaled by
    /// `init_noise_sigma`, as the starting latents).
    pub latents: Option<Tensor<4>>,
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

impl Default for StableDiffusionXLInpaintArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            prompt_2: None,
            image: None,
            mask_image: None,
            masked_image_latents: None,
            height: None,
            width: None,
            padding_mask_crop: None,
            strength: 0.9999,
            num_inference_steps: 50,
            timesteps: None,
            sigmas: None,
            denoising_start: None,
            denoising_end: None,
            guidance_scale: 7.5,
            negative_prompt: None,
            negative_prompt_2: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            pooled_prompt_embeds: None,
            negative_pooled_prompt_embeds: None,
            num_images_per_prompt: 1,
            eta: 0.0,
            generator: Generators::Random,
            latents: None,
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

impl std::fmt::Debug for StableDiffusionXLInpaintArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionXLInpaintArgs")
            .field("prompt", &self.prompt)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("strength", &self.strength)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("denoising_start", &self.denoising_start)
            .field("denoising_end", &self.denoising_end)
            .field("guidance_scale", &self.guidance_scale)
            .field("generator", &self.generator)
            .field("output_type", &self.output_type)
            .finish_non_exhaustive()
    }
}

/// diffusers' `StableDiffusionXLInpaintPipeline`.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::load_image;
/// use diffusion_pipelines::{
///     Generators, StableDiffusionXLInpaintArgs, StableDiffusionXLInpaintPipeline,
/// };
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = StableDiffusionXLInpaintPipeline::from_pretrained(
///     "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
///     &Device::default(),
/// )?;
/// let out = pipe.call(StableDiffusionXLInpaintArgs {
///     prompt: vec!["a tiger sitting on a park bench".into()],
///     image: Some(load_image("bench.png")?.into()),
///     mask_image: Some(load_image("bench_mask.png")?.into()),
///     num_inference_steps: 20,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StableDiffusionXLInpaintPipeline {
    /// `vae`, `text_encoder`, `text_encoder_2`, `tokenizer`, `tokenizer_2`, `unet`,
    /// `scheduler`.
    pub components: StableDiffusionXLComponents,
}

impl AsRef<StableDiffusionXLComponents> for StableDiffusionXLInpaintPipeline {
    fn as_ref(&self) -> &StableDiffusionXLComponents {
        &self.components
    }
}

/// SDXL inpainting's `_encode_vae_image`: as Stable Diffusion's, with a half-precision VAE that
/// asks for it (`force_upcast`) run in f32.
fn encode_upcast(
    c: &StableDiffusionXLComponents,
    image: Tensor<4>,
    generators: &mut [TorchGenerator],
) -> Result<Tensor<4>> {
    let dtype = vae_dtype(&c.vae);
    if c.vae.config().force_upcast && dtype != FloatDType::F32 {
        let vae = to_dtype(c.vae.clone(), FloatDType::F32)?;
        let latents = encode_vae_image(&vae, image, generators)?;
        Ok(cast_like_model(latents, dtype))
    } else {
        encode_vae_image(&c.vae, image, generators)
    }
}

impl StableDiffusionXLInpaintPipeline {
    /// Load a diffusers SDXL folder or Hub id (inpainting or base).
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

    /// Repaint the masked region of an image guided by text.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument: as
    /// [`crate::StableDiffusionInpaintPipeline::call`] and
    /// [`crate::StableDiffusionXLImg2ImgPipeline::call`].
    pub fn call(
        &mut self,
        mut args: StableDiffusionXLInpaintArgs<'_>,
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
            .ok_or_else(|| Error::invalid_argument("image", "inpainting needs an image"))?;
        let mask_image = args.mask_image.take().ok_or_else(|| {
            Error::invalid_argument("mask_image", "inpainting needs a mask image")
        })?;
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
        let (default_h, default_w) = match (args.height, args.width) {
            (Some(h), Some(w)) => (h, w),
            _ => c.default_size()?,
        };
        let height = args.height.unwrap_or(default_h);
        let width = args.width.unwrap_or(default_w);
        check_size(height, width)?;
        if args.num_images_per_prompt == 0 {
            return Err(Error::invalid_argument(
                "num_images_per_prompt",
                "must be at least 1",
            ));
        }
        let latent_channels = c.vae.config().latent_channels;
        let unet_channels = c.unet.config().in_channels;
        let channels_unet = unet_channels == 2 * latent_channels + 1;
        if !channels_unet && unet_channels != latent_channels {
            return Err(Error::invalid_argument(
                "unet",
                format!(
                    "the UNet takes {unet_channels} channels; inpainting needs {latent_channels} \
                     or {}",
                    2 * latent_channels + 1
                ),
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
        let latent_timestep = vec![timesteps[0]; batch];
        let is_strength_max = args.strength == 1.0;
        let add_noise = args.denoising_start.is_none();

        let (overlay, image, mask_image) = match args.padding_mask_crop {
            Some(pad) => {
                let (overlay, image, mask) =
                    MaskCrop::new(pad, &image, &mask_image, (height, width), args.output_type)?;
                (Some(overlay), image, mask)
            }
            None => (None, image, mask_image),
        };
        let f = c.vae_scale_factor();
        let size = Some((height, width));
        let init_image = preprocess(
            &VaeImageProcessor::new(f),
            &image,
            size,
            Some(latent_channels),
            "image",
            &device,
        )?;
        let mask_condition = preprocess(
            &mask_processor(f),
            &mask_image,
            size,
            None,
            "mask_image",
            &device,
        )?;
        let image_is_latents = init_image.dims()[1] == latent_channels;
        let masked_image = match args.masked_image_latents.take() {
            Some(m) => Some(m),
            None if image_is_latents => None,
            None => Some(mask_out(&init_image, &mask_condition)?),
        };

        // prepare_latents
        let dtype = unet_dtype(&c.unet);
        let shape = [batch, latent_channels, height / f, width / f];
        let need_image_latents =
            image_is_latents || !channels_unet || (args.latents.is_none() && !is_strength_max);
        let image_latents = if need_image_latents {
            let latents = if image_is_latents {
                init_image.clone()
            } else {
                encode_upcast(c, init_image.clone(), &mut generators)?
            };
            Some(tile_to_batch(
                cast_like_model(latents, dtype),
                batch,
                "image",
            )?)
        } else {
            None
        };
        let missing_latents = || {
            Error::invalid_argument(
                "image",
                "starting from the image (strength < 1 or denoising_start) needs its latents",
            )
        };
        let (latents, noise) = match (args.latents.take(), add_noise) {
            (Some(l), _) if l.dims() != shape => {
                return Err(Error::invalid_argument(
                    "latents",
                    format!("shape {:?}, expected {shape:?}", l.dims()),
                ));
            }
            (None, true) => {
                let noise = randn_latents(shape, &mut generators, &device, dtype)?;
                let latents = if is_strength_max {
                    noise.clone().mul_scalar(c.scheduler.init_noise_sigma())
                } else {
                    let il = image_latents.clone().ok_or_else(missing_latents)?;
                    c.scheduler.add_noise(il, noise.clone(), &latent_timestep)?
                };
                (latents, noise)
            }
            (Some(l), true) => {
                let noise = cast_like_model(l, dtype);
                (
                    noise.clone().mul_scalar(c.scheduler.init_noise_sigma()),
                    noise,
                )
            }
            // denoising_start: continue from the image latents; the noise is still drawn, for
            // the legacy blend and to keep the generator in step with diffusers.
            (_, false) => {
                let noise = randn_latents(shape, &mut generators, &device, dtype)?;
                (image_latents.clone().ok_or_else(missing_latents)?, noise)
            }
        };

        // prepare_mask_latents
        let mask = interpolate_nearest(mask_condition, height / f, width / f);
        let mask = tile_to_batch(cast_like_model(mask, dtype), batch, "mask_image")?;
        let masked_image_latents = match masked_image {
            Some(m) if m.dims()[1] == latent_channels => Some(m),
            Some(m) => Some(encode_upcast(c, m, &mut generators)?),
            None => None,
        }
        .map(|m| tile_to_batch(cast_like_model(m, dtype), batch, "masked_image_latents"))
        .transpose()?;
        let double = |x: Tensor<4>| {
            if do_cfg {
                Tensor::cat(vec![x.clone(), x], 0)
            } else {
                x
            }
        };
        let condition = if channels_unet {
            let masked_image_latents = masked_image_latents.ok_or_else(|| {
                Error::invalid_argument(
                    "masked_image_latents",
                    "a 9-channel UNet given latents as the image needs masked_image_latents",
                )
            })?;
            InpaintCondition::Channels {
                mask: double(mask),
                masked_image_latents: double(masked_image_latents),
            }
        } else {
            InpaintCondition::Blend {
                image_latents: image_latents.ok_or_else(missing_latents)?,
                noise,
                mask,
            }
        };

        let [_, _, lh, lw] = latents.dims();
        let conditioning = &args.micro_conditioning;
        let (prompt_embeds, added_cond) =
            conditioning.build(c, (lh * f, lw * f), embeddings, batch, dtype, &device)?;

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
            prompt_embeds,
            do_classifier_free_guidance: do_cfg,
            guidance_scale: args.guidance_scale,
            guidance_rescale: args.guidance_rescale,
            eta: args.eta,
            condition,
            added_cond: Some(added_cond),
            image_embeds: ip_adapter_image_embeds,
            ip_adapter_masks: std::mem::take(&mut args.ip_adapter.masks),
            generators: &mut generators,
            callback: args.callback.as_mut(),
            progress: args.progress,
        }
        .run(latents)?;
        let mut out = decode_xl(&c.vae, f, latents, args.output_type, interrupted)?;
        if let Some(overlay) = &overlay {
            overlay.apply(&mut out.images)?;
        }
        Ok(out)
    }
}
