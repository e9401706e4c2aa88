//! `CLIPTextModel` / `CLIPTextModelWithProjection` against transformers: every output and hidden
//! state within 1e-4, `clip_skip`, and typed errors for bad inputs and wrong weights.

use anyhow::{Context, Result};
use diffusion_core::Error;
use diffusion_core::burn::tensor::{FloatDType, Int, Tensor, TensorData};
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::{SaveDtype, WeightSource};
use diffusion_models::modeling_utils::{PretrainedOptions, to_dtype};
use diffusion_models::text_encoders::{
    CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Padding,
};
use safetensors::SafeTensors;

use crate::{device, fixture};

/// Absolute tolerance of every f32 comparison with the oracle.
const TOLERANCE: f32 = 1e-4;

struct Io {
    floats: WeightSource,
    ids: Vec<i64>,
    shape: [usize; 2],
}

impl Io {
    fn open(case: &str) -> Result<Self> {
        let path = fixture(case).join("io.safetensors");
        let bytes = std::fs::read(&path)?;
        let st = SafeTensors::deserialize(&bytes)?;
        let (ids, shape) = read_i64(&st, "input_ids")?;
        Ok(Self {
            floats: WeightSource::open(&path)?,
            ids,
            shape,
        })
    }

    /// An int64 tensor of the io file.
    fn int_tensor(&self, key: &str) -> Result<Tensor<2, Int>> {
        let bytes = std::fs::read(self.floats.origin())?;
        let (data, shape) = read_i64(&SafeTensors::deserialize(&bytes)?, key)?;
        Ok(Tensor::from_data(TensorData::new(data, shape), &device()))
    }

    fn input_ids(&self) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(self.ids.clone(), self.shape), &device())
    }

    fn tensor<const D: usize>(&self, key: &str) -> Result<Tensor<D>> {
        self.floats
            .tensor::<D>(key, &device())
            .with_context(|| key.to_string())
    }
}

fn read_i64(st: &SafeTensors<'_>, key: &str) -> Result<(Vec<i64>, [usize; 2])> {
    let view = st.tensor(key).with_context(|| key.to_string())?;
    let shape = [view.shape()[0], view.shape()[1]];
    let data = view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok((data, shape))
}

fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let diff = to_vec(got)
        .iter()
        .zip(&to_vec(want))
        .map(|(g, w)| {
            assert!(g.is_finite(), "{what}: non-finite output {g}");
            (g - w).abs()
        })
        .fold(0.0, f32::max);
    eprintln!("{what}: max |diff| = {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "{what}: max |diff| {diff:e} > {TOLERANCE:e}"
    );
    diff
}

fn check_hidden_states(case: &str, io: &Io, hidden: &[Tensor<3>], layers: usize) -> Result<()> {
    assert_eq!(hidden.len(), layers + 1, "{case}: number of hidden states");
    for (i, h) in hidden.iter().enumerate() {
        assert_close(
            &format!("{case} hidden_states.{i}"),
            h.clone(),
            io.tensor(&format!("hidden_states.{i}"))?,
        );
    }
    Ok(())
}

#[test]
fn clip_text_model_matches_transformers() -> Result<()> {
    for case in ["clip_tiny", "clip_tiny_eos"] {
        let model = CLIPTextModel::from_pretrained(fixture(case), &device())?;
        let io = Io::open(case)?;
        let out = model.forward(io.input_ids())?;
        assert_close(
            &format!("{case} last_hidden_state"),
            out.last_hidden_state.clone(),
            io.tensor("last_hidden_state")?,
        );
        assert_close(
            &format!("{case} pooler_output"),
            out.pooler_output.clone(),
            io.tensor("pooler_output")?,
        );
        check_hidden_states(
            case,
            &io,
            &out.hidden_states,
            model.config().num_hidden_layers,
        )?;
        // last_hidden_state is final_layer_norm of the last hidden state (clip_skip 0).
        let skip0 = out.hidden_state_for_clip_skip(0)?;
        assert_close(
            &format!("{case} final_layer_norm(clip_skip 0)"),
            model.text_model.final_layer_norm.forward(skip0),
            io.tensor("last_hidden_state")?,
        );
        // diffusers' clip_skip = 1 takes hidden_states[-2].
        assert_close(
            &format!("{case} clip_skip 1"),
            out.hidden_state_for_clip_skip(1)?,
            io.tensor("hidden_states.4")?,
        );
        assert!(out.hidden_state_for_clip_skip(6).is_err());
    }
    Ok(())
}

