//! `StableDiffusionControlNetPipeline`: text-to-image with Stable Diffusion 1.x / 2.x, steered by
//! a control image through a `ControlNetModel` whose residuals are added to the UNet's skip
//! connections and mid block.

use std::path::Path;

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::{HubOptions, resolve_model_dir};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{
    CLIPTextModel, CLIPTokenizer, ControlNetModel, ControlNetOptions, ModelMixin,
    UNet2DConditionModel, UNet2DConditionOptions,
};
use diffusion_schedulers::{AnyScheduler, Scheduler, StepOptions};

use crate::pipeline_utils::{
    Generators, ImagePipelineOutput, StepCallback, after_step, noise_source, progress_bar,
};
use crate::stable_diffusion::denoise::{
    cast_like_model, check_size, decode_latents, guidance_scale_embedding, randn_latents,
    retrieve_timesteps, unet_dtype,
};
use crate::stable_diffusion::folder::{FolderRules, component_options, load_unet_vae};
use crate::stable_diffusion::prompt::{
    ClipPromptEncoder, GuidedPrompt, PromptInputs, encode_for_unet_with, repeat_rows,
};
use crate::stable_diffusion::{
    PipelineImageInput, StableDiffusionComponents, image_input, load_image_encoder, variant_for,
};

/// What ControlNet pipeline folders hold: a Stable Diffusion folder plus one `ControlNetModel`
/// (a `MultiControlNetModel` is refused by its class).
const FOLDER_RULES: FolderRules<'static> = FolderRules {
    family: "ControlNet",
    pipeline_classes: &["StableDiffusionControlNetPipeline"],
    required: &[
        ("unet", &["UNet2DConditionModel"]),
        ("vae", &["AutoencoderKL"]),
        ("text_encoder", &["CLIPTextModel"]),
        ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
        ("scheduler", &[]),
        ("controlnet", &["ControlNetModel"]),
    ],
    known: &[
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "controlnet",
    ],
    optional: &["safety_checker", "feature_extractor", "image_encoder"],
    not_loaded: &["safety_checker"],
    not_loaded_note: "this port runs no safety checker",
    component_kind: "a Stable Diffusion ControlNet component",
};

/// Arguments of [`StableDiffusionControlNetPipeline::call`]: diffusers'
/// `StableDiffusionControlNetPipeline.__call__` keyword arguments with their defaults.
pub struct StableDiffusionControlNetArgs<'a> {
    /// The prompts, one image batch each; empty when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// What to steer away from, one per prompt; `None` is the empty prompt.
    pub negative_prompt: Option<Vec<String>>,
    /// Precomputed prompt embeddings `[B, S, cross_attention_dim]` instead of `prompt`.
    pub prompt_embeds: Option<Tensor<3>>,
    /// Precomputed negative embeddings, shaped as `prompt_embeds`.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// The control image (`image`, required): one image for every prompt, or one per prompt.
    /// Images are resized to `height` x `width` and taken in `[0, 1]` (not normalised); a
    /// tensor must be `[B, 3, H, W]` in `[0, 1]` at the target size.
    pub image: Option<PipelineImageInput>,
    /// Image height in pixels; `None` is the control image's, rounded down to a multiple of the
    /// VAE scale factor. The result must be a multiple of 8.
    pub height: Option<usize>,
    /// Image width in pixels; `None` as for `height`.
    pub width: Option<usize>,
    /// Denoising steps (default 50); ignored when `timesteps` or `sigmas` is given.
    pub num_inference_steps: usize,
    /// Custom timesteps, for schedulers that take them.
    pub timesteps: Option<Vec<f64>>,
    /// Custom sigmas, for schedulers that take them.
    pub sigmas: Option<Vec<f64>>,
    /// Classifier-free guidance weight (default 7.5); guidance is off at 1 or below.
    pub guidance_scale: f64,
    /// DDIM's `eta` (default 0); passed only to schedulers that take it.
    pub eta: f64,
    /// Randomness: one seed, one seed per image, or random.
    pub generator: Generators,
    /// Initial latents `[B * num_images_per_prompt, C, H / f, W / f]` instead of fresh noise.
    pub latents: Option<Tensor<4>>,
    /// Images per prompt (default 1).
    pub num_images_per_prompt: usize,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// Multiplies the ControlNet's residuals (`controlnet_conditioning_scale`, default 1, at
    /// least 0).
    pub controlnet_conditioning_scale: f64,
    /// Run the ControlNet on the conditional half only and scale its residuals from 0.1 to 1
    /// (`guess_mode`, default false); always on for `global_pool_conditions` ControlNets.
    pub guess_mode: bool,
    /// Fraction of the steps after which the ControlNet starts acting (default 0).
    pub control_guidance_start: f64,
    /// Fraction of the steps after which it stops (default 1); above the start.
    pub control_guidance_end: f64,
    /// Skip this many final CLIP layers for the prompt embeddings (`clip_skip`).
    pub clip_skip: Option<usize>,
    /// `callback_on_step_end`: sees the latents after every step, may replace them or stop.
    pub callback: Option<StepCallback<'a>>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for StableDiffusionControlNetArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            negative_prompt: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            image: None,
            height: None,
            width: None,
            num_inference_steps: 50,
            timesteps: None,
            sigmas: None,
            guidance_scale: 7.5,
            eta: 0.0,
            generator: Generators::Random,
            latents: None,
            num_images_per_prompt: 1,
            output_type: OutputType::Pil,
            controlnet_conditioning_scale: 1.0,
            guess_mode: false,
            control_guidance_start: 0.0,
            control_guidance_end: 1.0,
            clip_skip: None,
            callback: None,
            progress: true,
        }
    }
}

