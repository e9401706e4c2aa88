//! `AltDiffusionImg2ImgPipeline`: multilingual image-to-image (SDEdit).

use diffusion_core::{Device, Result};
use diffusion_loaders::HubOptions;

use super::AltDiffusionComponents;
use crate::pipeline_utils::ImagePipelineOutput;
use crate::stable_diffusion::StableDiffusionImg2ImgArgs;
use crate::stable_diffusion::pipeline_stable_diffusion_img2img::image_to_image;

/// Arguments of [`AltDiffusionImg2ImgPipeline::call`]: those of
/// `StableDiffusionImg2ImgPipeline.__call__`, with the same defaults. `clip_skip` must stay
/// `None` (see the [module docs](super)).
pub type AltDiffusionImg2ImgArgs<'a> = StableDiffusionImg2ImgArgs<'a>;

/// diffusers' `AltDiffusionImg2ImgPipeline`: noise an image's latents to the level `strength`
/// picks, then denoise them guided by a prompt in any language of the tokenizer.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_core::image::load_image;
/// use diffusion_pipelines::{AltDiffusionImg2ImgArgs, AltDiffusionImg2ImgPipeline, Generators};
///
/// # fn main() -> diffusion_core::Result<()> {
/// let mut pipe =
///     AltDiffusionImg2ImgPipeline::from_pretrained("BAAI/AltDiffusion-m9", &Device::default())?;
/// let out = pipe.call(AltDiffusionImg2ImgArgs {
///     prompt: vec!["幻想风景, artstation".into()],
///     image: Some(load_image("sketch.png")?.into()),
///     strength: 0.75,
///     generator: Generators::Seed(0),
///     ..Default::default()
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AltDiffusionImg2ImgPipeline {
    /// `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`.
    pub components: AltDiffusionComponents,
}

impl AsRef<AltDiffusionComponents> for AltDiffusionImg2ImgPipeline {
    fn as_ref(&self) -> &AltDiffusionComponents {
        &self.components
    }
}

impl AltDiffusionImg2ImgPipeline {
    /// Load a diffusers folder or Hub id (a text-to-image folder works).
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

    /// Transform an image guided by text.
    ///
    /// # Errors
    /// As [`crate::StableDiffusionImg2ImgPipeline::call`];
    /// [`diffusion_core::Error::InvalidArgument`] (`clip_skip`) when `clip_skip` is set.
    pub fn call(&mut self, args: AltDiffusionImg2ImgArgs<'_>) -> Result<ImagePipelineOutput> {
        let (models, encoder) = self.components.split();
        image_to_image(models, &encoder, args)
    }
}
