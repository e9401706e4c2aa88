//! Invalid inputs and configs are typed errors naming the argument or field.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::weights::{SaveDtype, write_safetensors};
use diffusion_models::ModelMixin;
use diffusion_models::unets::unet_2d_condition::PerBlock;
use diffusion_models::{
    AddedCondKwargs, UNet2DConditionModel, UNet2DConditionModelConfig, UNet2DConditionOptions,
};

use crate::{Io, device, fixture, load, read_all};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

fn invalid_argument<T: std::fmt::Debug>(result: diffusion_core::Result<T>) -> (String, String) {
    match result {
        Err(Error::InvalidArgument { name, message }) => (name, message),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn encoder_hidden_states_of_the_wrong_width_are_named() -> Result<()> {
    let model = load("sd1_tiny")?;
    let io = Io::open("sd1_tiny")?;
    let sample = io.input::<4>("t0", "sample")?;
    let t = io.tensor::<1>("t0/timestep")?;
    let states = io.input::<3>("t0", "encoder_hidden_states")?;
    // [2, 5, 12] narrowed to width 8.
    let (name, message) =
        invalid_argument(model.forward(sample.clone(), t.clone(), states.clone().narrow(2, 0, 8)));
    assert_eq!(name, "encoder_hidden_states");
    assert!(message.contains("12"), "{message}");
    // A batch that differs from the sample's.
    let (name, _) =
        invalid_argument(model.forward(sample.clone(), t.clone(), states.narrow(0, 0, 1)));
    assert_eq!(name, "encoder_hidden_states");
    // With an encoder projection the width to match is encoder_hid_dim.
    let model = load("variants_a")?;
    let io = Io::open("variants_a")?;
    let mut options = io.options("t0")?;
    options.encoder_attention_mask = None;
    let (name, message) = invalid_argument(
        model.forward_with(
            io.input::<4>("t0", "sample")?,
            io.tensor::<1>("t0/timestep")?,
            io.input::<3>("t0", "encoder_hidden_states")?
                .narrow(2, 0, 12),
            options,
        ),
    );
    assert_eq!(name, "encoder_hidden_states");
    assert!(message.contains("encoder_hid_dim"), "{message}");
    Ok(())
}

#[test]
fn sdxl_without_added_cond_kwargs_is_refused() -> Result<()> {
    let model = load("sdxl_tiny")?;
    let io = Io::open("sdxl_tiny")?;
    let run = |added: Option<AddedCondKwargs>| {
        model.forward_with(
            io.input::<4>("t0", "sample").unwrap(),
            io.tensor::<1>("t0/timestep").unwrap(),
            io.input::<3>("t0", "encoder_hidden_states").unwrap(),
            UNet2DConditionOptions {
                added_cond_kwargs: added,
                ..Default::default()
            },
        )
    };
    let (name, message) = invalid_argument(run(None));
    assert_eq!(name, "added_cond_kwargs");
    assert!(message.contains("text_embeds"), "{message}");
    let text_embeds = io.input::<2>("t0", "text_embeds")?;
    let time_ids = io.input::<2>("t0", "time_ids")?;
    let (name, message) = invalid_argument(run(Some(AddedCondKwargs {
        text_embeds: Some(text_embeds.clone()),
        time_ids: None,
        image_embeds: None,
    })));
    assert_eq!(name, "added_cond_kwargs");
    assert!(message.contains("time_ids"), "{message}");
    // Five time ids instead of six: the widths no longer add up.
    let (name, message) = invalid_argument(run(Some(AddedCondKwargs {
        text_embeds: Some(text_embeds),
        time_ids: Some(time_ids.narrow(1, 0, 5)),
        image_embeds: None,
    })));
    assert_eq!(name, "added_cond_kwargs");
    assert!(
        message.contains("projection_class_embeddings_input_dim"),
        "{message}"
    );
    Ok(())
}

#[test]
fn block_lists_that_disagree_name_the_field() -> Result<()> {
    for (key, value) in [
        ("attention_head_dim", serde_json::json!([2, 2])),
        ("layers_per_block", serde_json::json!([2, 2])),
        ("cross_attention_dim", serde_json::json!([12, 12, 12, 12])),
        ("only_cross_attention", serde_json::json!([true])),
        ("transformer_layers_per_block", serde_json::json!([1, 1])),
        ("block_out_channels", serde_json::json!([8, 16])),
    ] {
        let dir = tempfile::tempdir()?;
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            fixture("sd1_tiny").join("config.json"),
        )?)?;
        config[key] = value;
        std::fs::write(dir.path().join("config.json"), config.to_string())?;
        std::fs::copy(fixture("sd1_tiny").join(WEIGHTS), dir.path().join(WEIGHTS))?;
        match UNet2DConditionModel::from_pretrained(dir.path(), &device()) {
            Err(Error::ConfigField { path, field, .. }) => {
                assert_eq!(field, key);
                assert_eq!(path, dir.path().join("config.json"));
            }
            other => panic!("{key}: expected ConfigField, got {other:?}"),
        }
    }
    // The same check when building from a config in code.
    let config = UNet2DConditionModelConfig {
        attention_head_dim: PerBlock::List(vec![8, 8]),
        ..Default::default()
    };
    match UNet2DConditionModel::new(&config, &device()) {
        Err(Error::ConfigField { field, .. }) => assert_eq!(field, "attention_head_dim"),
        other => panic!("expected ConfigField, got {other:?}"),
    }
    Ok(())
}

