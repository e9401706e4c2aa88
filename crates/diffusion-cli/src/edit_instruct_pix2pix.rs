//! `diffusers edit-instruct-pix2pix`: StableDiffusionInstructPix2PixPipeline from the terminal.
//! The prompt is an instruction ("make it winter") applied to --image.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::Precision;
use diffusion_core::image::OutputType;
use diffusion_pipelines::{
    Generators, StableDiffusionInstructPix2PixArgs, StableDiffusionInstructPix2PixPipeline,
};
use diffusion_schedulers::SchedulerSpec;

use crate::generate::{
    AdapterArgs, AdapterPlan, OutputArgs, RuntimeArgs, check_config, check_size_flags,
    load_input_image, load_sd_with_scheduler, push_common_params, requested_size, save_images,
};
use crate::metadata::GenerationParameters;

/// `diffusers edit-instruct-pix2pix`.
#[derive(Args, Debug)]
pub struct EditInstructPix2PixArgs {
    /// An InstructPix2Pix diffusers folder or Hub id (timbrooks/instruct-pix2pix), or a single
    /// checkpoint file: its UNet must take 8 input channels (latents + image latents).
    #[arg(long)]
    pub model: String,

    /// For a single-file --model: the diffusers folder or Hub id whose tokenizer and scheduler
    /// config complete it (diffusers' config=).
    #[arg(long)]
    pub config: Option<String>,

    /// The image to edit (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,

    /// The edit instruction ("turn him into a cyborg").
    #[arg(long)]
    pub prompt: String,

    /// What to steer away from.
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// Denoising steps (diffusers' default for this pipeline is 100).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,

    /// Weight of the instruction; 1 or less turns guidance off (one UNet pass per step).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,

    /// Weight of the input image, at least 1: higher stays closer to --image.
    #[arg(long, default_value_t = 1.5)]
    pub image_guidance: f64,

    /// Scheduler: a diffusers class name or an A1111 name ("Euler a", "DDIM"), built from the
    /// model's scheduler config. Defaults to the model's own.
    #[arg(long)]
    pub scheduler: Option<String>,

    /// DDIM's eta (0 is deterministic); used only by schedulers that take it.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,

    /// Seed of the torch-compatible generator (diffusers'
    /// generator=torch.Generator().manual_seed(SEED)). Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Number of edits (num_images_per_prompt); several are saved as one grid.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,

    /// Resize --image to this height first (a multiple of 8); the image's own size by default.
    #[arg(long)]
    pub height: Option<usize>,

    /// Resize --image to this width first (a multiple of 8); give both or neither.
    #[arg(long)]
    pub width: Option<usize>,

    #[command(flatten)]
    pub files: OutputArgs,

    /// Columns of the grid when --num-images > 1; near-square by default.
    #[arg(long)]
    pub grid_cols: Option<usize>,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    // LoRA and textual inversion act on the UNet and text encoder; the port's InstructPix2Pix
    // pipeline takes no IP-Adapter image embeddings, so those flags are refused.
    #[command(flatten)]
    pub adapters: AdapterArgs,
}

/// What the flags ask for, checked before any model is loaded.
struct Checked {
    precision: Precision,
    size: Option<(usize, usize)>,
    adapters: AdapterPlan,
}

/// Every check that needs no model, so a mistake costs nothing and writes nothing.
fn check_flags(args: &EditInstructPix2PixArgs) -> Result<Checked> {
    args.adapters
        .refuse_ip_adapter("StableDiffusionInstructPix2PixPipeline")?;
    let adapters = args.adapters.check()?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    if !args.guidance.is_finite() {
        bail!("--guidance {}: must be a finite number", args.guidance);
    }
    if !(args.image_guidance.is_finite() && args.image_guidance >= 1.0) {
        bail!(
            "--image-guidance {}: must be a finite number of at least 1",
            args.image_guidance
        );
    }
    if !(args.eta.is_finite() && args.eta >= 0.0) {
        bail!("--eta {}: must be a finite number of at least 0", args.eta);
    }
    if let Some(name) = &args.scheduler {
        SchedulerSpec::parse(name).with_context(|| format!("--scheduler {name}"))?;
    }
    check_size_flags(args.height, args.width)?;
    let size = requested_size(args.height, args.width)?;
    check_config(&args.model, args.config.as_deref())?;
    args.files.check()?;
    Ok(Checked {
        precision: args.runtime.precision()?,
        size,
        adapters,
    })
}

/// Run `diffusers edit-instruct-pix2pix`.
pub fn run(args: EditInstructPix2PixArgs) -> Result<()> {
    let Checked {
        precision,
        size,
        adapters: plan,
    } = check_flags(&args)?;
    let input = load_input_image(&args.image, "--image", size)?;
    let (components, adapters) = load_sd_with_scheduler(
        &args.model,
        args.config.as_deref(),
        &args.runtime,
        (&args.adapters, plan),
        precision,
        "edit-instruct-pix2pix",
        args.scheduler.as_deref(),
    )?;
    let sampler = components.scheduler.kind().class_name();
    let out = StableDiffusionInstructPix2PixPipeline::from_parts(components)
        .call(StableDiffusionInstructPix2PixArgs {
            prompt: vec![args.prompt.clone()],
            negative_prompt: args.negative_prompt.clone().map(|n| vec![n]),
            image: Some(input.into()),
            num_inference_steps: args.steps,
            guidance_scale: args.guidance,
            image_guidance_scale: args.image_guidance,
            num_images_per_prompt: args.num_images,
            eta: args.eta,
            generator: args.seed.map(Generators::Seed).unwrap_or_default(),
            output_type: OutputType::Np,
            progress: !args.runtime.quiet,
            ..Default::default()
        })
        .with_context(|| format!("--model {}", args.model))?;

    let mut params = GenerationParameters {
        prompt: Some(args.prompt.clone()),
        negative_prompt: args.negative_prompt.clone(),
        ..GenerationParameters::default()
    };
    params.push("Steps", args.steps);
    params.push("Sampler", sampler);
    params.push("CFG scale", args.guidance);
    params.push("Image CFG scale", args.image_guidance);
    if args.eta != 0.0 {
        params.push("Eta", args.eta);
    }
    push_common_params(&mut params, args.seed, &args.model, None);
    if precision != Precision::F32 {
        params.push("Dtype", &args.runtime.dtype);
    }
    adapters.push_params(&args.adapters, &mut params);
    params.push("Init image", args.image.display());
    save_images(&args.files, args.grid_cols, out, params)
}
