//! `StableDiffusionInstructPix2PixPipeline`: instruction-guided image editing.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::HubOptions;
use diffusion_models::{ModelMixin, UNet2DConditionModel, UNet2DConditionOptions};
use diffusion_schedulers::{Scheduler, StepOptions};

use crate::pipeline_utils::{
    Generators, ImagePipelineOutput, StepCallback, after_step, noise_source, progress_bar,
};
use crate::stable_diffusion::denoise::{
    cast_like_model, decode_latents, randn_latents, retrieve_timesteps, tile_to_batch, unet_dtype,
    vae_dtype,
};
use crate::stable_diffusion::image_input::{PipelineImageInput, preprocess};
use crate::stable_diffusion::prompt::{PromptInputs, encode_prompt};
use crate::stable_diffusion::{SdModels, StableDiffusionComponents};

/// Arguments of [`StableDiffusionInstructPix2PixPipeline::call`]: diffusers'
/// `StableDiffusionInstructPix2PixPipeline.__call__` keyword arguments with their defaults.
pub struct StableDiffusionInstructPix2PixArgs<'a> {
    /// The edit instructions, one image batch each (`prompt`); empty when `prompt_embeds` is
    /// given.
    pub prompt: Vec<String>,
    /// The image(s) to edit (`image`); the output has its size rounded down to the VAE scale
    /// factor. A tensor with the VAE's latent channels is taken as image latents and not
    /// encoded again. Required.
    pub image: Option<PipelineImageInput>,
    /// Denoising steps (default 100).
    pub num_inference_steps: usize,
    /// Weight of the instruction (default 7.5). Guidance runs when it is above 1.
    pub guidance_scale: f64,
    /// Weight of the input image (default 1.5); at least 1, as diffusers documents.
    pub image_guidance_scale: f64,
    /// What to steer away from, one per prompt; `None` is the empty prompt.
    pub negative_prompt: Option<Vec<String>>,
    /// Edits per prompt (default 1).
    pub num_images_per_prompt: usize,
    /// DDIM's `eta` (default 0); passed only to schedulers that take it.
    pub eta: f64,
    /// Randomness: one seed, one seed per image, or random.
    pub generator: Generators,
    /// Initial latents `[B * num_images_per_prompt, latent_channels, H / f, W / f]` instead of
    /// fresh noise (scaled by the scheduler's `init_noise_sigma`, as diffusers does).
    pub latents: Option<Tensor<4>>,
    /// Precomputed prompt embeddings `[B, S, cross_attention_dim]` instead of `prompt`.
    pub prompt_embeds: Option<Tensor<3>>,
    /// Precomputed negative embeddings, shaped as `prompt_embeds`.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// `callback_on_step_end`: sees the latents after every step, may replace them or stop.
    pub callback: Option<StepCallback<'a>>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for StableDiffusionInstructPix2PixArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            image: None,
            num_inference_steps: 100,
            guidance_scale: 7.5,
            image_guidance_scale: 1.5,
            negative_prompt: None,
            num_images_per_prompt: 1,
            eta: 0.0,
            generator: Generators::Random,
            latents: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            output_type: OutputType::Pil,
            callback: None,
            progress: true,
        }
    }
}

impl std::fmt::Debug for StableDiffusionInstructPix2PixArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionInstructPix2PixArgs")
            .field("prompt", &self.prompt)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("guidance_scale", &self.guidance_scale)
            .field("image_guidance_scale", &self.image_guidance_scale)
            .field("generator", &self.generator)
            .field("num_images_per_prompt", &self.num_images_per_prompt)
            .field("output_type", &self.output_type)
            .finish_non_exhaustive()
    }
}

