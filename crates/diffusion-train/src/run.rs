//! The training loop of train_unconditional.py: epochs of shuffled batches, a progress bar, a
//! JSON-lines log, periodic checkpoints and pipeline exports, and exact resumption.
//!
//! All randomness is derived from the run's seed, never carried from step to step:
//!
//! - the order of epoch `e` is a Fisher-Yates shuffle drawn from a [`TorchGenerator`] seeded
//!   with `mix(seed, e)`;
//! - step `s` draws, from a generator seeded with `mix(seed, s)`, the timesteps
//!   (`floor(u * num_train_timesteps)` for `u ~ rand([B])`), the noise (`randn([B, C, H, W])`)
//!   and, with `random_flip`, the flips (`rand([B]) < 0.5`), in that order.
//!
//! Step `s` therefore sees the same batch whether the run got there in one go or resumed from a
//! checkpoint, which is what makes a resumed loss curve equal the uninterrupted one.

use diffusion_models::ModelMixin;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_models::UNet2DModel;
use diffusion_schedulers::Scheduler;

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::ImageDataset;
use crate::data_parallel::DataParallel;
use crate::trainer::{StepStats, Trainer};
use crate::validation::{ValidationPoint, save_unconditional_validation, write_validation_strip};

/// The log file inside `output_dir`.
pub const LOG_FILE: &str = "logs/train_log.jsonl";

/// What a run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// The global step the run started at (0, or the checkpoint's step when resuming).
    pub start_step: usize,
    /// The global step it ended at.
    pub global_step: usize,
    /// The planned number of steps.
    pub num_training_steps: usize,
    /// One entry per step of this run, in order.
    pub steps: Vec<StepStats>,
    /// Checkpoint folders written by this run.
    pub checkpoints: Vec<PathBuf>,
    /// The exported pipeline folder (`output_dir`).
    pub pipeline_dir: PathBuf,
    /// Wall time of the training steps (excluding setup).
    pub elapsed: Duration,
}

impl TrainReport {
    /// The loss of every step of this run.
    pub fn losses(&self) -> Vec<f32> {
        self.steps.iter().map(|s| s.loss).collect()
    }

    /// Training steps per second of wall time.
    pub fn steps_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.steps.len() as f64 / secs
        } else {
            0.0
        }
    }
}

/// One line of the JSON-lines log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Global step after the update (1-based).
    pub step: usize,
    /// Epoch of the step (0-based).
    pub epoch: usize,
    /// Loss before the update.
    pub loss: f32,
    /// Learning rate used by the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// EMA decay of the step, when an EMA is kept.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ema_decay: Option<f64>,
}

/// splitmix64's finaliser: a bijective mix of 64 bits.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of stream `index` of kind `domain` (0: steps, 1: epochs) of a run.
pub(crate) fn derived_seed(seed: u64, domain: u64, index: u64) -> u64 {
    splitmix64(splitmix64(seed ^ domain.wrapping_mul(0xd6e8_feb8_6659_fd93)) ^ index)
}

/// The order in which epoch `epoch` visits `n` images.
pub fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut g = TorchGenerator::new(derived_seed(seed, 1, epoch as u64));
    let mut order: Vec<usize> = (0..n).collect();
    let draws = g.rand(&[n]);
    for i in (1..n).rev() {
        let j = ((draws[i] as f64 * (i + 1) as f64) as usize).min(i);
        order.swap(i, j);
    }
    order
}

/// The shuffled micro-batches of a run: micro-batch `m` is block `m % batches_per_epoch` (of
/// `batch_size` indices, the last one shorter) of epoch `m / batches_per_epoch`'s order
/// ([`epoch_order`] of the run's seed). The current epoch's order is kept between calls, so
/// walking the micro-batches in order shuffles once per epoch.
#[derive(Debug)]
pub struct EpochBatches {
    seed: u64,
    len: usize,
    batch_size: usize,
    batches_per_epoch: usize,
    order: Option<(usize, Vec<usize>)>,
}

impl EpochBatches {
    /// The micro-batches of `len` examples, `batch_size` at a time, `batches_per_epoch` per
    /// epoch (at least 1).
    pub fn new(seed: u64, len: usize, batch_size: usize, batches_per_epoch: usize) -> Self {
        Self {
            seed,
            len,
            batch_size,
            batches_per_epoch: batches_per_epoch.max(1),
            order: None,
        }
    }

