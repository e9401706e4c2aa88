//! StableDiffusionInstructPix2PixPipeline against diffusers' outputs on a tiny 8-channel
//! pipeline (fixtures/oracle/gen_pipelines_instruct_pix2pix.py), and its refusals.

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::image::{ImageOutput, OutputType, load_image};
use diffusion_core::{Device, Error};
use diffusion_pipelines::{
    Generators, PipelineImageInput, StableDiffusionComponents, StableDiffusionInstructPix2PixArgs,
    StableDiffusionInstructPix2PixPipeline, StepControl,
};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

fn dir() -> std::path::PathBuf {
    fixtures().join("pipelines/instruct_pix2pix")
}

fn pipeline(device: &Device) -> StableDiffusionInstructPix2PixPipeline {
    let folder = dir().join("ip2p");
    StableDiffusionInstructPix2PixPipeline::from_pretrained(folder.to_str().unwrap(), device)
        .unwrap()
}

fn image(name: &str) -> PipelineImageInput {
    load_image(dir().join(name)).unwrap().into()
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        other => panic!("not a prompt: {other}"),
    }
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn tensor(entry: &(Vec<usize>, Vec<f32>), device: &Device) -> Tensor<4> {
    let (shape, data) = entry;
    Tensor::from_data(TensorData::new(data.clone(), shape.clone()), device)
}

fn args_for(case: &Value, device: &Device) -> StableDiffusionInstructPix2PixArgs<'static> {
    let inputs = read_f32(&dir().join("inputs.safetensors"));
    let (generator, latents) = match case["latents"].as_str() {
        Some(name) => (Generators::Seed(0), Some(tensor(&inputs[name], device))),
        None => (Generators::Seed(case["seed"].as_u64().unwrap()), None),
    };
    let output_type = match case["output_type"].as_str() {
        Some("latent") => OutputType::Latent,
        _ => OutputType::Np,
    };
    StableDiffusionInstructPix2PixArgs {
        prompt: strings(&case["prompt"]),
        negative_prompt: case.get("negative_prompt").map(strings),
        image: Some(image(case["image"].as_str().unwrap())),
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        image_guidance_scale: case["image_guidance_scale"].as_f64().unwrap(),
        num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
        generator,
        latents,
        output_type,
        progress: false,
        ..Default::default()
    }
}

fn array(out: ImageOutput) -> (Vec<usize>, Vec<f32>) {
    match out {
        ImageOutput::Array(a) => (a.shape, a.data),
        ImageOutput::Tensor(t) => (
            t.dims().to_vec(),
            t.into_data().try_to_vec::<f32>().unwrap(),
        ),
        other => panic!("expected an array, got {other:?}"),
    }
}

#[test]
fn instruct_pix2pix_matches_diffusers() {
    let device = Device::default();
    let pipe = pipeline(&device);
    let expected = read_f32(&dir().join("outputs.safetensors"));
    let cases = cases();
    assert_eq!(cases.len(), 8);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut pipe = pipe.clone();
        pipe.components
            .set_scheduler(case["scheduler"].as_str().unwrap())
            .unwrap();
        let (shape, got) = array(pipe.call(args_for(case, &device)).unwrap().images);
        let (want_shape, want) = &expected[name];
        assert_eq!(&shape, want_shape, "{name}");
        let diff = max_abs_diff(&got, want);
        eprintln!("{name}: max |diff| = {diff:.2e}");
        assert!(diff <= 1e-3, "{name}: max |diff| = {diff}");
    }
}

#[test]
fn instruct_pix2pix_takes_image_latents_as_the_image() {
    // diffusers' test_latents_input: the VAE's latent mode given as `image` is not encoded
    // again and gives the image's result.
    let device = Device::default();
    let case = &cases()[0];
    let mut pipe = pipeline(&device);
    let (_, from_image) = array(pipe.call(args_for(case, &device)).unwrap().images);
    let processor = diffusion_core::image::VaeImageProcessor::new(2);
    let pixels = processor
        .preprocess(
            &[load_image(dir().join("image.png")).unwrap()],
            None,
            None,
            &device,
        )
        .unwrap();
    let mode = pipe.components.vae.encode(pixels).unwrap().mode();
    let (_, from_latents) = array(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            image: Some(PipelineImageInput::Tensor(mode)),
            ..args_for(case, &device)
        })
        .unwrap()
        .images,
    );
    let diff = max_abs_diff(&from_image, &from_latents);
    assert!(diff <= 1e-4, "max |diff| = {diff}");
}

