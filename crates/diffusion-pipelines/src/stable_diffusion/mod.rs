//! Stable Diffusion 1.x / 2.x pipelines (`diffusers.pipelines.stable_diffusion`): text-to-image,
//! image-to-image and inpainting over one set of components.
//!
//! Every pipeline holds a [`StableDiffusionComponents`] (`vae`, `text_encoder`, `tokenizer`,
//! `unet`, `scheduler`) loaded from a diffusers folder's `model_index.json`, a Hub id, or built
//! from parts. burn modules share their weights when cloned, so moving the components from one
//! pipeline to another (`from_pipe`) costs no memory and no loading.

use std::path::Path;

#[cfg(doc)]
use diffusion_core::Error;
use diffusion_core::burn::tensor::FloatDType;
use diffusion_core::{Device, Result};
use diffusion_loaders::{HubOptions, resolve_model_dir};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{
    AutoencoderKL, CLIPTextModel, CLIPTokenizer, PretrainedOptions, UNet2DConditionModel,
};
use diffusion_schedulers::{AnyScheduler, SchedulerSpec};

pub(crate) mod denoise;
pub(crate) mod folder;
pub(crate) mod image_input;
pub(crate) mod mask_crop;
pub mod pipeline_stable_diffusion;
pub mod pipeline_stable_diffusion_img2img;
pub mod pipeline_stable_diffusion_inpaint;
pub(crate) mod prompt;

pub use image_input::PipelineImageInput;

use folder::{FolderRules, component_options, load_unet_vae};
pub use pipeline_stable_diffusion::{StableDiffusionArgs, StableDiffusionPipeline};
pub use pipeline_stable_diffusion_img2img::{
    StableDiffusionImg2ImgArgs, StableDiffusionImg2ImgPipeline,
};
pub use pipeline_stable_diffusion_inpaint::{
    StableDiffusionInpaintArgs, StableDiffusionInpaintPipeline,
};

/// The pipeline classes whose folders hold exactly these components.
const PIPELINE_CLASSES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "CycleDiffusionPipeline",
    "StableDiffusionPix2PixZeroPipeline",
    "StableDiffusionInstructPix2PixPipeline",
];

/// What Stable Diffusion folders may hold. Optional components: the IP-Adapter image encoder and
/// its feature extractor are loaded when present; there is no safety checker; in Pix2Pix Zero
/// folders the inverse scheduler is read by that pipeline, and the BLIP captioner is not ported
/// (captions are given, or come from a `Captioner`).
const FOLDER_RULES: FolderRules<'static> = FolderRules {
    family: "Stable Diffusion",
    pipeline_classes: PIPELINE_CLASSES,
    required: &[
        ("unet", &["UNet2DConditionModel"]),
        ("vae", &["AutoencoderKL"]),
        ("text_encoder", &["CLIPTextModel"]),
        ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
        ("scheduler", &[]),
    ],
    known: &["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
    optional: &[
        "safety_checker",
        "feature_extractor",
        "image_encoder",
        "inverse_scheduler",
        "caption_generator",
        "caption_processor",
    ],
    not_loaded: &["safety_checker", "caption_generator", "caption_processor"],
    not_loaded_note: "this port runs no safety checker or BLIP captioner",
    component_kind: "a Stable Diffusion 1.x/2.x component",
};

/// The models and scheduler every Stable Diffusion 1.x / 2.x pipeline runs on.
///
/// Clone it to share the weights between pipelines (burn parameters are reference counted).
#[derive(Clone, Debug)]
pub struct StableDiffusionComponents {
    /// Image <-> latent autoencoder.
    pub vae: AutoencoderKL,
    /// CLIP text encoder (`CLIPTextModel`).
    pub text_encoder: CLIPTextModel,
    /// CLIP tokenizer.
    pub tokenizer: CLIPTokenizer,
    /// The conditional denoiser (4 input channels, or 9 for inpainting checkpoints).
    pub unet: UNet2DConditionModel,
    /// The noise scheduler; swap it with [`Self::set_scheduler`].
    pub scheduler: AnyScheduler,
    /// The IP-Adapter image encoder (`image_encoder`), loaded by `load_ip_adapter` or from the
    /// folder; `None` without one.
    pub image_encoder: Option<diffusion_models::CLIPVisionModelWithProjection>,
    /// The image encoder's preprocessing (`feature_extractor`); `None` without one.
    pub feature_extractor: Option<diffusion_models::CLIPImageProcessor>,
    /// LoRA adapters loaded into `unet` and the text encoders (see
    /// [`Self::load_lora_weights`]); empty by default.
    pub lora: diffusion_loaders::LoraState,
}

impl AsRef<StableDiffusionComponents> for StableDiffusionComponents {
    fn as_ref(&self) -> &StableDiffusionComponents {
        self
    }
}

impl StableDiffusionComponents {
    /// Load a diffusers folder or Hub repository id (default [`HubOptions`]: online unless
    /// `HF_HUB_OFFLINE` is set, no variant).
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    pub fn from_pretrained(name_or_path: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(name_or_path, &HubOptions::default(), device)
    }

