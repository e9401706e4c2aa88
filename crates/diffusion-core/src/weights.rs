//! Strict access to safetensors weight files, single or sharded, and to a diffusers model
//! folder's weight file.
//!
//! [`SafetensorsFile`] reads only the header when opened and checks it against the file's size,
//! so a truncated or corrupt file is an [`Error::Safetensors`] naming the path before any tensor
//! is read; tensors are then read one at a time. [`WeightSource`] puts one file or all shards of
//! a `*.safetensors.index.json` behind one key space. [`resolve_weights`] finds a model folder's
//! weights the way diffusers' `from_pretrained` does (plain file, sharded index, `variant`).
//! [`write_safetensors`] writes tensors back in the same format.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use safetensors::tensor::{Metadata, TensorView};

pub use safetensors::Dtype;

use crate::config::write_atomically;
use crate::error::{Error, Result};

/// diffusers' weight file name (`SAFETENSORS_WEIGHTS_NAME`).
pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// diffusers' sharded index name (`SAFE_WEIGHTS_INDEX_NAME`).
pub const WEIGHTS_INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";
/// The stem of diffusers' weight files (`diffusion_pytorch_model[.variant].safetensors`).
pub const DIFFUSERS_WEIGHTS_STEM: &str = "diffusion_pytorch_model";
/// The stem of transformers' weight files (`model[.variant].safetensors`: the text encoders of
/// a pipeline folder).
pub const TRANSFORMERS_WEIGHTS_STEM: &str = "model";

/// Length of the little-endian header size that starts every safetensors file.
const HEADER_SIZE_LEN: u64 = 8;
/// The safetensors crate refuses larger headers; refuse them before allocating.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor's description in a weight file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Stored element type.
    pub dtype: Dtype,
    /// Stored shape (PyTorch layout).
    pub shape: Vec<usize>,
}

/// One safetensors file whose header has been read and validated.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    data_start: u64,
    metadata: Metadata,
}

