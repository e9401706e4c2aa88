//! `StableDiffusionPix2PixZeroPipeline` against diffusers on the tiny `sd1` components
//! (`fixtures/pipelines/pix2pix_zero`, gen_pipelines_pix2pix_zero.py): `get_embeds`, `invert`
//! with and without the regularisers (and under classifier-free guidance), and edits with and
//! without the cross-attention guidance step; then bad inputs.

use std::time::Instant;

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::image::{ImageOutput, OutputType, load_image};
use diffusion_core::{Device, Error};
use diffusion_pipelines::{
    Generators, Pix2PixZeroInvertArgs, StableDiffusionPix2PixZeroArgs,
    StableDiffusionPix2PixZeroPipeline,
};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

fn pipeline(device: &Device) -> StableDiffusionPix2PixZeroPipeline {
    let folder = fixtures().join("pipelines/sd/sd1");
    StableDiffusionPix2PixZeroPipeline::from_pretrained(folder.to_str().unwrap(), device).unwrap()
}

fn cases() -> Value {
    let path = fixtures().join("pipelines/pix2pix_zero/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn tensor<const D: usize>(entry: &(Vec<usize>, Vec<f32>), device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(entry.1.clone(), entry.0.clone()), device)
}

fn array(images: ImageOutput) -> Vec<f32> {
    match images {
        ImageOutput::Array(a) => a.data,
        _ => panic!("expected an array"),
    }
}

#[test]
fn pix2pix_zero_matches_diffusers() {
    let device = Device::flex();
    let cases = cases();
    let outputs = read_f32(&fixtures().join("pipelines/pix2pix_zero/outputs.safetensors"));
    let mut pipe = pipeline(&device);
    let caption = cases["caption"].as_str().unwrap().to_string();

    let source = pipe
        .get_embeds(&strings(&cases["source_captions"]), 16)
        .unwrap();
    let target = pipe
        .get_embeds(&strings(&cases["target_captions"]), 2)
        .unwrap();
    for (name, got) in [("source_embeds", &source), ("target_embeds", &target)] {
        assert_eq!(got.dims().to_vec(), outputs[name].0, "{name}");
        let diff = max_abs_diff(
            &diffusion_core::tensor::to_vec(got.clone()),
            &outputs[name].1,
        );
        eprintln!("{name}: max |diff| = {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: {diff}");
    }

    let image = load_image(fixtures().join("pipelines/sd/image.png")).unwrap();
    for case in cases["invert"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let start = Instant::now();
        let out = pipe
            .invert(Pix2PixZeroInvertArgs {
                prompt: vec![caption.clone()],
                image: Some(image.clone().into()),
                num_inference_steps: case["steps"].as_u64().unwrap() as usize,
                guidance_scale: case["guidance_scale"].as_f64().unwrap(),
                generator: Generators::Seed(case["seed"].as_u64().unwrap()),
                lambda_auto_corr: case["lambda_auto_corr"].as_f64().unwrap(),
                lambda_kl: case["lambda_kl"].as_f64().unwrap(),
                num_reg_steps: case["num_reg_steps"].as_u64().unwrap() as usize,
                num_auto_corr_rolls: case["num_auto_corr_rolls"].as_u64().unwrap() as usize,
                output_type: OutputType::Np,
                progress: false,
                ..Default::default()
            })
            .unwrap();
        let elapsed = start.elapsed();
        let latents = diffusion_core::tensor::to_vec(out.latents);
        let diff = max_abs_diff(&latents, &outputs[&format!("{name}/latents")].1);
        let image_diff = max_abs_diff(&array(out.images), &outputs[&format!("{name}/images")].1);
        eprintln!(
            "{name}: latents max |diff| = {diff:.2e}, images {image_diff:.2e} ({elapsed:.2?})"
        );
        assert!(diff <= 1e-3, "{name} latents: {diff}");
        assert!(image_diff <= 1e-3, "{name} images: {image_diff}");
    }

    // The edits start from diffusers' own inverted latents and embeddings, so that each case
    // checks the edit alone.
    let source = tensor::<3>(&outputs["source_embeds"], &device);
    let target = tensor::<3>(&outputs["target_embeds"], &device);
    for case in cases["edit"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let latents = case["latents"]
            .as_str()
            .map(|key| tensor::<4>(&outputs[key], &device));
        let negative_prompt = case["negative_prompt"]
            .as_str()
            .map(|s| vec![s.to_string()]);
        let mut pipe = pipe.clone();
        if let Some(scheduler) = case.get("scheduler").and_then(Value::as_str) {
            pipe.components.set_scheduler(scheduler).unwrap();
        }
        let start = Instant::now();
        let out = pipe
            .call(StableDiffusionPix2PixZeroArgs {
                prompt: vec![caption.clone()],
                source_embeds: Some(source.clone()),
                target_embeds: Some(target.clone()),
                num_inference_steps: case["steps"].as_u64().unwrap() as usize,
                guidance_scale: case["guidance_scale"].as_f64().unwrap(),
                negative_prompt,
                generator: Generators::Seed(case["seed"].as_u64().unwrap()),
                latents,
                cross_attention_guidance_amount: case["cross_attention_guidance_amount"]
                    .as_f64()
                    .unwrap(),
                output_type: OutputType::Np,
                progress: false,
                ..Default::default()
            })
            .unwrap();
        let elapsed = start.elapsed();
        let diff = max_abs_diff(&array(out.images), &outputs[name].1);
        eprintln!("{name}: max |diff| = {diff:.2e} ({elapsed:.2?})");
        assert!(diff <= 1e-3, "{name}: {diff}");
    }
}

fn invalid_name(err: Error) -> String {
    match err {
        Error::InvalidArgument { name, .. } => name,
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

#[test]
fn pix2pix_zero_bad_inputs_are_errors() {
    let device = Device::flex();
    let mut pipe = pipeline(&device);
    let embeds = pipe.get_embeds(&["a cat".to_string()], 16).unwrap();
    let args =
        |source: Option<Tensor<3>>, target: Option<Tensor<3>>| StableDiffusionPix2PixZeroArgs {
            prompt: vec!["a cat".into()],
            source_embeds: source,
            target_embeds: target,
            num_inference_steps: 2,
            generator: Generators::Seed(0),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        };
    let err = pipe.call(args(None, None)).unwrap_err();
    assert_eq!(invalid_name(err), "source_embeds");
    let err = pipe.call(args(Some(embeds.clone()), None)).unwrap_err();
    assert_eq!(invalid_name(err), "target_embeds");
    let err = pipe.call(args(None, Some(embeds.clone()))).unwrap_err();
    assert_eq!(invalid_name(err), "source_embeds");
    // Another width than the text encoder's, and another token count.
    let wide = Tensor::<3>::zeros([1, 77, 9], &device);
    let err = pipe
        .call(args(Some(embeds.clone()), Some(wide)))
        .unwrap_err();
    assert_eq!(invalid_name(err), "target_embeds");
    let short = Tensor::<3>::zeros([2, 10, 8], &device);
    let err = pipe
        .call(args(Some(short.clone()), Some(short)))
        .unwrap_err();
    assert_eq!(invalid_name(err), "source_embeds");
    // Latents of the wrong shape, an unusable guidance amount.
    let mut bad = args(Some(embeds.clone()), Some(embeds.clone()));
    bad.latents = Some(Tensor::<4>::zeros([1, 3, 16, 16], &device));
    assert_eq!(invalid_name(pipe.call(bad).unwrap_err()), "latents");
    let mut bad = args(Some(embeds.clone()), Some(embeds.clone()));
    bad.cross_attention_guidance_amount = f64::NAN;
    assert_eq!(
        invalid_name(pipe.call(bad).unwrap_err()),
        "cross_attention_guidance_amount"
    );

    // Inversion: no image, bad lambdas, several seeds with the rolls on, latents too small.
    let image = load_image(fixtures().join("pipelines/sd/image.png")).unwrap();
    let invert = |image: Option<diffusion_pipelines::PipelineImageInput>| Pix2PixZeroInvertArgs {
        prompt: vec!["a cat".into()],
        image,
        num_inference_steps: 2,
        generator: Generators::Seed(0),
        output_type: OutputType::Np,
        progress: false,
        ..Default::default()
    };
    assert_eq!(
        invalid_name(pipe.invert(invert(None)).unwrap_err()),
        "image"
    );
    let mut bad = invert(Some(image.clone().into()));
    bad.lambda_kl = -1.0;
    assert_eq!(invalid_name(pipe.invert(bad).unwrap_err()), "lambda_kl");
    let mut bad = invert(Some(image.clone().into()));
    bad.prompt = vec!["a cat".into(), "a dog".into()];
    bad.generator = Generators::Seeds(vec![0, 1]);
    assert_eq!(invalid_name(pipe.invert(bad).unwrap_err()), "generator");
    let tiny = Tensor::<4>::zeros([1, 4, 1, 1], &device);
    let err = pipe.invert(invert(Some(tiny.into()))).unwrap_err();
    assert_eq!(invalid_name(err), "image");

    // Schedulers: the edit takes diffusers' four, the inversion DDIMInverseScheduler.
    let mut euler = pipe.clone();
    euler
        .components
        .set_scheduler("EulerDiscreteScheduler")
        .unwrap();
    let err = euler
        .call(args(Some(embeds.clone()), Some(embeds.clone())))
        .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { ref field, .. } if field == "scheduler"),
        "{err}"
    );
    let mut no_inverse = pipe.clone();
    no_inverse.inverse_scheduler = no_inverse.components.scheduler.clone();
    let err = no_inverse.invert(invert(Some(image.into()))).unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { ref field, .. } if field == "inverse_scheduler"),
        "{err}"
    );
    // No captioner: a typed error, not a panic.
    let img = load_image(fixtures().join("pipelines/sd/image.png")).unwrap();
    assert_eq!(
        invalid_name(pipe.generate_caption(&img).unwrap_err()),
        "caption_generator"
    );
}

