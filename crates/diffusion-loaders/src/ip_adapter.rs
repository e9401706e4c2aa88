//! IP-Adapter files (diffusers' `IPAdapterMixin.load_ip_adapter`): locating the checkpoints in
//! a folder or Hub repository (`h94/IP-Adapter` keeps them in `models/` and `sdxl_models/`, with
//! the image encoder beside them), reading `.safetensors` or `.bin` files, and checking that
//! each holds the two parts an adapter has: `image_proj.*` (the image projection) and
//! `ip_adapter.*` (the key/value projections of every cross-attention layer).
//!
//! The pipelines' `load_ip_adapter` puts them into the UNet
//! ([`diffusion_models::UNet2DConditionModel::load_ip_adapter_weights`]) and loads the image
//! encoder found here.

use std::path::{Path, PathBuf};

use diffusion_core::weights::WeightSource;
use diffusion_core::{Error, Result};

use crate::hub::{HubOptions, looks_like_repo_id, resolve_weight_file};
use crate::single_file::open_state_dict;

/// Where [`resolve_ip_adapters`] looks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IPAdapterLoadOptions {
    /// The folder inside the repository holding the weight files (`"models"`); `None` for its
    /// root.
    pub subfolder: Option<String>,
    /// The image encoder's folder: a name inside `subfolder` (`"image_encoder"`, the default)
    /// or a path from the repository root when it contains `/`; `None` to load none (then only
    /// precomputed image embeddings can be used).
    pub image_encoder_folder: Option<String>,
    /// How to reach the Hub for repository ids.
    pub hub: HubOptions,
}

impl Default for IPAdapterLoadOptions {
    fn default() -> Self {
        Self {
            subfolder: None,
            image_encoder_folder: Some("image_encoder".into()),
            hub: HubOptions::default(),
        }
    }
}

/// IP-Adapter checkpoints ready for the UNet, and where their image encoder is.
#[derive(Debug)]
pub struct ResolvedIPAdapters {
    /// One source per adapter, keys as in the files (`image_proj.*`, `ip_adapter.*`).
    pub weights: Vec<WeightSource>,
    /// The image encoder's folder, when asked for and present.
    pub image_encoder_dir: Option<PathBuf>,
}

/// Locate and open IP-Adapter checkpoints: `name` is a folder or Hub repository id (each of
/// `weight_names` is a file in its `subfolder`), or one checkpoint file.
///
/// # Errors
/// [`Error::InvalidArgument`] (`weight_name`) for no weight names; as
/// [`resolve_weight_file`] for files that cannot be found or fetched; the readers' errors for
/// unreadable files; [`Error::UnknownModelType`] naming the file when it lacks `image_proj.*`
/// or `ip_adapter.*` tensors (not an IP-Adapter); [`Error::NotFound`] when the requested image
/// encoder folder has no `config.json`.
pub fn resolve_ip_adapters(
    name: &str,
    weight_names: &[&str],
    options: &IPAdapterLoadOptions,
) -> Result<ResolvedIPAdapters> {
    let is_file = Path::new(name).is_file();
    if weight_names.is_empty() && !is_file {
        return Err(Error::invalid_argument(
            "weight_name",
            "name the IP-Adapter file(s) to load (e.g. ip-adapter_sd15.safetensors)",
        ));
    }
    let files: Vec<PathBuf> = if is_file {
        vec![PathBuf::from(name)]
    } else {
        weight_names
            .iter()
            .map(|w| {
                resolve_weight_file(name, options.subfolder.as_deref(), Some(w), w, &options.hub)
            })
            .collect::<Result<_>>()?
    };
    let mut weights = Vec::with_capacity(files.len());
    for file in &files {
        let source = open_state_dict(file)?;
        for part in ["image_proj.", "ip_adapter."] {
            if !source.keys().any(|k| k.starts_with(part)) {
                return Err(Error::UnknownModelType {
                    path: file.clone(),
                    key: format!("{part}*"),
                    message: "not an IP-Adapter checkpoint: it needs `image_proj.*` and \
                              `ip_adapter.*` tensors"
                        .into(),
                });
            }
        }
        weights.push(source);
    }
    let image_encoder_dir = match (&options.image_encoder_folder, is_file) {
        (None, _) | (Some(_), true) => None,
        (Some(folder), false) => {
            let relative = if folder.contains('/') {
                folder.trim_end_matches('/').to_string()
            } else {
                match &options.subfolder {
                    Some(sub) => format!("{}/{folder}", sub.trim_end_matches('/')),
                    None => folder.clone(),
                }
            };
            Some(image_encoder_dir(name, &relative, &options.hub)?)
        }
    };
    Ok(ResolvedIPAdapters {
        weights,
        image_encoder_dir,
    })
}

/// The image encoder folder `relative` of a local folder or Hub repository (fetching its
/// config and weights).
fn image_encoder_dir(name: &str, relative: &str, hub: &HubOptions) -> Result<PathBuf> {
    let local = Path::new(name);
    if local.is_dir() || !looks_like_repo_id(name) {
        let dir = local.join(relative);
        if !dir.join("config.json").is_file() {
            return Err(Error::NotFound {
                path: dir,
                message: "no image encoder here (config.json); pass image_encoder_folder: None \
                          to load the adapter without one and give image embeddings instead"
                    .into(),
            });
        }
        return Ok(dir);
    }
    let config = resolve_weight_file(name, Some(relative), Some("config.json"), "", hub)?;
    resolve_weight_file(name, Some(relative), Some("model.safetensors"), "", hub)?;
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::NotFound {
            path: config.clone(),
            message: "no parent folder".into(),
        })
}
