//! Outputs with adapters against diffusers + peft: scales, two weighted adapters, fused,
//! unfused and unloaded.

use std::collections::BTreeMap;

use anyhow::Result;
use diffusion_core::Error;
use diffusion_loaders::lora::{AdapterWeights, BlockWeights, LoraModels, LoraState, UNetWeights};

use crate::{Io, assert_close, assert_same_parameters, base_models, lora_file};

#[test]
fn one_adapter_at_scales_0_half_and_1() -> Result<()> {
    let io = Io::open()?;
    let (mut unet, mut te) = base_models()?;
    io.check("base", &unet, &te)?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    let report = lora.load_lora_weights(&mut models, lora_file("a_peft.safetensors"), "a")?;
    assert!(report.unmatched_keys.is_empty());
    // 154 UNet modules and 30 text-encoder linears.
    assert_eq!(report.matched_modules.len(), 154 + 30);
    let mut worst = io.check("a_scale1", &unet, &te)?;
    for (scale, run) in [(0.5, "a_scale0.5"), (0.0, "a_scale0"), (1.0, "a_scale1")] {
        lora.set_lora_scale(
            &mut LoraModels::new().unet(&mut unet).text_encoder(&mut te),
            scale,
        )?;
        worst = worst.max(io.check(run, &unet, &te)?);
    }
    eprintln!("one adapter: worst {worst:.2e}");
    Ok(())
}

