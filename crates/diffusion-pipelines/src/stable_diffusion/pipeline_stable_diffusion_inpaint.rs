//! `StableDiffusionInpaintPipeline`: repaint the masked part of an image, with 9-channel
//! inpainting UNets or (legacy path) any 4-channel Stable Diffusion UNet.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::HubOptions;
use diffusion_models::ModelMixin;
use diffusion_schedulers::Scheduler;

use super::StableDiffusionComponents;
use super::denoise::{
    DenoiseLoop, InpaintCondition, cast_like_model, check_size, check_strength, decode_latents,
    encode_vae_image, randn_latents, retrieve_timesteps, tile_to_batch, timesteps_for_strength,
    unet_dtype,
};
use super::image_input::{
    PipelineImageInput, interpolate_nearest, mask_out, mask_processor, preprocess,
};
use super::mask_crop::MaskCrop;
use super::prompt::{GuidedPrompt, PromptInputs, encode_for_unet};
use crate::pipeline_utils::{Generators, ImagePipelineOutput, StepCallback};

/// Arguments of [`StableDiffusionInpaintPipeline::call`], diffusers'
/// `StableDiffusionInpaintPipeline.__call__` keyword arguments with their defaults.
pub struct StableDiffusionInpaintArgs<'a> {
    /// The prompts (one string or a list); empty when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// The image to repaint.
    pub image: Option<PipelineImageInput>,
    /// White (>= 0.5) where to repaint, black where to keep (`mask_image`).
    pub mask_image: Option<PipelineImageInput>,
    /// Precomputed latents of the masked image (9-channel UNets), instead of encoding
    /// `image * (mask < 0.5)`.
    pub masked_image_latents: Option<Tensor<4>>,
    /// Height in pixels (multiple of 8); `None` is `unet.sample_size * vae_scale_factor`.
    pub height: Option<usize>,
    /// Width in pixels (multiple of 8); `None` as for `height`.
    pub width: Option<usize>,
    /// Inpaint only the box around the mask grown by this many pixels (and matched to the
    /// output aspect ratio), at `height x width`, then paste it back into the full image. Needs
    /// one image and one mask given as images, and `output_type` Pil. The crop is resized with
    /// the image crate's Lanczos3 (diffusers: PIL's Lanczos, "fill" mode), which matches PIL
    /// exactly only when the box already has the output size.
    pub padding_mask_crop: Option<usize>,
    /// How much to change the masked region, in (0, 1] (default 1: start from pure noise).
    pub strength: f64,
    /// Denoising steps of the full schedule (default 50).
    pub num_inference_steps: usize,
    /// Custom timesteps, for schedulers that take them.
    pub timesteps: Option<Vec<f64>>,
    /// Custom sigmas, for schedulers that take them.
    pub sigmas: Option<Vec<f64>>,
    /// Classifier-free guidance weight (default 7.5).
    pub guidance_scale: f64,
    /// Negative prompts, one per prompt.
    pub negative_prompt: Option<Vec<String>>,
    /// Images per prompt (default 1).
    pub num_images_per_prompt: usize,
    /// DDIM's `eta` (default 0).
    pub eta: f64,
    /// Randomness: one seed, one per image, or random.
    pub generator: Generators,
    /// Initial noise `[B, latent_channels, H / f, W / f]` (used as the noise and, scaled by
    /// `init_noise_sigma`, as the starting latents, as diffusers does).
    pub latents: Option<Tensor<4>>,
    /// Precomputed prompt embeddings.
    pub prompt_embeds: Option<Tensor<3>>,
    /// Precomputed negative embeddings.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// Skip this many final CLIP layers for the prompt embeddings.
    pub clip_skip: Option<usize>,
    /// IP-Adapter images, embeddings and masks (`ip_adapter_image`, `ip_adapter_image_embeds`,
    /// `ip_adapter_masks`); none by default.
    pub ip_adapter: crate::IPAdapterArgs,
    /// `callback_on_step_end`.
    pub callback: Option<StepCallback<'a>>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for StableDiffusionInpaintArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            image: None,
            mask_image: None,
            masked_image_latents: None,
            height: None,
            width: None,
            padding_mask_crop: None,
            strength: 1.0,
            num_inference_steps: 50,
            timesteps: None,
            sigmas: None,
            guidance_scale: 7.5,
            negative_prompt: None,
            num_images_per_prompt: 1,
            eta: 0.0,
            generator: Generators::Random,
            latents: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            output_type: OutputType::Pil,
            clip_skip: None,
            ip_adapter: crate::IPAdapterArgs::default(),
            callback: None,
            progress: true,
        }
    }
}

