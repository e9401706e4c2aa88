//! Stable Diffusion 1.5 and SDXL on a GPU, random weights: one UNet2DConditionModel step at
//! batch 2 (classifier-free guidance's batch, 77 text tokens), one full-size VAE decode at
//! batch 1, and a whole text-to-image generation (`pipeline`: 30 Euler steps with guidance 7.5,
//! then the VAE decode to a `[0, 1]` image; text embeddings given, as `prompt_embeds`), per dtype, with this crate's fused kernels (`diffusion_core::kernels`) and with
//! burn's own ops (`--kernels`: `on` all kernels, `off` none, `group_norm`, `attention` or
//! `softmax` one),
//! so they are compared in one run. One JSON object per line, with the same
//! keys as `benches/python/bench_sd_gpu.py` prints for diffusers:
//!
//! ```text
//! cargo build --release -p diffusion-benches --no-default-features --features cuda --bin sd_gpu
//! sd_gpu [--device cuda|wgpu|cubecl-cpu] [--models sd15,sdxl]
//!        [--kinds unet,vae_decode,pipeline] [--dtypes f16,bf16,f32]
//!        [--kernels on,off,group_norm,attention,softmax] [--attention auto,flash,matmul,burn,tune]
//!        [--conv burn,split_k,tune] [--graph off|on] [--iters 10] [--warmup 3] [--pipeline-iters 3] [--steps 30]
//!        [--latent N]
//! ```
//!
//! `--latent N` runs every model at an `N`×`N` latent instead of its own size (64 for SD 1.5,
//! 128 for SDXL; the VAE decodes to `8N`×`8N`), for quick runs on slow devices such as the
//! CubeCL CPU runtime; rows then carry `latent` and no FLOP counts (those are for the full
//! sizes).
//!
//! `--attention` lists the routes of f16 attention to compare (`diffusion_core::kernels::
//! AttentionRoute`: `auto`, this crate's `flash` kernel, `matmul`, or burn's fused op `burn`,
//! cubek's tensor-core flash attention on CUDA). `--conv` lists the convolution routes
//! (`diffusion_core::kernels::ConvRoute`: burn's autotuned convolution, or `split_k`, a batched
//! split-K matrix product over an im2col buffer for small feature maps with many channels).
//! `DIFFUSERS_RS_ATTENTION_CHUNK` (e.g. `64M`) sets how many scores the matmul route holds at a
//! time (`attention_chunk` in each row; default 16M, 32 MiB in f16).
//! `DIFFUSERS_RS_GROUP_NORM_LAYOUT` (`keep`, `contiguous`) sets whether the GroupNorm kernel
//! reads and writes the channels-last activations burn's convolutions hand it where they lie,
//! or copies them to PyTorch's layout first (`group_norm_layout` in each row).
//! `DIFFUSERS_RS_CONV_WEIGHTS` (`auto`, `pytorch`, `channels_last`) sets how convolution weights
//! are laid out when loaded (`conv_weights` in each row; `auto`, channels-last on CubeCL
//! devices, lets burn's convolution read them without a copy). The models' random weights are
//! loaded as a checkpoint is (`load_weights_as` in the run's dtype, from a source that draws
//! them on demand), so the device never holds f32 copies of half-precision weights.
//! `tune` (either flag) times the candidate routes on each new shape and keeps the fastest; the
//! run ends with one `"kind": "tuned"` line per shape saying what was chosen and each time.
//! `--graph on` also times each UNet step
//! replayed from a captured CUDA graph (`burn::tensor::capture`: one dispatch for the whole
//! forward), which separates the GPU's time from the host's launch overhead.
//!
//! `--kinds ops` times single operators at SD 1.5 shapes (3×3 convolutions, linear layers,
//! self- and cross-attention, GroupNorm+SiLU, an add), one line each with its own FLOPs, to see
//! where a model's time goes; `benches/python/bench_ops_gpu.py` times the same in PyTorch.
//!
//! ```text
//! python benches/python/bench_sd_gpu.py        # diffusers on the same configs
//! ```
//!
//! Times are wall-clock over `iters` forwards after `warmup` ones, with the device synchronised
//! before the clock starts and before it is read. Memory is what burn's pools hold after the
//! timed forwards (`bytes_reserved`, pools grow to the peak and keep it; `memory_cleanup` runs
//! before each measurement); `pools` lists each page-carving pool's page size, pages held now and
//! at the peak, and the largest allocation it served. TFLOP/s uses the FLOPs PyTorch's flop
//! counter finds in the same forward (`benches/python/sd_gpu_flops.json`, from
//! `bench_sd_gpu.py --flops-only`).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use diffusion_benches::{gpu_unet_configs, gpu_vae_configs};
use diffusion_core::burn::tensor::{Distribution, FloatDType, Tensor, capture};

