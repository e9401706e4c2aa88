//! `StableDiffusionPipeline`: text-to-image with Stable Diffusion 1.x / 2.x.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::OutputType;
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::HubOptions;
use diffusion_models::ModelMixin;
use diffusion_schedulers::Scheduler;

use super::denoise::{
    DenoiseLoop, InpaintCondition, cast_like_model, check_size, decode_latents, randn_latents,
    retrieve_timesteps, unet_dtype,
};
use super::prompt::{
    ClipPromptEncoder, GuidedPrompt, PromptEncoder, PromptInputs, encode_for_unet_with,
};
use super::{SdModels, StableDiffusionComponents};
use crate::pipeline_utils::{Generators, ImagePipelineOutput, StepCallback};

/// Arguments of [`StableDiffusionPipeline::call`], diffusers' `StableDiffusionPipeline.__call__`
/// keyword arguments with their defaults.
pub struct StableDiffusionArgs<'a> {
    /// The prompts, one image batch each (`prompt`, one string or a list); empty when
    /// `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// What to steer away from, one per prompt (`negative_prompt`); `None` is the empty prompt.
    pub negative_prompt: Option<Vec<String>>,
    /// Precomputed prompt embeddings `[B, S, cross_attention_dim]` instead of `prompt`.
    pub prompt_embeds: Option<Tensor<3>>,
    /// Precomputed negative embeddings, shaped as `prompt_embeds`.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// Image height in pixels, a multiple of 8; `None` is `unet.sample_size * vae_scale_factor`.
    pub height: Option<usize>,
    /// Image width in pixels, a multiple of 8; `None` as for `height`.
    pub width: Option<usize>,
    /// Denoising steps (default 50); ignored when `timesteps` or `sigmas` is given.
    pub num_inference_steps: usize,
    /// Custom timesteps, for schedulers that take them.
    pub timesteps: Option<Vec<f64>>,
    /// Custom sigmas, for schedulers that take them.
    pub sigmas: Option<Vec<f64>>,
    /// Classifier-free guidance weight (default 7.5); guidance is off at 1 or below.
    pub guidance_scale: f64,
    /// Rescale of the guided prediction (`guidance_rescale`, default 0: off).
    pub guidance_rescale: f64,
    /// DDIM's `eta` (default 0); passed only to schedulers that take it, as diffusers does.
    pub eta: f64,
    /// Randomness: one seed, one seed per image (`prompts * num_images_per_prompt`), or random.
    pub generator: Generators,
    /// Initial latents `[B * num_images_per_prompt, C, H / f, W / f]` instead of fresh noise
    /// (scaled by the scheduler's `init_noise_sigma`, as diffusers does).
    pub latents: Option<Tensor<4>>,
    /// Images per prompt (default 1).
    pub num_images_per_prompt: usize,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// Skip this many final CLIP layers for the prompt embeddings (`clip_skip`).
    pub clip_skip: Option<usize>,
    /// IP-Adapter images, embeddings and masks (`ip_adapter_image`, `ip_adapter_image_embeds`,
    /// `ip_adapter_masks`); none by default.
    pub ip_adapter: crate::IPAdapterArgs,
    /// `callback_on_step_end`: sees the latents after every step, may replace them or stop.
    pub callback: Option<StepCallback<'a>>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for StableDiffusionArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            negative_prompt: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            height: None,
            width: None,
            num_inference_steps: 50,
            timesteps: None,
            sigmas: None,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            eta: 0.0,
            generator: Generators::Random,
            latents: None,
            num_images_per_prompt: 1,
            output_type: OutputType::Pil,
            clip_skip: None,
            ip_adapter: crate::IPAdapterArgs::default(),
            callback: None,
            progress: true,
        }
    }
}

impl std::fmt::Debug for StableDiffusionArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionArgs")
            .field("prompt", &self.prompt)
            .field("negative_prompt", &self.negative_prompt)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("guidance_scale", &self.guidance_scale)
            .field("guidance_rescale", &self.guidance_rescale)
            .field("eta", &self.eta)
            .field("generator", &self.generator)
            .field("num_images_per_prompt", &self.num_images_per_prompt)
            .field("output_type", &self.output_type)
            .field("clip_skip", &self.clip_skip)
            .finish_non_exhaustive()
    }
}

