//! `CycleDiffusionPipeline` (diffusers' `pipelines/deprecated/stable_diffusion_variants/
//! pipeline_cycle_diffusion.py`): zero-shot image editing with a text-to-image model (Wu & De la
//! Torre 2022, "Unifying Diffusion Models' Latent Space").
//!
//! The image is described twice: by a *source* prompt (what it shows) and a target prompt (what
//! it should show). A source branch walks the DDIM posterior `q(x_{t-1} | x_t, x_0)` from the
//! noised image towards the clean one; at every step the DPM-Encoder recovers the Gaussian noise
//! that takes the source branch's model prediction to that posterior sample, and the target
//! branch takes its own DDIM step with exactly that noise. Both branches share their noise, so
//! the target keeps what the prompts do not change.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_loaders::HubOptions;
use diffusion_models::{ModelMixin, UNet2DConditionOptions};
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DDIMScheduler, Scheduler, StepOptions,
};

use crate::pipeline_utils::{
    Generators, ImagePipelineOutput, StepCallback, after_step, progress_bar,
};
use crate::stable_diffusion::StableDiffusionComponents;
use crate::stable_diffusion::denoise::{
    cast_like_model, check_strength, decode_latents, encode_vae_image, randn_latents,
    retrieve_timesteps, tile_to_batch, timesteps_for_strength, unet_dtype,
};
use crate::stable_diffusion::image_input::{PipelineImageInput, preprocess};
use crate::stable_diffusion::prompt::{PromptInputs, encode_prompt};

/// Arguments of [`CycleDiffusionPipeline::call`], diffusers' `CycleDiffusionPipeline.__call__`
/// keyword arguments with their defaults.
pub struct CycleDiffusionArgs<'a> {
    /// The target prompts: what the edited image should show (one string or a list); empty
    /// when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// The source prompts: what the input image shows, one per target prompt. Required.
    pub source_prompt: Vec<String>,
    /// The image(s) to edit; its size (rounded down to the VAE scale factor) is the output
    /// size. A tensor with the VAE's latent channels is used as latents.
    pub image: Option<PipelineImageInput>,
    /// How much of the schedule to run, in (0, 1] (default 0.8): the image is noised to the
    /// first timestep of the last `strength` part.
    pub strength: f64,
    /// Denoising steps of the full schedule (default 50).
    pub num_inference_steps: usize,
    /// Classifier-free guidance weight of the target branch (default 7.5); guidance (for both
    /// branches) is on when it is above 1.
    pub guidance_scale: f64,
    /// Classifier-free guidance weight of the source branch (default 1: its text prediction
    /// only).
    pub source_guidance_scale: f64,
    /// Images per prompt (default 1).
    pub num_images_per_prompt: usize,
    /// DDIM's `eta` (default 0.1): the share of fresh noise in each posterior step. Must be
    /// above 0, since the noise is recovered by dividing by it.
    pub eta: f64,
    /// Randomness: one seed, one per image, or random.
    pub generator: Generators,
    /// Precomputed target prompt embeddings (then `prompt` stays empty).
    pub prompt_embeds: Option<Tensor<3>>,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// Skip this many final CLIP layers for both prompts' embeddings.
    pub clip_skip: Option<usize>,
    /// Called after every step with the target latents (diffusers' `callback`).
    pub callback: Option<StepCallback<'a>>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for CycleDiffusionArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            source_prompt: Vec::new(),
            image: None,
            strength: 0.8,
            num_inference_steps: 50,
            guidance_scale: 7.5,
            source_guidance_scale: 1.0,
            num_images_per_prompt: 1,
            // diffusers' signature default (its docstring says 0.0, which the maths forbids).
            eta: 0.1,
            generator: Generators::Random,
            prompt_embeds: None,
            output_type: OutputType::Pil,
            clip_skip: None,
            callback: None,
            progress: true,
        }
    }
}

