//! `diffusers train unconditional`: diffusers' train_unconditional.py as a command.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use diffusion_core::parse_device;
use diffusion_train::{FolderOptions, ImageDataset, TrainConfig, train_unconditional};

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Train a UNet2DModel from scratch (or from --pretrained-model) to denoise images, and save a
    /// DDPMPipeline folder that `diffusers sample --model` and diffusers' DDPMPipeline load.
    Unconditional(UnconditionalArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Preset {
    /// train_unconditional.py's defaults (a 6-level RGB UNet).
    Default,
    /// The small one-channel model used for the bundled digits model.
    Digits,
}

#[derive(Args, Debug)]
pub struct UnconditionalArgs {
    /// A JSON training config (TrainConfig: the fields of train_unconditional.py's options);
    /// the flags below override it. Without it, --preset picks the starting point.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Starting settings when no --config is given.
    #[arg(long, value_enum, default_value = "default")]
    pub preset: Preset,

    /// Train on scikit-learn's handwritten digits: the path of digits.csv.gz
    /// (scripts/fetch-digits.sh extracts it from the scikit-learn wheel).
    #[arg(long, conflicts_with = "data_dir")]
    pub digits: Option<PathBuf>,

    /// Train on a folder of .png/.jpg images (resized and center-cropped to --resolution).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Side of the square training images.
    #[arg(long, default_value_t = 16)]
    pub resolution: usize,

    /// Read folder images as one grayscale channel.
    #[arg(long)]
    pub grayscale: bool,

    /// Output folder: checkpoints, loss log (JSON lines) and the final pipeline.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,

    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_train_steps: Option<usize>,

    /// Images per step.
    #[arg(long)]
    pub train_batch_size: Option<usize>,

    /// Peak learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,

    /// Seed of data order, timesteps and noise.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Resume from a checkpoint folder, or "latest" for the newest in --output-dir.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,

    /// Save a resumable checkpoint every N steps.
    #[arg(long)]
    pub checkpointing_steps: Option<usize>,

    /// Keep an exponential moving average of the weights and save it.
    #[arg(long)]
    pub use_ema: bool,

    /// Device: cpu, or a GPU backend compiled into this build.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::Unconditional(args) => unconditional(args),
    }
}

fn unconditional(args: UnconditionalArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => TrainConfig::load(path)?,
        None => match args.preset {
            Preset::Default => TrainConfig::default(),
            Preset::Digits => TrainConfig::digits(),
        },
    };
    if let Some(v) = &args.output_dir {
        config.output_dir = v.clone();
    }
    if let Some(v) = args.max_train_steps {
        config.max_train_steps = Some(v);
    }
    if let Some(v) = args.train_batch_size {
        config.train_batch_size = v;
    }
    if let Some(v) = args.learning_rate {
        config.learning_rate = v;
    }
    if let Some(v) = args.seed {
        config.seed = v;
    }
    if let Some(v) = &args.resume_from_checkpoint {
        config.resume_from_checkpoint = Some(v.clone());
    }
    if let Some(v) = args.checkpointing_steps {
        config.checkpointing_steps = v;
    }
    if args.use_ema {
        config.use_ema = true;
    }
    config.show_progress = !args.quiet;
    config.validate()?;

    let dataset = match (&args.digits, &args.data_dir) {
        (Some(csv), None) => ImageDataset::from_digits_csv_gz(csv, args.resolution)
            .with_context(|| format!("--digits {}", csv.display()))?,
        (None, Some(dir)) => {
            let options = FolderOptions {
                grayscale: args.grayscale,
                ..FolderOptions::new(args.resolution)
            };
            ImageDataset::from_image_folder(dir, &options)
                .with_context(|| format!("--data-dir {}", dir.display()))?
        }
        _ => bail!("give the training data: --digits <digits.csv.gz> or --data-dir <folder>"),
    };
    let device = parse_device(&args.device)?;
    eprintln!(
        "training on {} images of {}x{}x{} into {}",
        dataset.len(),
        dataset.channels(),
        dataset.height(),
        dataset.width(),
        config.output_dir.display()
    );
    let report = train_unconditional(&config, &dataset, &device)?;
    let losses = report.losses();
    eprintln!(
        "done: {} steps, {:.2} steps/s, final loss {:.5}; pipeline saved to {}",
        losses.len(),
        report.steps_per_second(),
        losses.last().copied().unwrap_or(f32::NAN),
        config.output_dir.display()
    );
    Ok(())
}
