//! Training diffusion models on burn's autodiff, following diffusers' training examples.
//!
//! [`train_unconditional`] is `examples/unconditional_image_generation/train_unconditional.py`:
//! a `UNet2DModel` learns to predict the noise (or `v`, or the clean sample) that a
//! `DDPMScheduler` added, with `torch.optim.AdamW` semantics ([`AdamW`]), a learning-rate
//! schedule from diffusers' `optimization.py` ([`LrSchedule`]), global gradient-norm clipping,
//! an optional EMA of the weights ([`EmaModel`]), resumable checkpoints and a `DDPMPipeline`
//! folder at the end.
//!
//! ```no_run
//! use diffusion_core::Device;
//! use diffusion_train::{ImageDataset, TrainConfig, train_unconditional};
//!
//! # fn main() -> diffusion_core::Result<()> {
//! let data = ImageDataset::from_digits_csv_gz("digits.csv.gz", 8)?;
//! let config = TrainConfig { output_dir: "ddpm-digits".into(), ..TrainConfig::digits() };
//! let report = train_unconditional(&config, &data, &Device::flex())?;
//! println!("final loss {:?}", report.losses().last());
//! # Ok(())
//! # }
//! ```
//!
//! [`Trainer`] exposes single steps with caller-supplied noise and timesteps, which is how the
//! parity tests drive it.
#![warn(missing_docs)]

pub mod autodiff;
pub mod caption_data;
pub mod checkpoint;
pub mod class_images;
pub mod config;
pub mod controlnet;
pub mod controlnet_run;
pub mod data;
pub mod data_parallel;
pub mod dreambooth;
pub mod ema;
pub mod flow_matching;
pub mod instruct_pix2pix;
pub mod instruct_pix2pix_run;
pub mod lora;
pub mod lr_schedule;
pub mod mixed_precision;
pub mod objective;
pub mod optimizer;
mod params;
pub mod resize;
pub mod run;
pub mod sdxl;
pub mod sdxl_run;
pub mod sdxl_text_lora;
pub mod text_to_image;
pub mod text_to_image_run;
pub mod textual_inversion;
pub mod textual_inversion_run;
pub mod trainer;
pub mod validation;

pub use caption_data::{CaptionDataset, CaptionDatasetOptions, ImageDraws, tokenize_captions};
pub use checkpoint::{TrainingState, load_checkpoint, save_checkpoint, save_pipeline};
pub use class_images::generate_class_images;
pub use config::TrainConfig;
pub use controlnet::{
    ControlNetParallel, ControlNetTrainConfig, ControlNetTrainer, conditioning_pixel_values,
};
pub use controlnet_run::{ControlNetRunConfig, train_controlnet};
pub use data::{FolderOptions, ImageDataset};
pub use data_parallel::{DataParallel, TextToImageParallel};
pub use dreambooth::{
    DreamBoothConfig, DreamBoothLoraFactors, DreamBoothParallel, DreamBoothTrainer,
    dreambooth_loss, train_dreambooth,
};
pub use ema::{EmaConfig, EmaModel};
pub use flow_matching::{FlowMatching, FlowMatchingConfig, FlowMatchingSchedule, WeightingScheme};
pub use instruct_pix2pix::{
    EditBatch, EditDataset, InstructPix2PixConfig, InstructPix2PixTrainer, conditioning_masks,
    instruct_pix2pix_loss, widen_conv_in,
};
pub use instruct_pix2pix_run::train_instruct_pix2pix;
pub use lora::{LoraComponent, LoraFactors, LoraTrainConfig, UNetLora, save_lora_weights};
pub use lr_schedule::{LrSchedule, LrScheduleKind};
pub use mixed_precision::{GradScaler, GradScalerConfig, MixedPrecision};
pub use objective::{
    NoiseDraws, Objective, compute_snr, conditional_loss, conditional_prediction, min_snr_weights,
};
pub use optimizer::{AdamW, AdamWConfig, FlatGradients};
pub use resize::Interpolation;
pub use run::{LogEntry, TrainReport, train_unconditional};
pub use sdxl::{
    SdxlConditioning, SdxlParallel, SdxlTextEncoders, SdxlTrainConfig, SdxlTrainer, TimestepBias,
    TimestepBiasStrategy, compute_time_ids,
};
pub use sdxl_run::train_text_to_image_sdxl;
pub use sdxl_text_lora::{SdxlLoraFactors, new_sdxl_text_trainer};
pub use text_to_image::{TextToImageConfig, TextToImageTrainer, load_noise_scheduler};
pub use text_to_image_run::train_text_to_image;
pub use textual_inversion::{
    LearnableProperty, TextualInversionConfig, TextualInversionParallel, TextualInversionTrainer,
    add_placeholder_tokens,
};
pub use textual_inversion_run::train_textual_inversion;
pub use trainer::{StepStats, Trainer, training_loss};
pub use validation::{
    ImageValidationConfig, PromptValidationConfig, ValidationSampler, write_validation_strip,
};

/// The Rust examples of docs/training.md, compiled as doctests so the guide stays correct.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/training.md")]
pub struct TrainingGuide;
