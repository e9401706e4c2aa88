//! The loop of train_controlnet.py around [`ControlNetTrainer`]: shuffled micro-batches of
//! (image, conditioning image, caption) rows, the frozen CLIP text encoder, VAE and UNet, a
//! progress bar, a JSON-lines log, resumable checkpoints and the trained ControlNet saved with
//! `save_pretrained` into the output folder (the folder `ControlNetModel.from_pretrained`
//! loads).
//!
//! Randomness comes from the run's seed as in [`crate::text_to_image_run`]: epoch `e`'s order
//! from `(seed, e)`; micro-batch `m` draws, from a generator seeded with `(seed, m)`, the VAE
//! posterior noise (`randn` of the latents' shape), the noise and the timesteps
//! (`floor(rand([B]) * num_train_timesteps)`), in that order. The images are resized and
//! center-cropped as the script does (no random crop or flip), so nothing else is drawn.
//!
//! A checkpoint `checkpoint-{step}/` holds `controlnet/`, `optimizer/` and
//! `training_state.json`; resuming from it continues exactly as the uninterrupted run.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_models::{ControlNetModel, FromUNetOptions, ModelMixin, UNet2DConditionModel};
use diffusion_schedulers::Scheduler;

use crate::checkpoint::{RNG_SCHEME, due_checkpoint, list_checkpoints};
use crate::controlnet::{ControlNetTrainConfig, ControlNetTrainer, conditioning_pixel_values};
use crate::objective::NoiseDraws;
use crate::optimizer::AdamW;
use crate::run::{LOG_FILE, TrainReport, derived_seed, epoch_order, record_step, truncate_log};
use crate::text_to_image::load_noise_scheduler;
use crate::text_to_image_run::{FrozenComponents, progress_bar};

const STATE_FILE: &str = "training_state.json";
const METADATA_FILE: &str = "metadata.jsonl";

/// The settings of a train_controlnet.py run (its option names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct ControlNetRunConfig {
    /// The Stable Diffusion folder (`--pretrained_model_name_or_path`).
    pub pretrained_model: PathBuf,
    /// A ControlNet folder to start from (`--controlnet_model_name_or_path`); `None`:
    /// `ControlNetModel.from_unet`.
    pub controlnet_model: Option<PathBuf>,
    /// The dataset folder with `metadata.jsonl`.
    pub train_data_dir: PathBuf,
    /// The target-image column.
    pub image_column: String,
    /// The conditioning-image column.
    pub conditioning_image_column: String,
    /// The caption column.
    pub caption_column: String,
    /// Output folder.
    pub output_dir: PathBuf,
    /// Side of the square training images (512).
    pub resolution: usize,
    /// Rows per batch (4).
    pub train_batch_size: usize,
    /// Passes over the data when `max_train_steps` is `None` (1).
    pub num_train_epochs: usize,
    /// Optimizer steps.
    pub max_train_steps: Option<usize>,
    /// Seed of everything random.
    pub seed: u64,
    /// Save a checkpoint every N steps (500).
    pub checkpointing_steps: usize,
    /// Keep at most this many checkpoints.
    pub checkpoints_total_limit: Option<usize>,
    /// A checkpoint folder or `"latest"`.
    pub resume_from_checkpoint: Option<String>,
    /// Optimisation settings.
    pub train: ControlNetTrainConfig,
    /// Show a progress bar.
    pub show_progress: bool,
}

impl Default for ControlNetRunConfig {
    fn default() -> Self {
        Self {
            pretrained_model: PathBuf::new(),
            controlnet_model: None,
            train_data_dir: PathBuf::new(),
            image_column: "image".into(),
            conditioning_image_column: "conditioning_image".into(),
            caption_column: "text".into(),
            output_dir: "controlnet-model".into(),
            resolution: 512,
            train_batch_size: 4,
            num_train_epochs: 1,
            max_train_steps: None,
            seed: 0,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            train: ControlNetTrainConfig::default(),
            show_progress: true,
        }
    }
}

impl ControlNetRunConfig {
    /// Check the settings (nothing is read).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::invalid_argument(name, "must be positive"))
            } else {
                Ok(())
            }
        };
        positive("resolution", self.resolution)?;
        if !self.resolution.is_multiple_of(8) {
            return Err(Error::invalid_argument(
                "resolution",
                format!("{} is not a multiple of 8", self.resolution),
            ));
        }
        positive("train_batch_size", self.train_batch_size)?;
        positive("num_train_epochs", self.num_train_epochs)?;
        positive("checkpointing_steps", self.checkpointing_steps)?;
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
        self.train.validate()
    }

    /// Check that the folders exist (before anything is loaded).
    ///
    /// # Errors
    /// [`Error::NotFound`] for a missing folder or file.
    pub fn check_paths(&self) -> Result<()> {
        let need = |p: PathBuf, message: &str| {
            if p.exists() {
                Ok(())
            } else {
                Err(Error::NotFound {
                    path: p,
                    message: message.into(),
                })
            }
        };
        for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            need(
                self.pretrained_model.join(part),
                "not a Stable Diffusion folder",
            )?;
        }
        if let Some(c) = &self.controlnet_model {
            need(c.join("config.json"), "not a ControlNet folder")?;
        }
        need(self.train_data_dir.join(METADATA_FILE), "no dataset here")
    }

    fn batches_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.train_batch_size)
    }

    fn num_training_steps(&self, n: usize) -> usize {
        self.max_train_steps
            .unwrap_or(self.num_train_epochs * self.batches_per_epoch(n))
    }
}

