//! `diffusers edit-cycle`: CycleDiffusionPipeline from the terminal. Describe the input image
//! with --source-prompt and the edit with --prompt; what the prompts share is kept.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use diffusion_core::Precision;
use diffusion_core::image::OutputType;
use diffusion_pipelines::{CycleDiffusionArgs, CycleDiffusionPipeline, Generators};

use crate::generate::{
    AdapterArgs, AdapterPlan, OutputArgs, RuntimeArgs, check_config, check_size_flags,
    load_input_image, load_sd_for_edit, push_common_params, requested_size, save_images,
};
use crate::metadata::GenerationParameters;

/// `diffusers edit-cycle`.
#[derive(Args, Debug)]
pub struct EditCycleArgs {
    /// A Stable Diffusion 1.x / 2.x diffusers folder, Hub id (CompVis/stable-diffusion-v1-4) or
    /// single checkpoint file (.safetensors / .ckpt). Its scheduler config is run as a
    /// DDIMScheduler, the only one CycleDiffusion works with.
    #[arg(long)]
    pub model: String,

    /// For a single-file --model: the diffusers folder or Hub id whose tokenizer and scheduler
    /// config complete it (diffusers' config=).
    #[arg(long)]
    pub config: Option<String>,

    /// The image to edit (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,

    /// What the edited image should show ("An astronaut riding an elephant").
    #[arg(long)]
    pub prompt: String,

    /// What the input image shows ("An astronaut riding a horse").
    #[arg(long)]
    pub source_prompt: String,

    /// How much of the schedule to run, in (0, 1]: the image is noised to that level first.
    #[arg(long, default_value_t = 0.8)]
    pub strength: f64,

    /// Denoising steps of the full schedule (strength × steps are run).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,

    /// Classifier-free guidance scale of the target prompt; 1 or less disables guidance for
    /// both prompts.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,

    /// Classifier-free guidance scale of the source prompt (used when --guidance is above 1).
    #[arg(long, default_value_t = 1.0)]
    pub source_guidance: f64,

    /// DDIM's eta, above 0: the share of fresh noise in each step, which the edit carries over
    /// from the source to the target.
    #[arg(long, default_value_t = 0.1)]
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

    /// Skip this many final CLIP layers for both prompts' embeddings.
    #[arg(long)]
    pub clip_skip: Option<usize>,

    #[command(flatten)]
    pub files: OutputArgs,

    /// Columns of the grid when --num-images > 1; near-square by default.
    #[arg(long)]
    pub grid_cols: Option<usize>,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    // LoRA and textual inversion act on the UNet and text encoder; CycleDiffusion takes no
    // image embeddings, so the IP-Adapter flags are refused.
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
fn check_flags(args: &EditCycleArgs) -> Result<Checked> {
    args.adapters.refuse_ip_adapter("CycleDiffusionPipeline")?;
    let adapters = args.adapters.check()?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    let s = args.strength;
    if !(s > 0.0 && s <= 1.0) {
        bail!("--strength {s}: must be in (0, 1]");
    }
    if ((args.steps as f64 * s) as usize) < 1 {
        bail!(
            "--strength {s} with --steps {}: no denoising step is left; raise either",
            args.steps
        );
    }
    if !(args.eta > 0.0 && args.eta.is_finite()) {
        bail!(
            "--eta {}: must be above 0 (CycleDiffusion recovers each step's noise by dividing \
             by eta; 0.1 is diffusers' default)",
            args.eta
        );
    }
    for (flag, value) in [
        ("--guidance", args.guidance),
        ("--source-guidance", args.source_guidance),
    ] {
        if !value.is_finite() {
            bail!("{flag} {value}: must be a finite number");
        }
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

/// Run `diffusers edit-cycle`.
pub fn run(args: EditCycleArgs) -> Result<()> {
    let Checked {
        precision,
        size,
        adapters: plan,
    } = check_flags(&args)?;
    let input = load_input_image(&args.image, "--image", size)?;
    // diffusers' recipe: DDIMScheduler.from_pretrained(model, subfolder="scheduler").
    let (components, adapters) = load_sd_for_edit(
        &args.model,
        args.config.as_deref(),
        &args.runtime,
        (&args.adapters, plan),
        precision,
        "edit-cycle",
    )?;
    let out = CycleDiffusionPipeline::from_parts(components).call(CycleDiffusionArgs {
        prompt: vec![args.prompt.clone()],
        source_prompt: vec![args.source_prompt.clone()],
        image: Some(input.into()),
        strength: args.strength,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance,
        source_guidance_scale: args.source_guidance,
        num_images_per_prompt: args.num_images,
        eta: args.eta,
        generator: args.seed.map(Generators::Seed).unwrap_or_default(),
        output_type: OutputType::Np,
        clip_skip: args.clip_skip,
        progress: !args.runtime.quiet,
        ..Default::default()
    })?;

    let mut params = GenerationParameters {
        prompt: Some(args.prompt.clone()),
        ..GenerationParameters::default()
    };
    params.push("Source prompt", format!("\"{}\"", args.source_prompt));
    params.push("Steps", args.steps);
    params.push("Sampler", "DDIMScheduler");
    params.push("CFG scale", args.guidance);
    params.push("Source CFG scale", args.source_guidance);
    params.push("Eta", args.eta);
    params.push("Denoising strength", args.strength);
    push_common_params(&mut params, args.seed, &args.model, args.clip_skip);
    if precision != Precision::F32 {
        params.push("Dtype", &args.runtime.dtype);
    }
    adapters.push_params(&args.adapters, &mut params);
    params.push("Init image", args.image.display());
    save_images(&args.files, args.grid_cols, out, params)
}
