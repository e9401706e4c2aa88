//! AltDiffusionPipeline and AltDiffusionImg2ImgPipeline against diffusers 0.42.1's
//! `output_type="np"` arrays on a tiny random pipeline with an XLM-R text encoder
//! (fixtures/oracle/gen_pipelines_alt_diffusion.py): multilingual prompts, same seeds or same
//! latents, DDIM / Euler / DPM++ 2M.

use std::path::PathBuf;

use diffusion_core::image::{ImageOutput, OutputType, load_image};
use diffusion_core::tensor::from_vec;
use diffusion_core::{Device, Error};
use diffusion_pipelines::{
    AltDiffusionArgs, AltDiffusionComponents, AltDiffusionImg2ImgArgs, AltDiffusionImg2ImgPipeline,
    AltDiffusionPipeline, Generators, StableDiffusionComponents,
};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

/// diffusers' whole-pipeline tolerance.
const TOLERANCE: f32 = 1e-3;

fn dir() -> PathBuf {
    fixtures().join("pipelines/alt_diffusion")
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => Some(a.iter().map(|s| s.as_str().unwrap().to_string()).collect()),
        _ => None,
    }
}

fn array(out: ImageOutput) -> (Vec<usize>, Vec<f32>) {
    match out {
        ImageOutput::Array(a) => (a.shape, a.data),
        other => panic!("expected an array, got {other:?}"),
    }
}

#[test]
fn alt_diffusion_pipelines_match_diffusers() {
    let device = Device::flex();
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let inputs = read_f32(&dir().join("inputs.safetensors"));
    let outputs = read_f32(&dir().join("outputs.safetensors"));
    let components =
        AltDiffusionComponents::from_pretrained(dir().join("alt").to_str().unwrap(), &device)
            .unwrap();
    let mut worst = 0.0f32;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut components = components.clone();
        components
            .set_scheduler(case["scheduler"].as_str().unwrap())
            .unwrap();
        let latents = case["latents"].as_str().map(|key| {
            let (shape, data) = &inputs[key];
            from_vec(data.clone(), shape.clone().try_into().unwrap(), &device)
        });
        let generator = case["seed"]
            .as_u64()
            .map_or(Generators::Random, Generators::Seed);
        let prompt = strings(&case["prompt"]).unwrap();
        let negative_prompt = strings(&case["negative_prompt"]);
        let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
        let guidance_scale = case["guidance_scale"].as_f64().unwrap_or(7.5);
        let num_images_per_prompt = case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize;
        let out = match case["pipeline"].as_str().unwrap() {
            "txt2img" => AltDiffusionPipeline::from_parts(components).call(AltDiffusionArgs {
                prompt,
                negative_prompt,
                num_inference_steps: steps,
                guidance_scale,
                generator,
                latents,
                num_images_per_prompt,
                output_type: OutputType::Np,
                progress: false,
                ..Default::default()
            }),
            "img2img" => {
                let image = load_image(dir().join(case["image"].as_str().unwrap())).unwrap();
                AltDiffusionImg2ImgPipeline::from_parts(components).call(AltDiffusionImg2ImgArgs {
                    prompt,
                    negative_prompt,
                    image: Some(image.into()),
                    strength: case["strength"].as_f64().unwrap(),
                    num_inference_steps: steps,
                    guidance_scale,
                    generator,
                    num_images_per_prompt,
                    output_type: OutputType::Np,
                    progress: false,
                    ..Default::default()
                })
            }
            other => panic!("unknown pipeline {other}"),
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (shape, data) = array(out.images);
        let (want_shape, want) = &outputs[name];
        assert_eq!(&shape, want_shape, "{name}");
        let diff = max_abs_diff(&data, want);
        assert!(diff <= TOLERANCE, "{name}: max abs diff {diff}");
        worst = worst.max(diff);
    }
    eprintln!(
        "AltDiffusion pipelines: {} cases, max abs error {worst:e}",
        cases.len()
    );
}

#[test]
fn alt_diffusion_bad_inputs_are_typed_errors() {
    let device = Device::flex();
    let folder = dir().join("alt");
    let mut pipe =
        AltDiffusionPipeline::from_pretrained(folder.to_str().unwrap(), &device).unwrap();
    let args = || AltDiffusionArgs {
        prompt: vec!["a fox".into()],
        num_inference_steps: 1,
        generator: Generators::Seed(0),
        output_type: OutputType::Np,
        progress: false,
        ..Default::default()
    };
    // clip_skip has no meaning for the XLM-R encoder (diffusers raises AttributeError).
    let err = pipe
        .call(AltDiffusionArgs {
            clip_skip: Some(1),
            ..args()
        })
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "clip_skip"),
        "{err}"
    );
    let err = pipe
        .call(AltDiffusionArgs {
            height: Some(30),
            width: Some(32),
            ..args()
        })
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "height"),
        "{err}"
    );
    let mut img2img = AltDiffusionImg2ImgPipeline::from_pipe(&pipe);
    let err = img2img
        .call(AltDiffusionImg2ImgArgs {
            prompt: vec!["a fox".into()],
            progress: false,
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "image"),
        "{err}"
    );
    // Folders of the other family are rejected by class, naming model_index.json.
    let err =
        StableDiffusionComponents::from_pretrained(folder.to_str().unwrap(), &device).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, value, .. } if field == "_class_name" && value == "AltDiffusionPipeline"),
        "{err}"
    );
    let sd1 = fixtures().join("pipelines/sd/sd1");
    let err = AltDiffusionComponents::from_pretrained(sd1.to_str().unwrap(), &device).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { path, field, .. } if field == "_class_name" && path.ends_with("model_index.json")),
        "{err}"
    );
    // A wrong text encoder class is named.
    let tmp = tempfile::tempdir().unwrap();
    let index = std::fs::read_to_string(folder.join("model_index.json"))
        .unwrap()
        .replace("RobertaSeriesModelWithTransformation", "CLIPTextModel");
    std::fs::write(tmp.path().join("model_index.json"), index).unwrap();
    let err =
        AltDiffusionComponents::from_pretrained(tmp.path().to_str().unwrap(), &device).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, value, .. } if field == "text_encoder" && value == "CLIPTextModel"),
        "{err}"
    );
}
