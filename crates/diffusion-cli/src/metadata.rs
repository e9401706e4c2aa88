//! Generation parameters in PNG text chunks: diffusion-core's, which the training loops' validation
//! images share.

pub use diffusion_core::metadata::GenerationParameters;
