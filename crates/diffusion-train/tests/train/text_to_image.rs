//! Text-to-image and LoRA training of the tiny SD1 pipeline against PyTorch/diffusers
//! (fixtures/oracle/gen_train_text_to_image.py): the data transforms, tokenisation and VAE
//! latents; full fine-tuning steps (epsilon; v-prediction with Min-SNR, noise offset and input
//! perturbation) and LoRA steps (loss, every gradient, every updated parameter); a LoRA trained
//! for three steps, saved in diffusers' layout, reloaded through diffusion-loaders and used to
//! generate, against diffusers' file and image.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::weights::{SafetensorsFile, WeightSource};
use diffusion_models::{ModelMixin, UNet2DConditionModel, state_dict};
use diffusion_pipelines::{Generators, StableDiffusionArgs, StableDiffusionPipeline};
use diffusion_schedulers::PredictionType;
use diffusion_train::text_to_image_run::FrozenComponents;
use diffusion_train::{
    CaptionDataset, CaptionDatasetOptions, ImageDraws, Interpolation, LoraTrainConfig,
    LrScheduleKind, NoiseDraws, TextToImageConfig, TextToImageTrainer, UNetLora,
    load_noise_scheduler, tokenize_captions,
};
use serde_json::Value;

use crate::{
    compare_to_fixture as compare, device, fixtures, max_abs_diff, number as f, sd1, tensor,
};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("text_to_image")
}

pub(crate) fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap()
}

pub(crate) fn source() -> WeightSource {
    WeightSource::open(root().join("steps.safetensors")).unwrap()
}

/// The run a case of gen_train_text_to_image.py makes.
fn config(hp: &Value, case: &Value) -> TextToImageConfig {
    let lora = (case["kind"] == "lora").then(|| LoraTrainConfig {
        rank: f(&hp["rank"]) as usize,
        alpha: Some(f(&hp["lora_alpha"])),
        ..LoraTrainConfig::default()
    });
    TextToImageConfig {
        pretrained_model: sd1(),
        learning_rate: f(&hp["learning_rate"]),
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        adam_beta1: f(&hp["adam_beta1"]),
        adam_beta2: f(&hp["adam_beta2"]),
        adam_weight_decay: f(&hp["adam_weight_decay"]),
        adam_epsilon: f(&hp["adam_epsilon"]),
        max_grad_norm: Some(f(&hp["max_grad_norm"])),
        prediction_type: Some(if case["prediction_type"] == "v_prediction" {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        }),
        snr_gamma: case["snr_gamma"].as_f64(),
        noise_offset: f(&case["noise_offset"]),
        input_perturbation: f(&case["input_perturbation"]),
        lora,
        show_progress: false,
        ..TextToImageConfig::default()
    }
}

pub(crate) fn draws(source: &WeightSource, name: &str, step: usize) -> NoiseDraws {
    let dev = device();
    let opt = |key: &str| {
        let key = format!("{name}/{key}/{step}");
        source
            .contains(&key)
            .then(|| tensor::<4>(source, &key, &dev))
    };
    let (t, _) = source
        .read_f32(&format!("{name}/timesteps/{step}"))
        .unwrap();
    NoiseDraws {
        noise: tensor(source, &format!("{name}/noise/{step}"), &dev),
        offset_noise: opt("offset_noise"),
        perturbation: opt("perturbation"),
        timesteps: t.iter().map(|&v| v as usize).collect(),
    }
}

/// A trainer for case `name`, with the fixture's initial LoRA factors for LoRA cases.
pub(crate) fn trainer(name: &str, source: &WeightSource) -> TextToImageTrainer {
    let expected = expected();
    let (hp, case) = (&expected["hyperparameters"], &expected["cases"][name]);
    let config = config(hp, case);
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &device()).unwrap();
    let lora = config.lora.as_ref().map(|l| {
        let mut lora = UNetLora::new(&unet, l, 0, &device()).unwrap();
        let file = SafetensorsFile::open(source.files()[0].path()).unwrap();
        lora.load_factors(&file, &format!("{name}/init/")).unwrap();
        lora
    });
    let steps = case["steps"].as_u64().unwrap() as usize;
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    TextToImageTrainer::new(&config, unet, lora, scheduler, steps, &device()).unwrap()
}

pub(crate) fn batch(source: &WeightSource) -> (Tensor<4>, Tensor<3>) {
    (
        tensor(source, "latents", &device()),
        tensor(source, "encoder_hidden_states", &device()),
    )
}