/// diffusers' `StableDiffusionPipeline`: text-to-image with a CLIP text encoder, a conditional
/// UNet, a VAE and any scheduler.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::{ImageOutput, save_png};
/// use diffusion_pipelines::{Generators, StableDiffusionArgs, StableDiffusionPipeline};
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = StableDiffusionPipeline::from_pretrained(
///     "stable-diffusion-v1-5/stable-diffusion-v1-5",
///     &Device::default(),
/// )?;
/// pipe.components.set_scheduler("DPM++ 2M")?;
/// let out = pipe.call(StableDiffusionArgs {
///     prompt: vec!["a photo of an astronaut riding a horse on mars".into()],
///     num_inference_steps: 25,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// if let ImageOutput::Images(images) = out.images {
///     save_png("astronaut.png", &images[0], &[])?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StableDiffusionPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`.
    pub components: StableDiffusionComponents,
}

impl AsRef<StableDiffusionComponents> for StableDiffusionPipeline {
    fn as_ref(&self) -> &StableDiffusionComponents {
        &self.components
    }
}

impl StableDiffusionPipeline {
    /// Load a diffusers folder or Hub id (see [`StableDiffusionComponents::from_pretrained`]).
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

    /// Load an original-layout checkpoint file (`from_single_file`).
    ///
    /// # Errors
    /// As [`StableDiffusionComponents::from_single_file`].
    pub fn from_single_file(
        path: impl AsRef<std::path::Path>,
        options: &crate::single_file::SingleFilePipelineOptions,
        device: &Device,
    ) -> Result<Self> {
        StableDiffusionComponents::from_single_file(path, options, device).map(Self::from_parts)
    }

    /// Build from loaded components.
    pub fn from_parts(components: StableDiffusionComponents) -> Self {
        Self { components }
    }

    /// Share another pipeline's components (`StableDiffusionPipeline.from_pipe`): the weights
    /// are not copied.
    pub fn from_pipe(other: &impl AsRef<StableDiffusionComponents>) -> Self {
        Self::from_parts(other.as_ref().clone())
    }

    /// Generate images from text.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: neither or both of `prompt` and
    /// `prompt_embeds`, a negative prompt batch that differs from the prompt batch, a height or
    /// width that is not a multiple of 8, zero steps or images per prompt, both `timesteps` and
    /// `sigmas` (or ones the scheduler does not take), a seed list that does not match
    /// `prompts * num_images_per_prompt` (`generator`), latents of the wrong shape, a bad
    /// `clip_skip`; as the models.
    pub fn call(&mut self, args: StableDiffusionArgs<'_>) -> Result<ImagePipelineOutput> {
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
        text_to_image(models, &encoder, args)
    }
}

/// [`StableDiffusionPipeline::call`] on borrowed models with any [`PromptEncoder`] (shared with
/// AltDiffusion).
pub(crate) fn text_to_image(
    c: SdModels<'_>,
    encoder: &impl PromptEncoder,
    mut args: StableDiffusionArgs<'_>,
) -> Result<ImagePipelineOutput> {
    let device = c.device()?;
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

    retrieve_timesteps(
        c.scheduler,
        args.num_inference_steps,
        args.timesteps.as_deref(),
        args.sigmas.as_deref(),
    )?;
    let timesteps = c.scheduler.timesteps().to_vec();

    let f = c.vae_scale_factor();
    let shape = [batch, c.unet.config().in_channels, height / f, width / f];
    let latents = match args.latents.take() {
        Some(l) if l.dims() != shape => {
            return Err(Error::invalid_argument(
                "latents",
                format!("shape {:?}, expected {shape:?}", l.dims()),
            ));
        }
        Some(l) => cast_like_model(l, dtype),
        None => randn_latents(shape, &mut generators, &device, dtype)?,
    };
    let latents = latents.mul_scalar(c.scheduler.init_noise_sigma());

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
        guidance_rescale: args.guidance_rescale,
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
