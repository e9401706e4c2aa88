//! Single-file checkpoints: the original (LDM / A1111) `.safetensors` and `.ckpt` files model
//! sites distribute, loaded as diffusers models (diffusers' `from_single_file`).
//!
//! [`SingleFileCheckpoint::open`] reads the file's keys and shapes (a `.ckpt` through a pickle
//! reader that executes nothing, see [`pickle`]), detects the [`ModelType`], and then builds
//! each component on request: the original keys are renamed to diffusers names (fused OpenCLIP
//! attention projections split, 1×1 convolutions turned into linear weights, OpenCLIP's
//! `text_projection` transposed) and loaded strictly, so a tensor that fits nowhere is an
//! error naming it.
//!
//! Configs are inferred from the tensor shapes (what shapes cannot tell, such as head counts,
//! comes from [`InferenceHints`]), or taken from a diffusers folder
//! ([`SingleFileOptions::config_dir`], diffusers' `config=` argument) or given directly.
//!
//! ```no_run
//! use diffusion_core::Device;
//! use diffusion_loaders::single_file::{ModelType, SingleFileCheckpoint};
//!
//! # fn main() -> diffusion_core::Result<()> {
//! let device = Device::default();
//! let ckpt = SingleFileCheckpoint::open("v1-5-pruned-emaonly.safetensors")?;
//! assert_eq!(ckpt.model_type(), ModelType::V1);
//! let unet = ckpt.unet(&device)?;
//! let vae = ckpt.vae(&device)?;
//! let text_encoder = ckpt.text_encoder(&device)?;
//! let scheduler_config = ckpt.scheduler_config()?; // scheduler_config.json contents
//! # Ok(())
//! # }
//! ```

mod checkpoint;
mod convert;
mod infer;
pub mod pickle;
pub mod torch_zip;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diffusion_core::burn::tensor::FloatDType;
use diffusion_core::config::read_json;
use diffusion_core::weights::WeightSource;
use diffusion_core::{Device, Error, Result};
use diffusion_models::modeling_utils::load_config;
use diffusion_models::{
    AutoencoderKL, AutoencoderKLConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
    LoadMode, ModelMixin, UNet2DConditionModel, UNet2DConditionModelConfig, load_weights_as,
};

use checkpoint::{Planned, RawCheckpoint, converted_source};
use infer::TextLayout;

pub use infer::{InferenceHints, ModelType};

/// A whole state dict as a [`WeightSource`], from a `.safetensors` file or a PyTorch pickle
/// (`.bin` / `.pt` / `.ckpt`, read without running code; tensors of nested dicts are named
/// `outer.inner`), keys unchanged: what adapter files (IP-Adapter `.bin`) need.
///
/// # Errors
/// As the readers: unreadable or corrupt files and unsafe pickles, naming the file.
pub fn open_state_dict(path: impl AsRef<Path>) -> Result<WeightSource> {
    let raw = Arc::new(RawCheckpoint::open(path.as_ref())?);
    let plan = raw
        .shapes()
        .into_keys()
        .map(|k| Planned::new(k.clone(), k, checkpoint::Transform::Identity))
        .collect();
    converted_source(&raw, plan)
}

/// Configs to use instead of inferring them (diffusers' `config=` argument), and the hints
/// inference uses otherwise. An explicit config wins over `config_dir`, which wins over
/// inference. For a Hub repository id as `config=`, resolve it to a folder first with
/// [`crate::hub::resolve_model_dir`].
#[derive(Clone, Debug, Default)]
pub struct SingleFileOptions {
    /// A diffusers pipeline folder (or a snapshot of one) whose `unet/config.json`,
    /// `vae/config.json`, `text_encoder/config.json`, `text_encoder_2/config.json` and
    /// `scheduler/scheduler_config.json` are used where present; weights are never read from it.
    pub config_dir: Option<PathBuf>,
    /// The UNet config.
    pub unet_config: Option<UNet2DConditionModelConfig>,
    /// The VAE config.
    pub vae_config: Option<AutoencoderKLConfig>,
    /// The (first) text encoder's config.
    pub text_encoder_config: Option<CLIPTextConfig>,
    /// SDXL's second text encoder's config.
    pub text_encoder_2_config: Option<CLIPTextConfig>,
    /// What inference assumes where shapes are silent (used only for configs not given).
    pub hints: InferenceHints,
    /// The dtype the models are loaded in (`torch_dtype`), converted on the host as each
    /// tensor is read; `None` loads in f32.
    pub dtype: Option<FloatDType>,
}