/// Run case `name`: first-step gradients, every step's loss and norm, the final parameters.
fn check_case(name: &str) -> f32 {
    let expected = expected();
    let source = source();
    let case = &expected["cases"][name];
    let results = &expected["results"][name];
    let mut trainer = trainer(name, &source);
    let (latents, states) = batch(&source);

    let loss = trainer
        .loss(latents.clone(), states.clone(), &draws(&source, name, 0))
        .unwrap();
    let grads = trainer.gradients(loss);
    let named = match trainer.lora() {
        Some(lora) => lora.gradient_state_dict(&grads),
        None => grads.state_dict(trainer.unet()),
    };
    let (key, grad_diff) = compare(&named, &source, &format!("{name}/grad0"));
    eprintln!("{name}: worst gradient difference {grad_diff:e} (`{key}`)");
    assert!(
        grad_diff <= TOL,
        "{name}: gradient of `{key}` differs by {grad_diff}"
    );

    let mut worst = grad_diff;
    for step in 0..case["steps"].as_u64().unwrap() as usize {
        let stats = trainer
            .step(latents.clone(), states.clone(), &draws(&source, name, step))
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
    let params = match trainer.lora() {
        Some(lora) => lora.state_dict(),
        None => state_dict(trainer.unet()),
    };
    let (key, diff) = compare(&params, &source, &format!("{name}/param"));
    eprintln!("{name}: worst parameter difference after the steps {diff:e} (`{key}`)");
    assert!(diff <= TOL, "{name}: `{key}` differs by {diff}");
    worst.max(diff)
}

#[test]
fn data_tokens_and_latents_match_diffusers() {
    let expected = expected();
    let source = source();
    let data = CaptionDataset::from_folder(
        root().join("data"),
        CaptionDatasetOptions {
            resolution: 32,
            center_crop: true,
            random_flip: true,
            interpolation: Interpolation::Lanczos,
            caption_column: "text".into(),
        },
    )
    .unwrap();
    assert_eq!(data.len(), 4);
    let draws = [false, true].map(|flip| ImageDraws {
        crop: [0.0; 2],
        flip,
    });
    let pixels = data.pixel_values(&[0, 1], &draws).unwrap();
    let (want, shape) = source.read_f32("pixel_values").unwrap();
    assert_eq!(shape, [2, 3, 32, 32]);
    let diff = max_abs_diff(&pixels, &want);
    assert!(diff <= 1e-6, "pixel values differ by {diff}");

    let frozen = FrozenComponents::load(&sd1(), &device()).unwrap();
    let captions: Vec<&str> = (0..2).map(|i| data.caption(i, 0.0)).collect();
    assert_eq!(
        captions,
        [
            expected["captions"][0].as_str().unwrap(),
            expected["captions"][1].as_str().unwrap()
        ]
    );
    let ids = tokenize_captions(&frozen.tokenizer, &captions).unwrap();
    let want_ids = source.read_bytes_i64("input_ids");
    let got_ids: Vec<i64> = ids
        .input_ids
        .concat()
        .iter()
        .map(|&v| i64::from(v))
        .collect();
    assert_eq!(got_ids, want_ids);

    let states = frozen.encode_captions(&captions).unwrap();
    let diff = max_abs_diff(
        &diffusion_core::tensor::to_vec(states),
        &source.read_f32("encoder_hidden_states").unwrap().0,
    );
    eprintln!("encoder_hidden_states: {diff:e}");
    assert!(diff <= TOL, "encoder_hidden_states differ by {diff}");

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

/// `read_f32` for the int64 `input_ids`.
trait ReadI64 {
    fn read_bytes_i64(&self, key: &str) -> Vec<i64>;
}

impl ReadI64 for WeightSource {
    fn read_bytes_i64(&self, key: &str) -> Vec<i64> {
        let file = SafetensorsFile::open(self.files()[0].path()).unwrap();
        let (_, bytes) = file.read_bytes(key).unwrap();
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

#[test]
fn full_fine_tuning_epsilon_matches_diffusers() {
    check_case("full_epsilon");
}

#[test]
fn full_fine_tuning_v_prediction_min_snr_matches_diffusers() {
    check_case("full_v_snr");
}

#[test]
fn lora_steps_match_diffusers() {
    check_case("lora");
}

#[test]
fn trained_lora_file_and_image_match_diffusers() {
    let name = "lora_trained";
    check_case(name);
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = source();
    let mut trainer = trainer(name, &source);
    let (latents, states) = batch(&source);
    for step in 0..3 {
        trainer
            .step(latents.clone(), states.clone(), &draws(&source, name, step))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    trainer.lora().unwrap().save(dir.path()).unwrap();
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

    // Our file, through our loader, in a fresh pipeline, against diffusers' generation.
    let mut pipe =
        StableDiffusionPipeline::from_pretrained(sd1().to_str().unwrap(), &device()).unwrap();
    let report = pipe
        .components
        .load_lora_weights(dir.path(), "trained")
        .unwrap();
    assert_eq!(report.matched_modules.len(), 32);
    let out = pipe
        .call(StableDiffusionArgs {
            prompt: vec![hp["prompt"].as_str().unwrap().to_string()],
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
    eprintln!("generation with the trained LoRA: max |diff| {diff:e}");
    assert!(diff <= 1e-3, "image differs by {diff}");
}
