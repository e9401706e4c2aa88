//! Pipelines from one original-layout checkpoint file (diffusers' `from_single_file`): the
//! `.safetensors` / `.ckpt` files model sites distribute.
//!
//! The file holds the UNet, VAE and text encoders; the tokenizers, the scheduler config and the
//! pipeline flags come from a diffusers folder or Hub repository (diffusers' `config=`), by
//! default the reference repository of the detected model type
//! ([`ModelType::default_pipeline_repo`]), of which only configs and tokenizer files are
//! fetched.

use std::path::{Path, PathBuf};

use diffusion_core::{Device, Error, ModelIndex, Result};
use diffusion_loaders::HubOptions;
use diffusion_loaders::hub::resolve_config_dir;
use diffusion_loaders::single_file::{ModelType, SingleFileCheckpoint, SingleFileOptions};
use diffusion_models::CLIPTokenizer;
use diffusion_schedulers::AnyScheduler;

use crate::{StableDiffusionComponents, StableDiffusionXLComponents};

/// Where a single-file pipeline takes what the file lacks, and how its configs are chosen.
#[derive(Clone, Debug, Default)]
pub struct SingleFilePipelineOptions {
    /// A diffusers pipeline folder or Hub id (diffusers' `config=`) whose tokenizers, scheduler
    /// config, `model_index.json` flags and model configs are used; `None` uses the reference
    /// repository of the detected model type.
    pub config: Option<String>,
    /// How configs are inferred where `config` has none (see [`SingleFileOptions`]); its
    /// `config_dir` is set from `config`.
    pub single_file: SingleFileOptions,
    /// Hub access for `config` (revision, offline mode, cache); its `dtype` is the dtype the
    /// models are loaded in when `single_file.dtype` is `None`.
    pub hub: HubOptions,
}

/// Open the checkpoint and resolve its config folder.
fn open(
    path: &Path,
    options: &SingleFilePipelineOptions,
) -> Result<(SingleFileCheckpoint, PathBuf)> {
    // The model type decides the default config repository, so detect it first.
    let probe = SingleFileCheckpoint::open_with(path, options.single_file.clone())?;
    let name = match &options.config {
        Some(name) => name.clone(),
        None => probe.model_type().default_pipeline_repo().to_string(),
    };
    let config_dir = resolve_config_dir(&name, &options.hub).map_err(|e| match e {
        Error::Hub { repo, message } => Error::Hub {
            repo,
            message: format!(
                "{message}; a single-file checkpoint needs a diffusers config (tokenizer, \
                 scheduler): give a local folder or Hub id as `config`"
            ),
        },
        other => other,
    })?;
    let checkpoint = SingleFileCheckpoint::open_with(
        path,
        SingleFileOptions {
            config_dir: Some(config_dir.clone()),
            dtype: options.single_file.dtype.or(options.hub.dtype),
            ..options.single_file.clone()
        },
    )?;
    Ok((checkpoint, config_dir))
}

/// The scheduler of the config folder (as diffusers), else the one the checkpoint implies.
fn scheduler(checkpoint: &SingleFileCheckpoint, config_dir: &Path) -> Result<AnyScheduler> {
    let folder = config_dir.join("scheduler");
    if folder.join("scheduler_config.json").is_file() {
        AnyScheduler::from_config_file(folder)
    } else {
        AnyScheduler::from_config_value(checkpoint.scheduler_config()?, checkpoint.path())
    }
}

fn tokenizer(config_dir: &Path, name: &str) -> Result<CLIPTokenizer> {
    let dir = config_dir.join(name);
    if !dir.is_dir() {
        return Err(Error::NotFound {
            path: dir,
            message: format!(
                "the config folder has no `{name}`; a single-file checkpoint takes its \
                 tokenizers from there"
            ),
        });
    }
    CLIPTokenizer::from_pretrained(dir)
}

/// A boolean of the config folder's `model_index.json`, or `default`.
fn index_flag(config_dir: &Path, name: &str, default: bool) -> Result<bool> {
    let path = config_dir.join("model_index.json");
    if !path.is_file() {
        return Ok(default);
    }
    match ModelIndex::load(&path)?.options.get(name) {
        None => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| Error::ConfigField {
            path,
            field: name.into(),
            message: "expected true or false".into(),
        }),
    }
}

