//! Every fixture model's outputs against diffusers, and slicing against the whole batch.

use anyhow::Result;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::tensor::to_vec;
use diffusion_core::{NoiseSource, TorchGenerator};
use diffusion_models::AutoencoderKL;

use crate::{CASES, Io, assert_close, load, max_abs_diff, meta};

/// Seeds of `gen_vae.py` (`SEEDS`, `SEEDS_PER_IMAGE`, `FORWARD_SEED`).
const SEEDS: [u64; 2] = [0, 42];
const SEEDS_PER_IMAGE: [u64; 2] = [3, 4];
const FORWARD_SEED: u64 = 7;

/// Relative tolerance of the per-sample sums (`kl`, `nll`): they add hundreds of f32 terms whose
/// size (up to 1e13 for `nll` with a clamped log-variance) makes an absolute bound meaningless.
const SUM_RELATIVE_TOLERANCE: f32 = 1e-5;

fn assert_sums_close(what: &str, got: Tensor<1>, want: Tensor<1>) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    for (g, w) in to_vec(got).iter().zip(to_vec(want)) {
        let rel = (g - w).abs() / w.abs().max(1.0);
        eprintln!("{what}: {g} vs {w} (relative {rel:.1e})");
        assert!(rel <= SUM_RELATIVE_TOLERANCE, "{what}: {g} vs {w}");
    }
}

/// encode, the posterior's statistics and seeded samples, decode and forward of one case.
fn check(case: &str) -> Result<()> {
    let vae = load(case)?;
    let io = Io::open(case)?;
    let x = io.tensor::<4>("x")?;

    let posterior = vae.encode(x.clone())?;
    assert_close(
        &format!("{case}/encode/mean"),
        posterior.mean.clone(),
        io.tensor("encode/mean")?,
    );
    assert_close(
        &format!("{case}/encode/logvar"),
        posterior.logvar.clone(),
        io.tensor("encode/logvar")?,
    );
    assert_close(
        &format!("{case}/encode/std"),
        posterior.std.clone(),
        io.tensor("encode/std")?,
    );
    assert_close(
        &format!("{case}/encode/var"),
        posterior.var.clone(),
        io.tensor("encode/var")?,
    );
    assert_sums_close(
        &format!("{case}/encode/kl"),
        posterior.kl(),
        io.tensor("encode/kl")?,
    );
    let z = io.tensor::<4>("z")?;
    assert_sums_close(
        &format!("{case}/encode/nll"),
        posterior.nll(z.clone())?,
        io.tensor("encode/nll")?,
    );

    for seed in SEEDS {
        let mut g = TorchGenerator::new(seed);
        let sample = posterior.sample(Some(NoiseSource::Single(&mut g)))?;
        assert_close(
            &format!("{case}/sample/seed{seed}"),
            sample,
            io.tensor(&format!("sample/seed{seed}"))?,
        );
    }
    let mut gens: Vec<TorchGenerator> = SEEDS_PER_IMAGE
        .iter()
        .map(|&s| TorchGenerator::new(s))
        .collect();
    let sample = posterior.sample(Some(NoiseSource::PerImage(&mut gens)))?;
    assert_close(
        &format!("{case}/sample/per_image"),
        sample,
        io.tensor("sample/per_image")?,
    );

    assert_close(
        &format!("{case}/decode"),
        vae.decode(z)?,
        io.tensor("decode")?,
    );
    assert_close(
        &format!("{case}/forward/mode"),
        vae.forward(x.clone(), false, None)?,
        io.tensor("forward/mode")?,
    );
    let mut g = TorchGenerator::new(FORWARD_SEED);
    let sampled = vae.forward(x, true, Some(NoiseSource::Single(&mut g)))?;
    assert_close(
        &format!("{case}/forward/sampled"),
        sampled,
        io.tensor("forward/sampled")?,
    );
    Ok(())
}

