//! IP-Adapter on the UNet against diffusers (fixtures/oracle/gen_pipelines_ip_adapter.py): the
//! sd1 test UNet with a plain and a Plus adapter from checkpoint-layout files, image embeddings
//! of both kinds, per-adapter scales; unloading; the errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;
use diffusion_models::unets::unet_2d_condition::{
    IPAdapterBlockScales, IPAdapterScale, ImageEmbeds,
};
use diffusion_models::{AddedCondKwargs, ModelMixin, UNet2DConditionModel, UNet2DConditionOptions};

use crate::{TOLERANCE, device};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/ip_adapter")
}

fn sd1_unet() -> Result<UNet2DConditionModel> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/sd/sd1/unet");
    Ok(UNet2DConditionModel::from_pretrained(dir, &device())?)
}

fn adapter(name: &str) -> Result<WeightSource> {
    Ok(WeightSource::open(root().join("models").join(name))?)
}

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    to_vec(a)
        .iter()
        .zip(to_vec(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

struct Inputs {
    io: WeightSource,
}

impl Inputs {
    fn open() -> Result<Self> {
        Ok(Self {
            io: WeightSource::open(root().join("unet.safetensors"))?,
        })
    }

    fn t<const D: usize>(&self, key: &str) -> Result<Tensor<D>> {
        Ok(self.io.tensor::<D>(key, &device())?)
    }

    fn run(
        &self,
        unet: &UNet2DConditionModel,
        embeds: Option<Vec<ImageEmbeds>>,
    ) -> Result<Tensor<4>> {
        let options = UNet2DConditionOptions {
            added_cond_kwargs: embeds.map(|image_embeds| AddedCondKwargs {
                image_embeds: Some(image_embeds),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(unet.forward_with(
            self.t::<4>("sample")?,
            Tensor::<1>::from_floats([500.0], &device()),
            self.t::<3>("encoder_hidden_states")?,
            options,
        )?)
    }

    fn embeds(&self) -> Result<Vec<ImageEmbeds>> {
        Ok(vec![
            ImageEmbeds::Pooled(self.t::<3>("plain_embeds")?),
            ImageEmbeds::Hidden(self.t::<4>("plus_embeds")?),
        ])
    }
}

#[test]
fn plain_and_plus_adapters_match_diffusers() -> Result<()> {
    let io = Inputs::open()?;
    let mut unet = sd1_unet()?;
    let base = io.run(&unet, None)?;
    let (plain, plus) = (
        adapter("ip-adapter_sd15.safetensors")?,
        adapter("ip-adapter-plus_sd15.safetensors")?,
    );
    unet.load_ip_adapter_weights(&[&plain, &plus])?;
    assert_eq!(unet.num_ip_adapters(), 2);
    unet.set_ip_adapter_scale(&[0.8.into(), 0.3.into()])?;

    // The projections alone.
    let projected = unet.ip_image_projection().unwrap().forward(&[
        io.t::<3>("plain_embeds")?.unsqueeze_dim(2),
        io.t::<4>("plus_embeds")?,
    ])?;
    let e_plain = max_diff(projected[0].clone(), io.t::<4>("projected_plain")?);
    let e_plus = max_diff(projected[1].clone(), io.t::<4>("projected_plus")?);

    let out = io.run(&unet, Some(io.embeds()?))?;
    let err = max_diff(out.clone(), io.t::<4>("out")?);
    eprintln!("ip-adapter unet: projections {e_plain:.2e} / {e_plus:.2e}, output {err:.2e}");
    assert!(e_plain <= TOLERANCE && e_plus <= TOLERANCE);
    assert!(err <= TOLERANCE, "{err}");
    // The adapters matter.
    assert!(max_diff(out, base.clone()) > 1e-3);

    // Scale 0 everywhere: the text-only output (diffusers skips the image attention).
    unet.set_ip_adapter_scale(&[0.0.into()])?;
    let zero = io.run(&unet, Some(io.embeds()?))?;
    assert!(max_diff(zero, base.clone()) <= 1e-6);

    // Unloading restores the model exactly.
    unet.unload_ip_adapter();
    assert_eq!(unet.num_ip_adapters(), 0);
    assert_eq!(max_diff(io.run(&unet, None)?, base), 0.0);
    Ok(())
}

#[test]
fn bad_inputs_are_typed_errors() -> Result<()> {
    let io = Inputs::open()?;
    let mut unet = sd1_unet()?;
    let plain = adapter("ip-adapter_sd15.safetensors")?;

    // Scales and embeddings without an adapter.
    assert!(matches!(
        unet.set_ip_adapter_scale(&[1.0.into()]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        io.run(&unet, Some(vec![ImageEmbeds::Pooled(io.t::<3>("plain_embeds")?)])),
        Err(e) if matches!(e.downcast_ref::<Error>(), Some(Error::InvalidArgument { .. }))
    ));

    // An SDXL adapter on an SD 1.x UNet: the mismatching tensor is named.
    let sdxl = WeightSource::open(root().join("sdxl_models/ip-adapter_sdxl.safetensors"))?;
    let err = unet.load_ip_adapter_weights(&[&sdxl]).unwrap_err();
    assert!(
        matches!(&err, Error::TensorShape { key, .. } | Error::MissingTensor { key, .. }
            if key.starts_with("ip_adapter.")),
        "{err}"
    );
    assert_eq!(unet.num_ip_adapters(), 0, "a failed load changes nothing");

    unet.load_ip_adapter_weights(&[&plain])?;
    // Loaded but no image embeddings, or the wrong number of them.
    let err = io.run(&unet, None).unwrap_err();
    assert!(err.to_string().contains("image_embeds"), "{err}");
    let two = vec![
        ImageEmbeds::Pooled(io.t::<3>("plain_embeds")?),
        ImageEmbeds::Pooled(io.t::<3>("plain_embeds")?),
    ];
    assert!(io.run(&unet, Some(two)).is_err());
    // Per-block scales: block 0 of the down path has no attention; up block 0 has 2
    // transformers, not 3.
    let bad_block = IPAdapterScale::Blocks {
        down: IPAdapterBlockScales::PerBlock(BTreeMap::from([(0, vec![1.0])])),
        mid: None,
        up: IPAdapterBlockScales::Uniform(1.0),
    };
    assert!(unet.set_ip_adapter_scale(&[bad_block]).is_err());
    let bad_len = IPAdapterScale::Blocks {
        down: IPAdapterBlockScales::Uniform(1.0),
        mid: Some(1.0),
        up: IPAdapterBlockScales::PerBlock(BTreeMap::from([(0, vec![1.0, 0.5, 0.0])])),
    };
    assert!(unet.set_ip_adapter_scale(&[bad_len]).is_err());
    // Three configs for one adapter.
    assert!(
        unet.set_ip_adapter_scale(&[1.0.into(), 1.0.into(), 1.0.into()])
            .is_err()
    );
    // Per-image scales need masks.
    unet.set_ip_adapter_scale(&[IPAdapterScale::PerImage(vec![0.5, 0.5])])?;
    assert!(
        io.run(
            &unet,
            Some(vec![ImageEmbeds::Pooled(io.t::<3>("plain_embeds")?)])
        )
        .is_err()
    );
    Ok(())
}

/// A FaceID checkpoint with LoRA layers is refused by name rather than loaded half.
#[test]
fn faceid_lora_layers_are_refused() -> Result<()> {
    use diffusion_core::weights::NamedTensor;
    let plain = adapter("ip-adapter_sd15.safetensors")?;
    let mut tensors = Vec::new();
    for key in plain.keys() {
        let (values, shape) = plain.read_f32(key)?;
        tensors.push(NamedTensor {
            key: key.to_string(),
            shape,
            values,
        });
    }
    tensors.push(NamedTensor {
        key: "ip_adapter.1.to_k_lora.down.weight".into(),
        shape: vec![4, 8],
        values: vec![0.0; 32],
    });
    let faceid = WeightSource::from_tensors("faceid.bin", tensors)?;
    let mut unet = sd1_unet()?;
    let err = unet.load_ip_adapter_weights(&[&faceid]).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, .. } if field.contains("to_k_lora")),
        "{err}"
    );
    assert_eq!(unet.num_ip_adapters(), 0);
    Ok(())
}
