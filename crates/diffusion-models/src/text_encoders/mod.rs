//! The text encoders diffusers' pipelines condition on (transformers' `models/clip`), and the
//! tokenizer that feeds them.

pub mod clip;
pub mod roberta_series;
pub mod tokenizer;
pub mod xlm_roberta_tokenizer;

pub use clip::{
    CLIPTextConfig, CLIPTextModel, CLIPTextModelOutput, CLIPTextModelWithProjection,
    CLIPTextModelWithProjectionOutput,
};
pub use roberta_series::{
    RobertaSeriesConfig, RobertaSeriesModelWithTransformation, TransformationModelOutput,
};
pub use tokenizer::{CLIPTokenizer, CLIPTokenizerConfig, Padding, TokenizerOutput};
pub use xlm_roberta_tokenizer::{XLMRobertaTokenizer, XLMRobertaTokenizerConfig};
