//! `from_single_file`: the `sd1` test pipeline as one original-layout file
//! (`fixtures/pipelines/single_file`, gen_pipelines_single_file.py) against diffusers'
//! `StableDiffusionPipeline.from_single_file(file, config=sd1 folder)`.

use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::{Device, Error};
use diffusion_pipelines::{
    Generators, SingleFilePipelineOptions, StableDiffusionArgs, StableDiffusionPipeline,
    StableDiffusionXLComponents,
};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

fn options(config: &str) -> SingleFilePipelineOptions {
    SingleFilePipelineOptions {
        config: Some(config.to_string()),
        ..Default::default()
    }
}

#[test]
fn single_file_pipeline_matches_diffusers_from_single_file() {
    let device = Device::flex();
    let root = fixtures().join("pipelines/single_file");
    let config = fixtures().join("pipelines/sd/sd1");
    let mut pipe = StableDiffusionPipeline::from_single_file(
        root.join("sd1.safetensors"),
        &options(config.to_str().unwrap()),
        &device,
    )
    .expect("loads");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("cases.json")).unwrap()).unwrap();
    let outputs = read_f32(&root.join("outputs.safetensors"));
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        pipe.components
            .set_scheduler(case["scheduler"].as_str().unwrap())
            .unwrap();
        let out = pipe
            .call(StableDiffusionArgs {
                prompt: vec![case["prompt"].as_str().unwrap().to_string()],
                num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
                guidance_scale: case
                    .get("guidance_scale")
                    .and_then(Value::as_f64)
                    .unwrap_or(7.5),
                generator: Generators::Seed(case["seed"].as_u64().unwrap()),
                output_type: OutputType::Np,
                progress: false,
                ..Default::default()
            })
            .unwrap();
        let ImageOutput::Array(got) = out.images else {
            panic!("{name}: expected an array");
        };
        let (shape, want) = &outputs[name];
        assert_eq!(&got.shape, shape, "{name}");
        let diff = max_abs_diff(&got.data, want);
        eprintln!("{name}: max |diff| = {diff:.2e}");
        assert!(diff <= 1e-3, "{name}: {diff}");
    }
}

/// `hub.dtype` (`torch_dtype`) loads every model of the file in that dtype, with the values of
/// loading in f32 and casting.
#[test]
fn single_file_loads_in_the_requested_dtype() {
    use diffusion_core::burn::tensor::{DType, FloatDType};
    use diffusion_models::modeling_utils::to_dtype;
    use diffusion_models::state_dict::state_dict;
    let device = Device::flex();
    let file = fixtures().join("pipelines/single_file/sd1.safetensors");
    let config = fixtures().join("pipelines/sd/sd1");
    let f32_pipe = StableDiffusionPipeline::from_single_file(
        &file,
        &options(config.to_str().unwrap()),
        &device,
    )
    .unwrap();
    let mut half = options(config.to_str().unwrap());
    half.hub.dtype = Some(FloatDType::F16);
    let pipe = StableDiffusionPipeline::from_single_file(&file, &half, &device).unwrap();
    let c = &pipe.components;
    assert_eq!(c.unet.conv_in.weight.val().dtype(), DType::F16);
    assert_eq!(c.vae.decoder.conv_out.weight.val().dtype(), DType::F16);
    let cast = to_dtype(f32_pipe.components.unet.clone(), FloatDType::F16).unwrap();
    for (x, y) in state_dict(&cast).iter().zip(&state_dict(&c.unet)) {
        assert_eq!((&x.key, &x.values), (&y.key, &y.values));
    }
    let cast = to_dtype(f32_pipe.components.text_encoder.clone(), FloatDType::F16).unwrap();
    for (x, y) in state_dict(&cast).iter().zip(&state_dict(&c.text_encoder)) {
        assert_eq!((&x.key, &x.values), (&y.key, &y.values));
    }
}

#[test]
fn single_file_errors_name_what_is_wrong() {
    let device = Device::flex();
    let file = fixtures().join("pipelines/single_file/sd1.safetensors");
    // A config folder without a tokenizer.
    let empty = tempfile::tempdir().unwrap();
    match StableDiffusionPipeline::from_single_file(
        &file,
        &options(empty.path().to_str().unwrap()),
        &device,
    ) {
        Err(Error::NotFound { path, message }) => {
            assert!(path.ends_with("tokenizer"), "{path:?}");
            assert!(message.contains("tokenizer"), "{message}");
        }
        other => panic!("expected NotFound, got {:?}", other.map(|_| ())),
    }
    // An SD 1.x file is not an SDXL checkpoint.
    let config = fixtures().join("pipelines/sd/sd1");
    match StableDiffusionXLComponents::from_single_file(
        &file,
        &options(config.to_str().unwrap()),
        &device,
    ) {
        Err(Error::Unsupported { value, .. }) => assert_eq!(value, "v1"),
        other => panic!("expected Unsupported, got {:?}", other.map(|_| ())),
    }
    // Offline with an empty cache, the default config repository cannot be resolved.
    let cache = tempfile::tempdir().unwrap();
    let offline = SingleFilePipelineOptions {
        hub: diffusion_loaders::HubOptions {
            offline: true,
            cache_dir: Some(cache.path().to_path_buf()),
            ..Default::default()
        },
        ..Default::default()
    };
    match StableDiffusionPipeline::from_single_file(&file, &offline, &device) {
        Err(Error::Hub { repo, message }) => {
            assert_eq!(repo, "stable-diffusion-v1-5/stable-diffusion-v1-5");
            assert!(message.contains("config"), "{message}");
        }
        other => panic!("expected Hub, got {:?}", other.map(|_| ())),
    }
}
