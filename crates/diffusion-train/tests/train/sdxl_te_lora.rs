//! SDXL LoRA with LoRAs of both text encoders on the tiny SDXL pipeline against
//! train_text_to_image_lora_sdxl.py `--train_text_encoder`
//! (fixtures/oracle/gen_train_sdxl_te_lora.py): the prompt ids of both tokenizers, the loss
//! through both adapted encoders, every first-step gradient of the three LoRAs, three clipped
//! AdamW steps over all of them, every updated factor; the saved file against diffusers'
//! `save_lora_weights` output, and a generation with our file loaded by our SDXL pipeline against
//! diffusers' generation with its file. Then the training loop: exact resumption from a
//! checkpoint, and validation images made with the trained text encoders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use diffusion_core::burn::tensor::{DType, Int, Tensor};
use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::weights::{NamedTensor, SafetensorsFile, WeightSource};
use diffusion_models::{
    AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, ModelMixin, UNet2DConditionModel,
    state_dict,
};
use diffusion_pipelines::{Generators, StableDiffusionXLArgs, StableDiffusionXLPipeline};
use diffusion_schedulers::AnyScheduler;
use diffusion_train::sdxl_text_lora::text_encoder_lora_config;
use diffusion_train::validation::{
    SdxlFrozenParts, ValidationPoint, save_sdxl_prompt_validation, validation_path,
};
use diffusion_train::{
    GradScaler, GradScalerConfig, LoraComponent, LoraTrainConfig, LrScheduleKind, MixedPrecision,
    NoiseDraws, PromptValidationConfig, SdxlTextEncoders, SdxlTrainConfig, SdxlTrainer,
    TextToImageConfig, TrainReport, UNetLora, load_noise_scheduler, train_text_to_image_sdxl,
};
use serde_json::Value;

use crate::{
    compare_to_fixture as worst, device, fixtures, max_abs_diff, number as f, read, tensor,
};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("sdxl_te_lora")
}

fn sdxl() -> PathBuf {
    fixtures().join("../pipelines/sd/sdxl")
}