impl std::fmt::Debug for CycleDiffusionArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CycleDiffusionArgs")
            .field("prompt", &self.prompt)
            .field("source_prompt", &self.source_prompt)
            .field("strength", &self.strength)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("guidance_scale", &self.guidance_scale)
            .field("source_guidance_scale", &self.source_guidance_scale)
            .field("num_images_per_prompt", &self.num_images_per_prompt)
            .field("eta", &self.eta)
            .field("generator", &self.generator)
            .field("output_type", &self.output_type)
            .field("clip_skip", &self.clip_skip)
            .finish_non_exhaustive()
    }
}

/// diffusers' `CycleDiffusionPipeline`: edit an image by swapping the prompt that describes it,
/// on Stable Diffusion 1.x / 2.x components with a [`DDIMScheduler`].
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::load_image;
/// use diffusion_pipelines::{CycleDiffusionArgs, CycleDiffusionPipeline, Generators};
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe =
///     CycleDiffusionPipeline::from_pretrained("CompVis/stable-diffusion-v1-4", &Device::default())?;
/// pipe.components.set_scheduler("DDIMScheduler")?;
/// let out = pipe.call(CycleDiffusionArgs {
///     source_prompt: vec!["An astronaut riding a horse".into()],
///     prompt: vec!["An astronaut riding an elephant".into()],
///     image: Some(load_image("horse.png")?.into()),
///     num_inference_steps: 100,
///     strength: 0.8,
///     guidance_scale: 2.0,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct CycleDiffusionPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler` (a DDIM one).
    pub components: StableDiffusionComponents,
}

impl AsRef<StableDiffusionComponents> for CycleDiffusionPipeline {
    fn as_ref(&self) -> &StableDiffusionComponents {
        &self.components
    }
}

impl CycleDiffusionPipeline {
    /// Load a Stable Diffusion 1.x / 2.x folder or Hub id.
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

    /// Build from loaded components. The scheduler must be a [`DDIMScheduler`] by the time
    /// [`Self::call`] runs (`components.set_scheduler("DDIMScheduler")` converts another one).
    pub fn from_parts(components: StableDiffusionComponents) -> Self {
        Self { components }
    }

    /// Share another pipeline's components without copying weights.
    pub fn from_pipe(other: &impl AsRef<StableDiffusionComponents>) -> Self {
        Self::from_parts(other.as_ref().clone())
    }

