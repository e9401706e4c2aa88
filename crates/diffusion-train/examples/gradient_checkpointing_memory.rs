//! Peak memory and step time of full fine-tuning steps of a Stable Diffusion UNet, with and
//! without gradient checkpointing, on the flex CPU backend. Run it once per setting (the peak
//! resident size, `VmHWM` of /proc/self/status, covers the whole process):
//!
//! ```text
//! cargo run -p diffusion-train --example gradient_checkpointing_memory -- \
//!     fixtures/pipelines/sd/sd1 [--gradient-checkpointing] [--latent 96] [--batch 2] [--steps 2]
//! ```
//!
//! The latents, text states and noise are random (fixed seed); only memory and time matter.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use diffusion_core::Device;
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_models::{ModelMixin, UNet2DConditionModel};
use diffusion_train::{NoiseDraws, TextToImageConfig, TextToImageTrainer, load_noise_scheduler};

/// Peak resident set size of this process in KiB (Linux).
fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `n` values in [-1, 1) from a 64-bit LCG.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model: PathBuf = args
        .next()
        .context("give the Stable Diffusion folder")?
        .into();
    let (mut gc, mut latent, mut batch, mut steps) = (false, 96usize, 2usize, 2usize);
    while let Some(flag) = args.next() {
        let mut number = |name: &str| -> anyhow::Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| name.to_string())
        };
        match flag.as_str() {
            "--gradient-checkpointing" => gc = true,
            "--latent" => latent = number("--latent")?,
            "--batch" => batch = number("--batch")?,
            "--steps" => steps = number("--steps")?,
            other => bail!("unknown flag {other}"),
        }
    }
    let device = Device::flex();
    let config = TextToImageConfig {
        pretrained_model: model.clone(),
        lr_warmup_steps: 0,
        show_progress: false,
        gradient_checkpointing: gc,
        ..TextToImageConfig::default()
    };
    let unet = UNet2DConditionModel::from_pretrained(model.join("unet"), &device)?;
    let channels = unet.config().in_channels;
    let context = match &unet.config().cross_attention_dim {
        diffusion_models::unets::unet_2d_condition::PerBlock::One(d) => *d,
        diffusion_models::unets::unet_2d_condition::PerBlock::List(d) => d[0],
    };
    let scheduler = load_noise_scheduler(&model)?;
    let mut trainer = TextToImageTrainer::new(&config, unet, None, scheduler, steps, &device)?;
    let shape = [batch, channels, latent, latent];
    let n = shape.iter().product();
    let latents = Tensor::<4>::from_data(TensorData::new(values(n, 1), shape), &device);
    let states = Tensor::<3>::from_data(
        TensorData::new(values(batch * 8 * context, 2), [batch, 8, context]),
        &device,
    );
    let before = vm_hwm_kib().unwrap_or(0);
    let start = Instant::now();
    for step in 0..steps {
        let draws = NoiseDraws {
            noise: Tensor::<4>::from_data(
                TensorData::new(values(n, 10 + step as u64), shape),
                &device,
            ),
            offset_noise: None,
            perturbation: None,
            timesteps: (0..batch).map(|i| (137 * (step + i + 1)) % 1000).collect(),
        };
        let stats = trainer
            .step(latents.clone(), states.clone(), &draws)?
            .context("no accumulation")?;
        eprintln!("step {step}: loss {}", stats.loss);
    }
    let seconds = start.elapsed().as_secs_f64() / steps as f64;
    println!(
        "gradient_checkpointing={gc} latent={latent} batch={batch}: {seconds:.2} s/step, \
         VmHWM {} MiB (before the steps {} MiB)",
        vm_hwm_kib().unwrap_or(0) / 1024,
        before / 1024
    );
    Ok(())
}
