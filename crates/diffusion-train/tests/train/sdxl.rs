//! SDXL training of the tiny SDXL pipeline against PyTorch/diffusers
//! (fixtures/oracle/gen_train_sdxl.py): preprocessing and `add_time_ids`, both text encoders,
//! VAE latents, `generate_timestep_weights`; full fine-tuning steps (epsilon; v-prediction with
//! Min-SNR and noise offset; the `sample` objective) and LoRA steps (loss, every gradient, every
//! updated parameter, two steps so AdamW's moments count); a LoRA trained for three steps,
//! saved in the layout train_text_to_image_lora_sdxl.py writes, loaded by our SDXL pipeline and
//! used to generate, against diffusers' file and image.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::weights::{SafetensorsFile, WeightSource};
use diffusion_models::{ModelMixin, UNet2DConditionModel, state_dict};
use diffusion_pipelines::{Generators, StableDiffusionXLArgs, StableDiffusionXLPipeline};
use diffusion_schedulers::PredictionType;
use diffusion_train::sdxl::time_ids_for;
use diffusion_train::text_to_image_run::FrozenComponents;
use diffusion_train::{
    CaptionDataset, CaptionDatasetOptions, ImageDraws, Interpolation, LoraTrainConfig,
    LrScheduleKind, NoiseDraws, SdxlConditioning, SdxlTextEncoders, SdxlTrainConfig, SdxlTrainer,
    TextToImageConfig, TimestepBias, TimestepBiasStrategy, UNetLora, load_noise_scheduler,
};
use serde_json::Value;

use crate::{compare_to_fixture as compare, device, fixtures, max_abs_diff, number as f, tensor};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("sdxl")
}

fn sdxl() -> PathBuf {
    fixtures().join("../pipelines/sd/sdxl")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap()
}

fn source() -> WeightSource {
    WeightSource::open(root().join("steps.safetensors")).unwrap()
}

/// The run a case of gen_train_sdxl.py makes.
fn config(hp: &Value, case: &Value) -> SdxlTrainConfig {
    let lora = (case["kind"] == "lora").then(|| LoraTrainConfig {
        rank: f(&hp["rank"]) as usize,
        alpha: Some(f(&hp["lora_alpha"])),
        ..LoraTrainConfig::default()
    });
    let prediction_type = match case["prediction_type"].as_str().unwrap() {
        "v_prediction" => PredictionType::VPrediction,
        "sample" => PredictionType::Sample,
        _ => PredictionType::Epsilon,
    };
    SdxlTrainConfig {
        text_to_image: TextToImageConfig {
            pretrained_model: sdxl(),
            resolution: 32,
            learning_rate: f(&hp["learning_rate"]),
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 0,
            adam_beta1: f(&hp["adam_beta1"]),
            adam_beta2: f(&hp["adam_beta2"]),
            adam_weight_decay: f(&hp["adam_weight_decay"]),
            adam_epsilon: f(&hp["adam_epsilon"]),
            max_grad_norm: Some(f(&hp["max_grad_norm"])),
            prediction_type: Some(prediction_type),
            snr_gamma: case["snr_gamma"].as_f64(),
            noise_offset: f(&case["noise_offset"]),
            lora,
            show_progress: false,
            ..TextToImageConfig::default()
        },
        ..SdxlTrainConfig::default()
    }
}

fn draws(source: &WeightSource, name: &str, step: usize) -> NoiseDraws {
    let dev = device();
    let key = format!("{name}/offset_noise/{step}");
    let (t, _) = source
        .read_f32(&format!("{name}/timesteps/{step}"))
        .unwrap();
    NoiseDraws {
        noise: tensor(source, &format!("{name}/noise/{step}"), &dev),
        offset_noise: source.contains(&key).then(|| tensor(source, &key, &dev)),
        perturbation: None,
        timesteps: t.iter().map(|&v| v as usize).collect(),
    }
}

/// A trainer for case `name`, with the fixture's initial LoRA factors for LoRA cases.
fn trainer(name: &str, source: &WeightSource) -> SdxlTrainer {
    let expected = expected();
    let (hp, case) = (&expected["hyperparameters"], &expected["cases"][name]);
    let config = config(hp, case);
    let unet = UNet2DConditionModel::from_pretrained(sdxl().join("unet"), &device()).unwrap();
    let lora = config.text_to_image.lora.as_ref().map(|l| {
        let mut lora = UNetLora::new(&unet, l, 0, &device()).unwrap();
        let file = SafetensorsFile::open(source.files()[0].path()).unwrap();
        lora.load_factors(&file, &format!("{name}/init/")).unwrap();
        lora
    });
    let steps = case["steps"].as_u64().unwrap() as usize;
    let scheduler = load_noise_scheduler(&sdxl()).unwrap();
    SdxlTrainer::new(&config, unet, lora, scheduler, steps, &device()).unwrap()
}