impl std::fmt::Debug for StableDiffusionControlNetArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionControlNetArgs")
            .field("prompt", &self.prompt)
            .field("negative_prompt", &self.negative_prompt)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("guidance_scale", &self.guidance_scale)
            .field("generator", &self.generator)
            .field("num_images_per_prompt", &self.num_images_per_prompt)
            .field("output_type", &self.output_type)
            .field(
                "controlnet_conditioning_scale",
                &self.controlnet_conditioning_scale,
            )
            .field("guess_mode", &self.guess_mode)
            .field("control_guidance_start", &self.control_guidance_start)
            .field("control_guidance_end", &self.control_guidance_end)
            .finish_non_exhaustive()
    }
}

/// diffusers' `StableDiffusionControlNetPipeline` with one `ControlNetModel`.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::load_image;
/// use diffusion_loaders::HubOptions;
/// use diffusion_pipelines::{
///     Generators, StableDiffusionControlNetArgs, StableDiffusionControlNetPipeline,
/// };
///
/// # fn main() -> diffusion_core::Result<()> {
/// // A Stable Diffusion folder plus a separate ControlNet, as
/// // `from_pretrained(sd, controlnet=ControlNetModel.from_pretrained(...))`.
/// let mut pipe = StableDiffusionControlNetPipeline::from_pretrained_with_controlnet(
///     "stable-diffusion-v1-5/stable-diffusion-v1-5",
///     "lllyasviel/sd-controlnet-canny",
///     &HubOptions::default(),
///     &Device::default(),
/// )?;
/// let out = pipe.call(StableDiffusionControlNetArgs {
///     prompt: vec!["a bird, best quality".into()],
///     image: Some(load_image("canny_edges.png")?.into()),
///     num_inference_steps: 20,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # let _ = out;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StableDiffusionControlNetPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`.
    pub components: StableDiffusionComponents,
    /// The ControlNet (`controlnet`).
    pub controlnet: ControlNetModel,
}

impl AsRef<StableDiffusionComponents> for StableDiffusionControlNetPipeline {
    fn as_ref(&self) -> &StableDiffusionComponents {
        &self.components
    }
}

