//! Small conversions between host vectors and tensors used throughout the workspace.

use burn::tensor::{Device, Tensor, TensorData};

use crate::Result;
use crate::generator::{NoiseSource, randn_batch};

/// A float tensor from row-major host data.
///
/// # Panics
/// When `data.len()` is not the product of `shape` (a programming error, not user input).
pub fn from_vec<const D: usize>(data: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// A float tensor's elements as `f32`, row-major.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

/// diffusers' `randn_tensor` with CPU generators: standard normal noise of `shape` drawn on the
/// host exactly as torch would, then moved to `device`.
///
/// # Errors
/// As [`randn_batch`].
pub fn randn_tensor<const D: usize>(
    shape: [usize; D],
    source: NoiseSource<'_>,
    device: &Device,
) -> Result<Tensor<D>> {
    Ok(from_vec(randn_batch(&shape, source)?, shape, device))
}
