//! diffusers' pipelines on burn.
//!
//! A pipeline owns its components (`unet`, `scheduler`, ...) as public fields, loads from a
//! diffusers folder or Hub id with `from_pretrained`, and is run with an arguments struct whose
//! fields and defaults are diffusers' `__call__` keyword arguments.
#![warn(missing_docs)]

pub mod alt_diffusion;
pub mod controlnet;
pub mod cycle_diffusion;
pub mod ddim;
pub mod ddpm;
pub mod instruct_pix2pix;
pub mod ip_adapter;
pub mod lora;
pub mod pipeline_utils;
pub mod pix2pix_zero;
pub mod single_file;
pub mod stable_diffusion;
pub mod stable_diffusion_xl;
mod textual_inversion;
mod unconditional;

pub use alt_diffusion::{
    AltDiffusionArgs, AltDiffusionComponents, AltDiffusionImg2ImgArgs, AltDiffusionImg2ImgPipeline,
    AltDiffusionPipeline,
};
pub use controlnet::{StableDiffusionControlNetArgs, StableDiffusionControlNetPipeline};
pub use cycle_diffusion::{CycleDiffusionArgs, CycleDiffusionPipeline};
pub use ddim::DDIMPipeline;
pub use ddpm::DDPMPipeline;
pub use instruct_pix2pix::{
    StableDiffusionInstructPix2PixArgs, StableDiffusionInstructPix2PixPipeline,
};
pub use ip_adapter::{IPAdapterArgs, ip_adapter_masks};
pub use pipeline_utils::{Generators, ImagePipelineOutput, StepCallback, StepControl, StepInfo};
pub use pix2pix_zero::{
    Captioner, Pix2PixInversionPipelineOutput, Pix2PixZeroInvertArgs,
    StableDiffusionPix2PixZeroArgs, StableDiffusionPix2PixZeroPipeline,
};
pub use single_file::SingleFilePipelineOptions;
pub use stable_diffusion::{
    PipelineImageInput, StableDiffusionArgs, StableDiffusionComponents, StableDiffusionImg2ImgArgs,
    StableDiffusionImg2ImgPipeline, StableDiffusionInpaintArgs, StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
};
pub use stable_diffusion_xl::{
    MicroConditioning, StableDiffusionXLArgs, StableDiffusionXLComponents,
    StableDiffusionXLImg2ImgArgs, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintArgs,
    StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline,
};
pub use unconditional::UnconditionalArgs;

/// The examples of docs/stable-diffusion.md, compiled as doctests so the guide stays correct.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/stable-diffusion.md")]
pub struct StableDiffusionGuide;

/// The examples of docs/cycle-diffusion.md, compiled as doctests so the guide stays correct.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/cycle-diffusion.md")]
pub struct CycleDiffusionGuide;

#[cfg(doctest)]
#[doc = include_str!("../../../docs/alt-diffusion.md")]
pub struct AltDiffusionGuide;

/// The examples of docs/pix2pix-zero.md, compiled as doctests so the guide stays correct.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/pix2pix-zero.md")]
pub struct Pix2PixZeroGuide;
