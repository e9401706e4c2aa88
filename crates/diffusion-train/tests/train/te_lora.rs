//! DreamBooth LoRA with a trained text-encoder LoRA on the tiny SD1 pipeline against
//! train_dreambooth_lora.py `--train_text_encoder --with_prior_preservation`
//! (fixtures/oracle/gen_train_te_lora.py): the loss through the adapted text encoder, every
//! first-step gradient of both LoRAs, two clipped AdamW steps over both, every updated factor;
//! then the saved file against diffusers' `save_lora_weights` output, and a generation with our
//! file loaded through diffusion-loaders against diffusers' generation with its file.

use std::path::PathBuf;

use diffusion_core::burn::tensor::{Int, Tensor};
use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::weights::{SafetensorsFile, WeightSource};
use diffusion_models::{CLIPTextModel, CLIPTokenizer, ModelMixin, UNet2DConditionModel};
use diffusion_pipelines::{Generators, StableDiffusionArgs, StableDiffusionPipeline};
use diffusion_train::{
    DreamBoothConfig, DreamBoothTrainer, LoraComponent, LoraTrainConfig, LrScheduleKind,
    NoiseDraws, TextToImageConfig, UNetLora, load_noise_scheduler, tokenize_captions,
};
use serde_json::Value;

use crate::{
    compare_to_fixture as worst, device, fixtures, max_abs_diff, number as f, sd1, tensor,
};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("te_lora")
}

