//! `diffusers edit-cycle`: CycleDiffusionPipeline from the terminal. Describe the input image
//! with --source-prompt and the edit with --prompt; what the prompts share is kept.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::image::{ImageOutput, OutputType, RgbImage, load_image, nhwc_to_images};
use diffusion_core::{Precision, parse_device};
use diffusion_loaders::HubOptions;
use diffusion_pipelines::{
    CycleDiffusionArgs, CycleDiffusionPipeline, Generators, SingleFilePipelineOptions,
    StableDiffusionComponents,
};

use crate::metadata::GenerationParameters;
use crate::output;

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

    /// Where to write the PNG, with every generation parameter in its text metadata.
    #[arg(long, default_value = "output.png")]
    pub output: PathBuf,

    /// Also write the images as float32 NHWC in [0, 1] to this .npy file (diffusers'
    /// output_type="np").
    #[arg(long)]
    pub output_npy: Option<PathBuf>,

    /// Columns of the grid when --num-images > 1; near-square by default.
    #[arg(long)]
    pub grid_cols: Option<usize>,

    /// Device: cpu, or a GPU backend compiled into this build (cuda, cuda:1, wgpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Compute precision of the models: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// Weight variant to load where a component has it (fp16 reads *.fp16.safetensors).
    #[arg(long)]
    pub variant: Option<String>,

    /// Hub revision (branch, tag or commit) when --model is a Hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Hide the progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// Every check that needs no model, so a mistake costs nothing and writes nothing.
fn check_flags(args: &EditCycleArgs) -> Result<(Precision, Option<(usize, usize)>)> {
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
    for (flag, value) in [("--height", args.height), ("--width", args.width)] {
        if let Some(v) = value
            && (v == 0 || v % 8 != 0)
        {
            bail!("{flag} {v}: must be a positive multiple of 8");
        }
    }
    let size = match (args.height, args.width) {
        (Some(h), Some(w)) => Some((h, w)),
        (None, None) => None,
        _ => bail!("give both --height and --width, or neither"),
    };
    if args.config.is_some() && !Path::new(&args.model).is_file() {
        bail!(
            "--config {}: only used with a single-file --model",
            args.config.as_deref().unwrap_or_default()
        );
    }
    output::check_png_path(&args.output)?;
    if let Some(npy) = &args.output_npy {
        output::check_parent(npy, "--output-npy")?;
    }
    let precision = args
        .dtype
        .parse::<Precision>()
        .with_context(|| format!("--dtype {}", args.dtype))?;
    Ok((precision, size))
}

fn load_input_image(path: &Path, size: Option<(usize, usize)>) -> Result<RgbImage> {
    let image = load_image(path).with_context(|| format!("--image {}", path.display()))?;
    Ok(match size {
        Some((h, w)) if (image.height() as usize, image.width() as usize) != (h, w) => {
            image::imageops::resize(
                &image,
                w as u32,
                h as u32,
                image::imageops::FilterType::Lanczos3,
            )
        }
        _ => image,
    })
}

fn load_components(args: &EditCycleArgs) -> Result<StableDiffusionComponents> {
    let device = parse_device(&args.device).with_context(|| format!("--device {}", args.device))?;
    let hub = HubOptions {
        revision: args.revision.clone(),
        variant: args.variant.clone(),
        progress: !args.quiet,
        ..HubOptions::default()
    };
    let path = Path::new(&args.model);
    let mut components = if path.is_file() {
        let options = SingleFilePipelineOptions {
            config: args.config.clone(),
            hub,
            ..Default::default()
        };
        StableDiffusionComponents::from_single_file(path, &options, &device)
    } else {
        StableDiffusionComponents::from_pretrained_with(&args.model, &hub, &device)
    }
    .with_context(|| format!("--model {}", args.model))?;
    if components.scheduler.as_ddim().is_none() {
        // diffusers' recipe: DDIMScheduler.from_pretrained(model, subfolder="scheduler").
        components
            .set_scheduler("DDIMScheduler")
            .context("the model's scheduler config as a DDIMScheduler")?;
    }
    Ok(components)
}

/// Run `diffusers edit-cycle`.
pub fn run(args: EditCycleArgs) -> Result<()> {
    let (precision, size) = check_flags(&args)?;
    let input = load_input_image(&args.image, size)?;
    let mut components = load_components(&args)?;
    if precision != Precision::F32 {
        components = components.to_dtype(precision.float_dtype())?;
    }
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
        progress: !args.quiet,
        ..Default::default()
    })?;
    let ImageOutput::Array(array) = out.images else {
        bail!("the pipeline did not return an array");
    };

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
    params.push(
        "Seed",
        args.seed
            .map(|s| s.to_string())
            .unwrap_or_else(|| "random".into()),
    );
    params.push("Model", &args.model);
    if let Some(skip) = args.clip_skip {
        // A1111 counts the last layer as clip skip 1.
        params.push("Clip skip", skip + 1);
    }
    if precision != Precision::F32 {
        params.push("Dtype", &args.dtype);
    }
    params.push("Init image", args.image.display());
    let images = nhwc_to_images(&array);
    if let [_, h, w, _] = array.shape[..] {
        params.push("Size", format!("{w}x{h}"));
    }
    if images.len() > 1 {
        params.push("Batch size", images.len());
    }
    if out.interrupted {
        params.push("Interrupted", "true");
    }
    let image = output::grid(&images, args.grid_cols)?;
    output::write(
        &args.output,
        &image,
        args.output_npy.as_deref().map(|p| (p, &array)),
        &params,
        images.len(),
    )
}