impl StableDiffusionComponents {
    /// Load a Stable Diffusion 1.x / 2.x checkpoint file (`.safetensors` or `.ckpt`, original
    /// layout), as `StableDiffusionPipeline.from_single_file(path, config=...)`.
    ///
    /// ```no_run
    /// use diffusion_core::Device;
    /// use diffusion_pipelines::StableDiffusionComponents;
    /// use diffusion_pipelines::single_file::SingleFilePipelineOptions;
    ///
    /// # fn main() -> diffusion_core::Result<()> {
    /// let options = SingleFilePipelineOptions {
    ///     config: Some("stable-diffusion-v1-5/stable-diffusion-v1-5".into()),
    ///     ..Default::default()
    /// };
    /// let components = StableDiffusionComponents::from_single_file(
    ///     "v1-5-pruned-emaonly.safetensors",
    ///     &options,
    ///     &Device::default(),
    /// )?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`SingleFileCheckpoint::open_with`] and its component loaders;
    /// [`Error::Unsupported`] (naming the file) for an SDXL checkpoint; [`Error::Hub`] /
    /// [`Error::NotFound`] when the config cannot be resolved or lacks the tokenizer.
    pub fn from_single_file(
        path: impl AsRef<Path>,
        options: &SingleFilePipelineOptions,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (checkpoint, config_dir) = open(path, options)?;
        if checkpoint.model_type().is_xl() {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                field: "model type".into(),
                value: checkpoint.model_type().diffusers_name().into(),
                reason: "an SDXL checkpoint: load it with \
                         StableDiffusionXLComponents::from_single_file"
                    .into(),
            });
        }
        // The cheap checks first: a config without a tokenizer fails before any weights load.
        let tokenizer = tokenizer(&config_dir, "tokenizer")?;
        Ok(Self {
            vae: checkpoint.vae(device)?,
            text_encoder: checkpoint.text_encoder(device)?,
            tokenizer,
            unet: checkpoint.unet(device)?,
            scheduler: scheduler(&checkpoint, &config_dir)?,
            lora: diffusion_loaders::LoraState::new(),
            image_encoder: None,
            feature_extractor: None,
        })
    }
}

impl StableDiffusionXLComponents {
    /// Load an SDXL base, refiner or inpainting checkpoint file (original layout), as
    /// `StableDiffusionXLPipeline.from_single_file(path, config=...)`. Refiner files have no
    /// first text encoder; `requires_aesthetics_score` then defaults to true.
    ///
    /// # Errors
    /// As [`StableDiffusionComponents::from_single_file`]; [`Error::Unsupported`] for a
    /// checkpoint that is not SDXL.
    pub fn from_single_file(
        path: impl AsRef<Path>,
        options: &SingleFilePipelineOptions,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (checkpoint, config_dir) = open(path, options)?;
        let model_type = checkpoint.model_type();
        if !model_type.is_xl() {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                field: "model type".into(),
                value: model_type.diffusers_name().into(),
                reason: "not an SDXL checkpoint: load it with \
                         StableDiffusionComponents::from_single_file"
                    .into(),
            });
        }
        let tokenizer_2 = tokenizer(&config_dir, "tokenizer_2")?;
        let (text_encoder, first_tokenizer) = if checkpoint.has_text_encoder() {
            (
                Some(checkpoint.text_encoder(device)?),
                Some(tokenizer(&config_dir, "tokenizer")?),
            )
        } else {
            (None, None)
        };
        let refiner = model_type == ModelType::XlRefiner;
        Ok(Self {
            vae: checkpoint.vae(device)?,
            text_encoder,
            text_encoder_2: checkpoint.text_encoder_2(device)?,
            tokenizer: first_tokenizer,
            tokenizer_2,
            unet: checkpoint.unet(device)?,
            scheduler: scheduler(&checkpoint, &config_dir)?,
            lora: diffusion_loaders::LoraState::new(),
            image_encoder: None,
            feature_extractor: None,
            force_zeros_for_empty_prompt: index_flag(
                &config_dir,
                "force_zeros_for_empty_prompt",
                !refiner,
            )?,
            requires_aesthetics_score: index_flag(
                &config_dir,
                "requires_aesthetics_score",
                refiner,
            )?,
        })
    }
}
