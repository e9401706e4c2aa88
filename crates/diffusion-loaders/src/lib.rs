//! Loading diffusers model folders and Hugging Face Hub repositories.
#![warn(missing_docs)]

pub mod hub;

pub use hub::{HubOptions, resolve_model_dir};