/// The eos model's first two rows come from the tiny tokenizer, so the pooled row is the real eos,
/// not the padding after it (both are 999 for SD 1.x).
#[test]
fn eos_model_input_is_the_tokenizer_output() -> Result<()> {
    let tokenizer = CLIPTokenizer::from_pretrained(fixture("tokenizer_sd1"))?;
    let io = Io::open("clip_tiny_eos")?;
    let batch = tokenizer.tokenize(
        &["a photo of an astronaut riding a horse on mars", ""],
        Padding::MaxLength,
        Some(77),
        true,
    )?;
    let ids: Vec<i64> = batch
        .input_ids
        .iter()
        .flatten()
        .map(|&v| i64::from(v))
        .collect();
    assert_eq!(io.shape, [3, 77]);
    assert_eq!(ids, io.ids[..2 * 77]);
    // The third row holds added tokens above the eos id, so an argmax would pool the wrong row.
    let third = &io.ids[2 * 77..];
    assert!(third.iter().any(|&id| id > 999));
    Ok(())
}

#[test]
fn clip_text_model_with_projection_matches_transformers() -> Result<()> {
    let case = "clip_tiny_projection";
    let model = CLIPTextModelWithProjection::from_pretrained(fixture(case), &device())?;
    let io = Io::open(case)?;
    let out = model.forward(io.input_ids())?;
    assert_close(
        "projection text_embeds",
        out.text_embeds,
        io.tensor("text_embeds")?,
    );
    assert_close(
        "projection last_hidden_state",
        out.last_hidden_state,
        io.tensor("last_hidden_state")?,
    );
    check_hidden_states(case, &io, &out.hidden_states, 5)?;
    Ok(())
}

#[test]
fn bad_inputs_are_typed_errors() -> Result<()> {
    let model = CLIPTextModel::from_pretrained(fixture("clip_tiny"), &device())?;
    let ids = |data: Vec<i64>, shape: [usize; 2]| {
        Tensor::<2, Int>::from_data(TensorData::new(data, shape), &device())
    };
    for (data, shape) in [
        (vec![0, 5, 1000], [1, 3]),
        (vec![0, -1, 3], [1, 3]),
        (vec![1; 78], [1, 78]),
    ] {
        match model.forward(ids(data, shape)) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "input_ids"),
            other => panic!("expected InvalidArgument, got {:?}", other.map(|_| ())),
        }
    }
    // 77 tokens is the longest allowed sequence.
    let out = model.forward(ids(vec![3; 77], [1, 77]))?;
    assert_eq!(out.last_hidden_state.dims(), [1, 77, 32]);
    Ok(())
}

#[test]
fn wrong_weights_name_the_missing_key() -> Result<()> {
    // The projection model needs `text_projection.weight`, which a CLIPTextModel folder lacks.
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        fixture("clip_tiny_projection").join("config.json"),
        dir.path().join("config.json"),
    )?;
    std::fs::copy(
        fixture("clip_tiny").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )?;
    match CLIPTextModelWithProjection::from_pretrained(dir.path(), &device()) {
        Err(Error::MissingTensor { key, .. }) => assert_eq!(key, "text_projection.weight"),
        other => panic!("expected MissingTensor, got {:?}", other.map(|_| ())),
    }
    // The other way round, strict loading rejects the extra projection tensor.
    std::fs::copy(
        fixture("clip_tiny").join("config.json"),
        dir.path().join("config.json"),
    )?;
    std::fs::copy(
        fixture("clip_tiny_projection").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )?;
    match CLIPTextModel::from_pretrained(dir.path(), &device()) {
        Err(Error::UnexpectedTensors { keys, .. }) => {
            assert_eq!(keys, vec!["text_projection.weight".to_string()])
        }
        other => panic!("expected UnexpectedTensors, got {:?}", other.map(|_| ())),
    }
    // A weight file with a layer removed names that layer's first key.
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        fixture("clip_tiny").join("config.json"),
        dir.path().join("config.json"),
    )?;
    let config = r#"{"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
        "num_hidden_layers": 6, "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 2}"#;
    std::fs::write(dir.path().join("config.json"), config)?;
    std::fs::copy(
        fixture("clip_tiny").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )?;
    match CLIPTextModel::from_pretrained(dir.path(), &device()) {
        Err(Error::MissingTensor { key, .. }) => {
            assert!(key.starts_with("text_model.encoder.layers.5."), "{key}")
        }
        other => panic!("expected MissingTensor, got {:?}", other.map(|_| ())),
    }
    let empty = tempfile::tempdir()?;
    assert!(matches!(
        CLIPTextModel::from_pretrained(empty.path(), &device()),
        Err(Error::NotFound { .. })
    ));
    Ok(())
}