    /// Edit an image: `source_prompt` describes it, `prompt` what it should become.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: a missing `source_prompt` or one
    /// whose count differs from the prompts', `prompt_embeds` shaped unlike the source
    /// prompt's embeddings, a missing `image` (or an empty list, or a tensor with neither 3
    /// nor the VAE's latent channels), `strength`
    /// outside (0, 1] or leaving no step, `eta` not above 0 (the noise is recovered by dividing
    /// by it) or too large for a step, a non-finite guidance scale, zero images or steps, a
    /// seed list that does not match the batch (`generator`), an image batch that cannot be
    /// repeated to the batch, and a scheduler other than [`DDIMScheduler`] (`scheduler`); as
    /// [`crate::StableDiffusionPipeline::call`] for the text arguments.
    pub fn call(&mut self, mut args: CycleDiffusionArgs<'_>) -> Result<ImagePipelineOutput> {
        check_args(&args)?;
        let c = &mut self.components;
        ensure_ddim(&mut c.scheduler)?;
        let device = c.device()?;
        let image = args
            .image
            .take()
            .ok_or_else(|| Error::invalid_argument("image", "CycleDiffusion needs an image"))?;
        let n = args.num_images_per_prompt;
        // diffusers' `do_classifier_free_guidance`: the target's scale decides for both branches.
        let do_cfg = args.guidance_scale > 1.0;
        let dtype = unet_dtype(&c.unet);

        let target = PromptInputs {
            prompt: &args.prompt,
            negative_prompt: None,
            prompt_embeds: args.prompt_embeds.take(),
            negative_prompt_embeds: None,
            clip_skip: args.clip_skip,
        };
        let prompts = target.batch_size()?;
        if args.source_prompt.len() != prompts {
            return Err(Error::invalid_argument(
                "source_prompt",
                format!(
                    "{} source prompts for {prompts} prompts: give one source prompt per prompt",
                    args.source_prompt.len()
                ),
            ));
        }
        let (embeds, negative) =
            encode_prompt(&c.tokenizer, &c.text_encoder, target, n, do_cfg, &device)?;
        let source = PromptInputs {
            prompt: &args.source_prompt,
            negative_prompt: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            clip_skip: args.clip_skip,
        };
        let (source_embeds, source_negative) =
            encode_prompt(&c.tokenizer, &c.text_encoder, source, n, do_cfg, &device)?;
        if embeds.dims() != source_embeds.dims() {
            return Err(Error::invalid_argument(
                "prompt_embeds",
                format!(
                    "shape {:?} differs from the source prompt's embeddings {:?}: both \
                     branches run in one UNet batch",
                    embeds.dims(),
                    source_embeds.dims()
                ),
            ));
        }
        let batch = prompts * n;
        // The UNet sees [source, target] (no guidance) or, per diffusers' stacking,
        // [source uncond, target uncond, source text, target text]: one call for both branches.
        let unet_embeds = match (negative, source_negative) {
            (Some(negative), Some(source_negative)) => {
                Tensor::cat(vec![source_negative, negative, source_embeds, embeds], 0)
            }
            _ => Tensor::cat(vec![source_embeds, embeds], 0),
        };
        let unet_embeds = cast_like_model(unet_embeds, dtype);
        let mut generators = args.generator.instantiate(batch)?;

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

        let steps = retrieve_timesteps(&mut c.scheduler, args.num_inference_steps, None, None)?;
        let timesteps = timesteps_for_strength(&mut c.scheduler, steps, args.strength)?;

        // prepare_latents: the clean latents, and the image noised to the first timestep.
        let init_latents = if image.dims()[1] == latent_channels {
            image
        } else {
            let image = if generators.len() > 1 {
                tile_to_batch(image, batch, "image")?
            } else {
                image
            };
            encode_vae_image(&c.vae, image, &mut generators)?
        };
        let clean_latents = tile_to_batch(cast_like_model(init_latents, dtype), batch, "image")?;
        let noise = randn_latents(clean_latents.dims(), &mut generators, &device, dtype)?;
        let mut latents =
            c.scheduler
                .add_noise(clean_latents.clone(), noise, &vec![timesteps[0]; batch])?;
        let mut source_latents = latents.clone();

        let bar = progress_bar(timesteps.len(), args.progress);
        let mut interrupted = false;
        let num_steps = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let branches = if do_cfg {
                vec![
                    source_latents.clone(),
                    latents.clone(),
                    source_latents.clone(),
                    latents.clone(),
                ]
            } else {
                vec![source_latents.clone(), latents.clone()]
            };
            let model_input = c.scheduler.scale_model_input(Tensor::cat(branches, 0), t)?;
            let timestep = Tensor::<1>::from_floats([t as f32], &device);
            let pred = c.unet.forward_with(
                model_input,
                timestep,
                unet_embeds.clone(),
                UNet2DConditionOptions::default(),
            )?;
            let chunk = |k: usize| pred.clone().narrow(0, k * batch, batch);
            let (source_noise_pred, noise_pred) = if do_cfg {
                (
                    guide(chunk(0), chunk(2), args.source_guidance_scale),
                    guide(chunk(1), chunk(3), args.guidance_scale),
                )
            } else {
                (chunk(0), chunk(1))
            };

            let ddim = c
                .scheduler
                .as_ddim()
                .ok_or_else(|| not_ddim(&c.scheduler))?;
            let prev_source_latents = posterior_sample(
                ddim,
                &source_latents,
                t,
                &clean_latents,
                &mut generators,
                args.eta,
            )?;
            let variance_noise = compute_noise(
                ddim,
                &prev_source_latents,
                &source_latents,
                t,
                source_noise_pred,
                args.eta,
            )?;
            source_latents = prev_source_latents;
            let options = StepOptions {
                eta: Some(args.eta),
                variance_noise: Some(variance_noise),
                ..StepOptions::default()
            };
            latents = c
                .scheduler
                .step(noise_pred, t, latents, options)?
                .prev_sample;

            bar.inc(1);
            let callback = args.callback.as_mut();
            if after_step(callback, i, num_steps, t, &mut latents)? {
                interrupted = true;
                break;
            }
        }
        bar.finish_and_clear();
        decode_latents(&c.vae, f, latents, args.output_type, interrupted)
    }
}

