//! `CLIPVisionModel` / `CLIPVisionModelWithProjection` against transformers: every output and
//! hidden state within 1e-4, loading from bare and full-CLIP folders, saving, and typed errors.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::weights::{NamedTensor, SaveDtype, WeightSource, write_safetensors};
use diffusion_models::image_encoders::clip_vision::penultimate_hidden_state;
use diffusion_models::image_encoders::{
    CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection,
};
use diffusion_models::modeling_utils::PretrainedOptions;
use diffusion_models::state_dict::LoadMode;

use crate::{assert_close, device, fixture, io_tensor};

fn io(case: &str) -> Result<WeightSource> {
    Ok(WeightSource::open(fixture(case).join("io.safetensors"))?)
}

fn check_projection_model(case: &str, layers: usize) -> Result<()> {
    let model = CLIPVisionModelWithProjection::from_pretrained(fixture(case), &device())?;
    let io = io(case)?;
    let out = model.forward(io_tensor::<4>(&io, "pixel_values")?)?;
    assert_close(
        &format!("{case} image_embeds"),
        out.image_embeds.clone(),
        io_tensor(&io, "image_embeds")?,
    );
    assert_close(
        &format!("{case} last_hidden_state"),
        out.last_hidden_state.clone(),
        io_tensor(&io, "last_hidden_state")?,
    );
    assert_eq!(out.hidden_states.len(), layers + 1);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(
            &format!("{case} hidden_states.{i}"),
            h.clone(),
            io_tensor(&io, &format!("hidden_states.{i}"))?,
        );
    }
    assert_close(
        &format!("{case} hidden_states[-2]"),
        out.penultimate_hidden_state()?,
        io_tensor(&io, &format!("hidden_states.{}", layers - 1))?,
    );
    Ok(())
}

#[test]
fn projection_model_matches_transformers() -> Result<()> {
    check_projection_model("clip_vision_projection", 5)
}

#[test]
fn projection_model_loads_the_vision_tower_of_a_full_clip_model() -> Result<()> {
    let (config, nested) =
        CLIPVisionConfig::from_json_file(fixture("clip_full").join("config.json"))?;
    assert!(nested);
    assert_eq!(
        (config.hidden_act.as_str(), config.num_hidden_layers),
        ("gelu", 2)
    );
    check_projection_model("clip_full", 2)
}

#[test]
fn vision_model_matches_transformers() -> Result<()> {
    let case = "clip_vision_model";
    let model = CLIPVisionModel::from_pretrained(fixture(case), &device())?;
    let io = io(case)?;
    let out = model.forward(io_tensor::<4>(&io, "pixel_values")?)?;
    assert_close(
        "pooler_output",
        out.pooler_output,
        io_tensor(&io, "pooler_output")?,
    );
    assert_close(
        "last_hidden_state",
        out.last_hidden_state,
        io_tensor(&io, "last_hidden_state")?,
    );
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(
            &format!("hidden_states.{i}"),
            h.clone(),
            io_tensor(&io, &format!("hidden_states.{i}"))?,
        );
    }
    assert_close(
        "penultimate",
        penultimate_hidden_state(&out.hidden_states)?,
        io_tensor(&io, "hidden_states.2")?,
    );
    Ok(())
}

#[test]
fn vision_model_loads_projection_and_full_folders() -> Result<()> {
    for case in ["clip_vision_projection", "clip_full"] {
        let model = CLIPVisionModel::from_pretrained(fixture(case), &device())?;
        let io = io(case)?;
        let out = model.forward(io_tensor::<4>(&io, "pixel_values")?)?;
        assert_close(
            &format!("{case} last_hidden_state"),
            out.last_hidden_state,
            io_tensor(&io, "last_hidden_state")?,
        );
    }
    Ok(())
}

#[test]
fn save_pretrained_round_trips_with_variants() -> Result<()> {
    let case = "clip_vision_projection";
    let model = CLIPVisionModelWithProjection::from_pretrained(fixture(case), &device())?;
    let dir = tempfile::tempdir()?;
    model.save_pretrained(dir.path())?;
    model.save_pretrained_with(dir.path(), Some("fp16"), SaveDtype::F16)?;
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    assert_eq!(config["model_type"], "clip_vision_model");
    assert_eq!(config["architectures"][0], "CLIPVisionModelWithProjection");

    let io = io(case)?;
    let pixels = io_tensor::<4>(&io, "pixel_values")?;
    let reloaded = CLIPVisionModelWithProjection::from_pretrained(dir.path(), &device())?;
    assert_close(
        "reloaded image_embeds",
        reloaded.forward(pixels.clone())?.image_embeds,
        io_tensor(&io, "image_embeds")?,
    );
    let options = PretrainedOptions {
        variant: Some("fp16".into()),
        ..PretrainedOptions::default()
    };
    let (half, report) =
        CLIPVisionModelWithProjection::from_pretrained_with(dir.path(), &options, &device())?;
    assert!(report.is_exact());
    let got = half.forward(pixels)?.image_embeds;
    let want = io_tensor::<2>(&io, "image_embeds")?;
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(diff < 0.05, "fp16 weights: {diff}");
    Ok(())
}