/// transformers 5 saves a bare `CLIPTextModel` without the `text_model.` prefix (as in the
/// fixtures); Stable Diffusion checkpoints carry it. Both load to the same model.
#[test]
fn prefixed_and_bare_keys_load_alike() -> Result<()> {
    let bytes = std::fs::read(fixture("clip_tiny").join("model.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    assert!(names.iter().all(|k| !k.starts_with("text_model.")));
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = names
        .iter()
        .map(|k| Ok((format!("text_model.{k}"), st.tensor(k)?)))
        .collect::<Result<_>>()?;
    let dir = tempfile::tempdir()?;
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors"))?;
    std::fs::copy(
        fixture("clip_tiny").join("config.json"),
        dir.path().join("config.json"),
    )?;
    let model = CLIPTextModel::from_pretrained(dir.path(), &device())?;
    let io = Io::open("clip_tiny")?;
    let out = model.forward(io.input_ids())?;
    assert_close(
        "prefixed keys last_hidden_state",
        out.last_hidden_state,
        io.tensor("last_hidden_state")?,
    );
    Ok(())
}

#[test]
fn attention_mask_matches_transformers() -> Result<()> {
    let case = "clip_tiny_eos";
    let model = CLIPTextModel::from_pretrained(fixture(case), &device())?;
    let io = Io::open(case)?;
    let mask = io.int_tensor("attention_mask")?;
    let out = model.forward_with_attention_mask(io.input_ids(), Some(mask.clone()))?;
    assert_close(
        "masked last_hidden_state",
        out.last_hidden_state,
        io.tensor("masked/last_hidden_state")?,
    );
    assert_close(
        "masked pooler_output",
        out.pooler_output,
        io.tensor("masked/pooler_output")?,
    );
    let bad = [mask.clone().slice([0..2, 0..77]), mask.mul_scalar(2)];
    for bad in bad {
        match model.forward_with_attention_mask(io.input_ids(), Some(bad)) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "attention_mask"),
            other => panic!("expected InvalidArgument, got {:?}", other.map(|_| ())),
        }
    }
    Ok(())
}

#[test]
fn bad_configs_are_typed_errors_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        fixture("clip_tiny").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )?;
    let config_path = dir.path().join("config.json");
    std::fs::write(
        &config_path,
        r#"{"hidden_size": 32, "num_attention_heads": 4, "hidden_act": "gelu_new"}"#,
    )?;
    match CLIPTextModel::from_pretrained(dir.path(), &device()) {
        Err(Error::Unsupported { path, field, .. }) => {
            assert_eq!((path, field.as_str()), (config_path.clone(), "hidden_act"))
        }
        other => panic!("expected Unsupported, got {:?}", other.map(|_| ())),
    }
    std::fs::write(
        &config_path,
        r#"{"hidden_size": 32, "num_attention_heads": 5}"#,
    )?;
    assert!(matches!(
        CLIPTextModel::from_pretrained(dir.path(), &device()),
        Err(Error::ConfigField { field, .. }) if field == "num_attention_heads"
    ));
    Ok(())
}