impl StableDiffusionControlNetPipeline {
    /// Load a `StableDiffusionControlNetPipeline` folder or Hub id (default [`HubOptions`]).
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(name_or_path, &HubOptions::default(), device)
    }

    /// Load a `StableDiffusionControlNetPipeline` folder or Hub id; `options.variant` picks
    /// `*.{variant}.safetensors` where a component has them.
    ///
    /// # Errors
    /// As [`resolve_model_dir`]; [`Error::NotFound`] without `model_index.json`;
    /// [`Error::Unsupported`] / [`Error::ConfigField`] naming `model_index.json` and the field
    /// for another pipeline class, a missing `controlnet` or one of another class
    /// (`MultiControlNetModel`); as the component loaders (strict weights).
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        let dir = resolve_model_dir(name_or_path, options)?;
        Self::load_dir(&dir, options, device)
    }

    /// Load a local `StableDiffusionControlNetPipeline` folder.
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    pub fn load_dir(dir: &Path, options: &HubOptions, device: &Device) -> Result<Self> {
        FOLDER_RULES.read_index(dir)?;
        let components = load_sd_parts(dir, options, device)?;
        let controlnet = load_controlnet_dir(&dir.join("controlnet"), options, device)?;
        Ok(Self::from_parts(components, controlnet))
    }

    /// A Stable Diffusion 1.x / 2.x folder or Hub id plus a separate ControlNet folder or Hub
    /// id (what diffusers users write as `StableDiffusionControlNetPipeline.from_pretrained(sd,
    /// controlnet=ControlNetModel.from_pretrained(cn))`). The Stable Diffusion folder may also
    /// be a ControlNet pipeline folder, whose own ControlNet is then replaced (and not loaded).
    ///
    /// # Errors
    /// As [`resolve_model_dir`] for either name; as
    /// [`StableDiffusionComponents::from_pretrained_with`] for the Stable Diffusion folder;
    /// as [`ControlNetModel::from_pretrained_with`] (a missing `config.json` or weights file is
    /// named) for the ControlNet.
    pub fn from_pretrained_with_controlnet(
        sd_name_or_path: &str,
        controlnet_name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        let controlnet_dir = resolve_model_dir(controlnet_name_or_path, options)?;
        let controlnet = load_controlnet_dir(&controlnet_dir, options, device)?;
        let dir = resolve_model_dir(sd_name_or_path, options)?;
        let is_controlnet_folder = dir.join("model_index.json").is_file()
            && diffusion_core::ModelIndex::load(dir.join("model_index.json"))?.class_name
                == "StableDiffusionControlNetPipeline";
        let components = if is_controlnet_folder {
            FOLDER_RULES.read_index(&dir)?;
            load_sd_parts(&dir, options, device)?
        } else {
            StableDiffusionComponents::load_dir(&dir, options, device)?
        };
        Ok(Self::from_parts(components, controlnet))
    }

    /// Build from loaded components and a ControlNet.
    pub fn from_parts(components: StableDiffusionComponents, controlnet: ControlNetModel) -> Self {
        Self {
            components,
            controlnet,
        }
    }

    /// Share another pipeline's components (`from_pipe(pipe, controlnet=...)`): the weights
    /// are not copied.
    pub fn from_pipe(
        other: &impl AsRef<StableDiffusionComponents>,
        controlnet: ControlNetModel,
    ) -> Self {
        Self::from_parts(other.as_ref().clone(), controlnet)
    }

    /// Cast every model, the ControlNet included, to `dtype`.
    ///
    /// # Errors
    /// As [`to_dtype`].
    pub fn to_dtype(self, dtype: FloatDType) -> Result<Self> {
        Ok(Self {
            components: self.components.to_dtype(dtype)?,
            controlnet: to_dtype(self.controlnet, dtype)?,
        })
    }

    /// Generate images from text, steered by the control image.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: a missing or empty control image
    /// (`image`), a control image batch that is neither 1 nor the prompt batch, a tensor image
    /// of the wrong channels or size, a height or width that is not a multiple of 8, a negative
    /// or non-finite `controlnet_conditioning_scale`, `control_guidance_start` below 0 or not
    /// below `control_guidance_end`, `control_guidance_end` above 1; and as
    /// [`crate::StableDiffusionPipeline::call`] for the prompt, steps, generator and latents
    /// arguments; as the models.
    pub fn call(
        &mut self,
        mut args: StableDiffusionControlNetArgs<'_>,
    ) -> Result<ImagePipelineOutput> {
        check_control_args(&args)?;
        let image = args
            .image
            .take()
            .ok_or_else(|| Error::invalid_argument("image", "a control image is required"))?;
        let c = &mut self.components;
        let device = folder_device(&c.unet)?;
        if args.num_images_per_prompt == 0 {
            return Err(Error::invalid_argument(
                "num_images_per_prompt",
                "must be at least 1",
            ));
        }
        let f = crate::stable_diffusion::folder::vae_scale_factor(&c.vae);
        let control = preprocess_control_image(&image, args.height, args.width, f, &device)?;
        let [image_batch, _, height, width] = control.dims();
        check_size(height, width)?;

        let guess_mode = args.guess_mode || self.controlnet.config().global_pool_conditions;
        let encoder = ClipPromptEncoder {
            tokenizer: &c.tokenizer,
            text_encoder: &c.text_encoder,
        };
        let inputs = PromptInputs {
            prompt: &args.prompt,
            negative_prompt: args.negative_prompt.as_deref(),
            prompt_embeds: args.prompt_embeds.take(),
            negative_prompt_embeds: args.negative_prompt_embeds.take(),
            clip_skip: args.clip_skip,
        };
        let prompt_batch = inputs.batch_size()?;
        let GuidedPrompt {
            embeds: prompt_embeds,
            do_cfg,
            batch,
        } = encode_for_unet_with(
            &encoder,
            &c.unet,
            inputs,
            args.num_images_per_prompt,
            args.guidance_scale,
            &device,
        )?;

        // prepare_image: one image for all, or one per prompt repeated per image.
        let control = if image_batch == 1 {
            Tensor::cat(vec![control; batch], 0)
        } else if image_batch == prompt_batch {
            repeat_rows(control, args.num_images_per_prompt)
        } else {
            return Err(Error::invalid_argument(
                "image",
                format!(
                    "{image_batch} control images for {prompt_batch} prompts; give one, or one \
                     per prompt"
                ),
            ));
        };
        let control = cast_like_model(control, controlnet_dtype(&self.controlnet));
        let control = if do_cfg && !guess_mode {
            Tensor::cat(vec![control.clone(), control], 0)
        } else {
            control
        };

        let mut generators = args.generator.instantiate(batch)?;
        let dtype = unet_dtype(&c.unet);
        retrieve_timesteps(
            &mut c.scheduler,
            args.num_inference_steps,
            args.timesteps.as_deref(),
            args.sigmas.as_deref(),
        )?;
        let timesteps = c.scheduler.timesteps().to_vec();

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

        let keep = controlnet_keep(
            timesteps.len(),
            args.control_guidance_start,
            args.control_guidance_end,
        );
        let (latents, interrupted) = ControlNetLoop {
            unet: &c.unet,
            controlnet: &self.controlnet,
            scheduler: &mut c.scheduler,
            timesteps,
            keep,
            prompt_embeds,
            control,
            do_cfg,
            guess_mode,
            guidance_scale: args.guidance_scale,
            conditioning_scale: args.controlnet_conditioning_scale,
            eta: args.eta,
            generators: &mut generators,
            callback: args.callback.as_mut(),
            progress: args.progress,
        }
        .run(latents)?;
        decode_latents(&c.vae, f, latents, args.output_type, interrupted)
    }
}

