//! diffusion-train
