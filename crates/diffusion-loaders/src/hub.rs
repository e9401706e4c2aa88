//! Resolving a model name to a local folder: a path on disk, or a Hugging Face Hub repository
//! fetched into (or read from) the standard cache with `hf-hub`.
//!
//! Offline use works from the cache: set `HF_HUB_OFFLINE=1` (as in Python) or
//! [`HubOptions::offline`], and a repository downloaded before is found without any network.

use std::path::{Path, PathBuf};

use diffusion_core::burn::tensor::FloatDType;
use diffusion_core::{Error, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// How to reach the Hub, and how to load what it names (`from_pretrained`'s keyword arguments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubOptions {
    /// Branch, tag or commit (`"main"`).
    pub revision: String,
    /// Never touch the network; only the cache. Defaults to `HF_HUB_OFFLINE` being set.
    pub offline: bool,
    /// The cache root; defaults to hf-hub's (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Weight variant to prefer (`"fp16"` picks `*.fp16.safetensors` where a component has it).
    pub variant: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
    /// The dtype to load the models in (`torch_dtype`): each weight is converted on the host
    /// as it is read, so `Some(F16)` puts no f32 copy of the model on the device. `None`
    /// loads in f32. Models loaded this way equal loading in f32 and casting.
    pub dtype: Option<FloatDType>,
}

impl Default for HubOptions {
    fn default() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self {
            revision: "main".into(),
            offline,
            cache_dir: None,
            variant: None,
            progress: true,
            dtype: None,
        }
    }
}

/// `owner/name` with no path-like parts: what the Hub calls a repository id.
pub fn looks_like_repo_id(name: &str) -> bool {
    let mut parts = name.split('/');
    let valid = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if valid(a) && valid(b))
}

/// A local path as is, or a Hub repository id resolved to its snapshot folder in the cache
/// (downloading what a diffusers pipeline needs unless offline).
///
/// # Errors
/// [`Error::NotFound`] for a name that is neither an existing path nor a repository id,
/// [`Error::Hub`] when the repository cannot be fetched or (offline) is not in the cache.
pub fn resolve_model_dir(name: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(name);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(name) {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            message: "no such file or folder, and not a Hub repository id (owner/name)".into(),
        });
    }
    snapshot(name, options)
}

fn cache(options: &HubOptions) -> Cache {
    options
        .cache_dir
        .clone()
        .map(Cache::new)
        .unwrap_or_else(Cache::from_env)
}

/// The snapshot folder holding a repository's files, fetching them first unless offline.
///
/// # Errors
/// [`Error::Hub`] naming the repository.
pub fn snapshot(repo_id: &str, options: &HubOptions) -> Result<PathBuf> {
    fetch_snapshot(repo_id, options, true)
}

/// A local folder as is, or a Hub repository's configs and tokenizer files only (no weights):
/// what a single-file checkpoint needs besides its tensors (diffusers' `config=`).
///
/// # Errors
/// As [`resolve_model_dir`].
pub fn resolve_config_dir(name: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(name);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(name) {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            message: "no such folder, and not a Hub repository id (owner/name)".into(),
        });
    }
    fetch_snapshot(name, options, false)
}

fn fetch_snapshot(repo_id: &str, options: &HubOptions, with_weights: bool) -> Result<PathBuf> {
    let hub_err = |message: String| Error::Hub {
        repo: repo_id.to_string(),
        message,
    };
    let repo = Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        options.revision.clone(),
    );
    let cached = cache(options).repo(repo.clone());
    if options.offline {
        // A pipeline has model_index.json at its root, a single model config.json.
        for marker in ["model_index.json", "config.json", "scheduler_config.json"] {
            if let Some(file) = cached.get(marker) {
                return snapshot_root(&file, marker)
                    .ok_or_else(|| hub_err("malformed cache entry".into()));
            }
        }
        return Err(hub_err(format!(
            "not in the cache at {} and offline mode is on (HF_HUB_OFFLINE); download it once \
             with network access or give a local folder",
            cache(options).path().display()
        )));
    }
    let api = ApiBuilder::from_cache(cache(options))
        .with_progress(options.progress)
        .build()
        .map_err(|e| hub_err(e.to_string()))?;
    let remote = api.repo(repo);
    let info = remote.info().map_err(|e| hub_err(e.to_string()))?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut wanted = files_to_fetch(&names, options.variant.as_deref());
    if !with_weights {
        wanted.retain(|n| !n.ends_with(".safetensors"));
    }
    if wanted.is_empty() {
        return Err(hub_err(
            "the repository has no diffusers config or safetensors files".into(),
        ));
    }
    let mut root = None;
    for name in &wanted {
        let local = remote
            .get(name)
            .map_err(|e| hub_err(format!("{name}: {e}")))?;
        root = root.or_else(|| snapshot_root(&local, name));
    }
    root.ok_or_else(|| hub_err("could not locate the downloaded snapshot".into()))
}

