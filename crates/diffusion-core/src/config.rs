//! Config plumbing: serde mirrors of diffusers' `config.json`, `scheduler_config.json` and
//! `model_index.json`.
//!
//! A config struct implements [`Config`]; its `Default` is the Python `__init__` default, so a
//! file with missing keys loads exactly as diffusers would load it. [`ConfigFile`] wraps a parsed
//! config together with what else the file said: `_class_name`, `_diffusers_version`, other
//! private `_` keys, and keys this port does not know. Unknown keys are kept so that saving writes
//! them back, and reported with a warning, because a key we ignore may change the maths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The diffusers version this port mirrors; written as `_diffusers_version` when saving.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// A config that mirrors one diffusers class's `__init__` arguments.
pub trait Config: Serialize + DeserializeOwned + Default + Clone {
    /// The diffusers class name written as `_class_name` (e.g. `"UNet2DModel"`).
    const CLASS_NAME: &'static str;

    /// Check relations between fields that serde cannot express (list lengths agree, ...).
    ///
    /// # Errors
    /// `Err((field, message))` naming the offending field.
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        Ok(())
    }

    /// The config keys this struct understands.
    fn known_keys() -> BTreeSet<String> {
        match serde_json::to_value(Self::default()) {
            Ok(Value::Object(map)) => map.into_iter().map(|(k, _)| k).collect(),
            _ => BTreeSet::new(),
        }
    }
}

/// A parsed config plus everything else its file held.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigFile<T> {
    /// The typed config, with diffusers' defaults for missing keys.
    pub config: T,
    /// `_class_name` as written in the file, if any.
    pub class_name: Option<String>,
    /// `_diffusers_version` as written in the file, if any.
    pub diffusers_version: Option<String>,
    /// Other private keys (`_name_or_path`, `_use_default_values`, ...), kept for round trips.
    pub private: Map<String, Value>,
    /// Keys this port does not know, kept for round trips and reported as warnings.
    pub unknown: Map<String, Value>,
}

impl<T: Config> ConfigFile<T> {
    /// Wrap a config built in code, as diffusers' `register_to_config` would write it.
    pub fn new(config: T) -> Self {
        Self {
            config,
            class_name: Some(T::CLASS_NAME.to_string()),
            diffusers_version: Some(DIFFUSERS_VERSION.to_string()),
            private: Map::new(),
            unknown: Map::new(),
        }
    }

