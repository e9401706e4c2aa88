//! StableDiffusionControlNetPipeline against diffusers' arrays on a tiny random pipeline
//! (fixtures/oracle/gen_pipelines_controlnet.py): plain, guess mode, conditioning scale with a
//! control window, a non-square control image, a batch without guidance, latent output; both
//! loading routes (ControlNet pipeline folder, Stable Diffusion folder + ControlNet folder);
//! typed errors for bad input.

#[path = "../pipelines/common.rs"]
mod common;

use std::path::{Path, PathBuf};

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType, RgbImage, load_image};
use diffusion_core::tensor::from_vec;
use diffusion_core::{Device, Error};
use diffusion_loaders::HubOptions;
use diffusion_pipelines::{StableDiffusionControlNetArgs, StableDiffusionControlNetPipeline};
use serde_json::Value;

use common::{fixtures, max_abs_diff, read_f32};

const TOLERANCE: f32 = 1e-3;

fn dir() -> PathBuf {
    fixtures().join("pipelines/controlnet")
}

fn device() -> Device {
    Device::flex()
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => Some(a.iter().map(|s| s.as_str().unwrap().to_string()).collect()),
        _ => None,
    }
}

fn control_images(v: &Value) -> Vec<RgbImage> {
    strings(v)
        .unwrap()
        .iter()
        .map(|name| load_image(dir().join(name)).unwrap())
        .collect()
}

fn pipeline() -> StableDiffusionControlNetPipeline {
    let path = dir().join("sd_controlnet");
    StableDiffusionControlNetPipeline::from_pretrained(path.to_str().unwrap(), &device()).unwrap()
}

fn args_for(case: &Value, latents: Tensor<4>) -> StableDiffusionControlNetArgs<'static> {
    let output_type = match case["output_type"].as_str().unwrap() {
        "latent" => OutputType::Latent,
        _ => OutputType::Np,
    };
    StableDiffusionControlNetArgs {
        prompt: strings(&case["prompt"]).unwrap(),
        negative_prompt: strings(&case["negative_prompt"]),
        image: Some(control_images(&case["image"]).into()),
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
        controlnet_conditioning_scale: case["controlnet_conditioning_scale"]
            .as_f64()
            .unwrap_or(1.0),
        guess_mode: case["guess_mode"].as_bool().unwrap_or(false),
        control_guidance_start: case["control_guidance_start"].as_f64().unwrap_or(0.0),
        control_guidance_end: case["control_guidance_end"].as_f64().unwrap_or(1.0),
        latents: Some(latents),
        output_type,
        progress: false,
        ..Default::default()
    }
}

fn output_vec(out: ImageOutput) -> (Vec<usize>, Vec<f32>) {
    match out {
        ImageOutput::Array(a) => (a.shape, a.data),
        ImageOutput::Tensor(t) => (
            t.dims().to_vec(),
            t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(),
        ),
        other => panic!("unexpected output {other:?}"),
    }
}

/// Run one case on `pipe` and return the max abs diff to diffusers' output.
fn run_case(pipe: &StableDiffusionControlNetPipeline, case: &Value) -> f32 {
    let inputs = read_f32(&dir().join("inputs.safetensors"));
    let outputs = read_f32(&dir().join("outputs.safetensors"));
    let name = case["name"].as_str().unwrap();
    let (shape, data) = &inputs[case["latents"].as_str().unwrap()];
    let latents: Tensor<4> = from_vec(
        data.clone(),
        [shape[0], shape[1], shape[2], shape[3]],
        &device(),
    );
    let mut pipe = pipe.clone();
    pipe.components
        .set_scheduler(case["scheduler"].as_str().unwrap())
        .unwrap();
    let out = pipe.call(args_for(case, latents)).unwrap();
    let (got_shape, got) = output_vec(out.images);
    let (want_shape, want) = &outputs[name];
    assert_eq!(&got_shape, want_shape, "{name}: shape");
    max_abs_diff(&got, want)
}

#[test]
fn matches_diffusers_on_every_case() {
    let pipe = pipeline();
    let cases = cases();
    assert_eq!(cases.len(), 6);
    for case in &cases {
        let diff = run_case(&pipe, case);
        let name = case["name"].as_str().unwrap();
        eprintln!("{name}: max abs diff {diff:e}");
        assert!(diff <= TOLERANCE, "{name}: max abs diff {diff}");
    }
}

