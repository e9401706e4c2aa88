//! Shared pieces of the benchmarks: the devices compiled into this build and the model configs
//! measured (the same ones `benches/python/*.py` measure in PyTorch).

use diffusion_core::Device;
use diffusion_models::UNet2DModelConfig;
use diffusion_models::unets::unet_2d::SampleSize;

/// The CPU backends to compare, by name, among those compiled in.
// Each push depends on a feature, so a `vec![]` literal cannot express it.
#[allow(clippy::vec_init_then_push)]
pub fn cpu_devices() -> Vec<(&'static str, Device)> {
    let mut out = Vec::new();
    #[cfg(feature = "flex")]
    out.push(("flex", Device::flex()));
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    out.push(("ndarray", Device::ndarray()));
    out
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The UNet2DModel configs benchmarked, by name: `digits` (the model this project trains) and
/// `cifar10` (the architecture of google/ddpm-cifar10-32, 35.7M parameters).
pub fn unet2d_configs() -> Vec<(&'static str, UNet2DModelConfig, usize)> {
    let digits = UNet2DModelConfig {
        sample_size: Some(SampleSize::Square(16)),
        in_channels: 1,
        out_channels: 1,
        layers_per_block: 1,
        block_out_channels: vec![32, 64, 64],
        norm_num_groups: Some(8),
        attention_head_dim: Some(8),
        down_block_types: names(&["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]),
        up_block_types: names(&["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
        ..UNet2DModelConfig::default()
    };
    let cifar10 = UNet2DModelConfig {
        sample_size: Some(SampleSize::Square(32)),
        in_channels: 3,
        out_channels: 3,
        layers_per_block: 2,
        block_out_channels: vec![128, 256, 256, 256],
        down_block_types: names(&[
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
        ]),
        up_block_types: names(&["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
        ..UNet2DModelConfig::default()
    };
    vec![("digits16", digits, 16), ("cifar10_32", cifar10, 32)]
}
