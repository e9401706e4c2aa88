//! Stable Diffusion 1.5 and SDXL on a GPU, random weights: one UNet2DConditionModel step at
//! batch 2 (classifier-free guidance's batch, 77 text tokens) and one full-size VAE decode at
//! batch 1, per dtype, with this crate's fused kernels (`diffusion_core::kernels`) and with
//! burn's own ops (`--kernels`: `on` both kernels, `off` none, `group_norm` or `attention` one),
//! so they are compared in one run. One JSON object per line, with the same
//! keys as `benches/python/bench_sd_gpu.py` prints for diffusers:
//!
//! ```text
//! cargo build --release -p diffusion-benches --no-default-features --features cuda --bin sd_gpu
//! sd_gpu [--device cuda|wgpu|cubecl-cpu] [--models sd15,sdxl] [--kinds unet,vae_decode]
//!        [--dtypes f16,bf16,f32] [--kernels on,off,group_norm,attention] [--iters 10]
//!        [--warmup 3]
//! python benches/python/bench_sd_gpu.py        # diffusers on the same configs
//! ```
//!
//! Times are wall-clock over `iters` forwards after `warmup` ones, with the device synchronised
//! before the clock starts and before it is read. Memory is what burn's pools hold after the
//! timed forwards (`bytes_reserved`, pools grow to the peak and keep it; `memory_cleanup` runs
//! before each measurement). TFLOP/s uses the FLOPs PyTorch's flop counter finds in the same
//! forward (`benches/python/sd_gpu_flops.json`, from `bench_sd_gpu.py --flops-only`).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use diffusion_benches::{gpu_unet_configs, gpu_vae_configs};
use diffusion_core::burn::tensor::{Distribution, FloatDType, Tensor};

use diffusion_core::kernels::{Kernel, set_kernel_enabled, uses_kernels};
use diffusion_core::{Device, Precision};
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{
    AddedCondKwargs, AutoencoderKL, ModelMixin, UNet2DConditionModel, UNet2DConditionOptions,
};

const FLOPS: &str = include_str!("../../python/sd_gpu_flops.json");

struct Args {
    device: String,
    models: Vec<String>,
    kinds: Vec<String>,
    dtypes: Vec<String>,
    kernels: Vec<String>,
    iters: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        device: "cuda".into(),
        models: vec!["sd15".into(), "sdxl".into()],
        kinds: vec!["unet".into(), "vae_decode".into()],
        dtypes: vec!["f16".into(), "bf16".into(), "f32".into()],
        kernels: vec!["on".into(), "off".into()],
        iters: 10,
        warmup: 3,
    };
    let list = |v: String| v.split(',').map(str::to_string).collect::<Vec<_>>();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--device" => args.device = value,
            "--models" => args.models = list(value),
            "--kinds" => args.kinds = list(value),
            "--dtypes" => args.dtypes = list(value),
            "--kernels" => {
                args.kernels = list(value);
                if let Some(bad) = args
                    .kernels
                    .iter()
                    .find(|k| !matches!(k.as_str(), "on" | "off" | "group_norm" | "attention"))
                {
                    bail!("--kernels takes on, off, group_norm, attention; not {bad}");
                }
            }
            "--iters" => args.iters = value.parse()?,
            "--warmup" => args.warmup = value.parse()?,
            other => bail!("unknown flag {other} (see the doc comment of sd_gpu.rs)"),
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
fn time_ms(device: &Device, warmup: usize, iters: usize, mut forward: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        forward();
    }
    device.sync().expect("device sync");
    let start = Instant::now();
    for _ in 0..iters {
        forward();
    }
    device.sync().expect("device sync");
    start.elapsed().as_secs_f64() * 1e3 / iters as f64
}

struct Row<'a> {
    kind: &'a str,
    model: &'a str,
    dtype: &'a str,
    kernels: &'a str,
    ms: f64,
}