    /// Parse a JSON value that came from `origin` (used in error messages).
    ///
    /// # Errors
    /// [`Error::ConfigField`] naming the field for wrong types or invalid values.
    pub fn from_value(value: Value, origin: &Path) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(Error::ConfigField {
                path: origin.to_path_buf(),
                field: "<root>".into(),
                message: "a config must be a JSON object".into(),
            });
        };
        let known = T::known_keys();
        let mut typed = Map::new();
        let mut private = Map::new();
        let mut unknown = Map::new();
        let mut class_name = None;
        let mut diffusers_version = None;
        for (key, v) in map {
            match key.as_str() {
                "_class_name" => class_name = v.as_str().map(str::to_string),
                "_diffusers_version" => diffusers_version = v.as_str().map(str::to_string),
                k if k.starts_with('_') => {
                    private.insert(key, v);
                }
                k if known.contains(k) => {
                    typed.insert(key, v);
                }
                _ => {
                    unknown.insert(key, v);
                }
            }
        }
        let config: T = serde_path_to_error::deserialize(Value::Object(typed)).map_err(|e| {
            let field = e.path().to_string();
            Error::ConfigField {
                path: origin.to_path_buf(),
                field: if field == "." { "<root>".into() } else { field },
                message: e.into_inner().to_string(),
            }
        })?;
        config
            .validate()
            .map_err(|(field, message)| Error::ConfigField {
                path: origin.to_path_buf(),
                field,
                message,
            })?;
        if !unknown.is_empty() {
            let keys: Vec<&str> = unknown.keys().map(String::as_str).collect();
            log::warn!(
                "{}: keys not used by {}: {}",
                origin.display(),
                T::CLASS_NAME,
                keys.join(", ")
            );
        }
        Ok(Self {
            config,
            class_name,
            diffusers_version,
            private,
            unknown,
        })
    }

    /// Parse JSON text that came from `origin`.
    ///
    /// # Errors
    /// [`Error::Json`] with line and column for malformed JSON, else as [`Self::from_value`].
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        Self::from_value(parse_json(text, origin)?, origin)
    }

    /// Read a config file (`config.json`, `scheduler_config.json`).
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, else as [`Self::from_json_str`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_value(read_json(path)?, path)
    }

    /// Names of the keys that were kept but not understood.
    pub fn unknown_keys(&self) -> Vec<&str> {
        self.unknown.keys().map(String::as_str).collect()
    }

    /// The whole file as JSON: typed fields, unknown keys and private keys, sorted by key as
    /// diffusers writes them.
    pub fn to_value(&self) -> Value {
        let mut out: BTreeMap<String, Value> = BTreeMap::new();
        if let Ok(Value::Object(map)) = serde_json::to_value(&self.config) {
            out.extend(map);
        }
        for (k, v) in self.unknown.iter().chain(self.private.iter()) {
            out.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let class_name = self.class_name.as_deref().unwrap_or(T::CLASS_NAME);
        out.insert("_class_name".into(), Value::String(class_name.into()));
        let version = self
            .diffusers_version
            .as_deref()
            .unwrap_or(DIFFUSERS_VERSION);
        out.insert("_diffusers_version".into(), Value::String(version.into()));
        Value::Object(out.into_iter().collect())
    }

    /// The file's text: two-space indented, sorted keys, trailing newline.
    pub fn to_json_string(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.to_value()).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Write the config file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        write_atomically(path, self.to_json_string().as_bytes())
    }

    /// Re-read this config as another class's config, as diffusers' `from_config` does when
    /// swapping schedulers: shared keys carry over, the rest get the new class's defaults, and
    /// `overrides` win over both.
    ///
    /// # Errors
    /// As [`Self::from_value`] for the merged JSON.
    pub fn convert<U: Config>(&self, overrides: &Map<String, Value>) -> Result<ConfigFile<U>> {
        let mut value = self.to_value();
        if let Value::Object(map) = &mut value {
            map.remove("_class_name");
            for (k, v) in overrides {
                map.insert(k.clone(), v.clone());
            }
        }
        let mut out = ConfigFile::<U>::from_value(value, Path::new("<from_config>"))?;
        out.class_name = Some(U::CLASS_NAME.to_string());
        Ok(out)
    }
}

/// Read and parse a JSON file as diffusers writes it (see [`parse_json`]).
///
/// # Errors
/// [`Error::Io`] when the file cannot be read, else as [`parse_json`].
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json(&text, path)
}

/// Parse JSON as Python's `json` module writes it: bare `Infinity`, `-Infinity` and `NaN` become
/// the strings `"Infinity"`, ... (see [`crate::python_json`]); syntax errors become
/// [`Error::Json`] with their position.
///
/// # Errors
/// [`Error::Json`].
pub fn parse_json(text: &str, origin: &Path) -> Result<Value> {
    let text = crate::python_json::quote_nonfinite_tokens(text);
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: origin.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

/// Write a file through a temporary sibling and a rename, so a failure never leaves half a file.
///
/// # Errors
/// [`Error::Io`] naming `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// One entry of `model_index.json`: `["diffusers", "UNet2DConditionModel"]`, or `[null, null]` for
/// an optional component that is absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentSpec {
    /// The Python library (`"diffusers"`, `"transformers"`), `None` for an absent component.
    pub library: Option<String>,
    /// The class name, `None` for an absent component.
    pub class_name: Option<String>,
}

