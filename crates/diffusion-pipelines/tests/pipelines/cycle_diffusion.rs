//! CycleDiffusionPipeline against diffusers' output_type="np" arrays on the tiny `sd1` pipeline
//! with DDIM (fixtures/oracle/gen_pipelines_cycle_diffusion.py), and its refusals.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType, load_image};
use diffusion_core::{Device, Error};
use diffusion_pipelines::{
    CycleDiffusionArgs, CycleDiffusionPipeline, Generators, PipelineImageInput,
    StableDiffusionComponents, StepControl,
};
use diffusion_schedulers::{AnyScheduler, ConfiguredScheduler, DDIMScheduler};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

fn components(device: &Device) -> StableDiffusionComponents {
    let dir = fixtures().join("pipelines/sd/sd1");
    StableDiffusionComponents::from_pretrained(dir.to_str().unwrap(), device).unwrap()
}

fn image() -> PipelineImageInput {
    load_image(fixtures().join("pipelines/sd/image.png"))
        .unwrap()
        .into()
}

fn args_for(case: &Value) -> CycleDiffusionArgs<'static> {
    let generator = match case["seeds"].as_array() {
        Some(seeds) => Generators::Seeds(seeds.iter().map(|s| s.as_u64().unwrap()).collect()),
        None => Generators::Seed(case["seed"].as_u64().unwrap()),
    };
    CycleDiffusionArgs {
        prompt: vec![case["prompt"].as_str().unwrap().into()],
        source_prompt: vec![case["source_prompt"].as_str().unwrap().into()],
        image: Some(image()),
        strength: case["strength"].as_f64().unwrap(),
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        source_guidance_scale: case["source_guidance_scale"].as_f64().unwrap(),
        eta: case["eta"].as_f64().unwrap(),
        num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
        generator,
        output_type: OutputType::Np,
        progress: false,
        ..Default::default()
    }
}

fn array(out: ImageOutput) -> (Vec<usize>, Vec<f32>) {
    match out {
        ImageOutput::Array(a) => (a.shape, a.data),
        other => panic!("expected an array, got {other:?}"),
    }
}

fn cases() -> Vec<Value> {
    let path = fixtures().join("pipelines/cycle_diffusion/cases.json");
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn cycle_diffusion_matches_diffusers() {
    let device = Device::default();
    let components = components(&device);
    let expected = read_f32(&fixtures().join("pipelines/cycle_diffusion/outputs.safetensors"));
    let cases = cases();
    assert_eq!(cases.len(), 4);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut pipe = CycleDiffusionPipeline::from_parts(components.clone());
        let (shape, got) = array(pipe.call(args_for(case)).unwrap().images);
        let (want_shape, want) = &expected[name];
        assert_eq!(&shape, want_shape, "{name}");
        let diff = max_abs_diff(&got, want);
        eprintln!("{name}: max |diff| = {diff:.2e}");
        assert!(diff <= 1e-3, "{name}: max |diff| = {diff}");
    }
}

#[test]
fn cycle_diffusion_runs_a_ddim_config_with_steps_offset_1_as_diffusers() {
    // diffusers' constructor rewrites steps_offset to 1; the output must be the case's.
    let device = Device::default();
    let mut components = components(&device);
    let mut file = components
        .scheduler
        .as_ddim()
        .unwrap()
        .config_file()
        .clone();
    file.config.steps_offset = 0;
    components.scheduler = AnyScheduler::Ddim(DDIMScheduler::from_config_file(file).unwrap());
    let case = &cases()[0];
    let mut pipe = CycleDiffusionPipeline::from_parts(components);
    let (_, got) = array(pipe.call(args_for(case)).unwrap().images);
    let expected = read_f32(&fixtures().join("pipelines/cycle_diffusion/outputs.safetensors"));
    let diff = max_abs_diff(&got, &expected[case["name"].as_str().unwrap()].1);
    assert!(diff <= 1e-3, "max |diff| = {diff}");
    let ddim = pipe.components.scheduler.as_ddim().unwrap();
    assert_eq!(ddim.config().steps_offset, 1);
}

