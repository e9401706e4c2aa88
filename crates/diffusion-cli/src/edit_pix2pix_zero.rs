//! `diffusers edit-pix2pix-zero`: StableDiffusionPix2PixZeroPipeline from the terminal. The
//! edit direction is the mean embedding of the --target-prompt captions minus that of the
//! --source-prompt captions; with --image the image is first inverted under its --caption.
//! --invert-only stops after the inversion and writes the inverted latents.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::Precision;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType, RgbImage, nhwc_to_images};
use diffusion_core::npy::NpyArray;
use diffusion_core::tensor::{from_vec, to_vec};
use diffusion_pipelines::{
    Generators, Pix2PixZeroInvertArgs, StableDiffusionPix2PixZeroArgs,
    StableDiffusionPix2PixZeroPipeline,
};

use crate::generate::{
    AdapterArgs, AdapterPlan, OutputArgs, RuntimeArgs, check_config, check_size_flags,
    load_input_image, load_sd_for_edit, push_common_params, requested_size,
};
use crate::metadata::GenerationParameters;
use crate::output;

/// `diffusers edit-pix2pix-zero`.
#[derive(Args, Debug)]
pub struct EditPix2PixZeroArgs {
    /// A Stable Diffusion 1.x / 2.x diffusers folder, Hub id (CompVis/stable-diffusion-v1-4) or
    /// single checkpoint file (.safetensors / .ckpt). Its scheduler config is run as a
    /// DDIMScheduler for the edit and a DDIMInverseScheduler for the inversion.
    #[arg(long)]
    pub model: String,

    /// For a single-file --model: the diffusers folder or Hub id whose tokenizer and scheduler
    /// config complete it (diffusers' config=).
    #[arg(long)]
    pub config: Option<String>,

    /// A real image to edit (PNG or JPEG): it is inverted to noise under --caption first, and
    /// the edit starts from that noise. Without it, the edit starts from seeded noise.
    #[arg(long)]
    pub image: Option<PathBuf>,

    /// What --image shows ("a photo of a cat on a sofa"); required with --image (no captioning
    /// model is bundled).
    #[arg(long)]
    pub caption: Option<String>,

    /// The prompt of the edit, naming the source concept ("a painting of a cat"). Defaults to
    /// --caption; required without --image.
    #[arg(long)]
    pub prompt: Option<String>,

    /// A caption with the source concept ("a cat sitting on the street"). Repeat the flag to
    /// average several, as the paper does.
    #[arg(long = "source-prompt", value_name = "TEXT")]
    pub source_prompts: Vec<String>,

    /// A text file of source captions, one per line (blank lines and lines starting with # are
    /// skipped). Repeatable; adds to --source-prompt.
    #[arg(long = "source-prompts-file", value_name = "FILE")]
    pub source_files: Vec<PathBuf>,

    /// A caption with the target concept ("a dog sitting on the street"). Repeatable.
    #[arg(long = "target-prompt", value_name = "TEXT")]
    pub target_prompts: Vec<String>,

    /// A text file of target captions, one per line. Repeatable; adds to --target-prompt.
    #[arg(long = "target-prompts-file", value_name = "FILE")]
    pub target_files: Vec<PathBuf>,

    /// Step size of the gradient step that pulls each step's cross-attention maps towards the
    /// unedited ones (keeps the structure); 0 turns it off. diffusers' default is 0.1; its
    /// examples use 0.15 (0.01 or less for v-prediction models such as SD 2).
    #[arg(long, default_value_t = 0.1)]
    pub cross_attention_guidance: f64,

    /// What to steer away from. Empty by default, as diffusers; its real-image example passes
    /// the caption.
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// Denoising steps of the edit.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,

    /// Classifier-free guidance scale of the edit.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,

    /// Inverse DDIM steps of the inversion (default: --steps).
    #[arg(long)]
    pub invert_steps: Option<usize>,

    /// Classifier-free guidance scale of the inversion (1: none, diffusers' default).
    #[arg(long, default_value_t = 1.0)]
    pub invert_guidance: f64,

