//! DDPMPipeline and DDIMPipeline against diffusers' output_type="np" arrays for the same seeds
//! (fixtures/oracle/gen_pipelines_unconditional.py).

use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::{Device, Error};
use diffusion_pipelines::{DDIMPipeline, DDPMPipeline, Generators, StepControl, UnconditionalArgs};
use diffusion_schedulers::AnyScheduler;
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

fn dir() -> std::path::PathBuf {
    fixtures().join("pipelines/unconditional")
}

fn generators(case: &Value) -> Generators {
    match case["seeds"].as_array() {
        Some(seeds) => Generators::Seeds(seeds.iter().map(|s| s.as_u64().unwrap()).collect()),
        None => Generators::Seed(case["seed"].as_u64().unwrap()),
    }
}

fn array(out: ImageOutput) -> (Vec<usize>, Vec<f32>) {
    match out {
        ImageOutput::Array(a) => (a.shape, a.data),
        other => panic!("expected an array, got {other:?}"),
    }
}

#[test]
fn every_case_matches_diffusers() {
    let device = Device::flex();
    let expected = read_f32(&dir().join("outputs.safetensors"));
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let folder = dir().join("ddpm_tiny");
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let args = UnconditionalArgs {
            batch_size: case["batch_size"].as_u64().unwrap() as usize,
            generator: generators(case),
            num_inference_steps: Some(case["num_inference_steps"].as_u64().unwrap() as usize),
            eta: case["eta"].as_f64(),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        };
        let out = match case["pipeline"].as_str().unwrap() {
            "DDPMPipeline" => {
                let mut pipe = DDPMPipeline::from_pretrained(&folder, &device).unwrap();
                if name.starts_with("ddpm_vpred") {
                    pipe.scheduler =
                        AnyScheduler::from_config_file(dir().join("ddpm_v_scheduler")).unwrap();
                }
                pipe.call(args).unwrap()
            }
            "DDIMPipeline" => DDIMPipeline::from_pretrained(&folder, &device)
                .unwrap()
                .call(args)
                .unwrap(),
            p => panic!("unknown pipeline {p}"),
        };
        let (shape, got) = array(out.images);
        let (want_shape, want) = &expected[name];
        assert_eq!(&shape, want_shape, "{name}");
        let diff = max_abs_diff(&got, want);
        eprintln!("{name}: max diff {diff:e} over {} values", got.len());
        assert!(diff <= 1e-3, "{name}: max |diff| = {diff}");
    }
}

#[test]
fn callback_can_interrupt_and_bad_arguments_are_errors() {
    let device = Device::flex();
    let folder = dir().join("ddpm_tiny");
    let mut pipe = DDPMPipeline::from_pretrained(&folder, &device).unwrap();
    let mut seen = Vec::new();
    let out = pipe
        .call(UnconditionalArgs {
            generator: Generators::Seed(0),
            num_inference_steps: Some(10),
            output_type: OutputType::Np,
            progress: false,
            callback: Some(Box::new(|info| {
                seen.push(info.step);
                if info.step == 2 {
                    StepControl::Interrupt
                } else {
                    StepControl::Continue
                }
            })),
            ..Default::default()
        })
        .unwrap();
    assert!(out.interrupted);
    assert_eq!(seen, vec![0, 1, 2]);

    let bad = |args: UnconditionalArgs<'_>, pipe: &mut DDPMPipeline| pipe.call(args).unwrap_err();
    let err = bad(
        UnconditionalArgs {
            batch_size: 0,
            progress: false,
            ..Default::default()
        },
        &mut pipe,
    );
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "batch_size"),
        "{err}"
    );
    let err = bad(
        UnconditionalArgs {
            batch_size: 3,
            generator: Generators::Seeds(vec![1, 2]),
            progress: false,
            ..Default::default()
        },
        &mut pipe,
    );
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "generator"),
        "{err}"
    );
    let err = bad(
        UnconditionalArgs {
            num_inference_steps: Some(0),
            progress: false,
            ..Default::default()
        },
        &mut pipe,
    );
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    // DDPM's step takes no eta: passing one is an error, not silently ignored.
    let err = bad(
        UnconditionalArgs {
            eta: Some(0.5),
            num_inference_steps: Some(2),
            progress: false,
            ..Default::default()
        },
        &mut pipe,
    );
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "eta"),
        "{err}"
    );
}
