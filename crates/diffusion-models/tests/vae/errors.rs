//! Strict loading, config errors and invalid inputs are typed errors naming the key, field or
//! argument; saving and legacy checkpoints round-trip.

use diffusion_models::ModelMixin;
use std::path::Path;

use anyhow::Result;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::weights::{NamedTensor, SaveDtype, WeightSource, write_safetensors};
use diffusion_core::{Error, NoiseSource, TorchGenerator};
use diffusion_models::state_dict::state_dict;
use diffusion_models::{AutoencoderKL, AutoencoderKLConfig};

use crate::{Io, device, fixture, load, max_abs_diff};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

fn read_all(path: &Path) -> Result<Vec<NamedTensor>> {
    let source = WeightSource::open(path)?;
    source
        .keys()
        .map(|key| {
            let (values, shape) = source.read_f32(key)?;
            Ok(NamedTensor {
                key: key.to_string(),
                shape,
                values,
            })
        })
        .collect()
}

/// A folder with `case`'s config edited by `edit` and the given weights.
fn folder(
    case: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    tensors: &[NamedTensor],
) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(case).join("config.json"))?)?;
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string())?;
    write_safetensors(dir.path().join(WEIGHTS), tensors, SaveDtype::F32)?;
    Ok(dir)
}

fn tensors(case: &str) -> Result<Vec<NamedTensor>> {
    read_all(&fixture(case).join(WEIGHTS))
}

