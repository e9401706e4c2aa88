//! The same adapter in PEFT, kohya and older diffusers spelling, and saved by this port.

use anyhow::Result;
use diffusion_core::weights::SafetensorsFile;
use diffusion_loaders::lora::{LoraComponent, LoraModels, LoraState};

use crate::{Io, assert_close, base_models, lora_file};

#[test]
fn kohya_and_old_diffusers_spellings_equal_peft() -> Result<()> {
    let io = Io::open()?;
    let mut outputs = Vec::new();
    for file in [
        "a_peft.safetensors",
        "a_kohya.safetensors",
        "a_old.safetensors",
    ] {
        let (mut unet, mut te) = base_models()?;
        let mut lora = LoraState::new();
        let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
        let report = lora.load_lora_weights(&mut models, lora_file(file), "a")?;
        assert_eq!(report.matched_modules.len(), 184, "{file}");
        io.check("a_scale1", &unet, &te)?;
        outputs.push((file, io.run(&unet, &te)?));
    }
    let (_, (peft_unet, peft_te)) = outputs.remove(0);
    for (file, (unet, te)) in outputs {
        assert_close(&format!("{file} vs PEFT unet"), unet, peft_unet.clone());
        assert_close(&format!("{file} vs PEFT text encoder"), te, peft_te.clone());
    }
    Ok(())
}

#[test]
fn saved_adapter_is_peft_format_and_reloads() -> Result<()> {
    let io = Io::open()?;
    let dir = tempfile::tempdir()?;
    // A folder, as diffusers' save_lora_weights takes: the file is its default name.
    let saved = dir.path().join("pytorch_lora_weights.safetensors");
    {
        let (mut unet, mut te) = base_models()?;
        let mut lora = LoraState::new();
        let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
        lora.load_lora_weights(&mut models, lora_file("a_kohya.safetensors"), "a")?;
        lora.save_lora_weights(dir.path(), "a")?;
        let list = lora.get_list_adapters();
        assert_eq!(list[&LoraComponent::Unet], ["a"]);
        assert_eq!(list[&LoraComponent::TextEncoder], ["a"]);
    }
    // diffusers' own file, but for the `text_model.` level that transformers 5 drops (diffusers
    // strips it when loading, older versions need it).
    let ours = SafetensorsFile::open(&saved)?;
    let theirs = SafetensorsFile::open(lora_file("a_peft.safetensors"))?;
    let normalise = |keys: Vec<String>| {
        keys.into_iter()
            .map(|k| k.replace("text_encoder.text_model.", "text_encoder."))
            .collect::<Vec<_>>()
    };
    assert_eq!(normalise(ours.keys()), normalise(theirs.keys()));
    let meta: serde_json::Value =
        serde_json::from_str(&ours.user_metadata().expect("metadata")["lora_adapter_metadata"])?;
    assert_eq!(meta["unet.r"], 4);
    assert_eq!(meta["unet.lora_alpha"], 8);
    assert_eq!(meta["text_encoder.lora_alpha"], 8);

    let (mut unet, mut te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.load_lora_weights(&mut models, dir.path(), "again")?;
    io.check("a_scale1", &unet, &te)?;
    Ok(())
}

#[test]
fn sdxl_kohya_file_with_sgm_names_and_two_text_encoders() -> Result<()> {
    use diffusion_models::unets::unet_2d_condition::{AddedCondKwargs, UNet2DConditionOptions};
    use diffusion_models::{
        CLIPTextModel, CLIPTextModelWithProjection, ModelMixin, UNet2DConditionModel,
    };

    use crate::{device, fixtures};

    let io = Io::open()?;
    let mut unet =
        UNet2DConditionModel::from_pretrained(fixtures("unet2d_condition/sdxl_tiny"), &device())?;
    let mut te = CLIPTextModel::from_pretrained(fixtures("text_encoders/clip_tiny"), &device())?;
    let mut te2 = CLIPTextModelWithProjection::from_pretrained(
        fixtures("text_encoders/clip_tiny_projection"),
        &device(),
    )?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new()
        .unet(&mut unet)
        .text_encoder(&mut te)
        .text_encoder_2(&mut te2);
    let report = lora.load_lora_weights(&mut models, lora_file("xl_kohya.safetensors"), "xl")?;
    assert!(report.unmatched_keys.is_empty());
    assert!(
        report
            .matched_modules
            .iter()
            .any(|m| m == "text_encoder_2.text_projection")
    );
    let list = lora.get_list_adapters();
    assert_eq!(list[&LoraComponent::TextEncoder2], ["xl"]);

    let options = UNet2DConditionOptions {
        added_cond_kwargs: Some(AddedCondKwargs {
            text_embeds: Some(io.tensor("xl/text_embeds")?),
            time_ids: Some(io.tensor("xl/time_ids")?),
            image_embeds: None,
        }),
        ..Default::default()
    };
    let timestep = io.tensor::<1>("timestep")?;
    let out = unet.forward_with(
        io.tensor("xl/sample")?,
        timestep,
        io.tensor("xl/encoder_hidden_states")?,
        options,
    )?;
    assert_close("xl/unet", out, io.tensor("xl/unet")?);
    let ids = io.ids("xl/input_ids")?;
    let hidden = te.forward(ids.clone())?.last_hidden_state;
    assert_close("xl/text_encoder", hidden, io.tensor("xl/text_encoder")?);
    let out2 = te2.forward(ids)?;
    assert_close(
        "xl/text_encoder_2",
        out2.last_hidden_state,
        io.tensor("xl/text_encoder_2")?,
    );
    assert_close(
        "xl/text_embeds_2",
        out2.text_embeds,
        io.tensor("xl/text_embeds_2")?,
    );
    Ok(())
}

#[test]
fn lora_b_bias_adds_to_the_module_bias() -> Result<()> {
    let io = Io::open()?;
    let (_, mut te) = base_models()?;
    let (_, base_te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().text_encoder(&mut te);
    let report = lora.load_lora_weights(&mut models, lora_file("c_bias.safetensors"), "c")?;
    assert_eq!(report.matched_modules.len(), 10);
    let hidden = te.forward(io.ids("input_ids")?)?.last_hidden_state;
    assert_close("c/text_encoder", hidden, io.tensor("c/text_encoder")?);
    lora.unload_lora_weights(&mut LoraModels::new().text_encoder(&mut te))?;
    crate::assert_same_parameters("unloaded text encoder", &te, &base_te);
    Ok(())
}