use diffusion_core::burn::module::Module;
use diffusion_core::kernels::{
    AttentionRoute, ConvRoute, Kernel, attention_chunk_scores, conv_weight_layout,
    group_norm_layout, set_attention_route, set_conv_route, set_kernel_enabled, tuned_choices,
    uses_kernels,
};
use diffusion_core::weights::{TensorProvider, WeightSource};
use diffusion_core::{Device, Precision};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::state_dict::{LoadMode, load_weights_as, param_shapes};
use diffusion_models::{
    AddedCondKwargs, AutoencoderKL, ModelMixin, UNet2DConditionModel, UNet2DConditionOptions,
};
use diffusion_schedulers::{AnyScheduler, Scheduler, StepOptions};

const FLOPS: &str = include_str!("../../python/sd_gpu_flops.json");

const USAGE: &str = "\
sd_gpu: Stable Diffusion 1.5 and SDXL forwards on a GPU with random weights, one JSON line per
measurement (the keys of benches/python/bench_sd_gpu.py, which measures diffusers the same way).

Usage: sd_gpu [FLAG VALUE]...   (lists are comma-separated; every combination is one row)

  --device cuda|wgpu|cubecl-cpu     device to run on [cuda]
  --models sd15,sdxl                model configs [sd15,sdxl]
  --kinds unet,vae_decode,pipeline,ops
                                    UNet step at batch 2, VAE decode at batch 1, a whole
                                    text-to-image generation, or single operators at SD 1.5
                                    shapes [unet,vae_decode]
  --dtypes f16,bf16,f32             precisions [f16,bf16,f32]
  --kernels on,off,group_norm,attention,softmax
                                    this crate's fused kernels: all, none, or one [on,off]
  --attention auto,flash,matmul,burn,tune
                                    routes of f16 attention [auto]
  --conv burn,split_k,tune          convolution routes [burn]
  --graph on|off                    also time UNet steps replayed from a CUDA graph [off]
  --iters N                         timed forwards per row [10]
  --warmup N                        untimed forwards before them [3]
  --pipeline-iters N                timed generations per pipeline row [3]
  --steps N                         denoising steps per generation [30]
  --latent N                        every model at an NxN latent (a multiple of 8) instead of
                                    its own size, for quick runs on slow devices
  -h, --help                        this text

Environment: DIFFUSERS_RS_ATTENTION_CHUNK (scores the matmul route holds at a time, e.g. 64M),
DIFFUSERS_RS_GROUP_NORM_LAYOUT (keep|contiguous), DIFFUSERS_RS_CONV_WEIGHTS
(auto|pytorch|channels_last). Build: cargo build --release -p diffusion-benches
--no-default-features --features cuda,autotune-cache --bin sd_gpu (benches/gpu/stage.sh).
";

