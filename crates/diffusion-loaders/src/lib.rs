//! Loading diffusers model folders, Hugging Face Hub repositories and single-file checkpoints.
#![warn(missing_docs)]

pub mod hub;
pub mod single_file;

pub use hub::{HubOptions, resolve_model_dir};
pub use single_file::{
    FromSingleFile, InferenceHints, ModelType, SingleFileCheckpoint, SingleFileOptions,
};