    /// Load a diffusers folder or Hub repository id. `options.variant` (`"fp16"`) picks
    /// `*.fp16.safetensors` in each component folder that has such files; the others load their
    /// plain weights, as diffusers does.
    ///
    /// # Errors
    /// As [`resolve_model_dir`]; [`Error::NotFound`] without `model_index.json`;
    /// [`Error::ConfigField`] / [`Error::Unsupported`] (naming `model_index.json` and the
    /// component) for another pipeline class, a missing required component or one of an
    /// unexpected class; as the component loaders (strict weights).
    pub fn from_pretrained_with(
        name_or_path: &str,
        options: &HubOptions,
        device: &Device,
    ) -> Result<Self> {
        let dir = resolve_model_dir(name_or_path, options)?;
        Self::load_dir(&dir, options, device)
    }

    /// Load a local diffusers pipeline folder.
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    pub fn load_dir(dir: &Path, options: &HubOptions, device: &Device) -> Result<Self> {
        FOLDER_RULES.read_index(dir)?;
        let opts = |component: &str| component_options(dir, component, options);
        let (unet, vae) = load_unet_vae(dir, options, device)?;
        let (text_encoder, _) = CLIPTextModel::from_pretrained_with(
            dir.join("text_encoder"),
            &opts("text_encoder"),
            device,
        )?;
        let tokenizer = CLIPTokenizer::from_pretrained(dir.join("tokenizer"))?;
        let scheduler = AnyScheduler::from_config_file(dir.join("scheduler"))?;
        let (image_encoder, feature_extractor) =
            load_image_encoder(dir, &opts("image_encoder"), device)?;
        Ok(Self {
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            lora: diffusion_loaders::LoraState::new(),
            image_encoder,
            feature_extractor,
        })
    }

    /// Replace the scheduler by another class built from the current one's config, as
    /// `pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`; `name` is a
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

    /// `2 ** (len(vae.block_out_channels) - 1)`: pixels per latent along each side.
    pub fn vae_scale_factor(&self) -> usize {
        folder::vae_scale_factor(&self.vae)
    }

    /// `unet.config.sample_size * vae_scale_factor` as `(height, width)`, the default image size.
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
}

/// The models and scheduler a Stable Diffusion call runs on, borrowed from a pipeline's
/// components: what the pipelines share with those whose text encoder differs (AltDiffusion).
pub(crate) struct SdModels<'a> {
    pub vae: &'a AutoencoderKL,
    pub unet: &'a UNet2DConditionModel,
    pub scheduler: &'a mut AnyScheduler,
    pub image_encoder: Option<&'a diffusion_models::CLIPVisionModelWithProjection>,
    pub feature_extractor: Option<&'a diffusion_models::CLIPImageProcessor>,
}

impl SdModels<'_> {
    /// As [`StableDiffusionComponents::vae_scale_factor`].
    pub fn vae_scale_factor(&self) -> usize {
        folder::vae_scale_factor(self.vae)
    }

    /// As [`StableDiffusionComponents::default_size`].
    pub fn default_size(&self) -> Result<(usize, usize)> {
        folder::default_size(self.vae, self.unet)
    }

    /// As [`StableDiffusionComponents::device`].
    pub fn device(&self) -> Result<Device> {
        folder::unet_device(self.unet)
    }
}

/// The variant to ask a component folder for: the requested one where the folder has such
/// files, else none (with a warning), as diffusers falls back per component.
pub(crate) fn variant_for(dir: &Path, variant: Option<&str>) -> Option<String> {
    let variant = variant?;
    let marker = format!(".{variant}.");
    let has = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains(&marker))
        })
        .unwrap_or(false);
    if !has {
        log::warn!(
            "{}: no `{variant}` weights, loading the default ones",
            dir.display()
        );
    }
    has.then(|| variant.to_string())
}

/// The optional IP-Adapter image encoder and its preprocessing of a pipeline folder
/// (`image_encoder/`, `feature_extractor/`), when the folder has them.
///
/// # Errors
/// The loaders' errors for folders that exist but do not load.
pub(crate) fn load_image_encoder(
    dir: &Path,
    opts: &PretrainedOptions,
    device: &Device,
) -> Result<(
    Option<diffusion_models::CLIPVisionModelWithProjection>,
    Option<diffusion_models::CLIPImageProcessor>,
)> {
    let encoder_dir = dir.join("image_encoder");
    let image_encoder = if encoder_dir.join("config.json").is_file() {
        Some(
            diffusion_models::CLIPVisionModelWithProjection::from_pretrained_with(
                &encoder_dir,
                opts,
                device,
            )?
            .0,
        )
    } else {
        None
    };
    let extractor_dir = dir.join("feature_extractor");
    let feature_extractor = if extractor_dir.join("preprocessor_config.json").is_file() {
        Some(diffusion_models::CLIPImageProcessor::from_pretrained(
            &extractor_dir,
        )?)
    } else {
        None
    };
    Ok((image_encoder, feature_extractor))
}