#[test]
fn instruct_pix2pix_callback_sees_every_step_and_can_interrupt() {
    let device = Device::default();
    let case = &cases()[3];
    let mut steps = Vec::new();
    let mut pipe = pipeline(&device);
    pipe.components
        .set_scheduler("EulerDiscreteScheduler")
        .unwrap();
    let out = pipe
        .call(StableDiffusionInstructPix2PixArgs {
            callback: Some(Box::new(|info| {
                steps.push(info.step);
                if info.step == 1 {
                    StepControl::Interrupt
                } else {
                    StepControl::Continue
                }
            })),
            ..args_for(case, &device)
        })
        .unwrap();
    assert!(out.interrupted);
    assert_eq!(steps, vec![0, 1]);
}

fn expect_invalid(result: diffusion_core::Result<impl std::fmt::Debug>, arg: &str, words: &str) {
    match result {
        Err(Error::InvalidArgument { name, message }) => {
            assert_eq!(name, arg, "{message}");
            assert!(message.contains(words), "{arg}: {message}");
        }
        other => panic!("{arg}: expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn instruct_pix2pix_rejects_bad_input_with_typed_errors() {
    let device = Device::default();
    let mut pipe = pipeline(&device);
    let base = || StableDiffusionInstructPix2PixArgs {
        prompt: vec!["make it winter".into()],
        image: Some(image("image.png")),
        num_inference_steps: 2,
        generator: Generators::Seed(0),
        output_type: OutputType::Np,
        progress: false,
        ..Default::default()
    };
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            image: None,
            ..base()
        }),
        "image",
        "needs the image",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            image: Some(PipelineImageInput::Images(Vec::new())),
            ..base()
        }),
        "image",
        "no image",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            image: Some(PipelineImageInput::Tensor(Tensor::zeros(
                [1, 2, 32, 32],
                &device,
            ))),
            ..base()
        }),
        "image",
        "2 channels",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            image_guidance_scale: 0.5,
            ..base()
        }),
        "image_guidance_scale",
        "at least 1",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            guidance_scale: f64::NAN,
            ..base()
        }),
        "guidance_scale",
        "finite",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            latents: Some(Tensor::zeros([1, 4, 8, 8], &device)),
            ..base()
        }),
        "latents",
        "expected [1, 4, 16, 16]",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            num_inference_steps: 0,
            ..base()
        }),
        "num_inference_steps",
        "at least 1",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            num_images_per_prompt: 0,
            ..base()
        }),
        "num_images_per_prompt",
        "at least 1",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            prompt: vec!["a".into(), "b".into(), "c".into()],
            image: Some(PipelineImageInput::Images(vec![
                load_image(dir().join("image.png")).unwrap(),
                load_image(dir().join("image.png")).unwrap(),
            ])),
            ..base()
        }),
        "image",
        "cannot be repeated",
    );
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            generator: Generators::Seeds(vec![1, 2]),
            ..base()
        }),
        "generator",
        "2 seeds",
    );
}

#[test]
fn instruct_pix2pix_refuses_a_unet_without_image_channels() {
    // A plain 4-channel Stable Diffusion UNet cannot take the image latents.
    let device = Device::default();
    let sd1 = fixtures().join("pipelines/sd/sd1");
    let components =
        StableDiffusionComponents::from_pretrained(sd1.to_str().unwrap(), &device).unwrap();
    let mut pipe = StableDiffusionInstructPix2PixPipeline::from_parts(components);
    expect_invalid(
        pipe.call(StableDiffusionInstructPix2PixArgs {
            prompt: vec!["make it winter".into()],
            image: Some(image("image.png")),
            num_inference_steps: 2,
            progress: false,
            ..Default::default()
        }),
        "unet",
        "takes 4 input channels",
    );
    expect_invalid(
        StableDiffusionInstructPix2PixPipeline::from_pretrained(sd1.to_str().unwrap(), &device),
        "unet",
        "8 input channels",
    );
}

#[test]
fn instruct_pix2pix_loads_only_pipeline_folders() {
    let device = Device::default();
    let empty = tempfile::tempdir().unwrap();
    match StableDiffusionInstructPix2PixPipeline::from_pretrained(
        empty.path().to_str().unwrap(),
        &device,
    ) {
        Err(Error::NotFound { message, .. }) => assert!(message.contains("model_index.json")),
        other => panic!("expected NotFound, got {other:?}"),
    }
}
