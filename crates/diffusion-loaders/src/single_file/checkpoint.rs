//! One view over the two single-file formats: a `.safetensors` file and a `torch.save` zip.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diffusion_core::weights::{SafetensorsFile, TensorProvider, WeightSource};
use diffusion_core::{Error, Result};

use super::torch_zip::TorchCheckpoint;

/// The tensors of an original-layout checkpoint, by original key.
#[derive(Debug)]
pub(crate) enum RawCheckpoint {
    Safetensors(SafetensorsFile),
    Torch(TorchCheckpoint),
}

impl RawCheckpoint {
    /// Open by content, whatever the file's name: a zip archive is a torch checkpoint, a file
    /// whose header starts like safetensors JSON is safetensors; anything else is read as what
    /// its extension says (so the error speaks of the expected format).
    pub(crate) fn open(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut head = Vec::with_capacity(9);
        std::fs::File::open(path)
            .and_then(|f| f.take(9).read_to_end(&mut head))
            .map_err(|e| Error::io(path, e))?;
        let zip = head.starts_with(b"PK\x03\x04");
        let safetensors = head.get(8) == Some(&b'{');
        let pickle_name = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "ckpt" | "pt" | "pth" | "bin"));
        if zip || (pickle_name && !safetensors) {
            Ok(Self::Torch(TorchCheckpoint::open(path)?))
        } else {
            Ok(Self::Safetensors(SafetensorsFile::open(path)?))
        }
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            Self::Safetensors(f) => f.path(),
            Self::Torch(t) => t.path(),
        }
    }

    /// Every key with its shape.
    pub(crate) fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        match self {
            Self::Safetensors(f) => f
                .keys()
                .into_iter()
                .filter_map(|k| f.entry(&k).map(|e| (k, e.shape)))
                .collect(),
            Self::Torch(t) => t
                .keys()
                .filter_map(|k| t.tensor(k).map(|r| (k.to_string(), r.shape.clone())))
                .collect(),
        }
    }

    pub(crate) fn global_step(&self) -> Option<i64> {
        match self {
            Self::Safetensors(_) => None,
            Self::Torch(t) => t.global_step(),
        }
    }

    pub(crate) fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        match self {
            Self::Safetensors(f) => f.read_f32(key),
            Self::Torch(t) => t.read_f32(key),
        }
    }
}

/// How a diffusers tensor is made from an original one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    /// Unchanged.
    Identity,
    /// Drop trailing size-1 dimensions down to rank 2 (1×1 convolution → linear).
    ToLinear,
    /// Swap the two dimensions of a matrix (OpenCLIP's `text_projection`).
    Transpose,
    /// Part `i` of 3 along dimension 0 (OpenCLIP's fused `in_proj` into q, k, v).
    Third(usize),
}

/// One tensor of a converted state dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Planned {
    /// The diffusers key.
    pub key: String,
    /// The original key it is read from.
    pub source: String,
    pub transform: Transform,
}

impl Planned {
    pub(crate) fn new(key: impl Into<String>, source: impl Into<String>, t: Transform) -> Self {
        Self {
            key: key.into(),
            source: source.into(),
            transform: t,
        }
    }
}

/// A [`WeightSource`] over the planned tensors, read and transformed one at a time when loaded.
///
/// # Errors
/// [`Error::MissingTensor`] naming the file and original key when the plan reads an absent
/// tensor; [`Error::TensorShape`] naming the original key when a transform does not fit its
/// shape.
pub(crate) fn converted_source(
    raw: &Arc<RawCheckpoint>,
    plan: Vec<Planned>,
) -> Result<WeightSource> {
    let shapes = raw.shapes();
    let mut out = BTreeMap::new();
    for p in &plan {
        let shape = shapes.get(&p.source).ok_or_else(|| Error::MissingTensor {
            path: raw.path().to_path_buf(),
            key: p.source.clone(),
        })?;
        let target = transformed_shape(&p.transform, shape).ok_or_else(|| {
            shape_error(
                raw.path(),
                &p.source,
                needed_shape(&p.transform, shape),
                shape,
            )
        })?;
        out.insert(p.key.clone(), target);
    }
    let plan = plan.into_iter().map(|p| (p.key.clone(), p)).collect();
    Ok(WeightSource::from_provider(
        raw.path(),
        out,
        Box::new(Converted {
            raw: Arc::clone(raw),
            plan,
        }),
    ))
}

