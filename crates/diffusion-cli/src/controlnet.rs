//! `diffusers controlnet`: StableDiffusionControlNetPipeline from the terminal. A control image
//! (edges, depth, pose, ...) steers text-to-image through one ControlNet.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::Precision;
use diffusion_core::image::OutputType;
use diffusion_pipelines::{
    Generators, StableDiffusionControlNetArgs, StableDiffusionControlNetPipeline,
};

use crate::generate::{
    OutputArgs, RuntimeArgs, check_size_flags, load_input_image, push_common_params, read_latents,
    save_images,
};
use crate::metadata::GenerationParameters;

/// `diffusers controlnet`.
#[derive(Args, Debug)]
pub struct ControlNetArgs {
    /// A StableDiffusionControlNetPipeline folder or Hub id (model_index.json with a controlnet
    /// component), or, with --controlnet, any Stable Diffusion 1.x / 2.x diffusers folder or Hub
    /// id (stable-diffusion-v1-5/stable-diffusion-v1-5).
    #[arg(long)]
    pub model: String,

    /// A ControlNetModel folder or Hub id (lllyasviel/sd-controlnet-canny) to run with --model,
    /// replacing the folder's own ControlNet if it has one.
    #[arg(long)]
    pub controlnet: Option<String>,

    /// The control image (PNG or JPEG): edges, depth, pose, ... as the ControlNet was trained
    /// on. Taken in [0, 1], not normalised; resized to --height x --width when they are given.
    #[arg(long)]
    pub image: PathBuf,

    /// What to generate.
    #[arg(long)]
    pub prompt: String,

    /// What to steer away from. Empty by default, as diffusers.
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// Number of denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,

    /// Classifier-free guidance scale; 1 or less disables guidance.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,

    /// How strongly the ControlNet acts (controlnet_conditioning_scale), at least 0.
    #[arg(long, default_value_t = 1.0)]
    pub controlnet_conditioning_scale: f64,

    /// Guess mode: the ControlNet sees no prompt-free half and its residuals are scaled from
    /// 0.1 (shallow) to 1 (deep), so it recognises the content of the control image even
    /// without a prompt (diffusers recommends --guidance 3 to 5 with it).
    #[arg(long)]
    pub guess_mode: bool,

    /// Fraction of the steps after which the ControlNet starts acting, in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub control_guidance_start: f64,

    /// Fraction of the steps after which the ControlNet stops acting, in (start, 1].
    #[arg(long, default_value_t = 1.0)]
    pub control_guidance_end: f64,

    /// Scheduler: a diffusers class name or an A1111 name ("DPM++ 2M Karras", "UniPC"), built
    /// from the model's scheduler config. Defaults to the model's own.
    #[arg(long)]
    pub scheduler: Option<String>,

    /// Image height in pixels, a multiple of 8; the control image's height by default.
    #[arg(long)]
    pub height: Option<usize>,

    /// Image width in pixels, a multiple of 8; the control image's width by default.
    #[arg(long)]
    pub width: Option<usize>,

    /// Seed of the torch-compatible generator (diffusers'
    /// generator=torch.Generator().manual_seed(SEED)). Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Number of images (num_images_per_prompt); several are saved as one grid.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,

    /// Initial latents as a float32 .npy of shape [num_images, 4, height/8, width/8] instead of
    /// drawn noise (diffusers' latents=).
    #[arg(long)]
    pub latents: Option<PathBuf>,

    /// Skip this many final CLIP layers for the prompt embeddings.
    #[arg(long)]
    pub clip_skip: Option<usize>,

    /// DDIM's eta (0 is deterministic); used only by schedulers that take it.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,

    /// Columns of the grid when --num-images > 1; near-square by default.
    #[arg(long)]
    pub grid_cols: Option<usize>,

