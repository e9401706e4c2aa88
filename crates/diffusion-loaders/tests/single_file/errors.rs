//! Bad input gives typed errors naming the file and the key.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::weights::{NamedTensor, SafetensorsFile, SaveDtype, write_safetensors};
use diffusion_loaders::SingleFileCheckpoint;

use crate::{device, fixture, open};

#[test]
fn truncated_files_are_typed_errors_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (source, name) in [
        ("model.safetensors", "cut.safetensors"),
        ("model.ckpt", "cut.ckpt"),
    ] {
        let bytes = std::fs::read(fixture("sd1").join(source))?;
        for keep in [bytes.len() - 100, bytes.len() / 2, 30, 3] {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes[..keep])?;
            match SingleFileCheckpoint::open(&path) {
                Err(Error::Safetensors { path: p, .. } | Error::Pickle { path: p, .. }) => {
                    assert_eq!(p, path, "{name} cut at {keep}")
                }
                other => panic!("{name} cut at {keep}: {other:?}"),
            }
        }
    }
    let garbage = dir.path().join("garbage.ckpt");
    std::fs::write(&garbage, b"\x80\x02}q\x00.")?;
    assert!(matches!(
        SingleFileCheckpoint::open(&garbage),
        Err(Error::Pickle { path, message }) if path == garbage && message.contains("zip")
    ));
    Ok(())
}

/// Every tensor of `source` except those `drop` rejects, written as f32 safetensors.
fn rewrite(
    source: &std::path::Path,
    dest: &std::path::Path,
    drop: impl Fn(&str) -> bool,
) -> Result<()> {
    let file = SafetensorsFile::open(source)?;
    let mut tensors = Vec::new();
    for key in file.keys() {
        if drop(&key) {
            continue;
        }
        if let Ok((values, shape)) = file.read_f32(&key) {
            tensors.push(NamedTensor { key, shape, values });
        }
    }
    write_safetensors(dest, &tensors, SaveDtype::F32)?;
    Ok(())
}

#[test]
fn unknown_model_type_names_the_key_looked_for() -> Result<()> {
    // A diffusers-layout file is not an original-layout checkpoint.
    let path = fixture("sd1").join("diffusers/unet/diffusion_pytorch_model.safetensors");
    match SingleFileCheckpoint::open(&path) {
        Err(Error::UnknownModelType { path: p, key, .. }) => {
            assert_eq!(p, path);
            assert_eq!(key, "model.diffusion_model.input_blocks.0.0.weight");
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn missing_tensors_name_the_file_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pruned.safetensors");
    let gone = "model.diffusion_model.middle_block.1.proj_out.bias";
    rewrite(&fixture("sd1").join("model.safetensors"), &path, |k| {
        k == gone || k.starts_with("cond_stage_model.")
    })?;
    let ckpt = open(&path, "sd1")?;
    match ckpt.unet(&device()) {
        Err(Error::MissingTensor { path: p, key }) => {
            assert_eq!(p, path);
            assert_eq!(key, "mid_block.attentions.0.proj_out.bias");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // No text encoder at all: the key looked for is named.
    match ckpt.text_encoder(&device()) {
        Err(Error::MissingTensor { path: p, key }) => {
            assert_eq!(p, path);
            assert_eq!(
                key,
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // SD 1 has no second text encoder.
    assert!(matches!(
        ckpt.text_encoder_2(&device()),
        Err(Error::MissingTensor { .. })
    ));
    Ok(())
}

#[test]
fn an_extra_tensor_is_reported_not_dropped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("extra.safetensors");
    let source = fixture("sd1").join("model.safetensors");
    let file = SafetensorsFile::open(&source)?;
    let mut tensors: Vec<NamedTensor> = file
        .keys()
        .into_iter()
        .filter_map(|key| {
            file.read_f32(&key)
                .ok()
                .map(|(values, shape)| NamedTensor { key, shape, values })
        })
        .collect();
    tensors.push(NamedTensor {
        key: "model.diffusion_model.input_blocks.1.7.weight".into(),
        shape: vec![1],
        values: vec![0.0],
    });
    write_safetensors(&path, &tensors, SaveDtype::F32)?;
    match open(&path, "sd1")?.unet(&device()) {
        Err(Error::UnexpectedTensors { path: p, keys }) => {
            assert_eq!(p, path);
            assert_eq!(keys, ["model.diffusion_model.input_blocks.1.7.weight"]);
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    Ok(())
}

#[test]
fn tiny_widths_without_hints_are_unsupported_not_guessed() -> Result<()> {
    let ckpt = SingleFileCheckpoint::open(fixture("sd2").join("model.safetensors"))?;
    match ckpt.unet_config() {
        Err(Error::Unsupported { path, field, .. }) => {
            assert_eq!(path, fixture("sd2").join("model.safetensors"));
            assert_eq!(field, "attention_head_dim");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(ckpt.text_encoder_config(), Err(Error::Unsupported { field, .. }) if field == "num_attention_heads")
    );
    Ok(())
}

#[test]
fn the_format_is_read_from_the_content_not_the_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (source, renamed) in [
        ("model.safetensors", "renamed.ckpt"),
        ("model.ckpt", "renamed.safetensors"),
    ] {
        let path = dir.path().join(renamed);
        std::fs::copy(fixture("sd1").join(source), &path)?;
        let ckpt = SingleFileCheckpoint::open(&path)?;
        assert_eq!(ckpt.model_type(), diffusion_loaders::ModelType::V1);
        assert_eq!(
            ckpt.shapes().len(),
            SingleFileCheckpoint::open(fixture("sd1").join(source))?
                .shapes()
                .len()
        );
    }
    Ok(())
}

#[test]
fn a_standalone_vae_file_loads_and_has_no_unet() -> Result<()> {
    // Like `vae-ft-mse-840000-ema-pruned.safetensors`: the VAE's original keys, no prefix.
    let dir = tempfile::tempdir()?;
    let source = SafetensorsFile::open(fixture("sd1").join("model.safetensors"))?;
    let mut tensors = Vec::new();
    for key in source.keys() {
        if let Some(rest) = key.strip_prefix("first_stage_model.") {
            let (values, shape) = source.read_f32(&key)?;
            tensors.push(NamedTensor {
                key: rest.to_string(),
                shape,
                values,
            });
        }
    }
    let path = dir.path().join("vae.safetensors");
    write_safetensors(&path, &tensors, SaveDtype::F32)?;
    let ckpt = open(&path, "sd1")?;
    assert_eq!(ckpt.model_type(), diffusion_loaders::ModelType::V1);
    let vae = ckpt.vae(&device())?;
    let folder =
        <diffusion_models::AutoencoderKL as diffusion_models::ModelMixin>::from_pretrained(
            fixture("sd1").join("diffusers/vae"),
            &device(),
        )?;
    crate::assert_same_parameters("standalone vae", &vae, &folder);
    match ckpt.unet(&device()) {
        Err(Error::UnknownModelType { path: p, key, .. }) => {
            assert_eq!(p, path);
            assert_eq!(key, "model.diffusion_model.input_blocks.0.0.weight");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(!ckpt.has_text_encoder());
    Ok(())
}