fn batch(source: &WeightSource) -> (Tensor<4>, SdxlConditioning) {
    let dev = device();
    (
        tensor(source, "latents", &dev),
        SdxlConditioning {
            prompt_embeds: tensor(source, "prompt_embeds", &dev),
            pooled_prompt_embeds: tensor(source, "pooled_prompt_embeds", &dev),
            time_ids: tensor(source, "time_ids", &dev),
        },
    )
}

/// Run case `name`: first-step gradients, every step's loss and norm, the final parameters.
fn check_case(name: &str) -> f32 {
    check_case_on(name, 0)
}

/// Case `name` on one device (`devices` 0) or data-parallel over `devices` CPU handles.
fn check_case_on(name: &str, devices: usize) -> f32 {
    let expected = expected();
    let source = source();
    let case = &expected["cases"][name];
    let results = &expected["results"][name];
    let mut trainer = trainer(name, &source);
    let (latents, cond) = batch(&source);

    let loss = trainer
        .loss(latents.clone(), &cond, &draws(&source, name, 0))
        .unwrap();
    let grads = trainer.trainer().gradients(loss);
    let named = match trainer.trainer().lora() {
        Some(lora) => lora.gradient_state_dict(&grads),
        None => grads.state_dict(trainer.trainer().unet()),
    };
    let (key, grad_diff) = compare(&named, &source, &format!("{name}/grad0"));
    eprintln!("{name}: worst gradient difference {grad_diff:e} (`{key}`)");
    assert!(
        grad_diff <= TOL,
        "{name}: gradient of `{key}` differs by {grad_diff}"
    );

    let mut worst = grad_diff;
    let mut parallel =
        (devices > 0).then(|| trainer.data_parallel(vec![device(); devices]).unwrap());
    for step in 0..case["steps"].as_u64().unwrap() as usize {
        let d = draws(&source, name, step);
        let stats = match &mut parallel {
            Some(p) => trainer.step_data_parallel(p, latents.clone(), &cond, &d),
            None => trainer.step(latents.clone(), &cond, &d),
        }
        .unwrap()
        .expect("no accumulation: every micro-batch is a step");
        let want = f(&results["losses"][step]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        eprintln!(
            "{name} step {step}: loss {} (diffusers {want}, diff {d:e})",
            stats.loss
        );
        assert!(
            d <= TOL,
            "{name} step {step}: loss {} vs {want}",
            stats.loss
        );
        let want = f(&results["grad_norms"][step]);
        let d = (f64::from(stats.grad_norm) - want).abs() as f32;
        assert!(
            d <= TOL,
            "{name} step {step}: grad norm {} vs {want}",
            stats.grad_norm
        );
        worst = worst.max(d);
    }
    let params = match trainer.trainer().lora() {
        Some(lora) => lora.state_dict(),
        None => state_dict(trainer.trainer().unet()),
    };
    let (key, diff) = compare(&params, &source, &format!("{name}/param"));
    eprintln!("{name}: worst parameter difference after the steps {diff:e} (`{key}`)");
    assert!(diff <= TOL, "{name}: `{key}` differs by {diff}");
    worst.max(diff)
}

#[test]
fn sdxl_preprocessing_time_ids_prompts_and_latents_match_diffusers() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = source();
    let data = CaptionDataset::from_folder(
        root().join("data"),
        CaptionDatasetOptions {
            resolution: 32,
            center_crop: false,
            random_flip: true,
            interpolation: Interpolation::Lanczos,
            caption_column: "text".into(),
        },
    )
    .unwrap();
    assert_eq!(data.len(), 2);
    // The fixture crops at (top, left) of the flipped image; the dataset crops the unflipped
    // image and flips, so image 1's window is mirrored: left = resized_w - 32 - x1.
    let mut draws = Vec::new();
    let mut time_ids = Vec::new();
    for i in 0..2 {
        let flip = hp["flips"][i].as_bool().unwrap();
        let top = hp["crops"][i][0].as_u64().unwrap() as usize;
        let x1 = hp["crops"][i][1].as_u64().unwrap() as usize;
        let probe = data
            .crop_geometry(
                i,
                &ImageDraws {
                    crop: [0.0; 2],
                    flip,
                },
            )
            .unwrap();
        let (rw, rh) = probe.resized_size;
        let left = if flip { rw - 32 - x1 } else { x1 };
        // Uniform draws that land on exactly these offsets (floor(u * (dim - 31))).
        let u = |offset: usize, dim: usize| (offset as f32 + 0.5) / (dim - 31) as f32;
        let d = ImageDraws {
            crop: [u(left, rw), u(top, rh)],
            flip,
        };
        let geometry = data.crop_geometry(i, &d).unwrap();
        assert_eq!(geometry.crop_origin, (left, top));
        time_ids.push(time_ids_for(&geometry, flip, 32));
        draws.push(d);
    }
    let (want, shape) = source.read_f32("time_ids").unwrap();
    assert_eq!(shape, [2, 6]);
    assert_eq!(time_ids.concat(), want, "add_time_ids");

    let pixels = data.pixel_values(&[0, 1], &draws).unwrap();
    let (want, shape) = source.read_f32("pixel_values").unwrap();
    assert_eq!(shape, [2, 3, 32, 32]);
    let diff = max_abs_diff(&pixels, &want);
    eprintln!("pixel_values: {diff:e}");
    assert!(diff <= 1e-6, "pixel values differ by {diff}");

    let encoders = SdxlTextEncoders::load(&sdxl(), &device()).unwrap();
    let captions: Vec<&str> = hp["batch_captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let (embeds, pooled) = encoders.encode_prompt(&captions).unwrap();
    for (ours, key) in [
        (diffusion_core::tensor::to_vec(embeds), "prompt_embeds"),
        (
            diffusion_core::tensor::to_vec(pooled),
            "pooled_prompt_embeds",
        ),
    ] {
        let diff = max_abs_diff(&ours, &source.read_f32(key).unwrap().0);
        eprintln!("{key}: {diff:e}");
        assert!(diff <= TOL, "{key} differs by {diff}");
    }

    let frozen = FrozenComponents::load(&sdxl(), &device()).unwrap();
    let x = Tensor::<4>::from_data(TensorData::new(pixels, [2, 3, 32, 32]), &device());
    let dist = frozen.vae.encode(x).unwrap();
    let eps: Tensor<4> = tensor(&source, "posterior_noise", &device());
    let latents = dist
        .mean
        .add(dist.std.mul(eps))
        .mul_scalar(frozen.vae.config().scaling_factor);
    let diff = max_abs_diff(
        &diffusion_core::tensor::to_vec(latents),
        &source.read_f32("latents").unwrap().0,
    );
    eprintln!("latents: {diff:e}");
    assert!(diff <= TOL, "latents differ by {diff}");
}

#[test]
fn timestep_bias_weights_match_the_script() {
    let expected = expected();
    let tb = &expected["hyperparameters"]["timestep_bias"];
    let source = source();
    for (strategy, multiplier) in [
        (TimestepBiasStrategy::Later, f(&tb["multiplier"])),
        (TimestepBiasStrategy::Earlier, f(&tb["multiplier"])),
        (TimestepBiasStrategy::Range, f(&tb["range_multiplier"])),
    ] {
        let bias = TimestepBias {
            strategy,
            multiplier,
            begin: tb["begin"].as_u64().unwrap() as usize,
            end: tb["end"].as_u64().unwrap() as usize,
            portion: f(&tb["portion"]),
        };
        let ours = bias.weights(1000).unwrap();
        let key = format!(
            "timestep_weights/{}",
            serde_json::to_value(strategy).unwrap().as_str().unwrap()
        );
        let diff = max_abs_diff(&ours, &source.read_f32(&key).unwrap().0);
        assert!(diff <= 1e-9, "{key}: {diff}");
        // Draws land where the weight is: the biased quarter holds 2/5 of the mass.
        let uniforms: Vec<f32> = (0..1000).map(|i| (i as f32 + 0.5) / 1000.0).collect();
        let drawn = bias.sample(1000, &uniforms).unwrap();
        assert!(drawn.iter().all(|&t| t < 1000));
        if strategy == TimestepBiasStrategy::Later {
            let late = drawn.iter().filter(|&&t| t >= 750).count();
            assert!((395..=405).contains(&late), "{late} of 1000 draws late");
        }
    }
    let bad = TimestepBias {
        strategy: TimestepBiasStrategy::Range,
        end: 1001,
        ..TimestepBias::default()
    };
    let err = bad.weights(1000).unwrap_err().to_string();
    assert!(err.contains("timestep_bias_end"), "{err}");
}

#[test]
fn sdxl_options_the_scripts_lack_are_refused() {
    let mut config = SdxlTrainConfig::lora_defaults();
    config.text_to_image.pretrained_model = sdxl();
    config.proportion_empty_prompts = 0.2;
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("proportion_empty_prompts"), "{err}");
    config.proportion_empty_prompts = 0.0;
    config.text_to_image.prediction_type = Some(PredictionType::Sample);
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("prediction_type"), "{err}");
    let mut full = SdxlTrainConfig::default();
    full.text_to_image.input_perturbation = 0.1;
    let err = full.validate().unwrap_err().to_string();
    assert!(err.contains("input_perturbation"), "{err}");
}

