//! Integration tests of diffusion-train: parity with PyTorch/diffusers on a few exact steps,
//! data loading, convergence on a tiny model, and exact resumption from checkpoints.

mod concepts;
mod controlnet;
mod convergence;
mod data;
mod data_parallel;
mod dreambooth;
mod flow_matching;
mod gradient_checkpointing;
mod instruct_pix2pix;
mod loop_validation;
mod mixed_precision;
mod oracle;
mod resume;
mod sdxl;
mod sdxl_te_lora;
mod te_lora;
mod text_to_image;
mod textual_inversion;
mod validation;

use std::path::PathBuf;

use diffusion_core::Device;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::weights::WeightSource;

/// `fixtures/train/` of the workspace.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/train")
}

/// The CPU device every test runs on.
pub fn device() -> Device {
    Device::flex()
}

/// A tensor of the fixture file with its stored shape.
pub fn tensor<const D: usize>(source: &WeightSource, key: &str, device: &Device) -> Tensor<D> {
    source
        .tensor::<D>(key, device)
        .unwrap_or_else(|e| panic!("fixture tensor `{key}`: {e}"))
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
