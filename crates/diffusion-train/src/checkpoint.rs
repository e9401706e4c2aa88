//! Resumable checkpoints and the exported pipeline folder.
//!
//! A checkpoint `checkpoint-{step}/` holds everything the next step depends on:
//!
//! | path                     | content                                                          |
//! |--------------------------|------------------------------------------------------------------|
//! | `unet/`                  | the model, a diffusers model folder                              |
//! | `unet_ema/`              | the EMA weights; `config.json` also has the EMA state (diffusers' `EMAModel.save_pretrained`) |
//! | `optimizer/`             | AdamW moments under the model's keys, step counts                |
//! | `scheduler/`             | `scheduler_config.json`                                          |
//! | `training_state.json`    | global step, learning-rate schedule position, seed and RNG scheme |
//! | `mixed_precision.json`   | with `fp16`/`bf16`: the loss scaler and the skipped-step count   |
//!
//! Randomness needs no saved state: the batch, noise, timesteps and flips of step `s` come from
//! generators seeded from the run's seed and `s` (see [`crate::run`]), so a run resumed at step
//! `k` draws exactly what an uninterrupted run draws from step `k` on.
//!
//! The pipeline folder ([`save_pipeline`]) is what diffusers' `DDPMPipeline.save_pretrained`
//! writes: `model_index.json`, `unet/` and `scheduler/`.

use diffusion_models::ModelMixin;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use diffusion_core::config::{ComponentSpec, ConfigFile, ModelIndex};
use diffusion_core::{Device, Error, Result};
use diffusion_models::{UNet2DModel, UNet2DModelConfig};
use diffusion_schedulers::{DDPMScheduler, Scheduler};

use crate::config::TrainConfig;
use crate::ema::EmaModel;
use crate::lr_schedule::{LrSchedule, LrScheduleKind};
use crate::mixed_precision::MixedPrecisionState;
use crate::optimizer::AdamW;
use crate::trainer::Trainer;

/// Prefix of checkpoint folder names (`checkpoint-500`).
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
const STATE_FILE: &str = "training_state.json";

/// How the random draws of a step are derived; written into checkpoints so that a future change
/// of scheme cannot silently resume a run with different randomness.
pub const RNG_SCHEME: &str =
    "torch-mt19937 per step, seeded splitmix64(seed, step); per epoch for the data order";

/// `training_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps taken.
    pub global_step: usize,
    /// The planned total, which shapes the learning-rate schedule.
    pub num_training_steps: usize,
    /// Learning-rate schedule: its kind, peak rate and warmup; its position is `global_step`.
    pub lr_scheduler: LrScheduleKind,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Warmup steps.
    pub lr_warmup_steps: usize,
    /// The run's seed.
    pub seed: u64,
    /// [`RNG_SCHEME`] at the time of saving.
    pub rng_scheme: String,
    /// The settings of the run that wrote the checkpoint.
    pub train_config: TrainConfig,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// Write checkpoint folder `dir` through a temporary sibling: `fill` writes the content into
/// the empty folder it is given, which then replaces `dir` (a run killed while saving leaves no
/// half checkpoint under the final name, only a `.{name}.partial-{pid}` folder the next save
/// removes).
///
/// # Errors
/// [`Error::Io`] naming the folder; the first error of `fill` (then `dir` is untouched).
pub fn write_checkpoint_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    fill(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))
}

/// Read the JSON state file `name` of checkpoint `dir` into `T`.
///
/// # Errors
/// [`Error::Io`], [`Error::Json`], [`Error::ConfigField`] naming the file.
pub fn read_state_file<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let value = diffusion_core::config::parse_json(&text, &path)?;
    serde_json::from_value(value).map_err(|e| Error::ConfigField {
        path: path.clone(),
        field: "<root>".into(),
        message: e.to_string(),
    })
}

/// Write `state` as pretty JSON to `dir/name` (atomically).
///
/// # Errors
/// [`Error::Io`].
pub fn write_state_file<T: Serialize>(dir: &Path, name: &str, state: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(state).unwrap_or_default();
    diffusion_core::config::write_atomically(&dir.join(name), text.as_bytes())
}

