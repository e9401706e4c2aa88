//! Outputs of every fixture model on every oracle run, against diffusers (f32, 1e-4 absolute).

use anyhow::Result;
use diffusion_models::UNet2DConditionOptions;

use crate::{Io, TOLERANCE, load, max_abs_diff, values};

/// Run one fixture model on all its runs; returns the worst difference.
fn check(case: &str, expected_runs: &[&str]) -> Result<f32> {
    let model = load(case)?;
    let io = Io::open(case)?;
    let runs = io.runs();
    for run in expected_runs {
        assert!(
            runs.iter().any(|r| r == run),
            "{case}: no run `{run}` in {runs:?}"
        );
    }
    let mut worst = 0.0f32;
    for run in runs {
        let out = io.run(&model, &run)?;
        let want = io.tensor::<4>(&format!("{run}/out"))?;
        assert_eq!(out.dims(), want.dims(), "{case}/{run}");
        let diff = max_abs_diff(&values(out), &values(want));
        eprintln!("{case}/{run}: max |diff| = {diff:.2e}");
        assert!(
            diff <= TOLERANCE,
            "{case}/{run}: max |diff| {diff:e} > {TOLERANCE:e}"
        );
        worst = worst.max(diff);
    }
    Ok(worst)
}

const TIMESTEPS: [&str; 4] = ["t0", "t10", "t999", "per_batch"];

/// The model of diffusers' own tests (batch 4, two levels).
#[test]
fn diffusers_test_model_matches() -> Result<()> {
    check("diffusers_test", &TIMESTEPS).map(drop)
}

/// SD 1.x layout; also the cross-attention mask, a sample whose sides are not multiples of
/// the downsampling (the up path resizes), ControlNet residuals and T2I-Adapter features.
#[test]
fn sd1_matches_with_mask_odd_size_controlnet_and_adapter() -> Result<()> {
    check(
        "sd1_tiny",
        &[
            "t0",
            "t10",
            "t999",
            "per_batch",
            "masked",
            "odd_size",
            "controlnet",
            "adapter",
        ],
    )
    .map(drop)
}

/// SD 2.x: linear projections, per-block head counts, upcast attention.
#[test]
fn sd2_matches() -> Result<()> {
    check("sd2_tiny", &TIMESTEPS).map(drop)
}

/// SDXL: text_time addition embedding, transformer depth per block, plain first level.
#[test]
fn sdxl_matches() -> Result<()> {
    check("sdxl_tiny", &TIMESTEPS).map(drop)
}

/// Nine input channels (inpainting).
#[test]
fn inpaint_matches() -> Result<()> {
    check("inpaint_tiny", &TIMESTEPS).map(drop)
}

/// LCM's `timestep_cond` through `time_embedding.cond_proj`.
#[test]
fn lcm_matches() -> Result<()> {
    check("lcm_tiny", &TIMESTEPS).map(drop)
}

/// Projection class embedding concatenated, time activations, scale-shift, cross-only attn1,
/// UNetMidBlock2D, kernels 1 and 5, encoder projection, sin-first features, centred input.
#[test]
fn variants_a_match() -> Result<()> {
    check("variants_a", &TIMESTEPS).map(drop)
}

/// Fourier time features, timestep class embedding, no mid block, per-block lists, transformer
/// counts per transformer.
#[test]
fn variants_b_match() -> Result<()> {
    check("variants_b", &["t_small", "t_mid", "t_large", "per_batch"]).map(drop)
}

/// Class table, mish, deeper mid transformer, custom time width, mid scale factor.
#[test]
fn variants_c_match() -> Result<()> {
    check("variants_c", &TIMESTEPS).map(drop)
}

/// Simple projection class embedding, UNetRes-prefixed names, downsample padding 0.
#[test]
fn variants_d_match() -> Result<()> {
    check("variants_d", &TIMESTEPS).map(drop)
}

/// Identity class embedding.
#[test]
fn variants_e_match() -> Result<()> {
    check("variants_e", &TIMESTEPS).map(drop)
}

/// The conditioning inputs matter: changing the text, LCM's guidance embedding or SDXL's
/// time ids moves the output well beyond the tolerance, so the parity runs test them.
#[test]
fn outputs_depend_on_every_conditioning_input() -> Result<()> {
    let moved = |a: &[f32], b: &[f32]| max_abs_diff(a, b) > 100.0 * TOLERANCE;

    let model = load("sd1_tiny")?;
    let io = Io::open("sd1_tiny")?;
    let base = values(io.run(&model, "per_batch")?);
    let states = io.input::<3>("per_batch", "encoder_hidden_states")?;
    let other = model.forward(
        io.input::<4>("per_batch", "sample")?,
        io.tensor::<1>("per_batch/timestep")?,
        states.mul_scalar(-1.0),
    )?;
    assert!(
        moved(&values(other), &base),
        "text conditioning has no effect"
    );

    let model = load("lcm_tiny")?;
    let io = Io::open("lcm_tiny")?;
    let base = values(io.run(&model, "t10")?);
    let mut options = io.options("t10")?;
    options.timestep_cond = options.timestep_cond.map(|c| c.mul_scalar(3.0));
    let other = model.forward_with(
        io.input::<4>("t10", "sample")?,
        io.tensor::<1>("t10/timestep")?,
        io.input::<3>("t10", "encoder_hidden_states")?,
        options,
    )?;
    assert!(moved(&values(other), &base), "timestep_cond has no effect");
    let without = model.forward_with(
        io.input::<4>("t10", "sample")?,
        io.tensor::<1>("t10/timestep")?,
        io.input::<3>("t10", "encoder_hidden_states")?,
        UNet2DConditionOptions::default(),
    )?;
    assert!(moved(&values(without), &base), "timestep_cond is ignored");

    let model = load("sdxl_tiny")?;
    let io = Io::open("sdxl_tiny")?;
    let base = values(io.run(&model, "t10")?);
    let mut options = io.options("t10")?;
    if let Some(added) = options.added_cond_kwargs.as_mut() {
        added.time_ids = added.time_ids.take().map(|t| t.add_scalar(8.0));
    }
    let other = model.forward_with(
        io.input::<4>("t10", "sample")?,
        io.tensor::<1>("t10/timestep")?,
        io.input::<3>("t10", "encoder_hidden_states")?,
        options,
    )?;
    assert!(moved(&values(other), &base), "time_ids have no effect");
    Ok(())
}
