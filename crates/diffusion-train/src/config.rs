//! [`TrainConfig`]: every setting of a training run, with the defaults of diffusers'
//! `examples/unconditional_image_generation/train_unconditional.py`, and its JSON form.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use diffusion_core::{ConfigFile, Error, Result};
use diffusion_models::UNet2DModelConfig;
use diffusion_schedulers::{DDPMSchedulerConfig, PredictionType};

use crate::data::ImageDataset;
use crate::ema::EmaConfig;
use crate::lr_schedule::LrScheduleKind;
use crate::mixed_precision::MixedPrecision;
use crate::optimizer::AdamWConfig;
use crate::validation::ImageValidationConfig;

/// Settings of [`crate::train_unconditional`]. Field names are train_unconditional.py's
/// command-line options where it has one; `Default` is its defaults (`--use_ema` is off there too).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Where checkpoints, logs and the final pipeline go.
    pub output_dir: PathBuf,
    /// The model to train from scratch. `sample_size` is filled from the data when unset.
    /// train_unconditional.py's default is a 6-level RGB model (128..512 channels, attention
    /// at the fifth level).
    pub model: UNet2DModelConfig,
    /// Start from the weights of a diffusers model folder instead (its config replaces `model`).
    pub pretrained_model: Option<PathBuf>,
    /// The DDPM noise schedule and the prediction target (`prediction_type`).
    pub scheduler: DDPMSchedulerConfig,
    /// Images per optimizer step.
    pub train_batch_size: usize,
    /// Passes over the data (the last batch of an epoch may be smaller).
    pub num_epochs: usize,
    /// Stop after this many optimizer steps instead of `num_epochs` epochs.
    pub max_train_steps: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Shape of the learning-rate schedule.
    pub lr_scheduler: LrScheduleKind,
    /// Steps of linear warmup.
    pub lr_warmup_steps: usize,
    /// `betas[0]` of AdamW.
    pub adam_beta1: f64,
    /// `betas[1]` of AdamW.
    pub adam_beta2: f64,
    /// Decoupled weight decay of AdamW.
    pub adam_weight_decay: f64,
    /// `eps` of AdamW.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (diffusers clips at 1.0); `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Keep an exponential moving average of the weights and export it.
    pub use_ema: bool,
    /// `inv_gamma` of the EMA warmup.
    pub ema_inv_gamma: f64,
    /// `power` of the EMA warmup.
    pub ema_power: f64,
    /// Upper bound of the EMA decay.
    pub ema_max_decay: f64,
    /// Mirror training images left-right at random.
    pub random_flip: bool,
    /// Seed of everything random: data order, timesteps, noise and flips of step `s` are drawn
    /// from generators seeded from `(seed, epoch)` and `(seed, s)`, which is what makes resuming
    /// exact.
    pub seed: u64,
    /// Save a resumable checkpoint every this many steps (`output_dir/checkpoint-{step}`).
    pub checkpointing_steps: usize,
    /// Keep at most this many checkpoints, deleting the oldest.
    pub checkpoints_total_limit: Option<usize>,
    /// A checkpoint folder to resume from, or `"latest"` for the newest in `output_dir`
    /// (a fresh start when there is none, as in diffusers).
    pub resume_from_checkpoint: Option<String>,
    /// Save the pipeline to `output_dir` after every this many epochs (and after the last).
    pub save_model_epochs: usize,
    /// Show a progress bar on the terminal.
    pub show_progress: bool,
    /// Data-parallel training over these devices (`["cpu", "cpu"]`, `["cuda:0", "cuda:1"]`),
    /// the first being the main one; empty (the default) trains on the device given to
    /// [`crate::train_unconditional`]. `train_batch_size` is then the batch of each device, as
    /// with accelerate: a step takes `devices.len() x train_batch_size` images. See
    /// [`crate::data_parallel`].
    pub devices: Vec<String>,
    /// Validation grids during training (off by default).
    pub validation: ImageValidationConfig,
    /// accelerate's `--mixed_precision`: `no`, `fp16` or `bf16` (see [`crate::mixed_precision`]).
    pub mixed_precision: MixedPrecision,
    /// `--gradient_checkpointing`: recompute memory-bound activations in the backward pass
    /// instead of keeping them (burn's balanced checkpointing, see [`crate::autodiff`]).
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        let model = UNet2DModelConfig {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            layers_per_block: 2,
            block_out_channels: vec![128, 128, 256, 256, 512, 512],
            down_block_types: s(&[
                "DownBlock2D",
                "DownBlock2D",
                "DownBlock2D",
                "DownBlock2D",
                "AttnDownBlock2D",
                "DownBlock2D",
            ]),
            up_block_types: s(&[
                "UpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
            ]),
            ..UNet2DModelConfig::default()
        };
        Self {
            output_dir: PathBuf::from("ddpm-model-64"),
            model,
            pretrained_model: None,
            scheduler: DDPMSchedulerConfig::default(),
            train_batch_size: 16,
            num_epochs: 100,
            max_train_steps: None,
            learning_rate: 1e-4,
            lr_scheduler: LrScheduleKind::Cosine,
            lr_warmup_steps: 500,
            adam_beta1: 0.95,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-6,
            adam_epsilon: 1e-8,
            max_grad_norm: Some(1.0),
            use_ema: false,
            ema_inv_gamma: 1.0,
            ema_power: 0.75,
            ema_max_decay: 0.9999,
            random_flip: false,
            seed: 0,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            save_model_epochs: 10,
            show_progress: true,
            devices: Vec::new(),
            validation: ImageValidationConfig::default(),
            mixed_precision: MixedPrecision::No,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// A small one-channel model and settings for scikit-learn's digits at their native 8x8 (see
    /// [`crate::ImageDataset::from_digits_csv_gz`]): three levels of 32/64/64 channels with
    /// attention at the lowest resolution (1.1M parameters), batch 64, EMA, learning rate
    /// 1e-3 with 100 warmup steps and a cosine decay over 1,500 steps (about 52 epochs). On one core
    /// of this project's 2-core CPU that is about 1.6 steps/s, 15 minutes; 500 steps already
    /// give digit-like samples.
    pub fn digits() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            output_dir: PathBuf::from("ddpm-digits"),
            model: UNet2DModelConfig {
                sample_size: None,
                in_channels: 1,
                out_channels: 1,
                layers_per_block: 1,
                block_out_channels: vec![32, 64, 64],
                norm_num_groups: Some(8),
                attention_head_dim: Some(8),
                down_block_types: s(&["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]),
                up_block_types: s(&["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
                ..UNet2DModelConfig::default()
            },
            train_batch_size: 64,
            max_train_steps: Some(1500),
            learning_rate: 1e-3,
            lr_warmup_steps: 100,
            use_ema: true,
            checkpointing_steps: 500,
            checkpoints_total_limit: Some(2),
            save_model_epochs: 20,
            ..Self::default()
        }
    }

    /// The AdamW hyperparameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            weight_decay: self.adam_weight_decay,
            epsilon: self.adam_epsilon,
        }
    }

    /// The EMA settings (as train_unconditional.py builds its `EMAModel`).
    pub fn ema(&self) -> EmaConfig {
        EmaConfig {
            decay: self.ema_max_decay,
            inv_gamma: self.ema_inv_gamma,
            power: self.ema_power,
            use_ema_warmup: true,
            ..EmaConfig::default()
        }
    }

    /// Images per optimizer step: `train_batch_size` on each of the `devices` (at least one).
    pub fn global_batch_size(&self) -> usize {
        self.train_batch_size * self.devices.len().max(1)
    }

    /// Optimizer steps per epoch for `dataset_len` images (`len(train_dataloader)`, of the
    /// global batch).
    pub fn steps_per_epoch(&self, dataset_len: usize) -> usize {
        dataset_len.div_ceil(self.global_batch_size().max(1))
    }

    /// Total optimizer steps: `max_train_steps`, else `num_epochs` epochs.
    pub fn num_training_steps(&self, dataset_len: usize) -> usize {
        self.max_train_steps
            .unwrap_or(self.num_epochs * self.steps_per_epoch(dataset_len))
    }

    /// Read a JSON config (missing keys take their defaults, unknown keys are an error).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`] for malformed JSON, [`Error::ConfigField`] naming the
    /// field for a wrong type or unknown key.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value = diffusion_core::config::parse_json(&text, path)?;
        // The nested diffusers configs go through their own parsers first, which name bad fields
        // and warn about keys they do not know (serde alone would drop those silently).
        if let Some(model) = value.get("model") {
            ConfigFile::<UNet2DModelConfig>::from_value(model.clone(), path)?;
        }
        if let Some(scheduler) = value.get("scheduler") {
            ConfigFile::<DDPMSchedulerConfig>::from_value(scheduler.clone(), path)?;
        }
        serde_json::from_value(value).map_err(|e| Error::ConfigField {
            path: path.to_path_buf(),
            field: "<root>".into(),
            message: e.to_string(),
        })
    }

    /// Write the config as pretty JSON.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        diffusion_core::config::write_atomically(path.as_ref(), text.as_bytes())
    }

    /// Check the settings on their own, before any model is built.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("train_batch_size", self.train_batch_size),
            ("checkpointing_steps", self.checkpointing_steps),
            ("save_model_epochs", self.save_model_epochs),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::invalid_argument(name, "must be positive"));
            }
        }
        if self.max_train_steps.is_none() && self.num_epochs == 0 {
            return Err(Error::invalid_argument("num_epochs", "must be positive"));
        }
        if self.max_train_steps == Some(0) {
            return Err(Error::invalid_argument(
                "max_train_steps",
                "must be positive",
            ));
        }
        if self.checkpoints_total_limit == Some(0) {
            return Err(Error::invalid_argument(
                "checkpoints_total_limit",
                "must be positive",
            ));
        }
        if let Some(norm) = self.max_grad_norm
            && !(norm > 0.0 && norm.is_finite())
        {
            return Err(Error::invalid_argument(
                "max_grad_norm",
                format!("{norm} is not positive"),
            ));
        }
        match self.scheduler.prediction_type {
            PredictionType::Epsilon | PredictionType::Sample | PredictionType::VPrediction => {}
            other => {
                return Err(Error::invalid_argument(
                    "prediction_type",
                    format!("`{}` has no DDPM training target", other.as_str()),
                ));
            }
        }
        if !self.devices.is_empty() {
            crate::data_parallel::parse_devices(&self.devices)?;
        }
        self.adamw().validate()?;
        if self.use_ema {
            self.ema().validate()?;
        }
        self.validation.validate()
    }

    /// Check that `dataset` fits `model` (channels, a size the UNet's downsampling divides).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `dataset` or `model`.
    pub fn check_data(model: &UNet2DModelConfig, dataset: &ImageDataset) -> Result<()> {
        if model.in_channels != dataset.channels() {
            return Err(Error::invalid_argument(
                "dataset",
                format!(
                    "images have {} channel(s), the model takes {}",
                    dataset.channels(),
                    model.in_channels
                ),
            ));
        }
        if model.out_channels != model.in_channels {
            return Err(Error::invalid_argument(
                "model",
                format!(
                    "out_channels ({}) must equal in_channels ({}): the training targets are shaped \
                     like the images",
                    model.out_channels, model.in_channels
                ),
            ));
        }
        let multiple = 1usize << model.block_out_channels.len().saturating_sub(1);
        if !dataset.height().is_multiple_of(multiple) || !dataset.width().is_multiple_of(multiple) {
            return Err(Error::invalid_argument(
                "dataset",
                format!(
                    "{}x{} images; this model needs sides that are multiples of {multiple}",
                    dataset.height(),
                    dataset.width()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.json");
        let config = TrainConfig {
            learning_rate: 3e-4,
            max_train_steps: Some(7),
            ..TrainConfig::default()
        };
        config.save(&path).unwrap();
        assert_eq!(TrainConfig::load(&path).unwrap(), config);
        std::fs::write(&path, r#"{"learning_rat": 1.0}"#).unwrap();
        let err = TrainConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("learning_rat"), "{err}");
        let bad_model = r#"{"model": {"block_out_channels": [8], "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"]}}"#;
        std::fs::write(&path, bad_model).unwrap();
        let err = TrainConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("block_out_channels"), "{err}");
        std::fs::write(
            &path,
            r#"{"lr_scheduler": "cosine_with_restarts", "train_batch_size": 4}"#,
        )
        .unwrap();
        let partial = TrainConfig::load(&path).unwrap();
        assert_eq!(partial.lr_scheduler, LrScheduleKind::CosineWithRestarts);
        assert_eq!(partial.learning_rate, 1e-4);
    }

    #[test]
    fn validation_names_fields() {
        let bad = TrainConfig {
            train_batch_size: 0,
            ..TrainConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("train_batch_size")
        );
        let bad = TrainConfig {
            adam_beta2: 1.0,
            ..TrainConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("adam_beta2")
        );
        assert_eq!(TrainConfig::default().steps_per_epoch(33), 3);
        assert_eq!(TrainConfig::default().num_training_steps(33), 300);
    }
}
