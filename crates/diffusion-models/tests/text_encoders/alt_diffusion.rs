//! AltDiffusion's `XLMRobertaTokenizer` and `RobertaSeriesModelWithTransformation` against
//! transformers 5.23 / diffusers 0.42.1 (`fixtures/oracle/gen_pipelines_alt_diffusion.py`): ids
//! of multilingual prompts, encoder outputs with and without attention mask, the
//! pre-transformation variant, and typed errors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use diffusion_core::Error;
use diffusion_core::burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;
use diffusion_models::text_encoders::{
    Padding, RobertaSeriesModelWithTransformation, XLMRobertaTokenizer,
};
use serde_json::Value;

use crate::device;

const TOLERANCE: f32 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/alt_diffusion")
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).expect("rows of ids")
}

fn max_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    to_vec(a)
        .iter()
        .zip(to_vec(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn xlm_roberta_tokenizer_matches_transformers() -> Result<()> {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("tokenizer.json"))?)?;
    let tokenizer = XLMRobertaTokenizer::from_pretrained(dir().join("alt/tokenizer"))?;
    let prompts: Vec<String> = serde_json::from_value(expected["prompts"].clone())?;
    assert_eq!(tokenizer.model_max_length(), 77);
    assert_eq!(
        (
            tokenizer.bos_token_id(),
            tokenizer.pad_token_id(),
            tokenizer.eos_token_id()
        ),
        (0, 1, 2)
    );
    assert_eq!(
        tokenizer.vocab_size() as u64,
        expected["vocab_size"].as_u64().unwrap()
    );

    let out = tokenizer.tokenize(&prompts, Padding::MaxLength, Some(77), true)?;
    assert_eq!(out.input_ids, rows(&expected["max_length_77"]["input_ids"]));
    assert_eq!(
        out.attention_mask,
        rows(&expected["max_length_77"]["attention_mask"])
    );
    let plain: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tokenizer.encode(p, true))
        .collect::<diffusion_core::Result<_>>()?;
    assert_eq!(plain, rows(&expected["no_padding"]["input_ids"]));
    assert!(
        plain.last().unwrap().len() > 77,
        "the long prompt is really truncated"
    );
    let short = tokenizer.tokenize(&prompts[..3], Padding::Longest, Some(8), true)?;
    assert_eq!(short.input_ids, rows(&expected["longest_8"]["input_ids"]));
    assert_eq!(
        short.attention_mask,
        rows(&expected["longest_8"]["attention_mask"])
    );
    for (prompt, tokens) in prompts.iter().zip(expected["tokens"].as_array().unwrap()) {
        let tokens: Vec<String> = serde_json::from_value(tokens.clone())?;
        assert_eq!(tokenizer.tokens(prompt)?, tokens, "{prompt}");
    }
    Ok(())
}

#[test]
fn roberta_series_encoder_matches_diffusers() -> Result<()> {
    let io = WeightSource::open(dir().join("text_encoder.safetensors"))?;
    let dev = device();
    let ids: Tensor<2> = io.tensor("input_ids", &dev)?;
    let mask: Tensor<2> = io.tensor("attention_mask", &dev)?;
    let (ids, mask) = (ids.int(), mask.int());
    let mut worst = 0.0f32;
    for (name, folder) in [("plain", "alt/text_encoder"), ("pre", "text_encoder_pre")] {
        let model = RobertaSeriesModelWithTransformation::from_pretrained(dir().join(folder), &dev)
            .with_context(|| folder.to_string())?;
        assert_eq!(model.config().has_pre_transformation, name == "pre");
        for masked in [true, false] {
            let key = format!("{name}_{}", if masked { "masked" } else { "unmasked" });
            let out = model.forward(ids.clone(), masked.then(|| mask.clone()))?;
            let d = max_diff(
                out.projection_state,
                io.tensor(&format!("{key}/projection_state"), &dev)?,
            );
            assert!(d <= TOLERANCE, "{key} projection_state: {d}");
            worst = worst.max(d);
            let d = max_diff(
                out.last_hidden_state,
                io.tensor(&format!("{key}/last_hidden_state"), &dev)?,
            );
            assert!(d <= TOLERANCE, "{key} last_hidden_state: {d}");
            worst = worst.max(d);
            if key == "plain_masked" {
                assert_eq!(out.hidden_states.len(), 6);
                for (i, h) in out.hidden_states.into_iter().enumerate() {
                    let d = max_diff(h, io.tensor(&format!("{key}/hidden_states.{i}"), &dev)?);
                    assert!(d <= TOLERANCE, "{key} hidden_states.{i}: {d}");
                    worst = worst.max(d);
                }
            }
        }
    }
    eprintln!("RobertaSeriesModelWithTransformation: max abs error {worst:e}");
    Ok(())
}

#[test]
fn roberta_series_bad_inputs_are_typed_errors() -> Result<()> {
    let dev = device();
    let model = RobertaSeriesModelWithTransformation::from_pretrained(
        dir().join("alt/text_encoder"),
        &dev,
    )?;
    let ids = |data: Vec<i64>, shape: [usize; 2]| {
        Tensor::<2, Int>::from_data(TensorData::new(data, shape), &dev)
    };
    let vocab = model.config().vocab_size as i64;
    let err = model
        .forward(ids(vec![0, vocab, 2], [1, 3]), None)
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "input_ids"),
        "{err}"
    );
    // 80 positions minus the padding offset leave 78 tokens.
    let err = model.forward(ids(vec![5; 79], [1, 79]), None).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "input_ids"),
        "{err}"
    );
    let err = model
        .forward(ids(vec![0, 5, 2], [1, 3]), Some(ids(vec![1, 2, 1], [1, 3])))
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "attention_mask"),
        "{err}"
    );
    let err = model
        .forward(ids(vec![0, 5, 2], [1, 3]), Some(ids(vec![1, 1], [1, 2])))
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "attention_mask"),
        "{err}"
    );

    // Loading: a missing tensor names the stored key, a bad config value names the field.
    let tmp = tempfile::tempdir()?;
    let src = dir().join("alt/text_encoder");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json"))?;
    let source = WeightSource::open(src.join("model.safetensors"))?;
    let tensors: Vec<_> = source
        .keys()
        .filter(|k| *k != "roberta.encoder.layer.1.attention.self.query.weight")
        .map(|k| {
            let (values, shape) = source.read_f32(k).unwrap();
            diffusion_core::weights::NamedTensor {
                key: k.to_string(),
                shape,
                values,
            }
        })
        .collect();
    diffusion_core::weights::write_safetensors(
        tmp.path().join("model.safetensors"),
        &tensors,
        diffusion_core::weights::SaveDtype::F32,
    )?;
    let err = RobertaSeriesModelWithTransformation::from_pretrained(tmp.path(), &dev).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { key, .. } if key == "roberta.encoder.layer.1.attention.self.query.weight"),
        "{err}"
    );
    let config = std::fs::read_to_string(src.join("config.json"))?
        .replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"swish\"");
    std::fs::write(tmp.path().join("config.json"), config)?;
    let err = RobertaSeriesModelWithTransformation::from_pretrained(tmp.path(), &dev).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, .. } if field == "hidden_act"),
        "{err}"
    );

    // A tokenizer folder with only the sentencepiece model says so.
    let tok = tempfile::tempdir()?;
    std::fs::write(tok.path().join("sentencepiece.bpe.model"), b"")?;
    let err = XLMRobertaTokenizer::from_pretrained(tok.path()).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { message, .. } if message.contains("sentencepiece.bpe.model")),
        "{err}"
    );
    Ok(())
}