/// diffusers' `StableDiffusionInstructPix2PixPipeline`: denoise fresh latents next to the input
/// image's latents, guided by the instruction and by the image.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::load_image;
/// use diffusion_pipelines::{
///     Generators, StableDiffusionInstructPix2PixArgs, StableDiffusionInstructPix2PixPipeline,
/// };
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = StableDiffusionInstructPix2PixPipeline::from_pretrained(
///     "timbrooks/instruct-pix2pix",
///     &Device::default(),
/// )?;
/// let out = pipe.call(StableDiffusionInstructPix2PixArgs {
///     prompt: vec!["make the mountains snowy".into()],
///     image: Some(load_image("mountain.png")?.into()),
///     num_inference_steps: 20,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StableDiffusionInstructPix2PixPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet` (8 input channels), `scheduler`.
    pub components: StableDiffusionComponents,
}

impl AsRef<StableDiffusionComponents> for StableDiffusionInstructPix2PixPipeline {
    fn as_ref(&self) -> &StableDiffusionComponents {
        &self.components
    }
}

impl StableDiffusionInstructPix2PixPipeline {
    /// Load a diffusers folder or Hub id (`timbrooks/instruct-pix2pix`).
    ///
    /// # Errors
    /// As [`StableDiffusionComponents::from_pretrained_with`]; [`Error::InvalidArgument`]
    /// (`unet`) when the UNet does not take the latents and the image latents side by side.
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(name_or_path, &HubOptions::default(), device)
    }

    /// Load with Hub options (revision, offline, cache, `variant`).
    ///
    /// # Errors
    /// As [`Self::from_pretrained`].
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        let components =
            StableDiffusionComponents::from_pretrained_with(name_or_path, options, device)?;
        let latent_channels = components.vae.config().latent_channels;
        check_unet_channels(&components.unet, latent_channels, latent_channels)?;
        Ok(Self::from_parts(components))
    }

    /// Build from loaded components (the UNet is checked when the pipeline is called).
    pub fn from_parts(components: StableDiffusionComponents) -> Self {
        Self { components }
    }

    /// Share another pipeline's components without copying weights.
    pub fn from_pipe(other: &impl AsRef<StableDiffusionComponents>) -> Self {
        Self::from_parts(other.as_ref().clone())
    }

    /// Edit an image following the prompt.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: a missing or unusable `image`,
    /// a non-finite `guidance_scale`, an `image_guidance_scale` below 1 or not finite, zero
    /// steps or images per prompt, `latents` of the wrong shape, a seed list that does not
    /// match the batch (`generator`), an image batch that cannot be repeated to the batch, a
    /// `unet` whose input channels are not the latent plus the image channels; as
    /// [`crate::StableDiffusionPipeline::call`] for the text arguments.
    pub fn call(
        &mut self,
        args: StableDiffusionInstructPix2PixArgs<'_>,
    ) -> Result<ImagePipelineOutput> {
        let c = &mut self.components;
        let models = SdModels {
            vae: &c.vae,
            unet: &c.unet,
            scheduler: &mut c.scheduler,
            image_encoder: None,
            feature_extractor: None,
        };
        let text = TextModels {
            tokenizer: &c.tokenizer,
            text_encoder: &c.text_encoder,
        };
        instruct_pix2pix(models, text, args)
    }
}

struct TextModels<'a> {
    tokenizer: &'a diffusion_models::CLIPTokenizer,
    text_encoder: &'a diffusion_models::CLIPTextModel,
}

/// diffusers' `do_classifier_free_guidance` for InstructPix2Pix: both scales must allow it.
fn check_guidance(guidance_scale: f64, image_guidance_scale: f64) -> Result<bool> {
    if !guidance_scale.is_finite() {
        return Err(Error::invalid_argument(
            "guidance_scale",
            format!("{guidance_scale} is not a finite number"),
        ));
    }
    if !(image_guidance_scale.is_finite() && image_guidance_scale >= 1.0) {
        return Err(Error::invalid_argument(
            "image_guidance_scale",
            format!(
                "{image_guidance_scale}: InstructPix2Pix needs a finite value of at least 1 \
                 (1 follows the image as the model learnt it, more stays closer to it)"
            ),
        ));
    }
    Ok(guidance_scale > 1.0 && image_guidance_scale >= 1.0)
}

