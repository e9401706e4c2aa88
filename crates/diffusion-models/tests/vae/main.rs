//! `AutoencoderKL` against the diffusers oracle (`fixtures/oracle/gen_vae.py`): encode, the
//! posterior, seeded samples, decode, forward, slicing, tiling, half precision, and the loading
//! paths and errors around it. One test binary with modules, because linking burn is slow.

mod errors;
mod layout;
mod parity;
mod precision;
mod tiling;

use diffusion_models::ModelMixin;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_core::Device;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;
use diffusion_models::AutoencoderKL;

/// Absolute tolerance of every f32 comparison with the oracle.
pub const TOLERANCE: f32 = 1e-4;

/// The fixture models, as named in `gen_vae.py`.
pub const CASES: [&str; 3] = ["sd_tiny", "sdxl_like", "flux_like"];

/// `fixtures/vae/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/vae")
        .join(name)
}

pub fn device() -> Device {
    Device::flex()
}

pub fn load(case: &str) -> Result<AutoencoderKL> {
    AutoencoderKL::from_pretrained(fixture(case), &device()).with_context(|| case.to_string())
}

/// The oracle's inputs and outputs of one model.
pub struct Io {
    source: WeightSource,
}

impl Io {
    pub fn open(case: &str) -> Result<Self> {
        let path = fixture(case).join("io.safetensors");
        Ok(Self {
            source: WeightSource::open(&path).with_context(|| path.display().to_string())?,
        })
    }

    pub fn tensor<const D: usize>(&self, key: &str) -> Result<Tensor<D>> {
        self.source
            .tensor::<D>(key, &device())
            .with_context(|| key.to_string())
    }

    pub fn has(&self, key: &str) -> bool {
        self.source.contains(key)
    }
}

/// `fixtures/vae/<case>/meta.json`.
pub fn meta(case: &str) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(fixture(case).join("meta.json"))?;
    Ok(serde_json::from_str(&text)?)
}

/// Largest absolute difference; fails on a shape mismatch or a non-finite value.
pub fn max_abs_diff<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let (got, want) = (to_vec(got), to_vec(want));
    got.iter()
        .zip(&want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "non-finite output {g}");
            (g - w).abs()
        })
        .fold(0.0, f32::max)
}

/// Assert `got` is within [`TOLERANCE`] of `want`; returns the difference for reporting.
pub fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) -> f32 {
    let diff = max_abs_diff(got, want);
    eprintln!("{what}: max |diff| = {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "{what}: max |diff| {diff:e} > {TOLERANCE:e}"
    );
    diff
}