/// An opened single-file checkpoint: its keys and shapes, its detected type, and the
/// conversion of each component to diffusers.
#[derive(Debug)]
pub struct SingleFileCheckpoint {
    raw: Arc<RawCheckpoint>,
    shapes: BTreeMap<String, Vec<usize>>,
    model_type: ModelType,
    options: SingleFileOptions,
}

impl SingleFileCheckpoint {
    /// Open a `.safetensors` or `.ckpt` file (a zip archive is read as a torch checkpoint
    /// whatever its name) and detect its model type; configs are inferred.
    ///
    /// # Errors
    /// As [`Self::open_with`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SingleFileOptions::default())
    }

    /// [`Self::open`] with configs to use instead of inference.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Safetensors`] or [`Error::Pickle`]
    /// naming the file when it is truncated or corrupt; [`Error::UnsafePickle`] naming the
    /// Python global when a `.ckpt` would call anything but tensor rebuilds (nothing is run);
    /// [`Error::UnknownModelType`] naming the file and the key looked for when it holds
    /// neither a Stable Diffusion UNet nor a VAE (a VAE-only file opens as
    /// [`ModelType::V1`]; its [`Self::unet`] is then that error).
    pub fn open_with(path: impl AsRef<Path>, options: SingleFileOptions) -> Result<Self> {
        let raw = Arc::new(RawCheckpoint::open(path.as_ref())?);
        let shapes = raw.shapes();
        let model_type = infer::detect(raw.path(), &shapes)?;
        Ok(Self {
            raw,
            shapes,
            model_type,
            options,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.raw.path()
    }

    /// The detected model type.
    pub fn model_type(&self) -> ModelType {
        self.model_type
    }

    /// `global_step` of a `.ckpt` that stored one (safetensors files have none).
    pub fn global_step(&self) -> Option<i64> {
        self.raw.global_step()
    }

    /// Every original key with its shape.
    pub fn shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    fn config_file(&self, component: &str) -> Option<PathBuf> {
        let dir = self.options.config_dir.as_ref()?.join(component);
        dir.join("config.json").is_file().then_some(dir)
    }

    fn vae_prefix(&self) -> Result<&'static str> {
        convert::vae_prefix(&self.shapes).ok_or_else(|| Error::MissingTensor {
            path: self.path().to_path_buf(),
            key: format!("{}encoder.conv_in.weight", convert::VAE_PREFIXES[0]),
        })
    }

    fn unet_layout(&self) -> Result<convert::UNetLayout> {
        convert::unet_layout(
            self.path(),
            &convert::strip(&self.shapes, convert::UNET_PREFIX),
        )
    }

    /// The UNet config: given, from `config_dir/unet`, or inferred from the shapes.
    ///
    /// # Errors
    /// Config-file errors naming `unet/config.json`; [`Error::UnknownModelType`] when the UNet
    /// layout is not a Stable Diffusion one; [`Error::Unsupported`] when a value cannot be
    /// inferred (block widths that are not multiples of 64 channels per head).
    pub fn unet_config(&self) -> Result<UNet2DConditionModelConfig> {
        if let Some(c) = &self.options.unet_config {
            return Ok(c.clone());
        }
        if let Some(dir) = self.config_file("unet") {
            return Ok(load_config::<UNet2DConditionModelConfig>(&dir)?.0.config);
        }
        let vae_scale = match convert::vae_prefix(&self.shapes) {
            Some(p) => 1 << convert::vae_levels(&convert::strip(&self.shapes, p)).saturating_sub(1),
            None => 8,
        };
        infer::unet_config(
            self.path(),
            self.model_type,
            &self.unet_layout()?,
            vae_scale,
            &self.options.hints,
        )
    }

    /// The UNet's tensors under diffusers names.
    ///
    /// # Errors
    /// As [`Self::unet_config`]; read errors naming the file and original key.
    pub fn unet_weights(&self) -> Result<WeightSource> {
        let layout = self.unet_layout()?;
        let text_time = self
            .unet_config()?
            .addition_embed_type
            .is_some_and(|t| t == "text_time");
        self.source(convert::plan_unet(&self.shapes, &layout, text_time))
    }

    /// The UNet, loaded strictly.
    ///
    /// # Errors
    /// As [`Self::unet_weights`]; [`Error::MissingTensor`], [`Error::UnexpectedTensors`] or
    /// [`Error::TensorShape`] naming the file and the (diffusers) key when the weights do not
    /// fit the config.
    pub fn unet(&self, device: &Device) -> Result<UNet2DConditionModel> {
        // Weights first: a file without a UNet fails before a model is allocated.
        let weights = self.unet_weights()?;
        let model = UNet2DConditionModel::from_config(&self.unet_config()?, device)?;
        Ok(load_weights_as(model, &weights, LoadMode::Strict, self.options.dtype)?.0)
    }

    /// Whether the file has a VAE (`first_stage_model.*` or `vae.*`).
    pub fn has_vae(&self) -> bool {
        convert::vae_prefix(&self.shapes).is_some()
    }

    /// The VAE config: given, from `config_dir/vae`, or inferred.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] naming the file and key when the file has no VAE; config-file
    /// errors.
    pub fn vae_config(&self) -> Result<AutoencoderKLConfig> {
        if let Some(c) = &self.options.vae_config {
            return Ok(c.clone());
        }
        if let Some(dir) = self.config_file("vae") {
            return Ok(load_config::<AutoencoderKLConfig>(&dir)?.0.config);
        }
        infer::vae_config(
            self.path(),
            self.model_type,
            &self.shapes,
            self.vae_prefix()?,
            &self.options.hints,
        )
    }

    /// The VAE's tensors under diffusers names.
    ///
    /// # Errors
    /// As [`Self::vae_config`]; read errors naming the file and original key.
    pub fn vae_weights(&self) -> Result<WeightSource> {
        self.source(convert::plan_vae(&self.shapes, self.vae_prefix()?))
    }

    /// The VAE, loaded strictly.
    ///
    /// # Errors
    /// As [`Self::unet`].
    pub fn vae(&self, device: &Device) -> Result<AutoencoderKL> {
        let weights = self.vae_weights()?;
        let model = AutoencoderKL::from_config(&self.vae_config()?, device)?;
        Ok(load_weights_as(model, &weights, LoadMode::Strict, self.options.dtype)?.0)
    }

    /// The layout of a text encoder the file holds, else a missing-tensor error naming the key
    /// that was looked for.
    fn present_text_layout(&self, second: bool) -> Result<TextLayout> {
        let missing = |key: String| Error::MissingTensor {
            path: self.path().to_path_buf(),
            key,
        };
        let Some(layout) = text_layout(self.model_type, second) else {
            // The type has no such encoder: name where SDXL base keeps it.
            let sdxl = if second {
                TextLayout::OpenClip {
                    prefix: infer::XL_OPEN_CLIP,
                    drop_last: false,
                }
            } else {
                TextLayout::Clip(infer::XL_CLIP)
            };
            return Err(missing(sdxl.token_embedding_key()));
        };
        let key = layout.token_embedding_key();
        // transformers >= 5.6 writes CLIP without its `text_model.` prefix.
        let bare = key.replace("text_model.", "");
        if self.shapes.contains_key(&key) || self.shapes.contains_key(&bare) {
            Ok(layout)
        } else {
            Err(missing(key))
        }
    }

    /// Whether the file has the first text encoder of its type (the SDXL refiner has none).
    pub fn has_text_encoder(&self) -> bool {
        self.present_text_layout(false).is_ok()
    }

    /// Whether the file has SDXL's second text encoder.
    pub fn has_text_encoder_2(&self) -> bool {
        self.present_text_layout(true).is_ok()
    }

    fn text_config(&self, second: bool) -> Result<CLIPTextConfig> {
        let (given, folder) = if second {
            (&self.options.text_encoder_2_config, "text_encoder_2")
        } else {
            (&self.options.text_encoder_config, "text_encoder")
        };
        if let Some(c) = given {
            return Ok(c.clone());
        }
        let layout = self.present_text_layout(second)?;
        if let Some(dir) = self.config_file(folder) {
            return Ok(load_config::<CLIPTextConfig>(&dir)?.0.config);
        }
        infer::clip_config(self.path(), &self.shapes, layout, &self.options.hints)
    }

    fn text_weights(&self, second: bool, config: &CLIPTextConfig) -> Result<WeightSource> {
        let layout = self.present_text_layout(second)?;
        self.source(text_plan(&self.shapes, layout, second, config))
    }

    /// The first text encoder's config (CLIP ViT-L for SD 1 and SDXL, OpenCLIP-H for SD 2).
    ///
    /// # Errors
    /// [`Error::MissingTensor`] naming the key looked for when the file has no such encoder;
    /// config-file errors; [`Error::Unsupported`] when the width is not a multiple of 64
    /// channels per head and no config was given.
    pub fn text_encoder_config(&self) -> Result<CLIPTextConfig> {
        self.text_config(false)
    }

    /// The first text encoder's tensors under transformers names.
    ///
    /// # Errors
    /// As [`Self::text_encoder_config`].
    pub fn text_encoder_weights(&self) -> Result<WeightSource> {
        self.text_weights(false, &self.text_config(false)?)
    }

    /// The first text encoder (`text_encoder` of the pipeline), loaded strictly.
    ///
    /// # Errors
    /// As [`Self::unet`] and [`Self::text_encoder_config`].
    pub fn text_encoder(&self, device: &Device) -> Result<CLIPTextModel> {
        let config = self.text_config(false)?;
        let weights = self.text_weights(false, &config)?;
        let model = CLIPTextModel::new(&config, device)?;
        Ok(load_weights_as(model, &weights, LoadMode::Strict, self.options.dtype)?.0)
    }

    /// SDXL's second text encoder's config (OpenCLIP-bigG with projection).
    ///
    /// # Errors
    /// As [`Self::text_encoder_config`].
    pub fn text_encoder_2_config(&self) -> Result<CLIPTextConfig> {
        self.text_config(true)
    }

    /// SDXL's second text encoder's tensors under transformers names.
    ///
    /// # Errors
    /// As [`Self::text_encoder_config`].
    pub fn text_encoder_2_weights(&self) -> Result<WeightSource> {
        self.text_weights(true, &self.text_config(true)?)
    }

    /// SDXL's second text encoder (`text_encoder_2`), loaded strictly.
    ///
    /// # Errors
    /// As [`Self::text_encoder`].
    pub fn text_encoder_2(&self, device: &Device) -> Result<CLIPTextModelWithProjection> {
        let config = self.text_config(true)?;
        let weights = self.text_weights(true, &config)?;
        let model = CLIPTextModelWithProjection::new(&config, device)?;
        Ok(load_weights_as(model, &weights, LoadMode::Strict, self.options.dtype)?.0)
    }

    /// The scheduler config (`scheduler_config.json` contents, with `_class_name`): from
    /// `config_dir/scheduler`, else what diffusers uses for the type — PNDM for SD 1, DDIM for
    /// SD 2 (v-prediction unless `global_step` is SD 2 base's 875000, as diffusers guesses),
    /// Euler for SDXL — with Stable Diffusion's scaled-linear betas.
    ///
    /// # Errors
    /// File errors naming `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> Result<serde_json::Value> {
        if let Some(dir) = &self.options.config_dir {
            let path = dir.join("scheduler").join("scheduler_config.json");
            if path.is_file() {
                return read_json(&path);
            }
        }
        Ok(infer::scheduler_config(self.model_type, self.global_step()))
    }

    fn source(&self, plan: Vec<Planned>) -> Result<WeightSource> {
        converted_source(&self.raw, plan)
    }
}