/// The checks that need no model, so a mistake costs nothing.
fn check_args(args: &CycleDiffusionArgs<'_>) -> Result<()> {
    if args.source_prompt.is_empty() {
        return Err(Error::invalid_argument(
            "source_prompt",
            "CycleDiffusion needs a source prompt describing the input image",
        ));
    }
    if args.image.is_none() {
        return Err(Error::invalid_argument(
            "image",
            "CycleDiffusion needs an image",
        ));
    }
    check_strength(args.strength)?;
    if !(args.eta > 0.0 && args.eta.is_finite()) {
        return Err(Error::invalid_argument(
            "eta",
            format!(
                "{} must be above 0: CycleDiffusion recovers each step's noise by dividing by \
                 eta (eta = 0 would make the source branch deterministic, with no noise to \
                 carry over to the target; diffusers' default is 0.1)",
                args.eta
            ),
        ));
    }
    for (name, value) in [
        ("guidance_scale", args.guidance_scale),
        ("source_guidance_scale", args.source_guidance_scale),
    ] {
        if !value.is_finite() {
            return Err(Error::invalid_argument(
                name,
                format!("{value} is not a finite number"),
            ));
        }
    }
    if args.num_images_per_prompt == 0 {
        return Err(Error::invalid_argument(
            "num_images_per_prompt",
            "must be at least 1",
        ));
    }
    Ok(())
}

fn not_ddim(scheduler: &AnyScheduler) -> Error {
    Error::invalid_argument(
        "scheduler",
        format!(
            "CycleDiffusion needs a DDIMScheduler, got {}: its posterior sampling and noise \
             recovery are DDIM's equations (use components.set_scheduler(\"DDIMScheduler\"))",
            scheduler.kind().class_name()
        ),
    )
}

/// Refuse schedulers other than DDIM and, as diffusers' constructor does, run a DDIM config
/// with `steps_offset` other than 1 as if it had 1.
fn ensure_ddim(scheduler: &mut AnyScheduler) -> Result<()> {
    let Some(ddim) = scheduler.as_ddim() else {
        return Err(not_ddim(scheduler));
    };
    if ddim.config().steps_offset != 1 {
        log::warn!(
            "the DDIM scheduler config has steps_offset {}; CycleDiffusion uses 1, as diffusers",
            ddim.config().steps_offset
        );
        let mut file = ddim.config_file().clone();
        file.config.steps_offset = 1;
        *scheduler = AnyScheduler::Ddim(DDIMScheduler::from_config_file(file)?);
    }
    Ok(())
}

/// `uncond + scale * (text - uncond)`.
fn guide(uncond: Tensor<4>, text: Tensor<4>, scale: f64) -> Tensor<4> {
    uncond.clone().add(text.sub(uncond).mul_scalar(scale))
}

/// The float32 scalars of a DDIM step from `t`, as diffusers computes them on 0-d tensors.
struct StepScalars {
    prev_t: f64,
    alpha_prod_t: f32,
    alpha_prod_prev: f32,
    variance: f32,
    std_dev: f32,
    /// `sqrt(1 - alpha_prod_prev - std_dev^2)`.
    direction: f32,
}

