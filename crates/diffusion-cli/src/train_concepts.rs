//! `diffusers train dreambooth` and `diffusers train textual-inversion`: diffusers'
//! train_dreambooth.py / train_dreambooth_lora.py and textual_inversion.py as commands.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::parse_device;
use diffusion_train::{
    DreamBoothConfig, LearnableProperty, LoraTrainConfig, TextualInversionConfig, train_dreambooth,
    train_textual_inversion,
};

/// train_dreambooth.py's options (and train_dreambooth_lora.py's with --lora).
#[derive(Args, Debug)]
pub struct DreamBoothArgs {
    /// A diffusers Stable Diffusion folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Images of the subject.
    #[arg(long)]
    pub instance_data_dir: PathBuf,
    /// Their prompt, with the identifier ("a photo of sks dog").
    #[arg(long)]
    pub instance_prompt: String,
    /// Images of the class (prior preservation).
    #[arg(long)]
    pub class_data_dir: Option<PathBuf>,
    /// Their prompt ("a photo of dog").
    #[arg(long)]
    pub class_prompt: Option<String>,
    /// Add the prior-preservation loss.
    #[arg(long)]
    pub with_prior_preservation: bool,
    /// Weight of the prior-preservation loss.
    #[arg(long)]
    pub prior_loss_weight: Option<f64>,
    /// Use this many class images, generating the missing ones with the pipeline of --model.
    #[arg(long)]
    pub num_class_images: Option<usize>,
    /// Prompts per pipeline call when generating class images.
    #[arg(long)]
    pub sample_batch_size: Option<usize>,
    /// Denoising steps when generating class images (default 50).
    #[arg(long)]
    pub class_num_inference_steps: Option<usize>,
    /// Train a LoRA (train_dreambooth_lora.py) instead of the whole UNet.
    #[arg(long)]
    pub lora: bool,
    /// LoRA rank.
    #[arg(long)]
    pub rank: Option<usize>,
    /// Also train a LoRA of the text encoder (needs --lora; same rank and learning rate).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Output folder.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Side of the square training images.
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Center crop (default: random crop).
    #[arg(long)]
    pub center_crop: bool,
    /// Images (instance examples) per micro-batch.
    #[arg(long)]
    pub train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    pub max_train_steps: Option<usize>,
    /// Learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Warmup steps of the (constant) schedule.
    #[arg(long)]
    pub lr_warmup_steps: Option<usize>,
    /// Save a resumable checkpoint every N steps.
    #[arg(long)]
    pub checkpointing_steps: Option<usize>,
    /// Keep at most this many checkpoints.
    #[arg(long)]
    pub checkpoints_total_limit: Option<usize>,
    /// Resume from a checkpoint folder, or "latest" for the newest in --output-dir.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Seed of everything random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device: cpu, or a GPU backend compiled into this build.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// (burn's balanced gradient checkpointing): less memory, more compute.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Mixed precision: forward and backward on an fp16 (with a dynamic loss scale) or bf16
    /// copy of the f32 weights; the frozen VAE and text encoder run in that dtype.
    #[arg(long, value_enum)]
    pub mixed_precision: Option<crate::train::MixedPrecisionArg>,
    /// Data-parallel training over these devices, the main one first (`cpu,cpu` or
    /// `cuda:0,cuda:1`); --train-batch-size is then the number of instance images (each with
    /// its class image) per device, as with `accelerate launch --multi_gpu`. Overrides
    /// --device.
    #[arg(long)]
    pub devices: Option<String>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,

    #[command(flatten)]
    pub validation: crate::train::PromptValidationArgs,
}

