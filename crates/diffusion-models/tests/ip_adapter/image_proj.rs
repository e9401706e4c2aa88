//! IP-Adapter image projections built from checkpoint-layout weights against diffusers'
//! `_convert_ip_adapter_image_proj_to_diffusers` and the converted modules' outputs.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::weights::{NamedTensor, WeightSource};
use diffusion_models::embeddings::{IPAdapterImageProjection, MultiIPAdapterImageProjection};

use crate::{assert_close, device, fixture, io_tensor};

const PREFIX: &str = "image_proj.";

fn weights(kind: &str) -> Result<WeightSource> {
    Ok(WeightSource::open(
        fixture("image_proj").join(format!("{kind}.safetensors")),
    )?)
}

fn io(kind: &str) -> Result<WeightSource> {
    Ok(WeightSource::open(
        fixture("image_proj").join(format!("{kind}.io.safetensors")),
    )?)
}

fn load(kind: &str) -> Result<IPAdapterImageProjection> {
    Ok(IPAdapterImageProjection::from_ip_adapter_weights(
        &weights(kind)?,
        PREFIX,
        &device(),
    )?)
}

/// `[N, D]` pooled embeds as the `[N, 1, D]` the projections take.
fn pooled(t: Tensor<2>) -> Tensor<3> {
    t.unsqueeze_dim(1)
}

#[test]
fn each_layout_converts_and_matches_diffusers() -> Result<()> {
    let cases = [
        ("plain", "ImageProjection", Some(4)),
        ("full", "IPAdapterFullImageProjection", None),
        ("faceid", "IPAdapterFaceIDImageProjection", Some(4)),
        ("plus", "IPAdapterPlusImageProjection", Some(4)),
    ];
    for (kind, class, tokens) in cases {
        let proj = load(kind)?;
        assert_eq!(proj.class_name(), class);
        assert_eq!(proj.num_tokens(), tokens, "{kind}");
        let io = io(kind)?;
        let input = match kind {
            "plain" | "faceid" => pooled(io_tensor::<2>(&io, "image_embeds")?),
            _ => io_tensor::<3>(&io, "image_embeds")?,
        };
        assert_close(kind, proj.forward(input)?, io_tensor(&io, "output")?);
    }
    Ok(())
}

#[test]
fn plus_resampler_uses_two_heads_of_64() -> Result<()> {
    match load("plus")? {
        IPAdapterImageProjection::Plus(p) => {
            assert_eq!(p.layers.len(), 4);
            assert_eq!(p.layers[0].attn.heads(), 2);
        }
        other => panic!("{}", other.class_name()),
    }
    Ok(())
}

#[test]
fn faceid_plus_matches_diffusers_with_and_without_shortcut() -> Result<()> {
    let mut proj = load("faceid_plus")?;
    assert_eq!(proj.class_name(), "IPAdapterFaceIDPlusImageProjection");
    assert!(proj.uses_hidden_states());
    let io = io("faceid_plus")?;
    let id = pooled(io_tensor::<2>(&io, "id_embeds")?);
    let clip = io_tensor::<4>(&io, "clip_embeds")?;
    match proj.forward(id.clone()) {
        Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "clip_embeds"),
        other => panic!("{other:?}"),
    }
    let out = proj.forward_with_clip_embeds(id.clone(), Some(clip.clone()))?;
    assert_close("faceid_plus", out, io_tensor(&io, "output")?);
    if let IPAdapterImageProjection::FaceIDPlus(p) = &mut proj {
        p.shortcut = true;
        p.shortcut_scale = 0.7;
    }
    let out = proj.forward_with_clip_embeds(id.clone(), Some(clip.clone()))?;
    assert_close(
        "faceid_plus shortcut",
        out,
        io_tensor(&io, "output_shortcut")?,
    );
    let wrong_batch = clip.narrow(0, 0, 1);
    assert!(matches!(
        proj.forward_with_clip_embeds(id, Some(wrong_batch)),
        Err(Error::InvalidArgument { .. })
    ));
    Ok(())
}

#[test]
fn multi_projection_reshapes_batch_and_images() -> Result<()> {
    let multi = MultiIPAdapterImageProjection::new(vec![load("plain")?, load("plus")?]);
    assert_eq!(multi.num_ip_adapters(), 2);
    let io = io("multi")?;
    let pooled_embeds = io_tensor::<3>(&io, "image_embeds.0")?.unsqueeze_dim(2);
    let hidden = io_tensor::<4>(&io, "image_embeds.1")?;
    let out = multi.forward(&[pooled_embeds.clone(), hidden])?;
    assert_eq!(out[0].dims(), [2, 3, 4, 32]);
    assert_close("multi.0", out[0].clone(), io_tensor(&io, "output.0")?);
    assert_close("multi.1", out[1].clone(), io_tensor(&io, "output.1")?);
    assert!(matches!(
        multi.forward(&[pooled_embeds]),
        Err(Error::InvalidArgument { .. })
    ));
    Ok(())
}

