//! ControlNets (`diffusers.models.controlnets`).

pub mod controlnet;