    /// Weight of the inversion's auto-correlation regulariser (0 turns it off).
    #[arg(long, default_value_t = 20.0)]
    pub lambda_auto_corr: f64,

    /// Weight of the inversion's KL regulariser (0 turns it off).
    #[arg(long, default_value_t = 20.0)]
    pub lambda_kl: f64,

    /// Regularisation rounds per inversion step.
    #[arg(long, default_value_t = 5)]
    pub num_reg_steps: usize,

    /// Auto-correlation gradient steps per round.
    #[arg(long, default_value_t = 5)]
    pub num_auto_corr_rolls: usize,

    /// Start the edit from these latents (a float32 .npy [1, 4, height/8, width/8], e.g. written
    /// by --output-latents) instead of inverting an image or drawing noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,

    /// Seed of the torch-compatible generator, for the inversion's VAE sample and rolls and for
    /// the edit's noise (diffusers' generator=torch.Generator().manual_seed(SEED)). Random when
    /// absent.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Image height (a multiple of 8): --image is resized to it; without --image, the size of
    /// the generated image. Defaults to the image's own size, or the UNet's sample size.
    #[arg(long)]
    pub height: Option<usize>,

    /// Image width (a multiple of 8); give both or neither.
    #[arg(long)]
    pub width: Option<usize>,

    /// Only invert --image: write the inverted latents to --output-latents and the decoded
    /// inversion to --output.
    #[arg(long)]
    pub invert_only: bool,

    /// Write the inverted latents as a float32 .npy [1, 4, height/8, width/8].
    #[arg(long)]
    pub output_latents: Option<PathBuf>,

    #[command(flatten)]
    pub files: OutputArgs,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    // LoRA and textual inversion act on the UNet and text encoder; Pix2Pix Zero takes no image
    // embeddings, so the IP-Adapter flags are refused.
    #[command(flatten)]
    pub adapters: AdapterArgs,
}

/// What the flags ask for, checked and read before any model is loaded.
struct Plan {
    precision: Precision,
    adapters: AdapterPlan,
    size: Option<(usize, usize)>,
    input: Option<RgbImage>,
    latents: Option<NpyArray>,
    prompt: Option<String>,
    source: Vec<String>,
    target: Vec<String>,
}

/// Captions given on the command line, then those of the files, in order.
fn captions(inline: &[String], files: &[PathBuf], flag: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = inline.to_vec();
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("{flag} {}", file.display()))?;
        let before = out.len();
        out.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
        if out.len() == before {
            bail!("{flag} {}: no captions in the file", file.display());
        }
    }
    Ok(out)
}

fn check_extension(path: &Path, ext: &str, flag: &str) -> Result<()> {
    let ok = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext));
    if !ok {
        bail!("{flag} {}: must be a .{ext} file", path.display());
    }
    output::check_parent(path, flag)
}