#[test]
fn wrong_pixel_shapes_are_invalid_arguments() -> Result<()> {
    let model = CLIPVisionModelWithProjection::from_pretrained(
        fixture("clip_vision_projection"),
        &device(),
    )?;
    for shape in [
        [1, 3, 32, 30],
        [1, 1, 32, 32],
        [0, 3, 32, 32],
        [1, 3, 64, 64],
    ] {
        let x = Tensor::<4>::zeros(shape, &device());
        match model.forward(x) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "pixel_values"),
            other => panic!("{shape:?}: {other:?}"),
        }
    }
    Ok(())
}

/// A copy of a fixture folder whose config and tensors `edit` changed.
fn edited_copy(
    case: &str,
    edit_config: impl Fn(&mut serde_json::Value),
    edit_tensors: impl Fn(&mut Vec<NamedTensor>),
) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(case).join("config.json"))?)?;
    edit_config(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string())?;
    let source = WeightSource::open(fixture(case).join("model.safetensors"))?;
    let mut tensors = source
        .keys()
        .map(|k| {
            let (values, shape) = source.read_f32(k)?;
            Ok(NamedTensor {
                key: k.to_string(),
                shape,
                values,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    edit_tensors(&mut tensors);
    write_safetensors(
        dir.path().join("model.safetensors"),
        &tensors,
        SaveDtype::F32,
    )?;
    Ok(dir)
}

#[test]
fn loading_errors_name_the_file_field_or_key() -> Result<()> {
    let case = "clip_vision_projection";
    let load =
        |dir: &std::path::Path| CLIPVisionModelWithProjection::from_pretrained(dir, &device());

    let empty = tempfile::tempdir()?;
    assert!(matches!(load(empty.path()), Err(Error::NotFound { .. })));

    let dir = edited_copy(case, |c| c["num_attention_heads"] = 5.into(), |_| {})?;
    match load(dir.path()) {
        Err(Error::ConfigField { path, field, .. }) => {
            assert_eq!(field, "num_attention_heads");
            assert!(path.ends_with("config.json"));
        }
        other => panic!("{other:?}"),
    }
    let dir = edited_copy(case, |c| c["hidden_act"] = "relu".into(), |_| {})?;
    assert!(
        matches!(load(dir.path()), Err(Error::Unsupported { field, .. }) if field == "hidden_act")
    );
    let dir = edited_copy(case, |c| c["patch_size"] = 64.into(), |_| {})?;
    assert!(
        matches!(load(dir.path()), Err(Error::ConfigField { field, .. }) if field == "patch_size")
    );

    let missing = "vision_model.post_layernorm.weight";
    let dir = edited_copy(case, |_| {}, |t| t.retain(|t| t.key != missing))?;
    assert!(matches!(load(dir.path()), Err(Error::MissingTensor { key, .. }) if key == missing));

    let dir = edited_copy(
        case,
        |_| {},
        |t| {
            t.push(NamedTensor {
                key: "vision_model.extra".into(),
                shape: vec![1],
                values: vec![0.0],
            })
        },
    )?;
    assert!(
        matches!(load(dir.path()), Err(Error::UnexpectedTensors { keys, .. }) if keys == ["vision_model.extra"])
    );
    let options = PretrainedOptions {
        mode: LoadMode::Lenient,
        ..PretrainedOptions::default()
    };
    let (_, report) =
        CLIPVisionModelWithProjection::from_pretrained_with(dir.path(), &options, &device())?;
    assert_eq!(report.unexpected, ["vision_model.extra"]);

    let key = "vision_model.embeddings.position_embedding.weight";
    let dir = edited_copy(
        case,
        |_| {},
        |t| {
            let t = t.iter_mut().find(|t| t.key == key).expect("fixture key");
            t.shape = vec![64, 32];
            t.values.truncate(64 * 32);
        },
    )?;
    assert!(matches!(load(dir.path()), Err(Error::TensorShape { key: k, .. }) if k == key));
    Ok(())
}
