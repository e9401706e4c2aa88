//! `StableDiffusionXLPipeline`: text-to-image with SDXL base models.

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::HubOptions;
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{AddedCondKwargs, AutoencoderKL, ModelMixin};
use diffusion_schedulers::Scheduler;

use super::StableDiffusionXLComponents;
use super::prompt::{XLPromptInputs, encode_prompt};
use crate::pipeline_utils::{Generators, ImagePipelineOutput, StepCallback};
use crate::stable_diffusion::denoise::{
    DenoiseLoop, InpaintCondition, cast_like_model, check_size, randn_latents, retrieve_timesteps,
    unet_dtype, vae_dtype,
};

/// Arguments of [`StableDiffusionXLPipeline::call`], diffusers'
/// `StableDiffusionXLPipeline.__call__` keyword arguments with their defaults.
pub struct StableDiffusionXLArgs<'a> {
    /// The prompts for the first text encoder; empty when `prompt_embeds` is given.
    pub prompt: Vec<String>,
    /// The prompts for the second text encoder (`None`: the same as `prompt`).
    pub prompt_2: Option<Vec<String>>,
    /// Height in pixels, a multiple of 8; `None` is `unet.sample_size * vae_scale_factor`.
    pub height: Option<usize>,
    /// Width in pixels, a multiple of 8; `None` as for `height`.
    pub width: Option<usize>,
    /// Denoising steps (default 50).
    pub num_inference_steps: usize,
    /// Custom timesteps, for schedulers that take them.
    pub timesteps: Option<Vec<f64>>,
    /// Custom sigmas, for schedulers that take them.
    pub sigmas: Option<Vec<f64>>,
    /// Stop at this fraction of the schedule, in (0, 1), leaving the rest to a refiner
    /// (`denoising_end`; use `output_type: Latent` then).
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
    /// Initial latents `[B * n, 4, H / f, W / f]` instead of fresh noise.
    pub latents: Option<Tensor<4>>,
    /// Precomputed prompt embeddings `[B, S, D1 + D2]` (with `pooled_prompt_embeds`).
    pub prompt_embeds: Option<Tensor<3>>,
    /// Precomputed negative embeddings.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// Precomputed pooled embeddings `[B, projection_dim]`.
    pub pooled_prompt_embeds: Option<Tensor<2>>,
    /// Precomputed negative pooled embeddings.
    pub negative_pooled_prompt_embeds: Option<Tensor<2>>,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// Rescale of the guided prediction (default 0: off).
    pub guidance_rescale: f64,
    /// Micro-conditioning: the original image size `(height, width)`; `None` is the output size.
    pub original_size: Option<(usize, usize)>,
    /// Micro-conditioning: the crop's top-left corner `(top, left)` (default `(0, 0)`).
    pub crops_coords_top_left: (usize, usize),
    /// Micro-conditioning: the target size; `None` is the output size.
    pub target_size: Option<(usize, usize)>,
    /// Negative micro-conditioning (used with `negative_target_size`).
    pub negative_original_size: Option<(usize, usize)>,
    /// Negative crop corner (default `(0, 0)`).
    pub negative_crops_coords_top_left: (usize, usize),
    /// Negative target size (used with `negative_original_size`).
    pub negative_target_size: Option<(usize, usize)>,
    /// Skip this many more final layers of both encoders (the penultimate one is the default).
    pub clip_skip: Option<usize>,
    /// IP-Adapter images, embeddings and masks (`ip_adapter_image`, `ip_adapter_image_embeds`,
    /// `ip_adapter_masks`); none by default.
    pub ip_adapter: crate::IPAdapterArgs,
    /// `callback_on_step_end`.
    pub callback: Option<StepCallback<'a>>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for StableDiffusionXLArgs<'_> {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            prompt_2: None,
            height: None,
            width: None,
            num_inference_steps: 50,
            timesteps: None,
            sigmas: None,
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
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            clip_skip: None,
            ip_adapter: crate::IPAdapterArgs::default(),
            callback: None,
            progress: true,
        }
    }
}

impl std::fmt::Debug for StableDiffusionXLArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionXLArgs")
            .field("prompt", &self.prompt)
            .field("prompt_2", &self.prompt_2)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("denoising_end", &self.denoising_end)
            .field("guidance_scale", &self.guidance_scale)
            .field("generator", &self.generator)
            .field("num_images_per_prompt", &self.num_images_per_prompt)
            .field("output_type", &self.output_type)
            .field("original_size", &self.original_size)
            .field("crops_coords_top_left", &self.crops_coords_top_left)
            .field("target_size", &self.target_size)
            .finish_non_exhaustive()
    }
}

/// diffusers' `StableDiffusionXLPipeline`: two text encoders whose penultimate hidden states
/// are joined, the second one's pooled embedding and the image size as extra UNet conditioning.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_pipelines::{Generators, StableDiffusionXLArgs, StableDiffusionXLPipeline};
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = StableDiffusionXLPipeline::from_pretrained(
///     "stabilityai/stable-diffusion-xl-base-1.0",
///     &Device::default(),
/// )?;
/// let out = pipe.call(StableDiffusionXLArgs {
///     prompt: vec!["an astronaut riding a green horse".into()],
///     num_inference_steps: 30,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StableDiffusionXLPipeline {
    /// `vae`, `text_encoder`, `text_encoder_2`, `tokenizer`, `tokenizer_2`, `unet`,
    /// `scheduler`.
    pub components: StableDiffusionXLComponents,
}

impl AsRef<StableDiffusionXLComponents> for StableDiffusionXLPipeline {
    fn as_ref(&self) -> &StableDiffusionXLComponents {
        &self.components
    }
}

impl StableDiffusionXLPipeline {
    /// Load a diffusers SDXL folder or Hub id.
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