/// The int64 prompt ids of the fixture.
fn fixture_ids(source: &WeightSource) -> Vec<i64> {
    let file = SafetensorsFile::open(source.files()[0].path()).unwrap();
    let (_, bytes) = file.read_bytes("input_ids").unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The fixture's DreamBooth run with both LoRAs at the fixture's initial factors, and the
/// prompt ids of its batch (instance prompts, then class prompts).
fn te_trainer(expected: &Value, source: &WeightSource) -> (DreamBoothTrainer, Tensor<2, Int>) {
    let hp = &expected["hyperparameters"];
    let file = SafetensorsFile::open(root().join("steps.safetensors")).unwrap();
    let dev = device();
    let rank = f(&hp["rank"]) as usize;
    let config = DreamBoothConfig {
        instance_prompt: hp["instance_prompt"].as_str().unwrap().into(),
        class_prompt: Some(hp["class_prompt"].as_str().unwrap().into()),
        class_data_dir: Some(fixtures().join("text_to_image/data")),
        with_prior_preservation: true,
        prior_loss_weight: f(&hp["prior_loss_weight"]),
        train_text_encoder: true,
        train: TextToImageConfig {
            pretrained_model: sd1(),
            learning_rate: f(&hp["learning_rate"]),
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 0,
            adam_beta1: f(&hp["adam_beta1"]),
            adam_beta2: f(&hp["adam_beta2"]),
            adam_weight_decay: f(&hp["adam_weight_decay"]),
            adam_epsilon: f(&hp["adam_epsilon"]),
            max_grad_norm: Some(f(&hp["max_grad_norm"])),
            lora: Some(LoraTrainConfig {
                rank,
                alpha: Some(f(&hp["lora_alpha"])),
                ..LoraTrainConfig::default()
            }),
            show_progress: false,
            ..DreamBoothConfig::lora_defaults().train
        },
        ..DreamBoothConfig::lora_defaults()
    };

    // The prompt ids the script feeds the text encoder: instance prompts, then class prompts.
    let tokenizer = CLIPTokenizer::from_pretrained(sd1().join("tokenizer")).unwrap();
    let prompts = [
        config.instance_prompt.as_str(),
        config.instance_prompt.as_str(),
        config.class_prompt.as_deref().unwrap(),
        config.class_prompt.as_deref().unwrap(),
    ];
    let tokens = tokenize_captions(&tokenizer, &prompts).unwrap();
    let got: Vec<i64> = tokens
        .input_ids
        .concat()
        .iter()
        .map(|&v| i64::from(v))
        .collect();
    assert_eq!(got, fixture_ids(source), "prompt ids differ");
    let ids: Tensor<2, Int> = tokens.input_ids_tensor(&dev).unwrap();

    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let text_encoder = CLIPTextModel::from_pretrained(sd1().join("text_encoder"), &dev).unwrap();
    let mut unet_lora = UNetLora::new(&unet, config.train.lora.as_ref().unwrap(), 0, &dev).unwrap();
    unet_lora.load_factors(&file, "unet_init/").unwrap();
    let te_config = LoraTrainConfig {
        alpha: Some(f(&hp["lora_alpha"])),
        ..LoraTrainConfig::text_encoder(rank)
    };
    let mut te_lora = UNetLora::new_text_encoder(&text_encoder, &te_config, 0, &dev).unwrap();
    assert_eq!(te_lora.component(), LoraComponent::TextEncoder);
    assert_eq!(te_lora.modules().len(), 8, "2 layers x q, k, v, out");
    te_lora.load_factors(&file, "te_init/").unwrap();
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let trainer = DreamBoothTrainer::with_text_encoder(
        &config,
        unet,
        unet_lora,
        text_encoder,
        te_lora,
        scheduler,
        steps,
        &dev,
    )
    .unwrap();
    (trainer, ids)
}

/// Both LoRAs over two devices (each with one instance row and its class row, the text
/// encoder on each device's prompt ids) against diffusers' single-process steps.
#[test]
fn text_encoder_lora_steps_over_two_devices_match_diffusers() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap();
    let results = &expected["results"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let dev = device();
    let (mut trainer, ids) = te_trainer(&expected, &source);
    let (mut single, _) = te_trainer(&expected, &source);
    let mut parallel = trainer.data_parallel(vec![dev.clone(); 2]).unwrap();
    assert!(matches!(
        parallel,
        diffusion_train::dreambooth::DreamBoothParallel::TextEncoder { .. }
    ));
    let latents = tensor::<4>(&source, "latents", &dev);
    let steps = expected["hyperparameters"]["steps"].as_u64().unwrap() as usize;
    for s in 0..steps {
        let (t, _) = source.read_f32(&format!("timesteps/{s}")).unwrap();
        let draws = NoiseDraws {
            noise: tensor(&source, &format!("noise/{s}"), &dev),
            offset_noise: None,
            perturbation: None,
            timesteps: t.iter().map(|&v| v as usize).collect(),
        };
        let stats = trainer
            .step_data_parallel_with_ids(&mut parallel, latents.clone(), ids.clone(), &draws)
            .unwrap()
            .expect("no accumulation");
        let one = single
            .step_with_ids(latents.clone(), ids.clone(), &draws)
            .unwrap()
            .unwrap();
        let want = f(&results["losses"][s]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        let dn = (f64::from(stats.grad_norm) - f(&results["grad_norms"][s])).abs() as f32;
        eprintln!(
            "te_lora on 2 devices, step {s}: loss diff {d:e}, grad norm diff {dn:e}; vs one \
             device: loss {:e}, grad norm {:e}",
            (stats.loss - one.loss).abs(),
            (stats.grad_norm - one.grad_norm).abs()
        );
        assert!(d <= TOL && dn <= TOL, "step {s}: {stats:?}");
    }
    let (key, d) = worst(
        &trainer.inner().lora().unwrap().state_dict(),
        &source,
        "unet_param",
    );
    eprintln!("te_lora on 2 devices: UNet LoRA after the steps {d:e} (`{key}`)");
    assert!(d <= TOL, "`{key}` differs by {d}");
    let (key, d) = worst(
        &trainer.text_encoder_lora().unwrap().state_dict(),
        &source,
        "te_param",
    );
    eprintln!("te_lora on 2 devices: text-encoder LoRA after the steps {d:e} (`{key}`)");
    assert!(d <= TOL, "`{key}` differs by {d}");
}

#[test]
fn text_encoder_lora_steps_file_and_image_match_diffusers() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap();
    let hp = &expected["hyperparameters"];
    let results = &expected["results"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let dev = device();
    let (mut trainer, ids) = te_trainer(&expected, &source);
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let latents = tensor::<4>(&source, "latents", &dev);
    let draws = |s: usize| {
        let (t, _) = source.read_f32(&format!("timesteps/{s}")).unwrap();
        NoiseDraws {
            noise: tensor(&source, &format!("noise/{s}"), &dev),
            offset_noise: None,
            perturbation: None,
            timesteps: t.iter().map(|&v| v as usize).collect(),
        }
    };

    let loss = trainer
        .loss_with_ids(latents.clone(), ids.clone(), &draws(0))
        .unwrap();
    let grads = trainer.gradients(loss);
    let (unet_grads, te_grads) = trainer.lora_gradient_state_dicts(&grads).unwrap();
    let (key, d_unet) = worst(&unet_grads, &source, "unet_grad0");
    eprintln!("te_lora: worst UNet LoRA gradient difference {d_unet:e} (`{key}`)");
    assert!(d_unet <= TOL, "gradient of `{key}` differs by {d_unet}");
    let (key, d_te) = worst(&te_grads, &source, "te_grad0");
    eprintln!("te_lora: worst text-encoder LoRA gradient difference {d_te:e} (`{key}`)");
    assert!(d_te <= TOL, "gradient of `{key}` differs by {d_te}");
    let mut max_err = d_unet.max(d_te);
    for s in 0..steps {
        let stats = trainer
            .step_with_ids(latents.clone(), ids.clone(), &draws(s))
            .unwrap()
            .expect("no accumulation: every micro-batch is a step");
        let want = f(&results["losses"][s]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        eprintln!("te_lora step {s}: loss {} (diff {d:e})", stats.loss);
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
    let unet_params = trainer.inner().lora().unwrap().state_dict();
    let (key, d) = worst(&unet_params, &source, "unet_param");
    eprintln!("te_lora: worst UNet LoRA parameter difference after the steps {d:e} (`{key}`)");
    assert!(d <= TOL, "`{key}` differs by {d}");
    max_err = max_err.max(d);
    let te_params = trainer.text_encoder_lora().unwrap().state_dict();
    let (key, d) = worst(&te_params, &source, "te_param");
    eprintln!(
        "te_lora: worst text-encoder LoRA parameter difference after the steps {d:e} (`{key}`)"
    );
    assert!(d <= TOL, "`{key}` differs by {d}");
    max_err = max_err.max(d);
    eprintln!("te_lora: worst step difference {max_err:e}");

    // The saved file: diffusers' keys, shapes and metadata, the trained values.
    let dir = tempfile::tempdir().unwrap();
    trainer.save_lora_weights(dir.path()).unwrap();
    let ours = SafetensorsFile::open(dir.path().join("pytorch_lora_weights.safetensors")).unwrap();
    let theirs =
        SafetensorsFile::open(root().join("trained/pytorch_lora_weights.safetensors")).unwrap();
    let layout = |file: &SafetensorsFile| {
        let mut keys: Vec<(String, Vec<usize>)> = file
            .keys()
            .into_iter()
            .map(|k| {
                let shape = file.entry(&k).unwrap().shape.clone();
                (k, shape)
            })
            .collect();
        keys.sort();
        keys
    };
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
    eprintln!("te_lora: saved factors, worst difference {worst_file:e}");
    assert!(worst_file <= TOL, "saved factors differ by {worst_file}");

    // Our file through our loader, against diffusers' generation with its file.
    let mut pipe = StableDiffusionPipeline::from_pretrained(sd1().to_str().unwrap(), &dev).unwrap();
    let report = pipe
        .components
        .load_lora_weights(dir.path(), "trained")
        .unwrap();
    assert_eq!(
        report.matched_modules.len(),
        32 + 8,
        "UNet and text-encoder modules"
    );
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
    let want = SafetensorsFile::open(root().join("trained/image.safetensors"))
        .unwrap()
        .read_f32("image")
        .unwrap()
        .0;
    let diff = max_abs_diff(&images.data, &want);
    eprintln!("te_lora: generation with the trained LoRAs, max |diff| {diff:e}");
    assert!(diff <= 1e-3, "image differs by {diff}");
}
