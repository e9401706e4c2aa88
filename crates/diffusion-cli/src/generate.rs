//! `diffusers txt2img`, `img2img` and `inpaint`: the Stable Diffusion pipelines from the
//! terminal, with diffusers' defaults and the flags that scripts rely on.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType, RgbImage, load_image, nhwc_to_images};
use diffusion_core::npy::NpyArray;
use diffusion_core::tensor::from_vec;
use diffusion_core::{Device, ModelIndex, Precision, parse_device};
use diffusion_loaders::single_file::SingleFileCheckpoint;
use diffusion_loaders::{HubOptions, resolve_model_dir};
use diffusion_pipelines::{
    AltDiffusionComponents, AltDiffusionImg2ImgPipeline, AltDiffusionPipeline, Generators,
    IPAdapterArgs, ImagePipelineOutput, SingleFilePipelineOptions, StableDiffusionArgs,
    StableDiffusionComponents, StableDiffusionImg2ImgArgs, StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintArgs, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
    StableDiffusionXLArgs, StableDiffusionXLComponents, StableDiffusionXLImg2ImgArgs,
    StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintArgs,
    StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline,
};

use crate::metadata::GenerationParameters;
use crate::output;

/// The flags every Stable Diffusion command shares.
#[derive(Args, Debug)]
pub struct GenerationArgs {
    /// A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/), a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (fetched into
    /// the standard Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache only), or a single
    /// checkpoint file in the original layout (.safetensors or .ckpt, as model sites share
    /// them; .ckpt files are read without running any code). SD 1.x, SD 2.x and SDXL (base,
    /// refiner, inpainting) are recognised.
    #[arg(long)]
    pub model: String,

    /// For a single-file --model: the diffusers folder or Hub id whose tokenizers and scheduler
    /// config complete it (diffusers' config=). Defaults to the reference repository of the
    /// detected model type (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), of which only
    /// configs and tokenizers are fetched.
    #[arg(long)]
    pub config: Option<String>,

    /// What to generate.
    #[arg(long)]
    pub prompt: String,

    /// What to steer away from (classifier-free guidance's unconditional prompt). Empty by
    /// default, as diffusers.
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// Number of denoising steps (for img2img/inpaint, of the full schedule: strength × steps
    /// are run).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,

    /// Classifier-free guidance scale; 1 or less disables guidance (one UNet pass per step).
    /// Defaults to the pipeline's own default, as diffusers (7.5 for SD, 5.0 for SDXL
    /// text-to-image and image-to-image, 7.5 for SDXL inpainting).
    #[arg(long)]
    pub guidance: Option<f64>,

    /// Scheduler: a diffusers class name (EulerDiscreteScheduler, DPMSolverMultistepScheduler,
    /// ...) or an A1111 name ("Euler a", "DPM++ 2M Karras", "DDIM", "UniPC", ...), built from the
    /// model's scheduler config as diffusers' from_config. Defaults to the model's own.
    #[arg(long)]
    pub scheduler: Option<String>,

    /// Image height in pixels, a multiple of 8. Defaults to the UNet's sample_size × 8 (512 for
    /// SD 1.5). For img2img, the input image is resized to it.
    #[arg(long)]
    pub height: Option<usize>,

    /// Image width in pixels, a multiple of 8. Defaults as --height.
    #[arg(long)]
    pub width: Option<usize>,

    /// Seed of the torch-compatible generator: the same seed gives the same images as diffusers
    /// with generator=torch.Generator().manual_seed(SEED). Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Number of images (num_images_per_prompt); several are saved as one grid.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,

    /// Initial latents as a float32 .npy of shape [num_images, 4, height/8, width/8], used
    /// instead of drawing noise (diffusers' latents=).
    #[arg(long)]
    pub latents: Option<PathBuf>,

    #[command(flatten)]
    pub files: OutputArgs,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub adapters: AdapterArgs,

    /// Skip this many final CLIP layers for the prompt embeddings (A1111's "Clip skip" minus 1).
    #[arg(long)]
    pub clip_skip: Option<usize>,

    /// DDIM's eta (0 is deterministic); used only by schedulers that take it.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,

    /// Columns of the grid when --num-images > 1; near-square by default.
    #[arg(long)]
    pub grid_cols: Option<usize>,
}

/// Where a command writes what it generated.
#[derive(Args, Debug)]
pub struct OutputArgs {
    /// Where to write the PNG (a grid when there are several images), with every generation
    /// parameter in its text metadata (an A1111-style "parameters" chunk).
    #[arg(long, default_value = "output.png")]
    pub output: PathBuf,

    /// Also write the images as float32 NHWC in [0, 1] to this .npy file: exactly diffusers'
    /// output_type="np".
    #[arg(long)]
    pub output_npy: Option<PathBuf>,
}