/// Switch the kernels as `--kernels` names them.
fn select_kernels(mode: &str) {
    set_kernel_enabled(Kernel::GroupNorm, matches!(mode, "on" | "group_norm"));
    set_kernel_enabled(Kernel::Attention, matches!(mode, "on" | "attention"));
}

fn report(device: &Device, row: Row<'_>, flops: &serde_json::Value) {
    let reserved = device.memory_pool_usage().map(|u| u.bytes_reserved);
    let in_use = device.memory_pool_usage().map(|u| u.bytes_in_use);
    let mib = |b: Option<u64>| b.map(|b| (b as f64 / 1048576.0 * 10.0).round() / 10.0);
    let gflop = flops[format!("{}/{}", row.kind, row.model)]
        .as_f64()
        .map(|f| f / 1e9);
    let json = serde_json::json!({
        "impl": format!("burn-kernels-{}", row.kernels),
        "device": format!("{device:?}"),
        "kind": row.kind,
        "model": row.model,
        "dtype": row.dtype,
        "ms": (row.ms * 1000.0).round() / 1000.0,
        "peak_reserved_mib": mib(reserved),
        "in_use_mib": mib(in_use),
        "gflop": gflop.map(|g| g.round()),
        "tflops": gflop.map(|g| (g / row.ms * 100.0).round() / 100.0),
    });
    println!("{json}");
}

fn randn<const D: usize>(shape: [usize; D], dtype: FloatDType, device: &Device) -> Tensor<D> {
    Tensor::<D>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
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
                device.memory_cleanup();
                let model = to_dtype(UNet2DConditionModel::from_config(&config, &device)?, dtype)?;
                let x = randn([2, config.in_channels, size, size], dtype, &device);
                let cross = config
                    .cross_attention_dim
                    .resolve(config.down_block_types.len())
                    .expect("one value per block")[0];
                let states = randn([2, 77, cross], dtype, &device);
                let t = Tensor::<1>::from_floats([500.0], &device);
                let added =
                    (config.addition_embed_type.as_deref() == Some("text_time")).then(|| {
                        AddedCondKwargs {
                            text_embeds: Some(randn([2, 1280], dtype, &device)),
                            time_ids: Some(
                                Tensor::<2>::from_floats(
                                    [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]; 2],
                                    &device,
                                )
                                .cast(dtype),
                            ),
                            image_embeds: None,
                        }
                    });
                for kernels in &args.kernels {
                    select_kernels(kernels);
                    device.memory_cleanup();
                    let ms = time_ms(&device, args.warmup, args.iters, || {
                        let options = UNet2DConditionOptions {
                            added_cond_kwargs: added.clone(),
                            ..Default::default()
                        };
                        let out = model
                            .forward_with(x.clone(), t.clone(), states.clone(), options)
                            .expect("UNet forward");
                        drop(out);
                    });
                    let row = Row {
                        kind: "unet",
                        model: name,
                        dtype: dtype_name,
                        kernels,
                        ms,
                    };
                    report(&device, row, &flops);
                }
            }
        }
        if args.kinds.iter().any(|k| k == "vae_decode") {
            for (name, config, size) in gpu_vae_configs() {
                if !args.models.iter().any(|m| m == name) {
                    continue;
                }
                device.memory_cleanup();
                let model = to_dtype(AutoencoderKL::from_config(&config, &device)?, dtype)?;
                let z = randn([1, config.latent_channels, size, size], dtype, &device);
                for kernels in &args.kernels {
                    select_kernels(kernels);
                    device.memory_cleanup();
                    let ms = time_ms(&device, args.warmup, args.iters, || {
                        drop(model.decode(z.clone()).expect("VAE decode"));
                    });
                    let row = Row {
                        kind: "vae_decode",
                        model: name,
                        dtype: dtype_name,
                        kernels,
                        ms,
                    };
                    report(&device, row, &flops);
                }
            }
        }
    }
    Ok(())
}