/// textual_inversion.py's options.
#[derive(Args, Debug)]
pub struct TextualInversionArgs {
    /// A diffusers Stable Diffusion folder.
    #[arg(long)]
    pub model: PathBuf,
    /// A folder of training images.
    #[arg(long)]
    pub train_data_dir: PathBuf,
    /// The new token, e.g. "<cat-toy>".
    #[arg(long)]
    pub placeholder_token: String,
    /// A one-token word whose embedding the new one starts from.
    #[arg(long)]
    pub initializer_token: String,
    /// Vectors (tokens) learned for the concept.
    #[arg(long)]
    pub num_vectors: Option<usize>,
    /// `object` or `style`: which prompt templates to use.
    #[arg(long, default_value = "object")]
    pub learnable_property: String,
    /// Repeats of the images per epoch.
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Output folder.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Side of the square training images.
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Center crop.
    #[arg(long)]
    pub center_crop: bool,
    /// Images per micro-batch.
    #[arg(long)]
    pub train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    pub max_train_steps: Option<usize>,
    /// Learning rate (multiplied by batch size and accumulation unless --no-scale-lr).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Do not scale the learning rate.
    #[arg(long)]
    pub no_scale_lr: bool,
    /// Warmup steps of the (constant) schedule.
    #[arg(long)]
    pub lr_warmup_steps: Option<usize>,
    /// Write learned_embeds-steps-N.safetensors every N steps.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Save a resumable checkpoint every N steps.
    #[arg(long)]
    pub checkpointing_steps: Option<usize>,
    /// Keep at most this many checkpoints.
    #[arg(long)]
    pub checkpoints_total_limit: Option<usize>,
    /// Resume from a checkpoint folder, or "latest" for the newest in --output-dir.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Seed of everything random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device: cpu, or a GPU backend compiled into this build.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Mixed precision: the frozen UNet and VAE in fp16 (with a dynamic loss scale) or bf16,
    /// the text encoder on a half copy of its f32 weights (the token table stays f32).
    #[arg(long, value_enum)]
    pub mixed_precision: Option<crate::train::MixedPrecisionArg>,
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

    #[command(flatten)]
    pub validation: crate::train::PromptValidationArgs,
}

pub fn dreambooth(args: DreamBoothArgs) -> Result<()> {
    let mut c = if args.lora {
        DreamBoothConfig::lora_defaults()
    } else {
        DreamBoothConfig::default()
    };
    if args.rank.is_some() && !args.lora {
        bail!("--rank needs --lora");
    }
    if args.train_text_encoder && !args.lora {
        bail!("train_text_encoder: --train-text-encoder needs --lora");
    }
    if let (Some(rank), Some(l)) = (args.rank, c.train.lora.as_mut()) {
        *l = LoraTrainConfig { rank, ..l.clone() };
    }
    c.train.pretrained_model = args.model;
    c.instance_data_dir = args.instance_data_dir;
    c.instance_prompt = args.instance_prompt;
    c.class_data_dir = args.class_data_dir;
    c.class_prompt = args.class_prompt;
    c.with_prior_preservation = args.with_prior_preservation;
    c.prior_loss_weight = args.prior_loss_weight.unwrap_or(c.prior_loss_weight);
    c.num_class_images = args.num_class_images.unwrap_or(c.num_class_images);
    c.sample_batch_size = args.sample_batch_size.unwrap_or(c.sample_batch_size);
    c.class_num_inference_steps = args
        .class_num_inference_steps
        .unwrap_or(c.class_num_inference_steps);
    c.train_text_encoder = args.train_text_encoder;
    let t = &mut c.train;
    t.output_dir = args.output_dir.unwrap_or(t.output_dir.clone());
    t.resolution = args.resolution.unwrap_or(t.resolution);
    t.center_crop |= args.center_crop;
    t.gradient_checkpointing |= args.gradient_checkpointing;
    if let Some(v) = args.mixed_precision {
        t.mixed_precision = v.precision().as_str().into();
    }
    t.train_batch_size = args.train_batch_size.unwrap_or(t.train_batch_size);
    t.gradient_accumulation_steps = args
        .gradient_accumulation_steps
        .unwrap_or(t.gradient_accumulation_steps);
    t.max_train_steps = args.max_train_steps.or(t.max_train_steps);
    t.learning_rate = args.learning_rate.unwrap_or(t.learning_rate);
    t.lr_warmup_steps = args.lr_warmup_steps.unwrap_or(t.lr_warmup_steps);
    t.checkpointing_steps = args.checkpointing_steps.unwrap_or(t.checkpointing_steps);
    t.checkpoints_total_limit = args.checkpoints_total_limit.or(t.checkpoints_total_limit);
    t.resume_from_checkpoint = args.resume_from_checkpoint;
    t.seed = args.seed.unwrap_or(t.seed);
    t.show_progress = !args.quiet;
    args.validation.apply(&mut t.validation)?;
    if let Some(list) = &args.devices {
        t.devices = diffusion_train::data_parallel::split_device_list(list)
            .with_context(|| format!("--devices {list}"))?;
    }
    c.validate()?;
    c.check_paths()?;
    let device = parse_device(&args.device)?;
    let report = train_dreambooth(&c, &device)?;
    eprintln!(
        "done: {} steps, final loss {:.5}; saved to {}",
        report.steps.len(),
        report.losses().last().copied().unwrap_or(f32::NAN),
        c.train.output_dir.display()
    );
    Ok(())
}

