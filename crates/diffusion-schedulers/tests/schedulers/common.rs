//! Fixture loading and comparison helpers shared by the scheduler tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use diffusion_core::Device;
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_schedulers::{AnyScheduler, SchedulerKind};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/schedulers")
}

pub fn device() -> Device {
    Device::flex()
}

pub fn read_json(name: &str) -> Result<Value> {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: run fixtures/oracle/gen_schedulers.py", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// A safetensors file read into host vectors (float32 tensors only).
pub struct Tensors {
    map: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Tensors {
    pub fn load(name: &str) -> Result<Self> {
        let path = fixtures().join(name);
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let mut map = HashMap::new();
        for (key, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                bail!("{key}: expected float32, got {:?}", view.dtype());
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            map.insert(key, (view.shape().to_vec(), data));
        }
        Ok(Self { map })
    }

    pub fn get(&self, key: &str) -> Result<&(Vec<usize>, Vec<f32>)> {
        self.map
            .get(key)
            .ok_or_else(|| anyhow!("fixture tensor `{key}` is missing"))
    }

    pub fn values(&self, key: &str) -> Result<&[f32]> {
        Ok(&self.get(key)?.1)
    }

    pub fn tensor4(&self, key: &str) -> Result<Tensor<4>> {
        let (shape, data) = self.get(key)?;
        let shape: [usize; 4] = shape
            .as_slice()
            .try_into()
            .map_err(|_| anyhow!("{key}: expected a 4-d tensor, got {shape:?}"))?;
        Ok(tensor(data.clone(), shape))
    }
}

pub fn tensor<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), &device())
}

pub fn host<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("float tensor")
}

/// Norm-wise relative error `max|a - b| / max|b|` (or the absolute error when `b` is all zero).
pub fn rel_err(actual: &[f32], expected: &[f32]) -> f64 {
    rel_err_scaled(actual, expected, 0.0)
}

/// `max|a - b| / max(max|b|, floor)`: the error relative to the larger of the result and
/// `floor`, the magnitude of the operands that produced it. Where a step cancels its input down
/// to almost nothing (an Euler step onto sigma 0 with an `x0` of 0 leaves only rounding noise),
/// float32 rounding is relative to the operands, not to the tiny result.
pub fn rel_err_scaled(actual: &[f32], expected: &[f32], floor: f64) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    if actual.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = expected
        .iter()
        .fold(floor, |m, &v| m.max(f64::from(v).abs()));
    let diff = actual.iter().zip(expected).fold(0f64, |m, (&a, &b)| {
        m.max((f64::from(a) - f64::from(b)).abs())
    });
    if scale == 0.0 { diff } else { diff / scale }
}

/// `max|x|`.
pub fn max_abs(values: &[f32]) -> f64 {
    values.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()))
}

/// The `name` of an `InvalidArgument`, or a description of what came instead.
pub fn arg_name<T: std::fmt::Debug>(r: diffusion_core::Result<T>) -> String {
    match r {
        Err(diffusion_core::Error::InvalidArgument { name, .. }) => name,
        other => format!("not an InvalidArgument: {other:?}"),
    }
}

/// The `field` of a `ConfigField` error, or a description of what came instead.
pub fn field_name<T: std::fmt::Debug>(r: diffusion_core::Result<T>) -> String {
    match r {
        Err(diffusion_core::Error::ConfigField { field, .. }) => field,
        other => format!("not a ConfigField: {other:?}"),
    }
}

/// Build a scheduler of class `class` from a JSON object of config overrides.
pub fn build(class: &str, config: &Value) -> Result<AnyScheduler> {
    let kind = SchedulerKind::from_class_name(class)?;
    Ok(AnyScheduler::build(
        kind,
        config.clone(),
        Path::new("<fixture>"),
    )?)
}

/// The oracle's `dummy_model`: `(0.5 x + 0.1) * t / (t + 1)` (see gen_schedulers.py for why not
/// diffusers' `x * t / (t + 1)`), with its learned-variance channels.
pub fn dummy_model(x: &Tensor<4>, t: f64, kind: &str) -> Tensor<4> {
    let out = x
        .clone()
        .mul_scalar(0.5)
        .add_scalar(0.1)
        .mul_scalar(t)
        .div_scalar(t + 1.0);
    match kind {
        "learned" => {
            let var = x.clone().mul(x.clone()).mul_scalar(0.01).add_scalar(0.0001);
            Tensor::cat(vec![out, var], 1)
        }
        "learned_range" => Tensor::cat(vec![out, x.clone().clamp(-1.0, 1.0)], 1),
        _ => out,
    }
}

/// diffusers' `dummy_sample_deter`: `arange(768)` laid out as `[C, H, W, B]`, scaled by 1/768,
/// permuted to `[B, C, H, W]`.
pub fn dummy_sample_deter(flip: bool) -> Tensor<4> {
    let (b, c, h, w) = (4usize, 3usize, 8usize, 8usize);
    let n = b * c * h * w;
    let mut out = vec![0f32; n];
    for ci in 0..c {
        for hi in 0..h {
            for wi in 0..w {
                for bi in 0..b {
                    let src = ((ci * h + hi) * w + wi) * b + bi;
                    let value = if flip { n - 1 - src } else { src };
                    // torch divides the int64 arange by the count in float32.
                    out[((bi * c + ci) * h + hi) * w + wi] = value as f32 / n as f32;
                }
            }
        }
    }
    tensor(out, [b, c, h, w])
}
