//! Stable Diffusion's models on the CPU default backend (random weights): one
//! UNet2DConditionModel forward (batch 2, as classifier-free guidance runs it, 77 text tokens)
//! and one VAE decode (batch 1), for the configs in `diffusion_benches`.
//! `benches/python/bench_sd_models.py` runs the same forwards in PyTorch.
//!
//! `SD_BENCH=tiny` (or `sd15`) restricts the run to one size.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use diffusion_benches::{cpu_devices, unet2d_condition_configs, vae_configs};
use diffusion_core::burn::tensor::{Distribution, Tensor};
use diffusion_models::{AutoencoderKL, ModelMixin, UNet2DConditionModel};

fn selected(name: &str) -> bool {
    match std::env::var("SD_BENCH") {
        Ok(only) => name.contains(only.as_str()),
        Err(_) => true,
    }
}

fn bench_unet(c: &mut Criterion) {
    let mut group = c.benchmark_group("unet2d_condition_forward");
    group.sample_size(10);
    for (device_name, device) in cpu_devices() {
        for (name, config, size) in unet2d_condition_configs() {
            if !selected(name) {
                continue;
            }
            let model = UNet2DConditionModel::from_config(&config, &device).expect("config");
            let batch = 2;
            let x = Tensor::<4>::random(
                [batch, config.in_channels, size, size],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let cross = config
                .cross_attention_dim
                .resolve(config.down_block_types.len())
                .expect("one value per block")[0];
            let states =
                Tensor::<3>::random([batch, 77, cross], Distribution::Normal(0.0, 1.0), &device);
            let t = Tensor::<1>::from_floats([500.0], &device);
            let id = BenchmarkId::new(format!("{device_name}/{name}"), format!("batch{batch}"));
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    let out = model
                        .forward(x.clone(), t.clone(), states.clone())
                        .expect("forward");
                    // Reading back makes lazy backends finish the work inside the timing.
                    out.into_data()
                })
            });
        }
    }
    group.finish();
}

fn bench_vae_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("vae_decode");
    group.sample_size(10);
    for (device_name, device) in cpu_devices() {
        for (name, config, size) in vae_configs() {
            if !selected(name) {
                continue;
            }
            let model = AutoencoderKL::from_config(&config, &device).expect("config");
            let z = Tensor::<4>::random(
                [1, config.latent_channels, size, size],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let id = BenchmarkId::new(format!("{device_name}/{name}"), format!("latent{size}"));
            group.bench_function(id, |bench| {
                bench.iter(|| model.decode(z.clone()).expect("decode").into_data())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_unet, bench_vae_decode);
criterion_main!(benches);