/// Reads a planned tensor from the checkpoint and transforms it.
#[derive(Debug)]
struct Converted {
    raw: Arc<RawCheckpoint>,
    plan: HashMap<String, Planned>,
}

impl TensorProvider for Converted {
    fn read_f32(&self, key: &str) -> Result<Vec<f32>> {
        let p = self.plan.get(key).ok_or_else(|| Error::MissingTensor {
            path: self.raw.path().to_path_buf(),
            key: key.to_string(),
        })?;
        let (values, shape) = self.raw.read_f32(&p.source)?;
        apply(&p.transform, values, shape.clone())
            .map(|(values, _)| values)
            .map_err(|expected| shape_error(self.raw.path(), &p.source, expected, &shape))
    }
}

fn shape_error(path: &Path, key: &str, expected: Vec<usize>, got: &[usize]) -> Error {
    Error::TensorShape {
        path: PathBuf::from(path),
        key: key.to_string(),
        expected,
        got: got.to_vec(),
    }
}

/// The shape a transform gives a tensor of `shape`; `None` when it does not apply.
pub(crate) fn transformed_shape(t: &Transform, shape: &[usize]) -> Option<Vec<usize>> {
    match t {
        Transform::Identity => Some(shape.to_vec()),
        Transform::ToLinear => {
            (shape.len() >= 2 && shape[2..].iter().all(|&d| d == 1)).then(|| shape[..2].to_vec())
        }
        Transform::Transpose => match shape {
            [rows, cols] => Some(vec![*cols, *rows]),
            _ => None,
        },
        Transform::Third(_) => {
            let mut s = shape.to_vec();
            let first = s.first_mut().filter(|d| d.is_multiple_of(3))?;
            *first /= 3;
            Some(s)
        }
    }
}

/// The shape a transform needs (zeros where any size works).
fn needed_shape(t: &Transform, shape: &[usize]) -> Vec<usize> {
    match t {
        Transform::Identity => shape.to_vec(),
        Transform::ToLinear => vec![0, 0, 1, 1],
        Transform::Transpose => vec![0, 0],
        Transform::Third(_) => vec![0],
    }
}

/// Apply a transform; `Err` holds the shape the transform needed (zeros where any size works).
fn apply(
    t: &Transform,
    values: Vec<f32>,
    shape: Vec<usize>,
) -> std::result::Result<(Vec<f32>, Vec<usize>), Vec<usize>> {
    let new_shape = transformed_shape(t, &shape).ok_or_else(|| needed_shape(t, &shape))?;
    let values = match t {
        Transform::Identity | Transform::ToLinear => values,
        Transform::Transpose => {
            let (rows, cols) = (shape[0], shape[1]);
            let mut out = vec![0.0; values.len()];
            for r in 0..rows {
                for c in 0..cols {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
            out
        }
        Transform::Third(i) => {
            // Splitting dimension 0 keeps each part contiguous.
            let part = values.len() / 3;
            values[i * part..(i + 1) * part].to_vec()
        }
    };
    Ok((values, new_shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms() {
        let v: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let (t, s) = apply(&Transform::Transpose, v.clone(), vec![2, 3]).unwrap();
        assert_eq!(s, [3, 2]);
        assert_eq!(t, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let (q, s) = apply(&Transform::Third(1), v.clone(), vec![6]).unwrap();
        assert_eq!((q, s), (vec![2.0, 3.0], vec![2]));
        let (l, s) = apply(&Transform::ToLinear, v.clone(), vec![2, 3, 1, 1]).unwrap();
        assert_eq!((l.len(), s), (6, vec![2, 3]));
        assert!(apply(&Transform::ToLinear, v, vec![1, 2, 3]).is_err());
    }
}
