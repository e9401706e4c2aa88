//! `AltDiffusionPipeline`: multilingual text-to-image.

use diffusion_core::{Device, Result};
use diffusion_loaders::HubOptions;

use super::AltDiffusionComponents;
use crate::pipeline_utils::ImagePipelineOutput;
use crate::stable_diffusion::StableDiffusionArgs;
use crate::stable_diffusion::pipeline_stable_diffusion::text_to_image;

/// Arguments of [`AltDiffusionPipeline::call`]: diffusers' `AltDiffusionPipeline.__call__`
/// takes the keyword arguments of `StableDiffusionPipeline.__call__`, with the same defaults.
/// `clip_skip` must stay `None` (see the [module docs](super)).
pub type AltDiffusionArgs<'a> = StableDiffusionArgs<'a>;

/// diffusers' `AltDiffusionPipeline`: text-to-image with the XLM-R text encoder, in any of the
/// languages its tokenizer covers.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::{ImageOutput, save_png};
/// use diffusion_pipelines::{AltDiffusionArgs, AltDiffusionPipeline, Generators};
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe = AltDiffusionPipeline::from_pretrained("BAAI/AltDiffusion-m9", &Device::default())?;
/// pipe.components.set_scheduler("DPM++ 2M")?;
/// let out = pipe.call(AltDiffusionArgs {
///     prompt: vec!["黑暗精灵公主，非常详细，幻想，数字绘画，概念艺术".into()],
///     num_inference_steps: 25,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// if let ImageOutput::Images(images) = out.images {
///     save_png("elf.png", &images[0], &[])?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AltDiffusionPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`.
    pub components: AltDiffusionComponents,
}

impl AsRef<AltDiffusionComponents> for AltDiffusionPipeline {
    fn as_ref(&self) -> &AltDiffusionComponents {
        &self.components
    }
}

impl AltDiffusionPipeline {
    /// Load a diffusers folder or Hub id (see [`AltDiffusionComponents::from_pretrained`]).
    ///
    /// # Errors
    /// As [`AltDiffusionComponents::from_pretrained_with`].
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        AltDiffusionComponents::from_pretrained(name_or_path, device).map(Self::from_parts)
    }

    /// Load with Hub options (revision, offline, cache, `variant`).
    ///
    /// # Errors
    /// As [`AltDiffusionComponents::from_pretrained_with`].
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        AltDiffusionComponents::from_pretrained_with(name_or_path, options, device)
            .map(Self::from_parts)
    }

    /// Build from loaded components.
    pub fn from_parts(components: AltDiffusionComponents) -> Self {
        Self { components }
    }

    /// Share another pipeline's components without copying weights (`from_pipe`).
    pub fn from_pipe(other: &impl AsRef<AltDiffusionComponents>) -> Self {
        Self::from_parts(other.as_ref().clone())
    }

    /// Generate images from text.
    ///
    /// # Errors
    /// As [`crate::StableDiffusionPipeline::call`]; [`diffusion_core::Error::InvalidArgument`]
    /// (`clip_skip`) when `clip_skip` is set.
    pub fn call(&mut self, args: AltDiffusionArgs<'_>) -> Result<ImagePipelineOutput> {
        let (models, encoder) = self.components.split();
        text_to_image(models, &encoder, args)
    }
}
