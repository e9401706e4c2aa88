//! `DDPMPipeline`: unconditional image generation with a UNet2DModel and (by default) DDPM.

use diffusion_models::ModelMixin;
use std::path::Path;

use diffusion_core::{Device, ModelIndex, Result};
use diffusion_models::unets::unet_2d::UNet2DModel;
use diffusion_schedulers::AnyScheduler;

use crate::pipeline_utils::ImagePipelineOutput;
use crate::unconditional::{UnconditionalArgs, denoise};

/// diffusers' `DDPMPipeline`: `unet` and any `scheduler`.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_pipelines::{DDPMPipeline, Generators, UnconditionalArgs};
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = DDPMPipeline::from_pretrained("models/ddpm-digits", &Device::default())?;
/// let out = pipe.call(UnconditionalArgs {
///     batch_size: 4,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DDPMPipeline {
    /// The denoising model.
    pub unet: UNet2DModel,
    /// The scheduler (DDPM in a DDPM folder, but any scheduler works, as in diffusers).
    pub scheduler: AnyScheduler,
}

impl DDPMPipeline {
    /// diffusers' default `num_inference_steps` for this pipeline.
    pub const DEFAULT_STEPS: usize = 1000;

    /// Load `unet/` and `scheduler/` from a diffusers pipeline folder.
    ///
    /// # Errors
    /// As the component loaders: missing files, bad configs, strict weight loading.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let index_path = dir.join("model_index.json");
        if index_path.exists() {
            // Read it so that a malformed index is reported, even though the layout is fixed.
            ModelIndex::load(&index_path)?;
        }
        let unet = UNet2DModel::from_pretrained(dir.join("unet"), device)?;
        let scheduler = AnyScheduler::from_config_file(dir.join("scheduler"))?;
        Ok(Self { unet, scheduler })
    }

    /// Generate images (`pipe(batch_size=..., generator=..., num_inference_steps=...)`).
    ///
    /// # Errors
    /// [`diffusion_core::Error::InvalidArgument`] for a zero batch, a seed list of the wrong
    /// length, zero steps or options the scheduler does not take.
    pub fn call(&mut self, args: UnconditionalArgs<'_>) -> Result<ImagePipelineOutput> {
        denoise(
            &self.unet,
            &mut self.scheduler,
            args,
            Self::DEFAULT_STEPS,
            false,
        )
    }
}
