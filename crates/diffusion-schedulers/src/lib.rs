//! diffusion-schedulers
