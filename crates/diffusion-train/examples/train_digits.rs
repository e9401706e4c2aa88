//! Train a small UNet2DModel on scikit-learn's handwritten digits, then sample a grid with DDIM.
//!
//! ```text
//! cargo run --release -p diffusion-train --example train_digits -- \
//!     digits.csv.gz out/ddpm-digits [--steps N] [--resolution 8] [--batch 64] [--channels 32,64,64]
//!     [--checkpoint-every 500]
//!     [--sample-only | --no-sample]
//! ```
//!
//! `digits.csv.gz` ships in the scikit-learn wheel (`sklearn/datasets/data/digits.csv.gz`).
//! Training resumes from the newest checkpoint in the output folder. Samples go to
//! `<output>/samples.png`.

use diffusion_models::ModelMixin;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::config::ConfigFile;
use diffusion_core::image::{make_image_grid, save_png};
use diffusion_core::{Device, TorchGenerator};
use diffusion_models::UNet2DModel;
use diffusion_schedulers::{
    ConfiguredScheduler, DDIMScheduler, DDIMSchedulerConfig, DDPMSchedulerConfig, Scheduler,
    StepOptions,
};
use diffusion_train::{ImageDataset, TrainConfig, train_unconditional};

struct Args {
    data: PathBuf,
    output: PathBuf,
    steps: Option<usize>,
    resolution: usize,
    batch: Option<usize>,
    checkpoint_every: Option<usize>,
    channels: Option<Vec<usize>>,
    sample_only: bool,
    no_sample: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut positional = Vec::new();
    let mut args = Args {
        data: PathBuf::new(),
        output: PathBuf::new(),
        steps: None,
        resolution: 8,
        batch: None,
        checkpoint_every: None,
        channels: None,
        sample_only: false,
        no_sample: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| name.to_string())
        };
        match a.as_str() {
            "--steps" => args.steps = Some(value("--steps")?),
            "--resolution" => args.resolution = value("--resolution")?,
            "--batch" => args.batch = Some(value("--batch")?),
            "--checkpoint-every" => args.checkpoint_every = Some(value("--checkpoint-every")?),
            "--channels" => {
                let list = it
                    .next()
                    .context("--channels needs a value like 32,64,64")?;
                let parsed = list
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<Vec<usize>, _>>();
                args.channels = Some(parsed.context("--channels")?);
            }
            "--sample-only" => args.sample_only = true,
            "--no-sample" => args.no_sample = true,
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [data, output] = <[PathBuf; 2]>::try_from(positional).map_err(|_| {
        anyhow::anyhow!("usage: train_digits <digits.csv.gz> <output_dir> [options]")
    })?;
    args.data = data;
    args.output = output;
    Ok(args)
}

/// 50 DDIM steps from the exported pipeline, 64 samples in an 8x8 grid.
fn sample(dir: &Path, device: &Device) -> anyhow::Result<()> {
    let unet = UNet2DModel::from_pretrained(dir.join("unet"), device)?;
    let ddpm =
        ConfigFile::<DDPMSchedulerConfig>::load(dir.join("scheduler/scheduler_config.json"))?;
    let mut scheduler =
        DDIMScheduler::from_config_file(ddpm.convert::<DDIMSchedulerConfig>(&Default::default())?)?;
    scheduler.set_timesteps(50)?;
    let c = unet.config();
    let side = match c.sample_size {
        Some(diffusion_models::unets::unet_2d::SampleSize::Square(s)) => s,
        Some(diffusion_models::unets::unet_2d::SampleSize::Rect([h, _])) => h,
        None => 16,
    };
    let shape = [64, c.in_channels, side, side];
    let mut generator = TorchGenerator::new(0);
    let mut x = Tensor::<4>::from_data(TensorData::new(generator.randn(&shape), shape), device);
    for t in scheduler.timesteps().to_vec() {
        let eps = unet.forward(
            x.clone(),
            Tensor::from_data(TensorData::new(vec![t as f32], [1]), device),
            None,
        )?;
        x = scheduler
            .step(eps, t, x, StepOptions::default())?
            .prev_sample;
    }
    let pixels = diffusion_core::tensor::to_vec(x.add_scalar(1.0).div_scalar(2.0).clamp(0.0, 1.0));
    let per = c.in_channels * side * side;
    let images: Vec<image::RgbImage> = pixels
        .chunks_exact(per)
        .map(|img| {
            image::RgbImage::from_fn(side as u32, side as u32, |x, y| {
                let at = |ch: usize| {
                    (img[(ch * side + y as usize) * side + x as usize] * 255.0).round() as u8
                };
                if c.in_channels == 1 {
                    image::Rgb([at(0); 3])
                } else {
                    image::Rgb([at(0), at(1), at(2)])
                }
            })
        })
        .collect();
    // Each sample scaled to 32 pixels (nearest) on a gray frame, so tiny digits stay legible.
    let framed: Vec<image::RgbImage> = images
        .iter()
        .map(|img| {
            let big = image::imageops::resize(img, 32, 32, image::imageops::FilterType::Nearest);
            let mut frame = image::RgbImage::from_pixel(36, 36, image::Rgb([96, 96, 96]));
            image::imageops::replace(&mut frame, &big, 2, 2);
            frame
        })
        .collect();
    let grid = make_image_grid(&framed, 8, 8)?;
    save_png(dir.join("samples.png"), &grid, &[])?;
    println!("wrote {}", dir.join("samples.png").display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let device = Device::flex();
    if !args.sample_only {
        let data = ImageDataset::from_digits_csv_gz(&args.data, args.resolution)?;
        let mut config = TrainConfig {
            output_dir: args.output.clone(),
            resume_from_checkpoint: Some("latest".into()),
            ..TrainConfig::digits()
        };
        if let Some(steps) = args.steps {
            config.max_train_steps = Some(steps);
        }
        if let Some(batch) = args.batch {
            config.train_batch_size = batch;
        }
        if let Some(every) = args.checkpoint_every {
            config.checkpointing_steps = every;
        }
        if let Some(channels) = args.channels {
            // Same block layout, other widths (the number of levels must stay 3).
            if channels.len() != config.model.block_out_channels.len() {
                bail!(
                    "--channels takes {} widths",
                    config.model.block_out_channels.len()
                );
            }
            config.model.block_out_channels = channels;
        }
        let report = train_unconditional(&config, &data, &device)?;
        let losses = report.losses();
        let tail = &losses[losses.len().saturating_sub(50)..];
        println!(
            "{} steps ({} -> {}) in {:.1}s: {:.2} steps/s, mean loss of the last {}: {:.4}",
            report.steps.len(),
            report.start_step,
            report.global_step,
            report.elapsed.as_secs_f64(),
            report.steps_per_second(),
            tail.len(),
            tail.iter().sum::<f32>() / tail.len().max(1) as f32
        );
    }
    if args.no_sample {
        return Ok(());
    }
    sample(&args.output, &device)
}
