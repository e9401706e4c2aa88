//! Training throughput: one optimizer step (forward, backward, global-norm clipping, AdamW) in
//! samples per second, on the CPU default backend:
//!
//! - `text_to_image`: the tiny SD1 `UNet2DConditionModel` (fixtures/pipelines/sd/sd1) on a
//!   batch of 2 latents of 32x32 images (`[2, 4, 16, 16]`) with `[2, 77, 8]` text states, as
//!   `diffusion_train::TextToImageTrainer` steps (the frozen VAE and text encoder are outside
//!   the timing, as with cached latents);
//! - `unconditional`: the tiny `UNet2DModel` of fixtures/train/tiny_unet on a batch of 2
//!   1x32x32 images, as `diffusion_train::Trainer` steps.
//!
//! `benches/python/bench_train_step.py` times the same steps in PyTorch/diffusers.

use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use diffusion_benches::cpu_devices;
use diffusion_core::burn::tensor::{Distribution, Tensor};
use diffusion_models::{ModelMixin, UNet2DConditionModel, UNet2DModel};
use diffusion_train::{
    NoiseDraws, TextToImageConfig, TextToImageTrainer, TrainConfig, Trainer, load_noise_scheduler,
};

const BATCH: usize = 2;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn bench_train_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group.sample_size(20);
    group.throughput(Throughput::Elements(BATCH as u64));
    let sd1 = fixtures().join("pipelines/sd/sd1");
    for (device_name, device) in cpu_devices() {
        let unet = UNet2DConditionModel::from_pretrained(sd1.join("unet"), &device)
            .expect("tiny SD1 UNet");
        let config = TextToImageConfig {
            pretrained_model: sd1.clone(),
            learning_rate: 1e-4,
            lr_warmup_steps: 0,
            show_progress: false,
            ..TextToImageConfig::default()
        };
        let scheduler = load_noise_scheduler(&sd1).expect("scheduler");
        let mut trainer =
            TextToImageTrainer::new(&config, unet, None, scheduler, 1_000_000, &device)
                .expect("trainer");
        let normal = Distribution::Normal(0.0, 1.0);
        let latents = Tensor::<4>::random([BATCH, 4, 16, 16], normal, &device);
        let states = Tensor::<3>::random([BATCH, 77, 8], normal, &device);
        let draws = NoiseDraws {
            noise: Tensor::<4>::random([BATCH, 4, 16, 16], normal, &device),
            offset_noise: None,
            perturbation: None,
            timesteps: vec![10, 500],
        };
        group.bench_function(BenchmarkId::new(device_name, "text_to_image"), |bench| {
            bench.iter(|| {
                // The step reads the loss back, so the work is done inside the timing.
                trainer
                    .step(latents.clone(), states.clone(), &draws)
                    .expect("step")
            })
        });

        let model = UNet2DModel::from_pretrained(fixtures().join("train/tiny_unet"), &device)
            .expect("tiny UNet2DModel");
        let config = TrainConfig {
            lr_warmup_steps: 0,
            use_ema: false,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(&config, model, 1_000_000, &device).expect("trainer");
        let x0 = Tensor::<4>::random([BATCH, 1, 32, 32], normal, &device);
        let noise = Tensor::<4>::random([BATCH, 1, 32, 32], normal, &device);
        group.bench_function(BenchmarkId::new(device_name, "unconditional"), |bench| {
            bench.iter(|| {
                trainer
                    .step(x0.clone(), noise.clone(), &[10, 500])
                    .expect("step")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);
