//! `ControlNetModel` against the diffusers oracle (`fixtures/oracle/gen_controlnet.py`):
//! residuals of the tiny models of diffusers' tests (f32, 1e-4 absolute), `from_unet` against
//! diffusers' `ControlNetModel.from_unet`, and residuals the UNet accepts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;
use diffusion_core::{ConfigFile, Device};
use diffusion_models::state_dict::state_dict;
use diffusion_models::{
    ControlNetModel, ControlNetModelConfig, ControlNetOptions, FromUNetOptions, ModelMixin,
    UNet2DConditionModel,
};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn device() -> Device {
    Device::flex()
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "non-finite output {g}");
            (g - w).abs()
        })
        .fold(0.0, f32::max)
}

/// The oracle's runs of one fixture model: (name, conditioning_scale, guess_mode), as in
/// `RUNS` of gen_controlnet.py; returns the worst difference.
fn check(case: &str, runs: &[(&str, f64, bool)]) -> Result<f32> {
    let dir = fixture("controlnet").join(case);
    let model = ControlNetModel::from_pretrained(&dir, &device()).context(case.to_string())?;
    let io = WeightSource::open(dir.join("io.safetensors"))?;
    let tensor = |key: &str| -> Result<Tensor<4>> { Ok(io.tensor::<4>(key, &device())?) };
    let mut worst = 0.0f32;
    for &(run, conditioning_scale, guess_mode) in runs {
        let out = model.forward_with(
            tensor("sample")?,
            io.tensor::<1>(&format!("{run}/timestep"), &device())?,
            io.tensor::<3>("encoder_hidden_states", &device())?,
            tensor("controlnet_cond")?,
            ControlNetOptions {
                conditioning_scale,
                guess_mode,
                ..ControlNetOptions::default()
            },
        )?;
        let mut pairs = vec![(out.mid_block_res_sample, tensor(&format!("{run}/mid"))?)];
        let n = out.down_block_res_samples.len();
        assert!(
            !io.contains(&format!("{run}/down.{n}")),
            "{case}/{run}: too few residuals"
        );
        for (i, r) in out.down_block_res_samples.into_iter().enumerate() {
            pairs.push((r, tensor(&format!("{run}/down.{i}"))?));
        }
        for (got, want) in pairs {
            assert_eq!(got.dims(), want.dims(), "{case}/{run}");
            let want = to_vec(want);
            assert!(
                want.iter().any(|v| v.abs() > 1e-3),
                "{case}/{run}: residual is ~zero"
            );
            let diff = max_abs_diff(&to_vec(got), &want);
            assert!(diff <= TOLERANCE, "{case}/{run}: max |diff| {diff:e}");
            worst = worst.max(diff);
        }
        eprintln!("{case}/{run}: {n} down residuals + mid ok");
    }
    eprintln!("{case}: max |diff| = {worst:.2e}");
    Ok(worst)
}

/// The ControlNet of diffusers' own pipeline tests: default, per-sample timesteps with a
/// conditioning scale, guess mode.
#[test]
fn diffusers_test_controlnet_matches() -> Result<()> {
    check(
        "tiny",
        &[
            ("t10", 1.0, false),
            ("per_batch", 0.5, false),
            ("guess", 0.7, true),
        ],
    )
    .map(drop)
}

/// bgr channel order, global pooling, UNetMidBlock2D, linear projections, deeper transformers.
#[test]
fn variants_match() -> Result<()> {
    check("variants", &[("t10", 0.5, false), ("guess", 1.0, true)]).map(drop)
}

/// `from_unet` copies the UNet's weights as diffusers does, and writes diffusers' config.
#[test]
fn from_unet_matches_diffusers() -> Result<()> {
    let unet = UNet2DConditionModel::from_pretrained(fixture("pipelines/sd/sd1/unet"), &device())?;
    let options = FromUNetOptions {
        conditioning_embedding_out_channels: vec![16, 32],
        ..FromUNetOptions::default()
    };
    let controlnet = ControlNetModel::from_unet(&unet, &options)?;

    let dir = fixture("controlnet/from_unet");
    let file = ConfigFile::<ControlNetModelConfig>::load(dir.join("config.json"))?;
    assert!(file.unknown_keys().is_empty(), "{:?}", file.unknown_keys());
    assert_eq!(&file.config, controlnet.config());

    let want = WeightSource::open(dir.join("diffusion_pytorch_model.safetensors"))?;
    let got = state_dict(&controlnet);
    let mut got_keys: Vec<_> = got.iter().map(|t| t.key.clone()).collect();
    let mut want_keys: Vec<_> = want.keys().map(str::to_string).collect();
    got_keys.sort();
    want_keys.sort();
    assert_eq!(got_keys, want_keys);
    let mut compared = 0;
    for t in &got {
        // The conditioning embedding's other layers are freshly (randomly) initialised.
        let fresh = t.key.starts_with("controlnet_cond_embedding.")
            && !t.key.starts_with("controlnet_cond_embedding.conv_out.");
        if fresh {
            continue;
        }
        let (values, shape) = want.read_f32(&t.key)?;
        assert_eq!(t.shape, shape, "{}", t.key);
        assert_eq!(t.values, values, "{} differs", t.key);
        compared += 1;
    }
    assert!(compared > 50, "compared only {compared} tensors");

    // Zero residuals leave the UNet's prediction unchanged.
    let latents: Tensor<4> = Tensor::random(
        [1, 4, 8, 8],
        diffusion_core::burn::tensor::Distribution::Normal(0.0, 1.0),
        &device(),
    );
    let cond: Tensor<4> = Tensor::ones([1, 3, 16, 16], &device());
    let states: Tensor<3> = Tensor::ones([1, 3, 8], &device());
    let t = Tensor::<1>::from_floats([10.0], &device());
    let out = controlnet.forward(latents.clone(), t.clone(), states.clone(), cond, 1.0)?;
    let with = unet.forward_with(
        latents.clone(),
        t.clone(),
        states.clone(),
        out.into_unet_options(),
    )?;
    let without = unet.forward(latents, t, states)?;
    assert!(max_abs_diff(&to_vec(with), &to_vec(without)) < 1e-6);
    Ok(())
}

#[test]
fn unsupported_and_invalid_configs_are_errors() {
    let base = ControlNetModelConfig {
        block_out_channels: vec![4, 8],
        down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()],
        norm_num_groups: Some(1),
        cross_attention_dim: diffusion_models::unets::unet_2d_condition::PerBlock::One(8),
        conditioning_embedding_out_channels: vec![4, 8],
        ..ControlNetModelConfig::default()
    };
    assert!(ControlNetModel::new(&base, &device()).is_ok());
    for bad in [
        ControlNetModelConfig {
            num_class_embeds: Some(3),
            ..base.clone()
        },
        ControlNetModelConfig {
            mid_block_type: None,
            ..base.clone()
        },
        ControlNetModelConfig {
            controlnet_conditioning_channel_order: "rbg".into(),
            ..base.clone()
        },
    ] {
        assert!(ControlNetModel::new(&bad, &device()).is_err());
    }
}
