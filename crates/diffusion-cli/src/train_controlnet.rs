//! `diffusers train controlnet`: diffusers' train_controlnet.py as a command.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::parse_device;
use diffusion_train::{ControlNetRunConfig, LrScheduleKind, MixedPrecision, train_controlnet};

use crate::train::LrSchedulerArg;

/// train_controlnet.py's options (its names and defaults).
#[derive(Args, Debug)]
pub struct ControlNetArgs {
    /// A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long, alias = "model")]
    pub pretrained_model: Option<PathBuf>,

    /// A ControlNet folder to start from (default: ControlNetModel.from_unet of the UNet).
    #[arg(long)]
    pub controlnet_model: Option<PathBuf>,

    /// A folder with metadata.jsonl rows naming the image, the conditioning image and the
    /// caption.
    #[arg(long)]
    pub train_data_dir: Option<PathBuf>,

    /// The target-image column (default image).
    #[arg(long)]
    pub image_column: Option<String>,

    /// The conditioning-image column (default conditioning_image).
    #[arg(long)]
    pub conditioning_image_column: Option<String>,

    /// The caption column (default text).
    #[arg(long)]
    pub caption_column: Option<String>,

    /// Output folder: checkpoints, logs/train_log.jsonl and the trained ControlNet.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,

    /// Side of the square training images (a multiple of 8).
    #[arg(long)]
    pub resolution: Option<usize>,

    /// Rows per batch.
    #[arg(long)]
    pub train_batch_size: Option<usize>,

    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,

    /// The share of captions replaced by the empty prompt, in [0, 1].
    #[arg(long)]
    pub proportion_empty_prompts: Option<f64>,

    /// Data-parallel training over these devices, the main one first (`cpu,cpu` or
    /// `cuda:0,cuda:1`); --train-batch-size is then the batch of each device, as with
    /// `accelerate launch --multi_gpu`. Overrides --device.
    #[arg(long)]
    pub devices: Option<String>,

    /// Passes over the data (when --max-train-steps is not given).
    #[arg(long)]
    pub num_train_epochs: Option<usize>,

    /// Optimizer steps.
    #[arg(long)]
    pub max_train_steps: Option<usize>,

    /// Peak learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,

    /// Learning-rate schedule.
    #[arg(long, value_enum)]
    pub lr_scheduler: Option<LrSchedulerArg>,

    /// Warmup steps of the schedule.
    #[arg(long)]
    pub lr_warmup_steps: Option<usize>,

    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,

    /// Seed of everything random.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Save a resumable checkpoint every N optimizer steps.
    #[arg(long)]
    pub checkpointing_steps: Option<usize>,

    /// Keep at most this many checkpoints.
    #[arg(long)]
    pub checkpoints_total_limit: Option<usize>,

    /// Resume from a checkpoint folder, or "latest".
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,

    /// Generate validation images for this prompt with the ControlNet being trained (repeat
    /// for several), into <output-dir>/validation/step-NNNNNN.png; needs --validation-image.
    #[arg(long = "validation-prompt")]
    pub validation_prompts: Vec<String>,

    /// The control image of the validation prompts (repeat): one per prompt, one for all
    /// prompts, or several for a single prompt.
    #[arg(long = "validation-image")]
    pub validation_images: Vec<PathBuf>,

    /// Images per validation prompt and control image (default 4).
    #[arg(long)]
    pub num_validation_images: Option<usize>,

    /// Generate validation images every N optimizer steps (default 100), and after the last.
    #[arg(long)]
    pub validation_steps: Option<usize>,

    /// Mixed precision: no, fp16 (with a dynamic loss scale) or bf16. The ControlNet keeps
    /// f32 master weights; the frozen UNet, VAE and text encoder run in the half dtype.
    #[arg(long)]
    pub mixed_precision: Option<String>,