    /// The epoch of micro-batch `m` and its example indices.
    pub fn batch(&mut self, m: usize) -> (usize, &[usize]) {
        let epoch = m / self.batches_per_epoch;
        let position = m % self.batches_per_epoch;
        if self.order.as_ref().is_some_and(|(e, _)| *e != epoch) {
            self.order = None;
        }
        let (seed, len) = (self.seed, self.len);
        let (_, indices) = self
            .order
            .get_or_insert_with(|| (epoch, epoch_order(seed, epoch, len)));
        let begin = (position * self.batch_size).min(indices.len());
        let end = (begin + self.batch_size).min(indices.len());
        (epoch, &indices[begin..end])
    }
}

/// The random inputs of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepDraws {
    /// One timestep per image.
    pub timesteps: Vec<usize>,
    /// Standard normal noise, `[B, C, H, W]` row-major.
    pub noise: Vec<f32>,
    /// Whether to mirror each image (empty without `random_flip`).
    pub flips: Vec<bool>,
}

/// Draw the timesteps, noise and flips of global step `step` (0-based).
pub fn step_draws(
    seed: u64,
    step: usize,
    shape: [usize; 4],
    num_train_timesteps: usize,
    random_flip: bool,
) -> StepDraws {
    let mut g = TorchGenerator::new(derived_seed(seed, 0, step as u64));
    let b = shape[0];
    let timesteps = g
        .rand(&[b])
        .into_iter()
        .map(|u| ((u as f64 * num_train_timesteps as f64) as usize).min(num_train_timesteps - 1))
        .collect();
    let noise = g.randn(&shape);
    let flips = if random_flip {
        g.rand(&[b]).into_iter().map(|u| u < 0.5).collect()
    } else {
        Vec::new()
    };
    StepDraws {
        timesteps,
        noise,
        flips,
    }
}

/// The checkpoint to resume from: the named folder (relative names are looked up in
/// `output_dir` first, as diffusers does), the newest one for `"latest"`, or none.
///
/// # Errors
/// [`Error::NotFound`] for a named checkpoint that does not exist.
pub fn resolve_resume(config: &TrainConfig) -> Result<Option<PathBuf>> {
    let Some(name) = config.resume_from_checkpoint.as_deref() else {
        return Ok(None);
    };
    if name == "latest" {
        let latest = checkpoint::list_checkpoints(&config.output_dir)?
            .pop()
            .map(|(_, p)| p);
        if latest.is_none() {
            log::info!(
                "no checkpoint in {}; starting a new run",
                config.output_dir.display()
            );
        }
        return Ok(latest);
    }
    let in_output = config.output_dir.join(name);
    for candidate in [in_output, PathBuf::from(name)] {
        if candidate.join("training_state.json").is_file() {
            return Ok(Some(candidate));
        }
    }
    Err(Error::NotFound {
        path: PathBuf::from(name),
        message: "not a checkpoint folder (no training_state.json)".into(),
    })
}

/// What every training loop does after an optimizer step: refuse a non-finite loss (naming the
/// learning rate, the usual cause), append the step to the loss log as one JSON line, flushed so
/// that a killed run keeps every finished step, and advance the progress bar.
///
/// # Errors
/// [`Error::InvalidArgument`] (`learning_rate`) for a non-finite loss, [`Error::Io`] naming the
/// log when it cannot be written.
pub(crate) fn record_step(
    stats: &crate::trainer::StepStats,
    epoch: usize,
    ema_decay: Option<f64>,
    log: &mut impl Write,
    log_path: &Path,
    bar: &ProgressBar,
) -> Result<()> {
    if !stats.loss.is_finite() {
        return Err(Error::invalid_argument(
            "learning_rate",
            format!(
                "the loss became {} at step {}; lower the learning rate",
                stats.loss, stats.step
            ),
        ));
    }
    let entry = LogEntry {
        step: stats.step,
        epoch,
        loss: stats.loss,
        lr: stats.lr,
        grad_norm: stats.grad_norm,
        ema_decay,
    };
    let line = serde_json::to_string(&entry).unwrap_or_default();
    writeln!(log, "{line}")
        .and_then(|_| log.flush())
        .map_err(|e| Error::io(log_path, e))?;
    bar.set_message(format!("loss {:.4} lr {:.2e}", stats.loss, stats.lr));
    bar.inc(1);
    Ok(())
}