#[test]
fn sdxl_full_fine_tuning_epsilon_matches_diffusers() {
    check_case("full_epsilon");
}

#[test]
fn sdxl_full_fine_tuning_v_prediction_min_snr_offset_matches_diffusers() {
    check_case("full_v_snr");
}

#[test]
fn sdxl_full_fine_tuning_sample_objective_matches_diffusers() {
    check_case("full_sample_snr");
}

#[test]
fn sdxl_lora_steps_match_diffusers() {
    check_case("lora_v_snr");
}

/// Full fine-tuning (v-prediction, Min-SNR, noise offset) and a LoRA over two devices, one
/// image each (latents, prompt embeddings, pooled embeddings and time ids sharded together),
/// against diffusers' single-process steps.
#[test]
fn sdxl_steps_over_two_devices_match_diffusers() {
    check_case_on("full_v_snr", 2);
    check_case_on("lora_v_snr", 2);
}

#[test]
fn sdxl_trained_lora_file_and_image_match_diffusers() {
    let name = "lora_trained";
    check_case(name);
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = source();
    let mut trainer = trainer(name, &source);
    let (latents, cond) = batch(&source);
    for step in 0..3 {
        trainer
            .step(latents.clone(), &cond, &draws(&source, name, step))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    trainer.trainer().lora().unwrap().save(dir.path()).unwrap();
    let ours = SafetensorsFile::open(dir.path().join("pytorch_lora_weights.safetensors")).unwrap();
    let theirs =
        SafetensorsFile::open(root().join("lora_trained/pytorch_lora_weights.safetensors"))
            .unwrap();
    let layout = |file: &SafetensorsFile| -> BTreeMap<String, Vec<usize>> {
        file.keys()
            .into_iter()
            .map(|k| {
                let shape = file.entry(&k).unwrap().shape.clone();
                (k, shape)
            })
            .collect()
    };
    assert_eq!(layout(&ours), layout(&theirs), "keys or shapes differ");
    assert_eq!(
        ours.user_metadata(),
        theirs.user_metadata(),
        "metadata differs"
    );
    let mut worst = 0.0f32;
    for key in theirs.keys() {
        let diff = max_abs_diff(
            &ours.read_f32(&key).unwrap().0,
            &theirs.read_f32(&key).unwrap().0,
        );
        worst = worst.max(diff);
    }
    eprintln!("saved LoRA factors: worst difference {worst:e}");
    assert!(worst <= TOL, "saved factors differ by {worst}");

    // Our file, through our loader, in a fresh SDXL pipeline, against diffusers' generation.
    let mut pipe =
        StableDiffusionXLPipeline::from_pretrained(sdxl().to_str().unwrap(), &device()).unwrap();
    let report = pipe
        .components
        .load_lora_weights(dir.path(), "trained")
        .unwrap();
    assert_eq!(
        report.matched_modules.len(),
        trainer.trainer().lora().unwrap().modules().len()
    );
    let out = pipe
        .call(StableDiffusionXLArgs {
            prompt: vec![hp["prompt"].as_str().unwrap().to_string()],
            height: Some(32),
            width: Some(32),
            num_inference_steps: hp["num_inference_steps"].as_u64().unwrap() as usize,
            generator: Generators::Seed(hp["generation_seed"].as_u64().unwrap()),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    let ImageOutput::Array(images) = out.images else {
        panic!("expected an array");
    };
    let want = SafetensorsFile::open(root().join("lora_trained/image.safetensors"))
        .unwrap()
        .read_f32("image")
        .unwrap()
        .0;
    let diff = max_abs_diff(&images.data, &want);
    eprintln!("SDXL generation with the trained LoRA: max |diff| {diff:e}");
    assert!(diff <= 1e-3, "image differs by {diff}");
}
