//! Textual inversion of the tiny SD1 pipeline against textual_inversion.py
//! (fixtures/oracle/gen_train_dreambooth_ti.py): the added tokens and their initial rows, the
//! first step's gradient of the placeholder rows, two AdamW steps (loss, rows), every other row
//! unchanged bit for bit, and the saved `learned_embeds.safetensors` through diffusion-loaders
//! in a fresh pipeline against diffusers' generation with the same file.

use std::path::PathBuf;

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::{SafetensorsFile, WeightSource};
use diffusion_models::{CLIPTextModel, CLIPTokenizer, ModelMixin, UNet2DConditionModel};
use diffusion_pipelines::{Generators, StableDiffusionArgs, StableDiffusionPipeline};
use diffusion_train::textual_inversion::{LEARNED_EMBEDS_NAME, placeholder_string};
use diffusion_train::{
    LrScheduleKind, NoiseDraws, TextualInversionConfig, TextualInversionTrainer,
    add_placeholder_tokens, load_noise_scheduler, tokenize_captions,
};
use serde_json::Value;

use crate::{device, fixtures, max_abs_diff, number as f, sd1, tensor};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("textual_inversion")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap()
}

fn config(hp: &Value) -> TextualInversionConfig {
    TextualInversionConfig {
        pretrained_model: sd1(),
        placeholder_token: hp["placeholder_token"].as_str().unwrap().into(),
        initializer_token: hp["initializer_token"].as_str().unwrap().into(),
        num_vectors: hp["num_vectors"].as_u64().unwrap() as usize,
        learning_rate: f(&hp["learning_rate"]),
        scale_lr: false,
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        adam_beta1: f(&hp["adam_beta1"]),
        adam_beta2: f(&hp["adam_beta2"]),
        adam_weight_decay: f(&hp["adam_weight_decay"]),
        adam_epsilon: f(&hp["adam_epsilon"]),
        show_progress: false,
        ..TextualInversionConfig::default()
    }
}

fn draws(source: &WeightSource, step: usize) -> NoiseDraws {
    let (t, _) = source.read_f32(&format!("timesteps/{step}")).unwrap();
    NoiseDraws {
        noise: tensor(source, &format!("noise/{step}"), &device()),
        offset_noise: None,
        perturbation: None,
        timesteps: t.iter().map(|&v| v as usize).collect(),
    }
}