    /// Load an original-layout checkpoint file (`from_single_file`).
    ///
    /// # Errors
    /// As [`StableDiffusionXLComponents::from_single_file`].
    pub fn from_single_file(
        path: impl AsRef<std::path::Path>,
        options: &crate::single_file::SingleFilePipelineOptions,
        device: &Device,
    ) -> Result<Self> {
        StableDiffusionXLComponents::from_single_file(path, options, device).map(Self::from_parts)
    }

    /// Build from loaded components.
    pub fn from_parts(components: StableDiffusionXLComponents) -> Self {
        Self { components }
    }

    /// Share another pipeline's components without copying weights.
    pub fn from_pipe(other: &impl AsRef<StableDiffusionXLComponents>) -> Self {
        Self::from_parts(other.as_ref().clone())
    }

    /// Generate images from text.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument, as
    /// [`crate::StableDiffusionPipeline::call`], and for: prompt embeddings without pooled
    /// ones, `prompt_2` / negative prompt lists of another length, `denoising_end` outside
    /// (0, 1); a UNet whose added-embedding width does not fit the size conditioning and the
    /// pooled embedding (`unet`).
    pub fn call(&mut self, mut args: StableDiffusionXLArgs<'_>) -> Result<ImagePipelineOutput> {
        let c = &mut self.components;
        let device = c
            .unet
            .devices()
            .into_iter()
            .next()
            .ok_or_else(|| Error::invalid_argument("unet", "the model has no parameters"))?;
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
        if let Some(end) = args.denoising_end
            && !(end > 0.0 && end < 1.0)
        {
            return Err(Error::invalid_argument(
                "denoising_end",
                format!("{end} is outside (0, 1)"),
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

        retrieve_timesteps(
            &mut c.scheduler,
            args.num_inference_steps,
            args.timesteps.as_deref(),
            args.sigmas.as_deref(),
        )?;
        let mut timesteps = c.scheduler.timesteps().to_vec();

        let dtype = unet_dtype(&c.unet);
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

        // Size micro-conditioning.
        let projection_dim = c.text_encoder_2.config().projection_dim;
        let time_ids = |original: (usize, usize), crop: (usize, usize), target: (usize, usize)| {
            [original.0, original.1, crop.0, crop.1, target.0, target.1].map(|v| v as f32)
        };
        let positive = time_ids(
            args.original_size.unwrap_or((height, width)),
            args.crops_coords_top_left,
            args.target_size.unwrap_or((height, width)),
        );
        let negative = match (args.negative_original_size, args.negative_target_size) {
            (Some(o), Some(t)) => time_ids(o, args.negative_crops_coords_top_left, t),
            _ => positive,
        };
        let config = c.unet.config();
        let passed = config.addition_time_embed_dim.unwrap_or(0) * positive.len() + projection_dim;
        if config.projection_class_embeddings_input_dim != Some(passed) {
            return Err(Error::invalid_argument(
                "unet",
                format!(
                    "the UNet expects an added embedding of {:?} values, the size conditioning \
                     and pooled text embedding give {passed}",
                    config.projection_class_embeddings_input_dim
                ),
            ));
        }
        let (prompt_embeds, text_embeds, rows) = match embeddings.negative {
            Some((neg, neg_pooled)) => (
                Tensor::cat(vec![neg, embeddings.prompt_embeds], 0),
                Tensor::cat(vec![neg_pooled, embeddings.pooled], 0),
                vec![negative, positive],
            ),
            None => (embeddings.prompt_embeds, embeddings.pooled, vec![positive]),
        };
        // diffusers tiles the [negative, positive] pair (not each half) over the batch; the two
        // only differ with negative micro-conditioning, where this order is what it feeds.
        let mut ids = Vec::with_capacity(batch * rows.len() * 6);
        for _ in 0..batch {
            for row in &rows {
                ids.extend_from_slice(row);
            }
        }
        let time_ids =
            Tensor::<2>::from_data(TensorData::new(ids, [batch * rows.len(), 6]), &device);
        let added_cond = AddedCondKwargs {
            text_embeds: Some(cast_like_model(text_embeds, dtype)),
            time_ids: Some(cast_like_model(time_ids, dtype)),
            image_embeds: None,
        };

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

/// SDXL's decode: upcast a half-precision VAE that asks for it (`force_upcast`), undo the
/// latent normalisation (`latents_mean` / `latents_std` when the VAE has them, else
/// `scaling_factor`), decode, convert.
pub(crate) fn decode_xl(
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
    let config = vae.config().clone();
    let upcast;
    let vae = if vae_dtype(vae) == FloatDType::F16 && config.force_upcast {
        upcast = to_dtype(vae.clone(), FloatDType::F32)?;
        &upcast
    } else {
        vae
    };
    let latents = cast_like_model(latents, vae_dtype(vae));
    let device = latents.device();
    let z = match (&config.latents_mean, &config.latents_std) {
        (Some(mean), Some(std)) => {
            let channels = latents.dims()[1];
            if mean.len() != channels || std.len() != channels {
                return Err(Error::invalid_argument(
                    "vae",
                    format!("latents_mean / latents_std do not have {channels} values"),
                ));
            }
            let column = |v: &[f64]| {
                let data: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                cast_like_model(
                    Tensor::<4>::from_data(TensorData::new(data, [1, channels, 1, 1]), &device),
                    vae_dtype(vae),
                )
            };
            latents
                .mul(column(std))
                .div_scalar(config.scaling_factor)
                .add(column(mean))
        }
        _ => latents.div_scalar(config.scaling_factor),
    };
    let image = cast_like_model(vae.decode(z)?, FloatDType::F32);
    Ok(ImagePipelineOutput {
        images: processor.postprocess(image, output_type),
        interrupted,
    })
}
