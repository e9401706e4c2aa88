//! Fixture models on a CubeCL device, against diffusers. Such a device lays convolution
//! weights out channels-last and keeps feature maps channels-last through GroupNorm, spatial
//! attention and upsampling (`diffusion_core::kernels`); none of that may change a value. Each
//! model runs with both GroupNorm layouts (`GroupNormLayout::Keep`, the default, and
//! `Contiguous`). `cargo xtask test-kernels` runs these on the CubeCL CPU runtime;
//! `KERNEL_TEST_DEVICE=cpu|wgpu|cuda` picks the device when several are compiled in.
#![cfg(any(feature = "cpu", feature = "cuda", feature = "wgpu"))]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_core::Device;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::kernels::{
    GroupNormLayout, activations_channels_last, conv_weights_channels_last, set_group_norm_layout,
    uses_kernels,
};
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;
use diffusion_models::{
    AddedCondKwargs, AutoencoderKL, ModelMixin, UNet2DConditionModel, UNet2DConditionOptions,
};

/// Absolute tolerance of every f32 comparison with the oracle (as on flex).
const TOLERANCE: f32 = 1e-4;

fn device() -> Device {
    let name = std::env::var("KERNEL_TEST_DEVICE").unwrap_or_else(|_| {
        if cfg!(feature = "cpu") {
            "cpu".into()
        } else if cfg!(feature = "wgpu") {
            "wgpu".into()
        } else {
            "cuda".into()
        }
    });
    match name.as_str() {
        #[cfg(feature = "cpu")]
        "cpu" => Device::cpu(),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0),
        other => panic!("KERNEL_TEST_DEVICE={other} is not compiled into this build"),
    }
}

/// `fixtures/<kind>/<case>` of the checkout this test was built in, or, where that path does
/// not exist (the executable carried to a GPU machine by `benches/gpu/stage.sh` and run from
/// the repository root there), of the working directory.
fn fixture(kind: &str, case: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let root = if built.is_dir() {
        built
    } else {
        PathBuf::from("fixtures")
    };
    root.join(kind).join(case)
}

/// The oracle's inputs and outputs of one fixture model, read onto the test device.
struct Io {
    source: WeightSource,
    device: Device,
}

impl Io {
    fn open(kind: &str, case: &str, device: &Device) -> Result<Self> {
        let path = fixture(kind, case).join("io.safetensors");
        Ok(Self {
            source: WeightSource::open(&path).with_context(|| path.display().to_string())?,
            device: device.clone(),
        })
    }

    fn tensor<const D: usize>(&self, key: &str) -> Result<Tensor<D>> {
        self.source
            .tensor::<D>(key, &self.device)
            .with_context(|| key.to_string())
    }
}

fn max_abs_diff<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let (got, want) = (to_vec(got), to_vec(want));
    got.iter().zip(&want).fold(0f32, |m, (g, w)| {
        assert!(g.is_finite(), "non-finite output {g}");
        m.max((g - w).abs())
    })
}

fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) {
    let diff = max_abs_diff(got, want);
    println!("{what}: max |diff| {diff:.2e}");
    assert!(diff <= TOLERANCE, "{what}: {diff:e} > {TOLERANCE:e}");
}

/// Run `check` under each GroupNorm layout (the default, `keep`, restored after), checking
/// first that the device takes the channels-last paths under `keep`.
fn under_each_layout(device: &Device, check: impl Fn(&str) -> Result<()>) -> Result<()> {
    assert!(uses_kernels(device), "{device:?} runs no kernels");
    assert!(conv_weights_channels_last(device));
    for layout in [GroupNormLayout::Keep, GroupNormLayout::Contiguous] {
        set_group_norm_layout(layout);
        assert_eq!(
            activations_channels_last(device),
            layout == GroupNormLayout::Keep
        );
        let result = check(layout.name());
        set_group_norm_layout(GroupNormLayout::Keep);
        result?;
    }
    Ok(())
}

#[test]
fn vae_encodes_and_decodes_like_diffusers_on_the_kernel_device() -> Result<()> {
    let device = device();
    for case in ["sd_tiny", "sdxl_like"] {
        let vae = AutoencoderKL::from_pretrained(fixture("vae", case), &device)?;
        let io = Io::open("vae", case, &device)?;
        under_each_layout(&device, |layout| {
            assert_close(
                &format!("{case} decode ({layout})"),
                vae.decode(io.tensor("z")?)?,
                io.tensor("decode")?,
            );
            assert_close(
                &format!("{case} encode mean ({layout})"),
                vae.encode(io.tensor("x")?)?.mean,
                io.tensor("encode/mean")?,
            );
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn unets_match_diffusers_on_the_kernel_device() -> Result<()> {
    let device = device();
    // SD 1.x (convolution projections, attention heads) at 16x16 and at an odd 15x13; SDXL
    // (linear projections, added text/time conditioning).
    for (case, runs) in [
        ("sd1_tiny", &["t10", "odd_size"][..]),
        ("sdxl_tiny", &["t10"][..]),
    ] {
        let unet =
            UNet2DConditionModel::from_pretrained(fixture("unet2d_condition", case), &device)?;
        let io = Io::open("unet2d_condition", case, &device)?;
        let added = if case == "sdxl_tiny" {
            Some(AddedCondKwargs {
                text_embeds: Some(io.tensor("text_embeds")?),
                time_ids: Some(io.tensor("time_ids")?),
                image_embeds: None,
            })
        } else {
            None
        };
        under_each_layout(&device, |layout| {
            for run in runs {
                let sample_key = format!("{run}/sample");
                let sample = if io.source.contains(&sample_key) {
                    io.tensor::<4>(&sample_key)?
                } else {
                    io.tensor::<4>("sample")?
                };
                let out = unet.forward_with(
                    sample,
                    io.tensor::<1>(&format!("{run}/timestep"))?,
                    io.tensor::<3>("encoder_hidden_states")?,
                    UNet2DConditionOptions {
                        added_cond_kwargs: added.clone(),
                        ..Default::default()
                    },
                )?;
                assert_close(
                    &format!("{case}/{run} ({layout})"),
                    out,
                    io.tensor(&format!("{run}/out"))?,
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}