/// Every check that needs no model, so a mistake costs nothing and writes nothing.
fn check_flags(args: &EditPix2PixZeroArgs) -> Result<Plan> {
    args.adapters
        .refuse_ip_adapter("StableDiffusionPix2PixZeroPipeline")?;
    let adapters = args.adapters.check()?;
    if args.steps == 0 || args.invert_steps == Some(0) {
        bail!("--steps and --invert-steps must be at least 1");
    }
    for (flag, value) in [
        ("--guidance", args.guidance),
        ("--invert-guidance", args.invert_guidance),
        ("--cross-attention-guidance", args.cross_attention_guidance),
    ] {
        if !value.is_finite() {
            bail!("{flag} {value}: must be a finite number");
        }
    }
    for (flag, value) in [
        ("--lambda-auto-corr", args.lambda_auto_corr),
        ("--lambda-kl", args.lambda_kl),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            bail!("{flag} {value}: must be a finite weight >= 0");
        }
    }
    check_size_flags(args.height, args.width)?;
    let size = requested_size(args.height, args.width)?;
    check_config(&args.model, args.config.as_deref())?;
    if args.image.is_some() && args.caption.is_none() {
        bail!(
            "--image needs --caption, what the image shows (it is inverted under that caption; \
             no captioning model is bundled)"
        );
    }
    if args.image.is_none() && args.caption.is_some() {
        bail!("--caption describes --image: give the image too, or use --prompt");
    }
    if args.latents.is_some() && args.image.is_some() {
        bail!("--latents and --image both give the starting point: give one");
    }
    if args.output_latents.is_some() && args.image.is_none() {
        bail!("--output-latents writes the inversion of --image: give --image");
    }
    if args.invert_only {
        if args.image.is_none() || args.output_latents.is_none() {
            bail!("--invert-only needs --image (with --caption) and --output-latents");
        }
        let unused = [
            ("--source-prompt", !args.source_prompts.is_empty()),
            ("--source-prompts-file", !args.source_files.is_empty()),
            ("--target-prompt", !args.target_prompts.is_empty()),
            ("--target-prompts-file", !args.target_files.is_empty()),
            ("--prompt", args.prompt.is_some()),
            ("--negative-prompt", args.negative_prompt.is_some()),
        ];
        if let Some((flag, _)) = unused.iter().find(|(_, given)| *given) {
            bail!("{flag}: not used with --invert-only");
        }
    }
    args.files.check()?;
    if let Some(npy) = &args.files.output_npy {
        check_extension(npy, "npy", "--output-npy")?;
    }
    if let Some(npy) = &args.output_latents {
        check_extension(npy, "npy", "--output-latents")?;
    }
    let precision = args.runtime.precision()?;

    let (source, target, prompt) = if args.invert_only {
        (Vec::new(), Vec::new(), None)
    } else {
        let source = captions(
            &args.source_prompts,
            &args.source_files,
            "--source-prompts-file",
        )?;
        let target = captions(
            &args.target_prompts,
            &args.target_files,
            "--target-prompts-file",
        )?;
        if source.is_empty() || target.is_empty() {
            bail!(
                "give the edit direction: at least one --source-prompt (or \
                 --source-prompts-file) and one --target-prompt (or --target-prompts-file)"
            );
        }
        let prompt = args.prompt.clone().or_else(|| args.caption.clone());
        if prompt.is_none() {
            bail!("--prompt is required without --image (it names the source concept)");
        }
        (source, target, prompt)
    };
    let input = args
        .image
        .as_deref()
        .map(|path| load_input_image(path, "--image", size))
        .transpose()?;
    let latents = match &args.latents {
        Some(path) => {
            let array =
                NpyArray::read(path).with_context(|| format!("--latents {}", path.display()))?;
            if array.shape.len() != 4 || array.shape[0] != 1 {
                bail!(
                    "--latents {}: expected an array [1, channels, height/8, width/8], got \
                     shape {:?}",
                    path.display(),
                    array.shape
                );
            }
            Some(array)
        }
        None => None,
    };
    Ok(Plan {
        precision,
        adapters,
        size,
        input,
        latents,
        prompt,
        source,
        target,
    })
}

fn latents_array(latents: Tensor<4>) -> NpyArray {
    NpyArray {
        shape: latents.dims().to_vec(),
        data: to_vec(latents),
    }
}

