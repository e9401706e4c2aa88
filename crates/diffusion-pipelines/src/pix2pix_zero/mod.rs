//! `StableDiffusionPix2PixZeroPipeline` (diffusers'
//! `pipelines/deprecated/stable_diffusion_variants/pipeline_stable_diffusion_pix2pix_zero.py`):
//! zero-shot image editing along a direction in text-embedding space ("cat" → "dog"), with
//! cross-attention guidance that keeps the structure of the unedited image.
//!
//! A call runs the denoising loop twice from the same latents: first with the prompt as given,
//! recording the cross-attention maps of every `attn2` layer per timestep; then with the
//! direction `mean(target_embeds) - mean(source_embeds)` added to the prompt embeddings, where
//! each step first takes one gradient step on the latents against the squared distance between
//! the new cross-attention maps and the recorded ones (`cross_attention_guidance_amount` is the
//! step size). Real images are edited by inverting them first ([`StableDiffusionPix2PixZeroPipeline::invert`],
//! inverse DDIM with regularisers that keep the inverted noise Gaussian) under a caption of the
//! image; the captioner is pluggable ([`Captioner`]), or the caption is simply given.
//!
//! The gradients come from burn's autodiff: the latents become an autodiff leaf and the UNet's
//! weights, which stay on the plain device, enter the graph as constants, so the guided pass
//! needs no second copy of the UNet, only the activations kept for the backward pass. (Forking
//! the UNet onto the autodiff device also shares the weights, costs under a millisecond, but
//! made the backward pass slower.) Measured on the CPU (`flex`, 2 cores) with a 3-level UNet
//! (64/128/256 channels, 32x32 latents, batch 2): a forward pass 1.1 s, the gradient's forward
//! and backward 3.6 s, so a guided edit step costs about 5.7 forward passes (reference,
//! gradient, recomputed prediction) against 2 without guidance. The reference maps are kept on
//! the host, as diffusers keeps them on the CPU: `2 x heads x tokens x 77` floats per
//! cross-attention layer and step (about 130 MB per step for SD 1.5 at 512x512, 6.6 GB for
//! 50 steps).

mod attention;
mod regularizers;

use std::sync::Arc;

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType, RgbImage, VaeImageProcessor};
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::HubOptions;
use diffusion_models::{ModelMixin, Padding, UNet2DConditionModel};
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, Scheduler, SchedulerKind, SchedulerSpec, StepOptions,
};

use crate::pipeline_utils::{Generators, ImagePipelineOutput, noise_source, progress_bar};
use crate::stable_diffusion::StableDiffusionComponents;
use crate::stable_diffusion::denoise::{
    cast_like_model, check_size, decode_latents, encode_vae_image, randn_latents,
    retrieve_timesteps, tile_to_batch, unet_dtype,
};
use crate::stable_diffusion::image_input::{PipelineImageInput, preprocess};
use crate::stable_diffusion::prompt::{GuidedPrompt, PromptInputs, encode_for_unet};
use attention::CrossAttentionMaps;
pub(crate) use regularizers::Regularization;

/// Describes an image in words, for inverting real images under their caption (diffusers'
/// `generate_caption` runs BLIP prompted with "a photography of"; this port has no BLIP, so any
/// captioner can be plugged in). Closures `Fn(&RgbImage) -> Result<String>` are captioners.
pub trait Captioner: Send + Sync {
    /// A caption of `image`.
    ///
    /// # Errors
    /// Whatever the captioner fails with.
    fn caption(&self, image: &RgbImage) -> Result<String>;
}

impl<F: Fn(&RgbImage) -> Result<String> + Send + Sync> Captioner for F {
    fn caption(&self, image: &RgbImage) -> Result<String> {
        self(image)
    }
}