/// A folder laid out as diffusers' `StableDiffusionPix2PixZeroPipeline.save_pretrained` writes it
/// (no captioner, an `inverse_scheduler` config) loads, and its inverse scheduler config is used.
#[test]
fn a_pix2pix_zero_folder_loads_with_its_inverse_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = fixtures().join("pipelines/sd/sd1");
    copy_tree(&sd1, dir.path());
    let index = dir.path().join("model_index.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["_class_name"] = Value::from("StableDiffusionPix2PixZeroPipeline");
    json["inverse_scheduler"] = serde_json::json!(["diffusers", "DDIMInverseScheduler"]);
    json["caption_generator"] = serde_json::json!([null, null]);
    json["caption_processor"] = serde_json::json!([null, null]);
    std::fs::write(&index, serde_json::to_string(&json).unwrap()).unwrap();
    std::fs::create_dir_all(dir.path().join("inverse_scheduler")).unwrap();
    std::fs::write(
        dir.path().join("inverse_scheduler/scheduler_config.json"),
        r#"{"_class_name": "DDIMInverseScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 777}"#,
    )
    .unwrap();
    let pipe = StableDiffusionPix2PixZeroPipeline::from_pretrained(
        dir.path().to_str().unwrap(),
        &Device::flex(),
    )
    .unwrap();
    let config = diffusion_schedulers::Scheduler::config_value(&pipe.inverse_scheduler);
    assert_eq!(config["num_train_timesteps"], 777, "{config}");
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
