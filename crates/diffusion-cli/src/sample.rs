//! `diffusers sample`: unconditional generation with DDPMPipeline or DDIMPipeline.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::image::{ImageOutput, OutputType, nhwc_to_images};
use diffusion_core::{Device, parse_device};
use diffusion_loaders::{HubOptions, resolve_model_dir};
use diffusion_pipelines::{DDIMPipeline, DDPMPipeline, Generators, UnconditionalArgs};
use diffusion_schedulers::{AnyScheduler, SchedulerKind, SchedulerSpec};

use crate::metadata::GenerationParameters;

/// The model trained by this project, shipped in the repository.
const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/ddpm-digits");

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A diffusers pipeline folder (model_index.json, unet/, scheduler/) or a Hub id
    /// (owner/name, fetched into the standard Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache
    /// only). Defaults to the digits model shipped with this project.
    #[arg(long)]
    pub model: Option<String>,

    /// Scheduler to sample with: any diffusers class name this port has (DDPMScheduler,
    /// DDIMScheduler, PNDMScheduler, LMSDiscreteScheduler, EulerDiscreteScheduler,
    /// EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler,
    /// KDPM2AncestralDiscreteScheduler, DPMSolverMultistepScheduler,
    /// DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, ...) or an
    /// A1111 name ("DDIM", "Euler", "Euler a", "DPM++ 2M Karras", "DPM2 a", "UniPC", ...).
    /// Built from the model's scheduler config, as diffusers' from_config. Defaults to the model's
    /// own scheduler.
    #[arg(long)]
    pub scheduler: Option<String>,

    /// Number of denoising steps. Defaults to 1000 for DDPM and 50 for DDIM, as diffusers.
    #[arg(long)]
    pub steps: Option<usize>,

    /// Seed of the torch-compatible generator: the same seed gives the same images as diffusers
    /// with `generator=torch.Generator().manual_seed(SEED)`. Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Number of images (the pipeline's batch_size); several are saved as one grid.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,

    /// DDIM's eta: 0 is deterministic DDIM, 1 adds DDPM-like noise. DDIM only.
    #[arg(long)]
    pub eta: Option<f64>,

    /// Where to write the PNG (a grid when --num-images > 1), with the generation parameters in
    /// its text metadata.
    #[arg(long, default_value = "samples.png")]
    pub output: PathBuf,

    /// Also write the images as float32 NHWC in [0, 1] (diffusers' output_type="np") to this
    /// .npy file.
    #[arg(long)]
    pub output_npy: Option<PathBuf>,

    /// Enlarge each image N times (nearest neighbour) in the PNG; the .npy keeps the model's
    /// resolution. Defaults to the smallest factor that makes images at least 64 pixels wide,
    /// so tiny models (the bundled 8x8 digits) stay visible.
    #[arg(long)]
    pub upscale: Option<u32>,

    /// Columns of the grid; defaults to a near-square layout.
    #[arg(long)]
    pub grid_cols: Option<usize>,

    /// Device: cpu, or a GPU backend compiled into this build (cuda, cuda:1, wgpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Hub revision (branch, tag or commit) when --model is a Hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: SampleArgs) -> Result<()> {
    if args.upscale == Some(0) {
        bail!("--upscale must be at least 1");
    }
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    crate::output::check_png_path(&args.output)?;
    if let Some(npy) = &args.output_npy {
        crate::output::check_parent(npy, "--output-npy")?;
    }
    let device: Device = parse_device(&args.device)?;
    let model_name = args
        .model
        .clone()
        .unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let hub = HubOptions {
        revision: args.revision.clone(),
        progress: !args.quiet,
        ..HubOptions::default()
    };
    let dir =
        resolve_model_dir(&model_name, &hub).with_context(|| format!("--model {model_name}"))?;

    let mut pipe = DDPMPipeline::from_pretrained(&dir, &device)
        .with_context(|| format!("loading {}", dir.display()))?;
    if let Some(name) = &args.scheduler {
        let spec = SchedulerSpec::parse(name).context("--scheduler")?;
        pipe.scheduler = AnyScheduler::convert(&pipe.scheduler, &spec).context("--scheduler")?;
    }
    let kind = pipe.scheduler.kind();
    if args.eta.is_some() && kind != SchedulerKind::Ddim {
        bail!(
            "--eta only applies to the DDIM scheduler (this run uses {})",
            kind.class_name()
        );
    }
    let generator = args.seed.map(Generators::Seed).unwrap_or_default();
    let call = UnconditionalArgs {
        batch_size: args.num_images,
        generator: generator.clone(),
        num_inference_steps: args.steps,
        eta: args.eta,
        output_type: OutputType::Np,
        progress: !args.quiet,
        ..UnconditionalArgs::default()
    };
    let (output, steps) = if kind == SchedulerKind::Ddim {
        let mut ddim = DDIMPipeline::from_parts(pipe.unet, pipe.scheduler)?;
        let steps = call
            .num_inference_steps
            .unwrap_or(DDIMPipeline::DEFAULT_STEPS);
        (ddim.call(call)?, steps)
    } else {
        let steps = call
            .num_inference_steps
            .unwrap_or(DDPMPipeline::DEFAULT_STEPS);
        (pipe.call(call)?, steps)
    };
    let ImageOutput::Array(array) = output.images else {
        bail!("the pipeline did not return an array");
    };

    let mut params = GenerationParameters::default();
    params.push("Steps", steps);
    params.push("Sampler", kind.class_name());
    params.push(
        "Seed",
        generator
            .seeds()
            .map(|s| s[0].to_string())
            .unwrap_or("random".into()),
    );
    params.push("Size", format!("{}x{}", array.shape[2], array.shape[1]));
    params.push("Batch size", args.num_images);
    if let Some(eta) = args.eta {
        params.push("Eta", eta);
    }
    params.push("Model", display_model(&model_name));

    let side = array.shape[2].max(1) as u32;
    let upscale = args.upscale.unwrap_or_else(|| 64u32.div_ceil(side)).max(1);
    let images: Vec<_> = nhwc_to_images(&array)
        .into_iter()
        .map(|img| {
            let (w, h) = img.dimensions();
            image::imageops::resize(
                &img,
                w * upscale,
                h * upscale,
                image::imageops::FilterType::Nearest,
            )
        })
        .collect();
    if upscale > 1 {
        params.push("Upscale", upscale);
    }
    let grid = crate::output::grid(&images, args.grid_cols)?;
    crate::output::write(
        &args.output,
        &grid,
        args.output_npy.as_deref().map(|p| (p, &array)),
        &params,
        images.len(),
    )
}

fn display_model(name: &str) -> String {
    if name == DEFAULT_MODEL {
        return "ddpm-digits (bundled)".into();
    }
    Path::new(name).display().to_string()
}
