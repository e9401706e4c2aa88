//! Half precision: a model cast to f16 or bf16 decodes and encodes close to f32, without overflow in
//! the GroupNorm statistics or the attention softmax (which run in f32).

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::tensor::to_vec;
use diffusion_models::modeling_utils::to_dtype;

use crate::{Io, device, load};

/// `max |half - full| / max |full|`, after checking every half value is finite and the output
/// kept the model's dtype.
fn relative_error(half: Tensor<4>, full: Tensor<4>, dtype: FloatDType) -> f32 {
    assert_eq!(half.dims(), full.dims());
    assert_eq!(FloatDType::from(half.dtype()), dtype);
    let (half, full) = (to_vec(half), to_vec(full));
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = half
        .iter()
        .zip(&full)
        .map(|(h, f)| {
            assert!(h.is_finite(), "non-finite {dtype:?} output {h}");
            (h - f).abs()
        })
        .fold(0.0f32, f32::max);
    diff / scale
}

/// f16 (11-bit significand) must stay within 1e-2 of f32 relative to the output's scale.
const F16_RELATIVE_TOLERANCE: f32 = 1e-2;

/// bf16 has an 8-bit significand, about 8x f16's rounding error. PyTorch's own CPU bf16 run of
/// these fixtures (weights cast with `.to(torch.bfloat16)`, diffusers 0.42.1, torch 2.15) is
/// 1.61e-2 / 7.9e-3 / 1.10e-2 (sdxl_like decode x1 / decode x1000 / encode) and
/// 2.19e-2 / 1.04e-2 / 1.31e-2 (flux_like) relative to its f32 output, so 1e-2 is out of reach of
/// the reference itself; we require what PyTorch achieves, 3e-2 (the bound of the UNet test).
const BF16_RELATIVE_TOLERANCE: f32 = 3e-2;

fn tolerance(dtype: FloatDType) -> f32 {
    match dtype {
        FloatDType::BF16 => BF16_RELATIVE_TOLERANCE,
        _ => F16_RELATIVE_TOLERANCE,
    }
}

#[test]
fn flex_supports_f16_and_bf16() {
    assert!(device().supports_dtype(FloatDType::F16));
    assert!(device().supports_dtype(FloatDType::BF16));
}

/// Decoding latents of magnitude ~1000 makes activations whose squares (GroupNorm variance)
/// overflow f16's 65504 while the activations themselves fit; f16 must stay finite and close.
/// bf16 has f32's range but an 8-bit significand; see [`BF16_RELATIVE_TOLERANCE`].
#[test]
fn f16_and_bf16_decode_and_encode_stay_close_to_f32() -> Result<()> {
    for case in ["sdxl_like", "flux_like"] {
        let full = load(case)?;
        let io = Io::open(case)?;
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            let half = to_dtype(load(case)?, dtype)?;
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
                let got = half.decode(z.cast(dtype))?;
                let rel = relative_error(got, want, dtype);
                eprintln!("{case}: {dtype:?} decode of latents x{scale}: relative error {rel:.1e}");
                assert!(
                    rel <= tolerance(dtype),
                    "{case} {dtype:?} x{scale}: {rel:e}"
                );
            }
            let x = io.tensor::<4>("x")?;
            let want = full.encode(x.clone())?.mean;
            let got = half.encode(x.cast(dtype))?.mean;
            let rel = relative_error(got, want, dtype);
            eprintln!("{case}: {dtype:?} encode: relative error {rel:.1e}");
            assert!(rel <= tolerance(dtype), "{case} {dtype:?} encode: {rel:e}");
        }
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