/// One row of the dataset.
#[derive(Clone, Debug)]
struct Row {
    image: PathBuf,
    conditioning_image: PathBuf,
    caption: String,
}

fn load_rows(config: &ControlNetRunConfig) -> Result<Vec<Row>> {
    let dir = &config.train_data_dir;
    let path = dir.join(METADATA_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let bad = |line: usize, message: String| Error::ConfigField {
        path: path.clone(),
        field: format!("line {line}"),
        message,
    };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
        let string = |column: &str| -> Result<String> {
            row.get(column)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(i + 1, format!("no string column `{column}`")))
        };
        let image = |column: &str| -> Result<PathBuf> {
            let p = dir.join(string(column)?);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::NotFound {
                    path: p,
                    message: format!("listed on line {} of {}", i + 1, path.display()),
                })
            }
        };
        rows.push(Row {
            image: image(&config.image_column)?,
            conditioning_image: image(&config.conditioning_image_column)?,
            caption: string(&config.caption_column)?,
        });
    }
    if rows.is_empty() {
        return Err(Error::NotFound {
            path,
            message: "no example listed".into(),
        });
    }
    Ok(rows)
}

/// `training_state.json` of a ControlNet checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ControlNetState {
    global_step: usize,
    num_training_steps: usize,
    seed: u64,
    rng_scheme: String,
}

fn save_controlnet_checkpoint(
    trainer: &ControlNetTrainer,
    seed: u64,
    total: usize,
    dir: &Path,
) -> Result<()> {
    let io = |p: &Path, e| Error::io(p, e);
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    trainer
        .inference_controlnet()
        .save_pretrained(tmp.join("controlnet"))?;
    trainer
        .optimizer()
        .save(trainer.controlnet(), &tmp.join("optimizer"))?;
    let state = ControlNetState {
        global_step: trainer.global_step(),
        num_training_steps: total,
        seed,
        rng_scheme: RNG_SCHEME.into(),
    };
    let text = serde_json::to_string_pretty(&state).unwrap_or_default();
    diffusion_core::config::write_atomically(&tmp.join(STATE_FILE), text.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))
}

fn read_state(dir: &Path) -> Result<ControlNetState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value = diffusion_core::config::parse_json(&text, &path)?;
    serde_json::from_value(value).map_err(|e| Error::ConfigField {
        path: path.clone(),
        field: "<root>".into(),
        message: e.to_string(),
    })
}

fn resolve_resume(config: &ControlNetRunConfig) -> Result<Option<PathBuf>> {
    let Some(name) = config.resume_from_checkpoint.as_deref() else {
        return Ok(None);
    };
    if name == "latest" {
        return Ok(list_checkpoints(&config.output_dir)?.pop().map(|(_, p)| p));
    }
    for candidate in [config.output_dir.join(name), PathBuf::from(name)] {
        if candidate.join(STATE_FILE).is_file() {
            return Ok(Some(candidate));
        }
    }
    Err(Error::NotFound {
        path: name.into(),
        message: "not a checkpoint folder (no training_state.json)".into(),
    })
}

