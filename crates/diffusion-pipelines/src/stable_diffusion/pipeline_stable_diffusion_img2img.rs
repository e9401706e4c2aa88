//! `StableDiffusionImg2ImgPipeline`: image-to-image (SDEdit) with Stable Diffusion 1.x / 2.x.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::HubOptions;
use diffusion_models::ModelMixin;
use diffusion_schedulers::Scheduler;

use super::denoise::{
    DenoiseLoop, InpaintCondition, cast_like_model, check_strength, decode_latents,
    encode_vae_image, randn_latents, retrieve_timesteps, tile_to_batch, timesteps_for_strength,
    unet_dtype,
};
use super::image_input::{PipelineImageInput, preprocess};
use super::prompt::{
    ClipPromptEncoder, GuidedPrompt, PromptEncoder, PromptInputs, encode_for_unet_with,
};
use super::{SdModels, StableDiffusionComponents};
use crate::pipeline_utils::{Generators, ImagePipelineOutput, StepCallback};

/// Arguments of [`StableDiffusionImg2ImgPipeline::call`], diffusers'
/// `StableDiffusionImg2ImgPipeline.__call__` keyword arguments with their defaults.
pub struct StableDiffusionImg2ImgArgs<'a> {
    /// The prompts (one string or a list); empty when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// The starting image(s); its size (rounded down to the VAE scale factor) is the output
    /// size. A tensor with the VAE's latent channels is used as latents.
    pub image: Option<PipelineImageInput>,
    /// How much to change the image, in (0, 1] (default 0.8): the last `strength` part of the
    /// schedule is run.
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

impl Default for StableDiffusionImg2ImgArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            image: None,
            strength: 0.8,
            num_inference_steps: 50,
            timesteps: None,
            sigmas: None,
            guidance_scale: 7.5,
            negative_prompt: None,
            num_images_per_prompt: 1,
            eta: 0.0,
            generator: Generators::Random,
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

impl std::fmt::Debug for StableDiffusionImg2ImgArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionImg2ImgArgs")
            .field("prompt", &self.prompt)
            .field("strength", &self.strength)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("guidance_scale", &self.guidance_scale)
            .field("generator", &self.generator)
            .field("num_images_per_prompt", &self.num_images_per_prompt)
            .field("output_type", &self.output_type)
            .finish_non_exhaustive()
    }
}

/// diffusers' `StableDiffusionImg2ImgPipeline`: noise an image's latents to the level `strength`
/// picks, then denoise them guided by the prompt.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::load_image;
/// use diffusion_pipelines::{
///     Generators, StableDiffusionImg2ImgArgs, StableDiffusionImg2ImgPipeline,
/// };
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = StableDiffusionImg2ImgPipeline::from_pretrained(
///     "stable-diffusion-v1-5/stable-diffusion-v1-5",
///     &Device::default(),
/// )?;
/// let out = pipe.call(StableDiffusionImg2ImgArgs {
///     prompt: vec!["a fantasy landscape, trending on artstation".into()],
///     image: Some(load_image("sketch.png")?.into()),
///     strength: 0.75,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StableDiffusionImg2ImgPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`.
    pub components: StableDiffusionComponents,
}

impl AsRef<StableDiffusionComponents> for StableDiffusionImg2ImgPipeline {
    fn as_ref(&self) -> &StableDiffusionComponents {
        &self.components
    }
}

impl StableDiffusionImg2ImgPipeline {
    /// Load a diffusers folder or Hub id (a text-to-image folder works).
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

    /// Transform an image guided by text.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: a missing `image`, `strength`
    /// outside (0, 1] or leaving no step, zero steps, a seed list that does not match the
    /// batch (`generator`), an image batch that cannot be repeated to the batch; as
    /// [`super::StableDiffusionPipeline::call`] for the text arguments.
    pub fn call(&mut self, args: StableDiffusionImg2ImgArgs<'_>) -> Result<ImagePipelineOutput> {
        let c = &mut self.components;
        let encoder = ClipPromptEncoder {
            tokenizer: &c.tokenizer,
            text_encoder: &c.text_encoder,
        };
        let models = SdModels {
            vae: &c.vae,
            unet: &c.unet,
            scheduler: &mut c.scheduler,
            image_encoder: c.image_encoder.as_ref(),
            feature_extractor: c.feature_extractor.as_ref(),
        };
        image_to_image(models, &encoder, args)
    }
}

/// [`StableDiffusionImg2ImgPipeline::call`] on borrowed models with any [`PromptEncoder`]
/// (shared with AltDiffusion).
pub(crate) fn image_to_image(
    c: SdModels<'_>,
    encoder: &impl PromptEncoder,
    mut args: StableDiffusionImg2ImgArgs<'_>,
) -> Result<ImagePipelineOutput> {
    let device = c.device()?;
    check_strength(args.strength)?;
    let image = args
        .image
        .take()
        .ok_or_else(|| Error::invalid_argument("image", "image-to-image needs an image"))?;
    if args.num_images_per_prompt == 0 {
        return Err(Error::invalid_argument(
            "num_images_per_prompt",
            "must be at least 1",
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
    } = encode_for_unet_with(
        encoder,
        c.unet,
        inputs,
        args.num_images_per_prompt,
        args.guidance_scale,
        &device,
    )?;
    let mut generators = args.generator.instantiate(batch)?;
    let dtype = unet_dtype(c.unet);

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
        c.scheduler,
        args.num_inference_steps,
        args.timesteps.as_deref(),
        args.sigmas.as_deref(),
    )?;
    let timesteps = timesteps_for_strength(c.scheduler, steps, args.strength)?;
    let latent_timestep = vec![timesteps[0]; batch];

    // prepare_latents
    let init_latents = if image.dims()[1] == latent_channels {
        image
    } else {
        // One generator per image: the image batch is repeated to the full batch first,
        // then each image is encoded with its own generator.
        let image = if generators.len() > 1 {
            tile_to_batch(image, batch, "image")?
        } else {
            image
        };
        encode_vae_image(c.vae, image, &mut generators)?
    };
    let init_latents = tile_to_batch(cast_like_model(init_latents, dtype), batch, "image")?;
    let noise = randn_latents(init_latents.dims(), &mut generators, &device, dtype)?;
    let latents = c
        .scheduler
        .add_noise(init_latents, noise, &latent_timestep)?;

    let ip_adapter_image_embeds = crate::ip_adapter::prepare_ip_adapter_image_embeds(
        c.unet,
        c.image_encoder,
        c.feature_extractor,
        &args.ip_adapter,
        batch,
        do_cfg,
        &device,
    )?;
    let (latents, interrupted) = DenoiseLoop {
        unet: c.unet,
        scheduler: c.scheduler,
        timesteps,
        prompt_embeds,
        do_classifier_free_guidance: do_cfg,
        guidance_scale: args.guidance_scale,
        guidance_rescale: 0.0,
        eta: args.eta,
        condition: InpaintCondition::None,
        added_cond: None,
        image_embeds: ip_adapter_image_embeds,
        ip_adapter_masks: std::mem::take(&mut args.ip_adapter.masks),
        generators: &mut generators,
        callback: args.callback.as_mut(),
        progress: args.progress,
    }
    .run(latents)?;
    decode_latents(c.vae, f, latents, args.output_type, interrupted)
}