struct Args {
    device: String,
    models: Vec<String>,
    kinds: Vec<String>,
    dtypes: Vec<String>,
    kernels: Vec<String>,
    attention: Vec<AttentionRoute>,
    conv: Vec<ConvRoute>,
    graph: bool,
    iters: usize,
    warmup: usize,
    pipeline_iters: usize,
    steps: usize,
    /// `--latent`: the latent side for every model instead of its own.
    latent: Option<usize>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        device: "cuda".into(),
        models: vec!["sd15".into(), "sdxl".into()],
        kinds: vec!["unet".into(), "vae_decode".into()],
        dtypes: vec!["f16".into(), "bf16".into(), "f32".into()],
        kernels: vec!["on".into(), "off".into()],
        attention: vec![AttentionRoute::Auto],
        conv: vec![ConvRoute::Burn],
        graph: false,
        iters: 10,
        warmup: 3,
        pipeline_iters: 3,
        steps: 30,
        latent: None,
    };
    let list = |v: String| v.split(',').map(str::to_string).collect::<Vec<_>>();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if matches!(flag.as_str(), "-h" | "--help") {
            print!("{USAGE}");
            std::process::exit(0);
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--device" => args.device = value,
            "--models" => args.models = list(value),
            "--kinds" => {
                args.kinds = list(value);
                if let Some(bad) = args
                    .kinds
                    .iter()
                    .find(|k| !matches!(k.as_str(), "unet" | "vae_decode" | "pipeline" | "ops"))
                {
                    bail!("--kinds takes unet, vae_decode, pipeline, ops; not {bad}");
                }
            }
            "--dtypes" => args.dtypes = list(value),
            "--kernels" => {
                args.kernels = list(value);
                if let Some(bad) = args.kernels.iter().find(|k| {
                    !matches!(
                        k.as_str(),
                        "on" | "off" | "group_norm" | "attention" | "softmax"
                    )
                }) {
                    bail!("--kernels takes on, off, group_norm, attention, softmax; not {bad}");
                }
            }
            "--attention" => {
                args.attention = list(value)
                    .iter()
                    .map(|r| r.parse::<AttentionRoute>())
                    .collect::<Result<_, _>>()?;
            }
            "--conv" => {
                args.conv = list(value)
                    .iter()
                    .map(|r| r.parse::<ConvRoute>())
                    .collect::<Result<_, _>>()?;
            }
            "--graph" => {
                args.graph = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    other => bail!("--graph takes on or off, not {other}"),
                };
            }
            "--iters" => args.iters = value.parse()?,
            "--warmup" => args.warmup = value.parse()?,
            "--pipeline-iters" => args.pipeline_iters = value.parse()?,
            "--steps" => args.steps = value.parse()?,
            "--latent" => {
                let side: usize = value.parse()?;
                if side == 0 || side % 8 != 0 {
                    bail!(
                        "--latent takes a positive multiple of 8 (the UNets downsample it 3 times), not {side}"
                    );
                }
                args.latent = Some(side);
            }
            other => bail!("unknown flag {other} (sd_gpu --help lists them)"),
        }
    }
    Ok(args)
}

fn device(name: &str) -> Result<Device> {
    #[cfg(feature = "cpu")]
    if name == "cubecl-cpu" {
        return Ok(Device::cpu());
    }
    Ok(diffusion_core::parse_device(name)?)
}

/// Time `iters` calls of `forward` after `warmup` ones; milliseconds per call.
fn time_ms<T>(device: &Device, warmup: usize, iters: usize, mut forward: impl FnMut() -> T) -> f64 {
    // Every output is held until the device has run it: burn's fusion may skip work whose
    // result is dropped before the queue drains, which would time less than a forward.
    let warm: Vec<T> = (0..warmup).map(|_| forward()).collect();
    device.sync().expect("device sync");
    drop(warm);
    let start = Instant::now();
    let outputs: Vec<T> = (0..iters).map(|_| forward()).collect();
    device.sync().expect("device sync");
    let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
    drop(outputs);
    ms
}

struct Row<'a> {
    kind: &'a str,
    model: &'a str,
    dtype: &'a str,
    kernels: &'a str,
    attention: AttentionRoute,
    conv: ConvRoute,
    /// `Some(hardware)` for a step replayed from a captured graph.
    graph: Option<bool>,
    ms: f64,
    /// Denoising steps of a `pipeline` row.
    steps: usize,
    /// MiB in use once the model(s) were built, cast and synchronised (the weights).
    loaded_mib: Option<f64>,
    /// `Some(side)` when `--latent` replaced the model's own latent size.
    latent: Option<usize>,
}

/// Synchronise, release the pools' free pages and return the MiB in use.
fn settled_in_use_mib(device: &Device) -> Option<f64> {
    device.sync().ok()?;
    device.memory_cleanup();
    device
        .memory_pool_usage()
        .map(|u| (u.bytes_in_use as f64 / 1048576.0 * 10.0).round() / 10.0)
}

/// Every (`--kernels`, `--attention`, `--conv`) choice to measure, kernels outermost; each
/// is switched on as it is returned.
fn variants(args: &Args) -> Vec<(&str, AttentionRoute, ConvRoute)> {
    args.kernels
        .iter()
        .flat_map(|k| {
            args.attention
                .iter()
                .flat_map(move |a| args.conv.iter().map(move |c| (k.as_str(), *a, *c)))
        })
        .collect()
}

