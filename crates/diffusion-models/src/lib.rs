//! diffusers' models written once against burn's backend-erased tensor API.
//!
//! Module paths mirror diffusers' `models/` folder (`diffusers.models.unets.unet_2d` is
//! [`unets::unet_2d`]), and every module's attribute names equal diffusers' state-dict keys, so
//! [`mod@state_dict`] loads and saves diffusers safetensors files without a key table.
#![warn(missing_docs)]

pub mod activations;
pub mod attention;
pub mod attention_processor;
pub mod autoencoders;
pub mod controlnets;
pub mod downsampling;
pub mod embeddings;
pub mod image_encoders;
pub(crate) mod layers;
pub mod modeling_utils;
pub mod resnet;
pub mod state_dict;
pub mod text_encoders;
pub mod transformers;
pub mod unets;
pub mod upsampling;

pub use attention_processor::AttentionHook;
pub use autoencoders::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution};
pub use controlnets::controlnet::{
    ControlNetModel, ControlNetModelConfig, ControlNetOptions, ControlNetOutput, FromUNetOptions,
};
pub use image_encoders::{
    CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection,
};
pub use modeling_utils::{ModelMixin, PretrainedOptions};
pub use state_dict::{
    LoadMode, LoadReport, load_weights, load_weights_as, save_weights, state_dict,
};
pub use text_encoders::{
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Padding,
    TokenizerOutput,
};
pub use text_encoders::{
    RobertaSeriesConfig, RobertaSeriesModelWithTransformation, XLMRobertaTokenizer,
};
pub use unets::unet_2d::{ClassLabels, UNet2DModel, UNet2DModelConfig};
pub use unets::unet_2d_condition::{
    AddedCondKwargs, UNet2DConditionModel, UNet2DConditionModelConfig, UNet2DConditionOptions,
};
