//! Shared pieces of the benchmarks: the devices compiled into this build and the model configs
//! measured (the same ones `benches/python/*.py` measure in PyTorch).

use diffusion_core::Device;
use diffusion_models::UNet2DModelConfig;
use diffusion_models::unets::unet_2d::SampleSize;

/// The CPU backends to compare, by name, among those compiled in.
// Each push depends on a feature, so a `vec![]` literal cannot express it.
#[allow(clippy::vec_init_then_push)]
pub fn cpu_devices() -> Vec<(&'static str, Device)> {
    // Stays empty (and unmutated) in a GPU-only build such as `sd_gpu`'s.
    #[allow(unused_mut)]
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

/// A config given as the JSON of its `config.json` (the same dict the Python benchmarks pass to
/// diffusers), with diffusers' defaults for every key not given.
fn config_from_json<T: diffusion_core::Config>(name: &str, json: serde_json::Value) -> T {
    diffusion_core::ConfigFile::<T>::from_value(json, std::path::Path::new(name))
        .unwrap_or_else(|e| panic!("benchmark config {name}: {e}"))
        .config
}

/// The UNet2DConditionModel configs benchmarked, with the latent size of one forward:
/// `sd_tiny` (diffusers' Stable Diffusion pipeline test UNet, 32×32 latents) and `sd15`
/// (Stable Diffusion 1.5's UNet, 859.5M parameters, 64×64 latents = 512×512 images).
/// `benches/python/bench_sd_models.py` builds the same ones.
pub fn unet2d_condition_configs() -> Vec<(
    &'static str,
    diffusion_models::UNet2DConditionModelConfig,
    usize,
)> {
    let tiny = serde_json::json!({
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 32,
        "norm_num_groups": 2,
    });
    let sd15 = serde_json::json!({
        "sample_size": 64,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    });
    vec![
        ("sd_tiny", config_from_json("sd_tiny", tiny), 32),
        ("sd15", config_from_json("sd15", sd15), 64),
    ]
}

/// The AutoencoderKL configs whose decoder is benchmarked, with the latent size decoded:
/// `sd_tiny` (diffusers' pipeline test VAE: 32×32 latents to a 64×64 image) and `sd15`
/// (Stable Diffusion's VAE, 83.7M parameters: 32×32 latents to a 256×256 image, a quarter of
/// a 512×512 decode, to keep a CPU run within minutes).
pub fn vae_configs() -> Vec<(&'static str, diffusion_models::AutoencoderKLConfig, usize)> {
    let tiny = serde_json::json!({
        "block_out_channels": [32, 64],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "norm_num_groups": 2,
    });
    let sd15 = serde_json::json!({
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "layers_per_block": 2,
        "sample_size": 512,
    });
    vec![
        ("sd_tiny", config_from_json("sd_tiny", tiny), 32),
        ("sd15", config_from_json("sd15", sd15), 32),
    ]
}

/// The UNet2DConditionModel configs of the GPU benchmark (`src/bin/sd_gpu.rs`), with the latent
/// size and text tokens of one step: `sd15` (64×64 latents, 512×512 images) and `sdxl`
/// (SDXL base's UNet, 2.6B parameters, 128×128 latents, 1024×1024 images, with its pooled text
/// embedding and time ids). `benches/python/bench_sd_gpu.py` builds the same ones.
pub fn gpu_unet_configs() -> Vec<(
    &'static str,
    diffusion_models::UNet2DConditionModelConfig,
    usize,
)> {
    let sd15 = unet2d_condition_configs()
        .into_iter()
        .find(|(name, _, _)| *name == "sd15")
        .expect("sd15 config")
        .1;
    let sdxl = serde_json::json!({
        "sample_size": 128,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": true,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    });
    vec![
        ("sd15", sd15, 64),
        ("sdxl", config_from_json("sdxl", sdxl), 128),
    ]
}

/// The AutoencoderKL configs of the GPU benchmark, with the latent size decoded: full-size
/// decodes, `sd15` 64×64 latents to 512×512 and `sdxl` 128×128 latents to 1024×1024.
pub fn gpu_vae_configs() -> Vec<(&'static str, diffusion_models::AutoencoderKLConfig, usize)> {
    let sd15 = vae_configs()
        .into_iter()
        .find(|(name, _, _)| *name == "sd15")
        .expect("sd15 config")
        .1;
    let sdxl = serde_json::json!({
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "layers_per_block": 2,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
    });
    vec![
        ("sd15", sd15, 64),
        ("sdxl", config_from_json("sdxl", sdxl), 128),
    ]
}
