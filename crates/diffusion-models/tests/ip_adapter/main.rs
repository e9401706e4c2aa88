//! IP-Adapter's model side against transformers and diffusers
//! (`fixtures/oracle/gen_ip_adapter_models.py`): the CLIP image encoders, the CLIP image
//! processor (Pillow's bicubic resize included) and the image projections built from
//! checkpoint-layout weights. One test binary with modules, because linking burn is slow.

mod clip_vision;
mod image_processor;
mod image_proj;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_core::Device;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;

/// Absolute tolerance of every f32 comparison with the oracle.
pub const TOLERANCE: f32 = 1e-4;

/// `fixtures/ip_adapter/models/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/ip_adapter/models")
        .join(name)
}

pub fn device() -> Device {
    Device::flex()
}

/// A tensor of an `io.safetensors` file.
pub fn io_tensor<const D: usize>(io: &WeightSource, key: &str) -> Result<Tensor<D>> {
    io.tensor::<D>(key, &device())
        .with_context(|| format!("{}: {key}", io.origin().display()))
}

/// Assert `got` is within [`TOLERANCE`] of `want`; returns the largest difference.
pub fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let diff = to_vec(got)
        .iter()
        .zip(&to_vec(want))
        .map(|(g, w)| {
            assert!(g.is_finite(), "{what}: non-finite output {g}");
            (g - w).abs()
        })
        .fold(0.0, f32::max);
    eprintln!("{what}: max |diff| = {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "{what}: max |diff| {diff:.3e} > {TOLERANCE:e}"
    );
    diff
}
