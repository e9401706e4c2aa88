//! Three optimisation steps of a tiny UNet2DModel against PyTorch/diffusers
//! (fixtures/oracle/gen_train.py): loss, gradients, gradient norms, learning rates, every updated
//! parameter and the EMA weights.

use diffusion_models::ModelMixin;
use std::collections::BTreeMap;

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::weights::WeightSource;
use diffusion_models::{UNet2DModel, state_dict};
use diffusion_schedulers::{DDPMScheduler, DDPMSchedulerConfig, PredictionType};
use diffusion_train::{FlatGradients, LrScheduleKind, TrainConfig, Trainer, training_loss};
use serde_json::Value;

use crate::{compare_to_fixture as compare, device, fixtures, max_abs_diff, number as f, tensor};

const TOL: f32 = 1e-5;

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("steps.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn timesteps(source: &WeightSource, step: usize) -> Vec<usize> {
    let (values, _) = source.read_f32(&format!("timesteps/{step}")).unwrap();
    values.iter().map(|&t| t as usize).collect()
}

/// The run gen_train.py makes, as a TrainConfig.
fn config(hp: &Value) -> TrainConfig {
    TrainConfig {
        learning_rate: f(&hp["learning_rate"]),
        lr_scheduler: LrScheduleKind::Cosine,
        lr_warmup_steps: f(&hp["lr_warmup_steps"]) as usize,
        adam_beta1: f(&hp["adam_beta1"]),
        adam_beta2: f(&hp["adam_beta2"]),
        adam_weight_decay: f(&hp["adam_weight_decay"]),
        adam_epsilon: f(&hp["adam_epsilon"]),
        max_grad_norm: Some(f(&hp["max_grad_norm"])),
        use_ema: true,
        ema_max_decay: f(&hp["ema_max_decay"]),
        ema_inv_gamma: f(&hp["ema_inv_gamma"]),
        ema_power: f(&hp["ema_power"]),
        show_progress: false,
        ..TrainConfig::default()
    }
}

#[test]
fn three_adamw_steps_match_pytorch() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = WeightSource::open(fixtures().join("steps.safetensors")).unwrap();
    let ad = device().autodiff();
    let model = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &ad).unwrap();
    let total = f(&hp["num_training_steps"]) as usize;
    let mut trainer = Trainer::new(&config(hp), model, total, &ad).unwrap();
    let x0: Tensor<4> = tensor(&source, "x0", &ad);

    // Gradients of the first step's loss at the initial weights, before clipping.
    let noise0: Tensor<4> = tensor(&source, "noise/0", &ad);
    let loss = training_loss(
        trainer.model(),
        trainer.scheduler(),
        x0.clone(),
        noise0,
        &timesteps(&source, 0),
    )
    .unwrap();
    let grads = FlatGradients::from_backward(trainer.model(), loss.backward());
    let (key, diff) = compare(&grads.state_dict(trainer.model()), &source, "grad0");
    eprintln!("worst gradient difference: {diff:e} (`{key}`)");
    assert!(diff <= TOL, "gradient of `{key}` differs by {diff}");
    let norm = grads.total_norm();
    assert!(
        (f64::from(norm) - f(&expected["grad_norms"][0])).abs() <= f64::from(TOL),
        "grad norm {norm}"
    );

    let steps = f(&hp["steps"]) as usize;
    for step in 0..steps {
        let noise: Tensor<4> = tensor(&source, &format!("noise/{step}"), &ad);
        let stats = trainer
            .step(x0.clone(), noise, &timesteps(&source, step))
            .unwrap();
        let want_loss = f(&expected["losses"][step]);
        assert!(
            (f64::from(stats.loss) - want_loss).abs() <= f64::from(TOL),
            "step {step}: loss {} vs {want_loss}",
            stats.loss
        );
        let want_norm = f(&expected["grad_norms"][step]);
        assert!(
            (f64::from(stats.grad_norm) - want_norm).abs() <= f64::from(TOL),
            "step {step}: grad norm {} vs {want_norm}",
            stats.grad_norm
        );
        assert!(
            (stats.lr - f(&expected["lrs"][step])).abs() <= 1e-15,
            "step {step}: lr {}",
            stats.lr
        );
        let decay = stats.ema_decay.unwrap();
        assert!(
            (decay - f(&expected["ema_decays"][step])).abs() <= 1e-15,
            "step {step}: ema decay {decay}"
        );
    }

    let (key, diff) = compare(&state_dict(trainer.model()), &source, "param");
    eprintln!("worst parameter difference after {steps} steps: {diff:e} (`{key}`)");
    assert!(diff <= TOL, "after {steps} steps `{key}` differs by {diff}");
    let (key, diff) = compare(&state_dict(&trainer.inference_model()), &source, "ema");
    eprintln!("worst EMA difference: {diff:e} (`{key}`)");
    assert!(diff <= TOL, "EMA `{key}` differs by {diff}");
    // The update moved every trainable parameter: a test that compared unchanged weights would
    // pass with a broken optimizer.
    let initial: BTreeMap<String, Vec<f32>> =
        state_dict(&UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &device()).unwrap())
            .into_iter()
            .map(|t| (t.key, t.values))
            .collect();
    let moved = state_dict(trainer.model())
        .iter()
        .filter(|t| max_abs_diff(&t.values, &initial[&t.key]) > 10.0 * TOL)
        .count();
    assert_eq!(moved, initial.len(), "some parameters did not move");
}

#[test]
fn sample_and_v_prediction_losses_match_pytorch() {
    let expected = expected();
    let source = WeightSource::open(fixtures().join("steps.safetensors")).unwrap();
    let dev = device();
    let model = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &dev).unwrap();
    let x0: Tensor<4> = tensor(&source, "x0", &dev);
    let noise: Tensor<4> = tensor(&source, "noise/0", &dev);
    for (prediction_type, key) in [
        (PredictionType::VPrediction, "loss_v_prediction"),
        (PredictionType::Sample, "loss_sample"),
    ] {
        let scheduler = DDPMScheduler::new(DDPMSchedulerConfig {
            prediction_type,
            ..DDPMSchedulerConfig::default()
        })
        .unwrap();
        let loss = training_loss(
            &model,
            &scheduler,
            x0.clone(),
            noise.clone(),
            &timesteps(&source, 0),
        )
        .unwrap()
        .into_scalar::<f32>();
        let want = f(&expected[key]);
        assert!(
            (f64::from(loss) - want).abs() <= f64::from(TOL),
            "{key}: {loss} vs {want}"
        );
    }
}
