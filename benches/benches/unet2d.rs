//! One UNet2DModel forward on the CPU default backend (random weights), for the configs in
//! `diffusion_benches::unet2d_configs`. `benches/python/bench_unet2d.py` runs the same forwards
//! in PyTorch.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use diffusion_benches::{cpu_devices, unet2d_configs};
use diffusion_core::burn::tensor::{Distribution, Tensor};
use diffusion_models::UNet2DModel;

fn bench_unet2d(c: &mut Criterion) {
    let mut group = c.benchmark_group("unet2d_forward");
    group.sample_size(10);
    for (device_name, device) in cpu_devices() {
        for (name, config, size) in unet2d_configs() {
            let model = UNet2DModel::new(&config, &device).expect("valid benchmark config");
            for batch in [1usize, 8] {
                let x = Tensor::<4>::random(
                    [batch, config.in_channels, size, size],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                );
                let t = Tensor::<1>::from_floats([500.0], &device);
                let id = BenchmarkId::new(format!("{device_name}/{name}"), format!("batch{batch}"));
                group.bench_function(id, |bench| {
                    bench.iter(|| {
                        let out = model.forward(x.clone(), t.clone(), None).expect("forward");
                        // Reading back makes lazy backends finish the work inside the timing.
                        out.into_data()
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_unet2d);
criterion_main!(benches);
