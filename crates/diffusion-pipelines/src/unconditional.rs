//! The denoising loop shared by DDPMPipeline and DDIMPipeline.

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{OutputType, VaeImageProcessor};
use diffusion_core::tensor::randn_tensor;
use diffusion_core::{Error, Result};
use diffusion_models::ModelMixin;
use diffusion_models::unets::unet_2d::{SampleSize, UNet2DModel};
use diffusion_schedulers::{AnyScheduler, Scheduler, StepOptions};

use crate::pipeline_utils::{
    Generators, ImagePipelineOutput, StepCallback, StepControl, StepInfo, noise_source,
    progress_bar,
};

/// Arguments of an unconditional pipeline call, as diffusers' `DDPMPipeline.__call__` and
/// `DDIMPipeline.__call__` keyword arguments.
pub struct UnconditionalArgs<'a> {
    /// Number of images (`batch_size`, default 1).
    pub batch_size: usize,
    /// Randomness (`generator`): a seed, one seed per image, or random.
    pub generator: Generators,
    /// Denoising steps; `None` takes the pipeline's default (1000 DDPM, 50 DDIM).
    pub num_inference_steps: Option<usize>,
    /// DDIM's `eta` (default 0.0); an error on DDPMPipeline.
    pub eta: Option<f64>,
    /// DDIM's `use_clipped_model_output`; an error on DDPMPipeline.
    pub use_clipped_model_output: Option<bool>,
    /// `output_type` (default `"pil"`).
    pub output_type: OutputType,
    /// Called after every step; may replace the latents or interrupt.
    pub callback: Option<StepCallback<'a>>,
    /// Show a progress bar (diffusers' `set_progress_bar_config(disable=...)`).
    pub progress: bool,
}

impl Default for UnconditionalArgs<'_> {
    fn default() -> Self {
        Self {
            batch_size: 1,
            generator: Generators::Random,
            num_inference_steps: None,
            eta: None,
            use_clipped_model_output: None,
            output_type: OutputType::Pil,
            callback: None,
            progress: true,
        }
    }
}

impl std::fmt::Debug for UnconditionalArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnconditionalArgs")
            .field("batch_size", &self.batch_size)
            .field("generator", &self.generator)
            .field("num_inference_steps", &self.num_inference_steps)
            .field("eta", &self.eta)
            .field("output_type", &self.output_type)
            .finish_non_exhaustive()
    }
}

/// Sample from pure noise: draw `[batch, in_channels, size, size]` noise with the generators,
/// then `unet` + `scheduler.step` over the schedule, then map `[-1, 1]` to the output type.
pub(crate) fn denoise(
    unet: &UNet2DModel,
    scheduler: &mut AnyScheduler,
    mut args: UnconditionalArgs<'_>,
    default_steps: usize,
    ddim_options: bool,
) -> Result<ImagePipelineOutput> {
    if args.batch_size == 0 {
        return Err(Error::invalid_argument("batch_size", "must be at least 1"));
    }
    let steps = args.num_inference_steps.unwrap_or(default_steps);
    let config = unet.config();
    let (height, width) = match config.sample_size {
        Some(SampleSize::Square(s)) => (s, s),
        Some(SampleSize::Rect([h, w])) => (h, w),
        None => {
            return Err(Error::invalid_argument(
                "unet",
                "the UNet config has no sample_size, so the image size is unknown",
            ));
        }
    };
    let shape = [args.batch_size, config.in_channels, height, width];
    let device = unet
        .devices()
        .into_iter()
        .next()
        .ok_or_else(|| Error::invalid_argument("unet", "the model has no parameters"))?;

    let mut generators = args.generator.instantiate(args.batch_size)?;
    let noise: Tensor<4> = randn_tensor(shape, noise_source(&mut generators), &device)?;
    scheduler.set_timesteps(steps)?;
    // Identity for DDPM/DDIM (as diffusers' DDPMPipeline assumes); sigma-based schedulers such as
    // Euler need their initial scale and per-step input scaling to sample correctly.
    let mut image = noise.mul_scalar(scheduler.init_noise_sigma());
    let timesteps = scheduler.timesteps().to_vec();
    let bar = progress_bar(timesteps.len(), args.progress);
    let mut interrupted = false;
    // Only schedulers whose `step` takes a generator get one (diffusers' pipelines pass it
    // unconditionally, which fails for UniPC, Heun, LMS, PNDM, ...).
    let takes_generator = scheduler.kind().step_takes_generator();
    for (i, &t) in timesteps.iter().enumerate() {
        let timestep = Tensor::<1>::from_floats([t as f32], &device);
        let model_input = scheduler.scale_model_input(image.clone(), t)?;
        let model_output = unet.forward(model_input, timestep, None)?;
        // DDIMPipeline always passes eta (default 0.0); DDPMPipeline passes what it was given,
        // so a scheduler that takes no eta reports it instead of ignoring it.
        let eta = if ddim_options {
            Some(args.eta.unwrap_or(0.0))
        } else {
            args.eta
        };
        let options = StepOptions {
            generator: takes_generator.then(|| noise_source(&mut generators)),
            eta,
            use_clipped_model_output: args.use_clipped_model_output,
            ..StepOptions::default()
        };
        image = scheduler.step(model_output, t, image, options)?.prev_sample;
        bar.inc(1);
        if let Some(callback) = args.callback.as_mut() {
            let info = StepInfo {
                step: i,
                num_steps: timesteps.len(),
                timestep: t,
                latents: &image,
            };
            match callback(info) {
                StepControl::Continue => {}
                StepControl::ReplaceLatents(latents) => {
                    if latents.dims() != shape {
                        return Err(Error::invalid_argument(
                            "callback",
                            format!(
                                "returned latents of shape {:?}, expected {shape:?}",
                                latents.dims()
                            ),
                        ));
                    }
                    image = latents;
                }
                StepControl::Interrupt => {
                    interrupted = true;
                    break;
                }
            }
        }
    }
    bar.finish_and_clear();
    // Unconditional pipelines have no latent space: "latent" returns the raw sample.
    let processor = VaeImageProcessor::default();
    Ok(ImagePipelineOutput {
        images: processor.postprocess(image, args.output_type),
        interrupted,
    })
}
