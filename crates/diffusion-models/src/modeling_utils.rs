//! What every model's `from_pretrained` / `save_pretrained` shares
//! (`diffusers.models.modeling_utils`): reading a folder's config and weights, writing them back.

use std::path::{Path, PathBuf};

use diffusion_core::burn::module::{Module, Param};
use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::config::{Config, ConfigFile};
use diffusion_core::weights::{SaveDtype, WeightSource, resolve_weights, weight_file_names};
use diffusion_core::{Device, Error, Result};

use crate::layers;
use crate::state_dict::{
    Layout, LayoutParamMapper, LoadMode, LoadReport, cast_compact, load_weights_as,
    map_params_with_layout, save_weights,
};

/// diffusers' `ModelMixin`: a model described by a `config.json` whose weights live in
/// `diffusion_pytorch_model[.variant].safetensors` (or a sharded index) next to it.
///
/// Implementors say how to build the model from its config; loading and saving folders come
/// with the trait, so every diffusers model reads and writes them the same way.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_models::{ModelMixin, UNet2DModel};
///
/// # fn main() -> diffusion_core::Result<()> {
/// let unet = UNet2DModel::from_pretrained("models/ddpm-digits/unet", &Device::default())?;
/// unet.save_pretrained("/tmp/unet-copy")?;
/// # Ok(())
/// # }
/// ```
pub trait ModelMixin: Module + Sized {
    /// The model's config (`config.json`).
    type Config: Config;

    /// Build the model with freshly initialised weights (`Model.from_config(config)`).
    ///
    /// # Errors
    /// When the config describes something this port cannot build.
    fn from_config(config: &Self::Config, device: &Device) -> Result<Self>;

    /// The config the model was built from.
    fn config(&self) -> &Self::Config;

    /// Load `dir/config.json` and the folder's weights (strictly, no variant).
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(dir, &PretrainedOptions::default(), device).map(|(m, _)| m)
    }

    /// Load a diffusers model folder: `config.json` and
    /// `diffusion_pytorch_model[.variant].safetensors` (or its sharded index). Legacy attention
    /// tensor names (`query`, `key`, `value`, `proj_attn`) are renamed as diffusers does.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the folder for a missing config or weight file; config errors
    /// naming `config.json` and the field; weight errors naming the key and file
    /// ([`Error::MissingTensor`], [`Error::UnexpectedTensors`] in strict mode,
    /// [`Error::TensorShape`], [`Error::Safetensors`] for corrupt files).
    fn from_pretrained_with(
        dir: impl AsRef<Path>,
        options: &PretrainedOptions,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let dir = dir.as_ref();
        let (file, config_path) = load_config::<Self::Config>(dir)?;
        let model = Self::from_config(&file.config, device)
            .map_err(|e| layers::with_config_path(e, &config_path))?;
        load_pretrained_weights(model, dir, options)
    }

    /// Write `config.json` and `diffusion_pytorch_model.safetensors` (f32) into `dir`.
    ///
    /// # Errors
    /// [`Error::Io`] when writing fails.
    fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_pretrained_with(dir, None, SaveDtype::F32)
    }

    /// As [`Self::save_pretrained`], with a weight variant name and storage dtype (e.g.
    /// `Some("fp16")` with [`SaveDtype::F16`]).
    ///
    /// # Errors
    /// [`Error::Io`] when writing fails.
    fn save_pretrained_with(
        &self,
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: SaveDtype,
    ) -> Result<()> {
        save_pretrained(self, self.config(), dir.as_ref(), variant, dtype)
    }
}

/// diffusers' model config file name.
pub const CONFIG_NAME: &str = "config.json";

/// Options of `from_pretrained`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PretrainedOptions {
    /// Weight variant (`"fp16"` reads `diffusion_pytorch_model.fp16.safetensors`).
    pub variant: Option<String>,
    /// Strict (default) or lenient loading.
    pub mode: LoadMode,
    /// The dtype to create the parameters in (`torch_dtype`): `Some(F16)` loads an fp16 model
    /// without an f32 copy on the device. `None` loads in f32.
    pub dtype: Option<FloatDType>,
}

/// Read `dir/config.json` as `C`, checking `_class_name` when the file has one.
///
/// # Errors
/// [`Error::NotFound`] when the file is absent; else as [`ConfigFile::load`];
/// [`Error::ConfigField`] (`_class_name`) when the file is for another class.
pub fn load_config<C: Config>(dir: &Path) -> Result<(ConfigFile<C>, PathBuf)> {
    let path = dir.join(CONFIG_NAME);
    if !path.is_file() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
            message: format!("no `{CONFIG_NAME}` in the model folder"),
        });
    }
    let file = ConfigFile::<C>::load(&path)?;
    if let Some(name) = &file.class_name
        && name != C::CLASS_NAME
    {
        return Err(Error::ConfigField {
            path,
            field: "_class_name".into(),
            message: format!("the folder holds a `{name}`, not a `{}`", C::CLASS_NAME),
        });
    }
    Ok((file, path))
}

