//! The image encoders diffusers' pipelines condition on (transformers' `models/clip` vision
//! tower, IP-Adapter's `image_encoder`), and the image processor that feeds them
//! (`feature_extractor`).

pub mod clip_vision;
pub mod image_processing_clip;
pub mod pil;

pub use clip_vision::{
    CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelOutput, CLIPVisionModelWithProjection,
    CLIPVisionModelWithProjectionOutput,
};
pub use image_processing_clip::{CLIPImageProcessor, ImageSize};
pub use pil::PILResampling;
