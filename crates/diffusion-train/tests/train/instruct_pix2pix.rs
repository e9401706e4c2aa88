//! InstructPix2Pix training of the tiny SD1 pipeline against PyTorch/diffusers
//! (fixtures/oracle/gen_train_instruct_pix2pix.py): the script's preprocessing, VAE latents
//! (`sample()` for the edited images, `mode()` for the originals), the widened `conv_in`, the
//! conditioning-dropout masks, and two full steps (loss, every gradient including `conv_in`'s,
//! every updated parameter).

use std::path::PathBuf;

use diffusion_core::TorchGenerator;
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::weights::{NamedTensor, WeightSource};
use diffusion_models::{ModelMixin, UNet2DConditionModel, state_dict};
use diffusion_train::text_to_image_run::FrozenComponents;
use diffusion_train::{
    EditBatch, EditDataset, InstructPix2PixConfig, InstructPix2PixTrainer, LrScheduleKind,
    NoiseDraws, conditioning_masks, load_noise_scheduler, widen_conv_in,
};
use serde_json::Value;

use crate::{device, fixtures, max_abs_diff, tensor};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("instruct_pix2pix")
}

fn sd1() -> PathBuf {
    fixtures().join("../pipelines/sd/sd1")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap()
}

fn source() -> WeightSource {
    WeightSource::open(root().join("steps.safetensors")).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn config(hp: &Value) -> InstructPix2PixConfig {
    InstructPix2PixConfig {
        pretrained_model: sd1(),
        train_data_dir: root().join("data"),
        resolution: 32,
        random_flip: true,
        learning_rate: f(&hp["learning_rate"]),
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        adam_beta1: f(&hp["adam_beta1"]),
        adam_beta2: f(&hp["adam_beta2"]),
        adam_weight_decay: f(&hp["adam_weight_decay"]),
        adam_epsilon: f(&hp["adam_epsilon"]),
        max_grad_norm: Some(f(&hp["max_grad_norm"])),
        conditioning_dropout_prob: Some(f(&hp["conditioning_dropout_prob"])),
        show_progress: false,
        ..InstructPix2PixConfig::default()
    }
}

fn diff_to(ours: Vec<f32>, source: &WeightSource, key: &str) -> f32 {
    let (want, _) = source.read_f32(key).unwrap();
    max_abs_diff(&ours, &want)
}

/// Worst difference of `ours` against `prefix/<key>` tensors of the fixture (same key set).
fn compare(ours: &[NamedTensor], source: &WeightSource, prefix: &str) -> (String, f32) {
    let mut theirs: Vec<&str> = source
        .keys()
        .filter_map(|k| k.strip_prefix(prefix).and_then(|k| k.strip_prefix('/')))
        .collect();
    theirs.sort();
    let mut our_keys: Vec<&str> = ours.iter().map(|t| t.key.as_str()).collect();
    our_keys.sort();
    assert_eq!(our_keys, theirs, "{prefix}: keys differ");
    let mut worst = (String::new(), 0.0f32);
    for t in ours {
        let (values, shape) = source.read_f32(&format!("{prefix}/{}", t.key)).unwrap();
        assert_eq!(shape, t.shape, "{prefix}/{}: shape", t.key);
        let diff = max_abs_diff(&t.values, &values);
        if diff > worst.1 || worst.0.is_empty() {
            worst = (t.key.clone(), diff);
        }
    }
    worst
}

#[test]
fn data_latents_and_masks_match_diffusers() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = source();
    let config = config(hp);
    let data = EditDataset::from_folder(root().join("data"), &config).unwrap();
    assert_eq!(data.len(), 4);
    assert_eq!(data.example(1).prompt, "turn the sky green");
    let flips: Vec<bool> = hp["flips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let (original, edited) = data.pixel_values(&[0, 1, 2, 3], &flips).unwrap();
    let d = diff_to(original.clone(), &source, "original_pixel_values").max(diff_to(
        edited.clone(),
        &source,
        "edited_pixel_values",
    ));
    assert!(d <= 1e-6, "pixel values differ by {d}");

    let dev = device();
    let frozen = FrozenComponents::load(&sd1(), &dev).unwrap();
    let pixels = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [4, 3, 32, 32]), &dev);
    let dist = frozen.vae.encode(pixels(edited)).unwrap();
    let eps: Tensor<4> = tensor(&source, "posterior_noise", &dev);
    let latents = dist
        .mean
        .add(dist.std.mul(eps))
        .mul_scalar(frozen.vae.config().scaling_factor);
    let d = diff_to(diffusion_core::tensor::to_vec(latents), &source, "latents");
    eprintln!("latents: {d:e}");
    assert!(d <= TOL, "latents differ by {d}");
    let embeds = frozen.vae.encode(pixels(original)).unwrap().mode();
    let d = diff_to(
        diffusion_core::tensor::to_vec(embeds),
        &source,
        "original_image_embeds",
    );
    eprintln!("original_image_embeds: {d:e}");
    assert!(d <= TOL, "original image embeds differ by {d}");
    let prompts: Vec<&str> = (0..4).map(|i| data.example(i).prompt.as_str()).collect();
    let states = frozen.encode_captions(&prompts).unwrap();
    let d = diff_to(
        diffusion_core::tensor::to_vec(states),
        &source,
        "encoder_hidden_states",
    );
    assert!(d <= TOL, "encoder_hidden_states differ by {d}");
    let null = frozen.encode_captions(&[""]).unwrap();
    let d = diff_to(
        diffusion_core::tensor::to_vec(null),
        &source,
        "null_conditioning",
    );
    assert!(d <= TOL, "null conditioning differs by {d}");

    // The four dropout cases, and the script's generator draw.
    let p = f(&hp["conditioning_dropout_prob"]);
    let (random_p0, _) = source.read_f32("random_p/0").unwrap();
    assert_eq!(
        conditioning_masks(p, &random_p0),
        [(true, 1.0), (true, 0.0), (false, 0.0), (false, 1.0)]
    );
    let mut g = TorchGenerator::new(hp["dropout_seed"].as_u64().unwrap());
    assert_eq!(g.rand(&[4]), source.read_f32("random_p/1").unwrap().0);
}

