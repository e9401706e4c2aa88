//! Half precision: a model cast to f16 decodes and encodes close to f32, without overflow in
//! the GroupNorm statistics or the attention softmax (which run in f32).

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::burn::tensor::{DType, FloatDType, Tensor};
use diffusion_core::tensor::to_vec;
use diffusion_models::modeling_utils::to_dtype;

use crate::{Io, device, load};

/// `max |half - full| / max |full|`, after checking every half value is finite.
fn relative_error(half: Tensor<4>, full: Tensor<4>) -> f32 {
    assert_eq!(half.dims(), full.dims());
    assert_eq!(half.dtype(), DType::F16);
    let (half, full) = (to_vec(half), to_vec(full));
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
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

const HALF_RELATIVE_TOLERANCE: f32 = 1e-2;

#[test]
fn flex_supports_f16() {
    assert!(device().supports_dtype(FloatDType::F16));
}

/// Decoding latents of magnitude ~1000 makes activations whose squares (GroupNorm variance)
/// overflow f16's 65504 while the activations themselves fit; f16 must stay finite and close.
#[test]
fn f16_decode_and_encode_stay_close_to_f32() -> Result<()> {
    for case in ["sdxl_like", "flux_like"] {
        let full = load(case)?;
        let half = to_dtype(load(case)?, FloatDType::F16)?;
        let io = Io::open(case)?;
        for scale in [1.0, 1000.0] {
            let z = io.tensor::<4>("z")?.mul_scalar(scale);
            if scale > 1.0 {
                // The first activations fit f16, their squares (GroupNorm variance) do not.
                let first = to_vec(full.decoder.conv_in.forward(z.clone()));
                let peak = first.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(
                    (256.0..60000.0).contains(&peak),
                    "{case}: peak activation {peak}"
                );
            }
            let want = full.decode(z.clone())?;
            let got = half.decode(z.cast(FloatDType::F16))?;
            let rel = relative_error(got, want);
            eprintln!("{case}: f16 decode of latents x{scale}: relative error {rel:.1e}");
            assert!(rel <= HALF_RELATIVE_TOLERANCE, "{case} x{scale}: {rel:e}");
        }
        let x = io.tensor::<4>("x")?;
        let want = full.encode(x.clone())?.mean;
        let got = half.encode(x.cast(FloatDType::F16))?.mean;
        let rel = relative_error(got, want);
        eprintln!("{case}: f16 encode: relative error {rel:.1e}");
        assert!(rel <= HALF_RELATIVE_TOLERANCE, "{case} encode: {rel:e}");
    }
    Ok(())
}

/// An f32 input to an f16 model is a typed error, not a backend panic.
#[test]
fn dtype_mismatch_is_an_invalid_argument() -> Result<()> {
    let half = to_dtype(load("sd_tiny")?, FloatDType::F16)?;
    let io = Io::open("sd_tiny")?;
    match half.decode(io.tensor::<4>("z")?) {
        Err(Error::InvalidArgument { name, message }) => {
            assert_eq!(name, "z");
            assert!(message.contains("F16"), "{message}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    Ok(())
}