/// diffusers' `Model.from_single_file(path)` for each model a Stable Diffusion checkpoint holds:
/// `UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel` (the first text encoder) and
/// `CLIPTextModelWithProjection` (SDXL's second).
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_loaders::single_file::FromSingleFile;
/// use diffusion_models::UNet2DConditionModel;
///
/// # fn main() -> diffusion_core::Result<()> {
/// let unet = UNet2DConditionModel::from_single_file("sd_xl_base_1.0.safetensors", &Device::default())?;
/// # Ok(())
/// # }
/// ```
pub trait FromSingleFile: Sized {
    /// Load the model from a single-file checkpoint with inferred configs.
    ///
    /// # Errors
    /// As [`Self::from_single_file_with`].
    fn from_single_file(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_single_file_with(path, SingleFileOptions::default(), device)
    }

    /// Load the model from a single-file checkpoint with the given configs or hints.
    ///
    /// # Errors
    /// As [`SingleFileCheckpoint::open_with`] and the component's loader
    /// ([`SingleFileCheckpoint::unet`], ...).
    fn from_single_file_with(
        path: impl AsRef<Path>,
        options: SingleFileOptions,
        device: &Device,
    ) -> Result<Self> {
        Self::from_checkpoint(&SingleFileCheckpoint::open_with(path, options)?, device)
    }

