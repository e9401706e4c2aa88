//! diffusion-loaders
