//! Pipeline parity with diffusers on tiny random components (one test binary).

mod alt_diffusion;
mod common;
mod cycle_diffusion;
mod every_scheduler;
mod instruct_pix2pix;
mod ip_adapter;
mod lora;
mod pix2pix_zero;
mod single_file;
mod stable_diffusion;
mod unconditional;