#[test]
fn unsupported_values_are_refused_by_name() -> Result<()> {
    let small = |edit: &dyn Fn(&mut UNet2DConditionModelConfig)| {
        let mut config = UNet2DConditionModelConfig {
            block_out_channels: vec![8, 16],
            norm_num_groups: Some(4),
            cross_attention_dim: PerBlock::One(12),
            attention_head_dim: PerBlock::One(2),
            layers_per_block: PerBlock::One(1),
            down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
            ..Default::default()
        };
        edit(&mut config);
        UNet2DConditionModel::new(&config, &device())
    };
    assert!(small(&|_| {}).is_ok());
    let unsupported = |result: diffusion_core::Result<UNet2DConditionModel>| match result {
        Err(Error::Unsupported { field, .. }) => field,
        other => panic!("expected Unsupported, got {other:?}"),
    };
    assert_eq!(
        unsupported(small(&|c| c.dual_cross_attention = true)),
        "dual_cross_attention"
    );
    assert_eq!(
        unsupported(small(
            &|c| c.down_block_types[1] = "SimpleCrossAttnDownBlock2D".into()
        )),
        "down_block_types"
    );
    assert_eq!(
        unsupported(small(
            &|c| c.mid_block_type = Some("UNetMidBlock2DSimpleCrossAttn".into())
        )),
        "mid_block_type"
    );
    assert_eq!(
        unsupported(small(&|c| c.addition_embed_type = Some("text".into()))),
        "addition_embed_type"
    );
    assert_eq!(
        unsupported(small(&|c| c.attention_type = "gated".into())),
        "attention_type"
    );
    assert_eq!(
        unsupported(small(&|c| c.resnet_time_scale_shift = "ada_group".into())),
        "resnet_time_scale_shift"
    );
    // diffusers refuses num_attention_heads outright.
    match small(&|c| c.num_attention_heads = Some(PerBlock::One(2))) {
        Err(Error::ConfigField { field, .. }) => assert_eq!(field, "num_attention_heads"),
        other => panic!("expected ConfigField, got {other:?}"),
    }
    // Linear projections need the heads to divide the channels (diffusers fails too).
    match small(&|c| {
        c.use_linear_projection = true;
        c.attention_head_dim = PerBlock::One(3);
    }) {
        Err(Error::ConfigField { field, .. }) => assert_eq!(field, "attention_head_dim"),
        other => panic!("expected ConfigField, got {other:?}"),
    }
    Ok(())
}

#[test]
fn rare_inputs_of_the_wrong_kind_or_shape_are_named() -> Result<()> {
    let model = load("sd1_tiny")?;
    let io = Io::open("sd1_tiny")?;
    let run = |options: UNet2DConditionOptions| {
        model.forward_with(
            io.input::<4>("controlnet", "sample").unwrap(),
            io.tensor::<1>("controlnet/timestep").unwrap(),
            io.input::<3>("controlnet", "encoder_hidden_states")
                .unwrap(),
            options,
        )
    };
    let controlnet = io.options("controlnet")?;
    let mut fewer = controlnet.clone();
    fewer
        .down_block_additional_residuals
        .as_mut()
        .unwrap()
        .pop();
    assert_eq!(
        invalid_argument(run(fewer)).0,
        "down_block_additional_residuals"
    );
    let mut mid_only = controlnet.clone();
    mid_only.down_block_additional_residuals = None;
    assert_eq!(
        invalid_argument(run(mid_only)).0,
        "down_block_additional_residuals"
    );
    let mut bad_mid = controlnet;
    bad_mid.mid_block_additional_residual = bad_mid
        .mid_block_additional_residual
        .map(|m| m.narrow(1, 0, 8));
    assert_eq!(
        invalid_argument(run(bad_mid)).0,
        "mid_block_additional_residual"
    );

    let mut adapter = io.options("adapter")?;
    adapter
        .down_intrablock_additional_residuals
        .as_mut()
        .unwrap()
        .swap(0, 1);
    assert_eq!(
        invalid_argument(run(adapter)).0,
        "down_intrablock_additional_residuals"
    );

    let mut mask = io.options("masked")?;
    mask.encoder_attention_mask = mask.encoder_attention_mask.map(|m| m.narrow(1, 0, 4));
    assert_eq!(invalid_argument(run(mask)).0, "encoder_attention_mask");

    let cond = UNet2DConditionOptions {
        timestep_cond: Some(io.input::<4>("t0", "sample")?.flatten::<2>(1, 3)),
        ..Default::default()
    };
    let (name, message) = invalid_argument(run(cond));
    assert_eq!(name, "timestep_cond");
    assert!(message.contains("time_cond_proj_dim"), "{message}");

    let labels = UNet2DConditionOptions {
        class_labels: Some(diffusion_models::ClassLabels::Indices(vec![1, 2])),
        ..Default::default()
    };
    assert_eq!(invalid_argument(run(labels)).0, "class_labels");

    let three = model.forward(
        io.input::<4>("t0", "sample")?,
        crate::values_tensor(&[1.0, 2.0, 3.0]),
        io.input::<3>("t0", "encoder_hidden_states")?,
    );
    assert_eq!(invalid_argument(three).0, "timesteps");
    Ok(())
}

#[test]
fn strict_loading_names_the_missing_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = read_all(&fixture("sdxl_tiny").join(WEIGHTS))?;
    let removed = "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight";
    let before = tensors.len();
    tensors.retain(|t| t.key != removed);
    assert_eq!(tensors.len(), before - 1);
    std::fs::copy(
        fixture("sdxl_tiny").join("config.json"),
        dir.path().join("config.json"),
    )?;
    write_safetensors(dir.path().join(WEIGHTS), &tensors, SaveDtype::F32)?;
    match UNet2DConditionModel::from_pretrained(dir.path(), &device()) {
        Err(Error::MissingTensor { key, .. }) => assert_eq!(key, removed),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    Ok(())
}