/// One weight file of an adapter (LoRA, IP-Adapter): `name` is a file, a folder, or a Hub
/// repository id; `subfolder` / `weight_name` locate the file inside a folder or repository
/// (diffusers' `load_lora_weights(repo, weight_name=...)`, `load_ip_adapter(repo, subfolder,
/// weight_name)`). Without `weight_name`, `default_name` is used when present, else the
/// folder's only `.safetensors` file.
///
/// # Errors
/// [`Error::NotFound`] for a missing file, a name that is neither a path nor a repository id,
/// or (no `weight_name`) a folder where the file cannot be told: none or several candidates;
/// [`Error::Hub`] when the repository or file cannot be fetched or (offline) is not cached.
pub fn resolve_weight_file(
    name: &str,
    subfolder: Option<&str>,
    weight_name: Option<&str>,
    default_name: &str,
    options: &HubOptions,
) -> Result<PathBuf> {
    let path = Path::new(name);
    if path.is_file() {
        if subfolder.is_some() || weight_name.is_some() {
            return Err(Error::invalid_argument(
                "weight_name",
                format!(
                    "{} is a file; subfolder and weight_name only apply to folders and \
                     repositories",
                    path.display()
                ),
            ));
        }
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let dir = match subfolder {
            Some(sub) => path.join(sub),
            None => path.to_path_buf(),
        };
        let file = match weight_name {
            Some(w) => dir.join(w),
            None => {
                let names: Vec<String> = std::fs::read_dir(&dir)
                    .map_err(|e| Error::io(&dir, e))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                dir.join(guess_weight_name(
                    &names,
                    default_name,
                    &dir.display().to_string(),
                )?)
            }
        };
        if !file.is_file() {
            return Err(Error::NotFound {
                path: file,
                message: "no such weight file".into(),
            });
        }
        return Ok(file);
    }
    if !looks_like_repo_id(name) {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            message: "no such file or folder, and not a Hub repository id (owner/name)".into(),
        });
    }
    let hub_err = |message: String| Error::Hub {
        repo: name.to_string(),
        message,
    };
    let join = |file: &str| match subfolder {
        Some(sub) => format!("{}/{file}", sub.trim_end_matches('/')),
        None => file.to_string(),
    };
    let repo = Repo::with_revision(name.to_string(), RepoType::Model, options.revision.clone());
    if options.offline {
        let cached = cache(options).repo(repo);
        let wanted = join(weight_name.unwrap_or(default_name));
        return cached.get(&wanted).ok_or_else(|| {
            hub_err(format!(
                "`{wanted}` is not in the cache at {} and offline mode is on (HF_HUB_OFFLINE)",
                cache(options).path().display()
            ))
        });
    }
    let api = ApiBuilder::from_cache(cache(options))
        .with_progress(options.progress)
        .build()
        .map_err(|e| hub_err(e.to_string()))?;
    let remote = api.repo(repo);
    let relative = match weight_name {
        Some(w) => join(w),
        None => {
            let info = remote.info().map_err(|e| hub_err(e.to_string()))?;
            let prefix = subfolder.map(|s| format!("{}/", s.trim_end_matches('/')));
            let names: Vec<String> = info
                .siblings
                .into_iter()
                .filter_map(|s| match &prefix {
                    Some(p) => s.rfilename.strip_prefix(p.as_str()).map(str::to_string),
                    None => Some(s.rfilename),
                })
                .filter(|n| !n.contains('/'))
                .collect();
            join(&guess_weight_name(&names, default_name, name)?)
        }
    };
    remote
        .get(&relative)
        .map_err(|e| hub_err(format!("{relative}: {e}")))
}

