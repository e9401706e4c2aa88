//! `diffusers edit-pix2pix-zero`: StableDiffusionPix2PixZeroPipeline from the terminal. The
//! edit direction is the mean embedding of the --target-prompt captions minus that of the
//! --source-prompt captions; with --image the image is first inverted under its --caption.
//! --invert-only stops after the inversion and writes the inverted latents.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType, RgbImage, load_image, nhwc_to_images};
use diffusion_core::npy::NpyArray;
use diffusion_core::tensor::{from_vec, to_vec};
use diffusion_core::{Precision, parse_device};
use diffusion_loaders::HubOptions;
use diffusion_pipelines::{
    Generators, Pix2PixZeroInvertArgs, SingleFilePipelineOptions, StableDiffusionComponents,
    StableDiffusionPix2PixZeroArgs, StableDiffusionPix2PixZeroPipeline,
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

    /// Where to write the PNG, with every generation parameter in its text metadata.
    #[arg(long, default_value = "output.png")]
    pub output: PathBuf,

    /// Also write the image as float32 NHWC in [0, 1] to this .npy file (diffusers'
    /// output_type="np").
    #[arg(long)]
    pub output_npy: Option<PathBuf>,

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

/// What the flags ask for, checked and read before any model is loaded.
struct Plan {
    precision: Precision,
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
    output::check_png_path(&args.output)?;
    if let Some(npy) = &args.output_npy {
        check_extension(npy, "npy", "--output-npy")?;
    }
    if let Some(npy) = &args.output_latents {
        check_extension(npy, "npy", "--output-latents")?;
    }
    let precision = args
        .dtype
        .parse::<Precision>()
        .with_context(|| format!("--dtype {}", args.dtype))?;

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
        .map(|path| load_input_image(path, size))
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
        size,
        input,
        latents,
        prompt,
        source,
        target,
    })
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

fn load_pipeline(
    args: &EditPix2PixZeroArgs,
    precision: Precision,
) -> Result<StableDiffusionPix2PixZeroPipeline> {
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
        // diffusers' recipe: DDIMScheduler.from_config(pipeline.scheduler.config).
        components
            .set_scheduler("DDIMScheduler")
            .context("the model's scheduler config as a DDIMScheduler")?;
    }
    if precision != Precision::F32 {
        components = components.to_dtype(precision.float_dtype())?;
    }
    Ok(StableDiffusionPix2PixZeroPipeline::from_parts(components)?)
}

fn latents_array(latents: Tensor<4>) -> NpyArray {
    NpyArray {
        shape: latents.dims().to_vec(),
        data: to_vec(latents),
    }
}

/// Run `diffusers edit-pix2pix-zero`.
pub fn run(args: EditPix2PixZeroArgs) -> Result<()> {
    let plan = check_flags(&args)?;
    let mut pipe = load_pipeline(&args, plan.precision)?;
    let device = pipe.components.device()?;
    let generator = || args.seed.map(Generators::Seed).unwrap_or_default();
    let mut params = GenerationParameters::default();

    let mut inverted = None;
    if let (Some(image), Some(caption)) = (plan.input.clone(), &args.caption) {
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
            progress: !args.quiet,
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
        let latents = match (inverted, plan.latents) {
            (Some(out), _) => Some(out.latents),
            (None, Some(array)) => {
                let shape: [usize; 4] = array.shape.as_slice().try_into()?;
                Some(from_vec(array.data, shape, &device))
            }
            (None, None) => None,
        };
        let prompt = plan.prompt.clone().unwrap_or_default();
        let source = pipe.get_embeds(&plan.source, 16)?;
        let target = pipe.get_embeds(&plan.target, 16)?;
        let (height, width) = match plan.size {
            Some((h, w)) => (Some(h), Some(w)),
            None => (None, None),
        };
        let out = pipe.call(StableDiffusionPix2PixZeroArgs {
            prompt: vec![prompt.clone()],
            source_embeds: Some(source),
            target_embeds: Some(target),
            height,
            width,
            num_inference_steps: args.steps,
            guidance_scale: args.guidance,
            negative_prompt: args.negative_prompt.clone().map(|n| vec![n]),
            generator: generator(),
            latents,
            cross_attention_guidance_amount: args.cross_attention_guidance,
            output_type: OutputType::Np,
            progress: !args.quiet,
            ..Default::default()
        })?;
        let ImageOutput::Array(array) = out.images else {
            bail!("the pipeline did not return an array");
        };
        params.prompt = Some(prompt);
        params.negative_prompt = args.negative_prompt.clone();
        params.push("Source prompts", format!("\"{}\"", plan.source.join(" | ")));
        params.push("Target prompts", format!("\"{}\"", plan.target.join(" | ")));
        params.push("Steps", args.steps);
        params.push("Sampler", "DDIMScheduler");
        params.push("CFG scale", args.guidance);
        params.push("Cross-attention guidance", args.cross_attention_guidance);
        if let Some(path) = &args.latents {
            params.push("Latents", path.display());
        }
        (array, latents_out)
    };
    params.push(
        "Seed",
        args.seed
            .map(|s| s.to_string())
            .unwrap_or_else(|| "random".into()),
    );
    params.push("Model", &args.model);
    if plan.precision != Precision::F32 {
        params.push("Dtype", &args.dtype);
    }
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
        &args.output,
        &image,
        args.output_npy.as_deref().map(|p| (p, &array)),
        &params,
        images.len(),
    )
}
