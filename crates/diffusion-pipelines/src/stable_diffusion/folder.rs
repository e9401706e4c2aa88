//! What the Stable Diffusion family's component sets share: reading and checking a pipeline
//! folder's `model_index.json`, per-component load options, and the size and device helpers
//! that only look at the VAE and the UNet.

use std::path::{Path, PathBuf};

use diffusion_core::burn::module::Module;
use diffusion_core::{ComponentSpec, Device, Error, ModelIndex, Result};
use diffusion_loaders::HubOptions;
use diffusion_models::unets::unet_2d::SampleSize;
use diffusion_models::{
    AutoencoderKL, LoadMode, ModelMixin, PretrainedOptions, UNet2DConditionModel,
};

use super::variant_for;

/// What a family of pipelines accepts in `model_index.json`.
pub(crate) struct FolderRules<'a> {
    /// The family in messages ("the {family} pipelines load ...").
    pub family: &'a str,
    /// The accepted `_class_name` values.
    pub pipeline_classes: &'a [&'a str],
    /// Components that must be present, each with its accepted classes (empty: any class), in
    /// the order they are checked.
    pub required: &'a [(&'a str, &'a [&'a str])],
    /// Every component name the family loads itself (required or not).
    pub known: &'a [&'a str],
    /// Other components a folder may name without being refused.
    pub optional: &'a [&'a str],
    /// The optional components that are not loaded, with a warning ending in `not_loaded_note`.
    pub not_loaded: &'a [&'a str],
    pub not_loaded_note: &'a str,
    /// What a refused extra component is not ("not {component_kind}").
    pub component_kind: &'a str,
}

impl FolderRules<'_> {
    /// Check the pipeline class, the required components and the extra ones.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming `path` and the field for another pipeline class, a
    /// component of an unexpected class or an unknown extra component; [`Error::ConfigField`]
    /// for a missing required component.
    pub fn check(&self, index: &ModelIndex, path: &Path) -> Result<()> {
        if !self.pipeline_classes.contains(&index.class_name.as_str()) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                field: "_class_name".into(),
                value: index.class_name.clone(),
                reason: format!(
                    "the {} pipelines load {} folders",
                    self.family,
                    self.pipeline_classes.join(" / ")
                ),
            });
        }
        check_required(index, path, self.required)?;
        for (name, spec) in &index.components {
            if self.known.contains(&name.as_str()) || spec.class_name.is_none() {
                continue;
            }
            if self.optional.contains(&name.as_str()) {
                if self.not_loaded.contains(&name.as_str()) {
                    log::warn!(
                        "{}: `{name}` is not loaded; {}",
                        path.display(),
                        self.not_loaded_note
                    );
                }
                continue;
            }
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                field: name.clone(),
                value: spec.class_name.clone().unwrap_or_default(),
                reason: format!("not {}", self.component_kind),
            });
        }
        Ok(())
    }

    /// Read `dir/model_index.json` and check it.
    ///
    /// # Errors
    /// [`Error::NotFound`] without `model_index.json`; as [`ModelIndex::load`] and
    /// [`Self::check`].
    pub fn read_index(&self, dir: &Path) -> Result<(ModelIndex, PathBuf)> {
        let (index, index_path) = read_model_index(dir)?;
        self.check(&index, &index_path)?;
        Ok((index, index_path))
    }
}

/// Read `dir/model_index.json`, unchecked, and its path.
///
/// # Errors
/// [`Error::NotFound`] without `model_index.json`; as [`ModelIndex::load`].
pub(crate) fn read_model_index(dir: &Path) -> Result<(ModelIndex, PathBuf)> {
    let index_path = dir.join("model_index.json");
    if !index_path.is_file() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
            message: "no `model_index.json`: not a diffusers pipeline folder".into(),
        });
    }
    let index = ModelIndex::load(&index_path)?;
    Ok((index, index_path))
}

/// Each of `required` must be named with one of its classes (any class when the list is empty).
fn check_required(index: &ModelIndex, path: &Path, required: &[(&str, &[&str])]) -> Result<()> {
    for (name, classes) in required {
        match index.components.get(*name) {
            Some(ComponentSpec {
                class_name: Some(class),
                ..
            }) if classes.is_empty() || classes.contains(&class.as_str()) => {}
            Some(ComponentSpec {
                class_name: Some(class),
                ..
            }) => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    field: (*name).into(),
                    value: class.clone(),
                    reason: format!("expected {}", classes.join(" or ")),
                });
            }
            _ => {
                return Err(Error::ConfigField {
                    path: path.to_path_buf(),
                    field: (*name).into(),
                    message: "required component is missing".into(),
                });
            }
        }
    }
    Ok(())
}

/// The load options of the component folder `dir/component`: `options.variant` where that
/// folder has such weights (see [`variant_for`]), `options.dtype`, strict loading.
pub(crate) fn component_options(
    dir: &Path,
    component: &str,
    options: &HubOptions,
) -> PretrainedOptions {
    PretrainedOptions {
        variant: variant_for(&dir.join(component), options.variant.as_deref()),
        mode: LoadMode::default(),
        dtype: options.dtype,
    }
}

/// The UNet (`unet/`) and the VAE (`vae/`) of a pipeline folder, in that order.
///
/// # Errors
/// As the component loaders (strict weights).
pub(crate) fn load_unet_vae(
    dir: &Path,
    options: &HubOptions,
    device: &Device,
) -> Result<(UNet2DConditionModel, AutoencoderKL)> {
    let (unet, _) = UNet2DConditionModel::from_pretrained_with(
        dir.join("unet"),
        &component_options(dir, "unet", options),
        device,
    )?;
    let (vae, _) = AutoencoderKL::from_pretrained_with(
        dir.join("vae"),
        &component_options(dir, "vae", options),
        device,
    )?;
    Ok((unet, vae))
}

/// `2 ** (len(vae.block_out_channels) - 1)`: pixels per latent along each side.
pub(crate) fn vae_scale_factor(vae: &AutoencoderKL) -> usize {
    1 << vae.config().block_out_channels.len().saturating_sub(1)
}

/// `unet.config.sample_size * vae_scale_factor` as `(height, width)`, the default image size.
///
/// # Errors
/// [`Error::InvalidArgument`] (`height`) when the UNet config has no `sample_size`.
pub(crate) fn default_size(
    vae: &AutoencoderKL,
    unet: &UNet2DConditionModel,
) -> Result<(usize, usize)> {
    let f = vae_scale_factor(vae);
    match unet.config().sample_size {
        Some(SampleSize::Square(s)) => Ok((s * f, s * f)),
        Some(SampleSize::Rect([h, w])) => Ok((h * f, w * f)),
        None => Err(Error::invalid_argument(
            "height",
            "the UNet config has no sample_size: give height and width",
        )),
    }
}

/// The device the UNet's parameters live on.
///
/// # Errors
/// [`Error::InvalidArgument`] (`unet`) for a model without parameters.
pub(crate) fn unet_device(unet: &UNet2DConditionModel) -> Result<Device> {
    unet.devices()
        .into_iter()
        .next()
        .ok_or_else(|| Error::invalid_argument("unet", "the model has no parameters"))
}
