//! SDXL runs of `diffusers train text-to-image` and `diffusers train lora`: a model folder whose
//! `model_index.json` names a `StableDiffusionXL*` pipeline trains as
//! train_text_to_image_sdxl.py / train_text_to_image_lora_sdxl.py do, with those scripts'
//! extra flags.

use std::path::Path;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use diffusion_core::{ModelIndex, parse_device};
use diffusion_train::{
    SdxlTrainConfig, TextToImageConfig, TimestepBiasStrategy, train_text_to_image_sdxl,
};

use crate::train::TextToImageArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TimestepBiasArg {
    None,
    Earlier,
    Later,
    Range,
}

/// The SDXL scripts' options that the SD1 scripts lack: train_text_to_image_sdxl.py's (SDXL
/// full fine-tuning only) and train_text_to_image_lora_sdxl.py's `--train_text_encoder`.
#[derive(Args, Debug)]
pub struct SdxlFlags {
    /// SDXL LoRA: also train LoRAs of both text encoders (same rank), saved with the UNet's.
    #[arg(long)]
    pub train_text_encoder: bool,

    /// SDXL: replace this share of the captions with the empty prompt (0 to 1).
    #[arg(long)]
    pub proportion_empty_prompts: Option<f64>,

    /// SDXL: bias the timestep draw towards the earlier / later timesteps or a range.
    #[arg(long, value_enum)]
    pub timestep_bias_strategy: Option<TimestepBiasArg>,

    /// SDXL: weight of the biased timesteps.
    #[arg(long)]
    pub timestep_bias_multiplier: Option<f64>,

    /// SDXL: first biased timestep of the range strategy.
    #[arg(long)]
    pub timestep_bias_begin: Option<usize>,

    /// SDXL: end (exclusive) of the range strategy.
    #[arg(long)]
    pub timestep_bias_end: Option<usize>,

    /// SDXL: share of the timesteps the earlier / later strategies bias.
    #[arg(long)]
    pub timestep_bias_portion: Option<f64>,
}

impl SdxlFlags {
    fn given(&self) -> Option<&'static str> {
        [
            (self.train_text_encoder, "--train-text-encoder"),
            (
                self.proportion_empty_prompts.is_some(),
                "--proportion-empty-prompts",
            ),
            (
                self.timestep_bias_strategy.is_some(),
                "--timestep-bias-strategy",
            ),
            (
                self.timestep_bias_multiplier.is_some(),
                "--timestep-bias-multiplier",
            ),
            (self.timestep_bias_begin.is_some(), "--timestep-bias-begin"),
            (self.timestep_bias_end.is_some(), "--timestep-bias-end"),
            (
                self.timestep_bias_portion.is_some(),
                "--timestep-bias-portion",
            ),
        ]
        .into_iter()
        .find_map(|(given, name)| given.then_some(name))
    }
}

/// Whether `model` is an SDXL folder (its `model_index.json` names a `StableDiffusionXL*`
/// pipeline).
pub fn is_sdxl(model: &Path) -> Result<bool> {
    let index = model.join("model_index.json");
    if !index.is_file() {
        return Ok(false);
    }
    Ok(ModelIndex::load(&index)?
        .class_name
        .starts_with("StableDiffusionXL"))
}

/// Refuse the SDXL flags on a model that is not SDXL.
pub fn refuse_flags(flags: &SdxlFlags) -> Result<()> {
    if let Some(name) = flags.given() {
        bail!("{name} is an SDXL option; the model is not an SDXL pipeline");
    }
    Ok(())
}

/// Train the SDXL folder of `config` (built from the shared flags) with the SDXL flags; the
/// scripts' own defaults (`--resolution 1024`, the output folder of the full script) apply
/// where neither `--config` nor a flag set them.
pub fn train(mut config: TextToImageConfig, args: &TextToImageArgs) -> Result<()> {
    let flags = &args.sdxl;
    if args.config.is_none() {
        let defaults = if config.lora.is_some() {
            SdxlTrainConfig::lora_defaults()
        } else {
            SdxlTrainConfig::default()
        };
        if args.resolution.is_none() {
            config.resolution = defaults.text_to_image.resolution;
        }
        if args.output_dir.is_none() {
            config.output_dir = defaults.text_to_image.output_dir;
        }
    }
    let mut sdxl = SdxlTrainConfig {
        text_to_image: config,
        ..SdxlTrainConfig::default()
    };
    sdxl.train_text_encoder = flags.train_text_encoder;
    if let Some(p) = flags.proportion_empty_prompts {
        sdxl.proportion_empty_prompts = p;
    }
    let bias = &mut sdxl.timestep_bias;
    if let Some(s) = flags.timestep_bias_strategy {
        bias.strategy = match s {
            TimestepBiasArg::None => TimestepBiasStrategy::None,
            TimestepBiasArg::Earlier => TimestepBiasStrategy::Earlier,
            TimestepBiasArg::Later => TimestepBiasStrategy::Later,
            TimestepBiasArg::Range => TimestepBiasStrategy::Range,
        };
    }
    if let Some(v) = flags.timestep_bias_multiplier {
        bias.multiplier = v;
    }
    if let Some(v) = flags.timestep_bias_begin {
        bias.begin = v;
    }
    if let Some(v) = flags.timestep_bias_end {
        bias.end = v;
    }
    if let Some(v) = flags.timestep_bias_portion {
        bias.portion = v;
    }
    sdxl.validate()?;
    sdxl.check_paths()?;
    let device = parse_device(&args.device)?;
    let base = &sdxl.text_to_image;
    eprintln!(
        "SDXL {} {} on {} into {}",
        if sdxl.train_text_encoder {
            "LoRA training (UNet and both text encoders) of"
        } else if base.lora.is_some() {
            "LoRA training of"
        } else {
            "fine-tuning of"
        },
        base.pretrained_model.display(),
        base.train_data_dir.display(),
        base.output_dir.display()
    );
    let report = train_text_to_image_sdxl(&sdxl, &device)?;
    let losses = report.losses();
    eprintln!(
        "done: {} steps, {:.2} steps/s, final loss {:.5}; saved to {}",
        losses.len(),
        report.steps_per_second(),
        losses.last().copied().unwrap_or(f32::NAN),
        base.output_dir.display()
    );
    Ok(())
}
