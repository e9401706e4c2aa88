//! `diffusers train unconditional|text-to-image|lora`: diffusers' train_unconditional.py,
//! train_text_to_image.py and train_text_to_image_lora.py as commands.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use diffusion_core::parse_device;
use diffusion_schedulers::PredictionType;
use diffusion_train::{
    FolderOptions, ImageDataset, Interpolation, LrScheduleKind, TextToImageConfig, TrainConfig,
    ValidationSampler, train_text_to_image, train_unconditional,
};

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Train a UNet2DModel from scratch (or from --pretrained-model) to denoise images, and save a
    /// DDPMPipeline folder that `diffusers sample --model` and diffusers' DDPMPipeline load.
    Unconditional(UnconditionalArgs),
    /// Fine-tune a Stable Diffusion UNet on captioned images (train_text_to_image.py) and save
    /// the pipeline folder.
    TextToImage(TextToImageArgs),
    /// Train a LoRA of a Stable Diffusion UNet's attention projections on captioned images
    /// (train_text_to_image_lora.py) and save pytorch_lora_weights.safetensors.
    Lora(LoraArgs),
    /// DreamBooth (train_dreambooth.py, or train_dreambooth_lora.py with --lora): teach the
    /// UNet a subject from instance images, optionally with prior preservation on class images.
    Dreambooth(crate::train_concepts::DreamBoothArgs),
    /// Textual inversion (textual_inversion.py): learn a new token's embedding from images and
    /// save learned_embeds.safetensors.
    TextualInversion(crate::train_concepts::TextualInversionArgs),
    /// InstructPix2Pix (train_instruct_pix2pix.py): widen the UNet's conv_in to 8 channels and
    /// learn to apply edit instructions to images; save the pipeline folder.
    InstructPix2pix(crate::train_instruct_pix2pix::InstructPix2PixArgs),
    /// ControlNet (train_controlnet.py): train a ControlNet through the frozen UNet on
    /// (image, conditioning image, caption) rows; save the ControlNet folder.
    Controlnet(crate::train_controlnet::ControlNetArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LrSchedulerArg {
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
    Constant,
    ConstantWithWarmup,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PredictionArg {
    Epsilon,
    VPrediction,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum InterpolationArg {
    Bilinear,
    Lanczos,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum MixedPrecisionArg {
    No,
    Fp16,
    Bf16,
}

impl MixedPrecisionArg {
    /// The training library's setting.
    pub fn precision(self) -> diffusion_train::MixedPrecision {
        match self {
            Self::No => diffusion_train::MixedPrecision::No,
            Self::Fp16 => diffusion_train::MixedPrecision::Fp16,
            Self::Bf16 => diffusion_train::MixedPrecision::Bf16,
        }
    }
}

/// Options shared by `train text-to-image` and `train lora` (train_text_to_image.py's names).
#[derive(Args, Debug)]
pub struct TextToImageArgs {
    /// A JSON config (TextToImageConfig); the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    pub model: Option<PathBuf>,

    /// An imagefolder dataset: images plus metadata.jsonl with `file_name` and a caption column.
    #[arg(long)]
    pub train_data_dir: Option<PathBuf>,

    /// The caption column of metadata.jsonl.
    #[arg(long)]
    pub caption_column: Option<String>,

    /// Output folder: checkpoints, logs/train_log.jsonl and the result.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,

    /// Side of the square training images.
    #[arg(long)]
    pub resolution: Option<usize>,

    /// Center crop (default: random crop).
    #[arg(long)]
    pub center_crop: bool,

    /// Random horizontal flips.
    #[arg(long)]
    pub random_flip: bool,

    /// Resize filter.
    #[arg(long, value_enum)]
    pub image_interpolation_mode: Option<InterpolationArg>,

    /// Images per micro-batch.
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

    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,

    /// Override the scheduler's prediction type.
    #[arg(long, value_enum)]
    pub prediction_type: Option<PredictionArg>,

    /// Min-SNR loss weighting gamma (5 is the recommended value).
    #[arg(long)]
    pub snr_gamma: Option<f64>,

    /// Noise offset scale.
    #[arg(long)]
    pub noise_offset: Option<f64>,

    /// Input perturbation scale.
    #[arg(long)]
    pub input_perturbation: Option<f64>,

    /// Encode the images through the VAE once before training.
    #[arg(long)]
    pub cache_latents: bool,

    /// Mixed precision: forward and backward on an fp16 (dynamic loss scale) or bf16 copy of
    /// the f32 weights, frozen VAE and text encoder in that dtype (not for SDXL yet).
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

    /// Keep an EMA of the UNet and save it (full fine-tuning only).
    #[arg(long)]
    pub use_ema: bool,

    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// (burn's balanced gradient checkpointing): less memory, more compute.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Device: cpu, or a GPU backend compiled into this build.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Data-parallel training over these devices (full fine-tuning or LoRA, SD or SDXL, any
    /// --mixed-precision), the main one first (`cpu,cpu` or `cuda:0,cuda:1`);
    /// --train-batch-size is then the batch of each device, as with `accelerate launch
    /// --multi_gpu`. Overrides --device.
    #[arg(long)]
    pub devices: Option<String>,

    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,

    #[command(flatten)]
    pub validation: PromptValidationArgs,

    #[command(flatten)]
    pub sdxl: crate::train_sdxl::SdxlFlags,

    #[command(flatten)]
    pub flow_matching: FlowMatchingArgs,
}

/// The flow-matching objective of `train text-to-image` and `train lora`, with
/// train_dreambooth_lora_sd3.py's option names. Any of them turns the objective on; a model
/// whose scheduler is FlowMatchEulerDiscreteScheduler uses it (with the script's defaults)
/// without them.
#[derive(Args, Debug)]
pub struct FlowMatchingArgs {
    /// Flow-time density and loss weighting: sigma_sqrt, logit_normal (default), mode, cosmap
    /// or none.
    #[arg(long)]
    pub weighting_scheme: Option<String>,

    /// Mean of the logit-normal density (default 0).
    #[arg(long)]
    pub logit_mean: Option<f64>,

    /// Standard deviation of the logit-normal density (default 1).
    #[arg(long)]
    pub logit_std: Option<f64>,

    /// Scale of the mode density (default 1.29).
    #[arg(long)]
    pub mode_scale: Option<f64>,

    /// Train the preconditioned output (`pred * -sigma + noisy`) towards the clean latents
    /// (true, the default) or the raw output towards the flow velocity (false).
    #[arg(long)]
    pub precondition_outputs: Option<bool>,
}

impl FlowMatchingArgs {
    /// Set the config's flow-matching settings from the flags given.
    ///
    /// # Errors
    /// An unknown `--weighting-scheme`.
    pub fn apply(&self, config: &mut TextToImageConfig) -> Result<()> {
        let given = self.weighting_scheme.is_some()
            || self.logit_mean.is_some()
            || self.logit_std.is_some()
            || self.mode_scale.is_some()
            || self.precondition_outputs.is_some();
        if !given {
            return Ok(());
        }
        let mut flow = config.flow_matching.clone().unwrap_or_default();
        if let Some(s) = &self.weighting_scheme {
            flow.weighting_scheme =
                diffusion_train::WeightingScheme::parse(s).context("--weighting-scheme")?;
        }
        if let Some(v) = self.logit_mean {
            flow.logit_mean = v;
        }
        if let Some(v) = self.logit_std {
            flow.logit_std = v;
        }
        if let Some(v) = self.mode_scale {
            flow.mode_scale = v;
        }
        if let Some(v) = self.precondition_outputs {
            flow.precondition_outputs = v;
        }
        config.flow_matching = Some(flow);
        Ok(())
    }
}

/// Validation images of `train text-to-image`, `train lora` (SD1 and SDXL), `train dreambooth`
/// and `train textual-inversion` (the scripts' names).
#[derive(Args, Debug)]
pub struct PromptValidationArgs {
    /// Generate validation images for this prompt with the weights being trained (repeat for
    /// several; one grid row each), into <output-dir>/validation/step-NNNNNN.png.
    #[arg(long = "validation-prompt")]
    pub validation_prompts: Vec<String>,

    /// Images per validation prompt (default 4).
    #[arg(long)]
    pub num_validation_images: Option<usize>,

    /// Generate validation images every N optimizer steps (and after the last step).
    #[arg(long)]
    pub validation_steps: Option<usize>,

    /// Generate validation images after every N-th epoch (epochs 0, N, 2N, ...).
    #[arg(long)]
    pub validation_epochs: Option<usize>,

    /// Denoising steps of the validation images (default 30).
    #[arg(long)]
    pub validation_inference_steps: Option<usize>,

    /// Seed of the validation images (default: --seed).
    #[arg(long)]
    pub validation_seed: Option<u64>,
}

impl PromptValidationArgs {
    /// Apply the flags to `config`; an interval or count without a prompt is refused.
    pub fn apply(&self, config: &mut diffusion_train::PromptValidationConfig) -> Result<()> {
        if !self.validation_prompts.is_empty() {
            config.validation_prompts = self.validation_prompts.clone();
        }
        let given = self.num_validation_images.is_some()
            || self.validation_steps.is_some()
            || self.validation_epochs.is_some()
            || self.validation_inference_steps.is_some()
            || self.validation_seed.is_some();
        if given && !config.is_enabled() {
            bail!("the validation options need --validation-prompt");
        }
        if let Some(v) = self.num_validation_images {
            config.num_validation_images = v;
        }
        if self.validation_steps.is_some() {
            config.validation_steps = self.validation_steps;
        }
        if self.validation_epochs.is_some() {
            config.validation_epochs = self.validation_epochs;
        }
        if let Some(v) = self.validation_inference_steps {
            config.num_inference_steps = v;
        }
        if self.validation_seed.is_some() {
            config.seed = self.validation_seed;
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct LoraArgs {
    #[command(flatten)]
    pub common: TextToImageArgs,

    /// LoRA rank.
    #[arg(long)]
    pub rank: Option<usize>,

    /// LoRA alpha (default: the rank, as train_text_to_image_lora.py sets it).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
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

    /// With --digits: train on these digit classes only (e.g. `--digits-class 3`, or `1,7`).
    #[arg(long, value_delimiter = ',', requires = "digits")]
    pub digits_class: Vec<u32>,

    /// Train on a folder of .png/.jpg images (resized and center-cropped to --resolution).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Start from trained weights instead of a new model (fine-tuning): a UNet2DModel folder, or
    /// a DDPMPipeline folder such as models/ddpm-digits (its unet/ is used).
    #[arg(long)]
    pub pretrained_model: Option<PathBuf>,

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

    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// (burn's balanced gradient checkpointing): less memory, more compute.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Warmup steps of the learning-rate schedule.
    #[arg(long)]
    pub lr_warmup_steps: Option<usize>,

    /// Save a validation grid after every N-th epoch (epochs 0, N, 2N, ..., and the last step),
    /// into <output-dir>/validation/step-NNNNNN.png (train_unconditional.py's option).
    #[arg(long)]
    pub save_images_epochs: Option<usize>,

    /// Save a validation grid every N optimizer steps (and after the last step).
    #[arg(long)]
    pub save_images_steps: Option<usize>,

    /// Images per validation grid (default 16).
    #[arg(long)]
    pub eval_batch_size: Option<usize>,

    /// Denoising steps of the validation grids (default 1000).
    #[arg(long)]
    pub ddpm_num_inference_steps: Option<usize>,

    /// Sampler of the validation grids: the training DDPM scheduler, or DDIM from its config.
    #[arg(long, value_enum)]
    pub validation_sampler: Option<ValidationSamplerArg>,

    /// Seed of the validation grids (default 0, as train_unconditional.py).
    #[arg(long)]
    pub validation_seed: Option<u64>,

    /// Enlarge each validation image N times (nearest neighbour); by default the smallest
    /// factor that makes images at least 64 pixels wide.
    #[arg(long)]
    pub validation_upscale: Option<u32>,

    /// Mixed precision: forward and backward on an fp16 (with a dynamic loss scale) or bf16
    /// copy of the f32 weights.
    #[arg(long, value_enum)]
    pub mixed_precision: Option<MixedPrecisionArg>,

    /// Device: cpu, or a GPU backend compiled into this build.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Data-parallel training over these devices, the main one first (`cpu,cpu` or
    /// `cuda:0,cuda:1`); --train-batch-size is then the batch of each device, as with
    /// `accelerate launch --multi_gpu`. Overrides --device.
    #[arg(long)]
    pub devices: Option<String>,

    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ValidationSamplerArg {
    Ddpm,
    Ddim,
}

pub fn run(command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::Unconditional(args) => unconditional(args),
        TrainCommand::TextToImage(args) => text_to_image(args, None),
        TrainCommand::Lora(args) => text_to_image(args.common, Some((args.rank, args.lora_alpha))),
        TrainCommand::Dreambooth(args) => crate::train_concepts::dreambooth(args),
        TrainCommand::TextualInversion(args) => crate::train_concepts::textual_inversion(args),
        TrainCommand::InstructPix2pix(args) => {
            crate::train_instruct_pix2pix::instruct_pix2pix(args)
        }
        TrainCommand::Controlnet(args) => crate::train_controlnet::controlnet(args),
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
    config.gradient_checkpointing |= args.gradient_checkpointing;
    if let Some(dir) = &args.pretrained_model {
        let unet = dir.join("unet");
        let is_pipeline = !dir.join("config.json").is_file() && unet.join("config.json").is_file();
        config.pretrained_model = Some(if is_pipeline { unet } else { dir.clone() });
    }
    if let Some(v) = args.lr_warmup_steps {
        config.lr_warmup_steps = v;
    }
    if let Some(v) = args.mixed_precision {
        config.mixed_precision = match v {
            MixedPrecisionArg::No => diffusion_train::MixedPrecision::No,
            MixedPrecisionArg::Fp16 => diffusion_train::MixedPrecision::Fp16,
            MixedPrecisionArg::Bf16 => diffusion_train::MixedPrecision::Bf16,
        };
    }
    let v = &mut config.validation;
    if args.save_images_epochs.is_some() {
        v.save_images_epochs = args.save_images_epochs;
    }
    if args.save_images_steps.is_some() {
        v.save_images_steps = args.save_images_steps;
    }
    if let Some(n) = args.eval_batch_size {
        v.eval_batch_size = n;
    }
    if let Some(n) = args.ddpm_num_inference_steps {
        v.num_inference_steps = n;
    }
    if let Some(s) = args.validation_sampler {
        v.sampler = match s {
            ValidationSamplerArg::Ddpm => ValidationSampler::Ddpm,
            ValidationSamplerArg::Ddim => ValidationSampler::Ddim,
        };
    }
    if let Some(seed) = args.validation_seed {
        v.seed = seed;
    }
    if args.validation_upscale.is_some() {
        v.upscale = args.validation_upscale;
    }
    config.show_progress = !args.quiet;
    if let Some(list) = &args.devices {
        config.devices = diffusion_train::data_parallel::split_device_list(list)
            .with_context(|| format!("--devices {list}"))?;
    }
    config.validate()?;

    let dataset = match (&args.digits, &args.data_dir) {
        (Some(csv), None) => {
            let all = ImageDataset::from_digits_csv_gz(csv, args.resolution)
                .with_context(|| format!("--digits {}", csv.display()))?;
            if args.digits_class.is_empty() {
                all
            } else {
                all.only_labels(&args.digits_class)
                    .with_context(|| format!("--digits-class {:?}", args.digits_class))?
            }
        }
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
    if !config.devices.is_empty() {
        eprintln!(
            "data-parallel over {} devices ({}): {} images per step",
            config.devices.len(),
            config.devices.join(", "),
            config.global_batch_size()
        );
    }
    let report = train_unconditional(&config, &dataset, &device)?;
    let losses = report.losses();
    eprintln!(
        "done: {} steps, {:.2} steps/s, final loss {:.5}; pipeline saved to {}",
        losses.len(),
        report.steps_per_second(),
        losses.last().copied().unwrap_or(f32::NAN),
        config.output_dir.display()
    );
    if config.validation.is_enabled() {
        eprintln!(
            "validation grids in {}",
            diffusion_train::validation::validation_dir(&config.output_dir).display()
        );
    }
    Ok(())
}

/// Build the config from --config or the script's defaults and the flags, validate it and
/// the folders before anything is loaded, then train.
fn text_to_image(args: TextToImageArgs, lora: Option<(Option<usize>, Option<f64>)>) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => TextToImageConfig::load(path)?,
        None if lora.is_some() => TextToImageConfig::lora_defaults(),
        None => TextToImageConfig::default(),
    };
    if let Some((rank, alpha)) = lora {
        let mut l = config.lora.clone().unwrap_or_default();
        if let Some(r) = rank {
            l.rank = r;
        }
        if alpha.is_some() {
            l.alpha = alpha;
        }
        config.lora = Some(l);
    } else if config.lora.is_some() {
        bail!("the config trains a LoRA: use `diffusers train lora`");
    }
    macro_rules! set {
        ($($flag:ident => $field:ident),*) => {$(
            if let Some(v) = args.$flag.clone() {
                config.$field = v;
            }
        )*};
    }
    set!(model => pretrained_model, train_data_dir => train_data_dir,
        caption_column => caption_column, output_dir => output_dir, resolution => resolution,
        train_batch_size => train_batch_size,
        gradient_accumulation_steps => gradient_accumulation_steps,
        num_train_epochs => num_train_epochs, learning_rate => learning_rate,
        lr_warmup_steps => lr_warmup_steps, noise_offset => noise_offset,
        input_perturbation => input_perturbation, seed => seed,
        checkpointing_steps => checkpointing_steps);
    if args.max_train_steps.is_some() {
        config.max_train_steps = args.max_train_steps;
    }
    if args.snr_gamma.is_some() {
        config.snr_gamma = args.snr_gamma;
    }
    if args.checkpoints_total_limit.is_some() {
        config.checkpoints_total_limit = args.checkpoints_total_limit;
    }
    if args.resume_from_checkpoint.is_some() {
        config.resume_from_checkpoint = args.resume_from_checkpoint.clone();
    }
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
    if let Some(p) = args.prediction_type {
        config.prediction_type = Some(match p {
            PredictionArg::Epsilon => PredictionType::Epsilon,
            PredictionArg::VPrediction => PredictionType::VPrediction,
        });
    }
    if let Some(i) = args.image_interpolation_mode {
        config.image_interpolation_mode = match i {
            InterpolationArg::Bilinear => Interpolation::Bilinear,
            InterpolationArg::Lanczos => Interpolation::Lanczos,
        };
    }
    config.center_crop |= args.center_crop;
    config.random_flip |= args.random_flip;
    config.cache_latents |= args.cache_latents;
    config.use_ema |= args.use_ema;
    config.gradient_checkpointing |= args.gradient_checkpointing;
    config.mixed_precision = args.mixed_precision.precision().as_str().into();
    config.show_progress = !args.quiet;
    args.validation.apply(&mut config.validation)?;
    args.flow_matching.apply(&mut config)?;
    if config.pretrained_model.as_os_str().is_empty() {
        bail!("give the model: --model <Stable Diffusion folder>");
    }
    if config.train_data_dir.as_os_str().is_empty() {
        bail!("give the data: --train-data-dir <folder with metadata.jsonl>");
    }
    if let Some(list) = &args.devices {
        config.devices = diffusion_train::data_parallel::split_device_list(list)
            .with_context(|| format!("--devices {list}"))?;
    }
    if crate::train_sdxl::is_sdxl(&config.pretrained_model)? {
        return crate::train_sdxl::train(config, &args);
    }
    crate::train_sdxl::refuse_flags(&args.sdxl)?;
    config.validate()?;
    config.check_paths()?;
    let device = parse_device(&args.device)?;
    eprintln!(
        "{} {} on {} into {}",
        if config.lora.is_some() {
            "LoRA training of"
        } else {
            "fine-tuning"
        },
        config.pretrained_model.display(),
        config.train_data_dir.display(),
        config.output_dir.display()
    );
    let report = train_text_to_image(&config, &device)?;
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
