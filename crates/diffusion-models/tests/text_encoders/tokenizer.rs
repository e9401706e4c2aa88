//! `CLIPTokenizer` ids and masks equal transformers' on prompts with unicode, punctuation,
//! numbers, whitespace runs, truncation and the empty prompt.

use anyhow::{Context, Result};
use diffusion_core::Error;
use diffusion_models::text_encoders::{CLIPTokenizer, Padding};
use serde_json::Value;

use crate::fixture;

const FOLDERS: [&str; 2] = ["tokenizer_sd1", "tokenizer_sd2"];

fn expected(folder: &str) -> Result<Value> {
    let text = std::fs::read_to_string(fixture(folder).join("expected.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Compare every expected case of `folder` with `tokenizer`.
fn check(tokenizer: &CLIPTokenizer, folder: &str) -> Result<()> {
    let expected = expected(folder)?;
    assert_eq!(
        u64::from(tokenizer.pad_token_id()),
        expected["pad_token_id"].as_u64().context("pad_token_id")?,
        "{folder}: pad token id"
    );
    let cases = expected["cases"].as_array().context("cases")?;
    assert!(cases.len() >= 9);
    let prompts: Vec<&str> = cases
        .iter()
        .map(|c| c["prompt"].as_str().expect("prompt"))
        .collect();
    let batch = tokenizer.tokenize(&prompts, Padding::MaxLength, Some(77), true)?;
    for (i, case) in cases.iter().enumerate() {
        let prompt = prompts[i];
        assert_eq!(
            batch.input_ids[i],
            ids(&case["input_ids"]),
            "{folder}: ids of {prompt:?}"
        );
        assert_eq!(
            batch.attention_mask[i],
            ids(&case["attention_mask"]),
            "{folder}: mask of {prompt:?}"
        );
        assert_eq!(
            tokenizer.encode(prompt, true)?,
            ids(&case["untruncated_ids"]),
            "{folder}: untruncated ids of {prompt:?}"
        );
    }
    Ok(())
}

#[test]
fn tokenizer_json_matches_transformers() -> Result<()> {
    for folder in FOLDERS {
        let tokenizer = CLIPTokenizer::from_pretrained(fixture(folder))?;
        assert_eq!(tokenizer.model_max_length(), 77);
        assert_eq!(
            (tokenizer.bos_token_id(), tokenizer.eos_token_id()),
            (998, 999)
        );
        check(&tokenizer, folder)?;
    }
    Ok(())
}

/// Folders as diffusers ships them often have only `vocab.json` + `merges.txt`.
#[test]
fn vocab_and_merges_match_transformers() -> Result<()> {
    for folder in FOLDERS {
        let dir = tempfile::tempdir()?;
        for name in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            std::fs::copy(fixture(folder).join(name), dir.path().join(name))?;
        }
        let tokenizer = CLIPTokenizer::from_pretrained(dir.path())?;
        check(&tokenizer, folder)?;
    }
    Ok(())
}

#[test]
fn fixture_prompts_exercise_truncation_and_padding() -> Result<()> {
    let expected = expected("tokenizer_sd1")?;
    let cases = expected["cases"].as_array().context("cases")?;
    assert!(cases.iter().any(|c| ids(&c["untruncated_ids"]).len() > 77));
    assert!(cases.iter().any(|c| c["prompt"] == ""));
    Ok(())
}

#[test]
fn padding_modes() -> Result<()> {
    let tokenizer = CLIPTokenizer::from_pretrained(fixture("tokenizer_sd2"))?;
    let prompts = ["a cat", "a photo of a dog on the beach"];
    let plain = tokenizer.tokenize(&prompts, Padding::DoNotPad, None, false)?;
    assert_ne!(plain.input_ids[0].len(), plain.input_ids[1].len());
    assert!(
        plain
            .input_ids_tensor(&diffusion_core::Device::flex())
            .is_err()
    );
    let longest = tokenizer.tokenize(&prompts, Padding::Longest, None, false)?;
    let n = plain.input_ids[1].len();
    assert_eq!(longest.input_ids[0].len(), n);
    assert_eq!(
        &longest.input_ids[0][..plain.input_ids[0].len()],
        &plain.input_ids[0][..]
    );
    assert_eq!(*longest.input_ids[0].last().unwrap(), 0);
    let t = longest.input_ids_tensor(&diffusion_core::Device::flex())?;
    assert_eq!(t.dims(), [2, n]);
    let short = tokenizer.tokenize(&prompts, Padding::MaxLength, Some(4), true)?;
    assert_eq!(short.input_ids[1].len(), 4);
    assert_eq!(short.input_ids[1][3], tokenizer.eos_token_id());
    Ok(())
}

#[test]
fn bad_folders_are_typed_errors() -> Result<()> {
    let empty = tempfile::tempdir()?;
    assert!(matches!(
        CLIPTokenizer::from_pretrained(empty.path()),
        Err(Error::NotFound { .. })
    ));
    // A pad token the vocabulary does not have.
    let dir = tempfile::tempdir()?;
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixture("tokenizer_sd1").join(name), dir.path().join(name))?;
    }
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "pad_token": "<pad>"}"#,
    )?;
    match CLIPTokenizer::from_pretrained(dir.path()) {
        Err(Error::ConfigField { message, .. }) => assert!(message.contains("<pad>"), "{message}"),
        other => panic!("expected a ConfigField error, got {other:?}"),
    }
    let tokenizer = CLIPTokenizer::from_pretrained(fixture("tokenizer_sd1"))?;
    assert!(matches!(
        tokenizer.tokenize(&["x"], Padding::MaxLength, Some(1), true),
        Err(Error::InvalidArgument { .. })
    ));
    Ok(())
}

/// Older folders (Stable Diffusion 2.x) write tokens as `AddedToken` objects and may keep the
/// pad token only in `special_tokens_map.json`; `model_max_length` may be transformers' 1e30.
#[test]
fn token_objects_and_special_tokens_map_are_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixture("tokenizer_sd1").join(name), dir.path().join(name))?;
    }
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"bos_token": {"content": "<|startoftext|>", "lstrip": false, "normalized": true,
            "rstrip": false, "single_word": false}, "pad_token": "!"}"#,
    )?;
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "eos_token": {"__type": "AddedToken",
            "content": "<|endoftext|>"}}"#,
    )?;
    let tokenizer = CLIPTokenizer::from_pretrained(dir.path())?;
    assert_eq!(tokenizer.pad_token_id(), 0);
    assert_eq!(
        (tokenizer.bos_token_id(), tokenizer.eos_token_id()),
        (998, 999)
    );
    check(&tokenizer, "tokenizer_sd2")?;

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 1000000000000000019884624838656}"#,
    )?;
    let tokenizer = CLIPTokenizer::from_pretrained(dir.path())?;
    assert_eq!(tokenizer.model_max_length(), usize::MAX);
    let long = "a ".repeat(100);
    let out = tokenizer.tokenize(&[long.as_str()], Padding::DoNotPad, None, true)?;
    assert_eq!(out.input_ids[0].len(), 102);
    assert!(matches!(
        tokenizer.tokenize(&["a"], Padding::MaxLength, None, true),
        Err(Error::InvalidArgument { .. })
    ));
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": "77"}"#,
    )?;
    assert!(matches!(
        CLIPTokenizer::from_pretrained(dir.path()),
        Err(Error::ConfigField { field, .. }) if field == "model_max_length"
    ));
    Ok(())
}
