//! IP-Adapter through the pipelines (`fixtures/pipelines/ip_adapter`, gen_pipelines_ip_adapter.py):
//! diffusers' `load_ip_adapter` from an h94/IP-Adapter-like folder (image encoder included),
//! `set_ip_adapter_scale` (numbers, per adapter, per block, per masked image), images, several
//! images per adapter, precomputed embeddings, masks, two adapters, SDXL; unloading; errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType, load_image};
use diffusion_core::tensor::from_vec;
use diffusion_core::{Device, Error};
use diffusion_models::unets::unet_2d_condition::{
    IPAdapterBlockScales, IPAdapterScale, ImageEmbeds,
};
use diffusion_pipelines::{
    Generators, IPAdapterArgs, StableDiffusionArgs, StableDiffusionPipeline, StableDiffusionXLArgs,
    StableDiffusionXLPipeline, ip_adapter_masks,
};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

/// Whole pipelines against diffusers.
const TOLERANCE: f32 = 1e-3;

fn root() -> PathBuf {
    fixtures().join("pipelines/ip_adapter")
}

fn image(name: &str) -> diffusion_core::image::RgbImage {
    load_image(fixtures().join("pipelines/sd").join(name)).unwrap()
}

fn block_scales(v: Option<&Value>) -> IPAdapterBlockScales {
    match v {
        None => IPAdapterBlockScales::Uniform(0.0),
        Some(Value::Number(n)) => IPAdapterBlockScales::Uniform(n.as_f64().unwrap() as f32),
        Some(Value::Object(blocks)) => IPAdapterBlockScales::PerBlock(
            blocks
                .iter()
                .map(|(k, v)| {
                    let i = k.strip_prefix("block_").unwrap().parse().unwrap();
                    let values = match v {
                        Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
                        x => vec![x.as_f64().unwrap() as f32],
                    };
                    (i, values)
                })
                .collect::<BTreeMap<_, _>>(),
        ),
        Some(other) => panic!("{other}"),
    }
}

/// One adapter's scale config as diffusers takes it.
fn scale_config(v: &Value) -> IPAdapterScale {
    match v {
        Value::Number(n) => IPAdapterScale::Uniform(n.as_f64().unwrap() as f32),
        Value::Array(a) => {
            IPAdapterScale::PerImage(a.iter().map(|x| x.as_f64().unwrap() as f32).collect())
        }
        Value::Object(o) => IPAdapterScale::Blocks {
            down: block_scales(o.get("down")),
            mid: o.get("mid").map(|m| m.as_f64().unwrap() as f32),
            up: block_scales(o.get("up")),
        },
        other => panic!("{other}"),
    }
}

/// `set_ip_adapter_scale(scale)`: a list is one config per adapter, anything else one for all.
fn scales(v: &Value) -> Vec<IPAdapterScale> {
    match v {
        Value::Array(a) => a.iter().map(scale_config).collect(),
        other => vec![scale_config(other)],
    }
}

fn images_of(case: &Value) -> Option<Vec<Vec<diffusion_core::image::RgbImage>>> {
    case.get("images").map(|groups| {
        groups
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                g.as_array()
                    .unwrap()
                    .iter()
                    .map(|f| image(f.as_str().unwrap()))
                    .collect()
            })
            .collect()
    })
}

fn array(out: diffusion_pipelines::ImagePipelineOutput) -> Vec<f32> {
    let ImageOutput::Array(images) = out.images else {
        panic!("expected an array")
    };
    images.data
}