/// Arguments of [`StableDiffusionPix2PixZeroPipeline::call`], diffusers'
/// `StableDiffusionPix2PixZeroPipeline.__call__` keyword arguments with their defaults.
/// diffusers' `callback` (called in the reference pass only) and `cross_attention_kwargs` are
/// not taken.
#[derive(Debug)]
pub struct StableDiffusionPix2PixZeroArgs {
    /// The prompts (one string or a list), naming the source concept ("a painting of a cat");
    /// empty when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// Embeddings of captions with the source concept, `[N, S, D]` (see
    /// [`StableDiffusionPix2PixZeroPipeline::get_embeds`]); required.
    pub source_embeds: Option<Tensor<3>>,
    /// Embeddings of captions with the target concept, `[M, S, D]`; required.
    pub target_embeds: Option<Tensor<3>>,
    /// Image height in pixels (default: the UNet's `sample_size` times the VAE scale factor, or
    /// the size of the given `latents`).
    pub height: Option<usize>,
    /// Image width in pixels (default as `height`).
    pub width: Option<usize>,
    /// Denoising steps (default 50).
    pub num_inference_steps: usize,
    /// Classifier-free guidance weight (default 7.5).
    pub guidance_scale: f64,
    /// Negative prompts, one per prompt (the caption of an inverted image is a good one).
    pub negative_prompt: Option<Vec<String>>,
    /// Images per prompt (default 1).
    pub num_images_per_prompt: usize,
    /// DDIM's `eta` (default 0).
    pub eta: f64,
    /// Randomness: one seed, one per image, or random.
    pub generator: Generators,
    /// Starting latents (e.g. [`Pix2PixInversionPipelineOutput::latents`]), `[B, C, h, w]`.
    pub latents: Option<Tensor<4>>,
    /// Precomputed prompt embeddings.
    pub prompt_embeds: Option<Tensor<3>>,
    /// Precomputed negative embeddings.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// Step size of the gradient step on the latents towards the reference cross-attention
    /// maps (default 0.1; 0 turns the guidance, and its backward passes, off).
    pub cross_attention_guidance_amount: f64,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// Skip this many final CLIP layers for the prompt embeddings.
    pub clip_skip: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for StableDiffusionPix2PixZeroArgs {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            source_embeds: None,
            target_embeds: None,
            height: None,
            width: None,
            num_inference_steps: 50,
            guidance_scale: 7.5,
            negative_prompt: None,
            num_images_per_prompt: 1,
            eta: 0.0,
            generator: Generators::Random,
            latents: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            cross_attention_guidance_amount: 0.1,
            output_type: OutputType::Pil,
            clip_skip: None,
            progress: true,
        }
    }
}

/// Arguments of [`StableDiffusionPix2PixZeroPipeline::invert`], diffusers' `invert` keyword
/// arguments with their defaults (its unused `latents`, `cross_attention_guidance_amount` and
/// `cross_attention_kwargs` are left out; `callback` is not taken).
#[derive(Debug)]
pub struct Pix2PixZeroInvertArgs {
    /// The caption(s) of the image; empty when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// The image(s) to invert; a tensor with the VAE's latent channels is taken as latents.
    pub image: Option<PipelineImageInput>,
    /// Inverse DDIM steps (default 50).
    pub num_inference_steps: usize,
    /// Classifier-free guidance weight (default 1: none).
    pub guidance_scale: f64,
    /// Randomness of the VAE posterior sample and of the auto-correlation rolls.
    pub generator: Generators,
    /// Precomputed prompt embeddings.
    pub prompt_embeds: Option<Tensor<3>>,
    /// `output_type` of the decoded inverted latents (default `"pil"`).
    pub output_type: OutputType,
    /// Weight of the auto-correlation regulariser (default 20; 0 turns it off).
    pub lambda_auto_corr: f64,
    /// Weight of the KL regulariser (default 20; 0 turns it off).
    pub lambda_kl: f64,
    /// Regularisation rounds per step (default 5).
    pub num_reg_steps: usize,
    /// Auto-correlation gradient steps per round (default 5).
    pub num_auto_corr_rolls: usize,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for Pix2PixZeroInvertArgs {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            image: None,
            num_inference_steps: 50,
            guidance_scale: 1.0,
            generator: Generators::Random,
            prompt_embeds: None,
            output_type: OutputType::Pil,
            lambda_auto_corr: 20.0,
            lambda_kl: 20.0,
            num_reg_steps: 5,
            num_auto_corr_rolls: 5,
            progress: true,
        }
    }
}