impl OutputArgs {
    /// Fail before any model is loaded when `--output` or `--output-npy` cannot be written.
    pub(crate) fn check(&self) -> Result<()> {
        output::check_png_path(&self.output)?;
        if let Some(npy) = &self.output_npy {
            output::check_parent(npy, "--output-npy")?;
        }
        Ok(())
    }
}

/// How a model is fetched and run: the flags every command that loads a Stable Diffusion model
/// shares.
#[derive(Args, Debug)]
pub struct RuntimeArgs {
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

/// The adapter flags (LoRA, textual inversion, IP-Adapter) of every command that runs a Stable
/// Diffusion pipeline.
#[derive(Args, Debug)]
pub struct AdapterArgs {
    /// A LoRA to apply, with an optional weight after a colon (style.safetensors:0.8; default
    /// 1): a .safetensors file in diffusers/PEFT or kohya/A1111 format, or a folder or Hub id
    /// (owner/name) holding pytorch_lora_weights.safetensors or a single .safetensors file. Repeat the flag to combine several, as diffusers'
    /// set_adapters.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,

    /// A textual-inversion embedding to load (diffusers learned_embeds, A1111 or SDXL
    /// two-table .safetensors, or a diffusers .bin), optionally with the token to bind it to
    /// after a colon (style.safetensors:<my-style>); by default the token stored in the file,
    /// else the file name. Use the token in --prompt or --negative-prompt. Repeatable.
    #[arg(long = "textual-inversion", value_name = "FILE[:TOKEN]")]
    pub textual_inversions: Vec<String>,

    /// An IP-Adapter to condition on --ip-adapter-image: a folder or Hub id laid out like
    /// h94/IP-Adapter (checkpoint in --ip-adapter-subfolder, image encoder in its
    /// image_encoder folder), or one checkpoint file when the pipeline has an image encoder.
    #[arg(long, value_name = "FOLDER|REPO|FILE")]
    pub ip_adapter: Option<String>,

    /// The IP-Adapter checkpoint's file name in the folder (ip-adapter_sd15.safetensors).
    #[arg(long, value_name = "NAME")]
    pub ip_adapter_weight: Option<String>,

    /// The folder of the IP-Adapter repository holding the checkpoint (models, sdxl_models).
    #[arg(long, value_name = "DIR")]
    pub ip_adapter_subfolder: Option<String>,

    /// An image for the IP-Adapter (PNG or JPEG); repeat to give several.
    #[arg(long = "ip-adapter-image", value_name = "IMAGE")]
    pub ip_adapter_images: Vec<PathBuf>,

    /// How strongly the IP-Adapter image acts (diffusers' set_ip_adapter_scale; 1 by default,
    /// 0.5 is a common choice to keep the prompt in charge).
    #[arg(long, default_value_t = 1.0)]
    pub ip_adapter_scale: f32,
}

/// `diffusers txt2img`.
#[derive(Args, Debug)]
pub struct Txt2ImgArgs {
    #[command(flatten)]
    pub common: GenerationArgs,
}

/// `diffusers img2img`.
#[derive(Args, Debug)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    pub common: GenerationArgs,

    /// The image to start from (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,

    /// How much to change the image, in (0, 1]: 1 ignores it, small values keep it. Defaults to
    /// the pipeline's own default (0.8 for SD, 0.3 for SDXL), as diffusers.
    #[arg(long)]
    pub strength: Option<f64>,
}

/// `diffusers inpaint`.
#[derive(Args, Debug)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub common: GenerationArgs,

    /// The image to repaint (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,

    /// The mask: white where to repaint, black where to keep (PNG or JPEG, same size as --image).
    #[arg(long)]
    pub mask: PathBuf,

    /// How much to change the masked region, in (0, 1]; 1 starts from pure noise. Defaults to
    /// the pipeline's own default (1.0 for SD, 0.9999 for SDXL), as diffusers.
    #[arg(long)]
    pub strength: Option<f64>,
}

/// The loaded pipeline components: Stable Diffusion 1.x / 2.x, SDXL, or AltDiffusion.
// One value per run, moved into its pipeline: boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
enum Components {
    Sd(StableDiffusionComponents),
    Xl(StableDiffusionXLComponents),
    Alt(AltDiffusionComponents),
}

/// The error of an adapter flag on an AltDiffusion model (its pipelines load no adapters).
fn no_alt_adapters(flag: &str) -> diffusion_core::Error {
    diffusion_core::Error::invalid_argument(
        flag,
        "AltDiffusion models take no LoRA, textual inversion or IP-Adapter here",
    )
}

