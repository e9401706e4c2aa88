//! `UNet2DModel` against the diffusers oracle (`fixtures/oracle/gen_unet2d.py`), and the loading
//! paths and errors around it. One test binary with modules, because linking burn is slow.

mod errors;
mod loading;
mod parity;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_core::Device;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::tensor::{from_vec, to_vec};
use diffusion_core::weights::{NamedTensor, SaveDtype, WeightSource, write_safetensors};

/// Absolute tolerance of every f32 comparison with the oracle.
pub const TOLERANCE: f32 = 1e-4;

/// `fixtures/unet2d/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/unet2d")
        .join(name)
}

pub fn device() -> Device {
    Device::flex()
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
        Ok(self.source.tensor::<D>(key, &device())?)
    }

    pub fn values(&self, key: &str) -> Result<Vec<f32>> {
        Ok(self.source.read_f32(key)?.0)
    }

    pub fn has(&self, key: &str) -> bool {
        self.source.contains(key)
    }

    /// The timestep case names (`t0`, `per_batch`, ...), sorted.
    pub fn cases(&self) -> Vec<String> {
        self.source
            .keys()
            .filter_map(|k| k.strip_suffix("/timestep"))
            .map(str::to_string)
            .collect()
    }
}

/// Largest absolute difference; fails on a length mismatch or a non-finite value.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "non-finite output {g}");
            (g - w).abs()
        })
        .fold(0.0, f32::max)
}

/// All tensors of a weight folder's single file, as f32.
pub fn read_all(path: &Path) -> Result<Vec<NamedTensor>> {
    let source = WeightSource::open(path)?;
    source
        .keys()
        .map(|key| {
            let (values, shape) = source.read_f32(key)?;
            Ok(NamedTensor {
                key: key.to_string(),
                shape,
                values,
            })
        })
        .collect()
}

/// Copy a fixture model's config into `dir` and write `tensors` as its weights.
pub fn write_model(case: &str, dir: &Path, tensors: &[NamedTensor]) -> Result<PathBuf> {
    std::fs::copy(fixture(case).join("config.json"), dir.join("config.json"))?;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    write_safetensors(&weights, tensors, SaveDtype::F32)?;
    Ok(weights)
}

/// A small 1-D tensor of timesteps.
pub fn timesteps(values: &[f32]) -> Tensor<1> {
    from_vec(values.to_vec(), [values.len()], &device())
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    to_vec(t)
}
