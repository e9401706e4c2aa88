//! Loading diffusers model folders, Hugging Face Hub repositories, single-file checkpoints and
//! LoRA adapters.
#![warn(missing_docs)]

pub mod hub;
pub mod ip_adapter;
pub mod lora;
pub mod single_file;
pub mod textual_inversion;

pub use hub::{HubOptions, resolve_model_dir};
pub use lora::{
    AdapterWeights, LoraComponent, LoraLoadOptions, LoraLoadReport, LoraModels, LoraState,
};
pub use single_file::{
    FromSingleFile, InferenceHints, ModelType, SingleFileCheckpoint, SingleFileOptions,
};
