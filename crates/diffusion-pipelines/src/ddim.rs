//! `DDIMPipeline`: unconditional generation with DDIM (any scheduler config is converted).

use std::path::Path;

use diffusion_core::{Device, Result};
use diffusion_models::unets::unet_2d::UNet2DModel;
use diffusion_schedulers::{AnyScheduler, SchedulerSpec};

use crate::ddpm::DDPMPipeline;
use crate::pipeline_utils::ImagePipelineOutput;
use crate::unconditional::{UnconditionalArgs, denoise};

/// diffusers' `DDIMPipeline`: a UNet2DModel and a DDIMScheduler. Like diffusers, it converts
/// whatever scheduler config the folder has into DDIM (`DDIMScheduler.from_config`).
#[derive(Debug)]
pub struct DDIMPipeline {
    /// The denoising model.
    pub unet: UNet2DModel,
    /// Always a DDIM scheduler.
    pub scheduler: AnyScheduler,
}

impl DDIMPipeline {
    /// diffusers' default `num_inference_steps` for this pipeline.
    pub const DEFAULT_STEPS: usize = 50;

    /// Build from components, converting the scheduler to DDIM.
    ///
    /// # Errors
    /// When the scheduler config cannot be read as a DDIM config.
    pub fn from_parts(unet: UNet2DModel, scheduler: AnyScheduler) -> Result<Self> {
        let scheduler = AnyScheduler::convert(&scheduler, &SchedulerSpec::parse("DDIMScheduler")?)?;
        Ok(Self { unet, scheduler })
    }

    /// Load a diffusers pipeline folder (a DDPM folder works too; its scheduler becomes DDIM).
    ///
    /// # Errors
    /// As [`DDPMPipeline::from_pretrained`].
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let DDPMPipeline { unet, scheduler } = DDPMPipeline::from_pretrained(dir, device)?;
        Self::from_parts(unet, scheduler)
    }

    /// Generate images (`pipe(batch_size, generator, eta, num_inference_steps, ...)`).
    ///
    /// # Errors
    /// As [`DDPMPipeline::call`].
    pub fn call(&mut self, args: UnconditionalArgs<'_>) -> Result<ImagePipelineOutput> {
        denoise(
            &self.unet,
            &mut self.scheduler,
            args,
            Self::DEFAULT_STEPS,
            true,
        )
    }
}
