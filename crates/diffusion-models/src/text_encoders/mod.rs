//! The text encoders diffusers' pipelines condition on (transformers' `models/clip`), and the
//! tokenizer that feeds them.

pub mod clip;
pub mod tokenizer;

pub use clip::{
    CLIPTextConfig, CLIPTextModel, CLIPTextModelOutput, CLIPTextModelWithProjection,
    CLIPTextModelWithProjectionOutput,
};
pub use tokenizer::{CLIPTokenizer, CLIPTokenizerConfig, Padding, TokenizerOutput};