#[test]
fn two_adapters_weighted_fused_unfused_and_unloaded() -> Result<()> {
    let io = Io::open()?;
    let (mut unet, mut te) = base_models()?;
    let (base_unet, base_te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.load_lora_weights(&mut models, lora_file("a_peft.safetensors"), "a")?;
    lora.load_lora_weights(&mut models, lora_file("b_kohya.safetensors"), "b")?;
    // As in diffusers, the adapter loaded last is the active one.
    assert_eq!(lora.get_active_adapters(), ["b"]);
    io.check("b", &unet, &te)?;

    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.set_adapters(&mut models, &["a", "b"], &[0.7, 0.3])?;
    io.check("ab", &unet, &te)?;

    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.fuse_lora(&mut models, 0.5, None)?;
    assert!(lora.is_fused());
    // The runtime scale is fixed while fused, as the adapter set is.
    assert!(lora.set_lora_scale(&mut models, 0.2).is_err());
    assert!(lora.set_adapters(&mut models, &["a"], &[]).is_err());
    io.check("ab_fused0.5", &unet, &te)?;
    let (fused_unet, fused_te) = io.run(&unet, &te)?;

    // Fused at lora_scale 0.5 equals unfused at runtime scale 0.5.
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.unfuse_lora(&mut models)?;
    lora.set_lora_scale(&mut models, 0.5)?;
    let (unfused_unet, unfused_te) = io.run(&unet, &te)?;
    assert_close("fused vs unfused unet", fused_unet, unfused_unet);
    assert_close("fused vs unfused text encoder", fused_te, unfused_te);

    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.set_lora_scale(&mut models, 1.0)?;
    io.check("ab", &unet, &te)?;

    // Unload puts the kept originals back: bit for bit, not to rounding.
    lora.unload_lora_weights(&mut LoraModels::new().unet(&mut unet).text_encoder(&mut te))?;
    assert_same_parameters("unloaded unet", &unet, &base_unet);
    assert_same_parameters("unloaded text encoder", &te, &base_te);
    assert!(lora.get_list_adapters().is_empty());
    Ok(())
}

#[test]
fn unload_after_fuse_keeps_the_fused_weights() -> Result<()> {
    let io = Io::open()?;
    let (mut unet, mut te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.load_lora_weights(&mut models, lora_file("a_peft.safetensors"), "a")?;
    lora.load_lora_weights(&mut models, lora_file("b_kohya.safetensors"), "b")?;
    lora.set_adapters(&mut models, &["a", "b"], &[0.7, 0.3])?;
    lora.fuse_lora(&mut models, 0.5, None)?;
    lora.unload_lora_weights(&mut models)?;
    assert!(!lora.is_fused() && lora.get_active_adapters().is_empty());
    io.check("ab_fused0.5", &unet, &te)?;
    Ok(())
}

#[test]
fn disable_delete_and_fuse_one_adapter() -> Result<()> {
    let io = Io::open()?;
    let (mut unet, mut te) = base_models()?;
    let (base_unet, base_te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.load_lora_weights(&mut models, lora_file("a_peft.safetensors"), "a")?;
    lora.load_lora_weights(&mut models, lora_file("b_kohya.safetensors"), "b")?;
    lora.set_adapters(&mut models, &["a", "b"], &[1.0, 1.0])?;
    // Fusing only `a` at scale 1 is adapter `a` alone.
    lora.fuse_lora(&mut models, 1.0, Some(&["a"]))?;
    io.check("a_scale1", &unet, &te)?;

    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.unfuse_lora(&mut models)?;
    lora.disable_lora(&mut models)?;
    assert_same_parameters("disabled unet", &unet, &base_unet);
    assert_same_parameters("disabled text encoder", &te, &base_te);

    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.enable_lora(&mut models)?;
    lora.delete_adapters(&mut models, &["b"])?;
    assert_eq!(lora.get_active_adapters(), ["a"]);
    io.check("a_scale1", &unet, &te)?;
    Ok(())
}

#[test]
fn per_block_and_per_component_weights() -> Result<()> {
    let io = Io::open()?;
    let (mut unet, mut te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.load_lora_weights(&mut models, lora_file("a_peft.safetensors"), "a")?;
    lora.load_lora_weights(&mut models, lora_file("b_kohya.safetensors"), "b")?;
    // gen_lora.py's BLOCKS: {"unet": {"down": 0.5, "mid": 0.0,
    //   "up": {"block_1": [0.2, 0.4, 0.6], "block_2": 1.5}}, "text_encoder": 0.3}
    let blocks = AdapterWeights {
        unet: UNetWeights::Blocks {
            down: BlockWeights::Uniform(0.5),
            mid: 0.0,
            up: BlockWeights::PerBlock(BTreeMap::from([(1, vec![0.2, 0.4, 0.6]), (2, vec![1.5])])),
        },
        text_encoder: 0.3,
        text_encoder_2: 1.0,
    };
    lora.set_adapters_with_weights(&mut models, &["a", "b"], &[blocks, 0.6.into()])?;
    io.check("blocks", &unet, &te)?;

    // Up block 0 is an UpBlock2D: no transformer to weigh.
    let wrong = AdapterWeights {
        unet: UNetWeights::Blocks {
            down: BlockWeights::Uniform(1.0),
            mid: 1.0,
            up: BlockWeights::PerBlock(BTreeMap::from([(0, vec![0.5])])),
        },
        ..AdapterWeights::from(1.0)
    };
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    let err = lora
        .set_adapters_with_weights(&mut models, &["a"], &[wrong])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    Ok(())
}

#[test]
fn half_precision_models_take_lora_in_their_dtype() -> Result<()> {
    use diffusion_core::burn::tensor::{DType, FloatDType};
    use diffusion_models::modeling_utils::to_dtype;

    let io = Io::open()?;
    let (unet, te) = base_models()?;
    let mut te = to_dtype(te, FloatDType::F16)?;
    let base_te = te.clone();
    let ids = io.ids("input_ids")?;
    let before = te.forward(ids.clone())?.last_hidden_state;
    let mut unet = unet;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.load_lora_weights(&mut models, lora_file("a_peft.safetensors"), "a")?;
    let q = &te.text_model.encoder.layers[0].self_attn.q_proj.weight;
    assert_eq!(q.val().dtype(), DType::F16);
    let after = te.forward(ids)?.last_hidden_state;
    // f16 against the f32 oracle: half precision's step at these magnitudes (|x| < 8) is
    // 4e-3, so this checks that the LoRA arrived, not the last digits.
    let want = io.tensor::<3>("a_scale1/text_encoder")?;
    let change = crate::max_abs_diff(after.clone().cast(DType::F32), before.cast(DType::F32));
    let error = crate::max_abs_diff(after.cast(DType::F32), want);
    eprintln!("f16 text encoder: change {change:.3}, error {error:.2e}");
    assert!(
        change > 1.0 && error < 1e-2,
        "change {change}, error {error}"
    );
    lora.unload_lora_weights(&mut LoraModels::new().unet(&mut unet).text_encoder(&mut te))?;
    assert_same_parameters("unloaded f16 text encoder", &te, &base_te);
    Ok(())
}

/// A LoRA named by Hub repository id, read from the standard cache (offline, no network here):
/// the same adapter as from the file.
#[test]
fn hub_repository_id_from_the_cache() -> Result<()> {
    let io = Io::open()?;
    let cache = tempfile::tempdir()?;
    let repo = cache.path().join("models--someone--tiny-lora");
    let snapshot = repo.join("snapshots/c0ffee");
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), "c0ffee")?;
    std::fs::copy(
        lora_file("a_peft.safetensors"),
        snapshot.join("style.safetensors"),
    )?;
    let hub = diffusion_loaders::HubOptions {
        offline: true,
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let (mut unet, mut te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    // Offline, the file must be named (no listing of the repository without the network).
    let err = lora
        .load_lora_weights_with(
            &mut models,
            "someone/tiny-lora",
            "a",
            diffusion_loaders::LoraLoadOptions {
                hub: hub.clone(),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, Error::Hub { .. }), "{err}");
    let options = diffusion_loaders::LoraLoadOptions {
        weight_name: Some("style.safetensors".into()),
        hub,
        ..Default::default()
    };
    lora.load_lora_weights_with(&mut models, "someone/tiny-lora", "a", options)?;
    io.check("a_scale1", &unet, &te)?;
    Ok(())
}