impl StepScalars {
    fn new(ddim: &DDIMScheduler, t: f64, eta: f64) -> Result<Self> {
        let k = ddim.num_inference_steps().ok_or_else(|| {
            Error::invalid_argument("num_inference_steps", "set_timesteps was not called")
        })?;
        let prev_t = t - (ddim.config().num_train_timesteps / k) as f64;
        let alpha_prod_t = ddim.noise_schedule().alpha_cumprod_at(t)? as f32;
        let alpha_prod_prev = if prev_t >= 0.0 {
            ddim.noise_schedule().alpha_cumprod_at(prev_t)? as f32
        } else {
            ddim.final_alpha_cumprod() as f32
        };
        let variance = ddim.variance(t, prev_t)? as f32;
        let std_dev = eta as f32 * variance.sqrt();
        let direction_sq = 1.0 - alpha_prod_prev - std_dev * std_dev;
        if direction_sq < 0.0 {
            return Err(Error::invalid_argument(
                "eta",
                format!(
                    "{eta} is too large for the step from {t}: the noise would exceed the \
                     variance left at the target timestep"
                ),
            ));
        }
        Ok(Self {
            prev_t,
            alpha_prod_t,
            alpha_prod_prev,
            variance,
            std_dev,
            direction: direction_sq.sqrt(),
        })
    }
}

/// diffusers' `posterior_sample`: a draw from the DDIM posterior `q(x_{t-1} | x_t, x_0)` of
/// the source branch given the clean latents (the clean latents themselves at the last step).
///
/// # Shapes
/// - `latents`, `clean_latents`, output: `[B, C, H, W]`
fn posterior_sample(
    ddim: &DDIMScheduler,
    latents: &Tensor<4>,
    t: f64,
    clean_latents: &Tensor<4>,
    generators: &mut [TorchGenerator],
    eta: f64,
) -> Result<Tensor<4>> {
    let s = StepScalars::new(ddim, t, eta)?;
    if s.prev_t <= 0.0 {
        return Ok(clean_latents.clone());
    }
    let e_t = latents
        .clone()
        .sub(clean_latents.clone().mul_scalar(s.alpha_prod_t.sqrt()))
        .div_scalar((1.0 - s.alpha_prod_t).sqrt());
    let dir_xt = e_t.mul_scalar(s.direction);
    let dtype = cast_dtype(clean_latents);
    let noise = randn_latents(clean_latents.dims(), generators, &latents.device(), dtype)?
        .mul_scalar(s.std_dev);
    Ok(clean_latents
        .clone()
        .mul_scalar(s.alpha_prod_prev.sqrt())
        .add(dir_xt)
        .add(noise))
}

/// diffusers' `compute_noise` (the DPM-Encoder): the noise that takes the DDIM step of
/// `noise_pred` from `latents` at `t` exactly to `prev_latents`.
///
/// # Shapes
/// - `prev_latents`, `latents`, `noise_pred`, output: `[B, C, H, W]`
fn compute_noise(
    ddim: &DDIMScheduler,
    prev_latents: &Tensor<4>,
    latents: &Tensor<4>,
    t: f64,
    noise_pred: Tensor<4>,
    eta: f64,
) -> Result<Tensor<4>> {
    let s = StepScalars::new(ddim, t, eta)?;
    let beta_prod_t = 1.0 - s.alpha_prod_t;
    let mut pred_original = latents
        .clone()
        .sub(noise_pred.clone().mul_scalar(beta_prod_t.sqrt()))
        .div_scalar(s.alpha_prod_t.sqrt());
    if ddim.config().clip_sample {
        // diffusers clamps to [-1, 1] here whatever clip_sample_range says.
        pred_original = pred_original.clamp(-1.0, 1.0);
    }
    let direction = noise_pred.mul_scalar(s.direction);
    let denominator = s.variance.sqrt() * eta as f32;
    let residual = prev_latents.clone().sub(
        pred_original
            .mul_scalar(s.alpha_prod_prev.sqrt())
            .add(direction),
    );
    if denominator == 0.0 {
        // A step with no variance (set_alpha_to_one at the last step) adds std_dev = 0 times
        // this noise; diffusers divides by zero and gets NaN, zeros give the same step.
        return Ok(residual.zeros_like());
    }
    Ok(residual.div_scalar(denominator))
}

fn cast_dtype(x: &Tensor<4>) -> diffusion_core::burn::tensor::FloatDType {
    x.dtype().into()
}
