//! Strict loading and invalid inputs are typed errors that name the key, field or argument.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_models::ModelMixin;
use diffusion_models::{ClassLabels, UNet2DModel, UNet2DModelConfig};

use crate::{Io, device, fixture, read_all, timesteps, write_model};

fn ddpm_tensors() -> Result<Vec<diffusion_core::weights::NamedTensor>> {
    read_all(&fixture("ddpm_tiny").join("diffusion_pytorch_model.safetensors"))
}

#[test]
fn missing_tensor_names_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = ddpm_tensors()?;
    let removed = "mid_block.attentions.0.to_k.weight";
    let before = tensors.len();
    tensors.retain(|t| t.key != removed);
    assert_eq!(tensors.len(), before - 1);
    let weights = write_model("ddpm_tiny", dir.path(), &tensors)?;
    match UNet2DModel::from_pretrained(dir.path(), &device()) {
        Err(Error::MissingTensor { path, key }) => {
            assert_eq!(key, removed);
            assert_eq!(path, weights);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    Ok(())
}

#[test]
fn unexpected_tensor_names_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = ddpm_tensors()?;
    tensors.push(diffusion_core::weights::NamedTensor {
        key: "down_blocks.0.attentions.0.to_q.weight".into(),
        shape: vec![8, 8],
        values: vec![0.0; 64],
    });
    let weights = write_model("ddpm_tiny", dir.path(), &tensors)?;
    match UNet2DModel::from_pretrained(dir.path(), &device()) {
        Err(Error::UnexpectedTensors { path, keys }) => {
            assert_eq!(keys, ["down_blocks.0.attentions.0.to_q.weight"]);
            assert_eq!(path, weights);
        }
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
    Ok(())
}

#[test]
fn wrong_shape_names_key_and_both_shapes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = ddpm_tensors()?;
    let key = "up_blocks.0.attentions.1.to_out.0.weight";
    let t = tensors
        .iter_mut()
        .find(|t| t.key == key)
        .expect("key in fixture");
    assert_eq!(t.shape, [16, 16]);
    t.shape = vec![16, 8];
    t.values.truncate(128);
    let weights = write_model("ddpm_tiny", dir.path(), &tensors)?;
    match UNet2DModel::from_pretrained(dir.path(), &device()) {
        Err(Error::TensorShape {
            path,
            key: k,
            expected,
            got,
        }) => {
            assert_eq!(k, key);
            assert_eq!(path, weights);
            assert_eq!(expected, [16, 16]);
            assert_eq!(got, [16, 8]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    Ok(())
}

#[test]
fn truncated_file_names_the_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        fixture("ddpm_tiny").join("config.json"),
        dir.path().join("config.json"),
    )?;
    let bytes = std::fs::read(fixture("ddpm_tiny").join("diffusion_pytorch_model.safetensors"))?;
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    std::fs::write(&weights, &bytes[..bytes.len() / 2])?;
    match UNet2DModel::from_pretrained(dir.path(), &device()) {
        Err(Error::Safetensors { path, message }) => {
            assert_eq!(path, weights);
            assert!(message.contains("truncated"), "{message}");
        }
        other => panic!("expected Safetensors, got {other:?}"),
    }
    Ok(())
}

/// Write ddpm_tiny's config with `edit` applied into a fresh folder (with valid weights).
fn with_config(edit: impl FnOnce(&mut serde_json::Value)) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixture("ddpm_tiny").join("config.json"),
    )?)?;
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string())?;
    std::fs::copy(
        fixture("ddpm_tiny").join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )?;
    Ok(dir)
}

