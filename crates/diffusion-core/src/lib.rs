//! Core of the diffusers port: errors, configs, the torch-compatible generator, image I/O,
//! `.npy` exchange, backend selection and fused kernels (GroupNorm, attention).
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod error;
pub mod generator;
pub mod image;
pub mod kernels;
pub mod metadata;
pub mod npy;
pub mod python_json;
pub mod tensor;
pub mod weights;

pub use backend::{Device, Precision, default_device, parse_device};
pub use config::{ComponentSpec, Config, ConfigFile, ModelIndex};
pub use error::{Error, Result};
pub use generator::{NoiseSource, TorchGenerator, randn_batch};

/// Re-export of burn so that downstream crates use exactly the same version.
pub use burn;