/// Switch the kernels and routes of one of [`variants`].
fn select((kernels, attention, conv): (&str, AttentionRoute, ConvRoute)) {
    select_kernels(kernels);
    set_attention_route(attention);
    set_conv_route(conv);
}

/// Switch the kernels as `--kernels` names them.
fn select_kernels(mode: &str) {
    set_kernel_enabled(Kernel::GroupNorm, matches!(mode, "on" | "group_norm"));
    set_kernel_enabled(Kernel::Attention, matches!(mode, "on" | "attention"));
    set_kernel_enabled(Kernel::Softmax, matches!(mode, "on" | "softmax"));
}

fn report(device: &Device, row: Row<'_>, flops: &serde_json::Value) {
    let reserved = device.memory_pool_usage().map(|u| u.bytes_reserved);
    let in_use = device.memory_pool_usage().map(|u| u.bytes_in_use);
    let mib = |b: Option<u64>| b.map(|b| (b as f64 / 1048576.0 * 10.0).round() / 10.0);
    // Each page-carving pool: its page size, pages held now and at the peak, and the largest
    // allocation it served (which sets the page size of an adaptive pool).
    let pools: Option<Vec<serde_json::Value>> = device.memory_pool_report().map(|pools| {
        pools
            .iter()
            .map(|p| {
                serde_json::json!({
                    "page_mib": mib(Some(p.page_size)),
                    "pages": p.pages,
                    "pages_peak": p.pages_peak,
                    "largest_alloc_mib": mib(Some(p.largest_alloc)),
                })
            })
            .collect()
    });
    let count = |kind: &str| flops[format!("{kind}/{}", row.model)].as_f64();
    let gflop = match row.kind {
        // Every step's UNet forward plus the decode (the scheduler's arithmetic is negligible).
        "pipeline" => count("unet")
            .zip(count("vae_decode"))
            .map(|(unet, vae)| unet * row.steps as f64 + vae),
        kind => count(kind),
    }
    .filter(|_| row.latent.is_none())
    .map(|f| f / 1e9);
    let json = serde_json::json!({
        "impl": format!("burn-kernels-{}", row.kernels),
        "attention": row.attention.name(),
        "conv": row.conv.name(),
        "attention_chunk": attention_chunk_scores(),
        "conv_weights": conv_weight_layout().name(),
        "group_norm_layout": group_norm_layout().name(),
        "graph": row.graph,
        "device": format!("{device:?}"),
        "kind": row.kind,
        "model": row.model,
        "dtype": row.dtype,
        "ms": (row.ms * 1000.0).round() / 1000.0,
        "steps": (row.kind == "pipeline").then_some(row.steps),
        "latent": row.latent,
        "peak_reserved_mib": mib(reserved),
        "in_use_mib": mib(in_use),
        "loaded_mib": row.loaded_mib,
        "pools": pools,
        "gflop": gflop.map(|g| g.round()),
        "tflops": gflop.map(|g| (g / row.ms * 100.0).round() / 100.0),
    });
    println!("{json}");
}

/// Random weights for every parameter of a model, made on demand as a [`WeightSource`] reads
/// them: uniform in ±1/sqrt(fan_in) for weights and their biases (PyTorch's default for
/// convolutions and linear layers), normalisation scales 1 and shifts 0.
#[derive(Debug)]
struct RandomWeights {
    shapes: std::collections::BTreeMap<String, Vec<usize>>,
}

impl TensorProvider for RandomWeights {
    fn read_f32(&self, key: &str) -> diffusion_core::Result<Vec<f32>> {
        let shape = &self.shapes[key];
        let count = shape.iter().product::<usize>();
        let is_norm = key
            .rsplit('.')
            .nth(1)
            .is_some_and(|module| module.contains("norm"));
        // A vector's fan-in is its module's weight's.
        let weight_shape = match key.strip_suffix(".bias") {
            Some(module) => self.shapes.get(&format!("{module}.weight")),
            None => Some(shape),
        };
        let bound = match weight_shape {
            _ if is_norm => {
                return Ok(vec![
                    if key.ends_with(".weight") { 1.0 } else { 0.0 };
                    count
                ]);
            }
            Some(w) if w.len() >= 2 => 1.0 / (w[1..].iter().product::<usize>() as f32).sqrt(),
            _ => 0.0,
        };
        // splitmix64 seeded by the key, so every run loads the same weights.
        let mut state = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Ok((0..count)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * unit - 1.0) * bound
            })
            .collect())
    }
}