#[test]
fn sd_ip_adapter_cases_match_diffusers() {
    let device = Device::flex();
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("cases.json")).unwrap()).unwrap();
    let prompt = spec["prompt"].as_str().unwrap();
    let steps = spec["steps"].as_u64().unwrap() as usize;
    let outputs = read_f32(&root().join("outputs.safetensors"));
    let inputs = read_f32(&root().join("inputs.safetensors"));
    let folder = fixtures().join("pipelines/sd/sd1");
    let base = StableDiffusionPipeline::from_pretrained(folder.to_str().unwrap(), &device).unwrap();
    let mut worst = 0.0f32;
    for case in spec["cases"].as_array().unwrap() {
        if case.get("pipeline").is_some() {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let mut pipe = StableDiffusionPipeline::from_pipe(&base.components);
        let adapters: Vec<&str> = case["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        pipe.components
            .load_ip_adapter(root().to_str().unwrap(), Some("models"), &adapters)
            .unwrap();
        pipe.components
            .set_ip_adapter_scale(&scales(&case["scale"]))
            .unwrap();
        let image_embeds = case.get("embeds").map(|names| {
            names
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    let (shape, data) = &inputs[n.as_str().unwrap()];
                    ImageEmbeds::Pooled(from_vec(
                        data.clone(),
                        shape.clone().try_into().unwrap(),
                        &device,
                    ))
                })
                .collect()
        });
        let masks = match case.get("masks") {
            Some(files) => {
                let planes: Vec<_> = files
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| load_image(root().join(f.as_str().unwrap())).unwrap())
                    .collect();
                vec![Some(ip_adapter_masks(&planes, 32, 32, &device).unwrap())]
            }
            None => Vec::new(),
        };
        let out = pipe
            .call(StableDiffusionArgs {
                prompt: vec![prompt.to_string()],
                num_inference_steps: steps,
                generator: Generators::Seed(case["seed"].as_u64().unwrap()),
                num_images_per_prompt: case
                    .get("num_images_per_prompt")
                    .map_or(1, |n| n.as_u64().unwrap() as usize),
                output_type: OutputType::Np,
                progress: false,
                ip_adapter: IPAdapterArgs {
                    image: images_of(case),
                    image_embeds,
                    masks,
                },
                ..Default::default()
            })
            .unwrap();
        let diff = max_abs_diff(&array(out), &outputs[name].1);
        eprintln!("{name}: max |diff| = {diff:.2e}");
        worst = worst.max(diff);
        assert!(diff <= TOLERANCE, "{name}: {diff}");
    }
    eprintln!("ip-adapter pipelines: worst {worst:.2e}");

    // Unloading gives the base pipeline back.
    let mut pipe = StableDiffusionPipeline::from_pipe(&base.components);
    pipe.components
        .load_ip_adapter(
            root().to_str().unwrap(),
            Some("models"),
            &["ip-adapter_sd15.safetensors"],
        )
        .unwrap();
    pipe.components.unload_ip_adapter();
    assert!(pipe.components.image_encoder.is_none());
    let out = pipe
        .call(StableDiffusionArgs {
            prompt: vec![prompt.to_string()],
            num_inference_steps: steps,
            generator: Generators::Seed(0),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    let diff = max_abs_diff(&array(out), &outputs["base"].1);
    assert!(diff <= TOLERANCE, "unloaded: {diff}");
}

#[test]
fn sdxl_ip_adapter_matches_diffusers() {
    let device = Device::flex();
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("cases.json")).unwrap()).unwrap();
    let outputs = read_f32(&root().join("outputs.safetensors"));
    let case = spec["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sdxl_plain")
        .unwrap();
    let folder = fixtures().join("pipelines/sd/sdxl");
    let mut pipe =
        StableDiffusionXLPipeline::from_pretrained(folder.to_str().unwrap(), &device).unwrap();
    pipe.components
        .load_ip_adapter(
            root().to_str().unwrap(),
            Some("sdxl_models"),
            &["ip-adapter_sdxl.safetensors"],
        )
        .unwrap();
    pipe.components
        .set_ip_adapter_scale(&scales(&case["scale"]))
        .unwrap();
    let out = pipe
        .call(StableDiffusionXLArgs {
            prompt: vec![spec["prompt"].as_str().unwrap().to_string()],
            num_inference_steps: spec["steps"].as_u64().unwrap() as usize,
            generator: Generators::Seed(case["seed"].as_u64().unwrap()),
            output_type: OutputType::Np,
            progress: false,
            ip_adapter: IPAdapterArgs {
                image: images_of(case),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
    let diff = max_abs_diff(&array(out), &outputs["sdxl_plain"].1);
    eprintln!("sdxl_plain: max |diff| = {diff:.2e}");
    assert!(diff <= TOLERANCE, "{diff}");
}

#[test]
fn ip_adapter_errors_are_typed() {
    let device = Device::flex();
    let folder = fixtures().join("pipelines/sd/sd1");
    let mut pipe =
        StableDiffusionPipeline::from_pretrained(folder.to_str().unwrap(), &device).unwrap();
    let args = |ip: IPAdapterArgs| StableDiffusionArgs {
        prompt: vec!["a cat".into()],
        num_inference_steps: 1,
        generator: Generators::Seed(0),
        output_type: OutputType::Np,
        progress: false,
        ip_adapter: ip,
        ..Default::default()
    };
    // Images without an adapter.
    let err = pipe
        .call(args(IPAdapterArgs {
            image: Some(vec![vec![image("image.png")]]),
            ..Default::default()
        }))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    // Not an IP-Adapter file (a LoRA), a missing file, the SDXL adapter on SD 1.x.
    let lora = fixtures().join("pipelines/lora/style.safetensors");
    let err = pipe
        .components
        .load_ip_adapter(lora.to_str().unwrap(), None, &[])
        .unwrap_err();
    assert!(matches!(err, Error::UnknownModelType { .. }), "{err}");
    let err = pipe
        .components
        .load_ip_adapter(
            root().to_str().unwrap(),
            Some("models"),
            &["absent.safetensors"],
        )
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = pipe
        .components
        .load_ip_adapter(
            root().to_str().unwrap(),
            Some("sdxl_models"),
            &["ip-adapter_sdxl.safetensors"],
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::TensorShape { .. } | Error::MissingTensor { .. }),
        "{err}"
    );
    assert_eq!(pipe.components.unet.num_ip_adapters(), 0);

    pipe.components
        .load_ip_adapter(
            root().to_str().unwrap(),
            Some("models"),
            &["ip-adapter_sd15.safetensors"],
        )
        .unwrap();
    // Loaded, but no image; images for two adapters; odd precomputed batch with guidance.
    assert!(pipe.call(args(IPAdapterArgs::default())).is_err());
    let err = pipe
        .call(args(IPAdapterArgs {
            image: Some(vec![vec![image("image.png")], vec![image("image.png")]]),
            ..Default::default()
        }))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let odd: Tensor<3> = Tensor::zeros([3, 1, 8], &device);
    let err = pipe
        .call(args(IPAdapterArgs {
            image_embeds: Some(vec![ImageEmbeds::Pooled(odd)]),
            ..Default::default()
        }))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    // Two masks for one image.
    let half = load_image(root().join("mask_left.png")).unwrap();
    let masks = ip_adapter_masks(&[half.clone(), half], 32, 32, &device).unwrap();
    let err = pipe
        .call(args(IPAdapterArgs {
            image: Some(vec![vec![image("image.png")]]),
            masks: vec![Some(masks)],
            ..Default::default()
        }))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}