/// The checks every resume makes before loading anything: the checkpoint in `dir` was written
/// with this build's [`RNG_SCHEME`] and is not past the planned `num_training_steps`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `resume_from_checkpoint`.
pub fn check_resumable(
    dir: &Path,
    rng_scheme: &str,
    global_step: usize,
    num_training_steps: usize,
) -> Result<()> {
    let refuse = |message: String| Error::invalid_argument("resume_from_checkpoint", message);
    if rng_scheme != RNG_SCHEME {
        return Err(refuse(format!(
            "{} was written with RNG scheme `{rng_scheme}`; this build draws with `{RNG_SCHEME}`",
            dir.display()
        )));
    }
    if global_step > num_training_steps {
        return Err(refuse(format!(
            "{} is at step {global_step}, past the planned {num_training_steps} steps",
            dir.display()
        )));
    }
    Ok(())
}

/// Write `trainer`'s full state into checkpoint folder `dir`, through a temporary sibling that
/// is renamed at the end, so a run killed while saving leaves no half checkpoint.
///
/// # Errors
/// [`Error::Io`] when writing fails.
pub fn save_checkpoint(trainer: &Trainer, dir: &Path) -> Result<()> {
    write_checkpoint_dir(dir, |tmp| {
        let model = trainer.model();
        model.save_pretrained(tmp.join("unet"))?;
        if let Some(ema) = trainer.ema() {
            save_ema(ema, model, &tmp.join("unet_ema"))?;
        }
        trainer.optimizer().save(model, &tmp.join("optimizer"))?;
        let scheduler_dir = tmp.join("scheduler");
        std::fs::create_dir_all(&scheduler_dir).map_err(io(&scheduler_dir))?;
        trainer.scheduler().save_config(&scheduler_dir)?;
        let config = trainer.config();
        let state = TrainingState {
            global_step: trainer.global_step(),
            num_training_steps: trainer.num_training_steps(),
            lr_scheduler: config.lr_scheduler,
            learning_rate: config.learning_rate,
            lr_warmup_steps: config.lr_warmup_steps,
            seed: config.seed,
            rng_scheme: RNG_SCHEME.into(),
            train_config: config.clone(),
        };
        write_state_file(tmp, STATE_FILE, &state)?;
        trainer.mixed_precision_state().save_if_used(tmp)
    })
}

/// The EMA as diffusers' `EMAModel.save_pretrained` writes it: the shadow weights in a model
/// folder whose `config.json` also holds the EMA settings and step.
fn save_ema(ema: &EmaModel, model: &UNet2DModel, dir: &Path) -> Result<()> {
    let shadow = ema.copy_to(model);
    shadow.save_pretrained(dir)?;
    let config_path = dir.join("config.json");
    let mut file = ConfigFile::<UNet2DModelConfig>::load(&config_path)?;
    file.unknown.extend(ema.config_entries());
    file.save(&config_path)
}

/// Read `training_state.json` of a checkpoint.
///
/// # Errors
/// [`Error::Io`], [`Error::Json`], [`Error::ConfigField`].
pub fn read_state(dir: &Path) -> Result<TrainingState> {
    read_state_file(dir, STATE_FILE)
}

