//! The error type shared by every crate of the workspace.
//!
//! Variants are structured: they carry the file, the key or field, and what was expected, so a
//! user can fix the input without reading the source.

use std::path::PathBuf;

/// Everything that can go wrong when loading, configuring or running a diffusion component.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[allow(missing_docs)] // variant docs say what the self-describing fields hold
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON.
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    /// A config field has the wrong type or an impossible value.
    #[error("{path}: field `{field}`: {message}")]
    ConfigField {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// A config value is valid diffusers but not supported by this port (never ignored silently).
    #[error("{path}: `{field}` = {value} is not supported: {reason}")]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        reason: String,
    },

    /// A file could not be decoded as an image.
    #[error("{path}: not a readable image: {message}")]
    Image { path: PathBuf, message: String },

    /// A `.npy` file is malformed or holds a type this port cannot read.
    #[error("{path}: bad .npy file: {message}")]
    Npy { path: PathBuf, message: String },

    /// A weights file is not a valid safetensors file (truncated, corrupt header, ...).
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    /// A tensor the model needs is absent from the weights.
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor { path: PathBuf, key: String },

    /// The weights hold tensors the model does not have (strict loading).
    #[error("{path}: {} unexpected tensor(s), e.g. `{}`", keys.len(), keys.first().map(String::as_str).unwrap_or(""))]
    UnexpectedTensors { path: PathBuf, keys: Vec<String> },

    /// A tensor has a different shape than the model expects.
    #[error("{path}: tensor `{key}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A tensor is stored with a dtype that cannot be converted to the compute dtype.
    #[error("{path}: tensor `{key}` has dtype {dtype}, which cannot be loaded")]
    TensorDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },

    /// A pickled PyTorch checkpoint (`.ckpt`, `.pt`, `.bin`) is truncated, corrupt, or uses a
    /// construct a tensor checkpoint never needs.
    #[error("{path}: invalid PyTorch checkpoint: {message}")]
    Pickle { path: PathBuf, message: String },

    /// A pickled checkpoint asks for a Python global outside the tensor-rebuild allow-list
    /// (`os.system`, `builtins.eval`, ...). It was refused while parsing: nothing was executed.
    #[error(
        "{path}: refused to load: the pickle references `{global}`, which is not a tensor-rebuild \
         function (nothing was executed; the file may be malicious)"
    )]
    UnsafePickle { path: PathBuf, global: String },

    /// A textual-inversion token (or one of its `<tok>_i` expansions) is already a word of the
    /// tokenizer.
    #[error(
        "{path}: token {token:?} is already in the tokenizer's vocabulary; pass another token name"
    )]
    TokenInVocabulary { path: PathBuf, token: String },

    /// Textual-inversion vectors whose size is not the text encoder's hidden size.
    #[error(
        "{path}: embedding `{table}` has vectors of size {got}, but the text encoder's hidden size is {expected}"
    )]
    EmbeddingDim {
        path: PathBuf,
        table: String,
        expected: usize,
        got: usize,
    },

    /// A file whose tensors (`keys`: name and shape) match no textual-inversion layout.
    #[error("{path}: not a textual-inversion embedding: {message} (tensors: {})", keys.join(", "))]
    UnknownEmbeddingLayout {
        path: PathBuf,
        keys: Vec<String>,
        message: String,
    },

    /// A checkpoint (single-file model, adapter) whose kind could not be recognised from its keys.
    #[error("{path}: not a recognised checkpoint layout: {message} (looked for `{key}`)")]
    UnknownModelType {
        path: PathBuf,
        key: String,
        message: String,
    },

    /// A function argument is out of range or inconsistent with the others.
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument { name: String, message: String },

    /// A scheduler, model class or alias name is not known.
    #[error("unknown {kind} `{name}`; known: {known}")]
    UnknownName {
        kind: &'static str,
        name: String,
        known: String,
    },

    /// A component could not be found in a model folder or hub repository.
    #[error("{path}: {message}")]
    NotFound { path: PathBuf, message: String },

    /// Fetching from the Hugging Face Hub (or its local cache) failed.
    #[error("hub `{repo}`: {message}")]
    Hub { repo: String, message: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid_argument(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name: name.into(),
            message: message.into(),
        }
    }
}
