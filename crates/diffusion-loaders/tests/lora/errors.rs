//! A LoRA for another base model, partial models, and misuse of the API.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_loaders::lora::{LoraLoadOptions, LoraModels, LoraState};
use diffusion_models::state_dict::LoadMode;
use diffusion_models::{ModelMixin, UNet2DConditionModel};

use crate::{Io, assert_close, assert_same_parameters, base_models, device, fixtures, lora_file};

#[test]
fn lora_for_another_unet_names_the_keys_that_do_not_match() -> Result<()> {
    // sd2_tiny has one resnet and one transformer per block where sd1_tiny has two.
    let mut unet =
        UNet2DConditionModel::from_pretrained(fixtures("unet2d_condition/sd2_tiny"), &device())?;
    let before = unet.clone();
    let (_, mut te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    let err = lora
        .load_lora_weights(&mut models, lora_file("a_peft.safetensors"), "a")
        .unwrap_err();
    let Error::UnexpectedTensors { keys, path } = &err else {
        panic!("{err:?}");
    };
    eprintln!("{err}");
    assert_eq!(path, &lora_file("a_peft.safetensors"));
    let key = "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.lora_A.weight";
    assert!(keys.iter().any(|k| k == key), "{keys:?}");
    assert!(
        keys.iter()
            .any(|k| k.starts_with("unet.down_blocks.0.resnets.1."))
    );
    assert!(
        keys.iter().all(|k| k.starts_with("unet.")),
        "text-encoder keys all match"
    );
    assert!(lora.get_list_adapters().is_empty());
    assert_same_parameters("untouched unet", &unet, &before);

    // Lenient: the matching modules are adapted until a shape does not fit (sd2's cross
    // attention is 16 wide, sd1's 12), which is an error that names the key.
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    let options = LoraLoadOptions {
        mode: LoadMode::Lenient,
        ..Default::default()
    };
    let err = lora
        .load_lora_weights_with(&mut models, lora_file("a_peft.safetensors"), "a", options)
        .unwrap_err();
    let Error::TensorShape {
        key, expected, got, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    eprintln!("{err}");
    assert!(
        key.contains("attn2.to_k.lora_A") || key.contains("attn2.to_v.lora_A"),
        "{key}"
    );
    assert_eq!(
        (expected.as_slice(), got.as_slice()),
        ([4, 16].as_slice(), [4, 12].as_slice())
    );
    Ok(())
}

#[test]
fn lenient_load_without_the_text_encoder_reports_its_keys() -> Result<()> {
    let io = Io::open()?;
    let (mut unet, _) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet);
    let file = lora_file("b_kohya.safetensors");
    assert!(matches!(
        lora.load_lora_weights(&mut models, &file, "b"),
        Err(Error::UnexpectedTensors { .. })
    ));
    let options = LoraLoadOptions {
        mode: LoadMode::Lenient,
        ..Default::default()
    };
    let report = lora.load_lora_weights_with(&mut models, &file, "b", options)?;
    // Four attention projections in five layers, each with down, up and alpha.
    assert_eq!(report.unmatched_keys.len(), 4 * 5 * 3);
    assert!(
        report
            .unmatched_keys
            .iter()
            .all(|k| k.starts_with("lora_te_"))
    );
    let out = unet.forward(
        io.tensor("sample")?,
        io.tensor("timestep")?,
        io.tensor("encoder_hidden_states")?,
    )?;
    assert_close("b/unet without text encoder", out, io.tensor("b/unet")?);
    Ok(())
}

#[test]
fn api_misuse_is_a_typed_error() -> Result<()> {
    let (mut unet, mut te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);
    lora.load_lora_weights(&mut models, lora_file("a_peft.safetensors"), "a")?;
    assert!(matches!(
        lora.load_lora_weights(&mut models, lora_file("a_kohya.safetensors"), "a"),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        lora.set_adapters(&mut models, &["a", "nope"], &[1.0, 1.0]),
        Err(Error::UnknownName { .. })
    ));
    assert!(matches!(
        lora.set_adapters(&mut models, &["a"], &[1.0, 1.0]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        lora.save_lora_weights("unused.safetensors", "nope"),
        Err(Error::UnknownName { .. })
    ));
    Ok(())
}

#[test]
fn dora_and_half_layers_are_refused() -> Result<()> {
    use diffusion_core::weights::{NamedTensor, SaveDtype, write_safetensors};

    let dir = tempfile::tempdir()?;
    let tensor = |key: &str, shape: Vec<usize>| NamedTensor {
        key: key.into(),
        values: vec![0.1; shape.iter().product()],
        shape,
    };
    let name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    let (mut unet, mut te) = base_models()?;
    let mut lora = LoraState::new();
    let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut te);

    let dora = dir.path().join("dora.safetensors");
    write_safetensors(
        &dora,
        &[
            tensor(&format!("{name}.lora_down.weight"), vec![2, 32]),
            tensor(&format!("{name}.lora_up.weight"), vec![32, 2]),
            tensor(&format!("{name}.dora_scale"), vec![1, 32]),
        ],
        SaveDtype::F32,
    )?;
    let options = LoraLoadOptions {
        mode: LoadMode::Lenient,
        ..Default::default()
    };
    let err = lora
        .load_lora_weights_with(&mut models, &dora, "dora", options)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { value, .. } if value == "DoRA"),
        "{err:?}"
    );

    // A kohya name with `text_model_` matches transformers 5's CLIP as well; without its up
    // factor the layer is an error that names the key.
    let half = dir.path().join("half.safetensors");
    write_safetensors(
        &half,
        &[tensor(&format!("{name}.lora_down.weight"), vec![2, 32])],
        SaveDtype::F32,
    )?;
    let err = lora
        .load_lora_weights(&mut models, &half, "half")
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { message, .. } if message.contains(name)),
        "{err:?}"
    );
    assert!(lora.get_list_adapters().is_empty());
    Ok(())
}
