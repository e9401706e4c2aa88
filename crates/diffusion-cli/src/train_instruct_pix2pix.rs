//! `diffusers train instruct-pix2pix`: diffusers' train_instruct_pix2pix.py as a command.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::parse_device;
use diffusion_train::{InstructPix2PixConfig, LrScheduleKind, train_instruct_pix2pix};

use crate::train::{LrSchedulerArg, MixedPrecisionArg};

/// train_instruct_pix2pix.py's options (its names, its defaults unless --config says otherwise).
#[derive(Args, Debug)]
pub struct InstructPix2PixArgs {
    /// A JSON config (InstructPix2PixConfig); the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// A diffusers Stable Diffusion folder; its 4-channel UNet gets an 8-channel conv_in.
    #[arg(long)]
    pub model: Option<PathBuf>,

    /// A folder with metadata.jsonl rows naming the original and edited images and the edit
    /// instruction.
    #[arg(long)]
    pub train_data_dir: Option<PathBuf>,

    /// The original-image column (default input_image).
    #[arg(long)]
    pub original_image_column: Option<String>,

    /// The edited-image column (default edited_image).
    #[arg(long)]
    pub edited_image_column: Option<String>,

    /// The edit-instruction column (default edit_prompt).
    #[arg(long)]
    pub edit_prompt_column: Option<String>,

    /// Output folder: checkpoints, logs/train_log.jsonl and the pipeline.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,

    /// Side of the square training images.
    #[arg(long)]
    pub resolution: Option<usize>,

    /// Random horizontal flips (the same for both images of a row).
    #[arg(long)]
    pub random_flip: bool,

    /// Rows per micro-batch.
    #[arg(long)]
    pub train_batch_size: Option<usize>,

    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,

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

    /// Conditioning dropout: drop the prompt, the image, or both, each with this probability.
    #[arg(long)]
    pub conditioning_dropout_prob: Option<f64>,

    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,

    /// Mixed precision: f32 master weights, the UNet's forward and backward in fp16 (with a
    /// dynamic loss scale) or bf16, the frozen VAE and text encoder in that dtype.
    #[arg(long, value_enum, default_value = "no")]
    pub mixed_precision: MixedPrecisionArg,

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

    /// Keep an EMA of the UNet and save it.
    #[arg(long)]
    pub use_ema: bool,

    /// The original image that validation edits (the script's --val_image_url; a local PNG or
    /// JPEG file here). Validation runs when --validation-prompt is given too.
    #[arg(long, value_name = "IMAGE")]
    pub val_image_url: Option<PathBuf>,

    /// The edit instruction of the validation images; they are written to
    /// <output-dir>/validation/step-NNNNNN.png (the original, then the edits).
    #[arg(long)]
    pub validation_prompt: Option<String>,

    /// Edits per validation (default 4).
    #[arg(long)]
    pub num_validation_images: Option<usize>,

    /// Validate after every this many epochs (default 1), and after the last step.
    #[arg(long)]
    pub validation_epochs: Option<usize>,

    /// Device: cpu, or a GPU backend compiled into this build.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Data-parallel training over these devices, the main one first (`cpu,cpu` or
    /// `cuda:0,cuda:1`); --train-batch-size is then the batch of each device, as with
    /// `accelerate launch --multi_gpu`. Overrides --device.
    #[arg(long)]
    pub devices: Option<String>,

    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// (burn's balanced gradient checkpointing): less memory, more compute.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Build the config, validate it and the folders before anything is loaded, then train.
pub fn instruct_pix2pix(args: InstructPix2PixArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => InstructPix2PixConfig::load(path)?,
        None => InstructPix2PixConfig::default(),
    };
    macro_rules! set {
        ($($flag:ident => $field:ident),*) => {$(
            if let Some(v) = args.$flag.clone() {
                config.$field = v;
            }
        )*};
    }
    set!(model => pretrained_model, train_data_dir => train_data_dir,
        original_image_column => original_image_column,
        edited_image_column => edited_image_column, edit_prompt_column => edit_prompt_column,
        output_dir => output_dir, resolution => resolution,
        train_batch_size => train_batch_size,
        gradient_accumulation_steps => gradient_accumulation_steps,
        num_train_epochs => num_train_epochs, learning_rate => learning_rate,
        lr_warmup_steps => lr_warmup_steps, seed => seed,
        checkpointing_steps => checkpointing_steps,
        num_validation_images => num_validation_images,
        validation_epochs => validation_epochs);
    macro_rules! set_some {
        ($($field:ident),*) => {$(
            if args.$field.is_some() {
                config.$field = args.$field.clone();
            }
        )*};
    }
    set_some!(
        max_train_steps,
        conditioning_dropout_prob,
        checkpoints_total_limit,
        resume_from_checkpoint,
        val_image_url,
        validation_prompt
    );
    if let Some(norm) = args.max_grad_norm {
        config.max_grad_norm = (norm > 0.0).then_some(norm);
    }
    if let Some(kind) = args.lr_scheduler {
        config.lr_scheduler = match kind {
            LrSchedulerArg::Linear => LrScheduleKind::Linear,
            LrSchedulerArg::Cosine => LrScheduleKind::Cosine,
            LrSchedulerArg::CosineWithRestarts => LrScheduleKind::CosineWithRestarts,
            LrSchedulerArg::Polynomial => LrScheduleKind::Polynomial,
            LrSchedulerArg::Constant => LrScheduleKind::Constant,
            LrSchedulerArg::ConstantWithWarmup => LrScheduleKind::ConstantWithWarmup,
        };
    }
    config.random_flip |= args.random_flip;
    config.use_ema |= args.use_ema;
    config.gradient_checkpointing |= args.gradient_checkpointing;
    config.mixed_precision = args.mixed_precision.precision().as_str().into();
    if let Some(list) = &args.devices {
        config.devices = diffusion_train::data_parallel::split_device_list(list)
            .with_context(|| format!("--devices {list}"))?;
    }
    config.show_progress = !args.quiet;
    if config.pretrained_model.as_os_str().is_empty() {
        bail!("give the model: --model <Stable Diffusion folder>");
    }
    if config.train_data_dir.as_os_str().is_empty() {
        bail!("give the data: --train-data-dir <folder with metadata.jsonl>");
    }
    config.validate()?;
    config.check_paths()?;
    let device = parse_device(&args.device)?;
    eprintln!(
        "InstructPix2Pix fine-tuning of {} on {} into {}",
        config.pretrained_model.display(),
        config.train_data_dir.display(),
        config.output_dir.display()
    );
    let report = train_instruct_pix2pix(&config, &device)?;
    let losses = report.losses();
    eprintln!(
        "done: {} steps, {:.2} steps/s, final loss {:.5}; saved to {}",
        losses.len(),
        report.steps_per_second(),
        losses.last().copied().unwrap_or(f32::NAN),
        config.output_dir.display()
    );
    Ok(())
}