pub fn textual_inversion(args: TextualInversionArgs) -> Result<()> {
    let mut c = TextualInversionConfig::default();
    c.pretrained_model = args.model;
    c.train_data_dir = args.train_data_dir;
    c.placeholder_token = args.placeholder_token;
    c.initializer_token = args.initializer_token;
    c.num_vectors = args.num_vectors.unwrap_or(c.num_vectors);
    c.learnable_property = match LearnableProperty::parse(&args.learnable_property) {
        Some(p) => p,
        None => bail!(
            "learnable_property: `{}` is not object or style",
            args.learnable_property
        ),
    };
    c.repeats = args.repeats.unwrap_or(c.repeats);
    c.output_dir = args.output_dir.unwrap_or(c.output_dir);
    c.resolution = args.resolution.unwrap_or(c.resolution);
    c.center_crop |= args.center_crop;
    c.train_batch_size = args.train_batch_size.unwrap_or(c.train_batch_size);
    c.gradient_accumulation_steps = args
        .gradient_accumulation_steps
        .unwrap_or(c.gradient_accumulation_steps);
    c.max_train_steps = args.max_train_steps.or(c.max_train_steps);
    c.learning_rate = args.learning_rate.unwrap_or(c.learning_rate);
    c.scale_lr = !args.no_scale_lr;
    c.lr_warmup_steps = args.lr_warmup_steps.unwrap_or(c.lr_warmup_steps);
    c.save_steps = args.save_steps.unwrap_or(c.save_steps);
    c.checkpointing_steps = args.checkpointing_steps.unwrap_or(c.checkpointing_steps);
    c.checkpoints_total_limit = args.checkpoints_total_limit.or(c.checkpoints_total_limit);
    c.resume_from_checkpoint = args.resume_from_checkpoint;
    c.seed = args.seed.unwrap_or(c.seed);
    c.show_progress = !args.quiet;
    if let Some(v) = args.mixed_precision {
        c.mixed_precision = v.precision();
    }
    c.gradient_checkpointing |= args.gradient_checkpointing;
    if let Some(list) = &args.devices {
        c.devices = diffusion_train::data_parallel::split_device_list(list)
            .with_context(|| format!("--devices {list}"))?;
    }
    args.validation.apply(&mut c.validation)?;
    c.validate()?;
    c.check_paths()?;
    let device = parse_device(&args.device)?;
    let report = train_textual_inversion(&c, &device)?;
    eprintln!(
        "done: {} steps, final loss {:.5}; saved to {}",
        report.steps.len(),
        report.losses().last().copied().unwrap_or(f32::NAN),
        c.output_dir.display()
    );
    Ok(())
}
