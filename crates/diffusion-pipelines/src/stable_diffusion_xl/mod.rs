//! Stable Diffusion XL pipelines (`diffusers.pipelines.stable_diffusion_xl`): text-to-image,
//! image-to-image (and the refiner stage) and inpainting, with two CLIP text encoders, pooled
//! text embeddings and size micro-conditioning.

use std::path::Path;

use diffusion_core::burn::tensor::FloatDType;
use diffusion_core::{ComponentSpec, Device, Error, ModelIndex, Result};
use diffusion_loaders::{HubOptions, resolve_model_dir};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{
    AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, UNet2DConditionModel,
};
use diffusion_schedulers::{AnyScheduler, SchedulerSpec};

pub mod pipeline_stable_diffusion_xl;
pub mod pipeline_stable_diffusion_xl_img2img;
pub mod pipeline_stable_diffusion_xl_inpaint;
mod prompt;

pub use pipeline_stable_diffusion_xl::{StableDiffusionXLArgs, StableDiffusionXLPipeline};
pub use pipeline_stable_diffusion_xl_img2img::{
    MicroConditioning, StableDiffusionXLImg2ImgArgs, StableDiffusionXLImg2ImgPipeline,
};
pub use pipeline_stable_diffusion_xl_inpaint::{
    StableDiffusionXLInpaintArgs, StableDiffusionXLInpaintPipeline,
};

use crate::stable_diffusion::folder::{
    self, FolderRules, component_options, load_unet_vae, read_model_index,
};

/// The pipeline classes whose folders hold these components.
const PIPELINE_CLASSES: &[&str] = &[
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
];

/// The models and scheduler of SDXL base pipelines. Clone it to share the weights.
#[derive(Clone, Debug)]
pub struct StableDiffusionXLComponents {
    /// Image <-> latent autoencoder.
    pub vae: AutoencoderKL,
    /// First text encoder (CLIP ViT-L, `CLIPTextModel`); `None` in refiner checkpoints, which
    /// condition on the second encoder only.
    pub text_encoder: Option<CLIPTextModel>,
    /// Second text encoder (OpenCLIP ViT-bigG, `CLIPTextModelWithProjection`): also gives the
    /// pooled embedding.
    pub text_encoder_2: CLIPTextModelWithProjection,
    /// Tokenizer of `text_encoder` (`None` with it).
    pub tokenizer: Option<CLIPTokenizer>,
    /// Tokenizer of `text_encoder_2`.
    pub tokenizer_2: CLIPTokenizer,
    /// The denoiser (`addition_embed_type = "text_time"`).
    pub unet: UNet2DConditionModel,
    /// The noise scheduler.
    pub scheduler: AnyScheduler,
    /// The IP-Adapter image encoder (`image_encoder`), loaded by `load_ip_adapter` or from the
    /// folder; `None` without one.
    pub image_encoder: Option<diffusion_models::CLIPVisionModelWithProjection>,
    /// The image encoder's preprocessing (`feature_extractor`); `None` without one.
    pub feature_extractor: Option<diffusion_models::CLIPImageProcessor>,
    /// LoRA adapters loaded into `unet` and the text encoders (see
    /// [`Self::load_lora_weights`]); empty by default.
    pub lora: diffusion_loaders::LoraState,
    /// `force_zeros_for_empty_prompt` from `model_index.json` (default true): without a
    /// negative prompt, the negative embeddings are zeros rather than the empty prompt's.
    pub force_zeros_for_empty_prompt: bool,
    /// `requires_aesthetics_score` from `model_index.json` (default false; true for refiners):
    /// the image-to-image pipeline then conditions on an aesthetic score instead of the target
    /// size.
    pub requires_aesthetics_score: bool,
}

impl AsRef<StableDiffusionXLComponents> for StableDiffusionXLComponents {
    fn as_ref(&self) -> &StableDiffusionXLComponents {
        self
    }
}