/// Train a ControlNet as train_controlnet.py does, on `device` (autodiff is turned on here).
/// Writes checkpoints, `logs/train_log.jsonl` and the trained ControlNet
/// (`config.json`, `diffusion_pytorch_model.safetensors`) into `config.output_dir`.
///
/// # Errors
/// As [`ControlNetRunConfig::validate`] and [`ControlNetRunConfig::check_paths`]; dataset,
/// model, checkpoint and I/O errors; [`Error::InvalidArgument`] naming
/// `resume_from_checkpoint` for a checkpoint of another RNG scheme or past the planned steps,
/// and `learning_rate` when the loss becomes non-finite.
pub fn train_controlnet(config: &ControlNetRunConfig, device: &Device) -> Result<TrainReport> {
    config.validate()?;
    config.check_paths()?;
    let inner = device.clone().without_autodiff();
    let rows = load_rows(config)?;
    let frozen = FrozenComponents::load(&config.pretrained_model, &inner)?;
    let total = config.num_training_steps(rows.len());
    let batches_per_epoch = config.batches_per_epoch(rows.len());
    let out = &config.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;

    let unet = UNet2DConditionModel::from_pretrained(config.pretrained_model.join("unet"), &inner)?;
    let scheduler = load_noise_scheduler(&config.pretrained_model)?;
    let mut trainer = match resolve_resume(config)? {
        Some(dir) => {
            log::info!("resuming from {}", dir.display());
            let state = read_state(&dir)?;
            let refuse = |m: String| Error::invalid_argument("resume_from_checkpoint", m);
            if state.rng_scheme != RNG_SCHEME {
                return Err(refuse(format!(
                    "{} was written with RNG scheme `{}`",
                    dir.display(),
                    state.rng_scheme
                )));
            }
            if state.global_step > total {
                return Err(refuse(format!(
                    "{} is at step {}, past the planned {total}",
                    dir.display(),
                    state.global_step
                )));
            }
            let controlnet = ControlNetModel::from_pretrained(dir.join("controlnet"), &inner)?;
            let mut t =
                ControlNetTrainer::new(&config.train, controlnet, unet, scheduler, total, device)?;
            let optimizer =
                AdamW::load(config.train.adamw(), t.controlnet(), &dir.join("optimizer"))?;
            t.resume(optimizer, state.global_step);
            t
        }
        None => {
            let controlnet = match &config.controlnet_model {
                Some(dir) => ControlNetModel::from_pretrained(dir, &inner)?,
                None => ControlNetModel::from_unet(&unet, &FromUNetOptions::default())?,
            };
            ControlNetTrainer::new(&config.train, controlnet, unet, scheduler, total, device)?
        }
    };
    let start = trainer.global_step();
    let log_path = out.join(LOG_FILE);
    truncate_log(&log_path, start)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let num_train = load_noise_scheduler(&config.pretrained_model)?.num_train_timesteps();
    let r = config.resolution;
    let bar = progress_bar(config.show_progress, total, start);
    let mut report = TrainReport {
        start_step: start,
        global_step: start,
        num_training_steps: total,
        steps: Vec::new(),
        checkpoints: Vec::new(),
        pipeline_dir: out.clone(),
        elapsed: Duration::ZERO,
    };
    let mut order: Option<(usize, Vec<usize>)> = None;
    let began = Instant::now();
    for step in start..total {
        let m = step;
        let epoch = m / batches_per_epoch;
        let position = m % batches_per_epoch;
        if order.as_ref().is_some_and(|(e, _)| *e != epoch) {
            order = None;
        }
        let (_, indices) =
            order.get_or_insert_with(|| (epoch, epoch_order(config.seed, epoch, rows.len())));
        let begin = position * config.train_batch_size;
        let batch = &indices[begin..(begin + config.train_batch_size).min(indices.len())];
        let b = batch.len();
        let mut g = TorchGenerator::new(derived_seed(config.seed, 0, m as u64));
        let mut pixels = Vec::with_capacity(b * 3 * r * r);
        let mut cond = Vec::with_capacity(b * 3 * r * r);
        for &i in batch {
            // Normalize([0.5], [0.5]) after ToTensor for the target image.
            pixels.extend(
                conditioning_pixel_values(&rows[i].image, r)?
                    .into_iter()
                    .map(|v| 2.0 * v - 1.0),
            );
            cond.extend(conditioning_pixel_values(&rows[i].conditioning_image, r)?);
        }
        let pixels = Tensor::<4>::from_data(TensorData::new(pixels, [b, 3, r, r]), &inner);
        let cond = Tensor::<4>::from_data(TensorData::new(cond, [b, 3, r, r]), &inner);
        let latents = frozen.encode_images(pixels, &mut g)?;
        let captions: Vec<&str> = batch.iter().map(|&i| rows[i].caption.as_str()).collect();
        let states = frozen.encode_captions(&captions)?;
        let dims = latents.dims();
        let noise = Tensor::<4>::from_data(TensorData::new(g.randn(&dims), dims), &inner);
        let timesteps = g
            .rand(&[b])
            .into_iter()
            .map(|u| ((u as f64 * num_train as f64) as usize).min(num_train - 1))
            .collect();
        let draws = NoiseDraws {
            noise,
            offset_noise: None,
            perturbation: None,
            timesteps,
        };
        let stats = trainer.step(latents, states, cond, &draws)?;
        record_step(&stats, epoch, None, &mut log, &log_path, &bar)?;
        report.steps.push(stats);
        report.global_step = step + 1;
        if let Some(dir) = due_checkpoint(
            out,
            step + 1,
            config.checkpointing_steps,
            config.checkpoints_total_limit,
        )? {
            save_controlnet_checkpoint(&trainer, config.seed, total, &dir)?;
            bar.println(format!("saved {}", dir.display()));
            report.checkpoints.push(dir);
        }
    }
    report.elapsed = began.elapsed();
    bar.finish_and_clear();
    trainer.inference_controlnet().save_pretrained(out)?;
    Ok(report)
}
