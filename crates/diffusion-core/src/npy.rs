//! `.npy` read/write for float arrays, so latents and images can be exchanged with NumPy.
//!
//! Written here rather than taken from a crate: the format is a 10-byte preamble and a Python
//! dict literal, and the crates that read it pull in `ndarray`, which nothing else here needs.
//! Reads little-endian `<f4`, `<f8`, `<f2` (converted to `f32`) in C order; writes `<f4`.

use std::path::Path;

use crate::config::write_atomically;
use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// A float32 array with its shape, in C (row-major) order.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements in row-major order.
    pub data: Vec<f32>,
}

impl NpyArray {
    /// Read a `.npy` file.
    ///
    /// # Errors
    /// [`Error::Io`] when unreadable, [`Error::Npy`] when malformed, Fortran-ordered, big-endian,
    /// or of a dtype other than f2/f4/f8.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|message| Error::Npy {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parse the bytes of a `.npy` file.
    ///
    /// # Errors
    /// A message describing what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < 10 || &bytes[..6] != MAGIC {
            return Err("missing the \\x93NUMPY magic string".into());
        }
        let major = bytes[6];
        let (header_len, header_start) = match major {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 => {
                if bytes.len() < 12 {
                    return Err("truncated header".into());
                }
                let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
                (len as usize, 12)
            }
            v => return Err(format!("unsupported format version {v}")),
        };
        let header_end = header_start + header_len;
        let header = bytes
            .get(header_start..header_end)
            .ok_or("truncated header")?;
        let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
        let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
        let fortran = dict_value(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
        if fortran.trim() != "False" {
            return Err("Fortran-ordered arrays are not supported; save with C order".into());
        }
        let shape_text = dict_value(header, "shape").ok_or("header has no 'shape'")?;
        let shape = parse_shape(shape_text)?;
        let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
        let count: usize = shape.iter().product();
        let body = &bytes[header_end..];
        let elem = match descr {
            "<f4" | "|f4" => 4,
            "<f8" => 8,
            "<f2" => 2,
            other => {
                return Err(format!(
                    "dtype '{other}' is not supported; use little-endian float16/32/64"
                ));
            }
        };
        if body.len() != count * elem {
            return Err(format!(
                "expected {} data bytes for shape {shape:?} of '{descr}', found {}",
                count * elem,
                body.len()
            ));
        }
        let data = match elem {
            4 => body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            8 => body
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            _ => body
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        Ok(Self { shape, data })
    }

    /// The bytes of a version 1.0 `<f4` `.npy` file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!(
                "({})",
                self.shape
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        // Pad with spaces so that the data starts on a 64-byte boundary, ending in a newline.
        let unpadded = MAGIC.len() + 4 + header.len() + 1;
        header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + self.data.len() * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Write a `.npy` file atomically.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when shape and data disagree, [`Error::Io`] on write failure.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let count: usize = self.shape.iter().product();
        if count != self.data.len() {
            return Err(Error::invalid_argument(
                "array",
                format!(
                    "shape {:?} holds {count} elements but {} were given",
                    self.shape,
                    self.data.len()
                ),
            ));
        }
        write_atomically(path.as_ref(), &self.to_bytes())
    }
}

/// The raw text of `'key': value` in a Python dict literal, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[pos + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

fn parse_shape(text: &str) -> std::result::Result<Vec<usize>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("shape '{text}' is not a tuple"))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("bad dimension '{s}' in shape"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for shape in [vec![3], vec![2, 3], vec![1, 4, 2, 2], vec![]] {
            let n: usize = shape.iter().product();
            let a = NpyArray {
                shape: shape.clone(),
                data: (0..n).map(|i| i as f32 * 0.5 - 1.0).collect(),
            };
            let bytes = a.to_bytes();
            assert_eq!(
                (10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64,
                0
            );
            assert_eq!(NpyArray::from_bytes(&bytes).unwrap(), a);
        }
    }

    #[test]
    fn rejects_truncated_data() {
        let a = NpyArray {
            shape: vec![4],
            data: vec![1.0; 4],
        };
        let bytes = a.to_bytes();
        let err = NpyArray::from_bytes(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(err.contains("expected 16 data bytes"), "{err}");
        assert!(NpyArray::from_bytes(b"not numpy").is_err());
    }
}