#[test]
fn unprefixed_sub_state_dicts_load_too() -> Result<()> {
    let mut source = weights("plain")?;
    source.rename_keys(|k| k.strip_prefix(PREFIX).map(str::to_string))?;
    let proj = IPAdapterImageProjection::from_ip_adapter_weights(&source, "", &device())?;
    let io = io("plain")?;
    let out = proj.forward(pooled(io_tensor::<2>(&io, "image_embeds")?))?;
    assert_close("plain, no prefix", out, io_tensor(&io, "output")?);
    Ok(())
}

/// The tensors of a fixture, edited.
fn edited(kind: &str, edit: impl Fn(&mut Vec<NamedTensor>)) -> Result<WeightSource> {
    let source = weights(kind)?;
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
    edit(&mut tensors);
    Ok(WeightSource::from_tensors(source.origin(), tensors)?)
}

fn convert(source: &WeightSource) -> diffusion_core::Result<IPAdapterImageProjection> {
    IPAdapterImageProjection::from_ip_adapter_weights(source, PREFIX, &device())
}

#[test]
fn bad_checkpoints_are_typed_errors_naming_keys() -> Result<()> {
    // No tensor under the prefix, and an unknown layout.
    let source = weights("plain")?;
    assert!(matches!(
        IPAdapterImageProjection::from_ip_adapter_weights(&source, "ip_adapter.", &device()),
        Err(Error::UnknownModelType { .. })
    ));
    let unknown = edited("plain", |t| {
        for t in t.iter_mut() {
            let rest = t.key.strip_prefix(PREFIX).unwrap_or(&t.key);
            t.key = format!(
                "{PREFIX}{}",
                rest.replace("proj.", "projection.").replace("norm.", "ln.")
            );
        }
    })?;
    match convert(&unknown) {
        Err(Error::UnknownModelType { message, .. }) => {
            assert!(message.contains("projection.weight"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // A missing resampler tensor, named in the checkpoint's layout.
    let missing = "image_proj.layers.2.0.to_kv.weight";
    let source = edited("plus", |t| t.retain(|t| t.key != missing))?;
    assert!(matches!(convert(&source), Err(Error::MissingTensor { key, .. }) if key == missing));

    // A fifth resampler block: diffusers converts depth 4 only.
    let source = edited("plus", |t| {
        let extra: Vec<NamedTensor> = t
            .iter()
            .filter(|t| t.key.starts_with("image_proj.layers.0."))
            .map(|t| NamedTensor {
                key: t.key.replace("layers.0.", "layers.4."),
                ..t.clone()
            })
            .collect();
        t.extend(extra);
    })?;
    match convert(&source) {
        Err(Error::UnexpectedTensors { keys, .. }) => {
            assert!(
                keys.iter().all(|k| k.starts_with("image_proj.layers.4.")),
                "{keys:?}"
            )
        }
        other => panic!("{other:?}"),
    }

    // Widths the conversion cannot split: 4 plain tokens, heads of 64, a fused to_kv.
    let source = edited("plain", |t| {
        let t = t
            .iter_mut()
            .find(|t| t.key == "image_proj.proj.weight")
            .unwrap();
        t.shape = vec![127, 16];
        t.values.truncate(127 * 16);
    })?;
    assert!(
        matches!(convert(&source), Err(Error::TensorShape { key, .. }) if key == "image_proj.proj.weight")
    );
    let key = "image_proj.layers.1.0.to_kv.weight";
    let source = edited("plus", |t| {
        let t = t.iter_mut().find(|t| t.key == key).unwrap();
        t.shape = vec![128, 16];
        t.values.truncate(128 * 16);
    })?;
    assert!(matches!(convert(&source), Err(Error::TensorShape { key: k, .. }) if k == key));
    let key = "image_proj.layers.0.0.to_q.weight";
    let source = edited("plus", |t| {
        let t = t.iter_mut().find(|t| t.key == key).unwrap();
        t.shape = vec![100, 16];
        t.values.truncate(100 * 16);
    })?;
    assert!(matches!(convert(&source), Err(Error::TensorShape { key: k, .. }) if k == key));
    let source = edited("plus", |t| {
        let t = t
            .iter_mut()
            .find(|t| t.key == "image_proj.latents")
            .unwrap();
        t.shape = vec![4, 16];
    })?;
    assert!(matches!(convert(&source), Err(Error::TensorShape { .. })));
    Ok(())
}

#[test]
fn bad_inputs_are_invalid_arguments() -> Result<()> {
    let plain = load("plain")?;
    for shape in [[3, 2, 16], [3, 1, 15]] {
        match plain.forward(Tensor::<3>::zeros(shape, &device())) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "image_embeds"),
            other => panic!("{shape:?}: {other:?}"),
        }
    }
    let plus = load("plus")?;
    assert!(matches!(
        plus.forward(Tensor::<3>::zeros([1, 9, 31], &device())),
        Err(Error::InvalidArgument { .. })
    ));
    Ok(())
}
