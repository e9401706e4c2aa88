//! LoRA through the pipeline (`fixtures/pipelines/lora`, gen_pipelines_lora.py): diffusers'
//! `pipe.load_lora_weights` + `set_adapters` end to end, kohya and PEFT files together, and
//! `unload_lora_weights` giving the base pipeline back.

use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::{Device, Error};
use diffusion_pipelines::{Generators, StableDiffusionArgs, StableDiffusionPipeline};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

fn run(pipe: &mut StableDiffusionPipeline, prompt: &str, seed: u64) -> Vec<f32> {
    let out = pipe
        .call(StableDiffusionArgs {
            prompt: vec![prompt.to_string()],
            num_inference_steps: 3,
            generator: Generators::Seed(seed),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    let ImageOutput::Array(images) = out.images else {
        panic!("expected an array");
    };
    images.data
}

#[test]
fn lora_pipeline_matches_diffusers_and_unloads() {
    let device = Device::flex();
    let root = fixtures().join("pipelines/lora");
    let folder = fixtures().join("pipelines/sd/sd1");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("cases.json")).unwrap()).unwrap();
    let outputs = read_f32(&root.join("outputs.safetensors"));
    let base = StableDiffusionPipeline::from_pretrained(folder.to_str().unwrap(), &device).unwrap();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut pipe = StableDiffusionPipeline::from_pipe(&base.components);
        pipe.components
            .set_scheduler("DPMSolverMultistepScheduler")
            .unwrap();
        let loras = case["loras"].as_array().unwrap();
        let names: Vec<&str> = loras.iter().map(|l| l[0].as_str().unwrap()).collect();
        let weights: Vec<f32> = loras
            .iter()
            .map(|l| l[1].as_f64().unwrap() as f32)
            .collect();
        for adapter in &names {
            pipe.components
                .load_lora_weights(root.join(format!("{adapter}.safetensors")), adapter)
                .unwrap();
        }
        pipe.components.set_adapters(&names, &weights).unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let seed = case["seed"].as_u64().unwrap();
        let got = run(&mut pipe, prompt, seed);
        let diff = max_abs_diff(&got, &outputs[name].1);
        eprintln!("{name}: max |diff| = {diff:.2e}");
        assert!(diff <= 1e-3, "{name}: {diff}");

        // Fused gives the same images; unloading gives the base pipeline back.
        pipe.components.fuse_lora(1.0).unwrap();
        let fused = run(&mut pipe, prompt, seed);
        assert!(max_abs_diff(&fused, &got) <= 1e-4, "{name}: fused differs");
        pipe.components.unfuse_lora().unwrap();
        pipe.components.unload_lora_weights().unwrap();
        if name == "style" {
            let plain = run(&mut pipe, prompt, seed);
            let diff = max_abs_diff(&plain, &outputs["base"].1);
            assert!(diff <= 1e-3, "unloaded: {diff}");
        }
    }
    // The shared base components were never changed.
    let mut plain = StableDiffusionPipeline::from_pipe(&base.components);
    plain
        .components
        .set_scheduler("DPMSolverMultistepScheduler")
        .unwrap();
    let got = run(&mut plain, cases[0]["prompt"].as_str().unwrap(), 0);
    assert!(max_abs_diff(&got, &outputs["base"].1) <= 1e-3);
}

#[test]
fn lora_for_another_model_names_the_keys() {
    let device = Device::flex();
    // The SD1 pipeline's LoRA does not fit the SDXL test pipeline's UNet.
    let folder = fixtures().join("pipelines/sd/sdxl");
    let mut components = diffusion_pipelines::StableDiffusionXLComponents::from_pretrained(
        folder.to_str().unwrap(),
        &device,
    )
    .unwrap();
    let file = fixtures().join("pipelines/lora/style.safetensors");
    match components.load_lora_weights(&file, "style") {
        Err(Error::UnexpectedTensors { keys, .. }) => {
            assert!(keys.iter().any(|k| k.contains("lora_unet")), "{keys:?}")
        }
        Err(Error::TensorShape { key, .. }) => assert!(key.contains("lora"), "{key}"),
        other => panic!("expected a key error, got {:?}", other.map(|_| ())),
    }
}