/// What [`StableDiffusionPix2PixZeroPipeline::invert`] returns (diffusers'
/// `Pix2PixInversionPipelineOutput`).
#[derive(Clone, Debug)]
pub struct Pix2PixInversionPipelineOutput {
    /// The inverted latents `[B, C, h, w]`, to start an edit from.
    pub latents: Tensor<4>,
    /// The inverted latents decoded, in the requested output type.
    pub images: ImageOutput,
}

/// diffusers' `StableDiffusionPix2PixZeroPipeline`.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::load_image;
/// use diffusion_pipelines::{
///     Generators, Pix2PixZeroInvertArgs, StableDiffusionPix2PixZeroArgs,
///     StableDiffusionPix2PixZeroPipeline,
/// };
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = StableDiffusionPix2PixZeroPipeline::from_pretrained(
///     "CompVis/stable-diffusion-v1-4",
///     &Device::default(),
/// )?;
/// let caption = "a photo of a cat sitting on a sofa".to_string();
/// let inverted = pipe.invert(Pix2PixZeroInvertArgs {
///     prompt: vec![caption.clone()],
///     image: Some(load_image("cat.png")?.into()),
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// let source = pipe.get_embeds(&["a cat sitting on the street".into()], 16)?;
/// let target = pipe.get_embeds(&["a dog sitting on the street".into()], 16)?;
/// let out = pipe.call(StableDiffusionPix2PixZeroArgs {
///     prompt: vec![caption.clone()],
///     negative_prompt: Some(vec![caption]),
///     source_embeds: Some(source),
///     target_embeds: Some(target),
///     latents: Some(inverted.latents),
///     cross_attention_guidance_amount: 0.15,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct StableDiffusionPix2PixZeroPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler` (DDIM, DDPM, Euler ancestral or
    /// LMS for [`Self::call`]).
    pub components: StableDiffusionComponents,
    /// The scheduler of [`Self::invert`]: a `DDIMInverseScheduler`.
    pub inverse_scheduler: AnyScheduler,
    /// The captioner of [`Self::generate_caption`] (diffusers' `caption_generator`); none by
    /// default.
    pub caption_generator: Option<Arc<dyn Captioner>>,
}

impl std::fmt::Debug for StableDiffusionPix2PixZeroPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionPix2PixZeroPipeline")
            .field("components", &self.components)
            .field("inverse_scheduler", &self.inverse_scheduler)
            .field("caption_generator", &self.caption_generator.is_some())
            .finish()
    }
}

impl AsRef<StableDiffusionComponents> for StableDiffusionPix2PixZeroPipeline {
    fn as_ref(&self) -> &StableDiffusionComponents {
        &self.components
    }
}