#[test]
fn cycle_diffusion_callback_sees_every_step_and_can_interrupt() {
    let device = Device::default();
    let case = &cases()[0];
    let mut seen = Vec::new();
    let mut pipe = CycleDiffusionPipeline::from_parts(components(&device));
    let out = pipe
        .call(CycleDiffusionArgs {
            callback: Some(Box::new(|info| {
                seen.push((info.step, info.timestep));
                if info.step == 1 {
                    StepControl::Interrupt
                } else {
                    StepControl::Continue
                }
            })),
            ..args_for(case)
        })
        .unwrap();
    assert!(out.interrupted);
    // 5 steps at strength 0.8 run the last 4 of [801, 601, 401, 201, 1].
    assert_eq!(seen, vec![(0, 601.0), (1, 401.0)]);
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
fn cycle_diffusion_rejects_bad_input_with_typed_errors() {
    let device = Device::default();
    let components = components(&device);
    let base = || CycleDiffusionArgs {
        prompt: vec!["a photo of an astronaut riding an elephant".into()],
        source_prompt: vec!["a photo of an astronaut riding a horse".into()],
        image: Some(image()),
        num_inference_steps: 2,
        generator: Generators::Seed(0),
        output_type: OutputType::Np,
        progress: false,
        ..Default::default()
    };
    let mut pipe = CycleDiffusionPipeline::from_parts(components.clone());
    let mut run = |args: CycleDiffusionArgs<'_>| pipe.call(args);

    expect_invalid(
        run(CycleDiffusionArgs {
            source_prompt: vec![],
            ..base()
        }),
        "source_prompt",
        "source prompt",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            source_prompt: vec!["a".into(), "b".into()],
            ..base()
        }),
        "source_prompt",
        "one source prompt per prompt",
    );
    expect_invalid(
        run(CycleDiffusionArgs { eta: 0.0, ..base() }),
        "eta",
        "dividing by eta",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            eta: f64::NAN,
            ..base()
        }),
        "eta",
        "above 0",
    );
    expect_invalid(
        run(CycleDiffusionArgs { eta: 3.0, ..base() }),
        "eta",
        "too large",
    );
    for strength in [0.0, -0.1, 1.5, f64::NAN] {
        expect_invalid(
            run(CycleDiffusionArgs { strength, ..base() }),
            "strength",
            "(0, 1]",
        );
    }
    expect_invalid(
        run(CycleDiffusionArgs {
            strength: 0.1,
            num_inference_steps: 2,
            ..base()
        }),
        "strength",
        "no denoising step",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            image: None,
            ..base()
        }),
        "image",
        "needs an image",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            image: Some(PipelineImageInput::Images(vec![])),
            ..base()
        }),
        "image",
        "no image",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            image: Some(Tensor::<4>::zeros([1, 2, 32, 32], &device).into()),
            ..base()
        }),
        "image",
        "channels",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            num_images_per_prompt: 0,
            ..base()
        }),
        "num_images_per_prompt",
        "at least 1",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            source_guidance_scale: f64::INFINITY,
            ..base()
        }),
        "source_guidance_scale",
        "finite",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            generator: Generators::Seeds(vec![1, 2, 3]),
            ..base()
        }),
        "generator",
        "3 seeds",
    );
    expect_invalid(
        run(CycleDiffusionArgs {
            prompt: vec![],
            ..base()
        }),
        "prompt",
        "give a prompt",
    );

    expect_invalid(
        run(CycleDiffusionArgs {
            prompt: vec![],
            prompt_embeds: Some(Tensor::<3>::zeros([1, 5, 8], &device)),
            ..base()
        }),
        "prompt_embeds",
        "source prompt's embeddings",
    );

    let mut euler = components;
    euler.set_scheduler("EulerDiscreteScheduler").unwrap();
    let mut pipe = CycleDiffusionPipeline::from_parts(euler);
    expect_invalid(pipe.call(base()), "scheduler", "EulerDiscreteScheduler");
}

/// A folder saved by diffusers' `CycleDiffusionPipeline.save_pretrained` (the Stable Diffusion
/// components under `_class_name: "CycleDiffusionPipeline"`) loads.
#[test]
fn a_cycle_diffusion_folder_loads() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = fixtures().join("pipelines/sd/sd1");
    for entry in walk(&sd1) {
        let rel = entry.strip_prefix(&sd1).unwrap();
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    let index = dir.path().join("model_index.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["_class_name"] = Value::from("CycleDiffusionPipeline");
    std::fs::write(&index, serde_json::to_string(&json).unwrap()).unwrap();
    let pipe =
        CycleDiffusionPipeline::from_pretrained(dir.path().to_str().unwrap(), &Device::flex());
    assert!(pipe.is_ok(), "{:?}", pipe.err());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
