//! Outputs of every fixture model at every timestep case, against diffusers.

use anyhow::Result;
use diffusion_models::ModelMixin;
use diffusion_models::{ClassLabels, UNet2DModel};

use crate::{Io, TOLERANCE, device, fixture, max_abs_diff, values};

/// The class labels the oracle used, in the form this model's class embedding takes.
fn class_labels(model: &UNet2DModel, io: &Io) -> Result<Option<ClassLabels>> {
    if !io.has("class_labels") {
        return Ok(None);
    }
    let config = model.config();
    Ok(Some(match config.class_embed_type.as_deref() {
        Some("identity") => ClassLabels::Embeddings(io.tensor::<2>("class_labels")?),
        _ => ClassLabels::Indices(
            io.values("class_labels")?
                .iter()
                .map(|&v| v as usize)
                .collect(),
        ),
    }))
}

/// Run one fixture model on all its cases; returns the worst difference.
fn check(case: &str) -> Result<f32> {
    let model = UNet2DModel::from_pretrained(fixture(case), &device())?;
    let io = Io::open(case)?;
    let cases = io.cases();
    assert!(
        cases.len() >= 4,
        "{case}: expected several timestep cases, got {cases:?}"
    );
    let mut worst = 0.0f32;
    for name in cases {
        let t = io.tensor::<1>(&format!("{name}/timestep"))?;
        let out = model.forward(io.tensor::<4>("sample")?, t, class_labels(&model, &io)?)?;
        let want = io.tensor::<4>(&format!("{name}/out"))?;
        assert_eq!(out.dims(), want.dims(), "{case}/{name}");
        let diff = max_abs_diff(&values(out), &values(want));
        eprintln!("{case}/{name}: max |diff| = {diff:.2e}");
        assert!(
            diff <= TOLERANCE,
            "{case}/{name}: max |diff| {diff:e} > {TOLERANCE:e}"
        );
        worst = worst.max(diff);
    }
    Ok(worst)
}

/// DownBlock2D, AttnDownBlock2D, AttnUpBlock2D, UpBlock2D, mid attention, positional time.
#[test]
fn ddpm_tiny_matches_diffusers() -> Result<()> {
    check("ddpm_tiny").map(drop)
}

/// Class table, scale-shift resnets (mid attention without norm), sin-first embedding with
/// freq_shift 1, centred input, single-head attention.
#[test]
fn class_conditional_scale_shift_matches_diffusers() -> Result<()> {
    check("class_scale_shift").map(drop)
}

/// Resnet down/upsamplers, padding-0 convolution, no mid attention, timestep class embedding,
/// mish, custom time embedding width, three levels.
#[test]
fn resnet_resampling_and_timestep_classes_match_diffusers() -> Result<()> {
    check("resnet_updown").map(drop)
}

/// Skip blocks with FIR resampling and Gaussian Fourier time features.
#[test]
fn ncsnpp_skip_blocks_match_diffusers() -> Result<()> {
    check("ncsnpp_skip").map(drop)
}

/// One level (no resampling), learned time table, identity class embedding.
#[test]
fn learned_time_and_identity_classes_match_diffusers() -> Result<()> {
    check("learned_identity").map(drop)
}

/// The conditioning inputs matter: changing the timestep or the class label changes the output
/// well beyond the tolerance, so the parity cases above really test the embeddings.
#[test]
fn output_depends_on_timestep_and_class() -> Result<()> {
    let model = UNet2DModel::from_pretrained(fixture("class_scale_shift"), &device())?;
    let io = Io::open("class_scale_shift")?;
    let run = |t: f32, label: usize| -> Result<Vec<f32>> {
        let out = model.forward(
            io.tensor::<4>("sample")?,
            crate::timesteps(&[t]),
            Some(ClassLabels::Indices(vec![label])),
        )?;
        Ok(values(out))
    };
    let base = run(10.0, 1)?;
    assert!(max_abs_diff(&run(500.0, 1)?, &base) > 1e-3);
    assert!(max_abs_diff(&run(10.0, 2)?, &base) > 1e-3);
    Ok(())
}