/// diffusers renamed the deprecated attention block's tensors (`query`, `key`, `value`,
/// `proj_attn`); old checkpoints still use those names. Returns the current name of a legacy key.
pub fn legacy_attention_key(key: &str) -> Option<String> {
    if !key.contains("attentions.") {
        return None;
    }
    let (prefix, param) = key.rsplit_once('.')?;
    let (module_path, layer) = prefix.rsplit_once('.')?;
    let new_layer = match layer {
        "query" => "to_q",
        "key" => "to_k",
        "value" => "to_v",
        "proj_attn" => "to_out.0",
        _ => return None,
    };
    Some(format!("{module_path}.{new_layer}.{param}"))
}

/// Load a folder's weights (resolved as diffusers does, with `variant`) into `module`.
///
/// # Errors
/// As [`resolve_weights`], [`WeightSource::open`] and [`load_weights`].
pub fn load_pretrained_weights<M: Module>(
    module: M,
    dir: &Path,
    options: &PretrainedOptions,
) -> Result<(M, LoadReport)> {
    let path = resolve_weights(dir, options.variant.as_deref())?;
    let mut source = WeightSource::open(&path)?;
    source.rename_keys(legacy_attention_key)?;
    load_weights_as(module, &source, options.mode, options.dtype)
}

/// Write `config.json` and the weights (`diffusion_pytorch_model[.variant].safetensors`).
///
/// # Errors
/// [`Error::Io`] when the folder or files cannot be written.
pub fn save_pretrained<C: Config, M: Module>(
    module: &M,
    config: &C,
    dir: &Path,
    variant: Option<&str>,
    dtype: SaveDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    ConfigFile::new(config.clone()).save(dir.join(CONFIG_NAME))?;
    let (weights_name, _) = weight_file_names(variant);
    save_weights(module, dir.join(weights_name), dtype)
}

struct CastFloats(FloatDType);

impl LayoutParamMapper for CastFloats {
    fn map_param<const D: usize>(
        &mut self,
        _key: &str,
        layout: Layout,
        param: Param<Tensor<D>>,
    ) -> Param<Tensor<D>> {
        let dtype = self.0;
        param.map(|t| {
            if FloatDType::from(t.dtype()) == dtype {
                t
            } else {
                cast_compact(t, dtype, layout)
            }
        })
    }
}

/// Cast every float parameter of `module` to `dtype` (diffusers' `model.to(dtype)`). Inputs
/// must then be given in the same dtype. GroupNorm statistics (burn widens f16 to f32) and
/// the attention softmax (see [`crate::attention_processor`]) stay in f32. Each cast parameter
/// gets a flat allocation of its own in the device's persistent memory, as a loaded one does
/// (no per-row padding on CUDA); loading straight into `dtype`
/// ([`PretrainedOptions::dtype`]) also avoids holding the f32 weights first.
///
/// # Errors
/// [`Error::InvalidArgument`] (`dtype`) when the module's device does not support `dtype`.
pub fn to_dtype<M: Module>(module: M, dtype: FloatDType) -> Result<M> {
    check_dtype_support(&module, dtype)?;
    Ok(map_params_with_layout(module, &mut CastFloats(dtype)))
}

/// [`Error::InvalidArgument`] (`dtype`) when one of `module`'s devices cannot hold `dtype`.
pub(crate) fn check_dtype_support<M: Module>(module: &M, dtype: FloatDType) -> Result<()> {
    match module
        .devices()
        .into_iter()
        .find(|d| !d.supports_dtype(dtype))
    {
        Some(device) => Err(Error::invalid_argument(
            "dtype",
            format!("{dtype:?} is not supported by the device {device:?}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_attention_names_map_to_current_ones() {
        assert_eq!(
            legacy_attention_key("mid_block.attentions.0.proj_attn.weight").as_deref(),
            Some("mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(
            legacy_attention_key("down_blocks.1.attentions.1.query.bias").as_deref(),
            Some("down_blocks.1.attentions.1.to_q.bias")
        );
        assert_eq!(
            legacy_attention_key("down_blocks.1.attentions.1.to_q.bias"),
            None
        );
        assert_eq!(
            legacy_attention_key("down_blocks.1.resnets.0.key.bias"),
            None
        );
    }
}
