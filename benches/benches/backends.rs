//! Which pure-Rust CPU backend should be the default? A conv + attention block, the two
//! operations that dominate a UNet, on burn-flex and burn-ndarray.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use diffusion_benches::cpu_devices;
use diffusion_core::Device;
use diffusion_core::burn::nn::conv::{Conv2d, Conv2dConfig};
use diffusion_core::burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use diffusion_core::burn::tensor::module::attention;
use diffusion_core::burn::tensor::{Distribution, Tensor, activation};

struct Block {
    norm: GroupNorm,
    conv: Conv2d,
}

impl Block {
    fn new(channels: usize, device: &Device) -> Self {
        Self {
            norm: GroupNormConfig::new(32, channels).init(device),
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
        }
    }

    /// GroupNorm, 3x3 conv, SiLU, then single-head self-attention over the H*W positions.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let y = activation::silu(self.conv.forward(self.norm.forward(x)));
        let tokens = y.reshape([b, 1, c, h * w]).swap_dims(2, 3);
        let out = attention(
            tokens.clone(),
            tokens.clone(),
            tokens,
            None,
            None,
            Default::default(),
        );
        out.swap_dims(2, 3).reshape([b, c, h, w])
    }
}

fn bench_block(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv_attention_block");
    group.sample_size(10);
    for (name, device) in cpu_devices() {
        for (channels, size) in [(64usize, 16usize), (128, 32)] {
            let block = Block::new(channels, &device);
            let x = Tensor::<4>::random(
                [1, channels, size, size],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let id = BenchmarkId::new(name, format!("{channels}ch_{size}x{size}"));
            group.bench_with_input(id, &x, |bench, x| {
                bench.iter(|| {
                    let out = block.forward(x.clone());
                    // Reading back forces lazy backends to finish the work.
                    out.into_data()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_block);
criterion_main!(benches);