fn corrupt(path: &Path, message: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl SafetensorsFile {
    /// Open a file and validate its header against the file size.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Safetensors`] naming the path when
    /// it is too short, its header is not valid safetensors JSON, its offsets are inconsistent, or
    /// its size differs from what the header describes (a truncated download).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < HEADER_SIZE_LEN {
            return Err(corrupt(
                path,
                format!("file has {file_len} bytes, too short for a header"),
            ));
        }
        let mut len_bytes = [0u8; HEADER_SIZE_LEN as usize];
        file.read_exact(&mut len_bytes)
            .map_err(|e| Error::io(path, e))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_LEN {
            return Err(corrupt(
                path,
                format!("header length {header_len} is larger than the 100 MB safetensors limit"),
            ));
        }
        if HEADER_SIZE_LEN + header_len > file_len {
            return Err(corrupt(
                path,
                format!(
                    "header of {header_len} bytes does not fit in the file's {file_len} bytes \
                     (truncated?)"
                ),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| corrupt(path, format!("invalid header: {e}")))?;
        let data_start = HEADER_SIZE_LEN + header_len;
        let expected = data_start + metadata.data_len() as u64;
        if expected != file_len {
            return Err(corrupt(
                path,
                format!(
                    "header describes {expected} bytes but the file has {file_len} (truncated or \
                     trailing data)"
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            data_start,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.metadata.tensors().into_keys().collect();
        keys.sort();
        keys
    }

    /// A tensor's dtype and shape, `None` if the file does not hold it.
    pub fn entry(&self, key: &str) -> Option<TensorEntry> {
        self.metadata.info(key).map(|info| TensorEntry {
            dtype: info.dtype,
            shape: info.shape.clone(),
        })
    }

    /// The free-form `__metadata__` map (`{"format": "pt"}` for diffusers files).
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// A tensor's raw little-endian bytes.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] when the file has no such tensor, [`Error::Io`] when reading fails.
    pub fn read_bytes(&self, key: &str) -> Result<(TensorEntry, Vec<u8>)> {
        let info = self
            .metadata
            .info(key)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                key: key.to_string(),
            })?;
        let (start, end) = info.data_offsets;
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        file.seek(SeekFrom::Start(self.data_start + start as u64))
            .map_err(|e| Error::io(&self.path, e))?;
        let mut bytes = vec![0u8; end - start];
        file.read_exact(&mut bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        let entry = TensorEntry {
            dtype: info.dtype,
            shape: info.shape.clone(),
        };
        Ok((entry, bytes))
    }

    /// A floating-point tensor converted to `f32` (from f16, bf16, f32 or f64), with its shape.
    ///
    /// # Errors
    /// As [`Self::read_bytes`]; [`Error::TensorDtype`] for a non-float tensor.
    pub fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (entry, bytes) = self.read_bytes(key)?;
        let values = bytes_to_f32(entry.dtype, &bytes).ok_or_else(|| Error::TensorDtype {
            path: self.path.clone(),
            key: key.to_string(),
            dtype: entry.dtype.to_string(),
        })?;
        Ok((values, entry.shape))
    }
}

/// Decode little-endian float bytes; `None` for a dtype that is not a float this port reads.
fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
        _ => return None,
    };
    Some(out)
}

/// Tensors a [`WeightSource`] reads on demand from something other than safetensors files: a
/// converted single-file checkpoint, or tensors in memory. Reading one key at a time keeps the
/// peak memory of a load at the model plus one tensor.
pub trait TensorProvider: Send + Sync + std::fmt::Debug {
    /// The f32 values of `key` (row-major, PyTorch layout) in the shape the source was given.
    ///
    /// # Errors
    /// When the tensor cannot be read; errors should name the underlying file and key.
    fn read_f32(&self, key: &str) -> Result<Vec<f32>>;
}

/// The keys of one model's weights, from one file, from all shards of an index, or from a
/// [`TensorProvider`].
#[derive(Debug)]
pub struct WeightSource {
    origin: PathBuf,
    files: Vec<SafetensorsFile>,
    provider: Option<Box<dyn TensorProvider>>,
    /// Visible key → where the tensor is stored.
    keys: BTreeMap<String, Stored>,
}

/// Where a [`WeightSource`] key's tensor lives.
#[derive(Clone, Debug)]
enum Stored {
    /// (file index, key stored in that file).
    File(usize, String),
    /// (key the provider knows, shape).
    Provided(String, Vec<usize>),
}

/// [`WeightSource::from_tensors`]' provider.
#[derive(Debug)]
struct MemoryTensors(HashMap<String, NamedTensor>);

impl TensorProvider for MemoryTensors {
    fn read_f32(&self, key: &str) -> Result<Vec<f32>> {
        self.0
            .get(key)
            .map(|t| t.values.clone())
            .ok_or_else(|| Error::invalid_argument("key", format!("`{key}` is not in memory")))
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl WeightSource {
    /// Open a `.safetensors` file, or every shard of a `*.index.json`.
    ///
    /// # Errors
    /// As [`SafetensorsFile::open`] and [`Self::open_sharded`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.extension().is_some_and(|e| e == "json") {
            return Self::open_sharded(path);
        }
        Self::from_files(path, vec![SafetensorsFile::open(path)?])
    }

    /// Open the shards listed by a sharded checkpoint's index (`weight_map`: key → shard file,
    /// relative to the index's folder).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Json`] for the index; [`Error::ConfigField`] (`weight_map`) for
    /// an index without a weight map; [`Error::MissingTensor`] naming the shard when the index
    /// lists a key its shard lacks; [`Error::Safetensors`] for a corrupt shard or a key stored in
    /// two shards.
    pub fn open_sharded(index_path: impl AsRef<Path>) -> Result<Self> {
        let index_path = index_path.as_ref();
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let value = crate::config::parse_json(&text, index_path)?;
        let index: ShardIndex = serde_json::from_value(value).map_err(|e| Error::ConfigField {
            path: index_path.to_path_buf(),
            field: "weight_map".into(),
            message: e.to_string(),
        })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let files = shard_names
            .iter()
            .map(|name| SafetensorsFile::open(dir.join(name)))
            .collect::<Result<Vec<_>>>()?;
        for (key, shard) in &index.weight_map {
            let file = files
                .iter()
                .find(|f| f.path() == dir.join(shard))
                .ok_or_else(|| corrupt(index_path, format!("shard `{shard}` was not opened")))?;
            if file.entry(key).is_none() {
                return Err(Error::MissingTensor {
                    path: file.path().to_path_buf(),
                    key: key.clone(),
                });
            }
        }
        Self::from_files(index_path, files)
    }

    /// Combine already opened files under one origin (used in error messages).
    ///
    /// # Errors
    /// [`Error::Safetensors`] naming `origin` when two files hold the same key.
    pub fn from_files(origin: impl AsRef<Path>, files: Vec<SafetensorsFile>) -> Result<Self> {
        let origin = origin.as_ref().to_path_buf();
        let mut keys = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            for key in file.keys() {
                if let Some(Stored::File(other, _)) =
                    keys.insert(key.clone(), Stored::File(i, key.clone()))
                {
                    let first: &SafetensorsFile = &files[other];
                    return Err(corrupt(
                        &origin,
                        format!(
                            "tensor `{key}` is stored in both {} and {}",
                            first.path().display(),
                            file.path().display()
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            origin,
            files,
            provider: None,
            keys,
        })
    }

    /// A source whose tensors `provider` reads on demand; `shapes` lists every key with its
    /// shape (PyTorch layout); `origin` is the file they come from, named in errors.
    pub fn from_provider(
        origin: impl AsRef<Path>,
        shapes: BTreeMap<String, Vec<usize>>,
        provider: Box<dyn TensorProvider>,
    ) -> Self {
        let keys = shapes
            .into_iter()
            .map(|(key, shape)| (key.clone(), Stored::Provided(key, shape)))
            .collect();
        Self {
            origin: origin.as_ref().to_path_buf(),
            files: Vec::new(),
            provider: Some(provider),
            keys,
        }
    }

    /// A source over tensors already in memory (f32, PyTorch layout); `origin` is the file they
    /// came from, named in errors.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a tensor's value count does not match its shape or a key
    /// repeats.
    pub fn from_tensors(origin: impl AsRef<Path>, tensors: Vec<NamedTensor>) -> Result<Self> {
        let mut shapes = BTreeMap::new();
        let mut memory = HashMap::new();
        for t in tensors {
            let count: usize = t.shape.iter().product();
            if count != t.values.len() {
                return Err(Error::invalid_argument(
                    "tensors",
                    format!(
                        "`{}` has {} values for shape {:?}",
                        t.key,
                        t.values.len(),
                        t.shape
                    ),
                ));
            }
            if shapes.insert(t.key.clone(), t.shape.clone()).is_some() {
                return Err(Error::invalid_argument(
                    "tensors",
                    format!("key `{}` appears twice", t.key),
                ));
            }
            memory.insert(t.key.clone(), t);
        }
        Ok(Self::from_provider(
            origin,
            shapes,
            Box::new(MemoryTensors(memory)),
        ))
    }

    /// The file or index this source was opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The underlying files (one, or one per shard).
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// All keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the source holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the source holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// A tensor's dtype and shape (provided tensors are f32).
    pub fn entry(&self, key: &str) -> Option<TensorEntry> {
        match self.keys.get(key)? {
            Stored::File(file, stored) => self.files[*file].entry(stored),
            Stored::Provided(_, shape) => Some(TensorEntry {
                dtype: Dtype::F32,
                shape: shape.clone(),
            }),
        }
    }

    /// The file that stores `key` (`None` for provided tensors).
    pub fn file_of(&self, key: &str) -> Option<&Path> {
        match self.keys.get(key)? {
            Stored::File(file, _) => Some(self.files[*file].path()),
            Stored::Provided(..) => None,
        }
    }

    /// Rename keys: `rename` returns the new name of a key, or `None` to keep it (used for
    /// legacy checkpoints whose tensors were renamed since).
    ///
    /// # Errors
    /// [`Error::Safetensors`] naming the origin when two keys would get the same name.
    pub fn rename_keys(&mut self, rename: impl Fn(&str) -> Option<String>) -> Result<()> {
        let mut renamed = BTreeMap::new();
        for (key, target) in &self.keys {
            let new_key = rename(key).unwrap_or_else(|| key.clone());
            if renamed.insert(new_key.clone(), target.clone()).is_some() {
                return Err(corrupt(
                    &self.origin,
                    format!("two tensors would both be named `{new_key}` after renaming"),
                ));
            }
        }
        self.keys = renamed;
        Ok(())
    }

    /// A floating-point tensor as `f32` values and its stored shape.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] naming the origin when the key is absent, else as
    /// [`SafetensorsFile::read_f32`].
    pub fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let stored = self.keys.get(key).ok_or_else(|| Error::MissingTensor {
            path: self.origin.clone(),
            key: key.to_string(),
        })?;
        match stored {
            Stored::File(file, stored) => self.files[*file].read_f32(stored),
            Stored::Provided(stored, shape) => {
                let provider = self.provider.as_ref().ok_or_else(|| Error::MissingTensor {
                    path: self.origin.clone(),
                    key: key.to_string(),
                })?;
                let values = provider.read_f32(stored)?;
                if values.len() != shape.iter().product::<usize>() {
                    return Err(Error::TensorShape {
                        path: self.origin.clone(),
                        key: key.to_string(),
                        expected: shape.clone(),
                        got: vec![values.len()],
                    });
                }
                Ok((values, shape.clone()))
            }
        }
    }

    /// A floating-point tensor as host data in `dtype` (f32, f16 or bf16), with its stored
    /// shape: the stored bytes themselves when the file already holds `dtype` (an fp16 variant
    /// loaded in f16 is never widened), else the [`Self::read_f32`] values rounded to `dtype`
    /// (round to nearest even, as a tensor cast does). Loading straight into the dtype a model
    /// runs in keeps an f32 copy of the weights off the device (diffusers' `torch_dtype`).
    ///
    /// # Errors
    /// As [`Self::read_f32`]; [`Error::InvalidArgument`] (`dtype`) for a dtype other than f32,
    /// f16 and bf16.
    pub fn read_data(&self, key: &str, dtype: FloatDType) -> Result<TensorData> {
        let target = match dtype {
            FloatDType::F32 => DType::F32,
            FloatDType::F16 => DType::F16,
            FloatDType::BF16 => DType::BF16,
            other => {
                return Err(Error::invalid_argument(
                    "dtype",
                    format!("weights are read as f32, f16 or bf16, not {other:?}"),
                ));
            }
        };
        if let Some(Stored::File(file, stored)) = self.keys.get(key) {
            let file = &self.files[*file];
            let same = matches!(
                (file.entry(stored).map(|e| e.dtype), target),
                (Some(Dtype::F32), DType::F32)
                    | (Some(Dtype::F16), DType::F16)
                    | (Some(Dtype::BF16), DType::BF16)
            );
            if same {
                let (entry, bytes) = file.read_bytes(stored)?;
                return Ok(TensorData::from_bytes_vec(bytes, entry.shape, target));
            }
        }
        let (values, shape) = self.read_f32(key)?;
        Ok(match target {
            DType::F16 => {
                TensorData::new(values.into_iter().map(half::f16::from_f32).collect(), shape)
            }
            DType::BF16 => TensorData::new(
                values.into_iter().map(half::bf16::from_f32).collect(),
                shape,
            ),
            _ => TensorData::new(values, shape),
        })
    }

    /// A floating-point tensor on `device`, checked to have rank `D`.
    ///
    /// # Errors
    /// As [`Self::read_f32`]; [`Error::TensorShape`] naming the file when the rank is not `D`
    /// (only the rank is known, so `expected` holds `D` zeros).
    pub fn tensor<const D: usize>(&self, key: &str, device: &Device) -> Result<Tensor<D>> {
        let (values, shape) = self.read_f32(key)?;
        if shape.len() != D {
            return Err(Error::TensorShape {
                path: self.file_of(key).unwrap_or(&self.origin).to_path_buf(),
                key: key.to_string(),
                expected: vec![0; D],
                got: shape,
            });
        }
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

/// The file names of a folder's weights for `variant`: `(single file, sharded index)`, as
/// diffusers' `save_pretrained` writes them.
pub fn weight_file_names(variant: Option<&str>) -> (String, String) {
    weight_file_names_for(DIFFUSERS_WEIGHTS_STEM, variant)
}

/// [`weight_file_names`] for another file stem ([`TRANSFORMERS_WEIGHTS_STEM`] for transformers
/// folders, which name variants the same way: `model.fp16.safetensors`,
/// `model.safetensors.index.fp16.json`).
pub fn weight_file_names_for(stem: &str, variant: Option<&str>) -> (String, String) {
    match variant {
        Some(v) => (
            format!("{stem}.{v}.safetensors"),
            format!("{stem}.safetensors.index.{v}.json"),
        ),
        None => (
            format!("{stem}.safetensors"),
            format!("{stem}.safetensors.index.json"),
        ),
    }
}

/// The weight file (or sharded index) of a diffusers model folder, picked as diffusers'
/// `ModelMixin.from_pretrained` does for a local folder: the sharded index
/// `diffusion_pytorch_model.safetensors.index[.{variant}].json` first, then (with a variant)
/// the legacy index name `diffusion_pytorch_model.safetensors.{variant}.index.json`, then the
/// single file `diffusion_pytorch_model[.{variant}].safetensors`. Open the result with
/// [`WeightSource::open`].
///
/// # Errors
/// [`Error::NotFound`] naming the folder and the names looked for (and, when present, the
/// pickle `.bin` file or other variants that were found but are not used).
pub fn resolve_weights(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<PathBuf> {
    resolve_weights_for(dir, DIFFUSERS_WEIGHTS_STEM, variant)
}

/// [`resolve_weights`] for the weight files named `stem` (see [`weight_file_names_for`]).
///
/// # Errors
/// As [`resolve_weights`].
pub fn resolve_weights_for(
    dir: impl AsRef<Path>,
    stem: &str,
    variant: Option<&str>,
) -> Result<PathBuf> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
            message: "not a model folder (no such directory)".into(),
        });
    }
    let (single, index) = weight_file_names_for(stem, variant);
    let mut candidates = vec![index];
    if let Some(v) = variant {
        candidates.push(format!("{stem}.safetensors.{v}.index.json"));
    }
    candidates.push(single);
    for name in &candidates {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let looked_for: Vec<String> = candidates.iter().map(|n| format!("`{n}`")).collect();
    let mut message = format!("no weights: looked for {}", looked_for.join(", "));
    let prefix = format!("{stem}.");
    let mut others: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    others.sort();
    if !others.is_empty() {
        message.push_str(&format!("; the folder has {}", others.join(", ")));
        if others.iter().any(|n| *n == format!("{stem}.bin")) {
            message
                .push_str(" (pickle `.bin` weights cannot be read; convert them to safetensors)");
        } else if variant.is_none() {
            message.push_str(" (pass the matching `variant`)");
        }
    }
    Err(Error::NotFound {
        path: dir.to_path_buf(),
        message,
    })
}

/// Element type used when writing weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit float (what diffusers writes for an f32 model).
    #[default]
    F32,
    /// IEEE half precision (the `fp16` variant).
    F16,
    /// bfloat16.
    BF16,
}

/// One tensor to write: its key, shape (PyTorch layout) and row-major values.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// State-dict key (`down_blocks.0.resnets.0.conv1.weight`).
    pub key: String,
    /// Shape in PyTorch layout.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Write tensors as a safetensors file with `{"format": "pt"}` metadata, as diffusers does.
///
/// # Errors
/// [`Error::InvalidArgument`] when a tensor's value count does not match its shape or a key
/// repeats; [`Error::Safetensors`] when serialisation fails; [`Error::Io`] when writing fails.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[NamedTensor],
    dtype: SaveDtype,
) -> Result<()> {
    let path = path.as_ref();
    let mut encoded: Vec<(&str, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    let mut seen = std::collections::BTreeSet::new();
    for t in tensors {
        let count: usize = t.shape.iter().product();
        if count != t.values.len() {
            return Err(Error::invalid_argument(
                "tensors",
                format!(
                    "`{}` has {} values for shape {:?}",
                    t.key,
                    t.values.len(),
                    t.shape
                ),
            ));
        }
        if !seen.insert(t.key.as_str()) {
            return Err(Error::invalid_argument(
                "tensors",
                format!("key `{}` appears twice", t.key),
            ));
        }
        let bytes = match dtype {
            SaveDtype::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            SaveDtype::F16 => t
                .values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            SaveDtype::BF16 => t
                .values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        encoded.push((t.key.as_str(), t.shape.clone(), bytes));
    }
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::F16 => Dtype::F16,
        SaveDtype::BF16 => Dtype::BF16,
    };
    let views = encoded
        .iter()
        .map(|(key, shape, bytes)| {
            TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|view| (*key, view))
                .map_err(|e| corrupt(path, format!("`{key}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| corrupt(path, e.to_string()))?;
    write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("w.safetensors");
        let tensors = vec![
            NamedTensor {
                key: "a.weight".into(),
                shape: vec![2, 3],
                values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5],
            },
            NamedTensor {
                key: "b".into(),
                shape: vec![1],
                values: vec![-0.25],
            },
        ];
        write_safetensors(&path, &tensors, SaveDtype::F32).unwrap();
        path
    }

    #[test]
    fn round_trip_f32_and_f16() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let source = WeightSource::open(&path).unwrap();
        assert_eq!(source.keys().collect::<Vec<_>>(), ["a.weight", "b"]);
        let (values, shape) = source.read_f32("a.weight").unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
        let file = &source.files()[0];
        assert_eq!(file.user_metadata().unwrap()["format"], "pt");

        let half_path = dir.path().join("h.safetensors");
        let t = NamedTensor {
            key: "x".into(),
            shape: vec![3],
            values: vec![0.1, 1.0, -2.5],
        };
        write_safetensors(&half_path, &[t], SaveDtype::F16).unwrap();
        let source = WeightSource::open(&half_path).unwrap();
        assert_eq!(source.entry("x").unwrap().dtype, Dtype::F16);
        let (values, _) = source.read_f32("x").unwrap();
        assert_eq!(values, [half::f16::from_f32(0.1).to_f32(), 1.0, -2.5]);
    }

    #[test]
    fn truncated_and_garbage_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        for (name, content) in [
            ("short.safetensors", bytes[..bytes.len() - 3].to_vec()),
            ("tiny.safetensors", bytes[..5].to_vec()),
            ("header.safetensors", bytes[..20].to_vec()),
            ("garbage.safetensors", b"\x05\0\0\0\0\0\0\0hello".to_vec()),
        ] {
            let bad = dir.path().join(name);
            std::fs::write(&bad, content).unwrap();
            match SafetensorsFile::open(&bad) {
                Err(Error::Safetensors { path, .. }) => assert_eq!(path, bad),
                other => panic!("{name}: expected Error::Safetensors, got {other:?}"),
            }
        }
    }

    #[test]
    fn in_memory_tensors() {
        let t = |key: &str, shape: Vec<usize>, values: Vec<f32>| NamedTensor {
            key: key.into(),
            shape,
            values,
        };
        let source =
            WeightSource::from_tensors("ckpt", vec![t("b", vec![2], vec![1.0, 2.0])]).unwrap();
        assert_eq!(source.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(source.entry("b").unwrap().dtype, Dtype::F32);
        assert_eq!(source.read_f32("b").unwrap(), (vec![1.0, 2.0], vec![2]));
        assert!(source.file_of("b").is_none());
        assert!(matches!(
            source.read_f32("c"),
            Err(Error::MissingTensor { path, .. }) if path == Path::new("ckpt")
        ));
        let twice = vec![t("a", vec![1], vec![0.0]), t("a", vec![1], vec![0.0])];
        assert!(WeightSource::from_tensors("ckpt", twice).is_err());
        assert!(WeightSource::from_tensors("ckpt", vec![t("a", vec![3], vec![0.0])]).is_err());
    }

    #[test]
    fn read_data_keeps_stored_bytes_or_rounds_to_the_requested_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let values = vec![0.1f32, 1.0, -2.5, 65519.0, 1e-6, 3.3e38];
        let x = |values: &[f32]| NamedTensor {
            key: "x".into(),
            shape: vec![2, 3],
            values: values.to_vec(),
        };
        let f32_path = dir.path().join("f.safetensors");
        write_safetensors(&f32_path, &[x(&values)], SaveDtype::F32).unwrap();
        let half_path = dir.path().join("h.safetensors");
        write_safetensors(&half_path, &[x(&values)], SaveDtype::F16).unwrap();
        let from_f32 = WeightSource::open(&f32_path).unwrap();
        let from_f16 = WeightSource::open(&half_path).unwrap();

        let data = from_f32.read_data("x", FloatDType::F32).unwrap();
        assert_eq!(data.dtype(), DType::F32);
        assert_eq!(data.shape().to_vec(), [2, 3]);
        assert_eq!(data.as_slice::<f32>().unwrap(), values.as_slice());

        // f32 file to f16 and bf16: round to nearest even, as `half` (and a tensor cast) does.
        let data = from_f32.read_data("x", FloatDType::F16).unwrap();
        assert_eq!(data.dtype(), DType::F16);
        let expected: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        assert_eq!(data.as_slice::<half::f16>().unwrap(), expected.as_slice());
        let data = from_f32.read_data("x", FloatDType::BF16).unwrap();
        let expected: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
        assert_eq!(data.as_slice::<half::bf16>().unwrap(), expected.as_slice());

        // An f16 file read as f16 gives its bits back; read as f32 they widen exactly.
        let (stored, _) = from_f16.read_f32("x").unwrap();
        let data = from_f16.read_data("x", FloatDType::F16).unwrap();
        let bits: Vec<half::f16> = stored.iter().map(|&v| half::f16::from_f32(v)).collect();
        assert_eq!(data.as_slice::<half::f16>().unwrap(), bits.as_slice());
        let data = from_f16.read_data("x", FloatDType::F32).unwrap();
        assert_eq!(data.as_slice::<f32>().unwrap(), stored.as_slice());

        // In-memory sources convert the same way; other dtypes and keys are refused by name.
        let memory = WeightSource::from_tensors("ckpt", vec![x(&values)]).unwrap();
        let data = memory.read_data("x", FloatDType::F16).unwrap();
        let expected: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        assert_eq!(data.as_slice::<half::f16>().unwrap(), expected.as_slice());
        assert!(matches!(
            memory.read_data("x", FloatDType::F64),
            Err(Error::InvalidArgument { name, .. }) if name == "dtype"
        ));
        assert!(matches!(
            from_f16.read_data("y", FloatDType::F16),
            Err(Error::MissingTensor { key, .. }) if key == "y"
        ));
    }

    #[test]
    fn missing_key_and_wrong_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let source = WeightSource::open(&path).unwrap();
        match source.read_f32("nope") {
            Err(Error::MissingTensor { key, path: p }) => {
                assert_eq!(key, "nope");
                assert_eq!(p, path);
            }
            other => panic!("{other:?}"),
        }
        let bytes = [1i64, 2]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>();
        let view = TensorView::new(Dtype::I64, vec![2], &bytes).unwrap();
        let ints = dir.path().join("i.safetensors");
        std::fs::write(
            &ints,
            safetensors::serialize([("ids", view)], None).unwrap(),
        )
        .unwrap();
        let source = WeightSource::open(&ints).unwrap();
        assert!(matches!(
            source.read_f32("ids"),
            Err(Error::TensorDtype { key, .. }) if key == "ids"
        ));
    }

    #[test]
    fn resolve_prefers_the_index_then_the_single_file_and_names_what_it_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        match resolve_weights(dir.path(), None) {
            Err(Error::NotFound { path, message }) => {
                assert_eq!(path, dir.path());
                assert!(message.contains(WEIGHTS_NAME) && message.contains(WEIGHTS_INDEX_NAME));
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(
            dir.path().join("diffusion_pytorch_model.fp16.safetensors"),
            b"",
        )
        .unwrap();
        let err = resolve_weights(dir.path(), None).unwrap_err().to_string();
        assert!(
            err.contains("diffusion_pytorch_model.fp16.safetensors"),
            "{err}"
        );
        assert_eq!(
            resolve_weights(dir.path(), Some("fp16")).unwrap(),
            dir.path().join("diffusion_pytorch_model.fp16.safetensors")
        );
        std::fs::write(dir.path().join(WEIGHTS_NAME), b"").unwrap();
        assert_eq!(
            resolve_weights(dir.path(), None).unwrap(),
            dir.path().join(WEIGHTS_NAME)
        );
        std::fs::write(dir.path().join(WEIGHTS_INDEX_NAME), b"{}").unwrap();
        assert_eq!(
            resolve_weights(dir.path(), None).unwrap(),
            dir.path().join(WEIGHTS_INDEX_NAME)
        );
        let legacy = "diffusion_pytorch_model.safetensors.fp16.index.json";
        std::fs::write(dir.path().join(legacy), b"{}").unwrap();
        assert_eq!(
            resolve_weights(dir.path(), Some("fp16")).unwrap(),
            dir.path().join(legacy)
        );
    }

    #[test]
    fn shards_merge_and_reject_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let one = NamedTensor {
            key: "a".into(),
            shape: vec![1],
            values: vec![1.0],
        };
        let two = NamedTensor {
            key: "b".into(),
            shape: vec![2],
            values: vec![2.0, 3.0],
        };
        write_safetensors(
            dir.path().join("s1.safetensors"),
            std::slice::from_ref(&one),
            SaveDtype::F32,
        )
        .unwrap();
        write_safetensors(dir.path().join("s2.safetensors"), &[two], SaveDtype::F32).unwrap();
        let index = dir.path().join("m.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
        )
        .unwrap();
        let source = WeightSource::open(&index).unwrap();
        assert_eq!(source.len(), 2);
        assert_eq!(
            source.file_of("b").unwrap(),
            dir.path().join("s2.safetensors")
        );
        assert_eq!(source.read_f32("b").unwrap().0, [2.0, 3.0]);

        std::fs::write(
            &index,
            r#"{"weight_map": {"a": "s1.safetensors", "c": "s2.safetensors"}}"#,
        )
        .unwrap();
        match WeightSource::open(&index) {
            Err(Error::MissingTensor { key, path }) => {
                assert_eq!(key, "c");
                assert_eq!(path, dir.path().join("s2.safetensors"));
            }
            other => panic!("{other:?}"),
        }

        write_safetensors(dir.path().join("s3.safetensors"), &[one], SaveDtype::F32).unwrap();
        let files = vec![
            SafetensorsFile::open(dir.path().join("s1.safetensors")).unwrap(),
            SafetensorsFile::open(dir.path().join("s3.safetensors")).unwrap(),
        ];
        assert!(matches!(
            WeightSource::from_files(&index, files),
            Err(Error::Safetensors { .. })
        ));
    }

    #[test]
    fn rename_keys_and_collisions() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = WeightSource::open(sample(dir.path())).unwrap();
        source
            .rename_keys(|k| k.strip_prefix("a.").map(|rest| format!("z.{rest}")))
            .unwrap();
        assert_eq!(source.keys().collect::<Vec<_>>(), ["b", "z.weight"]);
        assert_eq!(source.read_f32("z.weight").unwrap().1, [2, 3]);
        assert!(source.rename_keys(|_| Some("same".into())).is_err());
    }
}
