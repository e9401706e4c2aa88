//! Throughput of the two operations a diffusion model spends its CPU time in: square f32
//! matmuls and 3×3 convolutions at the channel counts and sizes of Stable Diffusion's UNet and
//! VAE (batch 1), on the CPU backends compiled in. Criterion reports the throughput in
//! "elements" per second, which here are floating-point operations (2 per multiply-add), so
//! `Gelem/s` reads as GFLOP/s. `benches/python/bench_cpu_ops.py` runs the same shapes in PyTorch.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use diffusion_benches::cpu_devices;
use diffusion_core::burn::tensor::module::conv2d;
use diffusion_core::burn::tensor::ops::ConvOptions;
use diffusion_core::burn::tensor::{Distribution, Tensor};

/// Square matmul sizes.
pub const MATMUL_SIZES: [usize; 2] = [1024, 2048];

/// 3×3 convolutions, `(channels in = out, height = width)`: SD 1.5's UNet at 64×64 latents
/// (320 channels) and its VAE decoder's upper blocks (512 channels at 64×64, 256 at 128×128,
/// 128 at 256×256, at a quarter of the 512×512 decode's area to keep a run short).
pub const CONV_SHAPES: [(usize, usize); 4] = [(320, 64), (512, 32), (256, 64), (128, 128)];

fn bench_matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_f32");
    group.sample_size(10);
    for (name, device) in cpu_devices() {
        for n in MATMUL_SIZES {
            let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
            let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
            group.throughput(Throughput::Elements(2 * (n * n * n) as u64));
            group.bench_function(BenchmarkId::new(name, format!("{n}x{n}")), |bench| {
                // Reading back forces lazy backends to finish the work.
                bench.iter(|| a.clone().matmul(b.clone()).into_data())
            });
        }
    }
    group.finish();
}

fn bench_conv(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv3x3_f32");
    group.sample_size(10);
    for (name, device) in cpu_devices() {
        for (channels, size) in CONV_SHAPES {
            let x = Tensor::<4>::random(
                [1, channels, size, size],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let w = Tensor::<4>::random(
                [channels, channels, 3, 3],
                Distribution::Normal(0.0, 0.05),
                &device,
            );
            let bias = Tensor::<1>::zeros([channels], &device);
            let flop = 2 * (channels * channels * 9 * size * size) as u64;
            group.throughput(Throughput::Elements(flop));
            let id = BenchmarkId::new(name, format!("{channels}ch_{size}x{size}"));
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
                    conv2d(x.clone(), w.clone(), Some(bias.clone()), options).into_data()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_matmul, bench_conv);
criterion_main!(benches);