impl Components {
    fn load_lora(&mut self, path: &Path, name: &str) -> diffusion_core::Result<()> {
        match self {
            Self::Sd(c) => c.load_lora_weights(path, name).map(|_| ()),
            Self::Xl(c) => c.load_lora_weights(path, name).map(|_| ()),
            Self::Alt(_) => Err(no_alt_adapters("--lora")),
        }
    }

    fn load_textual_inversion(
        &mut self,
        path: &Path,
        token: Option<&str>,
    ) -> diffusion_core::Result<Vec<String>> {
        match self {
            Self::Sd(c) => c.load_textual_inversion(path, token),
            Self::Xl(c) => c.load_textual_inversion(path, token),
            Self::Alt(_) => Err(no_alt_adapters("--textual-inversion")),
        }
    }

    fn load_ip_adapter(
        &mut self,
        name: &str,
        subfolder: Option<&str>,
        weight: Option<&str>,
        scale: f32,
    ) -> diffusion_core::Result<()> {
        let weights: Vec<&str> = weight.into_iter().collect();
        match self {
            Self::Sd(c) => {
                c.load_ip_adapter(name, subfolder, &weights)?;
                c.set_ip_adapter_scale(&[scale.into()])
            }
            Self::Xl(c) => {
                c.load_ip_adapter(name, subfolder, &weights)?;
                c.set_ip_adapter_scale(&[scale.into()])
            }
            Self::Alt(_) => Err(no_alt_adapters("--ip-adapter")),
        }
    }

    fn set_adapters(&mut self, names: &[&str], weights: &[f32]) -> diffusion_core::Result<()> {
        match self {
            Self::Sd(c) => c.set_adapters(names, weights),
            Self::Xl(c) => c.set_adapters(names, weights),
            Self::Alt(_) => Err(no_alt_adapters("--lora")),
        }
    }

    fn set_scheduler(&mut self, name: &str) -> diffusion_core::Result<()> {
        match self {
            Self::Sd(c) => c.set_scheduler(name),
            Self::Xl(c) => c.set_scheduler(name),
            Self::Alt(c) => c.set_scheduler(name),
        }
    }

    fn into_dtype(self, precision: Precision) -> diffusion_core::Result<Self> {
        let dtype = precision.float_dtype();
        Ok(match self {
            Self::Sd(c) => Self::Sd(c.to_dtype(dtype)?),
            Self::Xl(c) => Self::Xl(c.to_dtype(dtype)?),
            Self::Alt(c) => Self::Alt(c.to_dtype(dtype)?),
        })
    }

    fn scheduler_name(&self) -> &'static str {
        match self {
            Self::Sd(c) => c.scheduler.kind().class_name(),
            Self::Xl(c) => c.scheduler.kind().class_name(),
            Self::Alt(c) => c.scheduler.kind().class_name(),
        }
    }

    /// The Stable Diffusion 1.x / 2.x components, for a command whose pipeline runs on nothing
    /// else (`command` names it in the error).
    fn into_sd(self, model: &str, command: &str) -> Result<StableDiffusionComponents> {
        let kind = match self {
            Self::Sd(c) => return Ok(c),
            Self::Xl(_) => "an SDXL model",
            Self::Alt(_) => "an AltDiffusion model",
        };
        bail!("--model {model}: {kind}; {command} runs Stable Diffusion 1.x / 2.x models only")
    }
}

/// Load `--model`: a single checkpoint file (SDXL or not, from its keys), or a folder / Hub id
/// (SDXL or not, from `model_index.json`'s class).
fn load_components(
    model: &str,
    config: Option<&str>,
    hub: &HubOptions,
    device: &Device,
) -> Result<Components> {
    let path = Path::new(model);
    if path.is_file() {
        let options = SingleFilePipelineOptions {
            config: config.map(String::from),
            hub: hub.clone(),
            ..Default::default()
        };
        let checkpoint = SingleFileCheckpoint::open(path)?;
        return Ok(if checkpoint.model_type().is_xl() {
            Components::Xl(StableDiffusionXLComponents::from_single_file(
                path, &options, device,
            )?)
        } else {
            Components::Sd(StableDiffusionComponents::from_single_file(
                path, &options, device,
            )?)
        });
    }
    check_config(model, config)?;
    let dir = resolve_model_dir(model, hub)?;
    let index = dir.join("model_index.json");
    let class_name = if index.is_file() {
        ModelIndex::load(&index)?.class_name
    } else {
        String::new()
    };
    let is_xl = class_name.contains("XL");
    if class_name.starts_with("AltDiffusion") {
        return Ok(Components::Alt(AltDiffusionComponents::load_dir(
            &dir, hub, device,
        )?));
    }
    Ok(if is_xl {
        Components::Xl(StableDiffusionXLComponents::load_dir(&dir, hub, device)?)
    } else {
        Components::Sd(StableDiffusionComponents::load_dir(&dir, hub, device)?)
    })
}