    /// Device: cpu, or a GPU backend compiled into this build.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// (burn's balanced gradient checkpointing): less memory, more compute.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Build the config, validate it and the folders before anything is loaded, then train.
pub fn controlnet(args: ControlNetArgs) -> Result<()> {
    let mut config = ControlNetRunConfig::default();
    macro_rules! set {
        ($($flag:ident => $field:ident),*) => {$(
            if let Some(v) = args.$flag.clone() {
                config.$field = v;
            }
        )*};
    }
    set!(pretrained_model => pretrained_model, train_data_dir => train_data_dir,
        image_column => image_column,
        conditioning_image_column => conditioning_image_column,
        caption_column => caption_column, output_dir => output_dir, resolution => resolution,
        train_batch_size => train_batch_size, num_train_epochs => num_train_epochs,
        proportion_empty_prompts => proportion_empty_prompts,
        seed => seed, checkpointing_steps => checkpointing_steps);
    macro_rules! set_some {
        ($($field:ident),*) => {$(
            if args.$field.is_some() {
                config.$field = args.$field.clone();
            }
        )*};
    }
    set_some!(
        controlnet_model,
        max_train_steps,
        checkpoints_total_limit,
        resume_from_checkpoint
    );
    if let Some(v) = args.learning_rate {
        config.train.learning_rate = v;
    }
    if let Some(v) = args.gradient_accumulation_steps {
        config.train.gradient_accumulation_steps = v;
    }
    config.train.gradient_checkpointing |= args.gradient_checkpointing;
    if let Some(list) = &args.devices {
        config.devices = diffusion_train::data_parallel::split_device_list(list)
            .with_context(|| format!("--devices {list}"))?;
    }
    if let Some(v) = args.lr_warmup_steps {
        config.train.lr_warmup_steps = v;
    }
    if let Some(norm) = args.max_grad_norm {
        config.train.max_grad_norm = (norm > 0.0).then_some(norm);
    }
    if let Some(kind) = args.lr_scheduler {
        config.train.lr_scheduler = match kind {
            LrSchedulerArg::Linear => LrScheduleKind::Linear,
            LrSchedulerArg::Cosine => LrScheduleKind::Cosine,
            LrSchedulerArg::CosineWithRestarts => LrScheduleKind::CosineWithRestarts,
            LrSchedulerArg::Polynomial => LrScheduleKind::Polynomial,
            LrSchedulerArg::Constant => LrScheduleKind::Constant,
            LrSchedulerArg::ConstantWithWarmup => LrScheduleKind::ConstantWithWarmup,
        };
    }
    config.validation.validation_prompts = args.validation_prompts.clone();
    config.validation.validation_images = args.validation_images.clone();
    if (args.num_validation_images.is_some() || args.validation_steps.is_some())
        && !config.validation.is_enabled()
    {
        bail!("--num-validation-images / --validation-steps need --validation-prompt");
    }
    if let Some(v) = args.num_validation_images {
        config.validation.num_validation_images = v;
    }
    if let Some(v) = args.validation_steps {
        config.validation.validation_steps = v;
    }
    if let Some(v) = &args.mixed_precision {
        config.train.mixed_precision = MixedPrecision::parse("mixed_precision", v)?;
    }
    config.show_progress = !args.quiet;
    if config.pretrained_model.as_os_str().is_empty() {
        bail!("give the model: --pretrained-model <Stable Diffusion folder>");
    }
    if config.train_data_dir.as_os_str().is_empty() {
        bail!("give the data: --train-data-dir <folder with metadata.jsonl>");
    }
    config.validate()?;
    config.check_paths()?;
    let device = parse_device(&args.device)?;
    eprintln!(
        "ControlNet training on {} with {} into {}",
        config.pretrained_model.display(),
        config.train_data_dir.display(),
        config.output_dir.display()
    );
    let report = train_controlnet(&config, &device)?;
    let losses = report.losses();
    eprintln!(
        "done: {} steps, {:.2} steps/s, final loss {:.5}; ControlNet saved to {}",
        losses.len(),
        report.steps_per_second(),
        losses.last().copied().unwrap_or(f32::NAN),
        config.output_dir.display()
    );
    Ok(())
}