/// diffusers' `_best_guess_weight_name`: `default_name` if present, else the only
/// `.safetensors` file.
fn guess_weight_name(names: &[String], default_name: &str, origin: &str) -> Result<String> {
    if names.iter().any(|n| n == default_name) {
        return Ok(default_name.to_string());
    }
    let candidates: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::NotFound {
            path: PathBuf::from(origin),
            message: format!("no `{default_name}` and no other .safetensors file"),
        }),
        many => Err(Error::NotFound {
            path: PathBuf::from(origin),
            message: format!(
                "several weight files ({}); say which with weight_name",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The snapshot root given one file in it and that file's repository-relative name.
fn snapshot_root(file: &Path, relative: &str) -> Option<PathBuf> {
    let depth = Path::new(relative).components().count();
    let mut root = file.to_path_buf();
    for _ in 0..depth {
        root = root.parent()?.to_path_buf();
    }
    Some(root)
}

/// Which of a repository's files a diffusers loader needs: configs, shard indexes, tokenizer
/// files and safetensors weights, the requested variant where a folder has one, else the plain
/// files. Pickled `.bin`/`.ckpt`, ONNX, Flax and other formats are never fetched.
pub fn files_to_fetch(names: &[String], variant: Option<&str>) -> Vec<String> {
    let is_meta = |n: &str| {
        n.ends_with(".json")
            || n.ends_with("merges.txt")
            || n.ends_with("vocab.txt")
            || n.ends_with(".model")
    };
    let folder = |n: &str| {
        Path::new(n)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    let weights: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    let mut out: Vec<String> = names.iter().filter(|n| is_meta(n)).cloned().collect();
    for name in &weights {
        let dir = folder(name);
        let folder_has_variant = variant.is_some()
            && weights
                .iter()
                .any(|o| folder(o) == dir && weight_variant(o) == variant);
        let wanted = if folder_has_variant { variant } else { None };
        if weight_variant(name) == wanted {
            out.push((*name).clone());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The variant of a weight file: `fp16` for `diffusion_pytorch_model.fp16.safetensors` or
/// `diffusion_pytorch_model.fp16-00001-of-00002.safetensors`, `None` for plain files.
fn weight_variant(name: &str) -> Option<&str> {
    let file = name.rsplit('/').next()?;
    let stem = file.strip_suffix(".safetensors")?;
    let (_, tag) = stem.split_once('.')?;
    Some(tag.split('-').next().unwrap_or(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("google/ddpm-cifar10-32"));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id("plain"));
    }

    #[test]
    fn picks_variant_files_where_present() {
        let names: Vec<String> = [
            "model_index.json",
            "README.md",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let fp16 = files_to_fetch(&names, Some("fp16"));
        assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!fp16.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(fp16.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
        assert!(fp16.contains(&"text_encoder/model-00002-of-00002.safetensors".to_string()));
        assert!(fp16.contains(&"text_encoder/model.safetensors.index.json".to_string()));
        assert!(
            !fp16
                .iter()
                .any(|n| n.ends_with(".bin") || n.ends_with(".md"))
        );
        let plain = files_to_fetch(&names, None);
        assert!(plain.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!plain.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(plain.contains(&"tokenizer/merges.txt".to_string()));
    }

    #[test]
    fn offline_reads_the_standard_cache_layout() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny-ddpm");
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(snap.join("unet")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        std::fs::write(snap.join("model_index.json"), "{}").unwrap();
        std::fs::write(snap.join("unet/config.json"), "{}").unwrap();
        let options = HubOptions {
            offline: true,
            cache_dir: Some(cache.path().to_path_buf()),
            ..HubOptions::default()
        };
        assert_eq!(resolve_model_dir("org/tiny-ddpm", &options).unwrap(), snap);
        let err = resolve_model_dir("org/absent", &options).unwrap_err();
        assert!(
            matches!(&err, Error::Hub { repo, .. } if repo == "org/absent"),
            "{err}"
        );
        let err = resolve_model_dir("no-such-folder", &options).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }));
    }

    #[test]
    fn weight_files_from_folders_and_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny-lora");
        let snap = repo.join("snapshots/feed");
        std::fs::create_dir_all(snap.join("models")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "feed").unwrap();
        std::fs::write(snap.join("pytorch_lora_weights.safetensors"), "x").unwrap();
        std::fs::write(snap.join("models/ip.safetensors"), "x").unwrap();
        let options = HubOptions {
            offline: true,
            cache_dir: Some(cache.path().to_path_buf()),
            ..HubOptions::default()
        };
        let default = "pytorch_lora_weights.safetensors";
        // Hub id, offline: the default name, or the named file in a subfolder.
        assert_eq!(
            resolve_weight_file("org/tiny-lora", None, None, default, &options).unwrap(),
            snap.join(default)
        );
        assert_eq!(
            resolve_weight_file(
                "org/tiny-lora",
                Some("models"),
                Some("ip.safetensors"),
                default,
                &options
            )
            .unwrap(),
            snap.join("models/ip.safetensors")
        );
        let err = resolve_weight_file(
            "org/tiny-lora",
            None,
            Some("absent.safetensors"),
            default,
            &options,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Hub { .. }), "{err}");
        // A folder: default, the only .safetensors file, or an error naming the candidates.
        let snap_str = snap.to_str().unwrap();
        assert_eq!(
            resolve_weight_file(snap_str, None, None, default, &options).unwrap(),
            snap.join(default)
        );
        assert_eq!(
            resolve_weight_file(snap_str, Some("models"), None, default, &options).unwrap(),
            snap.join("models/ip.safetensors")
        );
        std::fs::write(snap.join("models/other.safetensors"), "x").unwrap();
        let err =
            resolve_weight_file(snap_str, Some("models"), None, default, &options).unwrap_err();
        assert!(err.to_string().contains("several weight files"), "{err}");
        // A file with a weight name is a mistake.
        let file = snap.join(default);
        let err = resolve_weight_file(file.to_str().unwrap(), None, Some("x"), default, &options)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
}