/// `--config` completes a single-file `--model` only.
pub(crate) fn check_config(model: &str, config: Option<&str>) -> Result<()> {
    match config {
        Some(config) if !Path::new(model).is_file() => {
            bail!("--config {config}: only used with a single-file --model")
        }
        _ => Ok(()),
    }
}

/// `--lora FILE[:WEIGHT]` values as (path, adapter name, weight); names are the file stems,
/// made unique.
fn parse_loras(values: &[String]) -> Result<Vec<(PathBuf, String, f32)>> {
    let mut out: Vec<(PathBuf, String, f32)> = Vec::new();
    for value in values {
        let (path, weight) = match value.rsplit_once(':') {
            Some((path, w)) if !path.is_empty() && w.parse::<f32>().is_ok() => {
                let weight: f32 = w.parse()?;
                if !weight.is_finite() {
                    bail!("--lora {value}: the weight must be a finite number");
                }
                (PathBuf::from(path), weight)
            }
            _ => (PathBuf::from(value), 1.0),
        };
        let repo_id = path
            .to_str()
            .is_some_and(diffusion_loaders::hub::looks_like_repo_id);
        if !path.exists() && !repo_id {
            bail!(
                "--lora {value}: {} does not exist (and is not a Hub id owner/name)",
                path.display()
            );
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lora".into());
        let mut name = stem.clone();
        let mut n = 1;
        while out.iter().any(|(_, other, _)| *other == name) {
            n += 1;
            name = format!("{stem}_{n}");
        }
        out.push((path, name, weight));
    }
    Ok(out)
}

/// `--textual-inversion FILE[:TOKEN]` values as (path, token); the colon splits only when the
/// part before it is an existing file.
fn parse_embeddings(values: &[String]) -> Result<Vec<(PathBuf, Option<String>)>> {
    values
        .iter()
        .map(|value| {
            let (path, token) = match value.rsplit_once(':') {
                Some((path, token)) if Path::new(path).exists() && !token.is_empty() => {
                    (PathBuf::from(path), Some(token.to_string()))
                }
                _ => (PathBuf::from(value), None),
            };
            if !path.exists() {
                bail!(
                    "--textual-inversion {value}: {} does not exist",
                    path.display()
                );
            }
            Ok((path, token))
        })
        .collect()
}

impl RuntimeArgs {
    /// `--dtype` as a precision.
    pub(crate) fn precision(&self) -> Result<Precision> {
        self.dtype
            .parse::<Precision>()
            .with_context(|| format!("--dtype {}", self.dtype))
    }

    pub(crate) fn device(&self) -> Result<Device> {
        parse_device(&self.device).with_context(|| format!("--device {}", self.device))
    }

    /// The Hub options of `--revision` / `--variant` / `--quiet`; a half `--dtype` loads the
    /// models straight into it (no f32 copy on the device first).
    pub(crate) fn hub(&self) -> HubOptions {
        HubOptions {
            revision: self.revision.clone(),
            variant: self.variant.clone(),
            progress: !self.quiet,
            dtype: self
                .precision()
                .ok()
                .filter(|p| *p != Precision::F32)
                .map(Precision::float_dtype),
            ..HubOptions::default()
        }
    }
}

/// The `--lora` and `--textual-inversion` values, read and checked before any model is loaded.
pub(crate) struct AdapterPlan {
    loras: Vec<(PathBuf, String, f32)>,
    embeddings: Vec<(PathBuf, Option<String>)>,
}

impl AdapterArgs {
    /// Every check of the adapter flags that needs no model.
    pub(crate) fn check(&self) -> Result<AdapterPlan> {
        match (&self.ip_adapter, self.ip_adapter_images.is_empty()) {
            (Some(name), true) => {
                bail!("--ip-adapter {name}: give the image(s) with --ip-adapter-image")
            }
            (None, false) => bail!("--ip-adapter-image needs --ip-adapter (the adapter to use)"),
            _ => {}
        }
        if self.ip_adapter.is_none()
            && (self.ip_adapter_weight.is_some() || self.ip_adapter_subfolder.is_some())
        {
            bail!("--ip-adapter-weight / --ip-adapter-subfolder need --ip-adapter");
        }
        if !self.ip_adapter_scale.is_finite() {
            bail!(
                "--ip-adapter-scale {}: must be a finite number",
                self.ip_adapter_scale
            );
        }
        for path in &self.ip_adapter_images {
            if !path.is_file() {
                bail!("--ip-adapter-image {}: no such file", path.display());
            }
        }
        Ok(AdapterPlan {
            loras: parse_loras(&self.loras)?,
            embeddings: parse_embeddings(&self.textual_inversions)?,
        })
    }

    /// For a pipeline that takes no image embeddings: an IP-Adapter flag is an error rather
    /// than an adapter loaded and never used.
    pub(crate) fn refuse_ip_adapter(&self, pipeline: &str) -> Result<()> {
        if self.ip_adapter.is_some()
            || !self.ip_adapter_images.is_empty()
            || self.ip_adapter_weight.is_some()
            || self.ip_adapter_subfolder.is_some()
        {
            bail!(
                "--ip-adapter: {pipeline} takes no image embeddings (diffusers' pipeline has no \
                 ip_adapter_image), so an IP-Adapter would have no effect"
            );
        }
        Ok(())
    }
}

/// What the adapter flags loaded into the components.
pub(crate) struct LoadedAdapters {
    loras: Vec<(PathBuf, String, f32)>,
    /// The first token of each textual inversion.
    tokens: Vec<String>,
    ip_adapter: IPAdapterArgs,
}

impl LoadedAdapters {
    /// The adapters in the PNG's generation parameters.
    pub(crate) fn push_params(&self, args: &AdapterArgs, params: &mut GenerationParameters) {
        if !self.tokens.is_empty() {
            params.push(
                "Textual inversion",
                format!("\"{}\"", self.tokens.join(", ")),
            );
        }
        if !self.loras.is_empty() {
            let list: Vec<String> = self
                .loras
                .iter()
                .map(|(_, n, w)| format!("{n}:{w}"))
                .collect();
            params.push("LoRA", format!("\"{}\"", list.join(", ")));
        }
        if let Some(name) = &args.ip_adapter {
            let adapter = match &args.ip_adapter_weight {
                Some(weight) => format!("{name} {weight}"),
                None => name.clone(),
            };
            params.push("IP-Adapter", format!("\"{adapter}\""));
            params.push("IP-Adapter scale", args.ip_adapter_scale);
            let images: Vec<String> = args
                .ip_adapter_images
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            params.push("IP-Adapter image", format!("\"{}\"", images.join(", ")));
        }
    }
}

/// Load the LoRAs (weighted as diffusers' set_adapters), the IP-Adapter and the textual
/// inversions of the flags into `components`.
fn load_adapters(
    components: &mut Components,
    args: &AdapterArgs,
    plan: AdapterPlan,
) -> Result<LoadedAdapters> {
    let AdapterPlan { loras, embeddings } = plan;
    if !loras.is_empty() {
        for (path, name, _) in &loras {
            components
                .load_lora(path, name)
                .with_context(|| format!("--lora {}", path.display()))?;
        }
        let names: Vec<&str> = loras.iter().map(|(_, n, _)| n.as_str()).collect();
        let weights: Vec<f32> = loras.iter().map(|(_, _, w)| *w).collect();
        components
            .set_adapters(&names, &weights)
            .context("--lora")?;
    }
    let mut ip_adapter = IPAdapterArgs::default();
    if let Some(name) = &args.ip_adapter {
        components
            .load_ip_adapter(
                name,
                args.ip_adapter_subfolder.as_deref(),
                args.ip_adapter_weight.as_deref(),
                args.ip_adapter_scale,
            )
            .with_context(|| format!("--ip-adapter {name}"))?;
        let images = args
            .ip_adapter_images
            .iter()
            .map(|p| load_image(p).with_context(|| format!("--ip-adapter-image {}", p.display())))
            .collect::<Result<Vec<_>>>()?;
        ip_adapter.image = Some(vec![images]);
    }
    let mut tokens = Vec::new();
    for (path, token) in &embeddings {
        let added = components
            .load_textual_inversion(path, token.as_deref())
            .with_context(|| format!("--textual-inversion {}", path.display()))?;
        tokens.extend(added.into_iter().take(1));
    }
    Ok(LoadedAdapters {
        loras,
        tokens,
        ip_adapter,
    })
}

/// Load a Stable Diffusion 1.x / 2.x `--model` for an edit command (`command`), whose pipeline
/// runs a DDIMScheduler built from the model's scheduler config (diffusers' recipe), with the
/// adapter flags applied and cast to `precision`.
pub(crate) fn load_sd_for_edit(
    model: &str,
    config: Option<&str>,
    runtime: &RuntimeArgs,
    adapters: (&AdapterArgs, AdapterPlan),
    precision: Precision,
    command: &str,
) -> Result<(StableDiffusionComponents, LoadedAdapters)> {
    let device = runtime.device()?;
    let components = load_components(model, config, &runtime.hub(), &device)
        .with_context(|| format!("--model {model}"))?
        .into_sd(model, command)?;
    // Refused above before any adapter loads; the adapters load through `Components`.
    let mut components = Components::Sd(components);
    let loaded = load_adapters(&mut components, adapters.0, adapters.1)?;
    let mut components = components.into_sd(model, command)?;
    if components.scheduler.as_ddim().is_none() {
        components
            .set_scheduler("DDIMScheduler")
            .context("the model's scheduler config as a DDIMScheduler")?;
    }
    if precision != Precision::F32 {
        components = components.to_dtype(precision.float_dtype())?;
    }
    Ok((components, loaded))
}

/// Load a Stable Diffusion 1.x / 2.x `--model` for `command` with its own scheduler, or the
/// `scheduler` class built from its config, with the adapter flags applied and cast to
/// `precision`.
pub(crate) fn load_sd_with_scheduler(
    model: &str,
    config: Option<&str>,
    runtime: &RuntimeArgs,
    adapters: (&AdapterArgs, AdapterPlan),
    precision: Precision,
    command: &str,
    scheduler: Option<&str>,
) -> Result<(StableDiffusionComponents, LoadedAdapters)> {
    let device = runtime.device()?;
    let mut components = load_components(model, config, &runtime.hub(), &device)
        .with_context(|| format!("--model {model}"))?;
    // Refuse other families before any adapter loads.
    components = Components::Sd(components.into_sd(model, command)?);
    let loaded = load_adapters(&mut components, adapters.0, adapters.1)?;
    let mut components = components.into_sd(model, command)?;
    if let Some(name) = scheduler {
        components
            .set_scheduler(name)
            .with_context(|| format!("--scheduler {name}"))?;
    }
    if precision != Precision::F32 {
        components = components.to_dtype(precision.float_dtype())?;
    }
    Ok((components, loaded))
}

/// What the three commands share once the flags are checked.
struct Prepared {
    components: Components,
    latents: Option<Tensor<4>>,
    generator: Generators,
    params: GenerationParameters,
    ip_adapter: IPAdapterArgs,
}

/// `--height` / `--width`, when given, must be positive multiples of 8.
pub(crate) fn check_size_flags(height: Option<usize>, width: Option<usize>) -> Result<()> {
    for (flag, value) in [("--height", height), ("--width", width)] {
        if let Some(v) = value
            && (v == 0 || v % 8 != 0)
        {
            bail!("{flag} {v}: must be a positive multiple of 8");
        }
    }
    Ok(())
}

/// Check every flag that can be checked without loading a model, so a mistake costs nothing.
fn check_flags(args: &GenerationArgs, strength: Option<f64>) -> Result<(Precision, AdapterPlan)> {
    let plan = args.adapters.check()?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    check_size_flags(args.height, args.width)?;
    if let Some(s) = strength
        && !(s > 0.0 && s <= 1.0)
    {
        bail!("--strength {s}: must be in (0, 1]");
    }
    if let Some(g) = args.guidance
        && !g.is_finite()
    {
        bail!("--guidance {g}: must be a finite number");
    }
    args.files.check()?;
    Ok((args.runtime.precision()?, plan))
}

pub(crate) fn read_latents(path: &Path, device: &Device) -> Result<Tensor<4>> {
    let array = NpyArray::read(path).with_context(|| format!("--latents {}", path.display()))?;
    let shape: [usize; 4] = array.shape.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "--latents {}: expected a 4-D array [num_images, channels, height/8, width/8], got \
             shape {:?}",
            path.display(),
            array.shape
        )
    })?;
    Ok(from_vec(array.data, shape, device))
}