/// The argument checks of diffusers' `check_inputs` for the ControlNet arguments, plus a
/// finite, non-negative conditioning scale.
fn check_control_args(args: &StableDiffusionControlNetArgs<'_>) -> Result<()> {
    let scale = args.controlnet_conditioning_scale;
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(Error::invalid_argument(
            "controlnet_conditioning_scale",
            format!("{scale} is not a finite number of at least 0"),
        ));
    }
    let (start, end) = (args.control_guidance_start, args.control_guidance_end);
    if !(start.is_finite() && start >= 0.0) {
        return Err(Error::invalid_argument(
            "control_guidance_start",
            format!("{start} is below 0"),
        ));
    }
    if !(end.is_finite() && end <= 1.0) {
        return Err(Error::invalid_argument(
            "control_guidance_end",
            format!("{end} is above 1"),
        ));
    }
    if start >= end {
        return Err(Error::invalid_argument(
            "control_guidance_start",
            format!("{start} is not below control_guidance_end {end}"),
        ));
    }
    Ok(())
}

/// diffusers' `controlnet_keep`: 1 for the steps whose span `[i / n, (i + 1) / n]` lies within
/// `[start, end]`, else 0.
pub fn controlnet_keep(n: usize, start: f64, end: f64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let drop = (i as f64 / n as f64) < start || ((i + 1) as f64 / n as f64) > end;
            if drop { 0.0 } else { 1.0 }
        })
        .collect()
}