/// A pipeline's `model_index.json`: which component lives in which sub-folder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelIndex {
    /// The pipeline class (`"StableDiffusionPipeline"`).
    pub class_name: String,
    /// `_diffusers_version` as written.
    pub diffusers_version: Option<String>,
    /// Components by folder name.
    pub components: BTreeMap<String, ComponentSpec>,
    /// Non-component entries (`requires_safety_checker`, `force_zeros_for_empty_prompt`, ...).
    pub options: Map<String, Value>,
    /// Other private keys (`_name_or_path`), kept for round trips.
    pub private: Map<String, Value>,
}

impl ModelIndex {
    /// Parse `model_index.json` text that came from `origin`.
    ///
    /// # Errors
    /// [`Error::Json`] for malformed JSON, [`Error::ConfigField`] for a missing `_class_name`
    /// or a malformed component entry.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let field_err = |field: &str, message: &str| Error::ConfigField {
            path: origin.to_path_buf(),
            field: field.to_string(),
            message: message.to_string(),
        };
        let Value::Object(map) = parse_json(text, origin)? else {
            return Err(field_err(
                "<root>",
                "model_index.json must be a JSON object",
            ));
        };
        let mut class_name = None;
        let mut diffusers_version = None;
        let mut components = BTreeMap::new();
        let mut options = Map::new();
        let mut private = Map::new();
        for (key, value) in map {
            match key.as_str() {
                "_class_name" => {
                    class_name = Some(
                        value
                            .as_str()
                            .ok_or_else(|| field_err("_class_name", "expected a string"))?
                            .to_string(),
                    )
                }
                "_diffusers_version" => diffusers_version = value.as_str().map(str::to_string),
                k if k.starts_with('_') => {
                    private.insert(key, value);
                }
                _ => match &value {
                    Value::Array(items) if items.len() == 2 => {
                        let part = |v: &Value| -> Result<Option<String>> {
                            match v {
                                Value::Null => Ok(None),
                                Value::String(s) => Ok(Some(s.clone())),
                                _ => Err(field_err(
                                    &key,
                                    "a component entry is [library, class] of strings or nulls",
                                )),
                            }
                        };
                        components.insert(
                            key.clone(),
                            ComponentSpec {
                                library: part(&items[0])?,
                                class_name: part(&items[1])?,
                            },
                        );
                    }
                    _ => {
                        options.insert(key, value);
                    }
                },
            }
        }
        Ok(Self {
            class_name: class_name
                .ok_or_else(|| field_err("_class_name", "missing: which pipeline is this?"))?,
            diffusers_version,
            components,
            options,
            private,
        })
    }

    /// Read `model_index.json`.
    ///
    /// # Errors
    /// [`Error::Io`], else as [`Self::from_json_str`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// The JSON value, sorted by key as diffusers writes it.
    pub fn to_value(&self) -> Value {
        let mut out: BTreeMap<String, Value> = BTreeMap::new();
        out.insert("_class_name".into(), Value::String(self.class_name.clone()));
        let version = self
            .diffusers_version
            .as_deref()
            .unwrap_or(DIFFUSERS_VERSION);
        out.insert("_diffusers_version".into(), Value::String(version.into()));
        for (k, v) in self.private.iter().chain(self.options.iter()) {
            out.insert(k.clone(), v.clone());
        }
        for (name, spec) in &self.components {
            let s = |o: &Option<String>| o.clone().map(Value::String).unwrap_or(Value::Null);
            out.insert(
                name.clone(),
                Value::Array(vec![s(&spec.library), s(&spec.class_name)]),
            );
        }
        Value::Object(out.into_iter().collect())
    }

    /// Write `model_index.json`.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut s = serde_json::to_string_pretty(&self.to_value()).unwrap_or_default();
        s.push('\n');
        write_atomically(path.as_ref(), s.as_bytes())
    }
}
