//! ControlNet pipelines (`diffusers.pipelines.controlnet`): Stable Diffusion 1.x / 2.x
//! text-to-image steered by a conditioning image (edges, depth, pose, ...) through one
//! `ControlNetModel`.
//!
//! Not ported: `MultiControlNetModel` (several ControlNets at once; a folder naming one is
//! refused), the IP-Adapter arguments and the deprecated `callback` / `callback_steps`.

pub mod pipeline_controlnet;

pub use pipeline_controlnet::{StableDiffusionControlNetArgs, StableDiffusionControlNetPipeline};