/// `control_image_processor.preprocess(image, height, width)`: RGB, resized, in `[0, 1]`.
fn preprocess_control_image(
    image: &PipelineImageInput,
    height: Option<usize>,
    width: Option<usize>,
    vae_scale_factor: usize,
    device: &Device,
) -> Result<Tensor<4>> {
    let processor = VaeImageProcessor {
        do_normalize: false,
        ..VaeImageProcessor::new(vae_scale_factor)
    };
    match image {
        PipelineImageInput::Images(images) => {
            if images.is_empty() {
                return Err(Error::invalid_argument("image", "no control image given"));
            }
            processor.preprocess(images, height, width, device)
        }
        PipelineImageInput::Tensor(t) => {
            let [_, _, h, w] = t.dims();
            let size = (height.unwrap_or(h), width.unwrap_or(w));
            image_input::preprocess(&processor, image, Some(size), None, "image", device)
        }
    }
}

fn controlnet_dtype(controlnet: &ControlNetModel) -> FloatDType {
    controlnet.conv_in.weight.val().dtype().into()
}

fn folder_device(unet: &UNet2DConditionModel) -> Result<Device> {
    crate::stable_diffusion::folder::unet_device(unet)
}

/// The Stable Diffusion components of a pipeline folder whose `model_index.json` was checked.
fn load_sd_parts(
    dir: &Path,
    options: &HubOptions,
    device: &Device,
) -> Result<StableDiffusionComponents> {
    let (unet, vae) = load_unet_vae(dir, options, device)?;
    let (text_encoder, _) = CLIPTextModel::from_pretrained_with(
        dir.join("text_encoder"),
        &component_options(dir, "text_encoder", options),
        device,
    )?;
    let tokenizer = CLIPTokenizer::from_pretrained(dir.join("tokenizer"))?;
    let scheduler = AnyScheduler::from_config_file(dir.join("scheduler"))?;
    let (image_encoder, feature_extractor) = load_image_encoder(
        dir,
        &component_options(dir, "image_encoder", options),
        device,
    )?;
    Ok(StableDiffusionComponents {
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        image_encoder,
        feature_extractor,
        lora: diffusion_loaders::LoraState::new(),
    })
}

/// A `ControlNetModel` folder (`config.json` + weights), strictly loaded.
fn load_controlnet_dir(
    dir: &Path,
    options: &HubOptions,
    device: &Device,
) -> Result<ControlNetModel> {
    let options = diffusion_models::PretrainedOptions {
        variant: variant_for(dir, options.variant.as_deref()),
        dtype: options.dtype,
        ..Default::default()
    };
    Ok(ControlNetModel::from_pretrained_with(dir, &options, device)?.0)
}

/// The denoising loop of the ControlNet pipeline: per step, the ControlNet's residuals (scaled
/// by `conditioning_scale * keep[i]`) go into the UNet, then guidance and the scheduler step.
struct ControlNetLoop<'a, 'cb> {
    unet: &'a UNet2DConditionModel,
    controlnet: &'a ControlNetModel,
    scheduler: &'a mut AnyScheduler,
    timesteps: Vec<f64>,
    keep: Vec<f64>,
    /// `[negative; positive]` with guidance, else the positive embeddings.
    prompt_embeds: Tensor<3>,
    /// The control images, doubled for guidance unless in guess mode.
    control: Tensor<4>,
    do_cfg: bool,
    guess_mode: bool,
    guidance_scale: f64,
    conditioning_scale: f64,
    eta: f64,
    generators: &'a mut [diffusion_core::TorchGenerator],
    callback: Option<&'a mut StepCallback<'cb>>,
    progress: bool,
}