/// The generation parameters every command writes: the seed, the model, the clip skip and a
/// dtype other than f32.
pub(crate) fn push_common_params(
    params: &mut GenerationParameters,
    seed: Option<u64>,
    model: &str,
    clip_skip: Option<usize>,
) {
    params.push(
        "Seed",
        seed.map(|s| s.to_string())
            .unwrap_or_else(|| "random".into()),
    );
    params.push("Model", model);
    if let Some(skip) = clip_skip {
        // A1111 counts the last layer as clip skip 1.
        params.push("Clip skip", skip + 1);
    }
}

fn prepare(args: &GenerationArgs, precision: Precision, plan: AdapterPlan) -> Result<Prepared> {
    let device = args.runtime.device()?;
    let latents = args
        .latents
        .as_deref()
        .map(|p| read_latents(p, &device))
        .transpose()?;
    let hub = args.runtime.hub();
    let mut components = load_components(&args.model, args.config.as_deref(), &hub, &device)
        .with_context(|| format!("--model {}", args.model))?;
    let adapters = load_adapters(&mut components, &args.adapters, plan)?;
    if let Some(name) = &args.scheduler {
        components
            .set_scheduler(name)
            .with_context(|| format!("--scheduler {name}"))?;
    }
    if precision != Precision::F32 {
        components = components.into_dtype(precision)?;
    }
    let generator = args.seed.map(Generators::Seed).unwrap_or_default();

    let mut params = GenerationParameters {
        prompt: Some(args.prompt.clone()),
        ..GenerationParameters::default()
    };
    if let Some(negative) = &args.negative_prompt {
        params.negative_prompt = Some(negative.clone());
    }
    params.push("Steps", args.steps);
    params.push(
        "Sampler",
        args.scheduler
            .clone()
            .unwrap_or_else(|| components.scheduler_name().to_string()),
    );
    push_common_params(&mut params, args.seed, &args.model, args.clip_skip);
    if args.eta != 0.0 {
        params.push("Eta", args.eta);
    }
    if precision != Precision::F32 {
        params.push("Dtype", &args.runtime.dtype);
    }
    if let Some(path) = &args.latents {
        params.push("Latents", path.display());
    }
    adapters.push_params(&args.adapters, &mut params);
    Ok(Prepared {
        components,
        latents,
        generator,
        params,
        ip_adapter: adapters.ip_adapter,
    })
}