#[test]
fn widened_unet_steps_match_diffusers() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let results = &expected["results"];
    let source = source();
    let dev = device();
    let config = config(hp);
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let bias: Tensor<1> = tensor(&source, "init/conv_in.bias", &dev);
    let unet = widen_conv_in(unet, 8, Some(bias)).unwrap();
    assert_eq!(unet.config().in_channels, 8);
    let d = diff_to(
        diffusion_core::tensor::to_vec(unet.conv_in.weight.val()),
        &source,
        "init/conv_in.weight",
    );
    assert!(d == 0.0, "widened conv_in differs by {d}");
    let steps = f(&hp["steps"]) as usize;
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let mut trainer = InstructPix2PixTrainer::new(&config, unet, scheduler, steps, &dev).unwrap();

    let null: Tensor<3> = tensor(&source, "null_conditioning", &dev);
    let batch = |step: usize| EditBatch {
        latents: tensor(&source, "latents", &dev),
        original_image_embeds: tensor(&source, "original_image_embeds", &dev),
        encoder_hidden_states: tensor(&source, "encoder_hidden_states", &dev),
        dropout: Some((
            null.clone(),
            source.read_f32(&format!("random_p/{step}")).unwrap().0,
        )),
    };
    let draws = |step: usize| NoiseDraws {
        noise: tensor(&source, &format!("noise/{step}"), &dev),
        offset_noise: None,
        perturbation: None,
        timesteps: source
            .read_f32(&format!("timesteps/{step}"))
            .unwrap()
            .0
            .iter()
            .map(|&t| t as usize)
            .collect(),
    };

    let loss = trainer.loss(&batch(0), &draws(0)).unwrap();
    let grads = trainer.inner().gradients(loss);
    let (key, d) = compare(&grads.state_dict(trainer.inner().unet()), &source, "grad0");
    eprintln!("worst gradient difference {d:e} (`{key}`)");
    assert!(d <= TOL, "gradient of `{key}` differs by {d}");
    let conv_in = grads
        .state_dict(trainer.inner().unet())
        .into_iter()
        .find(|t| t.key == "conv_in.weight")
        .unwrap();
    let d = diff_to(conv_in.values, &source, "grad0/conv_in.weight");
    eprintln!("conv_in.weight gradient difference {d:e}");

    for step in 0..steps {
        let stats = trainer.step(&batch(step), &draws(step)).unwrap().unwrap();
        let want = f(&results["losses"][step]);
        let d = (f64::from(stats.loss) - want).abs();
        eprintln!(
            "step {step}: loss {} (diffusers {want}, diff {d:e})",
            stats.loss
        );
        assert!(
            d <= f64::from(TOL),
            "step {step}: loss {} vs {want}",
            stats.loss
        );
        let want = f(&results["grad_norms"][step]);
        let d = (f64::from(stats.grad_norm) - want).abs();
        assert!(
            d <= f64::from(TOL),
            "step {step}: grad norm {} vs {want}",
            stats.grad_norm
        );
    }
    let (key, d) = compare(&state_dict(trainer.inner().unet()), &source, "param");
    eprintln!("worst parameter difference after {steps} steps {d:e} (`{key}`)");
    assert!(d <= TOL, "`{key}` differs by {d}");
}
