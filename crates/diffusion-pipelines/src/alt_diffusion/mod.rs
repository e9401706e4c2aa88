//! AltDiffusion (`diffusers.pipelines.deprecated.alt_diffusion`): Stable Diffusion with the CLIP
//! text encoder replaced by the multilingual XLM-R encoder of AltCLIP
//! ([`RobertaSeriesModelWithTransformation`]) and its [`XLMRobertaTokenizer`].
//!
//! Everything after the prompt embeddings is Stable Diffusion's: the pipelines run the same
//! denoising and image-to-image code through a [`PromptEncoder`] for the XLM-R encoder, so the
//! results match diffusers' `AltDiffusionPipeline` / `AltDiffusionImg2ImgPipeline` wherever they
//! match the Stable Diffusion ones.
//!
//! `clip_skip` is rejected with [`Error::InvalidArgument`]: diffusers 0.42.1 takes
//! `hidden_states[-(clip_skip + 1)]` and then calls `text_encoder.text_model.final_layer_norm`,
//! which this encoder does not have (an `AttributeError`); its hidden states are also
//! `hidden_size` wide and not projected to the UNet's width, and XLM-R has no final norm to
//! apply, so there is no result to reproduce.

use std::path::Path;

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::{HubOptions, resolve_model_dir};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{
    AutoencoderKL, Padding, RobertaSeriesModelWithTransformation, UNet2DConditionModel,
    XLMRobertaTokenizer,
};
use diffusion_schedulers::{AnyScheduler, SchedulerSpec};

use crate::stable_diffusion::folder::{self, FolderRules, component_options, load_unet_vae};
use crate::stable_diffusion::prompt::PromptEncoder;
use crate::stable_diffusion::{SdModels, load_image_encoder};

pub mod pipeline_alt_diffusion;
pub mod pipeline_alt_diffusion_img2img;

pub use pipeline_alt_diffusion::{AltDiffusionArgs, AltDiffusionPipeline};
pub use pipeline_alt_diffusion_img2img::{AltDiffusionImg2ImgArgs, AltDiffusionImg2ImgPipeline};

/// The pipeline classes whose folders hold these components.
pub const PIPELINE_CLASSES: &[&str] = &["AltDiffusionPipeline", "AltDiffusionImg2ImgPipeline"];

/// What AltDiffusion folders may hold (the IP-Adapter image encoder is loaded when present;
/// there is no safety checker).
const FOLDER_RULES: FolderRules<'static> = FolderRules {
    family: "AltDiffusion",
    pipeline_classes: PIPELINE_CLASSES,
    required: &[
        ("unet", &["UNet2DConditionModel"]),
        ("vae", &["AutoencoderKL"]),
        ("text_encoder", &["RobertaSeriesModelWithTransformation"]),
        (
            "tokenizer",
            &["XLMRobertaTokenizer", "XLMRobertaTokenizerFast"],
        ),
        ("scheduler", &[]),
    ],
    known: &["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
    optional: &["safety_checker", "feature_extractor", "image_encoder"],
    not_loaded: &["safety_checker"],
    not_loaded_note: "this port runs no safety checker",
    component_kind: "an AltDiffusion component",
};

/// The models and scheduler of the AltDiffusion pipelines.
///
/// Clone it to share the weights between pipelines (burn parameters are reference counted).
#[derive(Clone, Debug)]
pub struct AltDiffusionComponents {
    /// Image <-> latent autoencoder.
    pub vae: AutoencoderKL,
    /// XLM-R text encoder with its projection to the UNet's width.
    pub text_encoder: RobertaSeriesModelWithTransformation,
    /// XLM-R sentencepiece tokenizer.
    pub tokenizer: XLMRobertaTokenizer,
    /// The conditional denoiser.
    pub unet: UNet2DConditionModel,
    /// The noise scheduler; swap it with [`Self::set_scheduler`].
    pub scheduler: AnyScheduler,
    /// The IP-Adapter image encoder (`image_encoder`) when the folder has one.
    pub image_encoder: Option<diffusion_models::CLIPVisionModelWithProjection>,
    /// The image encoder's preprocessing (`feature_extractor`) when the folder has one.
    pub feature_extractor: Option<diffusion_models::CLIPImageProcessor>,
}

impl AsRef<AltDiffusionComponents> for AltDiffusionComponents {
    fn as_ref(&self) -> &AltDiffusionComponents {
        self
    }
}

