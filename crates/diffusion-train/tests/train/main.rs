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

use std::path::{Path, PathBuf};

use diffusion_core::Device;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::weights::{NamedTensor, WeightSource};
use serde_json::Value;

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

/// The tiny SD1 pipeline most training tests start from (`fixtures/pipelines/sd/sd1`).
pub fn sd1() -> PathBuf {
    fixtures().join("../pipelines/sd/sd1")
}

/// A number of a fixture's JSON.
pub fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A file's bytes (the test fails naming the file when it cannot be read).
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Copy folder `from` (a checkpoint) to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `ours` against the fixture's `prefix/<key>` tensors: the key sets must be equal and every
/// shape must match; returns the key of the worst difference and that difference.
pub fn compare_to_fixture(
    ours: &[NamedTensor],
    source: &WeightSource,
    prefix: &str,
) -> (String, f32) {
    let mut theirs: Vec<&str> = source
        .keys()
        .filter_map(|k| k.strip_prefix(prefix).and_then(|k| k.strip_prefix('/')))
        .collect();
    theirs.sort();
    let mut our_keys: Vec<&str> = ours.iter().map(|t| t.key.as_str()).collect();
    our_keys.sort();
    assert_eq!(our_keys, theirs, "{prefix}: keys differ");
    let mut worst = (String::new(), 0.0f32);
    for t in ours {
        let (values, shape) = source.read_f32(&format!("{prefix}/{}", t.key)).unwrap();
        assert_eq!(shape, t.shape, "{prefix}/{}: shape", t.key);
        let diff = max_abs_diff(&t.values, &values);
        if diff > worst.1 || worst.0.is_empty() {
            worst = (t.key.clone(), diff);
        }
    }
    worst
}
