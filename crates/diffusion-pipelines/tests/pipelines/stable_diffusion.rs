//! StableDiffusionPipeline, -Img2Img, -Inpaint and StableDiffusionXLPipeline against diffusers' output_type="np" arrays on
//! tiny random pipelines (fixtures/oracle/gen_pipelines_sd.py): same seeds or same latents,
//! DDIM, Euler and DPM++ 2M each.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType, load_image};
use diffusion_core::tensor::from_vec;
use diffusion_core::{Device, Error};
use diffusion_models::{ModelMixin, UNet2DConditionModel};
use diffusion_pipelines::{
    Generators, MicroConditioning, PipelineImageInput, StableDiffusionArgs,
    StableDiffusionComponents, StableDiffusionImg2ImgArgs, StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintArgs, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
    StableDiffusionXLArgs, StableDiffusionXLComponents, StableDiffusionXLImg2ImgArgs,
    StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintArgs,
    StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, StepCallback, StepControl,
};
use serde_json::Value;

use crate::common::{fixtures, max_abs_diff, read_f32};

fn dir() -> PathBuf {
    fixtures().join("pipelines/sd")
}

fn generators(case: &Value) -> Generators {
    if let Some(seeds) = case["seeds"].as_array() {
        Generators::Seeds(seeds.iter().map(|s| s.as_u64().unwrap()).collect())
    } else if let Some(seed) = case["seed"].as_u64() {
        Generators::Seed(seed)
    } else {
        Generators::Random
    }
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
        // 8-bit images as diffusers' np.asarray(pil) / 255.
        ImageOutput::Images(images) => {
            let (w, h) = images[0].dimensions();
            let data = images
                .iter()
                .flat_map(|i| i.as_raw().iter().map(|&v| v as f32 / 255.0))
                .collect();
            (vec![images.len(), h as usize, w as usize, 3], data)
        }
        other => panic!("expected an array, got {other:?}"),
    }
}

fn load(folder: &str, device: &Device) -> StableDiffusionComponents {
    if folder == "sd1_inpaint_unet" || folder == "sd1_lcm_unet" {
        // sd1's components with another UNet: the other weights are shared, not reloaded.
        let mut components = load("sd1", device);
        components.unet =
            UNet2DConditionModel::from_pretrained(dir().join(folder), device).unwrap();
        return components;
    }
    StableDiffusionComponents::from_pretrained(dir().join(folder).to_str().unwrap(), device)
        .unwrap()
}

fn size(v: &Value) -> Option<(usize, usize)> {
    v.as_array().map(|a| {
        (
            a[0].as_u64().unwrap() as usize,
            a[1].as_u64().unwrap() as usize,
        )
    })
}

fn load_xl(folder: &str, device: &Device) -> StableDiffusionXLComponents {
    let path = dir().join("sdxl");
    let mut components =
        StableDiffusionXLComponents::from_pretrained(path.to_str().unwrap(), device).unwrap();
    if folder == "sdxl_refiner_unet" {
        // A refiner: second text encoder only, aesthetic-score conditioning.
        components.text_encoder = None;
        components.tokenizer = None;
        components.unet =
            UNet2DConditionModel::from_pretrained(dir().join(folder), device).unwrap();
        components.requires_aesthetics_score = true;
        components.force_zeros_for_empty_prompt = false;
    }
    components
}