/// `model`, built from its config with lazy parameters, with random weights ([`RandomWeights`])
/// loaded in `dtype` the way a checkpoint is loaded (`load_weights_as`: converted on the host,
/// uploaded into persistent memory, laid out as loaded weights are), so the device never holds
/// f32 weights for a half-precision run.
fn with_random_weights<M: Module>(model: M, dtype: FloatDType) -> Result<M> {
    let shapes = param_shapes(&model);
    let source = WeightSource::from_provider(
        "random weights",
        shapes.clone(),
        Box::new(RandomWeights { shapes }),
    );
    let (model, _) = load_weights_as(model, &source, LoadMode::Strict, Some(dtype))?;
    Ok(model)
}

fn randn<const D: usize>(shape: [usize; D], dtype: FloatDType, device: &Device) -> Tensor<D> {
    Tensor::<D>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
}

/// Random UNet inputs for classifier-free guidance's batch of 2: latents, 77 text-token states
/// and, for SDXL's `text_time` conditioning, pooled embeddings and 1024² time ids.
fn unet_inputs(
    config: &diffusion_models::UNet2DConditionModelConfig,
    size: usize,
    dtype: FloatDType,
    device: &Device,
) -> (Tensor<4>, Tensor<3>, Option<AddedCondKwargs>) {
    let x = randn([2, config.in_channels, size, size], dtype, device);
    let cross = config
        .cross_attention_dim
        .resolve(config.down_block_types.len())
        .expect("one value per block")[0];
    let states = randn([2, 77, cross], dtype, device);
    let added =
        (config.addition_embed_type.as_deref() == Some("text_time")).then(|| AddedCondKwargs {
            text_embeds: Some(randn([2, 1280], dtype, device)),
            time_ids: Some(
                Tensor::<2>::from_floats([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]; 2], device)
                    .cast(dtype),
            ),
            image_embeds: None,
        });
    (x, states, added)
}

/// Stable Diffusion 1.5's scheduler config with the Euler scheduler, as
/// `EulerDiscreteScheduler.from_config(pipe.scheduler.config)` gives it.
fn euler_scheduler() -> Result<AnyScheduler> {
    let config = serde_json::json!({
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    });
    Ok(AnyScheduler::from_config_value(
        config,
        std::path::Path::new("sd_gpu scheduler"),
    )?)
}

/// One text-to-image generation as the Stable Diffusion pipelines run it once the prompt is
/// encoded: latents scaled by `init_noise_sigma`, `steps` guided UNet steps (uncond and cond in
/// one batch of 2), the scheduler's step, then `decode(latents / scaling_factor)` mapped to
/// `[0, 1]`.
#[allow(clippy::too_many_arguments)]
fn generate(
    unet: &UNet2DConditionModel,
    vae: &AutoencoderKL,
    states: &Tensor<3>,
    added: &Option<AddedCondKwargs>,
    size: usize,
    steps: usize,
    dtype: FloatDType,
    device: &Device,
) -> Result<Tensor<4>> {
    let mut scheduler = euler_scheduler()?;
    scheduler.set_timesteps(steps)?;
    let timesteps = scheduler.timesteps().to_vec();
    let mut latents =
        randn([1, 4, size, size], dtype, device).mul_scalar(scheduler.init_noise_sigma());
    for t in timesteps {
        let input = Tensor::cat(vec![latents.clone(), latents.clone()], 0);
        let input = scheduler.scale_model_input(input, t)?;
        let timestep = Tensor::<1>::from_floats([t as f32], device);
        let options = UNet2DConditionOptions {
            added_cond_kwargs: added.clone(),
            ..Default::default()
        };
        let noise = unet.forward_with(input, timestep, states.clone(), options)?;
        let uncond = noise.clone().narrow(0, 0, 1);
        let text = noise.narrow(0, 1, 1);
        let guided = uncond.clone().add(text.sub(uncond).mul_scalar(7.5));
        latents = scheduler
            .step(guided, t, latents, StepOptions::default())?
            .prev_sample;
    }
    let scaling = vae.config().scaling_factor;
    let image = vae.decode(latents.div_scalar(scaling))?;
    Ok(image.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0))
}