    #[command(flatten)]
    pub files: OutputArgs,

    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Every check that needs no model, so a mistake costs nothing and writes nothing.
fn check_flags(args: &ControlNetArgs) -> Result<Precision> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    check_size_flags(args.height, args.width)?;
    if !args.guidance.is_finite() {
        bail!("--guidance {}: must be a finite number", args.guidance);
    }
    let scale = args.controlnet_conditioning_scale;
    if !(scale.is_finite() && scale >= 0.0) {
        bail!("--controlnet-conditioning-scale {scale}: must be a finite number of at least 0");
    }
    let (start, end) = (args.control_guidance_start, args.control_guidance_end);
    if !(0.0..1.0).contains(&start) {
        bail!("--control-guidance-start {start}: must be in [0, 1)");
    }
    if !(end > 0.0 && end <= 1.0) {
        bail!("--control-guidance-end {end}: must be in (0, 1]");
    }
    if start >= end {
        bail!("--control-guidance-start {start} must be below --control-guidance-end {end}");
    }
    if Path::new(&args.model).is_file() {
        bail!(
            "--model {}: a single checkpoint file; the ControlNet command loads diffusers \
             folders or Hub ids",
            args.model
        );
    }
    args.files.check()?;
    args.runtime.precision()
}

/// Load the pipeline: a ControlNet pipeline folder, or a Stable Diffusion folder plus
/// `--controlnet`.
fn load(args: &ControlNetArgs) -> Result<StableDiffusionControlNetPipeline> {
    let device = args.runtime.device()?;
    let hub = args.runtime.hub();
    match &args.controlnet {
        Some(controlnet) => StableDiffusionControlNetPipeline::from_pretrained_with_controlnet(
            &args.model,
            controlnet,
            &hub,
            &device,
        )
        .with_context(|| format!("--model {} with --controlnet {controlnet}", args.model)),
        None => StableDiffusionControlNetPipeline::from_pretrained_with(&args.model, &hub, &device)
            .with_context(|| {
                format!(
                    "--model {} (a Stable Diffusion folder needs --controlnet)",
                    args.model
                )
            }),
    }
}

/// Run `diffusers controlnet`.
pub fn run(args: ControlNetArgs) -> Result<()> {
    let precision = check_flags(&args)?;
    let control = load_input_image(&args.image, "--image", None)?;
    let device = args.runtime.device()?;
    let latents = args
        .latents
        .as_deref()
        .map(|p| read_latents(p, &device))
        .transpose()?;
    let mut pipe = load(&args)?;
    if let Some(name) = &args.scheduler {
        pipe.components
            .set_scheduler(name)
            .with_context(|| format!("--scheduler {name}"))?;
    }
    if precision != Precision::F32 {
        pipe = pipe.to_dtype(precision.float_dtype())?;
    }
    let sampler = pipe.components.scheduler.kind().class_name();
    let out = pipe.call(StableDiffusionControlNetArgs {
        prompt: vec![args.prompt.clone()],
        negative_prompt: args.negative_prompt.clone().map(|n| vec![n]),
        image: Some(control.into()),
        height: args.height,
        width: args.width,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance,
        eta: args.eta,
        generator: args.seed.map(Generators::Seed).unwrap_or_default(),
        latents,
        num_images_per_prompt: args.num_images,
        output_type: OutputType::Np,
        controlnet_conditioning_scale: args.controlnet_conditioning_scale,
        guess_mode: args.guess_mode,
        control_guidance_start: args.control_guidance_start,
        control_guidance_end: args.control_guidance_end,
        clip_skip: args.clip_skip,
        progress: !args.runtime.quiet,
        ..Default::default()
    })?;

    let mut params = GenerationParameters {
        prompt: Some(args.prompt.clone()),
        negative_prompt: args.negative_prompt.clone(),
        ..GenerationParameters::default()
    };
    params.push("Steps", args.steps);
    params.push("Sampler", args.scheduler.as_deref().unwrap_or(sampler));
    params.push("CFG scale", args.guidance);
    push_common_params(&mut params, args.seed, &args.model, args.clip_skip);
    if let Some(controlnet) = &args.controlnet {
        params.push("ControlNet", controlnet);
    }
    params.push("Control image", args.image.display());
    params.push(
        "ControlNet conditioning scale",
        args.controlnet_conditioning_scale,
    );
    if args.guess_mode {
        params.push("Guess mode", "true");
    }
    if (args.control_guidance_start, args.control_guidance_end) != (0.0, 1.0) {
        params.push("Control guidance start", args.control_guidance_start);
        params.push("Control guidance end", args.control_guidance_end);
    }
    if args.eta != 0.0 {
        params.push("Eta", args.eta);
    }
    if precision != Precision::F32 {
        params.push("Dtype", &args.runtime.dtype);
    }
    if let Some(path) = &args.latents {
        params.push("Latents", path.display());
    }
    save_images(&args.files, args.grid_cols, out, params)
}
