//! diffusion-pipelines