/// The int64 tensor `key` of the fixture.
fn fixture_ids(key: &str) -> Vec<i64> {
    let file = SafetensorsFile::open(root().join("steps.safetensors")).unwrap();
    let (_, bytes) = file.read_bytes(key).unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn layout(file: &SafetensorsFile) -> BTreeMap<String, Vec<usize>> {
    file.keys()
        .into_iter()
        .map(|k| {
            let shape = file.entry(&k).unwrap().shape.clone();
            (k, shape)
        })
        .collect()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap()
}

/// What the oracle's steps run on: the trainer (with the fixture's initial factors), the prompt
/// ids of both tokenizers (checked against the script's), the `add_time_ids` rows, the latents.
struct Setup {
    trainer: SdxlTrainer,
    ids_one: Tensor<2, Int>,
    ids_two: Tensor<2, Int>,
    time_ids: Vec<[f32; 6]>,
    latents: Tensor<4>,
}

fn setup(mixed_precision: MixedPrecision) -> Setup {
    setup_with(mixed_precision, false)
}

fn setup_with(mixed_precision: MixedPrecision, gradient_checkpointing: bool) -> Setup {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let file = SafetensorsFile::open(root().join("steps.safetensors")).unwrap();
    let dev = device();
    let config = SdxlTrainConfig {
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
            lora: Some(LoraTrainConfig {
                rank: f(&hp["rank"]) as usize,
                alpha: Some(f(&hp["lora_alpha"])),
                ..LoraTrainConfig::default()
            }),
            mixed_precision: mixed_precision.as_str().into(),
            gradient_checkpointing,
            show_progress: false,
            ..SdxlTrainConfig::lora_defaults().text_to_image
        },
        train_text_encoder: true,
        ..SdxlTrainConfig::lora_defaults()
    };

    // The prompt ids of both tokenizers, as the script's collate_fn stacks them.
    let text = SdxlTextEncoders::load(&sdxl(), &dev).unwrap();
    let captions: Vec<&str> = hp["batch_captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let (ids_one, ids_two) = text.input_ids(&captions, &dev).unwrap();
    for (ids, key) in [(&ids_one, "input_ids_one"), (&ids_two, "input_ids_two")] {
        let got: Vec<i64> = ids.clone().into_data().iter::<i64>().collect();
        assert_eq!(got, fixture_ids(key), "{key} differ");
    }
    let (flat, _) = source.read_f32("time_ids").unwrap();
    let time_ids: Vec<[f32; 6]> = flat
        .chunks_exact(6)
        .map(|c| c.try_into().unwrap())
        .collect();

    let lora_config = config.text_to_image.lora.clone().unwrap();
    let te_config = text_encoder_lora_config(&lora_config);
    let unet = UNet2DConditionModel::from_pretrained(sdxl().join("unet"), &dev).unwrap();
    let one = CLIPTextModel::from_pretrained(sdxl().join("text_encoder"), &dev).unwrap();
    let two =
        CLIPTextModelWithProjection::from_pretrained(sdxl().join("text_encoder_2"), &dev).unwrap();
    let mut unet_lora = UNetLora::new(&unet, &lora_config, 0, &dev).unwrap();
    unet_lora.load_factors(&file, "unet_init/").unwrap();
    let mut lora = UNetLora::new_text_encoder(&one, &te_config, 0, &dev).unwrap();
    lora.load_factors(&file, "te1_init/").unwrap();
    let mut lora_2 = UNetLora::new_text_encoder_2(&two, &te_config, 0, &dev).unwrap();
    assert_eq!(lora_2.component(), LoraComponent::TextEncoder2);
    assert_eq!(lora_2.modules().len(), 8, "2 layers x q, k, v, out");
    lora_2.load_factors(&file, "te2_init/").unwrap();
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let trainer = SdxlTrainer::with_text_encoders(
        &config,
        unet,
        unet_lora,
        one,
        lora,
        two,
        lora_2,
        load_noise_scheduler(&sdxl()).unwrap(),
        steps,
        &dev,
    )
    .unwrap();
    Setup {
        trainer,
        ids_one,
        ids_two,
        time_ids,
        latents: tensor::<4>(&source, "latents", &dev),
    }
}

/// The fixture's noise and timesteps of step `s`.
fn draws(source: &WeightSource, s: usize) -> NoiseDraws {
    let (t, _) = source.read_f32(&format!("timesteps/{s}")).unwrap();
    NoiseDraws {
        noise: tensor(source, &format!("noise/{s}"), &device()),
        offset_noise: None,
        perturbation: None,
        timesteps: t.iter().map(|&v| v as usize).collect(),
    }
}

/// The three LoRAs over two devices (each device runs both adapted encoders on its rows'
/// prompt ids) against diffusers' single-process steps.
#[test]
fn sdxl_text_encoder_lora_steps_over_two_devices_match_diffusers() {
    let expected = expected();
    let results = &expected["results"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let Setup {
        mut trainer,
        ids_one,
        ids_two,
        time_ids,
        latents,
    } = setup(MixedPrecision::No);
    assert_eq!(latents.dims()[0], 2, "one image per device");
    let mut parallel = trainer.data_parallel(vec![device(); 2]).unwrap();
    assert!(matches!(
        parallel,
        diffusion_train::SdxlParallel::TextEncoders { .. }
    ));
    let steps = expected["hyperparameters"]["steps"].as_u64().unwrap() as usize;
    for s in 0..steps {
        let stats = trainer
            .step_data_parallel_with_ids(
                &mut parallel,
                latents.clone(),
                ids_one.clone(),
                ids_two.clone(),
                &time_ids,
                &draws(&source, s),
            )
            .unwrap()
            .expect("no accumulation");
        let d = (f64::from(stats.loss) - f(&results["losses"][s])).abs() as f32;
        let dn = (f64::from(stats.grad_norm) - f(&results["grad_norms"][s])).abs() as f32;
        eprintln!("sdxl_te_lora on 2 devices, step {s}: loss diff {d:e}, grad norm diff {dn:e}");
        assert!(d <= TOL && dn <= TOL, "step {s}: {stats:?}");
    }
    let [te1, te2] = trainer.text_encoder_loras().unwrap();
    let params = [
        trainer.trainer().lora().unwrap().state_dict(),
        te1.state_dict(),
        te2.state_dict(),
    ];
    for (named, prefix) in params.iter().zip(["unet_param", "te1_param", "te2_param"]) {
        let (key, d) = worst(named, &source, prefix);
        eprintln!("sdxl_te_lora on 2 devices: worst {prefix} difference {d:e} (`{key}`)");
        assert!(d <= TOL, "{prefix}: `{key}` differs by {d}");
    }
}

#[test]
fn sdxl_text_encoder_lora_steps_file_and_image_match_diffusers() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let results = &expected["results"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let dev = device();
    let Setup {
        mut trainer,
        ids_one,
        ids_two,
        time_ids,
        latents,
    } = setup(MixedPrecision::No);
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let draws = |s: usize| draws(&source, s);

    let loss = trainer
        .loss_with_ids(
            latents.clone(),
            ids_one.clone(),
            ids_two.clone(),
            &time_ids,
            &draws(0),
        )
        .unwrap();
    let grads = trainer.gradients(loss);
    // Text encoder one's last layer gets no gradient (only `hidden_states[-2]` is used).
    let missing = grads.tensors().iter().filter(|g| g.is_none()).count();
    let no_grad = results["no_gradient"].as_array().unwrap().len();
    assert_eq!(missing, no_grad, "factors without a gradient");
    let sides = trainer.lora_gradient_state_dicts(&grads).unwrap();
    let mut max_err = 0.0f32;
    for (named, prefix) in sides.iter().zip(["unet_grad0", "te1_grad0", "te2_grad0"]) {
        let (key, d) = worst(named, &source, prefix);
        eprintln!("sdxl_te_lora: worst {prefix} difference {d:e} (`{key}`)");
        assert!(d <= TOL, "{prefix}: gradient of `{key}` differs by {d}");
        max_err = max_err.max(d);
    }
    for s in 0..steps {
        let stats = trainer
            .step_with_ids(
                latents.clone(),
                ids_one.clone(),
                ids_two.clone(),
                &time_ids,
                &draws(s),
            )
            .unwrap()
            .expect("no accumulation: every micro-batch is a step");
        let want = f(&results["losses"][s]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        eprintln!("sdxl_te_lora step {s}: loss {} (diff {d:e})", stats.loss);
        assert!(d <= TOL, "step {s}: loss {} vs {want}", stats.loss);
        let want = f(&results["grad_norms"][s]);
        let dn = (f64::from(stats.grad_norm) - want).abs() as f32;
        assert!(
            dn <= TOL,
            "step {s}: grad norm {} vs {want}",
            stats.grad_norm
        );
        max_err = max_err.max(d).max(dn);
    }
    let [te1, te2] = trainer.text_encoder_loras().unwrap();
    let params = [
        trainer.trainer().lora().unwrap().state_dict(),
        te1.state_dict(),
        te2.state_dict(),
    ];
    for (named, prefix) in params.iter().zip(["unet_param", "te1_param", "te2_param"]) {
        let (key, d) = worst(named, &source, prefix);
        eprintln!("sdxl_te_lora: worst {prefix} difference after the steps {d:e} (`{key}`)");
        assert!(d <= TOL, "{prefix}: `{key}` differs by {d}");
        max_err = max_err.max(d);
    }
    eprintln!("sdxl_te_lora: worst step difference {max_err:e}");

    // The saved file: diffusers' keys, shapes and metadata, the trained values.
    let dir = tempfile::tempdir().unwrap();
    trainer.save_lora_weights(dir.path()).unwrap();
    let ours = SafetensorsFile::open(dir.path().join("pytorch_lora_weights.safetensors")).unwrap();
    let theirs =
        SafetensorsFile::open(root().join("trained/pytorch_lora_weights.safetensors")).unwrap();
    assert_eq!(layout(&ours), layout(&theirs), "keys or shapes differ");
    assert_eq!(ours.user_metadata(), theirs.user_metadata(), "metadata");
    let mut worst_file = 0.0f32;
    for key in theirs.keys() {
        let d = max_abs_diff(
            &ours.read_f32(&key).unwrap().0,
            &theirs.read_f32(&key).unwrap().0,
        );
        worst_file = worst_file.max(d);
    }
    eprintln!("sdxl_te_lora: saved factors, worst difference {worst_file:e}");
    assert!(worst_file <= TOL, "saved factors differ by {worst_file}");

    // Our file through our loader in a fresh SDXL pipeline, against diffusers' generation.
    let mut pipe =
        StableDiffusionXLPipeline::from_pretrained(sdxl().to_str().unwrap(), &dev).unwrap();
    let report = pipe
        .components
        .load_lora_weights(dir.path(), "trained")
        .unwrap();
    let unet_modules = trainer.trainer().lora().unwrap().modules().len();
    assert_eq!(
        report.matched_modules.len(),
        unet_modules + 8 + 8,
        "UNet and both text encoders' modules"
    );
    let out = pipe
        .call(StableDiffusionXLArgs {
            prompt: vec![hp["prompt"].as_str().unwrap().to_string()],
            height: Some(32),
            width: Some(32),
            num_inference_steps: hp["num_inference_steps"].as_u64().unwrap() as usize,
            latents: Some(tensor(&source, "generation_latents", &dev)),
            generator: Generators::Seed(0),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    let ImageOutput::Array(images) = out.images else {
        panic!("expected an array");
    };
    let want = SafetensorsFile::open(root().join("trained/image.safetensors"))
        .unwrap()
        .read_f32("image")
        .unwrap()
        .0;
    let diff = max_abs_diff(&images.data, &want);
    eprintln!("sdxl_te_lora: generation with the trained LoRAs, max |diff| {diff:e}");
    assert!(diff <= 1e-3, "image differs by {diff}");
}

/// A `train_text_encoder` run of the loop: 2 images, batches of 1, 2 micro-batches a step,
/// 3 steps, a checkpoint at step 2.
fn loop_config(out: &Path, validation: PromptValidationConfig) -> SdxlTrainConfig {
    SdxlTrainConfig {
        text_to_image: TextToImageConfig {
            pretrained_model: sdxl(),
            train_data_dir: fixtures().join("sdxl/data"),
            output_dir: out.to_path_buf(),
            resolution: 32,
            train_batch_size: 1,
            gradient_accumulation_steps: 2,
            max_train_steps: Some(3),
            learning_rate: 1e-2,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 0,
            checkpointing_steps: 2,
            random_flip: true,
            show_progress: false,
            validation,
            ..SdxlTrainConfig::lora_defaults().text_to_image
        },
        train_text_encoder: true,
        ..SdxlTrainConfig::lora_defaults()
    }
}

/// The loop trains all three LoRAs, saves them in one file, resumes from its step-2 checkpoint
/// to the same bytes (without validation images, which therefore change nothing), and its
/// last validation grid is made with the trained text encoders.
#[test]
fn sdxl_text_encoder_lora_loop_resumes_exactly_and_validates_with_the_text_loras() {
    let dev = device();
    let validation = PromptValidationConfig {
        validation_prompts: vec!["a red square".into()],
        num_validation_images: 1,
        validation_steps: Some(3),
        num_inference_steps: 2,
        seed: Some(7),
        ..PromptValidationConfig::default()
    };
    let straight = tempfile::tempdir().unwrap();
    let config = loop_config(straight.path(), validation);
    let report = train_text_to_image_sdxl(&config, &dev).unwrap();
    assert_eq!(report.steps.len(), 3);
    let weights = "pytorch_lora_weights.safetensors";
    let file = SafetensorsFile::open(straight.path().join(weights)).unwrap();
    let prefixes = ["unet.", "text_encoder.", "text_encoder_2."];
    for p in prefixes {
        // `text_encoder.` is also a prefix of `text_encoder_2.` keys: count exact components.
        let n = file
            .keys()
            .iter()
            .filter(|k| {
                k.starts_with(p) && !(p == "text_encoder." && k.starts_with("text_encoder_2."))
            })
            .count();
        assert!(n > 0, "no `{p}` factors in the saved file");
    }
    // Every text-encoder factor except text encoder one's unused last layer moved away from
    // its initial value (up matrices start at zero).
    let moved = file
        .keys()
        .iter()
        .filter(|k| k.starts_with("text_encoder") && k.contains(".up."))
        .filter(|k| file.read_f32(k).unwrap().0.iter().any(|&v| v != 0.0))
        .count();
    assert_eq!(moved, 4 + 8, "trained up matrices of the text encoders");

    check_resume(straight.path(), &report, MixedPrecision::No);

    // The step-3 grid: the UNet and both text encoders with the saved LoRAs merged.
    let lora_config = config.text_to_image.lora.clone().unwrap();
    let te_config = text_encoder_lora_config(&lora_config);
    let unet = UNet2DConditionModel::from_pretrained(sdxl().join("unet"), &dev).unwrap();
    let mut unet_lora = UNetLora::new(&unet, &lora_config, 0, &dev).unwrap();
    unet_lora.load_factors(&file, "unet.").unwrap();
    let text = SdxlTextEncoders::load(&sdxl(), &dev).unwrap();
    let mut lora = UNetLora::new_text_encoder(&text.text_encoder, &te_config, 0, &dev).unwrap();
    lora.load_factors(&file, "text_encoder.").unwrap();
    let mut lora_2 =
        UNetLora::new_text_encoder_2(&text.text_encoder_2, &te_config, 0, &dev).unwrap();
    lora_2.load_factors(&file, "text_encoder_2.").unwrap();
    let vae = AutoencoderKL::from_pretrained(sdxl().join("vae"), &dev).unwrap();
    let scheduler = AnyScheduler::from_config_file(sdxl().join("scheduler")).unwrap();
    let at = ValidationPoint { step: 3, epoch: 2 };
    let make = |one: &CLIPTextModel, two: &CLIPTextModelWithProjection, out: &Path| {
        let parts = SdxlFrozenParts {
            tokenizer: &text.tokenizer,
            tokenizer_2: &text.tokenizer_2,
            text_encoder: one,
            text_encoder_2: two,
            vae: &vae,
            scheduler: &scheduler,
            force_zeros_for_empty_prompt: true,
        };
        let unet = unet_lora.apply(&unet);
        read(
            &save_sdxl_prompt_validation(unet, parts, &config.text_to_image.validation, 0, out, at)
                .unwrap(),
        )
    };
    let grid = read(&validation_path(straight.path(), 3));
    let both = tempfile::tempdir().unwrap();
    let one = lora.apply_to(&text.text_encoder);
    let two = lora_2.apply_to(&text.text_encoder_2);
    assert_eq!(make(&one, &two, both.path()), grid, "validation grid");
    let unet_only = tempfile::tempdir().unwrap();
    assert_ne!(
        make(&text.text_encoder, &text.text_encoder_2, unet_only.path()),
        grid,
        "the grid ignores the text-encoder LoRAs"
    );
}

/// Finish a run from a copy of `straight`'s step-2 checkpoint in a fresh folder (without
/// validation images): the step-3 loss and the LoRA file of the straight run, to the bit.
fn check_resume(straight: &Path, report: &TrainReport, mp: MixedPrecision) {
    let resumed = tempfile::tempdir().unwrap();
    let checkpoint = straight.join("checkpoint-2");
    let target = resumed.path().join("checkpoint-2");
    for entry in walk(&checkpoint) {
        let rel = entry.strip_prefix(&checkpoint).unwrap();
        std::fs::create_dir_all(target.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&entry, target.join(rel)).unwrap();
    }
    let mut again = loop_config(resumed.path(), PromptValidationConfig::default());
    again.text_to_image.mixed_precision = mp.as_str().into();
    again.text_to_image.resume_from_checkpoint = Some("latest".into());
    let report_again = train_text_to_image_sdxl(&again, &device()).unwrap();
    assert_eq!(report_again.start_step, 2);
    assert_eq!(report_again.steps[0].loss, report.steps[2].loss, "{mp:?}");
    let weights = "pytorch_lora_weights.safetensors";
    assert_eq!(
        read(&resumed.path().join(weights)),
        read(&straight.join(weights)),
        "{mp:?}: the resumed run's LoRA file differs"
    );
}

/// An fp16 `train_text_encoder` run with a validation grid keeps its loss scale in its
/// checkpoints and resumes from them exactly (without validation).
#[test]
fn sdxl_text_encoder_lora_fp16_loop_resumes_exactly() {
    let straight = tempfile::tempdir().unwrap();
    let validation = PromptValidationConfig {
        validation_prompts: vec!["a red square".into()],
        num_validation_images: 1,
        validation_steps: Some(3),
        num_inference_steps: 2,
        ..PromptValidationConfig::default()
    };
    let mut config = loop_config(straight.path(), validation);
    config.text_to_image.mixed_precision = "fp16".into();
    let report = train_text_to_image_sdxl(&config, &device()).unwrap();
    assert_eq!(report.steps.len(), 3);
    assert!(report.steps.iter().all(|s| s.loss.is_finite()));
    assert!(
        straight
            .path()
            .join("checkpoint-2/mixed_precision.json")
            .is_file()
    );
    assert!(validation_path(straight.path(), 3).is_file());
    check_resume(straight.path(), &report, MixedPrecision::Fp16);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
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

#[test]
fn sdxl_text_encoder_training_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let base = loop_config(dir.path(), PromptValidationConfig::default());
    type Change = fn(&mut SdxlTrainConfig);
    let cases: [(&str, Change); 2] = [
        ("train_text_encoder", |c| c.text_to_image.lora = None),
        ("cache_latents", |c| c.text_to_image.cache_latents = true),
    ];
    for (name, change) in cases {
        let mut c = base.clone();
        change(&mut c);
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
        // Refused before anything is loaded or written.
        let err = train_text_to_image_sdxl(&c, &device()).unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
    assert!(!dir.path().join("logs").exists());
    // A plain SdxlTrainer refuses a train_text_encoder config.
    let dev = device();
    let unet = UNet2DConditionModel::from_pretrained(sdxl().join("unet"), &dev).unwrap();
    let lora = UNetLora::new(&unet, base.text_to_image.lora.as_ref().unwrap(), 0, &dev).unwrap();
    let scheduler = load_noise_scheduler(&sdxl()).unwrap();
    let err = SdxlTrainer::new(&base, unet, Some(lora), scheduler, 3, &dev).unwrap_err();
    assert!(err.to_string().contains("train_text_encoder"), "{err}");
}

/// bf16 and fp16: the loss and the gradients of all three LoRAs within the dtype-derived
/// tolerance of the f32 ones (see mixed_precision.rs), f32 masters that a step moves, and a
/// forced fp16 overflow skipped without touching any factor.
#[test]
fn sdxl_text_encoder_lora_half_precision_stays_close_to_f32() {
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let loss_and_grads = |s: &Setup| {
        let loss = s
            .trainer
            .loss_with_ids(
                s.latents.clone(),
                s.ids_one.clone(),
                s.ids_two.clone(),
                &s.time_ids,
                &draws(&source, 0),
            )
            .unwrap();
        assert_eq!(loss.dtype(), DType::F32, "the loss is computed in f32");
        let value = loss.clone().inner().into_scalar::<f32>();
        let grads = s.trainer.gradients(loss);
        let flat: Vec<f32> = grads
            .tensors()
            .iter()
            .flatten()
            .flat_map(|g| {
                assert_eq!(g.dtype(), DType::F32, "gradients reach the f32 masters");
                diffusion_core::tensor::to_vec(g.clone())
            })
            .collect();
        (value, flat)
    };
    let factors = |s: &Setup| {
        let [one, two] = s.trainer.text_encoder_loras().unwrap();
        let mut all = s.trainer.trainer().lora().unwrap().state_dict();
        all.extend(one.state_dict());
        all.extend(two.state_dict());
        all
    };
    let reference = setup(MixedPrecision::No);
    let (loss32, grads32) = loss_and_grads(&reference);
    // Conv and linear weights on the deepest path: text encoder 2, then the UNet.
    let weight_layers =
        |tensors: Vec<NamedTensor>| tensors.iter().filter(|t| t.shape.len() >= 2).count();
    let two =
        CLIPTextModelWithProjection::from_pretrained(sdxl().join("text_encoder_2"), &device())
            .unwrap();
    let layers = weight_layers(state_dict(reference.trainer.trainer().unet()))
        + weight_layers(state_dict(&two));
    for mp in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
        let mut s = setup(mp);
        let (loss, grads) = loss_and_grads(&s);
        let (loss_tol, grad_tol) = crate::mixed_precision::half_tolerances(mp, layers);
        let loss_rel = (f64::from(loss) - f64::from(loss32)).abs() / f64::from(loss32);
        let num: f64 = grads
            .iter()
            .zip(&grads32)
            .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
            .sum();
        let den: f64 = grads32.iter().map(|y| f64::from(*y).powi(2)).sum();
        let grad_rel = (num / den).sqrt();
        eprintln!(
            "sdxl_te_lora {mp:?}: {layers} layers; loss rel diff {loss_rel:.3e} (tol \
             {loss_tol:.3e}), gradient rel L2 diff {grad_rel:.3e} (tol {grad_tol:.3e})"
        );
        assert!(loss_rel <= loss_tol, "{mp:?}: loss {loss} vs {loss32}");
        assert!(
            grad_rel <= grad_tol,
            "{mp:?}: gradients differ by {grad_rel}"
        );
        let before = factors(&s);
        s.trainer
            .step_with_ids(
                s.latents.clone(),
                s.ids_one.clone(),
                s.ids_two.clone(),
                &s.time_ids,
                &draws(&source, 0),
            )
            .unwrap()
            .unwrap();
        assert!(!s.trainer.trainer().last_step_skipped(), "{mp:?}");
        let after = factors(&s);
        assert_eq!(after.len(), before.len());
        let moved = after
            .iter()
            .zip(&before)
            .filter(|(a, b)| a.values != b.values)
            .count();
        // All but text encoder one's last layer (8 factors without a gradient).
        assert_eq!(moved, after.len() - 8, "{mp:?}: factors that moved");
        let dtypes =
            diffusion_train::mixed_precision::param_dtypes(&s.trainer.lora_factors().unwrap());
        assert!(
            dtypes.iter().all(|d| *d == DType::F32),
            "{mp:?}: {dtypes:?}"
        );
    }
    let mut s = setup(MixedPrecision::Fp16);
    s.trainer
        .trainer_mut()
        .set_grad_scaler(
            GradScaler::new(GradScalerConfig {
                init_scale: 2f64.powi(40),
                ..GradScalerConfig::default()
            })
            .unwrap(),
        )
        .unwrap();
    let before = factors(&s);
    let stats = s
        .trainer
        .step_with_ids(
            s.latents.clone(),
            s.ids_one.clone(),
            s.ids_two.clone(),
            &s.time_ids,
            &draws(&source, 0),
        )
        .unwrap()
        .unwrap();
    assert!(stats.loss.is_finite());
    assert!(s.trainer.trainer().last_step_skipped());
    assert_eq!(s.trainer.trainer().skipped_steps(), 1);
    assert_eq!(s.trainer.trainer().optimizer().step_count(), 0);
    assert_eq!(
        s.trainer.trainer().grad_scaler().unwrap().scale(),
        2f32.powi(39)
    );
    for (a, b) in factors(&s).iter().zip(&before) {
        assert_eq!(a.values, b.values, "`{}` changed", a.key);
    }
}

/// Gradient checkpointing through the UNet and both adapted text encoders changes no bit of the
/// loss, the gradients of the three LoRAs or the factors after a step.
#[test]
fn sdxl_text_encoder_lora_gradient_checkpointing_changes_nothing() {
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let run = |gc: bool| {
        let mut s = setup_with(MixedPrecision::No, gc);
        let loss = s
            .trainer
            .loss_with_ids(
                s.latents.clone(),
                s.ids_one.clone(),
                s.ids_two.clone(),
                &s.time_ids,
                &draws(&source, 0),
            )
            .unwrap();
        let value = loss.clone().inner().into_scalar::<f32>();
        let grads = s.trainer.gradients(loss);
        let grads = s.trainer.lora_gradient_state_dicts(&grads).unwrap();
        s.trainer
            .step_with_ids(
                s.latents.clone(),
                s.ids_one.clone(),
                s.ids_two.clone(),
                &s.time_ids,
                &draws(&source, 0),
            )
            .unwrap()
            .unwrap();
        let [one, two] = s.trainer.text_encoder_loras().unwrap();
        let mut factors = s.trainer.trainer().lora().unwrap().state_dict();
        factors.extend(one.state_dict());
        factors.extend(two.state_dict());
        (value, grads, factors)
    };
    let (loss, grads, factors) = run(false);
    let (loss_gc, grads_gc, factors_gc) = run(true);
    assert_eq!(loss.to_bits(), loss_gc.to_bits());
    for (a, b) in grads.iter().flatten().zip(grads_gc.iter().flatten()) {
        assert_eq!(a.key, b.key);
        assert_eq!(a.values, b.values, "gradient of `{}`", a.key);
    }
    assert_eq!(factors.len(), factors_gc.len());
    for (a, b) in factors.iter().zip(&factors_gc) {
        assert_eq!(a.values, b.values, "`{}` after a step", a.key);
    }
}

/// A checkpoint of a run with text-encoder LoRAs does not resume a run without them, nor the
/// reverse: typed errors naming what does not fit, no panic.
#[test]
fn sdxl_checkpoints_of_the_other_kind_are_refused() {
    let dev = device();
    let with_text = tempfile::tempdir().unwrap();
    let mut config = loop_config(with_text.path(), PromptValidationConfig::default());
    config.text_to_image.max_train_steps = Some(2);
    train_text_to_image_sdxl(&config, &dev).unwrap();
    let unet_only = tempfile::tempdir().unwrap();
    let mut plain = loop_config(unet_only.path(), PromptValidationConfig::default());
    plain.train_text_encoder = false;
    plain.text_to_image.max_train_steps = Some(2);
    train_text_to_image_sdxl(&plain, &dev).unwrap();

    let resume = |out: &Path, train_text_encoder: bool| {
        let mut c = loop_config(out, PromptValidationConfig::default());
        c.train_text_encoder = train_text_encoder;
        c.text_to_image.resume_from_checkpoint = Some("latest".into());
        train_text_to_image_sdxl(&c, &dev).unwrap_err().to_string()
    };
    let err = resume(with_text.path(), false);
    assert!(err.contains("optimizer.json"), "{err}");
    let err = resume(unet_only.path(), true);
    assert!(err.contains("text_encoder"), "{err}");
}