#[test]
fn unet_weights_are_missing_vae_keys() -> Result<()> {
    let unet = read_all(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/unet2d/ddpm_tiny")
            .join(WEIGHTS),
    )?;
    let dir = folder("sd_tiny", |_| {}, &unet)?;
    match AutoencoderKL::from_pretrained(dir.path(), &device()) {
        Err(Error::MissingTensor { path, key }) => {
            assert_eq!(key, "encoder.conv_in.weight");
            assert_eq!(path, dir.path().join(WEIGHTS));
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    // A UNet folder is refused by its config before any weight is read.
    let unet_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/unet2d/ddpm_tiny");
    match AutoencoderKL::from_pretrained(&unet_dir, &device()) {
        Err(Error::ConfigField { field, message, .. }) => {
            assert_eq!(field, "_class_name");
            assert!(message.contains("UNet2DModel"), "{message}");
        }
        other => panic!("expected ConfigField, got {other:?}"),
    }
    Ok(())
}

#[test]
fn quant_conv_weights_without_quant_conv_are_unexpected() -> Result<()> {
    let dir = folder(
        "sd_tiny",
        |c| c["use_quant_conv"] = false.into(),
        &tensors("sd_tiny")?,
    )?;
    match AutoencoderKL::from_pretrained(dir.path(), &device()) {
        Err(Error::UnexpectedTensors { keys, .. }) => {
            assert_eq!(keys, ["quant_conv.bias", "quant_conv.weight"]);
        }
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
    Ok(())
}

#[test]
fn wrong_shape_names_the_key() -> Result<()> {
    let mut weights = tensors("sdxl_like")?;
    let key = "decoder.mid_block.attentions.0.to_v.weight";
    let t = weights
        .iter_mut()
        .find(|t| t.key == key)
        .expect("key in fixture");
    assert_eq!(t.shape, [16, 16]);
    t.shape = vec![16, 8];
    t.values.truncate(128);
    let dir = folder("sdxl_like", |_| {}, &weights)?;
    match AutoencoderKL::from_pretrained(dir.path(), &device()) {
        Err(Error::TensorShape {
            key: k,
            expected,
            got,
            ..
        }) => {
            assert_eq!(k, key);
            assert_eq!((expected, got), (vec![16, 16], vec![16, 8]));
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    Ok(())
}

#[test]
fn config_errors_name_the_field_and_file() -> Result<()> {
    let weights = tensors("sd_tiny")?;
    let expect_field =
        |edit: &dyn Fn(&mut serde_json::Value), want: &str, unsupported: bool| -> Result<()> {
            let dir = folder("sd_tiny", edit, &weights)?;
            let config_path = dir.path().join("config.json");
            match AutoencoderKL::from_pretrained(dir.path(), &device()) {
                Err(Error::ConfigField { path, field, .. }) if !unsupported => {
                    assert_eq!(field, want);
                    assert_eq!(path, config_path);
                }
                Err(Error::Unsupported { path, field, .. }) if unsupported => {
                    assert_eq!(field, want);
                    assert_eq!(path, config_path);
                }
                other => panic!("{want}: got {other:?}"),
            }
            Ok(())
        };
    expect_field(
        &|c| c["up_block_types"] = serde_json::json!(["UpDecoderBlock2D"]),
        "up_block_types",
        false,
    )?;
    expect_field(
        &|c| c["block_out_channels"] = serde_json::json!([2, 4, 8]),
        "block_out_channels",
        false,
    )?;
    expect_field(
        &|c| c["norm_num_groups"] = 3.into(),
        "norm_num_groups",
        false,
    )?;
    expect_field(
        &|c| c["latents_std"] = serde_json::json!([1.0, 2.0]),
        "latents_std",
        false,
    )?;
    expect_field(
        &|c| c["down_block_types"][1] = "CrossAttnDownBlock2D".into(),
        "down_block_types",
        true,
    )?;
    expect_field(
        &|c| c["up_block_types"][0] = "UpBlock2D".into(),
        "up_block_types",
        true,
    )?;
    expect_field(&|c| c["act_fn"] = "tanh".into(), "act_fn", true)?;

    let config = AutoencoderKLConfig {
        down_block_types: vec!["DownEncoderBlock2D".into(); 2],
        ..Default::default()
    };
    assert!(matches!(
        AutoencoderKL::new(&config, &device()),
        Err(Error::ConfigField { field, .. }) if field == "up_block_types"
    ));
    Ok(())
}

#[test]
fn bad_inputs_are_invalid_arguments() -> Result<()> {
    let vae = load("flux_like")?;
    let io = Io::open("flux_like")?;
    let name = |r: diffusion_core::Result<()>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let x = io.tensor::<4>("x")?;
    let z = io.tensor::<4>("z")?;
    assert_eq!(
        name(vae.encode(x.clone().narrow(1, 0, 2)).map(drop)),
        "sample"
    );
    assert_eq!(
        name(
            vae.forward(x.clone().narrow(1, 0, 2), false, None)
                .map(drop)
        ),
        "sample"
    );
    assert_eq!(name(vae.decode(z.clone().narrow(1, 0, 3)).map(drop)), "z");
    assert_eq!(name(vae.decode(x.clone()).map(drop)), "z");
    // Three levels downsample twice: a side of 2 becomes 1, which cannot be downsampled again.
    assert_eq!(
        name(vae.encode(x.clone().narrow(2, 0, 2)).map(drop)),
        "sample"
    );
    let empty = Tensor::<4>::zeros([0, 3, 8, 8], &device());
    assert_eq!(name(vae.encode(empty).map(drop)), "sample");
    assert!(vae.encode(x.clone().narrow(2, 0, 4)).is_ok());

    let posterior = vae.encode(x)?;
    let mut gens = vec![TorchGenerator::new(0)];
    assert_eq!(
        name(
            posterior
                .sample(Some(NoiseSource::PerImage(&mut gens)))
                .map(drop)
        ),
        "generator"
    );
    assert_eq!(name(posterior.nll(z.narrow(0, 0, 1)).map(drop)), "sample");
    Ok(())
}

/// `save_pretrained` writes diffusers' config keys and values and the same tensors.
#[test]
fn save_pretrained_round_trips() -> Result<()> {
    for case in crate::CASES {
        let vae = load(case)?;
        let dir = tempfile::tempdir()?;
        vae.save_pretrained(dir.path())?;
        let read = |p: &Path| -> Result<serde_json::Value> {
            Ok(serde_json::from_str(&std::fs::read_to_string(
                p.join("config.json"),
            )?)?)
        };
        let (ours, theirs) = (read(dir.path())?, read(&fixture(case))?);
        for (key, value) in theirs.as_object().expect("object") {
            if key != "_diffusers_version" {
                assert_eq!(ours.get(key), Some(value), "{case}: `{key}`");
            }
        }
        let again = AutoencoderKL::from_pretrained(dir.path(), &device())?;
        assert_eq!(again.config(), vae.config());
        let (a, b) = (state_dict(&vae), state_dict(&again));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((&x.key, &x.shape, &x.values), (&y.key, &y.shape, &y.values));
        }
    }
    Ok(())
}

/// Old VAE checkpoints name the attention projections `query`, `key`, `value`, `proj_attn`;
/// they load into the same model.
#[test]
fn legacy_attention_names_load() -> Result<()> {
    let mut weights = tensors("sdxl_like")?;
    let mut renamed = 0;
    for t in &mut weights {
        for (new, old) in [
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ] {
            if t.key.contains(new) {
                t.key = t.key.replace(new, old);
                renamed += 1;
            }
        }
    }
    assert_eq!(
        renamed, 16,
        "two mid-block attentions with four weights and biases each"
    );
    let dir = folder("sdxl_like", |_| {}, &weights)?;
    let legacy = AutoencoderKL::from_pretrained(dir.path(), &device())?;
    let io = Io::open("sdxl_like")?;
    let z = io.tensor::<4>("z")?;
    assert_eq!(
        max_abs_diff(legacy.decode(z.clone())?, load("sdxl_like")?.decode(z)?),
        0.0
    );
    Ok(())
}