/// Run `diffusers edit-pix2pix-zero`.
pub fn run(args: EditPix2PixZeroArgs) -> Result<()> {
    let Plan {
        precision,
        adapters: adapter_plan,
        size,
        input,
        latents: latents_in,
        prompt,
        source,
        target,
    } = check_flags(&args)?;
    // diffusers' recipe: DDIMScheduler.from_config(pipeline.scheduler.config).
    let (components, adapters) = load_sd_for_edit(
        &args.model,
        args.config.as_deref(),
        &args.runtime,
        (&args.adapters, adapter_plan),
        precision,
        "edit-pix2pix-zero",
    )?;
    let mut pipe = StableDiffusionPix2PixZeroPipeline::from_parts(components)?;
    let device = pipe.components.device()?;
    let generator = || args.seed.map(Generators::Seed).unwrap_or_default();
    let mut params = GenerationParameters::default();

    let mut inverted = None;
    if let (Some(image), Some(caption)) = (input, &args.caption) {
        let out = pipe.invert(Pix2PixZeroInvertArgs {
            prompt: vec![caption.clone()],
            image: Some(image.into()),
            num_inference_steps: args.invert_steps.unwrap_or(args.steps),
            guidance_scale: args.invert_guidance,
            generator: generator(),
            output_type: if args.invert_only {
                OutputType::Np
            } else {
                OutputType::Latent
            },
            lambda_auto_corr: args.lambda_auto_corr,
            lambda_kl: args.lambda_kl,
            num_reg_steps: args.num_reg_steps,
            num_auto_corr_rolls: args.num_auto_corr_rolls,
            progress: !args.runtime.quiet,
            ..Default::default()
        })?;
        params.push("Caption", format!("\"{caption}\""));
        params.push("Inversion steps", args.invert_steps.unwrap_or(args.steps));
        params.push("Inversion CFG scale", args.invert_guidance);
        params.push("Lambda auto-corr", args.lambda_auto_corr);
        params.push("Lambda KL", args.lambda_kl);
        params.push("Regularisation steps", args.num_reg_steps);
        params.push("Auto-corr rolls", args.num_auto_corr_rolls);
        if let Some(path) = &args.image {
            params.push("Init image", path.display());
        }
        inverted = Some(out);
    }

    let (array, latents_out) = if args.invert_only {
        let Some(out) = inverted else {
            bail!("--invert-only needs --image");
        };
        let ImageOutput::Array(array) = out.images else {
            bail!("the pipeline did not return an array");
        };
        (array, Some(latents_array(out.latents)))
    } else {
        let latents_out = inverted.as_ref().map(|o| latents_array(o.latents.clone()));
        let latents = match (inverted, latents_in) {
            (Some(out), _) => Some(out.latents),
            (None, Some(array)) => {
                let shape: [usize; 4] = array.shape.as_slice().try_into()?;
                Some(from_vec(array.data, shape, &device))
            }
            (None, None) => None,
        };
        let prompt = prompt.unwrap_or_default();
        let source_embeds = pipe.get_embeds(&source, 16)?;
        let target_embeds = pipe.get_embeds(&target, 16)?;
        let (height, width) = match size {
            Some((h, w)) => (Some(h), Some(w)),
            None => (None, None),
        };
        let out = pipe.call(StableDiffusionPix2PixZeroArgs {
            prompt: vec![prompt.clone()],
            source_embeds: Some(source_embeds),
            target_embeds: Some(target_embeds),
            height,
            width,
            num_inference_steps: args.steps,
            guidance_scale: args.guidance,
            negative_prompt: args.negative_prompt.clone().map(|n| vec![n]),
            generator: generator(),
            latents,
            cross_attention_guidance_amount: args.cross_attention_guidance,
            output_type: OutputType::Np,
            progress: !args.runtime.quiet,
            ..Default::default()
        })?;
        let ImageOutput::Array(array) = out.images else {
            bail!("the pipeline did not return an array");
        };
        params.prompt = Some(prompt);
        params.negative_prompt = args.negative_prompt.clone();
        params.push("Source prompts", format!("\"{}\"", source.join(" | ")));
        params.push("Target prompts", format!("\"{}\"", target.join(" | ")));
        params.push("Steps", args.steps);
        params.push("Sampler", "DDIMScheduler");
        params.push("CFG scale", args.guidance);
        params.push("Cross-attention guidance", args.cross_attention_guidance);
        if let Some(path) = &args.latents {
            params.push("Latents", path.display());
        }
        (array, latents_out)
    };
    push_common_params(&mut params, args.seed, &args.model, None);
    if precision != Precision::F32 {
        params.push("Dtype", &args.runtime.dtype);
    }
    adapters.push_params(&args.adapters, &mut params);
    let images = nhwc_to_images(&array);
    if let [_, h, w, _] = array.shape[..] {
        params.push("Size", format!("{w}x{h}"));
    }
    let image = output::grid(&images, None)?;
    if let (Some(path), Some(latents)) = (&args.output_latents, &latents_out) {
        latents.write(path)?;
        eprintln!("wrote {}", path.display());
    }
    output::write(
        &args.files.output,
        &image,
        args.files.output_npy.as_deref().map(|p| (p, &array)),
        &params,
        images.len(),
    )
}