#[test]
fn disagreeing_block_lists_name_the_field() -> Result<()> {
    let dir = with_config(|c| c["up_block_types"] = serde_json::json!(["UpBlock2D"]))?;
    match UNet2DModel::from_pretrained(dir.path(), &device()) {
        Err(Error::ConfigField { path, field, .. }) => {
            assert_eq!(field, "up_block_types");
            assert_eq!(path, dir.path().join("config.json"));
        }
        other => panic!("expected ConfigField, got {other:?}"),
    }
    let dir = with_config(|c| c["block_out_channels"] = serde_json::json!([8, 16, 32]))?;
    match UNet2DModel::from_pretrained(dir.path(), &device()) {
        Err(Error::ConfigField { field, .. }) => assert_eq!(field, "block_out_channels"),
        other => panic!("expected ConfigField, got {other:?}"),
    }
    Ok(())
}

#[test]
fn unsupported_values_are_typed_errors() -> Result<()> {
    let dir =
        with_config(|c| c["down_block_types"][1] = serde_json::json!("CrossAttnDownBlock2D"))?;
    match UNet2DModel::from_pretrained(dir.path(), &device()) {
        Err(Error::Unsupported {
            path, field, value, ..
        }) => {
            assert_eq!(field, "down_block_types");
            assert_eq!(value, "CrossAttnDownBlock2D");
            assert_eq!(path, dir.path().join("config.json"));
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let dir = with_config(|c| c["act_fn"] = serde_json::json!("tanh"))?;
    assert!(matches!(
        UNet2DModel::from_pretrained(dir.path(), &device()),
        Err(Error::Unsupported { field, .. }) if field == "act_fn"
    ));
    let dir = with_config(|c| c["norm_num_groups"] = serde_json::json!(3))?;
    assert!(matches!(
        UNet2DModel::from_pretrained(dir.path(), &device()),
        Err(Error::ConfigField { field, .. }) if field == "norm_num_groups"
    ));
    let config = UNet2DModelConfig {
        resnet_time_scale_shift: "spatial".into(),
        ..Default::default()
    };
    assert!(matches!(
        UNet2DModel::new(&config, &device()),
        Err(Error::Unsupported { field, .. }) if field == "resnet_time_scale_shift"
    ));
    Ok(())
}

#[test]
fn bad_forward_inputs_are_invalid_arguments() -> Result<()> {
    let model = UNet2DModel::from_pretrained(fixture("class_scale_shift"), &device())?;
    let io = Io::open("class_scale_shift")?;
    let sample = io.tensor::<4>("sample")?;
    let label = || Some(ClassLabels::Indices(vec![1]));
    let name = |r: diffusion_core::Result<_>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    assert_eq!(
        name(model.forward(sample.clone(), timesteps(&[1.0, 2.0, 3.0]), label())),
        "timesteps"
    );
    assert_eq!(
        name(model.forward(sample.clone(), timesteps(&[1.0]), None)),
        "class_labels"
    );
    assert_eq!(
        name(model.forward(
            sample.clone(),
            timesteps(&[1.0]),
            Some(ClassLabels::Indices(vec![10]))
        )),
        "class_labels"
    );
    let odd = sample.clone().narrow(3, 0, 15);
    assert_eq!(
        name(model.forward(odd, timesteps(&[1.0]), label())),
        "sample"
    );
    let two_channels = sample.narrow(1, 0, 2);
    assert_eq!(
        name(model.forward(two_channels, timesteps(&[1.0]), label())),
        "sample"
    );

    let plain = UNet2DModel::from_pretrained(fixture("ddpm_tiny"), &device())?;
    assert_eq!(
        name(plain.forward(io.tensor::<4>("sample")?, timesteps(&[1.0]), label())),
        "class_labels"
    );
    let learned = UNet2DModel::from_pretrained(fixture("learned_identity"), &device())?;
    let small = Io::open("learned_identity")?;
    let emb = Some(ClassLabels::Embeddings(small.tensor::<2>("class_labels")?));
    assert_eq!(
        name(learned.forward(small.tensor::<4>("sample")?, timesteps(&[1.5]), emb)),
        "timesteps"
    );
    Ok(())
}