/// Copy the pipeline folder without its ControlNet, as a plain `StableDiffusionPipeline`
/// folder (what an SD 1.5 repository looks like).
fn sd_only_folder(tmp: &Path) -> PathBuf {
    let src = dir().join("sd_controlnet");
    let dst = tmp.join("sd");
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dst.join(sub).join(entry.file_name())).unwrap();
        }
    }
    let mut index: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
            .unwrap();
    let map = index.as_object_mut().unwrap();
    map.insert("_class_name".into(), "StableDiffusionPipeline".into());
    map.remove("controlnet");
    std::fs::write(
        dst.join("model_index.json"),
        serde_json::to_string(&index).unwrap(),
    )
    .unwrap();
    dst
}

#[test]
fn sd_folder_plus_separate_controlnet_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = sd_only_folder(tmp.path());
    let controlnet = dir().join("sd_controlnet/controlnet");
    let pipe = StableDiffusionControlNetPipeline::from_pretrained_with_controlnet(
        sd.to_str().unwrap(),
        controlnet.to_str().unwrap(),
        &HubOptions::default(),
        &device(),
    )
    .unwrap();
    let cases = cases();
    let plain = cases.iter().find(|c| c["name"] == "plain").unwrap();
    let diff = run_case(&pipe, plain);
    eprintln!("separate folders, plain: max abs diff {diff:e}");
    assert!(diff <= TOLERANCE, "max abs diff {diff}");

    // The SD folder alone is not a ControlNet pipeline folder.
    let err = StableDiffusionControlNetPipeline::from_pretrained(sd.to_str().unwrap(), &device())
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, .. } if field == "_class_name"),
        "{err}"
    );
    // A missing ControlNet folder is named.
    let missing = tmp.path().join("no_controlnet");
    let err = StableDiffusionControlNetPipeline::from_pretrained_with_controlnet(
        sd.to_str().unwrap(),
        missing.to_str().unwrap(),
        &HubOptions::default(),
        &device(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no_controlnet"), "{err}");
}

#[test]
fn multi_controlnet_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dir().join("sd_controlnet");
    let mut index: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
            .unwrap();
    index["controlnet"] = serde_json::json!(["diffusers", "MultiControlNetModel"]);
    std::fs::write(
        tmp.path().join("model_index.json"),
        serde_json::to_string(&index).unwrap(),
    )
    .unwrap();
    let err =
        StableDiffusionControlNetPipeline::load_dir(tmp.path(), &Default::default(), &device())
            .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, value, .. }
            if field == "controlnet" && value == "MultiControlNetModel"),
        "{err}"
    );
}

fn invalid_name(err: Error) -> String {
    match err {
        Error::InvalidArgument { name, .. } => name,
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let pipe = pipeline();
    let image = load_image(dir().join("control.png")).unwrap();
    let base = || StableDiffusionControlNetArgs {
        prompt: vec!["a squirrel".into()],
        image: Some(image.clone().into()),
        num_inference_steps: 2,
        output_type: OutputType::Latent,
        progress: false,
        ..Default::default()
    };
    let run = |args: StableDiffusionControlNetArgs<'static>| {
        invalid_name(pipe.clone().call(args).unwrap_err())
    };
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            image: None,
            ..base()
        }),
        "image"
    );
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            image: Some(Vec::<RgbImage>::new().into()),
            ..base()
        }),
        "image"
    );
    // Three control images for two prompts.
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            prompt: vec!["a".into(), "b".into()],
            image: Some(vec![image.clone(), image.clone(), image.clone()].into()),
            ..base()
        }),
        "image"
    );
    // A tensor control image of the wrong channel count.
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            image: Some(Tensor::<4>::zeros([1, 4, 32, 32], &device()).into()),
            ..base()
        }),
        "image"
    );
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            height: Some(36),
            ..base()
        }),
        "height"
    );
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            width: Some(20),
            ..base()
        }),
        "width"
    );
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            controlnet_conditioning_scale: -1.0,
            ..base()
        }),
        "controlnet_conditioning_scale"
    );
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            control_guidance_start: 0.7,
            control_guidance_end: 0.3,
            ..base()
        }),
        "control_guidance_start"
    );
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            control_guidance_end: 1.2,
            ..base()
        }),
        "control_guidance_end"
    );
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            latents: Some(Tensor::<4>::zeros([1, 4, 8, 8], &device())),
            ..base()
        }),
        "latents"
    );
    assert_eq!(
        run(StableDiffusionControlNetArgs {
            prompt: Vec::new(),
            ..base()
        }),
        "prompt"
    );
    // A valid call with the same base succeeds (the errors above are the arguments' fault).
    pipe.clone().call(base()).unwrap();
}