impl ControlNetLoop<'_, '_> {
    fn run(mut self, mut latents: Tensor<4>) -> Result<(Tensor<4>, bool)> {
        let device = latents.device();
        let shape = latents.dims();
        let batch = shape[0];
        let timestep_cond = self.unet.config().time_cond_proj_dim.map(|dim| {
            guidance_scale_embedding(self.guidance_scale, batch, dim, &device)
                .cast(FloatDType::from(latents.dtype()))
        });
        let kind = self.scheduler.kind();
        let (takes_eta, takes_generator) = (kind.step_takes_eta(), kind.step_takes_generator());
        let n = self.timesteps.len();
        let bar = progress_bar(n, self.progress);
        let mut interrupted = false;
        // Guess mode under guidance runs the ControlNet on the conditional half only.
        let control_embeds = if self.guess_mode && self.do_cfg {
            self.prompt_embeds.clone().narrow(0, batch, batch)
        } else {
            self.prompt_embeds.clone()
        };
        for (i, &t) in self.timesteps.iter().enumerate() {
            let model_input = if self.do_cfg {
                Tensor::cat(vec![latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            let model_input = self.scheduler.scale_model_input(model_input, t)?;
            let control_input = if self.guess_mode && self.do_cfg {
                self.scheduler.scale_model_input(latents.clone(), t)?
            } else {
                model_input.clone()
            };
            let timestep = Tensor::<1>::from_floats([t as f32], &device);
            let residuals = self.controlnet.forward_with(
                control_input,
                timestep.clone(),
                control_embeds.clone(),
                self.control.clone(),
                ControlNetOptions {
                    conditioning_scale: self.conditioning_scale * self.keep[i],
                    guess_mode: self.guess_mode,
                    added_cond_kwargs: None,
                },
            )?;
            let (mut down, mut mid) = (
                residuals.down_block_res_samples,
                residuals.mid_block_res_sample,
            );
            if self.guess_mode && self.do_cfg {
                // The unconditional half gets no residuals.
                let with_zeros = |d: Tensor<4>| Tensor::cat(vec![d.zeros_like(), d], 0);
                down = down.into_iter().map(with_zeros).collect();
                mid = with_zeros(mid);
            }
            let options = UNet2DConditionOptions {
                timestep_cond: timestep_cond.clone(),
                down_block_additional_residuals: Some(down),
                mid_block_additional_residual: Some(mid),
                ..Default::default()
            };
            let noise_pred = self.unet.forward_with(
                model_input,
                timestep,
                self.prompt_embeds.clone(),
                options,
            )?;
            let noise_pred = if self.do_cfg {
                let uncond = noise_pred.clone().narrow(0, 0, batch);
                let text = noise_pred.narrow(0, batch, batch);
                uncond
                    .clone()
                    .add(text.sub(uncond).mul_scalar(self.guidance_scale))
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
    use super::*;

    #[test]
    fn keep_schedule_matches_diffusers() {
        // 5 steps, start 0.1, end 0.6: step 0 starts before 0.1, steps 3 and 4 end after 0.6.
        assert_eq!(controlnet_keep(5, 0.1, 0.6), vec![0.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(controlnet_keep(3, 0.0, 1.0), vec![1.0; 3]);
    }

    #[test]
    fn control_arguments_are_checked() {
        let bad = |f: fn(&mut StableDiffusionControlNetArgs<'static>), name: &str| {
            let mut args = StableDiffusionControlNetArgs::default();
            f(&mut args);
            match check_control_args(&args) {
                Err(Error::InvalidArgument { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{name}: {other:?}"),
            }
        };
        bad(
            |a| a.controlnet_conditioning_scale = -0.5,
            "controlnet_conditioning_scale",
        );
        bad(
            |a| a.controlnet_conditioning_scale = f64::NAN,
            "controlnet_conditioning_scale",
        );
        bad(
            |a| {
                a.control_guidance_start = 0.6;
                a.control_guidance_end = 0.6;
            },
            "control_guidance_start",
        );
        bad(
            |a| a.control_guidance_start = -0.1,
            "control_guidance_start",
        );
        bad(|a| a.control_guidance_end = 1.5, "control_guidance_end");
        assert!(check_control_args(&StableDiffusionControlNetArgs::default()).is_ok());
    }
}
