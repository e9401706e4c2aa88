//! ControlNet training of a ControlNet made from the tiny SD1 UNet against PyTorch/diffusers
//! (fixtures/oracle/gen_train_controlnet.py, train_controlnet.py's step): the conditioning
//! transforms, then two steps (loss, every gradient of the ControlNet, gradient norms, every
//! updated parameter) with the same batch, noise and timesteps.

use std::path::PathBuf;

use diffusion_core::weights::{NamedTensor, WeightSource};
use diffusion_models::{ControlNetModel, ModelMixin, UNet2DConditionModel, state_dict};
use diffusion_train::{
    ControlNetTrainConfig, ControlNetTrainer, LrScheduleKind, NoiseDraws,
    conditioning_pixel_values, load_noise_scheduler,
};
use serde_json::Value;

use crate::{device, fixtures, max_abs_diff, tensor};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("controlnet")
}

fn sd1() -> PathBuf {
    fixtures().join("../pipelines/sd/sd1")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
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
fn conditioning_images_are_prepared_as_the_script_does() {
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let (want, shape) = source.read_f32("conditioning_pixel_values").unwrap();
    assert_eq!(shape, [2, 3, 32, 32]);
    let mut got = Vec::new();
    for i in 0..2 {
        let path = root().join("data").join(format!("{i}_cond.png"));
        got.extend(conditioning_pixel_values(&path, 32).unwrap());
    }
    assert!(max_abs_diff(&got, &want) <= 1e-7);
    assert!(got.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn controlnet_steps_match_diffusers() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let dev = device();
    let config = ControlNetTrainConfig {
        learning_rate: f(&hp["learning_rate"]),
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        adam_beta1: f(&hp["adam_beta1"]),
        adam_beta2: f(&hp["adam_beta2"]),
        adam_weight_decay: f(&hp["adam_weight_decay"]),
        adam_epsilon: f(&hp["adam_epsilon"]),
        max_grad_norm: Some(f(&hp["max_grad_norm"])),
    };
    let controlnet = ControlNetModel::from_pretrained(root().join("controlnet"), &dev).unwrap();
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let mut trainer =
        ControlNetTrainer::new(&config, controlnet, unet, scheduler, steps, &dev).unwrap();

    let latents = tensor::<4>(&source, "latents", &dev);
    let states = tensor::<3>(&source, "encoder_hidden_states", &dev);
    let image = tensor::<4>(&source, "conditioning_pixel_values", &dev);
    let draws = |step: usize| {
        let (t, _) = source.read_f32(&format!("timesteps/{step}")).unwrap();
        NoiseDraws {
            noise: tensor(&source, &format!("noise/{step}"), &dev),
            offset_noise: None,
            perturbation: None,
            timesteps: t.iter().map(|&v| v as usize).collect(),
        }
    };

    let loss = trainer
        .loss(latents.clone(), states.clone(), image.clone(), &draws(0))
        .unwrap();
    let grads = trainer.gradients(loss);
    let named = grads.state_dict(trainer.controlnet());
    let (key, grad_diff) = compare(&named, &source, "grad0");
    eprintln!("controlnet: worst gradient difference {grad_diff:e} (`{key}`)");
    assert!(
        grad_diff <= TOL,
        "gradient of `{key}` differs by {grad_diff}"
    );
    // Gradients reach past the zero convolutions into the copied UNet blocks.
    let g = named
        .iter()
        .find(|t| t.key == "down_blocks.0.resnets.0.conv1.weight")
        .unwrap();
    assert!(g.values.iter().any(|v| v.abs() > 1e-8));

    for step in 0..steps {
        let stats = trainer
            .step(latents.clone(), states.clone(), image.clone(), &draws(step))
            .unwrap();
        let want = f(&expected["losses"][step]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        eprintln!(
            "step {step}: loss {} (diffusers {want}, diff {d:e})",
            stats.loss
        );
        assert!(d <= TOL, "step {step}: loss {} vs {want}", stats.loss);
        let want = f(&expected["grad_norms"][step]);
        let d = (f64::from(stats.grad_norm) - want).abs() as f32;
        assert!(
            d <= TOL,
            "step {step}: grad norm {} vs {want}",
            stats.grad_norm
        );
    }
    let params = state_dict(trainer.controlnet());
    let (key, diff) = compare(&params, &source, "param");
    eprintln!("controlnet: worst parameter difference after the steps {diff:e} (`{key}`)");
    assert!(diff <= TOL, "`{key}` differs by {diff}");
}