fn negative(args: &GenerationArgs) -> Option<Vec<String>> {
    args.negative_prompt.clone().map(|n| vec![n])
}

/// Save what a pipeline returned with `output_type="np"` as `--output` (a grid of `grid_cols`
/// columns for several images) and `--output-npy`, with the size, batch size and interruption
/// added to `params`.
pub(crate) fn save_images(
    files: &OutputArgs,
    grid_cols: Option<usize>,
    out: ImagePipelineOutput,
    mut params: GenerationParameters,
) -> Result<()> {
    let ImageOutput::Array(array) = out.images else {
        bail!("the pipeline did not return an array");
    };
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
    let image = output::grid(&images, grid_cols)?;
    output::write(
        &files.output,
        &image,
        files.output_npy.as_deref().map(|p| (p, &array)),
        &params,
        images.len(),
    )
}

fn finish(
    args: &GenerationArgs,
    out: ImagePipelineOutput,
    params: GenerationParameters,
) -> Result<()> {
    save_images(&args.files, args.grid_cols, out, params)
}

/// Read an input image (`flag` names it in errors), resized with Lanczos3 to `size` (height,
/// width) when given.
pub(crate) fn load_input_image(
    path: &Path,
    flag: &str,
    size: Option<(usize, usize)>,
) -> Result<RgbImage> {
    let image = load_image(path).with_context(|| format!("{flag} {}", path.display()))?;
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

/// `--height` and `--width` as one size: both or neither.
pub(crate) fn requested_size(
    height: Option<usize>,
    width: Option<usize>,
) -> Result<Option<(usize, usize)>> {
    match (height, width) {
        (Some(h), Some(w)) => Ok(Some((h, w))),
        (None, None) => Ok(None),
        _ => bail!("give both --height and --width, or neither"),
    }
}

/// The AltDiffusion arm of [`run_pipeline!`]: its pipelines take Stable Diffusion's args; a
/// command without an AltDiffusion pipeline (inpainting) is an error.
macro_rules! run_alt_pipeline {
    ($components:ident, $sd_args:ident, { $($field:ident: $value:expr),* }, |$call:ident| $adjust:block, $alt:ident) => {{
        let mut $call = $sd_args { $($field: $value,)* ..Default::default() };
        $adjust
        $alt::from_parts($components).call($call)?
    }};
    ($components:ident, $sd_args:ident, { $($field:ident: $value:expr),* }, |$call:ident| $adjust:block) => {{
        drop($components);
        bail!("AltDiffusion has no pipeline for this command (diffusers has only text-to-image and image-to-image)")
    }};
}

/// Run the SD, SDXL or AltDiffusion pipeline of a command on the loaded components. The arms
/// build their pipeline's args struct from the same fields (the structs share these field
/// names), apply `$adjust` to it (defaults that differ between the pipelines) and call the
/// pipeline.
macro_rules! run_pipeline {
    (
        $components:expr,
        $sd:ident($sd_args:ident),
        $xl:ident($xl_args:ident),
        $(alt: $alt:ident,)?
        { $($field:ident: $value:expr),* $(,)? },
        |$call:ident| $adjust:block
    ) => {
        match $components {
            Components::Sd(components) => {
                let mut $call = $sd_args { $($field: $value,)* ..Default::default() };
                $adjust
                $sd::from_parts(components).call($call)?
            }
            Components::Xl(components) => {
                let mut $call = $xl_args { $($field: $value,)* ..Default::default() };
                $adjust
                $xl::from_parts(components).call($call)?
            }
            Components::Alt(components) => run_alt_pipeline!(
                components, $sd_args, { $($field: $value),* }, |$call| $adjust $(, $alt)?
            ),
        }
    };
}

pub fn txt2img(args: Txt2ImgArgs) -> Result<()> {
    let args = args.common;
    let (precision, plan) = check_flags(&args, None)?;
    let prepared = prepare(&args, precision, plan)?;
    let mut params = prepared.params;
    let out = run_pipeline!(
        prepared.components,
        StableDiffusionPipeline(StableDiffusionArgs),
        StableDiffusionXLPipeline(StableDiffusionXLArgs),
        alt: AltDiffusionPipeline,
        {
            prompt: vec![args.prompt.clone()],
            negative_prompt: negative(&args),
            height: args.height,
            width: args.width,
            num_inference_steps: args.steps,
            eta: args.eta,
            generator: prepared.generator,
            latents: prepared.latents,
            num_images_per_prompt: args.num_images,
            output_type: OutputType::Np,
            clip_skip: args.clip_skip,
            progress: !args.runtime.quiet,
            ip_adapter: prepared.ip_adapter,
        },
        |call| {
            call.guidance_scale = args.guidance.unwrap_or(call.guidance_scale);
            params.push("CFG scale", call.guidance_scale);
        }
    );
    finish(&args, out, params)
}

pub fn img2img(args: Img2ImgArgs) -> Result<()> {
    let Img2ImgArgs {
        common: args,
        image,
        strength,
    } = args;
    let (precision, plan) = check_flags(&args, strength)?;
    if args.latents.is_some() {
        bail!(
            "--latents: img2img starts from the encoded --image, not from given latents \
             (diffusers' image-to-image pipelines take no latents= either)"
        );
    }
    let size = requested_size(args.height, args.width)?;
    let input = load_input_image(&image, "--image", size)?;
    let prepared = prepare(&args, precision, plan)?;
    let mut params = prepared.params;
    let out = run_pipeline!(
        prepared.components,
        StableDiffusionImg2ImgPipeline(StableDiffusionImg2ImgArgs),
        StableDiffusionXLImg2ImgPipeline(StableDiffusionXLImg2ImgArgs),
        alt: AltDiffusionImg2ImgPipeline,
        {
            prompt: vec![args.prompt.clone()],
            negative_prompt: negative(&args),
            image: Some(input.into()),
            num_inference_steps: args.steps,
            eta: args.eta,
            generator: prepared.generator,
            num_images_per_prompt: args.num_images,
            output_type: OutputType::Np,
            clip_skip: args.clip_skip,
            progress: !args.runtime.quiet,
            ip_adapter: prepared.ip_adapter,
        },
        |call| {
            call.strength = strength.unwrap_or(call.strength);
            call.guidance_scale = args.guidance.unwrap_or(call.guidance_scale);
            params.push("CFG scale", call.guidance_scale);
            params.push("Denoising strength", call.strength);
        }
    );
    params.push("Init image", image.display());
    finish(&args, out, params)
}

pub fn inpaint(args: InpaintArgs) -> Result<()> {
    let InpaintArgs {
        common: args,
        image,
        mask,
        strength,
    } = args;
    let (precision, plan) = check_flags(&args, strength)?;
    requested_size(args.height, args.width)?;
    let input = load_input_image(&image, "--image", None)?;
    let mask_image = load_input_image(&mask, "--mask", None)?;
    if input.dimensions() != mask_image.dimensions() {
        bail!(
            "--mask {}: {}x{} differs from the image's {}x{}",
            mask.display(),
            mask_image.width(),
            mask_image.height(),
            input.width(),
            input.height()
        );
    }
    let prepared = prepare(&args, precision, plan)?;
    let mut params = prepared.params;
    let out = run_pipeline!(
        prepared.components,
        StableDiffusionInpaintPipeline(StableDiffusionInpaintArgs),
        StableDiffusionXLInpaintPipeline(StableDiffusionXLInpaintArgs),
        {
            prompt: vec![args.prompt.clone()],
            negative_prompt: negative(&args),
            image: Some(input.into()),
            mask_image: Some(mask_image.into()),
            height: args.height,
            width: args.width,
            num_inference_steps: args.steps,
            eta: args.eta,
            generator: prepared.generator,
            latents: prepared.latents,
            num_images_per_prompt: args.num_images,
            output_type: OutputType::Np,
            clip_skip: args.clip_skip,
            progress: !args.runtime.quiet,
            ip_adapter: prepared.ip_adapter,
        },
        |call| {
            call.strength = strength.unwrap_or(call.strength);
            call.guidance_scale = args.guidance.unwrap_or(call.guidance_scale);
            params.push("CFG scale", call.guidance_scale);
            params.push("Denoising strength", call.strength);
        }
    );
    params.push("Init image", image.display());
    params.push("Mask", mask.display());
    finish(&args, out, params)
}