    /// Load the model from an opened checkpoint.
    ///
    /// # Errors
    /// As the component's loader ([`SingleFileCheckpoint::unet`], ...).
    fn from_checkpoint(checkpoint: &SingleFileCheckpoint, device: &Device) -> Result<Self>;
}

impl FromSingleFile for UNet2DConditionModel {
    fn from_checkpoint(checkpoint: &SingleFileCheckpoint, device: &Device) -> Result<Self> {
        checkpoint.unet(device)
    }
}

impl FromSingleFile for AutoencoderKL {
    fn from_checkpoint(checkpoint: &SingleFileCheckpoint, device: &Device) -> Result<Self> {
        checkpoint.vae(device)
    }
}

impl FromSingleFile for CLIPTextModel {
    fn from_checkpoint(checkpoint: &SingleFileCheckpoint, device: &Device) -> Result<Self> {
        checkpoint.text_encoder(device)
    }
}

impl FromSingleFile for CLIPTextModelWithProjection {
    fn from_checkpoint(checkpoint: &SingleFileCheckpoint, device: &Device) -> Result<Self> {
        checkpoint.text_encoder_2(device)
    }
}

/// Where the type keeps its first (`second == false`) or second text encoder.
fn text_layout(model_type: ModelType, second: bool) -> Option<TextLayout> {
    use ModelType::*;
    match (model_type, second) {
        (V1 | Inpainting, false) => Some(TextLayout::Clip(infer::SD1_CLIP)),
        (V2 | InpaintingV2, false) => Some(TextLayout::OpenClip {
            prefix: infer::SD2_OPEN_CLIP,
            drop_last: true,
        }),
        (XlBase | XlInpaint, false) => Some(TextLayout::Clip(infer::XL_CLIP)),
        (XlBase | XlInpaint, true) => Some(TextLayout::OpenClip {
            prefix: infer::XL_OPEN_CLIP,
            drop_last: false,
        }),
        (XlRefiner, true) => Some(TextLayout::OpenClip {
            prefix: infer::XL_REFINER_OPEN_CLIP,
            drop_last: false,
        }),
        _ => None,
    }
}

/// The conversion plan of a text encoder: `CLIPTextModel` for the first, SDXL's
/// `CLIPTextModelWithProjection` for the second.
fn text_plan(
    shapes: &BTreeMap<String, Vec<usize>>,
    layout: TextLayout,
    second: bool,
    config: &CLIPTextConfig,
) -> Vec<Planned> {
    match layout {
        TextLayout::Clip(prefix) => {
            let mut plan = convert::plan_clip(shapes, prefix);
            // transformers' CLIPTextModel has no projection; SDXL's first encoder is one.
            plan.retain(|p| !p.key.starts_with("text_projection."));
            plan
        }
        TextLayout::OpenClip { prefix, .. } => {
            convert::plan_open_clip(shapes, prefix, config.num_hidden_layers, second)
        }
    }
}

#[cfg(test)]
mod full_size_tests;
