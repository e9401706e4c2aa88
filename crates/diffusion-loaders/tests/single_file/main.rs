//! Single-file checkpoints against the diffusers oracle (`fixtures/oracle/gen_loaders.py`):
//! tiny SD 1, SD 2, SDXL and inpainting models written in the original layout, as
//! `.safetensors` and `.ckpt`, loaded here and compared with the same models loaded from their
//! diffusers folders, parameter for parameter and output for output; plus the safety and
//! error paths. One test binary with modules, because linking burn is slow.

mod errors;
mod inference;
mod parity;
mod safety;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_core::Device;
use diffusion_core::burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;
use diffusion_loaders::{SingleFileCheckpoint, SingleFileOptions};
use diffusion_models::state_dict;

/// Absolute tolerance of every f32 comparison with the oracle.
pub const TOLERANCE: f32 = 1e-4;

/// The fixture cases of `gen_loaders.py`.
pub const CASES: [&str; 4] = ["sd1", "sd2", "sdxl", "inpaint"];

/// `fixtures/loaders/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/loaders")
        .join(name)
}

pub fn device() -> Device {
    Device::flex()
}

/// The case's checkpoint files: safetensors always, the `.ckpt` where the case has one.
pub fn files(case: &str) -> Vec<PathBuf> {
    ["model.safetensors", "model.ckpt"]
        .iter()
        .map(|f| fixture(case).join(f))
        .filter(|p| p.is_file())
        .collect()
}

/// Open with the case's diffusers folder as `config=` (the tiny models' head counts and norm
/// groups cannot be inferred from shapes).
pub fn open(path: &Path, case: &str) -> Result<SingleFileCheckpoint> {
    let options = SingleFileOptions {
        config_dir: Some(fixture(case).join("diffusers")),
        ..SingleFileOptions::default()
    };
    SingleFileCheckpoint::open_with(path, options).with_context(|| path.display().to_string())
}

/// The oracle's inputs and outputs of one case.
pub struct Io {
    source: WeightSource,
    path: PathBuf,
}

impl Io {
    pub fn open(case: &str) -> Result<Self> {
        let path = fixture(case).join("io.safetensors");
        Ok(Self {
            source: WeightSource::open(&path).with_context(|| path.display().to_string())?,
            path,
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

    /// An int64 `[B, S]` tensor.
    pub fn ids(&self, key: &str) -> Result<Tensor<2, Int>> {
        let bytes = std::fs::read(&self.path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let view = st.tensor(key).with_context(|| key.to_string())?;
        let shape = [view.shape()[0], view.shape()[1]];
        let data: Vec<i64> = view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Tensor::from_data(TensorData::new(data, shape), &device()))
    }
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

/// Assert `got` is within [`TOLERANCE`] of `want`.
pub fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) {
    let diff = max_abs_diff(got, want);
    eprintln!("{what}: max |diff| = {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "{what}: max |diff| {diff:e} > {TOLERANCE:e}"
    );
}

/// Assert two modules hold the same parameters under the same keys, bit for bit.
pub fn assert_same_parameters<M: diffusion_core::burn::module::Module>(what: &str, a: &M, b: &M) {
    let (a, b) = (state_dict(a), state_dict(b));
    let keys = |s: &[diffusion_core::weights::NamedTensor]| {
        s.iter().map(|t| t.key.clone()).collect::<Vec<_>>()
    };
    assert_eq!(keys(&a), keys(&b), "{what}: parameter keys differ");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.shape, y.shape, "{what}: `{}` shape", x.key);
        assert!(
            x.values
                .iter()
                .zip(&y.values)
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}: `{}` values differ",
            x.key
        );
    }
    eprintln!("{what}: {} parameters equal", a.len());
}
