//! Half precision: a model cast to f16 with `to_dtype` stays close to f32, with no NaN or inf.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::burn::tensor::{DType, FloatDType, Tensor};
use diffusion_core::tensor::to_vec;
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::{AddedCondKwargs, UNet2DConditionOptions};

use crate::{Io, device, load};

const HALF_RELATIVE_TOLERANCE: f32 = 1e-2;

/// `max |half - full| / max |full|`, after checking every half value is finite.
fn relative_error(half: Tensor<4>, full: Tensor<4>) -> f32 {
    assert_eq!(half.dims(), full.dims());
    assert_eq!(half.dtype(), DType::F16);
    let (half, full) = (to_vec(half), to_vec(full));
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "degenerate reference output (max {scale})");
    let diff = half
        .iter()
        .zip(&full)
        .map(|(h, f)| {
            assert!(h.is_finite(), "non-finite f16 output {h}");
            (h - f).abs()
        })
        .fold(0.0f32, f32::max);
    diff / scale
}

fn half<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    t.cast(FloatDType::F16)
}

/// The f16 copy of a run's options (float inputs cast, labels kept).
fn half_options(options: &UNet2DConditionOptions) -> UNet2DConditionOptions {
    UNet2DConditionOptions {
        class_labels: options.class_labels.clone(),
        timestep_cond: options.timestep_cond.clone().map(half),
        added_cond_kwargs: options.added_cond_kwargs.clone().map(|a| AddedCondKwargs {
            text_embeds: a.text_embeds.map(half),
            time_ids: a.time_ids,
        }),
        encoder_attention_mask: options.encoder_attention_mask.clone(),
        down_block_additional_residuals: options
            .down_block_additional_residuals
            .clone()
            .map(|v| v.into_iter().map(half).collect()),
        mid_block_additional_residual: options.mid_block_additional_residual.clone().map(half),
        down_intrablock_additional_residuals: options
            .down_intrablock_additional_residuals
            .clone()
            .map(|v| v.into_iter().map(half).collect()),
    }
}

#[test]
fn f16_stays_close_to_f32() -> Result<()> {
    assert!(device().supports_dtype(FloatDType::F16));
    for (case, runs) in [
        ("sd1_tiny", &["t0", "per_batch", "controlnet", "masked"][..]),
        ("sdxl_tiny", &["t999", "per_batch"][..]),
        ("lcm_tiny", &["t10"][..]),
        // Fourier features (an f16 weight on f32 timesteps) and timestep class labels.
        ("variants_b", &["t_mid", "per_batch"][..]),
    ] {
        let full = load(case)?;
        let halved = to_dtype(load(case)?, FloatDType::F16)?;
        let io = Io::open(case)?;
        for run in runs {
            let want = io.run(&full, run)?;
            let options = io.options(run)?;
            let got = halved.forward_with(
                half(io.input::<4>(run, "sample")?),
                io.tensor::<1>(&format!("{run}/timestep"))?,
                half(io.input::<3>(run, "encoder_hidden_states")?),
                half_options(&options),
            )?;
            let rel = relative_error(got, want);
            eprintln!("{case}/{run}: f16 relative error {rel:.1e}");
            assert!(rel <= HALF_RELATIVE_TOLERANCE, "{case}/{run}: {rel:e}");
        }
    }
    Ok(())
}

/// An f32 input to an f16 model is a typed error, not a backend panic.
#[test]
fn dtype_mismatch_is_an_invalid_argument() -> Result<()> {
    let halved = to_dtype(load("diffusers_test")?, FloatDType::F16)?;
    let io = Io::open("diffusers_test")?;
    let sample = io.input::<4>("t0", "sample")?;
    let states = io.input::<3>("t0", "encoder_hidden_states")?;
    let t = io.tensor::<1>("t0/timestep")?;
    match halved.forward(sample.clone(), t.clone(), half(states.clone())) {
        Err(Error::InvalidArgument { name, message }) => {
            assert_eq!(name, "sample");
            assert!(message.contains("F16"), "{message}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    match halved.forward(half(sample), t, states) {
        Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "encoder_hidden_states"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    Ok(())
}