impl StableDiffusionXLComponents {
    /// Load a diffusers folder or Hub repository id with default [`HubOptions`].
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(name_or_path, &HubOptions::default(), device)
    }

    /// Load a diffusers folder or Hub repository id; `options.variant` as for
    /// [`crate::StableDiffusionComponents::from_pretrained_with`].
    ///
    /// # Errors
    /// As [`resolve_model_dir`]; [`Error::NotFound`] without `model_index.json`;
    /// [`Error::ConfigField`] / [`Error::Unsupported`] for another pipeline class or a missing
    /// or unexpected component; as the component loaders.
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        let dir = resolve_model_dir(name_or_path, options)?;
        Self::load_dir(&dir, options, device)
    }

    /// Load a local diffusers SDXL folder.
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    pub fn load_dir(dir: &Path, options: &HubOptions, device: &Device) -> Result<Self> {
        let (index, index_path) = read_model_index(dir)?;
        check_index(&index, &index_path)?;
        let flag = |name: &str, default: bool| match index.options.get(name) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| Error::ConfigField {
                path: index_path.clone(),
                field: name.into(),
                message: "expected true or false".into(),
            }),
        };
        let force_zeros_for_empty_prompt = flag("force_zeros_for_empty_prompt", true)?;
        let requires_aesthetics_score = flag("requires_aesthetics_score", false)?;
        let has_text_encoder = present(&index, "text_encoder");
        let opts = |component: &str| component_options(dir, component, options);
        let (unet, vae) = load_unet_vae(dir, options, device)?;
        let (text_encoder, tokenizer) = if has_text_encoder {
            let (model, _) = CLIPTextModel::from_pretrained_with(
                dir.join("text_encoder"),
                &opts("text_encoder"),
                device,
            )?;
            (
                Some(model),
                Some(CLIPTokenizer::from_pretrained(dir.join("tokenizer"))?),
            )
        } else {
            (None, None)
        };
        let (text_encoder_2, _) = CLIPTextModelWithProjection::from_pretrained_with(
            dir.join("text_encoder_2"),
            &opts("text_encoder_2"),
            device,
        )?;
        let (image_encoder, feature_extractor) =
            crate::stable_diffusion::load_image_encoder(dir, &opts("image_encoder"), device)?;
        Ok(Self {
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2: CLIPTokenizer::from_pretrained(dir.join("tokenizer_2"))?,
            unet,
            scheduler: AnyScheduler::from_config_file(dir.join("scheduler"))?,
            lora: diffusion_loaders::LoraState::new(),
            image_encoder,
            feature_extractor,
            force_zeros_for_empty_prompt,
            requires_aesthetics_score,
        })
    }

    /// Replace the scheduler by another class built from the current config (class name or
    /// A1111 alias).
    ///
    /// # Errors
    /// [`Error::UnknownName`] for an unknown name; as [`AnyScheduler::convert`].
    pub fn set_scheduler(&mut self, name: &str) -> Result<()> {
        self.scheduler = AnyScheduler::convert(&self.scheduler, &SchedulerSpec::parse(name)?)?;
        Ok(())
    }

    /// Cast every model to `dtype`.
    ///
    /// # Errors
    /// As [`to_dtype`].
    pub fn to_dtype(self, dtype: FloatDType) -> Result<Self> {
        Ok(Self {
            vae: to_dtype(self.vae, dtype)?,
            text_encoder: self.text_encoder.map(|m| to_dtype(m, dtype)).transpose()?,
            text_encoder_2: to_dtype(self.text_encoder_2, dtype)?,
            unet: to_dtype(self.unet, dtype)?,
            ..self
        })
    }

    /// `2 ** (len(vae.block_out_channels) - 1)`.
    pub fn vae_scale_factor(&self) -> usize {
        folder::vae_scale_factor(&self.vae)
    }

    /// `unet.config.sample_size * vae_scale_factor` as `(height, width)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`height`) when the UNet config has no `sample_size`.
    pub fn default_size(&self) -> Result<(usize, usize)> {
        folder::default_size(&self.vae, &self.unet)
    }
}

const TOKENIZERS: &[&str] = &["CLIPTokenizer", "CLIPTokenizerFast"];

/// The required components of a base model, in the order they are checked; a refiner's are the
/// first four.
const REQUIRED_BASE: &[(&str, &[&str])] = &[
    ("unet", &["UNet2DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    ("text_encoder_2", &["CLIPTextModelWithProjection"]),
    ("tokenizer_2", TOKENIZERS),
    ("text_encoder", &["CLIPTextModel"]),
    ("tokenizer", TOKENIZERS),
];

/// What SDXL folders may hold (refiners: no first text encoder and tokenizer). The
/// IP-Adapter image encoder and its feature extractor are accepted with a warning.
const FOLDER_RULES: FolderRules<'static> = FolderRules {
    family: "SDXL",
    pipeline_classes: PIPELINE_CLASSES,
    required: REQUIRED_BASE.split_at(4).0,
    known: &[
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ],
    optional: &["feature_extractor", "image_encoder"],
    not_loaded: &["feature_extractor", "image_encoder"],
    not_loaded_note: "IP-Adapter inputs are not supported",
    component_kind: "an SDXL component",
};

fn check_index(index: &ModelIndex, path: &Path) -> Result<()> {
    // Refiners have no first text encoder: both entries are null together.
    let has_encoder = present(index, "text_encoder");
    let rules = if has_encoder && present(index, "tokenizer") {
        FolderRules {
            required: REQUIRED_BASE,
            ..FOLDER_RULES
        }
    } else {
        FOLDER_RULES
    };
    let mismatched = has_encoder != present(index, "tokenizer");
    if mismatched && PIPELINE_CLASSES.contains(&index.class_name.as_str()) {
        return Err(Error::ConfigField {
            path: path.to_path_buf(),
            field: if has_encoder {
                "tokenizer"
            } else {
                "text_encoder"
            }
            .into(),
            message: "text_encoder and tokenizer must both be present or both be null".into(),
        });
    }
    rules.check(index, path)
}

/// Whether `model_index.json` names a component that is not null.
fn present(index: &ModelIndex, name: &str) -> bool {
    matches!(
        index.components.get(name),
        Some(ComponentSpec {
            class_name: Some(_),
            ..
        })
    )
}