fn run_xl_img2img_case(
    case: &Value,
    components: &StableDiffusionXLComponents,
) -> (Vec<usize>, Vec<f32>) {
    let mut components = components.clone();
    components
        .set_scheduler(case["scheduler"].as_str().unwrap())
        .unwrap();
    let image = load_image(dir().join(case["image"].as_str().unwrap())).unwrap();
    let out = StableDiffusionXLImg2ImgPipeline::from_parts(components)
        .call(StableDiffusionXLImg2ImgArgs {
            prompt: strings(&case["prompt"]).unwrap(),
            negative_prompt: strings(&case["negative_prompt"]),
            image: Some(image.into()),
            strength: case["strength"].as_f64().unwrap(),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            micro_conditioning: MicroConditioning {
                aesthetic_score: case["aesthetic_score"].as_f64().unwrap_or(6.0),
                negative_aesthetic_score: case["negative_aesthetic_score"].as_f64().unwrap_or(2.5),
                ..Default::default()
            },
            generator: generators(case),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    array(out.images)
}

fn run_xl_inpaint_case(
    case: &Value,
    components: &StableDiffusionXLComponents,
) -> (Vec<usize>, Vec<f32>) {
    let mut components = components.clone();
    components
        .set_scheduler(case["scheduler"].as_str().unwrap())
        .unwrap();
    let image = load_image(dir().join(case["image"].as_str().unwrap())).unwrap();
    let mask = load_image(dir().join(case["mask_image"].as_str().unwrap())).unwrap();
    let out = StableDiffusionXLInpaintPipeline::from_parts(components)
        .call(StableDiffusionXLInpaintArgs {
            prompt: strings(&case["prompt"]).unwrap(),
            image: Some(image.into()),
            mask_image: Some(mask.into()),
            strength: case["strength"].as_f64().unwrap_or(0.9999),
            denoising_start: case["denoising_start"].as_f64(),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            generator: generators(case),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    array(out.images)
}

/// Base until `split`, latents handed to the refiner from `split` on, one generator throughout.
fn run_refiner_flow(
    case: &Value,
    refiner: &StableDiffusionXLComponents,
    device: &Device,
) -> (Vec<usize>, Vec<f32>) {
    let scheduler = case["scheduler"].as_str().unwrap();
    let mut base = load_xl("sdxl", device);
    base.set_scheduler(scheduler).unwrap();
    let mut refiner = refiner.clone();
    refiner.set_scheduler(scheduler).unwrap();
    let prompt = strings(&case["prompt"]).unwrap();
    let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
    let split = case["split"].as_f64().unwrap();
    // diffusers passes one torch.Generator to both calls. The refiner, given latents and
    // denoising_start, draws no noise with these deterministic schedulers, so its seed is moot.
    let seed = case["seed"].as_u64().unwrap();
    let latents = StableDiffusionXLPipeline::from_parts(base)
        .call(StableDiffusionXLArgs {
            prompt: prompt.clone(),
            num_inference_steps: steps,
            denoising_end: Some(split),
            generator: Generators::Seed(seed),
            output_type: OutputType::Latent,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    let ImageOutput::Tensor(latents) = latents.images else {
        panic!("expected latents")
    };
    let out = StableDiffusionXLImg2ImgPipeline::from_parts(refiner)
        .call(StableDiffusionXLImg2ImgArgs {
            prompt,
            image: Some(latents.into()),
            num_inference_steps: steps,
            denoising_start: Some(split),
            generator: Generators::Seed(seed),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    array(out.images)
}

fn run_xl_case(
    case: &Value,
    components: &StableDiffusionXLComponents,
    inputs: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    device: &Device,
) -> (Vec<usize>, Vec<f32>) {
    let mut components = components.clone();
    components
        .set_scheduler(case["scheduler"].as_str().unwrap())
        .unwrap();
    let latents = case["latents"].as_str().map(|key| {
        let (shape, data) = &inputs[key];
        from_vec(data.clone(), shape.clone().try_into().unwrap(), device)
    });
    let out = StableDiffusionXLPipeline::from_parts(components)
        .call(StableDiffusionXLArgs {
            prompt: strings(&case["prompt"]).unwrap(),
            prompt_2: strings(&case["prompt_2"]),
            negative_prompt: strings(&case["negative_prompt"]),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            denoising_end: case["denoising_end"].as_f64(),
            guidance_scale: case["guidance_scale"].as_f64().unwrap_or(5.0),
            guidance_rescale: case["guidance_rescale"].as_f64().unwrap_or(0.0),
            num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
            generator: generators(case),
            latents,
            original_size: size(&case["original_size"]),
            crops_coords_top_left: size(&case["crops_coords_top_left"]).unwrap_or((0, 0)),
            target_size: size(&case["target_size"]),
            negative_original_size: size(&case["negative_original_size"]),
            negative_target_size: size(&case["negative_target_size"]),
            clip_skip: case["clip_skip"].as_u64().map(|c| c as usize),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    assert!(!out.interrupted);
    array(out.images)
}

/// Run one case of cases.json and return the np images.
fn run_case(
    case: &Value,
    components: &StableDiffusionComponents,
    inputs: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    device: &Device,
) -> (Vec<usize>, Vec<f32>) {
    let mut components = components.clone();
    components
        .set_scheduler(case["scheduler"].as_str().unwrap())
        .unwrap();
    let latents = case["latents"].as_str().map(|key| {
        let (shape, data) = &inputs[key];
        from_vec(data.clone(), shape.clone().try_into().unwrap(), device)
    });
    let prompt = strings(&case["prompt"]).unwrap();
    let negative_prompt = strings(&case["negative_prompt"]);
    // Cases with custom timesteps or sigmas have no step count.
    let steps = case["num_inference_steps"].as_u64().unwrap_or(0) as usize;
    let guidance_scale = case["guidance_scale"].as_f64().unwrap_or(7.5);
    let num_images_per_prompt = case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize;
    let eta = case["eta"].as_f64().unwrap_or(0.0);
    let clip_skip = case["clip_skip"].as_u64().map(|c| c as usize);
    let floats = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>())
    };
    let (timesteps, sigmas) = (floats(&case["timesteps"]), floats(&case["sigmas"]));
    let image = || {
        let img = load_image(dir().join(case["image"].as_str().unwrap())).unwrap();
        Some(img.into())
    };
    let out = match case["pipeline"].as_str().unwrap() {
        "txt2img" => StableDiffusionPipeline::from_parts(components)
            .call(StableDiffusionArgs {
                prompt,
                negative_prompt,
                num_inference_steps: steps,
                timesteps,
                sigmas,
                guidance_scale,
                guidance_rescale: case["guidance_rescale"].as_f64().unwrap_or(0.0),
                eta,
                generator: generators(case),
                latents,
                num_images_per_prompt,
                output_type: OutputType::Np,
                clip_skip,
                progress: false,
                ..Default::default()
            })
            .unwrap(),
        "img2img" => StableDiffusionImg2ImgPipeline::from_parts(components)
            .call(StableDiffusionImg2ImgArgs {
                prompt,
                negative_prompt,
                image: image(),
                strength: case["strength"].as_f64().unwrap_or(0.8),
                num_inference_steps: steps,
                guidance_scale,
                eta,
                generator: generators(case),
                num_images_per_prompt,
                output_type: OutputType::Np,
                clip_skip,
                progress: false,
                ..Default::default()
            })
            .unwrap(),
        "inpaint" => {
            let mask = load_image(dir().join(case["mask_image"].as_str().unwrap())).unwrap();
            StableDiffusionInpaintPipeline::from_parts(components)
                .call(StableDiffusionInpaintArgs {
                    prompt,
                    negative_prompt,
                    image: image(),
                    mask_image: Some(mask.into()),
                    strength: case["strength"].as_f64().unwrap_or(1.0),
                    num_inference_steps: steps,
                    guidance_scale,
                    eta,
                    generator: generators(case),
                    latents,
                    num_images_per_prompt,
                    padding_mask_crop: case["padding_mask_crop"].as_u64().map(|p| p as usize),
                    output_type: if case["output_type"] == "pil" {
                        OutputType::Pil
                    } else {
                        OutputType::Np
                    },
                    clip_skip,
                    progress: false,
                    ..Default::default()
                })
                .unwrap()
        }
        p => panic!("unknown pipeline {p}"),
    };
    assert!(!out.interrupted);
    array(out.images)
}

fn check_cases(filter: impl Fn(&str) -> bool) {
    let device = Device::flex();
    let expected = read_f32(&dir().join("outputs.safetensors"));
    let inputs = read_f32(&dir().join("inputs.safetensors"));
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let mut loaded: BTreeMap<String, StableDiffusionComponents> = BTreeMap::new();
    let mut loaded_xl: BTreeMap<String, StableDiffusionXLComponents> = BTreeMap::new();
    let mut worst = 0.0f32;
    let mut count = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        if !filter(name) {
            continue;
        }
        let folder = case["folder"].as_str().unwrap();
        let pipeline = case["pipeline"].as_str().unwrap();
        let xl = ["txt2img_xl", "img2img_xl", "inpaint_xl", "refiner_flow"];
        let (shape, got) = if xl.contains(&pipeline) {
            let components = loaded_xl
                .entry(folder.to_string())
                .or_insert_with(|| load_xl(folder, &device));
            match pipeline {
                "txt2img_xl" => run_xl_case(case, components, &inputs, &device),
                "img2img_xl" => run_xl_img2img_case(case, components),
                "inpaint_xl" => run_xl_inpaint_case(case, components),
                _ => run_refiner_flow(case, components, &device),
            }
        } else {
            let components = loaded
                .entry(folder.to_string())
                .or_insert_with(|| load(folder, &device));
            run_case(case, components, &inputs, &device)
        };
        let (want_shape, want) = &expected[name];
        assert_eq!(&shape, want_shape, "{name}");
        let diff = max_abs_diff(&got, want);
        eprintln!("{name}: max |diff| {diff:e} over {} values", got.len());
        assert!(diff <= 1e-3, "{name}: max |diff| = {diff}");
        worst = worst.max(diff);
        count += 1;
    }
    assert!(count > 0, "no case matched");
    eprintln!("{count} cases, worst max |diff| {worst:e}");
}

#[test]
fn txt2img_sd1_matches_diffusers() {
    check_cases(|n| n.starts_with("sd1_"));
}

#[test]
fn txt2img_sd2_v_prediction_matches_diffusers() {
    check_cases(|n| n.starts_with("sd2_"));
}

#[test]
fn img2img_matches_diffusers() {
    check_cases(|n| n.starts_with("img2img_"));
}

#[test]
fn inpaint_9_channel_matches_diffusers() {
    check_cases(|n| n.starts_with("inpaint_"));
}

#[test]
fn inpaint_legacy_4_channel_matches_diffusers() {
    check_cases(|n| n.starts_with("legacy_inpaint_"));
}

#[test]
fn txt2img_sdxl_matches_diffusers() {
    check_cases(|n| {
        n.starts_with("sdxl_")
            && !n.contains("img2img")
            && !n.contains("refiner")
            && !n.contains("inpaint")
    });
}

#[test]
fn inpaint_sdxl_matches_diffusers() {
    check_cases(|n| n.starts_with("sdxl_inpaint"));
}

#[test]
fn img2img_sdxl_and_refiner_match_diffusers() {
    check_cases(|n| n.starts_with("sdxl_img2img") || n.starts_with("sdxl_refiner"));
}

fn invalid_name(err: Error) -> String {
    match err {
        Error::InvalidArgument { name, .. } => name,
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let device = Device::flex();
    let components = load("sd1", &device);
    let prompt = || vec!["a cat".to_string()];
    let mut txt2img = StableDiffusionPipeline::from_parts(components.clone());
    let base = || StableDiffusionArgs {
        prompt: prompt(),
        num_inference_steps: 2,
        output_type: OutputType::Np,
        progress: false,
        ..Default::default()
    };
    let err = txt2img
        .call(StableDiffusionArgs {
            height: Some(36),
            ..base()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "height");
    let err = txt2img
        .call(StableDiffusionArgs {
            width: Some(20),
            ..base()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "width");
    let err = txt2img
        .call(StableDiffusionArgs {
            num_inference_steps: 0,
            ..base()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "num_inference_steps");
    let err = txt2img
        .call(StableDiffusionArgs {
            prompt: vec!["a".into(), "b".into()],
            generator: Generators::Seeds(vec![1, 2, 3]),
            ..base()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "generator");
    let err = txt2img
        .call(StableDiffusionArgs {
            negative_prompt: Some(vec!["x".into(), "y".into()]),
            ..base()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "negative_prompt");
    let err = txt2img
        .call(StableDiffusionArgs {
            prompt: vec![],
            ..base()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "prompt");

    let image = load_image(dir().join("image.png")).unwrap();
    let mut img2img = StableDiffusionImg2ImgPipeline::from_pipe(&txt2img);
    for strength in [0.0, 1.5, -0.1] {
        let err = img2img
            .call(StableDiffusionImg2ImgArgs {
                prompt: prompt(),
                image: Some(image.clone().into()),
                strength,
                num_inference_steps: 2,
                progress: false,
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(invalid_name(err), "strength", "strength {strength}");
    }
    // 2 steps * 0.2 rounds down to no step at all.
    let err = img2img
        .call(StableDiffusionImg2ImgArgs {
            prompt: prompt(),
            image: Some(image.clone().into()),
            strength: 0.2,
            num_inference_steps: 2,
            progress: false,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "strength");
    let err = img2img
        .call(StableDiffusionImg2ImgArgs {
            prompt: prompt(),
            progress: false,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "image");

    let mut inpaint = StableDiffusionInpaintPipeline::from_pipe(&img2img);
    let err = inpaint
        .call(StableDiffusionInpaintArgs {
            prompt: prompt(),
            image: Some(image.clone().into()),
            num_inference_steps: 2,
            progress: false,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "mask_image");
    let err = inpaint
        .call(StableDiffusionInpaintArgs {
            prompt: prompt(),
            image: Some(image.clone().into()),
            mask_image: Some(image.into()),
            num_inference_steps: 2,
            generator: Generators::Seeds(vec![1, 2]),
            progress: false,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "generator");
}

#[test]
fn callback_replaces_latents_and_interrupts() {
    let device = Device::flex();
    let components = load("sd1", &device);
    fn args(callback: Option<StepCallback<'_>>) -> StableDiffusionArgs<'_> {
        StableDiffusionArgs {
            prompt: vec!["a cat".into()],
            num_inference_steps: 4,
            generator: Generators::Seed(0),
            output_type: OutputType::Latent,
            callback,
            progress: false,
            ..Default::default()
        }
    }
    let mut pipe = StableDiffusionPipeline::from_parts(components);
    let mut seen = Vec::new();
    let out = pipe
        .call(args(Some(Box::new(
            |info: diffusion_pipelines::StepInfo<'_>| {
                seen.push(info.step);
                if info.step == 1 {
                    StepControl::Interrupt
                } else {
                    StepControl::Continue
                }
            },
        ))))
        .unwrap();
    assert!(out.interrupted);
    assert_eq!(seen, vec![0, 1]);

    // Zeroing the latents at the last step is what comes out as "latent" output.
    let out = pipe
        .call(args(Some(Box::new(
            |info: diffusion_pipelines::StepInfo<'_>| {
                if info.step + 1 == info.num_steps {
                    StepControl::ReplaceLatents(info.latents.clone().zeros_like())
                } else {
                    StepControl::Continue
                }
            },
        ))))
        .unwrap();
    match out.images {
        ImageOutput::Tensor(t) => {
            assert_eq!(t.dims(), [1, 4, 16, 16]);
            let max = t.abs().max().into_scalar::<f32>();
            assert_eq!(max, 0.0);
        }
        other => panic!("expected latents, got {other:?}"),
    }
}

#[test]
fn fp16_variant_loads_where_present_and_falls_back_elsewhere() {
    use diffusion_core::weights::SaveDtype;

    let device = Device::flex();
    let src = dir().join("sd1");
    let tmp = std::env::temp_dir().join(format!("sd1-fp16-{}", std::process::id()));
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let to = tmp.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    let components = load("sd1", &device);
    // Only the UNet gets an fp16 file; its plain weights are removed so that loading it proves
    // the variant was picked.
    components
        .unet
        .save_pretrained_with(tmp.join("unet"), Some("fp16"), SaveDtype::F16)
        .unwrap();
    std::fs::remove_file(tmp.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let options = diffusion_loaders::HubOptions {
        variant: Some("fp16".into()),
        offline: true,
        ..Default::default()
    };
    let fp16 =
        StableDiffusionComponents::from_pretrained_with(tmp.to_str().unwrap(), &options, &device)
            .unwrap();
    let run = |c: StableDiffusionComponents| {
        array(
            StableDiffusionPipeline::from_parts(c)
                .call(StableDiffusionArgs {
                    prompt: vec!["a cat".into()],
                    num_inference_steps: 2,
                    generator: Generators::Seed(0),
                    output_type: OutputType::Np,
                    progress: false,
                    ..Default::default()
                })
                .unwrap()
                .images,
        )
        .1
    };
    let diff = max_abs_diff(&run(fp16), &run(components));
    // Half-precision weights move the image a little, not a lot.
    assert!(diff > 0.0 && diff < 0.05, "{diff}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// `[1, C, H, W]` in `[0, 1]` from an 8-bit image (channel `c` of each pixel, or its luma).
fn image_tensor(img: &diffusion_core::image::RgbImage, gray: bool, device: &Device) -> Tensor<4> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let raw = img.as_raw();
    let channels = if gray { 1 } else { 3 };
    let mut data = Vec::with_capacity(channels * h * w);
    for c in 0..channels {
        for i in 0..h * w {
            data.push(raw[3 * i + c] as f32 / 255.0);
        }
    }
    from_vec(data, [1, channels, h, w], device)
}

#[test]
fn tensor_inputs_match_image_inputs_and_pipelines_share_weights() {
    let device = Device::flex();
    let components = load("sd1_inpaint_unet", &device);
    let image = load_image(dir().join("image.png")).unwrap();
    let mask = load_image(dir().join("mask.png")).unwrap();
    let run = |image: PipelineImageInput, mask: PipelineImageInput| {
        let mut pipe = StableDiffusionInpaintPipeline::from_parts(components.clone());
        array(
            pipe.call(StableDiffusionInpaintArgs {
                prompt: vec!["a cat".into()],
                image: Some(image),
                mask_image: Some(mask),
                strength: 0.75,
                num_inference_steps: 4,
                generator: Generators::Seed(3),
                output_type: OutputType::Np,
                progress: false,
                ..Default::default()
            })
            .unwrap()
            .images,
        )
        .1
    };
    let from_images = run(image.clone().into(), mask.clone().into());
    let from_tensors = run(
        image_tensor(&image, false, &device).into(),
        image_tensor(&mask, true, &device).into(),
    );
    assert!(max_abs_diff(&from_images, &from_tensors) <= 1e-6);

    let txt2img = StableDiffusionPipeline::from_parts(components.clone());
    let img2img = StableDiffusionImg2ImgPipeline::from_pipe(&txt2img);
    let a = &txt2img.components.unet.conv_in.weight;
    let b = &img2img.components.unet.conv_in.weight;
    assert_eq!(a.id, b.id, "from_pipe shares the parameters");
    let a = &txt2img.components.text_encoder.text_model.final_layer_norm;
    let b = &img2img.components.text_encoder.text_model.final_layer_norm;
    assert_eq!(a.gamma.id, b.gamma.id);
}

#[test]
fn prompt_embeds_reproduce_the_prompt() {
    let device = Device::flex();
    let components = load("sd1", &device);
    let tokens = components
        .tokenizer
        .tokenize(
            &["a cat", "a dog"],
            diffusion_models::Padding::MaxLength,
            None,
            true,
        )
        .unwrap();
    let embeds = |ids| {
        components
            .text_encoder
            .forward(ids)
            .unwrap()
            .last_hidden_state
    };
    let prompt_embeds = embeds(tokens.input_ids_tensor(&device).unwrap());
    let negative = components
        .tokenizer
        .tokenize(
            &["blurry", "ugly"],
            diffusion_models::Padding::MaxLength,
            None,
            true,
        )
        .unwrap();
    let negative_embeds = embeds(negative.input_ids_tensor(&device).unwrap());
    let run = |args: StableDiffusionArgs<'_>| {
        let mut pipe = StableDiffusionPipeline::from_parts(components.clone());
        array(
            pipe.call(StableDiffusionArgs {
                num_inference_steps: 2,
                generator: Generators::Seed(5),
                output_type: OutputType::Np,
                progress: false,
                ..args
            })
            .unwrap()
            .images,
        )
        .1
    };
    let from_text = run(StableDiffusionArgs {
        prompt: vec!["a cat".into(), "a dog".into()],
        negative_prompt: Some(vec!["blurry".into(), "ugly".into()]),
        ..Default::default()
    });
    let from_embeds = run(StableDiffusionArgs {
        prompt_embeds: Some(prompt_embeds),
        negative_prompt_embeds: Some(negative_embeds),
        ..Default::default()
    });
    assert_eq!(from_text, from_embeds);
}

#[test]
fn sdxl_bad_arguments_are_typed_errors() {
    let device = Device::flex();
    let components = load_xl("sdxl", &device);
    let image = load_image(dir().join("image.png")).unwrap();
    let mut pipe = StableDiffusionXLImg2ImgPipeline::from_parts(components.clone());
    let args = |start, end| StableDiffusionXLImg2ImgArgs {
        prompt: vec!["a cat".into()],
        image: Some(image.clone().into()),
        num_inference_steps: 4,
        denoising_start: start,
        denoising_end: end,
        progress: false,
        ..Default::default()
    };
    let err = pipe.call(args(Some(0.7), Some(0.5))).unwrap_err();
    assert_eq!(invalid_name(err), "denoising_start");
    let err = pipe.call(args(Some(1.5), None)).unwrap_err();
    assert_eq!(invalid_name(err), "denoising_start");
    let err = pipe.call(args(None, Some(0.0))).unwrap_err();
    assert_eq!(invalid_name(err), "denoising_end");

    let mut base = StableDiffusionXLPipeline::from_parts(components.clone());
    let err = base
        .call(StableDiffusionXLArgs {
            prompt: vec!["a".into(), "b".into()],
            prompt_2: Some(vec!["c".into()]),
            progress: false,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(invalid_name(err), "prompt_2");
    // A base UNet told to expect aesthetic scores gets a clear error, not a shape panic.
    let mut wrong = components;
    wrong.requires_aesthetics_score = true;
    let err = StableDiffusionXLImg2ImgPipeline::from_parts(wrong)
        .call(args(None, None))
        .unwrap_err();
    assert_eq!(invalid_name(err), "unet");
}

#[test]
fn half_precision_components_run_close_to_f32() {
    use diffusion_core::burn::tensor::FloatDType;

    let device = Device::flex();
    let sd = load("sd1", &device);
    let run = |c: StableDiffusionComponents| {
        array(
            StableDiffusionPipeline::from_parts(c)
                .call(StableDiffusionArgs {
                    prompt: vec!["a cat".into()],
                    num_inference_steps: 3,
                    generator: Generators::Seed(0),
                    output_type: OutputType::Np,
                    progress: false,
                    ..Default::default()
                })
                .unwrap()
                .images,
        )
        .1
    };
    let full = run(sd.clone());
    let half = run(sd.to_dtype(FloatDType::F16).unwrap());
    let diff = max_abs_diff(&full, &half);
    assert!(half.iter().all(|v| v.is_finite()));
    // Different (the models really ran in f16), but only by half-precision rounding.
    assert!(diff > 0.0 && diff < 0.05, "f16 vs f32: {diff}");
    // `torch_dtype`: loading straight into f16 is the same pipeline as loading and casting.
    let options = diffusion_loaders::HubOptions {
        offline: true,
        dtype: Some(FloatDType::F16),
        ..Default::default()
    };
    let path = dir().join("sd1");
    let direct =
        StableDiffusionComponents::from_pretrained_with(path.to_str().unwrap(), &options, &device)
            .unwrap();
    assert_eq!(run(direct), half, "SD loaded in f16 vs loaded and cast");

    let xl = load_xl("sdxl", &device);
    let run_xl = |c: StableDiffusionXLComponents| {
        array(
            StableDiffusionXLPipeline::from_parts(c)
                .call(StableDiffusionXLArgs {
                    prompt: vec!["a cat".into()],
                    num_inference_steps: 3,
                    generator: Generators::Seed(0),
                    output_type: OutputType::Np,
                    progress: false,
                    ..Default::default()
                })
                .unwrap()
                .images,
        )
        .1
    };
    let full = run_xl(xl.clone());
    let half = run_xl(xl.to_dtype(FloatDType::F16).unwrap());
    let diff = max_abs_diff(&full, &half);
    assert!(diff > 0.0 && diff < 0.05, "SDXL f16 vs f32: {diff}");
    let path = dir().join("sdxl");
    let direct = StableDiffusionXLComponents::from_pretrained_with(
        path.to_str().unwrap(),
        &options,
        &device,
    )
    .unwrap();
    assert_eq!(
        run_xl(direct),
        half,
        "SDXL loaded in f16 vs loaded and cast"
    );
}

#[test]
fn loaders_reject_folders_of_the_other_family() {
    let device = Device::flex();
    let sdxl = dir().join("sdxl");
    let err =
        StableDiffusionComponents::from_pretrained(sdxl.to_str().unwrap(), &device).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, .. } if field == "_class_name"),
        "{err}"
    );
    let sd1 = dir().join("sd1");
    let err =
        StableDiffusionXLComponents::from_pretrained(sd1.to_str().unwrap(), &device).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { field, .. } if field == "_class_name"),
        "{err}"
    );
    // A folder that is not a pipeline.
    let err = StableDiffusionComponents::from_pretrained(
        dir().join("sd1_lcm_unet").to_str().unwrap(),
        &device,
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}
