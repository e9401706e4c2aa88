//! PyTorch's zip checkpoint format (`torch.save` since 1.6, what `.ckpt` files are): an archive
//! `<name>/data.pkl` (the pickled object, read with the restricted [`pickle`] reader),
//! `<name>/data/<key>` (one raw little-endian storage per key) and `<name>/byteorder`.
//!
//! Opening reads and parses only the pickle; tensors are read one at a time from their storage
//! entries.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use diffusion_core::{Error, Result};

use super::pickle::{self, StorageDtype, TensorRef, Value};

/// The pickle of a real checkpoint is a few MB at most; refuse absurd sizes before allocating.
const MAX_PICKLE_LEN: u64 = 256 << 20;
/// Deflate cannot expand data more than about 1032 times; a larger claim is a forged header.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// A `torch.save` zip archive whose pickle has been parsed without executing anything.
#[derive(Debug)]
pub struct TorchCheckpoint {
    path: PathBuf,
    archive: Mutex<zip::ZipArchive<BufReader<File>>>,
    prefix: String,
    tensors: BTreeMap<String, TensorRef>,
    global_step: Option<i64>,
}

fn corrupt(path: &Path, message: impl Into<String>) -> Error {
    Error::Pickle {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// How deep nested dicts are searched for tensors (A1111 embeddings keep theirs one level down,
/// in `string_to_param`).
const MAX_NESTING: usize = 4;

/// The tensors of a dict's entries under their keys; tensors in nested dicts are named
/// `outer.inner` (as safetensors files name them). Other values are skipped.
fn collect_tensors(
    entries: Vec<(Value, Value)>,
    prefix: &str,
    depth: usize,
    out: &mut BTreeMap<String, TensorRef>,
) {
    for (key, value) in entries {
        let Value::Str(key) = key else { continue };
        let name = format!("{prefix}{key}");
        match value {
            Value::Tensor(t) => {
                out.insert(name, t);
            }
            nested @ Value::Dict(_) if depth < MAX_NESTING => {
                if let Some(inner) = nested.dict_entries() {
                    collect_tensors(inner, &format!("{name}."), depth + 1, out);
                }
            }
            _ => {}
        }
    }
}

impl TorchCheckpoint {
    /// Open an archive and parse its pickle. The state dict is the top-level dict, or the
    /// value under `"state_dict"` (repeatedly, as diffusers unwraps it); tensors in dicts nested
    /// inside it are named `outer.inner`; non-tensor entries are skipped. `global_step` is read from the top level when present.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Pickle`] naming the path when it is
    /// not a zip archive (legacy pre-1.6 `torch.save` files included), has no `data.pkl`, is
    /// truncated, or its pickle is malformed; [`Error::UnsafePickle`] naming the global when the
    /// pickle would call anything outside the tensor-rebuild allow-list.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
        if n < 4 || &magic != b"PK\x03\x04" {
            return Err(corrupt(
                path,
                "not a zip archive: only the zip format of torch.save (PyTorch >= 1.6) is read; \
                 legacy pickles are refused",
            ));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut archive = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| corrupt(path, format!("unreadable zip archive (truncated?): {e}")))?;
        let pkl_name = archive
            .file_names()
            .filter(|n| n.ends_with("data.pkl"))
            .min_by_key(|n| n.len())
            .map(str::to_string)
            .ok_or_else(|| corrupt(path, "the archive has no data.pkl"))?;
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        if let Ok(mut entry) = archive.by_name(&format!("{prefix}byteorder")) {
            let mut order = String::new();
            entry
                .read_to_string(&mut order)
                .map_err(|e| corrupt(path, format!("byteorder: {e}")))?;
            if order.trim() != "little" {
                return Err(corrupt(
                    path,
                    format!("byte order `{}` is not supported", order.trim()),
                ));
            }
        }
        let bytes = {
            let entry = archive
                .by_name(&pkl_name)
                .map_err(|e| corrupt(path, format!("{pkl_name}: {e}")))?;
            let mut bytes = Vec::new();
            entry
                .take(MAX_PICKLE_LEN + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| corrupt(path, format!("{pkl_name}: {e} (truncated?)")))?;
            if bytes.len() as u64 > MAX_PICKLE_LEN {
                return Err(corrupt(
                    path,
                    format!("{pkl_name} is larger than {MAX_PICKLE_LEN} bytes"),
                ));
            }
            bytes
        };
        let root = pickle::parse(&bytes, path)?;
        let global_step = match root.get("global_step") {
            Some(Value::Int(step)) => Some(step),
            _ => None,
        };
        let mut dict = root;
        while let Some(inner @ Value::Dict(_)) = dict.get("state_dict") {
            dict = inner;
        }
        let entries = dict
            .dict_entries()
            .ok_or_else(|| corrupt(path, "the pickle does not hold a dict of tensors"))?;
        let mut tensors = BTreeMap::new();
        collect_tensors(entries, "", 0, &mut tensors);
        Ok(Self {
            path: path.to_path_buf(),
            archive: Mutex::new(archive),
            prefix,
            tensors,
            global_step,
        })
    }

    /// The file this checkpoint was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint's `global_step`, when it stored one.
    pub fn global_step(&self) -> Option<i64> {
        self.global_step
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's description.
    pub fn tensor(&self, key: &str) -> Option<&TensorRef> {
        self.tensors.get(key)
    }

    /// A float tensor converted to `f32`, row-major, with its shape.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] for an absent key; [`Error::TensorDtype`] for an integer
    /// tensor; [`Error::Pickle`] naming the key when its storage entry is missing or shorter
    /// than the pickle says (a truncated file).
    pub fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            key: key.to_string(),
        })?;
        let decode: fn(&[u8]) -> f32 = match t.dtype {
            StorageDtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageDtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::F64 => |b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                f64::from_le_bytes(a) as f32
            },
            other => {
                return Err(Error::TensorDtype {
                    path: self.path.clone(),
                    key: key.to_string(),
                    dtype: other.name().to_string(),
                });
            }
        };
        let size = t.dtype.size();
        let storage = self.read_storage(key, t)?;
        let count: usize = t.shape.iter().product();
        let mut values = Vec::with_capacity(count);
        if count > 0 {
            let mut index = vec![0usize; t.shape.len()];
            for _ in 0..count {
                let element = t.offset
                    + index
                        .iter()
                        .zip(&t.stride)
                        .map(|(i, s)| i * s)
                        .sum::<usize>();
                values.push(decode(&storage[element * size..(element + 1) * size]));
                for d in (0..index.len()).rev() {
                    index[d] += 1;
                    if index[d] < t.shape[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
        }
        Ok((values, t.shape.clone()))
    }

    fn read_storage(&self, key: &str, t: &TensorRef) -> Result<Vec<u8>> {
        let name = format!("{}data/{}", self.prefix, t.storage);
        let expected = t.storage_len.checked_mul(t.dtype.size()).ok_or_else(|| {
            corrupt(
                &self.path,
                format!("tensor `{key}`: storage size overflows"),
            )
        })?;
        let mut archive = self
            .archive
            .lock()
            .map_err(|_| corrupt(&self.path, "archive lock poisoned"))?;
        let mut entry = archive.by_name(&name).map_err(|e| {
            corrupt(
                &self.path,
                format!("tensor `{key}`: storage `{name}` is not in the archive: {e}"),
            )
        })?;
        // Sizes in zip headers are the file's claims; bound them by the bytes really stored
        // before allocating.
        let stored = entry.compressed_size();
        let plausible = match entry.compression() {
            zip::CompressionMethod::Stored => stored,
            _ => stored.saturating_mul(MAX_DEFLATE_RATIO),
        };
        if expected as u64 > plausible {
            return Err(corrupt(
                &self.path,
                format!(
                    "tensor `{key}`: storage `{name}` holds {stored} bytes, too few for the \
                     {expected} the pickle says (truncated or forged)"
                ),
            ));
        }
        if entry.size() < expected as u64 {
            return Err(corrupt(
                &self.path,
                format!(
                    "tensor `{key}`: storage `{name}` has {} bytes, the pickle says {expected}",
                    entry.size()
                ),
            ));
        }
        let mut bytes = vec![0u8; expected];
        entry.read_exact(&mut bytes).map_err(|e| {
            corrupt(
                &self.path,
                format!("tensor `{key}`: reading `{name}` failed: {e} (truncated?)"),
            )
        })?;
        Ok(bytes)
    }
}