/// The UNet must take the noisy latents and the image latents concatenated along channels.
fn check_unet_channels(
    unet: &UNet2DConditionModel,
    latent_channels: usize,
    image_channels: usize,
) -> Result<()> {
    let in_channels = unet.config().in_channels;
    if latent_channels + image_channels != in_channels {
        return Err(Error::invalid_argument(
            "unet",
            format!(
                "the UNet takes {in_channels} input channels, but InstructPix2Pix feeds \
                 {latent_channels} latent + {image_channels} image channels = {}; load an \
                 InstructPix2Pix checkpoint (its UNet has 8 input channels)",
                latent_channels + image_channels
            ),
        ));
    }
    Ok(())
}

/// diffusers' `prepare_image_latents`: the image's latent mode (not scaled by the VAE's
/// `scaling_factor`, as the model was trained), repeated to the batch; under guidance
/// `[image, image, zeros]` for the text, image-only and unconditional branches.
fn prepare_image_latents(
    c: &SdModels<'_>,
    image: Tensor<4>,
    batch: usize,
    do_cfg: bool,
) -> Result<Tensor<4>> {
    let dtype = unet_dtype(c.unet);
    let latents = if image.dims()[1] == c.vae.config().latent_channels {
        image
    } else {
        c.vae
            .encode(cast_like_model(image, vae_dtype(c.vae)))?
            .mode()
    };
    let latents = tile_to_batch(cast_like_model(latents, dtype), batch, "image")?;
    Ok(if do_cfg {
        let zeros = latents.zeros_like();
        Tensor::cat(vec![latents.clone(), latents, zeros], 0)
    } else {
        latents
    })
}

fn instruct_pix2pix(
    c: SdModels<'_>,
    text: TextModels<'_>,
    mut args: StableDiffusionInstructPix2PixArgs<'_>,
) -> Result<ImagePipelineOutput> {
    let device = c.device()?;
    let do_cfg = check_guidance(args.guidance_scale, args.image_guidance_scale)?;
    let image = args.image.take().ok_or_else(|| {
        Error::invalid_argument("image", "InstructPix2Pix needs the image to edit")
    })?;
    if args.num_images_per_prompt == 0 {
        return Err(Error::invalid_argument(
            "num_images_per_prompt",
            "must be at least 1",
        ));
    }
    let latent_channels = c.vae.config().latent_channels;
    check_unet_channels(c.unet, latent_channels, latent_channels)?;

    let inputs = PromptInputs {
        prompt: &args.prompt,
        negative_prompt: args.negative_prompt.as_deref(),
        prompt_embeds: args.prompt_embeds.take(),
        negative_prompt_embeds: args.negative_prompt_embeds.take(),
        clip_skip: None,
    };
    let batch = inputs.batch_size()? * args.num_images_per_prompt;
    let (positive, negative) = encode_prompt(
        text.tokenizer,
        text.text_encoder,
        inputs,
        args.num_images_per_prompt,
        do_cfg,
        &device,
    )?;
    // Branch order of the batch: [instruction, image only, unconditional].
    let prompt_embeds = match negative {
        Some(negative) => Tensor::cat(vec![positive, negative.clone(), negative], 0),
        None => positive,
    };
    let dtype = unet_dtype(c.unet);
    let prompt_embeds = cast_like_model(prompt_embeds, dtype);
    let mut generators = args.generator.instantiate(batch)?;

    let f = c.vae_scale_factor();
    let image = preprocess(
        &VaeImageProcessor::new(f),
        &image,
        None,
        Some(latent_channels),
        "image",
        &device,
    )?;
    retrieve_timesteps(c.scheduler, args.num_inference_steps, None, None)?;
    let timesteps = c.scheduler.timesteps().to_vec();
    let image_latents = prepare_image_latents(&c, image, batch, do_cfg)?;
    let [_, _, h, w] = image_latents.dims();

    let shape = [batch, latent_channels, h, w];
    let latents = match args.latents.take() {
        Some(l) if l.dims() != shape => {
            return Err(Error::invalid_argument(
                "latents",
                format!(
                    "shape {:?}, expected {shape:?} for a {}x{} image",
                    l.dims(),
                    h * f,
                    w * f
                ),
            ));
        }
        Some(l) => cast_like_model(l, dtype),
        None => randn_latents(shape, &mut generators, &device, dtype)?,
    };
    let latents = latents.mul_scalar(c.scheduler.init_noise_sigma());

    let (latents, interrupted) = Denoise {
        unet: c.unet,
        scheduler: c.scheduler,
        timesteps,
        prompt_embeds,
        image_latents,
        do_cfg,
        guidance_scale: args.guidance_scale,
        image_guidance_scale: args.image_guidance_scale,
        eta: args.eta,
        generators: &mut generators,
        callback: args.callback.as_mut(),
        progress: args.progress,
    }
    .run(latents)?;
    decode_latents(c.vae, f, latents, args.output_type, interrupted)
}

