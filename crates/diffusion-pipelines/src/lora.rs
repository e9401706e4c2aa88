//! LoRA on the Stable Diffusion pipelines: diffusers' `pipe.load_lora_weights`,
//! `set_adapters`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights`, with the adapters kept in
//! the components' [`LoraState`] and applied to the UNet and the text encoders
//! (see [`diffusion_loaders::lora`] for the formats: diffusers/PEFT and kohya/A1111).
//!
//! ```no_run
//! use diffusion_core::Device;
//! use diffusion_pipelines::{Generators, StableDiffusionArgs, StableDiffusionPipeline};
//!
//! # fn main() -> diffusion_core::Result<()> {
//! let mut pipe = StableDiffusionPipeline::from_pretrained(
//!     "stable-diffusion-v1-5/stable-diffusion-v1-5",
//!     &Device::default(),
//! )?;
//! pipe.components.load_lora_weights("pixel-art.safetensors", "pixel")?;
//! pipe.components.load_lora_weights("toy-face.safetensors", "toy")?;
//! pipe.components.set_adapters(&["pixel", "toy"], &[0.7, 0.3])?;
//! let out = pipe.call(StableDiffusionArgs {
//!     prompt: vec!["a toy robot, pixel art".into()],
//!     generator: Generators::Seed(0),
//!     ..Default::default()
//! })?;
//! pipe.components.unload_lora_weights()?; // the base weights again, bit for bit
//! # Ok(())
//! # }
//! ```

use std::path::Path;

use diffusion_core::Result;
use diffusion_loaders::{LoraLoadOptions, LoraLoadReport, LoraModels, LoraState};

use crate::{StableDiffusionComponents, StableDiffusionXLComponents};

/// The LoRA operations of a set of components, given its adapter state and its models.
macro_rules! lora_methods {
    ($components:ty, $models:expr) => {
        impl $components {
            /// Load a LoRA file (or a folder with `pytorch_lora_weights.safetensors`) as
            /// adapter `adapter_name`, active with weight 1 next to the adapters already
            /// active, as diffusers' `load_lora_weights`.
            ///
            /// # Errors
            /// As [`LoraState::load_lora_weights_with`]: keys that match no module (a LoRA for
            /// another base model) are listed in [`diffusion_core::Error::UnexpectedTensors`].
            pub fn load_lora_weights(
                &mut self,
                path: impl AsRef<Path>,
                adapter_name: &str,
            ) -> Result<LoraLoadReport> {
                self.load_lora_weights_with(path, adapter_name, LoraLoadOptions::default())
            }

            /// As [`Self::load_lora_weights`], with options (lenient loading).
            ///
            /// # Errors
            /// As [`LoraState::load_lora_weights_with`].
            pub fn load_lora_weights_with(
                &mut self,
                path: impl AsRef<Path>,
                adapter_name: &str,
                options: LoraLoadOptions,
            ) -> Result<LoraLoadReport> {
                let (lora, mut models) = $models(self);
                lora.load_lora_weights_with(&mut models, path, adapter_name, options)
            }

            /// Activate `adapter_names` with `weights` (diffusers' `set_adapters`).
            ///
            /// # Errors
            /// As [`LoraState::set_adapters`].
            pub fn set_adapters(&mut self, adapter_names: &[&str], weights: &[f32]) -> Result<()> {
                let (lora, mut models) = $models(self);
                lora.set_adapters(&mut models, adapter_names, weights)
            }

            /// Scale every active adapter (diffusers' `cross_attention_kwargs={"scale": s}`).
            ///
            /// # Errors
            /// As [`LoraState::set_lora_scale`].
            pub fn set_lora_scale(&mut self, scale: f32) -> Result<()> {
                let (lora, mut models) = $models(self);
                lora.set_lora_scale(&mut models, scale)
            }

            /// Bake the active adapters into the weights at `lora_scale` (`fuse_lora`).
            ///
            /// # Errors
            /// As [`LoraState::fuse_lora`].
            pub fn fuse_lora(&mut self, lora_scale: f32) -> Result<()> {
                let (lora, mut models) = $models(self);
                lora.fuse_lora(&mut models, lora_scale, None)
            }

            /// Undo [`Self::fuse_lora`] (`unfuse_lora`).
            ///
            /// # Errors
            /// As [`LoraState::unfuse_lora`].
            pub fn unfuse_lora(&mut self) -> Result<()> {
                let (lora, mut models) = $models(self);
                lora.unfuse_lora(&mut models)
            }

            /// Remove every adapter and restore the base weights exactly
            /// (`unload_lora_weights`).
            ///
            /// # Errors
            /// As [`LoraState::unload_lora_weights`].
            pub fn unload_lora_weights(&mut self) -> Result<()> {
                let (lora, mut models) = $models(self);
                lora.unload_lora_weights(&mut models)
            }
        }
    };
}

fn sd_models(c: &mut StableDiffusionComponents) -> (&mut LoraState, LoraModels<'_>) {
    let models = LoraModels::new()
        .unet(&mut c.unet)
        .text_encoder(&mut c.text_encoder);
    (&mut c.lora, models)
}

fn xl_models(c: &mut StableDiffusionXLComponents) -> (&mut LoraState, LoraModels<'_>) {
    let mut models = LoraModels::new()
        .unet(&mut c.unet)
        .text_encoder_2(&mut c.text_encoder_2);
    if let Some(te) = c.text_encoder.as_mut() {
        models = models.text_encoder(te);
    }
    (&mut c.lora, models)
}

lora_methods!(StableDiffusionComponents, sd_models);
lora_methods!(StableDiffusionXLComponents, xl_models);
