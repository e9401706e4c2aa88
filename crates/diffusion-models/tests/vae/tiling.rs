//! Tiled encode and decode against diffusers, with images and latents of several tiles.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::burn::tensor::Tensor;

use crate::{Io, assert_close, load, max_abs_diff, meta};

/// A fixture model with tiling on and the tile sizes the oracle set.
fn tiled_model(case: &str) -> Result<diffusion_models::AutoencoderKL> {
    let mut vae = load(case)?;
    let m = meta(case)?;
    let size = |k: &str| m["tiled"][k].as_u64().map(|v| v as usize).unwrap_or(0);
    vae.set_tile_sizes(size("tile_sample_min_size"), size("tile_latent_min_size"))?;
    vae.enable_tiling();
    Ok(vae)
}

fn check(case: &str) -> Result<()> {
    let vae = tiled_model(case)?;
    let io = Io::open(case)?;
    let x = io.tensor::<4>("tiled/x")?;
    let z = io.tensor::<4>("tiled/z")?;
    assert!(
        x.dims()[2] > vae.tile_sample_min_size(),
        "{case}: the image must span tiles"
    );
    assert!(
        z.dims()[2] > vae.tile_latent_min_size(),
        "{case}: the latents must span tiles"
    );

    let posterior = vae.encode(x.clone())?;
    assert_close(
        &format!("{case}/tiled/encode/mean"),
        posterior.mean.clone(),
        io.tensor("tiled/encode/mean")?,
    );
    assert_close(
        &format!("{case}/tiled/encode/logvar"),
        posterior.logvar,
        io.tensor("tiled/encode/logvar")?,
    );
    let decoded = vae.decode(z.clone())?;
    assert_close(
        &format!("{case}/tiled/decode"),
        decoded.clone(),
        io.tensor("tiled/decode")?,
    );

    // The explicit entry points give the same.
    assert_eq!(max_abs_diff(vae.tiled_encode(x)?.mean, posterior.mean), 0.0);
    assert_eq!(
        max_abs_diff(vae.tiled_decode(z.clone())?, decoded.clone()),
        0.0
    );

    // Untiled decoding of the same latents differs: the tiled case really tiles.
    let mut plain = vae.clone();
    plain.disable_tiling();
    let untiled = plain.decode(z)?;
    let differs = untiled.dims() != decoded.dims() || max_abs_diff(untiled, decoded) > 1e-3;
    assert!(differs, "{case}: tiling made no difference");
    Ok(())
}

/// Two levels: 40x24 image in 16-pixel tiles (a 4-pixel strip at the bottom), 20x12 latents in
/// 8-latent tiles.
#[test]
fn sdxl_like_tiled_matches_diffusers() -> Result<()> {
    check("sdxl_like")
}

/// Three levels, no quant convs: 28x20 image in 16-pixel tiles, 7x5 latents in 4-latent tiles
/// (blend extent 1 in latent space, 4 in pixel space).
#[test]
fn flux_like_tiled_matches_diffusers() -> Result<()> {
    check("flux_like")
}

/// Inputs no larger than a tile are not tiled.
#[test]
fn inputs_within_a_tile_are_not_tiled() -> Result<()> {
    let io = Io::open("sdxl_like")?;
    let x = io.tensor::<4>("x")?;
    let z = io.tensor::<4>("z")?;
    let mut vae = load("sdxl_like")?;
    let plain = (vae.encode(x.clone())?.mean, vae.decode(z.clone())?);
    vae.set_tile_sizes(16, 8)?;
    vae.enable_tiling();
    assert_eq!(max_abs_diff(vae.encode(x)?.mean, plain.0), 0.0);
    assert_eq!(max_abs_diff(vae.decode(z)?, plain.1), 0.0);
    Ok(())
}

/// A border tile too thin for the encoder's downsamplings is an error, not a panic (diffusers
/// raises inside the convolution there), as are tile sizes that would not advance.
#[test]
fn bad_tilings_are_invalid_arguments() -> Result<()> {
    let mut vae = tiled_model("flux_like")?;
    // Tiles start every 12 pixels: a 25-pixel side leaves a 1-pixel tile at 24.
    let x = Tensor::<4>::zeros([1, 3, 16, 25], &crate::device());
    match vae.encode(x) {
        Err(Error::InvalidArgument { name, message }) => {
            assert_eq!(name, "sample");
            assert!(message.contains("tile"), "{message}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    for (sample, latent) in [(0, 4), (16, 0), (1, 1)] {
        match vae.set_tile_sizes(sample, latent) {
            Err(Error::InvalidArgument { name, .. }) => {
                assert!(name.starts_with("tile_"), "{name}")
            }
            other => panic!("({sample}, {latent}): expected InvalidArgument, got {other:?}"),
        }
    }
    assert!(matches!(
        vae.set_tile_overlap_factor(1.0),
        Err(Error::InvalidArgument { name, .. }) if name == "tile_overlap_factor"
    ));
    // Failed setters leave the sizes as they were.
    assert_eq!(
        (vae.tile_sample_min_size(), vae.tile_latent_min_size()),
        (16, 4)
    );
    vae.set_tile_overlap_factor(0.5)?;
    assert_eq!(vae.tile_overlap_factor(), 0.5);
    Ok(())
}