/// The InstructPix2Pix denoising loop: the Stable Diffusion loop with a three-branch batch and
/// the image latents concatenated after the scheduler's input scaling.
struct Denoise<'a, 'cb> {
    unet: &'a UNet2DConditionModel,
    scheduler: &'a mut diffusion_schedulers::AnyScheduler,
    timesteps: Vec<f64>,
    prompt_embeds: Tensor<3>,
    image_latents: Tensor<4>,
    do_cfg: bool,
    guidance_scale: f64,
    image_guidance_scale: f64,
    eta: f64,
    generators: &'a mut [diffusion_core::TorchGenerator],
    callback: Option<&'a mut StepCallback<'cb>>,
    progress: bool,
}

impl Denoise<'_, '_> {
    fn run(mut self, mut latents: Tensor<4>) -> Result<(Tensor<4>, bool)> {
        let device = latents.device();
        let shape = latents.dims();
        let batch = shape[0];
        let kind = self.scheduler.kind();
        let (takes_eta, takes_generator) = (kind.step_takes_eta(), kind.step_takes_generator());
        let n = self.timesteps.len();
        let bar = progress_bar(n, self.progress);
        let mut interrupted = false;
        for (i, &t) in self.timesteps.iter().enumerate() {
            let model_input = if self.do_cfg {
                Tensor::cat(vec![latents.clone(); 3], 0)
            } else {
                latents.clone()
            };
            let model_input = self.scheduler.scale_model_input(model_input, t)?;
            let model_input = Tensor::cat(vec![model_input, self.image_latents.clone()], 1);
            let timestep = Tensor::<1>::from_floats([t as f32], &device);
            let noise_pred = self.unet.forward_with(
                model_input,
                timestep,
                self.prompt_embeds.clone(),
                UNet2DConditionOptions::default(),
            )?;
            let noise_pred = if self.do_cfg {
                let text = noise_pred.clone().narrow(0, 0, batch);
                let image = noise_pred.clone().narrow(0, batch, batch);
                let uncond = noise_pred.narrow(0, 2 * batch, batch);
                let toward_text = text.sub(image.clone()).mul_scalar(self.guidance_scale);
                let toward_image = image
                    .sub(uncond.clone())
                    .mul_scalar(self.image_guidance_scale);
                uncond.add(toward_text).add(toward_image)
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

#[cfg(test)]
mod tests {
    use super::check_guidance;

    #[test]
    fn guidance_follows_diffusers_do_classifier_free_guidance() {
        assert!(check_guidance(7.5, 1.5).unwrap());
        assert!(check_guidance(7.5, 1.0).unwrap());
        assert!(!check_guidance(1.0, 1.5).unwrap());
        assert!(check_guidance(7.5, 0.5).is_err());
        assert!(check_guidance(f64::NAN, 1.5).is_err());
        assert!(check_guidance(7.5, f64::INFINITY).is_err());
    }
}