impl AltDiffusionComponents {
    /// Load a diffusers folder or Hub repository id (default [`HubOptions`]).
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(name_or_path, &HubOptions::default(), device)
    }

    /// Load a diffusers folder or Hub repository id; `options.variant` picks `*.fp16.*` weights
    /// where a component folder has them.
    ///
    /// # Errors
    /// As [`resolve_model_dir`] and [`Self::load_dir`].
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        let dir = resolve_model_dir(name_or_path, options)?;
        Self::load_dir(&dir, options, device)
    }

    /// Load a local AltDiffusion pipeline folder.
    ///
    /// # Errors
    /// [`Error::NotFound`] without `model_index.json`; [`Error::Unsupported`] /
    /// [`Error::ConfigField`] naming `model_index.json` and the component for another pipeline
    /// class, a missing required component or one of an unexpected class; as the component
    /// loaders (strict weights).
    pub fn load_dir(dir: &Path, options: &HubOptions, device: &Device) -> Result<Self> {
        FOLDER_RULES.read_index(dir)?;
        let opts = |component: &str| component_options(dir, component, options);
        let (unet, vae) = load_unet_vae(dir, options, device)?;
        let (text_encoder, _) = RobertaSeriesModelWithTransformation::from_pretrained_with(
            dir.join("text_encoder"),
            &opts("text_encoder"),
            device,
        )?;
        let tokenizer = XLMRobertaTokenizer::from_pretrained(dir.join("tokenizer"))?;
        let scheduler = AnyScheduler::from_config_file(dir.join("scheduler"))?;
        let (image_encoder, feature_extractor) =
            load_image_encoder(dir, &opts("image_encoder"), device)?;
        Ok(Self {
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            image_encoder,
            feature_extractor,
        })
    }

    /// Replace the scheduler by another class built from the current one's config; `name` is a
    /// diffusers class name or an A1111 alias (`"DPM++ 2M Karras"`).
    ///
    /// # Errors
    /// [`Error::UnknownName`] for an unknown name; as [`AnyScheduler::convert`].
    pub fn set_scheduler(&mut self, name: &str) -> Result<()> {
        self.scheduler = AnyScheduler::convert(&self.scheduler, &SchedulerSpec::parse(name)?)?;
        Ok(())
    }

    /// Cast every model to `dtype` (`pipe.to(torch.float16)`).
    ///
    /// # Errors
    /// As [`to_dtype`].
    pub fn to_dtype(self, dtype: FloatDType) -> Result<Self> {
        Ok(Self {
            vae: to_dtype(self.vae, dtype)?,
            text_encoder: to_dtype(self.text_encoder, dtype)?,
            unet: to_dtype(self.unet, dtype)?,
            ..self
        })
    }

    /// Pixels per latent along each side.
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

    /// The device the models live on.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`unet`) for a model without parameters.
    pub fn device(&self) -> Result<Device> {
        folder::unet_device(&self.unet)
    }

    /// The prompt encoder and the Stable Diffusion models, borrowed for one call.
    pub(crate) fn split(&mut self) -> (SdModels<'_>, AltPromptEncoder<'_>) {
        (
            SdModels {
                vae: &self.vae,
                unet: &self.unet,
                scheduler: &mut self.scheduler,
                image_encoder: self.image_encoder.as_ref(),
                feature_extractor: self.feature_extractor.as_ref(),
            },
            AltPromptEncoder {
                tokenizer: &self.tokenizer,
                text_encoder: &self.text_encoder,
            },
        )
    }
}

/// AltDiffusion's `encode_prompt` text path: XLM-R ids padded to `max_length`, the tokenizer's
/// attention mask when the encoder's config sets `use_attention_mask`, and `projection_state`
/// as the prompt embeddings.
pub(crate) struct AltPromptEncoder<'a> {
    pub tokenizer: &'a XLMRobertaTokenizer,
    pub text_encoder: &'a RobertaSeriesModelWithTransformation,
}

impl PromptEncoder for AltPromptEncoder<'_> {
    fn model_max_length(&self) -> usize {
        self.tokenizer.model_max_length()
    }

    fn embed(
        &self,
        prompts: &[String],
        max_length: usize,
        clip_skip: Option<usize>,
        device: &Device,
    ) -> Result<Tensor<3>> {
        if let Some(skip) = clip_skip {
            return Err(Error::invalid_argument(
                "clip_skip",
                format!(
                    "{skip}: AltDiffusion's XLM-R text encoder has no clip_skip (diffusers fails \
                     on it too: its hidden states are neither normed nor projected to the UNet's \
                     width)"
                ),
            ));
        }
        for prompt in prompts {
            let len = self.tokenizer.encode(prompt, true)?.len();
            if len > max_length {
                log::warn!("prompt of {len} tokens truncated to {max_length}: {prompt:?}");
            }
        }
        let tokens =
            self.tokenizer
                .tokenize(prompts, Padding::MaxLength, Some(max_length), true)?;
        let mask = if self.text_encoder.config().use_attention_mask {
            Some(tokens.attention_mask_tensor(device)?)
        } else {
            None
        };
        let out = self
            .text_encoder
            .forward(tokens.input_ids_tensor(device)?, mask)?;
        Ok(out.projection_state)
    }
}