/// One operator at SD 1.5 shapes (batch 2, 64×64 latents): name, FLOPs, and the call.
/// An operator to time: its name, FLOPs and a closure returning its output (held until the
/// device has run it: see [`time_ms`]).
type Op = (&'static str, f64, Box<dyn Fn() -> Output>);
/// Any operator's output.
type Output = Box<dyn std::any::Any>;

/// A 3×3 convolution `c → c` (padding 1) on `[batch, c, hw, hw]` through `kernels::conv2d`
/// (the `--conv` route), with its FLOPs.
fn conv3x3_op(
    name: String,
    batch: usize,
    c: usize,
    hw: usize,
    dtype: FloatDType,
    device: &Device,
) -> Op {
    use diffusion_core::burn::nn::PaddingConfig2d;
    use diffusion_core::burn::nn::conv::Conv2dConfig;
    use diffusion_core::burn::tensor::ops::ConvOptions;
    let conv = to_dtype(
        Conv2dConfig::new([c, c], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(device),
        dtype,
    )
    .expect("conv dtype");
    let x = randn([batch, c, hw, hw], dtype, device);
    let flops = 2.0 * (batch * hw * hw * c * c * 9) as f64;
    let name: &'static str = Box::leak(name.into_boxed_str());
    let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
    (
        name,
        flops,
        Box::new(move || -> Output {
            Box::new(diffusion_core::kernels::conv2d(
                x.clone(),
                conv.weight.val(),
                conv.bias.as_ref().map(|b| b.val()),
                options.clone(),
            ))
        }),
    )
}

/// GroupNorm(32) + SiLU with unit affine parameters on `x` (this crate's fused kernel).
fn group_norm_op(name: String, x: Tensor<4>, eps: f64, dtype: FloatDType, device: &Device) -> Op {
    let c = x.dims()[1];
    let gamma = Tensor::<1>::ones([c], device).cast(dtype);
    let beta = Tensor::<1>::zeros([c], device).cast(dtype);
    let name: &'static str = Box::leak(name.into_boxed_str());
    (
        name,
        0.0,
        Box::new(move || -> Output {
            Box::new(diffusion_core::kernels::group_norm(
                x.clone(),
                gamma.clone(),
                beta.clone(),
                32,
                eps,
                true,
            ))
        }),
    )
}

fn ops(dtype: FloatDType, device: &Device) -> Vec<Op> {
    use diffusion_core::burn::nn::LinearConfig;
    let mut out: Vec<Op> = Vec::new();
    for (c, hw) in [(320usize, 64usize), (640, 32), (1280, 16), (1280, 8)] {
        out.push(conv3x3_op(
            format!("conv3x3_{c}x{hw}"),
            2,
            c,
            hw,
            dtype,
            device,
        ));
    }
    // The VAE decoder's levels at a 512×512 decode (batch 1): where its time goes.
    for (c, hw) in [(512usize, 64usize), (512, 128), (256, 256), (128, 512)] {
        out.push(conv3x3_op(
            format!("vae_conv3x3_{c}x{hw}"),
            1,
            c,
            hw,
            dtype,
            device,
        ));
        let x = randn([1, c, hw, hw], dtype, device);
        out.push(group_norm_op(
            format!("vae_group_norm_silu_{c}x{hw}"),
            x,
            1e-6,
            dtype,
            device,
        ));
    }
    let x = randn([1, 512, 128, 128], dtype, device);
    out.push((
        "vae_upsample_nearest_512x128",
        0.0,
        Box::new(move || -> Output {
            Box::new(diffusion_models::upsampling::upsample_nearest(x.clone(), 2))
        }),
    ));
    for (rows, k, n) in [
        (8192usize, 320usize, 2560usize),
        (8192, 1280, 320),
        (8192, 320, 320),
    ] {
        let linear = to_dtype(LinearConfig::new(k, n).init(device), dtype).expect("dtype");
        let x = randn([rows, k], dtype, device);
        let name: &'static str = Box::leak(format!("linear_{rows}x{k}x{n}").into_boxed_str());
        let flops = 2.0 * (rows * k * n) as f64;
        out.push((
            name,
            flops,
            Box::new(move || -> Output { Box::new(linear.forward(x.clone())) }),
        ));
    }
    // (name, heads, query tokens, key tokens, head dim): SD 1.5's first and second levels,
    // SDXL's second level, the VAE mid-block at 512×512 (batch 1).
    for (name, heads, s_q, kv, d) in [
        ("attn_self_4096x40", 8usize, 4096usize, 4096usize, 40usize),
        ("attn_cross_4096x77x40", 8, 4096, 77, 40),
        ("attn_self_1024x80", 8, 1024, 1024, 80),
        ("attn_cross_1024x77x80", 8, 1024, 77, 80),
        ("attn_self_4096x64_sdxl", 10, 4096, 4096, 64),
        ("attn_vae_4096x512", 1, 4096, 4096, 512),
    ] {
        let batch = if name.starts_with("attn_vae") { 1 } else { 2 };
        let q = randn([batch, heads, s_q, d], dtype, device);
        let k = randn([batch, heads, kv, d], dtype, device);
        let v = randn([batch, heads, kv, d], dtype, device);
        let flops = 4.0 * (batch * heads * s_q * kv * d) as f64;
        out.push((
            name,
            flops,
            Box::new(move || -> Output {
                Box::new(diffusion_core::kernels::attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    None,
                ))
            }),
        ));
    }
    // One chunk of attention's matmul route: 4 heads of 4096×4096 scores, softmax in f32,
    // rounded back to the dtype (`kernels::softmax`: the fused kernel with `softmax` on, the
    // cast + softmax + cast of burn ops off).
    let scores = randn([4, 4096, 4096], dtype, device);
    out.push((
        "softmax_upcast_4x4096x4096",
        0.0,
        Box::new(move || -> Output { Box::new(diffusion_core::kernels::softmax(scores.clone())) }),
    ));
    let y = randn([2, 320, 64, 64], dtype, device);
    out.push(group_norm_op(
        "group_norm_silu_320x64".into(),
        y.clone(),
        1e-5,
        dtype,
        device,
    ));
    let x = y.clone();
    out.push((
        "add_320x64",
        0.0,
        Box::new(move || -> Output { Box::new(x.clone().add(y.clone())) }),
    ));
    out
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let device = device(&args.device)?;
    let flops: serde_json::Value = serde_json::from_str(FLOPS)?;
    select_kernels("on");
    if !uses_kernels(&device) {
        eprintln!("note: {device:?} is not a CubeCL device; `--kernels on` runs burn ops too");
    }
    for dtype_name in &args.dtypes {
        let dtype = dtype_name.parse::<Precision>()?.float_dtype();
        if !device.supports_dtype(dtype) {
            eprintln!("skipping {dtype_name}: not supported by {device:?}");
            continue;
        }
        if args.kinds.iter().any(|k| k == "unet") {
            for (name, config, size) in gpu_unet_configs() {
                if !args.models.iter().any(|m| m == name) {
                    continue;
                }
                let size = args.latent.unwrap_or(size);
                device.memory_cleanup();
                let model = with_random_weights(
                    UNet2DConditionModel::from_config(&config, &device)?,
                    dtype,
                )?;
                let loaded_mib = settled_in_use_mib(&device);
                let (x, states, added) = unet_inputs(&config, size, dtype, &device);
                let t = Tensor::<1>::from_floats([500.0], &device);
                let forward = || {
                    let options = UNet2DConditionOptions {
                        added_cond_kwargs: added.clone(),
                        ..Default::default()
                    };
                    model
                        .forward_with(x.clone(), t.clone(), states.clone(), options)
                        .expect("UNet forward")
                };
                for variant @ (kernels, attention, conv) in variants(&args) {
                    select(variant);
                    device.memory_cleanup();
                    let row = |graph, ms| Row {
                        kind: "unet",
                        model: name,
                        dtype: dtype_name,
                        kernels,
                        attention,
                        conv,
                        graph,
                        ms,
                        steps: args.steps,
                        loaded_mib,
                        latent: args.latent,
                    };
                    let ms = time_ms(&device, args.warmup, args.iters, &forward);
                    report(&device, row(None, ms), &flops);
                    if args.graph {
                        let mut graph = capture(&device, forward);
                        let hardware = graph.is_hardware();
                        // Safety: the closure owns clones of every input and borrows the model,
                        // all of which outlive the graph; one thread, one stream.
                        let ms = time_ms(&device, args.warmup, args.iters, || unsafe {
                            graph.replay();
                        });
                        drop(graph);
                        report(&device, row(Some(hardware), ms), &flops);
                    }
                }
            }
        }
        if args.kinds.iter().any(|k| k == "vae_decode") {
            for (name, config, size) in gpu_vae_configs() {
                if !args.models.iter().any(|m| m == name) {
                    continue;
                }
                let size = args.latent.unwrap_or(size);
                device.memory_cleanup();
                let model =
                    with_random_weights(AutoencoderKL::from_config(&config, &device)?, dtype)?;
                let loaded_mib = settled_in_use_mib(&device);
                let z = randn([1, config.latent_channels, size, size], dtype, &device);
                for variant @ (kernels, attention, conv) in variants(&args) {
                    select(variant);
                    device.memory_cleanup();
                    let ms = time_ms(&device, args.warmup, args.iters, || {
                        model.decode(z.clone()).expect("VAE decode")
                    });
                    let row = Row {
                        kind: "vae_decode",
                        model: name,
                        dtype: dtype_name,
                        kernels,
                        attention,
                        conv,
                        graph: None,
                        ms,
                        steps: args.steps,
                        loaded_mib,
                        latent: args.latent,
                    };
                    report(&device, row, &flops);
                }
            }
        }
        if args.kinds.iter().any(|k| k == "ops") {
            let ops = ops(dtype, &device);
            for variant @ (kernels, attention, conv) in variants(&args) {
                select(variant);
                for (name, flops, op) in &ops {
                    let ms = time_ms(&device, args.warmup, args.iters, op);
                    let json = serde_json::json!({
                        "impl": format!("burn-kernels-{kernels}"),
                        "attention": attention.name(),
                        "conv": conv.name(),
                        "kind": "op",
                        "op": name,
                        "dtype": dtype_name,
                        "ms": (ms * 1e4).round() / 1e4,
                        "tflops": (*flops > 0.0).then(|| (flops / ms / 1e9 * 100.0).round() / 100.0),
                    });
                    println!("{json}");
                }
            }
        }
        if args.kinds.iter().any(|k| k == "pipeline") {
            let vaes = gpu_vae_configs();
            for (name, config, size) in gpu_unet_configs() {
                if !args.models.iter().any(|m| m == name) {
                    continue;
                }
                let size = args.latent.unwrap_or(size);
                let Some((_, vae_config, _)) = vaes.iter().find(|(v, _, _)| *v == name) else {
                    continue;
                };
                device.memory_cleanup();
                let unet = with_random_weights(
                    UNet2DConditionModel::from_config(&config, &device)?,
                    dtype,
                )?;
                let vae =
                    with_random_weights(AutoencoderKL::from_config(vae_config, &device)?, dtype)?;
                let loaded_mib = settled_in_use_mib(&device);
                let (_, states, added) = unet_inputs(&config, size, dtype, &device);
                for variant @ (kernels, attention, conv) in variants(&args) {
                    select(variant);
                    device.memory_cleanup();
                    let ms = time_ms(&device, 1, args.pipeline_iters, || {
                        generate(
                            &unet, &vae, &states, &added, size, args.steps, dtype, &device,
                        )
                        .expect("generation")
                    });
                    let row = Row {
                        kind: "pipeline",
                        model: name,
                        dtype: dtype_name,
                        kernels,
                        attention,
                        conv,
                        graph: None,
                        ms,
                        steps: args.steps,
                        loaded_mib,
                        latent: args.latent,
                    };
                    report(&device, row, &flops);
                }
            }
        }
    }
    // What the `tune` routes chose, shape by shape, with every candidate's time.
    for choice in tuned_choices() {
        let json = serde_json::json!({
            "kind": "tuned",
            "op": choice.op,
            "shape": choice.shape,
            "chosen": choice.chosen,
            "times_ms": choice.times_ms,
        });
        println!("{json}");
    }
    Ok(())
}