/// diffusers' test model (block_out_channels (2, 4), 2 groups), with a log-variance clamped
/// at -30 in half its channels.
#[test]
fn sd_tiny_matches_diffusers() -> Result<()> {
    check("sd_tiny")
}

/// Two resnets per level, SDXL scaling, latents_mean/std, no forced upcast.
#[test]
fn sdxl_like_matches_diffusers() -> Result<()> {
    check("sdxl_like")
}

/// No quant convs, shift factor, attention blocks, no mid attention, sides not multiples of 4.
#[test]
fn flux_like_matches_diffusers() -> Result<()> {
    check("flux_like")
}

/// The clamp really happened in the oracle (so the sd_tiny case tests it), and the seeded
/// samples depend on the seed well beyond the tolerance (so they test the generator).
#[test]
fn fixtures_exercise_the_clamp_and_the_seed() -> Result<()> {
    let io = Io::open("sd_tiny")?;
    let logvar = to_vec(io.tensor::<4>("encode/logvar")?);
    assert!(
        logvar.contains(&-30.0),
        "no clamped log-variance in the fixture"
    );
    assert!(logvar.iter().any(|&v| v > -30.0));
    let io = Io::open("sdxl_like")?;
    let diff = max_abs_diff(
        io.tensor::<4>("sample/seed0")?,
        io.tensor::<4>("sample/seed42")?,
    );
    assert!(diff > 0.1, "{diff}");
    let diff = max_abs_diff(
        io.tensor::<4>("forward/mode")?,
        io.tensor::<4>("forward/sampled")?,
    );
    assert!(diff > 1e-3, "{diff}");
    Ok(())
}

/// Slicing runs the batch one image at a time; the result is the whole-batch result.
#[test]
fn slicing_equals_the_whole_batch() -> Result<()> {
    for case in CASES {
        let mut vae = load(case)?;
        let io = Io::open(case)?;
        let x = io.tensor::<4>("x")?;
        let z = io.tensor::<4>("z")?;
        assert!(x.dims()[0] > 1, "{case}: slicing needs a batch");
        let whole = (
            vae.encode(x.clone())?,
            vae.decode(z.clone())?,
            vae.forward(x.clone(), false, None)?,
        );
        vae.enable_slicing();
        assert!(vae.use_slicing());
        let sliced = (
            vae.encode(x.clone())?,
            vae.decode(z)?,
            vae.forward(x, false, None)?,
        );
        for (what, a, b) in [
            ("mean", whole.0.mean.clone(), sliced.0.mean.clone()),
            ("logvar", whole.0.logvar.clone(), sliced.0.logvar.clone()),
            ("decode", whole.1.clone(), sliced.1.clone()),
            ("forward", whole.2.clone(), sliced.2.clone()),
        ] {
            let diff = max_abs_diff(a, b);
            eprintln!("{case}/sliced {what}: max |diff| = {diff:.2e}");
            assert!(diff <= 1e-6, "{case}/sliced {what}: {diff:e}");
        }
        assert_close(
            &format!("{case}/sliced/decode"),
            sliced.1,
            io.tensor("decode")?,
        );
    }
    Ok(())
}

/// The tile sizes diffusers derives from the config: `sample_size` and
/// `int(sample_size / 2^(levels - 1))`, overlap 0.25.
#[test]
fn default_tile_sizes_match_diffusers() -> Result<()> {
    for case in CASES {
        let vae: AutoencoderKL = load(case)?;
        let m = meta(case)?;
        assert_eq!(
            Some(vae.tile_sample_min_size() as u64),
            m["tile_sample_min_size"].as_u64(),
            "{case}"
        );
        assert_eq!(
            Some(vae.tile_latent_min_size() as u64),
            m["tile_latent_min_size"].as_u64(),
            "{case}"
        );
        assert_eq!(
            Some(vae.tile_overlap_factor()),
            m["tile_overlap_factor"].as_f64(),
            "{case}"
        );
        assert!(!vae.use_tiling() && !vae.use_slicing());
    }
    Ok(())
}