impl std::fmt::Debug for StableDiffusionInpaintArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionInpaintArgs")
            .field("prompt", &self.prompt)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("padding_mask_crop", &self.padding_mask_crop)
            .field("strength", &self.strength)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("guidance_scale", &self.guidance_scale)
            .field("generator", &self.generator)
            .field("num_images_per_prompt", &self.num_images_per_prompt)
            .field("output_type", &self.output_type)
            .finish_non_exhaustive()
    }
}

/// diffusers' `StableDiffusionInpaintPipeline`. With a 9-channel inpainting UNet the mask and
/// the masked image's latents are extra UNet inputs; with a 4-channel UNet the known region is
/// pasted back from the noised image latents after every step (the legacy method).
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::load_image;
/// use diffusion_pipelines::{
///     Generators, StableDiffusionInpaintArgs, StableDiffusionInpaintPipeline,
/// };
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = StableDiffusionInpaintPipeline::from_pretrained(
///     "stable-diffusion-v1-5/stable-diffusion-inpainting",
///     &Device::default(),
/// )?;
/// let out = pipe.call(StableDiffusionInpaintArgs {
///     prompt: vec!["a yellow cat sitting on a bench".into()],
///     image: Some(load_image("bench.png")?.into()),
///     mask_image: Some(load_image("bench_mask.png")?.into()),
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StableDiffusionInpaintPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`.
    pub components: StableDiffusionComponents,
}

impl AsRef<StableDiffusionComponents> for StableDiffusionInpaintPipeline {
    fn as_ref(&self) -> &StableDiffusionComponents {
        &self.components
    }
}

impl StableDiffusionInpaintPipeline {
    /// Load a diffusers folder or Hub id (an inpainting or a plain text-to-image folder).
    ///
    /// # Errors
    /// As [`StableDiffusionComponents::from_pretrained_with`].
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        StableDiffusionComponents::from_pretrained(name_or_path, device).map(Self::from_parts)
    }

    /// Load with Hub options (revision, offline, cache, `variant`).
    ///
    /// # Errors
    /// As [`StableDiffusionComponents::from_pretrained_with`].
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        StableDiffusionComponents::from_pretrained_with(name_or_path, options, device)
            .map(Self::from_parts)
    }

    /// Build from loaded components.
    pub fn from_parts(components: StableDiffusionComponents) -> Self {
        Self { components }
    }

    /// Share another pipeline's components without copying weights.
    pub fn from_pipe(other: &impl AsRef<StableDiffusionComponents>) -> Self {
        Self::from_parts(other.as_ref().clone())
    }

    /// Repaint the masked region of an image guided by text.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: a missing `image` or `mask_image`,
    /// a size that is not a multiple of 8, `strength` outside (0, 1] or leaving no step, zero
    /// steps, a seed list that does not match the batch (`generator`), latents of the wrong
    /// shape, image or mask batches that cannot be repeated to the batch, a UNet that takes
    /// neither 4 nor `2 * latent_channels + 1` channels (`unet`); as
    /// [`super::StableDiffusionPipeline::call`] for the text arguments.
    pub fn call(
        &mut self,
        mut args: StableDiffusionInpaintArgs<'_>,
    ) -> Result<ImagePipelineOutput> {
        let c = &mut self.components;
        let device = c.device()?;
        check_strength(args.strength)?;
        let image = args
            .image
            .take()
            .ok_or_else(|| Error::invalid_argument("image", "inpainting needs an image"))?;
        let mask_image = args.mask_image.take().ok_or_else(|| {
            Error::invalid_argument("mask_image", "inpainting needs a mask image")
        })?;
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

        let inputs = PromptInputs {
            prompt: &args.prompt,
            negative_prompt: args.negative_prompt.as_deref(),
            prompt_embeds: args.prompt_embeds.take(),
            negative_prompt_embeds: args.negative_prompt_embeds.take(),
            clip_skip: args.clip_skip,
        };
        let GuidedPrompt {
            embeds: prompt_embeds,
            do_cfg,
            batch,
        } = encode_for_unet(
            c,
            inputs,
            args.num_images_per_prompt,
            args.guidance_scale,
            &device,
        )?;
        let mut generators = args.generator.instantiate(batch)?;
        let dtype = unet_dtype(&c.unet);

        let steps = retrieve_timesteps(
            &mut c.scheduler,
            args.num_inference_steps,
            args.timesteps.as_deref(),
            args.sigmas.as_deref(),
        )?;
        let timesteps = timesteps_for_strength(&mut c.scheduler, steps, args.strength)?;
        let latent_timestep = vec![timesteps[0]; batch];
        let is_strength_max = args.strength == 1.0;

        // padding_mask_crop: work on the padded box around the mask only.
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

        // prepare_latents: the image latents are needed to start from a noised image
        // (strength < 1) and, on 4-channel UNets, to paste the known region back.
        let shape = [batch, latent_channels, height / f, width / f];
        let need_image_latents = !channels_unet || (args.latents.is_none() && !is_strength_max);
        let image_latents = if need_image_latents {
            let latents = if init_image.dims()[1] == latent_channels {
                init_image.clone()
            } else {
                encode_vae_image(&c.vae, init_image.clone(), &mut generators)?
            };
            Some(tile_to_batch(
                cast_like_model(latents, dtype),
                batch,
                "image",
            )?)
        } else {
            None
        };
        let (latents, noise) = match args.latents.take() {
            Some(l) if l.dims() != shape => {
                return Err(Error::invalid_argument(
                    "latents",
                    format!("shape {:?}, expected {shape:?}", l.dims()),
                ));
            }
            Some(l) => {
                let noise = cast_like_model(l, dtype);
                (
                    noise.clone().mul_scalar(c.scheduler.init_noise_sigma()),
                    noise,
                )
            }
            None => {
                let noise = randn_latents(shape, &mut generators, &device, dtype)?;
                let latents = match (&image_latents, is_strength_max) {
                    (_, true) => noise.clone().mul_scalar(c.scheduler.init_noise_sigma()),
                    (Some(il), false) => {
                        c.scheduler
                            .add_noise(il.clone(), noise.clone(), &latent_timestep)?
                    }
                    (None, false) => unreachable_image_latents()?,
                };
                (latents, noise)
            }
        };

        // The mask at image resolution, 1 where to repaint.
        let mask_condition = preprocess(
            &mask_processor(f),
            &mask_image,
            size,
            None,
            "mask_image",
            &device,
        )?;
        let masked_image = match args.masked_image_latents.take() {
            Some(m) => m,
            None => mask_out(&init_image, &mask_condition)?,
        };

        // prepare_mask_latents
        let mask = interpolate_nearest(mask_condition, height / f, width / f);
        let masked_image_latents = if masked_image.dims()[1] == latent_channels {
            masked_image
        } else {
            // The legacy path never reads these latents; diffusers still encodes them, and the
            // generator draws that costs are kept so stochastic schedulers see the same noise.
            encode_vae_image(&c.vae, masked_image, &mut generators)?
        };
        let mask = tile_to_batch(cast_like_model(mask, dtype), batch, "mask_image")?;
        let masked_image_latents = tile_to_batch(
            cast_like_model(masked_image_latents, dtype),
            batch,
            "masked_image_latents",
        )?;

        let condition = if channels_unet {
            let double = |x: Tensor<4>| {
                if do_cfg {
                    Tensor::cat(vec![x.clone(), x], 0)
                } else {
                    x
                }
            };
            InpaintCondition::Channels {
                mask: double(mask),
                masked_image_latents: double(masked_image_latents),
            }
        } else {
            InpaintCondition::Blend {
                image_latents: image_latents.map_or_else(unreachable_image_latents, Ok)?,
                noise,
                mask,
            }
        };

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
            guidance_rescale: 0.0,
            eta: args.eta,
            condition,
            added_cond: None,
            image_embeds: ip_adapter_image_embeds,
            ip_adapter_masks: std::mem::take(&mut args.ip_adapter.masks),
            generators: &mut generators,
            callback: args.callback.as_mut(),
            progress: args.progress,
        }
        .run(latents)?;
        let mut out = decode_latents(&c.vae, f, latents, args.output_type, interrupted)?;
        if let Some(overlay) = &overlay {
            overlay.apply(&mut out.images)?;
        }
        Ok(out)
    }
}

/// The image latents are computed whenever a path needs them; reaching this is a logic error,
/// reported rather than panicking.
fn unreachable_image_latents() -> Result<Tensor<4>> {
    Err(Error::invalid_argument(
        "image",
        "internal: image latents were not prepared",
    ))
}