/// Keep the log's entries up to `step` (a resumed run rewrites what came after).
pub(crate) fn truncate_log(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut kept = String::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| Error::io(path, e))?;
        // A line cut by a kill does not parse and is dropped with what follows it.
        match serde_json::from_str::<LogEntry>(&line) {
            Ok(entry) if entry.step <= step => {
                kept.push_str(&line);
                kept.push('\n');
            }
            _ => break,
        }
    }
    diffusion_core::config::write_atomically(path, kept.as_bytes())
}

fn progress_bar(config: &TrainConfig, total: usize, start: usize) -> ProgressBar {
    if !config.show_progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} {per_sec} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(start as u64);
    bar
}

/// Build the model to train: the pretrained folder's, or `config.model` with fresh weights
/// (`sample_size` taken from the data when unset), on `device`.
///
/// # Errors
/// Model config and loading errors.
pub fn build_model(
    config: &TrainConfig,
    dataset: &ImageDataset,
    device: &Device,
) -> Result<UNet2DModel> {
    match &config.pretrained_model {
        Some(dir) => UNet2DModel::from_pretrained(dir, device),
        None => {
            let mut model_config = config.model.clone();
            if model_config.sample_size.is_none() {
                model_config.sample_size = Some(
                    diffusion_models::unets::unet_2d::SampleSize::Square(dataset.height()),
                );
            }
            UNet2DModel::new(&model_config, device)
        }
    }
}

