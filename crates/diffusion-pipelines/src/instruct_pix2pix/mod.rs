//! InstructPix2Pix (`diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_instruct_pix2pix`):
//! edit an image by following a written instruction ("make it winter").
//!
//! The UNet sees the noisy latents and the input image's latents side by side (8 input
//! channels) and is guided twice: towards the instruction and towards the input image, with
//! `guidance_scale` and `image_guidance_scale`.

pub mod pipeline_stable_diffusion_instruct_pix2pix;

pub use pipeline_stable_diffusion_instruct_pix2pix::{
    StableDiffusionInstructPix2PixArgs, StableDiffusionInstructPix2PixPipeline,
};
