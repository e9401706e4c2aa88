//! Throughput of the operations a diffusion model spends its CPU time in, at the sizes of
//! Stable Diffusion 1.5 (batch 1, f32), on the CPU backends compiled in: square matmuls, 3×3
//! convolutions, attention as the models call it (`diffusion_core::kernels::attention`) and
//! GroupNorm + SiLU (`kernels::group_norm`). Criterion reports throughput in "elements" per
//! second; for matmul, convolution and attention these are floating-point operations (2 per
//! multiply-add), so `Gelem/s` reads as GFLOP/s; for GroupNorm they are tensor elements.
//! `benches/python/bench_cpu_ops.py` runs the same shapes in PyTorch.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use diffusion_benches::cpu_devices;
use diffusion_core::burn::tensor::ops::ConvOptions;
use diffusion_core::burn::tensor::{Distribution, Tensor};
use diffusion_core::kernels;

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
                    kernels::conv2d(x.clone(), w.clone(), Some(bias.clone()), options).into_data()
                })
            });
        }
    }
    group.finish();
}

/// Attention `(heads, query tokens, key tokens, head dim)`: SD 1.5's self-attention at 64×64
/// latents (4,096 tokens, 8 heads of 40) and at 32×32 (1,024 tokens, 8 heads of 80), and its
/// cross-attention to the 77 text tokens at 64×64.
pub const ATTENTION_SHAPES: [(usize, usize, usize, usize); 3] =
    [(8, 4096, 4096, 40), (8, 1024, 1024, 80), (8, 4096, 77, 40)];

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_f32");
    group.sample_size(10);
    for (name, device) in cpu_devices() {
        for (heads, s_q, s_kv, d) in ATTENTION_SHAPES {
            let normal = Distribution::Normal(0.0, 1.0);
            let q = Tensor::<4>::random([1, heads, s_q, d], normal, &device);
            let k = Tensor::<4>::random([1, heads, s_kv, d], normal, &device);
            let v = Tensor::<4>::random([1, heads, s_kv, d], normal, &device);
            // Two matmuls of s_q x s_kv x d multiply-adds per head.
            group.throughput(Throughput::Elements(4 * (heads * s_q * s_kv * d) as u64));
            let id = BenchmarkId::new(name, format!("{heads}x{s_q}x{s_kv}_d{d}"));
            group.bench_function(id, |bench| {
                bench.iter(|| kernels::attention(q.clone(), k.clone(), v.clone(), None).into_data())
            });
        }
    }
    group.finish();
}

/// GroupNorm(32) + SiLU `(channels, height = width)`: SD 1.5's UNet at 64×64 and its VAE
/// decoder at 256×256.
pub const GROUP_NORM_SHAPES: [(usize, usize); 2] = [(320, 64), (128, 256)];

fn bench_group_norm(c: &mut Criterion) {
    let mut group = c.benchmark_group("group_norm_silu_f32");
    group.sample_size(10);
    for (name, device) in cpu_devices() {
        for (channels, size) in GROUP_NORM_SHAPES {
            let x = Tensor::<4>::random(
                [1, channels, size, size],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let gamma = Tensor::<1>::ones([channels], &device);
            let beta = Tensor::<1>::zeros([channels], &device);
            group.throughput(Throughput::Elements((channels * size * size) as u64));
            let id = BenchmarkId::new(name, format!("{channels}ch_{size}x{size}"));
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    kernels::group_norm(x.clone(), gamma.clone(), beta.clone(), 32, 1e-5, true)
                        .into_data()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_matmul,
    bench_conv,
    bench_attention,
    bench_group_norm
);
criterion_main!(benches);