/// Rebuild a [`Trainer`] from checkpoint folder `dir`, with `config`'s settings.
///
/// # Errors
/// As [`read_state`] and the model/optimizer loaders; [`Error::InvalidArgument`] naming
/// `resume_from_checkpoint` when the checkpoint was written with another RNG scheme, has no
/// EMA while `use_ema` is set, or is past `num_training_steps`.
pub fn load_checkpoint(
    config: &TrainConfig,
    dir: &Path,
    num_training_steps: usize,
    device: &Device,
) -> Result<Trainer> {
    let state = read_state(dir)?;
    check_resumable(
        dir,
        &state.rng_scheme,
        state.global_step,
        num_training_steps,
    )?;
    let refuse = |message: String| Error::invalid_argument("resume_from_checkpoint", message);
    if state.seed != config.seed || state.train_config.train_batch_size != config.train_batch_size {
        log::warn!(
            "resuming {} with another seed or batch size than it was trained with: the data order \
             and noise from here on differ from the original run",
            dir.display()
        );
    }
    let ad = crate::autodiff::autodiff_device(device, config.gradient_checkpointing);
    let model = UNet2DModel::from_pretrained(dir.join("unet"), &ad)?;
    let mut trainer = Trainer::new(config, model, num_training_steps, &ad)?;
    trainer.optimizer = AdamW::load(config.adamw(), trainer.model(), &dir.join("optimizer"))?;
    if config.use_ema {
        let ema_dir = dir.join("unet_ema");
        if !ema_dir.is_dir() {
            return Err(refuse(format!(
                "{} has no unet_ema/ but use_ema is set",
                dir.display()
            )));
        }
        let file = ConfigFile::<UNet2DModelConfig>::load(ema_dir.join("config.json"))?;
        let step =
            EmaModel::optimization_step_from(&file.unknown).ok_or_else(|| Error::ConfigField {
                path: ema_dir.join("config.json"),
                field: "optimization_step".into(),
                message: "missing: not an EMA folder".into(),
            })?;
        let shadow = UNet2DModel::from_pretrained(&ema_dir, &device.clone().without_autodiff())?;
        let ema_config = config.ema().with_saved(&file.unknown);
        trainer.ema = Some(EmaModel::from_weights(
            ema_config,
            trainer.model(),
            &shadow,
            step,
        )?);
    }
    trainer.lr_schedule = LrSchedule::new(
        config.lr_scheduler,
        config.learning_rate,
        config.lr_warmup_steps,
        num_training_steps,
    )?;
    trainer.global_step = state.global_step;
    MixedPrecisionState::restore(
        dir,
        config.mixed_precision,
        &mut trainer.skipped_steps,
        &mut trainer.grad_scaler,
    )?;
    Ok(trainer)
}

/// The step of a `checkpoint-{step}` folder name.
pub fn checkpoint_step(path: &Path) -> Option<usize> {
    path.file_name()?
        .to_str()?
        .strip_prefix(CHECKPOINT_PREFIX)?
        .parse()
        .ok()
}

/// Every `checkpoint-{step}` folder in `output_dir`, oldest first.
///
/// # Errors
/// [`Error::Io`] when the folder exists but cannot be listed.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !output_dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(output_dir).map_err(io(output_dir))? {
        let path = entry.map_err(io(output_dir))?.path();
        if let Some(step) = checkpoint_step(&path)
            && path.join(STATE_FILE).is_file()
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The folder for the checkpoint due after `step` optimizer steps (`checkpoint-{step}` in
/// `output_dir`), or `None` when `step` is not a multiple of `every`. With a `limit`, the oldest
/// checkpoints are deleted first so that at most `limit` exist once the new one is written, as
/// diffusers' scripts prune before `save_state` (a limit of 0 keeps only the new one).
///
/// # Errors
/// [`Error::Io`] from pruning.
pub fn due_checkpoint(
    output_dir: &Path,
    step: usize,
    every: usize,
    limit: Option<usize>,
) -> Result<Option<PathBuf>> {
    if every == 0 || !step.is_multiple_of(every) {
        return Ok(None);
    }
    if let Some(limit) = limit {
        prune_checkpoints(output_dir, limit.saturating_sub(1))?;
    }
    Ok(Some(output_dir.join(format!("{CHECKPOINT_PREFIX}{step}"))))
}

/// Delete the oldest checkpoints so that at most `keep` remain.
///
/// # Errors
/// [`Error::Io`].
pub fn prune_checkpoints(output_dir: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(keep);
    for (_, path) in all.into_iter().take(excess) {
        log::info!("removing checkpoint {}", path.display());
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// Write a loadable `DDPMPipeline` folder: `unet/` with `model`, `scheduler/` and
/// `model_index.json`.
///
/// # Errors
/// [`Error::Io`].
pub fn save_pipeline(model: &UNet2DModel, scheduler: &DDPMScheduler, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    model.save_pretrained(dir.join("unet"))?;
    let scheduler_dir = dir.join("scheduler");
    std::fs::create_dir_all(&scheduler_dir).map_err(io(&scheduler_dir))?;
    scheduler.save_config(&scheduler_dir)?;
    let spec = |class: &str| ComponentSpec {
        library: Some("diffusers".into()),
        class_name: Some(class.into()),
    };
    let index = ModelIndex {
        class_name: "DDPMPipeline".into(),
        diffusers_version: None,
        components: BTreeMap::from([
            ("scheduler".to_string(), spec(scheduler.class_name())),
            ("unet".to_string(), spec("UNet2DModel")),
        ]),
        options: Default::default(),
        private: Default::default(),
    };
    index.save(dir.join("model_index.json"))
}