impl StableDiffusionPix2PixZeroPipeline {
    /// Load a Stable Diffusion 1.x / 2.x folder or Hub id; the scheduler becomes a
    /// `DDIMScheduler` and the inverse scheduler a `DDIMInverseScheduler`, both from the
    /// folder's scheduler config (as diffusers' examples set them up).
    ///
    /// # Errors
    /// As [`StableDiffusionComponents::from_pretrained_with`].
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(name_or_path, &HubOptions::default(), device)
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
        let mut components =
            StableDiffusionComponents::from_pretrained_with(name_or_path, options, device)?;
        components.set_scheduler("DDIMScheduler")?;
        let mut pipe = Self::from_parts(components)?;
        // A saved Pix2Pix Zero folder carries its own inverse scheduler config.
        let dir = diffusion_loaders::resolve_model_dir(name_or_path, options)?;
        let inverse = dir.join("inverse_scheduler");
        if inverse.join("scheduler_config.json").is_file() {
            pipe.inverse_scheduler = AnyScheduler::from_config_file(&inverse)?;
        }
        Ok(pipe)
    }

    /// Build from loaded components, keeping their scheduler; the inverse scheduler is a
    /// `DDIMInverseScheduler` from its config.
    ///
    /// # Errors
    /// As [`AnyScheduler::convert`].
    pub fn from_parts(components: StableDiffusionComponents) -> Result<Self> {
        let inverse_scheduler = AnyScheduler::convert(
            &components.scheduler,
            &SchedulerSpec::parse("DDIMInverseScheduler")?,
        )?;
        Ok(Self {
            components,
            inverse_scheduler,
            caption_generator: None,
        })
    }

    /// Share another pipeline's components without copying weights.
    ///
    /// # Errors
    /// As [`Self::from_parts`].
    pub fn from_pipe(other: &impl AsRef<StableDiffusionComponents>) -> Result<Self> {
        Self::from_parts(other.as_ref().clone())
    }

    /// The edit direction `mean(embs_target) - mean(embs_source)` over the captions, `[1, S, D]`
    /// (diffusers' `construct_direction`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`source_embeds` / `target_embeds`) for an empty batch or
    /// embeddings of different token counts or widths.
    pub fn construct_direction(
        embs_source: Tensor<3>,
        embs_target: Tensor<3>,
    ) -> Result<Tensor<3>> {
        let [ns, ss, ds] = embs_source.dims();
        let [nt, st, dt] = embs_target.dims();
        if ns == 0 {
            return Err(Error::invalid_argument("source_embeds", "no embeddings"));
        }
        if nt == 0 {
            return Err(Error::invalid_argument("target_embeds", "no embeddings"));
        }
        if (ss, ds) != (st, dt) {
            return Err(Error::invalid_argument(
                "target_embeds",
                format!("embeddings of {st} tokens x {dt} do not match the source's {ss} x {ds}"),
            ));
        }
        let source = embs_source.mean_dim(0);
        let target = embs_target.to_device(&source.device()).mean_dim(0);
        Ok(target.sub(source))
    }

    /// The mean text-encoder output of many captions, `[1, model_max_length, D]`, encoded
    /// `batch_size` captions at a time (diffusers' `get_embeds`, default batch size 16).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for no captions (`prompt`) or a zero `batch_size`; as the
    /// tokenizer and the text encoder.
    pub fn get_embeds(&self, prompt: &[String], batch_size: usize) -> Result<Tensor<3>> {
        if prompt.is_empty() {
            return Err(Error::invalid_argument("prompt", "no captions to embed"));
        }
        if batch_size == 0 {
            return Err(Error::invalid_argument("batch_size", "must be at least 1"));
        }
        let c = &self.components;
        let device = c.text_encoder.devices().into_iter().next().ok_or_else(|| {
            Error::invalid_argument("text_encoder", "the model has no parameters")
        })?;
        let max_length = c.tokenizer.model_max_length();
        let mut embeds = Vec::new();
        for chunk in prompt.chunks(batch_size) {
            let tokens = c
                .tokenizer
                .tokenize(chunk, Padding::MaxLength, Some(max_length), true)?;
            let ids = tokens.input_ids_tensor(&device)?;
            embeds.push(c.text_encoder.forward(ids)?.last_hidden_state);
        }
        Ok(Tensor::cat(embeds, 0).mean_dim(0))
    }

    /// A caption of `image` from [`Self::caption_generator`] (diffusers' `generate_caption`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`caption_generator`) without a captioner; the captioner's
    /// errors.
    pub fn generate_caption(&self, image: &RgbImage) -> Result<String> {
        match &self.caption_generator {
            Some(captioner) => captioner.caption(image),
            None => Err(Error::invalid_argument(
                "caption_generator",
                "no captioner is set: give the image's caption instead",
            )),
        }
    }

    /// Invert image(s) to the noise that deterministic DDIM denoises back to them, under their
    /// caption, regularising each step's noise prediction towards i.i.d. Gaussian noise
    /// (diffusers' `invert`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: a missing `image`, zero steps,
    /// neither or both of `prompt` and `prompt_embeds`, negative or non-finite lambdas, several
    /// seeds with the auto-correlation regulariser on (`generator`: diffusers draws the rolls
    /// from one generator), latents too small for it (`image`), an image batch that does not
    /// divide the prompt batch; [`Error::Unsupported`] (`inverse_scheduler`) when the inverse
    /// scheduler is not a `DDIMInverseScheduler`; as the models.
    pub fn invert(
        &mut self,
        mut args: Pix2PixZeroInvertArgs,
    ) -> Result<Pix2PixInversionPipelineOutput> {
        let Some(inverse) = self.inverse_scheduler.as_ddim_inverse() else {
            return Err(unsupported_scheduler(
                "inverse_scheduler",
                self.inverse_scheduler.class_name(),
                "DDIMInverseScheduler",
            ));
        };
        let prediction_type = inverse.config().prediction_type;
        let alphas_cumprod = inverse.noise_schedule().alphas_cumprod.clone();
        let image = args
            .image
            .take()
            .ok_or_else(|| Error::invalid_argument("image", "inversion needs an image"))?;
        if args.num_inference_steps == 0 {
            return Err(Error::invalid_argument(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        for (name, value) in [
            ("lambda_auto_corr", args.lambda_auto_corr),
            ("lambda_kl", args.lambda_kl),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(Error::invalid_argument(
                    name,
                    format!("{value} is not a finite weight >= 0"),
                ));
            }
        }
        let reg = Regularization {
            lambda_auto_corr: args.lambda_auto_corr,
            lambda_kl: args.lambda_kl,
            num_reg_steps: args.num_reg_steps,
            num_auto_corr_rolls: args.num_auto_corr_rolls,
        };
        let rolls = reg.lambda_auto_corr > 0.0 && reg.num_reg_steps * reg.num_auto_corr_rolls > 0;
        let c = &self.components;
        let device = c.device()?;
        let inputs = PromptInputs {
            prompt: &args.prompt,
            negative_prompt: None,
            prompt_embeds: args.prompt_embeds.take(),
            negative_prompt_embeds: None,
            clip_skip: None,
        };
        let batch = inputs.batch_size()?;
        let mut generators = args.generator.instantiate(batch)?;
        if rolls && generators.len() > 1 {
            return Err(Error::invalid_argument(
                "generator",
                "the auto-correlation regulariser draws its rolls from one generator: give one \
                 seed (diffusers fails on a list too)",
            ));
        }

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
        let latents = if image.dims()[1] == latent_channels {
            image
        } else {
            encode_vae_image(&c.vae, image, &mut generators)?
        };
        let dtype = unet_dtype(&c.unet);
        let mut latents = tile_to_batch(cast_like_model(latents, dtype), batch, "image")?;

        let GuidedPrompt {
            embeds: prompt_embeds,
            do_cfg,
            ..
        } = encode_for_unet(c, inputs, 1, args.guidance_scale, &device)?;
        retrieve_timesteps(
            &mut self.inverse_scheduler,
            args.num_inference_steps,
            None,
            None,
        )?;
        let timesteps = self.inverse_scheduler.timesteps().to_vec();
        let unet = plain_unet(&c.unet);
        let bar = progress_bar(timesteps.len(), args.progress);
        for &t in &timesteps {
            let model_input = if do_cfg {
                Tensor::cat(vec![latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            let model_input = self.inverse_scheduler.scale_model_input(model_input, t)?;
            let noise_pred = predict(
                &unet,
                model_input.clone(),
                t,
                &prompt_embeds,
                do_cfg,
                args.guidance_scale,
            )?;
            let noise_pred = if reg.num_reg_steps > 0 && (rolls || reg.lambda_kl > 0.0) {
                let alpha_prod_t = alphas_cumprod
                    .get(t as usize)
                    .copied()
                    .ok_or_else(|| Error::invalid_argument("timestep", format!("{t}")))?
                    as f32;
                regularizers::regularize(
                    noise_pred,
                    &model_input,
                    alpha_prod_t,
                    prediction_type,
                    &reg,
                    &mut generators[0],
                )?
            } else {
                noise_pred
            };
            latents = self
                .inverse_scheduler
                .step(noise_pred, t, latents, StepOptions::default())?
                .prev_sample;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let decoded = decode_latents(&c.vae, f, latents.clone(), args.output_type, false)?;
        Ok(Pix2PixInversionPipelineOutput {
            latents,
            images: decoded.images,
        })
    }

    /// Edit: denoise once with the prompt to record the cross-attention maps, then again from
    /// the same latents with the edit direction added to the prompt embeddings and one
    /// cross-attention guidance step on the latents per timestep.
    ///
    /// Faithful to diffusers in three corners: the direction is added to row 1 of the batched
    /// prompt embeddings (the first prompt under classifier-free guidance; with
    /// `guidance_scale <= 1` and one prompt there is no row 1 and nothing is edited); under
    /// guidance the latents carried to the next step are the unconditional half of the
    /// guided model input; and that model input is the scheduler-scaled one, which only DDIM
    /// and DDPM leave unscaled (with Euler ancestral and LMS, diffusers, and so this port,
    /// carry scaled latents from step to step).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: a missing `source_embeds` or
    /// `target_embeds`, embeddings whose token count or width differ from the prompt's, neither
    /// or both of `prompt` and `prompt_embeds`, a height or width that is not a multiple of 8,
    /// zero steps or images per prompt, a non-finite guidance amount, latents of the wrong
    /// shape, a seed list that does not match the batch (`generator`), a UNet without
    /// cross-attention when guidance is on (`unet`); [`Error::Unsupported`] (`scheduler`) for
    /// schedulers other than the four diffusers' pipeline takes (DDIM, DDPM, Euler ancestral,
    /// LMS); as the models.
    pub fn call(
        &mut self,
        mut args: StableDiffusionPix2PixZeroArgs,
    ) -> Result<ImagePipelineOutput> {
        let c = &mut self.components;
        let kind = c.scheduler.kind();
        if !matches!(
            kind,
            SchedulerKind::Ddim
                | SchedulerKind::Ddpm
                | SchedulerKind::EulerAncestral
                | SchedulerKind::Lms
        ) {
            return Err(unsupported_scheduler(
                "scheduler",
                c.scheduler.class_name(),
                "DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler or \
                 LMSDiscreteScheduler (the classes diffusers' pipeline takes)",
            ));
        }
        let source = args.source_embeds.take().ok_or_else(|| {
            Error::invalid_argument("source_embeds", "Pix2Pix Zero needs source embeddings")
        })?;
        let target = args.target_embeds.take().ok_or_else(|| {
            Error::invalid_argument("target_embeds", "Pix2Pix Zero needs target embeddings")
        })?;
        let amount = args.cross_attention_guidance_amount;
        if !amount.is_finite() {
            return Err(Error::invalid_argument(
                "cross_attention_guidance_amount",
                format!("{amount} is not finite"),
            ));
        }
        if args.num_images_per_prompt == 0 {
            return Err(Error::invalid_argument(
                "num_images_per_prompt",
                "must be at least 1",
            ));
        }
        let device = c.device()?;
        let direction = Self::construct_direction(source, target)?;
        let f = c.vae_scale_factor();
        let (height, width) = match (&args.latents, args.height, args.width) {
            (_, Some(h), Some(w)) => (h, w),
            (Some(l), h, w) => {
                let [_, _, lh, lw] = l.dims();
                (h.unwrap_or(lh * f), w.unwrap_or(lw * f))
            }
            (None, h, w) => {
                let (dh, dw) = c.default_size()?;
                (h.unwrap_or(dh), w.unwrap_or(dw))
            }
        };
        check_size(height, width)?;

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
        let [rows, seq, dim] = prompt_embeds.dims();
        if direction.dims()[1..] != [seq, dim] {
            return Err(Error::invalid_argument(
                "source_embeds",
                format!(
                    "embeddings of {:?} tokens x width do not match the prompt's [{seq}, {dim}]",
                    &direction.dims()[1..]
                ),
            ));
        }
        let mut generators = args.generator.instantiate(batch)?;
        let dtype = unet_dtype(&c.unet);

        retrieve_timesteps(&mut c.scheduler, args.num_inference_steps, None, None)?;
        let timesteps = c.scheduler.timesteps().to_vec();
        let shape = [batch, c.unet.config().in_channels, height / f, width / f];
        let latents = match args.latents.take() {
            Some(l) if l.dims() != shape => {
                return Err(Error::invalid_argument(
                    "latents",
                    format!("shape {:?}, expected {shape:?}", l.dims()),
                ));
            }
            Some(l) => cast_like_model(l.to_device(&device), dtype),
            None => randn_latents(shape, &mut generators, &device, dtype)?,
        };
        let latents_init = latents.mul_scalar(c.scheduler.init_noise_sigma());

        let maps = Arc::new(CrossAttentionMaps::new());
        let mut unet = c.unet.clone();
        if unet.attention_hook().is_some() {
            log::warn!("Pix2Pix Zero replaces the UNet's attention hook for this call");
        }
        unet.set_attention_hook(maps.clone());
        let guided = amount != 0.0;
        let (takes_eta, takes_generator) = (kind.step_takes_eta(), kind.step_takes_generator());
        let bar = progress_bar(2 * timesteps.len(), args.progress);

        // Reference pass: the prompt as given; record the cross-attention maps.
        let mut latents = latents_init.clone();
        for &t in &timesteps {
            let model_input = double(&latents, do_cfg);
            let model_input = c.scheduler.scale_model_input(model_input, t)?;
            if guided {
                maps.record(t);
            }
            let noise_pred = predict(
                &unet,
                model_input,
                t,
                &prompt_embeds,
                do_cfg,
                args.guidance_scale,
            );
            maps.off();
            let noise_pred = noise_pred?;
            if let Some(e) = maps.take_error() {
                return Err(e);
            }
            let options = StepOptions {
                generator: takes_generator.then(|| noise_source(&mut generators)),
                eta: takes_eta.then_some(args.eta),
                ..StepOptions::default()
            };
            latents = c
                .scheduler
                .step(noise_pred, t, latents, options)?
                .prev_sample;
            bar.inc(1);
        }

        // The edit: the direction added to row 1 of the batched embeddings.
        let prompt_embeds_edit = if rows > 1 {
            let direction = cast_like_model(direction.to_device(&device), dtype);
            let mut parts = vec![
                prompt_embeds.clone().narrow(0, 0, 1),
                prompt_embeds.clone().narrow(0, 1, 1).add(direction),
            ];
            if rows > 2 {
                parts.push(prompt_embeds.clone().narrow(0, 2, rows - 2));
            }
            Tensor::cat(parts, 0)
        } else {
            log::warn!(
                "without classifier-free guidance, diffusers adds the edit direction to the \
                 second prompt only: one prompt is not edited"
            );
            prompt_embeds.clone()
        };

        retrieve_timesteps(&mut c.scheduler, args.num_inference_steps, None, None)?;
        let timesteps = c.scheduler.timesteps().to_vec();
        let mut latents = latents_init;
        for &t in &timesteps {
            let model_input = double(&latents, do_cfg);
            let mut x_in = c.scheduler.scale_model_input(model_input, t)?;
            if guided {
                let grad = cross_attention_gradient(&unet, &maps, &x_in, t, &prompt_embeds_edit)?;
                // One SGD step of size `cross_attention_guidance_amount` on the model input.
                x_in = x_in.sub(grad.mul_scalar(amount));
            }
            let noise_pred = predict(
                &unet,
                x_in.clone(),
                t,
                &prompt_embeds_edit,
                do_cfg,
                args.guidance_scale,
            )?;
            let latents_in = if do_cfg {
                x_in.narrow(0, 0, batch)
            } else {
                x_in
            };
            let options = StepOptions {
                generator: takes_generator.then(|| noise_source(&mut generators)),
                eta: takes_eta.then_some(args.eta),
                ..StepOptions::default()
            };
            latents = c
                .scheduler
                .step(noise_pred, t, latents_in, options)?
                .prev_sample;
            bar.inc(1);
        }
        bar.finish_and_clear();
        decode_latents(&c.vae, f, latents, args.output_type, false)
    }
}

fn unsupported_scheduler(field: &str, class: &str, expected: &str) -> Error {
    Error::Unsupported {
        path: std::path::PathBuf::from(format!("<{field}>")),
        field: field.into(),
        value: class.into(),
        reason: format!("Pix2Pix Zero needs a {expected} here"),
    }
}

/// `torch.cat([x] * 2)` under classifier-free guidance.
fn double(latents: &Tensor<4>, do_cfg: bool) -> Tensor<4> {
    if do_cfg {
        Tensor::cat(vec![latents.clone(), latents.clone()], 0)
    } else {
        latents.clone()
    }
}

/// The UNet without an attention hook (a cheap clone: weights are shared).
fn plain_unet(unet: &UNet2DConditionModel) -> UNet2DConditionModel {
    let mut unet = unet.clone();
    unet.clear_attention_hook();
    unet
}

/// The UNet's prediction at `t`, combined under classifier-free guidance.
fn predict(
    unet: &UNet2DConditionModel,
    model_input: Tensor<4>,
    t: f64,
    prompt_embeds: &Tensor<3>,
    do_cfg: bool,
    guidance_scale: f64,
) -> Result<Tensor<4>> {
    let device = model_input.device();
    let timestep = Tensor::<1>::from_floats([t as f32], &device);
    let noise_pred = unet.forward(model_input, timestep, prompt_embeds.clone())?;
    Ok(if do_cfg {
        let b = noise_pred.dims()[0] / 2;
        let uncond = noise_pred.clone().narrow(0, 0, b);
        let text = noise_pred.narrow(0, b, b);
        uncond
            .clone()
            .add(text.sub(uncond).mul_scalar(guidance_scale))
    } else {
        noise_pred
    })
}

/// The gradient, with respect to the model input `x_in`, of the summed squared distances
/// between the cross-attention maps of a UNet pass on the edited embeddings and those recorded
/// at `t` in the reference pass. `x_in` becomes an autodiff leaf; the UNet's weights enter the
/// graph as constants.
fn cross_attention_gradient(
    unet: &UNet2DConditionModel,
    maps: &CrossAttentionMaps,
    x_in: &Tensor<4>,
    t: f64,
    prompt_embeds_edit: &Tensor<3>,
) -> Result<Tensor<4>> {
    let x = x_in.clone().detach().autodiff().require_grad();
    let timestep = Tensor::<1>::from_floats([t as f32], &x_in.device());
    maps.compute_loss(t);
    let out = unet.forward(x.clone(), timestep, prompt_embeds_edit.clone());
    let loss = maps.take_loss();
    drop(out?);
    let grads = loss?.backward();
    let grad = x.grad(&grads).ok_or_else(|| {
        Error::invalid_argument("latents", "the cross-attention loss has no gradient")
    })?;
    Ok(grad.to_device(&x_in.device()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::burn::tensor::TensorData;

    #[test]
    fn direction_is_the_difference_of_means() {
        let device = Device::flex();
        let s = Tensor::<3>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 1, 2]),
            &device,
        );
        let t = Tensor::<3>::from_data(TensorData::new(vec![5.0f32, 5.0], [1, 1, 2]), &device);
        let d = StableDiffusionPix2PixZeroPipeline::construct_direction(s, t).unwrap();
        assert_eq!(d.dims(), [1, 1, 2]);
        assert_eq!(diffusion_core::tensor::to_vec(d), vec![3.0, 2.0]);
    }

    #[test]
    fn direction_of_mismatched_embeddings_is_an_error() {
        let device = Device::flex();
        let s = Tensor::<3>::zeros([2, 3, 4], &device);
        let t = Tensor::<3>::zeros([2, 3, 5], &device);
        let err = StableDiffusionPix2PixZeroPipeline::construct_direction(s, t).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref name, .. } if name == "target_embeds"));
    }
}