/// Train a `UNet2DModel` on `dataset` as diffusers' train_unconditional.py does, on `device`
/// (autodiff is turned on here), or data-parallel over `config.devices` when that is not empty
/// (then `device` is not used). Writes checkpoints, `logs/train_log.jsonl` and a `DDPMPipeline`
/// folder into `config.output_dir`; resumes when `resume_from_checkpoint` says so. With
/// `config.validation` on, also writes validation grids (at step 0 of a fresh run, when due, and
/// after the last step) and their strip into `output_dir/validation/` (see [`crate::validation`]).
///
/// # Errors
/// As [`TrainConfig::validate`] and [`TrainConfig::check_data`]; model, checkpoint and I/O
/// errors; [`Error::InvalidArgument`] naming `learning_rate` when the loss becomes non-finite;
/// [`Error::Io`] when a validation image cannot be written.
pub fn train_unconditional(
    config: &TrainConfig,
    dataset: &ImageDataset,
    device: &Device,
) -> Result<TrainReport> {
    config.validate()?;
    // With `devices`, the first of them is the main device (see `crate::data_parallel`).
    let parallel_devices = match config.devices.as_slice() {
        [] => None,
        names => Some(crate::data_parallel::parse_devices(names)?),
    };
    let device = parallel_devices.as_ref().map_or(device, |d| &d[0]);
    let ad = crate::autodiff::autodiff_device(device, config.gradient_checkpointing);
    let total = config.num_training_steps(dataset.len());
    let steps_per_epoch = config.steps_per_epoch(dataset.len());
    let out = &config.output_dir;
    std::fs::create_dir_all(out.join("logs")).map_err(|e| Error::io(out, e))?;

    let mut trainer = match resolve_resume(config)? {
        Some(dir) => {
            log::info!("resuming from {}", dir.display());
            checkpoint::load_checkpoint(config, &dir, total, &ad)?
        }
        None => Trainer::new(config, build_model(config, dataset, &ad)?, total, &ad)?,
    };
    TrainConfig::check_data(trainer.model().config(), dataset)?;
    let mut parallel = match parallel_devices {
        Some(devices) => Some(DataParallel::new(devices, trainer.model())?),
        None => None,
    };
    config.save(out.join("train_config.json"))?;
    let start = trainer.global_step();
    let log_path = out.join(LOG_FILE);
    truncate_log(&log_path, start)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;

    let num_train_timesteps = trainer.scheduler().num_train_timesteps();
    let [_, c, h, w] = dataset.dims();
    let bar = progress_bar(config, total, start);
    let mut report = TrainReport {
        start_step: start,
        global_step: start,
        num_training_steps: total,
        steps: Vec::new(),
        checkpoints: Vec::new(),
        pipeline_dir: out.clone(),
        elapsed: Duration::ZERO,
    };
    let validation = &config.validation;
    let validate = |trainer: &Trainer, at: ValidationPoint| -> Result<()> {
        let path = save_unconditional_validation(
            trainer.inference_model(),
            trainer.scheduler(),
            validation,
            out,
            at,
        )?;
        bar.println(format!("validation images: {}", path.display()));
        Ok(())
    };
    if validation.is_enabled() && start == 0 {
        // The starting weights, for comparison with the grids that follow.
        validate(&trainer, ValidationPoint { step: 0, epoch: 0 })?;
    }
    let mut batches = EpochBatches::new(
        config.seed,
        dataset.len(),
        config.global_batch_size(),
        steps_per_epoch,
    );
    let mut exported_at = None;
    let began = Instant::now();
    for step in start..total {
        let (epoch, indices) = batches.batch(step);
        let b = indices.len();
        let draws = step_draws(
            config.seed,
            step,
            [b, c, h, w],
            num_train_timesteps,
            config.random_flip,
        );
        let x0 = Tensor::<4>::from_data(
            TensorData::new(dataset.batch(indices, &draws.flips)?, [b, c, h, w]),
            &ad,
        );
        let noise = Tensor::<4>::from_data(TensorData::new(draws.noise, [b, c, h, w]), &ad);
        let stats = match &mut parallel {
            Some(parallel) => trainer.step_data_parallel(parallel, x0, noise, &draws.timesteps)?,
            None => trainer.step(x0, noise, &draws.timesteps)?,
        };
        record_step(&stats, epoch, stats.ema_decay, &mut log, &log_path, &bar)?;
        report.steps.push(stats);
        report.global_step = step + 1;

        if let Some(dir) = checkpoint::due_checkpoint(
            out,
            step + 1,
            config.checkpointing_steps,
            config.checkpoints_total_limit,
        )? {
            checkpoint::save_checkpoint(&trainer, &dir)?;
            bar.println(format!("saved {}", dir.display()));
            report.checkpoints.push(dir);
        }
        let end_of_epoch = (step + 1).is_multiple_of(steps_per_epoch);
        let last = step + 1 == total;
        if (end_of_epoch && epoch.is_multiple_of(config.save_model_epochs)) || last {
            checkpoint::save_pipeline(&trainer.inference_model(), trainer.scheduler(), out)?;
            exported_at = Some(step + 1);
        }
        if validation.is_due(step + 1, epoch, end_of_epoch, last) {
            let at = ValidationPoint {
                step: step + 1,
                epoch,
            };
            validate(&trainer, at)?;
        }
    }
    report.elapsed = began.elapsed();
    bar.finish_and_clear();
    if exported_at != Some(total) {
        // Resumed at the very end: still leave a loadable pipeline.
        checkpoint::save_pipeline(&trainer.inference_model(), trainer.scheduler(), out)?;
    }
    if validation.is_enabled() {
        write_validation_strip(out, total)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_permutations_and_depend_on_seed_and_epoch() {
        let a = epoch_order(0, 0, 50);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(0, 1, 50));
        assert_ne!(a, epoch_order(1, 0, 50));
        assert_eq!(a, epoch_order(0, 0, 50));
    }

    #[test]
    fn step_draws_are_reproducible_and_in_range() {
        let d = step_draws(7, 3, [4, 1, 2, 2], 1000, true);
        assert_eq!(d, step_draws(7, 3, [4, 1, 2, 2], 1000, true));
        assert_ne!(d.noise, step_draws(7, 4, [4, 1, 2, 2], 1000, true).noise);
        assert!(d.timesteps.iter().all(|&t| t < 1000));
        assert_eq!((d.noise.len(), d.flips.len()), (16, 4));
        assert!(step_draws(7, 3, [4, 1, 2, 2], 1000, false).flips.is_empty());
    }

    #[test]
    fn log_truncation_keeps_earlier_steps_and_drops_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let entry = |step| {
            serde_json::to_string(&LogEntry {
                step,
                epoch: 0,
                loss: 1.0,
                lr: 0.1,
                grad_norm: 2.0,
                ema_decay: None,
            })
            .unwrap()
        };
        std::fs::write(
            &path,
            format!("{}\n{}\n{}\n{{\"ste", entry(1), entry(2), entry(3)),
        )
        .unwrap();
        truncate_log(&path, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n{}\n", entry(1), entry(2))
        );
        truncate_log(&path, 9).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