/// `save_pretrained` writes a transformers folder that loads back to the same model, and an fp16
/// variant that `from_pretrained_with(variant = "fp16")` finds.
#[test]
fn save_pretrained_round_trips_with_and_without_variant() -> Result<()> {
    let case = "clip_tiny_projection";
    let model = CLIPTextModelWithProjection::from_pretrained(fixture(case), &device())?;
    let io = Io::open(case)?;
    let dir = tempfile::tempdir()?;
    model.save_pretrained(dir.path())?;
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    assert_eq!(
        config["architectures"],
        serde_json::json!(["CLIPTextModelWithProjection"])
    );
    assert_eq!(config["model_type"], "clip_text_model");
    assert_eq!(config["projection_dim"], 32);
    let reloaded = CLIPTextModelWithProjection::from_pretrained(dir.path(), &device())?;
    assert_eq!(reloaded.config(), model.config());
    let out = reloaded.forward(io.input_ids())?;
    assert_close(
        "reloaded text_embeds",
        out.text_embeds,
        io.tensor("text_embeds")?,
    );

    let plain = CLIPTextModel::from_pretrained(fixture("clip_tiny"), &device())?;
    let dir = tempfile::tempdir()?;
    plain.save_pretrained_with(dir.path(), Some("fp16"), SaveDtype::F16)?;
    assert!(dir.path().join("model.fp16.safetensors").is_file());
    assert!(!dir.path().join("model.safetensors").exists());
    // Without the variant the folder has no weights, and the error says which variant exists.
    match CLIPTextModel::from_pretrained(dir.path(), &device()) {
        Err(Error::NotFound { message, .. }) => {
            assert!(message.contains("model.fp16.safetensors"), "{message}")
        }
        other => panic!("expected NotFound, got {:?}", other.map(|_| ())),
    }
    let options = PretrainedOptions {
        variant: Some("fp16".into()),
        ..PretrainedOptions::default()
    };
    let (half_stored, _) = CLIPTextModel::from_pretrained_with(dir.path(), &options, &device())?;
    let io = Io::open("clip_tiny")?;
    let got = to_vec(half_stored.forward(io.input_ids())?.last_hidden_state);
    let want = to_vec(io.tensor::<3>("last_hidden_state")?);
    let rel = relative(&got, &want);
    eprintln!("fp16-stored weights: relative error {rel:.1e}");
    assert!(rel <= 1e-2, "{rel:e}");
    Ok(())
}

/// `max |got - want| / max |want|`, after checking every value is finite.
fn relative(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "non-finite output {g}");
            (g - w).abs()
        })
        .fold(0.0f32, f32::max);
    diff / scale
}

/// Both encoders cast to f16 / bf16 stay close to f32. Bounds as for the UNet: f16 1e-2; bf16
/// 3e-2, what PyTorch's own CPU bf16 run reaches on these fixtures (see
/// `unet2d_condition/precision.rs`).
#[test]
fn f16_and_bf16_stay_close_to_f32() -> Result<()> {
    for dtype in [FloatDType::F16, FloatDType::BF16] {
        let bound = if dtype == FloatDType::BF16 {
            3e-2
        } else {
            1e-2
        };
        for case in ["clip_tiny", "clip_tiny_eos"] {
            let model = to_dtype(
                CLIPTextModel::from_pretrained(fixture(case), &device())?,
                dtype,
            )?;
            let io = Io::open(case)?;
            let out = model.forward(io.input_ids())?;
            assert_eq!(FloatDType::from(out.last_hidden_state.dtype()), dtype);
            for (name, got) in [
                ("last_hidden_state", to_vec(out.last_hidden_state)),
                ("pooler_output", to_vec(out.pooler_output)),
            ] {
                let rel = relative(
                    &got,
                    &to_vec(
                        io.tensor::<3>(name)
                            .or_else(|_| io.tensor::<2>(name).map(|t| t.unsqueeze_dim(0)))?,
                    ),
                );
                eprintln!("{case} {name} {dtype:?}: relative error {rel:.1e}");
                assert!(rel <= bound, "{case} {name} {dtype:?}: {rel:e}");
            }
        }
        let case = "clip_tiny_projection";
        let model = to_dtype(
            CLIPTextModelWithProjection::from_pretrained(fixture(case), &device())?,
            dtype,
        )?;
        let io = Io::open(case)?;
        let got = to_vec(model.forward(io.input_ids())?.text_embeds);
        let rel = relative(&got, &to_vec(io.tensor::<2>("text_embeds")?));
        eprintln!("{case} text_embeds {dtype:?}: relative error {rel:.1e}");
        assert!(rel <= bound, "{case} text_embeds {dtype:?}: {rel:e}");
    }
    Ok(())
}