#[test]
fn textual_inversion_steps_and_embedding_match_diffusers() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let results = &expected["results"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let config = config(hp);
    let dev = device();

    let mut tokenizer = CLIPTokenizer::from_pretrained(sd1().join("tokenizer")).unwrap();
    let mut text_encoder =
        CLIPTextModel::from_pretrained(sd1().join("text_encoder"), &dev).unwrap();
    let original = to_vec(
        text_encoder
            .text_model
            .embeddings
            .token_embedding
            .weight
            .val(),
    );
    let ids = add_placeholder_tokens(
        &mut tokenizer,
        &mut text_encoder,
        &config.placeholder_token,
        config.num_vectors,
        &config.initializer_token,
    )
    .unwrap();
    let want_ids: Vec<u32> = results["placeholder_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want_ids);

    // The prompts the script's templates make, and their ids.
    let templates: Vec<&str> = hp["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let placeholder = placeholder_string(&config.placeholder_token, config.num_vectors);
    let prompts: Vec<String> = templates
        .iter()
        .map(|t| t.replace("{}", &placeholder))
        .collect();
    assert_eq!(
        Value::from(prompts.clone()),
        results["prompts"],
        "template prompts"
    );
    let tokens = tokenize_captions(&tokenizer, &prompts).unwrap();
    let input_ids = tokens.input_ids_tensor(&dev).unwrap();
    let want_ids: Vec<i64> = {
        let file = SafetensorsFile::open(root().join("steps.safetensors")).unwrap();
        let (_, bytes) = file.read_bytes("input_ids").unwrap();
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let ours: Vec<i64> = input_ids
        .clone()
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    assert_eq!(ours, want_ids, "input ids");

    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let mut trainer =
        TextualInversionTrainer::new(&config, text_encoder, unet, scheduler, &ids, steps, &dev)
            .unwrap();
    let (init, _) = source.read_f32("init_rows").unwrap();
    assert_eq!(to_vec(trainer.learned_embeds()), init, "initial rows");

    let latents: Tensor<4> = tensor(&source, "latents", &dev);
    let (first, last) = trainer.placeholder_rows();
    let loss = trainer
        .loss(latents.clone(), input_ids.clone(), &draws(&source, 0))
        .unwrap();
    let grads = trainer.gradients(loss);
    let table = grads.state_dict(&trainer.text_encoder().text_model.embeddings.token_embedding);
    let hidden = table[0].shape[1];
    let rows = &table[0].values[first * hidden..(last + 1) * hidden];
    let (want, _) = source.read_f32("grad0_rows").unwrap();
    let grad_diff = max_abs_diff(rows, &want);
    eprintln!("textual inversion: placeholder-row gradient max |diff| {grad_diff:e}");
    assert!(grad_diff <= TOL, "gradient differs by {grad_diff}");

    let mut worst = grad_diff;
    for step in 0..steps {
        let stats = trainer
            .step(latents.clone(), input_ids.clone(), &draws(&source, step))
            .unwrap()
            .unwrap();
        let want = f(&results["losses"][step]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        eprintln!(
            "textual inversion step {step}: loss {} (diff {d:e})",
            stats.loss
        );
        assert!(d <= TOL, "step {step}: loss {} vs {want}", stats.loss);
        let (want, _) = source.read_f32(&format!("rows/{step}")).unwrap();
        let d = max_abs_diff(&to_vec(trainer.learned_embeds()), &want);
        eprintln!("textual inversion step {step}: learned rows max |diff| {d:e}");
        assert!(d <= TOL, "step {step}: rows differ by {d}");
        worst = worst.max(d);
    }
    // index_no_updates: every original row is still the pretrained one, bit for bit.
    let table = to_vec(trainer.token_embedding());
    assert_eq!(
        &table[..original.len()],
        &original[..],
        "other rows changed"
    );
    eprintln!("textual inversion: worst difference {worst:e}");

    // The saved file: diffusers' layout, then through our loader into a fresh pipeline.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LEARNED_EMBEDS_NAME);
    trainer.save_learned_embeds(&path).unwrap();
    let ours = SafetensorsFile::open(&path).unwrap();
    let theirs = SafetensorsFile::open(root().join("learned").join(LEARNED_EMBEDS_NAME)).unwrap();
    assert_eq!(ours.keys(), theirs.keys(), "keys");
    assert_eq!(ours.user_metadata(), theirs.user_metadata(), "metadata");
    let key = &config.placeholder_token;
    let (a, sa) = ours.read_f32(key).unwrap();
    let (b, sb) = theirs.read_f32(key).unwrap();
    assert_eq!(sa, sb);
    let d = max_abs_diff(&a, &b);
    eprintln!("saved embedding max |diff| {d:e}");
    assert!(d <= TOL, "saved embedding differs by {d}");

    let mut pipe = StableDiffusionPipeline::from_pretrained(sd1().to_str().unwrap(), &dev).unwrap();
    let added = pipe
        .components
        .load_textual_inversion(dir.path(), None)
        .unwrap();
    assert_eq!(added.len(), config.num_vectors);
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
    let want = SafetensorsFile::open(root().join("learned/image.safetensors"))
        .unwrap()
        .read_f32("image")
        .unwrap()
        .0;
    let diff = max_abs_diff(&images.data, &want);
    eprintln!("generation with the learned embedding: max |diff| {diff:e}");
    assert!(diff <= 1e-3, "image differs by {diff}");
}

/// The fixture's steps over two devices, one prompt and image each: the learned rows match the
/// script's after every step, and the other rows stay the pretrained ones.
#[test]
fn textual_inversion_steps_over_two_devices_match_diffusers() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let results = &expected["results"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let config = config(hp);
    let dev = device();
    let mut tokenizer = CLIPTokenizer::from_pretrained(sd1().join("tokenizer")).unwrap();
    let mut text_encoder =
        CLIPTextModel::from_pretrained(sd1().join("text_encoder"), &dev).unwrap();
    let ids = add_placeholder_tokens(
        &mut tokenizer,
        &mut text_encoder,
        &config.placeholder_token,
        config.num_vectors,
        &config.initializer_token,
    )
    .unwrap();
    let prompts: Vec<String> = results["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let input_ids = tokenize_captions(&tokenizer, &prompts)
        .unwrap()
        .input_ids_tensor(&dev)
        .unwrap();
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let mut trainer =
        TextualInversionTrainer::new(&config, text_encoder, unet, scheduler, &ids, steps, &dev)
            .unwrap();
    let before = to_vec(trainer.token_embedding());
    let latents: Tensor<4> = tensor(&source, "latents", &dev);
    assert_eq!(latents.dims()[0], 2, "one image per device");
    let mut parallel = trainer.data_parallel(vec![dev.clone(); 2]).unwrap();
    for step in 0..steps {
        let stats = trainer
            .step_data_parallel(
                &mut parallel,
                latents.clone(),
                input_ids.clone(),
                &draws(&source, step),
            )
            .unwrap()
            .expect("no accumulation");
        let d = (f64::from(stats.loss) - f(&results["losses"][step])).abs() as f32;
        let (want, _) = source.read_f32(&format!("rows/{step}")).unwrap();
        let rows = max_abs_diff(&to_vec(trainer.learned_embeds()), &want);
        eprintln!("textual inversion on 2 devices, step {step}: loss diff {d:e}, rows {rows:e}");
        assert!(
            d <= TOL && rows <= TOL,
            "step {step}: loss {d}, rows {rows}"
        );
    }
    let (first, _) = trainer.placeholder_rows();
    let hidden = trainer.learned_embeds().dims()[1];
    let after = to_vec(trainer.token_embedding());
    assert_eq!(
        &after[..first * hidden],
        &before[..first * hidden],
        "other rows changed"
    );
}
